"""Errors the kit raises on bad input.

Every failure the kit can explain is an :class:`ErnieLabError`. Its message says what is wrong
(naming the file, tensor or argument) and what to do about it. The subclasses let a caller
catch one family of problems without string matching.
"""


class ErnieLabError(Exception):
    """Base class of every error ernie-lab raises on purpose."""


class ConfigError(ErnieLabError):
    """A config.json is missing, unreadable, or describes a model the kit cannot build."""


class CheckpointError(ErnieLabError):
    """A weight file is missing, corrupt, or does not match the config."""


class InputError(ErnieLabError, ValueError):
    """Arguments to a model, tokenizer or generator are of the wrong type, shape or range."""


def require_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` if it is an int (a bool is not) of at least ``minimum``, else an InputError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise InputError(f"{name} must be an integer{bound}, got {value!r}.")
    return value


class NotEnoughMemoryError(ErnieLabError, MemoryError):
    """A model would not fit the free memory of the machine; refused before anything is allocated."""


class TrainingDiverged(InputError, FloatingPointError):
    """The loss or a gradient became NaN / Inf: training stops before the update, naming the step."""

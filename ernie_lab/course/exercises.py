"""Exercises with a check: a stub is "not attempted yet", a wrong answer says what differs, a right one says so.

A notebook's exercise is two short cells: the student's stub, then one line that checks it::

    def rope_rotate_half(x, cos, sin):
        ...                                   # your code here

    exercises.check("01.rope_rotate_half", rope_rotate_half)

`check(name, *answers)` has three outcomes, chosen so that "Run All" on a fresh notebook never fails
and a wrong answer is impossible to overlook:

* **not attempted** (an answer left as `None` or `...`, a function whose body is `...` and so returns
  `None`, or one that raises `NotImplementedError`): prints "not attempted yet" and the hint, returns
  `None`, never raises;
* **wrong**: raises `ExerciseFailed` (an `AssertionError`), whose message says what differs from the
  expected answer and repeats the hint; the cell turns red;
* **right**: prints "correct" and a remark worth reading, returns `True`.

Each exercise is defined once, in the package, by the notebook it belongs to: `ernie_lab/course/exercise_sets/
nbNN.py` registers the exercises of notebook NN with `@exercise("NN.name", hint=...)` on a *judge*, a
function that receives the student's answers, computes the expected result itself (from `ernie_lab` or
the reference) and raises `Mismatch("what differs")` when they disagree. The official solutions live
apart, in `solutions/NN_name.py` (never in the student's notebook), together with plausible wrong
answers; `tests/test_exercises.py` proves that every solution passes, and every stub and every wrong
answer fails, so that no check can pass by accident.

A judge cannot be gamed by memorising: it draws fresh inputs on every call (`fresh_generator()`), at two
or more shapes, with the edge cases a plausible shortcut gets wrong. `call` hands the student copies of
the inputs, so an answer that writes into its arguments cannot change what it is compared with.

When the student's piece is the next step of the story, the notebook goes on with it through `use`:

    rms_norm = exercises.use("01.rms_norm", rms_norm, kit=ernie_lab_rms_norm)

which checks the answer and returns it when correct, returns the kit's own when the stub is not written
yet (saying so, so "Run All" still works), and raises like `check` when it is wrong.
"""

from __future__ import annotations

import importlib
import math
import secrets
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError


class ExerciseFailed(AssertionError):
    """A wrong answer: the message says what differs from the expected one."""


class Mismatch(Exception):
    """Raised by a judge: the answer differs from the expected one (the message says how)."""


class NotAttempted(Exception):
    """Raised (by `call`) when a student's function is still a stub."""


@dataclass(frozen=True)
class Exercise:
    name: str                              # "NN.short_name": notebook number, then what it is about
    hint: str                              # printed on a stub and after a wrong answer
    judge: Callable[..., str | None]       # answers -> remark on success; raises Mismatch when wrong


REGISTRY: dict[str, Exercise] = {}


def exercise(name: str, hint: str) -> Callable:
    """Register `judge` as the check of exercise `name` ("NN.short_name")."""
    def register(judge: Callable) -> Callable:
        REGISTRY[name] = Exercise(name, hint, judge)
        return judge
    return register


def is_stub(answer: Any) -> bool:
    """An answer the student has not filled in: `None` or `...`."""
    return answer is None or answer is Ellipsis


def call(function: Callable, *args, **kwargs) -> Any:
    """Run a student's function inside a judge.

    A stub (its body only ``...`` or ``pass``, or raising NotImplementedError) is not attempted. A
    function that raises, or that has a body and still returns None (a forgotten ``return``), is a
    wrong answer whose message says so.
    """
    if not callable(function):
        raise Mismatch(f"expected a function, got {describe(function)}")
    args, kwargs = copied(args), copied(kwargs)
    try:
        result = function(*args, **kwargs)
    except NotImplementedError as err:
        raise NotAttempted from err
    except Exception as err:  # noqa: BLE001  (the student's code may raise anything)
        raise Mismatch(f"your function raised {type(err).__name__}: {err}") from err
    if result is None:
        if is_stub_function(function):
            raise NotAttempted
        raise Mismatch("your function returned None: it has a body but no `return` of its result")
    return result


def copied(value: Any) -> Any:
    """Tensors (also inside lists, tuples and dicts) cloned, so a student's function that writes into its
    inputs cannot change the judge's copy; models and other objects are passed as they are."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [copied(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):   # a named tuple is passed as it is
        return tuple(copied(v) for v in value)
    if isinstance(value, dict):
        return {k: copied(v) for k, v in value.items()}
    return value


def fresh_generator():
    """A torch.Generator seeded anew on every call: a judge's inputs differ every time it runs."""
    import torch

    return torch.Generator().manual_seed(secrets.randbits(62))


def draw_int(g, low: int, high: int) -> int:
    """A whole number in [low, high], drawn with the judge's generator ``g``."""
    import torch

    return int(torch.randint(low, high + 1, (1,), generator=g))


def is_stub_function(function: Callable) -> bool:
    """A function whose body does nothing but return None (``...``, ``pass``, a docstring): a fresh stub.

    Anything that cannot be inspected (a builtin, a partial, a callable object) counts as a stub, so a
    None from it stays "not attempted" as before.
    """
    import dis

    code = getattr(getattr(function, "__func__", function), "__code__", None)
    if code is None:
        return True
    meaningful = [i for i in dis.get_instructions(code) if i.opname not in ("RESUME", "NOP", "CACHE")]
    return [(i.opname, i.argval) for i in meaningful] in (
        [("LOAD_CONST", None), ("RETURN_VALUE", None)], [("RETURN_CONST", None)])


def describe(value: Any) -> str:
    """'str 'abc'', 'tensor of shape (2, 3) float32', 'list of 3 items': what an answer is, in a few words."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} item(s): {value!r:.80}"
    return f"{type(value).__name__} {value!r:.80}"


def get(name: str) -> Exercise:
    """The exercise called `name`, loading the exercise set of its notebook on first use."""
    if not isinstance(name, str):
        raise InputError(f"the exercise name must be a string like '01.causal_mask' (the first argument of "
                         f"check), got {type(name).__name__} {name!r:.60}.")
    if name not in REGISTRY:
        number = name.split(".", 1)[0]
        try:
            importlib.import_module(f"ernie_lab.course.exercise_sets.nb{number}")
        except ModuleNotFoundError:
            pass
    if name not in REGISTRY:
        raise InputError(f"no exercise called {name!r}; known: {', '.join(sorted(REGISTRY)) or 'none loaded'}.")
    return REGISTRY[name]


def all_exercises() -> dict[str, Exercise]:
    """Every exercise of every notebook (imports all exercise sets)."""
    from . import exercise_sets

    for module in exercise_sets.MODULES:
        importlib.import_module(f"ernie_lab.course.exercise_sets.{module}")
    return dict(REGISTRY)


def check(name: str, *answers: Any) -> bool | None:
    """Check the answers to exercise `name`: None = not attempted yet, True = correct; raise ExerciseFailed when wrong."""
    item = get(name)
    if not answers or any(is_stub(a) for a in answers):
        return _not_attempted(item)
    try:
        remark = item.judge(*answers)
    except NotAttempted:
        return _not_attempted(item)
    except Mismatch as err:
        raise ExerciseFailed(f"{name}: not yet right. {err}\nHint: {item.hint}") from None
    except Exception as err:  # noqa: BLE001  (an answer of a kind the judge cannot even compare)
        given = "; ".join(describe(a) for a in answers)
        raise ExerciseFailed(f"{name}: not yet right. Your answer ({given}) is not of the kind this exercise "
                             f"expects ({_expected(item)}); checking it raised {type(err).__name__}: {err}\n"
                             f"Hint: {item.hint}") from err
    print(f"{name}: correct." + (f" {remark}" if remark else ""))
    return True


def use(name: str, answer: Any, kit: Any) -> Any:
    """Check `answer` to exercise `name` and return what the notebook goes on with.

    Correct: the student's own piece. Not attempted yet: `kit`, the package's implementation, and a line
    saying so (a fresh notebook still runs from top to bottom). Wrong: `ExerciseFailed`, as in `check`.
    """
    if check(name, answer):
        print(f"{name}: the notebook goes on with your version.")
        return answer
    print(f"{name}: the notebook goes on with ernie_lab's version until yours is written.")
    return kit


def _expected(item: Exercise) -> str:
    """What the exercise takes, from its judge's parameters: 'a function' or the value's name."""
    import inspect

    names = list(inspect.signature(item.judge).parameters)
    return ", ".join("a function" if n == "function" else f"the value asked for ({n})" for n in names)


def _not_attempted(item: Exercise) -> None:
    print(f"{item.name}: not attempted yet. Hint: {item.hint}")
    return None


# ------------------------------------------------------------------------------------------------
# Small helpers for judges: compare and say what differs.
# ------------------------------------------------------------------------------------------------

def expect_equal(label: str, got: Any, expected: Any) -> None:
    """Exact comparison of numbers, strings or lists; the message shows both.

    A tensor or array answer is compared by its values (``tolist()``); an answer of another kind than
    the expected one (a str for a number, a number for a list) fails saying which kind was expected.
    """
    got = _plain(got)
    if not _same_kind(got, expected):
        raise Mismatch(f"{label}: expected {_kind(expected)} like {expected!r:.80}, got {describe(got)}.")
    if isinstance(got, (float, list, tuple)) and _has_non_finite(got):
        raise Mismatch(f"{label}: your answer {got!r:.80} holds NaN or Inf; expected {expected!r:.80}.")
    if got != expected:
        raise Mismatch(f"{label}: you have {got!r}, expected {expected!r}.")


def expect_close(label: str, got: float, expected: float, rel: float = 1e-6, abs_: float = 0.0) -> None:
    """Numbers equal up to a relative (or absolute) tolerance; the message shows both and the ratio.

    NaN and Inf are never close to anything; a str, a list or a tensor of several numbers is not a number.
    """
    got = as_number(label, got)
    if not abs(got - expected) <= max(rel * abs(expected), abs_):  # `not <=`: False for NaN as well
        ratio = f" (ratio {got / expected:.4g})" if expected and math.isfinite(got) else ""
        raise Mismatch(f"{label}: you have {got:,.6g}, expected {expected:,.6g}{ratio}.")


def expect_tensor(label: str, got: Any, expected, atol: float = 1e-5) -> None:
    """Tensors of the same shape and values; the message gives the shape, the dtype or the largest difference.

    A floating-point answer is expected where the expected tensor is floating point (an integer or
    bool tensor has lost the fractions), and NaN / Inf entries fail even where the expected ones are.
    """
    import torch

    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{label}: expected a tensor of shape {tuple(expected.shape)}, got {describe(got)}.")
    if got.shape != expected.shape:
        raise Mismatch(f"{label}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}.")
    if got.is_complex() or (expected.is_floating_point() and not got.is_floating_point()):
        raise Mismatch(f"{label}: dtype {got.dtype}, expected a floating-point tensor ({expected.dtype}).")
    got = got.detach().to("cpu", torch.float64)
    if not torch.isfinite(got).all():
        raise Mismatch(f"{label}: your tensor holds NaN or Inf ({int((~torch.isfinite(got)).sum())} entries).")
    diff = (got - expected.detach().to("cpu", torch.float64)).abs().max().item() if got.numel() else 0.0
    if not diff <= atol:
        raise Mismatch(f"{label}: largest difference from the expected values is {diff:.3g} (tolerance {atol:g}).")


def name_the_mistake(got: Any, expected, mistakes: dict, atol: float = 1e-5) -> None:
    """Raise Mismatch naming a mistake only when the answer equals that mistake's output on the same inputs.

    ``mistakes`` maps what to say to the tensor that mistake produces. A mistake whose output equals the
    right answer on these inputs is never named; when several mistakes give the answer's very output, all
    of them are named. Anything that is not a finite floating-point tensor of the expected shape is left to
    `expect_tensor`, which says what differs.
    """
    import torch

    if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.is_floating_point()
            and bool(torch.isfinite(got).all())):
        return
    got, right = got.detach().double(), expected.detach().double()
    matching = [says for says, output in mistakes.items()
                if output.shape == got.shape and not torch.allclose(output.double(), right, atol=atol)
                and torch.allclose(got, output.double(), atol=atol)]
    if matching:
        raise Mismatch("; or ".join(matching))


def switched_off(module, what_to_use: str):
    """A copy of ``module`` whose own forward refuses to run: the answer must compute the output from the
    module's parts (``what_to_use`` says which), not by calling the very thing it is asked to write."""
    import copy

    copied = copy.deepcopy(module)

    def refuse(*args, **kwargs):
        raise RuntimeError(f"this module's own forward is switched off in the check: {what_to_use}")
    copied.forward = refuse
    return copied


def as_number(label: str, value: Any) -> float:
    """A finite real number from an answer (int, float, numpy or one-element tensor); else Mismatch saying so."""
    value = _plain(value)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (int, float)):
        value = value[0]  # a one-element tensor's tolist() of a (1,) shape
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Mismatch(f"{label}: expected a number, got {describe(value)}.")
    value = float(value)
    if not math.isfinite(value):
        raise Mismatch(f"{label}: your answer is {value}; expected a finite number.")
    return value


def as_ints(label: str, values: Any) -> list[int]:
    """A list of whole numbers from an answer (a list, tuple, tensor or array of them); else Mismatch saying so."""
    values = _plain(values)
    if not isinstance(values, (list, tuple)):
        raise Mismatch(f"{label}: expected a list of whole numbers, got {describe(values)}.")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v).is_integer():
            raise Mismatch(f"{label}: expected a list of whole numbers, but it holds {describe(v)}.")
        out.append(int(v))
    return out


def _plain(value: Any) -> Any:
    """Tensors and numpy values/arrays as Python numbers and lists; anything else as it is."""
    library = type(value).__module__.split(".")[0]
    if library in ("torch", "numpy") and callable(getattr(value, "tolist", None)):
        return value.tolist()
    return value


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "True or False"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a str"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"


def _same_kind(got: Any, expected: Any) -> bool:
    """Whether an answer can be compared with the expected value at all (a list with a tuple, an int with a float)."""
    for kinds in ((int, float), (str,), (list, tuple), (dict,)):
        if isinstance(expected, kinds):
            return isinstance(got, kinds)
    return True


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_has_non_finite(v) for v in value)
    return False

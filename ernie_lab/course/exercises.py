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
"""

from __future__ import annotations

import importlib
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
    """Run a student's function inside a judge; a stub (returns None, raises NotImplementedError) is not attempted."""
    if not callable(function):
        raise Mismatch(f"expected a function, got {type(function).__name__}: {function!r:.80}")
    try:
        result = function(*args, **kwargs)
    except NotImplementedError as err:
        raise NotAttempted from err
    if result is None:
        raise NotAttempted
    return result


def get(name: str) -> Exercise:
    """The exercise called `name`, loading the exercise set of its notebook on first use."""
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
    print(f"{name}: correct." + (f" {remark}" if remark else ""))
    return True


def _not_attempted(item: Exercise) -> None:
    print(f"{item.name}: not attempted yet. Hint: {item.hint}")
    return None


# ------------------------------------------------------------------------------------------------
# Small helpers for judges: compare and say what differs.
# ------------------------------------------------------------------------------------------------

def expect_equal(label: str, got: Any, expected: Any) -> None:
    """Exact comparison of numbers or lists; the message shows both."""
    if got != expected:
        raise Mismatch(f"{label}: you have {got!r}, expected {expected!r}.")


def expect_close(label: str, got: float, expected: float, rel: float = 1e-6, abs_: float = 0.0) -> None:
    """Numbers equal up to a relative (or absolute) tolerance; the message shows both and the ratio."""
    try:
        got = float(got)
    except (TypeError, ValueError):
        raise Mismatch(f"{label}: expected a number, got {type(got).__name__}.") from None
    if abs(got - expected) > max(rel * abs(expected), abs_):
        ratio = f" (ratio {got / expected:.4g})" if expected else ""
        raise Mismatch(f"{label}: you have {got:,.6g}, expected {expected:,.6g}{ratio}.")


def expect_tensor(label: str, got: Any, expected, atol: float = 1e-5) -> None:
    """Tensors of the same shape and values; the message gives the shape or the largest difference."""
    import torch

    if not isinstance(got, torch.Tensor):
        raise Mismatch(f"{label}: expected a tensor, got {type(got).__name__}.")
    if got.shape != expected.shape:
        raise Mismatch(f"{label}: shape {tuple(got.shape)}, expected {tuple(expected.shape)}.")
    diff = (got.float() - expected.float()).abs().max().item()
    if not diff <= atol:
        raise Mismatch(f"{label}: largest difference from the expected values is {diff:.3g} (tolerance {atol:g}).")

"""Both sides of every exercise check: the official solution passes, a stub is "not attempted yet"
(printed, never raised), and each plausible wrong answer fails with a message that says what differs.
Every exercise a notebook checks exists and has a solution."""

import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from ernie_lab import exercises
from ernie_lab.errors import InputError
from ernie_lab.course.exercises import ExerciseFailed

ROOT = Path(__file__).resolve().parent.parent
SOLUTION_FILES = sorted((ROOT / "solutions").glob("[0-9][0-9]_*.py"))


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"solution_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SOLUTIONS, WRONG = {}, {}
for _path in SOLUTION_FILES:
    _module = _load(_path)
    SOLUTIONS.update(_module.SOLUTIONS)
    WRONG.update(_module.WRONG)
ALL = exercises.all_exercises()


def _stub_like(answer):
    """What a fresh notebook passes: None for a value, a function whose body is `...` for a function."""
    if callable(answer):
        parameters = ", ".join(inspect.signature(answer).parameters)
        scope = {}
        exec(f"def stub({parameters}):\n    ...\n", scope)
        return scope["stub"]
    return None


def test_every_exercise_has_a_solution_and_a_wrong_answer():
    assert sorted(SOLUTIONS) == sorted(ALL), "solutions/ and ernie_lab/exercise_sets disagree"
    for name in ALL:
        assert WRONG.get(name), f"{name}: no plausible wrong answer in solutions/"


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_solution_passes(name, capsys):
    assert exercises.check(name, *SOLUTIONS[name]) is True
    assert "correct" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(SOLUTIONS))
def test_stub_is_not_attempted(name, capsys):
    stubs = tuple(_stub_like(a) for a in SOLUTIONS[name])
    assert exercises.check(name, *stubs) is None
    out = capsys.readouterr().out
    assert "not attempted yet" in out and ALL[name].hint in out
    assert exercises.check(name, *(... for _ in SOLUTIONS[name])) is None      # `answer = ...` too


@pytest.mark.parametrize("name,index", [(n, i) for n in sorted(WRONG) for i in range(len(WRONG[n]))])
def test_wrong_answer_fails_and_says_why(name, index):
    with pytest.raises(ExerciseFailed) as failure:
        exercises.check(name, *WRONG[name][index])
    message = str(failure.value)
    assert message.startswith(f"{name}: not yet right.") and "Hint:" in message
    assert len(message) > len(f"{name}: not yet right. Hint: {ALL[name].hint}") + 10, "say what differs"


def test_wrong_answer_is_an_assertion_error():
    assert issubclass(ExerciseFailed, AssertionError)


def test_unknown_exercise_is_an_input_error():
    with pytest.raises(InputError, match="no exercise called"):
        exercises.check("01.no_such_thing", 1)


def test_notebooks_check_only_known_exercises_and_every_exercise_is_used():
    used = {}
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        used[source.name[:2]] = set(re.findall(r"""exercises\.check\(\s*["']([0-9]{2}\.\w+)["']""", source.read_text()))
    checked = set().union(*used.values())
    assert checked <= set(ALL), f"notebooks check unknown exercises: {checked - set(ALL)}"
    for name in ALL:
        if name[:2] in used:
            assert name in used[name[:2]], f"{name}: notebook {name[:2]} never checks it"


def test_solutions_stay_out_of_the_notebooks():
    for path in SOLUTION_FILES:
        notebook = ROOT / "notebooks" / path.name
        if notebook.exists():
            text = notebook.read_text()
            assert "from solutions" not in text and "import solutions" not in text, notebook.name

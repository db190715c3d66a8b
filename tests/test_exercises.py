"""Both sides of every exercise check: the official solution passes, a stub is "not attempted yet"
(printed, never raised), and each plausible wrong answer fails with a message that says what differs,
over several draws (every judge draws fresh inputs on each call).

Beyond the hand-written wrong answers in solutions/, every "write the function" exercise meets a
catalogue of generic shortcuts: replaying the outputs memorised from an earlier check, NaN in the
answer, the answer as a Python list instead of a tensor, zeros of the right shape, the first input
handed back. A judge must also call the student's function at two or more input shapes, on inputs that
differ from one check to the next. Every exercise a notebook checks exists and has a solution."""

import importlib.util
import itertools
import inspect
import re
from pathlib import Path

import pytest
import torch
from torch import nn

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
DRAWS = 3                                   # every judge draws fresh inputs: run each answer several times
# Function exercises are those whose solution contains a function; the rest ask for a value.
FUNCTION_EXERCISES = sorted(n for n, answers in SOLUTIONS.items() if any(callable(a) for a in answers))


def _wrong_answers(name):
    """(answers, phrase its message must hold or None) for each wrong answer in solutions/: a WRONG entry is
    a tuple of answers, or {"answers": (...), "says": "..."} when the judge names that very mistake."""
    for entry in WRONG[name]:
        if isinstance(entry, dict):
            yield entry["answers"], entry["says"]
        else:
            yield entry, None


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
    for _ in range(DRAWS):
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
    answers, says = list(_wrong_answers(name))[index]
    for _ in range(DRAWS):
        message = _failure(name, answers)
        assert len(message) > len(f"{name}: not yet right. Hint: {ALL[name].hint}") + 10, "say what differs"
        if says is not None:
            assert says in message, f"{name}: the diagnosis should name this mistake ({says!r}): {message}"


def _failure(name, answers) -> str:
    with pytest.raises(ExerciseFailed) as failure:
        exercises.check(name, *answers)
    message = str(failure.value)
    assert message.startswith(f"{name}: not yet right.") and "Hint:" in message
    return message


# ------------------------------------------------------------------------------------------------
# The generic shortcut catalogue, run against every "write the function" exercise.
# ------------------------------------------------------------------------------------------------

class Spy:
    """Wraps a solution: records every call's inputs (their shapes and values) and its output."""

    def __init__(self, function):
        self.function, self.calls = function, []
        self.__signature__ = inspect.signature(function)

    def __call__(self, *args, **kwargs):
        out = self.function(*args, **kwargs)
        self.calls.append((args, kwargs, out))
        return out


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, nn.Module):
        yield from value.parameters()
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _shapes(call) -> tuple:
    args, kwargs, _ = call
    scalars = tuple(v for v in (*args, *kwargs.values()) if isinstance(v, int) and not isinstance(v, bool))
    return tuple(tuple(t.shape) for t in _tensors((args, kwargs))) + scalars


def _spied(name):
    """Run the check once with every function answer spied on; return the spies (by answer index)."""
    spies = {i: Spy(a) for i, a in enumerate(SOLUTIONS[name]) if callable(a)}
    answers = [spies.get(i, a) for i, a in enumerate(SOLUTIONS[name])]
    assert exercises.check(name, *answers) is True
    return spies


def _with(name, index, function):
    answers = list(SOLUTIONS[name])
    answers[index] = function
    return answers


@pytest.mark.parametrize("name", FUNCTION_EXERCISES)
def test_judge_calls_the_function_at_several_shapes_on_fresh_inputs(name):
    first, second = _spied(name), _spied(name)
    for index, spy in first.items():
        shapes = {_shapes(call) for call in spy.calls}
        assert len(shapes) >= 2, f"{name}: the judge calls the function at one input shape only ({shapes})"
        before = [t for call in spy.calls for t in _tensors(call[:2]) if t.is_floating_point()]
        after = [t for call in second[index].calls for t in _tensors(call[:2]) if t.is_floating_point()]
        assert before, f"{name}: the judge passes no floating-point tensor to draw fresh"
        assert len(before) != len(after) or any(
            a.shape != b.shape or not torch.equal(a, b) for a, b in zip(before, after)), \
            f"{name}: two checks fed the function the very same inputs (draw them fresh on every call)"


@pytest.mark.parametrize("name", FUNCTION_EXERCISES)
def test_replaying_memorised_outputs_fails(name):
    for index, spy in _spied(name).items():
        outputs = itertools.cycle([out for *_, out in spy.calls])

        def replay(*args, **kwargs):          # the earlier check's outputs, in the order they were asked for
            return next(outputs)
        replay.__signature__ = inspect.signature(SOLUTIONS[name][index])
        _failure(name, _with(name, index, replay))


def _changed(out, change):
    """`change` (tensor -> answer) applied to the answer's numbers: a floating-point tensor, the first one in a
    tuple or list of outputs, a float, or the values of a {name: number} dict. None when the answer holds none."""
    if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
        return change(out)
    if isinstance(out, (tuple, list)):
        for i, item in enumerate(out):
            if isinstance(item, torch.Tensor) and item.is_floating_point() and item.numel():
                return type(out)([*out[:i], change(item), *out[i + 1:]])
    if isinstance(out, float):
        value = change(torch.tensor([out], dtype=torch.float64))
        return value.item() if isinstance(value, torch.Tensor) else None     # [x] is a number's other spelling
    if isinstance(out, dict) and out and all(isinstance(v, float) for v in out.values()):
        values = change(torch.tensor(list(out.values()), dtype=torch.float64))
        return dict(zip(out, values.tolist())) if isinstance(values, torch.Tensor) else values
    return None


def _wrapped(name, index, change):
    solution = SOLUTIONS[name][index]

    def answer(*args, **kwargs):
        return _changed(solution(*args, **kwargs), change)
    answer.__signature__ = inspect.signature(solution)
    return answer


def _nan_in(out):
    out = out.detach().clone()
    out.view(-1)[out.numel() // 2] = float("nan")
    return out


SHORTCUTS = {
    "NaN in the answer": _nan_in,
    "the answer as a Python list": lambda out: out.tolist(),
    "zeros of the right shape": torch.zeros_like,
    "the answer times 1.01": lambda out: out * 1.01,
}


@pytest.mark.parametrize("shortcut", sorted(SHORTCUTS))
@pytest.mark.parametrize("name", FUNCTION_EXERCISES)
def test_generic_shortcut_fails(name, shortcut):
    """Applied to every function answer whose output holds floating-point numbers (a tensor, a tuple of
    outputs, a {name: number} dict)."""
    tried = 0
    for index, spy in _spied(name).items():
        if _changed(spy.calls[0][2], SHORTCUTS[shortcut]) is not None:
            _failure(name, _with(name, index, _wrapped(name, index, SHORTCUTS[shortcut])))
            tried += 1
    if not tried:
        pytest.skip(f"{name}: no function answer returns floating-point numbers")


@pytest.mark.parametrize("name", FUNCTION_EXERCISES)
def test_handing_back_the_first_input_fails(name):
    for index, answer in enumerate(SOLUTIONS[name]):
        if callable(answer):
            solution = SOLUTIONS[name][index]

            def first_input(*args, **kwargs):
                solution(*args, **kwargs)
                return args[0] if args else next(iter(kwargs.values()))
            first_input.__signature__ = inspect.signature(solution)
            _failure(name, _with(name, index, first_input))


def test_the_course_asks_for_enough_exercises_and_enough_code():
    per_notebook = {}
    for name in ALL:
        per_notebook.setdefault(name[:2], []).append(name)
    assert len(ALL) >= 30 and len(FUNCTION_EXERCISES) >= 20, (len(ALL), len(FUNCTION_EXERCISES))
    for number in ("01", "02", "03", "04", "05", "06", "07", "08"):
        assert len(per_notebook.get(number, [])) >= 2, f"notebook {number} has fewer than two exercises"


def test_use_goes_on_with_the_students_piece_or_the_kits(capsys):
    name = next(n for n in FUNCTION_EXERCISES if len(SOLUTIONS[n]) == 1)
    kit, (solution,) = object(), SOLUTIONS[name]
    assert exercises.use(name, solution, kit) is solution
    assert "goes on with your version" in capsys.readouterr().out
    assert exercises.use(name, _stub_like(solution), kit) is kit
    assert "ernie_lab's version" in capsys.readouterr().out
    wrong, _ = next(_wrong_answers(name))
    with pytest.raises(ExerciseFailed):
        exercises.use(name, *wrong, kit)


def test_the_student_cannot_change_the_judges_inputs():
    x = torch.ones(3)
    exercises.call(lambda t: t.mul_(0) + 1, x)
    assert torch.equal(x, torch.ones(3))


def test_wrong_answer_is_an_assertion_error():
    assert issubclass(ExerciseFailed, AssertionError)


def test_unknown_exercise_is_an_input_error():
    with pytest.raises(InputError, match="no exercise called"):
        exercises.check("01.no_such_thing", 1)


def test_notebooks_check_only_known_exercises_and_every_exercise_is_used():
    used = {}
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        used[source.name[:2]] = set(re.findall(r"""exercises\.(?:check|use)\(\s*["']([0-9]{2}\.\w+)["']""", source.read_text()))
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

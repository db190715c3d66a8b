"""Notebook sources are jupytext py:percent files; every .ipynb is made from them and stays out of git.

The checks: each source is a valid py:percent notebook that proves itself with assert cells; jupytext
reproduces it through an .ipynb round trip; no .ipynb is tracked; and a student's notebook full of
outputs survives `make notebooks-build` (the step `make test` runs) without a tracked file changing.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
IN_GIT = shutil.which("git") is not None and (ROOT / ".git").exists()
needs_git_and_make = pytest.mark.skipif(not IN_GIT or shutil.which("make") is None,
                                        reason="needs a git checkout and make")


def git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout


def make(folder: Path, target: str) -> None:
    """Run a Makefile target with this interpreter; `-o` skips the venv stamp (this environment is set up)."""
    command = ["make", "-s", "-C", str(folder), "-o", ".venv/.installed", target, f"PY={sys.executable}"]
    planned = subprocess.run([*command, "-n"], check=True, capture_output=True, text=True).stdout
    assert "pip" not in planned, f"`make {target}` would install into this environment:\n{planned}"
    subprocess.run(command, check=True, capture_output=True, text=True)


def test_there_are_notebook_sources():
    assert len(SOURCES) >= 6, "expected notebooks/NN_name.py sources"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_source_is_py_percent_and_checked(path):
    text = path.read_text(encoding="utf-8")
    assert "format_name: percent" in text.split("# ---", 2)[1], f"{path.name}: not a jupytext py:percent file"
    notebook = jupytext.reads(text, fmt="py:percent")
    nbformat.validate(nbformat.reads(jupytext.writes(notebook, fmt="ipynb"), as_version=4))
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert sum("assert " in c.source for c in code) >= 3, f"{path.name}: needs check cells that assert"
    assert any(c.cell_type == "markdown" for c in notebook.cells), f"{path.name}: needs markdown cells"
    assert all(not c.outputs and c.execution_count is None for c in code)
    # notebooks run from any folder (the tests execute copies elsewhere): no path tricks, no cwd
    assert not any("sys.path" in c.source or "Path.cwd()" in c.source for c in code), \
        f"{path.name}: find repository files with ernie_lab.notebook.repo_path(), not sys.path or the cwd"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_jupytext_round_trip_reproduces_the_source(path):
    text = path.read_text(encoding="utf-8")
    as_ipynb = jupytext.writes(jupytext.reads(text, fmt="py:percent"), fmt="ipynb")
    back = jupytext.writes(jupytext.reads(as_ipynb, fmt="ipynb"), fmt="py:percent")
    assert back == text, f"{path.name}: run `jupytext --to py:percent` on it once to normalise it"


@pytest.mark.skipif(not IN_GIT, reason="needs a git checkout")
def test_no_ipynb_is_tracked():
    assert git(ROOT, "ls-files", "notebooks/*.ipynb").strip() == ""
    assert git(ROOT, "check-ignore", "notebooks/00_tour.ipynb").strip() == "notebooks/00_tour.ipynb"


@pytest.fixture
def checkout(tmp_path):
    """A throw-away git repository holding this working tree as one commit (tracked and new files)."""
    folder = tmp_path / "kit"
    files = git(ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, folder / name)
    git(folder.parent, "init", "-q", str(folder))
    git(folder, "add", "-A")
    git(folder, "-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-q", "-m", "copy")
    return folder


def give_outputs(path: Path) -> None:
    """What a student's run leaves in a notebook: execution counts and outputs in every code cell."""
    notebook = nbformat.read(path, as_version=4)
    for count, cell in enumerate((c for c in notebook.cells if c.cell_type == "code"), start=1):
        cell.execution_count = count
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"student output {count}\n")]
    nbformat.write(notebook, path)


@needs_git_and_make
def test_student_outputs_stay_out_of_git_and_out_of_the_tests(checkout):
    make(checkout, "notebooks")                                 # what `make lab` does first
    student = checkout / "notebooks" / "00_tour.ipynb"
    assert {p.stem for p in (checkout / "notebooks").glob("*.ipynb")} == {p.stem for p in SOURCES}
    give_outputs(student)
    worked_on = student.read_bytes()

    make(checkout, "notebooks")                                 # a second `make lab` keeps the student's work
    make(checkout, "notebooks-build")                           # what `make test` runs before pytest
    assert student.read_bytes() == worked_on
    built = sorted((checkout / "build" / "nbtest").glob("*.ipynb"))
    assert [p.stem for p in built] == [p.stem for p in SOURCES]
    for path in built:
        cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
        assert cells and all(not c.outputs and c.execution_count is None for c in cells), path.name
    fresh = nbformat.read(checkout / "build" / "nbtest" / "00_tour.ipynb", as_version=4)
    assert [c.source for c in fresh.cells] == [c.source for c in nbformat.read(student, as_version=4).cells]
    assert git(checkout, "status", "--porcelain") == "", "a generated notebook or its outputs reached git"


@needs_git_and_make
def test_a_teachers_edit_in_the_lab_lands_in_the_py_and_outputs_do_not(checkout):
    from jupytext.sync_contentsmanager import TextFileContentsManager

    make(checkout, "notebooks")
    lab = TextFileContentsManager(root_dir=str(checkout / "notebooks"))  # what `make lab` serves, with jupytext
    notebook = lab.get("00_tour.ipynb")["content"]
    notebook.cells[0].source += "\n\nA sentence the teacher added."
    for count, cell in enumerate((c for c in notebook.cells if c.cell_type == "code"), start=1):
        cell.execution_count = count
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=f"lab output {count}\n")]
    lab.save({"type": "notebook", "format": "json", "content": notebook}, "00_tour.ipynb")  # "Save" in the lab

    source = (checkout / "notebooks" / "00_tour.py").read_text(encoding="utf-8")
    assert "# A sentence the teacher added." in source, "jupytext.toml should pair the .ipynb with its .py"
    assert "lab output" not in source
    assert "lab output 1" in (checkout / "notebooks" / "00_tour.ipynb").read_text(encoding="utf-8")
    assert git(checkout, "status", "--porcelain").split() == ["M", "notebooks/00_tour.py"]


def test_importing_ernie_lab_notebook_pulls_in_no_plotting():
    code = ("import sys, ernie_lab, ernie_lab.course.notebook; "
            "print(sorted(m for m in ('matplotlib', 'ipywidgets', 'IPython') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.stdout.strip() == "[]"


def test_setup_reads_fast_mode_and_seeds(monkeypatch, capsys):
    import torch

    from ernie_lab import notebook

    monkeypatch.setenv("ERNIE_LAB_FAST", "1")
    assert notebook.setup(seed=3) is True
    first = torch.rand(3)
    monkeypatch.setenv("ERNIE_LAB_FAST", "0")
    assert notebook.setup(seed=3) is False
    assert torch.equal(torch.rand(3), first)
    assert str(ROOT / "ernie_lab") in capsys.readouterr().out
    assert notebook.repo_path("data", "tokenizer") == ROOT / "data" / "tokenizer"


def test_compare_fails_above_the_tolerance_relative_to_large_values():
    import torch

    from ernie_lab.course.notebook import compare

    assert compare("equal", torch.ones(3), torch.ones(3)) == 0.0
    compare("round-off on values near 100", torch.tensor([100.0 + 5e-4]), torch.tensor([100.0]), atol=1e-5)
    with pytest.raises(AssertionError, match="exceeds"):
        compare("off by 1e-3", torch.tensor([1e-3]), torch.tensor([0.0]))
    with pytest.raises(AssertionError, match="shape"):
        compare("shapes", torch.zeros(2), torch.zeros(3))

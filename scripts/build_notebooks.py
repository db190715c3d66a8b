"""Make notebooks (.ipynb) from their reviewed sources, notebooks/NN_name.py (jupytext py:percent).

    python scripts/build_notebooks.py --into build/nbtest   # fresh copies, no outputs (what `make test` runs)
    python scripts/build_notebooks.py --missing             # notebooks/*.ipynb that do not exist yet (`make lab`)

`--into` empties the folder's notebooks and writes every one anew, so tests never see a student's
outputs. `--missing` never touches an existing .ipynb: a student's work stays as it is, and JupyterLab's
jupytext pairing reads the inputs from the .py when that is newer (after a `git pull`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jupytext

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def sources(folder: Path = NOTEBOOKS) -> list[Path]:
    """The notebook sources: notebooks/NN_name.py, in order."""
    return sorted(folder.glob("[0-9][0-9]_*.py"))


def write_notebook(source: Path, target: Path) -> None:
    """Convert one py:percent source into an .ipynb without outputs."""
    notebook = jupytext.read(source, fmt="py:percent")
    jupytext.write(notebook, target, fmt="ipynb")


def build_into(folder: Path) -> list[Path]:
    """Fresh copies of every notebook in `folder` (old .ipynb there are removed first)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.ipynb"):
        stale.unlink()
    built = [folder / f"{source.stem}.ipynb" for source in sources()]
    for source, target in zip(sources(), built):
        write_notebook(source, target)
    return built


def create_missing() -> list[Path]:
    """Write notebooks/NN_name.ipynb where it does not exist yet; return the ones written."""
    created = []
    for source in sources():
        target = source.with_suffix(".ipynb")
        if not target.exists():
            write_notebook(source, target)
            created.append(target)
    return created


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--into", type=Path, metavar="FOLDER", help="write fresh copies of all notebooks here")
    mode.add_argument("--missing", action="store_true", help="create notebooks/*.ipynb that do not exist yet")
    args = parser.parse_args(argv)
    if not sources():
        print(f"no notebook sources (NN_name.py) in {NOTEBOOKS}", file=sys.stderr)
        return 1
    written = build_into(args.into) if args.into else create_missing()
    for path in written:
        print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

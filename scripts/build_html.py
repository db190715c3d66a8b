"""Execute every notebook once and write a static HTML site a lecturer can preview without running anything.

    python scripts/build_html.py [--notebooks build/nbtest] [--out build/html] [--only 01_dense...]

1. every `notebooks/NN_name.py` (or the fresh .ipynb copies in --notebooks, as `make test` builds them)
   is executed with nbclient in fast mode (`ERNIE_LAB_FAST=1` comes from the caller's environment); an
   error in any cell stops with that cell's traceback, as nbval does: this run *is* the notebook test;
2. the executed notebook is kept next to the page (`build/html/NN_name.ipynb`, outputs included);
3. each becomes `build/html/NN_name.html` with nbconvert's lab template: images inline (plots and the
   diagrams of figures/, embedded as data: URLs), interactive widgets replaced by their static fallback
   (the other outputs of the same bundle, e.g. a PNG), and no JavaScript from a CDN (nbconvert's page
   links require.js and MathJax from the web: those tags are removed); formulas are typeset by a local
   copy of MathJax 2.7 (`build/html/mathjax/`, from the pinned `jupyter-server-mathjax` package);
4. each notebook's exercise solutions (`solutions/NN_name.py`: the code and the reasoning in its comments)
   become `build/html/NN_name.solutions.html` beside it, syntax-highlighted, linked from the index;
5. `index.html` lists the pages with their time estimates.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.IGNORECASE | re.DOTALL)
REMOTE = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", re.IGNORECASE)   # a URL to another host
# MathJax 2.7 served from the site itself (copied from the jupyter-server-mathjax package by copy_mathjax)
MATHJAX_FOLDER = "mathjax"
MATHJAX_URL = f"{MATHJAX_FOLDER}/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"
# That package ships the STIX-Web fonts only (no TeX fonts): MathJax must be told, before it starts
MATHJAX_FONTS = ('<script type="text/x-mathjax-config">MathJax.Hub.Config({"HTML-CSS": {availableFonts: '
                 '["STIX-Web"], preferredFont: "STIX-Web", webFont: "STIX-Web", imageFont: null}});</script>')
REMOTE_LINK = re.compile(r"""<link\b[^>]*\bhref\s*=\s*["']?(?:https?:)?//[^>]*>""", re.IGNORECASE)


def read_notebook(path: Path):
    """An .ipynb as it is, or a jupytext .py source as a fresh notebook."""
    import jupytext
    import nbformat

    return nbformat.read(path, as_version=4) if path.suffix == ".ipynb" else jupytext.read(path)


def execute(nb, workdir: Path, timeout: int = 900):
    """Run every cell in a fresh kernel inside `workdir`; raises nbclient's CellExecutionError on an error."""
    from nbclient import NotebookClient

    from jupyter_client.manager import KernelManager

    workdir.mkdir(parents=True, exist_ok=True)
    # IPC sockets (local files) instead of TCP ports: no "Kernel is running over TCP without encryption" per notebook
    # (an absolute, short socket path: the kernel starts in workdir, and a socket path holds at most 107 bytes)
    sockets = tempfile.mkdtemp(prefix="ernie-nb-") if os.name == "posix" else None
    km = KernelManager(kernel_name="python3", transport="ipc", ip=os.path.join(sockets, "k")) if sockets else None
    try:
        NotebookClient(nb, km=km, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        if km is not None and km.has_kernel:  # nbclient leaves a kernel it was handed running: stop it here,
            km.shutdown_kernel(now=True)      # or every notebook's kernel (and its models) lives until we exit
        if sockets:
            shutil.rmtree(sockets, ignore_errors=True)
    return nb


def static_widgets(nb):
    """Replace each widget view by the static outputs of its bundle; drop the widget state."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        kept = []
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            if WIDGET_VIEW in data:
                data.pop(WIDGET_VIEW)
                if set(data) <= {"text/plain"}:      # nothing but "HBox(children=...)": a progress bar, drop it
                    continue
            kept.append(output)
        if "outputs" in cell:
            cell.outputs = kept
    return nb


def strip_remote(html: str) -> str:
    """Remove every script that loads code from another host (a src, or an import inside it) and every
    <link href=...> off the page: nbconvert's require.js, MathJax and mermaid come from CDNs."""
    html = SCRIPT.sub(lambda m: "" if REMOTE.search(m.group(0)) else m.group(0), html)
    return REMOTE_LINK.sub("", html)


def to_html(nb, notebook_folder: Path) -> str:
    """nbconvert's lab template with images embedded; markdown image paths are relative to `notebook_folder`.

    nbconvert embeds only files below the folder it is given, so `../figures/x.png` (as the notebooks in
    notebooks/ write it) is resolved against the folder above.
    """
    import copy

    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = cell.source.replace("](../", "](")
    exporter = HTMLExporter(template_name="lab", embed_images=True, mathjax_url=MATHJAX_URL)
    body, _ = exporter.from_notebook_node(static_widgets(nb), resources={"metadata": {"path": str(notebook_folder.parent)}})
    body = body.replace(f'<script src="{MATHJAX_URL}">', f'{MATHJAX_FONTS}\n<script src="{MATHJAX_URL}">', 1)
    return strip_remote(body)


def copy_mathjax(out: Path) -> bool:
    """Put MathJax 2.7 (from the pinned jupyter-server-mathjax package) at ``out/mathjax``; False without it."""
    try:
        import jupyter_server_mathjax
    except ImportError:
        print("jupyter-server-mathjax is missing: formulas stay LaTeX (make venv installs it)", file=sys.stderr)
        return False
    source = Path(jupyter_server_mathjax.__file__).parent / "static"
    shutil.copytree(source, out / MATHJAX_FOLDER, dirs_exist_ok=True)
    return True


def title_and_time(nb) -> tuple[str, str]:
    """The notebook's `# title` and its stated duration ("Time: ... min"), for the index."""
    first = next((c.source for c in nb.cells if c.cell_type == "markdown"), "")
    title = next((line.lstrip("# ").strip() for line in first.splitlines() if line.startswith("# ")), "notebook")
    found = re.search(r"(\d+\s*(?:-\s*\d+\s*)?min)", first)
    return title, found.group(1) if found else ""


def solutions_page(stem: str) -> str | None:
    """solutions/`stem`.py as a page: the docstring as the reasoning, then the highlighted code (None if absent)."""
    from pygments import highlight
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer

    source = ROOT / "solutions" / f"{stem}.py"
    if not source.exists():
        return None
    formatter = HtmlFormatter(style="friendly", linenos=False)
    body = highlight(source.read_text(encoding="utf-8"), PythonLexer(), formatter)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>Solutions: {stem}</title><style>{formatter.get_style_defs('.highlight')}"
            "body{max-width:60em;margin:2em auto;font-family:sans-serif} pre{font-size:0.9em}</style></head>"
            f"<body><h1>Solutions to {stem}</h1><p>Each solution explains itself in its comments: why each step, "
            f"and why the common mistakes (the <code>WRONG</code> answers at the end) fail. "
            f"<a href='{stem}.html'>Back to the notebook</a>.</p>{body}</body></html>")


def index_page(entries: list[tuple[str, str, str]]) -> str:
    def row(page, title, minutes):
        stem = page.removesuffix(".html")
        solutions = f' · <a href="{stem}.solutions.html">solutions</a>' if (ROOT / "solutions" / f"{stem}.py").exists() else ""
        return f'<li><a href="{page}">{title}</a> <small>{minutes}</small>{solutions}</li>'
    rows = "\n".join(row(*entry) for entry in entries)
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>ernie-lab: the course</title></head>"
            f"<body><h1>ernie-lab: the course, rendered in fast mode</h1><ol start='0'>\n{rows}\n</ol></body></html>")


def sources(folder: Path | None, only: list[str]) -> list[Path]:
    paths = sorted(folder.glob("[0-9][0-9]_*.ipynb")) if folder else sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
    return [p for p in paths if not only or any(p.stem.startswith(o) for o in only)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--notebooks", type=Path, help="folder of .ipynb to run (default: the notebooks/*.py sources)")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "html")
    parser.add_argument("--only", nargs="*", default=[], help="notebook name prefixes, e.g. 00 01")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    os.environ.setdefault("ERNIE_LAB_FAST", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    args.out.mkdir(parents=True, exist_ok=True)
    import nbformat

    entries, failed = [], []
    for path in sources(args.notebooks, args.only):
        start = time.perf_counter()
        nb = read_notebook(path)
        try:
            execute(nb, args.out / "run" / path.stem, args.timeout)
        except Exception as err:                    # CellExecutionError: report, go on, fail at the end
            failed.append(path.stem)
            print(f"FAILED {path.stem}:\n{err}", file=sys.stderr)
            continue
        nbformat.write(nb, args.out / f"{path.stem}.ipynb")
        (args.out / f"{path.stem}.html").write_text(to_html(nb, ROOT / "notebooks"), encoding="utf-8")
        solutions = solutions_page(path.stem)
        if solutions:
            (args.out / f"{path.stem}.solutions.html").write_text(solutions, encoding="utf-8")
        entries.append((f"{path.stem}.html", *title_and_time(nb)))
        print(f"{path.stem}: ran and rendered in {time.perf_counter() - start:.0f} s", flush=True)
    (args.out / "index.html").write_text(index_page(entries), encoding="utf-8")
    copy_mathjax(args.out)
    print(f"wrote {len(entries)} pages to {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The rendered course (`make html`): every notebook has a page with its figures inline and no script
from another host; the pieces of the renderer each do their one job.

The site checks read the pages `make test` built just before pytest (ERNIE_LAB_HTML names the folder;
without it they are skipped, so `pytest tests/test_html.py` alone runs only the fast unit tests)."""

import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("build_html", ROOT / "scripts" / "build_html.py")
build_html = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_html)
spec = importlib.util.spec_from_file_location("make_figures", ROOT / "scripts" / "make_figures.py")
make_figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_figures)

SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))
FIGURE_REF = re.compile(r"!\[[^\]]*\]\(\.\./figures/([\w.-]+)\)")
REMOTE_SCRIPT = re.compile(r"<script\b[^>]*>(?:(?!</script>).)*?(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", re.I | re.S)
SITE = os.environ.get("ERNIE_LAB_HTML")


def test_remote_scripts_and_links_are_removed_local_ones_kept():
    html = ('<script src="https://cdnjs.cloudflare.com/require.js"></script>'
            '<script type="module">const m = await import("https://cdn.jsdelivr.net/npm/mermaid");</script>'
            '<link rel="stylesheet" href="https://cdn.example.org/x.css">'
            '<script type="text/x-mathjax-config">init_mathjax = 1;</script><p>kept</p>')
    out = build_html.strip_remote(html)
    assert "cdnjs" not in out and "jsdelivr" not in out and "example.org" not in out
    assert "init_mathjax" in out and "<p>kept</p>" in out


def test_executing_a_notebook_prints_no_kernel_warning(tmp_path):
    """`make html` runs ten kernels: none may print "Kernel is running over TCP without encryption", and each
    is shut down when its notebook is done (a kernel left running says "Parent appears to have exited" when
    the script ends, and holds its notebook's models in memory until then)."""
    import subprocess
    import sys

    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell("print(6 * 7)"))
    nbformat.write(nb, tmp_path / "00_x.ipynb")
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_html.py"), "--notebooks", str(tmp_path),
                           "--out", str(tmp_path / "html")], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "without encryption" not in done.stdout + done.stderr, done.stderr[-2000:]
    assert "[IPKernelApp] WARNING" not in done.stdout + done.stderr, done.stderr[-2000:]
    executed = nbformat.read(tmp_path / "html" / "00_x.ipynb", as_version=4)
    assert executed.cells[0].outputs[0]["text"] == "42\n"


def test_widgets_become_their_static_fallback():
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("w")
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={build_html.WIDGET_VIEW: {"model_id": "a"}, "text/plain": "HBox()"}),
        nbformat.v4.new_output("display_data", data={build_html.WIDGET_VIEW: {"model_id": "b"}, "image/png": "iVBOR"}),
    ]
    nb.cells.append(cell)
    nb.metadata["widgets"] = {"state": {}}
    out = build_html.static_widgets(nb)
    assert "widgets" not in out.metadata
    assert [list(o["data"]) for o in out.cells[0].outputs] == [["image/png"]]


def test_a_markdown_figure_is_embedded_inline():
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_markdown_cell("# T\n\n![layer](../figures/decoder_layer.png)"))
    html = build_html.to_html(nb, ROOT / "notebooks")
    assert re.search(r'<img[^>]+src="data:image/png;base64,', html)
    assert not REMOTE_SCRIPT.search(html)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_every_figure_a_notebook_shows_exists_and_is_drawn_by_make_figures(source):
    drawn = {f.__name__ for f in make_figures.ALL}
    for name in FIGURE_REF.findall(source.read_text()):
        assert (ROOT / "figures" / name).is_file(), f"{source.name} shows figures/{name}, which is missing"
        assert Path(name).stem in drawn or name == "ernie45_family.png", f"no function in make_figures draws {name}"


def test_no_notebook_cell_draws_a_diagram():
    for source in SOURCES:
        for cell in source.read_text().split("# %%"):
            assert cell.count("FancyBboxPatch") + cell.count("plt.Rectangle") < 3, \
                f"{source.name}: a diagram drawn in a cell; draw it in scripts/make_figures.py"


@pytest.mark.skipif(not SITE, reason="the site is checked after `make html` (make test sets ERNIE_LAB_HTML)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_every_page_exists_with_its_figures_inline_and_no_remote_script(source):
    page = Path(SITE) / f"{source.stem}.html"
    assert page.is_file(), f"{page} was not rendered"
    html = page.read_text(encoding="utf-8")
    inline = len(re.findall(r'src="data:image/(?:png|svg\+xml|jpeg)', html))
    assert inline >= max(1, len(FIGURE_REF.findall(source.read_text()))), f"{page.name}: {inline} inline images"
    assert not REMOTE_SCRIPT.search(html), f"{page.name} loads a script from another host"
    assert not re.search(r"<link\b[^>]*href=[\"']?(?:https?:)?//", html, re.I), f"{page.name} links a remote file"
    assert f'href="{page.name}"' in (Path(SITE) / "index.html").read_text(), f"index.html does not list {page.name}"


def test_solutions_page_shows_the_reasoning_and_the_code():
    page = build_html.solutions_page("00_tour")
    assert "Solutions to 00_tour" in page and "kv_crossover" in page and "grouped-query attention" in page
    assert 'href="00_tour.html"' in page.replace("'", '"') and "<script" not in page
    assert build_html.solutions_page("99_no_such_notebook") is None


@pytest.mark.skipif(not SITE, reason="the site is checked after `make html` (make test sets ERNIE_LAB_HTML)")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_every_notebook_has_a_solutions_page_linked_from_the_index(source):
    page = Path(SITE) / f"{source.stem}.solutions.html"
    assert page.exists() and "WRONG" in page.read_text(encoding="utf-8"), page.name
    assert f'href="{page.name}"' in (Path(SITE) / "index.html").read_text()


@pytest.mark.skipif(not SITE, reason="the executed notebooks are checked after `make html`")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_no_stray_outputs(source):
    """A cell's last expression echoed as bare text (a `True`, a float, a context object) is noise."""
    for cell, output in executed_outputs(source):
        if output.get("output_type") == "execute_result":
            assert set(output["data"]) != {"text/plain"}, \
                f"{source.name}: stray output {output['data']['text/plain'][:60]!r} of {cell.source.splitlines()[-1]!r}"


def executed_outputs(source):
    """(cell, output) for every output of the notebook as `make html` executed it."""
    executed = Path(SITE) / f"{source.stem}.ipynb"
    if not executed.exists():
        pytest.fail(f"{executed} was not executed")
    for cell in nbformat.read(executed, as_version=4).cells:
        for output in cell.get("outputs", []):
            yield cell, output


@pytest.mark.skipif(not SITE, reason="the site is checked after `make html` (make test sets ERNIE_LAB_HTML)")
def test_formulas_are_typeset_by_a_local_mathjax():
    """Every page with a formula loads MathJax from the site's own mathjax/ folder, which holds it."""
    site = Path(SITE)
    assert (site / build_html.MATHJAX_FOLDER / "MathJax.js").is_file(), "build/html/mathjax/MathJax.js is missing"
    config = build_html.MATHJAX_URL.split("config=")[1].split(",")[0]
    assert (site / build_html.MATHJAX_FOLDER / "config" / f"{config}.js").is_file(), f"MathJax config {config} missing"
    with_formulas = [s for s in SOURCES if re.search(r"\$[^$\n]+\$", s.read_text())]
    assert with_formulas, "no notebook has a $...$ formula: the check would prove nothing"
    for source in with_formulas:
        html = (site / f"{source.stem}.html").read_text(encoding="utf-8")
        assert f'src="{build_html.MATHJAX_URL}"' in html.replace("&amp;", "&"), f"{source.stem}.html loads no local MathJax"
        assert build_html.MATHJAX_FONTS in html, f"{source.stem}.html does not point MathJax at the fonts it ships"


@pytest.mark.skipif(not SITE, reason="the executed notebooks are checked after `make html`")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_no_library_deprecation_warnings_in_outputs(source):
    """A red FutureWarning / DeprecationWarning box in a notebook is noise a student cannot act on."""
    for cell, output in executed_outputs(source):
        if output.get("output_type") == "stream" and output.get("name") == "stderr":
            found = re.search(r"\w*(?:FutureWarning|DeprecationWarning)[^\n]*", output["text"])
            assert not found, f"{source.name}: {found.group(0)[:200]!r} in the cell {cell.source.splitlines()[0]!r}"

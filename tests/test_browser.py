"""A real browser runs notebook 06 in JupyterLab and plays with the routing explorer.

JupyterLab starts on a free local port with a random token, serving a fresh copy of
notebooks/06_routing_by_modality.ipynb (made from its .py source) in a temporary folder; Debian's
Chromium, driven by Playwright, opens it, runs all cells, and checks that no cell shows an error.
Then it moves the explorer's layer slider and changes the view, and checks that the rendered picture
changed (screenshots compared pixel by pixel), and that selecting another patch lists that patch's
experts. Screenshots go to figures/browser/ (git-ignored). The server is stopped by its PID.

Needs `/usr/bin/chromium` (`apt-get update && apt-get install -y chromium`; `.ci/run` does it) and the
pinned `playwright` of the dev extra (no browser download: Playwright drives the system Chromium).
"""

import importlib.util
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("ERNIE_LAB_CHROMIUM", "/usr/bin/chromium"))
NOTEBOOK = "06_routing_by_modality"
SHOTS = ROOT / "figures" / "browser"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
HOW_TO_ENABLE = ("to run it: `apt-get update && apt-get install -y chromium` (gives /usr/bin/chromium) and "
                 "`pip install -c requirements.lock playwright` (the dev extra pins it); .ci/run does both")

if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM}; {HOW_TO_ENABLE}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason=f"playwright is not installed; {HOW_TO_ENABLE}")
pytest.importorskip("jupyterlab", reason="JupyterLab is not installed (dev extra)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkout_copy(folder: Path) -> Path:
    """A git repository in ``folder`` laid out like the checkout for a lab session: notebooks/*.py and
    jupytext.toml, figures/*.png and .gitignore, committed; the .ipynb made from their .py (as `make lab`)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_notebooks import write_notebook

    (folder / "notebooks").mkdir(parents=True)
    (folder / "figures").mkdir()
    for source in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")) + [ROOT / "notebooks" / "jupytext.toml"]:
        shutil.copy2(source, folder / "notebooks" / source.name)
    for figure in (ROOT / "figures").glob("*.png"):
        shutil.copy2(figure, folder / "figures" / figure.name)
    shutil.copy2(ROOT / ".gitignore", folder / ".gitignore")
    git = ["git", "-C", str(folder), "-c", "user.name=student", "-c", "user.email=student@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "the course as cloned"], check=True)
    for source in sorted((folder / "notebooks").glob("[0-9][0-9]_*.py")):
        write_notebook(source, source.with_suffix(".ipynb"))
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token, folder): JupyterLab started as `make lab` starts it (scripts/lab.py: same root,
    settings and arguments), on a fresh git copy of the course in ``folder``; stopped by its PID."""
    spec = importlib.util.spec_from_file_location("lab_script", ROOT / "scripts" / "lab.py")
    lab_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lab_script)
    folder = checkout_copy(tmp_path_factory.mktemp("lab") / "course")
    private = folder.parent
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "ERNIE_LAB_FAST": "1", "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(private / ".jupyter"),
           "JUPYTERLAB_SETTINGS_DIR": str(private / ".lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(private / ".ws"),
           "JUPYTER_RUNTIME_DIR": str(private / ".runtime")}
    env.pop("MPLBACKEND", None)  # the notebook's %matplotlib inline decides
    command = lab_script.lab_command(folder, "--no-browser", f"--port={port}", "--ip=127.0.0.1",
                         f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
                         "--LabApp.expose_app_in_browser=True")
    log = open(private / "server.log", "wb")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (private / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base, token, folder
    finally:
        os.kill(server.pid, signal.SIGTERM)  # the server shuts its kernels down, then exits
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def server_log(folder: Path) -> str:
    return (folder.parent / "server.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def open_notebook(browser, base: str, token: str, name: str, width: int = 1500, height: int = 1100):
    """A new browser page on ``name`` alone: ``reset`` drops the lab's saved workspace, which would otherwise
    reopen the notebooks of earlier tests beside it (and Run All would find another notebook current)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(f"{base}/lab/tree/notebooks/{name}.ipynb?reset&token={token}", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-Notebook", timeout=60_000)
    return page


NOTEBOOK_STATE = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  if (!panel || !panel.content || !panel.content.model) return null;
  const cells = panel.content.model.cells, out = [];
  for (let i = 0; i < cells.length; i++) {
    const cell = cells.get(i);
    if (cell.type !== 'code') continue;
    const errors = [];
    for (let j = 0; j < cell.outputs.length; j++) {
      const o = cell.outputs.get(j).toJSON();
      if (o.output_type === 'error') errors.push(o.ename + ': ' + o.evalue);
    }
    out.push({count: cell.executionCount, errors: errors});
  }
  const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
  return {cells: out, status: kernel ? kernel.status : 'none'};
}"""


def run_all_cells(page, timeout_s: float = 480) -> list[dict]:
    """Run every cell through JupyterLab's own command; wait until each has run or one failed."""
    deadline = time.time() + 60
    while not page.evaluate("() => !!(window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                            "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                            "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel)"):
        assert time.time() < deadline, "the notebook did not open with a kernel"
        time.sleep(0.5)
    page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'",
                           timeout=60_000)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")  # not awaited: polled below
    deadline = time.time() + timeout_s
    while True:
        state = page.evaluate(NOTEBOOK_STATE)
        done = all(c["count"] is not None for c in state["cells"]) and state["status"] == "idle"
        failed = any(c["errors"] for c in state["cells"])
        if done or failed:
            return state["cells"]
        assert time.time() < deadline, f"the notebook was still running after {timeout_s} s: {state}"
        time.sleep(1)


def widget_control(page, kind: str, label: str):
    """The ipywidgets control of ``kind`` (css class) whose description is ``label``."""
    return page.locator(f".{kind}").filter(has=page.locator(".widget-label", has_text=label)).first


def picture(page):
    return page.locator(".widget-image").last


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def changed_share(before: bytes, after: bytes) -> float:
    """Share of pixels that differ between two screenshots (1.0 when the sizes differ)."""
    a, b = pixels(before), pixels(after)
    if a.shape != b.shape:
        return 1.0
    return float((abs(a - b).sum(-1) > 30).mean())


def wait_for_new_picture(page, old_src: str, timeout_s: float = 20) -> None:
    page.wait_for_function("(old) => { const imgs = document.querySelectorAll('.widget-image');"
                           " return imgs.length && imgs[imgs.length - 1].src !== old; }", arg=old_src,
                           timeout=timeout_s * 1000)
    page.wait_for_timeout(300)  # let the new picture paint


def press_right(page, slider, times: int = 1) -> None:
    """Move an ipywidgets slider with the keyboard, as a user would (its handle takes arrow keys)."""
    handle = slider.locator(".noUi-handle").first
    handle.focus()
    for _ in range(times):
        handle.press("ArrowRight")


DIAGRAMS = """() => Array.from(document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown img')).map(
  img => ({alt: img.alt, src: img.getAttribute('src'), complete: img.complete, width: img.naturalWidth}))"""


def test_diagrams_show_and_a_saved_session_leaves_git_clean(lab, browser):
    """Notebook 00 in `make lab`'s configuration: every diagram loads (no 404, a real picture, not its alt
    text); Run All with a real kernel and a save leave `git status` clean (the .py is rewritten, unchanged)."""
    base, token, folder = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    expected = len(re.findall(r"!\[[^\]]*\]\(\.\./figures/", (folder / "notebooks" / "00_tour.py").read_text()))
    page = open_notebook(browser, base, token, "00_tour", width=1400, height=1000)
    try:
        page.wait_for_function(f"() => document.querySelectorAll('.jp-MarkdownCell .jp-RenderedMarkdown img').length >= {expected}",
                               timeout=60_000)
        for n in range(expected):  # bring each into view (the notebook renders lazily), let it load
            page.locator(".jp-MarkdownCell .jp-RenderedMarkdown img").nth(n).scroll_into_view_if_needed()
        page.wait_for_function(DIAGRAMS.replace("() =>", "() => (") + ").every(i => i.complete)", timeout=30_000)
        diagrams = page.evaluate(DIAGRAMS)
        page.locator(".jp-MarkdownCell .jp-RenderedMarkdown img").first.scroll_into_view_if_needed()
        page.wait_for_timeout(1500)  # let the cells around it paint: the screenshot is for a person to look at
        page.screenshot(path=str(SHOTS / "00-diagrams.png"))
        missing = [d["alt"] for d in diagrams if d["width"] < 50]
        assert len(diagrams) == expected and not missing, f"diagrams not shown (alt text instead): {missing} of {diagrams}"
        assert " 404 GET /files/" not in server_log(folder), "the lab answered 404 for a file the notebook shows"
        assert not page.locator(".jp-toast-container, .Toastify__toast").filter(has_text="news").count(), \
            "JupyterLab's news pop-up covers the notebook"
        # the pop-up comes late and only online, so also ask the running lab for the setting that decides it
        notification = json.load(urllib.request.urlopen(
            f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}", timeout=10))
        fetch_news = notification["settings"].get(  # the user's choice, else the default make lab's overrides set
            "fetchNews", notification["schema"]["properties"]["fetchNews"]["default"])
        assert fetch_news == "false", f"make lab's settings leave JupyterLab's news pop-up on (fetchNews {fetch_news!r})"

        py = folder / "notebooks" / "00_tour.py"
        before = py.stat().st_mtime_ns
        cells = run_all_cells(page)
        failures = [(i, c["errors"]) for i, c in enumerate(cells) if c["errors"]]
        assert not failures, f"cells failed in the browser: {failures}"
        page.evaluate("() => { window.jupyterapp.commands.execute('docmanager:save'); }")  # not awaited: polled below
        deadline = time.time() + 30
        while py.stat().st_mtime_ns == before:  # jupytext writes the .py beside the .ipynb
            assert time.time() < deadline, "saving in JupyterLab did not write notebooks/00_tour.py"
            time.sleep(0.5)
        time.sleep(1)
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain"], capture_output=True, text=True,
                                check=True).stdout
        diff = subprocess.run(["git", "-C", str(folder), "diff"], capture_output=True, text=True).stdout
        assert status == "", f"a lab session with no edits changed tracked files:\n{status}\n{diff[:2000]}"
    finally:
        page.close()


def explorer_reloads_without_dead_widgets(page, base: str, token: str, folder: Path, browser) -> None:
    """Save, shut the kernel down (as closing the lab does), reopen: the widgets come back from the state
    saved in the .ipynb (scripts/lab_settings: saveState), no "Error displaying widget: model not found"."""

    ipynb = folder / "notebooks" / f"{NOTEBOOK}.ipynb"
    before = ipynb.stat().st_mtime_ns
    page.evaluate("() => { window.jupyterapp.commands.execute('docmanager:save'); }")  # not awaited: polled below
    deadline = time.time() + 30
    while ipynb.stat().st_mtime_ns == before:
        assert time.time() < deadline, "saving did not write the notebook"
        time.sleep(0.5)
    time.sleep(1)
    page.close()
    sessions = json.load(urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=10))
    for session in sessions:
        urllib.request.urlopen(urllib.request.Request(f"{base}/api/sessions/{session['id']}?token={token}",
                                                      method="DELETE"), timeout=30)
    reopened = open_notebook(browser, base, token, NOTEBOOK, width=1400, height=1000)
    try:
        reopened.wait_for_function("() => { const i = document.querySelectorAll('.widget-image');"
                                   " return i.length && i[i.length - 1].naturalWidth > 0; }", timeout=60_000)
        reopened.wait_for_timeout(2000)
        dead = reopened.locator(".jp-OutputArea-output", has_text="Error displaying widget").count()
        reopened.locator(".widget-image").last.scroll_into_view_if_needed()
        reopened.screenshot(path=str(SHOTS / "explorer-reopened.png"))
        assert dead == 0, f"{dead} dead widget views after reopening the saved notebook"
    finally:
        reopened.close()


def test_notebook_runs_and_the_explorer_responds(lab, browser):
    base, token, folder = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    started = time.time()
    page = open_notebook(browser, base, token, NOTEBOOK, width=1400, height=1000)
    page.evaluate("() => window.jupyterapp.shell.activateById('filebrowser')")  # a student's lab: file browser open
    try:
        if True:
            cells = run_all_cells(page)
            page.screenshot(path=str(SHOTS / "notebook.png"))
            failures = [(i, c["errors"]) for i, c in enumerate(cells) if c["errors"]]
            assert not failures, f"cells failed in the browser: {failures}"
            assert all(c["count"] is not None for c in cells)

            image = picture(page)
            image.scroll_into_view_if_needed()
            page.wait_for_timeout(500)
            first = image.screenshot(path=str(SHOTS / "explorer-start.png"))
            src = image.get_attribute("src")
            legible = page.evaluate("""() => { const imgs = document.querySelectorAll('.widget-image');
              const img = imgs[imgs.length - 1], area = img.closest('.jp-OutputArea');
              const out = img.closest('.jp-OutputArea-child');
              return {shown: img.getBoundingClientRect().width, natural: img.naturalWidth,
                      area: area.getBoundingClientRect().width,
                      static: out.querySelectorAll('img:not(.widget-image)').length,
                      before: out.previousElementSibling ? out.previousElementSibling.querySelectorAll('img').length : 0}; }""")
            # the figure is drawn at 100 dpi (10 pt text: 14 px): shown at three quarters of that or more, it reads
            # (the old layout, controls beside it, showed it at a third: 360 px wide, titles illegible)
            assert legible["shown"] >= 0.8 * legible["area"] and legible["shown"] >= 0.75 * legible["natural"], \
                f"the explorer's picture is too small to read at a 1400 px window: {legible}"
            assert legible["static"] == 0 and legible["before"] == 0, f"a static picture is shown beside the live one: {legible}"

            press_right(page, widget_control(page, "widget-slider", "layer"), 2)  # the last MoE layer
            wait_for_new_picture(page, src)
            moved = image.screenshot(path=str(SHOTS / "explorer-layer.png"))
            assert changed_share(first, moved) > 0.002, "moving the layer slider did not change the picture"

            experts = page.locator("pre.ernie-path").last
            listed = experts.inner_text()
            src = image.get_attribute("src")
            press_right(page, widget_control(page, "widget-slider", "position"), 5)
            page.wait_for_function("() => { const p = document.querySelectorAll('pre.ernie-path');"
                                   " return p.length && p[p.length - 1].parentElement.innerText.includes('position 5,'); }",
                                   timeout=30_000)
            selected = experts.inner_text()
            assert selected != listed, "selecting another patch did not change the experts listed"
            lines = selected.strip().splitlines()
            assert len(lines) == 3 and all(line.startswith("layer") and " V" in line for line in lines), selected
            wait_for_new_picture(page, src)  # the selected cell is framed
            image.screenshot(path=str(SHOTS / "explorer-patch.png"))

            src = image.get_attribute("src")
            page.locator(".widget-toggle-button", has_text="token strip").first.click()
            wait_for_new_picture(page, src)
            strip = image.screenshot(path=str(SHOTS / "explorer-token-strip.png"))
            assert changed_share(moved, strip) > 0.05, "changing the view did not change the picture"
            page.screenshot(path=str(SHOTS / "explorer.png"), full_page=False)
        explorer_reloads_without_dead_widgets(page, base, token, folder, browser)
    finally:
        page.close()
    print(f"browser test: {time.time() - started:.0f} s")


SITE = os.environ.get("ERNIE_LAB_HTML")


@pytest.mark.skipif(not SITE, reason="the rendered site is opened after `make html` (make test sets ERNIE_LAB_HTML)")
def test_rendered_page_typesets_its_formulas_offline(browser):
    """Open 01's page from disk with the network off: MathJax (served from the site) turns the LaTeX into math."""
    page = (Path(SITE) / "01_dense_decoder_from_scratch.html").resolve()  # make test names the site relatively
    context = browser.new_context(offline=True)
    try:
        tab = context.new_page()
        tab.goto(page.as_uri())
        tab.wait_for_function("() => window.MathJax && MathJax.Hub && MathJax.Hub.queue.pending === 0 "
                              "&& document.querySelectorAll('.MathJax, .MathJax_Display').length > 0",
                              timeout=60_000)
        typeset = tab.evaluate("() => document.querySelectorAll('.MathJax, .MathJax_Display').length")
        errors = tab.evaluate("() => document.querySelectorAll('.MathJax_Error, merror').length")
    finally:
        context.close()
    assert typeset >= 10, f"only {typeset} formulas typeset on {page.name}"
    assert errors == 0, f"{errors} formulas failed to typeset on {page.name}"

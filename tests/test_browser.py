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

import io
import os
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(base url, token, folder): a JupyterLab server on a fresh copy of notebook 06, stopped by its PID."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from build_notebooks import write_notebook

    folder = tmp_path_factory.mktemp("lab")
    write_notebook(ROOT / "notebooks" / f"{NOTEBOOK}.py", folder / f"{NOTEBOOK}.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "ERNIE_LAB_FAST": "1", "HF_HUB_OFFLINE": "1", "JUPYTER_CONFIG_DIR": str(folder / ".jupyter"),
           "JUPYTERLAB_SETTINGS_DIR": str(folder / ".lab-settings"), "JUPYTERLAB_WORKSPACES_DIR": str(folder / ".ws")}
    env.pop("MPLBACKEND", None)  # the notebook's %matplotlib inline decides
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
               f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False",
               f"--ServerApp.root_dir={folder}", "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    quiet = folder / ".lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    quiet.parent.mkdir(parents=True)
    quiet.write_text('{"fetchNews": "false", "checkForUpdates": false}')  # no news pop-up over the widget
    log = open(folder / "server.log", "wb")
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
                    raise RuntimeError("JupyterLab did not start:\n" + (folder / "server.log").read_text()[-3000:])
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
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
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


def test_notebook_runs_and_the_explorer_responds(lab):
    base, token, folder = lab
    SHOTS.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"{base}/lab/tree/{NOTEBOOK}.ipynb?token={token}", wait_until="domcontentloaded")
            page.wait_for_selector(".jp-Notebook", timeout=60_000)
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
        finally:
            browser.close()
    print(f"browser test: {time.time() - started:.0f} s")

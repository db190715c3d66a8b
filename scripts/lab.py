"""`make lab`: JupyterLab on the course, configured once here (the browser test starts it the same way).

    python scripts/lab.py [extra jupyter lab arguments]

- the server serves the whole checkout and opens on notebooks/: the notebooks' diagrams live in figures/
  (linked as ../figures/x.png), which a server rooted at notebooks/ cannot serve (404, alt text instead);
- the app settings come from scripts/lab_settings/overrides.json (defaults a student can still change):
  no "official news?" pop-up over the outputs, no update check, and ipywidgets saves widget state into
  the .ipynb, so a reopened notebook shows its widgets instead of "Error displaying widget";
- as root (containers) it adds --allow-root.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = Path(__file__).resolve().parent / "lab_settings"


def lab_command(root: Path = ROOT, *extra: str) -> list[str]:
    """The command line `make lab` runs: JupyterLab serving ``root``, opening on ``root``/notebooks."""
    command = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}",
               "--LabApp.default_url=/lab/tree/notebooks", f"--LabApp.app_settings_dir={SETTINGS}", *extra]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    return command


if __name__ == "__main__":
    command = lab_command(ROOT, *sys.argv[1:])
    os.execv(command[0], command)

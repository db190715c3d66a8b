"""The README's promises, checked: its command list counts right, and its first library example runs
offline (HF_HUB_OFFLINE=1) on the tiny models shipped in data/, including a question about a picture."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
NUMBERS = {"One": 1, "Two": 2, "Three": 3, "Four": 4, "Five": 5}


def test_the_commands_heading_counts_its_commands():
    heading, block = re.search(r"^## (\w+) commands\n+```bash\n(.*?)```", README, re.M | re.S).groups()
    commands = [line for line in block.splitlines() if line.startswith("make ")]
    assert NUMBERS[heading] == len(commands), f"'## {heading} commands' lists {len(commands)}: {commands}"


def test_the_library_example_runs_offline_on_the_shipped_tiny_models():
    section = README.split("## The library", 1)[1]
    example = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "baidu/" not in example, "the first library example must not need a Hub download"
    assert '"type": "image"' in example, "the first library example asks nothing about a picture"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", example], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) >= 2 and lines[0].strip(), done.stdout
    assert lines[-1].startswith("a woman astronaut in an orange space suit"), lines[-1]


def test_notebook_05_says_what_the_tiny_models_cannot_do():
    """Students read the limits before they find them: 112 x 112 pictures, off-distribution inventions,
    miscounting, yes/no answered with a place."""
    source = (ROOT / "notebooks" / "05_train_a_tiny_ernie.py").read_text(encoding="utf-8")
    section = source.split("### What the tiny models cannot do", 1)
    assert len(section) == 2, "notebook 05 has no 'What the tiny models cannot do' section"
    text = section[1].split("# ## ", 1)[0]
    for words in ("112 x 112", "invents", "miscounts", "yes/no"):
        assert words in text, f"the limits section does not mention {words!r}"

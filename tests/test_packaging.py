"""ernie_lab as a package: ``import ernie_lab`` stays light, and a built wheel works on its own.

Both run in a fresh interpreter (a subprocess), since this test session has long imported everything.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("PIL", "matplotlib", "ipywidgets", "jinja2", "transformers")  # numpy is not listed: torch imports it


def run_python(code: str, *, cwd: Path, pythonpath: Path, timeout: int = 120) -> str:
    """stdout of ``code`` in a new interpreter that sees ``pythonpath`` first; fails the test on an error."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_ernie_lab_loads_no_heavy_modules(tmp_path):
    out = run_python(f"""
        import sys
        import ernie_lab, ernie_lab.model.vision
        print(sorted(name for name in {HEAVY!r} if name in sys.modules))
        print(ernie_lab.__file__)
        # the PIL modules arrive on first use, through ernie_lab.image_processing (the network module has none)
        from ernie_lab.io.image_processing import preprocess_images
        assert preprocess_images is ernie_lab.image_processing.preprocess_images
        assert ernie_lab.image_processing.fit_to_grid(100, 100) == (112, 112)
        assert not hasattr(ernie_lab.model.vision, "fit_to_grid") and "fit_to_grid" not in dir(ernie_lab.vision)
        assert "processor" in dir(ernie_lab)
        assert ernie_lab.processor.IDS["image"] == 100295
        print("PIL" in sys.modules)
    """, cwd=tmp_path, pythonpath=REPO)
    loaded, origin, pil_later = out.split("\n")[:3]
    assert loaded == "[]", f"import ernie_lab loaded {loaded}"
    assert origin.startswith(str(REPO / "ernie_lab"))
    assert pil_later == "True"


def test_vision_network_module_does_not_import_pil_or_numpy():
    source = (REPO / "ernie_lab" / "model" / "vision.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in imports if "PIL" in line or "numpy" in line], imports


def test_built_wheel_carries_the_stand_in_tokenizer(tmp_path):
    """Build the wheel from a copy of the sources (no build files in the repo), install it into a
    folder, and load the stand-in tokenizer from there, far from the repository."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "ernie_lab", source / "ernie_lab", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=180)
    wheels = list((tmp_path / "dist").glob("ernie_lab-*.whl"))
    assert len(wheels) == 1
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheels[0])],
                   check=True, capture_output=True, timeout=180)
    shutil.rmtree(source)  # nothing may still point into the copied sources

    out = run_python("""
        import warnings
        import ernie_lab
        from ernie_lab import tokenizer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ernie_lab.StandInTokenizerWarning)
            tok = ernie_lab.load_tokenizer()
        ids = tok.apply_chat_template([{"role": "user", "content": "Hello from a wheel"}])
        assert tok.is_stand_in and ids[0] == 100273 and tok.decode(ids).endswith("Hello from a wheel\\nAssistant: ")
        print(ernie_lab.__file__)
        print(tokenizer.STAND_IN_MODEL)
        from ernie_lab.quant import native   # the quant package and the C source of its decode kernels
        print(native.SOURCE, native.SOURCE.is_file())
    """, cwd=tmp_path, pythonpath=site)
    package_file, model_file, kernel_source = out.split("\n")[:3]
    assert kernel_source == f"{site / 'ernie_lab' / 'quant' / 'gemv.c'} True"
    assert package_file == str(site / "ernie_lab" / "__init__.py")
    assert model_file == str(site / "ernie_lab" / "data" / "tokenizer" / "stand_in.model")

"""Build the compact tokenizer of ernie-lab's tiny models, offline, into a folder (default data/tiny-tokenizer/).

The tokenizer is a 6,000-piece SentencePiece model trained on text that ships with Python and with the
kit (``ernie_lab.corpus``, ``ernie_lab.scenes``), with ERNIE 4.5's special tokens at the ids right after
the pieces; ``ernie_lab/tiny/tokenizer.py`` explains the layout. Training is deterministic, so running
this twice writes the same bytes. Run from the repository root:

    python scripts/make_tiny_tokenizer.py                  # writes data/tiny-tokenizer/
    python scripts/make_tiny_tokenizer.py /tmp/tok         # writes another folder
    python scripts/make_tiny_tokenizer.py --check          # rebuilds in a temporary folder, compares
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's ernie_lab

from ernie_lab.tiny.tokenizer import TINY_TOKENIZER_DIR, write_tiny_tokenizer  # noqa: E402


def same_folders(a: Path, b: Path) -> list[str]:
    """Names of the files that differ (or exist on one side only) between two folders."""
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    return [n for n in names if not ((a / n).is_file() and (b / n).is_file() and filecmp.cmp(a / n, b / n, shallow=False))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, default=TINY_TOKENIZER_DIR, help="where to write the tokenizer")
    parser.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare with FOLDER")
    args = parser.parse_args()

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            differ = same_folders(args.folder, write_tiny_tokenizer(tmp))
        print(f"{args.folder}: " + (f"DIFFERENT from a fresh build: {differ}" if differ else "identical to a fresh build"))
        return 1 if differ else 0
    folder = write_tiny_tokenizer(args.folder)
    size = (folder / "tokenizer.model").stat().st_size
    print(f"wrote {folder} (tokenizer.model {size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

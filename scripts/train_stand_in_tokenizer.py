"""Train ernie-lab's stand-in SentencePiece model, offline, from text that ships with Python.

The real ERNIE 4.5 tokenizer cannot be downloaded here, so the kit carries a small stand-in that
behaves the same way: a SentencePiece BPE model with byte fallback (any UTF-8 text round-trips),
no text normalisation, no dummy space in front of the text, digits split one by one, and the same
low-id layout as ERNIE's real model:

    id 0 <unk>, 1 <s>, 2 </s>      the SentencePiece meta pieces
    ids 3..12  "0".."9"            digits, always one token each
    ids 13..268 <0x00>..<0xFF>     byte-fallback pieces
    ids 269..                      merged pieces learned from the training text

ERNIE's special tokens (<|begin_of_sentence|> 100272+, image and video markers) are not inside this
model: ernie_lab.tokenizer adds them on top at their real ids. The training text is the English
prose of Python's own help pages (``pydoc_data.topics``), so the model is the same on every machine
that runs the same Python version. Run from the repository root:

    python scripts/train_stand_in_tokenizer.py          # writes ernie_lab/data/tokenizer/stand_in.model
    python scripts/train_stand_in_tokenizer.py --check  # retrains in memory, compares with the file
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import sentencepiece as spm

OUT_DIR = Path(__file__).resolve().parent.parent / "ernie_lab" / "data" / "tokenizer"  # shipped in the wheel
MODEL_FILE = OUT_DIR / "stand_in.model"
MANIFEST_FILE = OUT_DIR / "stand_in.json"

NUM_PIECES = 8000  # the real ERNIE model has 101,304 ids; 8,000 is plenty for 0.5 MB of prose

TRAINER_OPTIONS = dict(
    model_type="bpe",
    vocab_size=NUM_PIECES,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,           # ERNIE: <unk> 0, <s> 1, </s> 2; pad reuses <unk>
    user_defined_symbols=[str(d) for d in range(10)],  # ids 3..12, as in ERNIE
    split_digits=True,
    byte_fallback=True,                                # ids 13..268: every byte has a piece
    normalization_rule_name="identity",                # text is kept exactly as written
    add_dummy_prefix=False,                            # "hello" -> "hello", not "▁hello"
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,                 # runs of spaces become pieces ("▁▁" is id 269)
    character_coverage=1.0,
    input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,  # deterministic
    max_sentence_length=100_000,
    minloglevel=2,
)


def training_lines() -> list[str]:
    """Python's help-topic texts, in a fixed order, one non-empty line per sentence."""
    from pydoc_data.topics import topics

    text = "\n".join(topics[name] for name in sorted(topics))
    return [line for line in text.splitlines() if line.strip()]


def text_sha256(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def train(lines: list[str]) -> bytes:
    """The serialized SentencePiece model trained on ``lines``."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, **TRAINER_OPTIONS)
    return buffer.getvalue()


def manifest(lines: list[str], model: bytes) -> dict:
    return {
        "training_text": "pydoc_data.topics (Python's help topics), sorted by topic name, non-empty lines",
        "training_text_sha256": text_sha256(lines),
        "training_text_chars": sum(len(line) for line in lines),
        "python_version": sys.version.split()[0],
        "sentencepiece_version": spm.__version__,
        "num_pieces": NUM_PIECES,
        "model_bytes": len(model),
        "model_sha256": hashlib.sha256(model).hexdigest(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="retrain in memory and compare with the committed file")
    args = parser.parse_args()

    lines = training_lines()
    model = train(lines)
    if args.check:
        same = MODEL_FILE.is_file() and MODEL_FILE.read_bytes() == model
        print(f"{MODEL_FILE}: {'identical' if same else 'DIFFERENT'} to a fresh training run")
        return 0 if same else 1
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    MODEL_FILE.write_bytes(model)
    MANIFEST_FILE.write_text(json.dumps(manifest(lines, model), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {MODEL_FILE} ({len(model):,} bytes, {NUM_PIECES:,} pieces) and {MANIFEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

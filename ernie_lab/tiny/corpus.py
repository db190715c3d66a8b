"""English text that ships with Python, cleaned into documents for the kit's tiny text model.

Every Python install carries ``pydoc_data.topics``: the help pages of the language reference
(``help("if")`` prints one), about half a megabyte of careful English. This module cuts each page
into sections at its headings, keeps the prose paragraphs (code, grammar rules and tables are
dropped; wrapped lines are joined), and sends each section to the training or the held-out split
by the hash of its name, so the split never changes between runs or machines (about 5% is held out):

    from ernie_lab import corpus
    train = corpus.text_documents("train")      # list of str, one per section, paragraphs one per line
    val = corpus.text_documents("val")          # sections the model never sees in training
    captions = corpus.caption_documents(1000)   # scene captions as text: 'Two shapes on a white ...'

"Did the model learn anything?" is answered against the simplest model there is: the unigram
model, which predicts every token with its training frequency and ignores the context.
``unigram_perplexity`` computes its perplexity on held-out ids with add-one smoothing,

    p(w) = (count(w) + 1) / (N + V),   perplexity = exp(-mean over held-out tokens of log p(w)),

where N is the number of training tokens and V the vocabulary size. A model that reads context
must end far below it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections import Counter

from ..errors import InputError
from .scenes import caption, scene_stream

HELD_OUT_BUCKETS = 20  # one section in 20 (by hash of its name) is held out
UNDERLINE = re.compile(r"[*=\-^~]{3,}")
EMPHASIS = re.compile(r"\*{1,2}([^*\s](?:[^*]*[^*\s])?)\*{1,2}")  # *word* or **word** -> word
QUOTED = re.compile(r'("[^"]*")')  # code is written in double quotes: "*args" keeps its star


def help_topics() -> dict[str, str]:
    """Python's help pages: topic name -> text (imported when first asked for)."""
    from pydoc_data.topics import topics

    return dict(topics)


def sections(text: str) -> list[tuple[str, list[str]]]:
    """A help page cut at its underlined headings: [(heading, blocks of lines), ...]; blocks are blank-line separated."""
    lines = text.splitlines()
    found, title, block, blocks = [], "", [], []
    for n, line in enumerate(lines):
        following = lines[n + 1] if n + 1 < len(lines) else ""
        if UNDERLINE.fullmatch(line.strip()):
            continue                                     # the underline of the heading just seen
        if line.strip() and UNDERLINE.fullmatch(following.strip()) and len(following.strip()) >= len(line.strip()):
            blocks.append(block)
            found.append((title, blocks))
            title, block, blocks = line.strip(), [], []
        elif line.strip():
            block.append(line)
        else:
            blocks.append(block)
            block = []
    blocks.append(block)
    found.append((title, blocks))
    return [(title, [b for b in blocks if b]) for title, blocks in found]


def prose(block: list[str], previous: list[str] | None = None) -> str | None:
    """A block's text as one line if it is English prose; None for code, grammar rules, tables and doctests.

    An indented block after a paragraph that ends in ":" is an example ("...is equivalent to:"), not prose.
    """
    text = " ".join(line.strip() for line in block)
    if block[0][:1].isspace() and previous and previous[-1].rstrip().endswith(":"):
        return None
    if any(line.lstrip().startswith((">>>", "...", "+--", "|", "$ ")) for line in block) or "::=" in text:
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if len(text) < 20 or letters < 0.75 * len(text) or not text.endswith((".", ":", "?", "!", ".)")):
        return None
    parts = QUOTED.split(re.sub(r"\s+", " ", text))  # odd positions are quoted code
    return "".join(part if n % 2 else EMPHASIS.sub(r"\1", part) for n, part in enumerate(parts))


def all_documents() -> list[tuple[str, str]]:
    """(name, text) for every section with prose, names like 'if' or 'typesseq/Common Sequence Operations'.

    Several help pages repeat the same paragraphs; each paragraph is kept only where it first appears,
    so no text can sit in both splits.
    """
    documents, seen = [], set()
    for topic, page in sorted(help_topics().items()):
        for title, blocks in sections(page):
            paragraphs = [p for p in map(prose, blocks, [None, *blocks[:-1]]) if p is not None and p not in seen]
            seen.update(paragraphs)
            if paragraphs:
                text = "\n".join([title, *paragraphs] if title else paragraphs)
                documents.append((f"{topic}/{title}" if title else topic, text))
    return documents


def split_of(name: str) -> str:
    """'val' for the section names whose hash falls in one of HELD_OUT_BUCKETS buckets, else 'train'."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") % HELD_OUT_BUCKETS == 0 else "train"


def text_documents(split: str = "train") -> list[str]:
    """The cleaned help-page sections of one split ("train" or "val"), in a fixed order."""
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', got {split!r}.")
    return [text for name, text in all_documents() if split_of(name) == split]


def caption_documents(count: int, seed: int = 0, split: str = "train") -> list[str]:
    """``count`` scene captions from ``scenes.scene_stream(seed, split)`` as sentences: 'One shape on a ... left.'"""
    if not isinstance(count, int) or count < 0:
        raise InputError(f"count must be a non-negative int, got {count!r}.")
    return [as_sentence(caption(scene)) for scene in itertools.islice(scene_stream(seed, split), count)]


def as_sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + "."


def unigram_perplexity(train_ids, val_ids, vocab_size: int) -> float:
    """Perplexity on ``val_ids`` of the add-one smoothed unigram model counted on ``train_ids``.

    ids are lists of ints or integer tensors / arrays of any shape; every id must be below ``vocab_size``.
    """
    train, val = flat_ids(train_ids, vocab_size, "train_ids"), flat_ids(val_ids, vocab_size, "val_ids")
    if not val:
        raise InputError("val_ids is empty; perplexity needs at least one held-out token.")
    counts = Counter(train)
    denominator = len(train) + vocab_size
    mean_log_p = sum(math.log((counts[i] + 1) / denominator) for i in val) / len(val)
    return math.exp(-mean_log_p)


def flat_ids(ids, vocab_size: int, name: str) -> list[int]:
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise InputError(f"vocab_size must be a positive int, got {vocab_size!r}.")
    if hasattr(ids, "tolist"):                 # a torch tensor or numpy array, any shape
        if "int" not in str(ids.dtype):
            raise InputError(f"{name} must hold integer ids, got dtype {ids.dtype}.")
        ids = ids.reshape(-1).tolist()
    ids = list(ids)
    if ids and isinstance(ids[0], (list, tuple)):  # a list of sequences
        ids = [i for seq in ids for i in seq]
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"{name} holds {bad[0]!r}; ids must be ints from 0 to vocab_size - 1 = {vocab_size - 1}.")
    return ids

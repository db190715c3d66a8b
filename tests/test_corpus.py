"""The text corpus: Python's help pages cleaned into prose, a fixed held-out split, the unigram baseline."""

import math
import re

import numpy as np
import pytest
import torch

from ernie_lab import corpus
from ernie_lab.errors import InputError


@pytest.fixture(scope="module")
def splits():
    return corpus.text_documents("train"), corpus.text_documents("val")


def test_split_is_deterministic_disjoint_and_about_five_percent(splits):
    train, val = splits
    assert (train, val) == (corpus.text_documents("train"), corpus.text_documents("val"))
    assert train and val and not set(train) & set(val)
    names = [name for name, _ in corpus.all_documents()]
    assert len(names) == len(set(names)) == len(train) + len(val)
    held_out = sum(map(len, val)) / sum(map(len, train + val))
    assert 0.01 < held_out < 0.12
    with pytest.raises(InputError):
        corpus.text_documents("test")


def test_documents_are_prose_without_code_tables_or_markup(splits):
    train, val = splits
    lines = [line for doc in train + val for line in doc.splitlines()]
    assert len(lines) > 1000 and sum(map(len, lines)) > 200_000
    for line in lines:
        assert line == line.strip() and "::=" not in line and not line.startswith((">>>", "+--", "|"))
        assert not corpus.UNDERLINE.fullmatch(line)
    assert not any("**" in re.sub(r'"[^"]*"', "", line) for line in lines)  # bold markers gone, "**kwargs" stays
    paragraphs = [p for doc in train + val for p in doc.splitlines()[1:]]  # after the heading line
    assert len(set(paragraphs)) == len(paragraphs)  # pages that repeat a paragraph keep it once
    text = "\n".join(lines)
    assert "The \"if\" statement is used for conditional execution:" in text
    assert "raise AssertionError" not in text  # the assert page's code examples were dropped


def test_prose_filter_on_known_blocks():
    assert corpus.prose(["This is a sentence about *emphasis* that", "wraps onto two lines."]) == (
        "This is a sentence about emphasis that wraps onto two lines.")
    assert corpus.prose(["   if x:", "       raise Error"], previous=["It is equivalent to:"]) is None
    assert corpus.prose([">>> 1 + 1"]) is None
    assert corpus.prose(['Use "*args" to collect the rest of the arguments.']) == (
        'Use "*args" to collect the rest of the arguments.')


def test_caption_documents_are_sentences_from_the_scene_stream():
    docs = corpus.caption_documents(20)
    assert docs == corpus.caption_documents(20) and len(docs) == 20
    assert all(d[0].isupper() and d.endswith(".") and " background: " in d for d in docs)
    assert set(corpus.caption_documents(50, split="val")).isdisjoint(corpus.caption_documents(500))


def test_unigram_perplexity_on_hand_computed_cases():
    # Nothing counted: add-one smoothing gives the uniform model, perplexity = vocabulary size.
    assert corpus.unigram_perplexity([], [0, 3, 5], vocab_size=7) == pytest.approx(7)
    # train [0,0,0], V=2: p(0) = 4/5, p(1) = 1/5.
    assert corpus.unigram_perplexity([0, 0, 0], [0], 2) == pytest.approx(5 / 4)
    assert corpus.unigram_perplexity([0, 0, 0], [0, 1], 2) == pytest.approx(math.sqrt(5 / 4 * 5))
    # tensors, arrays and lists of sequences give the same number as a flat list
    flat = corpus.unigram_perplexity([1, 2, 2, 3], [2, 3], 5)
    assert corpus.unigram_perplexity(torch.tensor([[1, 2], [2, 3]]), np.array([2, 3]), 5) == pytest.approx(flat)
    assert corpus.unigram_perplexity([[1, 2], [2, 3]], [[2], [3]], 5) == pytest.approx(flat)


def test_unigram_perplexity_rejects_bad_ids():
    with pytest.raises(InputError, match="vocab_size - 1"):
        corpus.unigram_perplexity([0, 9], [0], 5)
    with pytest.raises(InputError, match="empty"):
        corpus.unigram_perplexity([0], [], 5)
    with pytest.raises(InputError, match="integer"):
        corpus.unigram_perplexity(torch.zeros(3), [0], 5)


def test_unigram_baseline_on_the_corpus_is_far_below_uniform(splits):
    """Characters as tokens: the frequency model knows 'e' beats 'q', so it ends well below the 256 of uniform."""
    train, val = splits
    train_ids = [min(ord(ch), 255) for ch in "\n".join(train)]
    val_ids = [min(ord(ch), 255) for ch in "\n".join(val)]
    perplexity = corpus.unigram_perplexity(train_ids, val_ids, 256)
    assert 15 < perplexity < 40

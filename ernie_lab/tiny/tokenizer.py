"""A compact tokenizer for the kit's tiny ERNIE models: 6,000 pieces, then ERNIE's special tokens right after.

Real ERNIE 4.5 keeps its special tokens above id 100,000, so its embedding has 103,424 rows. A model
trained from scratch on a few hundred kilobytes of text needs a few thousand ids, not a hundred
thousand: this tokenizer puts the same special tokens at compact ids just above its pieces,

    ids 0, 1, 2        <unk>, <s>, </s>          (SentencePiece's own, as in ERNIE)
    ids 3..12          "0".."9"                  digits, one token each
    ids 13..268        <0x00>..<0xFF>            byte fallback: any text encodes
    ids 269..5999      pieces learned from the training text
    ids 6000..6011     <|end_of_sentence|>, <|begin_of_sentence|>, image and video markers, <think>, </think>

so the tiny models have ``TINY_VOCAB_SIZE`` = 6,012 embedding rows. The SentencePiece model is trained
offline and deterministically (one thread, no sampling, fixed order) on text that installed packages
ship: the training split of ``ernie_lab.corpus`` plus scene captions, questions and answers from
``ernie_lab.scenes``. ``write_tiny_tokenizer(folder)`` writes a folder in the Hugging Face layout that
``ernie_lab.load_tokenizer(folder)`` reads:

    tokenizer.model          the SentencePiece model
    tokenizer_config.json    roles (bos, eos, cls, sep, ...) and added_tokens_decoder: id -> token
    special_tokens_map.json  the roles again, and the added tokens
    added_tokens.json        token -> id of the tokens above the pieces
    training.json            what the model was trained on (hashes, versions), for the determinism check

No chat template is written: with none, ``tok.apply_chat_template`` uses ERNIE 4.5's text format and
``processor.VLProcessor`` ERNIE 4.5 VL's format, each exactly as the real models use it. The kit's
copy lives in ``data/tiny-tokenizer/`` (``scripts/make_tiny_tokenizer.py`` rebuilds it).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import sys
from pathlib import Path

import sentencepiece as spm

from ..atomic import atomic_folder
from ..io.serving_files import as_json, tokenizer_files, write_files
from ..io.tokenizer import ErnieTokenizer
from . import corpus, scenes

NUM_PIECES = 6000
ADDED_TOKENS = (                       # in this order from id NUM_PIECES on
    "<|end_of_sentence|>", "<|begin_of_sentence|>",
    "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>",
    "<|VIDEO_PLACEHOLDER|>", "<|VIDEO_START|>", "<|VIDEO_END|>",
    "<|image@placeholder|>", "<|video@placeholder|>",  # the markers the VL chat text writes, replaced by ids
    "<think>", "</think>",                             # the VL models' reasoning block
)
TINY_SPECIAL_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2,
                       **{token: NUM_PIECES + n for n, token in enumerate(ADDED_TOKENS)}}
TINY_VOCAB_SIZE = NUM_PIECES + len(ADDED_TOKENS)
ROLES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
         "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>"}
TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "data" / "tiny-tokenizer"
CAPTION_SCENES = 2000  # training scenes whose captions, questions and answers join the training text

TRAINER_OPTIONS = dict(  # the stand-in's layout and settings (scripts/train_stand_in_tokenizer.py), fewer pieces
    model_type="bpe",
    vocab_size=NUM_PIECES,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    user_defined_symbols=[str(d) for d in range(10)],
    split_digits=True,
    byte_fallback=True,
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    input_sentence_size=0, shuffle_input_sentence=False, num_threads=1,  # deterministic
    max_sentence_length=100_000,
    minloglevel=2,
)


def training_lines() -> list[str]:
    """The training text, one line per paragraph, caption, question or answer, in a fixed order."""
    lines = [line for doc in corpus.text_documents("train") for line in doc.splitlines()]
    for scene in itertools.islice(scenes.scene_stream(seed=0, split="train"), CAPTION_SCENES):
        lines.append(corpus.as_sentence(scenes.caption(scene)))
        lines += [f"User: {qa.question}\nAssistant: {qa.answer}" for qa in scenes.questions(scene)]
    lines += [corpus.as_sentence(text) for text in scenes.PHOTOS.values()]
    lines.append(f"User: {scenes.DESCRIBE}")
    return [piece for line in lines for piece in line.split("\n") if piece.strip()]


def train_model(lines: list[str]) -> bytes:
    """The serialized SentencePiece model trained on ``lines`` (about a second on one core)."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buffer, **TRAINER_OPTIONS)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def text_sha256(lines: list[str]) -> str:
    return sha256("\n".join(lines).encode("utf-8"))


def folder_files(model: bytes, lines: list[str]) -> dict[str, str | bytes]:
    """file name -> content of the tokenizer folder: the files every export writes, plus training.json."""
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model)
    tokenizer = ErnieTokenizer(sp, TINY_SPECIAL_TOKENS, ROLES, TINY_VOCAB_SIZE, source="tiny tokenizer")
    training = {"training_text": "ernie_lab.tiny_tokenizer.training_lines(): corpus train split, "
                                 f"{CAPTION_SCENES} train scenes' captions and QA, photo captions",
                "training_text_sha256": text_sha256(lines), "python_version": sys.version.split()[0],
                "sentencepiece_version": spm.__version__, "num_pieces": NUM_PIECES,
                "vocab_size": TINY_VOCAB_SIZE, "model_sha256": sha256(model)}
    return {**tokenizer_files(tokenizer), "training.json": as_json(training)}


def write_tiny_tokenizer(folder: str | Path = TINY_TOKENIZER_DIR) -> Path:
    """Train the compact tokenizer and write its folder; returns the folder. The same files on every run."""
    folder = Path(folder)
    lines = training_lines()
    files = folder_files(train_model(lines), lines)
    with atomic_folder(folder) as staging:  # a kill mid-write leaves the previous tokenizer whole
        write_files(staging, files)
    return folder


def processor_token_ids(tokenizer) -> dict[str, int]:
    """The picture ids of ``tokenizer``, for ``processor.VLProcessor(tokenizer, token_ids=...)``."""
    names = {"image": "<|IMAGE_PLACEHOLDER|>", "image_start": "<|IMAGE_START|>", "image_end": "<|IMAGE_END|>",
             "video": "<|VIDEO_PLACEHOLDER|>", "video_start": "<|VIDEO_START|>", "video_end": "<|VIDEO_END|>"}
    return {key: tokenizer.convert_tokens_to_ids(token) for key, token in names.items()}

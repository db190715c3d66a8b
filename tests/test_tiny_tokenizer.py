"""The tiny models' compact tokenizer: loads through load_tokenizer, special ids right after the pieces, chats work."""

import filecmp
import json
import warnings

import pytest

import ernie_lab
from ernie_lab import scenes, tiny_tokenizer
from ernie_lab.io.processor import VLProcessor
from ernie_lab.tiny.tokenizer import ADDED_TOKENS, NUM_PIECES, TINY_SPECIAL_TOKENS, TINY_TOKENIZER_DIR, TINY_VOCAB_SIZE
from ernie_lab.io.tokenizer import StandInTokenizerWarning, format_ernie_chat

SCENE = scenes.Scene("gray", (scenes.Shape("triangle", "orange", "large", "bottom"),
                              scenes.Shape("circle", "green", "small", "centre")))


@pytest.fixture(scope="module")
def tok():
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInTokenizerWarning)  # the committed folder, never the stand-in
        return ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)


def test_committed_folder_is_small_and_complete():
    names = {p.name for p in TINY_TOKENIZER_DIR.iterdir()}
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"} <= names
    assert (TINY_TOKENIZER_DIR / "tokenizer.model").stat().st_size < 300_000
    added = json.loads((TINY_TOKENIZER_DIR / "added_tokens.json").read_text())
    assert added == {token: NUM_PIECES + n for n, token in enumerate(ADDED_TOKENS)}


def test_special_tokens_sit_at_compact_ids_right_after_the_pieces(tok):
    assert tok.num_pieces == NUM_PIECES and len(tok) == TINY_VOCAB_SIZE < 16_384
    for token, i in TINY_SPECIAL_TOKENS.items():
        assert tok.convert_tokens_to_ids(token) == i and tok.convert_ids_to_tokens(i) == token
        assert tok.encode(token) == [i]
    assert sorted(i for i in TINY_SPECIAL_TOKENS.values() if i >= NUM_PIECES) == list(range(NUM_PIECES, TINY_VOCAB_SIZE))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.cls_token_id == TINY_SPECIAL_TOKENS["<|begin_of_sentence|>"]
    assert tok.stop_token_ids == [2, TINY_SPECIAL_TOKENS["<|end_of_sentence|>"]]
    assert tok.convert_tokens_to_ids([str(d) for d in range(10)]) == list(range(3, 13))  # the stand-in's low layout


def test_captions_and_questions_round_trip_in_few_tokens(tok):
    for text in [scenes.caption(SCENE), *(q.question + " " + q.answer for q in scenes.questions(SCENE))]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text and all(i < NUM_PIECES for i in ids)
    assert len(tok.encode(scenes.caption(SCENE))) <= 25  # the scene words are whole pieces
    prose = 'The "if" statement is used for conditional execution: café, 2024 🙂'
    assert tok.decode(tok.encode(prose)) == prose     # byte fallback: any text


def test_chat_template_renders_ernies_text_format(tok):
    chat = [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "green."}]
    text = tok.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    assert text == format_ernie_chat(chat, add_generation_prompt=False)
    assert text.startswith("<|begin_of_sentence|>") and text.endswith("green.<|end_of_sentence|>")
    ids = tok.apply_chat_template(chat[:2])
    assert ids[0] == TINY_SPECIAL_TOKENS["<|begin_of_sentence|>"] and tok.decode(ids).endswith("Assistant: ")


def test_vl_processor_builds_scene_chats_with_compact_ids(tok):
    processor = VLProcessor(tok, token_ids=tiny_tokenizer.processor_token_ids(tok))
    chat = scenes.chat_examples(SCENE)[1]  # What colour is the background? gray.
    ids = processor(chat, add_generation_prompt=False)["input_ids"][0].tolist()
    image = TINY_SPECIAL_TOKENS["<|IMAGE_PLACEHOLDER|>"]
    assert max(ids) < TINY_VOCAB_SIZE and ids.count(image) == 16  # 112 px: 8 x 8 patches, merged 2 x 2
    assert ids[ids.index(image) - 1] == TINY_SPECIAL_TOKENS["<|IMAGE_START|>"]
    assert tok.decode(ids).endswith("What colour is the background?\nAssistant: gray.<|end_of_sentence|>")


def test_rebuilding_reproduces_the_committed_folder_byte_for_byte(tmp_path):
    recorded = json.loads((TINY_TOKENIZER_DIR / "training.json").read_text())
    lines = tiny_tokenizer.training_lines()
    if tiny_tokenizer.text_sha256(lines) != recorded["training_text_sha256"]:
        pytest.skip(f"this Python's pydoc_data differs from the one the tokenizer was trained on "
                    f"({recorded['python_version']}); rebuild with scripts/make_tiny_tokenizer.py")
    built = tiny_tokenizer.write_tiny_tokenizer(tmp_path / "tok")
    for path in TINY_TOKENIZER_DIR.iterdir():
        assert filecmp.cmp(path, built / path.name, shallow=False), path.name

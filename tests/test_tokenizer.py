"""ernie_lab.tokenizer: special-token ids, round trips, the chat format, loading paths and errors.

The real ERNIE tokenizer is not reachable offline, so "real" folders are built in tmp_path in the
Hub's layout around the stand-in's SentencePiece model; the ids they must produce come from the
special-token table, whose sources are cited in ernie_lab/io/tokenizer.py.
"""

import hashlib
import importlib.util
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from ernie_lab.errors import CheckpointError, InputError
from ernie_lab.io.tokenizer import (
    ERNIE_SPECIAL_TOKENS,
    MODEL_VOCAB_SIZE,
    STAND_IN_MODEL,
    StandInTokenizerWarning,
    format_ernie_chat,
    load_tokenizer,
)

REPO = Path(__file__).resolve().parent.parent
PROSE = (
    "It was a bright cold day in April, and the clocks were striking thirteen. The committee met in the\n"
    "library to decide whether the new bridge should be built of stone or of iron; nobody agreed, so the\n"
    "meeting ran late.  Tabs\tand  double  spaces stay, as do accents (café, naïve) and emoji 🙂 and 2024."
)

# The chat template exactly as Baidu ships it in tokenizer_config.json (baidu/ERNIE-4.5-0.3B-Base-PT, read from a
# public copy; transformers' Ernie4_5 tokenizer uses the same text as its default for the 0.3B models).
REFERENCE_CHAT_TEMPLATE = json.loads(
    r'"{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n{%- endif -%}\n'
    r'{%- if not cls_token is defined -%}\n    {%- set cls_token = \"<|begin_of_sentence|>\" -%}\n{%- endif -%}\n'
    r'{%- if not sep_token is defined -%}\n    {%- set sep_token = \"<|end_of_sentence|>\" -%}\n{%- endif -%}\n'
    r'{{- cls_token -}}\n{%- for message in messages -%}\n    {%- if message[\"role\"] == \"user\" -%}\n'
    r'        {{- \"User: \" + message[\"content\"] + \"\n\" -}}\n    {%- elif message[\"role\"] == \"assistant\" -%}\n'
    r'        {{- \"Assistant: \" + message[\"content\"] + sep_token -}}\n'
    r'    {%- elif message[\"role\"] == \"system\" -%}\n        {{- message[\"content\"] + \"\n\" -}}\n'
    r'    {%- endif -%}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{- \"Assistant: \" -}}\n{%- endif -%}"'
)

CHATS = {
    "three turns": [
        {"role": "system", "content": "You are a careful tutor."},
        {"role": "user", "content": "What is RoPE?"},
        {"role": "assistant", "content": "A rotation of query and key pairs by position."},
        {"role": "user", "content": "Why interleaved pairs?\nShort answer, please."},
    ],
    "user only": [{"role": "user", "content": "Hello!"}],
    "ends with the assistant": [
        {"role": "system", "content": "You are a helpful chatbot."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Nice to meet you."},
    ],
}


@pytest.fixture(scope="module")
def stand_in():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", StandInTokenizerWarning)
        return load_tokenizer()


def make_real_folder(folder: Path, *, chat_template: str | None = REFERENCE_CHAT_TEMPLATE, model_config: bool = True,
                     model: Path = STAND_IN_MODEL) -> Path:
    """A checkpoint folder in the Hub's layout: tokenizer.model, tokenizer_config.json, special_tokens_map.json."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model, folder / "tokenizer.model")
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for t, i in ERNIE_SPECIAL_TOKENS.items()}
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>",
              "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>",
              "add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": decoder,
              "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                   "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    if model_config:
        (folder / "config.json").write_text(json.dumps({"vocab_size": MODEL_VOCAB_SIZE}), encoding="utf-8")
    return folder


def load_quietly(source):
    """Load and fail if the kit fell back to the stand-in."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", StandInTokenizerWarning)
        return load_tokenizer(source)


def render_reference(messages, add_generation_prompt):
    """Baidu's template rendered by plain jinja2, configured as transformers configures it."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    template = env.from_string(REFERENCE_CHAT_TEMPLATE)
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


# --------------------------------------------------------------------------------------- stand-in
def test_stand_in_says_so_once_and_round_trips_prose():
    with pytest.warns(StandInTokenizerWarning) as record:
        tok = load_tokenizer()
    assert len(record) == 1
    assert "using the ernie-lab stand-in tokenizer, not the real ERNIE vocabulary" in str(record[0].message)
    assert tok.is_stand_in
    ids = tok.encode(PROSE)
    assert tok.decode(ids) == PROSE
    assert all(isinstance(i, int) and 0 <= i < tok.num_pieces for i in ids)
    assert len(ids) < len(PROSE.encode("utf-8")) / 2  # it learned English pieces: far fewer tokens than bytes


def test_stand_in_special_tokens_sit_at_ernie_ids(stand_in):
    assert stand_in.vocab_size == len(stand_in) == MODEL_VOCAB_SIZE == 103424
    for text, i in ERNIE_SPECIAL_TOKENS.items():
        assert stand_in.convert_tokens_to_ids(text) == i
        assert stand_in.encode(text) == [i]
        assert stand_in.decode([i]) == text
        assert stand_in.decode([i], skip_special_tokens=True) == ""
    assert (stand_in.bos_token_id, stand_in.eos_token_id, stand_in.pad_token_id) == (1, 2, 0)
    assert (stand_in.cls_token_id, stand_in.sep_token_id) == (100273, 100272)
    assert stand_in.stop_token_ids == [2, 100272]


def test_stand_in_low_ids_follow_ernies_layout(stand_in):
    # Real ERNIE ids from transformers' Ernie4_5 tokenizer tests: "\t" -> 22, "\n" -> 23, "  " -> 269,
    # "1234" -> [4, 5, 6, 7], and the emoji 😈 falls back to its four UTF-8 bytes [253, 172, 165, 149].
    assert stand_in.encode("\t") == [22]
    assert stand_in.encode("\n") == [23]
    assert stand_in.encode("  ") == [269]
    assert stand_in.encode("1234") == [4, 5, 6, 7]
    assert stand_in.encode("😈") == [253, 172, 165, 149]


def test_special_strings_inside_text_and_unused_ids(stand_in):
    text = "<|begin_of_sentence|>Look:<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|> a<s>b</s>"
    ids = stand_in.encode(text)
    assert [i for i in ids if i in stand_in.special_ids] == [100273, 101304, 100295, 101305, 1, 2]
    assert stand_in.decode(ids) == text
    assert stand_in.decode(ids, skip_special_tokens=True) == "Look: ab"
    unused = [8000, 50000, 100274, 103423]  # between the pieces and the special tokens: no token at all
    assert stand_in.decode([*stand_in.encode("one"), *unused, *stand_in.encode(" two")]) == "one two"
    assert stand_in.convert_ids_to_tokens(50000) == "<|reserved_50000|>"
    assert stand_in.convert_tokens_to_ids("<|reserved_50000|>") == 50000


def test_decode_takes_lists_and_1d_tensors(stand_in):
    ids = stand_in.encode("Tensors work too.")
    assert stand_in.decode(torch.tensor(ids)) == "Tensors work too."
    assert stand_in.decode(np.array(ids)) == "Tensors work too."
    assert stand_in.decode(tuple(ids)) == "Tensors work too."
    assert stand_in.decode([]) == ""


def test_stand_in_model_is_small_and_regenerates_exactly():
    manifest = json.loads(STAND_IN_MODEL.with_name("stand_in.json").read_text())
    model = STAND_IN_MODEL.read_bytes()
    assert len(model) < 2 * 2**20
    assert hashlib.sha256(model).hexdigest() == manifest["model_sha256"]
    spec = importlib.util.spec_from_file_location("train_stand_in", REPO / "scripts" / "train_stand_in_tokenizer.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    lines = trainer.training_lines()
    if trainer.text_sha256(lines) != manifest["training_text_sha256"]:
        pytest.skip(f"this Python's pydoc_data differs from the one the model was trained on "
                    f"({manifest['python_version']}); retrain with scripts/train_stand_in_tokenizer.py")
    assert trainer.train(lines) == model


# ---------------------------------------------------------------------------------------- chat format
@pytest.mark.parametrize("name", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_format_equals_baidus_template(stand_in, name, add_generation_prompt):
    reference = render_reference(CHATS[name], add_generation_prompt)
    assert format_ernie_chat(CHATS[name], add_generation_prompt) == reference
    assert stand_in.apply_chat_template(CHATS[name], add_generation_prompt, tokenize=False) == reference
    assert stand_in.apply_chat_template(CHATS[name], add_generation_prompt) == stand_in.encode(reference)


def test_chat_format_of_a_three_turn_chat_written_out(stand_in):
    text = stand_in.apply_chat_template(CHATS["three turns"], tokenize=False)
    assert text == ("<|begin_of_sentence|>You are a careful tutor.\nUser: What is RoPE?\n"
                    "Assistant: A rotation of query and key pairs by position.<|end_of_sentence|>"
                    "User: Why interleaved pairs?\nShort answer, please.\nAssistant: ")
    ids = stand_in.apply_chat_template(CHATS["three turns"])
    assert ids[0] == 100273 and ids.count(100272) == 1


def test_chat_format_equals_transformers_rendering(stand_in):
    from transformers.utils.chat_template_utils import render_jinja_template

    for messages in CHATS.values():
        rendered, _ = render_jinja_template([messages], chat_template=REFERENCE_CHAT_TEMPLATE,
                                            add_generation_prompt=True, cls_token="<|begin_of_sentence|>",
                                            sep_token="<|end_of_sentence|>")
        assert stand_in.apply_chat_template(messages, tokenize=False) == rendered[0]


def test_checkpoint_template_is_rendered_with_jinja(tmp_path):
    tok = load_quietly(make_real_folder(tmp_path / "ckpt"))
    assert tok.chat_template == REFERENCE_CHAT_TEMPLATE
    for messages in CHATS.values():
        assert tok.apply_chat_template(messages, tokenize=False) == format_ernie_chat(messages)
    # a thinking-style template sees enable_thinking only when it is given
    (tmp_path / "ckpt" / "chat_template.jinja").write_text("{{ '<think>' if enable_thinking is defined and "
                                                             "enable_thinking else 'plain' }}")
    tok = load_quietly(tmp_path / "ckpt")
    assert tok.apply_chat_template(CHATS["user only"], tokenize=False) == "plain"
    assert tok.apply_chat_template(CHATS["user only"], tokenize=False, enable_thinking=True) == "<think>"


# -------------------------------------------------------------------------------------- real folders
def test_real_layout_folder_uses_its_files(tmp_path):
    tok = load_quietly(make_real_folder(tmp_path / "ckpt"))
    assert not tok.is_stand_in and str(tmp_path / "ckpt") in tok.source
    assert tok.vocab_size == MODEL_VOCAB_SIZE  # from config.json
    for text, i in ERNIE_SPECIAL_TOKENS.items():
        assert tok.encode(text) == [i] and tok.decode([i]) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (
        1, 2, 0, 100273, 100272)
    assert tok.decode(tok.encode(PROSE)) == PROSE
    without_config = load_quietly(make_real_folder(tmp_path / "bare", model_config=False))
    assert without_config.vocab_size == max(ERNIE_SPECIAL_TOKENS.values()) + 1


def test_added_tokens_json_and_special_pieces_inside_the_model(tmp_path):
    # Older Hub folders list added tokens in added_tokens.json; the real ERNIE model keeps its special tokens
    # inside tokenizer.model as control pieces. Train a tiny model that does the same.
    folder = tmp_path / "ckpt"
    folder.mkdir()
    lines = [PROSE.replace("\n", " ")] * 4 + ["the quick brown fox jumps over the lazy dog"] * 4
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"),
                                   model_type="bpe", vocab_size=400, byte_fallback=True, add_dummy_prefix=False,
                                   control_symbols=["<|end_of_sentence|>", "<|begin_of_sentence|>"],
                                   num_threads=1, minloglevel=2)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "bos_token": "<s>",
         "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}))
    (folder / "added_tokens.json").write_text(json.dumps({"<|IMAGE_PLACEHOLDER|>": 100295}))
    tok = load_quietly(folder)
    assert (tok.cls_token_id, tok.sep_token_id) == (4, 3)  # after <unk>, <s>, </s>, in the order declared
    ids = tok.encode("<|begin_of_sentence|>the fox<|IMAGE_PLACEHOLDER|><|end_of_sentence|>")
    assert ids[0] == 4 and ids[-2:] == [100295, 3]
    assert tok.decode(ids) == "<|begin_of_sentence|>the fox<|IMAGE_PLACEHOLDER|><|end_of_sentence|>"
    assert tok.vocab_size == 100296


def test_transformers_llama_tokenizer_agrees_on_the_same_files(tmp_path):
    pytest.importorskip("google.protobuf", reason="transformers needs protobuf to read a SentencePiece model")
    from transformers import LlamaTokenizer

    folder = make_real_folder(tmp_path / "ckpt")
    ours, theirs = load_quietly(folder), LlamaTokenizer.from_pretrained(folder)
    samples = [PROSE, " Hello world", "hello\n\nworld  x", "  leading spaces", "Tabs\tand 😈 1234 5,61", "a<s>b</s>"]
    for text in samples:  # ordinary text and pieces that live inside tokenizer.model: identical ids
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
    for messages in CHATS.values():  # transformers renumbers tokens above the model's pieces, so compare names
        text = ours.apply_chat_template(messages, tokenize=False)
        theirs_ids = theirs.encode(text, add_special_tokens=False)
        assert ours.convert_ids_to_tokens(ours.encode(text)) == theirs.convert_ids_to_tokens(theirs_ids)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs_ids) == text


def test_hub_id_resolves_through_the_local_cache_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # any attempt to go online would fail
    repo = tmp_path / "hf" / "hub" / "models--baidu--ERNIE-4.5-0.3B-PT"
    commit = "0123456789abcdef0123456789abcdef01234567"
    make_real_folder(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    tok = load_quietly("baidu/ERNIE-4.5-0.3B-PT")
    assert not tok.is_stand_in and commit in tok.source
    assert tok.encode("<|begin_of_sentence|>") == [100273]

    with pytest.warns(StandInTokenizerWarning, match="not in the local Hugging Face cache"):
        fallback = load_tokenizer("baidu/ERNIE-4.5-21B-A3B-PT")
    assert fallback.is_stand_in


def test_folder_without_tokenizer_model_falls_back_with_a_warning(tmp_path):
    (tmp_path / "weights_only").mkdir()
    (tmp_path / "weights_only" / "tokenizer.json").write_text("{}")
    with pytest.warns(StandInTokenizerWarning, match="has no tokenizer.model .*tokenizer.json"):
        tok = load_tokenizer(tmp_path / "weights_only")
    assert tok.is_stand_in and tok.encode("<|end_of_sentence|>") == [100272]


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [123, b"bytes", None, ["a list"]])
def test_encode_rejects_non_text(stand_in, bad):
    with pytest.raises(InputError, match="encode wants a str"):
        stand_in.encode(bad)


@pytest.mark.parametrize("bad, message", [
    ("text", "list of ints or a 1-D tensor"),
    ([1, 2.5], "must be ints"),
    ([True], "must be ints"),
    ([-1], "outside"),
    ([103424], "outside"),
    (torch.zeros(2, 3, dtype=torch.long), "1-D"),
    (torch.tensor([1.0, 2.0]), "integers"),
])
def test_decode_rejects_bad_ids(stand_in, bad, message):
    with pytest.raises(InputError, match=message):
        stand_in.decode(bad)


def test_unknown_token_names_and_bad_chats_are_input_errors(stand_in):
    with pytest.raises(InputError, match="not a token"):
        stand_in.convert_tokens_to_ids("<|no_such_token|>")
    with pytest.raises(InputError, match="not a token"):
        stand_in.convert_tokens_to_ids(["▁the", "<mask:9999>"])
    with pytest.raises(InputError):
        stand_in.convert_tokens_to_ids(7)
    with pytest.raises(InputError, match="unknown chat role"):
        stand_in.apply_chat_template([{"role": "tool", "content": "{}"}])
    with pytest.raises(InputError, match="'role' and 'content'"):
        stand_in.apply_chat_template([{"role": "user"}])
    with pytest.raises(InputError, match="list of dicts"):
        stand_in.apply_chat_template("Hi")
    with pytest.raises(InputError, match="str content"):
        stand_in.apply_chat_template([{"role": "user", "content": ["Hi"]}])
    assert issubclass(InputError, ValueError)


def test_bad_sources(tmp_path):
    with pytest.raises(InputError, match="folder, a Hub id or None"):
        load_tokenizer(42)
    with pytest.raises(InputError, match="neither an existing folder nor a Hub id"):
        load_tokenizer("no such folder here")
    with pytest.raises(InputError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.model").write_bytes(STAND_IN_MODEL.read_bytes())
    with pytest.raises(InputError, match="is a file"):
        load_tokenizer(tmp_path / "tokenizer.model")


def test_corrupt_files_are_checkpoint_errors_naming_the_file(tmp_path):
    folder = make_real_folder(tmp_path / "ckpt")
    (folder / "tokenizer.model").write_bytes(STAND_IN_MODEL.read_bytes()[:5000])  # a truncated download
    with pytest.raises(CheckpointError, match=r"tokenizer\.model is not a valid SentencePiece model"):
        load_tokenizer(folder)
    folder = make_real_folder(tmp_path / "ckpt2")
    (folder / "tokenizer_config.json").write_text('{"bos_token": "<s>",')
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is not valid JSON"):
        load_tokenizer(folder)
    folder = make_real_folder(tmp_path / "ckpt3")
    (folder / "config.json").write_text(json.dumps({"vocab_size": 50000}))
    with pytest.raises(CheckpointError, match=r"config\.json says vocab_size 50000"):
        load_tokenizer(folder)


def test_compact_vocabulary_folder_uses_its_own_special_ids(compact_tokenizer_folder):
    # A tiny model's tokenizer: pieces 0..7999, special tokens at 8000.., 8192 ids. Its files, not the table, decide.
    folder, ids = compact_tokenizer_folder
    tok = load_quietly(folder)
    assert (tok.num_pieces, tok.vocab_size) == (8000, 8192)
    assert sorted(ids.values()) == list(range(8000, 8000 + len(ids))) and len(ids) == 8
    for text, i in ids.items():
        assert tok.encode(text) == [i] and tok.decode([i]) == text and tok.convert_tokens_to_ids(text) == i
    begin, end = ids["<|begin_of_sentence|>"], ids["<|end_of_sentence|>"]
    assert (tok.cls_token_id, tok.sep_token_id, tok.bos_token_id, tok.eos_token_id) == (begin, end, 1, 2)
    assert tok.stop_token_ids == [2, end]
    chat = tok.apply_chat_template(CHATS["three turns"])
    assert chat[0] == begin and chat.count(end) == 1 and max(chat) < 8192
    assert tok.decode(chat) == format_ernie_chat(CHATS["three turns"])
    with pytest.raises(InputError, match="outside"):  # the big checkpoints' id does not exist here
        tok.decode([ERNIE_SPECIAL_TOKENS["<|begin_of_sentence|>"]])

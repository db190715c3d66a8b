"""save_model writes a complete export: the tokenizer's files, chat_template.jinja and generation_config.json
beside config.json and the weights, for plain, merged-LoRA and quantized models; transformers reads the
tokenizer and the chat template back and gets ERNIE's ids and text. (Whole-model greedy decoding in
transformers and llama.cpp on these exports: test_interop.py.)"""

import json
import shutil
import warnings

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

import ernie_lab
from conftest import micro_model, refused
from ernie_lab import InputError, lora
from ernie_lab.io.saving import IncompleteExportWarning
from ernie_lab.io.serving_files import ERNIE_CHAT_TEMPLATE, TOKENIZER_FILES
from ernie_lab.io.tokenizer import format_ernie_chat
from ernie_lab.tiny.tokenizer import TINY_TOKENIZER_DIR
from test_tokenizer import CHATS, PROSE

TINY_TEXT = TINY_TOKENIZER_DIR.parent / "tiny-ernie-text"
ADAPTER = TINY_TOKENIZER_DIR.parent / "adapters" / "tiny-text-colours-sft"
EXPORT_FILES = {*TOKENIZER_FILES, "chat_template.jinja", "generation_config.json", "config.json", "model.safetensors"}
QUESTION = [{"role": "user", "content": "What colour is the ball?"}]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The shipped tiny text model, loaded and saved with no tokenizer argument: found where it was loaded."""
    folder = tmp_path_factory.mktemp("exports") / "tiny"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither the stand-in nor an incomplete export
        ernie_lab.save_model(ernie_lab.load_model(TINY_TEXT), folder)
    return folder


def names(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def logits(model, ids=((5, 300, 6001, 42, 7),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_the_export_holds_what_a_serving_engine_reads(exported):
    assert names(exported) == EXPORT_FILES
    for name in ("tokenizer.model", "added_tokens.json", "special_tokens_map.json"):  # the kit's own files, as shipped
        assert (exported / name).read_bytes() == (TINY_TOKENIZER_DIR / name).read_bytes(), name
    shipped, written = (json.loads((f / "tokenizer_config.json").read_text()) for f in (TINY_TOKENIZER_DIR, exported))
    assert written == shipped
    assert (exported / "chat_template.jinja").read_text(encoding="utf-8") == ERNIE_CHAT_TEMPLATE


def test_generation_config_stops_at_both_end_tokens(exported):
    tok = ernie_lab.load_tokenizer(exported)
    config = GenerationConfig.from_pretrained(exported)
    assert config.eos_token_id == [tok.convert_tokens_to_ids("</s>"), tok.convert_tokens_to_ids("<|end_of_sentence|>")]
    assert (config.bos_token_id, config.pad_token_id) == (tok.bos_token_id, tok.pad_token_id) == (1, 0)
    assert (config.do_sample, config.temperature, config.top_p) == (True, 0.8, 0.8)  # Baidu's defaults


def test_transformers_reads_the_tokenizer_and_the_chat_template(exported):
    theirs, ours = AutoTokenizer.from_pretrained(exported), ernie_lab.load_tokenizer(exported)
    assert theirs.encode(PROSE, add_special_tokens=False) == ours.encode(PROSE)
    assert theirs.convert_tokens_to_ids(["<|begin_of_sentence|>", "<|IMAGE_START|>", "</think>"]) == [6001, 6003, 6011]
    for messages in CHATS.values():
        text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text == format_ernie_chat(messages) == ours.apply_chat_template(messages, tokenize=False)


def test_an_explicit_tokenizer_goes_with_a_model_built_in_memory(tmp_path):
    tok = ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)
    model = micro_model(vocab_size=6016)  # a model that never saw a folder
    ernie_lab.save_model(model, tmp_path / "export", tokenizer=tok)
    assert names(tmp_path / "export") == EXPORT_FILES
    assert ernie_lab.load_tokenizer(tmp_path / "export").encode(PROSE) == tok.encode(PROSE)
    assert torch.equal(logits(ernie_lab.load_model(tmp_path / "export")), logits(model))


def test_a_model_without_a_tokenizer_is_saved_with_a_warning_or_on_purpose(tmp_path):
    model = micro_model()
    with pytest.warns(IncompleteExportWarning, match="tokenizer=tok"):
        ernie_lab.save_model(model, tmp_path / "warned")
    assert names(tmp_path / "warned") == {"config.json", "model.safetensors", "generation_config.json"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ernie_lab.save_model(model, tmp_path / "weights", tokenizer=False)
    assert names(tmp_path / "weights") == {"config.json", "model.safetensors"}


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(tmp_path):
    tok = ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)
    refused(lambda: ernie_lab.save_model(micro_model(), tmp_path / "x", tokenizer=tok), InputError,
            "6011", "64 rows")
    refused(lambda: ernie_lab.save_model(micro_model(), tmp_path / "x", tokenizer=str(TINY_TOKENIZER_DIR)),
            InputError, "ErnieTokenizer", "str")
    assert not (tmp_path / "x").exists()  # refused before the disk was touched


def test_saving_over_the_folder_it_came_from_keeps_a_whole_tokenizer(tmp_path):
    folder = shutil.copytree(TINY_TEXT, tmp_path / "tiny")
    model = ernie_lab.load_model(folder)
    with torch.no_grad():
        model.norm.weight.mul_(1.25)
    ernie_lab.save_model(model, folder)
    for name in TOKENIZER_FILES:  # rewritten from memory, identical, never truncated through a link
        assert (folder / name).read_bytes() == (TINY_TEXT / name).read_bytes(), name
    assert (folder / "TRAINING.md").is_file()  # other files stay
    assert torch.equal(logits(ernie_lab.load_model(folder)), logits(model))
    assert ernie_lab.load_tokenizer(folder).encode(PROSE) == ernie_lab.load_tokenizer(TINY_TEXT).encode(PROSE)


def test_a_merged_lora_export_carries_the_tokenizer_and_template(tmp_path):
    """ERNIE PR #1292: merged LoRA exports lacked the tokenizer files and chat_template.jinja."""
    adapted = lora.load_adapter(ernie_lab.load_model(TINY_TEXT), ADAPTER)
    expected = logits(adapted)
    ernie_lab.save_model(lora.merge_lora(adapted, unload=True), tmp_path / "merged")
    assert names(tmp_path / "merged") == EXPORT_FILES
    assert (logits(ernie_lab.load_model(tmp_path / "merged")) - expected).abs().max() < 1e-4
    assert (logits(ernie_lab.load_model(TINY_TEXT)) - expected).abs().max() > 1e-3  # the adapter is in the weights


def test_a_quantized_export_carries_the_tokenizer_and_reloads_bit_exact(tmp_path):
    model = ernie_lab.load_model(TINY_TEXT, quantize="w8a16")
    ernie_lab.save_model(model, tmp_path / "w8", max_shard_bytes=2_000_000)
    files = names(tmp_path / "w8")
    assert EXPORT_FILES - {"model.safetensors"} <= files and "model.safetensors.index.json" in files
    assert json.loads((tmp_path / "w8" / "config.json").read_text())["quantization_config"]
    assert torch.equal(logits(ernie_lab.load_model(tmp_path / "w8")), logits(model))


def test_tokenizer_save_pretrained_round_trips(tmp_path):
    tok = ernie_lab.load_tokenizer(TINY_TEXT)
    tok.chat_template = ERNIE_CHAT_TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    assert names(tmp_path / "tok") == {*TOKENIZER_FILES, "chat_template.jinja"}
    again = ernie_lab.load_tokenizer(tmp_path / "tok")
    assert again.special_tokens == tok.special_tokens and again.roles == tok.roles
    assert again.apply_chat_template(CHATS["three turns"]) == tok.apply_chat_template(CHATS["three turns"])
    refused(lambda: tok.save_pretrained(42), InputError, "path")

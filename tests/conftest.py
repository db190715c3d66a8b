"""Shared fixtures: reference models from transformers, saved the way the Hub stores them."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network

REPO = Path(__file__).resolve().parent.parent

import pytest
import torch

TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)

# A small ernie-lab text config (the tiny models' vocabulary), for tests that need no reference model.
SMALL_TEXT = dict(model_type="ernie4_5", vocab_size=6016, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


def reference_dense(seed: int = 0, **overrides):
    """A random-weight transformers Ernie4_5ForCausalLM (the reference), fp32, eval mode."""
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    torch.manual_seed(seed)
    config = Ernie4_5Config(**{**TINY, **overrides})
    return Ernie4_5ForCausalLM(config).eval()


# Micro models for tests that train or break things: a 64-token dense decoder and a 4-layer MoE (dense first).
MICRO_TEXT = dict(model_type="ernie4_5", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
MICRO_MOE = dict(model_type="ernie4_5_moe", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_num_experts=6, moe_k=2,
                 moe_intermediate_size=8, moe_num_shared_experts=1, moe_layer_start_index=1)


def micro_model(seed: int = 0, **overrides):
    """An ernie-lab text model of ``MICRO_TEXT`` (``overrides`` change fields), drawn with ``init_weights``."""
    from ernie_lab import ErnieConfig, ErnieForCausalLM

    return ErnieForCausalLM(ErnieConfig.from_dict({**MICRO_TEXT, **overrides})).init_weights(seed=seed)


def micro_moe(seed: int = 0, bias: float = 0.0):
    """An ernie-lab MoE of ``MICRO_MOE`` in eval mode, routers redrawn N(0, 1) so tokens route apart (the
    reference draws them zero) and, with ``bias``, correction biases drawn from U(-bias, bias)."""
    from ernie_lab import ErnieConfig, ErnieForCausalLM
    from ernie_lab.model.moe import moe_blocks

    torch.manual_seed(seed)
    model = ErnieForCausalLM(ErnieConfig.from_dict(MICRO_MOE)).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 1.0)
            if bias:
                block.moe_statics.e_score_correction_bias.uniform_(-bias, bias)
    return model


def tiny_vl_picture_prompt(question: str = "What colour is the background?"):
    """The shipped tiny VL model and a one-picture question for it: (model, ids (1, T), picture inputs)."""
    import ernie_lab
    from ernie_lab import scenes, tiny_models
    from ernie_lab.io.chat import render_prompt

    folder = Path(__file__).resolve().parent.parent / "data" / "tiny-ernie-vl"
    model, tok = ernie_lab.load_model(folder), ernie_lab.load_tokenizer(folder)
    image = scenes.render(tiny_models.held_out_scenes(1)[0])
    prompt = render_prompt(model, tok, scenes.conversation(image, question, "")[:1])
    return model, prompt.pop("input_ids"), prompt


def refused(call, error: type, *words: str) -> str:
    """``call`` must raise ``error``, a kit error, whose message names every word; returns the message."""
    from ernie_lab import ErnieLabError

    with pytest.raises(error) as caught:
        call()
    assert isinstance(caught.value, ErnieLabError), f"{type(caught.value).__name__} is not a kit error"
    message = str(caught.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


@pytest.fixture
def one_thread():
    """Models this small train fastest on one thread (two spin against each other on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_vl(seed: int = 0, vocab_size: int = 103424, num_experts: int = 4, **token_ids):
    """A random transformers VL model (head_dim 128 keeps the real rotary split) with live routers, fp32, eval.

    ``token_ids``: image_token_id=... and the other special ids, passed to the config."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    from ernie_lab.course.notebook import spread_reference_routers

    torch.manual_seed(seed)
    config = Ernie4_5_VLMoeConfig(
        text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, moe_intermediate_size=[32, 16], moe_k=2,
                         moe_num_experts=num_experts, moe_num_shared_experts=1, vocab_size=vocab_size,
                         initializer_range=0.08),
        vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, initializer_range=0.08),
        **token_ids,
    )
    return spread_reference_routers(Ernie4_5_VLMoeForConditionalGeneration(config).eval(), bias=0.05)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """(reference model, folder) for a tiny dense model saved with save_pretrained."""
    ref = reference_dense()
    folder = tmp_path_factory.mktemp("tiny-dense")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="session")
def real_shape_checkpoint(tmp_path_factory):
    """(reference, folder) at the real ERNIE-4.5-0.3B shape, random weights (1.4 GB in fp32)."""
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    torch.manual_seed(0)
    ref = Ernie4_5ForCausalLM(Ernie4_5Config()).eval()
    folder = tmp_path_factory.mktemp("ernie-0.3b-random")
    ref.save_pretrained(folder, max_shard_size="500MB")  # sharded, as the Hub's larger models are
    return ref, folder


COMPACT_VOCAB_SIZE = 8192  # a tiny model's vocabulary: the stand-in's 8,000 pieces, then the special tokens


@pytest.fixture(scope="session")
def compact_tokenizer_folder(tmp_path_factory):
    """(folder, text -> id) for a tokenizer with a compact vocabulary, in the Hub's file layout: the stand-in's
    SentencePiece pieces at ids 0..7999 and ERNIE's special tokens right after them (8000, 8001, ...), not at
    the big checkpoints' 100272+; vocab_size 8192 in config.json."""
    import json
    import shutil

    from ernie_lab.model.special_tokens import SPECIAL_TOKENS
    from ernie_lab.io.tokenizer import STAND_IN_MODEL

    folder = tmp_path_factory.mktemp("compact-tokenizer")
    shutil.copyfile(STAND_IN_MODEL, folder / "tokenizer.model")
    above_pieces = [text for text, i in sorted(SPECIAL_TOKENS.items(), key=lambda item: item[1]) if i >= 8000]
    ids = {text: 8000 + k for k, text in enumerate(above_pieces)}
    decoder = {str(i): {"content": text, "special": True} for text, i in ids.items()}
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
              "cls_token": "<|begin_of_sentence|>", "sep_token": "<|end_of_sentence|>", "added_tokens_decoder": decoder}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"vocab_size": COMPACT_VOCAB_SIZE}), encoding="utf-8")
    return folder, ids


# ------------------------------------------------------------------------------------- real kills of a save
def start_child(script: str, *args) -> subprocess.Popen:
    """``python -c script args...`` with the checkout and tests/ importable, one thread, stdout piped."""
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, env=env, text=True)


def kill_when(child: subprocess.Popen, condition, what: str) -> None:
    """Wait for the child to print 'ready' and for ``condition()``, then SIGKILL it (mid-save)."""
    try:
        assert child.stdout.readline().strip() == "ready", "the child did not start"
        deadline = time.monotonic() + 120
        while not condition():
            assert child.poll() is None and time.monotonic() < deadline, f"the child ended before {what}"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL

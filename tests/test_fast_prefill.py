"""The compiled prefill (``fast_prefill.py``): the prompt's forward as one graph for every prompt length.

Its last-position logits must equal the eager forward's (fp32, 1e-5), ``generate(..., compile_prefill=True)``
must give eager's greedy tokens, and two prompt lengths must share ONE graph (dynamo's ``unique_graphs``
counter grows by one). ``torch.compile`` runs once here, in the module fixture ``compiled``, on a micro model.
"""

import contextlib
import io

import pytest
import torch
from torch._dynamo.utils import counters

import ernie_lab
from ernie_lab.model.fast_prefill import compiled_prefill
from ernie_lab.model.kv_cache import KVCache
from conftest import micro_model, micro_moe, refused

SHORT = [[5, 9, 11, 30, 2], [7, 8]]                      # left-padded to 5 tokens
LONG = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]]  # 9 tokens: another length, the same graph


def last_logits(model, prompts, fast=None):
    """Logits of each prompt's last token, eager (plain cache) or through ``fast`` (a fresh static cache)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])                    # (B, T)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])         # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        if fast is None:
            cache = KVCache.for_model(model, len(prompts), 64)
            return model(ids, attention_mask=mask, cache=cache, position_ids=positions).logits[:, -1]
        return fast(model, ids, positions, mask, KVCache.for_model(model, len(prompts), 64, static=True))


@pytest.fixture(scope="module")
def compiled():
    """Eager and compiled-prefill greedy tokens for two prompt lengths, the prefill logits of both paths, what
    the compiled calls printed, and how many graphs dynamo made for them."""
    model = micro_model(seed=4).eval()
    eager = [ernie_lab.generate(model, p, 6, eos_token_id=[]) for p in (SHORT, LONG)]
    graphs_before = counters["stats"]["unique_graphs"]
    tokens, printed = [], []
    for prompts in (SHORT, LONG):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            tokens.append(ernie_lab.generate(model, prompts, 6, eos_token_id=[], compile_prefill=True))
        printed.append(out.getvalue())
    fast = compiled_prefill(model)
    logits = [(last_logits(model, p), last_logits(model, p, fast)) for p in (SHORT, LONG)]
    return dict(eager=eager, tokens=tokens, printed=printed, logits=logits, fast=fast,
                graphs=counters["stats"]["unique_graphs"] - graphs_before)


def test_compiled_prefill_logits_equal_eager(compiled):
    for eager, fast in compiled["logits"]:
        assert eager.shape == fast.shape == (2, 64)
        assert (eager - fast).abs().max() < 1e-5


def test_compiled_prefill_greedy_tokens_equal_eager(compiled):
    for eager, fast in zip(compiled["eager"], compiled["tokens"]):
        assert torch.equal(eager, fast)


def test_two_prompt_lengths_share_one_graph(compiled):
    assert compiled["graphs"] == 1


def test_prefill_compile_time_is_reported_once(compiled):
    first, second = compiled["printed"]
    assert "compiled the prefill of ErnieForCausalLM in" in first and second == ""
    assert compiled["fast"].compile_seconds > 0


def test_compiled_prefill_checks_token_ids_outside_the_graph(compiled):
    model = micro_model(seed=4).eval()
    refused(lambda: ernie_lab.generate(model, [[1, 99]], 2, compile_prefill=True), ernie_lab.InputError,
            "99", "vocabulary")


def test_compile_prefill_refuses_moe_models_and_bad_switches():
    refused(lambda: ernie_lab.generate(micro_moe(), [[1, 2]], 2, compile_prefill=True), ernie_lab.InputError,
            "compile_prefill", "MoE")
    refused(lambda: ernie_lab.generate(micro_model(), [[1, 2]], 2, compile_prefill="on"), ernie_lab.InputError,
            "compile_prefill", "True or False")

"""compile=True on the mixture-of-experts models: a text MoE and the tiny VL model (decoding after a picture).

The compiled step holds the expert dispatch as one operator (``ernie_lab::moe_experts``) that runs the eager
dispatch, so its greedy tokens must equal eager's and its logits must match eager's step by step (the VL ones
only if the text positions continue past the picture as in eager). ``torch.compile`` runs ONCE per model
kind, in the module fixtures ``moe`` and ``vl``; quantizing the experts afterwards must reuse that graph.
"""

import contextlib
import io

import pytest
import torch

import ernie_lab
from ernie_lab import quant
from ernie_lab.model import moe as moe_module
from ernie_lab.model.fast_decode import compiled_step, decode_step
from ernie_lab.model.kv_cache import KVCache
from conftest import micro_moe, tiny_vl_picture_prompt

STEP_TOKENS = [11, 40, 3, 57, 23]  # fed one by one after the prefill: different tokens, different experts


def generate_both(model, ids, new_tokens, **inputs):
    """Greedy tokens eager and compiled (the first compiled call compiles), and what the compiled call printed."""
    eager = ernie_lab.generate(model, ids, new_tokens, eos_token_id=[], **inputs)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        compiled = ernie_lab.generate(model, ids, new_tokens, eos_token_id=[], compile=True, **inputs)
    return eager, compiled, out.getvalue()


@torch.inference_mode()
def step_logits(model, ids, mask, step=None, **inputs):
    """(steps, B, vocab) logits of one-token steps after an eager prefill of the left-padded ``ids`` (B, T).
    ``step``: ``decode_step`` itself or the compiled one, on a 64-slot static cache (the buffer generate
    gives these prompts, so the compiled graph is reused); None: the model's own forward on the plain cache."""
    cache = KVCache.for_model(model, len(ids), 64, static=step is not None)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)                        # (B, T)
    model(ids, attention_mask=mask, cache=cache, position_ids=positions, **inputs)
    position = positions[:, -1:] + 1                                      # (B, 1)
    outs = []
    for token in STEP_TOKENS:
        tokens = torch.full((len(ids), 1), token)
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        if step is None:
            outs.append(model(tokens, attention_mask=mask, cache=cache, position_ids=position).logits[:, -1])
        else:
            outs.append(step(model, tokens, position, cache))             # (B, vocab)
            cache.advance(1)
        position = position + 1
    return torch.stack(outs)


@pytest.fixture(scope="module")
def moe():
    """A micro text MoE (live routers, correction biases): greedy tokens eager / compiled, step logits, and the
    same after its routed experts are quantized to w4a16 in place (the compiled graph is reused)."""
    model = micro_moe(seed=3, bias=0.1)
    prompts = [[5, 9, 11, 30, 2], [7, 8]]
    eager, compiled, printed = generate_both(model, prompts, 6)
    ids, mask = torch.tensor([[5, 9, 11, 30, 2], [0, 0, 0, 7, 8]]), torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    result = dict(eager=eager, compiled=compiled, printed=printed,
                  compiled_steps=step_logits(model, ids, mask, compiled_step(model)),
                  plain_steps=step_logits(model, ids, mask), graphs=_graphs())
    quant.quantize(model, "w4a16", filter=r".*mlp\.experts\..*")       # the routed experts only
    counted = []
    real_dispatch = moe_module.dispatch
    moe_module.dispatch = lambda *args, **kw: counted.append(1) or real_dispatch(*args, **kw)
    try:
        result["quantized_eager"], result["quantized_compiled"], _ = generate_both(model, prompts, 6)
    finally:
        moe_module.dispatch = real_dispatch
    result.update(quantized_graphs=_graphs(), dispatch_calls=len(counted), layers=len(moe_module.moe_blocks(model)))
    counted.clear()   # batch 1: a one-token step's experts run on their bound kernels, not through dispatch
    moe_module.dispatch = lambda *args, **kw: counted.append(1) or real_dispatch(*args, **kw)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result["one_row_compiled"] = ernie_lab.generate(model, prompts[:1], 6, eos_token_id=[], compile=True)
    finally:
        moe_module.dispatch = real_dispatch
    result.update(one_row_eager=ernie_lab.generate(model, prompts[:1], 6, eos_token_id=[]),
                  one_row_dispatch_calls=len(counted))
    return result


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def test_compiled_moe_greedy_tokens_equal_eager(moe):
    assert torch.equal(moe["eager"], moe["compiled"])
    assert "compiled the decode step of ErnieForCausalLM in" in moe["printed"]


def test_compiled_moe_step_logits_match_eager(moe):
    assert (moe["compiled_steps"] - moe["plain_steps"]).abs().max() < 1e-4


def test_compiled_moe_with_quantized_experts_reuses_the_graph(moe):
    """The experts run inside the operator, not in the graph: quantizing them needs no recompile, and the
    operator ran the eager dispatch once per MoE layer and step (eager prefill + 5 steps, both models)."""
    assert torch.equal(moe["quantized_eager"], moe["quantized_compiled"])
    assert moe["quantized_graphs"] == moe["graphs"]
    prefill_and_steps = 1 + 5
    assert moe["dispatch_calls"] == 2 * prefill_and_steps * moe["layers"]  # eager run, then compiled run


def test_compiled_batch_one_runs_its_experts_on_bound_kernels_with_eager_tokens(moe):
    """Batch 1 after quantizing: the eager prefill dispatches once per MoE layer, the five compiled steps never
    (their experts run on bound kernels), and the greedy tokens are eager's."""
    assert torch.equal(moe["one_row_compiled"], moe["one_row_eager"])
    assert moe["one_row_dispatch_calls"] == moe["layers"]


MOE_CONFIG = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, moe_num_experts=8, moe_k=3, moe_intermediate_size=64)


def _block(experts: str, seed: int = 0):
    """A registered MoE block whose experts are streaming fp32 / bf16 layers or quantized to ``experts``."""
    from ernie_lab.model.config import ErnieConfig

    torch.manual_seed(seed)
    dtype = torch.float32 if experts == "fp32" else torch.bfloat16
    block = moe_module.MoEBlock(ErnieConfig(**MOE_CONFIG), 1).to(dtype).eval()
    if experts in ("fp32", "bf16"):
        quant.stream_linears(block)
    elif experts != "plain":
        quant.quantize(block, experts, group_size=32)
    moe_module.register_for_compile(block)
    return block, dtype


def _operator(block, x, ids, weights):
    return torch.ops.ernie_lab.moe_experts(x, ids, weights, block.compile_key, 0)


@pytest.mark.parametrize("experts", ["fp32", "bf16", "w8a16", "w4a16", "w2a16", "w4a8"])
@torch.inference_mode()
def test_bound_experts_equal_dispatch_bit_for_bit(experts):
    """One token, every expert format on the C's per-token kernels: the bound kernels give dispatch's very bits,
    for fresh tokens and experts, bound once and reused (fresh=False) as the later steps of a generate do."""
    block, dtype = _block(experts)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(1, 64, generator=g).to(dtype)
        ids = torch.randperm(8, generator=g)[:3][None]                                  # (1, k)
        weights = torch.rand(1, 3, generator=g).to(dtype)
        with moe_module.bound_experts(fresh=step == 0):
            fast = _operator(block, x, ids, weights)
        assert torch.equal(fast, moe_module.dispatch(x, ids, weights, block.group_experts(0))), (experts, step)
        assert all(moe_module._BOUND[block.compile_key, 0, e, dtype] is not None for e in ids[0].tolist())


@torch.inference_mode()
def test_bound_experts_bind_again_when_fresh_and_fall_back_without_a_kernel(monkeypatch):
    """Experts quantized after a binding: a fresh binding reads the new layers. Plain nn.Linear experts (whose
    forward is F.linear, not the kernel table) have no bound kernel: the operator dispatches as before."""
    block, dtype = _block("bf16")
    x, ids, weights = torch.randn(1, 64).to(dtype), torch.tensor([[0, 5, 7]]), torch.full((1, 3), 1 / 3).to(dtype)
    with moe_module.bound_experts(fresh=True):
        before = _operator(block, x, ids, weights)
    quant.quantize(block, "w4a16", group_size=32)
    with moe_module.bound_experts(fresh=True):
        after = _operator(block, x, ids, weights)
    assert torch.equal(after, moe_module.dispatch(x, ids, weights, block.group_experts(0)))
    assert not torch.equal(after, before)

    plain, dtype = _block("plain")
    calls = []
    real = moe_module.dispatch
    monkeypatch.setattr(moe_module, "dispatch", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = x.to(dtype)
    with moe_module.bound_experts(fresh=True):
        y = _operator(plain, x, ids, weights.to(dtype))
    assert calls == [1] and torch.equal(y, real(x, ids, weights.to(dtype), plain.group_experts(0)))
    assert moe_module._BOUND[plain.compile_key, 0, 0, dtype] is None
    assert not moe_module._BINDING["active"]                   # outside a step, nothing is bound or reused
    calls.clear()
    with moe_module.experts_unbound(), moe_module.bound_experts(fresh=True):
        _operator(block, x.to(torch.bfloat16), ids, weights)   # bindable experts, binding switched off
    assert calls == [1]


@pytest.fixture(scope="module")
def vl():
    """The tiny VL model after a prefill with a picture: greedy tokens eager / compiled and step logits."""
    model, ids, prompt = tiny_vl_picture_prompt()
    eager, compiled, printed = generate_both(model, ids, 6, **prompt)
    mask = torch.ones_like(ids)
    return dict(eager=eager, compiled=compiled, printed=printed,
                compiled_steps=step_logits(model, ids, mask, compiled_step(model), **prompt),
                unshifted_steps=step_logits(model, ids, mask, _without_offset, **prompt),
                plain_steps=step_logits(model, ids, mask, **prompt))


def _without_offset(model, token, position, cache):
    """decode_step with the picture's position shift forgotten (what a wrong compiled step would compute)."""
    offset, cache.position_offset = cache.position_offset, None
    try:
        return decode_step(model, token, position, cache)
    finally:
        cache.position_offset = offset


def test_compiled_vl_greedy_tokens_equal_eager_after_a_picture(vl):
    assert torch.equal(vl["eager"], vl["compiled"])
    assert "compiled the decode step of ErnieVLForConditionalGeneration in" in vl["printed"]


def test_compiled_vl_step_logits_match_eager_and_need_the_position_shift(vl):
    assert (vl["compiled_steps"] - vl["plain_steps"]).abs().max() < 1e-4
    assert (vl["unshifted_steps"] - vl["plain_steps"]).abs().max() > 1e-2  # the shift matters on this prompt


def test_compiling_an_unregistered_moe_block_names_the_fix():
    """torch.compile of the step without generate (no registration) stops while tracing, naming the fix."""
    model = micro_moe(seed=4)
    cache = KVCache.for_model(model, 1, 8, static=True)
    with pytest.raises(Exception) as caught, torch.inference_mode():
        torch.compile(decode_step, fullgraph=True)(model, torch.tensor([[1]]), torch.tensor([[0]]), cache)
    assert "register_for_compile" in str(caught.value) and "MoE layer 1" in str(caught.value)


def test_one_token_dispatch_is_bit_identical_to_the_sorted_path():
    """dispatch's batch-1 decode path (the k experts in turn) gives the sorted path's numbers exactly."""
    from ernie_lab.model.mlp import SwiGLU

    generator = torch.Generator().manual_seed(0)
    experts = torch.nn.ModuleList(SwiGLU(32, 24, False) for _ in range(8))
    with torch.no_grad():
        for k in (1, 2, 6):
            x = torch.randn(1, 32, generator=generator)
            ids = torch.randperm(8, generator=generator)[:k][None]        # (1, k)
            weights = torch.rand(1, k, generator=generator).softmax(-1)  # (1, k)
            one_token = moe_module.dispatch(x, ids, weights, experts)
            sorted_path = moe_module.dispatch(x, ids, weights, experts, idle_too=True)
            assert torch.equal(one_token, sorted_path)

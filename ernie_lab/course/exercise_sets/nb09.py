"""Exercises of notebook 09 (family and scale): more experts, conversations that fit, de-duplicated all-to-all,
and round-to-nearest int8 by hand."""

import math

import torch

from ...analysis import family as F
from ..exercises import Mismatch, call, exercise, expect_equal

DEGREES = (2, 4, 8, 16, 32, 64)


@exercise("09.more_experts",
          hint="start from count_params(CONFIG_300B_A47B).total; add 64 more experts (3 matrices of 8192 x 3584) "
               "and 64 more router rows (8192 weights + 1 correction bias) in each of the 51 MoE layers.")
def more_experts(total) -> str:
    bigger = F.count_params(dict(F.CONFIG_300B_A47B, moe_num_experts=128))
    base = F.count_params(F.CONFIG_300B_A47B).total
    router_rows = 64 * 51 * (8192 + 1)
    if total == bigger.total - router_rows:
        raise Mismatch("the experts are right; the router grows too (64 more rows of weights and biases)")
    if total == base + 2 * (bigger.total - base):
        raise Mismatch("that adds 128 experts; the model has 64, doubled it has 128, so 64 are new")
    expect_equal("parameters with 128 experts", total, bigger.total)
    return f"{bigger.total / 1e9:.1f} B stored, yet only {bigger.active / 1e9:.2f} B active: the router rows."


@exercise("09.conversations",
          hint="memory left = 4 x 80 GiB x 0.9 - weight_bytes(CONFIG_300B_A47B, 'int4'); one 32K conversation "
               "needs 2 (K, V) x 54 layers x 8 KV heads x 128 x 2 bytes per token; round down.")
def conversations(count) -> str:
    expected = conversations_that_fit(gpus=4, gpu_gib=80, context=32768)
    if count == expected + 1:
        raise Mismatch("one too many: round the number of conversations down")
    expect_equal("32K-token conversations on 4 H100s", count, expected)
    return f"{expected} conversations; each 32K-token cache is {F.kv_cache_bytes(F.CONFIG_300B_A47B, 32768) / 2**30:.1f} GiB."


def conversations_that_fit(gpus: int, gpu_gib: int, context: int) -> int:
    """The most ``context``-token conversations that the int4 300B model serves on ``gpus`` cards."""
    return max(n for n in range(1, 2000)
               if F.gpus_needed(F.CONFIG_300B_A47B, "int4", gpu_gib, context, batch=n) <= gpus)


@exercise("09.dedup_degree",
          hint="saving(N) = 1 - (N - 1)(1 - C(E - E/N, k) / C(E, k)) / (k (N - 1) / N) with E = 64, k = 6; "
               "the largest N in 2, 4, ..., 64 with saving(N) > 0.30.")
def dedup_degree(degree) -> str:
    def saving(n):
        return 1 - F.ep_all_to_all_bytes(F.CONFIG_21B_A3B, n, dedup=True) / F.ep_all_to_all_bytes(F.CONFIG_21B_A3B, n)
    expected = max(n for n in DEGREES if saving(n) > 0.30)
    if degree in DEGREES and degree != expected:
        raise Mismatch(f"at N = {degree} the saving is {saving(degree):.0%}; at N = {expected} it is "
                       f"{saving(expected):.0%}, the last above 30%")
    expect_equal("largest expert-parallel degree saving > 30%", degree, expected)
    return f"N = {expected}: de-duplication saves {saving(expected):.0%} of the all-to-all bytes."


def int8_reference(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-row round-to-nearest int8: scale = max |w| / 127, then round, clamp and scale back."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127    # (out, 1)
    return (weight / scale).round().clamp(-127, 127) * scale                 # (out, in)


@exercise("09.int8_rtn",
          hint="per output row: scale = row.abs().max() / 127; q = round(w / scale) clamped to [-127, 127]; "
               "return q * scale (the weight as the int8 model sees it), same shape and dtype float32.")
def int8_rtn(function) -> str:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 40, generator=g) * torch.tensor([0.01, 0.1, 1, 3, 0.5, 0.05])[:, None]
    got = call(function, weight.clone())
    expected = int8_reference(weight)
    if not isinstance(got, torch.Tensor) or got.shape != weight.shape or not got.is_floating_point():
        raise Mismatch(f"return the dequantized weight, a float tensor of shape {tuple(weight.shape)}")
    if not torch.isfinite(got).all():
        raise Mismatch("your weight holds NaN or Inf")
    got = got.to(weight.dtype)
    per_tensor_scale = weight.abs().max() / 127
    if torch.allclose(got, (weight / per_tensor_scale).round() * per_tensor_scale, atol=1e-7):
        raise Mismatch("one scale for the whole matrix: the small rows lose almost all their digits; use one "
                       "scale per output row")
    scale = weight.abs().amax(1, keepdim=True) / 127
    if torch.allclose(got, (weight / scale).trunc() * scale, atol=1e-7):
        raise Mismatch("w / scale is truncated towards zero; round to the nearest integer instead")
    worst = ((got - weight).abs() / scale).max().item()
    if worst > 0.5 + 1e-4:
        raise Mismatch(f"an entry is {worst:.2f} steps away from its weight; round-to-nearest is within half a step")
    if not torch.allclose(got, expected, atol=1e-6):
        raise Mismatch("close, but not the symmetric per-row grid max|w| / 127")
    return f"Every weight within half a step; relative error {((got - weight).norm() / weight.norm()).item():.2%}."


@exercise("09.layer_damage",
          hint="for each name in linear_names(model): keep a copy of the weight, put quantize(weight) in, measure "
               "the largest change of the logits, put the copy back; return {name: change}.")
def layer_damage(function) -> str:
    from ...model.config import ErnieConfig
    from ...model.decoder import ErnieForCausalLM

    torch.manual_seed(0)
    model = ErnieForCausalLM(ErnieConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[3, 5] = 30.0         # one outlier weight: its row's int8 step grows ~100x
    ids = torch.randint(0, 64, (2, 12))
    state = {n: t.clone() for n, t in model.state_dict().items()}
    got = call(function, model, ids, int8_reference)
    changed = [n for n, t in model.state_dict().items() if not torch.equal(t, state[n])]
    if changed:
        raise Mismatch(f"put every weight back after measuring; still changed: {changed[:3]}")
    from ...model.linears import linear_names

    if not isinstance(got, dict) or sorted(got) != sorted(linear_names(model)):
        raise Mismatch("return a dict with one entry per nn.Linear of the model: {name: largest logit change}")
    expect_equal("the layer that hurts most when quantized", max(got, key=got.get), "layers.1.mlp.down_proj")
    return "One outlier weight stretches its row's scale, and every other weight of that row loses its digits."

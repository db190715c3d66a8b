"""Exercises of notebook 09 (family and scale): more experts, conversations that fit, de-duplicated all-to-all,
and round-to-nearest int8 by hand."""

import torch

from ...analysis import family as F
from ..exercises import (Mismatch, call, describe, exercise, expect_close, expect_equal, expect_tensor,
                         fresh_generator)

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


def _weight_case(g: torch.Generator, fewest: int, most: int) -> torch.Tensor:
    """A fresh (out, in) weight, out in [fewest, most], whose rows span four orders of magnitude, one of them all
    zeros."""
    rows = int(torch.randint(fewest, most + 1, (1,), generator=g))
    cols = int(torch.randint(8, 65, (1,), generator=g))
    magnitude = 10 ** (torch.rand(rows, 1, generator=g) * 4 - 3)              # (out, 1): 0.001 .. 10
    weight = torch.randn(rows, cols, generator=g) * magnitude
    weight[int(torch.randint(0, rows, (1,), generator=g))] = 0.0             # a row that was pruned
    return weight


@exercise("09.int8_rtn",
          hint="per output row: scale = row.abs().max() / 127 (clamped away from 0 for a row of zeros); q = round(w / "
               "scale) clamped to [-127, 127]; return q * scale (the weight as the int8 model sees it), same shape, float32.")
def int8_rtn(function) -> str:
    g = fresh_generator()
    errors = []
    for fewest, most in ((4, 5), (6, 7), (8, 9)):            # row counts that never coincide: three shapes
        weight = _weight_case(g, fewest, most)
        got = call(function, weight)
        expected = int8_reference(weight)
        scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
        if isinstance(got, torch.Tensor) and got.shape == weight.shape and got.is_floating_point():
            unclamped = weight.abs().amax(1, keepdim=True) / 127
            if torch.allclose(got, (weight / unclamped).round().clamp(-127, 127) * unclamped, equal_nan=True):
                raise Mismatch("NaN where a row is all zeros: max|w| = 0 there, so clamp the scale away from zero")
            per_tensor = weight.abs().max() / 127
            if torch.allclose(got, (weight / per_tensor).round() * per_tensor, atol=1e-7):
                raise Mismatch("one scale for the whole matrix: the small rows lose almost all their digits; use one "
                               "scale per output row")
            if torch.allclose(got, (weight / scale).trunc() * scale, atol=1e-7):
                raise Mismatch("w / scale is truncated towards zero; round to the nearest integer instead")
        expect_tensor(f"the int8 weight of a {tuple(weight.shape)} matrix", got, expected, atol=1e-6)
        errors.append(((got - weight).norm() / weight.norm()).item())
    return f"Every weight within half a step of its row's grid; relative errors {', '.join(f'{e:.2%}' for e in errors)}."


def _damage_case(g: torch.Generator, shortest: int, longest: int):
    """A fresh micro decoder with one outlier weight in a random linear layer, and a batch of ids whose length lies
    in [shortest, longest]."""
    from ...model.config import ErnieConfig
    from ...model.decoder import ErnieForCausalLM
    from ...model.linears import linear_names

    heads = int(torch.randint(2, 5, (1,), generator=g))
    config = ErnieConfig(vocab_size=64, hidden_size=8 * heads, intermediate_size=int(torch.randint(32, 80, (1,), generator=g)),
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=1, head_dim=8)
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        model = ErnieForCausalLM(config).eval()
    names = [n for n in linear_names(model) if n != "lm_head"]
    victim = names[int(torch.randint(0, len(names), (1,), generator=g))]
    with torch.no_grad():
        weight = model.get_submodule(victim).weight
        weight[int(torch.randint(0, weight.shape[0], (1,), generator=g)), 0] = 30.0   # its row's int8 step grows ~100x
    batch, length = (int(torch.randint(low, high + 1, (1,), generator=g)) for low, high in ((1, 2), (shortest, longest)))
    ids = torch.randint(0, 64, (batch, length), generator=g)
    return model, ids, victim


@torch.no_grad()
def damage_reference(model, ids, quantize) -> dict[str, float]:
    """Largest logit change when each linear layer alone holds its quantized weight."""
    from ...model.linears import linear_names

    reference = model(ids).logits
    damage = {}
    for name in linear_names(model):
        linear = model.get_submodule(name)
        original = linear.weight.detach().clone()
        linear.weight.copy_(quantize(original))
        damage[name] = (model(ids).logits - reference).abs().max().item()
        linear.weight.copy_(original)
    return damage


@exercise("09.layer_damage",
          hint="for each name in linear_names(model): keep a copy of the weight, put quantize(weight) in, measure "
               "the largest change of the logits, put the copy back; return {name: change}.")
def layer_damage(function) -> str:
    g = fresh_generator()
    for shortest, longest in ((6, 9), (10, 13)):          # two lengths that never coincide: two shapes
        model, ids, victim = _damage_case(g, shortest, longest)
        state = {n: t.clone() for n, t in model.state_dict().items()}
        got = call(function, model, ids, int8_reference)
        changed = [n for n, t in model.state_dict().items() if not torch.equal(t, state[n])]
        if changed:
            raise Mismatch(f"put every weight back after measuring; still changed: {changed[:3]}")
        expected = damage_reference(model, ids, int8_reference)
        if not isinstance(got, dict) or sorted(got) != sorted(expected):
            raise Mismatch(f"return a dict with one entry per nn.Linear of the model ({len(expected)} of them): "
                           f"{{name: largest logit change}}; got {describe(got)}")
        for name, value in expected.items():
            expect_close(f"the damage of {name}", got[name], value, rel=1e-3, abs_=1e-6)
    worst = max(expected, key=expected.get)
    return (f"In the last model the outlier sat in {victim}; {worst} hurt most. One outlier weight stretches its "
            "row's scale, and every other weight of that row loses its digits.")

"""Exercises of notebook 01 (the dense decoder, built by the student).

The spine, each piece then used by the notebook: RMSNorm, interleaved RoPE, grouped-query attention,
appending to a preallocated KV cache, the SwiGLU MLP and the pre-norm decoder layer. Beside them: the
other RoPE layout (rotate-half), the top-p nucleus and what the causal mask protects.

Every judge draws fresh inputs on each call, at two or more shapes chosen at random, and compares with
the kit (`ernie_lab.model`) and with `transformers`' Ernie4_5 modules on the same weights. A diagnosis
names a mistake only when the answer equals that mistake's output on the same inputs.

The `kit_*` functions are the kit's pieces in the exercises' signatures: the notebook goes on with them
until the student's own version is written, and the judges compare against them.
"""

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..exercises import (Mismatch, as_ints, call, exercise, expect_equal, expect_tensor, draw_int, fresh_generator,
                         name_the_mistake)
from ...model.attention import attend, causal_mask
from ...model.kv_cache import KVCache
from ...model.mlp import SwiGLU
from ...model.norm import RMSNorm
from ...model.rope import apply_rope, rope_angles


# ------------------------------------------------------------------------------------------------
# The kit's pieces, in the signatures the student writes.
# ------------------------------------------------------------------------------------------------

def kit_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`ernie_lab.model.norm.RMSNorm` with gain `weight`: (..., h) -> (..., h)."""
    norm = RMSNorm(x.shape[-1], eps).to(weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
        return norm(x)


kit_rope = apply_rope                   # ernie_lab.model.rope.apply_rope(x, cos, sin): interleaved pairs


def kit_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`ernie_lab.model.attention.attend` with the causal mask: the T queries are the last T of S positions."""
    return attend(q, k, v, None)


def kit_cache_append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> torch.Tensor:
    """`ernie_lab.KVCache.update` on one preallocated buffer (B, Hkv, capacity, D): writes the T new rows at
    `length` in place and returns the filled rows (B, Hkv, length + T, D), a view of `buffer`."""
    B, heads, _, head_dim = buffer.shape
    cache = KVCache(1, B, heads, head_dim, 0, dtype=buffer.dtype, device=buffer.device)
    cache.keys, cache.values, cache.length = [buffer], [torch.empty_like(buffer)], length
    return cache.update(0, new, new)[0]


def kit_swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """`ernie_lab.model.mlp.SwiGLU` with the given (out, in) weights: (..., h) -> (..., h)."""
    mlp = SwiGLU(w_gate.shape[1], w_gate.shape[0]).to(w_gate.dtype)
    with torch.no_grad():
        for linear, weight in ((mlp.gate_proj, w_gate), (mlp.up_proj, w_up), (mlp.down_proj, w_down)):
            linear.weight.copy_(weight)
        return mlp(x)


def kit_decoder_layer(x, attention, mlp, attn_norm, mlp_norm):
    """The wiring of `ernie_lab.model.decoder.DecoderLayer.forward` (a dense layer), with its parts given."""
    x = x + attention(attn_norm(x))
    return x + mlp(mlp_norm(x))


# ------------------------------------------------------------------------------------------------
# Helpers shared by the judges.
# ------------------------------------------------------------------------------------------------

def _choice(g: torch.Generator, options):
    return options[draw_int(g, 0, len(options) - 1)]


def _reference_config(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int, eps: float):
    from transformers import Ernie4_5Config

    return Ernie4_5Config(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=eps, num_hidden_layers=1,
                          vocab_size=8, hidden_act="silu", attn_implementation="eager")


def _additive_causal_mask(T: int, S: int) -> torch.Tensor:
    """(1, 1, T, S): 0 where query i may see key s, -inf elsewhere (transformers' eager attention adds it)."""
    return torch.zeros(T, S).masked_fill(~causal_mask(T, S), float("-inf"))[None, None]


# ------------------------------------------------------------------------------------------------
# 1 · RMSNorm
# ------------------------------------------------------------------------------------------------

def _rms_norm_cases(g):
    """(x, weight, eps): flat rows of which some are tiny (eps matters there), then a batch of ordinary rows."""
    h = draw_int(g, 5, 33)
    rows = torch.randn(draw_int(g, 4, 8), h, generator=g)                               # (N, h)
    rows[::2] *= 1e-3                                                                # RMS near sqrt(eps)
    yield rows, 1 + 0.3 * torch.randn(h, generator=g), 10 ** (-5 - torch.rand(1, generator=g).item())
    h = draw_int(g, 6, 40)
    x = torch.randn(draw_int(g, 1, 3), draw_int(g, 2, 6), h, generator=g) * 3            # (B, T, h)
    yield x, 1 + 0.3 * torch.randn(h, generator=g), 1e-5


@exercise("01.rms_norm",
          hint="square, take the mean over the last axis (keepdim=True), add eps, take the square root; divide x by "
               "it and multiply by the gain `weight`. No mean is subtracted: this is not LayerNorm.")
def rms_norm(function) -> str:
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5RMSNorm

    for x, weight, eps in _rms_norm_cases(fresh_generator()):
        got = call(function, x, weight, eps)
        expected = kit_rms_norm(x, weight, eps)
        ms = x.pow(2).mean(-1, keepdim=True)                                         # (..., 1)
        name_the_mistake(got, expected, {
            "you subtract the mean (that is LayerNorm); RMSNorm only divides by the root mean square":
                weight * (x - x.mean(-1, keepdim=True)) / (x.var(-1, unbiased=False, keepdim=True) + eps).sqrt(),
            "eps is added after the square root; it belongs inside: sqrt(mean(x^2) + eps)":
                weight * x / (ms.sqrt() + eps),
            "eps is missing: on tiny vectors sqrt(mean(x^2) + eps) is much larger than sqrt(mean(x^2))":
                weight * x / ms.sqrt(),
            "the gain `weight` is missing: multiply the normalised vector by it":
                x / (ms + eps).sqrt(),
            "you divide by the root of the *sum* of squares; RMSNorm takes their mean":
                weight * x / (x.pow(2).sum(-1, keepdim=True) + eps).sqrt(),
        })
        expect_tensor(f"RMSNorm of a {tuple(x.shape)} input vs ernie_lab.norm.RMSNorm", got, expected)
        reference = Ernie4_5RMSNorm(x.shape[-1], eps)
        with torch.no_grad():
            reference.weight.copy_(weight)
            expect_tensor(f"RMSNorm of a {tuple(x.shape)} input vs transformers' Ernie4_5RMSNorm", got, reference(x))
    return "Equal to ernie_lab's RMSNorm and transformers' Ernie4_5RMSNorm, tiny vectors (where eps acts) included."


# ------------------------------------------------------------------------------------------------
# 2 · RoPE, both layouts
# ------------------------------------------------------------------------------------------------

def _rope_cases(g):
    """(x, cos, sin): batch != heads (a forgotten head axis cannot broadcast by luck), scattered positions
    (angles far past 2 pi), random widths and theta; then one decode step (T = 1) with a single sequence."""
    B = draw_int(g, 2, 3)
    H, T, d = B + draw_int(g, 1, 3), draw_int(g, 3, 7), 2 * draw_int(g, 3, 10)
    theta = 10 ** (3 + 3 * torch.rand(1, generator=g).item())
    positions = torch.randint(0, 5000, (B, T), generator=g)                          # (B, T)
    yield (torch.randn(B, H, T, d, generator=g), *rope_angles(positions, d, theta))  # (B, H, T, d), (B, T, d/2) x2
    d = 2 * draw_int(g, 2, 12)
    positions = torch.randint(0, 100_000, (1, 1), generator=g)
    yield (torch.randn(1, draw_int(g, 1, 4), 1, d, generator=g), *rope_angles(positions, d, 500_000.0))


def rotate_half_reference(x, cos, sin):
    """Llama's layout: dimension i turns together with dimension i + d/2."""
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _rope_outputs_concatenated(x, cos, sin):
    """The interleaved rotation, but the rotated evens and odds put back as two halves."""
    cos, sin = cos[:, None], sin[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def _transformers_rope(x, cos, sin):
    """transformers' apply_rotary_pos_emb, which wants (B, T, d) tables whose first half holds the d/2 angles."""
    from transformers.models.ernie4_5.modeling_ernie4_5 import apply_rotary_pos_emb

    return apply_rotary_pos_emb(x, x, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))[0]


def _judge_rotation(function, label: str, references: dict, mistakes: dict) -> None:
    """Run a student's RoPE on fresh cases: name a mistake it equals, check lengths are kept, compare with every
    reference ({name: function}, the first one the expected answer)."""
    for x, cos, sin in _rope_cases(fresh_generator()):
        got = call(function, x, cos, sin)
        expected = next(iter(references.values()))(x, cos, sin)
        name_the_mistake(got, expected, {message: wrong(x, cos, sin) for message, wrong in mistakes.items()})
        if (isinstance(got, torch.Tensor) and got.shape == x.shape and got.is_floating_point()
                and torch.isfinite(got).all() and not torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-4)):
            raise Mismatch("the output vectors have different lengths than the inputs: a rotation keeps lengths "
                           "(check the signs: a*cos - b*sin, b*cos + a*sin for each pair (a, b))")
        for name, reference in references.items():
            expect_tensor(f"{label} of a {tuple(x.shape)} input vs {name}", got, reference(x, cos, sin))


@exercise("01.rope_interleaved",
          hint="even = x[..., 0::2], odd = x[..., 1::2]; give cos and sin a head axis (cos[:, None]); the rotated "
               "pair is (even*cos - odd*sin, odd*cos + even*sin); put each pair back side by side: "
               "torch.stack((new_even, new_odd), dim=-1).flatten(-2).")
def rope_interleaved(function) -> str:
    _judge_rotation(function, "RoPE", {"ernie_lab.rope.apply_rope": kit_rope,
                                       "transformers' apply_rotary_pos_emb": _transformers_rope}, {
        "this is Llama's rotate-half layout (i with i + d/2); ERNIE pairs neighbours (2i, 2i+1)":
            rotate_half_reference,
        "you rotate the wrong way round: the sine terms have the opposite sign":
            lambda x, cos, sin: apply_rope(x, cos, -sin),
        "the rotated evens come first and the rotated odds after them; put each pair back side by side "
        "(stack on a new last axis, then flatten)": _rope_outputs_concatenated,
    })
    return "Equal to ernie_lab's apply_rope and transformers' apply_rotary_pos_emb, also past 2 pi and at T = 1."


@exercise("01.rope_rotate_half",
          hint="split the head in two halves, first = x[..., :d/2] and second = x[..., d/2:]; pair i is "
               "(first_i, second_i); rotate it by the angle whose cos/sin are cos[..., i], sin[..., i] "
               "(add a head axis: cos[:, None]); concatenate the two rotated halves.")
def rope_rotate_half(function) -> str:
    _judge_rotation(function, "rotate-half RoPE", {"Llama's rotate-half layout": rotate_half_reference}, {
        "this is ERNIE's interleaved layout (pairs 2i, 2i+1); rotate-half pairs i with i + d/2": apply_rope,
        "you rotate the wrong way round: the sine terms have the opposite sign":
            lambda x, cos, sin: rotate_half_reference(x, cos, -sin),
    })
    return "Both layouts are rotations; they differ only in which dimensions are paired."


# ------------------------------------------------------------------------------------------------
# 3 · Grouped-query attention and the KV cache
# ------------------------------------------------------------------------------------------------

def _attention_cases(g):
    """(q, k, v): a prefill (S = T), one decode step (T = 1 query after a cache), and a chunk after a cache
    (T > 1 queries, the last T of S); KV heads 1..3 shared by groups of 2..4 query heads, at least one case with
    several KV heads (so which group a head reads shows); once values of another width than the keys."""
    past = (0, draw_int(g, 3, 8), draw_int(g, 2, 5))
    new = (draw_int(g, 3, 7), 1, draw_int(g, 2, 4))
    for case, (P, T) in enumerate(zip(past, new)):
        B, kv_heads = draw_int(g, 1, 2), draw_int(g, 2 if case != 1 else 1, 3)
        group, d = draw_int(g, 2, 4), 2 * draw_int(g, 2, 8)
        S, value_width = P + T, (d if case != 2 else draw_int(g, 3, 12))
        yield (torch.randn(B, kv_heads * group, T, d, generator=g), torch.randn(B, kv_heads, S, d, generator=g),
               torch.randn(B, kv_heads, S, value_width, generator=g))


def _attention_with(q, k, v, scale: float, mask: torch.Tensor, heads_of_kv: torch.Tensor, softmax_dim: int = -1):
    """Attention with a chosen scale, (T, S) bool mask and query-head -> KV-head map: the mistaken variants."""
    k, v = k[:, heads_of_kv], v[:, heads_of_kv]                                       # (B, H, S, d)
    scores = (q @ k.transpose(-2, -1) * scale).masked_fill(~mask, float("-inf"))    # (B, H, T, S)
    return scores.softmax(softmax_dim).nan_to_num() @ v                              # (B, H, T, d)


@exercise("01.gqa_attention",
          hint="q is (B, H, T, d), k is (B, Hkv, S, d), v (B, Hkv, S, dv), S >= T: the queries are the LAST T positions. "
               "Query head h reads KV head h // (H // Hkv) (k.repeat_interleave(H // Hkv, dim=1)); scores = "
               "q @ k^T / sqrt(d); query i may see keys 0 .. S - T + i (mask the rest with -inf); softmax over the "
               "keys; multiply by v.")
def gqa_attention(function) -> str:
    from transformers.models.ernie4_5.modeling_ernie4_5 import eager_attention_forward

    for q, k, v in _attention_cases(fresh_generator()):
        got = call(function, q, k, v)
        (H, T, d), (kv_heads, S) = q.shape[1:], k.shape[1:3]
        group, scale, causal = H // kv_heads, d ** -0.5, causal_mask(T, S)
        grouped, everything = torch.arange(H) // group, torch.ones(T, S, dtype=torch.bool)
        expected = kit_gqa_attention(q, k, v)
        name_the_mistake(got, expected, {
            "the scores are not divided by sqrt(d) (head width d)": _attention_with(q, k, v, 1.0, causal, grouped),
            "the scores are divided by d; divide by sqrt(d)": _attention_with(q, k, v, 1 / d, causal, grouped),
            "query head h reads KV head h % Hkv (k.repeat); in GQA consecutive query heads share a KV head: "
            "h // (H / Hkv), which is what repeat_interleave gives":
                _attention_with(q, k, v, scale, causal, torch.arange(H) % kv_heads),
            "there is no causal mask: a query reads keys after its own position":
                _attention_with(q, k, v, scale, everything, grouped),
            "your mask lets query i see keys 0 .. i, as if the queries were the FIRST T positions; after a cache "
            "they are the last T (query i sits at S - T + i). torch.ones(T, S).tril() and "
            "scaled_dot_product_attention(is_causal=True) both align the mask to the top-left":
                _attention_with(q, k, v, scale, everything.tril(), grouped),
            "the softmax runs over the queries (dim -2); each query's weights over the keys must sum to 1":
                _attention_with(q, k, v, scale, causal, grouped, softmax_dim=-2),
        })
        label = f"attention of {T} queries over {S} keys, {H} query heads on {kv_heads} KV heads"
        expect_tensor(f"{label}, vs ernie_lab.attention.attend", got, expected)
        module = SimpleNamespace(num_key_value_groups=group, training=False)
        theirs, _ = eager_attention_forward(module, q, k, v, _additive_causal_mask(T, S), scaling=scale)
        expect_tensor(f"{label}, vs transformers' eager attention", got, theirs.transpose(1, 2))
    return ("Equal to ernie_lab's attend and transformers' eager attention, for a prefill, one cached decode step "
            "and a chunk after a cache.")


def _cache_cases(g):
    """(buffer, length, new): an empty cache (prefill), one decode step, a chunk; a buffer exactly full after
    the write once. Rows past `length` hold leftovers (random numbers), as a reused buffer does."""
    for length, T in ((0, draw_int(g, 2, 5)), (draw_int(g, 1, 6), 1), (draw_int(g, 2, 5), draw_int(g, 2, 3))):
        B, heads, d = draw_int(g, 1, 2), draw_int(g, 1, 3), 2 * draw_int(g, 2, 6)
        capacity = length + T + (draw_int(g, 1, 3) if T != 1 else 0)
        yield (torch.randn(B, heads, capacity, d, generator=g), length, torch.randn(B, heads, T, d, generator=g))


@exercise("01.cache_append",
          hint="buffer is (B, Hkv, capacity, d) and its first `length` rows along axis 2 are stored tokens; write the "
               "T new rows in place at buffer[:, :, length:length + T] and return buffer[:, :, :length + T] (a view "
               "of the buffer, so the next step finds the rows there).")
def cache_append(function) -> str:
    for buffer, length, new in _cache_cases(fresh_generator()):
        got = call(function, buffer, length, new)
        T = new.shape[2]
        whole = buffer.clone()
        expected = kit_cache_append(whole, length, new)                                # a view of `whole`
        if isinstance(got, torch.Tensor) and got.shape == whole.shape != expected.shape and torch.equal(got, whole):
            raise Mismatch("you returned the whole buffer; only its first length + T rows hold tokens")
        at_start = buffer.clone()
        at_start[:, :, :T] = new
        name_the_mistake(got, expected, {
            "you wrote the new rows at position 0, over the oldest ones; they go after the `length` stored rows":
                at_start[:, :, :length + T],
            "the new rows come first; append them after the stored ones": torch.cat((new, buffer[:, :, :length]), 2),
        }, atol=0.0)
        expect_tensor(f"cache of {length} rows plus {T} new (capacity {buffer.shape[2]})", got, expected)
        if got.untyped_storage().nbytes() < buffer.numel() * buffer.element_size():
            raise Mismatch("your rows are right, but in a new tensor (torch.cat?), not in the buffer: write them into "
                           "`buffer` in place and return buffer[:, :, :length + T], or the next step will not find them")
    return "That is what ernie_lab.KVCache.update does for every layer: no copy of the past, one write per step."


# ------------------------------------------------------------------------------------------------
# 4 · SwiGLU and 5 · the decoder layer
# ------------------------------------------------------------------------------------------------

def _swiglu_cases(g):
    """(x, w_gate, w_up, w_down) in nn.Linear's (out, in) layout, intermediate width != hidden width."""
    for shape_in_front in ((draw_int(g, 1, 3), draw_int(g, 2, 5)), (draw_int(g, 2, 7),)):
        h = draw_int(g, 4, 16)
        width = h + draw_int(g, 1, 2 * h)
        yield (torch.randn(*shape_in_front, h, generator=g), torch.randn(width, h, generator=g) / h ** 0.5,
               torch.randn(width, h, generator=g) / h ** 0.5, torch.randn(h, width, generator=g) / width ** 0.5)


@exercise("01.swiglu",
          hint="weights are stored (out, in) like nn.Linear's, so x @ w.T projects; gate = x @ w_gate.T, "
               "up = x @ w_up.T; silu(z) = z * sigmoid(z) (F.silu) on the gate only; return (silu(gate) * up) @ w_down.T.")
def swiglu(function) -> str:
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5MLP

    for x, w_gate, w_up, w_down in _swiglu_cases(fresh_generator()):
        got = call(function, x, w_gate, w_up, w_down)
        gate, up = x @ w_gate.T, x @ w_up.T                                           # (..., I) each
        expected = kit_swiglu(x, w_gate, w_up, w_down)
        name_the_mistake(got, expected, {
            "silu is applied to the up projection; it belongs to the gate: silu(x W_gate^T) * (x W_up^T)":
                (F.silu(up) * gate) @ w_down.T,
            "you use sigmoid(z) as the gate; SwiGLU uses silu(z) = z * sigmoid(z)": (torch.sigmoid(gate) * up) @ w_down.T,
            "you use relu; SwiGLU's gate is silu(z) = z * sigmoid(z)": (torch.relu(gate) * up) @ w_down.T,
            "you use gelu; SwiGLU's gate is silu(z) = z * sigmoid(z)": (F.gelu(gate) * up) @ w_down.T,
            "the up projection is missing: multiply silu(gate) by x W_up^T": F.silu(gate) @ w_down.T,
        })
        h, width = w_gate.shape[1], w_gate.shape[0]
        expect_tensor(f"SwiGLU of a {tuple(x.shape)} input, width {width}, vs ernie_lab.mlp.SwiGLU", got, expected)
        reference = Ernie4_5MLP(_reference_config(h, width, 1, 1, 2, 1e-5))
        with torch.no_grad():
            reference.load_state_dict({"gate_proj.weight": w_gate, "up_proj.weight": w_up, "down_proj.weight": w_down})
            expect_tensor(f"SwiGLU of a {tuple(x.shape)} input vs transformers' Ernie4_5MLP", got, reference(x))
    return "Equal to ernie_lab's SwiGLU and transformers' Ernie4_5MLP."


def _decoder_cases(g):
    """(a kit DecoderLayer with random weights and gains, its rope tables, x) at two random shapes (two lengths that
    never coincide, so the shapes always differ)."""
    from ...model.config import ErnieConfig
    from ...model.decoder import DecoderLayer

    for shortest, longest in ((2, 4), (5, 7)):
        heads, kv_heads = _choice(g, ((2, 1), (4, 2), (4, 1), (2, 2)))
        hidden, head_dim = 4 * draw_int(g, 2, 6), 2 * draw_int(g, 2, 4)
        config = ErnieConfig(vocab_size=8, hidden_size=hidden, intermediate_size=hidden + draw_int(g, 1, 2 * hidden),
                             num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=head_dim)
        layer = DecoderLayer(config, layer_idx=0).eval()
        with torch.no_grad():
            for name, p in layer.named_parameters():
                gain = name.endswith("norm.weight")
                p.copy_((1.0 if gain else 0.0) + torch.randn(p.shape, generator=g) * (0.4 if gain else 0.3))
        B, T = draw_int(g, 1, 2), draw_int(g, shortest, longest)
        rope = rope_angles(torch.arange(T).expand(B, T), head_dim, config.rope_theta)   # (B, T, d/2) x2
        yield config, layer, rope, torch.randn(B, T, hidden, generator=g)


def _reference_layer(config, layer):
    """transformers' Ernie4_5DecoderLayer holding the same weights (ernie-lab's short names mapped to the Hub's)."""
    from transformers.models.ernie4_5.modeling_ernie4_5 import Ernie4_5DecoderLayer

    names = {"attn_norm.": "input_layernorm.", "attn.": "self_attn.", "mlp_norm.": "post_attention_layernorm."}
    reference = Ernie4_5DecoderLayer(_reference_config(
        config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
        config.head_dim, config.rms_norm_eps), layer_idx=0).eval()
    state = {}
    for name, tensor in layer.state_dict().items():
        prefix = next((p for p in names if name.startswith(p)), "")
        state[names.get(prefix, "") + name.removeprefix(prefix)] = tensor
    reference.load_state_dict(state)
    return reference


@exercise("01.decoder_layer",
          hint="pre-norm: each block reads a normalised copy and adds its result to the stream, which is never "
               "normalised itself: x = x + attention(attn_norm(x)), then x = x + mlp(mlp_norm(x)); return x.")
def decoder_layer(function) -> str:
    for config, layer, rope, x in _decoder_cases(fresh_generator()):
        attention = lambda h, attn=layer.attn, rope=rope: attn(h, rope)                # (B, T, h) -> (B, T, h)
        mlp, n1, n2 = layer.mlp, layer.attn_norm, layer.mlp_norm
        with torch.no_grad():
            got = call(function, x, attention, mlp, n1, n2)
            expected = layer(x, rope)
            after_attention = x + attention(n1(x))
            post_norm = n1(x + attention(x))
            normed_stream = n2(n1(x) + attention(n1(x)))
            name_the_mistake(got, expected, {
                "this is post-norm (normalise after adding); ERNIE normalises the input of each block: "
                "x + attention(attn_norm(x))": n2(post_norm + mlp(post_norm)),
                "you normalise the residual stream itself; only the copy a block reads is normalised":
                    normed_stream + mlp(normed_stream),
                "a residual connection is missing: each block's output is ADDED to the stream":
                    mlp(n2(attention(n1(x)))),
                "the MLP's result is not added to the stream": after_attention,
                "the two norms are swapped: attn_norm goes before attention, mlp_norm before the MLP":
                    (lambda y: y + mlp(n1(y)))(x + attention(n2(x))),
                "attention and MLP run side by side on the same input (GPT-J style); in ERNIE the MLP reads the "
                "stream after attention was added": x + attention(n1(x)) + mlp(n2(x)),
            }, atol=1e-5)
            label = f"decoder layer on a {tuple(x.shape)} input, {config.num_attention_heads} heads"
            expect_tensor(f"{label}, vs ernie_lab DecoderLayer", got, expected, atol=1e-4)
            cos, sin = (torch.cat((t, t), -1) for t in rope)                           # transformers' (B, T, d) tables
            theirs = _reference_layer(config, layer)(x, attention_mask=_additive_causal_mask(x.shape[1], x.shape[1]),
                                                     position_embeddings=(cos, sin))
            expect_tensor(f"{label}, vs transformers' Ernie4_5DecoderLayer", got, theirs, atol=1e-4)
    return "Equal to ernie_lab's DecoderLayer and transformers' Ernie4_5DecoderLayer on the same weights."


# ------------------------------------------------------------------------------------------------
# Sampling: the top-p nucleus; the causal mask's promise
# ------------------------------------------------------------------------------------------------

def _dyadic_probabilities(g, vocab: int) -> torch.Tensor:
    """(V,) distinct probabilities that are multiples of 2^-m, summing to exactly 1: every cumulative sum is exact
    in float32 and float64, so p can sit exactly on a boundary without rounding deciding the answer."""
    counts = (torch.randperm(4000, generator=g)[:vocab] + 1).double()                # distinct, 1 .. 4000
    total = 2 ** math.ceil(math.log2(counts.sum().item() + 1))
    counts[counts.argmax()] += total - counts.sum()                                  # the largest stays the largest
    return (counts / total).float()


def nucleus_reference(probs: torch.Tensor, p: float) -> list[int]:
    """Sorted ids of the smallest set of most likely tokens whose mass reaches p (ernie_lab's _nucleus rule:
    a token is kept while the mass ranked before it is below p), computed in float64."""
    sorted_probs, order = probs.double().sort(descending=True)
    return sorted(order[sorted_probs.cumsum(0) - sorted_probs < p].tolist())


def _cumulative_below(probs: torch.Tensor, p: float) -> list[int]:
    """The common mistake: keep a token while the mass *including* it is below p (drops the one that crosses p)."""
    sorted_probs, order = probs.double().sort(descending=True)
    return sorted(order[sorted_probs.cumsum(0) < p].tolist())


def _nucleus_cases(g):
    """(probs, p): small and large vocabularies; p exactly on a cumulative sum, between two, tiny, and 1."""
    for vocab in (draw_int(g, 5, 12), draw_int(g, 200, 600)):
        probs = _dyadic_probabilities(g, vocab)
        mass = probs.double().sort(descending=True).values.cumsum(0)
        r = draw_int(g, 1, min(vocab, 40) - 2)
        yield probs, mass[r].item()                                          # exactly the mass of the top r + 1
        yield probs, ((mass[r] + mass[r + 1]) / 2).item()                    # strictly between two sums
    yield probs, 1e-9
    yield probs, 1.0


@exercise("01.nucleus",
          hint="sort the probabilities, largest first; keep a token while the mass of the tokens ranked *before* "
               "it is still below p (so the token that crosses p is kept, and when the mass reaches p exactly, no "
               "more); return the kept ids as a sorted list.")
def nucleus(function) -> str:
    for probs, p in _nucleus_cases(fresh_generator()):
        got = sorted(as_ints(f"nucleus at p = {p}", call(function, probs, p)))
        expected = nucleus_reference(probs, p)
        if got != expected and got == _cumulative_below(probs, p):
            raise Mismatch(f"at p = {p:.6g} ({len(probs)} tokens) you drop the token whose probability makes the "
                           "mass cross p: it belongs to the nucleus, or the kept mass would be below p")
        if got != expected and got == nucleus_reference(probs, math.nextafter(p, 2.0)):
            raise Mismatch(f"at p = {p:.6g} the top {len(expected)} tokens already hold exactly p; you keep one more "
                           "(a token is kept while the mass before it is strictly below p)")
        expect_equal(f"nucleus of {len(probs)} tokens at p = {p:.6g}", got, expected)
    return "That is the set `ernie_lab.generation.pick_next_token(..., top_p=p)` samples from."


def causal_mask_reference(length: int = 16, edited: int = 10) -> list[int]:
    """Positions whose logits stay exactly the same when the token at `edited` changes, in a small random model
    (drawn from its own seed: the global random state is left as it was)."""
    from ...model.config import ErnieConfig
    from ...model.decoder import ErnieForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ErnieForCausalLM(ErnieConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
        seq = torch.randint(0, 64, (1, length))
    other = seq.clone()
    other[0, edited] = (seq[0, edited] + 1) % 64
    with torch.no_grad():
        same = (model(seq).logits - model(other).logits).abs().amax(-1)[0] < 1e-6   # (length,)
    return same.nonzero().flatten().tolist()


@exercise("01.causal_mask",
          hint="a token's logits depend only on the tokens at its own position and before; which positions "
               "cannot see position 10?")
def causal_mask_positions(positions) -> str:
    expected = causal_mask_reference()
    got = sorted(as_ints("positions", positions))
    if got == list(range(11)):
        raise Mismatch("position 10 itself reads the changed token (its own input), so its logits change too")
    expect_equal("positions whose logits stay the same", got, expected)
    return "Everything before the edit is untouched: that is why a KV cache may keep old keys and values."

"""Solutions to notebook 01's exercises: the dense ERNIE 4.5 decoder, piece by piece.

Each solution says why each step is there and why the common shortcut is wrong. `SOLUTIONS` and `WRONG` at
the end are what `tests/test_exercises.py` runs: every solution must pass every fresh draw of its judge, and
every wrong answer must fail (with the named diagnosis where one is given).
"""

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# 1 · RMSNorm
# ------------------------------------------------------------------------------------------------

def rms_norm(x, weight, eps):                    # x: (..., h), weight: (h,) -> (..., h)
    """y = g * x / sqrt(mean(x^2) + eps).

    * The mean runs over the last axis only (one statistic per vector), and keepdim=True leaves a (..., 1)
      column that broadcasts back over the h features.
    * eps goes *inside* the square root: for a tiny vector (RMS near sqrt(eps)) it decides the result, and
      sqrt(ms) + eps is a different function (too large an output where ms is tiny).
    * No mean is subtracted (that would be LayerNorm): RMSNorm only fixes the scale, not the centre.
    * The statistics in float32 (x.float()), cast back before the gain: in bfloat16 a mean of 1024 squares
      loses most of its digits. The kit and transformers do the same.
    """
    x32 = x.float()
    mean_square = x32.pow(2).mean(dim=-1, keepdim=True)          # (..., 1)
    return weight * (x32 * torch.rsqrt(mean_square + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------------------
# 2 · RoPE, ERNIE's interleaved layout and Llama's rotate-half
# ------------------------------------------------------------------------------------------------

def rope_interleaved(x, cos, sin):               # x: (B, H, T, d); cos, sin: (B, T, d/2)
    """Pair i is (x[2i], x[2i+1]); turn it by the angle whose cosine and sine are cos[..., i], sin[..., i].

    * cos[:, None] adds the head axis: (B, 1, T, d/2) broadcasts over the H heads. Without it, (B, T, d/2)
      lines up with the *last* axes of (B, H, T, d/2), pairing batch with heads: an error when B != H, and a
      silent mix-up when B = H. (It happens to be right only for B = 1.)
    * A rotation by a: (a', b') = (a cos - b sin, b cos + a sin). The opposite signs turn the other way; the
      scores then depend on m - n with the wrong sign, and a checkpoint's heads look in the wrong direction.
    * torch.stack(..., dim=-1).flatten(-2) puts each rotated pair back side by side (2i, 2i+1). torch.cat
      would put all new evens first and all new odds after: the right numbers in the wrong places.
    The same thing as complex numbers: view each pair as a + ib and multiply by e^{i p w}:
    torch.view_as_real(torch.view_as_complex(x.reshape(..., d/2, 2)) * torch.polar(ones, angles)).
    """
    cos, sin = cos[:, None], sin[:, None]                        # (B, 1, T, d/2): one table for all heads
    even, odd = x[..., 0::2], x[..., 1::2]                       # (B, H, T, d/2) each
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)   # (B, H, T, d/2, 2)
    return turned.flatten(-2)                                    # (B, H, T, d): pairs side by side again


def rope_rotate_half(x, cos, sin):               # x: (B, H, T, d); cos, sin: (B, T, d/2)
    """Llama's layout: pair i is (x[i], x[i + d/2]). The same rotation, other partners: a checkpoint trained
    with one layout gives wrong logits with the other (from position 1 on; position 0 is not turned)."""
    cos, sin = cos[:, None], sin[:, None]                        # (B, 1, T, d/2)
    first, second = x.chunk(2, dim=-1)                           # (B, H, T, d/2) each: pair i = (first_i, second_i)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


# ------------------------------------------------------------------------------------------------
# 3 · Grouped-query attention and the KV cache
# ------------------------------------------------------------------------------------------------

def gqa_attention(q, k, v):                      # q: (B, H, T, d); k, v: (B, Hkv, S, d), S >= T
    """softmax(q k^T / sqrt(d) + mask) v, where H query heads share Hkv key/value heads.

    * Grouping: query head h reads KV head h // (H / Hkv). repeat_interleave copies each KV head for its
      group of consecutive query heads (kv0, kv0, ..., kv1, kv1, ...); k.repeat(1, group, 1, 1) would give
      (kv0, kv1, kv0, kv1, ...): head h reading KV head h % Hkv, a different model.
    * Scale: dot products of d-dimensional vectors grow like sqrt(d); dividing by sqrt(d) keeps the softmax
      from saturating. Not d: that flattens it.
    * Mask: with a KV cache the T queries are the LAST T of the S positions: query i sits at S - T + i and
      sees keys 0 .. S - T + i. A mask aligned to the top-left (torch.ones(T, S).tril(), or
      scaled_dot_product_attention(is_causal=True) with T != S) lets a one-token decode step see only key 0.
    * Softmax over the keys (the last axis): each query's weights sum to 1.
    """
    H, T, d = q.shape[1], q.shape[2], q.shape[3]
    S = k.shape[2]
    group = H // k.shape[1]
    k = k.repeat_interleave(group, dim=1)                        # (B, H, S, d)
    v = v.repeat_interleave(group, dim=1)                        # (B, H, S, d)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)              # (B, H, T, S)
    query_at = torch.arange(S - T, S)[:, None]                   # (T, 1): each query's position
    visible = torch.arange(S)[None, :] <= query_at               # (T, S): key s at or before the query
    weights = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)            # (B, H, T, S)
    return weights @ v                                           # (B, H, T, d)


def cache_append(buffer, length, new):           # buffer: (B, Hkv, capacity, d); new: (B, Hkv, T, d)
    """Write the T new rows after the `length` stored ones, in place, and hand back the filled part.

    * In place: the buffer was allocated once for the longest sequence; writing into it costs T rows per
      step, where torch.cat((past, new)) would copy the whole past every step (quadratic over a generation).
      The returned slice is a *view*: it shares the buffer's memory, so the next step finds the rows there.
    * Rows length .. length + T - 1 (not 0 ..: that overwrites the oldest tokens; not length + 1: that
      leaves a hole of leftovers). Rows past length + T are leftovers and must not be returned: attention
      would read them as if they were tokens.
    """
    end = length + new.shape[2]
    buffer[:, :, length:end] = new
    return buffer[:, :, :end]                                    # (B, Hkv, length + T, d), a view


# ------------------------------------------------------------------------------------------------
# 4 · SwiGLU and 5 · the decoder layer
# ------------------------------------------------------------------------------------------------

def swiglu(x, w_gate, w_up, w_down):             # x: (..., h); w_gate, w_up: (I, h); w_down: (h, I)
    """W_down (silu(W_gate x) * W_up x).

    * nn.Linear stores a weight as (out, in), so a projection of row vectors is x @ w.T.
    * silu(z) = z * sigmoid(z) acts on the gate only; the up projection passes unchanged and is multiplied
      feature by feature. sigmoid alone is GLU, relu or gelu would be ReGLU / GeGLU: other models.
    """
    gate = x @ w_gate.T                                          # (..., I)
    up = x @ w_up.T                                              # (..., I)
    return (F.silu(gate) * up) @ w_down.T                        # (..., h)


def decoder_layer(x, attention, mlp, attn_norm, mlp_norm):      # x: (B, T, h) -> (B, T, h)
    """Pre-norm: each block reads a normalised copy of the stream and adds its result to it.

    The stream itself is never normalised, so what one layer writes reaches every later layer (and the
    gradient reaches every earlier one) through plain additions. Post-norm (normalise after the addition,
    the original Transformer) rescales the stream at every layer; deep post-norm stacks need warm-up
    tricks to train. The MLP reads the stream *after* attention's update (not the layer's input: that is
    the parallel GPT-J block, a different model).
    """
    x = x + attention(attn_norm(x))
    return x + mlp(mlp_norm(x))


# ------------------------------------------------------------------------------------------------
# Sampling and the causal mask
# ------------------------------------------------------------------------------------------------

def nucleus(probs, p):                           # probs: (V,) -> sorted ids of the top-p nucleus
    """Keep a token while the mass ranked *before* it is below p: the token that crosses p is kept (else the
    kept mass would fall short of p), and once the mass reaches p exactly, nothing more. Comparing the
    cumulative sum *including* the token (cumsum < p) drops the crossing token; `<= p` keeps one too many
    when a sum lands exactly on p."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    return sorted(order[mass_before < p].tolist())


# A token sees itself and the past, never the future: positions 0..9 cannot see the edit at 10; position 10
# reads the changed token as its own input, so its logits change too.
unchanged_positions = list(range(10))

SOLUTIONS = {
    "01.rms_norm": (rms_norm,),
    "01.rope_interleaved": (rope_interleaved,),
    "01.rope_rotate_half": (rope_rotate_half,),
    "01.gqa_attention": (gqa_attention,),
    "01.cache_append": (cache_append,),
    "01.swiglu": (swiglu,),
    "01.decoder_layer": (decoder_layer,),
    "01.nucleus": (nucleus,),
    "01.causal_mask": (unchanged_positions,),
}


# ------------------------------------------------------------------------------------------------
# Plausible wrong answers: the mistakes students make.
# ------------------------------------------------------------------------------------------------

def _layer_norm(x, weight, eps):                 # subtracts the mean: LayerNorm without bias
    centred = x - x.mean(-1, keepdim=True)
    return weight * centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _eps_outside(x, weight, eps):
    return weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps)


def _no_gain(x, weight, eps):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _no_eps(x, weight, eps):
    return weight * x / x.pow(2).mean(-1, keepdim=True).sqrt()


def _first_axis(x, weight, eps):                 # the statistic over the wrong axis
    return weight * x / (x.pow(2).mean(0, keepdim=True) + eps).sqrt()


def _rope_cat(x, cos, sin):                      # right numbers, evens first then odds
    cos, sin = cos[:, None], sin[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat((even * cos - odd * sin, odd * cos + even * sin), dim=-1)


def _rope_wrong_sign(x, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos + odd * sin, odd * cos - even * sin), dim=-1).flatten(-2)


def _rope_no_head_axis(x, cos, sin):             # cos (B, T, d/2) broadcast against (B, H, T, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def _rotate_half_wrong_sign(x, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos + second * sin, second * cos - first * sin), dim=-1)


def _attention(q, k, v, *, scale=None, heads="interleave", mask="causal", softmax_dim=-1):
    """The solution with one thing changed: the mistakes below."""
    H, T, d, S = q.shape[1], q.shape[2], q.shape[3], k.shape[2]
    group = H // k.shape[1]
    if heads == "interleave":
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    else:
        k, v = k.repeat(1, group, 1, 1), v.repeat(1, group, 1, 1)
    scores = q @ k.transpose(-2, -1) * (d ** -0.5 if scale is None else scale)
    if mask == "causal":
        visible = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]
    elif mask == "top-left":
        visible = torch.ones(T, S, dtype=torch.bool).tril()
    else:
        visible = torch.ones(T, S, dtype=torch.bool)
    return scores.masked_fill(~visible, float("-inf")).softmax(softmax_dim).nan_to_num() @ v


def _cache_cat(buffer, length, new):             # right rows, but a new tensor: the buffer never holds them
    return torch.cat((buffer[:, :, :length], new), dim=2)


def _cache_at_start(buffer, length, new):
    buffer[:, :, :new.shape[2]] = new
    return buffer[:, :, :length + new.shape[2]]


def _cache_whole_buffer(buffer, length, new):
    buffer[:, :, length:length + new.shape[2]] = new
    return buffer


def _cache_off_by_one(buffer, length, new):
    buffer[:, :, length + 1:length + 1 + new.shape[2]] = new
    return buffer[:, :, :length + 1 + new.shape[2]]


def _swiglu_with(x, w_gate, w_up, w_down, gate_fn=F.silu, swap=False):
    gate, up = x @ w_gate.T, x @ w_up.T
    if swap:
        gate, up = up, gate
    return (gate_fn(gate) * up) @ w_down.T


def _post_norm(x, attention, mlp, attn_norm, mlp_norm):
    x = attn_norm(x + attention(x))
    return mlp_norm(x + mlp(x))


def _normalised_stream(x, attention, mlp, attn_norm, mlp_norm):
    x = attn_norm(x)
    x = x + attention(x)
    x = mlp_norm(x)
    return x + mlp(x)


def _parallel(x, attention, mlp, attn_norm, mlp_norm):
    return x + attention(attn_norm(x)) + mlp(mlp_norm(x))


def _no_residual(x, attention, mlp, attn_norm, mlp_norm):
    return mlp(mlp_norm(attention(attn_norm(x))))


def _swapped_norms(x, attention, mlp, attn_norm, mlp_norm):
    x = x + attention(mlp_norm(x))
    return x + mlp(attn_norm(x))


def _cumsum_below(probs, p):                     # drops the token that crosses p
    sorted_probs, order = probs.sort(descending=True)
    return sorted(order[sorted_probs.cumsum(0) < p].tolist())


def _mass_before_at_most(probs, p):              # keeps one token too many when a sum lands exactly on p
    sorted_probs, order = probs.sort(descending=True)
    return sorted(order[sorted_probs.cumsum(0) - sorted_probs <= p].tolist())


def _unsorted_prefix(probs, p):                  # forgets to sort: walks the vocabulary in id order
    mass_before = probs.cumsum(0) - probs
    return torch.nonzero(mass_before < p).flatten().tolist()


WRONG = {
    "01.rms_norm": [
        {"answers": (_layer_norm,), "says": "LayerNorm"},
        {"answers": (_eps_outside,), "says": "after the square root"},
        {"answers": (_no_gain,), "says": "gain `weight` is missing"},
        {"answers": (_no_eps,), "says": "eps is missing"},
        (_first_axis,),
    ],
    "01.rope_interleaved": [
        {"answers": (rope_rotate_half,), "says": "rotate-half"},
        {"answers": (_rope_wrong_sign,), "says": "wrong way round"},
        {"answers": (_rope_cat,), "says": "side by side"},
        {"answers": (_rope_no_head_axis,), "says": "raised"},
    ],
    "01.rope_rotate_half": [
        {"answers": (rope_interleaved,), "says": "interleaved layout"},
        {"answers": (_rotate_half_wrong_sign,), "says": "wrong way round"},
        (lambda x, cos, sin: torch.cat(x.chunk(2, dim=-1)[::-1], dim=-1),),   # swaps the halves, no rotation
    ],
    "01.gqa_attention": [
        {"answers": (lambda q, k, v: _attention(q, k, v, scale=1.0),), "says": "not divided by sqrt(d)"},
        {"answers": (lambda q, k, v: _attention(q, k, v, scale=1 / q.shape[-1]),), "says": "divided by d"},
        {"answers": (lambda q, k, v: _attention(q, k, v, heads="repeat"),), "says": "h % Hkv"},
        {"answers": (lambda q, k, v: _attention(q, k, v, mask="none"),), "says": "no causal mask"},
        {"answers": (lambda q, k, v: _attention(q, k, v, mask="top-left"),), "says": "FIRST T positions"},
        {"answers": (lambda q, k, v: _attention(q, k, v, softmax_dim=-2),), "says": "over the queries"},
        {"answers": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),),
         "says": "FIRST T positions"},
    ],
    "01.cache_append": [
        {"answers": (_cache_cat,), "says": "in place"},
        {"answers": (_cache_at_start,), "says": "position 0"},
        {"answers": (_cache_whole_buffer,), "says": "whole buffer"},
        (_cache_off_by_one,),
        (lambda buffer, length, new: new,),                               # forgets the past
    ],
    "01.swiglu": [
        {"answers": (lambda *a: _swiglu_with(*a, swap=True),), "says": "up projection"},
        {"answers": (lambda *a: _swiglu_with(*a, gate_fn=torch.sigmoid),), "says": "sigmoid(z) as the gate"},
        {"answers": (lambda *a: _swiglu_with(*a, gate_fn=torch.relu),), "says": "relu"},
        {"answers": (lambda *a: _swiglu_with(*a, gate_fn=F.gelu),), "says": "gelu"},
        {"answers": (lambda x, w_gate, w_up, w_down: F.silu(x @ w_gate.T) @ w_down.T,), "says": "up projection is"},
        (lambda x, w_gate, w_up, w_down: (F.silu(x @ w_gate) * (x @ w_up)) @ w_down,),   # forgets the transposes
    ],
    "01.decoder_layer": [
        {"answers": (_post_norm,), "says": "post-norm"},
        {"answers": (_normalised_stream,), "says": "residual stream itself"},
        {"answers": (_parallel,), "says": "side by side"},
        {"answers": (_no_residual,), "says": "residual connection is missing"},
        {"answers": (_swapped_norms,), "says": "norms are swapped"},
        {"answers": (lambda x, attention, mlp, attn_norm, mlp_norm: x + attention(attn_norm(x)),),
         "says": "MLP's result is not added"},
    ],
    "01.nucleus": [
        {"answers": (_cumsum_below,), "says": "drop the token"},
        {"answers": (_mass_before_at_most,), "says": "keep one more"},
        (_unsorted_prefix,),
        (lambda probs, p: [int(probs.argmax())],),
    ],
    "01.causal_mask": [(list(range(11)),), (list(range(16)),), ([],)],
}

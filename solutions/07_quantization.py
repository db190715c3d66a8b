"""Solutions to the exercises of notebooks/07_quantization.py, with the reasoning behind each step.

The pieces build an int4 model from the bottom: a grid per group of weights (`quantize_groups`), two
codes per byte (`pack2`), the multiply that reads them back (`dequant_matmul`), GPTQ's smarter rounding
(`gptq_update`), the int8 KV cache (`quantize_kv`), a measurement of which layer suffers most
(`most_sensitive_layer`), and the static KV cache's write (`write_rows`). `WRONG` lists the mistakes students really make; the judges name each one when
an answer equals its output.
"""

import copy

import torch

from ernie_lab import quant


def quantize_groups(w, group):
    """Asymmetric int4 round-to-nearest, one scale and zero point per `group` consecutive columns.

    Why groups: one outlier in a row would stretch a per-row scale and flatten every other weight of that
    row onto a few codes; with groups it only coarsens its own `group` columns.
    Why zero points: a symmetric grid wastes half its codes on a group whose weights are all positive. The
    asymmetric grid spans [low, high] of the group with 16 codes, 15 steps: scale = (high - low) / 15.
    Why low <= 0 <= high: the grid must hold 0 exactly (code z), so that a zero weight (or padding) stays
    zero; a group of positive weights then has low = 0 and z = 0.
    """
    N, K = w.shape
    groups = w.float().reshape(N, K // group, group)                  # (N, G, g)
    low = groups.amin(-1).clamp(max=0)                                # (N, G)
    high = groups.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=1e-12)                      # 15 steps between 16 codes; never 0
    zero = (-low / scale).round()                                     # the code that stands for 0.0
    codes = (groups / scale[..., None]).round() + zero[..., None]     # round first, then shift: z is whole
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(N, K)          # (N, K)
    return codes, scale, zero.to(torch.uint8)


def pack2(codes):
    """Two 4-bit codes per byte, along the columns, the first of each pair in the high nibble.

    `u0 << 4 | u1`: the shift moves u0 into bits 7..4, u1 keeps bits 3..0, so `|` (or `+`) cannot mix them.
    Cast to uint8 first: shifts are not defined on floats, and a wider integer type would give wider bytes.
    """
    N, K = codes.shape
    pairs = codes.to(torch.uint8).reshape(N, K // 2, 2)              # (N, K/2, 2)
    return pairs[..., 0] << 4 | pairs[..., 1]                         # (N, K/2) uint8


def dequant_matmul(x, packed, scales, zeros, group):
    """y = x @ W^T with W = (u - z) * s read back from packed int4 codes: the reference every kernel meets.

    Unpack (high nibble first, as `pack2` wrote it), repeat each group's scale and zero point over its
    `group` columns with repeat_interleave (column k belongs to group k // group; `repeat` would tile them
    in the wrong order), subtract the zero point BEFORE scaling, then an ordinary matmul.
    """
    N = packed.shape[0]
    u = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(N, -1).float()      # (N, K) codes
    s = scales.float().repeat_interleave(group, dim=1)                             # (N, K)
    z = zeros.float().repeat_interleave(group, dim=1)                              # (N, K)
    W = (u - z) * s                                                                # (N, K)
    return x @ W.t()                                                               # (M, N)


def gptq_update(W, U, j, q):
    """GPTQ's step for column j: it takes its quantized values q, the columns after it absorb the error.

    With H = X^T X the layer's input Hessian and U the upper Cholesky factor of H^-1, the output error of
    rounding column j is cancelled best (to first order) by moving the later columns along row j of U:
    e = (w_j - q) / U[j, j], W[:, j:] -= e U[j, j:]. Column j itself becomes exactly q (U[j, j] / U[j, j] = 1),
    and earlier columns, already quantized, are left alone (U is upper triangular: U[j, :j] = 0).
    """
    W = W.clone()                                                     # (N, K)
    err = (W[:, j] - q) / U[j, j]                                     # (N,)
    W[:, j:] -= err[:, None] * U[j, j:][None, :]                      # (N, K - j)
    return W


def quantize_kv(rows):
    """int8 keys or values, one scale per (batch, head, token) row: rows (B, H, T, D) -> codes, (B, H, T, 1) scales.

    Per row, because the cache grows one token at a time: a new token must not change the scales of the
    tokens already stored. 127, not 128, so that the grid is symmetric (-127..127). The clamp keeps an
    all-zero row (padding) at codes 0 instead of 0 / 0 = NaN.
    """
    scale = (rows.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)      # (B, H, T, 1)
    codes = (rows.float() / scale).round().clamp(-127, 127).to(torch.int8)         # (B, H, T, D)
    return codes, scale


def most_sensitive_layer(model, ids):
    """{layer name: relative logit change when that layer alone is int4 (w4a16, group 32, zero points)}.

    Measure, do not guess: the layer with the largest weights is not necessarily the one that hurts most
    (what matters is the rounding error times how much the rest of the model amplifies it). Each layer is
    quantized in a deep copy, so the model passed in is never touched.
    """
    with torch.no_grad():
        reference = model(ids).logits
        damage = {}
        for name in quant.plan_layers(model, "w4a16", group_size=32):
            one = quant.quantize(copy.deepcopy(model), "w4a16", group_size=32, symmetric=False, filter=name)
            damage[name] = float((one(ids).logits - reference).norm() / reference.norm())
    return damage


# ------------------------------------------------------------------------------ plausible wrong answers
def _symmetric_groups(w, group):
    """No zero point: the grid is centred on 0 (code 8), scale max|w| / 7."""
    N, K = w.shape
    groups = w.reshape(N, K // group, group)
    scale = groups.abs().amax(-1) / 7
    codes = ((groups / scale[..., None]).round() + 8).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale, torch.full_like(scale, 8).to(torch.uint8)


def _groups_without_zero(w, group, levels=15, rounding=torch.round):
    """min/max of the group as the range (0 not forced onto the grid), or another count of steps, or floor."""
    N, K = w.shape
    groups = w.reshape(N, K // group, group)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = (high - low) / levels
    zero = rounding(-low / scale).clamp(0, 15)
    codes = (rounding(groups / scale[..., None]) + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale, zero.to(torch.uint8)


def _sixteen_steps(w, group):
    """0 on the grid as it should be, but 16 steps between low and high instead of 15."""
    N, K = w.shape
    groups = w.reshape(N, K // group, group)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = (high - low) / 16
    zero = (-low / scale).round().clamp(0, 15)
    codes = ((groups / scale[..., None]).round() + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale, zero.to(torch.uint8)

def _per_row(w, group):
    """One grid per row: the group size ignored."""
    return quantize_groups(w, w.shape[1])


def _floor_groups(w, group):
    N, K = w.shape
    groups = w.reshape(N, K // group, group)
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = (high - low) / 15
    zero = (-low / scale).round()
    codes = ((groups / scale[..., None]).floor() + zero[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    return codes, scale, zero.to(torch.uint8)


def _unpack_low_first(packed):
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1).float()


def _matmul_with(x, packed, scales, zeros, group, weight):
    u = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(packed.shape[0], -1).float()
    return x @ weight(u, scales.float(), zeros.float(), group).t()


def _interleave(t, group):
    return t.repeat_interleave(group, dim=1)


def write_rows(rows, buffer, slots):
    """Write rows (B, H, T, D) into buffer (B, H, S_max, D) at the T slots given as a tensor; return the buffer.

    index_copy_ along the token axis (dim 2) writes in place: the buffer keeps its shape and its memory, and the
    slot numbers are a tensor, not a Python int, so a compiled step that does this write is the same graph at
    every position. The earlier tokens' rows stay where they are.
    """
    return buffer.index_copy_(2, slots, rows)


def _kv_with(scale_of):
    def answer(rows):
        scale = scale_of(rows.float())
        return (rows.float() / scale).round().clamp(-127, 127).to(torch.int8), scale.expand(*rows.shape[:-1], 1)
    return answer


SOLUTIONS = {f"07.{answer.__name__}": (answer,) for answer in
             (quantize_groups, pack2, dequant_matmul, gptq_update, quantize_kv, most_sensitive_layer, write_rows)}

WRONG = {
    "07.quantize_groups": [
        {"answers": (_symmetric_groups,), "says": "symmetric grid"},
        {"answers": (_groups_without_zero,), "says": "must still hold 0 exactly"},
        {"answers": (_sixteen_steps,), "says": "not / 16"},
        {"answers": (_floor_groups,), "says": "rounded down"},
        {"answers": (_per_row,), "says": "one scale per row"},
        (lambda w, group: (quantize_groups(w, group)[0].long(), *quantize_groups(w, group)[1:]),),   # int64 codes
        (lambda w, group: quantize_groups(w, group)[:2],),                                          # no zero points
    ],
    "07.pack2": [
        {"answers": (lambda codes: (lambda p: p[..., 1] << 4 | p[..., 0])(
            codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)),), "says": "other way round"},
        (lambda codes: (lambda p: p[..., 0] << 8 | p[..., 1])(codes.to(torch.uint8).reshape(codes.shape[0], -1, 2)),),
        (lambda codes: (lambda p: p[..., 0] << 4 | p[..., 1])(codes.long().reshape(codes.shape[0], -1, 2)),),
        (lambda codes: (lambda p: p[0::2] << 4 | p[1::2])(codes.to(torch.uint8)),),      # pairs of rows, not columns
    ],
    "07.dequant_matmul": [
        {"answers": (lambda x, packed, scales, zeros, group: x @ (
            (_unpack_low_first(packed) - _interleave(zeros.float(), group)) * _interleave(scales, group)).t(),),
         "says": "wrong way round"},
        {"answers": (lambda x, p, s, z, g: _matmul_with(x, p, s, z, g, lambda u, s, z, g: u * _interleave(s, g)),),
         "says": "not subtracted"},
        {"answers": (lambda x, p, s, z, g: _matmul_with(
            x, p, s, z, g, lambda u, s, z, g: u * _interleave(s, g) - _interleave(z, g)),), "says": "after scaling"},
        {"answers": (lambda x, p, s, z, g: _matmul_with(
            x, p, s, z, g, lambda u, s, z, g: (u - z.repeat(1, g)) * s.repeat(1, g)),), "says": "tiled"},
        (lambda x, p, s, z, g: _matmul_with(x, p, s, z, g, lambda u, s, z, g: (u - _interleave(z, g)) * _interleave(
            s, g)).t(),),                                                                # (N, M): the transpose
    ],
    "07.gptq_update": [
        {"answers": (lambda W, U, j, q: torch.cat((W[:, :j], W[:, j:] - (W[:, j] - q)[:, None] * U[j, j:]), 1),),
         "says": "not divided by U[j, j]"},
        {"answers": (lambda W, U, j, q: torch.cat(
            (W[:, :j], W[:, j:] + ((W[:, j] - q) / U[j, j])[:, None] * U[j, j:]), 1),), "says": "wrong sign"},
        {"answers": (lambda W, U, j, q: torch.cat(
            (W[:, :j + 1], W[:, j + 1:] - ((W[:, j] - q) / U[j, j])[:, None] * U[j, j + 1:]), 1),),
         "says": "keeps its float values"},
        {"answers": (lambda W, U, j, q: torch.cat(
            (W[:, :j], W[:, j:] - ((W[:, j] - q) / U[j, j])[:, None] * U[j:, j]), 1),), "says": "only column j"},
        (lambda W, U, j, q: W - ((W[:, j] - q) / U[j, j])[:, None] * U[j][None, :] * 0.5,),   # half the update
    ],
    "07.quantize_kv": [
        {"answers": (_kv_with(lambda r: (r.abs().amax() / 127).clamp(min=1e-12).expand(*r.shape[:-1], 1)),),
         "says": "whole tensor"},
        {"answers": (lambda rows: (lambda c, s: (c, s))(
            *(lambda s: ((rows / s).round().clamp(-127, 127).to(torch.int8), s))(
                rows.abs().amax(-2, keepdim=True).clamp(min=1e-12) / 127)),), "says": "per channel"},
        {"answers": (_kv_with(lambda r: (r.abs().amax(-1, keepdim=True) / 128).clamp(min=1e-12)),), "says": "/ 128"},
        {"answers": (lambda rows: (lambda s: ((rows / s).round().clamp(-127, 127).to(torch.int8), s))(
            rows.abs().amax(-1, keepdim=True) / 127),), "says": "NaN"},
        {"answers": (lambda rows: (lambda s: ((rows / s).trunc().to(torch.int8), s))(
            (rows.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)),), "says": "truncated"},
    ],
    "07.write_rows": [
        {"answers": (lambda rows, buffer, slots: torch.cat((rows, buffer[:, :, rows.shape[2]:]), 2),),
         "says": "slots 0 .. T-1"},
        {"answers": (lambda rows, buffer, slots: torch.zeros_like(buffer).index_copy_(2, slots, rows),),
         "says": "other slots are zero"},
        (lambda rows, buffer, slots: buffer.index_copy_(2, slots[:1], rows[:, :, :1]),),   # only the first row
        (lambda rows, buffer, slots: torch.cat((buffer[:, :, :int(slots[0])], rows), 2),),   # cut at the new rows
    ],
    "07.most_sensitive_layer": [
        (lambda model, ids: {name: float(model.get_submodule(name).weight.detach().abs().max())
                             for name in quant.plan_layers(model, "w4a16", group_size=32)},),   # largest |w|, nothing run
        (lambda model, ids: {name: float((model(ids).logits.detach() - quant.quantize(copy.deepcopy(model), "w4a16",
                                          group_size=32, filter=name)(ids).logits).norm() / model(ids).logits.norm())
                             for name in quant.plan_layers(model, "w4a16", group_size=32)},),   # symmetric grid
        (lambda model, ids: {name: float((model(ids).logits.detach() - quant.quantize(copy.deepcopy(model), "w4a16",
                                          group_size=32, symmetric=False, filter=name)(ids).logits).norm())
                             for name in quant.plan_layers(model, "w4a16", group_size=32)},),   # not relative
        (lambda model, ids: {name: float((model(ids).logits.detach() - quant.quantize(model, "w4a16", group_size=32,
                                          symmetric=False, filter=name)(ids).logits).norm() / model(ids).logits.norm())
                             for name in quant.plan_layers(model, "w4a16", group_size=32)},),   # quantizes the model
    ],
}


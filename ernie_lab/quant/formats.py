"""Number formats: float weights -> small integer codes + scales (+ zero points), and back; bit packing.

    integer codes, b bits     u in [0, 2^b - 1]  (int8: q in [-127, 127], stored as int8)
    symmetric                 w ~ (u - 2^(b-1)) * s          s = max|w| / (2^(b-1) - 1)
    asymmetric (zero point)   w ~ (u - z) * s                s = (max w - min w) / (2^b - 1), z = round(-min w / s)

One scale (and zero point) per *group* of ``group`` consecutive input columns of one output row:
``group == in_features`` is per-channel. Sub-byte codes are packed along the input dimension, the first
column in the high bits: int4 byte j = u[2j] << 4 | u[2j+1]; int2 byte j = u[4j] << 6 | u[4j+1] << 4 |
u[4j+2] << 2 | u[4j+3]. fp8 (e4m3) keeps one float scale per output row: w ~ fp8(w / s) * s, s = max|w| / 448.

Activations are rounded on the fly: to int8 per token (w8a8), or per block of 32 inputs (w4a8, as
llama.cpp's Q8_0 rounds the activations it meets with Q4_0 weights)::

    x ~ xq * s_b      xq = round(x / s_b) in [-127, 127],   s_b = max |x in block b| / 127
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import InputError

FP8_MAX = 448.0  # the largest finite float8_e4m3fn
ACTIVATION_BLOCK = 32  # w4a8: inputs per int8 activation scale


class Quantized(NamedTuple):
    codes: torch.Tensor          # (N, K) uint8 codes u (int8 q for 8-bit)
    scales: torch.Tensor         # (N, K // group) float32
    zeros: torch.Tensor | None   # (N, K // group) uint8 zero points z, None when symmetric


def group_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, G, g) weights in groups -> (N, G) scales and zero points for ``bits``-bit codes."""
    w = w.float()
    if symmetric:
        scale = w.abs().amax(-1) / (2 ** (bits - 1) - 1)
        return scale.clamp(min=1e-12), None
    low, high = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # the grid always holds 0 exactly
    scale = ((high - low) / (2 ** bits - 1)).clamp(min=1e-12)
    zero = (-low / scale).round().clamp(0, 2 ** bits - 1)
    return scale, zero.to(torch.uint8)


def encode(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """(N, G, g) weights, (N, G) scale / zero -> (N, G, g) codes (int8 q for 8 bits, else uint8 u)."""
    q = (w.float() / scale[..., None]).round()
    if bits == 8:
        return q.clamp(-127, 127).to(torch.int8)
    offset = 2 ** (bits - 1) if zero is None else zero[..., None].float()
    return (q + offset).clamp(0, 2 ** bits - 1).to(torch.uint8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """The inverse of :func:`encode`: (N, G, g) codes -> (N, G, g) float32 weights."""
    if bits == 8:
        return codes.float() * scale[..., None]
    offset = 2 ** (bits - 1) if zero is None else zero[..., None].float()
    return (codes.float() - offset) * scale[..., None]


def quantize_weight(w: torch.Tensor, bits: int, group: int, symmetric: bool = True) -> Quantized:
    """Round-to-nearest quantization of an (N, K) weight, one scale per ``group`` columns of a row."""
    N, K = w.shape
    check_group(K, group)
    grouped = w.reshape(N, K // group, group)                       # (N, G, g)
    scale, zero = group_params(grouped, bits, symmetric)
    codes = encode(grouped, scale, zero, bits).reshape(N, K)
    return Quantized(codes, scale, zero)


def quantize_packed(w: torch.Tensor, bits: int, group: int, symmetric: bool = True,
                    block_rows: int = 256) -> Quantized:
    """:func:`quantize_weight` with the codes packed (bits < 8), ``block_rows`` rows at a time, so the
    float temporaries stay small (quantize-on-read keeps its peak near the quantized model's size).
    Symmetric int8 / int4 on CPU take the kit's one-pass C kernel (``native.quantize_symmetric``), which
    gives the very same codes and scales."""
    if symmetric and bits in (8, 4):
        from . import native
        done = native.quantize_symmetric(w, bits, group)
        if done is not None:
            return Quantized(done[0], done[1], None)
    parts = [quantize_weight(w[i:i + block_rows], bits, group, symmetric) for i in range(0, w.shape[0], block_rows)]
    codes = [p.codes if bits == 8 else pack(p.codes, bits) for p in parts]
    zeros = None if symmetric else torch.cat([p.zeros for p in parts])
    return Quantized(torch.cat(codes), torch.cat([p.scales for p in parts]), zeros)


def dequantize_weight(q: Quantized, bits: int) -> torch.Tensor:
    """(N, K) codes + (N, G) scales -> the (N, K) float32 weight they stand for."""
    N, K = q.codes.shape
    G = q.scales.shape[1]
    return decode(q.codes.reshape(N, G, K // G), q.scales, q.zeros, bits).reshape(N, K)


def check_group(in_features: int, group: int) -> None:
    if not isinstance(group, int) or isinstance(group, bool):
        raise InputError(f"group_size must be a positive int (e.g. 128), got {group!r}.")
    if group < 1 or in_features % group:
        raise InputError(f"group_size {group} must divide the layer's {in_features} input features.")


# ------------------------------------------------------------------------------------- packing
def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, K) uint8 codes of ``bits`` in {2, 4} -> (N, K * bits / 8) bytes, first column in the high bits."""
    per_byte = 8 // bits
    N, K = codes.shape
    if K % per_byte:
        raise InputError(f"{K} columns cannot be packed {per_byte} to a byte.")
    parts = codes.reshape(N, K // per_byte, per_byte).to(torch.uint8)
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8, device=codes.device) * bits  # (per_byte,)
    shifted = parts << shifts                                      # (N, K / per_byte, per_byte), disjoint bits
    out = shifted[..., 0].clone()
    for i in range(1, per_byte):
        out |= shifted[..., i]
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, B) packed bytes -> (N, B * 8 / bits) uint8 codes: the inverse of :func:`pack`."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte - 1, -1, -1, dtype=torch.uint8, device=packed.device) * bits
    mask = (1 << bits) - 1
    return ((packed[..., None] >> shifts) & mask).reshape(packed.shape[0], -1)


# ----------------------------------------------------------------------------------------- fp8
def quantize_fp8(w: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight -> float8_e4m3fn values and float32 scales, one per row (``dim=-1``: reduce over K)."""
    scale = (w.float().abs().amax(dim, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token int8: (M, K) activations -> (M, K) int8 and (M, 1) float32 scales."""
    scale = (x.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)
    return (x.float() / scale).round().clamp(-127, 127).to(torch.int8), scale


def quantize_activations_blocks(x: torch.Tensor, block: int = ACTIVATION_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 per block of ``block`` inputs: (M, K) activations -> (M, K) int8 and (M, K / block) float32
    scales, xq = round(x / s_b) (half to even), s_b = max|x_block| / 127. The C kernel rounds the same way."""
    M, K = x.shape
    blocks = x.float().reshape(M, K // block, block)                                 # (M, B, block)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)             # (M, B, 1)
    xq = (blocks / scale).round().clamp(-127, 127).to(torch.int8)
    return xq.reshape(M, K), scale.squeeze(-1)


def dequantize_activations_blocks(xq: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`quantize_activations_blocks`: (M, K) int8, (M, B) scales -> (M, K) float32."""
    M, K = xq.shape
    return (xq.float().reshape(M, scale.shape[1], -1) * scale[..., None]).reshape(M, K)

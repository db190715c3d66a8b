"""``QuantLinear``: a linear layer whose weight is stored as packed integer (or fp8) codes with scales.

Storage (see the package docstring for the formats and their packing)::

    qweight  the codes, packed (w4a16: two per byte, w2a16: four)     (N, K * bits / 8)
    scales   float32, one per output row or per group of inputs       (N, K / group)
    zeros    uint8 zero points, asymmetric layers only                 (N, K / group)
    bias     the float bias, when the layer has one                    (N,)

The plain forward a student reads is ``reference``: dequantize, then matmul::

    y = x @ dequantize(W)^T + b          w ~ q * s  or  (u - z) * s, one scale per row or group

(w8a8 and fp8 quantize each row of x first, as their kernels do; w4a8 each block of 32 inputs of a row).
``forward`` asks the kernel table (``kernels.py``) for the fastest code that agrees with it on this device,
dtype, scheme and shape: the kit's own C kernels, PyTorch's packed kernels, CUDA's; the reference where
none applies.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, InputError
from . import formats, kernels
from .kernels import reference_only  # noqa: F401  (quant.linear.reference_only, as before)


@dataclass(frozen=True)
class Scheme:
    bits: int            # weight bits
    grouped: bool        # group-wise scales (else one per output row)
    activations: str     # "a16" weight-only, "int8" dynamic per token, "int8 blocks" per 32 inputs, "fp8"


SCHEMES = {
    "w8a16": Scheme(8, False, "a16"),
    "w4a16": Scheme(4, True, "a16"),
    "w2a16": Scheme(2, True, "a16"),
    "w8a8": Scheme(8, False, "int8"),
    "w4a8": Scheme(4, True, "int8 blocks"),
    "fp8": Scheme(8, False, "fp8"),
}


def check_scheme(scheme: str) -> Scheme:
    """The :class:`Scheme` named ``scheme``, or an InputError listing the schemes (and the likeliest one meant)."""
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        close = difflib.get_close_matches(scheme.lower(), SCHEMES, n=1) if isinstance(scheme, str) else []
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InputError(f"unknown quantization scheme {scheme!r}{hint}; choose one of {sorted(SCHEMES)}.")
    return SCHEMES[scheme]


def check_layout(in_features, out_features, scheme: str, symmetric) -> None:
    """A QuantLinear's shape and options: positive int widths, packable codes, zero points only below 8 bits."""
    for what, n in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"QuantLinear {what} must be a positive int, got {n!r}.")
    bits = SCHEMES[scheme].bits
    if bits < 8 and in_features % (8 // bits):
        raise InputError(f"{scheme} packs {8 // bits} codes to a byte along the input: in_features {in_features} "
                         f"is not a multiple of {8 // bits}. Keep this layer in full precision or use w8a16.")
    block = formats.ACTIVATION_BLOCK
    if SCHEMES[scheme].activations == "int8 blocks" and in_features % block:
        raise InputError(f"{scheme} rounds activations in blocks of {block} inputs: in_features {in_features} is not "
                         f"a multiple of {block}. Keep this layer in full precision or use w4a16.")
    if not isinstance(symmetric, bool):
        raise InputError(f"symmetric must be True or False, got {symmetric!r}.")
    if not symmetric and bits == 8:
        raise InputError(f"{scheme} is symmetric (int8 / fp8 codes around 0, no zero points): symmetric=False is "
                         "for w4a16, w4a8 and w2a16. Drop symmetric= or pass True.")


def check_block_group(scheme: str, group_size) -> None:
    """w4a8's weight groups hold whole activation blocks: a group size that is a multiple of 32, or an InputError."""
    block = formats.ACTIVATION_BLOCK
    if scheme in SCHEMES and SCHEMES[scheme].activations == "int8 blocks" and isinstance(group_size, int) \
            and group_size % block:
        raise InputError(f"{scheme} group_size {group_size} must be a multiple of {block}: each weight group meets "
                         f"whole blocks of {block} int8 activations (try {max(block, group_size // block * block)}).")


def check_input(layer: nn.Module, x) -> None:
    """A linear layer's input: a floating tensor (..., in_features) on the layer's device, else an InputError."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{type(layer).__name__} expects a tensor of shape (..., {layer.in_features}), "
                         f"got {type(x).__name__}.")
    device = layer.qweight.device if isinstance(layer, QuantLinear) else layer.weight.device
    if x.dim() == 0 or x.shape[-1] != layer.in_features or not x.is_floating_point() or x.device != device:
        raise InputError(f"{type(layer).__name__} ({layer.in_features} -> {layer.out_features}, on {device}) got an "
                         f"input of shape {tuple(x.shape)}, {x.dtype}, on {x.device}: it needs floating-point "
                         f"activations (..., {layer.in_features}) on {device}. Token ids go through the model, "
                         "not a single layer; move the input (or the layer) with .to().")


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as codes. Buffers: ``qweight`` (packed codes), ``scales`` (N, G) float32,
    ``zeros`` (N, G) uint8 for asymmetric schemes; ``bias`` stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, scheme: str, *, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        spec = check_scheme(scheme)
        check_layout(in_features, out_features, scheme, symmetric)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.bits, self.symmetric = spec.bits, symmetric
        self.group_size = (128 if group_size is None else group_size) if spec.grouped else in_features
        check_block_group(scheme, self.group_size)
        formats.check_group(in_features, self.group_size)
        groups = in_features // self.group_size
        storage = {8: torch.int8, 4: torch.uint8, 2: torch.uint8}[self.bits]
        if scheme == "fp8":
            storage = torch.float8_e4m3fn
        width = in_features * self.bits // 8
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=storage, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32, device=device))
        self.register_buffer("zeros", None if symmetric else
                             torch.zeros(out_features, groups, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if SCHEMES[self.scheme].grouped else ""
        zero = "" if self.symmetric else ", zero points"
        return f"{self.in_features} -> {self.out_features}, {self.scheme}{group}{zero}"

    # ------------------------------------------------------------------ filling the codes
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, *, group_size: int = 128, symmetric: bool = True,
                    quantized: formats.Quantized | None = None) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (round-to-nearest unless ``quantized`` codes are given, e.g. by GPTQ)."""
        if not isinstance(linear, nn.Linear):
            raise InputError(f"QuantLinear.from_linear quantizes an nn.Linear, got {type(linear).__name__}.")
        out_f, in_f = linear.weight.shape
        layer = cls(in_f, out_f, scheme, group_size=group_size, symmetric=symmetric,
                    bias=linear.bias is not None, dtype=linear.weight.dtype, device=linear.weight.device)
        layer.set_weight(linear.weight.detach(), quantized=quantized)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def set_weight(self, weight: torch.Tensor, quantized: formats.Quantized | None = None) -> None:
        """Quantize the (N, K) float ``weight`` into this layer's buffers (also used by quantize-on-read)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise InputError(f"weight of shape {tuple(weight.shape)} for a {self.out_features}x{self.in_features} layer.")
        if self.scales.device.type != "meta":
            weight = weight.to(self.scales.device)
        if self.scheme == "fp8" or quantized is not None:
            self._check_finite(weight, weight)
        if self.scheme == "fp8":
            values, scale = formats.quantize_fp8(weight)
            self._set_buffers(values, scale, None)
            return
        if quantized is not None:
            codes = quantized.codes if self.bits == 8 else formats.pack(quantized.codes, self.bits)
            self._set_buffers(codes, quantized.scales, quantized.zeros)
            return
        q = formats.quantize_packed(weight, self.bits, self.group_size, self.symmetric)
        self._check_finite(weight, q.scales)  # a NaN / Inf weight makes its group's scale NaN / Inf: one small check
        self._set_buffers(q.codes, q.scales, q.zeros)

    def _check_finite(self, weight: torch.Tensor, witness: torch.Tensor) -> None:
        if not weight.is_meta and not bool(torch.isfinite(witness).all()):
            raise InputError(f"the weight for this {self.scheme} layer ({self.in_features} -> {self.out_features}) "
                             "holds NaN or Inf: its scales would be NaN. Repair the weights before quantizing.")

    def _set_buffers(self, qweight, scales, zeros) -> None:
        self.qweight, self.scales = qweight.contiguous(), scales.float().contiguous()
        if not self.symmetric:
            self.zeros = zeros.contiguous()

    # ------------------------------------------------------------------ the reference forward
    def codes(self) -> torch.Tensor:
        """(N, K) codes in plain order (int8 q, uint8 u, or fp8 values)."""
        if self.bits == 8:
            return self.qweight
        return formats.unpack(self.qweight, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The (N, K) float32 weight the codes stand for."""
        if self.scheme == "fp8":
            return formats.dequantize_fp8(self.qweight, self.scales)
        q = formats.Quantized(self.codes(), self.scales, self.zeros)
        return formats.dequantize_weight(q, self.bits)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize then matmul, in the activation's dtype (x quantized first for w8a8 / w4a8 / fp8)."""
        if self.scheme == "w4a8":
            return self.blocks_times(x, self.dequantize())
        if self.scheme == "w8a8":
            xq, xs = formats.quantize_activations_int8(x.reshape(-1, self.in_features))
            y = (xq.float() @ self.qweight.float().t()) * xs * self.scales.t()
            return self._finish(y, x)
        if self.scheme == "fp8":
            xq, xs = formats.quantize_fp8(x.reshape(-1, self.in_features))
            y = (xq.float() * xs) @ self.dequantize().t()
            return self._finish(y, x)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def blocks_times(self, x: torch.Tensor, weight: torch.Tensor, rounded: torch.Tensor | None = None) -> torch.Tensor:
        """w4a8: x rounded to int8 per block of 32 inputs and back, times the (N, K) float ``weight``, in the
        activation's dtype like the weight-only schemes (a bf16 model: the rounded rows and the weight as bf16).
        ``rounded``: those rows (M, K) already made (the C's one pass, ``native.round_blocks``), else made here."""
        if rounded is None:
            xq, xs = formats.quantize_activations_blocks(x.reshape(-1, self.in_features))  # (M, K) int8, (M, K/32)
            rounded = formats.dequantize_activations_blocks(xq, xs).to(x.dtype)            # (M, K)
        return self._finish(rounded @ weight.to(rounded.dtype).t(), x)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(M, N) float output -> (..., N) in x's dtype, bias added."""
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (..., K) -> (..., N)
        check_input(self, x)
        return kernels.run(self, x)

    def decode_kernel(self, dtype: torch.dtype):
        """This layer's kernel for one ``dtype`` row, its tensors bound in (``kernels.bound``), or None."""
        return kernels.bound(self, torch.empty(1, self.in_features, dtype=dtype, device=self.qweight.device))

    def prime_kernels(self) -> None:
        """Build (or refresh) the copy of the codes that the kernel for a decode row keeps (``kernels.prime``:
        PyTorch's tiled int4 codes), outside any graph: a compiled generate calls this first, and its graph
        then reads the copy as an input."""
        kernels.prime(self, torch.empty(1, self.in_features, device=self.qweight.device))

    # ------------------------------------------------------------------ loading a state_dict
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` checks the stored codes against this layer's format before copying anything:
        a wrong shape, a wrong dtype (an int8 copy into uint8 codes would silently change every code),
        zero points for a symmetric layer, NaN / Inf scales or out-of-range zero points are a CheckpointError
        naming the tensor."""
        check_state(self, {leaf: state_dict[prefix + leaf] for leaf in ("qweight", "scales", "zeros")
                           if prefix + leaf in state_dict}, prefix, strict=strict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ casts and moves
    def _apply(self, fn, recurse=True):
        """``model.to(torch.bfloat16)`` casts every floating tensor; the format's own tensors keep their dtypes
        (scales float32, fp8 codes e4m3: both casts back are exact), so a cast model still reads its codes."""
        kept = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != torch.float32:  # fn cast them, and rounded scales would change every weight
            self.scales = self.scales.float() if kept.is_meta else kept.to(self.qweight.device)
        if self.scheme == "fp8" and self.qweight.dtype != torch.float8_e4m3fn:
            self.qweight = self.qweight.to(torch.float8_e4m3fn)
        return self


def check_state(layer: QuantLinear, stored: dict, prefix: str = "", *, strict: bool = True) -> None:
    """Stored ``qweight`` / ``scales`` / ``zeros`` fit ``layer``'s format, or a CheckpointError naming the tensor."""
    where = f"{layer.scheme} layer {prefix.rstrip('.') or 'QuantLinear'} ({layer.in_features} -> {layer.out_features})"
    fix = "The tensors were written for another scheme, group size or layer; load the checkpoint they came with."
    if layer.zeros is None and "zeros" in stored:
        raise CheckpointError(f"{prefix}zeros: zero points given for the symmetric {where}. {fix}")
    if layer.zeros is not None and "zeros" not in stored and strict and stored:
        raise CheckpointError(f"{prefix}zeros missing: the {where} has zero points (symmetric=False). {fix}")
    for leaf, tensor in stored.items():
        expected = getattr(layer, leaf)
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{prefix}{leaf} is a {type(tensor).__name__}, not a tensor. {fix}")
        if tuple(tensor.shape) != tuple(expected.shape) or tensor.dtype != expected.dtype:
            raise CheckpointError(f"{prefix}{leaf}: stored {tuple(tensor.shape)} {tensor.dtype}, the {where} needs "
                                  f"{tuple(expected.shape)} {expected.dtype}. {fix}")
    check_values(layer, stored, prefix)


def check_values(layer: QuantLinear, stored: dict, prefix: str = "") -> None:
    """Scales finite, zero points on the code grid: NaN scales would turn every output of the layer into NaN."""
    scales, zeros = stored.get("scales"), stored.get("zeros")
    if scales is not None and not scales.is_meta and not bool(torch.isfinite(scales).all()):
        raise CheckpointError(f"{prefix}scales holds NaN or Inf: the {layer.scheme} layer's weights would be "
                              "NaN. The checkpoint is corrupt (or was quantized from NaN weights): re-save it.")
    if zeros is not None and not zeros.is_meta and zeros.numel() and int(zeros.max()) > 2 ** layer.bits - 1:
        raise CheckpointError(f"{prefix}zeros holds {int(zeros.max())}, off the {layer.bits}-bit grid "
                              f"[0, {2 ** layer.bits - 1}]. The checkpoint is corrupt: re-save it.")

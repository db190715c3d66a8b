"""``QuantLinear``: a linear layer whose weight is stored as packed integer (or fp8) codes with scales.

Storage (see the package docstring for the formats and their packing)::

    qweight  the codes, packed (w4a16: two per byte, w2a16: four)     (N, K * bits / 8)
    scales   float32, one per output row or per group of inputs       (N, K / group)
    zeros    uint8 zero points, asymmetric layers only                 (N, K / group)
    bias     the float bias, when the layer has one                    (N,)

The plain forward a student reads is ``reference``: dequantize, then matmul::

    y = x @ dequantize(W)^T + b          w ~ q * s  or  (u - z) * s, one scale per row or group

(w8a8 and fp8 quantize each row of x first, as their kernels do). ``forward`` asks the kernel table
(``kernels.py``) for the fastest code that agrees with it on this device, dtype, scheme and shape: the
kit's own C kernels, PyTorch's packed kernels, CUDA's; the reference where none applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import formats, kernels
from .kernels import reference_only  # noqa: F401  (quant.linear.reference_only, as before)


@dataclass(frozen=True)
class Scheme:
    bits: int            # weight bits
    grouped: bool        # group-wise scales (else one per output row)
    activations: str     # "a16" weight-only, "int8" dynamic per token, "fp8"


SCHEMES = {
    "w8a16": Scheme(8, False, "a16"),
    "w4a16": Scheme(4, True, "a16"),
    "w2a16": Scheme(2, True, "a16"),
    "w8a8": Scheme(8, False, "int8"),
    "fp8": Scheme(8, False, "fp8"),
}


def check_scheme(scheme: str) -> Scheme:
    if scheme not in SCHEMES:
        raise InputError(f"unknown quantization scheme {scheme!r}; choose one of {sorted(SCHEMES)}.")
    return SCHEMES[scheme]


class QuantLinear(nn.Module):
    """y = x W^T + b with W held as codes. Buffers: ``qweight`` (packed codes), ``scales`` (N, G) float32,
    ``zeros`` (N, G) uint8 for asymmetric schemes; ``bias`` stays a float parameter."""

    def __init__(self, in_features: int, out_features: int, scheme: str, *, group_size: int | None = None,
                 symmetric: bool = True, bias: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        spec = check_scheme(scheme)
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.bits, self.symmetric = spec.bits, symmetric
        self.group_size = group_size if spec.grouped else in_features
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
        if self.scheme == "fp8":
            values, scale = formats.quantize_fp8(weight)
            self._set_buffers(values, scale, None)
            return
        if quantized is not None:
            codes = quantized.codes if self.bits == 8 else formats.pack(quantized.codes, self.bits)
            self._set_buffers(codes, quantized.scales, quantized.zeros)
            return
        q = formats.quantize_packed(weight, self.bits, self.group_size, self.symmetric)
        self._set_buffers(q.codes, q.scales, q.zeros)

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
        """Dequantize then matmul, in the activation's dtype (x quantized first for w8a8 / fp8)."""
        if self.scheme == "w8a8":
            xq, xs = formats.quantize_activations_int8(x.reshape(-1, self.in_features))
            y = (xq.float() @ self.qweight.float().t()) * xs * self.scales.t()
            return self._finish(y, x)
        if self.scheme == "fp8":
            xq, xs = formats.quantize_fp8(x.reshape(-1, self.in_features))
            y = (xq.float() * xs) @ self.dequantize().t()
            return self._finish(y, x)
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(M, N) float output -> (..., N) in x's dtype, bias added."""
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (..., K) -> (..., N)
        return kernels.run(self, x)

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

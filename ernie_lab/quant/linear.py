"""``QuantLinear``: a linear layer whose weight is stored as packed integer (or fp8) codes with scales.

The forward has two paths that must agree:

    reference   y = x @ dequantize(W)^T + b             plain PyTorch, any device, any scheme
    kernel      one fused PyTorch kernel per scheme      reads the packed codes directly

Kernels (used when the device and shapes allow, else the reference runs):

    scheme  CPU, decode (<= native.MAX_ROWS rows)   CPU, longer inputs                  CUDA (guarded; not run here)
    w8a16   native.gemv (the kit's C kernel)        native.dequantize + F.linear        reference
    w4a16   native.gemv                             native.dequantize + F.linear        aten._weight_int4pack_mm
    w8a8    native.int8_int8 (per-token int8 acts)  torch._int_mm                       torch._int_mm (rows > 16)
    w2a16   native.gemv                             native.dequantize + F.linear        reference
    fp8     -                                       -                                   torch._scaled_mm

``native`` is the kit's own C (``gemv.c``, compiled on first use; see ``native.py``). Where it cannot be
built, PyTorch's kernels serve every length: aten._weight_int8pack_mm (w8a16, bf16 activations),
aten._weight_int4pack_mm_for_cpu (w4a16, on its own tiled copy of the codes) and the reference (w2a16).

PyTorch's weight-only kernels run in bf16 (an fp32 activation is rounded to bf16, then the output cast
back); the kit's kernels round activations to int16 per group instead (``gemv.c``).
The int4 CPU kernel wants its own tiled nibble order; it is made once (``layout = "cpu_int4"``) and
the documented plain packing is rebuilt from it, exactly, whenever the weights are saved.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from . import formats, native


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

_USE_KERNELS = [True]


@contextlib.contextmanager
def reference_only():
    """Inside this block every QuantLinear runs the plain dequantize-then-matmul path."""
    _USE_KERNELS.append(False)
    try:
        yield
    finally:
        _USE_KERNELS.pop()


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
        self.layout = "plain"     # "cpu_int4": qweight holds the int4 CPU kernel's tiling (same shape)
        self._kernel_scales = None  # cached kernel-side scales (small), rebuilt when needed

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
        self.layout, self._kernel_scales = "plain", None

    # ------------------------------------------------------------------ reference path
    def codes(self) -> torch.Tensor:
        """(N, K) codes in plain order (int8 q, uint8 u, or fp8 values)."""
        if self.bits == 8:
            return self.qweight
        return formats.unpack(self.plain_qweight(), self.bits)

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

    # ------------------------------------------------------------------ kernels
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self._kernel_for(x) if _USE_KERNELS[-1] else None
        return self.reference(x) if kernel is None else kernel(x)

    def _kernel_for(self, x: torch.Tensor):
        on_cpu, on_cuda = x.device.type == "cpu", x.device.type == "cuda"
        own = on_cpu and native.active() and (self.bits == 8 or self.group_size <= native.MAX_GROUP)
        if own and self.scheme in ("w8a16", "w4a16", "w2a16") and native.usable(x, self.bias):
            return self._streaming
        if own and self.scheme in ("w8a16", "w4a16", "w2a16") and x.dtype in (torch.float32, torch.bfloat16):
            return self._dequantized   # longer inputs; the codes stay in the plain layout the kit reads
        if self.scheme == "w8a16" and on_cpu:
            return self._int8_weight_only
        if self.scheme == "w4a16" and (on_cpu or on_cuda) and self.group_size in (32, 64, 128, 256):
            return self._int4_cpu if on_cpu else self._int4_cuda
        if self.scheme == "w8a8" and (on_cpu or on_cuda):
            return self._int8_int8
        if self.scheme == "fp8" and on_cuda:
            return self._fp8_cuda
        return None

    def _streaming(self, x):
        """Decode-sized rows: the kit's own kernels (``native.py``) read the plain packed codes once."""
        if self.layout != "plain":
            self.to_plain_layout()
        rows = x.reshape(-1, self.in_features)
        y = native.gemv(rows, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                        bias=self.bias, out_dtype=x.dtype)                               # (M, N), bias added
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def _dequantized(self, x):
        """Longer inputs (a prompt): the kit's C dequantizer writes the weight in x's dtype, then one GEMM."""
        if self.layout != "plain":
            self.to_plain_layout()
        weight = native.dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def _int8_weight_only(self, x):
        if self._kernel_scales is None:
            self._kernel_scales = self.scales[:, 0].to(torch.bfloat16)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)                       # (M, K)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.qweight, self._kernel_scales)  # (M, N) bf16
        return self._finish(y, x)

    def _int4_scales_and_zeros(self) -> torch.Tensor:
        """(G, N, 2) bf16 for tinygemm-style kernels, which compute w = (u - 8) * s + m."""
        offset = 8.0 if self.zeros is None else self.zeros.float()
        shift = (8.0 - offset) * self.scales                                            # (N, G)
        return torch.stack([self.scales, shift], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    def _int4_cpu(self, x):
        if self.layout == "plain":
            self.to_cpu_layout()
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.qweight, self.group_size, self._kernel_scales)
        return self._finish(y, x)

    def to_cpu_layout(self) -> None:
        """Re-tile the packed int4 codes for the CPU kernel, in place (same bytes, same shape)."""
        if self.layout == "cpu_int4":
            return
        codes = formats.unpack(self.qweight, 4).to(torch.int32)                          # (N, K)
        with torch.inference_mode(False), torch.no_grad():
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        self.layout, self._kernel_scales = "cpu_int4", self._int4_scales_and_zeros()

    def to_plain_layout(self) -> None:
        """Undo ``to_cpu_layout``, in place."""
        if self.layout != "plain":
            self.qweight, self.layout, self._kernel_scales = self.plain_qweight(), "plain", None

    def plain_qweight(self) -> torch.Tensor:
        """The packed codes in the documented plain order, whatever the in-memory layout."""
        if self.layout == "plain":
            return self.qweight
        return formats.pack(cpu_int4_codes(self.qweight, self.out_features, self.in_features), 4)

    def _int4_cuda(self, x):  # pragma: no cover - needs a GPU
        if self._kernel_scales is None:
            self._cuda_packed = torch.ops.aten._convert_weight_to_int4pack(self.qweight, 8)
            self._kernel_scales = self._int4_scales_and_zeros()
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(rows, self._cuda_packed, self.group_size, self._kernel_scales)
        return self._finish(y, x)

    def _int8_int8(self, x):
        rows = x.reshape(-1, self.in_features)
        xq, xs = formats.quantize_activations_int8(rows)                                 # (M, K) int8, (M, 1)
        M = xq.shape[0]
        if x.device.type == "cpu" and M <= native.MAX_ROWS and native.active():         # decode: the kit's kernel
            return self._finish(native.int8_int8(xq, xs, self.qweight, self.scales), x)
        if x.device.type == "cuda" and M <= 16:  # pragma: no cover - cuBLAS int8 wants more than 16 rows
            xq = torch.cat([xq, xq.new_zeros(17 - M, xq.shape[1])])
        acc = torch._int_mm(xq, self.qweight.t())[:M]                                   # (M, N) int32
        return self._finish(acc.float() * xs * self.scales.t(), x)

    def _fp8_cuda(self, x):  # pragma: no cover - needs a GPU
        rows = x.reshape(-1, self.in_features)
        xq, xs = formats.quantize_fp8(rows)                                               # (M, K) fp8, (M, 1)
        y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scales.t().contiguous(),
                             out_dtype=torch.bfloat16)
        return self._finish(y.float(), x)

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
        if self._kernel_scales is not None:  # cached on the old device / dtype: rebuild
            self._kernel_scales = self._int4_scales_and_zeros() if self.layout == "cpu_int4" else None
        return self

    # ------------------------------------------------------------------ saving
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "plain":
            destination[prefix + "qweight"] = self.plain_qweight()


_CPU_INT4_ORDER: dict[tuple[int, int], torch.Tensor] = {}


def cpu_int4_codes(tiled: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """Undo the CPU int4 kernel's tiling: (N, K/2) tiled bytes -> (N, K) uint8 codes in plain order.

    The tiling is a fixed permutation of nibbles for a given (N, K). It is found once by tiling the
    digits of each position's own index (4 bits at a time) and reading back where each digit went.
    """
    order = _CPU_INT4_ORDER.get((N, K))
    if order is None:
        index = torch.arange(N * K, dtype=torch.int64).view(N, K)
        source = torch.zeros(N * K, dtype=torch.int64)
        for digit in range(math.ceil(math.log2(max(N * K, 2)) / 4)):
            tiled_digit = torch.ops.aten._convert_weight_to_int4pack_for_cpu(((index >> (4 * digit)) & 15).int(), 1)
            source |= _nibbles(tiled_digit).long() << (4 * digit)
        order = _CPU_INT4_ORDER[(N, K)] = source                   # nibble slot -> plain position n*K + k
    codes = torch.empty(N * K, dtype=torch.uint8)
    codes[order] = _nibbles(tiled)
    return codes.view(N, K)


def _nibbles(tiled: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N*K,) nibbles, low nibble of each byte first."""
    return torch.stack([tiled & 15, tiled >> 4], dim=-1).reshape(-1)

"""The kernel table: which code computes a quantized (or streaming) linear layer's ``y = x W^T + b``.

A layer's ``forward`` is one line, ``kernels.run(self, x)``: the first entry of ``KERNELS`` whose
``applies(layer, x)`` is true computes it. Every entry must agree with the layer's ``reference``
(dequantize, then matmul); tests/test_quant.py runs each entry available on the machine against it.
The reference is the last entry and always applies.

    name               layer                 when                                    how
    native_gemv        w8a16, w4a16, w2a16   CPU, decode rows (<= native.MAX_ROWS)    the kit's C kernel reads the packed codes
    native_dequantize  w8a16, w4a16, w2a16   CPU, longer fp32 / bf16 inputs           the kit's C dequantizer, then one F.linear
    native_int8_int8   w8a8                  CPU, decode rows                        native.int8_int8 on per-token int8 inputs
    native_w4a8        w4a8                  CPU, decode rows                        native.int8_int4: x to int8 per 32 inputs, int4 codes
    native_w4a8_gemm   w4a8                  CPU, longer fp32 / bf16 inputs          x rounded per block and the weight by the C, one GEMM
    native_linear      StreamingLinear       CPU, decode rows, no gradient           native.linear on the fp32 / bf16 weight
    int8_weight_only   w8a16                 CPU                                     aten._weight_int8pack_mm (in bf16)
    int4_cpu           w4a16, group 32-256   CPU                                     aten._weight_int4pack_mm_for_cpu (in bf16)
    int4_cuda          w4a16, group 32-256   CUDA                                    aten._weight_int4pack_mm (in bf16)
    int_mm             w8a8                  CPU, CUDA                               torch._int_mm on per-token int8 inputs
    scaled_mm_fp8      fp8                   CUDA                                    torch._scaled_mm on e4m3 inputs
    reference          every layer           always                                  layer.reference(x)

``native`` is the kit's own C (``gemv.c``; see ``native.py``): it rounds activations to int16 per group,
PyTorch's weight-only kernels round them to bf16. Where the C cannot be built, PyTorch's kernels serve
every length. The switches are filters on this table: ``native.off()`` and ``ERNIE_LAB_NATIVE=0`` turn
the native entries off (they ask ``native.active()``), ``reference_only()`` keeps only the reference,
``only(*names)`` any few entries.

A backend that wants its own copy of the codes (the int4 kernels tile them) builds it with ``cached``:
once per layer, rebuilt when the layer's codes, scales or zero points change (a move, new weights). The
layer itself always holds the documented plain packing.

``torch.compile(model, fullgraph=True)`` traces this table like any Python: the choice is made once while
tracing (guarded on the device, dtype and shape), and the chosen kernel becomes nodes of the graph. The
kit's C kernels enter it as the custom operators of ``ops.py`` (a ctypes call cannot be traced); PyTorch's
kernels (``_weight_int4pack_mm``, ``_int_mm``, ``_scaled_mm``) are operators already, so the CUDA entries
also run inside CUDA graphs (``mode="reduce-overhead"``).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import formats, native, ops

WEIGHT_ONLY = ("w8a16", "w4a16", "w2a16")
FLOATS = (torch.float32, torch.bfloat16)   # what the C reads


@dataclass(frozen=True)
class Kernel:
    name: str
    applies: Callable[[nn.Module, torch.Tensor], bool]    # (layer, x) -> can this kernel compute it?
    run: Callable[[nn.Module, torch.Tensor], torch.Tensor]   # (layer, x (..., K)) -> y (..., N)
    prime: Callable[[nn.Module], object] | None = None       # builds the kernel's own copy of the codes (cached)


def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` by the first kernel of the table that applies."""
    return choose(layer, x).run(layer, x)


def prime(layer: nn.Module, x: torch.Tensor) -> None:
    """Build (or refresh) the copy of the codes that the kernel chosen for ``x`` keeps, outside any graph, so a
    compiled graph reads it as an input (``cached``) instead of rebuilding it at every call."""
    kernel = choose(layer, x)
    if kernel.prime is not None:
        kernel.prime(layer)


def bound(layer: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The kernel ``run(layer, x)`` would pick, with the layer's tensors bound in: a function of (M, K) rows in
    x's dtype -> (M, N), the very call ``run`` makes, minus the choosing (a few us of Python per call). Only for
    the C's per-token kernels (``PER_TOKEN``) on fp32 / bf16 rows, else None. It holds the tensors the layer has
    now and the switches as they are: the caller binds again whenever either may have changed."""
    kernel = choose(layer, x).name
    if kernel not in PER_TOKEN or x.dtype not in FLOATS:
        return None
    operator, arguments = PER_TOKEN[kernel]
    call, fixed = c_kernel(operator), arguments(layer, x.dtype)
    return lambda rows: call(rows, *fixed)


def choose(layer: nn.Module, x: torch.Tensor) -> Kernel:
    allowed = _ALLOWED[-1]
    return next(k for k in KERNELS if (allowed is None or k.name in allowed) and k.applies(layer, x))


_ALLOWED: list[frozenset | None] = [None]   # the innermost filter; None lets every kernel through


@contextlib.contextmanager
def only(*names: str):
    """Inside this block only the named kernels (and the reference) run."""
    _ALLOWED.append(frozenset(names) | {"reference"})
    try:
        yield
    finally:
        _ALLOWED.pop()


def reference_only():
    """Inside this block every layer runs its plain reference (dequantize, then matmul)."""
    return only()


# ------------------------------------------------------------------ when each kernel applies
def _scheme(layer) -> str | None:
    """A QuantLinear's scheme (a plain attribute); None for a full-precision linear. Read from the instance's
    ``__dict__``: ``getattr(layer, "scheme", None)`` would make nn.Module raise and catch an AttributeError for
    every float layer, about 1 us each time, several times per choice and per layer and token in eager decode."""
    return vars(layer).get("scheme")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _kit_reads_codes(layer, x) -> bool:
    """CPU, the kit's kernels on, a weight-only scheme and groups the C sums exactly in int32."""
    return (x.device.type == "cpu" and _scheme(layer) in WEIGHT_ONLY and native.active()
            and (layer.bits == 8 or layer.group_size <= native.MAX_GROUP))


def _int4_group(layer) -> bool:
    return _scheme(layer) == "w4a16" and layer.group_size in (32, 64, 128, 256)


# ------------------------------------------------------------------ the kit's C kernels (native.py)
def c_kernel(name: str):
    """The kit's C kernel ``name``: its ``ernie_lab::`` operator (quant/ops.py) while torch.compile traces, and
    in eager mode too when the operator is registered from C++ (ops.cpp: about 5 us a call from Python); else
    the ctypes function itself in eager mode (about 8 us; a Python-defined operator would add 11 us more)."""
    if torch.compiler.is_compiling() or (name in ops.HOT and ops.IN_CPP):
        return getattr(ops, name)
    return getattr(native, name)


# The C's three per-token kernels: the operator each calls and its arguments after the rows, for ``layer`` and
# the rows' dtype. ``_per_token`` runs one on x; ``bound`` fixes the arguments once (moe.py's one-token experts).
def _gemv_arguments(layer, dtype):
    return layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, layer.bias, dtype


def _w4a8_arguments(layer, dtype):
    return layer.qweight, layer.scales, layer.zeros, layer.group_size, layer.bias, dtype


def _linear_arguments(layer, dtype):
    return layer.weight, layer.bias, dtype


PER_TOKEN = {"native_gemv": ("gemv", _gemv_arguments), "native_w4a8": ("int8_int4", _w4a8_arguments),
             "native_linear": ("linear", _linear_arguments)}


def _per_token(kernel: str, layer, x):
    operator, arguments = PER_TOKEN[kernel]
    y = c_kernel(operator)(x.reshape(-1, layer.in_features), *arguments(layer, x.dtype))   # (M, K) -> (M, N)
    return y.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)                       # (..., N)


def _native_gemv(layer, x):
    """Decode-sized rows: the C reads the plain packed codes once, adds the bias."""
    return _per_token("native_gemv", layer, x)


# A prompt's dequantized weight lives only until its GEMM returns. Without a gradient to keep it for, eager mode
# writes it into one reused buffer per thread and dtype: a fresh 6 MB tensor per layer pays its page faults
# again each time (about 55 of the 0.3B's 1100 ms over 512 tokens). Weights above SCRATCH_LIMIT elements
# (an LM head run over every position) get their own tensor, so the buffer stays small.
SCRATCH_LIMIT = 1 << 24
_scratch = threading.local()


def _float_weight(layer, dtype: torch.dtype) -> torch.Tensor:
    """The layer's (N, K) weight in ``dtype`` (fp32 or bf16), written by the C dequantizer."""
    args = (layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, dtype)
    numel = layer.out_features * layer.in_features
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or numel > SCRATCH_LIMIT:
        return c_kernel("dequantize")(*args)
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, torch.is_inference_mode_enabled())
    if key not in buffers or buffers[key].numel() < numel:
        buffers[key] = torch.empty(numel, dtype=dtype)
    return native.dequantize(*args, out=buffers[key])


def _native_dequantize(layer, x):
    """Longer inputs (a prompt): the C writes the weight in x's dtype, then one GEMM."""
    weight = _float_weight(layer, x.dtype)
    return F.linear(x, weight, None if layer.bias is None else layer.bias.to(x.dtype))


def _native_int8_int8(layer, x):
    xq, xs = formats.quantize_activations_int8(x.reshape(-1, layer.in_features))          # (M, K) int8, (M, 1)
    return layer._finish(c_kernel("int8_int8")(xq, xs.detach(), layer.qweight, layer.scales), x)   # the C has no gradient


def _native_w4a8(layer, x):
    """Decode-sized rows: the C rounds x to int8 per block of 32 and reads the int4 codes once."""
    return _per_token("native_w4a8", layer, x)


def _native_w4a8_gemm(layer, x):
    """Longer inputs: the reference's arithmetic in x's dtype (fp32 or bf16): the rows rounded per block by the
    C (one pass), times the weight written by the C dequantizer, one GEMM."""
    dtype = x.dtype if x.dtype in FLOATS else torch.float32
    if torch.is_grad_enabled() and x.requires_grad:   # PyTorch's rounding: its ops carry the gradient
        return layer.blocks_times(x, _float_weight(layer, dtype))
    rounded = c_kernel("round_blocks")(x.reshape(-1, layer.in_features), dtype)          # (M, K), one C pass
    return layer.blocks_times(x, _float_weight(layer, dtype), rounded)


def _native_linear(layer, x):
    """Decode-sized rows: the C reads the fp32 / bf16 weight once."""
    return _per_token("native_linear", layer, x)


# ------------------------------------------------------------------ PyTorch's packed kernels
def _int8_scales(layer):
    return cached(layer, "int8_weight_only", lambda: layer.scales[:, 0].to(torch.bfloat16))   # (N,)


def _int8_weight_only(layer, x):
    rows = x.reshape(-1, layer.in_features).to(torch.bfloat16)                             # (M, K)
    return layer._finish(torch.ops.aten._weight_int8pack_mm(rows, layer.qweight, _int8_scales(layer)), x)


def _int4_scales_and_zeros(layer) -> torch.Tensor:
    """(G, N, 2) bf16 for tinygemm-style kernels, which compute w = (u - 8) * s + m."""
    offset = 8.0 if layer.zeros is None else layer.zeros.float()
    shift = (8.0 - offset) * layer.scales                                                  # (N, G)
    return torch.stack([layer.scales, shift], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def _int4_cpu_copy(layer):
    def tile():
        codes = formats.unpack(layer.qweight, 4).to(torch.int32)                            # (N, K)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), _int4_scales_and_zeros(layer)
    return cached(layer, "int4_cpu", tile)


def _int4_cpu(layer, x):
    """The CPU int4 kernel wants its own tiled nibble order: a copy of the codes, made once."""
    tiled, scales_and_zeros = _int4_cpu_copy(layer)
    rows = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, tiled, layer.group_size, scales_and_zeros)
    return layer._finish(y, x)


def _int4_cuda_copy(layer):  # pragma: no cover - needs a GPU
    def tile():
        return torch.ops.aten._convert_weight_to_int4pack(layer.qweight, 8), _int4_scales_and_zeros(layer)
    return cached(layer, "int4_cuda", tile)


def _int4_cuda(layer, x):  # pragma: no cover - needs a GPU
    tiled, scales_and_zeros = _int4_cuda_copy(layer)
    rows = x.reshape(-1, layer.in_features).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm(rows, tiled, layer.group_size, scales_and_zeros)
    return layer._finish(y, x)


def _int_mm(layer, x):
    rows = x.reshape(-1, layer.in_features)
    xq, xs = formats.quantize_activations_int8(rows)                                       # (M, K) int8, (M, 1)
    M = xq.shape[0]
    if x.device.type == "cuda" and M <= 16:  # pragma: no cover - cuBLAS int8 wants more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(17 - M, xq.shape[1])])
    acc = torch._int_mm(xq, layer.qweight.t())[:M]                                          # (M, N) int32
    return layer._finish(acc.float() * xs * layer.scales.t(), x)


def _scaled_mm_fp8(layer, x):  # pragma: no cover - needs a GPU
    rows = x.reshape(-1, layer.in_features)
    xq, xs = formats.quantize_fp8(rows)                                                     # (M, K) fp8, (M, 1)
    y = torch._scaled_mm(xq, layer.qweight.t(), scale_a=xs, scale_b=layer.scales.t().contiguous(),
                         out_dtype=torch.bfloat16)
    return layer._finish(y.float(), x)


KERNELS: list[Kernel] = [
    Kernel("native_gemv", lambda layer, x: _kit_reads_codes(layer, x) and native.usable(x, layer.bias), _native_gemv),
    Kernel("native_dequantize", lambda layer, x: _kit_reads_codes(layer, x) and x.dtype in FLOATS, _native_dequantize),
    Kernel("native_int8_int8", lambda layer, x: (_scheme(layer) == "w8a8" and x.device.type == "cpu"
                                                 and _rows(x) <= native.MAX_ROWS and native.active()), _native_int8_int8),
    Kernel("native_w4a8", lambda layer, x: _scheme(layer) == "w4a8" and native.usable(x, layer.bias), _native_w4a8),
    Kernel("native_w4a8_gemm", lambda layer, x: (_scheme(layer) == "w4a8" and x.device.type == "cpu"
                                                 and native.active()), _native_w4a8_gemm),
    Kernel("native_linear", lambda layer, x: (isinstance(layer, nn.Linear) and layer.weight.dtype in FLOATS
                                              and native.usable(x, layer.weight, layer.bias)), _native_linear),
    Kernel("int8_weight_only", lambda layer, x: _scheme(layer) == "w8a16" and x.device.type == "cpu", _int8_weight_only,
           _int8_scales),
    Kernel("int4_cpu", lambda layer, x: _int4_group(layer) and x.device.type == "cpu", _int4_cpu, _int4_cpu_copy),
    Kernel("int4_cuda", lambda layer, x: _int4_group(layer) and x.device.type == "cuda", _int4_cuda, _int4_cuda_copy),
    Kernel("int_mm", lambda layer, x: _scheme(layer) == "w8a8" and x.device.type in ("cpu", "cuda"), _int_mm),
    Kernel("scaled_mm_fp8", lambda layer, x: _scheme(layer) == "fp8" and x.device.type == "cuda", _scaled_mm_fp8),
    Kernel("reference", lambda layer, x: True, lambda layer, x: layer.reference(x)),
]


# ------------------------------------------------------------------ a backend's own copy of the codes
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # layer -> the sources its kernel_copy was built from


def cached(layer: nn.Module, name: str, build: Callable[[], object]):
    """``build()`` once for this layer (one kernel's copy per layer); again when its qweight, scales or zeros
    are other tensors (moved, cast, newly quantized) or were written in place (``load_state_dict``).

    The copy lives on the layer (``layer.kernel_copy = (name, copy)``, a plain attribute: not a buffer, so not
    in the state dict); ``_CACHE`` records what it was built from. A compiled graph cannot check version
    counters; it reads that attribute as one of its inputs, which ``prime`` refreshes outside the graph before
    every compiled generate. Were a copy built inside the graph, it would be rebuilt at every call (a whole
    repacking of the codes per token), and inductor's lowering of the CPU int4 kernel fails on scales made in
    the graph. Only with no primed copy is it built there."""
    kept = getattr(layer, "kernel_copy", None)
    if torch.compiler.is_compiling():
        return kept[1] if kept is not None and kept[0] == name else build()
    sources = tuple(None if t is None else (weakref.ref(t), None if t.is_inference() else t._version)
                    for t in (layer.qweight, layer.scales, layer.zeros))
    built_from = _CACHE.get(layer)
    if kept is None or kept[0] != name or built_from is None or not _same(built_from, sources):
        with torch.inference_mode(False), torch.no_grad():
            kept = layer.kernel_copy = (name, build())
        _CACHE[layer] = sources
    return kept[1]


def _same(old, new) -> bool:
    """The same tensors (alive, identical objects) at the same version counters."""
    return all((a is None and b is None) or (a is not None and b is not None and a[0]() is not None
                                             and a[0]() is b[0]() and a[1] == b[1]) for a, b in zip(old, new))

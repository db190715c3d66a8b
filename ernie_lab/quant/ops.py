"""The kit's C kernels as PyTorch operators: ``torch.ops.ernie_lab.gemv`` and friends.

``native.py`` calls ``gemv.c`` through ctypes: it hands the C raw addresses (``tensor.data_ptr()``) and
the C writes into a tensor it was given. ``torch.compile`` cannot follow that: while it traces, tensors are
*fake* (a shape, a dtype, no memory), so there is no address to pass, and a ctypes call is opaque Python
it would have to break the graph around. A custom operator is the boundary that fixes both:

    real kernel   the ctypes call, run on real tensors (eager, and inside the compiled graph at run time)
    fake kernel   only the output's shape and dtype, which is all the tracer needs to go on

so a compiled model keeps one graph with ``ernie_lab::gemv`` as a single node in it (called directly,
the ctypes kernel makes ``fullgraph=True`` fail with a graph break at the ctypes call). An operator defined
in Python costs about 11 us of dispatch per call on top of the ctypes call (measured: 24.6 against 12.0 us
for a 64x64 int4 layer, one thread), so the three operators a decode step calls per layer (``linear``,
``gemv``, ``int8_int4``) are registered from C++ where the machine builds ``ops.cpp`` (``cpp_ops.py``), the
Python definitions below standing in where it does not. The kernel table (``kernels.c_kernel``) calls the
operator while compiling, and in eager mode too for those three when they come from C++; else the ctypes
function directly. Each operator is
functional (``mutates_args=()``: it returns a new tensor and writes nothing it was given) and has no
autograd formula: the kernel table sends a layer here only when no gradient is wanted.

    ernie_lab::linear(x, weight, bias, out_dtype)                              native.linear
    ernie_lab::gemv(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)   native.gemv
    ernie_lab::int8_int8(xq, xs, qweight, scales)                              native.int8_int8
    ernie_lab::int8_int4(x, qweight, scales, zeros, group_size, bias, out_dtype)    native.int8_int4
    ernie_lab::dequantize(qweight, scales, zeros, bits, group_size, dtype)     native.dequantize
    ernie_lab::round_blocks(x, dtype)                                          native.round_blocks

``int8_int4`` (W4A8) takes the float rows, not int8 ones as ``int8_int8`` does: the C rounds each block of 32
inputs to int8 itself, which at decode saves the framework ops of rounding in PyTorch (the values are the
same: ``formats.quantize_activations_blocks``).

Shapes: x (M, K) rows; weight (N, K); codes (N, K * bits / 8); scales / zeros (N, K / group); out (M, N),
or (N, K) for ``dequantize``. The C writes fp32 or bf16: any other ``out_dtype`` gives fp32.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from . import cpp_ops, native


def _written(dtype: torch.dtype) -> torch.dtype:
    """The dtype the C writes for a requested ``out_dtype`` (as ``native._run`` decides)."""
    return dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32


# ------------------------------------------------------------------ the three per-token operators
# ernie_lab::linear, ::gemv and ::int8_int4 run once per linear layer and token. They come from C++
# (ops.cpp, built by cpp_ops.py) where that builds, from the Python definitions below otherwise: the same
# names, schemas and kernels (gemv.c), so callers never know which. Either way they are made on first use
# (this module's __getattr__), so importing the kit compiles nothing.
HOT = ("linear", "gemv", "int8_int4")


def _linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """y = x W^T + b on a float weight"""
    return native.linear(x, weight, bias, out_dtype)


def _gemv(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int,
          bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """y = x W^T + b on packed codes"""
    return native.gemv(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)


def _int8_int4(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int,
               bias: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """W4A8: rows rounded to int8 blocks @ int4 codes"""
    return native.int8_int4(x, qweight, scales, zeros, group_size, bias, out_dtype)


# the fake kernels: only the output, (M, N) in the dtype the C writes
def _linear_fake(x, weight, bias, out_dtype):
    return x.new_empty(x.shape[0], weight.shape[0], dtype=_written(out_dtype))


def _gemv_fake(x, qweight, scales, zeros, bits, group_size, bias, out_dtype):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=_written(out_dtype))


def _int8_int4_fake(x, qweight, scales, zeros, group_size, bias, out_dtype):
    return x.new_empty(x.shape[0], qweight.shape[0], dtype=_written(out_dtype))


def _define_hot_operators() -> None:
    global IN_CPP
    IN_CPP = cpp_ops.load()
    for name, python, fake in zip(HOT, (_linear, _gemv, _int8_int4), (_linear_fake, _gemv_fake, _int8_int4_fake)):
        if IN_CPP:
            operator = getattr(torch.ops.ernie_lab, name).default
            torch.library.register_fake(f"ernie_lab::{name}")(fake)
        else:
            operator = torch.library.custom_op(f"ernie_lab::{name}", python, mutates_args=())
            operator.register_fake(fake)
        globals()[name] = operator


_define_lock = threading.Lock()


def __getattr__(name: str):
    if name in HOT or name == "IN_CPP":
        with _define_lock:
            if name not in globals():
                _define_hot_operators()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------ W8A8: int8 rows @ int8 codes
@torch.library.custom_op("ernie_lab::int8_int8", mutates_args=())
def int8_int8(xq: Tensor, xs: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    return native.int8_int8(xq, xs, qweight, scales)


@int8_int8.register_fake
def _(xq, xs, qweight, scales):
    return xq.new_empty(xq.shape[0], qweight.shape[0], dtype=torch.float32)               # (M, N)


# ------------------------------------------------------------------ codes -> the float weight
@torch.library.custom_op("ernie_lab::dequantize", mutates_args=())
def dequantize(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int,
               dtype: torch.dtype) -> Tensor:
    return native.dequantize(qweight, scales, zeros, bits, group_size, dtype)


@dequantize.register_fake
def _(qweight, scales, zeros, bits, group_size, dtype):
    N, K = qweight.shape[0], qweight.shape[1] * 8 // bits
    return qweight.new_empty(N, K, dtype=dtype)                                           # (N, K)


# ------------------------------------------------------------------ a prompt's W4A8 rows, rounded per block
@torch.library.custom_op("ernie_lab::round_blocks", mutates_args=())
def round_blocks(x: Tensor, dtype: torch.dtype) -> Tensor:
    return native.round_blocks(x, dtype)


@round_blocks.register_fake
def _(x, dtype):
    return x.new_empty(x.shape, dtype=dtype)                                              # (M, K)

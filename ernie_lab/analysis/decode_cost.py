"""What one decode token costs, and the least it could cost.

A batch-1 decode step reads every weight once to make one token, so no implementation beats

    bound (s / token) = bytes one step reads / streaming read bandwidth of the machine

(the KV cache adds its rows too, negligible at short contexts). Eager PyTorch pays more: every op is
dispatched from Python one at a time, a few microseconds each, some hundred ops per token whatever the
widths. A profile of a few decode steps shows where the time goes:

    reading weights (matmuls)     the linear layers (and the kit's quantized kernels when they run as ops)
    attention                     attention over the cached keys and values (a decode step's one query on a
                                  CPU is several small ops, attention.attend_one_query: profiled as one range)
    norms / rope / small ops      every other op: RMSNorm, RoPE, SwiGLU's product, residual adds, cache writes
    Python and dispatch overhead  the step's wall time minus the time spent inside ops

Only top-level ops are counted (an op's children belong to it), so the four parts add up to the wall
time. The profiler itself adds a little to every op: read the parts as shares, and time decoding
without a profiler for the speed (``benchmarks/fast_decode.py``, notebook 07). In eager mode the kit's
C kernels (``quant/native.py``) are called through ctypes, which the profiler does not see: for a model
quantized with them, their time lands in the overhead part. Profile float models, or read it that way.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from ..errors import InputError, require_int
from ..model import attention
from ..model.kv_cache import KVCache
from ..quant import decode_bytes

PARTS = ("reading weights (matmuls)", "attention", "norms / rope / small ops", "Python and dispatch overhead")
MATMUL_OPS = ("aten::linear", "aten::mm", "aten::addmm", "aten::matmul", "aten::bmm", "aten::_weight_int")
ATTENTION_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::softmax", "attention")


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Bytes per second of summing an fp32 tensor of ``mib`` MiB, far larger than the caches (best of ``repeats``)."""
    require_int("mib", mib, 1)
    require_int("repeats", repeats, 1)
    data = torch.ones(mib * 2**20 // 4)
    data.sum()                                                     # warm-up: pages touched, threads up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        seconds.append(time.perf_counter() - start)
    return data.numel() * data.element_size() / min(seconds)


def step_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every linear layer, quantized ones as stored (codes, scales,
    zeros), of an MoE block only the k of E experts a token visits (``quant.decode_bytes``). The embedding
    table is not read, one row of it is; a tied head is counted once, as the head."""
    if not isinstance(model, nn.Module):
        raise InputError(f"step_bytes wants a model (torch.nn.Module), got {type(model).__name__}.")
    return decode_bytes(model)


def bound_ms(model: nn.Module, bandwidth: float) -> float:
    """The bandwidth bound in milliseconds per token: step_bytes / bandwidth (bytes per second)."""
    if isinstance(bandwidth, bool) or not isinstance(bandwidth, (int, float)) or not bandwidth > 0:
        raise InputError(f"bandwidth must be a positive number of bytes per second (read_bandwidth()), got {bandwidth!r}.")
    return 1000 * step_bytes(model) / bandwidth


def part_of(op_name: str) -> str:
    """Which of PARTS a top-level profiler event belongs to (the overhead is no op: it is what is left)."""
    if op_name.startswith(MATMUL_OPS) or op_name.startswith("ernie_lab::"):
        return PARTS[0]
    if op_name.startswith(ATTENTION_OPS):
        return PARTS[1]
    return PARTS[2]


@contextlib.contextmanager
def attention_as_one_range():
    """While profiling, the ops of ``attention.attend_one_query`` (scores, mask, softmax, values) run inside one
    profiler range named "attention", so the profile counts them as attention and not as matmuls or small ops."""
    plain = attention.attend_one_query

    def labelled(*args):
        with torch.profiler.record_function("attention"):
            return plain(*args)

    attention.attend_one_query = labelled
    try:
        yield
    finally:
        attention.attend_one_query = plain


@torch.inference_mode()
def profile_decode(model: nn.Module, input_ids: torch.Tensor, steps: int = 8) -> dict[str, float]:
    """Milliseconds per token of each of PARTS over ``steps`` greedy eager decode steps after the prompt
    ``input_ids`` (1, T); also "wall" (their sum) and "ops per token" (top-level ops)."""
    steps = require_int("steps", steps, 1)
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise InputError(f"profile_decode wants an ernie-lab model, got {type(model).__name__}.")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 \
            or input_ids.shape[1] == 0 or input_ids.dtype != torch.long:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise InputError(f"input_ids must be a (1, T) LongTensor prompt with T >= 1, got {shape}; "
                         "profile_decode profiles batch-1 decoding.")
    T = input_ids.shape[1]
    cache = KVCache.for_model(model, 1, T + steps + 1)
    logits = model(input_ids, cache=cache).logits[:, -1]          # prefill, not profiled
    position = torch.tensor([[T]])                                 # (1, 1)

    def step(logits, position):
        token = logits.argmax(-1, keepdim=True)                    # (1, 1) greedy
        return model(token, cache=cache, position_ids=position).logits[:, -1], position + 1

    logits, position = step(logits, position)                     # warm-up step
    with attention_as_one_range(), profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            logits, position = step(logits, position)
        wall_us = (time.perf_counter() - start) * 1e6
    per_token = dict.fromkeys(PARTS, 0.0)
    top_level = [e for e in prof.events() if e.cpu_parent is None]
    for event in top_level:
        per_token[part_of(event.name)] += event.cpu_time_total / steps / 1000
    per_token[PARTS[3]] = max(0.0, wall_us / steps / 1000 - sum(per_token.values()))
    per_token["wall"] = sum(per_token[p] for p in PARTS)
    per_token["ops per token"] = len(top_level) / steps
    return per_token


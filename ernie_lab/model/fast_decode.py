"""A compiled decode step: the one-token forward as a single graph (the recipe of pytorch-labs/gpt-fast).

    eager:     every step runs ~20 small Python-dispatched ops per layer, most of its time is overhead
    compiled:  torch.compile(decode_step, fullgraph=True) fuses them into one graph, traced once

A graph can only be reused if nothing in it changes between steps. So the step takes a
:class:`~.kv_cache.StaticKVCache` (fixed buffers, the write slot a tensor, one mask over the whole
buffer) and skips every check: ``generate`` validates its inputs before the loop, and the step runs
only ``model.run_layers`` -- the very code the eager forward runs. Eager stays the readable default;
``generate(..., compile=True)`` is the option a student can ignore.

The compile time is paid once per model and printed once; inductor's on-disk cache keeps later
processes warm. MoE models (text MoE and VL) are refused: their expert dispatch has data-dependent
shapes (``bincount(...).tolist()``), which a ``fullgraph=True`` trace cannot hold.
"""

from __future__ import annotations

import time
import weakref

import torch

from ..errors import InputError
from .kv_cache import StaticKVCache
from .moe import MoEBlock

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep]" = weakref.WeakKeyDictionary()


def decode_step(model, token: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """token, position_ids (B, 1) -> next-token logits (B, vocab), the new rows written into ``cache``.
    The caller advances the cache afterwards (``cache.advance(1)``), outside the graph."""
    mask = cache.mask(1)                                            # (B, 1, 1, S_max)
    h = model.run_layers(model.embed(token), position_ids, mask, cache)  # (B, 1, hidden)
    return model.lm_head(model.norm(h[:, -1]))                      # (B, vocab)


class CompiledStep:
    """``decode_step`` compiled for one model; reports how long the first (compiling) call took."""

    def __init__(self):
        self.step = torch.compile(decode_step, fullgraph=True)
        self.compile_seconds: float | None = None

    def __call__(self, model, token, position_ids, cache) -> torch.Tensor:
        if self.compile_seconds is not None:
            return self.step(model, token, position_ids, cache)
        start = time.perf_counter()
        logits = self.step(model, token, position_ids, cache)
        self.compile_seconds = time.perf_counter() - start
        print(f"compiled the decode step of {type(model).__name__} in {self.compile_seconds:.1f} s "
              "(once per model; inductor's cache keeps it warm for later runs)")
        return logits


def compiled_step(model) -> CompiledStep:
    """The compiled decode step of ``model`` (compiled on its first call, then reused)."""
    check_compilable(model)
    if model not in _COMPILED:
        _COMPILED[model] = CompiledStep()
    return _COMPILED[model]


def check_compilable(model) -> None:
    """compile=True is for dense text models; an MoE or VL model gets an InputError saying why."""
    if any(isinstance(m, MoEBlock) for m in model.modules()):
        raise InputError(f"compile=True compiles dense text models only; this {type(model).__name__} has MoE layers, "
                         "whose expert dispatch has data-dependent shapes (tokens per expert) that "
                         "torch.compile(fullgraph=True) cannot trace. Use static_cache=True (the same static cache, "
                         "eager) or leave both off.")

"""A compiled decode step: the one-token forward as a single graph (the recipe of pytorch-labs/gpt-fast).

    eager:     every step runs ~20 small Python-dispatched ops per layer, most of its time is overhead
    compiled:  torch.compile(decode_step, fullgraph=True) fuses them into one graph, traced once

A graph can only be reused if nothing in it changes between steps. So the step takes a
:class:`~.kv_cache.StaticKVCache` (fixed buffers, the write slot a tensor, one mask over the whole
buffer) and skips every check: ``generate`` validates its inputs before the loop, and the step runs
only ``model.run_layers`` -- the very code the eager forward runs. Eager stays the readable default;
``generate(..., compile=True)`` is the option a student can ignore.

The compile time is paid once per model and printed once; inductor's on-disk cache keeps later
processes warm. Every ERNIE 4.5 decoder compiles: dense, text MoE and vision-language. The MoE expert
dispatch has data-dependent shapes (tokens per expert), so a compiled graph holds it as one opaque
operator that runs the eager dispatch (``moe.py`` says why this form); the routers stay in the graph.
A VL model decodes text tokens after its prefill (pictures included) has run eagerly: the step sees
no picture, routes in the text expert group (no modality given = group 0), and continues the text
positions past the pictures by the cache's ``position_offset``, as the eager VL forward does.
"""

from __future__ import annotations

import time
import weakref

import torch

from .kv_cache import StaticKVCache
from .moe import register_for_compile

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep]" = weakref.WeakKeyDictionary()


def decode_step(model, token: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """token, position_ids (B, 1) -> next-token logits (B, vocab), the new rows written into ``cache``.
    The caller advances the cache afterwards (``cache.advance(1)``), outside the graph."""
    mask = cache.mask(1)                                            # (B, 1, 1, S_max)
    if cache.position_offset is not None:                           # VL after pictures: (B, 1) shift
        position_ids = position_ids + cache.position_offset
    h = model.run_layers(model.embed(token), position_ids, mask, cache)  # (B, 1, hidden)
    return model.lm_head(model.norm(h[:, -1]))                      # (B, vocab)


class CompiledStep:
    """``decode_step`` compiled for one model; reports how long the first (compiling) call took."""

    def __init__(self):
        self.step = torch.compile(decode_step, fullgraph=True, dynamic=False)  # one model, fixed shapes
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
    """The compiled decode step of ``model`` (compiled on its first call, then reused); its MoE blocks,
    if any, are registered for the expert operator first."""
    register_for_compile(model)
    if model not in _COMPILED:
        _COMPILED[model] = CompiledStep()
    return _COMPILED[model]

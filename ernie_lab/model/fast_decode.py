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

import os
import time
import types
import weakref

import torch

from .kv_cache import StaticKVCache
from .moe import bound_experts, register_for_compile

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledStep]" = weakref.WeakKeyDictionary()
# On CPU inductor writes the code that calls the graph's kernels (its "wrapper") in C++ rather than Python,
# compiled at -O1 apart from the kernels (inductor's cpp_wrapper_build_separate). Measured on the kit's 2-core
# machine, the 0.3B's w4a8 step (int4 head): 9.6-10.8 ms a token with the Python wrapper against 8.8-9.7 with
# the C++ one, in interleaved rounds of one process; it compiles cold (empty inductor cache) in 45 s against 28.
# Wrapper and kernels built together cost 62 s cold, past the 60 s the kit allows itself, for the same speed.
# ERNIE_LAB_CPP_WRAPPER=0 keeps the Python wrapper.
CPP_WRAPPER = os.environ.get("ERNIE_LAB_CPP_WRAPPER", "1") != "0"


def wrapper_options(model) -> dict:
    """inductor's options for ``model``'s step: the C++ wrapper (built apart, at -O1) on CPU, unless switched off."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    return {"cpp_wrapper": True, "cpp_wrapper_build_separate": True} if CPP_WRAPPER and on_cpu else {}


def decode_step(model, token: torch.Tensor, position_ids: torch.Tensor, cache: StaticKVCache) -> torch.Tensor:
    """token, position_ids (B, 1) -> next-token logits (B, vocab), the new rows written into ``cache``.
    The caller advances the cache afterwards (``cache.advance(1)``), outside the graph."""
    mask = cache.mask(1)                                            # (B, 1, 1, S_max)
    if cache.position_offset is not None:                           # VL after pictures: (B, 1) shift
        position_ids = position_ids + cache.position_offset
    h = model.run_layers(model.embed(token), position_ids, mask, cache)  # (B, 1, hidden)
    return model.lm_head(model.norm(h[:, -1]))                      # (B, vocab)


def own_copy(fn):
    """``fn`` with a code object of its own. Dynamo keeps one cache of compiled graphs per code object, at most
    ``torch._dynamo.config.recompile_limit`` (8) of them, and every model compiled from one shared function
    adds one: the ninth model of a process would be refused. A copy per model keeps each model's graph apart."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledStep:
    """``decode_step`` compiled for one model; reports how long the first (compiling) call took."""

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})                                  # inductor's (wrapper_options)
        self.step = torch.compile(own_copy(decode_step), fullgraph=True, dynamic=False,   # one model, fixed shapes
                                  options=self.options)
        self.compile_seconds: float | None = None

    def __call__(self, model, token, position_ids, cache, *, same_as_last_call: bool = False) -> torch.Tensor:
        """``same_as_last_call``: the caller vouches that nothing the graph depends on changed since its last
        call (the same model, cache, shapes and kernel switches: the steps of one ``generate`` after its first).
        Then dynamo checks only the guards that tell its compiled graphs apart, not all of them: at the 0.3B's
        depth checking every guard (one per parameter, module and switch) costs about 1 ms a token; and an MoE
        model's single-token experts reuse the kernels bound to their weights by earlier steps (moe.py)."""
        if same_as_last_call and self.compile_seconds is not None:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True), bound_experts(fresh=False):
                return self.step(model, token, position_ids, cache)
        if self.compile_seconds is not None:
            with bound_experts(fresh=True):
                return self.step(model, token, position_ids, cache)
        start = time.perf_counter()
        with bound_experts(fresh=True):
            logits = self.step(model, token, position_ids, cache)
        self.compile_seconds = time.perf_counter() - start
        print(f"compiled the decode step of {type(model).__name__} in {self.compile_seconds:.1f} s "
              "(once per model; inductor's cache keeps it warm for later runs)")
        return logits


def prime_kernels(model) -> None:
    """Let every layer that keeps a kernel's own copy of its weights (a quantized layer on PyTorch's tiled int4
    kernel) build it now, outside the graph, so the compiled graph reads it as an input rather than rebuilding
    it at every step. A layer says so with a ``prime_kernels`` method (model/ does not import quant/)."""
    for module in model.modules():
        hook = getattr(module, "prime_kernels", None)
        if callable(hook):
            hook()


def compiled_step(model) -> CompiledStep:
    """The compiled decode step of ``model`` (compiled on its first call, then reused); its MoE blocks,
    if any, are registered for the expert operator first."""
    register_for_compile(model)
    if model not in _COMPILED:
        _COMPILED[model] = CompiledStep(wrapper_options(model))
    return _COMPILED[model]

"""A compiled prefill: the prompt's forward into a static KV cache as one graph, for every prompt length.

    eager:     model(prompt, cache)                         the readable forward, with its checks
    compiled:  torch.compile(prefill_step, fullgraph=True)  the same layers, traced once

The decode step (``fast_decode.py``) always sees one token; a prompt has any length T. A graph traced for
T = 7 would be traced again for T = 8, so the prompt length is marked *dynamic*
(``torch._dynamo.mark_dynamic``): inductor writes its kernels for a symbol ``T`` and one graph serves every
prompt of two or more tokens (a one-token prompt is the decode step's shape; it gets a graph of its own).
The cache's buffer length ``S_max`` stays a constant of the graph, as in the decode step.

What the graph holds is the eager code itself: ``model.embed``, ``cache.mask`` (which also records the
real slots), ``model.run_layers`` and the head on the last position. Nothing is checked inside: ``generate``
validates its inputs first, and ``cache.reserve`` makes room outside.

Is it worth it? A prompt's forward is a few large matmuls per layer; compiling removes the Python and
dispatch overhead around them and fuses the elementwise work (norms, rope, SwiGLU), but it cannot make the
matmuls faster. Measured on the 0.3B shape, 512 tokens, 2 busy cores: the matmuls are 55% of the eager
fp32 prefill (37% in bf16, where converting dtypes takes another 13%), the compiled prefill was not clearly
faster (medians of 3: fp32 18.2 -> 13.9 s, bf16 6.3 -> 8.4 s, both within the machine's noise), and it
took about 110 s to compile. So it is an option, ``generate(..., compile_prefill=True)``, off by default
(``compile=True`` compiles the decode step only); ``benchmarks/quant.py`` measures both against llama.cpp.
"""

from __future__ import annotations

import time
import weakref

import torch

from ..errors import InputError
from .decoder import check_input_ids
from .fast_decode import own_copy
from .kv_cache import StaticKVCache
from .moe import MoEBlock

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, CompiledPrefill]" = weakref.WeakKeyDictionary()


def prefill_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache: StaticKVCache) -> torch.Tensor:
    """input_ids, position_ids, attention_mask (B, T) -> logits of the last position (B, vocab); the prompt's
    keys and values are written into ``cache``. The caller advances the cache afterwards (``cache.advance(T)``)."""
    mask = cache.mask(input_ids.shape[1], attention_mask)                # (B, 1, T, S_max)
    h = model.run_layers(model.embed(input_ids), position_ids, mask, cache)  # (B, T, hidden)
    return model.lm_head(model.norm(h[:, -1]))                            # (B, vocab)


class CompiledPrefill:
    """``prefill_step`` compiled for one model, the prompt length dynamic; reports its compile time once."""

    def __init__(self):
        self.step = torch.compile(own_copy(prefill_step), fullgraph=True)  # own_copy: one cache per model
        self.compile_seconds: float | None = None

    def __call__(self, model, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
        check_input_ids(input_ids, model.text_config, cache.length)  # the eager forward's checks, outside the graph
        # fresh copies: a caller's tensor made outside inference mode would otherwise need a graph of its own
        input_ids, position_ids, attention_mask = input_ids.clone(), position_ids.clone(), attention_mask.clone()
        if input_ids.shape[1] > 1:  # one symbol T for every prompt length >= 2 (1 is specialised by dynamo)
            for tensor in (input_ids, position_ids, attention_mask):
                torch._dynamo.mark_dynamic(tensor, 1)
        cache.reserve(input_ids.shape[1])
        if self.compile_seconds is not None:
            return self.step(model, input_ids, position_ids, attention_mask, cache)
        start = time.perf_counter()
        logits = self.step(model, input_ids, position_ids, attention_mask, cache)
        self.compile_seconds = time.perf_counter() - start
        print(f"compiled the prefill of {type(model).__name__} in {self.compile_seconds:.1f} s "
              "(once per model, any prompt length; inductor's cache keeps it warm for later runs)")
        return logits


def compiled_prefill(model) -> CompiledPrefill:
    """The compiled prefill of ``model`` (compiled on its first call, then reused for every prompt length)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledPrefill()
    return _COMPILED[model]


def check_dense(model, model_inputs: dict | None = None):
    """compile_prefill=True is for dense text models; returns ``model``, or an InputError saying why not."""
    if any(isinstance(m, MoEBlock) for m in model.modules()):
        raise InputError(f"compile_prefill=True compiles the prompt of dense text models only; this "
                         f"{type(model).__name__} has MoE layers, whose expert dispatch has data-dependent shapes "
                         "(tokens per expert). Leave compile_prefill off: the eager prefill serves every model.")
    if model_inputs:
        raise InputError(f"compile_prefill=True takes token ids only, not {sorted(model_inputs)}: leave "
                         "compile_prefill off for prompts with extra inputs.")
    return model

"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step.

    prefill:  logits = model(prompt)            -> fills the cache with the prompt's keys/values
    decode:   x_t ~ p(. | x_<t),  logits = model(x_t, cache)   (one new row per layer per step)

Choosing x_t: temperature 0 takes the argmax (greedy); otherwise logits are divided by the
temperature, cut to the top_k most likely tokens and/or the smallest set whose probability reaches
top_p (nucleus sampling), and sampled. Prompts of different lengths are left-padded so that every
row's next token sits in the last column; positions count only real tokens.

Every argument is checked before the model runs. A batch must be *left*-padded: an ``attention_mask``
with zeros after a real token (right padding, or holes) is refused, because the next token of such a
row would follow a pad; a row without a single real token is refused too. Pass ragged prompts as a
list of id lists and they are left-padded here.

``static_cache=True`` decodes with a fixed-shape :class:`~.kv_cache.StaticKVCache`; ``compile=True`` adds
a compiled one-token step on top of it (``fast_decode.py``), ``compile_prefill=True`` a compiled prompt
forward (``fast_prefill.py``). All are options: the plain loop below is the same.
"""

from __future__ import annotations

import inspect
import math

import torch

from ..errors import InputError
from .fast_decode import compiled_step, prime_kernels
from .fast_prefill import check_dense, compiled_prefill
from .kv_cache import KVCache

STATIC_SLOTS_STEP = 64  # a static cache's buffer length is a multiple of this


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int | None = None, eos_token_id: int | list[int] | None = None, streamer=None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, kv_cache_dtype=None, static_cache: bool = False,
             compile: bool = False, compile_prefill: bool = False, **model_inputs) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns (B, T + new) token ids.

    ``input_ids`` is a (B, T) LongTensor (left-padded, with ``attention_mask``) or a list of token-id
    lists of any lengths, which are left-padded here. ``eos_token_id`` None uses the model config's;
    pass ``[]`` to never stop early. Rows that finished are filled with ``pad_token_id``.
    ``streamer`` gets ``put(ids)`` for the prompt and each new token and ``end()`` at the close, like
    transformers' streamers. ``kv_cache_dtype="int8"`` stores the KV cache as int8 with per-(token, head)
    scales (``kv_cache.Int8KVCache``). Extra keyword arguments (e.g. ``pixel_values``) go to the prefill only.
    ``static_cache=True`` uses fixed buffers (``kv_cache.StaticKVCache``); ``compile=True`` also runs each
    one-token step as a graph compiled once with ``torch.compile`` (dense, MoE and VL models; the first call
    compiles and prints how long it took). ``compile_prefill=True`` runs the prompt's forward as one graph
    compiled once for every prompt length (dense text models; off by default: on the 0.3B it was not clearly
    faster and takes minutes to compile, see ``fast_prefill.py``). Greedy tokens are the same either way.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"generate wants an ernie-lab model as its first argument, got {type(model).__name__}.")
    config = model.config.get_text_config()
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    check_token_id("pad_token_id", pad_token_id, config.vocab_size)
    for i in _eos_list(eos_token_id, name="eos_token_id"):
        check_token_id("eos_token_id", i, config.vocab_size)
    check_helpers(streamer, generator)
    check_model_inputs(model, model_inputs)
    for name, value in (("static_cache", static_cache), ("compile", compile), ("compile_prefill", compile_prefill)):
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}.")
    fast_step = compiled_step(model) if compile else None
    fast_prefill = compiled_prefill(check_dense(model, model_inputs)) if compile_prefill else None  # dense only
    if compile or compile_prefill:
        prime_kernels(model)  # kernels' own copies of the codes, made here, enter the graphs as inputs
    input_ids, attention_mask = _as_batch(input_ids, attention_mask, _pad_id(config, pad_token_id))
    B, T = input_ids.shape
    if T + max_new_tokens > config.max_position_embeddings:
        raise InputError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed the context of "
                         f"{config.max_position_embeddings} tokens. Shorten the prompt or ask for fewer tokens.")
    stop_ids = _eos_list(config.eos_token_id if eos_token_id is None else eos_token_id)
    pad_id = _pad_id(config, pad_token_id)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    static = static_cache or compile or compile_prefill
    room = T + max_new_tokens
    if static:  # buffers in steps of 64 slots: prompts of similar length reuse one compiled graph
        room = -(-room // STATIC_SLOTS_STEP) * STATIC_SLOTS_STEP
    cache = KVCache.for_model(model, B, room, kv_cache_dtype=kv_cache_dtype, static=static)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count 0, 1, 2, ...
    padded = not bool(attention_mask.all())
    if fast_prefill is not None:
        logits = fast_prefill(model, input_ids, positions, attention_mask, cache)  # (B, vocab), no checks inside
        cache.advance(T)
    else:
        logits = model(input_ids, attention_mask=attention_mask if padded else None, cache=cache,
                       position_ids=positions, logits_to_keep=1, **model_inputs).logits[:, -1]  # (B, vocab)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    tokens, finished = [input_ids], torch.zeros(B, dtype=torch.bool, device=device)
    stop = torch.tensor(stop_ids, device=device, dtype=torch.long)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        token = pick_next_token(logits, temperature, top_p, top_k, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token[:, None])
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, stop.to(token.dtype))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if fast_step is not None:  # the static cache's own mask holds the padding: no attention_mask to grow
            logits = fast_step(model, token[:, None], next_pos, cache, same_as_last_call=step > 0)  # (B, vocab)
            cache.advance(1)
        else:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = model(token[:, None], attention_mask=attention_mask if padded else None, cache=cache,
                           position_ids=next_pos).logits[:, -1]
        next_pos = next_pos + 1
    if streamer is not None:
        streamer.end()
    return torch.cat(tokens, dim=1)


def pick_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                    top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, vocab) logits -> (B,) token ids: greedy at temperature 0, else filtered sampling."""
    if temperature == 0.0:
        return logits.float().argmax(-1)  # same token; argmax over bf16 is several times slower on CPU
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        logits = _nucleus(logits, top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to at least top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(-1)
    drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def check_sampling(max_new_tokens, temperature, top_p, top_k) -> None:
    """The sampling arguments, each an InputError naming it when it is of the wrong type or range."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0 (0 = greedy, 0.7 a common choice), "
                         f"got {temperature!r}.")
    if not _is_real(top_p) or not 0.0 < top_p <= 1.0:  # NaN fails the comparison too
        raise InputError(f"top_p must be a number in (0, 1] (1 = no nucleus cut), got {top_p!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}.")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_token_id(name: str, value, vocab_size: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise InputError(f"{name} must be a token id in 0 .. {vocab_size - 1} (or None for the config's), "
                         f"got {value!r}.")


def check_model_inputs(model, model_inputs: dict) -> None:
    """Extra keyword arguments must be inputs of the model's forward (``pixel_values`` for a VL model): a
    text model given a processor's picture inputs, or a typo like ``max_length``, is named here."""
    parameters = inspect.signature(model.forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    unknown = sorted(set(model_inputs) - set(parameters))
    if unknown:
        pictures = any("pixel" in k or "grid" in k for k in unknown)
        pictures = " (picture inputs need an ERNIE 4.5 VL model)" if pictures else ""
        raise InputError(f"generate got {unknown}, which are neither generate's arguments (max_new_tokens, temperature, "
                         f"top_p, top_k, eos_token_id, ...) nor inputs of this {type(model).__name__}{pictures}.")


def check_helpers(streamer, generator) -> None:
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise InputError(f"streamer must have put(ids) and end() methods (like transformers' streamers), "
                         f"got {type(streamer).__name__}.")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputError(f"generator must be a torch.Generator or None, got {type(generator).__name__}.")


def _as_batch(input_ids, attention_mask, pad_id: int):
    """Accept a (B, T) tensor or a ragged list of id lists; return left-padded ids and their mask."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            raise InputError(f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}. Use ids[None].")
        if input_ids.dim() != 2 or input_ids.numel() == 0:
            raise InputError(f"input_ids must be a non-empty 2-D (batch, tokens) tensor, got shape "
                             f"{tuple(input_ids.shape)}.")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}. Use .long().")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise InputError(f"attention_mask {shape} must be a tensor of the shape of input_ids "
                             f"{tuple(input_ids.shape)}.")
        mask = attention_mask.long()
        check_left_padded(mask, attention_mask)
        return input_ids.long(), mask
    if isinstance(input_ids, (str, bytes)) or not isinstance(input_ids, (list, tuple)):
        raise InputError(f"input_ids must be a (batch, tokens) LongTensor or a list of token-id lists, got "
                         f"{type(input_ids).__name__}. Encode text with the tokenizer first.")
    if attention_mask is not None:
        raise InputError("attention_mask goes with a tensor input_ids; a list of id lists is padded here, give no mask.")
    if input_ids and all(isinstance(t, int) for t in input_ids):
        raise InputError("input_ids is a flat list of ids; generate takes a batch: wrap it as [ids].")
    rows = [list(r) if isinstance(r, (list, tuple)) else r for r in input_ids]
    if any(not isinstance(r, list) for r in rows):
        raise InputError("input_ids as a list must hold one list of token ids per prompt, e.g. [[1, 2, 3]].")
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token.")
    if any(isinstance(t, bool) or not isinstance(t, int) for r in rows for t in r):
        raise InputError("token ids must be Python ints (encode text with the tokenizer first).")
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def check_left_padded(mask: torch.Tensor, given: torch.Tensor) -> None:
    """Every row of a (B, T) 0/1 mask is 0 ... 0 1 ... 1 with at least one 1, else an InputError naming the row."""
    if ((given != 0) & (given != 1)).any():
        raise InputError("attention_mask must hold only 0 (padding) and 1 (real token).")
    empty = (mask.sum(-1) == 0).nonzero()
    if len(empty):
        raise InputError(f"row {int(empty[0])} of attention_mask has no real token (all zeros): there is nothing "
                         "to continue. Drop that row or give it at least one token.")
    right = (mask[:, 1:] < mask[:, :-1]).any(-1).nonzero()
    if len(right):
        raise InputError(f"row {int(right[0])} of attention_mask has padding after a real token (right padding or "
                         "holes); generation continues after the last column, so pad on the LEFT: pass a list of "
                         "id lists (padded here), or pad with padding_side='left'.")


def _eos_list(eos, name: str = "eos_token_id") -> list[int]:
    if eos is None:
        return []
    if isinstance(eos, int):
        return [eos]
    if not isinstance(eos, (list, tuple, set)) and not (isinstance(eos, torch.Tensor) and eos.dim() <= 1):
        raise InputError(f"{name} must be a token id, a list of ids, [] (never stop) or None, got {eos!r}.")
    return eos.flatten().tolist() if isinstance(eos, torch.Tensor) else list(eos)


def _pad_id(config, pad_token_id):
    if pad_token_id is not None:
        return pad_token_id
    if config.pad_token_id is not None:
        return config.pad_token_id
    return _eos_list(config.eos_token_id)[0] if _eos_list(config.eos_token_id) else 0

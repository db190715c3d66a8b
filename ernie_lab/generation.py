"""Autoregressive generation with a KV cache: prefill the prompt once, then one token per step.

    prefill:  logits = model(prompt)            -> fills the cache with the prompt's keys/values
    decode:   x_t ~ p(. | x_<t),  logits = model(x_t, cache)   (one new row per layer per step)

Choosing x_t: temperature 0 takes the argmax (greedy); otherwise logits are divided by the
temperature, cut to the top_k most likely tokens and/or the smallest set whose probability reaches
top_p (nucleus sampling), and sampled. Prompts of different lengths are left-padded so that every
row's next token sits in the last column; positions count only real tokens.
"""

from __future__ import annotations

import torch

from .errors import InputError
from .kv_cache import KVCache


@torch.inference_mode()
def generate(model, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int | None = None, eos_token_id: int | list[int] | None = None, streamer=None,
             attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, kv_cache_dtype=None, **model_inputs) -> torch.Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens; returns (B, T + new) token ids.

    ``input_ids`` is a (B, T) LongTensor (left-padded, with ``attention_mask``) or a list of token-id
    lists of any lengths, which are left-padded here. ``eos_token_id`` None uses the model config's;
    pass ``[]`` to never stop early. Rows that finished are filled with ``pad_token_id``.
    ``streamer`` gets ``put(ids)`` for the prompt and each new token and ``end()`` at the close, like
    transformers' streamers. ``kv_cache_dtype="int8"`` stores the KV cache as int8 with per-(token, head)
    scales (``kv_cache.Int8KVCache``). Extra keyword arguments (e.g. ``pixel_values``) go to the prefill only.
    """
    config = model.config.get_text_config()
    input_ids, attention_mask = _as_batch(input_ids, attention_mask, _pad_id(config, pad_token_id))
    check_sampling(max_new_tokens, temperature, top_p, top_k)
    B, T = input_ids.shape
    if T + max_new_tokens > config.max_position_embeddings:
        raise InputError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceed the context of "
                         f"{config.max_position_embeddings} tokens. Shorten the prompt or ask for fewer tokens.")
    stop_ids = _eos_list(config.eos_token_id if eos_token_id is None else eos_token_id)
    pad_id = _pad_id(config, pad_token_id)
    device = next(model.parameters()).device
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    cache = KVCache.for_model(model, B, T + max_new_tokens, kv_cache_dtype=kv_cache_dtype)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count 0, 1, 2, ...
    padded = not bool(attention_mask.all())
    logits = model(input_ids, attention_mask=attention_mask if padded else None, cache=cache,
                   position_ids=positions, logits_to_keep=1, **model_inputs).logits[:, -1]  # (B, vocab)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    tokens, finished = [input_ids], torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = positions[:, -1:] + 1  # (B, 1)
    for step in range(max_new_tokens):
        token = pick_next_token(logits, temperature, top_p, top_k, generator)  # (B,)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token[:, None])
        if streamer is not None:
            streamer.put(token.cpu())
        finished |= torch.isin(token, torch.tensor(stop_ids, device=device, dtype=token.dtype))
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
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
        return logits.argmax(-1)
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
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 = greedy), got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"top_k must be a positive integer or None, got {top_k!r}.")


def _as_batch(input_ids, attention_mask, pad_id: int):
    """Accept a (B, T) tensor or a ragged list of id lists; return left-padded ids and their mask."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() == 1:
            raise InputError(f"input_ids must be 2-D (batch, tokens), got shape {tuple(input_ids.shape)}. Use ids[None].")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}.")
        return input_ids, attention_mask.long()
    rows = [list(r) for r in input_ids]
    if not rows or any(len(r) == 0 for r in rows):
        raise InputError("every prompt needs at least one token.")
    if any(not isinstance(t, int) for r in rows for t in r):
        raise InputError("token ids must be Python ints (encode text with the tokenizer first).")
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _eos_list(eos) -> list[int]:
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def _pad_id(config, pad_token_id):
    if pad_token_id is not None:
        return pad_token_id
    if config.pad_token_id is not None:
        return config.pad_token_id
    return _eos_list(config.eos_token_id)[0] if _eos_list(config.eos_token_id) else 0

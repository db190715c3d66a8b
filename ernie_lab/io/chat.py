"""Asking a model: a conversation in, the reply text out.

    reply = ernie_lab.chat(model, tokenizer, "What is a mixture of experts?")   # one user turn
    reply = ernie_lab.chat(model, tokenizer, [{"role": "user", "content": "What is a mixture of experts?"}])
    reply = ernie_lab.chat(vl_model, tokenizer, [{"role": "user", "content": [
        {"type": "image", "image": picture}, {"type": "text", "text": "What colour is the circle?"}]}])
    parts = ernie_lab.chat(vl_model, tokenizer, "Why?", enable_thinking=True, reasoning=True)
    parts.reasoning, parts.answer, parts.finished                                # the reply, split

Three steps: render the conversation with ERNIE's chat format (``tokenizer.apply_chat_template`` for
text; ``processor.VLProcessor`` for a vision-language model, which also turns pictures into pixels and
one placeholder id per vision token), generate with the KV cache until a stop token, and decode only
the new tokens. The special ids come from the checkpoint's own tokenizer and config. A thinking model's
reply is cut into its reasoning and its answer (``reasoning.py``: which models think, and how).
"""

from __future__ import annotations

import torch

from .chat_format import check_messages
from .reasoning import REASONING_TAGS, Reasoning, check_thinking, opens_thinking, split_reasoning, thinking_mode
from ..model.config import VLConfig
from ..errors import InputError
from ..model.generation import generate


def chat(model, tokenizer, messages: list[dict] | str, *, max_new_tokens: int = 64, temperature: float = 0.0,
         enable_thinking: bool | None = None, reasoning: bool = False, top_p: float = 1.0, top_k: int | None = None,
         generator: torch.Generator | None = None) -> str | Reasoning:
    """The model's answer to ``messages`` (a list of {"role", "content"} dicts, or one string: a single
    user turn), as text; with ``reasoning=True`` a ``Reasoning(reasoning, answer, finished)``.

    Content is a string, or for a VL model a list of ``{"type": "text", "text": ...}`` and
    ``{"type": "image", "image": PIL.Image}`` items. ``temperature`` 0 is greedy decoding.
    ``enable_thinking``: None is the model's own default (text models never think, 21B-A3B-Thinking
    always does, VL models do not unless True); asking a model for what it cannot do is an InputError.
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    check_chat_arguments(model, tokenizer, messages, reasoning)
    mode = thinking_mode(model.config, tokenizer)
    check_thinking(mode, enable_thinking)
    prompt = render_prompt(model, tokenizer, messages, enable_thinking=enable_thinking)
    input_ids = prompt.pop("input_ids")
    stop = list(getattr(tokenizer, "stop_token_ids", None) or [])
    out = generate(model, input_ids, max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                   eos_token_id=stop or None, generator=generator, **prompt)
    new = out[0, input_ids.shape[1]:].tolist()
    if stop:
        new = new[:next((i for i, t in enumerate(new) if t in stop), len(new))]  # up to the first stop token
    text = decode_reply(tokenizer, new)
    parts = split_reasoning(text, opened=opens_thinking(mode, enable_thinking))
    return parts if reasoning else parts.answer


def decode_reply(tokenizer, ids: list[int]) -> str:
    """The reply's text without special tokens but with its reasoning tags: the kit's tokenizer keeps them
    when asked (``keep=``); another tokenizer (a stand-in, transformers') decodes the way it does."""
    import inspect

    if "keep" in inspect.signature(tokenizer.decode).parameters:
        return tokenizer.decode(ids, skip_special_tokens=True, keep=REASONING_TAGS)
    return tokenizer.decode(ids, skip_special_tokens=True)


def check_chat_arguments(model, tokenizer, messages, reasoning=False) -> None:
    """chat's own arguments (generate checks the sampling ones; reasoning.py enable_thinking), each an
    InputError naming it."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"chat's first argument must be an ernie-lab model (ernie_lab.load_model(...)), "
                         f"got {type(model).__name__}.")
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode", "apply_chat_template")):
        raise InputError(f"chat's tokenizer must be a tokenizer (ernie_lab.load_tokenizer(...)), got "
                         f"{type(tokenizer).__name__}; the order is chat(model, tokenizer, messages).")
    check_messages(messages, pictures=isinstance(model.config, VLConfig) or _has_pictures(messages))
    if len(messages) == 0:
        raise InputError("chat got no messages; give at least one, e.g. [{'role': 'user', 'content': 'Hi'}].")
    if not isinstance(reasoning, bool):
        raise InputError(f"reasoning must be True (return Reasoning(reasoning, answer, finished)) or False "
                         f"(return the answer text), got {reasoning!r}.")


def render_prompt(model, tokenizer, messages: list[dict], *, enable_thinking: bool | None = None) -> dict:
    """``input_ids`` (1, T) of the conversation plus a generation prompt, and pixels if it has pictures."""
    if isinstance(model.config, VLConfig):
        from .processor import VLProcessor  # PIL is imported only when pictures are involved

        processor = VLProcessor(tokenizer, config=model.config)
        return processor(messages, enable_thinking=bool(enable_thinking))
    if _has_pictures(messages):
        n = next(n for n, message in enumerate(messages) if _has_pictures([message]))
        raise InputError(f"message {n} holds a picture, but the model is a text-only ERNIE 4.5; "
                         "load a vision-language checkpoint (ERNIE-4.5-VL-...) or send text only.")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=enable_thinking)
    return {"input_ids": torch.tensor([ids])}


def _has_pictures(messages) -> bool:
    return isinstance(messages, (list, tuple)) and any(
        isinstance(m, dict) and isinstance(m.get("content"), (list, tuple))
        and any(isinstance(item, dict) and item.get("type") in ("image", "video", "image_url", "video_url")
                for item in m["content"]) for m in messages)

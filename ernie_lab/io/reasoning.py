"""Reasoning output: which ERNIE 4.5 models think, how the prompt says so, and how a reply splits.

A thinking model writes its reasoning first, inside a ``<think>`` block, then the answer. ERNIE 4.5's
families differ (decided from the config and the tokenizer's chat template, see :func:`thinking_mode`):

    family                              mode      how the prompt ends                 enable_thinking
    0.3B, 21B-A3B, 300B-A47B (-PT)      "none"    ... Assistant:                      True refused
    21B-A3B-Thinking (a text MoE)       "always"  <|im_start|>assistant\\n<think>\\n     False refused
    VL-28B-A3B, VL-424B-A47B            "switch"  off: Assistant: <think>\\n\\n</think>\\n\\n   on: Assistant: <think>\\n

Where the rules come from: the text format and the VL switch are the ones ``chat_format.py`` writes
(Baidu's templates; ERNIE issues #992 and #1436: the plain text models have no thinking mode); the
Thinking model's template always ends in an open ``<think>\\n`` (the template it ships; unsloth's and
ms-swift's copies of it agree), so its reply *starts inside* the reasoning and looks like

    reasoning ...\\n</think>\\n\\n<response>\\nanswer ...\\n</response>\\n      (vLLM's "ernie45" parser)

:func:`split_reasoning` cuts any of these shapes into ``Reasoning(reasoning, answer, finished)``:
a whole block, an empty block, no block, a block cut off by ``max_new_tokens`` (``finished`` False),
and the ``<response>`` wrapper, with the newlines around each tag stripped.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<response>", "</response>"
REASONING_TAGS = (THINK_OPEN, THINK_CLOSE, RESPONSE_OPEN, RESPONSE_CLOSE)
TURN_END = "<|im_end|>"  # closes an assistant turn in the Thinking model's template; a stop token there

THINKING_MODES = {  # mode -> what enable_thinking may be (None: the family's own default)
    "none": (None, False),         # the text models: never think
    "always": (None, True),        # 21B-A3B-Thinking: always thinks
    "switch": (None, False, True),  # the VL models: off unless asked (the template's default)
}


@dataclass(frozen=True)
class Reasoning:
    """A reply cut in two: ``reasoning`` (the ``<think>`` block, "" if none) and the ``answer``.

    ``finished`` is False when the generation stopped inside the reasoning (no ``</think>`` yet):
    then ``answer`` is "" and ``reasoning`` holds what was written so far.
    """

    reasoning: str
    answer: str
    finished: bool = True

    def __str__(self) -> str:
        return self.answer


def split_reasoning(text: str, *, opened: bool = False) -> Reasoning:
    """``text`` (a generated reply) as Reasoning(reasoning, answer, finished).

    ``opened``: the prompt already opened the ``<think>`` block (the Thinking model; a VL model with
    ``enable_thinking=True``), so the reply starts inside the reasoning, without its own ``<think>``.
    """
    if not isinstance(text, str):
        raise InputError(f"split_reasoning wants the generated text (a str), got {type(text).__name__}; "
                         "decode token ids first: tokenizer.decode(ids).")
    if not isinstance(opened, bool):
        raise InputError(f"split_reasoning: opened must be True or False, got {opened!r}.")
    body = text.lstrip()
    starts_block = body.startswith(THINK_OPEN)
    if starts_block:
        body = body[len(THINK_OPEN):]
    if THINK_CLOSE in body:
        thought, _, rest = body.partition(THINK_CLOSE)
        return Reasoning(thought.strip(), unwrap_response(rest))
    if starts_block or opened:  # the block was opened and never closed: cut off while thinking
        return Reasoning(body.strip(), "", finished=False)
    return Reasoning("", unwrap_response(text))


def unwrap_response(text: str) -> str:
    """The answer inside ``<response>...</response>`` (the Thinking model's wrapper), or ``text`` stripped.

    An opened wrapper that never closes (generation cut off) gives what follows ``<response>``.
    """
    body = text.strip()
    if body.startswith(RESPONSE_OPEN):
        body = body[len(RESPONSE_OPEN):]
        body = body[:body.rfind(RESPONSE_CLOSE)] if RESPONSE_CLOSE in body else body
    return body.strip()


# ------------------------------------------------------------------------------------------ families
def thinking_mode(config, tokenizer) -> str:
    """"none", "always" or "switch": whether the model behind ``config`` / ``tokenizer`` thinks.

    A VL config switches. A text model thinks only if its checkpoint's chat template writes ``<think>``;
    a template that renders the same prompt with thinking off and on always thinks (21B-A3B-Thinking).
    """
    from ..model.config import VLConfig

    if isinstance(config, VLConfig):
        return "switch"
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str) or THINK_OPEN not in template:
        return "none"
    probe = [{"role": "user", "content": "Hi"}]
    off, on = (tokenizer.apply_chat_template(probe, tokenize=False, enable_thinking=flag) for flag in (False, True))
    return "always" if off == on else "switch"


def check_thinking(mode: str, enable_thinking) -> None:
    """An InputError when ``enable_thinking`` asks what a model of this ``mode`` cannot do."""
    if enable_thinking is not None and not isinstance(enable_thinking, bool):
        raise InputError(f"enable_thinking must be True, False or None (the model's default), got {enable_thinking!r}.")
    if enable_thinking in THINKING_MODES[mode]:
        return
    if mode == "none":
        raise InputError("enable_thinking=True: this ERNIE 4.5 text model has no thinking mode (only "
                         "ERNIE-4.5-21B-A3B-Thinking and the VL models think; its chat template never opens "
                         "<think>). Leave enable_thinking out, or load a thinking checkpoint.")
    raise InputError("enable_thinking=False: this checkpoint always thinks (its chat template opens <think> "
                     "in every prompt, as ERNIE-4.5-21B-A3B-Thinking's does). Leave enable_thinking out and "
                     "read the answer with chat(..., reasoning=True).answer or split_reasoning(text).")


def opens_thinking(mode: str, enable_thinking) -> bool:
    """Whether the prompt of a model of ``mode`` ends inside an open ``<think>`` block."""
    return mode == "always" or (mode == "switch" and enable_thinking is True)

"""Reasoning output: which families think, how their prompts end, where replies stop, and how they split.

The reply strings are shaped like the real checkpoints' outputs: 21B-A3B-Thinking's prompt ends in an open
``<think>\\n``, so its reply is ``reasoning\\n</think>\\n\\n<response>\\nanswer\\n</response>\\n`` (vLLM's
"ernie45" reasoning parser documents this shape and its tests use the same cases); a VL model with thinking
on starts inside the block too; with thinking off (and for the text models) there is no block at all.
"""

import json

import pytest
import torch

import ernie_lab
from conftest import micro_model, refused
from ernie_lab.errors import InputError
from ernie_lab.io.reasoning import Reasoning, split_reasoning, thinking_mode
from test_tokenizer import load_quietly, make_real_folder

THINKING_REPLY = "First add 2 and 3.\nThat is 5.\n</think>\n\n<response>\nThe sum is 5.\n</response>\n"

# The Thinking model's added tokens; its real ids are in its own tokenizer files, these stand in for them.
THINKING_TOKENS = {"<think>": 100290, "</think>": 100291, "<response>": 100292, "</response>": 100293,
                   "<|im_start|>": 100296, "<|im_end|>": 100297}
# The shape of ERNIE-4.5-21B-A3B-Thinking's template (system setting, im_start turns, an answer wrapped in
# <response>, and a generation prompt that always opens <think>), written for these tests.
THINKING_TEMPLATE = (
    "{{- '<|im_start|>system\\n<global_setting>\\nthink_mode=True\\n</global_setting><|im_end|>\\n\\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}{{- '<|im_start|>user\\n' + m.content + '<|im_end|>\\n\\n' -}}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n<response>\\n' + m.content + '\\n</response>\\n<|im_end|>\\n\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' -}}"
)


# ------------------------------------------------------------------------------------------ the splitter
@pytest.mark.parametrize("text, opened, expected", [
    # 21B-A3B-Thinking: starts inside the block, answer in the <response> wrapper
    (THINKING_REPLY, True, ("First add 2 and 3.\nThat is 5.", "The sum is 5.", True)),
    # vLLM's ernie45 cases: no wrapper, a closed block with nothing after it, multi-line on both sides
    ("abc</think>def", True, ("abc", "def", True)),
    ("abc</think>", True, ("abc", "", True)),
    ("abc\nABC</think>def\nDEF", True, ("abc\nABC", "def\nDEF", True)),
    # cut off by max_new_tokens while thinking: everything so far is reasoning
    ("abc", True, ("abc", "", False)),
    ("<think>\nStill weighing the op", False, ("Still weighing the op", "", False)),
    # a whole block in the reply, and an empty one (a VL model answering at once)
    ("<think>\nIt is red.\n</think>\n\nRed.", False, ("It is red.", "Red.", True)),
    ("<think>\n\n</think>\n\nHello there.", False, ("", "Hello there.", True)),
    # no block at all: the text models, a VL model with thinking off
    ("  Hello there.\n", False, ("", "Hello there.", True)),
    # the wrapper cut off before </response>, and stray newlines around every tag
    ("x\n</think>\n\n\n<response>\nThe sum", True, ("x", "The sum", True)),
    ("\n\n<think>\n\nx\n\n</think>\n\n\n<response>\n\ny\n\n</response>\n\n", False, ("x", "y", True)),
])
def test_split_reasoning_shapes(text, opened, expected):
    parts = split_reasoning(text, opened=opened)
    assert (parts.reasoning, parts.answer, parts.finished) == expected
    assert str(parts) == parts.answer


def test_split_reasoning_refuses_bad_input():
    refused(lambda: split_reasoning([1, 2, 3]), InputError, "str", "tokenizer.decode")
    refused(lambda: split_reasoning(b"abc</think>def"), InputError, "bytes")
    refused(lambda: split_reasoning("abc", opened="yes"), InputError, "opened", "'yes'")


# ------------------------------------------------------------------------------------------ the families
@pytest.fixture(scope="module")
def thinking_tokenizer(tmp_path_factory):
    """A tokenizer in the Hub layout carrying the Thinking model's template and added tokens."""
    folder = make_real_folder(tmp_path_factory.mktemp("thinking"), chat_template=THINKING_TEMPLATE)
    (folder / "added_tokens.json").write_text(json.dumps(THINKING_TOKENS), encoding="utf-8")
    return load_quietly(folder)


@pytest.fixture(scope="module")
def stand_in():
    with pytest.warns(ernie_lab.StandInTokenizerWarning):
        return ernie_lab.load_tokenizer()


def test_each_family_has_its_mode(thinking_tokenizer, stand_in):
    from test_seams import vl_model

    text = micro_model(vocab_size=103424)
    assert thinking_mode(text.config, stand_in) == "none"                # 0.3B / 21B-A3B / 300B-A47B format
    assert thinking_mode(text.config, thinking_tokenizer) == "always"    # 21B-A3B-Thinking
    assert thinking_mode(vl_model().config, stand_in) == "switch"        # the VL models


def test_text_models_refuse_thinking(stand_in):
    messages = [{"role": "user", "content": "Hi"}]
    plain = stand_in.apply_chat_template(messages, tokenize=False)
    assert plain.endswith("Assistant: ") and "<think>" not in plain
    assert stand_in.apply_chat_template(messages, tokenize=False, enable_thinking=False) == plain
    refused(lambda: stand_in.apply_chat_template(messages, enable_thinking=True), InputError,
            "no thinking mode", "21B-A3B-Thinking")
    model = micro_model(vocab_size=103424)
    refused(lambda: ernie_lab.chat(model, stand_in, "Hi", enable_thinking=True, max_new_tokens=2), InputError,
            "enable_thinking=True", "no thinking mode")
    refused(lambda: ernie_lab.chat(model, stand_in, "Hi", enable_thinking=1, max_new_tokens=2), InputError,
            "enable_thinking", "None")
    refused(lambda: ernie_lab.chat(model, stand_in, "Hi", reasoning="yes", max_new_tokens=2), InputError,
            "reasoning", "'yes'")


def test_thinking_template_always_opens_the_block(thinking_tokenizer):
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    text = thinking_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == ("<|im_start|>system\n<global_setting>\nthink_mode=True\n</global_setting><|im_end|>\n\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n\n<|im_start|>assistant\n<think>\n")
    ids = thinking_tokenizer.apply_chat_template(messages)
    assert THINKING_TOKENS["<think>"] in ids and THINKING_TOKENS["<|im_end|>"] in ids  # one id each, not pieces
    model = micro_model(vocab_size=103424)
    refused(lambda: ernie_lab.chat(model, thinking_tokenizer, messages, enable_thinking=False, max_new_tokens=2),
            InputError, "enable_thinking=False", "always thinks")


def test_vl_prompt_ends_by_the_switch(stand_in):
    from test_seams import vl_model
    from ernie_lab.io.chat import render_prompt

    model, messages = vl_model(), [{"role": "user", "content": "Why is the sky blue?"}]
    prompts = {flag: render_prompt(model, stand_in, messages, enable_thinking=flag)["input_ids"][0].tolist()
               for flag in (None, False, True)}
    assert prompts[None] == prompts[False]                                 # off unless asked, as the template
    assert stand_in.decode(prompts[False]).endswith("Assistant: <think>\n\n</think>\n\n")
    assert stand_in.decode(prompts[True]).endswith("Assistant: <think>\n")


# ------------------------------------------------------------------------------------------ stop tokens and chat
def test_stop_tokens_are_where_the_checkpoints_stop(thinking_tokenizer, stand_in):
    assert stand_in.stop_token_ids == [2, 100272]                          # </s>, <|end_of_sentence|>
    assert thinking_tokenizer.stop_token_ids == [2, 100272, THINKING_TOKENS["<|im_end|>"]]
    assert not set(THINKING_TOKENS[t] for t in ("<think>", "</think>", "</response>")) & set(
        thinking_tokenizer.stop_token_ids)                                  # the tags never end a reply


def scripted(model, ids: list[int]):
    """Make ``model`` write ``ids`` greedily, one per forward call (a hook on the head's output)."""
    script = iter(ids)

    def force(module, inputs, logits):
        forced = torch.full_like(logits[:, -1], -1e4)
        forced[:, next(script, 0)] = 1e4
        logits = logits.clone()
        logits[:, -1] = forced
        return logits

    model.lm_head.register_forward_hook(force)
    return model


def test_chat_splits_a_thinking_reply_and_stops_at_im_end(thinking_tokenizer):
    """The reply of the Thinking model, token by token: reasoning, </think>, the <response> wrapper, then
    <|im_end|>; chat stops there (the junk after it is never generated) and returns the answer."""
    tok = thinking_tokenizer
    reply = tok.encode(THINKING_REPLY) + [THINKING_TOKENS["<|im_end|>"]] + tok.encode("junk after the turn")
    model = scripted(micro_model(vocab_size=103424), reply)
    parts = ernie_lab.chat(model, tok, "What is 2 + 3?", max_new_tokens=len(reply), reasoning=True)
    assert parts == Reasoning("First add 2 and 3.\nThat is 5.", "The sum is 5.", finished=True)

    model = scripted(micro_model(vocab_size=103424), reply)
    assert ernie_lab.chat(model, tok, "What is 2 + 3?", max_new_tokens=len(reply)) == "The sum is 5."

    cut = scripted(micro_model(vocab_size=103424), reply)                # max_new_tokens ends it mid-thought
    parts = ernie_lab.chat(cut, tok, "What is 2 + 3?", max_new_tokens=4, reasoning=True)
    assert not parts.finished and parts.answer == "" and "First add 2 and 3.".startswith(parts.reasoning)
    assert parts.reasoning


def test_chat_of_a_plain_text_model_is_unchanged(stand_in):
    """No reasoning tags: the answer is the whole reply, up to <|end_of_sentence|>."""
    reply = stand_in.encode("Paris is in France.") + [100272] + stand_in.encode("more")
    model = scripted(micro_model(vocab_size=103424), reply)
    parts = ernie_lab.chat(model, stand_in, "Where is Paris?", max_new_tokens=len(reply), reasoning=True)
    assert parts == Reasoning("", "Paris is in France.", finished=True)

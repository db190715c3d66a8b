"""A VL export carries ``chat_template.jinja`` (``ERNIE_VL_CHAT_TEMPLATE``) that renders, in transformers and
in the kit, character for character what the kit's own VL renderer writes (``processor.format_vl_chat``):
numbered picture and video markers, system message, several turns, the generation prompt, and thinking
off (the empty ``<think>`` block) unless ``enable_thinking`` is true."""

import warnings

import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from transformers import AutoTokenizer

import ernie_lab
from conftest import refused
from ernie_lab import InputError
from ernie_lab.io.processor import VLProcessor, format_vl_chat
from ernie_lab.io.reasoning import thinking_mode
from ernie_lab.io.serving_files import ERNIE_VL_CHAT_TEMPLATE
from ernie_lab.tiny.tokenizer import TINY_TOKENIZER_DIR

TINY_VL = TINY_TOKENIZER_DIR.parent / "tiny-ernie-vl"
IMAGE, VIDEO = {"type": "image"}, {"type": "video"}


def text(words: str) -> dict:
    return {"type": "text", "text": words}


CONVERSATIONS = {
    "text only": [{"role": "user", "content": "What is a mixture of experts?"}],
    "text items": [{"role": "user", "content": [text("Two "), text("items.")]}],
    "one picture": [{"role": "user", "content": [IMAGE, text("What colour is the circle?")]}],
    "a picture alone": [{"role": "user", "content": [IMAGE]}],
    "two pictures": [{"role": "user", "content": [text("Compare "), IMAGE, text(" and "), IMAGE, text(".")]}],
    "a video": [{"role": "user", "content": [VIDEO, text("What moves?")]}],
    "pictures and videos": [{"role": "user", "content": [IMAGE, VIDEO, IMAGE, VIDEO, text("Which came first?")]}],
    "baidu's url items": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///tmp/a.png"}}, text("and"),
        {"type": "video_url", "video_url": {"url": ""}}, text("?")]}],
    "system": [{"role": "system", "content": "Answer in one word."},
               {"role": "user", "content": [IMAGE, text("Shape?")]}],
    "system as items": [{"role": "system", "content": [text("Be terse.")]},
                        {"role": "user", "content": "Hi"}],
    "several turns": [
        {"role": "system", "content": "You describe pictures."},
        {"role": "user", "content": [IMAGE, text("What is it?")]},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": [text("And these? "), IMAGE, VIDEO]},
        {"role": "assistant", "content": [text("A square "), text("and a moving dot.")]},
        {"role": "user", "content": [VIDEO, IMAGE, text("Last one.")]},
    ],
    "ends with the assistant": [{"role": "user", "content": [IMAGE, text("Colour?")]},
                                {"role": "assistant", "content": "Blue."}],
    "newlines and unicode": [{"role": "user", "content": [text("Zeile 1\nZeile 2 — ünï 你好 {{ x }} {% if %}"),
                                                           IMAGE, text("\n\n")]}],
    "empty content": [{"role": "user", "content": []}, {"role": "assistant", "content": ""}],
}
THINKING = {"absent": {}, "off": {"enable_thinking": False}, "on": {"enable_thinking": True}}


@pytest.fixture(scope="module")
def vl_model():
    return ernie_lab.load_model(TINY_VL).eval()


@pytest.fixture(scope="module")
def plain():
    """The tiny models' tokenizer, which has no template of its own: the processor renders with format_vl_chat."""
    tokenizer = ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)
    assert tokenizer.chat_template is None
    return tokenizer


@pytest.fixture(scope="module")
def exported(vl_model, plain, tmp_path_factory):
    """The shipped tiny VL model saved with that tokenizer: save_model gives it the VL template."""
    folder = tmp_path_factory.mktemp("vl-export") / "tiny-vl"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ernie_lab.save_model(vl_model, folder, tokenizer=plain)
    return folder


@pytest.fixture(scope="module")
def tokenizers(exported):
    """(transformers' AutoTokenizer of the export, the kit's tokenizer of the export)."""
    return AutoTokenizer.from_pretrained(exported), ernie_lab.load_tokenizer(exported)


def expected(messages, add_generation_prompt: bool, thinking: dict) -> str:
    """The kit's VL rendering: thinking off unless asked, as the processor and chat() render it."""
    return format_vl_chat(messages, add_generation_prompt, enable_thinking=thinking.get("enable_thinking", False))


def test_a_vl_export_carries_the_vl_template_and_reads_it_back(exported, tokenizers):
    assert (exported / "chat_template.jinja").read_text(encoding="utf-8") == ERNIE_VL_CHAT_TEMPLATE
    theirs, ours = tokenizers
    assert ours.chat_template == ERNIE_VL_CHAT_TEMPLATE
    assert theirs.chat_template == ERNIE_VL_CHAT_TEMPLATE


@pytest.mark.parametrize("thinking", THINKING)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_the_template_renders_what_the_kit_renders(tokenizers, name, add_generation_prompt, thinking):
    theirs, ours = tokenizers
    messages, flags = CONVERSATIONS[name], THINKING[thinking]
    want = expected(messages, add_generation_prompt, flags)
    assert theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                      **flags) == want
    assert ours.apply_chat_template(messages, add_generation_prompt, tokenize=False, **flags) == want
    ids = ours.apply_chat_template(messages, add_generation_prompt, **flags)
    assert ids == ours.encode(want) == theirs.encode(want, add_special_tokens=False)  # markers as single tokens


def test_plain_jinja_without_transformers_renders_it_too():
    """A server with its own jinja (sandboxed, trimmed blocks, no add_generation_prompt given) gets the prompt."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = env.from_string(ERNIE_VL_CHAT_TEMPLATE)
    messages = CONVERSATIONS["several turns"]
    assert template.render(messages=messages) == format_vl_chat(messages)  # generation prompt on by default
    assert template.render(messages=messages, enable_thinking=True) == format_vl_chat(messages, enable_thinking=True)


def test_the_processor_gives_the_same_ids_through_the_template(vl_model, plain, exported):
    """VLProcessor renders with a tokenizer's template when it has one: the export's ids match the kit's."""
    templated = ernie_lab.load_tokenizer(exported)
    red, blue = Image.new("RGB", (56, 56), (220, 30, 30)), Image.new("RGB", (84, 56), (30, 30, 220))
    frames = [Image.new("RGB", (56, 56), (0, 40 * i, 0)) for i in range(4)]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": red}, text("What is it?")]},
                {"role": "assistant", "content": "A red square."},
                {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "image", "image": blue},
                                             text("And now?")]}]
    for enable_thinking in (False, True):
        ours, theirs = (VLProcessor(tok, config=vl_model.config)(messages, enable_thinking=enable_thinking)
                        for tok in (plain, templated))
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key].equal(theirs[key]), (key, enable_thinking)


def test_chat_answers_the_same_with_the_exported_tokenizer(vl_model, plain, exported):
    templated = ernie_lab.load_tokenizer(exported)
    assert thinking_mode(vl_model.config, templated) == "switch"
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 56), (220, 30, 30))},
                                             text("What colour is the background?")]}]
    for enable_thinking in (None, True):
        answers = [ernie_lab.chat(vl_model, tok, messages, max_new_tokens=6, enable_thinking=enable_thinking,
                                  reasoning=True) for tok in (plain, templated)]
        assert answers[0] == answers[1]


def test_an_unknown_role_is_refused_by_the_template(tokenizers):
    theirs, ours = tokenizers
    messages = [{"role": "tool", "content": "42"}]
    refused(lambda: ours.apply_chat_template(messages, tokenize=False), InputError, "unknown chat role tool",
            "system, user or assistant")
    with pytest.raises(jinja2.TemplateError, match="unknown chat role tool"):
        theirs.apply_chat_template(messages, tokenize=False)


def test_saving_a_loaded_export_again_keeps_the_template(exported, tmp_path):
    """No tokenizer argument: the one of the folder the model came from, template and all, goes along."""
    again = tmp_path / "again"
    ernie_lab.save_model(ernie_lab.load_model(exported), again)
    assert (again / "chat_template.jinja").read_text(encoding="utf-8") == ERNIE_VL_CHAT_TEMPLATE

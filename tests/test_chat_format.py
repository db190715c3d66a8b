"""ernie_lab.chat_format: one validator and one renderer serve the text and the VL chat format.

The rendered strings themselves are checked against Baidu's template in test_tokenizer.py (text) and
test_vl_model.py (pictures); here: the two formats are one, and every kind of bad conversation gets an
InputError that names the message and what is wrong with it.
"""

import pytest

from ernie_lab import InputError
from ernie_lab.io.chat_format import IMAGE_MARKER, NO_THINKING, THINKING, VIDEO_MARKER, check_messages, render_chat
from ernie_lab.io.processor import format_vl_chat
from ernie_lab.io.tokenizer import format_ernie_chat

TEXT_CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Bye"},
]


def test_text_and_vl_formats_are_one_format():
    text = format_ernie_chat(TEXT_CHAT)
    assert text == ("<|begin_of_sentence|>Be brief.\nUser: Hi\nAssistant: Hello.<|end_of_sentence|>"
                    "User: Bye\nAssistant: ")
    # without pictures the VL format is the text format plus the reasoning block of the chosen mode
    assert format_vl_chat(TEXT_CHAT, enable_thinking=False) == text + NO_THINKING
    assert format_vl_chat(TEXT_CHAT, enable_thinking=True) == text + THINKING
    assert format_vl_chat(TEXT_CHAT, add_generation_prompt=False) == format_ernie_chat(TEXT_CHAT, False)
    # a text item in a list renders like a str content
    as_items = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in TEXT_CHAT]
    assert render_chat(as_items, pictures=True) == text


def test_pictures_are_numbered_per_kind_across_messages():
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "video_url"}]},
            {"role": "assistant", "content": "Two."},
            {"role": "user", "content": [{"type": "image_url"}, {"type": "video"}]}]
    text = render_chat(chat, pictures=True, enable_thinking=False)
    assert text == ("<|begin_of_sentence|>User: Picture 1:" + IMAGE_MARKER + "andVideo 1:" + VIDEO_MARKER + "\n"
                    "Assistant: Two.<|end_of_sentence|>User: Picture 2:" + IMAGE_MARKER + "Video 2:" + VIDEO_MARKER
                    + "\nAssistant: " + NO_THINKING)


def test_custom_chat_markers():
    text = render_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False,
                       cls_token="<B>", sep_token="<E>")
    assert text == "<B>User: x\nAssistant: y<E>"


@pytest.mark.parametrize("messages, pictures, message", [
    ("Hi", True, "messages must be a list of dicts"),
    ({"role": "user", "content": "Hi"}, True, "messages must be a list of dicts"),
    ([{"role": "user", "content": "ok"}, "Hi"], True, "message 1 must be a dict with 'role' and 'content'"),
    ([{"role": "user"}], True, "message 0 has no 'content'"),
    ([{"content": "Hi"}], False, "message 0 has no 'role';"),
    ([{}], False, "message 0 has no 'role' and no 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "{}"}], True, "message 1: unknown chat role 'tool'"),
    ([{"role": "user", "content": 42}], True, r"message 0 \(user\): content must be a str or a list"),
    ([{"role": "user", "content": ["Hi"]}], True, r"message 0 \(user\), item 0: content items must have type"),
    ([{"role": "user", "content": [{"type": "audio"}]}], True, "type 'text', 'image' or 'video', got {'type': 'audio'}"),
    ([{"role": "user", "content": [{"type": "text"}]}], True, "item 0: a text item needs a str 'text'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "look"},
                                                                        {"type": "image"}]}], False,
     r"message 1 \(user\) holds an image item, but this is a text-only chat"),
    ([{"role": "user", "content": [{"type": "video", "video": None}]}], False, "holds a video item"),
    ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], False, "text chat format takes str content"),
])
def test_bad_conversations_name_the_message_and_the_problem(messages, pictures, message):
    with pytest.raises(InputError, match=message):
        check_messages(messages, pictures=pictures)
    with pytest.raises(InputError, match=message):  # the renderer checks before it writes
        render_chat(messages, pictures=pictures)


def test_text_and_vl_wrappers_share_the_validator():
    with pytest.raises(InputError, match="holds an image item, but this is a text-only chat"):
        format_ernie_chat([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(InputError, match="message 0: unknown chat role 'robot'"):
        format_vl_chat([{"role": "robot", "content": "beep"}])
    # a checkpoint's own template may know more roles: check_messages(roles=None) lets any role through
    assert check_messages([{"role": "tool", "content": "{}"}], roles=None)

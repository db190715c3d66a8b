"""ERNIE 4.5's chat format, for the text and the vision-language models: one validator, one renderer.

    <|begin_of_sentence|>{system}\\nUser: {question}\\nAssistant: {answer}<|end_of_sentence|>User: ...\\nAssistant: 

A conversation is a list of messages ``{"role": "system" | "user" | "assistant", "content": ...}``.
The text models take str content. The VL models also take a list of items, ``{"type": "text", "text": ...}``,
``{"type": "image", ...}`` or ``{"type": "video", ...}``: text is written as it is, and each picture becomes
a numbered marker, ``Picture 1:<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>``, that the processor
later swaps for as many placeholder ids as the picture has tokens. The post-trained VL models choose a
mode at the end of the prompt: an empty ``<think>\\n\\n</think>\\n\\n`` block answers at once, an open
``<think>\\n`` lets the model reason first. The text format writes neither.
"""

from __future__ import annotations

from collections import Counter

from ..errors import InputError
from ..model.special_tokens import BEGIN_OF_SENTENCE, END_OF_SENTENCE, IMAGE_END, IMAGE_START, VIDEO_END, VIDEO_START

CHAT_ROLES = ("system", "user", "assistant")
IMAGE_MARKER = IMAGE_START + "<|image@placeholder|>" + IMAGE_END  # one per picture in the rendered text
VIDEO_MARKER = VIDEO_START + "<|video@placeholder|>" + VIDEO_END
NO_THINKING = "<think>\n\n</think>\n\n"  # an empty reasoning block: the model answers directly
THINKING = "<think>\n"                   # an open reasoning block: the model thinks first

# Item type -> picture kind; Baidu's template names picture items "image_url" / "video_url".
PICTURE_ITEMS = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}
PICTURE_LABELS = {"image": ("Picture", IMAGE_MARKER), "video": ("Video", VIDEO_MARKER)}


# ------------------------------------------------------------------------------------------ validator
def check_messages(messages, *, pictures: bool = True, roles: tuple[str, ...] | None = CHAT_ROLES):
    """``messages`` itself when it is a well-formed conversation, else an InputError naming the message.

    ``pictures=False``: a text-only chat, every content a str. ``roles=None`` accepts any role name
    (a checkpoint's own template decides what it renders).
    """
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of dicts like {{'role': 'user', 'content': 'Hi'}}, "
                         f"got {type(messages).__name__}.")
    for n, message in enumerate(messages):
        _check_message(n, message, pictures, roles)
    return messages


def _check_message(n: int, message, pictures: bool, roles) -> None:
    if not isinstance(message, dict):
        raise InputError(f"message {n} must be a dict with 'role' and 'content', got {type(message).__name__} "
                         f"{message!r}.")
    missing = [key for key in ("role", "content") if key not in message]
    if missing:
        raise InputError(f"message {n} has no {' and no '.join(map(repr, missing))}; each message must be a dict "
                         f"with 'role' and 'content', got {message!r}.")
    role, content = message["role"], message["content"]
    if roles is not None and role not in roles:
        raise InputError(f"message {n}: unknown chat role {role!r}; ERNIE 4.5's chat format has "
                         f"{', '.join(roles[:-1])} and {roles[-1]}.")
    if isinstance(content, str):
        return
    where = f"message {n} ({role})"
    if not pictures:
        kind = _first_picture(content)
        if kind is not None:
            raise InputError(f"{where} holds {kind} item, but this is a text-only chat: ERNIE 4.5's text models "
                             "read no pictures. Use ernie_lab.processor.VLProcessor with a VL model.")
        raise InputError(f"ERNIE 4.5's text chat format takes str content; {where} has "
                         f"{type(content).__name__} content.")
    if not isinstance(content, (list, tuple)):
        raise InputError(f"{where}: content must be a str or a list of items like {{'type': 'text', 'text': 'Hi'}}, "
                         f"got {type(content).__name__}.")
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind != "text" and kind not in PICTURE_ITEMS:
            raise InputError(f"{where}, item {j}: content items must have type 'text', 'image' or 'video', "
                             f"got {item!r}.")
        if kind == "text" and not isinstance(item.get("text"), str):
            raise InputError(f"{where}, item {j}: a text item needs a str 'text', got {item!r}.")


def _first_picture(content) -> str | None:
    """'an image' / 'a video' for the first picture item of a content list; None if it has none."""
    for item in content if isinstance(content, (list, tuple)) else ():
        kind = PICTURE_ITEMS.get(item.get("type")) if isinstance(item, dict) else None
        if kind is not None:
            return "an image" if kind == "image" else "a video"
    return None


# ------------------------------------------------------------------------------------------ renderer
def render_chat(messages, add_generation_prompt: bool = True, *, pictures: bool = False,
                enable_thinking: bool | None = None, cls_token: str = BEGIN_OF_SENTENCE,
                sep_token: str = END_OF_SENTENCE) -> str:
    """The chat text of ``messages``.

    ``pictures``: allow picture items (the VL format). ``enable_thinking``: None ends the generation
    prompt at ``"Assistant: "`` (the text models); False adds an empty reasoning block, True an open one.
    """
    check_messages(messages, pictures=pictures)
    turns = {"system": ("", "\n"), "user": ("User: ", "\n"), "assistant": ("Assistant: ", sep_token)}
    seen = Counter()  # pictures of each kind so far, for their numbers
    text = cls_token
    for message in messages:
        before, after = turns[message["role"]]
        text += before + render_content(message["content"], seen) + after
    if add_generation_prompt:
        text += "Assistant: " + ("" if enable_thinking is None else THINKING if enable_thinking else NO_THINKING)
    return text


def render_content(content, seen: Counter) -> str:
    """A message's content as text: items joined, each picture as "Picture N:" / "Video N:" and its marker."""
    if isinstance(content, str):
        return content
    out = ""
    for item in content:
        kind = PICTURE_ITEMS.get(item["type"])
        if kind is None:
            out += item["text"]
            continue
        seen[kind] += 1
        label, marker = PICTURE_LABELS[kind]
        out += f"{label} {seen[kind]}:{marker}"
    return out

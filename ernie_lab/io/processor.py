"""A chat with pictures -> the inputs of ERNIE 4.5 VL (token ids with placeholders + pixel tensors).

    [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
      -> "<|begin_of_sentence|>User: Picture 1:<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>What is it?\\n
          Assistant: <think>\\n\\n</think>\\n\\n"
      -> ids: ... 101304, 100295 x n, 101305 ...  with n = the image's tokens after the adapter

The ids are the big checkpoints'; a checkpoint with a compact vocabulary puts its picture tokens
elsewhere, and the processor takes them from its tokenizer (``picture_token_ids``).

Each picture's marker is replaced by exactly as many placeholder ids as the adapter makes tokens
for it (``vision.tokens_per_item``), so the model can swap them for the picture's features. The
post-trained VL models answer in two modes, chosen at the end of the prompt: *thinking* (the
assistant turn opens ``<think>`` and the model reasons before answering) or *non-thinking* (an
empty ``<think>\\n\\n</think>\\n\\n`` block is written for it, and it answers at once). A tokenizer
that carries its checkpoint's own chat template renders the conversation with it instead.
"""

from __future__ import annotations

import os
import re

import torch
from PIL import Image

from .chat_format import NO_THINKING, THINKING  # noqa: F401  (their old home; chat_format.py writes them)
from .chat_format import IMAGE_MARKER, VIDEO_MARKER, check_messages, render_chat
from ..errors import ConfigError, InputError
from .image_processing import (IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
                               check_pixel_bounds, preprocess_images, preprocess_video)
from ..model.special_tokens import BEGIN_OF_SENTENCE, END_OF_SENTENCE, PICTURE_TOKEN_IDS, PICTURE_TOKENS
from ..model.vision import tokens_per_item

IDS = PICTURE_TOKEN_IDS  # key -> id of the big checkpoints: image, image_start, image_end, video, ...
BEGIN, END = BEGIN_OF_SENTENCE, END_OF_SENTENCE  # old names of the chat markers


def format_vl_chat(messages: list[dict], add_generation_prompt: bool = True, enable_thinking: bool = False) -> str:
    """ERNIE 4.5 VL's chat text, pictures as markers numbered "Picture 1:", "Video 1:", ...

        <|begin_of_sentence|>{system}\\nUser: Picture 1:<marker>{text}\\nAssistant: {reply}<|end_of_sentence|>...
        ... \\nAssistant: <think>\\n\\n</think>\\n\\n   (non-thinking)   or   <think>\\n   (thinking)

    ``chat_format.render_chat`` writes it: the text models' format with picture items allowed.
    """
    return render_chat(messages, add_generation_prompt, pictures=True, enable_thinking=bool(enable_thinking))


def picture_token_ids(tokenizer=None, config=None, token_ids: dict | None = None) -> dict[str, int]:
    """The ids of the six picture tokens (keys of ``IDS``): where the checkpoint puts them.

    Each id comes from ``token_ids`` if given there, else from the tokenizer (its ``special_tokens``
    text -> id table), else from ``config`` (a VLConfig or a config.json dict: ``image_token_id``, ...),
    else the big checkpoints' defaults. A tokenizer and a config that disagree do not belong together.
    """
    explicit = dict(token_ids or {})
    unknown = set(explicit) - set(PICTURE_TOKENS)
    if unknown:
        raise InputError(f"token_ids has unknown keys {sorted(unknown)}; the keys are {list(PICTURE_TOKENS)}.")
    vocabulary = getattr(tokenizer, "special_tokens", None) or {}
    ids = {}
    for key, (text, config_key) in PICTURE_TOKENS.items():
        from_tokenizer, from_config = vocabulary.get(text), _config_value(config, config_key)
        if from_tokenizer is not None and from_config is not None and from_tokenizer != from_config:
            raise ConfigError(f"the tokenizer puts {text} at id {from_tokenizer} but the config says {config_key} = "
                              f"{from_config}; the tokenizer and the model do not belong together.")
        ids[key] = next(i for i in (explicit.get(key), from_tokenizer, from_config, IDS[key]) if i is not None)
    return ids


def _config_value(config, key: str) -> int | None:
    """``key`` of a VLConfig (attribute) or a config.json dict (Baidu's flat files call the image id im_patch_id)."""
    if config is None:
        return None
    if isinstance(config, dict):
        if key == "image_token_id" and "im_patch_id" in config:  # read as VLConfig.from_dict reads it
            return config["im_patch_id"]
        return config.get(key, (config.get("text_config") or {}).get(key))
    return getattr(config, key, None)


def _as_url_items(messages) -> list[dict]:
    """Baidu's template names picture items 'image_url' / 'video_url'; it renders only their place."""
    out = []
    for message in check_messages(messages, roles=None):  # the template decides which roles it renders
        content = message["content"]
        if not isinstance(content, str):
            content = [{"type": f"{item['type']}_url", f"{item['type']}_url": {"url": ""}}
                       if item.get("type") in ("image", "video") else item for item in content]
        out.append({**message, "content": content})
    return out


def _media_in(messages, kind: str) -> list:
    """The pictures named inside the messages (None where an item only marks a place)."""
    return [picture for picture, _ in _media_with_places(messages, kind)]


def _media_with_places(messages, kind: str) -> list[tuple]:
    """(picture or None, "message N, item J") for each ``kind`` item of the messages, in order."""
    found = []
    for n, message in enumerate(messages):
        if isinstance(message["content"], str):
            continue
        for j, item in enumerate(message["content"]):
            if item.get("type") in (kind, f"{kind}_url"):
                found.append((_picture_of(item, kind, f"message {n}, item {j}"), f"message {n}, item {j}"))
    return found


def _picture_of(item: dict, kind: str, where: str):
    """The picture an item holds: ``item[kind]``, or the url of an ``{kind}_url`` item (a path, file:// or data:)."""
    if item.get(kind) is not None or item.get("type") != f"{kind}_url":
        return item.get(kind)
    url = item.get(f"{kind}_url")
    url = url.get("url") if isinstance(url, dict) else url
    if url in (None, ""):
        return None  # a place to fill from images= / videos=
    if not isinstance(url, str):
        raise InputError(f"{where}: the {kind}_url must be a str (a file path, file:// or data: url), got "
                         f"{type(url).__name__}.")
    if url.startswith("data:"):
        import base64
        import binascii

        header, _, payload = url.partition(",")
        try:
            return base64.b64decode(payload, validate=True) if header.endswith(";base64") else payload.encode()
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: the data: url of the {kind} is not valid base64.") from None
    return url[len("file://"):] if url.startswith("file://") else url


class VLProcessor:
    """Turns a conversation with pictures into ``input_ids`` and pixel tensors for the VL model.

        processor = VLProcessor(ernie_lab.load_tokenizer(folder))
        inputs = processor(messages, enable_thinking=False)       # images inside the messages
        out = ernie_lab.generate(model, inputs.pop("input_ids"), 64, **inputs)
    """

    def __init__(self, tokenizer, *, image_min_pixels: int = IMAGE_MIN_PIXELS, image_max_pixels: int = IMAGE_MAX_PIXELS,
                 video_min_pixels: int = VIDEO_MIN_PIXELS, video_max_pixels: int = VIDEO_MAX_PIXELS,
                 token_ids: dict | None = None, config=None):
        """``token_ids`` / ``config`` (the model's VLConfig or config.json dict) name the picture token ids
        where the tokenizer does not know them; see :func:`picture_token_ids`."""
        check_tokenizer(tokenizer, "VLProcessor(tokenizer)")
        check_pixel_bounds(image_min_pixels, image_max_pixels)
        check_pixel_bounds(video_min_pixels, video_max_pixels)
        self.tokenizer = tokenizer
        self.image_bounds = (image_min_pixels, image_max_pixels)
        self.video_bounds = (video_min_pixels, video_max_pixels)
        self.ids = picture_token_ids(tokenizer, config, token_ids)

    def render(self, messages, *, add_generation_prompt: bool = True, enable_thinking: bool = False) -> str:
        """The prompt text, with one marker per picture (the checkpoint's template if the tokenizer has one)."""
        template = getattr(self.tokenizer, "chat_template", None)
        if template is None:
            return format_vl_chat(messages, add_generation_prompt, enable_thinking)
        return self.tokenizer.apply_chat_template(_as_url_items(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=False, enable_thinking=enable_thinking)

    def __call__(self, messages, images=None, videos=None, *, add_generation_prompt: bool = True,
                 enable_thinking: bool = False) -> dict:
        """``messages``: a conversation (list of dicts) or a prompt string holding IMAGE_MARKER / VIDEO_MARKER.

        Pictures come inside the messages (``{"type": "image", "image": PIL image or path}``) or, in
        order, from ``images`` / ``videos`` (a video is a list of frames or a (T, H, W, 3) array).
        Returns ``input_ids`` (1, T) and, when there are pictures, ``pixel_values`` / ``image_grid_thw``
        and ``pixel_values_videos`` / ``video_grid_thw``.
        """
        _check_flags(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        images, videos = _picture_arguments(images, "image"), _picture_arguments(videos, "video")
        if isinstance(messages, str):
            text = messages
            image_places = [f"image {i} of images=" for i in range(len(images))]
            video_places = [f"video {i} of videos=" for i in range(len(videos))]
        else:
            if isinstance(messages, (list, tuple)) and len(messages) == 0:
                raise InputError("the processor got no messages; give at least one, e.g. "
                                 "[{'role': 'user', 'content': 'Hi'}].")
            text = self.render(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
            images, image_places = self._fill(_media_with_places(messages, "image"), images, "image")
            videos, video_places = self._fill(_media_with_places(messages, "video"), videos, "video")
        for kind, marker, given in (("image", IMAGE_MARKER, images), ("video", VIDEO_MARKER, videos)):
            if text.count(marker) != len(given):
                raise InputError(f"the prompt has {text.count(marker)} {kind} placeholder(s) but {len(given)} "
                                 f"{kind}(s) were given; give exactly one {kind} per placeholder.")
        inputs = {}
        image_counts, video_counts = [], []
        if images:
            batches = [_named(preprocess_images, place, [image], min_pixels=self.image_bounds[0],
                              max_pixels=self.image_bounds[1]) for image, place in zip(images, image_places)]
            inputs = {key: torch.cat([b[key] for b in batches]) for key in ("pixel_values", "image_grid_thw")}
            image_counts = tokens_per_item(inputs["image_grid_thw"])
        if videos:
            low, high = self.video_bounds
            clips = [_named(preprocess_video, place, v, min_pixels=low, max_pixels=high)
                     for v, place in zip(videos, video_places)]
            inputs["pixel_values_videos"] = torch.cat([c["pixel_values_videos"] for c in clips])
            inputs["video_grid_thw"] = torch.cat([c["video_grid_thw"] for c in clips])
            video_counts = tokens_per_item(inputs["video_grid_thw"])
        ids = self._encode(text, iter(image_counts), iter(video_counts))
        return {"input_ids": torch.tensor([ids]), **inputs}

    def _fill(self, inline: list[tuple], given: list, kind: str) -> tuple[list, list[str]]:
        """Pictures from the messages, with places left empty filled from ``given`` in order; and their places."""
        missing = sum(picture is None for picture, _ in inline)
        if missing != len(given):
            raise InputError(f"the messages have {missing} {kind} item(s) without a picture but {len(given)} "
                             f"{kind}(s) were passed; give one per item (or put them inside the items).")
        supply = iter(given)
        pictures = [picture if picture is not None else next(supply) for picture, _ in inline]
        return pictures, [place for _, place in inline]

    def _encode(self, text: str, image_counts, video_counts) -> list[int]:
        """Encode the text between markers; each marker becomes start + n placeholders + end."""
        ids = []
        for piece in re.split(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})", text):
            if piece == IMAGE_MARKER:
                ids += [self.ids["image_start"]] + [self.ids["image"]] * next(image_counts) + [self.ids["image_end"]]
            elif piece == VIDEO_MARKER:
                ids += [self.ids["video_start"]] + [self.ids["video"]] * next(video_counts) + [self.ids["video_end"]]
            elif piece:
                ids += self.tokenizer.encode(piece)
        return ids


# ------------------------------------------------------------------------------------------ entry checks
def check_tokenizer(tokenizer, where: str) -> None:
    """An InputError unless ``tokenizer`` can encode and decode (ernie_lab.load_tokenizer(...) makes one)."""
    if not all(callable(getattr(tokenizer, name, None)) for name in ("encode", "decode")):
        raise InputError(f"{where}: expected a tokenizer (ernie_lab.load_tokenizer(folder)), got "
                         f"{type(tokenizer).__name__}.")


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}.")


def _picture_arguments(given, kind: str) -> list:
    """``images=`` / ``videos=`` as a list: None is none, one picture (or one video array) is a list of one."""
    if given is None:
        return []
    one_video = kind == "video" and getattr(given, "ndim", None) == 4  # a (T, H, W, 3) array or tensor
    one_image = kind == "image" and isinstance(given, (Image.Image, str, bytes, bytearray, os.PathLike))
    if one_video or one_image:
        return [given]
    if not isinstance(given, (list, tuple)):
        raise InputError(f"{kind}s= must be a list of {kind}s, got {type(given).__name__}.")
    return list(given)


def _named(preprocess, place: str, source, **bounds) -> dict:
    """``preprocess(source)``, its InputError prefixed with where the picture came from."""
    try:
        return preprocess(source, **bounds)
    except InputError as err:
        raise InputError(f"{place}: {err}") from None

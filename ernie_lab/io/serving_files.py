"""What a serving engine reads beside the weights: the tokenizer's files, the chat template, the generation defaults.

transformers, vLLM and llama.cpp's ``convert_hf_to_gguf.py`` open a model folder and expect, next to
``config.json`` and the safetensors:

    tokenizer.model          the SentencePiece model: ordinary text -> pieces
    tokenizer_config.json    the roles (bos, eos, cls, sep, ...), added_tokens_decoder (id -> special token),
                             the class that reads the folder (transformers' LlamaTokenizer family)
    special_tokens_map.json  the roles again, and the additional special tokens
    added_tokens.json        special token -> id, for the tokens above the SentencePiece pieces
    chat_template.jinja      the chat format as a jinja template (transformers 5 and llama.cpp read this file)
    generation_config.json   bos / eos / pad ids and the sampling defaults a generate() call starts from

ERNIE's twist: an assistant turn ends with ``<|end_of_sentence|>``, not with ``</s>``, so
``generation_config.json`` lists both as ``eos_token_id`` (the tokenizer's ``stop_token_ids``); a server
that knew only ``</s>`` would talk on past the end of the answer. A tokenizer with no template of its
own gets Baidu's format as jinja: ``ERNIE_CHAT_TEMPLATE`` for a text model (exactly the text that
``format_ernie_chat`` writes), ``ERNIE_VL_CHAT_TEMPLATE`` for a vision-language one (exactly what
``processor.format_vl_chat`` writes: numbered picture markers, and the empty ``<think>`` block unless
``enable_thinking`` is true). Everything is written from the tokenizer in memory (its SentencePiece
model serialises itself), so saving into the very folder the tokenizer came from is safe.
"""

from __future__ import annotations

import json
from pathlib import Path

# Baidu's generation_config.json of the ERNIE 4.5 -PT checkpoints (0.3B, 21B-A3B): sampling at 0.8 / 0.8.
ERNIE_SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.0}

# The chat template exactly as Baidu ships it in the text models' tokenizer_config.json
# (baidu/ERNIE-4.5-0.3B-Base-PT; transformers' Ernie4_5 tokenizer uses the same text for the 0.3B models).
ERNIE_CHAT_TEMPLATE = json.loads(
    r'"{%- if not add_generation_prompt is defined -%}\n    {%- set add_generation_prompt = true -%}\n{%- endif -%}\n'
    r'{%- if not cls_token is defined -%}\n    {%- set cls_token = \"<|begin_of_sentence|>\" -%}\n{%- endif -%}\n'
    r'{%- if not sep_token is defined -%}\n    {%- set sep_token = \"<|end_of_sentence|>\" -%}\n{%- endif -%}\n'
    r'{{- cls_token -}}\n{%- for message in messages -%}\n    {%- if message[\"role\"] == \"user\" -%}\n'
    r'        {{- \"User: \" + message[\"content\"] + \"\n\" -}}\n    {%- elif message[\"role\"] == \"assistant\" -%}\n'
    r'        {{- \"Assistant: \" + message[\"content\"] + sep_token -}}\n'
    r'    {%- elif message[\"role\"] == \"system\" -%}\n        {{- message[\"content\"] + \"\n\" -}}\n'
    r'    {%- endif -%}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{- \"Assistant: \" -}}\n{%- endif -%}"'
)

# The VL models' chat format as a jinja template: the text format above with picture items (each one
# numbered per kind, "Picture 1:" / "Video 1:", then its marker) and the thinking switch at the end of the
# prompt, off unless enable_thinking is true. It renders exactly what chat_format.render_chat writes for a
# VL prompt (processor.format_vl_chat); Baidu's VL template names picture items image_url / video_url.
ERNIE_VL_CHAT_TEMPLATE = r"""{%- if not add_generation_prompt is defined -%}
    {%- set add_generation_prompt = true -%}
{%- endif -%}
{%- set seen = namespace(image=0, video=0) -%}
{{- "<|begin_of_sentence|>" -}}
{%- for message in messages -%}
    {%- if message["role"] == "user" -%}
        {{- "User: " -}}
    {%- elif message["role"] == "assistant" -%}
        {{- "Assistant: " -}}
    {%- elif message["role"] != "system" -%}
        {{- raise_exception("unknown chat role " ~ message["role"] ~ ": use system, user or assistant") -}}
    {%- endif -%}
    {%- if message["content"] is string -%}
        {{- message["content"] -}}
    {%- else -%}
        {%- for item in message["content"] -%}
            {%- if item["type"] == "text" -%}
                {{- item["text"] -}}
            {%- elif item["type"] in ["image", "image_url"] -%}
                {%- set seen.image = seen.image + 1 -%}
                {{- "Picture " ~ seen.image ~ ":<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>" -}}
            {%- elif item["type"] in ["video", "video_url"] -%}
                {%- set seen.video = seen.video + 1 -%}
                {{- "Video " ~ seen.video ~ ":<|VIDEO_START|><|video@placeholder|><|VIDEO_END|>" -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message["role"] == "assistant" -%}
        {{- "<|end_of_sentence|>" -}}
    {%- else -%}
        {{- "\n" -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- "Assistant: " -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- "<think>\n" -}}
    {%- else -%}
        {{- "<think>\n\n</think>\n\n" -}}
    {%- endif -%}
{%- endif -%}
"""

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
TEMPLATE_FILE, GENERATION_FILE = "chat_template.jinja", "generation_config.json"


def default_chat_template(config) -> str:
    """Baidu's chat template for a tokenizer without its own: the VL format for a VL model, else the text one."""
    return ERNIE_CHAT_TEMPLATE if config.get_text_config() is config else ERNIE_VL_CHAT_TEMPLATE


# ------------------------------------------------------------------------------------ the tokenizer
def tokenizer_files(tokenizer) -> dict[str, str | bytes]:
    """file name -> content of the four tokenizer files (TOKENIZER_FILES) of an ``ErnieTokenizer``."""
    sp = tokenizer.sp
    by_id = sorted(tokenizer.special_tokens.items(), key=lambda item: item[1])  # [(text, id)] in id order
    decoder = {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "special": True} for text, i in by_id}
    additional = [text for text, i in by_id if not is_sentencepiece_own(sp, i)]
    config = {**tokenizer.roles, "add_bos_token": tokenizer.add_bos_token, "add_eos_token": tokenizer.add_eos_token,
              "added_tokens_decoder": decoder, "additional_special_tokens": additional,
              "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False}
    return {
        "tokenizer.model": sp.serialized_model_proto(),
        "tokenizer_config.json": as_json(config),
        "special_tokens_map.json": as_json({**tokenizer.roles, "additional_special_tokens": additional}),
        "added_tokens.json": as_json({text: i for text, i in by_id if i >= tokenizer.num_pieces}),
    }


def is_sentencepiece_own(sp, token_id: int) -> bool:
    """<unk>, <s>, </s>: the control pieces inside the SentencePiece model itself, not added tokens."""
    return token_id < sp.vocab_size() and (sp.is_control(token_id) or sp.is_unknown(token_id))


def as_json(data) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def write_files(folder: Path, files: dict[str, str | bytes]) -> None:
    """Each file of ``files`` into ``folder``: bytes as they are, text as UTF-8 with \\n line ends."""
    for name, content in files.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            (folder / name).write_text(content, encoding="utf-8", newline="\n")


def generation_config(text_config, tokenizer) -> dict:
    """generation_config.json: the tokenizer's bos / stop / pad ids (the config's without one), ERNIE's defaults."""
    if tokenizer is None:
        ids = {"bos_token_id": text_config.bos_token_id, "eos_token_id": text_config.eos_token_id,
               "pad_token_id": text_config.pad_token_id}
    else:
        stops = tokenizer.stop_token_ids  # </s> and <|end_of_sentence|>
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
               "pad_token_id": tokenizer.pad_token_id}
    return {**{key: value for key, value in ids.items() if value is not None}, **ERNIE_SAMPLING_DEFAULTS}

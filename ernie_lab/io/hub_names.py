"""Hub-layout names: how checkpoint files name tensors, and the translation to ernie-lab's module names.

The Hub names each tensor after the reference module tree (``model.layers.3.self_attn.q_proj.weight``);
ernie-lab's modules are named more briefly. A name table is a list of rules, read top to bottom, the
first match wins::

    (hub template, ernie-lab template)              same tensor, same orientation
    (hub template, ernie-lab template, TRANSPOSED)  the Hub stores the transpose of our weight

``{i}`` is a layer number, ``{rest}`` any remaining dotted path, any other ``{field}`` one name
component. Loading (``loading.py``), saving (``saving.py``) and the vision encoder's helpers all read
these tables; nothing else knows a Hub name.
"""

from __future__ import annotations

import functools
import re

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "*.model",
             "special_tokens_map.json", "added_tokens.json", "generation_config.json",
             "preprocessor_config.json", "chat_template*", "TRAINING.md"]
TRANSPOSED = "transposed"

# ------------------------------------------------------------------------------------ text models
# Hub tensor name                                   <->  ernie-lab parameter name
NAME_MAP = [
    ("model.embed_tokens.weight",                         "embed.weight"),
    ("model.layers.{i}.input_layernorm.weight",           "layers.{i}.attn_norm.weight"),
    ("model.layers.{i}.self_attn.{proj}.{kind}",          "layers.{i}.attn.{proj}.{kind}"),
    ("model.layers.{i}.post_attention_layernorm.weight",  "layers.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.gate.weight",                  "layers.{i}.mlp.routers.0.weight"),  # the router
    ("model.layers.{i}.mlp.{rest}",                       "layers.{i}.mlp.{rest}"),  # SwiGLU, experts, shared, statics
    ("model.norm.weight",                                 "norm.weight"),
    ("lm_head.weight",                                    "lm_head.weight"),
]

# ------------------------------------------------------------------------- vision-language models
# The VL decoder keeps the text names, but its two routers are stored (hidden, experts): the transpose
# of an nn.Linear weight, as ``gate.weight`` (text tokens) and ``gate.weight_1`` (vision tokens).
VL_ROUTER_MAP = [
    ("model.layers.{i}.mlp.gate.weight",                  "layers.{i}.mlp.routers.0.weight", TRANSPOSED),
    ("model.layers.{i}.mlp.gate.weight_1",                "layers.{i}.mlp.routers.1.weight", TRANSPOSED),
]
# The ViT is ``vision`` and the adapter ``adapter`` in the VL model.
VISION_NAME_MAP = [
    ("model.vision_model.{rest}",                         "vision.{rest}"),  # identical names inside
    ("model.resampler_model.spatial_linear.0.{kind}",     "adapter.spatial_merge.fc1.{kind}"),
    ("model.resampler_model.spatial_linear.2.{kind}",     "adapter.spatial_merge.fc2.{kind}"),
    ("model.resampler_model.spatial_linear.3.{kind}",     "adapter.spatial_merge.norm.{kind}"),
    ("model.resampler_model.temporal_linear.0.{kind}",    "adapter.temporal_merge.fc1.{kind}"),
    ("model.resampler_model.temporal_linear.2.{kind}",    "adapter.temporal_merge.fc2.{kind}"),
    ("model.resampler_model.temporal_linear.3.{kind}",    "adapter.temporal_merge.norm.{kind}"),
    ("model.resampler_model.mlp.{kind}",                  "adapter.proj.{kind}"),
    ("model.resampler_model.after_norm.weight",           "adapter.norm.weight"),
]
VL_NAME_MAP = VL_ROUTER_MAP + NAME_MAP + VISION_NAME_MAP

# Tensors a checkpoint may carry that inference does not use. Multi-token-prediction (MTP) heads
# were trained alongside some ERNIE 4.5 models; rotary tables are recomputed, never loaded.
SKIPPED = [
    (r"(model\.)?mtp.*|.*\.mtp_.*", "multi-token-prediction (MTP) weights, not needed for inference"),
    (r".*rotary_emb\.inv_freq", "rotary tables, recomputed from rope_theta"),
]

# ernie-lab parameters kept in float32 whatever dtype a model is loaded in: the MoE router and its
# correction bias decide which experts run, and tiny rounding there changes the choice.
KEEP_FLOAT32 = r".*\.mlp\.routers\.\d+\.weight|.*\.mlp\.moe_statics\..*"

PADDLE_PREFIX = "ernie."  # -Paddle checkpoints name the decoder "ernie." where the Hub's -PT files say "model."


# ------------------------------------------------------------------------------------ translation
def hub_to_lab(name: str, table: list = NAME_MAP) -> str | None:
    """Translate one Hub tensor name; None when no rule matches."""
    rule = _match(name, table, hub_side=True)
    return rule[0] if rule else None


def lab_to_hub(name: str, table: list = NAME_MAP) -> str | None:
    """The inverse translation (used by ``save_model`` and in error messages)."""
    rule = _match(name, table, hub_side=False)
    return rule[0] if rule else None


def hub_to_lab_vision(name: str) -> str | None:
    """Translate one Hub tensor name of the ViT or adapter (``VISION_NAME_MAP``); None for any other."""
    return hub_to_lab(name, VISION_NAME_MAP)


def vision_state_from_hub(tensors: dict) -> tuple[dict, dict]:
    """Split a Hub state dict's vision tensors into (ViT state, adapter state) under ernie-lab names."""
    encoder, adapter = {}, {}
    for name, tensor in tensors.items():
        lab = hub_to_lab_vision(name)
        if lab is not None:
            part, rest = lab.split(".", 1)
            (encoder if part == "vision" else adapter)[rest] = tensor
    return encoder, adapter


def is_transposed(lab_name: str, table: list) -> bool:
    """Whether the Hub stores the transpose of this ernie-lab parameter."""
    rule = _match(lab_name, table, hub_side=False)
    return bool(rule and rule[1])


def _match(name: str, table: list, hub_side: bool) -> tuple[str, bool] | None:
    """(translated name, transposed?) of the first rule that matches ``name``."""
    for hub, lab, *flags in table:
        source, target = (hub, lab) if hub_side else (lab, hub)
        match = re.fullmatch(template_regex(source), name)
        if match:
            return target.format(**match.groupdict()), TRANSPOSED in flags
    return None


@functools.lru_cache(maxsize=None)  # a few templates, matched against every tensor name
def template_regex(template: str) -> str:
    r"""'layers.{i}.mlp.{rest}' -> r'layers\.(?P<i>\d+)\.mlp\.(?P<rest>.+)'"""
    kinds = {"i": r"\d+", "rest": r".+"}
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = ""
    for k, part in enumerate(parts):
        regex += re.escape(part) if k % 2 == 0 else f"(?P<{part}>{kinds.get(part, r'[^.]+')})"
    return regex


def is_paddle_layout(hub_names) -> bool:
    """-Paddle checkpoints are recognised by their tensors: the decoder is called ``ernie.``."""
    return any(name.startswith(PADDLE_PREFIX) for name in hub_names)


def unprefix_paddle(name: str) -> str:
    """A -Paddle tensor name in the -PT spelling."""
    return "model." + name[len(PADDLE_PREFIX):] if name.startswith(PADDLE_PREFIX) else name

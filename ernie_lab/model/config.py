"""Model configuration: config.json read once, into dataclasses that fix every tensor shape.

A config is a handful of integers. ERNIE 4.5 checkpoints write them in several dialects, and this
module is the only place that reads any of them:

* text models (``ernie4_5``, ``ernie4_5_moe``): a flat dict; the Hub files carry ``rope_theta``, newer
  ``transformers`` files a ``rope_parameters: {rope_theta, rope_type}`` dict;
* vision-language models (``ernie4_5_vl_moe``): ``transformers``' nested ``text_config`` /
  ``vision_config``, or Baidu's original flat file (decoder keys at the top, ``[text, vision]`` lists,
  ``vision_config.embed_dim``).

:func:`parse_config` turns any of them into an :class:`ErnieConfig` (the decoder) or a :class:`VLConfig`
(decoder + :class:`VisionConfig` + what ties them together). Keys the kit does not use are kept in
``extra`` so that nothing is silently lost. ``family.py`` computes its arithmetic from these parsed
configs, and ``published.py`` holds the family's published shapes as literal tables.

The MoE layer rule, in one place (:func:`moe_layer_pattern`): layer ``l`` is MoE when
``start <= l <= end`` and ``(l + 1) % interval == 0``, with transformers' defaults start 1, end -1
(the last layer), interval 1: the first layer of an ERNIE 4.5 MoE model is dense.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .special_tokens import TOKEN_IDS as VL_TOKEN_IDS  # config.json key -> default id of the picture tokens

# model_type -> the architecture names that checkpoints of that type write in "architectures".
# The Hub's original remote-code files use "Ernie4_5_ForCausalLM"; transformers writes "Ernie4_5ForCausalLM".
ARCHITECTURES = {
    "ernie4_5": ("Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM"),
    "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM",),
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeForConditionalGeneration", "Ernie4_5_VLMoeForCausalLM"),
}
VL_MODEL_TYPES = ("ernie4_5_vl_moe", "ernie4_5_moe_vl")  # the second is Baidu's original name
# Keys every config.json of an ERNIE 4.5 decoder carries; a dict without them is not a config.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MOE_DEFAULT_START = 1  # transformers' default moe_layer_start_index: layer 0 stays dense
# Upper bounds on every size, far above any real model (the 300B has hidden 8192, vocabulary 103424, 54 layers).
# A larger number is a typo or a hostile file, refused before anything is allocated.
SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 17, "intermediate_size": 1 << 19, "head_dim": 1 << 12,
               "num_hidden_layers": 1024, "num_attention_heads": 1024, "num_key_value_heads": 1024,
               "max_position_embeddings": 1 << 24, "moe_num_experts": 4096, "moe_k": 4096,
               "moe_intermediate_size": 1 << 19, "moe_layer_interval": 1024, "depth": 1024, "num_heads": 1024,
               "patch_size": 1024, "in_channels": 64, "spatial_merge_size": 64, "temporal_merge_size": 64}
MAX_CONFIG_BYTES = 16 * 1024**2  # a config.json is a few KB; a larger file is not read


def check_int(source: str, name: str, value, low: int = 1) -> int:
    """``value`` if it is an int in ``low .. SIZE_LIMITS[name]``, else a ConfigError naming the field."""
    high = SIZE_LIMITS.get(name, 1 << 40)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ConfigError(f"{source}: {name} must be {kind} (valid: {low} .. {high}), got {value!r}. "
                          "Fix that field of the config.")
    return value


def check_float(source: str, name: str, value, *, below: float = math.inf) -> float:
    """``value`` if it is a finite number in (0, below), else a ConfigError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value < below:
        valid = "a finite number > 0" + (f" and < {below}" if below != math.inf else "")
        raise ConfigError(f"{source}: {name} must be {valid}, got {value!r} ({type(value).__name__}). "
                          "Fix that field of the config (e.g. 1e-05 for an eps, 500000.0 for rope_theta).")
    return float(value)


def moe_layer_pattern(num_layers: int, start: int = MOE_DEFAULT_START, end: int = -1,
                      interval: int = 1) -> tuple[bool, ...]:
    """Which of ``num_layers`` layers hold an MoE block: ``start <= l <= end`` and ``(l + 1) % interval == 0``.

    This is the reference's rule, counted from layer 0, not from the start (interval 2 from layer 0:
    layers 1, 3, 5, ...). ``end`` < 0 means the last layer.
    """
    end = num_layers - 1 if end is None or end < 0 else end
    return tuple(start <= l <= end and (l + 1) % interval == 0 for l in range(num_layers))


# ================================================================================ the decoder
@dataclass
class ErnieConfig:
    """Every hyper-parameter the text decoder needs (MoE fields are used only by MoE models)."""

    model_type: str = "ernie4_5"
    vocab_size: int = 103424          # SentencePiece pieces + special tokens
    hidden_size: int = 1024           # width of the residual stream
    intermediate_size: int = 3072     # width of the SwiGLU MLP
    num_hidden_layers: int = 18       # decoder layers
    num_attention_heads: int = 16     # query heads
    num_key_value_heads: int = 2      # key/value heads (GQA: 8 query heads share one KV head)
    head_dim: int = 128               # per-head width; NOT hidden/heads for the 0.3B (1024/16 = 64)
    max_position_embeddings: int = 131072  # context length (128K)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0      # RoPE base
    tie_word_embeddings: bool = True  # lm_head shares the embedding matrix
    use_bias: bool = False            # biases in attention / MLP projections
    hidden_act: str = "silu"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    # --- mixture of experts (ignored by dense models) ---
    moe_num_experts: int = 0          # routed experts per MoE layer (0 = dense model)
    moe_k: int = 0                    # experts chosen per token
    moe_intermediate_size: int = 0    # width of one expert's SwiGLU
    moe_num_shared_experts: int = 0   # experts every token passes through
    moe_layer_start_index: int = MOE_DEFAULT_START  # layers before this one are dense
    moe_layer_end_index: int = -1     # last MoE layer (-1 = the last layer)
    moe_layer_interval: int = 1       # MoE where (layer_idx + 1) % interval == 0 (see moe_layer_pattern)
    moe_norm_min: float = 1e-12       # clamp of the top-k weight sum before renormalising
    mlp_layer_types: tuple[str, ...] | None = None  # explicit "dense"/"sparse" per layer (VL files); wins
    extra: dict = field(default_factory=dict)  # keys we read but do not use, kept for saving

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "ErnieConfig":
        """Build a config from the contents of a config.json (either rope dialect)."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}.")
        data = dict(raw)
        model_type = data.get("model_type") or model_type_from_architectures(data.get("architectures"))
        if model_type in VL_MODEL_TYPES:
            model_type = "ernie4_5_vl_moe"
        if model_type not in ARCHITECTURES:
            known = ", ".join(sorted(ARCHITECTURES))
            raise ConfigError(
                f"{source}: model_type {model_type!r} (architectures {data.get('architectures')}) is not "
                f"an ERNIE 4.5 architecture this kit builds. Known model types: {known}. "
                "Point load_model at an ERNIE 4.5 checkpoint folder."
            )
        missing = [key for key in REQUIRED_KEYS if data.get(key) is None]
        if missing:
            raise ConfigError(f"{source} has no {', '.join(map(repr, missing))}; a config.json of an ERNIE 4.5 "
                              "model always carries them. Pass the full config.json contents.")
        data["model_type"] = model_type
        rope = data.pop("rope_parameters", None) or data.pop("rope_scaling", None) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be a JSON object like "
                              f"{{'rope_type': 'default', 'rope_theta': 500000.0}}, got {rope!r}.")
        if "rope_theta" not in data and "rope_theta" in rope:
            data["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") not in ("default", None):
            raise ConfigError(f"{source}: rope_type {rope['rope_type']!r} is not supported (only 'default').")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        if known.get("head_dim") is None:
            width = check_int(source, "hidden_size", known["hidden_size"])
            heads = check_int(source, "num_attention_heads", known["num_attention_heads"])
            if width % heads:
                raise ConfigError(f"{source}: hidden_size ({width}) is not a multiple of num_attention_heads ({heads}) "
                                  "and no head_dim is given; give head_dim, or a head count that divides the width.")
            known["head_dim"] = width // heads
        if known.get("num_key_value_heads") is None:
            known["num_key_value_heads"] = known["num_attention_heads"]
        for key in ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts",
                    "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval", "mlp_layer_types"):
            if known.get(key) is None:
                known.pop(key, None)
        if "mlp_layer_types" in known:
            known["mlp_layer_types"] = tuple(known["mlp_layer_types"])
        try:
            config = cls(**known, extra=extra)
        except TypeError as err:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {err}") from None
        config.validate(source)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> "ErnieConfig":
        """Read ``config.json`` (or the folder holding it)."""
        raw, path = read_config_json(path)
        return cls.from_dict(raw, source=str(path))

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "config") -> None:
        """Raise ConfigError, naming the field, when the numbers cannot describe a working model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            check_int(source, name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention; valid "
                f"num_key_value_heads: {divisors(self.num_attention_heads)}."
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim ({self.head_dim}) must be even for rotary embeddings.")
        check_float(source, "rms_norm_eps", self.rms_norm_eps, below=1.0)
        check_float(source, "rope_theta", self.rope_theta)
        for name in ("tie_word_embeddings", "use_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: {name} must be true or false, got {getattr(self, name)!r}.")
        self._validate_token_ids(source)
        if self.hidden_act != "silu":
            raise ConfigError(f"{source}: hidden_act {self.hidden_act!r} is not supported (ERNIE 4.5 uses 'silu').")
        if self.mlp_layer_types is not None:
            if len(self.mlp_layer_types) != self.num_hidden_layers or not set(self.mlp_layer_types) <= {"dense", "sparse"}:
                raise ConfigError(f"{source}: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                                  f"{self.num_hidden_layers} layers, got {list(self.mlp_layer_types)}.")
        if self.is_moe:
            self._validate_moe(source)

    def _validate_token_ids(self, source: str) -> None:
        """pad / bos / eos ids are None or ids inside the vocabulary (an eos outside it would never stop)."""
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            ids = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
            if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size for i in ids):
                raise ConfigError(f"{source}: {name} must be a token id in 0 .. {self.vocab_size - 1} (or null), "
                                  f"got {value!r}.")

    def _validate_moe(self, source: str) -> None:
        """The MoE numbers of an MoE config: k experts out of E, of a positive width."""
        for name in ("moe_num_experts", "moe_k", "moe_intermediate_size", "moe_layer_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer in an MoE config, got {value!r}.")
            check_int(source, name, value)
        check_int(source, "moe_num_shared_experts", self.moe_num_shared_experts, low=0)
        check_int(source, "moe_layer_start_index", self.moe_layer_start_index, low=0)
        check_int(source, "moe_layer_end_index", self.moe_layer_end_index, low=-1)
        check_float(source, "moe_norm_min", self.moe_norm_min)
        if self.moe_k > self.moe_num_experts:
            raise ConfigError(f"{source}: moe_k ({self.moe_k}) cannot exceed moe_num_experts ({self.moe_num_experts}): "
                              f"each token picks k different experts. Valid moe_k: 1 .. {self.moe_num_experts}.")
        if not any(self.moe_layers):
            raise ConfigError(f"{source}: moe_num_experts is {self.moe_num_experts} but no layer is an MoE layer "
                              f"(moe_layer_start_index {self.moe_layer_start_index}, end {self.moe_layer_end_index}, "
                              f"interval {self.moe_layer_interval}, {self.num_hidden_layers} layers); the experts "
                              "would silently go unused. Fix the layer range or set moe_num_experts to 0.")

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        return bool(self.moe_num_experts)

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """Per layer: True where the layer holds an MoE block (``mlp_layer_types`` if given, else the rule)."""
        if not self.is_moe:
            return (False,) * self.num_hidden_layers
        if self.mlp_layer_types is not None:
            return tuple(kind == "sparse" for kind in self.mlp_layer_types)
        return moe_layer_pattern(self.num_hidden_layers, self.moe_layer_start_index, self.moe_layer_end_index,
                                 self.moe_layer_interval)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """True where decoder layer ``layer_idx`` holds an MoE block (see :func:`moe_layer_pattern`)."""
        layers = self.moe_layers
        return 0 <= layer_idx < len(layers) and layers[layer_idx]

    def get_text_config(self) -> "ErnieConfig":
        """The decoder's config: the config itself for a text model (a VLConfig returns its ``text``)."""
        return self

    def to_dict(self) -> dict:
        """The config as a Hub-style ``config.json`` dict (flat ``rope_theta``)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if data["mlp_layer_types"] is None:
            data.pop("mlp_layer_types")
        else:
            data["mlp_layer_types"] = list(data["mlp_layer_types"])
        if not self.is_moe:
            data = {k: v for k, v in data.items() if not k.startswith("moe_")}
        data["architectures"] = [ARCHITECTURES[self.model_type][0]]
        data.update(self.extra)
        return data


# ================================================================================ the ViT
@dataclass
class VisionConfig:
    """The ViT and adapter shapes (defaults: ERNIE 4.5 VL 28B-A3B)."""

    depth: int = 32                   # ViT blocks
    hidden_size: int = 1280           # ViT width
    num_heads: int = 16               # attention heads (head_dim 80)
    intermediate_size: int = 5120     # ViT MLP width
    patch_size: int = 14              # a patch is 14 x 14 pixels
    in_channels: int = 3
    spatial_merge_size: int = 2       # the adapter merges 2 x 2 patches ...
    temporal_merge_size: int = 2      # ... and 2 frames into one decoder token
    layer_norm_eps: float = 1e-6      # the Hub calls it rms_norm_eps, but these are LayerNorms
    rope_theta: float = 10000.0
    text_hidden_size: int = 2560      # the adapter's output width = the decoder's width
    text_rms_norm_eps: float = 1e-5   # the adapter ends with the decoder's kind of RMSNorm

    @classmethod
    def from_dict(cls, vision: dict, text_hidden_size: int, text_rms_norm_eps: float = 1e-5,
                  top_level: dict | None = None, source: str = "config") -> "VisionConfig":
        """From a checkpoint's ``vision_config`` dict and the text decoder's width.

        Baidu's original files name the ViT width ``embed_dim`` and give the MLP as ``mlp_ratio`` (there
        ``hidden_size`` is the decoder's width), and keep the merge sizes at the top level
        (``spatial_conv_size``, ``temporal_conv_size``): ``top_level`` is that outer dict.
        """
        if not isinstance(vision, dict):
            raise ConfigError(f"{source}: vision_config must be a JSON object, got {type(vision).__name__}.")
        top = top_level or {}
        rope = vision.get("rope_parameters") or {}
        if "embed_dim" in vision:
            width = check_int(f"{source}: vision_config", "embed_dim", vision["embed_dim"])
            mlp = int(width * vision.get("mlp_ratio", 4))
        else:
            width = vision.get("hidden_size", cls.hidden_size)
            mlp = vision.get("intermediate_size", 4 * width)
        config = cls(
            depth=vision.get("depth", cls.depth), hidden_size=width, num_heads=vision.get("num_heads", cls.num_heads),
            intermediate_size=mlp, patch_size=vision.get("patch_size", cls.patch_size),
            in_channels=vision.get("in_channels", cls.in_channels),
            spatial_merge_size=vision.get("spatial_merge_size", top.get("spatial_conv_size", cls.spatial_merge_size)),
            temporal_merge_size=vision.get("temporal_merge_size", top.get("temporal_conv_size", cls.temporal_merge_size)),
            layer_norm_eps=vision.get("rms_norm_eps", vision.get("layer_norm_eps", cls.layer_norm_eps)),
            rope_theta=rope.get("rope_theta", vision.get("rope_theta", cls.rope_theta)),
            text_hidden_size=text_hidden_size, text_rms_norm_eps=text_rms_norm_eps,
        )
        act = vision.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ConfigError(f"{source}: vision_config.hidden_act {act!r} is not supported (ERNIE 4.5 VL uses 'quick_gelu').")
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "patch_size", "in_channels",
                     "spatial_merge_size", "temporal_merge_size"):
            value = getattr(config, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: vision_config.{name} must be a positive integer, got {value!r}.")
            check_int(f"{source}: vision_config", name, value)
        check_float(f"{source}: vision_config", "rms_norm_eps (layer_norm_eps)", config.layer_norm_eps, below=1.0)
        check_float(f"{source}: vision_config", "rope_theta", config.rope_theta)
        if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
            raise ConfigError(f"{source}: vision_config.hidden_size {config.hidden_size} / num_heads {config.num_heads} must be "
                              "a multiple of 4 (2-D rotary splits each head into row and column halves).")
        return config

    def to_dict(self) -> dict:
        """``vision_config`` as transformers writes it (the adapter's widths come from the decoder, not from here)."""
        return dict(model_type="ernie4_5_vl_moe_vision", depth=self.depth, hidden_size=self.hidden_size,
                    num_heads=self.num_heads, intermediate_size=self.intermediate_size, hidden_act="quick_gelu",
                    patch_size=self.patch_size, in_channels=self.in_channels,
                    spatial_merge_size=self.spatial_merge_size, temporal_merge_size=self.temporal_merge_size,
                    rms_norm_eps=self.layer_norm_eps,
                    rope_parameters=dict(rope_type="axial", rope_theta=self.rope_theta))


# ================================================================================ vision-language
DEFAULT_MROPE_SECTION = (22, 22, 20)  # rotary pairs for height, width, time (head_dim 128)
# Keys of Baidu's flat config.json that describe the whole model, not the decoder: ``to_dict`` keeps them out
# of ``text_config`` (the token ids go to the top; ``freq_allocation`` is ``mrope_section[2]``).
MODEL_LEVEL_KEYS = {"architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
                    "im_patch_id", "freq_allocation", "vision_config", "spatial_conv_size", "temporal_conv_size",
                    *VL_TOKEN_IDS}
# transformers' defaults for the VL decoder where a file leaves a key out (they differ from the text MoE's)
VL_TEXT_DEFAULTS = dict(moe_num_experts=64, moe_k=6, moe_intermediate_size=[1536, 512], moe_num_shared_experts=2)


@dataclass
class VLConfig:
    """A vision-language checkpoint's config: the decoder's, the ViT's, and what ties them together.

    ``model.config`` of the VL model is this whole config, as in transformers; decoder fields are also
    readable directly (``config.hidden_size`` is ``config.text.hidden_size``).
    """

    text: ErnieConfig                   # the decoder (moe_intermediate_size = text expert width)
    vision: VisionConfig                # the ViT and adapter
    vision_moe_intermediate_size: int   # vision expert width (512 in the 28B)
    mrope_section: tuple[int, int, int] = DEFAULT_MROPE_SECTION
    image_token_id: int = VL_TOKEN_IDS["image_token_id"]
    image_start_token_id: int = VL_TOKEN_IDS["image_start_token_id"]
    image_end_token_id: int = VL_TOKEN_IDS["image_end_token_id"]
    video_token_id: int = VL_TOKEN_IDS["video_token_id"]
    video_start_token_id: int = VL_TOKEN_IDS["video_start_token_id"]
    video_end_token_id: int = VL_TOKEN_IDS["video_end_token_id"]

    model_type = "ernie4_5_vl_moe"

    def __getattr__(self, name):  # only called for names the dataclass does not have
        if name.startswith("__") or name in ("text", "vision"):
            raise AttributeError(name)
        try:
            return getattr(self.text, name)
        except AttributeError:
            raise AttributeError(f"VLConfig has no field {name!r} (nor has its text config)") from None

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        return self.text.moe_layers

    @property
    def token_ids(self) -> dict[str, int]:
        """The special ids of pictures, as this checkpoint numbers them."""
        return {key: getattr(self, key) for key in VL_TOKEN_IDS}

    def get_text_config(self) -> ErnieConfig:
        return self.text

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "VLConfig":
        """Read a VL config.json: transformers' nested layout (``text_config`` / ``vision_config``) or
        Baidu's flat one (decoder keys at the top, list-valued ``moe_num_experts`` / ``moe_intermediate_size``)."""
        if not isinstance(raw, dict) or not isinstance(raw.get("vision_config"), dict):
            raise ConfigError(f"{source}: a vision-language config needs a 'vision_config' section.")
        nested = isinstance(raw.get("text_config"), dict)
        text = dict(raw["text_config"] if nested else {k: v for k, v in raw.items() if k != "vision_config"})
        for key, value in VL_TEXT_DEFAULTS.items():
            text.setdefault(key, value)
        if "tie_word_embeddings" in raw:  # the whole model's flag wins over the text part's default
            text["tie_word_embeddings"] = raw["tie_word_embeddings"]
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        if not isinstance(text.get("hidden_size"), int) or not isinstance(text.get("num_attention_heads"), int):
            raise ConfigError(f"{source}: the decoder needs integer hidden_size and num_attention_heads.")
        check_int(source, "hidden_size", text["hidden_size"])
        check_int(source, "num_attention_heads", text["num_attention_heads"])
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: rope_parameters must be a JSON object, got {rope!r}.")
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        section = rope.get("mrope_section") or _section_from_freq_allocation(text, head_dim)
        widths = _pair(text["moe_intermediate_size"], "moe_intermediate_size", source)
        experts = _pair(text["moe_num_experts"], "moe_num_experts", source)
        if experts[0] != experts[1]:
            raise ConfigError(f"{source}: text and vision expert counts differ ({experts}); this kit needs equal groups.")
        k = _pair(text["moe_k"], "moe_k", source)
        for key, pick in (("moe_layer_start_index", min), ("moe_layer_end_index", max)):
            if isinstance(text.get(key), (list, tuple)):  # Baidu's flat files: one value per group
                text[key] = pick(text[key])
        text.update(model_type="ernie4_5_vl_moe", moe_intermediate_size=widths[0], moe_num_experts=experts[0],
                    moe_k=k[0])
        text_config = ErnieConfig.from_dict(text, source=source)
        ids = {key: raw.get(key, text.get(key, default)) for key, default in VL_TOKEN_IDS.items()}
        ids["image_token_id"] = raw.get("im_patch_id", ids["image_token_id"])
        vision = VisionConfig.from_dict(raw["vision_config"], text_config.hidden_size, text_config.rms_norm_eps,
                                        top_level=raw, source=source)
        from .rope3d import check_mrope_section

        return cls(text=text_config, vision=vision, vision_moe_intermediate_size=widths[1],
                   mrope_section=check_mrope_section(head_dim, section), **ids)

    def to_dict(self) -> dict:
        """transformers' nested config.json, which transformers, vLLM and ``from_dict`` read back: the decoder
        in ``text_config`` (expert widths as [text, vision], MoE layers as ``mlp_layer_types``, the 3-D rotary
        split in ``rope_parameters``), the ViT and adapter in ``vision_config``, the token ids at the top."""
        decoder = {key: value for key, value in self.text.to_dict().items()
                   if key not in MODEL_LEVEL_KEYS and not key.startswith("moe_layer_") and key != "rope_theta"}
        decoder.update(
            model_type="ernie4_5_vl_moe_text",
            moe_intermediate_size=[self.text.moe_intermediate_size, self.vision_moe_intermediate_size],
            mlp_layer_types=["sparse" if moe else "dense" for moe in self.moe_layers],
            rope_parameters=dict(rope_type="default", rope_theta=self.text.rope_theta,
                                 mrope_section=list(self.mrope_section)),
        )
        return dict(architectures=[ARCHITECTURES[self.model_type][0]], model_type=self.model_type,
                    tie_word_embeddings=self.text.tie_word_embeddings, text_config=decoder,
                    vision_config=self.vision.to_dict(), **self.token_ids)

    @classmethod
    def from_file(cls, path) -> "VLConfig":
        raw, path = read_config_json(path)
        return cls.from_dict(raw, source=str(path))


def divisors(n: int) -> list[int]:
    """The divisors of n, for messages that list the valid values."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _pair(value, name: str, source: str) -> tuple[int, int]:
    """(text, vision) from a list of two or a single number used for both."""
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ConfigError(f"{source}: {name} must be a positive integer or [text, vision], got {value!r}.")
    return values[0], values[1]


def _section_from_freq_allocation(text: dict, head_dim: int) -> tuple[int, int, int]:
    """Baidu's flat configs give only the time slots ('freq_allocation', 20); h and w split the rest."""
    time = text.get("freq_allocation", DEFAULT_MROPE_SECTION[2])
    return ((head_dim // 2 - time) // 2, (head_dim // 2 - time) // 2, time)


# ================================================================================ one entry point
def is_vision_language(raw: dict) -> bool:
    """The one test of whether a config.json describes a vision-language model."""
    return isinstance(raw, dict) and (
        raw.get("model_type") in VL_MODEL_TYPES
        or any(name in ARCHITECTURES["ernie4_5_vl_moe"] for name in raw.get("architectures") or ())
        or "text_config" in raw or "vision_config" in raw or isinstance(raw.get("moe_num_experts"), (list, tuple)))


def parse_config(raw: dict, *, source: str = "config") -> ErnieConfig | VLConfig:
    """The parsed config of any ERNIE 4.5 config.json: a VLConfig for vision-language models, else an ErnieConfig."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}.")
    if is_vision_language(raw):
        return VLConfig.from_dict(raw, source=source)
    return ErnieConfig.from_dict(raw, source=source)


def read_config_json(path: str | Path) -> tuple[dict, Path]:
    """The parsed ``config.json`` (given the file or its folder) and its path; ConfigError if absent or broken."""
    path = Path(path)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"Permission denied reading the folder {path}: make it readable for this user "
                              "(chmod a+rx) or copy the checkpoint somewhere you own.")
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"No config.json at {path}. A checkpoint folder must hold config.json next to its "
            "*.safetensors files; download the full model folder (see README: 'Real weights')."
        )
    return read_json_file(path, ConfigError, what="config.json"), path


def read_json_file(path: Path, error: type = ConfigError, *, what: str = "file", max_bytes: int = MAX_CONFIG_BYTES):
    """The parsed JSON of a small file (config, index), as ``error`` when it is too big, unreadable or broken."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path} is {size} bytes; a {what} is a few KB (at most {max_bytes} bytes are read). "
                        "It is not a real one: re-download it.")
        with open(path, "rb") as handle:
            return json.loads(handle.read(max_bytes + 1).decode("utf-8"))
    except PermissionError:
        raise error(f"Permission denied reading {path}: make it readable for this user (chmod a+r, or copy the "
                    "checkpoint folder somewhere you own).") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise error(f"{path} is not valid JSON ({err}). Re-download the file.") from None


def model_type_from_architectures(architectures) -> str | None:
    for model_type, names in ARCHITECTURES.items():
        if any(name in names for name in architectures or ()):
            return model_type
    return None


_model_type_from_architectures = model_type_from_architectures  # the earlier private name


# --------------------------------------------------------------------------------------------
# The published shapes, as configs. The literal tables, a comment on every field, live in published.py.
# --------------------------------------------------------------------------------------------
from .published import CONFIG_0_3B, CONFIG_21B_A3B, CONFIG_300B_A47B  # noqa: E402

ERNIE_0_3B = ErnieConfig.from_dict(CONFIG_0_3B, source="checkpoints.CONFIG_0_3B")
ERNIE_21B_A3B = ErnieConfig.from_dict(CONFIG_21B_A3B, source="checkpoints.CONFIG_21B_A3B")
ERNIE_300B_A47B = ErnieConfig.from_dict(CONFIG_300B_A47B, source="checkpoints.CONFIG_300B_A47B")

"""ERNIE 4.5 VL: the ViT + adapter in front of a decoder whose MoE keeps text and vision apart.

    h_0 = E[ids], with the rows of image / video placeholders replaced by adapter tokens
    h   = h + Attention(RMSNorm(h))          rotary angles from 3-D (t, h, w) positions (rope3d.py)
    h   = h + MLP(RMSNorm(h))                dense in the first layer(s), else the two-group MoE below
    logits = RMSNorm(h_L) E^T

The heterogeneous MoE (modality-isolated routing): a text token is routed by the text router among
the E text experts (width 1536 in the 28B), a vision token (placeholder or start/end marker) by the
vision router among the E vision experts (width 512); each group is ordinary ERNIE routing
(``moe.route`` + ``moe.dispatch``). Shared experts see every token. The Hub stores both groups in one
expert list (text first), the two routers as ``gate.weight`` / ``gate.weight_1`` of shape
(hidden, experts), and one correction-bias row per group in ``moe_statics``; the module names below
are the Hub's, so only the vision tensors need ``vision.VISION_NAME_MAP``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import Attention, padding_mask
from .config import ARCHITECTURES, ErnieConfig, read_config_json
from .errors import ConfigError, InputError
from .kv_cache import KVCache
from .mlp import SwiGLU
from .model import CausalLMOutput, check_input_ids
from .moe import MoEStatics, dispatch, route, router_logits
from .norm import RMSNorm
from .rope3d import (DEFAULT_MROPE_SECTION, check_mrope_section, modality_types, position_ids_3d, rope_angles_3d,
                     routing_types)
from .routing import TEXT, VISION, RoutingTap
from .special_tokens import TOKEN_IDS  # config.json key -> default id of the six picture tokens
from .vision import VisionAdapter, VisionConfig, VisionEncoder, tokens_per_item

# Keys of Baidu's flat config.json that describe the whole model, not the decoder: ``to_dict`` keeps them out
# of ``text_config`` (the token ids go to the top; ``freq_allocation`` is ``mrope_section[2]``).
MODEL_LEVEL_KEYS = {"architectures", "model_type", "dtype", "torch_dtype", "transformers_version",
                    "im_patch_id", "freq_allocation", "vision_config", *TOKEN_IDS}


# ================================================================================ configuration
@dataclass
class VLConfig:
    """A vision-language checkpoint's config: the decoder's, the ViT's, and what ties them together."""

    text: ErnieConfig                   # the decoder (moe_intermediate_size = text expert width)
    vision: VisionConfig                # the ViT and adapter
    vision_moe_intermediate_size: int   # vision expert width (512 in the 28B)
    moe_layers: tuple[bool, ...]        # which decoder layers hold the MoE block
    mrope_section: tuple[int, int, int] = DEFAULT_MROPE_SECTION
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307

    model_type = "ernie4_5_vl_moe"

    @property
    def tie_word_embeddings(self) -> bool:
        return self.text.tie_word_embeddings

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "config") -> "VLConfig":
        """Read a VL config.json: transformers' nested layout (``text_config`` / ``vision_config``) or
        Baidu's flat one (decoder keys at the top, list-valued ``moe_num_experts`` / ``moe_intermediate_size``)."""
        if not isinstance(raw, dict) or "vision_config" not in raw:
            raise ConfigError(f"{source}: a vision-language config needs a 'vision_config' section.")
        text = dict(raw.get("text_config") or {k: v for k, v in raw.items() if k != "vision_config"})
        text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", True))
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        section = rope.get("mrope_section") or _section_from_freq_allocation(text, head_dim)
        widths = _pair(text.get("moe_intermediate_size", [1536, 512]), "moe_intermediate_size", source)
        experts = _pair(text.get("moe_num_experts", 64), "moe_num_experts", source)
        if experts[0] != experts[1]:
            raise ConfigError(f"{source}: text and vision expert counts differ ({experts}); this kit needs equal groups.")
        layer_types = text.pop("mlp_layer_types", None)
        text.update(model_type="ernie4_5_vl_moe", moe_intermediate_size=widths[0], moe_num_experts=experts[0])
        text_config = ErnieConfig.from_dict(text, source=source)
        if layer_types is None:
            moe_layers = tuple(text_config.is_moe_layer(i) for i in range(text_config.num_hidden_layers))
        else:
            moe_layers = tuple(kind == "sparse" for kind in layer_types)
            if len(moe_layers) != text_config.num_hidden_layers:
                raise ConfigError(f"{source}: mlp_layer_types has {len(moe_layers)} entries for "
                                  f"{text_config.num_hidden_layers} layers.")
        ids = {key: raw.get(key, text.get(key, default)) for key, default in TOKEN_IDS.items()}
        ids["image_token_id"] = raw.get("im_patch_id", ids["image_token_id"])
        vision = VisionConfig.from_dict(raw["vision_config"], text_config.hidden_size, text_config.rms_norm_eps)
        return cls(text=text_config, vision=vision, vision_moe_intermediate_size=widths[1], moe_layers=moe_layers,
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
                    tie_word_embeddings=self.tie_word_embeddings, text_config=decoder,
                    vision_config=_vision_dict(self.vision), **{key: getattr(self, key) for key in TOKEN_IDS})

    @classmethod
    def from_file(cls, path) -> "VLConfig":
        raw, path = read_config_json(path)
        return cls.from_dict(raw, source=str(path))


def _vision_dict(vision: VisionConfig) -> dict:
    """``vision_config`` as transformers writes it (the adapter's widths come from the decoder, not from here)."""
    return dict(model_type="ernie4_5_vl_moe_vision", depth=vision.depth, hidden_size=vision.hidden_size,
                num_heads=vision.num_heads, intermediate_size=vision.intermediate_size, hidden_act="quick_gelu",
                patch_size=vision.patch_size, in_channels=vision.in_channels,
                spatial_merge_size=vision.spatial_merge_size, temporal_merge_size=vision.temporal_merge_size,
                rms_norm_eps=vision.layer_norm_eps, rope_parameters=dict(rope_type="axial", rope_theta=vision.rope_theta))


def _pair(value, name: str, source: str) -> tuple[int, int]:
    """(text, vision) from a list of two or a single number used for both."""
    values = list(value) if isinstance(value, (list, tuple)) else [value, value]
    if len(values) != 2 or not all(isinstance(v, int) and v > 0 for v in values):
        raise ConfigError(f"{source}: {name} must be a positive integer or [text, vision], got {value!r}.")
    return values[0], values[1]


def _section_from_freq_allocation(text: dict, head_dim: int) -> tuple[int, int, int]:
    """Baidu's flat configs give only the time slots ('freq_allocation', 20); h and w split the rest."""
    time = text.get("freq_allocation", DEFAULT_MROPE_SECTION[2])
    return ((head_dim // 2 - time) // 2, (head_dim // 2 - time) // 2, time)


# ================================================================================ the MoE block
class GroupRouters(nn.Module):
    """The two routers of a VL MoE layer, stored (hidden, experts) like the Hub files:
    ``weight`` routes text tokens, ``weight_1`` vision tokens."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, num_experts))
        self.weight_1 = nn.Parameter(torch.zeros(hidden, num_experts))

    def logits(self, x: torch.Tensor, group: int) -> torch.Tensor:  # (n, H) -> (n, E), float32
        weight = self.weight if group == TEXT else self.weight_1
        return router_logits(x, weight.T)


class VLMoEBlock(nn.Module):
    """Modality-isolated MoE: each token is routed only inside its own group of experts."""

    def __init__(self, config: VLConfig, layer_idx: int):
        super().__init__()
        text = config.text
        hidden, E = text.hidden_size, text.moe_num_experts
        self.num_experts, self.k, self.norm_min = E, text.moe_k, text.moe_norm_min
        self.gate = GroupRouters(hidden, E)
        self.moe_statics = MoEStatics(2, E)  # row 0: text bias, row 1: vision bias
        widths = [text.moe_intermediate_size] * E + [config.vision_moe_intermediate_size] * E
        self.experts = nn.ModuleList(SwiGLU(hidden, width, text.use_bias) for width in widths)  # text, then vision
        shared = text.moe_num_shared_experts
        self.shared_experts = SwiGLU(hidden, text.moe_intermediate_size * shared, text.use_bias) if shared else None
        self.routing_tap = RoutingTap(layer_idx, E)
        self.router_logits: torch.Tensor | None = None  # (N, E) while training, for losses.modality_balancing_losses

    def forward(self, x: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """x (B, T, H); modality (B, T): 0 = text, 1 = vision.  Returns (B, T, H)."""
        tokens = x.reshape(-1, x.shape[-1])                         # (N, H)
        modality = modality.reshape(-1).to(tokens.device)           # (N,)
        N, E = tokens.shape[0], self.num_experts
        y = torch.zeros_like(tokens)
        ids = torch.zeros(N, self.k, dtype=torch.long, device=tokens.device)  # routing, gathered for the record
        weights = torch.zeros(N, self.k, device=tokens.device)
        probs = torch.zeros(N, E, device=tokens.device)
        all_logits = torch.zeros(N, E, device=tokens.device)
        for group in (TEXT, VISION):
            rows = (modality == group).nonzero().squeeze(1)          # the tokens of this group
            if rows.numel() == 0:
                continue
            logits = self.gate.logits(tokens[rows], group)           # (n, E)
            routing = route(logits, self.k, self.norm_min, self.moe_statics.e_score_correction_bias[group])
            experts = self.experts[group * E:(group + 1) * E]
            y[rows] = dispatch(tokens[rows], routing.expert_ids, routing.weights.to(x.dtype), experts)
            ids[rows], weights[rows], probs[rows] = routing.expert_ids, routing.weights, routing.probs
            all_logits = all_logits.index_put((rows,), logits)
        self.routing_tap(ids, weights, probs, modality)
        self.router_logits = all_logits if self.training else None
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)
        return y.view(x.shape)


class VLDecoderLayer(nn.Module):
    """The decoder layer of ``model.py`` with the MoE told which tokens are vision tokens."""

    def __init__(self, config: VLConfig, layer_idx: int):
        super().__init__()
        text = config.text
        self.attn_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.attn = Attention(text, layer_idx)
        self.mlp_norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.is_moe = config.moe_layers[layer_idx]
        self.mlp = VLMoEBlock(config, layer_idx) if self.is_moe else SwiGLU(
            text.hidden_size, text.intermediate_size, text.use_bias)

    def forward(self, x, rope, mask, cache, modality):  # (B, T, hidden) -> (B, T, hidden)
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        h = self.mlp_norm(x)
        return x + (self.mlp(h, modality) if self.is_moe else self.mlp(h))


# ================================================================================ the model
class ErnieVLForConditionalGeneration(nn.Module):
    """ERNIE 4.5 VL. ``model.config`` is the decoder's ErnieConfig (what ``generate`` and the KV cache
    read); ``model.vl_config`` holds the rest."""

    def __init__(self, config: VLConfig):
        super().__init__()
        text = config.text
        self.config, self.vl_config = text, config
        self.embed = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = nn.ModuleList(VLDecoderLayer(config, i) for i in range(text.num_hidden_layers))
        self.norm = RMSNorm(text.hidden_size, text.rms_norm_eps)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        if text.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.vision = VisionEncoder(config.vision)
        self.adapter = VisionAdapter(config.vision)

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Pixels of images or videos -> decoder tokens (tokens, hidden), in order."""
        pixel_values = pixel_values.to(self.embed.weight.device, self.vision.patch_embed.proj.weight.dtype)
        return self.adapter(self.vision(pixel_values, grid_thw), grid_thw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids (B, T) with one placeholder id per vision token; pixels and grids from ``vision.preprocess_*``.

        With pictures, positions are 3-D and computed here from the ids (``position_ids`` is ignored);
        the cache remembers the offset (``cache.position_offset``) so later tokens continue at the right place.
        """
        past = cache.length if cache is not None else 0
        check_input_ids(input_ids, self.config, past)
        B, T = input_ids.shape
        has_vision = pixel_values is not None or pixel_values_videos is not None
        h = self.embed(input_ids)  # (B, T, hidden)
        h = self._insert(h, input_ids, self.vl_config.image_token_id, pixel_values, image_grid_thw, "image")
        h = self._insert(h, input_ids, self.vl_config.video_token_id, pixel_values_videos, video_grid_thw, "video")

        positions = self._positions(input_ids, attention_mask, cache, position_ids, image_grid_thw,
                                    video_grid_thw, has_vision)
        rope = rope_angles_3d(positions, self.config.head_dim, self.config.rope_theta, self.vl_config.mrope_section)
        modality = self._routing_modality(input_ids) if has_vision else torch.zeros_like(input_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = padding_mask(attention_mask.to(input_ids.device), T)
        for layer in self.layers:
            h = layer(h, rope, mask, cache, modality)
        if cache is not None:
            cache.advance(T)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return CausalLMOutput(logits=self.lm_head(self.norm(h)), cache=cache)

    def _insert(self, h, input_ids, token_id, pixels, grid, kind):
        """Put the adapter's tokens where the placeholders are (in reading order)."""
        slots = input_ids == token_id
        if pixels is None:
            if bool(slots.any()):
                raise InputError(f"input_ids hold {int(slots.sum())} {kind} placeholder tokens but no {kind} pixels "
                                 "were given; pass pixel_values=... / image_grid_thw=... (or the video ones).")
            return h
        if grid is None:
            raise InputError(f"{kind} pixels need their grid: pass {kind}_grid_thw from the preprocessor.")
        expected = sum(tokens_per_item(grid, self.vl_config.vision.spatial_merge_size))
        if int(slots.sum()) != expected:
            raise InputError(f"the prompt has {int(slots.sum())} {kind} placeholder tokens but the {kind}s give "
                             f"{expected} tokens; build the prompt with ernie_lab.processor so the counts agree.")
        features = self.encode_vision(pixels, grid).to(h.dtype)  # (expected, hidden)
        h = h.clone()
        h[slots] = features
        return h

    def _routing_modality(self, input_ids):
        c = self.vl_config
        types = routing_types(input_ids, c.image_token_id, c.video_token_id,
                              (c.image_start_token_id, c.image_end_token_id),
                              (c.video_start_token_id, c.video_end_token_id))
        return (types > 0).long()  # images and videos share the vision experts

    def _positions(self, input_ids, attention_mask, cache, position_ids, image_grid, video_grid, has_vision):
        """(3, B, T) positions with pictures; (B, T) text positions shifted by the cached offset otherwise."""
        B, T = input_ids.shape
        if has_vision:
            if cache is not None and cache.length:
                raise InputError("pictures must come with the whole prompt in one call (an empty cache).")
            c = self.vl_config
            mask = attention_mask[:, -T:] if attention_mask is not None else None
            types = modality_types(input_ids, c.image_token_id, c.video_token_id)
            positions, deltas = position_ids_3d(types, image_grid, video_grid, mask,
                                                c.vision.spatial_merge_size, c.vision.temporal_merge_size)
            if cache is not None:
                cache.position_offset = deltas  # (B, 1): where each row's text positions continue
            return positions.to(input_ids.device)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        offset = cache.position_offset if cache is not None else None
        return position_ids + offset.to(position_ids.device) if offset is not None else position_ids

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


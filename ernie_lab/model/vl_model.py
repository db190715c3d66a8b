"""ERNIE 4.5 VL: the ViT + adapter in front of a decoder whose MoE keeps text and vision apart.

    h_0 = E[ids], with the rows of image / video placeholders replaced by adapter tokens
    h   = h + Attention(RMSNorm(h))          rotary angles from 3-D (t, h, w) positions (rope3d.py)
    h   = h + MLP(RMSNorm(h))                dense in the first layer(s), else the two-group MoE below
    logits = RMSNorm(h_L) E^T

The model is the text decoder of ``model.py`` (one decoder for every ERNIE 4.5 model) with three
changes: its input embeddings get the vision tokens spliced in, its rotary angles come from 3-D
positions, and its MLP factory builds two-group MoE blocks. That heterogeneous MoE (modality-isolated
routing) is ``moe.MoEBlock`` with two expert groups: a text token is routed by the text router among
the E text experts (width 1536 in the 28B), a vision token (placeholder or start/end marker) by the
vision router among the E vision experts (width 512). Shared experts see every token. The Hub stores
both groups in one expert list (text first), the two routers as ``gate.weight`` / ``gate.weight_1`` of
shape (hidden, experts), and one correction-bias row per group in ``moe_statics``
(``hub_names.VL_NAME_MAP`` says how those names map).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import MODEL_LEVEL_KEYS, VLConfig  # noqa: F401  (VLConfig lived here; config.py reads every dialect)
from ..errors import InputError
from .kv_cache import KVCache
from .mlp import SwiGLU
from .decoder import CausalLMOutput, ErnieConfig, ErnieForCausalLM, check_input_ids
from .moe import MoEBlock
from .rope3d import modality_types, position_ids_3d, rope_angles_3d, routing_types
from .special_tokens import TEXT, TOKEN_IDS, VISION  # TOKEN_IDS: config.json key -> default id
from .vision import VisionAdapter, VisionEncoder, tokens_per_item


# ================================================================================ modality -> expert group
def routing_groups(input_ids: torch.Tensor, config: VLConfig) -> torch.Tensor:
    """(B, T) expert group of every token: VISION for image / video placeholders and their start/end
    markers (images and videos share the vision experts), TEXT for everything else."""
    types = routing_types(input_ids, config.image_token_id, config.video_token_id,
                          (config.image_start_token_id, config.image_end_token_id),
                          (config.video_start_token_id, config.video_end_token_id))
    return torch.where(types > 0, VISION, TEXT)


def vl_mlp_factory(config: VLConfig):
    """The MLP factory of the VL decoder: dense SwiGLU, or an MoE block with a text and a vision group."""
    widths = (config.text.moe_intermediate_size, config.vision_moe_intermediate_size)  # group TEXT, group VISION

    def make(text: ErnieConfig, layer_idx: int) -> nn.Module:
        if config.moe_layers[layer_idx]:
            return MoEBlock(text, layer_idx, group_widths=widths)
        return SwiGLU(text.hidden_size, text.intermediate_size, text.use_bias)

    return make


# ================================================================================ the model
class ErnieVLForConditionalGeneration(ErnieForCausalLM):
    """ERNIE 4.5 VL: the ViT (``vision``) and adapter (``adapter``) in front of the ERNIE decoder.
    ``model.config`` is the whole :class:`VLConfig` (``.text`` for the decoder, ``.vision`` for the ViT)."""

    def __init__(self, config: VLConfig):
        super().__init__(config, mlp_factory=vl_mlp_factory(config))
        self.vision = VisionEncoder(config.vision)
        self.adapter = VisionAdapter(config.vision)

    @property
    def vl_config(self) -> VLConfig:  # the earlier name of the whole config
        return self.config

    def rotary(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary angles from 3-D positions (3, B, T), or plain (B, T) text positions (t = h = w)."""
        text = self.text_config
        return rope_angles_3d(position_ids, text.head_dim, text.rope_theta, self.config.mrope_section)

    def encode_vision(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Pixels of images or videos -> decoder tokens (tokens, hidden), in order."""
        pixel_values = pixel_values.to(self.embed.weight.device, self.compute_dtype)
        return self.adapter(self.vision(pixel_values, grid_thw), grid_thw)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, position_ids: torch.Tensor | None = None, logits_to_keep: int = 0,
                pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                *, labels: torch.Tensor | None = None, output_router_logits: bool = False,
                logits_for_labels_only: bool = False) -> CausalLMOutput:
        """input_ids (B, T) with one placeholder id per vision token; pixels and grids from the preprocessor.

        With pictures, positions are 3-D and computed here from the ids (``position_ids`` is ignored);
        the cache remembers the offset (``cache.position_offset``) so later tokens continue at the right place.
        """
        past = cache.length if cache is not None else 0
        check_input_ids(input_ids, self.text_config, past)
        has_vision = pixel_values is not None or pixel_values_videos is not None
        h = self.embed(input_ids)  # (B, T, hidden)
        h = self._insert(h, input_ids, self.config.image_token_id, pixel_values, image_grid_thw, "image")
        h = self._insert(h, input_ids, self.config.video_token_id, pixel_values_videos, video_grid_thw, "video")
        positions = self._positions(input_ids, attention_mask, cache, position_ids, image_grid_thw,
                                    video_grid_thw, has_vision)
        modality = routing_groups(input_ids, self.config) if has_vision else None
        return super().forward(attention_mask=attention_mask, cache=cache, position_ids=positions,
                               logits_to_keep=logits_to_keep, inputs_embeds=h, labels=labels,
                               output_router_logits=output_router_logits, modality=modality,
                               logits_for_labels_only=logits_for_labels_only)

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
        expected = sum(tokens_per_item(grid, self.config.vision.spatial_merge_size))
        if int(slots.sum()) != expected:
            raise InputError(f"the prompt has {int(slots.sum())} {kind} placeholder tokens but the {kind}s give "
                             f"{expected} tokens; build the prompt with ernie_lab.processor so the counts agree.")
        features = self.encode_vision(pixels, grid).to(h.dtype)  # (expected, hidden)
        h = h.clone()
        h[slots] = features
        return h

    def _positions(self, input_ids, attention_mask, cache, position_ids, image_grid, video_grid, has_vision):
        """(3, B, T) positions with pictures; (B, T) text positions shifted by the cached offset otherwise."""
        B, T = input_ids.shape
        if has_vision:
            if cache is not None and cache.length:
                raise InputError("pictures must come with the whole prompt in one call (an empty cache).")
            c = self.config
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

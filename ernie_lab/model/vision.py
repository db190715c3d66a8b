"""The eyes of ERNIE 4.5 VL: patches -> ViT features -> tokens in the text width.

    (pictures --image_processing.py--> 14x14 patches, flattened 3*14*14 = 588 numbers)
    patches --Linear--> ViT blocks:  x = x + Attn(LN(x)),  x = x + MLP(LN(x))       (one frame at a time)
    adapter:  4 neighbouring patches (2x2) -> one vector,  2 frames -> one vector,  -> text width

Three ERNIE-specific twists: (1) positions inside the ViT are 2-D rotary angles (row, column) applied
rotate-half style (first half / second half of each head), unlike the text decoder's interleaved
pairs; (2) patches are stored already grouped by 2x2 merge window, so the adapter's spatial merge is a
plain reshape; (3) a still image is one frame duplicated in time, so images and videos share one
temporal merge. The module names follow the Hub's ``vision_model.*`` / ``resampler_model.*`` tensors;
``io.hub_names.VISION_NAME_MAP`` is the whole translation (``hub_names.vision_state_from_hub`` applies it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig  # its defaults are the published sizes: 14-pixel patches, 2x2 and 2-frame merges
from ..errors import ConfigError, InputError
from .norm import RMSNorm


# ================================================================================ 2-D rotary
def vision_positions(grid_thw: torch.Tensor, merge: int = VisionConfig.spatial_merge_size) -> torch.Tensor:
    """(row, column) of every patch, in the patchify order (merge windows).  Returns (N, 2) long."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
        windows = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(windows).transpose(1, 2).flatten()
        cols = cols.reshape(windows).transpose(1, 2).flatten()
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # every frame has the same layout
    return torch.cat(out)


def vision_rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, head_dim) for 2-D rotary, rotate-half layout.

    A quarter of the head's frequencies w_j = theta^(-4j/d) serve both axes: the angles are
    [row * w, col * w] (d/2 values), written twice so that dim i and dim i + d/2 share an angle.
    """
    freqs = 1.0 / theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32) / (head_dim // 2))  # (d/4,)
    angles = positions.float()[..., None] * freqs  # (N, 2, d/4)
    angles = angles.flatten(1)  # (N, d/2): row angles, then column angles
    angles = torch.cat([angles, angles], dim=-1)  # (N, d)
    return angles.cos(), angles.sin()


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) by the angle of dim i.  x: (N, H, d); cos, sin: (N, d)."""
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated_half = torch.cat([-second, first], dim=-1)
    return (x32 * cos[:, None] + rotated_half * sin[:, None]).to(x.dtype)


# ================================================================================ ViT
def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), CLIP's cheap approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class PatchEmbed(nn.Module):
    """A 14x14x3 patch (588 numbers) -> one vector: a convolution with stride 14 is just a Linear."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.proj = nn.Linear(config.in_channels * config.patch_size ** 2, config.hidden_size, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (N, 588) -> (N, width)
        return self.proj(pixel_values)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention within each frame (patches of other frames are invisible)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, rope, frame_lengths: list[int]) -> torch.Tensor:
        N, width = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # (N, H, d) each
        q, k = apply_rope_half(q, *rope), apply_rope_half(k, *rope)
        if len(set(frame_lengths)) == 1:  # frames of one size (a batch of equal pictures): one call for all
            F_, n = len(frame_lengths), frame_lengths[0]
            q, k, v = (t.view(F_, n, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (frames, H, n, d)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)                  # (frames, n, H, d)
            return self.proj(out.reshape(N, width))
        outputs = []
        for qf, kf, vf in zip(*(t.split(frame_lengths) for t in (q, k, v))):  # one frame at a time
            o = F.scaled_dot_product_attention(qf.transpose(0, 1), kf.transpose(0, 1), vf.transpose(0, 1))
            outputs.append(o.transpose(0, 1))  # (n, H, d)
        return self.proj(torch.cat(outputs).reshape(N, width))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm transformer block with LayerNorm (mean and bias, unlike the decoder's RMSNorm)."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = VisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x, rope, frame_lengths):
        x = x + self.attn(self.norm1(x), rope, frame_lengths)
        return x + self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    """The ViT (Hub prefix ``vision_model``): patches of all images/videos, packed -> features."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.depth))
        self.ln = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, 588), grid_thw (n, 3) with N = sum of t*h*w.  Returns (N, width)."""
        grid_thw = check_grid(pixel_values, grid_thw, self.config)
        head_dim = self.config.hidden_size // self.config.num_heads
        rope = vision_rope_angles(vision_positions(grid_thw, self.config.spatial_merge_size), head_dim,
                                  self.config.rope_theta)
        rope = tuple(r.to(pixel_values.device) for r in rope)
        frame_lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
        x = self.patch_embed(pixel_values)  # (N, width)
        for block in self.blocks:
            x = block(x, rope, frame_lengths)
        return self.ln(x)


def check_grid(pixel_values: torch.Tensor, grid_thw, config: VisionConfig) -> torch.Tensor:
    """Reject pixel / grid combinations that cannot come from the preprocessor."""
    grid_thw = torch.as_tensor(grid_thw).long().cpu().reshape(-1, 3)
    patch_dim = config.in_channels * config.patch_size ** 2
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise InputError(f"pixel_values must be (patches, {patch_dim}), got {tuple(pixel_values.shape)}. "
                         "Make them with ernie_lab.image_processing.preprocess_images.")
    if (grid_thw <= 0).any() or (grid_thw[:, 1:] % config.spatial_merge_size).any():
        raise InputError(f"grid_thw rows must be positive with even heights and widths, got {grid_thw.tolist()}.")
    if int(grid_thw.prod(-1).sum()) != pixel_values.shape[0]:
        raise InputError(f"grid_thw {grid_thw.tolist()} describes {int(grid_thw.prod(-1).sum())} patches but "
                         f"pixel_values holds {pixel_values.shape[0]}. Pass the grid that came with the pixels.")
    return grid_thw


# ================================================================================ adapter
class MergeMLP(nn.Module):
    """Linear -> GELU -> Linear -> LayerNorm, applied after concatenating patches (or frames)."""

    def __init__(self, in_dim: int, out_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(x))))


class VisionAdapter(nn.Module):
    """Hub prefix ``resampler_model``: ViT features -> decoder tokens, 4 patches x 2 frames per token.

        x_s = MLP_s( concat of a 2x2 window )                        (N/4, 4w)
        x_t = MLP_t( concat(frame 2k, frame 2k+1) )   image: (x_s, x_s)   (N/8, 4w)
        tokens = RMSNorm( W x_t )                                     (tokens, text width)
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        if config.temporal_merge_size != 2:
            raise ConfigError("vision_config.temporal_merge_size must be 2: the adapter merges frames in pairs.")
        merged = config.hidden_size * config.spatial_merge_size ** 2
        self.spatial_merge = MergeMLP(merged, merged, config.layer_norm_eps)
        self.temporal_merge = MergeMLP(merged * config.temporal_merge_size, merged, config.layer_norm_eps)
        self.proj = nn.Linear(merged, config.text_hidden_size)
        self.norm = RMSNorm(config.text_hidden_size, config.text_rms_norm_eps)

    def forward(self, features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """features (N, width) from the ViT -> (tokens, text width), images/videos in order."""
        grid_thw = torch.as_tensor(grid_thw).long().cpu().reshape(-1, 3)
        windows = features.reshape(-1, features.shape[-1] * self.config.spatial_merge_size ** 2)  # (N/4, 4w)
        x = self.spatial_merge(windows)
        first, second = frame_pairs(grid_thw, self.config.spatial_merge_size)
        x = torch.cat([x[first.to(x.device)], x[second.to(x.device)]], dim=-1)  # (tokens, 8w)
        return self.norm(self.proj(self.temporal_merge(x)))


def frame_pairs(grid_thw: torch.Tensor, merge: int = VisionConfig.spatial_merge_size) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices (into the merged windows) of the first and second frame of every temporal pair.

    An image (t = 1) is paired with itself; a video of t frames gives t/2 pairs (frame 0 with 1, 2 with 3 ...).
    """
    first, second, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        per_frame = h * w // merge ** 2
        if t > 1 and t % 2:
            raise InputError(f"a video needs an even number of frames, got grid {[t, h, w]}; "
                             "preprocess_video repeats the last frame for you.")
        for k in range(0, t, 2):
            partner = k + 1 if t > 1 else k
            first.append(torch.arange(offset + k * per_frame, offset + (k + 1) * per_frame))
            second.append(torch.arange(offset + partner * per_frame, offset + (partner + 1) * per_frame))
        offset += t * per_frame
    return torch.cat(first), torch.cat(second)


def tokens_per_item(grid_thw: torch.Tensor, merge: int = VisionConfig.spatial_merge_size,
                    temporal: int = VisionConfig.temporal_merge_size) -> list[int]:
    """How many decoder tokens (placeholders) each image or video becomes."""
    return [t * h * w // merge ** 2 // (temporal if t > 1 else 1) for t, h, w in torch.as_tensor(grid_thw).tolist()]

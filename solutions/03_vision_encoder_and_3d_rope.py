"""Solutions to notebook 03's exercises, with the reasoning, and the mistakes students make (WRONG).

Paste a function body into the notebook's stub to see the notebook go on with it.
"""

import math

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# Patchify. A frame (C, H, W) is cut into 14 x 14 patches; each patch is flattened channel-major
# (3, 14, 14) -> 588 numbers, as the ViT's patch embedding (a linear layer) expects. The order of the
# patches is not row-major: the four patches of each 2 x 2 merge window are stored next to each other,
# windows row by row, so that the adapter later merges a window with a reshape of 4 consecutive rows.
def patchify(frames):
    T, C, H, W = frames.shape
    x = frames.reshape(T, C, H // 28, 2, 14, W // 28, 2, 14)   # window row, row in window, pixel row, ...
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)                        # (T, H/28, W/28, 2, 2, C, 14, 14)
    return x.reshape(-1, C * 14 * 14)                            # (T * H/14 * W/14, 588)


# ------------------------------------------------------------------------------------------------
# A ViT block with 2-D rotary positions. Rotate-half pairs dim i with dim i + d/2; the first d/4 angles
# follow the row, the next d/4 the column, with frequencies w_j = 10000^(-4j/d) shared by both axes.
def rope_2d(x, positions):
    """x (N, heads, d), positions (N, 2) -> x rotated (N, heads, d)."""
    d = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, d // 2, 2).float() / (d // 2))       # (d/4,)
    angles = (positions.float()[:, :, None] * freqs).flatten(1)              # (N, d/2): rows, then columns
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]                  # (N, 1, d/2)
    first, second = x.chunk(2, dim=-1)                                       # (N, heads, d/2) each
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def vit_block(x, block, positions):
    """x (N, width) patches of one frame -> (N, width). Pre-norm LayerNorm, bidirectional attention (every
    patch sees every patch: a picture has no "before"), quick-GELU MLP."""
    N, width = x.shape
    heads = block.attn.num_heads
    q, k, v = block.attn.qkv(block.norm1(x)).view(N, 3, heads, -1).unbind(1)    # (N, heads, d) each
    q, k = rope_2d(q, positions), rope_2d(k, positions)
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5           # (heads, N, N), no mask
    mixed = torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v).reshape(N, width)
    x = x + block.attn.proj(mixed)
    h = block.mlp.fc1(block.norm2(x))
    return x + block.mlp.fc2(h * torch.sigmoid(1.702 * h))                     # quick GELU, as in CLIP


# ------------------------------------------------------------------------------------------------
# The adapter: 4 patches x 2 frames -> one decoder token.
def adapter_merge(features, grid, adapter):
    """features (N, width) of one picture of patch grid (t, h, w) -> (t' h w / 4, text width), t' = max(t/2, 1).

    patchify stored each 2 x 2 window on 4 consecutive rows, so one reshape concatenates a window. Frames
    are paired window by window: frame 2k's window i with frame 2k+1's window i, which sit h w / 4 rows
    apart. A still image is paired with itself, so images and videos share one temporal MLP.
    """
    t, h, w = (int(v) for v in grid)
    windows = features.reshape(t, h * w // 4, 4 * features.shape[-1])        # (t, windows, 4 width)
    x = adapter.spatial_merge(windows)                                       # (t, windows, 4 width)
    first, second = (x[0::2], x[1::2]) if t > 1 else (x, x)                  # (t', windows, 4 width) each
    x = adapter.temporal_merge(torch.cat([first, second], dim=-1))           # (t', windows, 4 width)
    return adapter.norm(adapter.proj(x)).reshape(-1, adapter.proj.out_features)


# ------------------------------------------------------------------------------------------------
# Numbers.

MAX = 28 * 28 * 6177
H, W = 3024, 4032
shrink = math.sqrt(H * W / MAX)                  # the photo is larger than the budget: shrink both sides
h_side = math.floor(H / shrink / 28) * 28        # round down, so the area stays within the budget
w_side = math.floor(W / shrink / 28) * 28
photo_tokens = (h_side // 14) * (w_side // 14) // 4

start = 6                                        # 5 text tokens (0..4) and <start> (5): the picture begins at 6
after_image = start + max(8, 12) // 2            # the merged grid is 4 x 6: positions 6..11 in h and w
last_position = [after_image + 3] * 3            # <end> takes after_image, then 3 text tokens

SOLUTIONS = {"03.photo_tokens": (photo_tokens,), "03.last_position": (last_position,),
             "03.patchify": (patchify,), "03.vit_block": (vit_block,), "03.adapter_merge": (adapter_merge,)}


def _row_major(frames):                          # patches in reading order: the adapter would merge 1 x 4 strips
    T, C, H, W = frames.shape
    return frames.unfold(2, 14, 14).unfold(3, 14, 14).permute(0, 2, 3, 1, 4, 5).reshape(-1, C * 196)


def _pixel_major(frames):                        # each patch flattened (14, 14, 3): the embedding expects (3, 14, 14)
    return patchify(frames).view(-1, 3, 14, 14).permute(0, 2, 3, 1).reshape(-1, 588)


def _columns_first(frames):                      # windows column by column
    T, C, H, W = frames.shape
    x = frames.reshape(T, C, H // 28, 2, 14, W // 28, 2, 14).permute(0, 5, 2, 3, 6, 1, 4, 7)
    return x.reshape(-1, C * 196)


def _swapped_axes(x, block, positions):          # columns on the first quarter of frequencies
    return vit_block(x, block, positions.flip(-1))


def _no_rope(x, block, positions):
    return vit_block(x, block, torch.zeros_like(positions))


def _exact_gelu(x, block, positions):
    N, width = x.shape
    h = vit_block(x, block, positions)          # recompute the MLP half with the exact GELU
    x_mid = h - block.mlp.fc2(_quick(block.mlp.fc1(block.norm2(_attention_half(x, block, positions)))))
    return x_mid + block.mlp.fc2(F.gelu(block.mlp.fc1(block.norm2(x_mid))))


def _quick(h):
    return h * torch.sigmoid(1.702 * h)


def _attention_half(x, block, positions):       # x after the attention residual (the first half of vit_block)
    N, width = x.shape
    q, k, v = block.attn.qkv(block.norm1(x)).view(N, 3, block.attn.num_heads, -1).unbind(1)
    q, k = rope_2d(q, positions), rope_2d(k, positions)
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    return x + block.attn.proj(torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v).reshape(N, width))


def _causal(x, block, positions):                # a decoder habit: patches have no order to respect
    N, width = x.shape
    q, k, v = block.attn.qkv(block.norm1(x)).view(N, 3, block.attn.num_heads, -1).unbind(1)
    q, k = rope_2d(q, positions), rope_2d(k, positions)
    scores = torch.einsum("nhd,mhd->hnm", q, k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    x = x + block.attn.proj(torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v).reshape(N, width))
    return x + block.mlp.fc2(_quick(block.mlp.fc1(block.norm2(x))))


def _neighbour_windows(features, grid, adapter):  # pairs window 2i with 2i+1 instead of frame 2k with 2k+1
    x = adapter.spatial_merge(features.reshape(-1, 4 * features.shape[-1]))
    return adapter.norm(adapter.proj(adapter.temporal_merge(x.reshape(-1, 2 * x.shape[-1]))))


def _no_norm(features, grid, adapter):          # forgets the final RMSNorm
    t, h, w = (int(v) for v in grid)
    x = adapter.spatial_merge(features.reshape(t, h * w // 4, -1))
    first, second = (x[0::2], x[1::2]) if t > 1 else (x, x)
    return adapter.proj(adapter.temporal_merge(torch.cat([first, second], -1))).reshape(-1, adapter.proj.out_features)


def _frames_not_merged(features, grid, adapter):  # an image paired with zeros instead of itself
    t, h, w = (int(v) for v in grid)
    x = adapter.spatial_merge(features.reshape(t, h * w // 4, -1))
    first, second = (x[0::2], x[1::2]) if t > 1 else (x, torch.zeros_like(x))
    return adapter.norm(adapter.proj(adapter.temporal_merge(torch.cat([first, second], -1)))).reshape(
        -1, adapter.proj.out_features)
WRONG = {
    "03.photo_tokens": [((h_side // 14) * (w_side // 14),),
                        (math.ceil(H / shrink / 28) * 28 // 14 * (math.ceil(W / shrink / 28) * 28 // 14) // 4,)],
    "03.last_position": [([33, 33, 33],), ([after_image + 2] * 3,)],
    "03.patchify": [{"answers": (_row_major,), "says": "row-major"}, {"answers": (_pixel_major,), "says": "channel-major"},
                    (_columns_first,)],
    "03.vit_block": [{"answers": (_swapped_axes,), "says": "swapped"}, {"answers": (_no_rope,), "says": "no rotary"},
                     {"answers": (_exact_gelu,), "says": "quick GELU"}, (_causal,)],
    "03.adapter_merge": [{"answers": (_neighbour_windows,), "says": "neighbouring window"}, (_no_norm,),
                         (_frames_not_merged,)],
}

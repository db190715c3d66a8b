"""3-D rotary positions for mixed text / image / video sequences (ERNIE 4.5 VL's decoder).

Every token gets three position numbers (t, h, w). Text tokens count up as usual with t = h = w.
An image placeholder block of H x W merged patches starting at position p gets

    t = p,   h = p + row,   w = p + column          (a video adds the frame-pair index to t)

and the text after it continues at p + max(H, W): a picture costs as many positions as its longer
side, not as many as its tokens. The decoder's rotary then splits its frequency slots between the
three axes: with ``mrope_section = [22, 22, 20]`` (head_dim 128, 64 rotary pairs), the first 44 pairs
alternate height (even pair) / width (odd pair) and the last 20 pairs carry time:

    angle_i = pos_axis(i) * theta^(-2i/d),   axis(i) = h if i < 44 and i even, w if i < 44 and i odd, t if i >= 44

The pairs are the decoder's interleaved pairs, so ``ernie_lab.rope.apply_rope`` rotates with these angles.
For pure text (t = h = w = p) this is exactly the 1-D rotary of the text models.
"""

from __future__ import annotations

import itertools

import torch

from ..errors import ConfigError, InputError
from .rope import inverse_frequencies
from .special_tokens import IMAGE, IMAGE_MARKER_IDS, IMAGE_TOKEN_ID, TEXT, VIDEO, VIDEO_MARKER_IDS, VIDEO_TOKEN_ID

DEFAULT_MROPE_SECTION = (22, 22, 20)  # rotary pairs for height, width, time (head_dim 128)


# ------------------------------------------------------------------------------ token types
def modality_types(input_ids: torch.Tensor, image_token_id: int = IMAGE_TOKEN_ID,
                   video_token_id: int = VIDEO_TOKEN_ID) -> torch.Tensor:
    """0 for text, 1 for image placeholders, 2 for video placeholders; same shape as input_ids.

    The default ids are the big checkpoints'; pass a model's own (``VLConfig.image_token_id`` ...).
    """
    types = torch.zeros_like(input_ids)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def routing_types(input_ids: torch.Tensor, image_token_id: int = IMAGE_TOKEN_ID, video_token_id: int = VIDEO_TOKEN_ID,
                  image_markers: tuple[int, int] = IMAGE_MARKER_IDS,
                  video_markers: tuple[int, int] = VIDEO_MARKER_IDS) -> torch.Tensor:
    """Like :func:`modality_types`, but the start/end markers around a picture count as vision too.

    The MoE routes these markers to vision experts, while their positions are text positions.
    """
    types = modality_types(input_ids, image_token_id, video_token_id)
    types[torch.isin(input_ids, torch.tensor(image_markers, device=input_ids.device))] = IMAGE
    types[torch.isin(input_ids, torch.tensor(video_markers, device=input_ids.device))] = VIDEO
    return types


# ------------------------------------------------------------------------------ positions
def vision_block_positions(start: int, grid_thw, temporal_merge: int = 1, spatial_merge: int = 2) -> torch.Tensor:
    """(3, tokens) positions (t, h, w) of one image/video block that starts at position ``start``.

    ``grid_thw`` is the patch grid (T, H, W); the block has T/temporal_merge x H/2 x W/2 tokens in
    frame-major, then row-major order (the order of the adapter's output).
    """
    t, h, w = (int(v) for v in grid_thw)
    t, h, w = t // temporal_merge, h // spatial_merge, w // spatial_merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def position_ids_3d(token_types: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    spatial_merge: int = 2, temporal_merge: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D positions of a batch of mixed sequences.

    token_types: (B, T) from :func:`modality_types`; grids: (images, 3) and (videos, 3) in the order the
    blocks appear (row by row); attention_mask (B, T) 0/1 leaves padding at position 0.
    Returns ``positions`` (3, B, T) long and ``deltas`` (B, 1): the next text token of row b sits at
    (its index among real tokens) + deltas[b], which lets decoding continue without recomputing.
    """
    B, T = token_types.shape
    grids = {IMAGE: iter(_grid_rows(image_grid_thw)), VIDEO: iter(_grid_rows(video_grid_thw))}
    positions = torch.zeros(3, B, T, dtype=torch.long)
    deltas = []
    for b in range(B):
        real = attention_mask[b].bool().cpu() if attention_mask is not None else torch.ones(T, dtype=torch.bool)
        types = token_types[b].cpu()[real].tolist()
        pieces, next_pos = [], 0
        for kind, run in itertools.groupby(types):
            n = len(list(run))
            if kind == TEXT:
                pieces.append(torch.arange(next_pos, next_pos + n).expand(3, n))
                next_pos += n
                continue
            grid = next(grids[kind], None)
            if grid is None:
                raise InputError(f"row {b} has more {'image' if kind == IMAGE else 'video'} blocks than grids were "
                                 "given. Pass one image_grid_thw / video_grid_thw row per image / video.")
            block = vision_block_positions(next_pos, grid, 1 if kind == IMAGE else temporal_merge, spatial_merge)
            if block.shape[1] != n:
                raise InputError(f"row {b}: a block of {n} placeholder tokens does not match its grid {list(grid)} "
                                 f"({block.shape[1]} tokens). Were the placeholders counted with the same image size?")
            pieces.append(block)
            next_pos += max(grid[1], grid[2]) // spatial_merge
        row = torch.cat(pieces, dim=1)  # (3, real tokens)
        positions[:, b, real] = row
        deltas.append(int(row.max()) + 1 - row.shape[1])
    return positions.to(token_types.device), torch.tensor(deltas, device=token_types.device)[:, None]


def _grid_rows(grid) -> list[tuple[int, int, int]]:
    return [] if grid is None else [tuple(int(v) for v in row) for row in torch.as_tensor(grid).reshape(-1, 3)]


# ------------------------------------------------------------------------------ rotary angles
def check_mrope_section(head_dim: int, mrope_section=DEFAULT_MROPE_SECTION) -> tuple[int, int, int]:
    """Height and width slots interleave, so they must be equal; together they fill head_dim / 2."""
    section = tuple(int(s) for s in mrope_section)
    if len(section) != 3 or section[0] != section[1] or sum(section) != head_dim // 2:
        raise ConfigError(f"mrope_section {list(section)} must be [n, n, m] with 2n + m = head_dim / 2 = "
                          f"{head_dim // 2}; the default [22, 22, 20] needs head_dim 128.")
    return section


def axis_of_pair(head_dim: int, mrope_section=DEFAULT_MROPE_SECTION) -> torch.Tensor:
    """(d/2,) which position axis (0 = t, 1 = h, 2 = w) drives each rotary pair."""
    h, w, t = check_mrope_section(head_dim, mrope_section)
    spatial = torch.tensor([1, 2]).repeat(h)  # h, w, h, w, ... over the first 2n pairs
    return torch.cat([spatial, torch.zeros(t, dtype=torch.long)])


def rope_angles_3d(position_ids: torch.Tensor, head_dim: int, theta: float,
                   mrope_section=DEFAULT_MROPE_SECTION) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, T, d/2) for the decoder's interleaved rotary, from 3-D positions (3, B, T)."""
    if position_ids.dim() == 2:  # plain (B, T) text positions: t = h = w
        position_ids = position_ids[None].expand(3, -1, -1)
    axis = axis_of_pair(head_dim, mrope_section).to(position_ids.device)  # (d/2,)
    pos = position_ids.permute(1, 2, 0).float()  # (B, T, 3)
    pos_per_pair = pos[..., axis]  # (B, T, d/2): the position that drives each pair
    angles = pos_per_pair * inverse_frequencies(head_dim, theta).to(position_ids.device)
    return angles.cos(), angles.sin()

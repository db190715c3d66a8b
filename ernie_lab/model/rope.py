"""Rotary position embedding (RoPE) on interleaved pairs, the ERNIE 4.5 text layout.

Each head vector is cut into pairs (x[2i], x[2i+1]) and pair i is rotated by the angle p * w_i,
where p is the token position and w_i = theta^(-2i/d):

    (x[2i], x[2i+1])  ->  (x[2i] cos a - x[2i+1] sin a,  x[2i+1] cos a + x[2i] sin a),   a = p * w_i

The dot product of a rotated query and key then depends only on their distance. ERNIE rotates
neighbouring dims (GPT-J / GLM style), not the two halves of the vector as Llama does, and computes
angles, sines and cosines in float32.
"""

import torch


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """w_i = theta^(-2i/d) for i = 0 .. d/2-1, in float32.  # (d/2,)"""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of p * w_i for every position, float32.

    positions: (B, T) integer positions.  Returns cos, sin: (B, T, d/2).
    """
    freqs = inverse_frequencies(head_dim, theta).to(positions.device)
    angles = positions.float()[..., None] * freqs  # (B, T, d/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x.

    x: (B, H, T, D);  cos, sin: (B, T, D/2).  Returns (B, H, T, D) in x's dtype.
    """
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D/2): broadcast over heads
    x32 = x.float()
    even, odd = x32[..., 0::2], x32[..., 1::2]  # (B, H, T, D/2) each
    rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)  # (B, H, T, D/2, 2)
    return rotated.flatten(-2).to(x.dtype)  # back to interleaved order (B, H, T, D)

"""RMSNorm: rescale each vector to unit root-mean-square, then apply a learned gain.

    y = g * x / sqrt(mean(x^2) + eps)

No mean is subtracted and there is no bias (unlike LayerNorm). The statistics are computed in
float32 even when the model runs in bfloat16, and the result is cast back before the gain.
"""

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

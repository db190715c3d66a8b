"""SwiGLU feed-forward network, the MLP of every ERNIE 4.5 layer (and of each expert).

    MLP(x) = W_down( silu(W_gate x) * (W_up x) )

The gate decides how much of each of the ``intermediate`` features passes; silu(z) = z * sigmoid(z).
"""

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> (..., hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

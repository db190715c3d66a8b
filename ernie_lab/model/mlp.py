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
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


def swiglu(x: torch.Tensor, gate, up, down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) for any three callables: the layers themselves, or (moe.py, a compiled
    one-token step) their kernels bound to their weights."""
    return down(F.silu(gate(x)) * up(x))

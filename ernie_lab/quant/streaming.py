"""Full-precision linears on the streaming decode kernels: ``stream_linears(model)``.

A quantized model's ``QuantLinear`` layers use the kit's kernels (``native.py``) by themselves. The layers
that stay in fp32 or bf16 (a whole unquantized model, or the LM head a quantized one keeps) are plain
``nn.Linear``; at batch-1 decode on CPU PyTorch's one-row matmul reads them at part of the memory
bandwidth on some machines. ``stream_linears`` swaps each exact ``nn.Linear`` for a
``StreamingLinear``: the same class with the same parameters (state_dict, tying, LoRA and saving see
no difference), whose forward sends decode-sized CPU inputs that need no gradient to
``native.linear`` and everything else to ``F.linear``.

    model = ernie_lab.load_model("data/tiny-ernie-text", dtype=torch.bfloat16)
    ernie_lab.quant.stream_linears(model)        # in place; returns the names swapped
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import native


class StreamingLinear(nn.Linear):
    """``nn.Linear`` whose decode-sized CPU forward runs the streaming kernel (fp32 accumulation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype in (torch.float32, torch.bfloat16) and native.usable(x, self.weight, self.bias):
            y = native.linear(x.reshape(-1, self.in_features), self.weight, self.bias, out_dtype=x.dtype)
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)   # (M, N) -> (..., N)
        return F.linear(x, self.weight, self.bias)


def stream_linears(model: nn.Module) -> list[str]:
    """Turn every exact ``nn.Linear`` of ``model`` (not routers, not LoRA or quantized layers) into a
    ``StreamingLinear`` in place, keeping its parameters (so a tied head stays tied). Returns the names."""
    names = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = StreamingLinear
            names.append(name)
    return names

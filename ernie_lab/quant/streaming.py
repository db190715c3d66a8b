"""Full-precision linears on the streaming decode kernels: ``stream_linears(model)``.

A quantized model's ``QuantLinear`` layers use the kit's kernels (``native.py``) by themselves. The layers
that stay in fp32 or bf16 (a whole unquantized model, or the LM head a quantized one keeps) are plain
``nn.Linear``; at batch-1 decode on CPU PyTorch's one-row matmul reads them at part of the memory
bandwidth on some machines. ``stream_linears`` puts a ``StreamingLinear`` in place of each exact
``nn.Linear`` (through ``model.linears.replace_linears``): an ``nn.Linear`` holding the very same
parameters (state_dict, tying, LoRA and saving see no difference), whose forward asks the kernel table
(``kernels.py``): decode-sized CPU inputs that need no gradient run ``native.linear``, everything else
its ``reference``, ``F.linear``.

    model = ernie_lab.load_model("data/tiny-ernie-text", dtype=torch.bfloat16)
    ernie_lab.quant.stream_linears(model)        # in place; returns the names swapped
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.linears import replace_linears
from . import kernels
from .linear import check_input


class StreamingLinear(nn.Linear):
    """``nn.Linear`` whose decode-sized CPU forward runs the streaming kernel (fp32 accumulation)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "StreamingLinear":
        """A StreamingLinear sharing ``linear``'s weight and bias (the same Parameter objects)."""
        with torch.device("meta"):   # no memory, no random numbers: the parameters are replaced at once
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        layer.weight, layer.bias = linear.weight, linear.bias
        return layer.train(linear.training)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (..., in) -> (..., out)
        check_input(self, x)
        return kernels.run(self, x)

    def decode_kernel(self, dtype: torch.dtype):
        """This layer's kernel for one ``dtype`` row, its weight bound in (``kernels.bound``), or None."""
        return kernels.bound(self, torch.empty(1, self.in_features, dtype=dtype, device=self.weight.device))


def stream_linears(model: nn.Module) -> list[str]:
    """Put a ``StreamingLinear`` in place of every exact ``nn.Linear`` of ``model`` (not routers, not LoRA or
    quantized layers), keeping its parameters (so a tied head stays tied). Returns the names."""
    return replace_linears(model, lambda name, linear: StreamingLinear.from_linear(linear),
                           filter=lambda name, module: type(module) is nn.Linear, tied_head=True)

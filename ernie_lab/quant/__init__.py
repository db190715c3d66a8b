"""Quantized inference from scratch: store weights as small integers plus scales, compute with them.

    ernie_lab.quant.quantize(model, "w4a16")     # in place; returns the model

Schemes (W = weight bits, A = activation bits; "a16" = weight-only, activations stay bf16 / fp32):

    w8a16   int8 per output channel, symmetric      w ~ q * s,            q in [-127, 127]
    w4a16   int4 per group of 128 inputs            w ~ (u - 8) * s       u in [0, 15]    (symmetric)
                              or with zero points   w ~ (u - z) * s       z in [0, 15]    (symmetric=False)
    w2a16   int2 per group, zero points by default  w ~ (u - z) * s       u, z in [0, 3]
    w8a8    int8 weights as w8a16, and each token's activations quantized on the fly to int8 with
            their own scale: y = (q_x q_w^T) * s_x * s_w, an int8 x int8 -> int32 matmul
    fp8     float8 e4m3 weights (one scale per output row) and per-token e4m3 activations (CUDA only)

Stored tensors per quantized linear ``<name>`` (state_dict, and safetensors under the Hub name
of ``<name>.weight`` with ``weight`` replaced):

    <name>.qweight  w8a16 / w8a8: int8 (N, K); fp8: float8_e4m3fn (N, K)
                    w4a16: uint8 (N, K/2), byte j = u[2j] << 4 | u[2j+1]  (first column high nibble)
                    w2a16: uint8 (N, K/4), byte j = u[4j] << 6 | u[4j+1] << 4 | u[4j+2] << 2 | u[4j+3]
    <name>.scales   float32 (N, K / group)  (group = K for per-channel schemes)
    <name>.zeros    uint8 (N, K / group) zero points, only for asymmetric layers
    <name>.bias     the float bias, when the layer has one

and ``config.json`` gains ``quantization_config``: ``{"quant_method": "ernie-lab", "scheme", "group_size",
"symmetric", "modules": {name: {"scheme", "group_size", "symmetric"}}}``, so ``load_model`` rebuilds
exactly those layers. Routers (``mlp.routers.N``, float32), norms, embeddings and the LM head stay in
full precision by default. MoE experts are ordinary linears inside each expert: quantized, they keep
the grouped dispatch of ``moe.dispatch`` (one call per active expert, never a loop over tokens).

The modules: ``formats`` (rounding, packing), ``linear`` (``QuantLinear``: the codes and the plain
dequantize-then-matmul forward), ``kernels`` (the table of faster kernels that must agree with it),
``native`` (the kit's C decode kernels), ``streaming`` (full-precision linears on them), ``gptq``.

``calibration=`` (a few (B, T) batches of token ids, or dicts of a model's inputs such as a VL batch with
``pixel_values``) enables GPTQ for w4a16 / w2a16 (``gptq.py``); a layer no batch reaches is rounded (RTN).
"""

from __future__ import annotations


import torch
from torch import nn

from ..errors import InputError
from ..model.linears import name_matcher, replace_linears, tied_head_name
from . import formats
from .gptq import HessianCollector, gptq_quantize
from . import kernels, native
from .kernels import reference_only
from .linear import SCHEMES, QuantLinear, check_scheme
from .streaming import StreamingLinear, stream_linears

__all__ = ["quantize", "QuantLinear", "SCHEMES", "reference_only", "weight_bytes", "formats",
           "quantized_layers", "plan_layers", "native", "kernels", "stream_linears", "StreamingLinear"]

DEFAULT_SKIP = ("lm_head", "embed", "router")
DEFAULT_SYMMETRIC = {"w8a16": True, "w4a16": True, "w2a16": False, "w8a8": True, "fp8": True}


def quantize(model: nn.Module, scheme: str, *, group_size: int = 128, skip=DEFAULT_SKIP, calibration=None,
             symmetric: bool | None = None, filter=None, damp: float = 0.01) -> nn.Module:
    """Replace the model's linear layers by :class:`QuantLinear` of ``scheme``, in place; returns the model.

    ``skip``: substrings (or regexes, searched in the module name) of layers kept in full precision.
    ``filter``: optional regex / function choosing the layers (``model.linears.name_matcher``).
    ``calibration``: an iterable of (B, T) token-id batches or of input dicts; enables GPTQ (w4a16 / w2a16 only).
    ``symmetric``: None = the scheme's default (zero points for w2a16 only).
    """
    spec = check_scheme(scheme)
    symmetric = DEFAULT_SYMMETRIC[scheme] if symmetric is None else bool(symmetric)
    device = _device(model)
    if scheme == "fp8" and device.type != "cuda":
        raise InputError("fp8 needs a CUDA GPU (torch._scaled_mm on e4m3): move the model to cuda first, "
                         "or use w8a16 / w8a8 on CPU.")
    if calibration is not None and scheme not in ("w4a16", "w2a16"):
        raise InputError(f"calibration (GPTQ) is for w4a16 and w2a16, not {scheme}; drop calibration= for RTN.")
    layers = plan_layers(model, scheme, group_size=group_size, skip=skip, filter=filter)
    hessians = collect_hessians(model, layers, calibration) if calibration is not None else {}

    def factory(name: str, linear: nn.Linear) -> QuantLinear:
        group = layers[name]
        codes = None
        if name in hessians:
            codes = gptq_quantize(linear.weight, hessians[name], spec.bits, group, symmetric, damp=damp)
        return QuantLinear.from_linear(linear, scheme, group_size=group, symmetric=symmetric, quantized=codes)

    replace_linears(model, factory, filter=lambda name, module: name in layers)
    record = getattr(model, "quantization_config", None) or {"quant_method": "ernie-lab", "modules": {}}
    record.update(scheme=scheme, group_size=group_size, symmetric=symmetric)
    record["modules"].update({name: {"scheme": scheme, "group_size": layers[name], "symmetric": symmetric}
                              for name in layers})
    model.quantization_config = record
    return model


def plan_layers(model: nn.Module, scheme: str, *, group_size: int = 128, skip=DEFAULT_SKIP,
                filter=None) -> dict[str, int]:
    """{linear name: its group size} for the layers ``quantize`` would replace.

    A layer whose input width the group does not divide uses the largest halving of it that does (down to
    32), else one group per row; one that cannot be
    packed at all (width not a multiple of 4 for 2-bit) stays in full precision. Routers never change.
    """
    from ..model.moe import Router
    spec = check_scheme(scheme)
    dropped = name_matcher(skip, whole=False) if skip is not None else (lambda name, module: False)
    chosen = name_matcher(filter)
    tied = tied_head_name(model)
    layers = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or isinstance(module, Router) or name == tied:
            continue
        if dropped(name, module) or not chosen(name, module):
            continue
        K = module.in_features
        group = _group_for(K, group_size) if spec.grouped else K
        if K % (8 // spec.bits if spec.bits < 8 else 1):
            continue
        layers[name] = group
    return layers


def _group_for(K: int, group_size: int) -> int:
    """``group_size`` if it divides K, else the largest of its halves (down to 32) that does, else K."""
    group = group_size
    while group >= 32:
        if K % group == 0:
            return group
        group //= 2
    return K


def collect_hessians(model: nn.Module, layers: dict[str, int], calibration) -> dict[str, torch.Tensor]:
    """Run the calibration batches once through the full-precision model; (K, K) input Hessian per layer."""
    collectors, hooks = {}, []
    for name in layers:
        linear = model.get_submodule(name)
        collectors[name] = HessianCollector(linear.in_features, device=linear.weight.device)
        hooks.append(linear.register_forward_pre_hook(collectors[name]))
    device = _device(model)
    try:
        with torch.no_grad():
            for batch in calibration:
                if isinstance(batch, dict):  # a model's full inputs (a VL batch: ids, pixels, grids)
                    model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
                    continue
                ids = torch.as_tensor(batch, dtype=torch.long, device=device)
                model(ids if ids.dim() == 2 else ids[None])
    finally:
        for hook in hooks:
            hook.remove()
    return {name: c.hessian() for name, c in collectors.items() if c.rows}


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors counted once), as held in memory."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        plain = type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta"
        key = tensor.untyped_storage().data_ptr() if plain else id(tensor)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(tensor)
    return total


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (e.g. torchao's quantized weights)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def _device(model) -> torch.device:
    return next(model.parameters()).device

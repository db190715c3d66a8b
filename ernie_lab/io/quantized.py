"""Quantized checkpoints: the names of a quantized layer's tensors in a Hub-layout folder, and the two
loading hooks (rebuild stored quantized layers; quantize float weights while they are read).

A quantized linear ``<lab>`` whose float weight the Hub calls ``<hub>.weight`` is written as
``<hub>.qweight``, ``<hub>.scales`` and (asymmetric layers) ``<hub>.zeros``; config.json carries
``quantization_config`` (see the package docstring for the formats and packing).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..model.linears import replace_linears
from .hub_names import hub_to_lab, lab_to_hub
from ..quant.linear import SCHEMES, QuantLinear

SUFFIXES = ("qweight", "scales", "zeros")


def quant_lab_to_hub(name: str, table: list) -> str | None:
    """``layers.0.attn.q_proj.qweight`` -> ``model.layers.0.self_attn.q_proj.qweight`` (via its ``.weight``)."""
    prefix, _, leaf = name.rpartition(".")
    hub = lab_to_hub(f"{prefix}.weight", table) if leaf in SUFFIXES else None
    return None if hub is None else hub.removesuffix("weight") + leaf


def quant_hub_to_lab(name: str, table: list) -> str | None:
    prefix, _, leaf = name.rpartition(".")
    lab = hub_to_lab(f"{prefix}.weight", table) if leaf in SUFFIXES else None
    return None if lab is None else lab.removesuffix("weight") + leaf


def rebuild_layers(model: nn.Module, record: dict) -> None:
    """Swap the meta linears named in a checkpoint's ``quantization_config`` for meta QuantLinears."""
    modules = record.get("modules") if isinstance(record, dict) else None
    if not isinstance(modules, dict):
        raise CheckpointError("config.json has a quantization_config without a 'modules' table: it was not written "
                              "by ernie-lab's save_model. Re-save the quantized model, or remove the entry.")
    for name, spec in modules.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantization_config names a layer {name!r} that this model does not have.") from None
        if not isinstance(linear, nn.Linear) or spec.get("scheme") not in SCHEMES:
            raise CheckpointError(f"quantization_config for {name!r} is not a linear layer with a known scheme "
                                  f"({spec}); schemes are {sorted(SCHEMES)}.")

    def meta_layer(name: str, linear: nn.Linear) -> QuantLinear:
        spec = modules[name]
        return _meta_layer(linear, spec["scheme"], spec.get("group_size", 128), spec.get("symmetric", True))

    replace_linears(model, meta_layer, filter=lambda name, module: name in modules, tied_head=True)
    model.quantization_config = record


def quantize_on_read(model: nn.Module, scheme: str, *, group_size: int = 128, symmetric: bool | None = None) -> None:
    """Swap the meta linears that ``quantize`` would replace for meta QuantLinears; ``assign`` then
    quantizes each float weight as it is read (only one float tensor is alive at a time)."""
    from ..quant import DEFAULT_SYMMETRIC, plan_layers
    symmetric = DEFAULT_SYMMETRIC[scheme] if symmetric is None else symmetric
    layers = plan_layers(model, scheme, group_size=group_size)
    replace_linears(model, lambda name, linear: _meta_layer(linear, scheme, layers[name], symmetric),
                    filter=lambda name, module: name in layers)
    model.quantization_config = {"quant_method": "ernie-lab", "scheme": scheme, "group_size": group_size,
                                 "symmetric": symmetric,
                                 "modules": {n: {"scheme": scheme, "group_size": g, "symmetric": symmetric}
                                             for n, g in layers.items()}}


def check_stored(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """A stored quantized tensor must have the dtype its layer expects (shapes are checked before loading)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, QuantLinear) and leaf in SUFFIXES:
        expected = getattr(module, leaf)
        if expected is None or expected.dtype != tensor.dtype:
            want = "nothing (symmetric layer)" if expected is None else str(expected.dtype)
            raise CheckpointError(f"{name}: stored as {tensor.dtype}, a {module.scheme} layer needs {want}. "
                                  "The checkpoint's packing does not match its quantization_config.")


def _meta_layer(linear: nn.Linear, scheme: str, group: int, symmetric: bool) -> QuantLinear:
    with torch.device("meta"):
        return QuantLinear(linear.in_features, linear.out_features, scheme, group_size=group, symmetric=symmetric,
                           bias=linear.bias is not None, dtype=linear.weight.dtype)


"""Quantized checkpoints: the names of a quantized layer's tensors in a Hub-layout folder, and the two
loading hooks (rebuild stored quantized layers; quantize float weights while they are read).

A quantized linear ``<lab>`` whose float weight the Hub calls ``<hub>.weight`` is written as
``<hub>.qweight``, ``<hub>.scales`` and (asymmetric layers) ``<hub>.zeros``; config.json carries
``quantization_config`` (see the package docstring for the formats and packing).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..model.linears import replace_linears, tied_head_name
from .hub_names import hub_to_lab, lab_to_hub
from ..quant.linear import SCHEMES, QuantLinear, check_scheme, check_values

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


def check_arguments(quantize, group_size, device) -> int | None:
    """load_model's ``quantize`` / ``group_size``, checked before any file is opened: the group size to use."""
    from ..quant import check_group_size
    if quantize is None:
        if group_size is not None:
            raise InputError(f"load_model: group_size={group_size!r} applies only with quantize= (e.g. "
                             "quantize='w4a16'); a checkpoint saved quantized keeps its own groups.")
        return None
    group_size = 128 if group_size is None else group_size
    try:
        check_scheme(quantize)
        check_group_size(group_size, quantize)
    except InputError as err:
        raise InputError(f"load_model(quantize={quantize!r}, group_size={group_size!r}): {err}") from None
    if quantize == "fp8" and torch.device(device).type != "cuda":
        raise InputError("load_model: quantize='fp8' needs a CUDA GPU (torch._scaled_mm on e4m3): pass "
                         "device='cuda', or use w8a16 / w8a8 on CPU.")
    return group_size


def check_record(folder, raw: dict, hub_names: Iterable[str], quantize) -> None:
    """config.json's quantization_config against the files: a stored code tensor needs the record that says
    how to read it; a record needs the ernie-lab format; quantize= on a quantized folder is refused."""
    record = raw.get("quantization_config")
    if record is None:
        stored = next((n for n in hub_names if n.rpartition(".")[2] in ("qweight", "zeros")), None)
        if stored is not None:
            raise CheckpointError(f"{folder}: the weights hold quantized codes ({stored}) but config.json has no "
                                  "quantization_config to say their scheme and groups. Restore the config.json "
                                  "saved with these weights.")
        return
    if quantize is not None:
        raise CheckpointError(f"{folder} is already quantized; load it without quantize=.")
    if not isinstance(record, dict):
        raise CheckpointError(f"{folder}/config.json: quantization_config is a {type(record).__name__}, not an "
                              "object: the file is damaged. Restore the config.json saved with the weights.")
    method = record.get("quant_method", "ernie-lab")
    if method != "ernie-lab":
        raise CheckpointError(f"{folder}/config.json: quantization_config is {method!r} quantization, another "
                              "tool's format, which this kit does not read. Load the unquantized checkpoint and "
                              "quantize it here (load_model(..., quantize='w4a16')).")


def rebuild_layers(model: nn.Module, record: dict) -> None:
    """Swap the meta linears named in a checkpoint's ``quantization_config`` for meta QuantLinears.

    Every entry is checked first (a layer the model has, an ``nn.Linear`` the kit quantizes, a known scheme,
    a group size dividing its width, symmetric a bool), then the layers are swapped."""
    modules = record.get("modules") if isinstance(record, dict) else None
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError("config.json has a quantization_config without a 'modules' table: it was not written "
                              "by ernie-lab's save_model. Re-save the quantized model, or remove the entry.")
    layers = {name: _rebuilt_layer(model, name, spec) for name, spec in modules.items()}
    replace_linears(model, lambda name, linear: layers[name], filter=lambda name, module: name in layers,
                    tied_head=True)
    model.quantization_config = record


def _rebuilt_layer(model: nn.Module, name, spec) -> QuantLinear:
    """The meta QuantLinear for one quantization_config entry, or a CheckpointError naming the entry."""
    from ..model.moe import Router
    where = f"config.json quantization_config['modules'][{name!r}]"
    try:
        linear = model.get_submodule(name) if isinstance(name, str) else None
    except AttributeError:
        linear = None
    if linear is None:
        raise CheckpointError(f"{where}: quantization_config names a layer {name!r} that this model does not have. "
                              "config.json and the weights come from different models.")
    if not isinstance(linear, nn.Linear) or isinstance(linear, Router) or not isinstance(spec, dict) \
            or spec.get("scheme") not in SCHEMES:
        raise CheckpointError(f"{where}: quantization_config for {name!r} is not a linear layer with a known scheme "
                              f"({spec}); schemes are {sorted(SCHEMES)}.")
    if name == tied_head_name(model):
        raise CheckpointError(f"{where}: the LM head is tied to the embedding (tie_word_embeddings), so it is "
                              "never quantized; the entry does not belong to this config.")
    try:
        return _meta_layer(linear, spec["scheme"], spec.get("group_size", 128), spec.get("symmetric", True))
    except InputError as err:
        raise CheckpointError(f"{where} = {spec}: {err} The config.json is damaged; restore the one saved with the "
                              "weights.") from None


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
        check_values(module, {leaf: tensor}, module_name + ".")


def _meta_layer(linear: nn.Linear, scheme: str, group: int, symmetric: bool) -> QuantLinear:
    with torch.device("meta"):
        return QuantLinear(linear.in_features, linear.out_features, scheme, group_size=group, symmetric=symmetric,
                           bias=linear.bias is not None, dtype=linear.weight.dtype)


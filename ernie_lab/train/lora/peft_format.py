"""LoRA adapters in peft's format: ``save_adapter`` / ``load_adapter`` and the names that make them peft's.

Submodule and tensor names follow peft (``base_layer``, ``lora_A.weight``, ``lora_B.weight``), so a saved
adapter is a peft adapter:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": [...], ...}
    adapter_model.safetensors    base_model.model.<Hub module path>.lora_A.weight  (r, in)
                                 base_model.model.<Hub module path>.lora_B.weight  (out, r)

The Hub module path comes from the kit's name table (``layers.0.attn.q_proj`` is
``model.layers.0.self_attn.q_proj``). Text MoE experts are saved per expert
(``model.layers.1.mlp.experts.3.gate_proj``), the layout of the checkpoint files; peft >= 0.21 converts
such an adapter itself when it loads it into a transformers 5 model, whose experts are fused 3-D
parameters (``mlp.experts.gate_up_proj``): gate and up LoRAs of rank r become one rank-2r LoRA of the
fused weight. :func:`load_adapter` reads both forms (per-expert and peft's fused one).

``load_adapter`` checks the whole adapter before it changes the model: the config's fields (``lora_alpha``
null or a string, rank 0, bad patterns), the tensors (empty, NaN, integer, not 2-D, duplicated) and every
A / B shape against the base model's linear layers (an adapter made for another base model). A refused
load leaves the model exactly as it was, so the right adapter then loads. ``save_adapter`` refuses a model
without LoRA layers, or with NaN / Inf in its adapter, before it touches the folder.

What interoperates with peft 0.21.2 on transformers 5.23 (tests/test_lora.py checks each, logits within 1e-4):

* dense models: everything (attention and MLP), both directions; trainable counts equal peft's.
* text MoE models: attention, dense-layer MLPs, shared experts and routed experts, both directions. peft
  rewrites every ``gate_proj`` / ``up_proj`` / ``down_proj`` target of a transformers 5 MoE model into
  the fused expert parameters and would silently skip the dense layers' and shared experts' MLPs, so the
  kit names those in ``target_parameters`` (same tensors, same layout). peft's fused experts need
  ``lora_dropout`` 0, and its fused gate/up LoRA (rank 2r, block-diagonal B stored dense) has more
  trainable numbers than the kit's per-expert gate and up LoRAs: counts match peft's for attention,
  dense and shared-expert targets, not for routed experts.
* vision-language models: attention, dense-layer MLPs, shared experts, routed experts, the ViT and the
  resampler (``vision=True``) load into peft on transformers' VL model (through pictures and 3-D
  positions). peft does not fuse this model's per-expert names, so the kit saves its routed experts already
  fused, per expert group (``fused_experts.py``); a group must be adapted whole (all experts, gate and up
  together), or ``save_adapter`` says why it cannot. The other way, a peft-made routed-expert adapter
  (``target_parameters``) loads into the kit; peft-made VL adapters of other layers carry transformers'
  in-memory names (``model.language_model.layers...``), which the kit does not read.
  ``targets.LORA_TARGETS`` has each name.

A QLoRA adapter (over a quantized base) trains in float32 and saves like any other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError, InputError
from ...atomic import atomic_folder
from .layer import (VISION_PREFIXES, LoRALinear, _features, check_settings, is_linear_like, lora_layers,
                    replace_linears_back, wrap_layers)
from .fused_experts import GATE_UP_PATTERN, fused_adapters, is_fused_experts, split_fused_experts
from .targets import PEFT_MODULE_NAMES

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------------- names
def _name_table(model: nn.Module) -> list:
    from ...io.architectures import name_table

    return name_table(model.config)


def hub_module_path(lab_module: str, table: list) -> str:
    """``layers.0.attn.q_proj`` -> ``model.layers.0.self_attn.q_proj`` (through the parameter name)."""
    from ...io.hub_names import lab_to_hub

    hub = lab_to_hub(lab_module + ".weight", table)
    if hub is None or not hub.endswith(".weight"):
        raise ConfigError(f"{lab_module!r} has no Hub name in the kit's name table; it cannot be saved as a peft adapter.")
    return hub.removesuffix(".weight")


def lab_module_path(hub_module: str, table: list) -> str | None:
    from ...io.hub_names import hub_to_lab

    lab = hub_to_lab(hub_module + ".weight", table)
    return lab.removesuffix(".weight") if lab else None


# ----------------------------------------------------------------------------------- save
def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's names: text MoE experts per expert (peft fuses them itself), the VL
    model's routed experts already fused per expert group (``fused_experts.py``)."""
    table = _name_table(model)
    layers = lora_layers(model)
    fused = fused_adapters(model, layers)                  # VL routed experts: peft's fused layout
    held = {name for f in fused for name in f.kit_names}
    tensors = {f"{PEFT_PREFIX}{f.path}.lora_{side}.weight": factor for f in fused for side, factor in (("A", f.A),
                                                                                                    ("B", f.B))}
    for name, layer in layers.items():
        if name in held:
            continue
        hub = PEFT_PREFIX + hub_module_path(name, table)
        tensors[f"{hub}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{hub}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    return tensors


def adapter_config(model: nn.Module, base_model_name_or_path: str | None = None) -> dict:
    """peft's LoraConfig fields for this model's adapters."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("this model has no LoRA layers; call apply_lora(model, ...) or load_adapter first.")
    first = next(iter(layers.values()))
    settings = getattr(model, "lora_config", {})
    ranks = {n: (l.r, l.alpha) for n, l in layers.items() if (l.r, l.alpha) != (first.r, first.alpha)}
    if ranks:
        raise InputError(f"saving adapters of mixed ranks is not supported (e.g. {next(iter(ranks))}).")
    fused = fused_adapters(model, layers)
    held = {name for f in fused for name in f.kit_names}
    targets, parameters = _peft_targets(model, [n for n in layers if n not in held])
    parameters = sorted(set(parameters or ()) | {f.target for f in fused}) or None
    gate_up = any(f.target.endswith("gate_up_proj") for f in fused)   # rank 2r, alpha 2*alpha: scale alpha / r
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": settings.get("dropout", 0.0),
        "target_modules": targets, "target_parameters": parameters,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {GATE_UP_PATTERN: 2 * first.r} if gate_up else {},
        "alpha_pattern": {GATE_UP_PATTERN: 2 * first.alpha} if gate_up else {},
    }


def _peft_targets(model: nn.Module, names: list[str]) -> tuple[list[str], list[str] | None]:
    """(target_modules, target_parameters) that make peft adapt exactly the kit's layers.

    Dense models: the leaf names. MoE models: peft >= 0.21 rewrites every ``gate_proj`` / ``up_proj`` /
    ``down_proj`` target of a transformers 5 MoE model into the fused expert parameters, and would drop
    the dense layers' and shared experts' MLPs; those are named as parameters (``mlp.gate_proj.weight``,
    ``shared_experts.up_proj.weight``), which peft adapts with the same LoRA layout.
    """
    from ...model.moe import moe_blocks

    leafs = sorted({PEFT_MODULE_NAMES.get(n, n.rsplit(".", 1)[-1]) for n in names})  # targets.py: renamed leaves
    if not moe_blocks(model):
        return leafs, None
    mlp_leafs = {"gate_proj", "up_proj", "down_proj"}
    experts = sorted({n.rsplit(".", 1)[-1] for n in names if ".experts." in n})
    modules = sorted({leaf for leaf in leafs if leaf not in mlp_leafs} | set(experts))
    parameters = sorted({(".".join(n.split(".")[-2:]) if ".shared_experts." in n else f"mlp.{n.rsplit('.', 1)[-1]}")
                         + ".weight" for n in names if n.rsplit(".", 1)[-1] in mlp_leafs and ".experts." not in n})
    return modules, parameters or None


def base_fingerprint(model: nn.Module) -> dict:
    """What an adapter remembers of its base (in the safetensors metadata, which peft ignores)."""
    text = model.config.get_text_config()
    return {"model_type": model.config.model_type, "hidden_size": text.hidden_size,
            "num_hidden_layers": text.num_hidden_layers, "vocab_size": text.vocab_size}


def save_adapter(model: nn.Module, folder: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's format) into ``folder``,
    atomically (``ernie_lab.atomic.atomic_folder``: written beside it, then swapped into place in one step).
    Other files of an existing ``folder`` (a README, notes) are kept."""
    check_path(folder, "save_adapter: folder")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is a file; save_adapter writes a folder (adapter_config.json + "
                         f"adapter_model.safetensors). Pick another path.")
    contents = adapter_contents(model, base_model_name_or_path)   # every check before the folder is touched
    with atomic_folder(folder, carry_over=not_adapter_file) as staging:  # a kill leaves the previous adapter
        write_contents(staging, *contents)
    return folder


def check_path(folder, name: str) -> None:
    """An InputError naming ``name`` unless ``folder`` is a str or os.PathLike."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"{name} must be a path (str or pathlib.Path), got {type(folder).__name__}; the order "
                         "is (model, folder).")


def not_adapter_file(name: str) -> bool:
    """Files of the folder a new adapter save keeps (a README, notes, a tokenizer): all but the adapter's two."""
    return name not in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def write_adapter(model: nn.Module, folder: Path, *, base_model_name_or_path: str | None = None) -> None:
    """The adapter's two files, straight into ``folder`` (a folder the caller is writing atomically)."""
    write_contents(folder, *adapter_contents(model, base_model_name_or_path))


def adapter_contents(model: nn.Module, base_model_name_or_path: str | None = None) -> tuple[dict, dict, dict]:
    """(config, tensors, metadata) of the model's adapter, checked: LoRA layers exist, one rank, finite numbers."""
    if not isinstance(model, nn.Module):
        raise InputError(f"save_adapter needs the model with LoRA layers, got {type(model).__name__}.")
    config = adapter_config(model, base_model_name_or_path)
    tensors = adapter_state_dict(model)
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise InputError(f"the adapter tensor {name} holds NaN or Inf; a diverged adapter is not saved "
                             f"(resume from an earlier checkpoint, with a lower learning rate).")
    return config, tensors, {"format": "pt", "ernie_lab_base": json.dumps(base_fingerprint(model))}


def write_contents(folder: Path, config: dict, tensors: dict, metadata: dict) -> None:
    from safetensors.torch import save_file

    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata=metadata)


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a peft LoRA adapter folder, with clear errors for what is missing or broken."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    check_path(folder, "adapter folder")
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; an adapter is a folder with {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS} (written by save_adapter or peft's save_pretrained).")
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    for f in (config_file, weights_file):
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: a peft adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file} is not valid JSON ({err}); re-save the adapter.") from None
    try:
        tensors = load_file(weights_file)
        with safe_open(weights_file, "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_file} is corrupt or not a safetensors file ({err}); re-save the adapter.") from None
    check_config(config, config_file)
    if not tensors:
        raise CheckpointError(f"{weights_file} holds no tensors; the adapter is empty. Re-save it.")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights_file}: tensor {name} is {tensor.dtype}; LoRA weights are floating point.")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_file}: tensor {name} holds NaN or Inf; the adapter diverged or is "
                                  "damaged. Use an earlier checkpoint.")
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"{config_file}: peft_type {config.get('peft_type')!r}; the kit loads LoRA adapters only.")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(flag):
            raise ConfigError(f"{config_file}: {flag}=true is not supported by ernie_lab.lora (plain LoRA only).")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ConfigError(f"{config_file}: LoRA biases are not supported (bias must be 'none').")
    if "ernie_lab_base" in metadata:
        try:
            base = json.loads(metadata["ernie_lab_base"])
        except (json.JSONDecodeError, TypeError):
            base = None
        if not isinstance(base, dict):
            raise CheckpointError(f"{weights_file}: its ernie_lab_base metadata is damaged "
                                  f"({metadata['ernie_lab_base']!r}); re-save the adapter.")
        config = {**config, "ernie_lab_base": base}
    return config, tensors


def check_config(config, config_file) -> None:
    """A ConfigError naming the field unless adapter_config.json's LoRA fields have usable types and values."""
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file} must hold a JSON object (peft's LoraConfig), got {type(config).__name__}.")
    where = f"{config_file}: "
    r, alpha, dropout = config.get("r", 8), config.get("lora_alpha", 8), config.get("lora_dropout", 0.0)
    if alpha is None:
        raise ConfigError(f"{where}\"lora_alpha\" is null; give a number (the update is scaled by lora_alpha / r; "
                          f"peft's default is 8).")
    try:
        check_settings(r, alpha, dropout or 0.0, where)
    except InputError as err:
        raise ConfigError(str(err)) from None
    for key, test, kind in (("rank_pattern", lambda v: not isinstance(v, bool) and isinstance(v, int) and v > 0,
                             "a positive integer rank"),
                            ("alpha_pattern", lambda v: not isinstance(v, bool) and isinstance(v, (int, float))
                             and v == v and abs(v) != float("inf"), "a number")):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ConfigError(f"{where}{key} must be an object of module pattern -> value, got {pattern!r}.")
        for name, value in pattern.items():
            try:
                re.compile(name)
            except re.error as err:
                raise ConfigError(f"{where}{key}: {name!r} is not a valid pattern ({err}).") from None
            if not test(value):
                raise ConfigError(f"{where}{key}[{name!r}] must be {kind}, got {value!r}.")
    targets = config.get("target_modules")
    if targets is not None and not isinstance(targets, str) and (
            not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise ConfigError(f"{where}target_modules must be a list of module names (or one regex), got {targets!r}.")


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Load a peft LoRA adapter (saved by :func:`save_adapter` or by peft) into an ernie-lab model.

    A model without LoRA layers gets them on exactly the modules the adapter names; a model that has
    them must have the same ones. Fused MoE expert adapters (peft on transformers 5:
    ``mlp.experts.base_layer.lora_A.weight`` for ``gate_up_proj``) are split per expert. Errors name
    the tensor and what does not match.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"load_adapter needs the base model first, then the folder; got {type(model).__name__}.")
    config, tensors = read_adapter(folder)
    _check_base(model, config, folder)
    table = _name_table(model)
    per_module = _per_module_tensors(model, tensors, config, table, folder)   # lab name -> (A, B, r, alpha)
    layers = lora_layers(model)
    if layers:
        _check_fits_layers(layers, per_module, folder)
    else:
        _check_fits_linears(model, per_module, folder)
    # Everything is checked: from here on nothing is refused, so nothing is left half-applied.
    if not layers:
        _wrap_exactly(model, per_module, config)
        layers = lora_layers(model)
    for name, (A, B, r, alpha) in per_module.items():
        layer = layers[name]
        with torch.no_grad():
            was_merged = layer.merged
            layer.unmerge()
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
            layer.alpha, layer.scale = alpha, alpha / r
            if was_merged:
                layer.merge()
    return model


def _check_fits_layers(layers: dict, per_module: dict, folder) -> None:
    """A model that has LoRA layers takes an adapter of exactly those layers, ranks and shapes."""
    hint = ("; this model already has other LoRA layers: load the adapter into a fresh base model, or "
            "merge_lora(model, unload=True) first")
    missing = sorted(set(layers) - set(per_module))
    if missing:
        raise CheckpointError(f"{folder}: the adapter has no tensors for {len(missing)} LoRA layer(s) of the model, "
                              f"e.g. {missing[0]!r}; the adapter is incomplete or was made for other target modules"
                              f"{hint}.")
    for name, (A, B, r, alpha) in per_module.items():
        layer = layers.get(name)
        if layer is None:
            raise ConfigError(f"{folder}: the adapter adapts {name!r}, which this model has no LoRA layer for{hint}.")
        if A.shape != (layer.r, layer.in_features) or B.shape != (layer.out_features, layer.r):
            raise CheckpointError(f"{folder}: {name!r} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the "
                                  f"layer: expected ({layer.r}, {layer.in_features}) / ({layer.out_features}, {layer.r})"
                                  f"{hint if A.shape[0] != layer.r else ''}.")


def _check_fits_linears(model: nn.Module, per_module: dict, folder) -> None:
    """A model without LoRA layers: every adapted module is a linear layer of the right (in, out)."""
    linears = {n: m for n, m in model.named_modules() if is_linear_like(m)}
    lacking = sorted(set(per_module) - set(linears))
    if lacking:
        raise ConfigError(f"{folder}: the adapter targets {lacking[0]!r} (and {len(lacking) - 1} more), which this "
                          f"model lacks; was it made for another base model?")
    for name, (A, B, r, alpha) in sorted(per_module.items()):
        in_features, out_features = _features(linears[name])
        if A.shape != (r, in_features) or B.shape != (out_features, r):
            raise CheckpointError(f"{folder}: {name!r} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit the "
                                  f"layer: expected ({r}, {in_features}) / ({out_features}, {r}); was the adapter made "
                                  f"for another base model?")


def _check_base(model: nn.Module, config: dict, folder) -> None:
    base = config.get("ernie_lab_base")
    if not base:
        return
    try:
        ours = base_fingerprint(model)
    except AttributeError:
        raise InputError(f"load_adapter loads into an ernie-lab model (with a config); got {type(model).__name__}.") from None
    wrong = {k: (v, ours.get(k)) for k, v in base.items() if k in ours and ours[k] != v}
    if wrong:
        raise ConfigError(f"{folder}: the adapter was made for another base model: "
                          + ", ".join(f"{k} {a} (this model: {b})" for k, (a, b) in wrong.items())
                          + ". Load it into the model it was trained on.")


def _rank_alpha(hub_module: str, config: dict) -> tuple[int, float]:
    """peft's rank / alpha for one module: rank_pattern / alpha_pattern (regex, suffix match) over r / lora_alpha."""
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    for key, value in (config.get("rank_pattern") or {}).items():
        if re.search(rf"(^|\.){key}$", hub_module) or re.fullmatch(key, hub_module):
            r = value
    for key, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){key}$", hub_module) or re.fullmatch(key, hub_module):
            alpha = value
    return int(r), float(alpha)


def _per_module_tensors(model, tensors, config, table, folder) -> dict:
    """lab module name -> (A (r, in), B (out, r), r, alpha), fused expert adapters split per expert."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise CheckpointError(f"{folder}: tensor {key!r} is not a LoRA A or B weight (modules_to_save, biases and "
                                  f"other peft methods are not supported).")
        if tensor.dim() != 2:
            raise CheckpointError(f"{folder}: tensor {key!r} has shape {tuple(tensor.shape)}; LoRA A and B weights are "
                                  "2-D matrices.")
        if match.group(2) in pairs.get(match.group(1), {}):
            raise CheckpointError(f"{folder}: two lora_{match.group(2)} tensors for {match.group(1)!r} (one named "
                                  f"{key!r}); the adapter holds one adapter per module.")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    result = {}
    for hub, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{folder}: {hub!r} has lora_{'A' if 'A' in ab else 'B'} but no "
                                  f"lora_{'B' if 'A' in ab else 'A'}; the adapter file is incomplete.")
        if is_fused_experts(hub):
            result.update(split_fused_experts(model, hub, ab["A"], ab["B"], lambda path: _rank_alpha(path, config)[1],
                                              folder))
            continue
        lab = lab_module_path(hub, table)
        if lab is None:
            raise ConfigError(f"{folder}: the adapter targets {hub!r}, which this model does not have.")
        r, alpha = _rank_alpha(hub, config)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise CheckpointError(f"{folder}: {hub!r} has rank {ab['A'].shape[0]} in the file but r={r} in "
                                  f"{ADAPTER_CONFIG}.")
        result[lab] = (ab["A"], ab["B"], r, alpha)
    return result


def _wrap_exactly(model: nn.Module, per_module: dict, config: dict) -> None:
    """apply_lora on exactly the adapter's modules, with each module's rank."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        wrap_layers(model, sorted(per_module),
                    lambda name, linear: LoRALinear(linear, per_module[name][2], per_module[name][3]))
    except BaseException:
        replace_linears_back(model, lora_layers(model))   # an unforeseen failure: the model as it was
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    vision = any(n.startswith(VISION_PREFIXES) for n in per_module)
    model.lora_config = dict(r=config.get("r", 8), alpha=config.get("lora_alpha", 8),
                             dropout=config.get("lora_dropout", 0.0),
                             target_modules=sorted({n.rsplit(".", 1)[-1] for n in per_module}), vision=vision)

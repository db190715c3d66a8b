"""Export: write an ernie-lab model back in the Hub layout that transformers, vLLM and FastDeploy read.

The inverse of loading: ernie-lab parameter names go through the model's name table backwards
(``hub_names.NAME_MAP`` for text models, dense and MoE alike; ``VL_NAME_MAP`` for vision-language ones,
whose routers are written transposed, as the Hub stores them),
the config is written as the Hub's ``config.json`` (flat for text models, transformers' nested
``text_config`` / ``vision_config`` for VL), and the tensors as safetensors, split into shards with a
``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. A tied LM head is not written
twice: readers re-tie it from ``tie_word_embeddings``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import InputError
from .architectures import name_table
from .hub_names import INDEX_FILE, WEIGHTS_FILE, is_transposed, lab_to_hub
from .quant.checkpoint import quant_lab_to_hub

QUANT_TENSORS = (".qweight", ".scales", ".zeros")  # quantized layers (ernie_lab.quant): stored as they are


def save_model(model, folder: str | Path, *, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``config.json`` and safetensors weights of ``model`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hub_state_dict(model)
    config = model.config.to_dict()
    floats = [t for name, t in tensors.items() if t.is_floating_point() and not name.endswith(QUANT_TENSORS)]
    config["dtype"] = str((floats or list(tensors.values()))[0].dtype).removeprefix("torch.")
    if getattr(model, "quantization_config", None):
        config["quantization_config"] = model.quantization_config  # ernie_lab.quant: layers, formats
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    shards = split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata={"format": "pt"})
        return folder
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder


def whole_config(model):
    """The config that describes all of ``model`` (kept for older callers: it is ``model.config``)."""
    return model.config


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their Hub names (contiguous, on CPU, tied head left out)."""
    table = name_table(model.config)
    tied = model.config.get_text_config().tie_word_embeddings
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        hub = lab_to_hub(name, table) or quant_lab_to_hub(name, table)
        if hub is None:
            raise InputError(f"parameter {name!r} has no Hub name; was a module added that the export does not "
                             "know (e.g. un-merged LoRA adapters)? Merge or remove it before saving.")
        tensor = tensor.detach().to("cpu")
        out[hub] = (tensor.t() if is_transposed(name, table) else tensor).contiguous()
    return out


def split_into_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a single tensor larger than max_bytes gets a shard of its own."""
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    return shards + [current] if current else shards

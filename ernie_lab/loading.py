"""Loading real checkpoints: a Hub id or a folder -> config.json + safetensors -> an ernie-lab model.

A checkpoint is a config.json and its weights, either one ``model.safetensors`` or several shards
listed in ``model.safetensors.index.json`` ("weight_map": tensor name -> file). ``hub_names.py`` holds
the translation from the Hub's tensor names to ernie-lab's, written as data.

Loading checks everything before it builds anything: every file is readable, every tensor the model
needs is there with the right shape, and nothing unknown is left over. Only then is the model built
on the meta device (shapes, no memory) and filled **one tensor at a time**: each tensor is read, passed
through a list of *transforms* ``(ernie-lab name, tensor) -> tensor`` and put in place of its meta
parameter before the next one is read. The transforms are, in order:

    paddle_transpose      -Paddle files store Linear weights as (in, out): transpose them back
    stored_transpose      tensors the Hub stores transposed (the VL routers, (hidden, experts))
    cast(dtype)           the requested dtype, except routers and correction biases (kept float32)
    ...                   anything passed as ``transforms=`` (e.g. quantize-on-read)

so the peak memory is the finished model plus about one tensor. Nothing is half-loaded: a failure
leaves no model behind.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from . import architectures, hub_names, quant
from .quant import checkpoint as quant_checkpoint
from .config import ErnieConfig, parse_config, read_config_json
from .errors import CheckpointError, ConfigError
from .hub_names import (HUB_FILES, INDEX_FILE, KEEP_FLOAT32, NAME_MAP, SKIPPED, VL_NAME_MAP,  # noqa: F401
                        WEIGHTS_FILE, hub_to_lab, lab_to_hub)

Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (ernie-lab name, tensor) -> tensor


# ----------------------------------------------------------------------------------------- public
def load_model(source: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               transforms: Iterable[Transform] = (), quantize: str | None = None, group_size: int = 128):
    """Load an ERNIE 4.5 checkpoint from a Hub id (``baidu/ERNIE-4.5-0.3B-PT``) or a local folder.

    ``dtype`` None keeps the checkpoint's dtype; the model comes back in eval mode on ``device``.
    ``transforms`` are applied to each tensor after the built-in ones (see the module docstring).
    ``quantize`` (e.g. ``"w4a16"``) quantizes each linear weight as it is read (``ernie_lab.quant``);
    a checkpoint saved quantized (``quantization_config`` in config.json) comes back quantized, bit-exact.
    """
    folder = resolve_checkpoint(source)
    raw, config_path = read_config_json(folder)
    config = config_from_dict(raw, source=str(config_path))
    files = weight_files(folder)
    hub_shapes = read_headers(files)  # hub name -> (file, shape); reads headers only
    paddle = hub_names.is_paddle_layout(hub_shapes)
    plan = plan_loading(config, hub_shapes, paddle=paddle)  # lab name -> hub name, all checked
    model = build_empty(config)
    if raw.get("quantization_config") is not None:
        quant_checkpoint.rebuild_layers(model, raw["quantization_config"])
    check_shapes(model, plan, hub_shapes, paddle=paddle)
    if quantize is not None:
        if raw.get("quantization_config") is not None:
            raise CheckpointError(f"{folder} is already quantized; load it without quantize=.")
        quant.check_scheme(quantize)
        quant_checkpoint.quantize_on_read(model, quantize, group_size=group_size)
    steps = tensor_transforms(config, paddle=paddle, dtype=dtype) + list(transforms)
    stream_tensors(model, plan, hub_shapes, steps, device=device, dtype=dtype)
    if config.get_text_config().tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model.eval()


def config_from_dict(raw: dict, *, source: str = "config.json"):
    """A VLConfig for vision-language checkpoints, else an ErnieConfig (``config.parse_config``)."""
    return parse_config(raw, source=source)


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local folder as it is, or a Hub id through the Hugging Face cache (HF_HOME, HF_ENDPOINT)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{path} is a file; load_model wants the folder that holds config.json and the weights.")
    repo_id = str(source)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise ConfigError(f"{source!r} is neither an existing folder nor a Hub id like 'baidu/ERNIE-4.5-0.3B-PT'.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as err:  # offline, no cache, no network, unknown repo: all end here
        raise CheckpointError(
            f"Could not find the weights of {repo_id!r} ({type(err).__name__}: {err}).\n"
            "This machine has no copy in its Hugging Face cache "
            f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}) and the Hub could not be reached.\n"
            "To fix it: on a machine with internet run `hf download "
            f"{repo_id} --local-dir <folder>` and pass that folder to load_model; or set HF_ENDPOINT to a "
            "reachable mirror (and unset HF_HUB_OFFLINE); or copy a filled HF_HOME cache here."
        ) from None


def is_paddle_checkpoint(source, raw_config: dict) -> bool:
    """Kept for older callers: the layout is now decided from the tensors (``hub_names.is_paddle_layout``)."""
    if str(source).rstrip("/").endswith("-Paddle"):
        return True
    return str(raw_config.get("framework", "")).lower() == "paddle"


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or every shard its index names."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index ({err!r}). Re-download it.") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists {len(shards)} shard(s) but {len(missing)} are missing from {folder}: "
                f"{', '.join(missing)}. Download the missing file(s) again (an interrupted download?)."
            )
        return [folder / s for s in shards]
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    raise CheckpointError(
        f"No weights in {folder}: expected {WEIGHTS_FILE} or {INDEX_FILE} with its shards. "
        "Only safetensors checkpoints are supported (convert .bin / .pdparams with the tools that made them)."
    )


def read_headers(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Open every file's header (cheap: no tensor data is read) and list its tensors."""
    found = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    found[name] = (file, tuple(f.get_slice(name).get_shape()))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({err}). It is probably truncated or corrupt: "
                "delete it and download it again."
            ) from None
    return found


# ---------------------------------------------------------------------------- the loading plan
def name_table(config) -> list:
    """The Hub <-> ernie-lab name table of a config's architecture (``architectures.REGISTRY``)."""
    return architectures.name_table(config)


def plan_loading(config: ErnieConfig, hub_shapes: dict, *, paddle: bool = False) -> dict[str, str]:
    """Decide, before loading anything, which Hub tensor fills which ernie-lab parameter."""
    table = name_table(config)
    hub_names_ = {hub_names.unprefix_paddle(n) if paddle else n: n for n in hub_shapes}
    plan, unknown, skipped = {}, [], {}
    for name, original in hub_names_.items():
        reason = next((why for pattern, why in SKIPPED if re.fullmatch(pattern, name)), None)
        if reason:
            skipped.setdefault(reason, 0)
            skipped[reason] += 1
            continue
        lab = hub_to_lab(name, table) or quant_checkpoint.quant_hub_to_lab(name, table)
        if lab is None:
            unknown.append(original)
        else:
            plan[lab] = original
    if config.get_text_config().tie_word_embeddings:
        plan.pop("lm_head.weight", None)  # the head is the embedding; a stored copy is redundant
    for reason, count in skipped.items():
        if "MTP" in reason:
            print(f"ernie-lab: skipping {count} tensors of {reason}.")
    if unknown:
        shown = ", ".join(sorted(unknown)[:5]) + (" ..." if len(unknown) > 5 else "")
        raise CheckpointError(
            f"The checkpoint holds {len(unknown)} tensor(s) that an {config.model_type} model has no place for: "
            f"{shown}. Is config.json from a different architecture than the weights?"
        )
    return plan


def build_empty(config):
    """The model's skeleton on the meta device: shapes without memory, filled tensor by tensor."""
    with torch.device("meta"):
        return architectures.build(config)


def check_shapes(model, plan: dict[str, str], hub_shapes: dict, *, paddle: bool = False) -> None:
    """Every parameter present with the right shape, or one error listing what is wrong."""
    table = name_table(model.config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if model.config.get_text_config().tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(plan))
    extra = sorted(set(plan) - set(expected))
    wrong = []
    for lab, hub in plan.items():
        if lab not in expected:
            continue
        file, shape = hub_shapes[hub]
        if paddle and _is_linear(lab, shape):
            shape = shape[::-1]
        if hub_names.is_transposed(lab, table):
            shape = shape[::-1]
        if shape != expected[lab]:
            wrong.append(f"{hub} in {file.name}: shape {list(shape)}, the config needs {list(expected[lab])}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: " + ", ".join(lab_to_hub(m, table) or m for m in missing[:5])
                        + (" ..." if len(missing) > 5 else ""))
    if extra:
        problems.append(f"{len(extra)} tensor(s) the config has no place for: " + ", ".join(plan[e] for e in extra[:5]))
    if wrong:
        problems.append("wrong shapes: " + "; ".join(wrong[:5]) + (" ..." if len(wrong) > 5 else ""))
    if problems:
        raise CheckpointError("The weights do not match config.json: " + " | ".join(problems)
                              + ". Check that config.json and the .safetensors files come from the same checkpoint.")


def _is_linear(lab_name: str, shape: tuple) -> bool:
    return len(shape) == 2 and lab_name.endswith("weight") and not lab_name.startswith("embed")


# ---------------------------------------------------------------------------- the transforms
def paddle_transpose(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """-Paddle files store every Linear weight as (in, out), the transpose of PyTorch's (out, in)."""
    return tensor.t().contiguous() if _is_linear(name, tuple(tensor.shape)) else tensor


def stored_transpose(table: list) -> Transform:
    """Transpose back the tensors that the name table marks as stored transposed."""
    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t().contiguous() if hub_names.is_transposed(name, table) else tensor
    return transform


def cast(dtype: torch.dtype) -> Transform:
    """Convert to ``dtype``, but keep the routers and correction biases in float32."""
    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if name.rpartition(".")[2] in quant_checkpoint.SUFFIXES:
            return tensor  # quantized codes and scales are loaded as stored
        return tensor.float() if re.fullmatch(KEEP_FLOAT32, name) else tensor.to(dtype)
    return transform


def tensor_transforms(config, *, paddle: bool = False, dtype: torch.dtype | None = None) -> list[Transform]:
    """The built-in transforms of a checkpoint, in the order they apply."""
    steps: list[Transform] = [paddle_transpose] if paddle else []
    table = name_table(config)
    if any(hub_names.TRANSPOSED in rule[2:] for rule in table):
        steps.append(stored_transpose(table))
    if dtype is not None:
        steps.append(cast(dtype))
    return steps


# ---------------------------------------------------------------------------- streaming
def stream_tensors(model, plan: dict[str, str], hub_shapes: dict, transforms: list[Transform],
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> None:
    """Read the planned tensors one at a time, transform each, and put it in place of its meta tensor.

    Tensors are read with plain file reads (no memory map stays resident). A tensor that will be
    converted to ``dtype`` is read into one scratch buffer, reused for every such tensor, so loading in
    bf16 from an fp32 file needs the bf16 model plus one fp32 tensor, not both models.
    """
    scratch = ScratchBuffer()
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for lab, hub in plan.items():
        by_file.setdefault(hub_shapes[hub][0], []).append((lab, hub))
    bar = tqdm(total=len(plan), desc="loading weights", unit="tensor", disable=len(plan) < 50)
    try:
        for file, pairs in by_file.items():
            try:
                with open(file, "rb") as handle:
                    entries, data_start = safetensors_header(handle)
                    for lab, hub in pairs:
                        entry = entries[hub]
                        converted = dtype is not None and SAFETENSORS_DTYPES[entry["dtype"]] != dtype
                        converted = converted or _quantized_on_read(model, lab)  # read, quantize, drop
                        tensor = read_tensor(handle, entry, data_start, scratch if converted else None)
                        for transform in transforms:
                            tensor = transform(lab, tensor)
                        tensor = tensor.to(device)
                        if scratch.holds(tensor):  # a transform kept the raw tensor: it needs memory of its own
                            tensor = tensor.clone()
                        assign(model, lab, tensor)
                        del tensor
                        bar.update()
            except (OSError, RuntimeError, ValueError, KeyError) as err:
                raise CheckpointError(f"Reading {file} failed ({err!r}): the file is corrupt; download it again.") from None
    finally:
        bar.close()


def _quantized_on_read(model, lab: str) -> bool:
    """True for a float weight that a QuantLinear turns into codes as it is assigned."""
    module_name, _, leaf = lab.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module_name), quant.QuantLinear)


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(handle) -> tuple[dict, int]:
    """The header of an open safetensors file: {name: {dtype, shape, data_offsets}}, and where the data starts.

    The format: 8 bytes little-endian header length n, n bytes of JSON, then the tensors' bytes.
    """
    length = int.from_bytes(handle.read(8), "little")
    header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


class ScratchBuffer:
    """One growing byte buffer that raw tensors are read into when they are converted right away."""

    def __init__(self):
        self.bytes = torch.empty(0, dtype=torch.uint8)

    def tensor(self, shape, dtype: torch.dtype) -> torch.Tensor:
        count = math.prod(shape) * dtype.itemsize
        if self.bytes.numel() < count:
            self.bytes = torch.empty(count, dtype=torch.uint8)
        return self.bytes[:count].view(dtype).view(shape)

    def holds(self, tensor: torch.Tensor) -> bool:
        return self.bytes.numel() > 0 and tensor.device.type == "cpu" and \
            tensor.untyped_storage().data_ptr() == self.bytes.untyped_storage().data_ptr()


def read_tensor(handle, entry: dict, data_start: int, scratch: ScratchBuffer | None = None) -> torch.Tensor:
    """One tensor, read from an open safetensors file into fresh memory (or into ``scratch``)."""
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    start, end = entry["data_offsets"]
    shape = tuple(entry["shape"])
    tensor = torch.empty(shape, dtype=dtype) if scratch is None or not math.prod(shape) else scratch.tensor(shape, dtype)
    if tensor.numel() == 0:
        return tensor
    raw = tensor.reshape(-1).view(torch.uint8)                    # the tensor's bytes, to fill in place
    if raw.numel() != end - start:
        raise ValueError(f"header says {end - start} bytes for a {entry['dtype']} tensor of shape {entry['shape']}")
    handle.seek(data_start + start)
    if handle.readinto(memoryview(raw.numpy())) != raw.numel():
        raise ValueError("the file ends before the tensor's data")
    return tensor


def assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter (or buffer) ``name``, keeping its requires_grad."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, quant.QuantLinear):
        if leaf == "weight":  # quantize-on-read: the float weight becomes codes here
            module.set_weight(tensor)
            return
        quant_checkpoint.check_stored(model, name, tensor)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor

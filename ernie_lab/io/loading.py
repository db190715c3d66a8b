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

so the peak memory is the finished model plus about one tensor. As tensors are converted (cast or
quantized on read) the C heap's freed pages go back to the system (``ernie_lab.heap``): without
that, glibc's heap fragments between the codes that stay and the temporaries that go, and the same load
peaked anywhere from 2.8 to 8.0 GiB. Nothing is half-loaded: a failure leaves no model behind.

Files are untrusted: only JSON and safetensors are parsed (never pickle), JSON and safetensors headers
are read up to a bound, every header entry is checked (known floating-point dtype, offsets inside the
file, bytes matching the shape), a tensor must sit in the shard the index names and appear once, and the
memory the model needs is compared with the free memory before anything is built (``check_memory``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from . import architectures, hub_names
from .. import heap, quant
from ..model.config import ErnieConfig, parse_config, read_config_json, read_json_file
from ..errors import CheckpointError, ConfigError, InputError, NotEnoughMemoryError
from . import quantized as quant_checkpoint
from .hub_names import (HUB_FILES, INDEX_FILE, KEEP_FLOAT32, NAME_MAP, SKIPPED, VL_NAME_MAP,  # noqa: F401
                        WEIGHTS_FILE, hub_to_lab, lab_to_hub)

Transform = Callable[[str, torch.Tensor], torch.Tensor]  # (ernie-lab name, tensor) -> tensor


# ----------------------------------------------------------------------------------------- public
def load_model(source: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
               device: str | torch.device = "cpu", transforms: Iterable[Transform] = (), check_memory: bool = True,
               quantize: str | None = None, group_size: int | None = None):
    """Load an ERNIE 4.5 checkpoint from a Hub id (``baidu/ERNIE-4.5-0.3B-PT``) or a local folder.

    ``dtype`` None keeps the checkpoint's dtype (also "float32", "bf16", ...); the model comes back in
    eval mode on ``device``. ``transforms`` are applied to each tensor after the built-in ones (see the
    module docstring). ``check_memory``: refuse, before building, a model larger than the free memory
    (``ERNIE_LAB_AVAILABLE_MEMORY``, in bytes, overrides what the machine reports).
    ``quantize`` (e.g. ``"w4a16"``) quantizes each linear weight as it is read (``ernie_lab.quant``);
    a checkpoint saved quantized (``quantization_config`` in config.json) comes back quantized, bit-exact.
    ``group_size`` (default 128) goes with ``quantize`` only. The model remembers its folder
    (``model.checkpoint_folder``), where ``save_model`` finds the tokenizer to export with it.
    """
    dtype, device, transforms = check_load_arguments(source, dtype, device, transforms)
    group_size = quant_checkpoint.check_arguments(quantize, group_size, device)
    folder = resolve_checkpoint(source)
    raw, config_path = read_config_json(folder)
    config = config_from_dict(raw, source=str(config_path))
    files = weight_files(folder)
    hub_shapes = read_headers(files, weight_map=read_index(folder))  # hub name -> (file, shape); headers only
    paddle = hub_names.is_paddle_layout(hub_shapes)
    check_tied_head(config, hub_shapes, paddle=paddle)
    quant_checkpoint.check_record(folder, raw, hub_shapes, quantize)
    plan = plan_loading(config, hub_shapes, paddle=paddle)  # lab name -> hub name, all checked
    if check_memory and quantize is None:  # a quantize-on-read model is smaller than the estimate
        check_memory_fits(hub_shapes, dtype=dtype, device=device)
    model = build_empty(config)
    if raw.get("quantization_config") is not None:
        quant_checkpoint.rebuild_layers(model, raw["quantization_config"])
    check_shapes(model, plan, hub_shapes, paddle=paddle)
    if quantize is not None:
        quant_checkpoint.quantize_on_read(model, quantize, group_size=group_size)
    steps = tensor_transforms(config, paddle=paddle, dtype=dtype) + list(transforms)
    stream_tensors(model, plan, hub_shapes, steps, device=device, dtype=dtype)
    if config.get_text_config().tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.checkpoint_folder = folder  # save_model finds the tokenizer here
    return model.eval()


# ---------------------------------------------------------------------------- the arguments
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
               "half": torch.float16, "float64": torch.float64, "fp64": torch.float64}


def check_load_arguments(source, dtype, device, transforms) -> tuple[torch.dtype | None, torch.device, list]:
    """load_model's arguments, checked before any file is opened: (dtype, device, transforms)."""
    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"load_model's source must be a folder path or a Hub id string, got {type(source).__name__}.")
    return as_dtype(dtype), as_device(device), as_transforms(transforms)


def as_dtype(dtype) -> torch.dtype | None:
    """None, a floating torch dtype, or its name ("bfloat16", "bf16", "float32", ...)."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in DTYPE_NAMES:
            raise InputError(f"load_model: dtype {dtype!r} is not a dtype; use one of {', '.join(DTYPE_NAMES)}, "
                             "a torch dtype such as torch.bfloat16, or None to keep the checkpoint's.")
        return DTYPE_NAMES[dtype.removeprefix("torch.")]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError(f"load_model: dtype must be a floating-point torch dtype (torch.float32, torch.bfloat16, "
                         f"torch.float16) or None, got {dtype!r}. Quantized loading is a transform, not a dtype.")
    return dtype


def as_device(device) -> torch.device:
    """A torch.device this machine has, or an InputError naming the argument."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"load_model: device {device!r} is not a device ({err}); use 'cpu', 'cuda' or 'cuda:0'.") from None
    if device.type == "meta":
        raise InputError("load_model: device 'meta' holds no data; build on meta with architectures.build instead.")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise InputError(f"load_model: device {str(device)!r} is not available on this machine "
                         f"({torch.cuda.device_count()} CUDA device(s)); use device='cpu'.")
    if device.type not in ("cpu", "cuda") and device.type != "mps":
        raise InputError(f"load_model: device type {device.type!r} is not supported; use 'cpu' or 'cuda'.")
    return device


def as_transforms(transforms) -> list:
    try:
        steps = list(transforms or ())
    except TypeError:
        raise InputError(f"load_model: transforms must be a list of functions (name, tensor) -> tensor, "
                         f"got {type(transforms).__name__}.") from None
    bad = [t for t in steps if not callable(t)]
    if bad:
        raise InputError(f"load_model: every transform must be a function (name, tensor) -> tensor, got {bad[0]!r}.")
    return steps


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


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or every shard its index names."""
    weight_map = read_index(folder)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder / INDEX_FILE} lists {len(shards)} shard(s) but {len(missing)} are missing from {folder}: "
                f"{', '.join(missing)}. Download the missing file(s) again (an interrupted download?)."
            )
        return [folder / s for s in shards]
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    found = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pdparams", ".ckpt"))
    raise CheckpointError(
        f"No weights in {folder}: expected {WEIGHTS_FILE} or {INDEX_FILE} with its shards"
        + (f" (found {', '.join(found)}: pickle files, which this kit never opens since they can run code)" if found else "")
        + ". Only safetensors checkpoints are supported (convert .bin / .pdparams with the tools that made them)."
    )


def read_index(folder: Path) -> dict[str, str] | None:
    """The index's weight_map (tensor name -> shard file name), checked; None for a single-file checkpoint."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return None
    data = read_json_file(index, CheckpointError, what="safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index} is not a valid safetensors index: it needs a 'weight_map' object of "
                              "tensor name -> shard file name. Re-download it.")
    unsafe = sorted({v for v in weight_map.values() if Path(v).name != v or v in ("", ".", "..")
                     or not v.endswith(".safetensors")})
    if unsafe:
        raise CheckpointError(f"{index} names shard(s) {unsafe[:3]} that are not plain .safetensors file names in "
                              "the checkpoint folder; the index is damaged or hostile. Re-download it.")
    return weight_map


def read_headers(files: list[Path], weight_map: dict[str, str] | None = None) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Read and check every file's header (no tensor data is read) and list its tensors: name -> (file, shape).

    Each tensor must appear in one file only, and, with an index, in the very file the index names.
    """
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for file in files:
        for name, entry in read_checked_header(file).items():
            if name in found:
                raise CheckpointError(f"Tensor {name} is stored twice, in {found[name][0].name} and in {file.name}; "
                                      "which copy is meant is unclear. Remove the stale file (an older save?) or "
                                      "re-download the checkpoint.")
            if weight_map is not None and weight_map.get(name) != file.name:
                said = f"names {weight_map[name]}" if name in weight_map else "does not list it"
                raise CheckpointError(f"Tensor {name} is in {file.name}, but {INDEX_FILE} {said}; the index and "
                                      "the shards do not belong together. Re-download the checkpoint (or delete "
                                      "shards left over from an older save).")
            found[name] = (file, tuple(entry["shape"]))
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(found))
        if absent:
            raise CheckpointError(f"{INDEX_FILE} says {absent[0]} is in {weight_map[absent[0]]}, but it is not there "
                                  f"({len(absent)} such tensor(s)); the shard is from another save. Re-download it.")
    return found


def read_checked_header(file: Path) -> dict:
    """The header of one safetensors file with every entry checked, or a CheckpointError naming the file."""
    try:
        with open(file, "rb") as handle:
            entries, data_start = safetensors_header(handle)
            size = os.fstat(handle.fileno()).st_size
    except PermissionError:
        raise CheckpointError(f"Permission denied reading {file}: make it readable for this user (chmod a+r, or "
                              "copy the checkpoint folder somewhere you own).") from None
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err}). It is probably truncated or "
                              "corrupt: delete it and download it again.") from None
    for name, entry in entries.items():
        check_entry(file, name, entry, size - data_start)
    return entries


def check_entry(file: Path, name: str, entry, data_bytes: int) -> None:
    """One header entry: a known, allowed dtype, an integer shape, offsets inside the file matching the shape."""
    def corrupt(why):
        return CheckpointError(f"{file}: tensor {name} {why}. The file is truncated or corrupt: download it again.")

    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise corrupt("has no dtype / shape / data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise corrupt(f"has an invalid shape {shape!r}")
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{file}: tensor {name} has dtype {dtype!r}, which this kit does not read "
                              f"(known: {', '.join(SAFETENSORS_DTYPES)}). Convert the checkpoint to bf16 or fp32.")
    check_tensor_dtype(file, name, dtype)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise corrupt(f"has data offsets {offsets!r} outside the file's {data_bytes} data bytes")
    if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        raise corrupt(f"has {offsets[1] - offsets[0]} bytes for a {dtype} tensor of shape {shape}")


# Weights are floating point. Integer tensors are allowed only under names ending in a suffix listed here,
# with the dtypes listed for it: the quantized formats the kit writes register theirs, e.g.
# QUANTIZED_TENSOR_DTYPES[".qweight"] = {"I8", "U8"}. An integer tensor anywhere else is refused.
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
QUANTIZED_TENSOR_DTYPES: dict[str, set[str]] = {".qweight": {"I8", "U8"}, ".zeros": {"I8", "U8"}}  # ernie_lab.quant


def check_tensor_dtype(file: Path, name: str, dtype: str) -> None:
    if dtype in FLOAT_DTYPES:
        return
    if any(name.endswith(suffix) and dtype in allowed for suffix, allowed in QUANTIZED_TENSOR_DTYPES.items()):
        return
    raise CheckpointError(f"{file}: tensor {name} is stored as {dtype}, but weights must be floating point "
                          f"({', '.join(sorted(FLOAT_DTYPES))}); integer tensors appear only in the quantized "
                          "formats this kit writes. Is this a checkpoint of another tool's quantization? Load the "
                          "unquantized checkpoint instead.")


# ---------------------------------------------------------------------------- the tied head
def check_tied_head(config, hub_shapes: dict, *, paddle: bool = False) -> None:
    """With tie_word_embeddings true, a stored lm_head.weight must equal the embedding, or it would be dropped."""
    if not config.get_text_config().tie_word_embeddings:
        return
    table = name_table(config)
    by_lab = {hub_to_lab(hub_names.unprefix_paddle(n) if paddle else n, table): n for n in hub_shapes}
    head, embed = by_lab.get("lm_head.weight"), by_lab.get("embed.weight")
    if head is None or embed is None:
        return
    head_tensor, embed_tensor = read_one(hub_shapes, head), read_one(hub_shapes, embed)
    if paddle:
        head_tensor = paddle_transpose("lm_head.weight", head_tensor)
    if head_tensor.shape == embed_tensor.shape and torch.equal(head_tensor, embed_tensor.to(head_tensor.dtype)):
        return  # a redundant copy of the embedding: dropping it loses nothing
    raise CheckpointError(
        f"config.json says tie_word_embeddings: true (the output head IS the embedding), but the checkpoint "
        f"stores a different {head} in {hub_shapes[head][0].name}; loading would silently drop it. Either set "
        "\"tie_word_embeddings\": false in config.json to use the stored head, or delete lm_head.weight from "
        "the weights to use the embedding as the head."
    )


def read_one(hub_shapes: dict, hub: str) -> torch.Tensor:
    """One tensor, read by its Hub name (for checks before loading)."""
    file = hub_shapes[hub][0]
    with open(file, "rb") as handle:
        entries, data_start = safetensors_header(handle)
        return read_tensor(handle, entries[hub], data_start)


# ---------------------------------------------------------------------------- memory
MEMORY_ENV = "ERNIE_LAB_AVAILABLE_MEMORY"  # bytes; overrides what the machine reports (tests, containers)


def check_memory_fits(hub_shapes: dict, *, dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model that cannot fit the free memory of ``device``.

    needed = (values of the tensors that load) x bytes per value + the largest tensor in flight
    """
    free = available_memory(device)
    if free is None:
        return
    shapes = {name: shape for name, (_, shape) in hub_shapes.items()}
    values = sum(math.prod(shape) for name, shape in shapes.items() if skip_reason(name) is None)
    stored = stored_itemsize(hub_shapes)
    itemsize = dtype.itemsize if dtype is not None else stored
    needed = values * itemsize + max(math.prod(s) for s in shapes.values()) * stored
    if needed <= free:
        return
    gib = 1024**3
    raise NotEnoughMemoryError(
        f"This model needs about {needed / gib:.1f} GiB on {device} to load ({itemsize * 8}-bit weights plus one "
        f"tensor in flight), but only {free / gib:.1f} GiB are free. Load it with dtype=torch.bfloat16 (half of "
        "fp32), quantize it on read, use a smaller model, or free memory; check_memory=False tries anyway."
    )


def skip_reason(name: str) -> str | None:
    """Why a Hub tensor is not loaded (multi-token prediction, ...), or None for a tensor that loads."""
    return next((why for pattern, why in SKIPPED if re.fullmatch(pattern, name)), None)


def stored_itemsize(hub_shapes: dict) -> int:
    """Bytes per value of the checkpoint's largest tensor (the dtype most of it is stored in)."""
    name = max(hub_shapes, key=lambda n: math.prod(hub_shapes[n][1]))
    file = hub_shapes[name][0]
    with open(file, "rb") as handle:
        entries, _ = safetensors_header(handle)
    return SAFETENSORS_DTYPES[entries[name]["dtype"]].itemsize


def available_memory(device: torch.device) -> int | None:
    """Free bytes on ``device``: the override, MemAvailable from /proc/meminfo, or CUDA's free memory."""
    override = os.environ.get(MEMORY_ENV)
    if override:
        try:
            return int(float(override))
        except ValueError:
            raise InputError(f"{MEMORY_ENV}={override!r} must be a number of bytes.") from None
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None  # not Linux: no check
    return None


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
        reason = skip_reason(name)
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
    if "lm_head.weight" in missing:
        problems.append("no lm_head.weight although config.json says tie_word_embeddings: false (if the head is "
                        "the embedding, set it to true)")
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
    bf16 from an fp32 file needs the bf16 model plus one fp32 tensor, not both models. After each
    64 MiB of converted tensors the heap's free pages are handed back (``heap.Trimmer``).
    """
    scratch, trimmer = ScratchBuffer(), heap.Trimmer()
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
                        if converted:  # its temporaries are freed: hand their pages back (heap.py)
                            trimmer.converted(entry["data_offsets"][1] - entry["data_offsets"][0])
                        bar.update()
            except (OSError, RuntimeError, ValueError, KeyError) as err:
                raise CheckpointError(f"Reading {file} failed ({err!r}): the file is corrupt; download it again.") from None
    finally:
        trimmer.finish()
        bar.close()


def _quantized_on_read(model, lab: str) -> bool:
    """True for a float weight that a QuantLinear turns into codes as it is assigned."""
    module_name, _, leaf = lab.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(module_name), quant.QuantLinear)


# safetensors dtype names -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


MAX_HEADER_BYTES = 100 * 1024**2  # safetensors' own bound on a header; real ones are a few MB at most


def safetensors_header(handle) -> tuple[dict, int]:
    """The header of an open safetensors file: {name: {dtype, shape, data_offsets}}, and where the data starts.

    The format: 8 bytes little-endian header length n, n bytes of JSON, then the tensors' bytes.
    """
    prefix = handle.read(8)
    if len(prefix) != 8:
        raise ValueError("the file is shorter than the 8-byte header length")
    length = int.from_bytes(prefix, "little")
    if not 2 <= length <= MAX_HEADER_BYTES:
        raise ValueError(f"the header claims {length} bytes (a real one is under {MAX_HEADER_BYTES})")
    text = handle.read(length)
    if len(text) != length:
        raise ValueError("the file ends inside its header")
    header = json.loads(text)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
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
            try:
                module.set_weight(tensor)
            except InputError as err:
                raise CheckpointError(f"{name}: {err}") from None
            return
        quant_checkpoint.check_stored(model, name, tensor)
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = tensor

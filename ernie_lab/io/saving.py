"""Export: write an ernie-lab model back in the Hub layout that transformers, vLLM and FastDeploy read.

The inverse of loading: ernie-lab parameter names go through the model's name table backwards
(``hub_names.NAME_MAP`` for text models, dense and MoE alike; ``VL_NAME_MAP`` for vision-language ones,
whose routers are written transposed, as the Hub stores them),
the config is written as the Hub's ``config.json`` (flat for text models, transformers' nested
``text_config`` / ``vision_config`` for VL), and the tensors as safetensors, split into shards with a
``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. A tied LM head is not written
twice: readers re-tie it from ``tie_word_embeddings``. A head that is *not* the embedding's very tensor
(untied after loading, say) is always written, and the config then says ``tie_word_embeddings: false``.

Saving is atomic (:func:`atomic_folder`): everything is written into a hidden folder beside the target,
``.<name>.partial-<pid>-<random>``, and only a complete checkpoint is renamed into place. A crash or a
kill in the middle leaves the previous checkpoint untouched; the hidden leftover is swept by the next
save into the same place. Shards and index files of an earlier save are gone with the folder they
were in (other files in the target, a tokenizer say, are carried over), so a reload never mixes saves.
"""

from __future__ import annotations

import ctypes
import fnmatch
import json
import os
import secrets
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..model.linears import tied_head_name
from .architectures import name_table
from .hub_names import INDEX_FILE, WEIGHTS_FILE, is_transposed, lab_to_hub
from .quantized import quant_lab_to_hub

QUANT_TENSORS = (".qweight", ".scales", ".zeros")  # quantized layers (ernie_lab.quant): stored as they are

CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")  # replaced by a save
PARTIAL_MARK = ".partial-"  # hidden staging folders: .<name>.partial-<pid>-<random>


def save_model(model, folder: str | Path, *, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``config.json`` and safetensors weights of ``model`` into ``folder`` (created if needed), atomically."""
    folder = check_target(folder)
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise InputError(f"save_model: max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}.")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"save_model wants an ernie-lab model (with .config), got {type(model).__name__}.")
    tensors = hub_state_dict(model)  # every check before the disk is touched
    config = checkpoint_config(model, tensors)
    with atomic_folder(folder) as staging:
        write_checkpoint(staging, config, tensors, max_shard_bytes)
    return folder


def check_target(folder) -> Path:
    """The target folder as a Path; a file there is refused, never overwritten."""
    if not isinstance(folder, (str, os.PathLike)):
        raise InputError(f"save_model: folder must be a path, got {type(folder).__name__}.")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"save_model: {folder} is a file, not a folder; a checkpoint is a folder of files. "
                         "Pass a folder path (it is created if needed).")
    return folder


def checkpoint_config(model, tensors: dict) -> dict:
    """``config.json`` contents: the model's config, its dtype, and the head's tying as it really is."""
    config = model.config.to_dict()
    floats = [t for name, t in tensors.items() if t.is_floating_point() and not name.endswith(QUANT_TENSORS)]
    config["dtype"] = str((floats or list(tensors.values()))[0].dtype).removeprefix("torch.")
    if getattr(model, "quantization_config", None):
        config["quantization_config"] = model.quantization_config  # ernie_lab.quant: layers, formats
    if not tied_head_name(model) is not None:
        if model.config.get_text_config().tie_word_embeddings:
            warnings.warn("the model's lm_head is not its embedding (untied after loading?) although its config says "
                          "tie_word_embeddings: true; saving the head and tie_word_embeddings: false.", stacklevel=3)
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"]["tie_word_embeddings"] = False
    return config


def write_checkpoint(folder: Path, config: dict, tensors: dict, max_shard_bytes: int) -> None:
    """config.json and one safetensors file, or shards and their index, into an empty ``folder``."""
    write_text(folder / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    shards = split_into_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], folder / WEIGHTS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------- atomic folders
@contextmanager
def atomic_folder(target: str | Path):
    """Yield an empty hidden folder beside ``target``; on success it replaces ``target`` in one rename.

    Files of the old ``target`` that are not checkpoint files (``CHECKPOINT_FILES``) are carried over
    (hard links, so no copy). On an exception the hidden folder is removed and ``target`` is untouched;
    after a kill it stays hidden beside the target until the next ``atomic_folder`` on the same target.
    """
    target = Path(os.path.abspath(check_target(target)))  # "." has no name to put beside
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partial_saves(target)
    staging = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        yield staging
        if target.is_dir():
            carry_over(target, staging)
        sync_folder(staging)
        replace_folder(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the failed save, or the old target after the swap


def carry_over(old: Path, new: Path) -> None:
    """Link every entry of ``old`` that a save does not write into ``new`` (tokenizer files, notes, ...)."""
    for entry in old.iterdir():
        if entry.name.startswith(".") and PARTIAL_MARK in entry.name:
            continue
        if any(fnmatch.fnmatch(entry.name, pattern) for pattern in CHECKPOINT_FILES):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(entry, new / entry.name)


def link_or_copy(source, destination) -> None:
    try:
        os.link(source, destination, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, destination, follow_symlinks=False)


def sync_folder(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself to disk, so the rename publishes complete files."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


RENAME_EXCHANGE = 2  # renameat2 flag (Linux): swap two paths in one atomic step


def replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target``; the old ``target`` (if any) ends up at ``staging``, to be removed."""
    if not target.exists():
        os.rename(staging, target)
        return
    if exchange(staging, target):
        return
    old = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}-old-{secrets.token_hex(4)}"
    os.rename(target, old)  # without an atomic swap: two renames, a window of microseconds
    os.rename(staging, target)
    os.rename(old, staging)


def exchange(a: Path, b: Path) -> bool:
    """Swap two folders atomically with Linux's renameat2(RENAME_EXCHANGE); False where it is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0


def sweep_partial_saves(target: Path) -> None:
    """Remove hidden staging folders of ``target`` left by saves that were killed (their process is gone)."""
    prefix = f".{target.name}{PARTIAL_MARK}"
    for entry in target.parent.glob(f"{glob_escape(prefix)}*"):
        pid = entry.name[len(prefix):].split("-")[0]
        if entry.is_dir() and not (pid.isdigit() and process_alive(int(pid))):
            shutil.rmtree(entry, ignore_errors=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has no save in flight into the same target
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


# ----------------------------------------------------------------------------------- tensors
def whole_config(model):
    """The config that describes all of ``model`` (kept for older callers: it is ``model.config``)."""
    return model.config


def hub_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their Hub names (contiguous, on CPU); the head left out only when really tied."""
    table = name_table(model.config)
    skip_head = tied_head_name(model) is not None and model.config.get_text_config().tie_word_embeddings
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and skip_head:
            continue
        hub = lab_to_hub(name, table) or quant_lab_to_hub(name, table)
        if hub is None:
            raise InputError(f"parameter {name!r} has no Hub name; was a module added that the export does not "
                             "know (e.g. un-merged LoRA adapters)? Merge or remove it before saving.")
        tensor = tensor.detach().to("cpu")
        if name == "lm_head.weight" and tied_head_name(model) is not None:
            tensor = tensor.clone()  # tied in memory but written as its own tensor: safetensors wants no sharing
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

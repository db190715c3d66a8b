"""FSDP2: each of R ranks holds 1/R of every weight, gradient and AdamW moment; checkpoints in shards.

DDP keeps the whole model on every rank: weights, gradients and AdamW's two moments, 16 bytes per fp32
parameter, times R. Fully sharded data parallel (ZeRO-3; ``torch.distributed.fsdp.fully_shard``, FSDP2)
cuts each tensor along dim 0 into R pieces and keeps only its own piece, a DTensor::

    memory per rank      DDP: 16 P           FSDP: 16 P / R  +  the full weights of the unit at work
    forward of a unit    all-gather its R pieces -> full weights, compute, free them again
    backward of a unit   all-gather again, compute the full gradient, reduce-scatter it: rank r keeps the
                         average over ranks of piece r (DDP's all-reduce, cut in R), and AdamW updates piece r

The gradient and hence every update equals DDP's (the same average), so the Trainer's loss weights and
data split stay as they are. A *unit* is what is gathered at once: each decoder layer and each ViT
block is one (only one layer's full weights exist at a time), then the root takes the rest (embedding,
tied head, final norm, adapter), as torchtitan does. Frozen weights (a LoRA model's base) are sharded
too; only the trainable ones get gradients and optimizer moments.

Checkpoints: ``torch.distributed.checkpoint`` (DCP) lets every rank write its own pieces, in parallel;
``shards/.metadata`` records each tensor's global shape and where each piece is, so a load on any number
of ranks (1, 2, ...) reads exactly the pieces it needs (resharding for free)::

    out_dir/step-N/  config.json  trainer_state.pt (step, history, RNG)  shards/{.metadata, __0_0.distcp, ...}

``shards`` holds the model (a LoRA model: the adapters only) and the optimizer, both keyed by parameter
name. :func:`consolidate` gathers a checkpoint into the kit's Hub folder (``save_model``; a LoRA model's:
the peft adapter) in one process, tensor for tensor the weights the ranks held.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from ..atomic import atomic_folder
from ..errors import CheckpointError, InputError
from ..io.loading import build_empty, config_from_dict
from ..io.saving import save_model
from ..model.config import read_config_json
from ..model.decoder import DecoderLayer
from ..model.moe import moe_blocks
from ..model.vision import VisionBlock

SHARDS = "shards"               # the DCP folder inside a step-N checkpoint
UNIT_TYPES = (DecoderLayer, VisionBlock)  # gathered one at a time; the root takes the rest


# ================================================================================ sharding
def prepare(model: nn.Module, world_size: int) -> nn.Module:
    """Ready ``model`` for the Trainer's FSDP mode: idle MoE experts get zero gradients (every rank then
    reduces the same tensors; one process does the same, so it computes what R ranks do), and with
    several ranks, rank 0's weights go to every rank (as DDP does) before each rank keeps its shards."""
    for block in moe_blocks(model):
        block.idle_experts_run = True
    if world_size > 1:
        copy_from_rank_0(model)
        shard_model(model)
    return model


@torch.no_grad()
def copy_from_rank_0(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights (a LoRA's random A, say, drawn differently per process)."""
    import torch.distributed as dist

    for tensor in model.state_dict().values():
        dist.broadcast(tensor, src=0)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard ``model`` in place over the default process group: each decoder layer and ViT block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for unit in sharding_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def sharding_units(model: nn.Module) -> list[nn.Module]:
    return [module for module in model.modules() if isinstance(module, UNIT_TYPES)]


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def check_batch(model: nn.Module, batch: dict, where: str) -> None:
    """Under FSDP every forward gathers weights with all ranks: a VL model's ViT must run on every rank,
    so every micro-batch needs a picture."""
    if is_sharded(model) and hasattr(model, "vision") and batch.get("pixel_values") is None:
        raise InputError(f"{where} has no pixel_values: with parallel='fsdp' every rank's micro-batch of a "
                         "vision-language model must hold a picture (the ViT's weights are gathered by all ranks "
                         "at once). Give every rank pictures, or train with parallel='ddp'.")


def gradient_sync(model: nn.Module, sync: bool) -> None:
    """Reduce-scatter gradients after this backward (``sync``) or keep accumulating them whole (the
    micro-batches of a step before the last: DDP's ``no_sync``)."""
    model.set_requires_gradient_sync(sync)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on CPU, gathered from the ranks (every rank must call it; a plain model's
    state_dict as it is)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ================================================================================ checkpoints
def is_sharded_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SHARDS / ".metadata").is_file()


def _options(model: nn.Module) -> StateDictOptions:
    from .lora import lora_layers

    return StateDictOptions(ignore_frozen_params=bool(lora_layers(model)))


def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model, optimizer) state dicts keyed by parameter name, each tensor this rank's shard. A LoRA model's
    holds its adapters (the trainable tensors) only, like FineTuner's checkpoints (a tied head, frozen,
    which torch's option keeps under its second name, is left out too)."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options(model))
    if _options(model).ignore_frozen_params:
        trainable = {name for name, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        model_state = {name: tensor for name, tensor in model_state.items() if name in trainable}
    return model_state, optimizer_state


def write_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                  extra_files: dict[str, object], *, is_main: bool) -> Path:
    """Write ``folder`` in one atomic step: every rank its shards, rank 0 config.json and ``extra_files``
    (name -> object for torch.save). Collective: every rank calls it; rank 0 stages and swaps the folder."""
    import torch.distributed as dist

    folder = Path(folder)
    model_state, optimizer_state = checkpoint_state(model, optimizer)
    together = dist.is_available() and dist.is_initialized()
    staging = [None]
    with atomic_folder(folder) if is_main else nullcontext() as staged:   # the others write into rank 0's
        staging[0] = str(staged) if staged is not None else None
        if together:
            dist.broadcast_object_list(staging, src=0)          # hidden folder, named by rank 0
        with alone_is_fine():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=Path(staging[0]) / SHARDS,
                     no_dist=not together)
        if is_main:
            write_config(model, staged / "config.json")        # what consolidate builds the model from
            for name, value in extra_files.items():
                torch.save(value, staged / name)
        if together:
            dist.barrier()                                      # every piece is on disk before the swap
    if together:
        dist.barrier()                                          # and nobody reads before it
    return folder


def write_config(model: nn.Module, path: Path) -> None:
    path.write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_sharded(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer into ``model`` / ``optimizer`` (sharded or not, on
    any number of ranks); a checkpoint of another model is refused before anything changes."""
    folder = Path(folder)
    model_state, optimizer_state = checkpoint_state(model, optimizer)
    check_fits(folder, model_state)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with alone_is_fine():
            dcp.load(state, checkpoint_id=folder / SHARDS)
    except Exception as error:  # a missing piece, a mismatched optimizer
        raise CheckpointError(f"{folder / SHARDS}: could not be read into this Trainer ({type(error).__name__}: "
                              f"{_first_line(error)}); resume into the model and trainable parameters it was "
                              "trained with.") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_options(model))


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Model tensor name -> global shape, from a sharded checkpoint's metadata (nothing else is read)."""
    try:
        metadata = dcp.FileSystemReader(str(folder / SHARDS)).read_metadata()
    except Exception as error:
        raise CheckpointError(f"{folder / SHARDS / '.metadata'} is damaged ({type(error).__name__}: "
                              f"{_first_line(error)}); resume from an earlier checkpoint.") from None
    return {key.removeprefix("model."): tuple(entry.size) for key, entry in metadata.state_dict_metadata.items()
            if key.startswith("model.") and hasattr(entry, "size")}


def check_fits(folder: Path, model_state: dict) -> None:
    """A CheckpointError naming the first tensor whose name or shape differs between checkpoint and model."""
    saved = stored_shapes(folder)
    ours = {name: tuple(tensor.shape) for name, tensor in model_state.items()}
    wrong = sorted(set(saved) ^ set(ours)) or sorted(name for name in ours if saved[name] != ours[name])
    if wrong:
        name = wrong[0]
        raise CheckpointError(f"{folder} holds a different model than this one (tensor {name!r}: "
                              f"{saved.get(name, 'missing')} in the checkpoint, {ours.get(name, 'missing')} here); "
                              "resume into the model it was trained on (with the same LoRA layers, if any).")


@contextmanager
def alone_is_fine():
    """DCP warns whenever no process group exists; one process is a case we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


# ================================================================================ consolidation
def consolidate(checkpoint: str | os.PathLike, out_folder: str | os.PathLike, model: nn.Module | None = None) -> Path:
    """Gather a sharded checkpoint (``out_dir/step-N`` written with ``parallel="fsdp"``) into one folder, in
    this process: the Hub layout (``save_model``) for a full model, the peft adapter for a LoRA one.

    ``model``: where the tensors go; by default a fresh model built from the checkpoint's config.json.
    A LoRA checkpoint holds the adapters only: pass the base model with the same ``apply_lora``."""
    if not isinstance(checkpoint, (str, os.PathLike)) or not isinstance(out_folder, (str, os.PathLike)):
        raise InputError("consolidate(checkpoint, out_folder) takes two folder paths: a step-N checkpoint written "
                         "with TrainConfig(parallel='fsdp'), and where the Hub folder goes.")
    checkpoint = Path(checkpoint)
    if not is_sharded_checkpoint(checkpoint):
        raise CheckpointError(f"{checkpoint} is no sharded checkpoint (it has no {SHARDS}/.metadata): pass an "
                              "out_dir/step-N folder written with TrainConfig(parallel='fsdp'). A checkpoint "
                              "written with parallel='ddp' is a Hub folder already (ernie_lab.load_model reads it).")
    if model is not None and not isinstance(model, nn.Module):
        raise InputError(f"consolidate: model must be an ernie-lab model, got {type(model).__name__}.")
    model = model if model is not None else model_from_config(checkpoint)
    saved = stored_shapes(checkpoint)
    wanted = {name: tensor for name, tensor in model.state_dict().items() if name in saved}
    check_consolidation(checkpoint, model, saved, wanted)
    loaded = {"model": {name: tensor.clone() for name, tensor in wanted.items()}}
    with alone_is_fine():
        dcp.load(loaded, checkpoint_id=checkpoint / SHARDS, no_dist=True)   # this process only, all pieces
    model.load_state_dict(loaded["model"], strict=False)
    from .lora import lora_layers, save_adapter

    return save_adapter(model, out_folder) if lora_layers(model) else save_model(model, out_folder)


def check_consolidation(checkpoint: Path, model: nn.Module, saved: dict, wanted: dict) -> None:
    """The checkpoint must fill every tensor the output needs: all of a full model, the adapters of a LoRA one."""
    from .lora import lora_layers

    needed = [name for name in model.state_dict() if not lora_layers(model) or ".lora_" in name]
    missing = [name for name in needed if name not in saved]
    if missing:
        hint = ("it holds LoRA adapters only: pass model=, the base model with the same apply_lora"
                if any(".lora_" in name for name in saved) else "it was written for another model")
        raise CheckpointError(f"{checkpoint} has no tensor {missing[0]!r} ({len(missing)} missing): {hint}.")
    wrong = [name for name, tensor in wanted.items() if tuple(tensor.shape) != saved[name]]
    if wrong:
        raise CheckpointError(f"{checkpoint}: tensor {wrong[0]!r} is {saved[wrong[0]]} in the checkpoint, "
                              f"{tuple(wanted[wrong[0]].shape)} in the model; pass the model it was trained on.")


def model_from_config(checkpoint: Path) -> nn.Module:
    """A fresh fp32 model of the checkpoint's config.json, its tensors allocated (to be overwritten)."""
    raw, path = read_config_json(checkpoint)
    model = build_empty(config_from_dict(raw, source=str(path))).to_empty(device="cpu")
    if model.config.get_text_config().tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    return model

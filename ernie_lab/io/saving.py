"""Export: write an ernie-lab model back in the Hub layout that transformers, vLLM, llama.cpp and FastDeploy read.

The inverse of loading: ernie-lab parameter names go through the model's name table backwards
(``hub_names.NAME_MAP`` for text models, dense and MoE alike; ``VL_NAME_MAP`` for vision-language ones,
whose routers are written transposed, as the Hub stores them),
the config is written as the Hub's ``config.json`` (flat for text models, transformers' nested
``text_config`` / ``vision_config`` for VL), and the tensors as safetensors, split into shards with a
``model.safetensors.index.json`` when they exceed ``max_shard_bytes``. A tied LM head is not written
twice: readers re-tie it from ``tie_word_embeddings``. A head that is *not* the embedding's very tensor
(untied after loading, say) is always written, and the config then says ``tie_word_embeddings: false``.

Beside the weights goes what a serving engine reads (``serving_files``): the tokenizer's files,
``chat_template.jinja`` and ``generation_config.json``, so that one call gives a folder that transformers,
vLLM and llama.cpp's ``convert_hf_to_gguf.py`` load as it is. The tokenizer is the one passed
(``tokenizer=``), or else the one of the folder ``load_model`` read the model from; a model with neither
is saved with an ``IncompleteExportWarning`` (``tokenizer=False``: weights and config only, on purpose).

Saving is atomic (``atomic.atomic_folder``): everything is written into a hidden folder beside the target,
``.<name>.partial-<pid>-<random>``, and only a complete checkpoint is swapped into place. A crash or a
kill in the middle leaves the previous checkpoint untouched; the hidden leftover is swept by the next
save into the same place. Shards and index files of an earlier save are gone with the folder they
were in, and so are the tokenizer files a save writes anew (other files in the target, a TRAINING.md say,
are carried over), so a reload never mixes saves.
"""

from __future__ import annotations

import fnmatch
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InputError
from ..model.linears import tied_head_name
from .architectures import name_table
from ..atomic import atomic_folder
from .hub_names import INDEX_FILE, WEIGHTS_FILE, is_transposed, lab_to_hub
from .quantized import quant_lab_to_hub
from .serving_files import GENERATION_FILE, TEMPLATE_FILE, as_json, default_chat_template, generation_config, \
    tokenizer_files, write_files
from .tokenizer import ErnieTokenizer, load_tokenizer

QUANT_TENSORS = (".qweight", ".scales", ".zeros")  # quantized layers (ernie_lab.quant): stored as they are

CHECKPOINT_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")  # replaced by a save


class IncompleteExportWarning(UserWarning):
    """save_model wrote weights and config.json but no tokenizer: serving engines cannot load the folder."""


def save_model(model, folder: str | Path, *, tokenizer=None, max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``model`` into ``folder`` (created if needed), atomically, as a folder that transformers, vLLM and
    llama.cpp's converter load: ``config.json``, safetensors, and (``serving_files``) the tokenizer's files,
    ``chat_template.jinja`` and ``generation_config.json``.

    ``tokenizer``: an ``ErnieTokenizer``; None (the default) takes the tokenizer of the folder ``load_model``
    read the model from, and warns (``IncompleteExportWarning``) when there is none; False writes the
    weights and ``config.json`` only. Merged LoRA models (``merge_lora(model, unload=True)``) and quantized
    ones are saved by this same call.
    """
    folder = check_target(folder)
    config, tensors = checked_checkpoint(model, max_shard_bytes)  # every check before the disk is touched
    extras = export_files(model, tokenizer, folder)
    keep = lambda name: not_checkpoint_file(name) and name not in extras  # noqa: E731 (never write through a link)
    with atomic_folder(folder, carry_over=keep) as staging:
        write_checkpoint(staging, config, tensors, max_shard_bytes)
        write_files(staging, extras)
    return folder


def write_model(model, folder: str | Path, *, max_shard_bytes: int = 5 * 1024**3) -> None:
    """:func:`save_model`'s files, written into an existing ``folder`` as they are (not atomically): for a
    caller that writes more files into the same ``atomic_folder``, as the Trainer's checkpoints do."""
    config, tensors = checked_checkpoint(model, max_shard_bytes)
    write_checkpoint(Path(folder), config, tensors, max_shard_bytes)


def checked_checkpoint(model, max_shard_bytes: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` contents and the tensors under their Hub names, after checking the arguments."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise InputError(f"save_model: max_shard_bytes must be a positive number of bytes, got {max_shard_bytes!r}.")
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"save_model wants an ernie-lab model (with .config), got {type(model).__name__}.")
    tensors = hub_state_dict(model)
    return checkpoint_config(model, tensors), tensors


def not_checkpoint_file(name: str) -> bool:
    """Files of an earlier save that a new save keeps (tokenizer files, notes, ...): all but CHECKPOINT_FILES."""
    return not any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)


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
                          "tie_word_embeddings: true; saving the head and tie_word_embeddings: false.", stacklevel=4)
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


# ----------------------------------------------------------------------------- beside the weights
def export_files(model, tokenizer, target: Path) -> dict[str, str | bytes]:
    """file name -> content of what ``save_model`` writes into ``target`` beside the weights.

    ``tokenizer``: an ``ErnieTokenizer``; None finds the one of the folder ``load_model`` read the model
    from, or keeps the one already in ``target`` (an ``IncompleteExportWarning`` when there is neither);
    False: nothing.
    """
    if tokenizer is False:
        return {}
    if tokenizer is None:
        tokenizer = tokenizer_of(model)
    if tokenizer is None and (target / "tokenizer.model").is_file():
        return {}  # the target's own tokenizer files stay (save_model carries them over)
    if tokenizer is None:
        warnings.warn("save_model: no tokenizer given and none found where the model was loaded from; the folder "
                      "gets weights, config.json and generation_config.json, which serving engines (transformers, "
                      "vLLM, llama.cpp) cannot use alone. Pass save_model(model, folder, tokenizer=tok), or "
                      "tokenizer=False to save weights only on purpose.", IncompleteExportWarning, stacklevel=3)
        return {GENERATION_FILE: as_json(generation_config(model.config.get_text_config(), None))}
    check_tokenizer(tokenizer, model)
    files = tokenizer_files(tokenizer)
    files[TEMPLATE_FILE] = tokenizer.chat_template or default_chat_template(model.config)
    files[GENERATION_FILE] = as_json(generation_config(model.config.get_text_config(), tokenizer))
    return files


def tokenizer_of(model):
    """The tokenizer of the folder ``load_model`` read ``model`` from; None if that folder has none."""
    folder = getattr(model, "checkpoint_folder", None)
    if folder is None or not (Path(folder) / "tokenizer.model").is_file():
        return None
    return load_tokenizer(folder)


def check_tokenizer(tokenizer, model) -> None:
    """The tokenizer is an ErnieTokenizer whose ids all have a row in the model's embedding."""
    if not isinstance(tokenizer, ErnieTokenizer):
        raise InputError(f"save_model: tokenizer must be an ernie_lab ErnieTokenizer (ernie_lab.load_tokenizer("
                         f"folder)), None or False; got {type(tokenizer).__name__}.")
    rows = model.config.get_text_config().vocab_size
    used = max([tokenizer.num_pieces, *(i + 1 for i in tokenizer.special_tokens.values())])
    if used > rows:
        raise InputError(f"save_model: the tokenizer ({tokenizer.source}) uses ids up to {used - 1}, but the model's "
                         f"embedding has {rows} rows: they do not belong together. Pass the tokenizer the model "
                         "was trained with.")


# ----------------------------------------------------------------------------------- tensors
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

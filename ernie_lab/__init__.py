"""ernie-lab: ERNIE 4.5 built from scratch in plain PyTorch, for learning and research.

    import ernie_lab
    model = ernie_lab.load_model("baidu/ERNIE-4.5-0.3B-PT")      # or a local folder
    tok = ernie_lab.load_tokenizer("baidu/ERNIE-4.5-0.3B-PT")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    out = ernie_lab.generate(model, [ids], max_new_tokens=32)

The package, one folder per audience; each may import only the folders above it in this list:

    errors.py   ErnieLabError and its kinds, for every folder
    atomic.py   the one atomic write of files and folders, for every folder
    heap.py     freed memory handed back to the system while a big model is loaded or quantized
    model/      the networks: norm, rope, attention, MoE, KV cache, decoder, vision, VL model, the linear seam
    quant/      quantized linears, packing, GPTQ, the kit's decode kernels
    io/         checkpoints and inputs: config files, loading, saving, tokenizer, chat format, pictures, chat
    train/      the training step and loop, MoE losses, LoRA, SFT and DPO
    tiny/       the tiny models and their synthetic data (scenes, corpus, tokenizer, recipes)
    analysis/   routing records, routing pictures and the explorer, the family calculator
    course/     exercise checks and notebook helpers

The modules are also reachable by their short names, imported on first use
(``ernie_lab.quant``, ``ernie_lab.lora``, ``ernie_lab.routing``, ``ernie_lab.viz``, ...: see ``MODULES``).
``import ernie_lab`` itself loads torch, safetensors, sentencepiece and tqdm, nothing heavier.
"""

import importlib

from .errors import CheckpointError, ConfigError, ErnieLabError, InputError, NotEnoughMemoryError, TrainingDiverged
from .io.chat import chat
from .io.loading import load_model
from .io.reasoning import Reasoning, split_reasoning
from .io.saving import IncompleteExportWarning, save_model
from .io.tokenizer import ErnieTokenizer, StandInTokenizerWarning, load_tokenizer
from .model import ErnieConfig, ErnieForCausalLM, ErnieVLForConditionalGeneration, KVCache, generate

# Short name -> module, for ``from ernie_lab import lora`` and ``ernie_lab.routing.record(...)``.
MODULES = {
    "config": "model.config", "checkpoints": "model.published", "published": "model.published",
    "special_tokens": "model.special_tokens", "norm": "model.norm", "rope": "model.rope",
    "attention": "model.attention", "mlp": "model.mlp", "moe": "model.moe", "kv_cache": "model.kv_cache",
    "decoder": "model.decoder", "vision": "model.vision", "rope3d": "model.rope3d", "vl_model": "model.vl_model",
    "modules": "model.linears", "linears": "model.linears", "generation": "model.generation",
    "quant": "quant",
    "hub_names": "io.hub_names", "architectures": "io.architectures", "loading": "io.loading",
    "saving": "io.saving", "serving_files": "io.serving_files", "tokenizer": "io.tokenizer",
    "chat_format": "io.chat_format", "reasoning": "io.reasoning",
    "image_processing": "io.image_processing", "processor": "io.processor",
    "train": "train", "losses": "train.losses", "lora": "train.lora", "finetune": "train.finetune",
    "scenes": "tiny.scenes", "corpus": "tiny.corpus", "tiny_tokenizer": "tiny.tokenizer",
    "tiny_models": "tiny.models", "finetune_data": "tiny.finetune_data", "vision_warmup": "tiny.vision_warmup",
    "routing": "analysis.routing", "viz": "analysis.viz", "widgets": "analysis.widgets", "family": "analysis.family",
    "exercises": "course.exercises", "exercise_sets": "course.exercise_sets", "notebook": "course.notebook",
}

__all__ = ["ErnieConfig", "ErnieForCausalLM", "ErnieVLForConditionalGeneration", "KVCache", "ErnieLabError",
           "ConfigError", "CheckpointError", "InputError", "NotEnoughMemoryError", "TrainingDiverged",
           "load_model", "save_model", "IncompleteExportWarning", "generate", "ErnieTokenizer",
           "StandInTokenizerWarning", "load_tokenizer", "chat", "Reasoning", "split_reasoning", *MODULES]


def __getattr__(name: str):
    if name in MODULES:
        module = importlib.import_module(f".{MODULES[name]}", __name__)
        globals()[name] = module  # later lookups skip this function
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *MODULES})

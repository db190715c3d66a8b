"""ernie-lab: ERNIE 4.5 built from scratch in plain PyTorch, for learning and research.

    import ernie_lab
    model = ernie_lab.load_model("baidu/ERNIE-4.5-0.3B-PT")      # or a local folder
    tok = ernie_lab.load_tokenizer("baidu/ERNIE-4.5-0.3B-PT")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    out = ernie_lab.generate(model, [ids], max_new_tokens=32)

Modules reachable as attributes: ``ernie_lab.routing`` (routing records), ``ernie_lab.losses``
(MoE training losses), ``ernie_lab.vision`` (the ViT and adapter), ``ernie_lab.family``
(parameter / memory / compute arithmetic), ``ernie_lab.special_tokens`` (token ids, modality codes),
``ernie_lab.chat_format`` (the chat text), ``ernie_lab.checkpoints`` (the family's published shapes),
``ernie_lab.modules`` (``replace_linears``, the seam for quantized and LoRA linears),
``ernie_lab.hub_names`` (Hub tensor names), ``ernie_lab.architectures`` (the model-type registry),
and, imported on first use because they need PIL,
``ernie_lab.image_processing`` (pictures -> patches) and ``ernie_lab.processor`` (chats with pictures).
``import ernie_lab`` itself loads torch, safetensors, sentencepiece and tqdm, nothing heavier.
"""

import importlib

from . import (architectures, chat_format, checkpoints, family, hub_names, losses, modules, moe,  # noqa: F401
               routing, special_tokens, vision, vl_model)
from .chat import chat
from .config import ErnieConfig
from .errors import CheckpointError, ConfigError, ErnieLabError, InputError, NotEnoughMemoryError
from .generation import generate
from .kv_cache import KVCache
from .loading import load_model
from .model import ErnieForCausalLM
from .saving import save_model
from .tokenizer import ErnieTokenizer, StandInTokenizerWarning, load_tokenizer
from .vl_model import ErnieVLForConditionalGeneration

__all__ = ["ErnieConfig", "ErnieForCausalLM", "ErnieVLForConditionalGeneration", "KVCache", "ErnieLabError",
           "ConfigError", "CheckpointError", "InputError", "NotEnoughMemoryError", "load_model", "save_model", "generate",
           "ErnieTokenizer", "StandInTokenizerWarning", "load_tokenizer", "chat",
           "architectures", "checkpoints", "family", "hub_names", "losses", "modules", "moe", "processor", "routing",
           "vision", "vl_model", "special_tokens", "chat_format", "image_processing"]

LAZY_MODULES = ("image_processing", "processor")  # they import PIL: loaded when first named


def __getattr__(name: str):
    if name in LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)  # also sets the attribute: called once per name
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *LAZY_MODULES})

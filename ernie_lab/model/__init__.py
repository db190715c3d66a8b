"""The model: every ERNIE 4.5 network, built from plain PyTorch modules, one idea per module.

    config          every config.json dialect read once: ErnieConfig, VLConfig, VisionConfig, the MoE-layer rule
    published       the family's published shapes as literal tables (0.3B ... 424B)
    special_tokens  special token ids and modality codes (text 0, image 1, video 2)
    norm, rope      RMSNorm; rotary embedding on interleaved pairs
    attention, mlp  grouped-query attention; SwiGLU
    moe             router (correction bias only to choose), grouped dispatch, shared experts, modality groups
    kv_cache        the preallocated KV cache; StaticKVCache, its fixed-shape twin for compiled steps
    decoder         the one decoder: ErnieForCausalLM (dense and MoE)
    vision, rope3d  the ViT and its adapter; 3-D positions for the multimodal decoder
    vl_model        ErnieVLForConditionalGeneration
    linears         replace_linears: the one module swap that quantized, streaming and LoRA linears use
    generation      greedy / top-k / top-p decoding with the KV cache
    fast_decode     the decode step compiled with torch.compile (generate(..., compile=True))

May import: ``ernie_lab.errors`` and ``ernie_lab.atomic`` only. Nothing here knows about checkpoints on disk, training,
quantization, analysis, the tiny models or the course.
"""

from .config import ErnieConfig, VisionConfig, VLConfig
from .decoder import IGNORE_INDEX, CausalLMOutput, ErnieForCausalLM
from .generation import generate
from .kv_cache import KVCache, StaticKVCache
from .vl_model import ErnieVLForConditionalGeneration

__all__ = ["ErnieConfig", "VLConfig", "VisionConfig", "ErnieForCausalLM", "ErnieVLForConditionalGeneration",
           "CausalLMOutput", "IGNORE_INDEX", "KVCache", "StaticKVCache", "generate"]

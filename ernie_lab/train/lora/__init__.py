"""LoRA and QLoRA: low-rank adapters on the kit's linear layers, saved and loaded in peft's format.

    layer.py        y = W x + (alpha / r) B A x: LoRALinear, apply_lora, merge / unmerge, adapters_disabled
    peft_format.py  save_adapter / load_adapter: peft's files and tensor names
    fused_experts.py  peft's LoRA of fused 3-D expert parameters <-> the kit's per-expert LoRAs (VL: both ways)
    targets.py      LORA_TARGETS: each layer kind's name for the kit, the files, transformers and peft

    model = lora.apply_lora(model, r=8, alpha=16)        # wrap q/k/v/o and the MLP projections, freeze the rest
    lora.save_adapter(model, "out/adapter")              # adapter_config.json + adapter_model.safetensors
    lora.load_adapter(fresh_model, "out/adapter")        # ours or peft's
"""

from .layer import (DEFAULT_TARGETS, VISION_PREFIXES, VISION_TARGETS, FrozenQuantized, LoRALinear, adapters_disabled,
                    apply_lora, is_linear_like, lora_layers, merge_lora, replace_linears_back, target_filter,
                    trainable_parameters, unmerge_lora, wrap_layers)
from .peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, adapter_config, adapter_state_dict,
                          base_fingerprint, hub_module_path, lab_module_path, load_adapter, read_adapter,
                          save_adapter, write_adapter)
from .targets import LORA_TARGETS, LoraTarget

__all__ = ["DEFAULT_TARGETS", "VISION_PREFIXES", "VISION_TARGETS", "FrozenQuantized", "LoRALinear",
           "adapters_disabled", "apply_lora", "is_linear_like", "lora_layers", "merge_lora", "replace_linears_back",
           "target_filter", "trainable_parameters", "unmerge_lora", "wrap_layers", "ADAPTER_CONFIG",
           "ADAPTER_WEIGHTS", "PEFT_PREFIX", "adapter_config", "adapter_state_dict", "base_fingerprint",
           "hub_module_path", "lab_module_path", "load_adapter", "read_adapter", "save_adapter", "write_adapter",
           "LORA_TARGETS", "LoraTarget"]

"""Which layers a LoRA can target in ERNIE 4.5, and what each is called by the kit, the files, transformers and peft.

The same layer has up to four names, and tools that mix them up silently adapt nothing (ms-swift #5074,
PaddleFormers #3230) or crash (LlamaFactory #9644). One row per kind of layer:

    kit         what to give ``apply_lora(target_modules=...)`` (a leaf name or a regex over kit names)
    file        the module path in a peft adapter file, as the checkpoint files name the layer
    memory      the module or parameter that transformers 5 builds in memory (experts fused, VL renamed)
    peft        how the kit's adapter_config.json names the row for peft (``target_modules`` /
                ``target_parameters``)
    peft_loads  whether peft 0.21 on transformers 5 loads the kit's adapter for this row with equal logits
                (tests/test_lora.py checks every True row, within 1e-4)

The VL model's routed experts are fused per modality group in transformers (``text_moe``, ``vision_moe``)
and peft 0.21 does not rewrite per-expert names for this model (a ``gate_proj`` module target would land on
the shared experts), so the kit writes that row in peft's fused layout itself: ``target_parameters`` of each
group's 3-D ``gate_up_proj`` / ``down_proj`` (``fused_experts.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraTarget:
    kit: tuple[str, ...]
    file: str
    memory: str
    peft: str
    peft_loads: bool
    vision: bool = False  # apply_lora(..., vision=True) is needed


ROUTED_EXPERTS = (r"layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj",)  # the same kit names, text or VL

LORA_TARGETS = {
    "attention": LoraTarget(
        kit=("q_proj", "k_proj", "v_proj", "o_proj"),
        file="model.layers.{i}.self_attn.{q,k,v,o}_proj",
        memory="model.layers.{i}.self_attn.q_proj (VL: model.language_model.layers.{i}...)",
        peft="target_modules: q_proj k_proj v_proj o_proj", peft_loads=True),
    "dense MLP": LoraTarget(
        kit=(r"layers\.\d+\.mlp\.(gate|up|down)_proj",),
        file="model.layers.{i}.mlp.{gate,up,down}_proj",
        memory="model.layers.{i}.mlp.gate_proj (nn.Linear)",
        peft="dense model: target_modules gate_proj ...; MoE model: target_parameters mlp.gate_proj.weight ...",
        peft_loads=True),
    "routed experts": LoraTarget(
        kit=ROUTED_EXPERTS,
        file="model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj (one LoRA per expert)",
        memory="model.layers.{i}.mlp.experts.gate_up_proj / down_proj (3-D, all experts fused)",
        peft="target_modules: gate_proj up_proj down_proj (peft rewrites them into the fused parameters)",
        peft_loads=True),
    "shared experts": LoraTarget(
        kit=(r"layers\.\d+\.mlp\.shared_experts\.(gate|up|down)_proj",),
        file="model.layers.{i}.mlp.shared_experts.{gate,up,down}_proj",
        memory="model.layers.{i}.mlp.shared_experts.gate_proj (nn.Linear)",
        peft="target_parameters: shared_experts.gate_proj.weight ... (a module target would be read as experts)",
        peft_loads=True),
    "VL routed experts": LoraTarget(
        kit=ROUTED_EXPERTS,
        file="model.language_model.layers.{i}.mlp.{text_moe,vision_moe}.experts[.base_layer] (peft's fused layout)",
        memory="model.language_model.layers.{i}.mlp.{text_moe,vision_moe}.experts.gate_up_proj / down_proj (3-D)",
        peft="target_parameters: {text_moe,vision_moe}.experts.{gate_up_proj,down_proj}; gate_up_proj rank 2r "
             "(rank_pattern / alpha_pattern keep alpha / r)",
        peft_loads=True),
    "vision encoder": LoraTarget(
        kit=("qkv", "proj", "fc1", "fc2"),
        file="model.vision_model.blocks.{i}.{attn.qkv,attn.proj,mlp.fc1,mlp.fc2}, vision_model.patch_embed.proj",
        memory="model.vision_tower.blocks.{i}.attn.qkv ...",
        peft="target_modules: qkv proj fc1 fc2", peft_loads=True, vision=True),
    "VL resampler": LoraTarget(
        kit=("fc1", "fc2", "proj"),
        file="model.resampler_model.{spatial_linear,temporal_linear}.{0,2}, model.resampler_model.mlp",
        memory="model.resampler_model.{spatial_linear,temporal_linear}.{fc1,fc2}, model.resampler_model.mlp",
        peft="target_modules: fc1 fc2 resampler_model.mlp", peft_loads=True, vision=True),
}

# Kit module -> the suffix peft needs, where the leaf names differ (the adapter's output projection).
PEFT_MODULE_NAMES = {"adapter.proj": "resampler_model.mlp"}

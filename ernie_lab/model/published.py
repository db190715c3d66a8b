"""The ERNIE 4.5 family as data: the five published shapes as config.json tables, and the ten checkpoints.

Each table below is what a checkpoint's config.json says (or, where marked, what was reconstructed),
with a comment on every field and on what differs from the size before. ``config.parse_config`` reads
these tables like any config.json; ``family.py`` does the arithmetic on the parsed configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError

# ================================================================================================
# 1. The five shapes of the family, written out as config.json tables
# ================================================================================================

CONFIG_0_3B = {
    "model_type": "ernie4_5",              # dense decoder (Ernie4_5ForCausalLM)
    "vocab_size": 103424,                  # SentencePiece pieces + special tokens, the same in all ten
    "hidden_size": 1024,                   # width of the residual stream
    "intermediate_size": 3072,             # SwiGLU width, 3 x hidden
    "num_hidden_layers": 18,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,              # GQA: 8 query heads share one K/V head
    "head_dim": 128,                       # 16 x 128 = 2048: q_proj widens the 1024 stream
    "max_position_embeddings": 131072,     # 128K context
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,           # lm_head reuses the embedding matrix
    "use_bias": False,
}

CONFIG_21B_A3B = {
    "model_type": "ernie4_5_moe",          # text MoE (Ernie4_5_MoeForCausalLM)
    "vocab_size": 103424,
    "hidden_size": 2560,                   # 2.5x the 0.3B
    "intermediate_size": 12288,            # width of the one dense MLP (layer 0)
    "num_hidden_layers": 28,
    "num_attention_heads": 20,             # head_dim = 2560 / 20 = 128
    "num_key_value_heads": 4,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": True,
    "use_bias": False,
    "moe_num_experts": 64,                 # routed experts per MoE layer
    "moe_k": 6,                            # experts each token visits
    "moe_intermediate_size": 1536,         # width of one routed expert
    "moe_num_shared_experts": 2,           # every token also passes 2 shared experts (one MLP of 2 x 1536)
    "moe_layer_start_index": 1,            # layer 0 is dense ...
    "moe_layer_end_index": 27,             # ... layers 1..27 are MoE (-1 means "the last layer")
    "moe_layer_interval": 1,
}

# Values of the published config.json of baidu/ERNIE-4.5-300B-A47B-PT. The Hub is not reachable from
# the machines this kit was written on; the numbers were read from three public copies that agree:
#   - PaddlePaddle/ERNIE examples/pre-training/model_configs/ERNIE-4p5-300B-A47B/model_config.json, a
#     pre-training demo config (its vocab and rope_theta differ) with the same widths, 64 experts, top-8,
#     start index 3, and 56 layers with "remove_tail_layer": 2 -> 54,
#   - the pre-release checkpoint config in github.com/Hchnr/test (config.json: 54 layers, 103424 vocab,
#     rope_theta 500000) and its tensor listing (load/safe_open.output.all.sort), which shows layers 0-2
#     dense, e_score_correction_bias of shape (1, 64) and a separate lm_head.weight (untied embeddings),
#   - a FastDeploy test fixture that writes these widths for Ernie4_5_MoeForCausalLM (with fewer layers,
#     for the test) and "tie_word_embeddings": false, "num_nextn_predict_layers": 1.
# One MindIE unit-test fixture writes "tie_word_embeddings": true; the checkpoint's own tensor list wins.
CONFIG_300B_A47B = {
    "model_type": "ernie4_5_moe",
    "vocab_size": 103424,
    "hidden_size": 8192,                   # 3.2x the 21B
    "intermediate_size": 28672,            # the three dense layers' MLP width (= 8 x 3584)
    "num_hidden_layers": 54,
    "num_attention_heads": 64,             # head_dim = 8192 / 64 = 128
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-05,
    "tie_word_embeddings": False,          # a separate 103424 x 8192 lm_head: +0.85 B parameters
    "use_bias": False,
    "moe_num_experts": 64,
    "moe_k": 8,                            # 8 experts of 3584 = one dense MLP of 28672 per token
    "moe_intermediate_size": 3584,
    "moe_num_shared_experts": 0,           # no shared experts, unlike the A3B models
    "moe_layer_start_index": 3,            # layers 0, 1, 2 are dense
    "moe_layer_end_index": 53,
    "moe_layer_interval": 1,
    "num_nextn_predict_layers": 1,         # one multi-token-prediction layer: not built by transformers
}

CONFIG_VL_28B_A3B = {
    "model_type": "ernie4_5_vl_moe",       # vision-language MoE (Ernie4_5_VLMoeForConditionalGeneration)
    "tie_word_embeddings": True,
    "text_config": {
        "vocab_size": 103424,
        "hidden_size": 2560,               # the 21B-A3B decoder ...
        "intermediate_size": 12288,
        "num_hidden_layers": 28,
        "num_attention_heads": 20,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05,
        "use_bias": False,
        "moe_num_experts": 64,             # ... with 64 text AND 64 vision experts per MoE layer
        "moe_k": 6,                        # each token visits 6 experts of its own modality
        "moe_intermediate_size": [1536, 512],  # [text expert width, vision expert width]
        "moe_num_shared_experts": 2,       # shared experts see text and image tokens alike
        "mlp_layer_types": ["dense"] + ["sparse"] * 27,
    },
    "vision_config": {
        "depth": 32,                       # ViT blocks
        "hidden_size": 1280,               # ViT width
        "intermediate_size": 5120,         # ViT MLP width (4 x 1280, quick-GELU)
        "num_heads": 16,
        "in_channels": 3,
        "patch_size": 14,                  # a patch is 3 x 14 x 14 = 588 pixels
        "spatial_merge_size": 2,           # the adapter merges 2 x 2 patches ...
        "temporal_merge_size": 2,          # ... and 2 video frames into one decoder token
    },
}

# RECONSTRUCTED, not read from a published file: the config.json of baidu/ERNIE-4.5-VL-424B-A47B-PT
# could not be found offline. The model card and technical report say: 54 layers, 64 query / 8 KV
# heads, 64 text + 64 vision experts, top-8, 424B total, 47B active, the VL models extend the text
# model with vision experts + ViT + adapter. So the text side is the 300B-A47B decoder above, and the
# vision side is the 28B's ViT and adapter. Uncertain fields:
#   - vision expert width 1536: chosen because it is the width that makes the total come out at 424B
#     (width 512, as in the 28B, would give 341.4B; 1536 gives 423.5B);
#   - dense layers 0-2 and no shared experts: taken over from the 300B;
#   - untied embeddings: taken over from the 300B.
CONFIG_VL_424B_A47B = {
    "model_type": "ernie4_5_vl_moe",
    "tie_word_embeddings": False,
    "text_config": {
        "vocab_size": 103424,
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 54,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-05,
        "use_bias": False,
        "moe_num_experts": 64,
        "moe_k": 8,
        "moe_intermediate_size": [3584, 1536],  # vision width reconstructed (see above)
        "moe_num_shared_experts": 0,
        "mlp_layer_types": ["dense"] * 3 + ["sparse"] * 51,
    },
    "vision_config": dict(CONFIG_VL_28B_A3B["vision_config"]),  # same ViT as the 28B
}

_SOURCE_TRANSFORMERS = "transformers 5.x default config of the model class (= the published checkpoint)"
_SOURCE_300B = ("published config.json values, read from public copies: PaddlePaddle/ERNIE pre-training "
                "model_config.json, Hchnr/test pre-release config + tensor list, a FastDeploy test fixture")
_SOURCE_424B = ("RECONSTRUCTED from the model card / technical report (not a published file); "
                "uncertain: vision expert width 1536, dense layers 0-2, no shared experts, untied embeddings")


# ================================================================================================
# 2. The ten checkpoints
# ================================================================================================

@dataclass(frozen=True)
class Checkpoint:
    """One published checkpoint: where it lives, what it is, and the shape of its weights."""

    name: str                 # "ERNIE-4.5-21B-A3B-Base"
    hub_id: str               # PyTorch weights: "baidu/ERNIE-4.5-21B-A3B-Base-PT"
    paddle_hub_id: str        # PaddlePaddle weights, same numbers: "baidu/ERNIE-4.5-21B-A3B-Base-Paddle"
    kind: str                 # "dense", "moe" (text) or "vl_moe" (vision-language)
    post_trained: bool        # False for the -Base (pre-trained only) checkpoints
    context_length: int       # tokens
    config: dict              # config.json contents (one of the five tables above)
    config_source: str        # where the config numbers come from
    named_total: float        # the size in the name, in parameters ("21B" -> 21e9)
    named_active: float       # the "A3B" part of the name (= named_total for the dense 0.3B)


def _pair(size: str, kind: str, config: dict, source: str, total: float, active: float) -> list[Checkpoint]:
    """The Base and the post-trained checkpoint of one size share every number but the name."""
    pairs = []
    for post_trained, suffix in ((False, "-Base"), (True, "")):
        name = f"ERNIE-4.5-{size}{suffix}"
        pairs.append(Checkpoint(name, f"baidu/{name}-PT", f"baidu/{name}-Paddle", kind, post_trained,
                                131072, config, source, total, active))
    return pairs


CHECKPOINTS: dict[str, Checkpoint] = {
    c.name: c
    for c in (
        _pair("0.3B", "dense", CONFIG_0_3B, _SOURCE_TRANSFORMERS, 0.3e9, 0.3e9)
        + _pair("21B-A3B", "moe", CONFIG_21B_A3B, _SOURCE_TRANSFORMERS, 21e9, 3e9)
        + _pair("300B-A47B", "moe", CONFIG_300B_A47B, _SOURCE_300B, 300e9, 47e9)
        + _pair("VL-28B-A3B", "vl_moe", CONFIG_VL_28B_A3B, _SOURCE_TRANSFORMERS, 28e9, 3e9)
        + _pair("VL-424B-A47B", "vl_moe", CONFIG_VL_424B_A47B, _SOURCE_424B, 424e9, 47e9)
    )
}


def checkpoint(name: str) -> Checkpoint:
    """Look a checkpoint up by name ("ERNIE-4.5-0.3B") or Hub id ("baidu/ERNIE-4.5-0.3B-Paddle")."""
    for c in CHECKPOINTS.values():
        if name in (c.name, c.hub_id, c.paddle_hub_id, c.hub_id.split("/")[1], c.paddle_hub_id.split("/")[1]):
            return c
    raise InputError(f"No ERNIE 4.5 checkpoint is called {name!r}. Known names: {', '.join(CHECKPOINTS)} "
                     "(each also with its Hub id, baidu/<name>-PT or baidu/<name>-Paddle).")

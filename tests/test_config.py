"""config.json in both dialects, the MoE layer rule, and configs that cannot work."""

import pytest

from ernie_lab.model.config import ERNIE_0_3B, ERNIE_21B_A3B, ErnieConfig
from ernie_lab.errors import ConfigError

# The Hub's config.json of ERNIE-4.5-0.3B-PT (flat rope_theta, remote-code architecture name).
HUB_0_3B = {
    "architectures": ["Ernie4_5_ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 131072,
    "model_type": "ernie4_5", "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128,
    "num_hidden_layers": 18, "pad_token_id": 0, "rms_norm_eps": 1e-05, "use_cache": False,
    "vocab_size": 103424, "rope_theta": 500000, "use_bias": False, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}


def test_flat_hub_dialect():
    cfg = ErnieConfig.from_dict(HUB_0_3B)
    assert cfg.rope_theta == 500000 and cfg.head_dim == 128 and cfg.num_key_value_heads == 2
    assert cfg.extra["torch_dtype"] == "bfloat16"  # kept, not lost
    assert cfg == ErnieConfig(extra=cfg.extra)  # the defaults are the 0.3B
    assert ERNIE_0_3B == ErnieConfig(extra=ERNIE_0_3B.extra)


def test_transformers_dialect():
    from transformers import Ernie4_5Config

    cfg = ErnieConfig.from_dict(Ernie4_5Config(rope_parameters={"rope_theta": 12345.0, "rope_type": "default"}).to_dict())
    assert cfg.rope_theta == 12345.0


def test_model_type_from_architectures_only():
    raw = {k: v for k, v in HUB_0_3B.items() if k != "model_type"}
    assert ErnieConfig.from_dict(raw).model_type == "ernie4_5"


def test_moe_layer_rule():
    assert [ERNIE_21B_A3B.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    every_other = ErnieConfig(model_type="ernie4_5_moe", moe_num_experts=8, moe_k=2, moe_layer_start_index=2,
                              moe_layer_interval=2, num_hidden_layers=8)
    # the reference's rule: (layer + 1) % interval == 0, from the start index on
    assert [i for i in range(8) if every_other.is_moe_layer(i)] == [3, 5, 7]
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM
    import torch

    ref_cfg = Ernie4_5_MoeConfig(num_hidden_layers=8, moe_layer_start_index=2, moe_layer_interval=2,
                                 hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_attention_heads=2,
                                 num_key_value_heads=1, head_dim=8, vocab_size=32, moe_num_experts=4, moe_k=2)
    with torch.device("meta"):
        ref = Ernie4_5_MoeForCausalLM(ref_cfg)
    ref_moe = [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")]
    assert ref_moe == [i for i in range(8) if ErnieConfig.from_dict(ref_cfg.to_dict()).is_moe_layer(i)]
    assert not any(ERNIE_0_3B.is_moe_layer(i) for i in range(18))


def test_to_dict_round_trip():
    again = ErnieConfig.from_dict(ERNIE_21B_A3B.to_dict())
    assert again.to_dict() == ERNIE_21B_A3B.to_dict()
    assert ERNIE_0_3B.to_dict()["architectures"] == ["Ernie4_5ForCausalLM"]


@pytest.mark.parametrize("change, words", [
    ({"num_key_value_heads": 3}, "multiple of"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"head_dim": 127}, "even"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_type"),
])
def test_impossible_configs(change, words):
    with pytest.raises(ConfigError, match=words):
        ErnieConfig.from_dict({**HUB_0_3B, **change})

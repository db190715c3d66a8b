"""quant.decode_bytes: the weight bytes one decode step reads, MoE models counting only the k experts a token visits."""

import pytest
import torch

from conftest import MICRO_MOE, micro_model, micro_moe, refused
from ernie_lab import architectures, quant
from ernie_lab.analysis import family
from ernie_lab.errors import InputError
from ernie_lab.model.config import parse_config
from ernie_lab.model.moe import moe_blocks
from ernie_lab.model.published import CONFIG_21B_A3B, CONFIG_VL_28B_A3B


def micro_moe_count(weight_bytes) -> float:
    """MICRO_MOE by hand: ``weight_bytes(n_out, n_in)`` is one linear layer's bytes."""
    c = MICRO_MOE
    h, q, kv = c["hidden_size"], c["num_attention_heads"] * c["head_dim"], c["num_key_value_heads"] * c["head_dim"]
    attention = weight_bytes(q, h) + 2 * weight_bytes(kv, h) + weight_bytes(h, q)
    def swiglu(width):
        return 2 * weight_bytes(width, h) + weight_bytes(h, width)
    dense = swiglu(c["intermediate_size"])                                   # layer 0
    moe = (swiglu(c["moe_num_shared_experts"] * c["moe_intermediate_size"])  # shared experts: every token
           + c["moe_k"] * swiglu(c["moe_intermediate_size"])                 # k of the E routed experts
           + 4 * c["moe_num_experts"] * h)                                   # the float32 router
    moe_layers = c["num_hidden_layers"] - c["moe_layer_start_index"]
    head = weight_bytes(c["vocab_size"], h)                                  # tied: the embedding, read as the head
    return c["num_hidden_layers"] * attention + dense + moe_layers * moe + head


def test_micro_moe_fp32_reads_k_experts_per_layer():
    model = micro_moe()
    assert quant.decode_bytes(model) == micro_moe_count(lambda n_out, n_in: 4 * n_out * n_in)
    assert quant.decode_bytes(model) < quant.weight_bytes(model)   # the idle experts are not read


def test_micro_moe_w8a16_counts_codes_and_scales():
    model = quant.quantize(micro_moe(), "w8a16")
    int8 = micro_moe_count(lambda n_out, n_in: n_out * n_in + 4 * n_out)   # int8 codes + one fp32 scale a row
    V, h = MICRO_MOE["vocab_size"], MICRO_MOE["hidden_size"]
    head_stays_fp32 = 4 * V * h - (V * h + 4 * V)                          # the tied head is never quantized
    assert quant.decode_bytes(model) == int8 + head_stays_fp32


def test_dense_model_reads_every_linear_once():
    model = micro_model()
    linears = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model.lm_head.weight is model.embed.weight
    assert quant.decode_bytes(model) == linears


@pytest.mark.parametrize("config", [CONFIG_21B_A3B, CONFIG_VL_28B_A3B], ids=["21B-A3B", "VL-28B-A3B"])
def test_published_shapes_on_meta_match_the_family_arithmetic(config):
    """The real shapes, built on meta (no memory): bf16 linears, float32 routers, against family.count_params."""
    with torch.device("meta"):
        model = architectures.build(parse_config(config)).to(torch.bfloat16)
    for block in moe_blocks(model):
        block.routers.float()
    active = family.count_params(config, "text").active_by_component
    moe_layers = len(moe_blocks(model))
    text = model.config.get_text_config()
    router_weights = moe_layers * text.moe_num_experts * text.hidden_size   # the text router only
    bf16_values = active["attention"] + active["dense_mlp"] + active["shared_experts"] + active["routed_experts"] \
        + active["embeddings"]
    assert quant.decode_bytes(model) == 2 * bf16_values + 4 * router_weights
    assert 2.5e9 < bf16_values < 3.5e9   # the "A3B": about 3 B active parameters


def test_refuses_what_is_not_a_model():
    refused(lambda: quant.decode_bytes("data/tiny-ernie-moe"), InputError, "decode_bytes", "str")

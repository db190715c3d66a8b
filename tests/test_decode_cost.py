"""ernie_lab.analysis.decode_cost: the bytes a decode step reads, the bandwidth bound, and the per-token profile."""

import pytest
import torch

from conftest import MICRO_TEXT, micro_model, refused
from ernie_lab import InputError, quant
from ernie_lab.analysis import decode_cost
from ernie_lab.model.kv_cache import KVCache

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


def linear_weights(cfg: dict) -> int:
    """Weights of every linear layer of a dense ERNIE config, from its shape: q, k, v, o, gate, up, down, head."""
    hidden, inter, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    attention = 2 * hidden * cfg["num_attention_heads"] * hd + 2 * hidden * cfg["num_key_value_heads"] * hd
    return cfg["num_hidden_layers"] * (attention + 3 * hidden * inter) + cfg["vocab_size"] * hidden


@pytest.mark.parametrize("tied", [True, False])
def test_step_bytes_counts_every_linear_once_and_not_the_embedding(tied):
    model = micro_model(tie_word_embeddings=tied)
    assert decode_cost.step_bytes(model) == 4 * linear_weights({**MICRO_TEXT})
    assert decode_cost.step_bytes(model.to(torch.bfloat16)) == 2 * linear_weights({**MICRO_TEXT})


def test_step_bytes_of_a_quantized_model_are_its_stored_codes_and_scales():
    model = quant.quantize(micro_model(hidden_size=64, intermediate_size=128), "w4a16", group_size=32)
    stored = 0
    for module in model.modules():
        if isinstance(module, quant.QuantLinear):
            stored += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros)
                          if t is not None)
        elif isinstance(module, torch.nn.Linear):
            stored += module.weight.numel() * module.weight.element_size()
    assert decode_cost.step_bytes(model) == stored
    fp32 = 4 * linear_weights({**MICRO_TEXT, "hidden_size": 64, "intermediate_size": 128})
    assert stored < fp32 / 2


def test_bound_is_bytes_over_bandwidth():
    model = micro_model()
    assert decode_cost.bound_ms(model, 2e9) == pytest.approx(1000 * decode_cost.step_bytes(model) / 2e9)
    assert decode_cost.bound_ms(model, 1e9) == pytest.approx(2 * decode_cost.bound_ms(model, 2e9))


def test_read_bandwidth_is_a_plausible_rate():
    bandwidth = decode_cost.read_bandwidth(mib=8, repeats=2)
    assert 1e8 < bandwidth < 1e13, bandwidth


@pytest.mark.parametrize("name, part", [
    ("aten::linear", 0), ("aten::addmm", 0), ("ernie_lab::gemv", 0), ("aten::_weight_int8pack_mm", 0),
    ("aten::scaled_dot_product_attention", 1), ("aten::softmax", 1), ("attention", 1),
    ("aten::mul", 2), ("aten::index_copy_", 2), ("aten::mean", 2)])
def test_ops_fall_into_their_part(name, part):
    assert decode_cost.part_of(name) == decode_cost.PARTS[part]


def test_profile_parts_add_up_to_the_wall_time_and_grow_with_depth():
    ids = torch.tensor([[5, 9, 11, 30, 2, 7]])
    shallow = decode_cost.profile_decode(micro_model().eval(), ids, steps=3)
    deep = decode_cost.profile_decode(micro_model(num_hidden_layers=4).eval(), ids, steps=3)
    for profile in (shallow, deep):
        assert all(profile[p] >= 0 for p in decode_cost.PARTS)
        assert profile["wall"] == pytest.approx(sum(profile[p] for p in decode_cost.PARTS))
        assert profile[decode_cost.PARTS[0]] > 0 and profile[decode_cost.PARTS[1]] > 0
    # every layer runs the same ops: two more layers, the same number of ops more again
    per_layer = (deep["ops per token"] - shallow["ops per token"]) / 2
    assert per_layer > 10 and shallow["ops per token"] > 2 * per_layer


def test_a_decode_steps_attention_is_one_profiled_range_per_layer():
    """attend_one_query's ops (two matmuls, mask, softmax) are attention, not weight-reading matmuls: while
    profiling they run inside one range per layer; afterwards the plain function is back."""
    from ernie_lab.model import attention
    plain, model = attention.attend_one_query, micro_model(num_hidden_layers=3).eval()
    cache = KVCache.for_model(model, 1, 8)
    model(torch.tensor([[3, 4, 5]]), cache=cache)
    with decode_cost.attention_as_one_range(), torch.profiler.profile() as prof:
        model(torch.tensor([[6]]), cache=cache, position_ids=torch.tensor([[3]]))
    ranges = [e for e in prof.events() if e.name == "attention"]
    assert len(ranges) == 3 and all(e.cpu_parent is None for e in ranges)
    assert attention.attend_one_query is plain


def test_profile_leaves_the_model_as_it_was():
    model = micro_model().eval()
    ids = torch.tensor([[3, 4, 5]])
    before = model(ids).logits
    decode_cost.profile_decode(model, ids, steps=2)
    assert torch.equal(model(ids).logits, before)


def test_bad_input_is_named():
    model = micro_model().eval()
    refused(lambda: decode_cost.profile_decode(model, [[1, 2]]), InputError, "input_ids", "(1, T)")
    refused(lambda: decode_cost.profile_decode(model, torch.ones(2, 3, dtype=torch.long)), InputError, "(2, 3)")
    refused(lambda: decode_cost.profile_decode(model, torch.ones(1, 3)), InputError, "LongTensor")
    refused(lambda: decode_cost.profile_decode(model, torch.ones(1, 3, dtype=torch.long), steps=0), InputError, "steps")
    refused(lambda: decode_cost.profile_decode(torch.nn.Linear(2, 2), torch.ones(1, 3, dtype=torch.long)),
            InputError, "Linear")
    refused(lambda: decode_cost.step_bytes("model"), InputError, "str")
    refused(lambda: decode_cost.bound_ms(model, 0), InputError, "bandwidth")
    refused(lambda: decode_cost.read_bandwidth(mib=0), InputError, "mib")

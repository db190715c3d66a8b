"""ernie_lab.routing.record: what it records, in which order, and its load helpers."""

import pytest
import torch

import ernie_lab
from conftest import MICRO_MOE, micro_moe
from ernie_lab import routing
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.moe import moe_blocks, route

TINY_MOE = MICRO_MOE


@pytest.fixture(scope="module")
def model():
    return micro_moe(bias=0.05)


def test_one_entry_per_moe_layer_in_depth_order(model):
    with torch.no_grad(), routing.record(model) as rec:
        model(torch.randint(0, 64, (2, 5)))
    assert [entry.layer_idx for entry in rec.layers] == [1, 2, 3]
    entry = rec.layers[0]
    assert entry.expert_ids.shape == (10, 2) and entry.expert_ids.dtype == torch.long
    assert entry.weights.shape == (10, 2) and entry.probs.shape == (10, 6)
    assert entry.modality.tolist() == [0] * 10 and entry.expert_ids.device.type == "cpu"
    assert rec.layer(2) is rec.layers[1]
    with pytest.raises(KeyError, match="not an MoE layer"):
        rec.layer(0)


def test_recorded_values_are_the_routing_of_the_recorded_probs(model):
    with torch.no_grad(), routing.record(model) as rec:
        model(torch.randint(0, 64, (3, 4)))
    for entry, block in zip(rec.layers, moe_blocks(model)):
        assert torch.allclose(entry.probs.sum(-1), torch.ones(12))
        assert torch.allclose(entry.weights.sum(-1), torch.ones(12))
        bias = block.moe_statics.e_score_correction_bias[0]
        _, ids, weights = route(entry.probs.log(), block.k, block.norm_min, bias)
        assert torch.equal(ids, entry.expert_ids) and torch.allclose(weights, entry.weights, atol=1e-6)


def test_tokens_are_batch_major_then_one_per_row_per_step(model):
    prompts = torch.randint(3, 64, (2, 5))
    with routing.record(model) as rec:
        ernie_lab.generate(model, prompts, max_new_tokens=4, eos_token_id=[])
    assert rec.layers[0].num_tokens == 2 * 5 + 2 * 3  # prefill, then 3 decode steps (the 4th token is not fed)
    for row in range(2):  # row b's prompt tokens are rows [5b, 5b + 5) of the record
        with torch.no_grad(), routing.record(model) as alone:
            model(prompts[row:row + 1])
        for entry, single in zip(rec.layers, alone.layers):
            assert torch.equal(entry.expert_ids[5 * row:5 * row + 5], single.expert_ids)


def test_nothing_is_recorded_outside_the_context(model):
    with torch.no_grad(), routing.record(model) as rec:
        model(torch.randint(0, 64, (1, 3)))
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 7)))
    assert rec.layers[0].num_tokens == 3
    assert all(not block._forward_hooks for block in routing.taps(model))  # the record's hooks are gone


def test_nested_records_both_listen(model):
    with torch.no_grad(), routing.record(model) as outer:
        model(torch.randint(0, 64, (1, 2)))
        with routing.record(model) as inner:
            model(torch.randint(0, 64, (1, 3)))
    assert outer.layers[0].num_tokens == 5 and inner.layers[0].num_tokens == 3
    assert torch.equal(outer.layers[1].expert_ids[2:], inner.layers[1].expert_ids)


def test_load_helpers(model):
    with torch.no_grad(), routing.record(model) as rec:
        model(torch.randint(0, 64, (2, 8)))
    load = rec.load()
    assert load.shape == (3, 6) and load.sum(-1).tolist() == [16 * 2] * 3
    first = rec.layers[0].expert_ids.reshape(-1).tolist()
    assert load[0].tolist() == [first.count(e) for e in range(6)]
    assert torch.allclose(rec.load_fraction().sum(-1), torch.ones(3))
    assert rec.load(modality=routing.VISION).sum() == 0


def test_a_record_keeps_the_modality_of_two_group_blocks():
    """The vision-language block reports each group's tokens with their modality, read from its output."""
    from ernie_lab.model.moe import MoEBlock, MoEOutput, RouterOutput

    class Block(MoEBlock):  # a block that returns a fixed routing, to check what the record makes of it
        def forward(self, x, modality=None):
            ids = torch.tensor([[3, 2], [0, 1], [2, 0]])
            return MoEOutput(x, RouterOutput(self.logits, ids, torch.full((3, 2), 0.5), torch.tensor([0, 1, 1])))

    block = Block(ErnieConfig.from_dict({**TINY_MOE, "moe_num_experts": 4}), layer_idx=5, group_widths=(8, 4))
    block.logits = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.4, 0.1]]).log()
    model = torch.nn.Sequential(block)
    with routing.record(model) as rec:
        model(torch.zeros(3, 16))
    entry = rec.layers[0]
    assert entry.layer_idx == 5 and entry.modality.tolist() == [0, 1, 1]
    assert torch.allclose(entry.probs, block.logits.exp())  # probs: the softmax of the logits
    assert entry.load(modality=routing.TEXT).tolist() == [0, 0, 1, 1]
    assert entry.load(modality=routing.VISION).tolist() == [2, 1, 1, 0]


def test_a_dense_model_gives_an_empty_record():
    torch.manual_seed(0)
    dense = ernie_lab.ErnieForCausalLM(ErnieConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
                                                   num_hidden_layers=2, num_attention_heads=2,
                                                   num_key_value_heads=1, head_dim=8))
    with torch.no_grad(), routing.record(dense) as rec:
        dense(torch.randint(0, 32, (1, 4)))
    assert rec.layers == [] and rec.load().numel() == 0

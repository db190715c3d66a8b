"""The text mixture-of-experts block and MoE checkpoints, checked against transformers.

Reference models are tiny random ``Ernie4_5_MoeForCausalLM``s written with ``save_pretrained``;
their routers are re-initialised to non-zero weights and the correction bias made non-zero (and
large enough to change some choices), otherwise every token would route the same way.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ernie_lab
from ernie_lab import routing
from ernie_lab.model.config import ERNIE_21B_A3B, ErnieConfig
from ernie_lab.errors import CheckpointError, ConfigError
from ernie_lab.model.moe import MoEBlock, dispatch, moe_blocks, route

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
            moe_num_shared_experts=2, moe_layer_start_index=1)
# the 21B-A3B pattern (dense first layer, 2 shared experts) and a 300B-like one (no shared experts)
# with an interval of 2, which exercises ERNIE's (layer_idx + 1) % interval rule
VARIANTS = {
    "21b-like": {},
    "300b-like": dict(num_hidden_layers=4, moe_num_shared_experts=0, moe_layer_interval=2, moe_k=3),
}


def make_reference(folder, seed=0, **overrides):
    """A random transformers MoE model with a non-zero router and bias, saved to ``folder``."""
    torch.manual_seed(seed)
    config = transformers.Ernie4_5_MoeConfig(**{**TINY, **overrides})
    model = transformers.Ernie4_5_MoeForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # wider than the default 0.02, so greedy decoding does not repeat one token
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0.0, 0.3)
                layer.mlp.gate.moe_statics.e_score_correction_bias.uniform_(-0.04, 0.04)
    model.save_pretrained(folder)
    return model


def reference_router_choices(model):
    """Hooks on every transformers router; returns {layer_idx: [selected experts (N, k) per call]}."""
    seen = {}
    for idx, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            seen[idx] = []
            layer.mlp.gate.register_forward_hook(lambda mod, inp, out, idx=idx: seen[idx].append(out[2].clone()))
    return seen


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    ref = make_reference(folder, **VARIANTS[request.param])
    return ref, ernie_lab.load_model(folder), folder


# ------------------------------------------------------------------------------------ routing
def test_route_by_hand():
    # probabilities of 4 experts for one token: 0.4, 0.3, 0.2, 0.1
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    probs, ids, weights = route(logits, k=2)
    assert torch.allclose(probs, torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    assert ids.tolist() == [[0, 1]]
    assert torch.allclose(weights, torch.tensor([[0.4 / 0.7, 0.3 / 0.7]]))
    # a bias of +0.25 on expert 3 makes it chosen (0.35 > 0.3), but its weight uses the unbiased 0.1
    probs, ids, weights = route(logits, k=2, correction_bias=torch.tensor([0.0, 0.0, 0.0, 0.25]))
    assert ids.tolist() == [[0, 3]]
    assert torch.allclose(weights, torch.tensor([[0.4 / 0.5, 0.1 / 0.5]]))
    # norm_min clamps the denominator: with norm_min 1 the weights stay the raw probabilities
    _, _, weights = route(logits, k=2, norm_min=1.0)
    assert torch.allclose(weights, torch.tensor([[0.4, 0.3]]))


def test_dispatch_matches_a_loop_over_tokens_including_gradients():
    torch.manual_seed(0)
    experts = torch.nn.ModuleList(torch.nn.Linear(6, 6) for _ in range(5))
    x = torch.randn(9, 6, requires_grad=True)
    ids = torch.stack([torch.randperm(5)[:3] for _ in range(9)])  # (9, 3); expert 4 may stay idle
    ids[:, 0] = 1                                                  # expert 1 gets every token
    w = torch.rand(9, 3, requires_grad=True)
    fast = dispatch(x, ids, w, experts)
    slow = torch.stack([sum(w[t, j] * experts[int(ids[t, j])](x[t]) for j in range(3)) for t in range(9)])
    assert torch.allclose(fast, slow, atol=1e-6)
    grads_fast = torch.autograd.grad(fast.square().sum(), (x, w, experts[1].weight))
    grads_slow = torch.autograd.grad(slow.square().sum(), (x, w, experts[1].weight))
    for a, b in zip(grads_fast, grads_slow):
        assert torch.allclose(a, b, atol=1e-5)


def test_moe_block_matches_transformers_block(tmp_path):
    ref = make_reference(tmp_path)
    model = ernie_lab.load_model(tmp_path)
    x = torch.randn(3, 5, TINY["hidden_size"])
    with torch.no_grad():
        expected = ref.model.layers[1].mlp(x)
        got = model.layers[1].mlp(x).hidden
    assert isinstance(model.layers[1].mlp, MoEBlock)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("start,interval,end", [(1, 1, -1), (0, 2, -1), (1, 2, -1), (2, 3, 6), (3, 1, 5)])
def test_moe_layer_rule_matches_transformers(start, interval, end):
    kw = dict(num_hidden_layers=8, moe_layer_start_index=start, moe_layer_interval=interval, moe_layer_end_index=end)
    ours = ErnieConfig.from_dict({**TINY, **kw, "model_type": "ernie4_5_moe"})
    ref_config = transformers.Ernie4_5_MoeConfig(**{**TINY, **kw})
    with torch.device("meta"):
        ref = transformers.Ernie4_5_MoeForCausalLM(ref_config)
    expected = [i for i, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")]
    assert [i for i in range(8) if ours.is_moe_layer(i)] == expected


def test_21b_a3b_parameter_count():
    with torch.device("meta"):
        model = ernie_lab.ErnieForCausalLM(ERNIE_21B_A3B)
    assert model.num_parameters() == 21_825_437_888  # transformers' default config counts the same
    assert len(moe_blocks(model)) == 27


def test_bad_moe_config_is_a_config_error():
    with pytest.raises(ConfigError, match="moe_k"):
        ErnieConfig.from_dict({**TINY, "model_type": "ernie4_5_moe", "moe_k": 9})


# ------------------------------------------------------------------------- whole model fidelity
def test_logits_match_transformers(pair):
    ref, model, _ = pair
    ids = torch.randint(3, TINY["vocab_size"], (2, 17))
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() < 1e-4


def test_greedy_tokens_and_router_choices_match_transformers(pair):
    ref, model, _ = pair
    torch.manual_seed(1)
    prompt = torch.randint(3, TINY["vocab_size"], (1, 7))
    seen = reference_router_choices(ref)
    expected = ref.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                            attention_mask=torch.ones_like(prompt))
    with routing.record(model) as rec:
        got = ernie_lab.generate(model, prompt, max_new_tokens=20, eos_token_id=[])
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 7:].tolist())) > 3, "a continuation repeating one token would be a weak check"
    assert [entry.layer_idx for entry in rec.layers] == sorted(seen)
    for entry in rec.layers:
        ref_ids = torch.cat(seen[entry.layer_idx])                 # prefill (7 tokens) + 19 decode steps
        assert entry.expert_ids.shape == ref_ids.shape == (7 + 19, model.config.moe_k)
        assert torch.equal(entry.expert_ids.sort(-1).values, ref_ids.sort(-1).values)


def test_correction_bias_changes_some_choices(pair):
    """Guards the test above: with the bias ignored, some recorded choices would differ."""
    _, model, _ = pair
    ids = torch.randint(3, TINY["vocab_size"], (4, 16))
    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    changed = 0
    for entry, block in zip(rec.layers, moe_blocks(model)):
        unbiased = entry.probs.topk(block.k, dim=-1).indices.sort(-1).values
        changed += int((unbiased != entry.expert_ids.sort(-1).values).any(-1).sum())
    assert changed > 0


# ------------------------------------------------------------------------------------- loading
def test_mtp_tensors_are_skipped_with_one_message(tmp_path, capsys):
    make_reference(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    hidden = TINY["hidden_size"]
    state.update({"model.mtp_block.0.mlp.up_proj.weight": torch.zeros(4, hidden),
                  "model.mtp_block.0.input_layernorm.weight": torch.ones(hidden),
                  "model.mtp_emb_norm.0.weight": torch.ones(hidden),
                  "model.mtp_hidden_norm.0.weight": torch.ones(hidden),
                  "model.mtp_linear_proj.0.weight": torch.zeros(hidden, 2 * hidden)})
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = ernie_lab.load_model(tmp_path)
    out = capsys.readouterr().out
    assert out.count("ernie-lab:") == 1 and "5 tensors" in out and "multi-token-prediction" in out
    assert len(moe_blocks(model)) == 2


def test_missing_expert_tensor_is_named(tmp_path):
    make_reference(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        ernie_lab.load_model(tmp_path)


def test_bfloat16_load_keeps_the_router_in_float32(pair):
    _, _, folder = pair
    model = ernie_lab.load_model(folder, dtype=torch.bfloat16)
    block = moe_blocks(model)[0]
    assert block.gate.weight.dtype == torch.float32
    assert block.moe_statics.e_score_correction_bias.dtype == torch.float32
    assert block.experts[0].up_proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(torch.randint(3, TINY["vocab_size"], (1, 5))).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_config_json_of_the_checkpoint_is_read(pair):
    _, model, folder = pair
    raw = json.loads((folder / "config.json").read_text())
    assert model.config.model_type == "ernie4_5_moe"
    assert model.config.moe_num_experts == raw["moe_num_experts"] and model.config.moe_k == raw["moe_k"]

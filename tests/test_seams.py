"""The seams that training, quantization, LoRA and routing pictures attach to.

One decoder for text and VL models, one MoE block protocol, outputs that carry the loss and the
router logits, every matmul a swappable linear, one reading of config.json, one name table module,
an architecture registry, and loading that streams tensors through a list of transforms.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import ernie_lab
from ernie_lab import architectures, family, hub_names, losses, routing
from ernie_lab.model.config import ErnieConfig, VLConfig, is_vision_language, parse_config
from ernie_lab.errors import ConfigError, InputError
from ernie_lab.model.decoder import DecoderLayer, ErnieForCausalLM
from ernie_lab.model.linears import linear_names, replace_linears
from ernie_lab.model.moe import MoEBlock, Router, moe_blocks

TINY_MOE = dict(model_type="ernie4_5_moe", vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=4, moe_k=2,
                moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1)
TINY_VL = dict(
    model_type="ernie4_5_vl_moe",
    text_config=dict(vocab_size=103424, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=128, moe_num_experts=4, moe_k=2,
                     moe_intermediate_size=[32, 16], moe_num_shared_experts=1,
                     mlp_layer_types=["dense", "sparse", "sparse"]),
    vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64),
)


def moe_model(seed=0):
    torch.manual_seed(seed)
    model = ErnieForCausalLM(ErnieConfig.from_dict(TINY_MOE)).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 1.0)
    return model


def vl_model(seed=0):
    torch.manual_seed(seed)
    model = ernie_lab.ErnieVLForConditionalGeneration(VLConfig.from_dict(TINY_VL)).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            for router in block.routers:
                router.weight.normal_(0.0, 1.0)
    return model


def vl_inputs(model):
    from ernie_lab.io.image_processing import preprocess_images
    from PIL import Image

    batch = preprocess_images([Image.new("RGB", (56, 56), (200, 30, 30))])
    c = model.config
    ids = torch.tensor([[1, 5, c.image_start_token_id] + [c.image_token_id] * 4 + [c.image_end_token_id, 7, 8]])
    return ids, batch


def inputs_for(model):
    """(input_ids, extra forward arguments): a picture prompt for the VL model, random ids for the text MoE."""
    if isinstance(model.config, VLConfig):
        return vl_inputs(model)
    return torch.randint(0, 120, (2, 9)), {}


# ------------------------------------------------------------------------------ one decoder
def test_vl_model_is_the_text_decoder_with_vision_and_a_two_group_moe():
    model = vl_model()
    assert isinstance(model, ErnieForCausalLM)
    assert all(type(layer) is DecoderLayer for layer in model.layers)
    blocks = moe_blocks(model)
    assert len(blocks) == 2 and all(b.num_groups == 2 for b in blocks)
    assert isinstance(model.config, VLConfig) and model.config.text.hidden_size == 64
    assert model.vl_config is model.config and model.text_config is model.config.text
    with routing.record(model) as rec:
        ids, batch = vl_inputs(model)
        model(ids, **batch)
    assert len(rec.layers) == 2
    vision_rows = rec.layers[0].modality == routing.VISION
    assert int(vision_rows.sum()) == 6  # 4 placeholders + start and end markers


@pytest.mark.parametrize("make", [moe_model, vl_model], ids=["text-moe", "vl"])
def test_outputs_carry_loss_and_router_logits(make):
    model = make()
    ids, extra = inputs_for(model)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels, output_router_logits=True, **extra)
    expected = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                           labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, expected)
    assert len(out.router_logits) == len(moe_blocks(model))
    N = ids.numel()
    for entry in out.router_logits:
        assert entry.logits.shape == (N, 4) and entry.logits.dtype == torch.float32
        assert entry.modality.shape == (N,)
    if isinstance(model.config, VLConfig):
        assert int((out.router_logits[0].modality == 1).sum()) == 6
        assert out.router_logits[0].group(1).shape == (6, 4)
        balance = losses.modality_balancing_losses(out.router_logits, None, k=2)
        assert balance["vision"] > 0 and balance["text"] > 0
    plain = model(ids, **extra)
    assert plain.loss is None and plain.router_logits is None
    assert torch.equal(plain.logits, out.logits)


def test_loss_gradients_reach_every_router():
    model = vl_model().train()
    ids, batch = vl_inputs(model)
    out = model(ids, labels=ids, output_router_logits=True, **batch)
    balance = losses.modality_balancing_losses(out.router_logits, None, k=2)
    (out.loss + balance["text"] + balance["vision"]).backward()
    for block in moe_blocks(model):
        assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in block.routers)


def test_all_ignored_labels_and_logits_to_keep_are_refused():
    model = moe_model()
    ids = torch.randint(0, 120, (1, 5))
    with pytest.raises(InputError, match="nothing to learn"):
        model(ids, labels=torch.full_like(ids, -100))
    with pytest.raises(InputError, match="logits_to_keep"):
        model(ids, labels=ids, logits_to_keep=1)


def test_inputs_embeds_equal_ids():
    model = moe_model()
    ids = torch.randint(0, 120, (2, 6))
    assert torch.equal(model(inputs_embeds=model.embed(ids)).logits, model(ids).logits)


# ------------------------------------------------------------------------------ every matmul a module
class CountingLinear(nn.Module):
    """Wraps a linear and counts its calls: proof that the model goes through the module."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("make", [moe_model, vl_model], ids=["text-moe", "vl"])
def test_replace_linears_swaps_every_matmul_without_changing_outputs(make):
    model = make()
    ids, extra = inputs_for(model)
    before = model(ids, **extra).logits
    wrappers = {}
    replaced = replace_linears(model, lambda name, lin: wrappers.setdefault(name, CountingLinear(lin)))
    assert "lm_head" not in replaced  # tied head stays the embedding
    assert any(".routers." in n for n in replaced)
    if extra:
        assert "vision.patch_embed.proj" in replaced and any(n.startswith("adapter.") for n in replaced)
    after = model(ids, **extra).logits
    assert torch.equal(before, after)
    used = {name for name, w in wrappers.items() if w.calls}
    experts_unused = {n for n in replaced if ".experts." in n} - used  # some experts get no token
    assert set(replaced) - used == experts_unused
    assert not any(isinstance(m, nn.Linear) and not isinstance(p, CountingLinear)
                   for pn, p in model.named_modules() for n, m in p.named_children() if f"{pn}.{n}".strip(".") in replaced)


def test_replace_linears_filter_and_skip():
    model = moe_model()
    names = replace_linears(model, lambda n, lin: CountingLinear(lin), r"layers\.\d+\.attn\.(q|k)_proj",
                            skip=r"layers\.0\..*")
    assert names == ["layers.1.attn.q_proj", "layers.1.attn.k_proj", "layers.2.attn.q_proj", "layers.2.attn.k_proj"]
    assert "layers.0.attn.q_proj" in linear_names(model)
    with pytest.raises(InputError, match="nn.Module"):
        replace_linears(model, lambda n, lin: 3, r"layers\.0\.attn\.q_proj")


def test_vl_model_runs_in_bfloat16_with_pictures():
    model = vl_model().to(torch.bfloat16)
    for block in moe_blocks(model):
        for router in block.routers:
            router.float()
    ids, batch = vl_inputs(model)
    logits = model(ids, **batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# ------------------------------------------------------------------------------ one config reading
def test_missing_start_index_follows_transformers_everywhere():
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    raw = {k: v for k, v in TINY_MOE.items() if k != "moe_layer_start_index"}
    ours = ErnieConfig.from_dict(raw)
    with torch.device("meta"):
        ref = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**{k: v for k, v in raw.items() if k != "model_type"}))
    ref_layers = tuple(hasattr(layer.mlp, "gate") for layer in ref.model.layers)
    assert ours.moe_layers == ref_layers == family.model_shape(raw).moe_layers == (False, True, True)
    assert not ours.is_moe_layer(0)


def test_one_test_of_vision_language():
    assert is_vision_language(TINY_VL) and is_vision_language({"model_type": "ernie4_5_moe_vl"})
    assert is_vision_language({"architectures": ["Ernie4_5_VLMoeForConditionalGeneration"]})
    assert not is_vision_language(TINY_MOE)
    assert isinstance(parse_config(TINY_VL), VLConfig) and isinstance(parse_config(TINY_MOE), ErnieConfig)
    assert family.model_shape(parse_config(TINY_VL)) == family.model_shape(TINY_VL)
    with pytest.raises(ConfigError, match="hidden_size"):
        parse_config({"model_type": "ernie4_5", "vocab_size": 10})


# ------------------------------------------------------------------------------ names and registry
def test_name_tables_round_trip_every_parameter():
    for model in (moe_model(), vl_model()):
        table = architectures.name_table(model.config)
        for name in model.state_dict():
            hub = hub_names.lab_to_hub(name, table)
            assert hub is not None and hub_names.hub_to_lab(hub, table) == name
    assert hub_names.lab_to_hub("layers.1.mlp.routers.1.weight", hub_names.VL_NAME_MAP) == "model.layers.1.mlp.gate.weight_1"
    assert hub_names.is_transposed("layers.1.mlp.routers.0.weight", hub_names.VL_NAME_MAP)
    assert not hub_names.is_transposed("layers.1.mlp.routers.0.weight", hub_names.NAME_MAP)
    assert hub_names.hub_to_lab_vision("model.resampler_model.mlp.bias") == "adapter.proj.bias"


def test_a_new_architecture_is_one_registry_entry(tmp_path, monkeypatch):
    class Doubled(ErnieForCausalLM):
        """A toy 'architecture': the text decoder whose logits are doubled."""

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2 * out.logits
            return out

    model = moe_model()
    ernie_lab.save_model(model, tmp_path)
    entry = architectures.REGISTRY["ernie4_5_moe"]
    monkeypatch.setitem(architectures.REGISTRY, "ernie4_5_moe",
                        architectures.Architecture("ernie4_5_moe", ErnieConfig, Doubled, entry.name_table))
    loaded = ernie_lab.load_model(tmp_path)
    ids = torch.randint(0, 120, (1, 5))
    assert isinstance(loaded, Doubled)
    assert torch.allclose(loaded(ids).logits, 2 * model(ids).logits, atol=1e-6)


# ------------------------------------------------------------------------------ loading
def test_paddle_layout_is_decided_by_the_tensors(tiny_checkpoint, tmp_path):
    """The 'ernie.' prefix, not the folder's name, says a checkpoint is in Paddle's layout."""
    from safetensors.torch import load_file, save_file
    import shutil

    ref, folder = tiny_checkpoint
    tensors = load_file(folder / "model.safetensors")
    paddle = {name.replace("model.", "ernie.", 1): (t.t().contiguous() if t.dim() == 2 and "embed" not in name else t)
              for name, t in tensors.items()}
    target = tmp_path / "a-folder-with-any-name"
    target.mkdir()
    save_file(paddle, target / "model.safetensors")
    shutil.copy(folder / "config.json", target / "config.json")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert (ernie_lab.load_model(target)(ids).logits - ref(ids).logits).abs().max() < 1e-4
    not_paddle = tmp_path / "ERNIE-4.5-tiny-Paddle"  # a -Paddle name on -PT tensors loads as -PT
    shutil.copytree(folder, not_paddle)
    with torch.no_grad():
        assert (ernie_lab.load_model(not_paddle)(ids).logits - ref(ids).logits).abs().max() < 1e-4


def test_user_transforms_see_every_tensor_after_the_builtin_ones(tmp_path):
    model = moe_model()
    ernie_lab.save_model(model, tmp_path)
    seen = []

    def spy(name, tensor):
        seen.append((name, tensor.dtype))
        return tensor

    loaded = ernie_lab.load_model(tmp_path, dtype=torch.bfloat16, transforms=[spy])
    names = dict(seen)
    assert set(names) == set(loaded.state_dict()) - {"lm_head.weight"}
    assert names["layers.1.mlp.routers.0.weight"] == torch.float32 and names["embed.weight"] == torch.bfloat16


def measured_peak(folder, dtype: str) -> int:
    """Peak resident memory of loading ``folder`` in a fresh process: the benchmark's own measurement."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "load_memory.py"
    spec = importlib.util.spec_from_file_location("load_memory_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    return benchmark.peak(Path(folder), dtype)


def test_bfloat16_load_streams_tensor_by_tensor(tmp_path):
    """Loading an fp32 checkpoint in bf16 needs the bf16 model plus about one tensor, not both models."""
    # the 0.3B's proportions: the (largest) embedding is about a quarter of the weights
    config = ErnieConfig(vocab_size=12000, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=64)
    with torch.device("meta"):
        skeleton = ErnieForCausalLM(config)
    fp32_bytes = 4 * skeleton.num_parameters()  # 96 MB
    torch.manual_seed(0)
    ernie_lab.save_model(ErnieForCausalLM(config), tmp_path / "model")
    tmp_path = tmp_path / "model"
    largest = 4 * config.vocab_size * config.hidden_size
    ratio = measured_peak(tmp_path, "bfloat16") / fp32_bytes
    # the result is 0.5x; the largest tensor (the embedding) is about 0.25x of the fp32 bytes
    assert ratio <= 0.5 + largest / fp32_bytes + 0.1, f"bf16 load peaked at {ratio:.2f}x the fp32 weight bytes"
    assert ratio <= 0.85
    fp32_ratio = measured_peak(tmp_path, "none") / fp32_bytes
    # fp32 keeps every tensor as read: the weights (1.0x) plus the allocator's slack, which is a larger share of
    # this 96 MB model than of the 0.3B (benchmarks/load_memory.py measures 1.01x there)
    assert fp32_ratio <= 1.25, f"fp32 load peaked at {fp32_ratio:.2f}x the weight bytes"


@pytest.mark.parametrize("make", [moe_model, vl_model], ids=["text-moe", "vl"])
def test_logits_for_labels_only_gives_the_same_loss_and_gradients(make):
    model = make()
    ids, extra = inputs_for(model)
    labels = ids.clone()
    labels[:, :4] = -100
    full = model(ids, labels=labels, **extra)
    full.loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    lean = model(ids, labels=labels, logits_for_labels_only=True, **extra)
    lean.loss.backward()
    assert torch.allclose(full.loss, lean.loss, atol=1e-6)
    assert lean.logits.shape == (int((labels[:, 1:] != -100).sum()), full.logits.shape[-1])
    assert all(torch.allclose(g, p.grad, atol=1e-6) for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]))

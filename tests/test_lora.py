"""LoRA: the kit's adapters are peft's adapters (both directions, dense and MoE), merge / unmerge /
disable agree, only A and B train, and bad adapters get clear errors."""

import json
import re
import warnings

import pytest
import torch
from torch import nn

import ernie_lab
from conftest import reference_dense
from ernie_lab import lora
from ernie_lab.errors import CheckpointError, ConfigError, ErnieLabError, InputError

TOL = 1e-4
MOE = dict(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, moe_num_experts=4, moe_k=2,
           moe_num_shared_experts=1, moe_layer_start_index=1)

warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def max_diff(a, b):
    return (a - b).abs().max().item()


def randomise_B(model, std=0.1, seed=0):
    """A trained-looking adapter: B is zero at the start, so make it non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dense")
    reference_dense(seed=1).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(0)
    ref = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**MOE)).eval()
    with torch.no_grad():  # live routers
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("moe")
    ref.save_pretrained(folder)
    return folder


def transformers_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def ids_for(vocab, seed=0):
    return torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ the layer
def test_fresh_adapter_changes_nothing_and_only_A_B_train(dense_folder):
    model = ernie_lab.load_model(dense_folder)
    ids = ids_for(1000)
    with torch.no_grad():
        before = model(ids).logits
    lora.apply_lora(model)
    layers = lora.lora_layers(model)
    assert len(layers) == 3 * 7 and all(l.lora_A.weight.abs().sum() > 0 for l in layers.values())
    with torch.no_grad():
        assert max_diff(model(ids).logits, before) == 0.0  # B = 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_B." in n)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    layer = layers["layers.0.attn.q_proj"]
    assert layer.scale == 16 / 8 and layer.lora_A.weight.shape == (8, 64) and layer.lora_B.weight.shape == (128, 8)


def test_merged_unmerged_disabled_forms_agree(dense_folder):
    base = ernie_lab.load_model(dense_folder)
    model = lora.apply_lora(ernie_lab.load_model(dense_folder), r=4, alpha=8)
    randomise_B(model)
    ids = ids_for(1000)
    with torch.no_grad():
        adapted, plain = model(ids).logits, base(ids).logits
        assert max_diff(adapted, plain) > 1e-2
        lora.merge_lora(model)
        assert max_diff(model(ids).logits, adapted) < TOL
        with lora.adapters_disabled(model):            # merged adapters are taken out inside
            assert max_diff(model(ids).logits, plain) < TOL
        assert max_diff(model(ids).logits, adapted) < TOL
        lora.unmerge_lora(model)
        assert max_diff(model(ids).logits, adapted) < TOL
        assert max_diff(model.layers[0].attn.q_proj.base_layer.weight, base.layers[0].attn.q_proj.weight) < 1e-6
        with lora.adapters_disabled(model):
            assert max_diff(model(ids).logits, plain) < TOL
        lora.merge_lora(model, unload=True)
        assert not lora.lora_layers(model) and type(model.layers[0].attn.q_proj) is nn.Linear
        assert max_diff(model(ids).logits, adapted) < TOL


def test_wraps_any_linear_like_module():
    class FakeQuantLinear(nn.Module):  # no .weight to merge into, as a packed int4 linear
        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 6, 5
            self.register_buffer("packed", torch.randn(5, 6))

        def forward(self, x):
            return x @ self.packed.T

    layer = lora.LoRALinear(FakeQuantLinear(), r=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 6)
    expected = x @ layer.base_layer.packed.T + 2.0 * (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    with pytest.raises(InputError, match="no floating-point weight"):
        layer.merge()
    with pytest.raises(InputError, match="in_features"):
        lora.LoRALinear(nn.ReLU())


def test_vision_tower_only_when_asked():
    from test_seams import vl_model

    model = lora.apply_lora(vl_model())
    assert not any(n.startswith(("vision.", "adapter.")) for n in lora.lora_layers(model))
    assert any(".mlp.experts." in n for n in lora.lora_layers(model))
    assert any(".shared_experts." in n for n in lora.lora_layers(model))
    with_vision = lora.apply_lora(vl_model(), vision=True)
    names = lora.lora_layers(with_vision)
    assert "vision.blocks.0.attn.qkv" in names and "vision.blocks.1.mlp.fc2" in names
    assert not any(".routers." in n for n in names)  # routers are never adapted by leaf name


# ------------------------------------------------------------------------------------------ peft interop
def test_kit_adapter_loads_in_peft_dense(dense_folder, tmp_path):
    from peft import PeftModel

    model = lora.apply_lora(ernie_lab.load_model(dense_folder))
    randomise_B(model)
    lora.save_adapter(model, tmp_path / "adapter")
    keys = set(__import__("safetensors.torch").torch.load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    peft_model = PeftModel.from_pretrained(transformers_model(dense_folder), tmp_path / "adapter").eval()
    ids = ids_for(1000)
    with torch.no_grad():
        assert max_diff(peft_model(ids).logits, model(ids).logits) < TOL
        with peft_model.disable_adapter():
            assert max_diff(peft_model(ids).logits, model(ids).logits) > 1e-2  # the adapter did something


def test_peft_adapter_loads_in_kit_dense_and_counts_match(dense_folder, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(transformers_model(dense_folder),
                                LoraConfig(r=8, lora_alpha=16, target_modules=list(lora.DEFAULT_TARGETS)))
    randomise_B(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path / "peft")
    kit = lora.load_adapter(ernie_lab.load_model(dense_folder), tmp_path / "peft")
    ids = ids_for(1000, seed=1)
    with torch.no_grad():
        assert max_diff(kit(ids).logits, peft_model.eval()(ids).logits) < TOL
    fresh = lora.apply_lora(ernie_lab.load_model(dense_folder))
    assert lora.trainable_parameters(fresh) == lora.trainable_parameters(kit)
    assert lora.trainable_parameters(fresh) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_moe_adapter_both_ways(moe_folder, tmp_path):
    """Experts are saved per expert; peft converts them into transformers 5's fused expert parameters
    (and a peft-made fused adapter is split per expert by the kit). Shared experts and dense MLPs too."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model = lora.apply_lora(ernie_lab.load_model(moe_folder))
    assert any(".experts.3.up_proj" in n for n in lora.lora_layers(model))
    randomise_B(model)
    lora.save_adapter(model, tmp_path / "kit")
    ids = ids_for(120)
    into_peft = PeftModel.from_pretrained(transformers_model(moe_folder), tmp_path / "kit").eval()
    with torch.no_grad():
        assert max_diff(into_peft(ids).logits, model(ids).logits) < TOL
        with into_peft.disable_adapter():
            assert max_diff(into_peft(ids).logits, model(ids).logits) > 1e-2

    made = get_peft_model(transformers_model(moe_folder), LoraConfig(r=8, lora_alpha=16, target_modules=list(lora.DEFAULT_TARGETS)))
    randomise_B(made, seed=5)
    made.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "gate_up_proj" in config["target_parameters"]   # peft's fused expert form
    kit = lora.load_adapter(ernie_lab.load_model(moe_folder), tmp_path / "peft")
    with torch.no_grad():
        assert max_diff(kit(ids).logits, made.eval()(ids).logits) < TOL


def test_moe_attention_and_shared_counts_match_peft(moe_folder):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    kit = lora.apply_lora(ernie_lab.load_model(moe_folder), target_modules=targets)
    made = get_peft_model(transformers_model(moe_folder), LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    assert lora.trainable_parameters(kit) == sum(p.numel() for p in made.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------------------ bad adapters
@pytest.fixture()
def saved(dense_folder, tmp_path):
    model = lora.apply_lora(ernie_lab.load_model(dense_folder), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    randomise_B(model)
    return lora.save_adapter(model, tmp_path / "adapter")


def edit_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_missing_target_module_is_a_config_error(dense_folder):
    with pytest.raises(ConfigError, match="qkv"):
        lora.apply_lora(ernie_lab.load_model(dense_folder), target_modules=("q_proj", "qkv"))


def test_wrong_rank_in_config(saved, dense_folder):
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(CheckpointError, match="rank 4 in the file but r=8"):
        lora.load_adapter(ernie_lab.load_model(dense_folder), saved)


def test_wrong_shapes(saved, dense_folder):
    edit_tensors(saved, lambda t: t.update({k: v[:, :10].contiguous() for k, v in t.items() if "layers.1.self_attn.q_proj.lora_A" in k}))
    with pytest.raises(CheckpointError, match="do not fit"):
        lora.load_adapter(ernie_lab.load_model(dense_folder), saved)


def test_missing_tensor(saved, dense_folder):
    edit_tensors(saved, lambda t: t.pop("base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight"))
    with pytest.raises(CheckpointError, match="no lora_B"):
        lora.load_adapter(ernie_lab.load_model(dense_folder), saved)
    model = lora.apply_lora(ernie_lab.load_model(dense_folder), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    edit_tensors(saved, lambda t: t.pop("base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight"))
    with pytest.raises(CheckpointError, match="no tensors for 1 LoRA layer"):
        lora.load_adapter(model, saved)


def test_unknown_module_and_other_base(saved, tmp_path):
    other = tmp_path / "other"
    reference_dense(num_hidden_layers=2).save_pretrained(other)
    with pytest.raises(ConfigError, match="another base model: num_hidden_layers 3"):
        lora.load_adapter(ernie_lab.load_model(other), saved)
    from safetensors.torch import load_file, save_file  # without the kit's fingerprint: peft's own files

    save_file(load_file(saved / "adapter_model.safetensors"), saved / "adapter_model.safetensors")
    with pytest.raises(ConfigError, match=r"layers.2.attn.q_proj.*lacks"):
        lora.load_adapter(ernie_lab.load_model(other), saved)


def test_corrupt_or_missing_files(saved, dense_folder):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt"):
        lora.load_adapter(ernie_lab.load_model(dense_folder), saved)
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        lora.load_adapter(ernie_lab.load_model(dense_folder), saved)
    (saved / "adapter_config.json").unlink()
    with pytest.raises(ErnieLabError, match="adapter_config.json is missing"):
        lora.load_adapter(ernie_lab.load_model(dense_folder), saved)


def test_save_is_atomic_and_overwrites(saved, dense_folder):
    model = lora.load_adapter(ernie_lab.load_model(dense_folder), saved)
    randomise_B(model, seed=9)
    lora.save_adapter(model, saved)  # over the old one
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temporary folders left behind
    again = lora.load_adapter(ernie_lab.load_model(dense_folder), saved)
    ids = ids_for(1000)
    with torch.no_grad():
        assert max_diff(again(ids).logits, model(ids).logits) < 1e-6


# ------------------------------------------------------------------------------------------ the target table
def kit_adapter_in_peft(kit, reference, folder, kit_inputs, reference_inputs):
    """Save the kit's adapter, load it with peft onto ``reference`` (same weights): (peft model, logits diff,
    how much the adapter moves the logits)."""
    from peft import PeftModel

    randomise_B(kit)
    lora.save_adapter(kit, folder)
    peft_model = PeftModel.from_pretrained(reference, folder).eval()
    with torch.no_grad():
        ours = kit(**kit_inputs).logits
        theirs = peft_model(**reference_inputs).logits
        with peft_model.disable_adapter():
            plain = peft_model(**reference_inputs).logits
    return peft_model, max_diff(ours, theirs), max_diff(ours, plain)


def peft_adapted(peft_model) -> set[str]:
    return {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in peft_model.named_modules()
            if n.endswith(".lora_A")} | {n.removeprefix("base_model.model.") for n, _ in peft_model.named_modules()
                                         if type(_).__name__ == "ParamWrapper"}


def test_table_rows_are_consistent():
    assert set(lora.LORA_TARGETS) == {"attention", "dense MLP", "routed experts", "shared experts",
                                      "VL routed experts", "vision encoder", "VL resampler"}
    for row in lora.LORA_TARGETS.values():
        assert row.kit and row.file and row.memory and row.peft


@pytest.mark.parametrize("row, folder_name, expected_layers", [
    ("attention", "dense_folder", {"layers.0.attn.q_proj", "layers.2.attn.o_proj"}),
    ("dense MLP", "dense_folder", {"layers.0.mlp.gate_proj", "layers.2.mlp.down_proj"}),
    ("attention", "moe_folder", {"layers.0.attn.q_proj", "layers.2.attn.v_proj"}),
    ("dense MLP", "moe_folder", {"layers.0.mlp.gate_proj", "layers.0.mlp.down_proj"}),
    ("routed experts", "moe_folder", {"layers.1.mlp.experts.0.gate_proj", "layers.2.mlp.experts.3.down_proj"}),
    ("shared experts", "moe_folder", {"layers.1.mlp.shared_experts.up_proj", "layers.2.mlp.shared_experts.down_proj"}),
])
def test_each_text_row_loads_in_peft(row, folder_name, expected_layers, request, tmp_path):
    """(a) the kit's LoRA with the row's targets adapts exactly that kind of layer; (b) peft loads the saved
    adapter onto transformers' model of the same weights with equal logits."""
    folder = request.getfixturevalue(folder_name)
    target = lora.LORA_TARGETS[row]
    kit = lora.apply_lora(ernie_lab.load_model(folder), target_modules=target.kit)
    names = set(lora.lora_layers(kit))
    assert expected_layers <= names
    kind = {"attention": ".attn.", "dense MLP": "layers.0.mlp." if "moe" in folder_name else ".mlp.",
            "routed experts": ".mlp.experts.", "shared experts": ".shared_experts."}[row]
    assert all(kind in n for n in names)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    ids = {"input_ids": ids_for(vocab, seed=4)}
    peft_model, diff, effect = kit_adapter_in_peft(kit, transformers_model(folder), tmp_path / "adapter", ids, ids)
    assert diff < TOL and effect > 1e-2
    assert target.peft_loads


def vl_picture_inputs():
    """A text-picture-text prompt: the model reads pixels and uses 3-D (t, h, w) positions."""
    from test_vl_model import image_prompt, picture, reference_inputs
    from ernie_lab.io.image_processing import preprocess_images

    pixels = preprocess_images([picture(70, 100, seed=5)])   # its own noise: test_vl_model's draws stay as they are
    ids = image_prompt(pixels["image_grid_thw"].tolist())
    return {"input_ids": ids, **pixels}, reference_inputs(ids, **pixels)


VL_FUSED = {f"model.language_model.layers.{i}.mlp.{group}.experts{inner}"   # peft's wrappers: gate_up_proj
            for i in (1, 2) for group in ("text_moe", "vision_moe") for inner in ("", ".base_layer")}  # inside


@pytest.mark.parametrize("rows, in_peft", [
    (("attention",), {"model.language_model.layers.1.self_attn.q_proj"}),
    (("shared experts",), {"model.language_model.layers.1.mlp.shared_experts.gate_proj"}),
    (("dense MLP",), {"model.language_model.layers.0.mlp.gate_proj", "model.language_model.layers.0.mlp.down_proj"}),
    (("attention", "dense MLP", "VL routed experts", "shared experts"),                  # apply_lora's default set
     {"model.language_model.layers.2.self_attn.v_proj", "model.language_model.layers.0.mlp.up_proj",
      "model.language_model.layers.1.mlp.shared_experts.down_proj"} | VL_FUSED),
    (("vision encoder", "VL resampler"), {"model.vision_tower.blocks.0.attn.qkv", "model.vision_tower.blocks.1.mlp.fc2",
                                          "model.resampler_model.mlp", "model.resampler_model.spatial_linear.fc1",
                                          "model.resampler_model.temporal_linear.fc2"}),
])
def test_each_vl_row_loads_in_peft_through_pictures(rows, in_peft, tmp_path):
    """The VL rows, through a prompt with a picture (3-D positions, both expert groups routed)."""
    from test_vl_model import build_pair

    targets = [t for row in rows for t in lora.LORA_TARGETS[row].kit]
    vision = any(lora.LORA_TARGETS[row].vision for row in rows)
    reference, kit = build_pair(tmp_path / "vl")  # fresh: apply_lora and peft both change their model in place
    lora.apply_lora(kit, target_modules=targets, vision=vision)
    kit_inputs, reference_inputs = vl_picture_inputs()
    peft_model, diff, effect = kit_adapter_in_peft(kit, reference, tmp_path / "adapter", kit_inputs, reference_inputs)
    assert in_peft <= peft_adapted(peft_model)
    assert diff < TOL and effect > 1e-2
    assert all(lora.LORA_TARGETS[row].peft_loads for row in rows)


def test_fused_layout_is_peft_param_wrappers():
    """stack_experts / fuse_gate_up lay the kit's per-expert gate and up LoRAs out as peft's ParamWrapper reads
    them (its own delta of the 3-D gate_up_proj equals the kit's per-expert updates), and split_gate_up gives
    them back."""
    from peft import LoraConfig
    from peft.tuners.lora.layer import ParamWrapper
    from ernie_lab.train.lora import fused_experts as fe

    E, H, I, r, alpha = 3, 10, 6, 2, 5.0
    torch.manual_seed(0)
    gates = [lora.LoRALinear(nn.Linear(H, I, bias=False), r, alpha) for _ in range(E)]
    ups = [lora.LoRALinear(nn.Linear(H, I, bias=False), r, alpha) for _ in range(E)]
    for layer in gates + ups:
        nn.init.normal_(layer.lora_B.weight)
    A, B = fe.stack_experts(*zip(*[fe.fuse_gate_up(g, u) for g, u in zip(gates, ups)]))
    assert A.shape == (E * 2 * r, H) and B.shape == (2 * I, 2 * r * E)

    experts = nn.Module()
    experts.gate_up_proj = nn.Parameter(torch.zeros(E, 2 * I, H))   # transformers' (E, out, in)
    config = LoraConfig(r=2 * r, lora_alpha=2 * alpha, target_parameters=["gate_up_proj"])
    wrapper = ParamWrapper(experts, "default", "gate_up_proj", config, r=2 * r, lora_alpha=2 * alpha)
    with torch.no_grad():
        wrapper.lora_A["default"].weight.copy_(A)
        wrapper.lora_B["default"].weight.copy_(B)
        theirs = wrapper.get_delta_weight("default")                 # (E, 2I, H)
        ours = torch.stack([torch.cat([g.scale * g.lora_B.weight @ g.lora_A.weight,
                                       u.scale * u.lora_B.weight @ u.lora_A.weight]) for g, u in zip(gates, ups)])
    assert max_diff(theirs, ours) < 1e-6

    As, Bs = fe.unstack_experts(A, B, E)
    assert all(fe.block_diagonal(b) for b in Bs)
    (gate_A, gate_B), (up_A, up_B) = fe.split_gate_up(As[1], Bs[1], halve=True)
    assert torch.equal(gate_A, gates[1].lora_A.weight) and torch.equal(up_B, ups[1].lora_B.weight)
    assert torch.equal(gate_B, gates[1].lora_B.weight) and torch.equal(up_A, ups[1].lora_A.weight)
    dense = Bs[1] + 1.0                                               # trained by peft: B_e dense, nothing to halve
    assert not fe.block_diagonal(dense)
    (gate_A, gate_B), (up_A, up_B) = fe.split_gate_up(As[1], dense, halve=False)
    assert torch.equal(gate_A, As[1]) and torch.equal(torch.cat([gate_B, up_B]), dense)


def test_vl_routed_experts_both_ways_through_pictures(tmp_path):
    """The kit writes the VL routed experts in peft's fused layout (target_parameters per expert group, gate_up_proj
    at rank 2r with alpha 2*alpha); peft loads it with the kit's logits, the kit reloads it with the same layers and
    ranks, and a peft-made adapter of the fused parameters loads into the kit with peft's logits."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from test_vl_model import build_pair

    reference, kit = build_pair(tmp_path / "vl")
    lora.apply_lora(kit, r=4, alpha=8, target_modules=lora.LORA_TARGETS["VL routed experts"].kit)
    kit_inputs, reference_inputs = vl_picture_inputs()
    peft_model, diff, effect = kit_adapter_in_peft(kit, reference, tmp_path / "adapter", kit_inputs, reference_inputs)
    assert diff < TOL and effect > 1e-2
    assert peft_adapted(peft_model) == VL_FUSED       # every expert group, nothing on the shared experts
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and config["target_parameters"] == [
        "text_moe.experts.down_proj", "text_moe.experts.gate_up_proj",
        "vision_moe.experts.down_proj", "vision_moe.experts.gate_up_proj"]
    assert config["rank_pattern"] == {"experts.gate_up_proj": 8} and config["alpha_pattern"] == {"experts.gate_up_proj": 16}
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.language_model.layers.1.mlp.vision_moe.experts.base_layer.lora_A.weight"
                   ].shape == (4 * 8, 64)              # (E * 2r, H)

    again = lora.load_adapter(build_pair(tmp_path / "vl2")[1], tmp_path / "adapter")
    assert {n: l.r for n, l in lora.lora_layers(again).items()} == {n: l.r for n, l in lora.lora_layers(kit).items()}
    assert lora.trainable_parameters(again) == lora.trainable_parameters(kit)
    with torch.no_grad():
        assert max_diff(again(**kit_inputs).logits, kit(**kit_inputs).logits) < TOL

    reference, fresh = build_pair(tmp_path / "vl3")
    made = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=[],
                                                target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    randomise_B(made, seed=3)
    made.save_pretrained(tmp_path / "peft")
    lora.load_adapter(fresh, tmp_path / "peft")
    layers = lora.lora_layers(fresh)
    assert len(layers) == 2 * 2 * 4 * 3 and {l.r for l in layers.values()} == {4}   # layers x groups x experts x 3
    assert torch.equal(layers["layers.2.mlp.experts.5.gate_proj"].lora_A.weight,  # peft's dense B_e: gate and up
                       layers["layers.2.mlp.experts.5.up_proj"].lora_A.weight)    # share the whole A_e
    with torch.no_grad():
        assert max_diff(fresh(**kit_inputs).logits, made.eval()(**reference_inputs).logits) < TOL


def test_vl_one_expert_group_one_parameter(tmp_path):
    """Only the vision experts' down_proj: one un-nested wrapper per layer (``vision_moe.experts``), no patterns."""
    from test_vl_model import build_pair

    reference, kit = build_pair(tmp_path / "vl")
    lora.apply_lora(kit, target_modules=[r"layers\.\d+\.mlp\.experts\.[4-7]\.down_proj"])
    kit_inputs, reference_inputs = vl_picture_inputs()
    peft_model, diff, effect = kit_adapter_in_peft(kit, reference, tmp_path / "adapter", kit_inputs, reference_inputs)
    assert peft_adapted(peft_model) == {f"model.language_model.layers.{i}.mlp.vision_moe.experts" for i in (1, 2)}
    assert diff < TOL and effect > 1e-3
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["vision_moe.experts.down_proj"] and config["rank_pattern"] == {}


@pytest.mark.parametrize("targets, adapted, lacking", [
    ([r"layers\.\d+\.mlp\.experts\.[0-2]\.(gate|up|down)_proj"], "layers.1.mlp.experts.0.gate_proj",
     "layers.1.mlp.experts.3.gate_proj"),                                   # 3 of the group's 4 experts
    ([r"layers\.\d+\.mlp\.experts\.\d+\.(gate|down)_proj"], "layers.1.mlp.experts.0.gate_proj",
     "layers.1.mlp.experts.0.up_proj"),                                     # gate without up
])
def test_vl_expert_adapters_peft_cannot_hold_are_refused(targets, adapted, lacking, tmp_path):
    from test_vl_model import build_pair

    kit = lora.apply_lora(build_pair(tmp_path / "vl")[1], target_modules=targets)
    with pytest.raises(InputError, match=re.escape(f"{adapted!r} has a LoRA but {lacking!r} has none")):
        lora.save_adapter(kit, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_fused_experts_of_a_layer_without_experts(tmp_path):
    """A fused expert adapter naming a dense layer (layer 0) or a group the model lacks: a ConfigError naming it."""
    from test_vl_model import build_pair

    kit = build_pair(tmp_path / "vl")[1]
    lora.save_adapter(lora.apply_lora(kit, target_modules=[r"layers\.\d+\.mlp\.experts\.[4-7]\.down_proj"]),
                      tmp_path / "adapter")
    edit_tensors(tmp_path / "adapter", lambda t: t.update(
        {k.replace("layers.1.", "layers.0."): t.pop(k) for k in list(t) if "layers.1." in k}))
    with pytest.raises(ConfigError, match=r"experts of layer 0 \(vision_moe\).*another base model"):
        lora.load_adapter(build_pair(tmp_path / "vl2")[1], tmp_path / "adapter")

"""LoRA: the kit's adapters are peft's adapters (both directions, dense and MoE), merge / unmerge /
disable agree, only A and B train, and bad adapters get clear errors."""

import json
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

    pixels = preprocess_images([picture(70, 100)])
    ids = image_prompt(pixels["image_grid_thw"].tolist())
    return {"input_ids": ids, **pixels}, reference_inputs(ids, **pixels)


@pytest.mark.parametrize("rows, in_peft", [
    (("attention",), {"model.language_model.layers.1.self_attn.q_proj"}),
    (("shared experts",), {"model.language_model.layers.1.mlp.shared_experts.gate_proj"}),
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


def test_vl_routed_experts_are_kit_only(tmp_path):
    """The row marked peft_loads=False: the kit saves and reloads it; peft on transformers' VL model drops it
    silently (its gate_proj / up_proj / down_proj targets land on the shared experts, with zero LoRAs and only a
    missing-keys warning), so the peft model computes the base model's logits."""
    from test_vl_model import build_pair

    assert not lora.LORA_TARGETS["VL routed experts"].peft_loads
    reference, kit = build_pair(tmp_path / "vl")
    lora.apply_lora(kit, target_modules=lora.LORA_TARGETS["VL routed experts"].kit)
    kit_inputs, reference_inputs = vl_picture_inputs()
    peft_model, diff, effect = kit_adapter_in_peft(kit, reference, tmp_path / "adapter", kit_inputs, reference_inputs)
    assert effect > 1e-2 and abs(diff - effect) < TOL   # peft's logits are the base model's: the adapter was lost
    assert any(".shared_experts." in n for n in peft_adapted(peft_model))
    again = lora.load_adapter(build_pair(tmp_path / "vl2")[1], tmp_path / "adapter")
    with torch.no_grad():
        assert max_diff(again(**kit_inputs).logits, kit(**kit_inputs).logits) < TOL

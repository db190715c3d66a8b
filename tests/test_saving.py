"""save_model writes the Hub layout: transformers loads it back and computes the same logits.

Dense, text MoE and vision-language models; each test changes a weight after loading so that it
cannot pass by re-reading the original checkpoint.
"""

import json

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

import ernie_lab

from conftest import reference_vl
from ernie_lab.model.rope3d import modality_types, routing_types
from ernie_lab.io.saving import save_model
from ernie_lab.io.image_processing import preprocess_images
from ernie_lab.model.vision import tokens_per_item
from ernie_lab.model.vl_model import TOKEN_IDS, VLConfig

IMG, IMG_START, IMG_END = (TOKEN_IDS[k] for k in ("image_token_id", "image_start_token_id", "image_end_token_id"))


def test_export_loads_in_transformers(tiny_checkpoint, tmp_path):
    ref, folder = tiny_checkpoint
    model = ernie_lab.load_model(folder)
    with torch.no_grad():  # change the weights so the test cannot pass by re-reading the original
        model.layers[0].mlp.up_proj.weight.mul_(1.5)
    save_model(model, tmp_path / "export")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(0, 1000, (2, 11))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max() < 1e-4
        assert (back(ids).logits - ref(ids).logits).abs().max() > 1e-3  # the change survived the trip


def test_sharded_export_round_trips(tiny_checkpoint, tmp_path):
    model = ernie_lab.load_model(tiny_checkpoint[1])
    save_model(model, tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = ernie_lab.load_model(tmp_path)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Ernie4_5ForCausalLM"]


# ----------------------------------------------------------------------------------------- text MoE
MOE = dict(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
           moe_num_shared_experts=2, moe_layer_start_index=1)


def test_moe_export_loads_in_transformers(tmp_path):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(0)
    ref = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**MOE)).eval()
    with torch.no_grad():  # transformers starts routers at zero: every token would tie
        for layer in ref.model.layers[1:]:
            layer.mlp.gate.weight.normal_(0.0, 0.3)
            layer.mlp.gate.moe_statics.e_score_correction_bias.uniform_(-0.04, 0.04)
    ref.save_pretrained(tmp_path / "reference")
    model = ernie_lab.load_model(tmp_path / "reference")
    with torch.no_grad():  # a different router: other experts win, so the logits must move
        model.layers[2].mlp.gate.weight.neg_()
    save_model(model, tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "ernie4_5_moe"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == "Ernie4_5_MoeForCausalLM"
    ids = torch.randint(0, MOE["vocab_size"], (2, 13))
    with torch.no_grad():
        assert (back(ids).logits - model(ids).logits).abs().max() < 1e-4
        assert (back(ids).logits - ref(ids).logits).abs().max() > 1e-3  # the change survived the trip


# ----------------------------------------------------------------------------------------- vision-language
def test_vl_config_round_trips_through_to_dict():
    ref = reference_vl()
    config = VLConfig.from_dict(json.loads(ref.config.to_json_string()))  # the config.json transformers writes
    written = config.to_dict()
    assert VLConfig.from_dict(json.loads(json.dumps(written))) == config
    assert written["text_config"]["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    # Baidu's flat layout comes out nested; the model it describes is the same
    flat = dict(architectures=["Ernie4_5_VLMoeForConditionalGeneration"], hidden_size=64, intermediate_size=96,
                num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                vocab_size=1000, moe_num_experts=[4, 4], moe_intermediate_size=[32, 16], moe_k=2,
                moe_num_shared_experts=1, moe_layer_start_index=2, rope_theta=10000, freq_allocation=8,
                im_patch_id=900, vision_config=dict(depth=2, hidden_size=32, num_heads=2))
    baidu = VLConfig.from_dict(flat)
    again = VLConfig.from_dict(baidu.to_dict())
    assert again.to_dict() == baidu.to_dict()
    assert (again.moe_layers, again.mrope_section, again.image_token_id) == ((False, False, True, True), (12, 12, 8), 900)
    assert (again.text.moe_intermediate_size, again.vision_moe_intermediate_size, again.vision) == (32, 16, baidu.vision)
    # transformers reads the same numbers from the nested dict
    from transformers import Ernie4_5_VLMoeConfig

    theirs = Ernie4_5_VLMoeConfig.from_dict(baidu.to_dict())
    assert theirs.text_config.mlp_layer_types == ["dense", "dense", "sparse", "sparse"]
    assert theirs.text_config.rope_parameters["mrope_section"] == [12, 12, 8]
    assert theirs.text_config.moe_intermediate_size == [32, 16] and theirs.image_token_id == 900


def test_vl_export_loads_in_transformers(tmp_path):
    from transformers import AutoModelForImageTextToText

    ref = reference_vl()
    ref.save_pretrained(tmp_path / "reference")
    model = ernie_lab.load_model(tmp_path / "reference")
    with torch.no_grad():  # a ViT weight: the export must carry the vision tower under its Hub name
        model.vision.blocks[0].mlp.fc1.weight.mul_(1.5)
    save_model(model, tmp_path / "export")
    back = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == "Ernie4_5_VLMoeForConditionalGeneration"

    pixels = preprocess_images([gradient_picture(70, 100)])
    n = tokens_per_item(pixels["image_grid_thw"])[0]
    ids = torch.tensor([[11, 12, IMG_START] + [IMG] * n + [IMG_END, 13, 14, 15]])
    reference_inputs = dict(input_ids=ids, mm_token_type_ids=modality_types(ids),
                            moe_mm_token_type_ids=routing_types(ids), **pixels)
    with torch.no_grad():
        ours = model(ids, **pixels).logits
        assert (back(**reference_inputs).logits - ours).abs().max() < 1e-4
        assert (ref(**reference_inputs).logits - ours).abs().max() > 1e-3  # the change survived the trip
    again = ernie_lab.load_model(tmp_path / "export")  # and ernie-lab reads its own export bit for bit
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def gradient_picture(height, width):
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(7).integers(0, 256, (height, width, 3))
    base = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], -1)
    return Image.fromarray((0.7 * base + 0.3 * noise).astype(np.uint8))

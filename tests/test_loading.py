"""load_model on good and broken checkpoints: Hub ids via the cache, clear errors, nothing half-loaded."""

import json
import shutil

import pytest
import torch

import ernie_lab
from ernie_lab import CheckpointError, ConfigError, InputError
from ernie_lab.io.loading import hub_to_lab, lab_to_hub

HUB_ID = "baidu/ERNIE-4.5-0.3B-PT"


@pytest.fixture()
def broken(tiny_checkpoint, tmp_path):
    """A writable copy of the tiny checkpoint to damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint[1], folder)
    return folder


def lay_out_hf_cache(hf_home, checkpoint, repo_id=HUB_ID, revision="0123456789abcdef0123456789abcdef01234567"):
    """The standard huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    shutil.copytree(checkpoint, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_name_map_round_trips():
    for hub in ["model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.weight",
                "model.layers.0.mlp.experts.12.down_proj.weight", "model.norm.weight", "lm_head.weight",
                "model.layers.3.post_attention_layernorm.weight"]:
        lab = hub_to_lab(hub)
        assert lab is not None and lab_to_hub(lab) == hub
    assert hub_to_lab("model.layers.2.self_attn.q_proj.weight") == "layers.2.attn.q_proj.weight"
    assert hub_to_lab("vision_model.blocks.0.attn.qkv.weight") is None


def test_hub_id_from_offline_cache(tiny_checkpoint, tmp_path, monkeypatch):
    ref, folder = tiny_checkpoint
    lay_out_hf_cache(tmp_path, folder)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model = ernie_lab.load_model(HUB_ID)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() < 1e-4


def test_hub_id_without_cache_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="HF_ENDPOINT") as err:
        ernie_lab.load_model(HUB_ID)
    assert HUB_ID in str(err.value) and "hf download" in str(err.value)


def test_paddle_layout_is_transposed_back(tiny_checkpoint, tmp_path):
    """-Paddle checkpoints keep Linear weights as (in, out) under an 'ernie.' prefix."""
    from safetensors.torch import load_file, save_file

    ref, folder = tiny_checkpoint
    tensors = load_file(folder / "model.safetensors")
    paddle = {}
    for name, t in tensors.items():
        is_linear = t.dim() == 2 and "embed_tokens" not in name
        paddle[name.replace("model.", "ernie.", 1)] = t.t().contiguous() if is_linear else t
    target = tmp_path / "ERNIE-4.5-tiny-Paddle"
    target.mkdir()
    save_file(paddle, target / "model.safetensors")
    shutil.copy(folder / "config.json", target / "config.json")
    model = ernie_lab.load_model(target)
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max() < 1e-4


def test_folder_without_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(ConfigError, match="No config.json"):
        ernie_lab.load_model(broken)


def test_not_a_folder_nor_hub_id(tmp_path):
    with pytest.raises(ConfigError, match="neither an existing folder nor a Hub id"):
        ernie_lab.load_model(tmp_path / "does not exist" / "x" / "y")


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_unknown_architecture(broken, model_type):
    cfg = json.loads((broken / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=["LlamaForCausalLM"])
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=f"model_type '{model_type}'"):
        ernie_lab.load_model(broken)


def test_config_not_json(broken):
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ernie_lab.load_model(broken)


def test_missing_shard(tmp_path):
    from conftest import reference_dense

    reference_dense(seed=4).save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=shards[1].name):
        ernie_lab.load_model(tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(broken, keep):
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ernie_lab.load_model(broken)


def test_garbage_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ernie_lab.load_model(broken)


def test_missing_tensor(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        ernie_lab.load_model(broken)


def test_wrong_shape(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj\.weight in model\.safetensors: shape \[7, 64\]"):
        ernie_lab.load_model(broken)


def test_config_of_another_size(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_hidden_layers"] = 5  # the weights have 3 layers
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing"):
        ernie_lab.load_model(broken)


def test_unexpected_tensor(broken):
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors["vision_model.patch_embed.weight"] = torch.zeros(3, 3)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="vision_model.patch_embed.weight"):
        ernie_lab.load_model(broken)


def test_mtp_tensors_are_skipped_with_one_message(broken, capsys):
    from safetensors.torch import load_file, save_file

    tensors = load_file(broken / "model.safetensors")
    tensors["model.mtp_block.0.input_layernorm.weight"] = torch.ones(64)
    tensors["model.mtp_linear_proj.0.weight"] = torch.ones(64, 128)
    save_file(tensors, broken / "model.safetensors")
    ernie_lab.load_model(broken)
    out = capsys.readouterr().out
    assert out.count("multi-token-prediction") == 1 and "2 tensors" in out


class TestBadInput:
    @pytest.fixture(scope="class")
    def model(self, tiny_checkpoint):
        return ernie_lab.load_model(tiny_checkpoint[1])

    def test_prompt_longer_than_context(self, tiny_checkpoint):
        cfg = json.loads((tiny_checkpoint[1] / "config.json").read_text())
        model = ernie_lab.ErnieForCausalLM(ernie_lab.ErnieConfig.from_dict({**cfg, "max_position_embeddings": 16}))
        with pytest.raises(InputError, match="exceed the model's context of 16"):
            model(torch.zeros(1, 17, dtype=torch.long))

    def test_float_ids(self, model):
        with pytest.raises(InputError, match="integer token ids"):
            model(torch.tensor([[1.0, 2.0]]))

    def test_out_of_vocab(self, model):
        with pytest.raises(InputError, match="token id 1000 is outside the vocabulary"):
            model(torch.tensor([[1, 1000]]))
        with pytest.raises(InputError, match="token id -1"):
            model(torch.tensor([[-1, 5]]))

    def test_one_dimensional_ids(self, model):
        with pytest.raises(InputError, match="2-D"):
            model(torch.tensor([1, 2, 3]))

    def test_list_instead_of_tensor(self, model):
        with pytest.raises(InputError, match="torch.LongTensor"):
            model([[1, 2, 3]])

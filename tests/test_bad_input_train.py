"""The bad-input catalogue of the training surfaces: LoRA adapters, SFT / DPO data, the Trainer's config,
checkpoints and resume, and real kills of every save.

Each case asserts one outcome, as tests/test_bad_input.py does for the loader: a specific ErnieLabError
subclass whose message names the argument, record, file or tensor; or the correct result. A refusal
leaves the model, the optimizer and the folder exactly as they were (:func:`unchanged`).
"""

import json
from pathlib import Path

import pytest
import torch

import ernie_lab
from conftest import MICRO_TEXT, kill_when, micro_model, refused, start_child

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models train on one thread
from ernie_lab import finetune as ft
from ernie_lab import finetune_data as fd
from ernie_lab import lora
from ernie_lab.errors import CheckpointError, ConfigError, ErnieLabError, InputError
from ernie_lab.model.config import ErnieConfig
from ernie_lab.train import STATE_FILE, TrainConfig, Trainer, checkpoints
from ernie_lab.train.trainer import TrainingDiverged

REPO = Path(__file__).resolve().parents[1]
TINY = MICRO_TEXT
IDS = torch.tensor([[1, 17, 9, 5]])


tiny_model = micro_model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def snapshot(model) -> dict:
    """Everything a refusal must leave alone: module types, tensors, requires_grad, lora_config."""
    return {"modules": [(n, type(m).__name__) for n, m in model.named_modules()],
            "tensors": {n: t.detach().clone() for n, t in model.state_dict().items()},
            "grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "lora_config": getattr(model, "lora_config", None)}


def unchanged(model, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "a refused call changed the model's modules"
    assert after["grad"] == before["grad"] and after["lora_config"] == before["lora_config"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), f"a refused call changed {name}"


def files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


def randomise_B(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def counting_data(index, rank=0, world_size=1):
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, 48, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids}


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "lr": 3e-3, "max_steps": 2, **overrides})


# =============================================================================================== adapters
@pytest.fixture()
def adapter(tmp_path):
    """(model with a trained-looking rank-4 adapter, its saved folder)."""
    model = lora.apply_lora(tiny_model(), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
    randomise_B(model)
    folder = lora.save_adapter(model, tmp_path / "adapter")
    return model, folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def edit_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})  # peft's own files carry no base fingerprint


def test_adapter_of_another_base_leaves_the_model_as_it_was_and_the_right_one_then_loads(adapter, tmp_path):
    other = lora.apply_lora(tiny_model(hidden_size=48, head_dim=12), r=4, alpha=8, target_modules=("q_proj",))
    wrong = lora.save_adapter(other, tmp_path / "other")
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, wrong), ConfigError, "another base model", "hidden_size 48")
    unchanged(model, before)
    edit_tensors(wrong, lambda t: None)  # no fingerprint: the shapes alone must catch it, before any wrapping
    refused(lambda: lora.load_adapter(model, wrong), CheckpointError, "q_proj", "do not fit", "another base model")
    unchanged(model, before)
    lora.load_adapter(model, adapter[1])
    assert torch.allclose(logits(model), logits(adapter[0]), atol=1e-6)


def test_wrong_shapes_of_one_layer_wrap_nothing(adapter):
    folder = adapter[1]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(folder, lambda t: t.update({key: t[key][:5].contiguous()}))
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, folder), CheckpointError, "layers.1.attn.v_proj", "do not fit")
    unchanged(model, before)
    assert not lora.lora_layers(model)


def test_unknown_target_names_in_the_file(adapter):
    edit_tensors(adapter[1], lambda t: t.update({"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight":
                                                 torch.zeros(4, 32),
                                                 "base_model.model.model.layers.0.self_attn.qkv_proj.lora_B.weight":
                                                 torch.zeros(32, 4)}))
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, adapter[1]), ConfigError, "qkv_proj")
    unchanged(model, before)


@pytest.mark.parametrize("changes, words", [
    ({"lora_alpha": None}, ["lora_alpha", "null"]),
    ({"lora_alpha": "16"}, ["lora_alpha", "'16'"]),
    ({"r": 0}, ["rank r", "0"]),
    ({"r": -4}, ["rank r", "-4"]),
    ({"r": 4.5}, ["rank r", "4.5"]),
    ({"lora_dropout": 2}, ["dropout", "2"]),
    ({"rank_pattern": {"q_proj": "x"}}, ["rank_pattern", "q_proj"]),
    ({"alpha_pattern": {"(": 4}}, ["alpha_pattern", "'('"]),
    ({"target_modules": 7}, ["target_modules", "7"]),
])
def test_bad_adapter_config_fields(adapter, changes, words):
    edit_config(adapter[1], **changes)
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, adapter[1]), ConfigError, "adapter_config.json", *words)
    unchanged(model, before)


@pytest.mark.parametrize("text, words", [("[1, 2]", ["JSON object", "list"]), ("{garbled", ["not valid JSON"]),
                                         (None, ["adapter_config.json is missing"])])
def test_missing_or_garbled_adapter_config(adapter, text, words):
    path = adapter[1] / "adapter_config.json"
    path.unlink() if text is None else path.write_text(text)
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, adapter[1]), ErnieLabError, *words)
    unchanged(model, before)


@pytest.mark.parametrize("damage, words", [("truncate", ["adapter_model.safetensors", "corrupt"]),
                                           ("missing", ["adapter_model.safetensors is missing"]),
                                           ("empty", ["holds no tensors"]),
                                           ("nan", ["NaN", "lora_A"]),
                                           ("integer", ["int64", "floating point"])])
def test_missing_truncated_empty_or_non_finite_weights(adapter, damage, words):
    path = adapter[1] / "adapter_model.safetensors"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "missing":
        path.unlink()
    elif damage == "empty":
        edit_tensors(adapter[1], lambda t: t.clear())
    elif damage == "nan":
        edit_tensors(adapter[1], lambda t: next(v for k, v in t.items() if "lora_A" in k).fill_(float("nan")))
    else:
        edit_tensors(adapter[1], lambda t: t.update({k: v.long() for k, v in t.items() if "lora_A" in k}))
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, adapter[1]), CheckpointError, *words)
    unchanged(model, before)


def test_adapter_folder_that_is_not_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    refused(lambda: lora.load_adapter(tiny_model(), tmp_path / "file"), CheckpointError, "file", "not a folder")
    refused(lambda: lora.load_adapter(tiny_model(), tmp_path / "nowhere"), CheckpointError, "nowhere")


def test_load_arguments_in_the_wrong_order(adapter):
    refused(lambda: lora.load_adapter(adapter[1], tiny_model()), InputError, "base model first")


def test_garbled_base_fingerprint_metadata(adapter):
    from safetensors.torch import load_file, save_file

    path = adapter[1] / "adapter_model.safetensors"
    save_file(load_file(path), path, metadata={"format": "pt", "ernie_lab_base": "{half"})
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, adapter[1]), CheckpointError, "ernie_lab_base")
    unchanged(model, before)


@pytest.mark.parametrize("kwargs, words", [
    (dict(r=0), ["rank r", "0"]), (dict(r=-2), ["rank r", "-2"]), (dict(r=True), ["rank r", "True"]),
    (dict(r=4.0), ["rank r", "4.0"]), (dict(alpha=None), ["alpha", "None"]), (dict(alpha="16"), ["alpha", "'16'"]),
    (dict(alpha=float("nan")), ["alpha", "nan"]), (dict(dropout=1.5), ["dropout", "1.5"]),
    (dict(target_modules=()), ["target_modules"]), (dict(target_modules=[3]), ["target_modules", "[3]"]),
    (dict(target_modules=("q_proj", "w_(")), ["target_modules", "w_("]),
])
def test_bad_apply_lora_settings_change_nothing(kwargs, words):
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.apply_lora(model, **kwargs), InputError, *words)
    unchanged(model, before)


def test_unknown_target_modules_change_nothing():
    model = tiny_model()
    before = snapshot(model)
    refused(lambda: lora.apply_lora(model, target_modules=("q_proj", "attention")), ConfigError, "attention",
            "q_proj")
    unchanged(model, before)


def test_apply_lora_twice_is_refused_and_changes_nothing():
    model = lora.apply_lora(tiny_model(), r=4)
    before = snapshot(model)
    refused(lambda: lora.apply_lora(model, r=8), InputError, "already has LoRA layers", "merge_lora")
    unchanged(model, before)


def test_merge_and_unmerge_twice_are_the_same_as_once(adapter):
    model = adapter[0]
    plain = logits(model)
    lora.merge_lora(model)
    merged = {n: p.detach().clone() for n, p in model.named_parameters()}
    lora.merge_lora(model)  # again: nothing more is added
    assert all(torch.equal(p, merged[n]) for n, p in model.named_parameters())
    lora.unmerge_lora(model)
    lora.unmerge_lora(model)
    assert torch.allclose(logits(model), plain, atol=1e-5)


def test_merge_or_unmerge_of_a_model_without_lora_layers(adapter):
    model = tiny_model()
    refused(lambda: lora.merge_lora(model), InputError, "merge_lora", "no LoRA layers")
    refused(lambda: lora.unmerge_lora(model), InputError, "unmerge_lora", "no LoRA layers")
    merged = lora.merge_lora(adapter[0], unload=True)
    refused(lambda: lora.merge_lora(merged, unload=True), InputError, "no LoRA layers")


def test_save_of_a_model_without_lora_layers_touches_no_folder(adapter, tmp_path):
    before = files(adapter[1])
    refused(lambda: lora.save_adapter(tiny_model(), adapter[1]), InputError, "no LoRA layers", "apply_lora")
    assert files(adapter[1]) == before
    refused(lambda: lora.save_adapter(tiny_model(), tmp_path / "new"), InputError, "no LoRA layers")
    assert not (tmp_path / "new").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_save_of_a_diverged_adapter_keeps_the_previous_one(adapter):
    model, folder = adapter
    before = files(folder)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("inf"))
    refused(lambda: lora.save_adapter(model, folder), InputError, "lora_B", "NaN or Inf")
    assert files(folder) == before


def test_load_into_a_model_with_other_adapters_changes_nothing(adapter):
    model = lora.apply_lora(tiny_model(), r=4, alpha=8, target_modules=("k_proj",))
    randomise_B(model, seed=3)
    before = snapshot(model)
    refused(lambda: lora.load_adapter(model, adapter[1]), CheckpointError, "k_proj", "other LoRA layers")
    unchanged(model, before)
    other_rank = lora.apply_lora(tiny_model(), r=2, alpha=8, target_modules=("q_proj", "v_proj"))
    before = snapshot(other_rank)
    refused(lambda: lora.load_adapter(other_rank, adapter[1]), CheckpointError, "do not fit", "fresh base model")
    unchanged(other_rank, before)


def test_same_adapter_loaded_twice_gives_the_same_model(adapter):
    model = lora.load_adapter(tiny_model(), adapter[1])
    once = logits(model)
    lora.load_adapter(model, adapter[1])
    assert torch.equal(logits(model), once) and torch.allclose(once, logits(adapter[0]), atol=1e-6)


# =============================================================================================== SFT / DPO data
@pytest.fixture(scope="module")
def tokenizer():
    from ernie_lab.tiny.tokenizer import TINY_TOKENIZER_DIR

    return ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)


def text_model():
    from conftest import SMALL_TEXT

    torch.manual_seed(0)
    return ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(SMALL_TEXT))


GOOD = [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "rosso."}]
PAIR = {"prompt": [{"role": "user", "content": "Colour?"}], "chosen": "rosso.", "rejected": "verde."}


@pytest.mark.parametrize("conversations, words", [
    ([[{"role": "user"}, {"role": "assistant", "content": "rosso."}]], ["conversations[0]", "message 0", "'content'"]),
    ([GOOD, [{"content": "hi"}, {"role": "assistant", "content": "x."}]], ["conversations[1]", "'role'"]),
    ([GOOD, [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x."}]], ["conversations[1]", "'bot'"]),
    ([[{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "  "}]], ["conversations[0]", "empty"]),
    ([[{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": 3}]], ["conversations[0]", "int"]),
    ([[{"role": "user", "content": "Colour?"}]], ["conversations[0]", "end with an assistant"]),
    ([], ["conversations", "empty"]),
    (GOOD, ["one conversation's messages", "[messages]"]),
    ("rosso", ["list of conversations", "str"]),
    ([{"scene": 1}], ["conversations[0]", "'scene'"]),
])
def test_bad_sft_data_is_named_before_training(tokenizer, conversations, words):
    model = text_model()
    before = snapshot(model)
    refused(lambda: ft.sft(model, tokenizer, conversations, ft.sft_config(max_steps=1)), InputError, *words)
    unchanged(model, before)


def test_sft_takes_the_records_instruction_set_returns(tokenizer):
    records = fd.instruction_set(4, language="english")
    model = lora.apply_lora(text_model(), r=2, alpha=4)
    history = ft.sft(model, tokenizer, records, ft.sft_config(max_steps=1), batch_size=2)
    by_messages = ft.sft_batches(tokenizer, [r["messages"] for r in records], 2)(0)
    by_records = ft.sft_batches(tokenizer, records, 2)(0)
    assert all(torch.equal(by_records[k], by_messages[k]) for k in by_messages)
    assert len(history) == 1 and history[0]["loss"] == history[0]["loss"]


@pytest.mark.parametrize("pairs, words", [
    ([PAIR, {"prompt": PAIR["prompt"], "chosen": "rosso."}], ["pairs[1]", "'rejected'"]),
    ([{"chosen": "a.", "rejected": "b."}], ["pairs[0]", "'prompt'"]),
    ([{**PAIR, "rejected": "rosso."}], ["pairs[0]", "same reply", "rosso."]),
    ([{**PAIR, "chosen": ""}], ["pairs[0] (chosen)", "empty"]),
    ([{**PAIR, "rejected": None}], ["pairs[0]", "'rejected'", "NoneType"]),
    ([{**PAIR, "prompt": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "x"}]}],
     ["pairs[0]", "ends with an assistant"]),
    ([{**PAIR, "prompt": [{"role": "user"}]}], ["pairs[0] (chosen)", "'content'"]),
    ([], ["pairs is empty"]),
    (["rosso"], ["pairs[0]", "str"]),
])
def test_bad_dpo_pairs_are_named_before_training(tokenizer, pairs, words):
    model = lora.apply_lora(text_model(), r=2, alpha=4)
    before = snapshot(model)
    refused(lambda: ft.dpo(model, tokenizer, pairs, ft.sft_config(max_steps=1)), InputError, *words)
    unchanged(model, before)


def test_dpo_takes_a_str_prompt_as_one_user_turn(tokenizer):
    as_text = ft.dpo_batches(tokenizer, [{**PAIR, "prompt": "Colour?"}], 1)(0)
    as_messages = ft.dpo_batches(tokenizer, [PAIR], 1)(0)
    assert all(torch.equal(as_text[k], as_messages[k]) for k in as_messages)


@pytest.mark.parametrize("call, words", [
    (lambda tok: ft.sft_batches(tok, [GOOD], batch_size=0), ["batch_size", "0"]),
    (lambda tok: ft.sft_batches(tok, [GOOD], batch_size=-3), ["batch_size", "-3"]),
    (lambda tok: ft.dpo_batches(tok, [PAIR], batch_size=0), ["batch_size", "0"]),
    (lambda tok: ft.dpo(lora.apply_lora(text_model(), r=2), tok, [PAIR], beta=0), ["beta", "0"]),
    (lambda tok: ft.dpo(text_model(), tok, [PAIR]), ["apply_lora", "add_reference_logps"]),
    (lambda tok: ft.train_steps(text_model(), ft.sft_batches(tok, [GOOD]), steps=0), ["steps", "0"]),
    (lambda tok: ft.train_steps(text_model(), ft.sft_batches(tok, [GOOD]), steps=2, log_every=0), ["log_every"]),
    (lambda tok: ft.train_steps(text_model(), [GOOD], steps=2), ["batches", "callable"]),
    (lambda tok: fd.instruction_set(3, split="test"), ["split", "'test'"]),
    (lambda tok: fd.instruction_set("3"), ["count", "'3'"]),
    (lambda tok: fd.preference_pairs(2, max_shapes=0), ["max_shapes", "0"]),
])
def test_bad_fine_tuning_arguments(tokenizer, call, words):
    refused(lambda: call(tokenizer), InputError, *words)


# =============================================================================================== the Trainer
def test_lr_as_yaml_reads_it_is_a_number():
    import yaml

    settings = yaml.safe_load("lr: 3e-4\nmax_steps: 2\nprogress: false\n")
    assert settings["lr"] == "3e-4"  # YAML 1.1 reads a float without a dot as a string
    config = TrainConfig(**settings)
    assert config.lr == 3e-4 and isinstance(config.lr, float)
    a, b = tiny_model(), tiny_model()
    Trainer(a, counting_data, config).fit()
    Trainer(b, counting_data, quiet(lr=3e-4)).fit()
    assert torch.equal(logits(a), logits(b))


@pytest.mark.parametrize("settings, words", [
    (dict(lr="fast"), ["lr", "'fast'"]), (dict(lr=float("nan")), ["lr", "nan"]), (dict(lr=0), ["lr must be > 0"]),
    (dict(max_steps=0), ["max_steps", "0"]), (dict(max_steps=-5), ["max_steps", "-5"]),
    (dict(max_steps="10"), ["max_steps", "integer", "'10'"]),
    (dict(warmup_steps=20, max_steps=10), ["warmup_steps (20)", "max_steps=10"]),
    (dict(grad_accum_steps=0), ["grad_accum_steps", "0"]), (dict(keep_last=-1), ["keep_last", "-1"]),
    (dict(checkpoint_every=-2), ["checkpoint_every"]), (dict(betas=(0.9,)), ["betas"]),
    (dict(betas=(0.9, 1.5)), ["betas"]), (dict(eps=0), ["eps"]), (dict(lr_scale=["vision"]), ["lr_scale"]),
    (dict(frozen_steps={"vision": "soon"}), ["frozen_steps"]), (dict(keep_checkpoints_at=["x"]), ["keep_checkpoints_at"]),
    (dict(weight_decay=True), ["weight_decay", "True"]), (dict(out_dir=5), ["out_dir", "5"]),
])
def test_bad_train_config_values(settings, words):
    refused(lambda: TrainConfig(**settings), ConfigError, "TrainConfig", *words)


def test_unknown_config_keys_are_named_with_a_suggestion():
    refused(lambda: TrainConfig(learning_rate=1e-3), ConfigError, "'learning_rate'", "settings")
    refused(lambda: TrainConfig(max_step=10), ConfigError, "'max_step'", "did you mean 'max_steps'")
    refused(lambda: ft.sft_config(warmup=3), ConfigError, "'warmup'", "warmup_steps")


def test_config_as_a_dict_and_paths_as_folders(tmp_path):
    trainer = Trainer(tiny_model(), counting_data, {"max_steps": 1, "progress": False, "out_dir": tmp_path, "lr": 3e-3,
                                                     "checkpoint_every": 1})
    trainer.fit()
    resumed = Trainer(tiny_model(seed=1), counting_data, quiet(max_steps=1, out_dir=tmp_path, resume_from="latest"))
    assert resumed.step == 1 and isinstance(resumed.config.out_dir, str)
    refused(lambda: Trainer(tiny_model(), counting_data, "fast"), InputError, "TrainConfig", "str")


@pytest.mark.parametrize("data, words", [
    (lambda i, r, w: {"input_ids": torch.zeros(0, 8, dtype=torch.long)}, ["train_data(0, 0, 1)", "(0, 8)", "batch size 0"]),
    (lambda i, r, w: None, ["train_data(0, 0, 1)", "NoneType"]),
    (lambda i, r, w: {"input_ids": torch.full((2, 8), 99)}, ["train_data(0, 0, 1)", "input_ids", "0 .. 63"]),
    (lambda i, r, w: {"input_ids": torch.ones(2, 8).long(), "labels": torch.ones(2, 7).long()},
     ["train_data(0, 0, 1)", "labels", "(2, 7)"]),
    (lambda i, r, w: {"input_ids": torch.ones(2, 8)}, ["train_data(0, 0, 1)", "input_ids", "integer", "float32"]),
    (lambda i, r, w: {"input_ids": torch.ones(2, 8).long(), "labels": torch.full((2, 8), -100)},
     ["step 0", "no batch", "target"]),
])
def test_bad_batches_are_named_and_change_nothing(data, words):
    model = tiny_model()
    before = snapshot(model)
    trainer = Trainer(model, data, quiet())
    optimizer = json.dumps(trainer.optimizer.state_dict()["param_groups"])
    refused(trainer.fit, InputError, *words)
    unchanged(model, before)
    assert trainer.step == 0 and json.dumps(trainer.optimizer.state_dict()["param_groups"]) == optimizer
    assert not trainer.optimizer.state_dict()["state"]


def test_frozen_model_and_wrong_model_type():
    refused(lambda: Trainer(tiny_model().requires_grad_(False), counting_data, quiet()), InputError, "frozen")
    refused(lambda: Trainer("model", counting_data, quiet()), InputError, "model", "str")


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "runs").write_text("")
    refused(lambda: Trainer(tiny_model(), counting_data, quiet(out_dir=str(tmp_path / "runs"), checkpoint_every=1)),
            ConfigError, "out_dir", "runs", "is a file")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_nan_stops_the_run_with_the_step_and_keeps_the_last_checkpoint(tmp_path, poison):
    def data(index, rank, world_size):
        return counting_data(index)

    model = tiny_model()
    trainer = Trainer(model, data, quiet(max_steps=5, checkpoint_every=1, out_dir=str(tmp_path)))
    trainer.config.max_steps = 2
    trainer.fit()
    good = {n: t.clone() for n, t in model.state_dict().items()}
    saved = files(tmp_path / "step-2")
    trainer.config.max_steps = 5
    if poison == "loss":
        with torch.no_grad():
            model.layers[0].mlp.down_proj.weight.fill_(float("nan"))  # the forward gives NaN
        good = {n: t.clone() for n, t in model.state_dict().items()}
    else:
        hook = model.layers[1].mlp.up_proj.weight.register_hook(lambda g: g * float("inf"))
    message = refused(trainer.fit, TrainingDiverged, "step 3", "lr", "step-2")
    assert ("loss is nan" in message) if poison == "loss" else ("grad_norm is" in message)
    assert isinstance(TrainingDiverged("x"), (InputError, FloatingPointError))
    assert trainer.step == 2 and [s for s, _ in checkpoints(tmp_path)] == [1, 2]
    assert files(tmp_path / "step-2") == saved
    now = model.state_dict()
    assert all(torch.equal(now[n], t, ) or (t.isnan().all() and now[n].isnan().all()) for n, t in good.items())
    if poison == "gradient":
        hook.remove()
        fresh = Trainer(tiny_model(seed=3), data, quiet(max_steps=5, out_dir=str(tmp_path), resume_from="latest"))
        fresh.fit()
        assert fresh.step == 5


@pytest.fixture()
def checkpoint(tmp_path):
    """A step-2 checkpoint of a run with lr_scale, and its trainer's config."""
    settings = dict(max_steps=4, lr_scale={"layers.1": 0.5}, checkpoint_every=2, out_dir=str(tmp_path / "run"))
    trainer = Trainer(tiny_model(), counting_data, quiet(**settings))
    trainer.config.max_steps = 2
    trainer.fit()
    return tmp_path / "run" / "step-2", settings


def resume_refused(folder, settings, error, *words):
    model = tiny_model(seed=5)
    before = snapshot(model)
    trainer = Trainer(model, counting_data, quiet(**settings))
    optimizer = json.dumps(trainer.optimizer.state_dict()["param_groups"])
    refused(lambda: trainer.resume(folder), error, *words)
    unchanged(model, before)
    assert trainer.step == 0 and trainer.history == []
    assert json.dumps(trainer.optimizer.state_dict()["param_groups"]) == optimizer


@pytest.mark.parametrize("change, words", [
    (dict(lr_scale={"layers.1": 0.25}), ["lr_scale", "0.5", "0.25"]),
    (dict(lr_scale={}), ["lr_scale"]),
    (dict(lr=1e-2), ["lr=0.003", "lr=0.01"]),
    (dict(warmup_steps=1), ["warmup_steps=0", "warmup_steps=1"]),
    (dict(weight_decay=0.0), ["weight_decay"]),
    (dict(grad_accum_steps=2), ["grad_accum_steps"]),
])
def test_resume_with_changed_settings_is_refused(checkpoint, change, words):
    folder, settings = checkpoint
    resume_refused(folder, {**settings, **change}, CheckpointError, STATE_FILE, *words)


def test_resume_may_change_max_steps_and_logging(checkpoint):
    folder, settings = checkpoint
    trainer = Trainer(tiny_model(seed=5), counting_data, quiet(**{**settings, "max_steps": 6, "log_every": 2}))
    trainer.resume(folder)
    assert trainer.step == 2
    trainer.fit()
    assert trainer.step == 6


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["truncated or damaged"]), ("garble", ["truncated or damaged"]), ("not-a-state", ["not a trainer state"]),
    ("bad-rng", ["random number generator"]), ("bad-optimizer", ["damaged"]),
])
def test_damaged_trainer_state_changes_nothing(checkpoint, damage, words):
    folder, settings = checkpoint
    path = folder / STATE_FILE
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garble":
        path.write_bytes(b"\x00garbage" * 100)
    else:
        state = torch.load(path, weights_only=True)
        if damage == "not-a-state":
            state = {"weights": torch.zeros(3)}
        elif damage == "bad-rng":
            state["rng"]["python"] = [3, [1, 2], None]
        else:
            state["optimizer"] = [1, 2]
        torch.save(state, path)
    resume_refused(folder, settings, CheckpointError, STATE_FILE, *words)


def test_resume_from_a_folder_that_is_not_a_checkpoint(tmp_path, checkpoint):
    _, settings = checkpoint
    resume_refused(tmp_path / "nowhere", settings, CheckpointError, "nowhere", "not a folder")
    ernie_lab.save_model(tiny_model(), tmp_path / "plain")
    resume_refused(tmp_path / "plain", settings, CheckpointError, "plain", STATE_FILE, "load_model")
    other = Trainer(tiny_model(num_hidden_layers=3), counting_data, quiet(max_steps=1, checkpoint_every=1,
                                                                           out_dir=str(tmp_path / "deep")))
    other.fit()
    resume_refused(tmp_path / "deep" / "step-1", settings, CheckpointError, "different model", "layers.2")


def test_adapter_checkpoint_resume_refusals_leave_the_adapter(tmp_path, tokenizer):
    config = ft.sft_config(max_steps=1, checkpoint_every=1, out_dir=str(tmp_path), lr=1e-2)
    ft.sft(lora.apply_lora(text_model(), r=2, alpha=4), tokenizer, [GOOD], config, batch_size=1)
    model = lora.apply_lora(text_model(), r=2, alpha=4)
    before = snapshot(model)
    changed = ft.sft_config(max_steps=2, lr=5e-2)
    refused(lambda: ft.FineTuner(model, ft.sft_batches(tokenizer, [GOOD], 1), changed).resume(tmp_path / "step-1"),
            CheckpointError, "lr=0.01", "lr=0.05")
    unchanged(model, before)
    same = ft.FineTuner(model, ft.sft_batches(tokenizer, [GOOD], 1), ft.sft_config(max_steps=2, lr=1e-2))
    assert same.resume(tmp_path / "step-1").step == 1


# =============================================================================================== real kills
KILLED_ADAPTER_SAVE = """
import sys, time, safetensors.torch, torch
from ernie_lab import lora
from test_bad_input_train import randomise_B, tiny_model
model = lora.apply_lora(tiny_model(), r=4, alpha=8, target_modules=("q_proj", "v_proj"))
randomise_B(model, seed=int(sys.argv[2]))
save_file = safetensors.torch.save_file
def slow_save_file(tensors, path, metadata=None):
    save_file(tensors, path, metadata=metadata)    # the new weights are half-way into the hidden folder
    time.sleep(60)
safetensors.torch.save_file = slow_save_file
print("ready", flush=True)
lora.save_adapter(model, sys.argv[1])
"""


def test_adapter_save_killed_midway_leaves_the_previous_adapter(adapter, tmp_path):
    model, folder = adapter
    before = files(folder)
    process = start_child(KILLED_ADAPTER_SAVE, folder, 7)
    kill_when(process, lambda: any(tmp_path.glob(".adapter.partial-*/adapter_model.safetensors")),
              "it wrote the new weights")
    assert files(folder) == before
    loaded = lora.load_adapter(tiny_model(), folder)
    assert torch.allclose(logits(loaded), logits(model), atol=1e-6)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".adapter.partial-")]  # hidden leftover
    lora.save_adapter(model, folder)  # the next save sweeps it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


KILLED_CHECKPOINT = """
import sys, time, torch
from ernie_lab import atomic
from ernie_lab.train import Trainer
from test_bad_input_train import counting_data, quiet, tiny_model
trainer = Trainer(tiny_model(seed=9), counting_data, quiet(max_steps=4, checkpoint_every=1, out_dir=sys.argv[1]))
trainer.step = int(sys.argv[2])
sync_folder = atomic.sync_folder
def slow_sync(folder, files=True):
    sync_folder(folder, files)
    if files:
        time.sleep(60)                             # everything written, not yet swapped into place
atomic.sync_folder = slow_sync
print("ready", flush=True)
trainer.save_checkpoint()
"""


@pytest.mark.parametrize("step", [2, 3])
def test_checkpoint_save_killed_midway_keeps_the_previous_one_and_it_resumes(tmp_path, step):
    """step 2: the kill overwrites the existing step-2; step 3: it writes a new one. Either way step-2 is
    the latest checkpoint afterwards, byte for byte, and a new Trainer resumes from it."""
    out = tmp_path / "run"
    first = Trainer(tiny_model(), counting_data, quiet(max_steps=4, checkpoint_every=1, out_dir=str(out)))
    first.config.max_steps = 2
    first.fit()
    weights = logits(first.model)
    before = files(out / "step-2")
    process = start_child(KILLED_CHECKPOINT, out, step)
    kill_when(process, lambda: any(p.name.startswith(f".step-{step}.partial-") and (p / STATE_FILE).is_file()
                                   for p in out.iterdir()), "it wrote the checkpoint")
    assert files(out / "step-2") == before and [s for s, _ in checkpoints(out)] == [1, 2]
    resumed = Trainer(tiny_model(seed=4), counting_data, quiet(max_steps=4, checkpoint_every=1, out_dir=str(out),
                                                               resume_from="latest"))
    assert resumed.step == 2 and torch.equal(logits(resumed.model), weights)
    resumed.fit()
    assert [s for s, _ in checkpoints(out)] == [1, 2, 3, 4]
    assert all(p.name.startswith(f".step-{step}.partial-") for p in out.iterdir() if not p.name.startswith("step-"))


def test_save_checkpoint_without_out_dir():
    trainer = Trainer(tiny_model(), counting_data, quiet())
    refused(trainer.save_checkpoint, ConfigError, "out_dir", "save_checkpoint")


def test_sft_batches_given_to_dpo_with_an_odd_row_count(tokenizer):
    model = lora.apply_lora(text_model(), r=2, alpha=4)
    before = snapshot(model)
    refused(lambda: ft.train_steps(model, ft.sft_batches(tokenizer, [GOOD], batch_size=3), steps=1, objective="dpo"),
            InputError, "3 rows", "dpo_batches")
    unchanged(model, before)

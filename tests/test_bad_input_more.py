"""The red-team catalogue: misuses the first bad-input pass did not cover.

Each case asserts one outcome, as the other tests/test_bad_input_*.py do: a specific ErnieLabError whose
message names the culprit, or the correct result; and a refused save leaves every file where it was.
"""

from pathlib import Path

import pytest
import torch

import ernie_lab
from conftest import MICRO_TEXT, micro_model, refused

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models train on one thread
from ernie_lab import lora
from ernie_lab.errors import InputError

TINY = MICRO_TEXT


tiny_model = micro_model


def adapted():
    return lora.apply_lora(tiny_model(), r=2, target_modules=("q_proj",))


def files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# ====================================================================== saves that would destroy a workspace
@pytest.mark.parametrize("where", ["", ".", "..", "cwd"])
def test_a_save_into_the_current_folder_or_above_it_is_refused_and_deletes_nothing(tmp_path, monkeypatch, where):
    """save_adapter(model, "") once swapped the whole working folder (a git checkout) for the adapter."""
    work = tmp_path / "project" / "notebooks"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("precious")
    (work.parent / "README.md").write_text("also precious")
    monkeypatch.chdir(work)
    before = files(tmp_path)
    target = str(work) if where == "cwd" else where
    refused(lambda: lora.save_adapter(adapted(), target), InputError, "current folder", "new folder")
    refused(lambda: ernie_lab.save_model(tiny_model(), target), InputError, "current folder")
    assert files(tmp_path) == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["project", "notebooks", "notes.txt", "README.md"])


def test_a_save_over_a_git_repository_is_refused(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / "code.py").write_text("x = 1")
    before = files(tmp_path)
    refused(lambda: lora.save_adapter(adapted(), repo), InputError, "git repository", str(repo))
    refused(lambda: ernie_lab.save_model(tiny_model(), repo), InputError, "git repository")
    assert files(tmp_path) == before


def test_save_adapter_over_a_folder_with_other_files_keeps_them(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    model = adapted()
    lora.save_adapter(model, folder)
    lora.save_adapter(model, folder)   # and again, over its own earlier save
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "adapter_config.json",
                                                        "adapter_model.safetensors"]
    assert (folder / "README.md").read_text() == "my notes"
    fresh = lora.load_adapter(tiny_model(), folder)
    assert torch.equal(fresh(torch.tensor([[1, 2, 3]])).logits, model(torch.tensor([[1, 2, 3]])).logits)


@pytest.mark.parametrize("folder", [None, 3, ["a"]])
def test_save_adapter_folder_that_is_not_a_path(folder):
    refused(lambda: lora.save_adapter(adapted(), folder), InputError, "folder must be a path",
            type(folder).__name__)


# ====================================================================== the model, tokenizer and names swapped
@pytest.fixture(scope="module")
def tokenizer():
    from ernie_lab.tiny.tokenizer import TINY_TOKENIZER_DIR

    return ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)


CONVERSATION = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]


@pytest.mark.parametrize("call", ["apply_lora", "merge_lora", "unmerge_lora"])
@pytest.mark.parametrize("thing", [None, "baidu/ERNIE-4.5-0.3B-PT"])
def test_lora_functions_given_something_that_is_not_a_model(call, thing):
    refused(lambda: getattr(lora, call)(thing), InputError, call, type(thing).__name__)


def test_lora_functions_given_the_tokenizer(tokenizer):
    refused(lambda: lora.apply_lora(tokenizer), InputError, "apply_lora", "ErnieTokenizer")


@pytest.mark.parametrize("call, flag", [(lambda m: lora.apply_lora(m, vision="yes"), "vision"),
                                        (lambda m: lora.merge_lora(m, unload="yes"), "unload")])
def test_lora_flags_must_be_bool_and_change_nothing(call, flag):
    model = adapted() if flag == "unload" else tiny_model()
    kinds = [(n, type(m).__name__) for n, m in model.named_modules()]
    refused(lambda: call(model), InputError, flag, "True or False")
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == kinds
    assert not any(layer.merged for layer in lora.lora_layers(model).values())


@pytest.mark.parametrize("folder", [None, 3])
def test_load_adapter_folder_that_is_not_a_path(folder):
    model = tiny_model()
    refused(lambda: lora.load_adapter(model, folder), InputError, "adapter folder", type(folder).__name__)
    assert not lora.lora_layers(model)


def test_sft_with_model_and_tokenizer_swapped_or_a_tokenizer_twice(tokenizer):
    from ernie_lab import finetune as ft

    refused(lambda: ft.sft(tokenizer, tokenizer, CONVERSATION), InputError, "sft", "model", "ErnieTokenizer")
    refused(lambda: ft.sft(tiny_model(), tiny_model(), CONVERSATION), InputError, "tokenizer", "ErnieForCausalLM")
    refused(lambda: ft.dpo(tokenizer, tokenizer, [{"prompt": "a", "chosen": "b", "rejected": "c"}]), InputError,
            "dpo", "model", "ErnieTokenizer")
    refused(lambda: ft.dpo_batches(tiny_model(), [{"prompt": "a", "chosen": "b", "rejected": "c"}]), InputError,
            "tokenizer", "ErnieForCausalLM")


@pytest.mark.parametrize("seed", [None, "0", 1.5, True])
def test_fine_tuning_seed_that_is_not_an_integer_is_refused_at_once(tokenizer, seed):
    """It used to pass, then fail with a TypeError inside the first batch of the run."""
    from ernie_lab import finetune as ft

    refused(lambda: ft.sft_batches(tokenizer, CONVERSATION, seed=seed), InputError, "seed", repr(seed))
    refused(lambda: ft.dpo_batches(tokenizer, [{"prompt": "a", "chosen": "b", "rejected": "c"}], seed=seed),
            InputError, "seed")


@pytest.mark.parametrize("name", [None, 5, ["01.causal_mask"], b"01.causal_mask"])
def test_exercise_name_that_is_not_a_string(name, capsys):
    from ernie_lab import exercises

    refused(lambda: exercises.check(name, 1), InputError, "exercise name", "string", type(name).__name__)
    refused(lambda: exercises.get(name), InputError, "exercise name")


# ====================================================================== training settings and resume
def counting_data(index, rank=0, world_size=1):
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, 48, (2, 8), generator=g)
    return {"input_ids": ids, "labels": ids}


@pytest.mark.parametrize("setting", ["lr_scale", "frozen_steps"])
@pytest.mark.parametrize("part", ["layer.1", "layers.1.at", "vision"])
def test_lr_scale_or_frozen_steps_naming_no_parameter_is_refused(setting, part):
    """A typo used to train that part at the full rate without a word."""
    from ernie_lab.errors import ConfigError
    from ernie_lab.train import TrainConfig, Trainer

    config = TrainConfig(progress=False, max_steps=2, **{setting: {part: 1 if setting == "frozen_steps" else 0.5}})
    refused(lambda: Trainer(tiny_model(), counting_data, config), ConfigError, setting, repr(part), "layers")


def test_lr_scale_of_a_real_part_still_works():
    from ernie_lab.train import TrainConfig, Trainer

    trainer = Trainer(tiny_model(), counting_data, TrainConfig(progress=False, max_steps=1, lr_scale={"layers.1": 0.5}))
    assert {group.get("part") for group in trainer.optimizer.param_groups} == {"", "layers.1"}


@pytest.mark.parametrize("folder", [None, 2])
def test_resume_from_something_that_is_not_a_path(folder):
    from ernie_lab.train import TrainConfig, Trainer

    trainer = Trainer(tiny_model(), counting_data, TrainConfig(progress=False, max_steps=1))
    refused(lambda: trainer.resume(folder), InputError, "checkpoint folder", type(folder).__name__)
    assert trainer.step == 0


@pytest.mark.parametrize("batches", [torch.ones(2, 4, dtype=torch.long), {"input_ids": torch.ones(2, 4)}, "x"])
def test_from_batches_of_one_batch_or_a_tensor(batches):
    from ernie_lab.train import from_batches

    refused(lambda: from_batches(batches), InputError, "list of batch", type(batches).__name__)


# ====================================================================== text the tokenizer cannot hold
def test_text_with_a_lone_surrogate_is_named_not_a_sentencepiece_error(tokenizer):
    text = "caf\u00e9 \ud83d and more"
    refused(lambda: tokenizer.encode(text), InputError, "surrogate", "character 5")
    refused(lambda: ernie_lab.chat(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, text, max_new_tokens=1),
            InputError, "surrogate")
    assert tokenizer.encode("caf\u00e9 \U0001f600") == tokenizer.encode("caf\u00e9 \U0001f600")  # a real emoji is fine


# ====================================================================== generate's extra inputs, quant helpers
@pytest.mark.parametrize("extra, words", [({"max_length": 5}, ["max_length", "max_new_tokens"]),
                                          ({"pixel_values": torch.zeros(4, 588)}, ["pixel_values", "VL model"])])
def test_generate_with_inputs_the_model_does_not_take(extra, words):
    refused(lambda: ernie_lab.generate(tiny_model(), [[1, 2]], 1, **extra), InputError, *words)


@pytest.mark.parametrize("call", ["weight_bytes", "quantized_layers"])
@pytest.mark.parametrize("thing", [None, "model-folder"])
def test_quant_helpers_given_something_that_is_not_a_model(call, thing):
    from ernie_lab import quant

    refused(lambda: getattr(quant, call)(thing), InputError, call, type(thing).__name__)


# ====================================================================== the explorer's helpers
@pytest.mark.parametrize("count", [-1, 10**4, 2.0, True, None])
def test_bundled_images_count_out_of_range(count):
    from ernie_lab.analysis import widgets

    refused(lambda: widgets.bundled_images(count), InputError, "count", repr(count))


@pytest.mark.parametrize("content", ["iVBORw0KGgo=", 12, [1, 2]])
def test_upload_content_that_is_not_bytes(content):
    from ernie_lab.analysis import widgets

    refused(lambda: widgets.upload_picture("cat.png", content), InputError, "cat.png", "bytes", type(content).__name__)


def test_selected_row_of_what_is_not_a_view():
    from ernie_lab.analysis import widgets

    refused(lambda: widgets.selected_row(None, "token strip"), InputError, "widgets.View", "str")


@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_dpo_pair_with_an_empty_str_prompt_is_named(tokenizer, prompt):
    from ernie_lab import finetune as ft

    refused(lambda: ft.dpo_batches(tokenizer, [{"prompt": "hi", "chosen": "a", "rejected": "b"},
                                              {"prompt": prompt, "chosen": "a", "rejected": "b"}]),
            InputError, "pairs[1]", "'prompt' is empty")


def test_vision_lora_on_a_text_model_is_refused_and_changes_nothing():
    """It used to adapt the text layers only, as if vision=True had not been asked for."""
    model = tiny_model()
    refused(lambda: lora.apply_lora(model, vision=True), InputError, "vision=True", "no vision tower")
    assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())

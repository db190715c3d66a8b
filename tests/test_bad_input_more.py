"""The red-team catalogue: misuses the first bad-input pass did not cover.

Each case asserts one outcome, as the other tests/test_bad_input_*.py do: a specific ErnieLabError whose
message names the culprit, or the correct result; and a refused save leaves every file where it was.
"""

import os
from pathlib import Path

import pytest
import torch

import ernie_lab
from ernie_lab import lora
from ernie_lab.errors import InputError
from ernie_lab.model.config import ErnieConfig

TINY = dict(model_type="ernie4_5", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0, **overrides):
    return ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict({**TINY, **overrides})).init_weights(seed=seed)


def adapted():
    return lora.apply_lora(tiny_model(), r=2, target_modules=("q_proj",))


def refused(call, error: type, *words: str) -> str:
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, ernie_lab.ErnieLabError)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    return message


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

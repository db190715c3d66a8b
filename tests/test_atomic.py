"""One atomic write (ernie_lab.atomic): a write stopped at any step leaves the previous version loadable.

A kill is simulated by making one step of the write fail: the block itself (files half-written), linking
the old folder's other files, flushing, the swap. Each time the previous model still loads, and a trainer
checkpoint still resumes the same curve. (tests/test_bad_input.py SIGKILLs a real save as well.)
"""

import json
from pathlib import Path

import pytest
import torch

import ernie_lab
from conftest import MICRO_TEXT, micro_model
from ernie_lab import atomic
from ernie_lab.atomic import atomic_file, atomic_folder
from ernie_lab.io.saving import save_model
from ernie_lab.train import STATE_FILE, TrainConfig, Trainer, checkpoints

TINY = MICRO_TEXT
IDS = torch.tensor([[1, 17, 9, 5]])
STEPS = ("block", "link_entries", "sync_folder", "exchange")  # where a folder write can stop


class Killed(Exception):
    """Stands for the process dying at that point."""


tiny_model = micro_model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits


def dies(step: str):
    def killed(*args, **kwargs):
        raise Killed(step)
    return killed


def kill_at(step: str, monkeypatch) -> None:
    """Make ``step`` of the next atomic write fail ("block": the caller raises inside its with block)."""
    if step != "block":
        monkeypatch.setattr(atomic, step, dies(step))


def hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if atomic.PARTIAL_MARK in p.name]


# ------------------------------------------------------------------------------------ files
def test_atomic_file_replaces_or_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    with atomic_file(path) as staging:
        staging.write_text(json.dumps({"step": 1}))
    assert json.loads(path.read_text()) == {"step": 1} and hidden_leftovers(tmp_path) == []
    with pytest.raises(Killed), atomic_file(path) as staging:
        staging.write_text('{"step": 2, "half')                      # killed while writing
        raise Killed("block")
    monkeypatch.setattr(atomic.os, "replace", dies("replace"))
    with pytest.raises(Killed), atomic_file(path) as staging:
        staging.write_text(json.dumps({"step": 3}))
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"step": 1} and hidden_leftovers(tmp_path) == []


def test_leftovers_of_dead_writers_are_swept(tmp_path):
    dead = 2**22 + 1  # above Linux's default pid_max, so no process has it
    (tmp_path / f".state.json{atomic.PARTIAL_MARK}{dead}-0a0b").write_text("half")
    (tmp_path / f".ckpt{atomic.PARTIAL_MARK}{dead}-0c0d").mkdir()
    with atomic_file(tmp_path / "state.json") as staging:
        staging.write_text("{}")
    with atomic_folder(tmp_path / "ckpt") as staging:
        (staging / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "state.json"]


# ------------------------------------------------------------------------------------ folders
def test_atomic_folder_carries_over_only_what_it_is_asked_to(tmp_path):
    target = tmp_path / "adapter"
    with atomic_folder(target) as staging:                               # an adapter: nothing carried over
        (staging / "adapter_model.safetensors").write_text("old")
        (staging / "notes.txt").write_text("kept?")
    with atomic_folder(target) as staging:
        (staging / "adapter_model.safetensors").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors"]
    with atomic_folder(target, carry_over=lambda name: name != "config.json") as staging:
        (staging / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["adapter_model.safetensors", "config.json"]
    assert (target / "adapter_model.safetensors").read_text() == "new" and hidden_leftovers(tmp_path) == []


def test_without_an_atomic_swap_two_renames_still_replace_the_folder(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_model(tiny_model(seed=1), target)
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)           # macOS: no renameat2
    new = tiny_model(seed=2)
    save_model(new, target)
    assert torch.equal(logits(ernie_lab.load_model(target)), logits(new)) and hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("step", STEPS)
def test_a_save_stopped_at_any_step_leaves_the_previous_model_loadable(tmp_path, monkeypatch, step):
    from ernie_lab.io import saving

    target = tmp_path / "ckpt"
    old = tiny_model(seed=1)
    save_model(old, target)
    (target / "tokenizer_config.json").write_text("{}")                 # not a checkpoint file: carried over
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    kill_at(step, monkeypatch)
    if step == "block":
        write = saving.write_checkpoint

        def half_written(folder, *args):
            write(folder, *args)
            raise Killed("block")
        monkeypatch.setattr(saving, "write_checkpoint", half_written)
    with pytest.raises(Killed):
        save_model(tiny_model(seed=2), target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert torch.equal(logits(ernie_lab.load_model(target)), logits(old))
    save_model(old, target)                                              # the next save succeeds, tidily
    assert hidden_leftovers(tmp_path) == [] and (target / "tokenizer_config.json").is_file()


# ------------------------------------------------------------------------------------ trainer checkpoints
def counting(index: int, rank: int = 0, world_size: int = 1) -> dict:
    generator = torch.Generator().manual_seed(1000 + index)
    ids = (torch.randint(0, 48, (4, 1), generator=generator) + torch.arange(12)) % 48
    return {"input_ids": ids}


def config(tmp_path, **overrides) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "max_steps": 4, "warmup_steps": 1, "progress": False,
                          "out_dir": str(tmp_path), **overrides})


@pytest.mark.parametrize("step", [s for s in STEPS if s != "link_entries"])  # a step-N folder carries nothing over
def test_a_checkpoint_stopped_at_any_step_keeps_the_previous_one_and_it_resumes(tmp_path, monkeypatch, step):
    straight = Trainer(tiny_model(), counting, config(tmp_path / "straight")).fit()
    first = Trainer(tiny_model(), counting, config(tmp_path, checkpoint_every=2))
    first.config.max_steps = 2
    first.fit()                                                          # step-2 written
    rerun = Trainer(tiny_model(seed=5), counting, config(tmp_path, resume_from="latest"))
    assert rerun.step == 2
    kill_at(step, monkeypatch)
    if step == "block":
        monkeypatch.setattr(Trainer, "state_dict", dies("block"))                # weights written, state not
    with pytest.raises(Killed):
        rerun.save_checkpoint()                                          # step-2 again, killed
    monkeypatch.undo()
    assert [s for s, _ in checkpoints(tmp_path)] == [2] and (tmp_path / "step-2" / STATE_FILE).is_file()
    resumed = Trainer(tiny_model(seed=6), counting, config(tmp_path, resume_from="latest"))
    rest = resumed.fit()
    assert [h["step"] for h in rest] == [1, 2, 3, 4]
    for a, b in zip(straight, rest):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"]

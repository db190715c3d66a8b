"""FSDP2 (TrainConfig(parallel="fsdp")): 2 gloo ranks train like one process, sharded checkpoints resume on
1 or 2 ranks whichever wrote them, and consolidate into the Hub folder a single process would save.

One torchrun launch (module fixture) runs every 2-rank part; the tests compare it with single-process runs."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ernie_lab
from conftest import micro_model
from ernie_lab.errors import CheckpointError, ConfigError, InputError
from ernie_lab.train import STATE_FILE, Trainer, TrainConfig
from ernie_lab.train.finetune import FineTuner
from ernie_lab.train.fsdp import SHARDS, consolidate, stored_shapes
from ernie_lab.train.lora import apply_lora, load_adapter, lora_layers
from test_train import SPARSE_MOE, counting_batch, counting_data, quiet, tiny_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")]


def dense_config(**overrides) -> TrainConfig:
    """4 updates of 2 micro-batches (4 rows each: 2 per rank), evaluated on 3 batches (uneven over 2 ranks)."""
    return quiet(max_steps=4, grad_accum_steps=2, eval_every=2, eval_batches=3, **overrides)


def eval_data(i):
    return counting_batch(500 + i)


def lora_model():
    torch.manual_seed(0)                           # LoRA's A is drawn from torch's generator
    return apply_lora(micro_model(), r=4, alpha=8)


def moe_config(**overrides) -> TrainConfig:
    return quiet(grad_accum_steps=2, z_loss=1e-3, orthogonal=0.01, parallel="fsdp", **overrides)


TWO_RANKS = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from test_fsdp import dense_config, eval_data, lora_model, moe_config
    from test_train import SPARSE_MOE, counting_data, quiet, tiny_model
    from ernie_lab.errors import CheckpointError
    from conftest import micro_model
    from ernie_lab.train import Trainer, leave_processes
    from ernie_lab.train.finetune import FineTuner
    from ernie_lab.train.fsdp import full_state_dict

    out = sys.argv[2]
    trainer = Trainer(micro_model(), counting_data(), dense_config(parallel="fsdp", checkpoint_every=2,
                      out_dir=out + "/full"), eval_data=eval_data)
    trainer.fit()
    gathered = full_state_dict(trainer.model)                  # every rank takes part, rank 0 keeps it
    if trainer.procs.is_main:
        torch.save(gathered, out + "/full-gathered.pt")
    # resume what one process wrote (different starting weights: the checkpoint's must win)
    Trainer(micro_model(seed=1), counting_data(), dense_config(parallel="fsdp", checkpoint_every=4,
            out_dir=out + "/resumed", resume_from=out + "/one/step-2"), eval_data=eval_data).fit()
    FineTuner(lora_model(), counting_data(), dense_config(parallel="fsdp", checkpoint_every=4,
              out_dir=out + "/lora"), eval_data=eval_data).fit()
    Trainer(tiny_model(SPARSE_MOE), counting_data(rows=2, ignore_ragged=True),
            moe_config(checkpoint_every=3, out_dir=out + "/moe")).fit()
    try:                                          # a whole-model (DDP) checkpoint into a sharded model
        Trainer(micro_model(), counting_data(), quiet(parallel="fsdp")).resume(out + "/plain/step-1")
    except CheckpointError as error:
        if trainer.procs.is_main:
            open(out + "/refusal.txt", "w").write(str(error))
    leave_processes()
""")


def history(folder) -> list[dict]:
    return torch.load(Path(folder) / STATE_FILE, weights_only=True)["history"]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def max_loss_difference(a: list[dict], b: list[dict]) -> float:
    assert [sorted(x) for x in a] == [sorted(y) for y in b]  # the same entries (steps, evaluations)
    return max(abs(x[key] - y[key]) for x, y in zip(a, b) for key in x
               if key.endswith("loss") or key in ("z_loss", "orthogonal"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process writes one/step-2 (parallel="fsdp" on 1 rank), then one torchrun launch with 2 ranks."""
    out = tmp_path_factory.mktemp("fsdp")
    Trainer(micro_model(), counting_data(), dense_config(parallel="fsdp", checkpoint_every=2, out_dir=out / "one"),
            eval_data=eval_data).fit()
    Trainer(micro_model(), counting_data(), quiet(max_steps=1, checkpoint_every=1, out_dir=out / "plain")).fit()
    script = out / "two_ranks.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(ernie_lab.__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(Path(__file__).parent), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


# ------------------------------------------------------------------------------ 2 ranks == 1 process
def test_two_sharded_ranks_train_like_one_process(runs):
    single = micro_model()
    expected = Trainer(single, counting_data(), dense_config(), eval_data=eval_data).fit()  # plain, one process
    assert max_loss_difference(history(runs / "full" / "step-4"), expected) < 1e-5
    assert any("eval_loss" in h for h in expected)
    assert max_difference(torch.load(runs / "full-gathered.pt"), single.state_dict()) < 1e-5
    shards = sorted(p.name for p in (runs / "full" / "step-4" / SHARDS).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # each rank wrote its part


def test_moe_experts_without_tokens_shard_like_one_process(runs):
    """8 experts, 1 per token, 6 tokens a micro-batch: ranks leave different experts idle; routing losses on."""
    expected = Trainer(tiny_model(SPARSE_MOE), counting_data(rows=2, ignore_ragged=True), moe_config()).fit()
    assert max_loss_difference(history(runs / "moe" / "step-3"), expected) < 1e-5
    assert all(h["orthogonal"] > 0 and h["z_loss"] > 0 for h in expected)


def test_lora_under_fsdp_trains_only_adapters_and_consolidates_to_the_peft_adapter(runs, tmp_path):
    single = lora_model()
    expected = FineTuner(single, counting_data(), dense_config(), eval_data=eval_data).fit()
    step = runs / "lora" / "step-4"
    assert max_loss_difference(history(step), expected) < 1e-5
    assert stored_shapes(step) and all(".lora_" in name for name in stored_shapes(step))  # the base is not saved
    with pytest.raises(CheckpointError, match="LoRA adapters only"):
        consolidate(step, tmp_path / "whole")
    consolidate(step, tmp_path / "adapter", model=apply_lora(micro_model(), r=4, alpha=8))
    reloaded = load_adapter(micro_model(), tmp_path / "adapter")
    assert len(lora_layers(reloaded)) == len(lora_layers(single))
    ours = {n: t for n, t in reloaded.state_dict().items() if ".lora_" in n}
    assert max_difference(ours, {n: t for n, t in single.state_dict().items() if ".lora_" in n}) < 1e-5


# ------------------------------------------------------------------------------ resume on the other count
def test_one_process_resumes_what_two_ranks_wrote(runs, tmp_path):
    model = micro_model(seed=1)                    # other weights: the checkpoint's must replace them
    trainer = Trainer(model, counting_data(), dense_config(parallel="fsdp", out_dir=tmp_path),
                      eval_data=eval_data).resume(runs / "full" / "step-2")
    assert trainer.step == 2
    trainer.fit()
    assert max_loss_difference(trainer.history, history(runs / "full" / "step-4")) < 1e-5
    assert max_difference(model.state_dict(), torch.load(runs / "full-gathered.pt")) < 1e-5


def test_two_ranks_resume_what_one_process_wrote(runs):
    assert max_loss_difference(history(runs / "resumed" / "step-4"), history(runs / "one" / "step-4")) < 1e-5


# ------------------------------------------------------------------------------ consolidation
def test_consolidate_writes_the_weights_the_ranks_held_as_a_hub_folder(runs, tmp_path):
    folder = consolidate(runs / "full" / "step-4", tmp_path / "hub")
    gathered = torch.load(runs / "full-gathered.pt")
    loaded = ernie_lab.load_model(folder).state_dict()
    assert max_difference(loaded, gathered) == 0.0          # exactly what the 2 ranks held
    single = micro_model()                                  # and what one process trains and saves
    Trainer(single, counting_data(), dense_config(), eval_data=eval_data).fit()
    ernie_lab.save_model(single, tmp_path / "single")
    assert max_difference(loaded, ernie_lab.load_model(tmp_path / "single").state_dict()) < 1e-5
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in (tmp_path / "single").iterdir())


# ------------------------------------------------------------------------------ bad input
def test_an_unknown_parallel_mode_is_refused():
    with pytest.raises(ConfigError, match="parallel must be one of"):
        TrainConfig(parallel="zero3")


def test_a_sharded_checkpoint_of_another_model_or_other_settings_is_refused(runs, tmp_path):
    step = runs / "one" / "step-2"
    other = micro_model(hidden_size=48)
    before = {n: t.clone() for n, t in other.state_dict().items()}
    with pytest.raises(CheckpointError, match="different model"):
        Trainer(other, counting_data(), dense_config(parallel="fsdp"), eval_data=eval_data).resume(step)
    assert max_difference(other.state_dict(), before) == 0.0   # refused before anything changed
    with pytest.raises(CheckpointError, match="lr="):
        Trainer(micro_model(), counting_data(), dense_config(parallel="fsdp", lr=1e-2), eval_data=eval_data).resume(step)


def test_a_sharded_model_refuses_a_whole_model_checkpoint(runs):
    assert "parallel='ddp'" in (runs / "refusal.txt").read_text()


def test_consolidate_refuses_what_is_no_sharded_checkpoint(runs, tmp_path):
    ernie_lab.save_model(micro_model(), tmp_path / "plain")
    with pytest.raises(CheckpointError, match="no sharded checkpoint"):
        consolidate(tmp_path / "plain", tmp_path / "out")
    with pytest.raises(InputError, match="two folder paths"):
        consolidate(None, tmp_path / "out")

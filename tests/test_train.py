"""The training loop: it learns, its schedule, accumulation, resume, checkpoints, torchrun and bf16."""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ernie_lab

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: small models train on one thread
from ernie_lab.model.config import ErnieConfig, VLConfig
from ernie_lab.errors import CheckpointError, ConfigError, InputError
from ernie_lab.model.moe import moe_blocks
from ernie_lab.train import (STATE_FILE, TrainConfig, Trainer, checkpoints, from_batches, learning_rate,
                             parameter_groups, train)

VOCAB = 64
DENSE = dict(model_type="ernie4_5", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8)
MOE = dict(DENSE, model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
           moe_num_shared_experts=1, moe_layer_start_index=1)
# 8 experts, one per token: a 6-token batch leaves at least 2 experts of each layer without a gradient
SPARSE_MOE = dict(MOE, moe_num_experts=8, moe_k=1)
VL = dict(model_type="ernie4_5_vl_moe", image_start_token_id=58, image_end_token_id=59, image_token_id=60,
          video_token_id=61, video_start_token_id=62, video_end_token_id=63,
          text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_num_experts=4, moe_k=2,
                           moe_intermediate_size=[16, 8], moe_num_shared_experts=1,
                           rope_parameters=dict(mrope_section=[3, 3, 2]), mlp_layer_types=["dense", "sparse"]),
          vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32))


def tiny_model(raw: dict = DENSE, seed: int = 0):
    return ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(raw)).init_weights(seed=seed)


def counting_batch(index: int, rows: int = 4, length: int = 12, ignore_ragged: bool = False) -> dict:
    """Batch ``index`` of the toy task 'count on': row s, s+1, s+2, ... (mod 48) from a random s.
    ``ignore_ragged`` ignores a different number of leading labels per row (uneven target counts)."""
    generator = torch.Generator().manual_seed(1000 + index)
    starts = torch.randint(0, 48, (rows, 1), generator=generator)
    ids = (starts + torch.arange(length)) % 48
    labels = ids.clone()
    if ignore_ragged:
        for row in range(rows):
            labels[row, :1 + (row * 3) % (length - 2)] = -100
    return {"input_ids": ids, "labels": labels}


def counting_data(rows: int = 4, ignore_ragged: bool = False):
    """train_data(index, rank, world): rank r takes its slice of rows of the global batch ``index``."""
    def train_data(index, rank, world_size):
        batch = counting_batch(index, rows, ignore_ragged=ignore_ragged)
        per = rows // world_size
        return {key: value[rank * per:(rank + 1) * per] for key, value in batch.items()}
    return train_data


def quiet(**overrides) -> TrainConfig:
    return TrainConfig(**{"progress": False, "lr": 3e-3, "max_steps": 3, **overrides})


def max_weight_diff(a, b) -> float:
    sb = b.state_dict()
    return max((t - sb[name]).abs().max().item() for name, t in a.state_dict().items())


# ------------------------------------------------------------------------------ it learns
def test_text_moe_learns_to_count_with_routing_losses_on():
    model = tiny_model(MOE)
    config = quiet(lr=2e-2, warmup_steps=5, max_steps=30, log_every=5, eval_every=15, eval_batches=2,
                   balance=0.01, z_loss=1e-3, orthogonal=0.01)
    history = Trainer(model, counting_data(), config, eval_data=lambda i: counting_batch(10_000 + i)).fit()
    steps = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    assert [h["step"] for h in steps] == [5, 10, 15, 20, 25, 30] and [h["step"] for h in evals] == [15, 30]
    for h in steps:
        assert {"loss", "lm_loss", "balance", "z_loss", "orthogonal", "lr", "grad_norm", "tokens_per_s"} <= set(h)
        assert h["tokens_per_s"] > 0 and math.isfinite(h["loss"])
        expected = h["lm_loss"] + 0.01 * h["balance"] + 1e-3 * h["z_loss"] + 0.01 * h["orthogonal"]
        assert h["loss"] == pytest.approx(expected)
    first = steps[0]["lm_loss"]
    assert first > 2.5  # near log(64) = 4.2 after 5 steps: the init is sane, the task is not yet learnt
    assert steps[-1]["lm_loss"] < 0.5 * first and evals[-1]["eval_loss"] < 0.5 * first
    assert 1.9 < steps[-1]["balance"] < 2.6  # k = 2 is perfectly balanced; 4 would be collapse


def test_init_weights_gives_a_loss_near_log_vocab():
    ids = counting_batch(0)["input_ids"]
    default = ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(MOE))
    assert default(ids, labels=ids).loss > 2 * math.log(VOCAB)  # PyTorch's N(0, 1) embeddings, tied head
    model = tiny_model(MOE)
    assert abs(model(ids, labels=ids).loss.item() - math.log(VOCAB)) < 0.3
    for block in moe_blocks(model):
        assert block.gate.weight.std() > 0.01 and (block.moe_statics.e_score_correction_bias == 0).all()
    assert torch.equal(tiny_model(MOE, seed=3).embed.weight, tiny_model(MOE, seed=3).embed.weight)


def test_attention_std_draws_sharper_queries_and_keys_and_leaves_the_rest_alone():
    plain = tiny_vl()
    sharp = ernie_lab.ErnieVLForConditionalGeneration(VLConfig.from_dict(VL)).init_weights(seed=0, attention_std=0.2)
    weights = dict(plain.named_parameters())
    changed = {name for name, p in sharp.named_parameters() if not torch.equal(p, weights[name])}
    layers, blocks = len(plain.layers), len(plain.vision.blocks)
    assert changed == {f"layers.{i}.attn.{w}_proj.weight" for i in range(layers) for w in "qk"} | \
        {f"vision.blocks.{i}.attn.qkv.weight" for i in range(blocks)}
    for i in range(layers):
        for w in "qk":
            name = f"layers.{i}.attn.{w}_proj.weight"
            assert torch.allclose(dict(sharp.named_parameters())[name], 10 * weights[name])
    qkv = sharp.vision.blocks[0].attn.qkv.weight
    third = qkv.shape[0] // 3
    assert torch.allclose(qkv[:2 * third], 10 * weights["vision.blocks.0.attn.qkv.weight"][:2 * third])
    assert torch.equal(qkv[2 * third:], weights["vision.blocks.0.attn.qkv.weight"][2 * third:])  # values untouched
    # what it is for: the first layer's attention starts further from uniform (lower entropy; this model is
    # only 32 wide, so its logits are std^2 * 32: 0.01 at 0.02, 1.3 at 0.2)
    ids = torch.randint(3, 60, (2, 24), generator=torch.Generator().manual_seed(0))

    def first_layer_entropy(model):
        seen = {}
        hook = model.layers[0].attn.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
        model(ids)
        hook.remove()
        attn = model.layers[0].attn
        x = seen["x"]
        q = attn.q_proj(x).view(2, 24, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(2, 24, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
        k = k.repeat_interleave(attn.n_heads // attn.n_kv_heads, dim=1)
        scores = (q @ k.transpose(-1, -2)) / attn.head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(24, 24, dtype=torch.bool).triu(1), float("-inf"))
        p = scores.softmax(-1)
        return -(p * p.clamp_min(1e-12).log()).sum(-1).mean().item()

    with torch.no_grad():
        assert first_layer_entropy(sharp) < first_layer_entropy(plain) - 0.05


# ------------------------------------------------------------------------------ schedule and optimizer groups
def test_learning_rate_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    c = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=13)
    lrs = [learning_rate(t, c) for t in range(13)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0 * 4 / 4]) and lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1) and learning_rate(100, c) == pytest.approx(0.1)
    assert lrs[8] == pytest.approx(0.55)  # halfway through the cosine: the mean of lr and min_lr
    assert all(a > b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))
    history = Trainer(tiny_model(), counting_data(), quiet(lr=1.0, warmup_steps=1, max_steps=4, min_lr_ratio=0.0,
                                                           max_grad_norm=0.0)).fit()
    assert [h["lr"] for h in history] == pytest.approx([1.0, 1.0, 0.5, 0.0])


def test_weight_decay_spares_norms_biases_and_the_tied_embedding():
    model = ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(dict(MOE, use_bias=True)))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "layers.1.mlp.routers.0.weight" in decayed and "layers.0.attn.q_proj.weight" in decayed
    assert not any("norm" in n or n.endswith("bias") or "embed" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(p for p in model.parameters() if p.requires_grad))
    assert no_decay["weight_decay"] == 0.0


def test_two_steps_equal_a_hand_written_loop_with_every_routing_loss():
    c = quiet(max_steps=2, warmup_steps=1, balance=0.1, z_loss=0.01, orthogonal=1.0, max_grad_norm=None)
    ours, ref = tiny_model(MOE), tiny_model(MOE)
    Trainer(ours, counting_data(), c).fit()
    optimizer = torch.optim.AdamW(parameter_groups(ref, c.weight_decay), betas=c.betas, eps=c.eps)
    for step in range(2):
        out = ref(**counting_batch(step), output_router_logits=True)
        routers = [block.gate.weight for block in moe_blocks(ref)]
        loss = (out.loss + 0.1 * ernie_lab.losses.load_balancing_loss(out.router_logits, k=2)
                + 0.01 * ernie_lab.losses.router_z_loss(out.router_logits)
                + sum(ernie_lab.losses.router_orthogonal_loss(w) for w in routers))
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, c)
        optimizer.step()
        optimizer.zero_grad()
    assert max_weight_diff(ours, ref) < 1e-6


# ------------------------------------------------------------------------------ accumulation
def test_two_accumulated_micro_batches_equal_one_batch_of_both():
    """Uneven target counts per micro-batch: weighting by target counts keeps the two equal."""
    big, small = tiny_model(), tiny_model()
    Trainer(big, counting_data(rows=4, ignore_ragged=True), quiet()).fit()

    def halves(index, rank, world_size):  # micro-batch 2s + i is half i of global batch s
        batch = counting_batch(index // 2, rows=4, ignore_ragged=True)
        rows = slice(0, 2) if index % 2 == 0 else slice(2, 4)
        return {key: value[rows] for key, value in batch.items()}

    Trainer(small, halves, quiet(grad_accum_steps=2)).fit()
    assert max_weight_diff(big, small) < 1e-6
    assert max_weight_diff(big, tiny_model()) > 1e-3  # it did train


# ------------------------------------------------------------------------------ checkpoints and resume
def test_resume_continues_the_same_curve(tmp_path):
    config = dict(max_steps=6, warmup_steps=2, balance=0.01, z_loss=1e-3, orthogonal=0.01, grad_accum_steps=2)
    straight = tiny_model(MOE)
    whole = Trainer(straight, counting_data(), quiet(**config)).fit()

    first = Trainer(tiny_model(MOE), counting_data(), quiet(**config, out_dir=str(tmp_path), keep_checkpoints_at=[3]))
    first.config.max_steps = 3  # stop half-way, as a killed job would
    first.fit()
    assert (tmp_path / "step-3" / STATE_FILE).is_file()
    resumed_model = tiny_model(MOE, seed=7)  # different weights: the checkpoint must overwrite them
    second = Trainer(resumed_model, counting_data(), quiet(**config, out_dir=str(tmp_path), resume_from="latest"))
    assert second.step == 3 and len(second.history) == 3
    rest = second.fit()
    assert [h["step"] for h in rest] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(whole, rest):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"]
    assert max_weight_diff(straight, resumed_model) < 1e-6


def test_checkpoints_load_with_ernie_lab_and_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    config = quiet(max_steps=5, checkpoint_every=1, keep_last=2, keep_checkpoints_at=(1,), out_dir=str(tmp_path))
    history = train(model, counting_data(), config)
    assert [step for step, _ in checkpoints(tmp_path)] == [1, 4, 5]  # 2, 3 pruned; 1 kept on purpose
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1", "step-4", "step-5"]  # no temporary left
    folder = tmp_path / "step-5"
    state = torch.load(folder / STATE_FILE, weights_only=True)
    assert state["step"] == 5 and state["history"] == history and "state" in state["optimizer"]
    ids = counting_batch(99)["input_ids"]
    model.eval()
    with torch.no_grad():
        ours = model(ids).logits
        assert (ernie_lab.load_model(folder)(ids).logits - ours).abs().max() < 1e-4
        reference = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert (reference(ids).logits - ours).abs().max() < 1e-4


def test_bad_configs_data_and_checkpoints_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=10, max_steps=10)
    with pytest.raises(ConfigError, match="out_dir"):
        TrainConfig(checkpoint_every=5)
    with pytest.raises(ConfigError, match="autocast"):
        TrainConfig(autocast="fp16")
    with pytest.raises(ConfigError, match="no MoE layer"):
        Trainer(tiny_model(), counting_data(), quiet(balance=0.01))
    with pytest.raises(InputError, match="callable"):
        Trainer(tiny_model(), [counting_batch(0)], quiet())
    with pytest.raises(InputError, match="input_ids"):
        Trainer(tiny_model(), lambda i, r, w: [1, 2, 3], quiet()).fit()
    ernie_lab.save_model(tiny_model(), tmp_path / "plain")
    with pytest.raises(CheckpointError, match=STATE_FILE):
        Trainer(tiny_model(), counting_data(), quiet()).resume(tmp_path / "plain")
    train(tiny_model(MOE), counting_data(), quiet(max_steps=1, checkpoint_every=1, out_dir=str(tmp_path / "moe")))
    with pytest.raises(CheckpointError, match="different model"):
        Trainer(tiny_model(), counting_data(), quiet()).resume(tmp_path / "moe" / "step-1")


def test_from_batches_splits_rows_over_ranks():
    batch = counting_batch(0)
    data = from_batches([batch])
    assert data(5, 0, 1) is batch
    assert torch.equal(data(0, 1, 2)["input_ids"], batch["input_ids"][2:])
    with pytest.raises(InputError, match="rows"):
        data(0, 0, 3)


# ------------------------------------------------------------------------------ torchrun
DDP_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from test_train import SPARSE_MOE, counting_data, pictures_on_rank_0, quiet, tiny_model, tiny_vl
    from ernie_lab.train import train

    train(tiny_model(SPARSE_MOE), counting_data(rows=2, ignore_ragged=True),
          quiet(grad_accum_steps=2, z_loss=1e-3, orthogonal=0.01, checkpoint_every=3, out_dir=sys.argv[2]))
    train(tiny_vl(), pictures_on_rank_0, quiet(max_steps=2, balance=0.01, z_loss=1e-3, orthogonal=0.01,
                                               token_balanced=True, checkpoint_every=2, out_dir=sys.argv[2] + "-vl"))
""")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
def test_torchrun_two_processes_train_like_one_with_both_batches(tmp_path):
    """2 ranks x batch 1 (each rank's micro-batches with different target counts; MoE experts without
    tokens, so some gradients are missing on a rank) == 1 process x batch 2, exactly."""
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(ernie_lab.__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(script), str(Path(__file__).parent), str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    single = tiny_model(SPARSE_MOE)
    history = Trainer(single, counting_data(rows=2, ignore_ragged=True),
                      quiet(grad_accum_steps=2, z_loss=1e-3, orthogonal=0.01)).fit()
    folder = tmp_path / "out" / "step-3"
    assert max_weight_diff(single, ernie_lab.load_model(folder)) < 1e-5
    saved = torch.load(folder / STATE_FILE, weights_only=True)["history"]
    assert [h["lm_loss"] for h in saved] == pytest.approx([h["lm_loss"] for h in history], abs=1e-5)
    assert [h["z_loss"] for h in saved] == pytest.approx([h["z_loss"] for h in history], abs=1e-5)
    assert saved[-1]["tokens_per_s"] > 0
    # VL: rank 1 has no picture, so its vision routers see no token, yet get the orthogonal loss's gradient
    vl_history = torch.load(tmp_path / "out-vl" / "step-2" / STATE_FILE, weights_only=True)["history"]
    assert all(h["balance_vision"] > 0 and math.isfinite(h["loss"]) for h in vl_history)
    vl = ernie_lab.load_model(tmp_path / "out-vl" / "step-2")
    assert all(max_weight_diff(a, b) > 0 for a, b in zip(moe_blocks(vl)[0].routers, moe_blocks(tiny_vl())[0].routers))


# ------------------------------------------------------------------------------ precision and the VL model
def test_bf16_autocast_trains_on_cpu_with_a_progress_bar(capsys):
    model = tiny_model(MOE)
    history = Trainer(model, counting_data(), quiet(autocast="bf16", balance=0.01, z_loss=1e-3, progress=True)).fit()
    bar = capsys.readouterr().err
    assert "train: 100%" in bar and "loss=" in bar and "tok_s=" in bar
    assert all(math.isfinite(h["loss"]) for h in history)
    assert model.embed.weight.dtype == torch.float32  # autocast computes in bf16, the weights stay fp32
    assert max_weight_diff(model, tiny_model(MOE)) > 1e-3


def vl_batch(index, rank, world_size):
    """Two samples, each a red or blue picture (4 vision tokens) then a short text; labels skip the picture."""
    from PIL import Image
    from ernie_lab.io.image_processing import preprocess_images

    colors = [(200, 30, 30), (30, 30, 200)]
    pictures = preprocess_images([Image.new("RGB", (56, 56), colors[(index + row) % 2]) for row in range(2)])
    ids = torch.tensor([[1, 58, 60, 60, 60, 60, 59, 7 + (index + row) % 2, 9, 10 + row] for row in range(2)])
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 7:9] = -100  # sample 1 has a single target: token balancing weighs it as much as sample 0
    return {"input_ids": ids, "labels": labels, **pictures}


def tiny_vl():
    return ernie_lab.ErnieVLForConditionalGeneration(VLConfig.from_dict(VL)).init_weights(seed=0)


def pictures_on_rank_0(index, rank, world_size):
    """Rank 0 reads picture samples, every other rank text only."""
    return vl_batch(index, rank, world_size) if rank == 0 else counting_batch(index, rows=2)


def test_vl_model_trains_with_modality_balancing_and_token_balanced_loss():
    model = tiny_vl()
    before = [r.weight.detach().clone() for b in moe_blocks(model) for r in b.routers]
    config = quiet(max_steps=2, balance=0.01, z_loss=1e-3, orthogonal=0.01, token_balanced=True)
    history = Trainer(model, vl_batch, config).fit()
    for h in history:
        assert h["balance_text"] > 0 and h["balance_vision"] > 0
        assert h["balance"] == pytest.approx(h["balance_text"] + h["balance_vision"])
        assert all(math.isfinite(v) for v in h.values())
    after = [r.weight for b in moe_blocks(model) for r in b.routers]
    assert all((a - b).abs().max() > 0 for a, b in zip(after, before))  # text and vision routers learn
    fresh = tiny_vl()
    batch = vl_batch(0, 0, 1)
    with torch.no_grad():  # step 1 logged the token-balanced loss of the initial weights, not the token mean
        out = fresh(**batch)
    balanced = ernie_lab.losses.token_balanced_loss(out.logits[:, :-1], batch["labels"][:, 1:])
    assert history[0]["lm_loss"] == pytest.approx(balanced.item(), abs=1e-5)
    assert abs(balanced.item() - out.loss.item()) > 1e-4


KILL_SCRIPT = """
import sys, time, torch, ernie_lab
from ernie_lab import train
from ernie_lab.model.config import ErnieConfig
torch.set_num_threads(1)
torch.manual_seed(0)
model = ernie_lab.ErnieForCausalLM(ErnieConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=8)).init_weights(seed=0)
def batches(index, rank, world):
    if index >= int(sys.argv[3]):
        time.sleep(0.3)  # slow down after the first steps, so the parent can kill the run mid-way
    g = torch.Generator().manual_seed(index)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    return {"input_ids": ids, "labels": ids}
config = train.TrainConfig(lr=1e-2, max_steps=int(sys.argv[2]), checkpoint_every=1, out_dir=sys.argv[1],
                           resume_from="latest", progress=False)
history = train.Trainer(model, batches, config).fit()
print("final", [round(h["loss"], 6) for h in history if "loss" in h][-1])
"""


def test_training_resumes_after_a_kill(tmp_path):
    """A run killed mid-way (SIGKILL) leaves its finished checkpoints intact; rerunning resumes the same curve."""
    import signal
    import time

    from ernie_lab.train import checkpoints

    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run([sys.executable, str(script), str(tmp_path / "straight"), "8", "100"],
                              capture_output=True, text=True, env=env, check=True).stdout
    killed = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), "8", "3"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(checkpoints(tmp_path / "run")) < 4:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = checkpoints(tmp_path / "run")
    assert 4 <= len(done) < 8, [step for step, _ in done]  # killed after some steps, before the end
    resumed = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), "8", "100"],
                             capture_output=True, text=True, env=env, check=True).stdout
    assert resumed.split("final")[-1] == straight.split("final")[-1]  # the same last loss, to 6 digits
    assert [step for step, _ in checkpoints(tmp_path / "run")][-1] == 8


# ------------------------------------------------------------------ parts of the model at their own pace
def test_a_frozen_part_sits_out_its_first_updates_then_learns():
    model = tiny_model()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, counting_data(), quiet(max_steps=2, frozen_steps={"layers.0": 2}))
    trainer.fit()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    assert not any(n.startswith("layers.0.") for n in moved), "a frozen part changed during its frozen updates"
    assert any(n.startswith("layers.1.") for n in moved) and "embed.weight" in moved
    trainer.config.max_steps = 3
    trainer.fit()  # update 2 is past the frozen ones
    assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters() if n.startswith("layers.0.")
               and n.endswith("proj.weight"))


def test_lr_scale_gives_a_part_its_own_learning_rate():
    config = quiet(lr=1e-2, warmup_steps=1, max_steps=4, lr_scale={"layers.1.mlp": 0.25}, frozen_steps={"embed": 1})
    trainer = Trainer(tiny_model(), counting_data(), config)
    trainer.fit()
    by_part = {}
    for group in trainer.optimizer.param_groups:
        by_part.setdefault(group["part"], set()).add(group["lr"])
    last = learning_rate(3, config)  # the rate of the last update, the one the groups still hold
    assert by_part[""] == {last} and by_part["embed"] == {last}
    assert by_part["layers.1.mlp"] == {0.25 * last}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    scaled = {names[id(p)] for g in trainer.optimizer.param_groups if g["part"] == "layers.1.mlp" for p in g["params"]}
    assert scaled and all(n.startswith("layers.1.mlp.") for n in scaled)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(trainer.model.parameters()))


def test_parts_config_is_checked():
    with pytest.raises(ConfigError, match="lr_scale and frozen_steps"):
        quiet(lr_scale={"vision": -1.0})

"""Exercises of notebook 05 (training): the answer-only loss, the warm-up + cosine schedule, one training step.

Each judge draws fresh inputs (``fresh_generator``) at several shapes and compares with the kit's
training code (``ernie_lab.train.trainer``: ``learning_rate``, ``Trainer.train_step``; the decoder's
``causal_lm_loss``) on the same inputs.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from ...model.config import ErnieConfig
from ...model.decoder import IGNORE_INDEX, ErnieForCausalLM, causal_lm_loss
from ...model.moe import moe_blocks
from ...train.trainer import Trainer, TrainConfig, from_batches, learning_rate, parameter_groups
from ..exercises import Mismatch, call, exercise, expect_tensor, fresh_generator, name_the_mistake


# ============================================================================ 05.answer_loss
def _answer_case(g, rows, width, vocab):
    """Logits, ids and an answer mask with two separate answer spans per row (the turns of a conversation)."""
    is_answer = torch.zeros(rows, width, dtype=torch.bool)
    for row in range(rows):
        cuts = sorted(torch.randperm(width - 2, generator=g)[:4].add(1).tolist())  # 4 distinct cut points
        is_answer[row, cuts[0]:cuts[1]] = True                                        # the first answer
        is_answer[row, cuts[2] + 1:cuts[3] + 1] = True                                # the second, after a gap
    ids = torch.randint(1, vocab, (rows, width), generator=g)
    return torch.randn(rows, width, vocab, generator=g) * 2, ids, is_answer


@exercise("05.answer_loss",
          hint="labels = ids where is_answer, else -100; logits[:, t] predicts token t + 1, so compare "
               "logits[:, :-1] with labels[:, 1:]; F.cross_entropy(..., ignore_index=-100) averages over the "
               "answer tokens only.")
def answer_loss(function) -> str:
    g = fresh_generator()
    for rows, width, vocab in ((2, 12, 9), (3, 9, 13), (1, 16, 7)):
        logits, ids, is_answer = _answer_case(g, rows, width, vocab)
        expected = causal_lm_loss(logits, torch.where(is_answer, ids, IGNORE_INDEX))
        got = call(function, logits, ids, is_answer)
        _diagnose_answer(got, logits, ids, is_answer, expected)
        expect_tensor(f"answer-only loss of a ({rows}, {width}) batch", got, expected, atol=1e-5)
    return "Only the answers' tokens teach the model; the prompt and the picture are context."


def _diagnose_answer(got, logits, ids, is_answer, expected) -> None:
    if not (isinstance(got, torch.Tensor) and got.shape == () and torch.isfinite(got).all()):
        return
    flat = logits.reshape(-1, logits.shape[-1])
    mistakes = {
        "no shift: logits[:, t] predicts token t + 1, not token t":
            F.cross_entropy(flat, torch.where(is_answer, ids, IGNORE_INDEX).reshape(-1), ignore_index=IGNORE_INDEX),
        "the mask is the wrong way round: keep the answer tokens, ignore the prompt":
            causal_lm_loss(logits, torch.where(is_answer, IGNORE_INDEX, ids)),
        "0 is a real token id; the loss skips only -100": causal_lm_loss(logits, torch.where(is_answer, ids, 0)),
        "every token is counted: the prompt's labels must be -100": causal_lm_loss(logits, ids),
    }
    name_the_mistake(got, expected, mistakes, atol=1e-5)


# ============================================================================ 05.lr_schedule
def _schedule_case(g, total):
    warmup = int(torch.randint(1, total // 3, (1,), generator=g))
    peak = float(10 ** torch.empty(1).uniform_(-4, -2, generator=g))
    min_lr = peak * float(torch.empty(1).uniform_(0.0, 0.3, generator=g))
    picked = torch.randperm(total, generator=g)[:total // 2]
    edges = torch.tensor([0, warmup - 1, warmup, total - 1])                 # the boundaries a shortcut misses
    steps = torch.cat([edges, picked]).unique().float()                     # (n,) step numbers as floats
    return steps, peak, warmup, total, min_lr


@exercise("05.lr_schedule",
          hint="step t < W: lr (t + 1) / W (the first update already moves); t >= W: p = (t - W) / (T - 1 - W), "
               "min_lr + (lr - min_lr) (1 + cos(pi p)) / 2, which ends exactly at min_lr on the last step T - 1. "
               "torch.where chooses per step.")
def lr_schedule(function) -> str:
    g = fresh_generator()
    for total in (40, 23, 100):
        steps, peak, warmup, total, min_lr = _schedule_case(g, total)
        config = TrainConfig(lr=peak, warmup_steps=warmup, max_steps=total, min_lr_ratio=min_lr / peak)
        expected = torch.tensor([learning_rate(int(s), config) for s in steps], dtype=torch.float64)
        got = call(function, steps, peak, warmup, total, min_lr)
        _diagnose_schedule(got, steps, peak, warmup, total, min_lr)
        expect_tensor(f"learning rates (peak {peak:.2e}, warm-up {warmup}, {total} steps)", got, expected,
                      atol=1e-6 * peak)
    return "The same schedule the Trainer sets on its optimizer at every step."


def _diagnose_schedule(got, steps, peak, warmup, total, min_lr) -> None:
    if not (isinstance(got, torch.Tensor) and got.shape == steps.shape and torch.isfinite(got).all()):
        return
    t = steps.double()

    def cosine(progress, floor):
        return floor + (peak - floor) * 0.5 * (1 + torch.cos(math.pi * progress.clamp(max=1)))

    right_cosine = cosine((t - warmup) / (total - 1 - warmup), min_lr)
    mistakes = {
        "the warm-up is one step late: update t uses lr (t + 1) / W, so the first update is not wasted":
            torch.where(t < warmup, peak * t / warmup, right_cosine),
        "the cosine ends at 0; it should end at min_lr": torch.where(
            t < warmup, peak * (t + 1) / warmup, cosine((t - warmup) / (total - 1 - warmup), 0.0)),
        "the cosine never reaches min_lr: its progress is (t - W) / (T - 1 - W), 1 on the last step": torch.where(
            t < warmup, peak * (t + 1) / warmup, cosine((t - warmup) / (total - warmup), min_lr)),
    }
    for mistake, variant in mistakes.items():
        if torch.allclose(got.double(), variant, atol=1e-6 * peak, rtol=0):
            raise Mismatch(mistake)


# ============================================================================ 05.training_step
def _micro_moe(g, hidden: int, experts: int) -> ErnieForCausalLM:
    """A fresh micro MoE: 3 layers (the first dense), routers and correction biases drawn so tokens route apart."""
    config = ErnieConfig.from_dict(dict(
        model_type="ernie4_5_moe", vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_num_experts=experts,
        moe_k=2, moe_intermediate_size=hidden // 2, moe_num_shared_experts=1, moe_layer_start_index=1))
    model = ErnieForCausalLM(config).init_weights(seed=int(torch.randint(0, 2**31, (1,), generator=g)))
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 1.0, generator=g)
            block.moe_statics.e_score_correction_bias.uniform_(-0.1, 0.1, generator=g)
    return model


def _step_batch(g, rows, width):
    ids = torch.randint(0, 32, (rows, width), generator=g)
    labels = torch.where(torch.rand(rows, width, generator=g) < 0.6, ids, IGNORE_INDEX)
    labels[:, 1] = ids[:, 1]                                               # every row has a target
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def kit_training_step(model, optimizer, batch, step: int, config: TrainConfig) -> torch.Tensor:
    """The kit's answer to 05.training_step: ``Trainer.train_step`` at update ``step``, with ``optimizer``."""
    trainer = Trainer(model, from_batches([batch]), config)
    trainer.optimizer, trainer.step = optimizer, step
    record, _ = trainer.train_step()
    return torch.tensor(record["loss"])


def kit_step(model, batch, step: int, config: TrainConfig):
    """The kit's update ``step`` (0-based) of ``model`` on ``batch``: the Trainer, positioned at that step."""
    trainer = Trainer(model, from_batches([batch]), config)
    trainer.step = step
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0                                  # train_step sets it; nothing may rely on the default
    record, _ = trainer.train_step()
    return record["loss"]


def _config(g, max_steps):
    return TrainConfig(lr=float(torch.empty(1).uniform_(1e-3, 1e-2, generator=g)), warmup_steps=max_steps // 4,
                       max_steps=max_steps, min_lr_ratio=0.1, weight_decay=0.1, max_grad_norm=0.5, balance=0.01,
                       z_loss=0.001, progress=False)


@exercise("05.training_step",
          hint="set every group's lr to lr_schedule(step); out = model(**inputs, labels=..., output_router_logits="
               "True); loss = out.loss + balance * load_balancing_loss(out.router_logits, k, mask) + z_loss * "
               "router_z_loss(out.router_logits, mask); backward; clip_grad_norm_(params, max_grad_norm); "
               "optimizer.step(); zero_grad(); return the loss (detached).")
def training_step(function) -> str:
    g = fresh_generator()
    for hidden, experts, rows, width, max_steps, step in ((16, 4, 2, 7, 12, 1), (24, 6, 3, 5, 10, 6)):
        model, batch, config = _micro_moe(g, hidden, experts), _step_batch(g, rows, width), _config(g, max_steps)
        kit_model, yours = copy.deepcopy(model), copy.deepcopy(model)
        expected = torch.tensor(kit_step(kit_model, batch, step, config))
        optimizer = torch.optim.AdamW(parameter_groups(yours, config.weight_decay), lr=0.0, betas=config.betas,
                                      eps=config.eps)
        got = call(function, yours, optimizer, batch, step, config)
        expect_tensor(f"the loss your step returns (step {step})", got, expected, atol=1e-5)
        _compare_weights(yours, kit_model, model, batch, step, config)
    return "Parameter for parameter the kit's Trainer.train_step: you have written the loop the shipped models used."


def _compare_weights(yours, kit_model, start, batch, step, config) -> None:
    worst = max((a.detach() - b.detach()).abs().max().item()
                for a, b in zip(yours.parameters(), kit_model.parameters()))
    if worst <= 1e-6:
        return
    unchanged = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(yours.parameters(), start.parameters()))
    if unchanged == 0.0:
        raise Mismatch("no parameter changed: call optimizer.step() after backward()")
    variants = {"the auxiliary losses are missing: add balance * L_bal + z_loss * L_z to the LM loss":
                dict(balance=0.0, z_loss=0.0),
                "the gradient is not clipped: clip_grad_norm_(model.parameters(), config.max_grad_norm)":
                dict(max_grad_norm=None)}
    for mistake, change in variants.items():
        other = copy.deepcopy(start)
        kit_step(other, batch, step, TrainConfig(**{**config.__dict__, **change}))
        if max((a.detach() - b.detach()).abs().max().item() for a, b in zip(yours.parameters(), other.parameters())) <= 1e-6:
            raise Mismatch(mistake)
    raise Mismatch(f"after your step the parameters differ from the kit's by up to {worst:.3g} (tolerance 1e-6); "
                   "check the learning rate of this step, the clipping and the loss terms")

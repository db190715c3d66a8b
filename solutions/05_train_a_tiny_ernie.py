"""Solutions to notebook 05's exercises, with the reasoning behind each step and the mistakes to avoid.

SOLUTIONS maps an exercise to its answers; WRONG lists plausible wrong answers (tests/test_exercises.py
checks that every one of them fails, and that the judge names the mistake where a "says" phrase is given).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ernie_lab import losses
from ernie_lab.model.moe import moe_blocks


# ------------------------------------------------------------------------------------------------
# 05.answer_loss
# ------------------------------------------------------------------------------------------------
def answer_loss(logits, ids, is_answer):
    """Mean next-token cross-entropy over the answer tokens only.

    * labels: the token where it is an answer, -100 elsewhere. -100 is what cross_entropy skips
      (ignore_index); 0 would be a real token id, and the prompt would be taught after all.
    * The shift: the logits at position t are the model's guess for token t + 1, so logits[:, :-1]
      are compared with labels[:, 1:]. Without it the model would be asked to copy its own input.
    * The mean runs over the counted tokens (cross_entropy with ignore_index does that), so a batch
      with few answer tokens weighs the same per token as one with many.
    """
    labels = torch.where(is_answer, ids, -100)                        # (B, T)
    predictions = logits[:, :-1]                                       # (B, T-1, V): guesses for tokens 1..T-1
    targets = labels[:, 1:]                                            # (B, T-1)
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1), ignore_index=-100)


def _no_shift(logits, ids, is_answer):
    labels = torch.where(is_answer, ids, -100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


# ------------------------------------------------------------------------------------------------
# 05.lr_schedule
# ------------------------------------------------------------------------------------------------
def lr_schedule(steps, peak_lr, warmup, total, min_lr):
    """Learning rate of each update t in ``steps`` (0-based): linear warm-up, then cosine down to min_lr.

    * Warm-up: update t uses peak (t + 1) / W, so update 0 already moves (t / W would waste it) and
      update W - 1 reaches the peak. Adam's first steps are noisy (its moment estimates start from
      zero): a small learning rate then keeps them from throwing the fresh weights far.
    * Cosine: progress p = (t - W) / (T - 1 - W) runs from 0 at the end of the warm-up to 1 at the last
      update T - 1, so the last update uses exactly min_lr; (1 + cos(pi p)) / 2 falls smoothly from 1 to 0.
    * torch.where evaluates both branches for every step and picks per step.
    """
    t = steps.double()
    warm = peak_lr * (t + 1) / warmup
    progress = ((t - warmup) / max(1, total - 1 - warmup)).clamp(0, 1)
    cosine = min_lr + (peak_lr - min_lr) * 0.5 * (1 + torch.cos(math.pi * progress))
    return torch.where(t < warmup, warm, cosine)


# ------------------------------------------------------------------------------------------------
# 05.training_step
# ------------------------------------------------------------------------------------------------
def scheduled_losses(model, optimizer, batch, step, config):
    """Steps 1-3 below: set this update's learning rate, forward, and return (LM loss, full loss)."""
    lr = lr_schedule(torch.tensor([float(step)]), config.lr, config.warmup_steps, config.max_steps,
                     config.min_lr).item()
    for group in optimizer.param_groups:
        group["lr"] = lr
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    out = model(**inputs, labels=batch["labels"], output_router_logits=True)
    k, mask = moe_blocks(model)[0].k, batch.get("attention_mask")
    return out.loss, (out.loss + config.balance * losses.load_balancing_loss(out.router_logits, k, mask)
                      + config.z_loss * losses.router_z_loss(out.router_logits, mask))


def training_step(model, optimizer, batch, step, config):
    """One update, as the kit's Trainer.train_step does it (one process, one micro-batch).

    1. The schedule: every parameter group gets this update's learning rate.
    2. Forward with the router logits, so the MoE's auxiliary losses can be computed from them.
    3. loss = LM + c_bal L_bal + c_z L_z: load balancing keeps experts used (Switch Transformer), the
       z-loss keeps router logits small (ST-MoE). Their weights are small; they shape routing without
       competing with the language-model loss.
    4. backward, then clip the global gradient norm: one bad batch cannot throw the weights far.
    5. AdamW's update (decoupled weight decay on the linear weights, set by the optimizer's groups), then
       zero the gradients for the next step.
    """
    _, loss = scheduled_losses(model, optimizer, batch, step, config)
    return _finish(model, optimizer, loss, loss, config)


def _finish(model, optimizer, backpropagated, loss, config):
    backpropagated.backward()
    nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _without_aux(model, optimizer, batch, step, config):
    lm, full = scheduled_losses(model, optimizer, batch, step, config)
    return _finish(model, optimizer, lm, full, config)        # the auxiliary losses never reach the gradient


def _unclipped(model, optimizer, batch, step, config):
    class NoClip:
        max_grad_norm = float("inf")

        def __getattr__(self, name):
            return getattr(config, name)
    return training_step(model, optimizer, batch, step, NoClip())


def _no_update(model, optimizer, batch, step, config):
    return scheduled_losses(model, optimizer, batch, step, config)[1].detach()


def _peak_lr_always(model, optimizer, batch, step, config):
    class Flat:
        warmup_steps, max_steps, min_lr = 0, 10**9, config.lr

        def __getattr__(self, name):
            return getattr(config, name)
    return training_step(model, optimizer, batch, step, Flat())


def _late_warmup(steps, peak_lr, warmup, total, min_lr):
    t = steps.double()
    return torch.where(t < warmup, peak_lr * t / warmup, lr_schedule(steps, peak_lr, warmup, total, min_lr))


SOLUTIONS = {"05.answer_loss": (answer_loss,), "05.lr_schedule": (lr_schedule,), "05.training_step": (training_step,)}
WRONG = {
    "05.answer_loss": [{"answers": (_no_shift,), "says": "no shift"},
                       {"answers": (lambda logits, ids, a: answer_loss(logits, ids, ~a),), "says": "wrong way round"},
                       {"answers": (lambda logits, ids, a: answer_loss(logits, ids, torch.ones_like(a)),),
                        "says": "every token is counted"},
                       (lambda logits, ids, a: answer_loss(logits, ids, a).item(),)],
    "05.lr_schedule": [{"answers": (_late_warmup,), "says": "one step late"},
                       {"answers": (lambda s, p, w, t, m: lr_schedule(s, p, w, t, 0.0),), "says": "ends at 0"},
                       {"answers": (lambda s, p, w, t, m: lr_schedule(s, p, w, t + 1, m),),
                        "says": "never reaches min_lr"}],
    "05.training_step": [{"answers": (_without_aux,), "says": "auxiliary losses are missing"},
                         {"answers": (_unclipped,), "says": "not clipped"},
                         {"answers": (_no_update,), "says": "no parameter changed"},
                         (_peak_lr_always,)],
}

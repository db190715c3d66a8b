"""Solutions to notebook 08's exercises, with the reasoning behind each step and the mistakes to avoid.

SOLUTIONS maps an exercise to its answers; WRONG lists plausible wrong answers (tests/test_exercises.py
checks that every one of them fails, and that the judge names the mistake where a "says" phrase is given).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------
# 08.lora_linear: y = W x + (alpha / r) B A x, with W frozen.
# ------------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (alpha / r) B A.

    * ``lora_A`` (r, in) starts random and ``lora_B`` (out, r) starts at zero: the product B A is 0,
      so the adapted model starts *exactly* at the base model, and still B gets a gradient (dL/dB =
      dL/dy (A x)^T is not zero because A is not). Both zero would leave both gradients zero forever.
    * ``scale = alpha / r``: the update B A x grows with r (a sum of r terms); dividing by r keeps its
      size, and hence a good learning rate, roughly the same when r changes.
    * The names (``base_layer``, ``lora_A``, ``lora_B``) are peft's, so the same weights load in peft.
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)        # frozen: W never changes in training
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False)   # weight (r, in), kaiming-random
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False)  # weight (out, r)
        nn.init.zeros_(self.lora_B.weight)                        # B = 0: the update starts at zero
        self.scale = alpha / r
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (..., in) -> (..., out)
        y = self.base_layer(x)
        if self.merged:                                           # the update is inside W already
            return y
        return y + self.scale * self.lora_B(self.lora_A(x))      # (..., in) -> (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:                      # (out, in): B (out, r) @ A (r, in)
        return self.scale * self.lora_B.weight @ self.lora_A.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + (alpha / r) B A: one matrix again, no extra work per token when serving. The bias is
        not touched (LoRA adapts the weight only)."""
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the same update out again (exact up to float rounding)."""
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False


class _Unscaled(LoRALinear):
    """Mistake: forgets alpha / r (the update's size then changes with r)."""

    def forward(self, x):
        return self.base_layer(x) + (0 if self.merged else self.lora_B(self.lora_A(x)))


class _RandomB(LoRALinear):
    """Mistake: B drawn random like A, so the adapted model no longer starts at the base model."""

    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        nn.init.normal_(self.lora_B.weight)


class _CountedTwice(LoRALinear):
    """Mistake: merges into W but the forward still adds the update."""

    def forward(self, x):
        return self.base_layer(x) + self.scale * self.lora_B(self.lora_A(x))


class _BaseTrains(LoRALinear):
    """Mistake: forgets to freeze the base layer (full fine-tuning with extra steps)."""

    def __init__(self, base_layer, r, alpha):
        super().__init__(base_layer, r, alpha)
        base_layer.requires_grad_(True)


class _MergeUnscaled(LoRALinear):
    """Mistake: merges B A without alpha / r."""

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.lora_B.weight @ self.lora_A.weight
            self.merged = True


# ------------------------------------------------------------------------------------------------
# 08.reply_logps: log pi(reply | prompt), summed over the reply's tokens (the SFT mask).
# ------------------------------------------------------------------------------------------------
def reply_labels(input_ids, prompt_lengths, attention_mask, first=0):
    """The SFT label mask: a token is a target when it belongs to the reply, i.e. it comes at or after the
    prompt (position >= prompt length) and is a real token (attention_mask 1, not padding)."""
    positions = torch.arange(input_ids.shape[1])                                   # (T,)
    reply = (positions >= prompt_lengths[:, None] + first) & (attention_mask == 1)  # (B, T)
    return torch.where(reply, input_ids, -100)


def reply_logps(logits, input_ids, prompt_lengths, attention_mask):
    """(B,) summed log-probability of each row's reply.

    The model at position t predicts token t + 1, so the logits lose their last position and the
    labels their first: logits[:, :-1] pairs with labels[:, 1:]. A sum, not a mean: DPO compares how
    likely two whole replies are (a mean per token would make a short and a long reply comparable,
    which is a different objective)."""
    labels = reply_labels(input_ids, prompt_lengths, attention_mask)[:, 1:]       # (B, T-1) next tokens
    logps = logits[:, :-1].float().log_softmax(-1)                                 # (B, T-1, V)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)       # (B, T-1); -100 -> id 0, masked
    return (picked * (labels != -100)).sum(-1)                                     # (B,)


def _no_shift(logits, input_ids, prompt_lengths, attention_mask):
    labels = reply_labels(input_ids, prompt_lengths, attention_mask)
    picked = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(-1)


def _with_padding(logits, input_ids, prompt_lengths, attention_mask):
    return reply_logps(logits, input_ids, prompt_lengths, torch.ones_like(attention_mask))


def _with_prompt(logits, input_ids, prompt_lengths, attention_mask):
    return reply_logps(logits, input_ids, torch.zeros_like(prompt_lengths), attention_mask)


def _one_late(logits, input_ids, prompt_lengths, attention_mask):
    return reply_logps(logits, input_ids, prompt_lengths + 1, attention_mask)


# ------------------------------------------------------------------------------------------------
# 08.dpo_loss
# ------------------------------------------------------------------------------------------------
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al., 2023): the implicit reward of a reply is how much more likely training made
    it, beta (log pi - log pi_ref); the loss pushes the chosen reply's reward above the rejected one's.
    F.logsigmoid is the stable form of log(1 / (1 + exp(-m))) (no overflow for a large negative margin)."""
    chosen = beta * (policy_chosen - ref_chosen)                 # (B,)
    rejected = beta * (policy_rejected - ref_rejected)           # (B,)
    return -F.logsigmoid(chosen - rejected).mean()               # () mean over pairs


# ------------------------------------------------------------------------------------------------
# 08.lora_parameters: r (in + out) per adapted layer, summed over the 0.3B's 18 layers.
# ------------------------------------------------------------------------------------------------
def _lora_numbers(r=8, layers=18, hidden=1024, q=16 * 128, kv=2 * 128, inner=3072):
    per_layer = {"q": (hidden, q), "k": (hidden, kv), "v": (hidden, kv), "o": (q, hidden),
                 "gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}
    return layers * sum(r * (fan_in + fan_out) for fan_in, fan_out in per_layer.values())


SOLUTIONS = {"08.lora_linear": (LoRALinear,), "08.reply_logps": (reply_logps,), "08.dpo_loss": (dpo_loss,),
             "08.lora_parameters": (_lora_numbers(),)}
WRONG = {
    "08.lora_linear": [{"answers": (_Unscaled,), "says": "not scaled"},
                       {"answers": (_RandomB,), "says": "lora_B must start at zero"},
                       {"answers": (_CountedTwice,), "says": "counted twice"},
                       {"answers": (_BaseTrains,), "says": "still trainable"},
                       (_MergeUnscaled,)],
    "08.reply_logps": [{"answers": (_no_shift,), "says": "no shift"},
                       {"answers": (_with_padding,), "says": "padding is counted"},
                       {"answers": (_with_prompt,), "says": "prompt is counted"},
                       {"answers": (_one_late,), "says": "off by one"}],
    "08.dpo_loss": [{"answers": (lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, 0 * rc, 0 * rr, beta),),
                     "says": "reference is missing"},
                    {"answers": (lambda pc, pr, rc, rr, beta: dpo_loss(pr, pc, rr, rc, beta),), "says": "swapped"},
                    {"answers": (lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, rc, rr, 1.0),),
                     "says": "beta is missing"},
                    (lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, rc, rr, beta).item(),),
                    {"answers": (lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, rc, rr, beta) * len(pc),),
                     "says": "sum over pairs"}],
    "08.lora_parameters": [(_lora_numbers(layers=1),), (_lora_numbers() * 1.5,), (math.nan,),
                           ("3.0M",)],
}

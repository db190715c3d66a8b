"""Solutions to notebook 08's exercises."""

import math


def lora_parameters(shapes, r):
    return sum(r * (fan_in + fan_out) for fan_out, fan_in in shapes)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    losses = []
    for pc, pr, rc, rr in zip(policy_chosen, policy_rejected, ref_chosen, ref_rejected):
        margin = beta * (pc - rc) - beta * (pr - rr)
        losses.append(math.log1p(math.exp(-margin)))      # -log sigmoid(margin)
    return sum(losses) / len(losses)


def _no_reference(pc, pr, rc, rr, beta):
    return dpo_loss(pc, pr, [0.0] * len(rc), [0.0] * len(rr), beta)


SOLUTIONS = {"08.lora_parameters": (lora_parameters,), "08.dpo_loss": (dpo_loss,)}
WRONG = {"08.lora_parameters": [(lambda shapes, r: sum(r * i * o for o, i in shapes),),
                                (lambda shapes, r: sum(i * o for o, i in shapes),),
                                (lambda shapes, r: sum(r * max(i, o) for o, i in shapes),)],
         "08.dpo_loss": [(_no_reference,),
                         (lambda pc, pr, rc, rr, beta: dpo_loss(pr, pc, rr, rc, beta),),
                         (lambda pc, pr, rc, rr, beta: dpo_loss(pc, pr, rc, rr, 1.0),)]}

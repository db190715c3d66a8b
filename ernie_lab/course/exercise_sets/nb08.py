"""Exercises of notebook 08 (fine-tuning): LoRA's parameter count and the DPO loss."""

import math

from ..exercises import Mismatch, as_number, call, exercise, expect_close, expect_equal


@exercise("08.lora_parameters",
          hint="each adapted layer of shape (out, in) adds A (r, in) and B (out, r): r * (in + out) numbers.")
def lora_parameters(function) -> str:
    cases = [([(192, 192)], 8), ([(192, 64), (576, 192)], 4), ([(1024, 1024)] * 3, 1)]
    for shapes, r in cases:
        expected = sum(r * (i + o) for o, i in shapes)
        got = call(function, list(shapes), r)
        if got == sum(r * i * o for o, i in shapes):
            raise Mismatch("that is r times the full matrix; LoRA adds two thin matrices, r x in and out x r")
        if got == sum(i * o for o, i in shapes):
            raise Mismatch("that is the full weight's size, what full fine-tuning trains")
        if got == sum(r * r for _ in shapes) or got == sum(r * max(i, o) for o, i in shapes):
            raise Mismatch("A is (r, in) and B is (out, r): count both, each with its own width")
        expect_equal(f"trainable numbers of {shapes} at r={r}", got, expected)
    return "r (in + out) per layer: at r = 8 a 1024 x 1024 layer trains 16,384 numbers instead of 1,048,576."


def _dpo(pc, pr, rc, rr, beta):
    margins = [beta * ((a - c) - (b - d)) for a, b, c, d in zip(pc, pr, rc, rr)]
    return sum(math.log1p(math.exp(-m)) for m in margins) / len(margins)


@exercise("08.dpo_loss",
          hint="reward(y) = beta (log pi(y) - log pi_ref(y)); loss = mean of -log sigmoid(reward(chosen) - reward(rejected)).")
def dpo_loss(function) -> str:
    cases = [([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0], 0.5),
             ([-4.0], [-4.0], [-5.0], [-3.0], 0.1), ([-10.0, -1.0, -3.0], [-2.0, -2.0, -9.0], [-6.0, -1.5, -3.0],
                                                   [-2.5, -2.0, -8.0], 1.0)]
    for pc, pr, rc, rr, beta in cases:
        got = as_number(f"DPO loss of case beta={beta}", call(function, list(pc), list(pr), list(rc), list(rr), beta))
        expected = _dpo(pc, pr, rc, rr, beta)
        if abs(got - _dpo(pc, pr, [0.0] * len(rc), [0.0] * len(rr), beta)) < 1e-6 and abs(got - expected) > 1e-6:
            raise Mismatch("the reference is missing: the reward is beta (log pi - log pi_ref), "
                           "how much more likely training made the reply")
        if abs(got - _dpo(pr, pc, rr, rc, beta)) < 1e-6 and abs(got - expected) > 1e-6:
            raise Mismatch("chosen and rejected are swapped: the loss must fall as the chosen reply's reward rises")
        if abs(got - _dpo(pc, pr, rc, rr, 1.0)) < 1e-6 and beta != 1.0 and abs(got - expected) > 1e-6:
            raise Mismatch("beta is missing: it scales the log-ratio (small beta = stay close to the reference)")
        expect_close(f"DPO loss of case beta={beta}", got, expected, rel=1e-5, abs_=1e-6)
    return "At the start policy = reference, every margin is 0 and the loss is log 2 = 0.693."

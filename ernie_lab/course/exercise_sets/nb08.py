"""Exercises of notebook 08 (fine-tuning): a LoRA linear layer, the reply's log-probability under the SFT
mask, the DPO loss, and how many numbers LoRA trains on ERNIE-4.5-0.3B.

Every judge draws fresh inputs (``fresh_generator``) at two or more shapes and compares with the kit
(``ernie_lab.train.lora.LoRALinear``, ``finetune.sequence_logps``, ``finetune.dpo_loss``) and, for the
LoRA layer, with peft's ``lora.Linear`` holding the same weights.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ...model.decoder import IGNORE_INDEX
from ...model.published import CONFIG_0_3B
from ...train import finetune
from ...train.lora import DEFAULT_TARGETS, LoRALinear
from ..exercises import (Mismatch, NotAttempted, as_number, call, exercise, expect_close, expect_tensor,
                         fresh_generator, is_stub_function, name_the_mistake)


# ============================================================================ 08.lora_linear
def _peft_linear(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    """peft's LoRA layer around ``base`` (imported here: peft takes seconds to import)."""
    from peft.tuners.lora import Linear as PeftLinear
    from peft.tuners.lora import LoraConfig

    return PeftLinear(base, "default", config=LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)


def _lora_cases(g: torch.Generator):
    """(base layer, r, alpha, input x) at three shapes: a (B, T, in) input, a bias, an alpha / r that is no integer."""
    cases = []
    for fan_in, fan_out, r, bias, lead in ((12, 20, 4, False, (2, 5)), (7, 3, 2, True, (6,)), (16, 16, 8, True, (1, 3))):
        base = nn.Linear(fan_in, fan_out, bias=bias)
        with torch.no_grad():
            base.weight.copy_(torch.randn(fan_out, fan_in, generator=g))
            if bias:
                base.bias.copy_(torch.randn(fan_out, generator=g))
        alpha = int(torch.randint(1, 33, (1,), generator=g))          # alpha / r rarely a whole number
        cases.append((base, r, alpha, torch.randn(*lead, fan_in, generator=g)))
    return cases


def _adapter_weights(layer, r, fan_in, fan_out) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's A and B weights, checked to be where peft keeps them: lora_A / lora_B linears."""
    for name, shape in (("lora_A", (r, fan_in)), ("lora_B", (fan_out, r))):
        part = getattr(layer, name, None)
        weight = getattr(part, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise Mismatch(f"your layer has no {name}.weight: make self.{name} = nn.Linear(..., bias=False) "
                           f"(peft's names, so the kit and peft can read it)")
        if tuple(weight.shape) != shape:
            raise Mismatch(f"{name}.weight has shape {tuple(weight.shape)}, expected {shape} "
                           f"({'(r, in)' if name == 'lora_A' else '(out, r)'})")
    return layer.lora_A.weight, layer.lora_B.weight


def _method(layer, name: str):
    method = getattr(layer, name, None)
    if not callable(method):
        raise Mismatch(f"your layer has no {name}() method")
    if is_stub_function(method):
        raise Mismatch(f"{name}() has no body yet (write it: the notebook merges before serving)")
    try:
        method()
    except Exception as err:  # noqa: BLE001  (the student's code may raise anything)
        raise Mismatch(f"{name}() raised {type(err).__name__}: {err}") from err


def _forward(layer, x) -> torch.Tensor:
    with torch.no_grad():
        return call(layer, x)


@exercise("08.lora_linear",
          hint="keep base_layer and freeze it; lora_A = nn.Linear(in, r, bias=False) kaiming-random, lora_B = "
               "nn.Linear(r, out, bias=False) zeros, scale = alpha / r; forward: base(x) + scale * B(A(x)) "
               "(the base alone once merged); merge adds scale * B.weight @ A.weight to base.weight, unmerge "
               "subtracts it.")
def lora_linear(layer_class) -> str:
    g = fresh_generator()
    for base, r, alpha, x in _lora_cases(g):
        fan_out, fan_in = base.weight.shape
        kit, peft = LoRALinear(copy.deepcopy(base), r, alpha), _peft_linear(copy.deepcopy(base), r, alpha)
        plain = copy.deepcopy(base)                                   # the judge's own copy of W and b
        layer = call(layer_class, base, r, alpha)
        if not isinstance(layer, nn.Module):
            raise Mismatch(f"LoRALinear(base, r, alpha) should build an nn.Module, got a {type(layer).__name__}")
        if is_stub_function(getattr(type(layer), "forward", None)):
            raise NotAttempted
        a, b = _adapter_weights(layer, r, fan_in, fan_out)
        _check_start(layer, plain, a, b, x)
        with torch.no_grad():                                          # the same trained-looking A, B everywhere
            new_a, new_b = torch.randn(r, fan_in, generator=g), torch.randn(fan_out, r, generator=g)
            for a_part, b_part in ((layer.lora_A, layer.lora_B), (kit.lora_A, kit.lora_B),
                                   (peft.lora_A["default"], peft.lora_B["default"])):
                a_part.weight.copy_(new_a)
                b_part.weight.copy_(new_b)
        expected = _forward(kit, x)
        expect_tensor(f"kit vs peft (in={fan_in}, out={fan_out}, r={r})", _forward(peft, x), expected, atol=1e-4)
        got = _forward(layer, x)
        _diagnose_scale(got, plain, new_a, new_b, x, r, alpha)
        expect_tensor(f"your layer's output (in={fan_in}, out={fan_out}, r={r}, alpha={alpha})", got, expected,
                      atol=1e-4)
        _check_merge(layer, plain, kit.delta_weight().detach(), expected, x)
    return ("The same numbers as the kit's LoRALinear and peft's lora.Linear; the notebook adapts the model "
            "with your class.")


def _check_start(layer, plain, a, b, x) -> None:
    """B starts at zero (the adapted layer *is* the base), A random, only A and B trainable."""
    if not torch.equal(b.detach(), torch.zeros_like(b)):
        raise Mismatch("lora_B must start at zero, so that the adapted layer starts exactly at the base model")
    if torch.equal(a.detach(), torch.zeros_like(a)):
        raise Mismatch("lora_A must start random: with A = 0 and B = 0 neither gets a gradient, nothing trains")
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    if trainable != {id(a), id(b)}:
        base_weight = getattr(getattr(layer, "base_layer", None), "weight", None)
        if base_weight is not None and id(base_weight) in trainable:
            raise Mismatch("the base layer's weight is still trainable: freeze it (requires_grad_(False))")
        raise Mismatch("only lora_A.weight and lora_B.weight should be trainable")
    with torch.no_grad():
        expect_tensor("your layer at the start (B = 0: the base's output)", call(layer, x), plain(x), atol=1e-5)


def _diagnose_scale(got, plain, a, b, x, r, alpha) -> None:
    """Name a wrong scale only when the output is exactly what that scale gives."""
    with torch.no_grad():
        base, update = plain(x), x @ a.T @ b.T                          # (..., out) each; update = B A x
        mistakes = {"the update is not scaled: multiply B(A(x)) by alpha / r": base + update,
                    "you scale by alpha; LoRA scales by alpha / r": base + float(alpha) * update,
                    "the scale is upside down: alpha / r, not r / alpha": base + r / alpha * update}
        name_the_mistake(got, base + alpha / r * update, mistakes, atol=1e-4)


def _check_merge(layer, plain, delta, expected, x) -> None:
    """merge: W + (alpha / r) B A in the base weight, the output unchanged; unmerge: W back."""
    base = getattr(layer, "base_layer", None)
    if not isinstance(getattr(base, "weight", None), torch.Tensor):
        raise Mismatch("keep the wrapped layer as self.base_layer (merge writes into its weight)")
    _method(layer, "merge")
    expect_tensor("base_layer.weight after merge (W + alpha / r * B @ A)", base.weight.detach(),
                  plain.weight + delta, atol=1e-4)
    merged = _forward(layer, x)
    if torch.allclose(merged, 2 * expected - plain(x).detach(), atol=1e-4):
        raise Mismatch("after merge your forward still adds the update: it is counted twice (once merged)")
    expect_tensor("your output after merge", merged, expected, atol=1e-4)
    _method(layer, "unmerge")
    expect_tensor("base_layer.weight after unmerge (W again)", base.weight.detach(), plain.weight, atol=1e-5)
    expect_tensor("your output after unmerge", _forward(layer, x), expected, atol=1e-4)
    if base.bias is not None:
        expect_tensor("the base's bias after merge and unmerge (LoRA leaves it alone)", base.bias.detach(),
                      plain.bias, atol=1e-6)


# ============================================================================ 08.reply_logps
def _reply_batch(g: torch.Generator, rows: int, width: int, vocab: int):
    """Right-padded conversations: prompt lengths and real lengths differ per row, every reply >= 2 tokens."""
    lengths = torch.randint(width - 3, width + 1, (rows,), generator=g)                 # (B,) real tokens
    lengths[0], lengths[-1] = width, width - 2                                          # unpadded, padded
    prompts = torch.stack([torch.randint(1, int(n) - 1, (1,), generator=g)[0] for n in lengths])  # (B,)
    positions = torch.arange(width)                                                     # (T,)
    attention_mask = (positions < lengths[:, None]).long()                              # (B, T)
    ids = torch.randint(0, vocab, (rows, width), generator=g) * attention_mask          # padding id 0
    logits = torch.randn(rows, width, vocab, generator=g) * 3                          # (B, T, V)
    return logits, ids, prompts, attention_mask


def reply_labels(ids, prompt_lengths, attention_mask, first: int = 0) -> torch.Tensor:
    """(B, T) labels of SFT: the reply's tokens, -100 on the prompt and the padding (``first`` shifts the
    start, to build the off-by-one mistake)."""
    positions = torch.arange(ids.shape[1])                                              # (T,)
    reply = (positions >= prompt_lengths[:, None] + first) & (attention_mask == 1)      # (B, T)
    return torch.where(reply, ids, IGNORE_INDEX)


def kit_reply_logps(logits, ids, labels) -> torch.Tensor:
    """The kit's summed reply log-probability (``finetune.sequence_logps``) of given logits."""
    as_model = lambda **inputs: SimpleNamespace(logits=logits)   # noqa: E731  (the logits stand in for a model)
    return finetune.sequence_logps(as_model, {"input_ids": ids, "labels": labels})


@exercise("08.reply_logps",
          hint="labels = ids on the reply (position >= prompt length and attention_mask 1), -100 elsewhere; "
               "logits[:, t] predicts token t + 1, so gather log_softmax(logits[:, :-1]) at ids[:, 1:] and sum "
               "over the positions whose label (labels[:, 1:]) is not -100.")
def reply_logps(function) -> str:
    g = fresh_generator()
    for rows, width, vocab in ((3, 9, 11), (2, 6, 7), (4, 12, 5)):
        logits, ids, prompts, mask = _reply_batch(g, rows, width, vocab)
        expected = kit_reply_logps(logits, ids, reply_labels(ids, prompts, mask))
        got = call(function, logits, ids, prompts, mask)
        _diagnose_reply(got, logits, ids, prompts, mask, expected)
        expect_tensor(f"reply log-probabilities of a ({rows}, {width}) batch", got, expected, atol=1e-4)
    return "These (B,) sums are what DPO compares: the SFT mask decides which tokens belong to the reply."


def _diagnose_reply(got, logits, ids, prompts, mask, expected) -> None:
    if not (isinstance(got, torch.Tensor) and got.shape == ids.shape[:1] and torch.isfinite(got).all()):
        return
    token_logps = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)    # (B, T) unshifted
    labels = reply_labels(ids, prompts, mask)
    mistakes = {
        "no shift: logits[:, t] predicts token t + 1, not token t": (token_logps * (labels != IGNORE_INDEX)).sum(-1),
        "the prompt is counted: only the reply's tokens carry the SFT label": kit_reply_logps(
            logits, ids, torch.where(mask == 1, ids, IGNORE_INDEX)),
        "the padding is counted: attention_mask 0 marks positions that are not there": kit_reply_logps(
            logits, ids, reply_labels(ids, prompts, torch.ones_like(mask))),
        "off by one: the reply starts at position prompt_length (its first token is labelled too)": kit_reply_logps(
            logits, ids, reply_labels(ids, prompts, mask, first=1)),
    }
    name_the_mistake(got, expected, mistakes, atol=1e-4)
    labels_next = labels[:, 1:] != IGNORE_INDEX                                         # (B, T-1)
    mean = kit_reply_logps(logits, ids, labels) / labels_next.sum(-1)
    if torch.allclose(got.double(), mean.double(), atol=1e-4):
        raise Mismatch("that is the mean per token; DPO compares the summed log-probability of each reply")


# ============================================================================ 08.dpo_loss
def _logps(g, rows) -> torch.Tensor:
    return -30 * torch.rand(rows, generator=g) - 1                                     # (B,) summed log-probs


@exercise("08.dpo_loss",
          hint="reward(y) = beta (log pi(y) - log pi_ref(y)); margin = reward(chosen) - reward(rejected); "
               "loss = mean over pairs of -log sigmoid(margin) (F.logsigmoid), returned as a 0-d tensor.")
def dpo_loss(function) -> str:
    g = fresh_generator()
    for rows in (5, 2, 8):
        pc, pr, rc, rr = (_logps(g, rows) for _ in range(4))
        if rows == 2:
            rc, rr = pc.clone(), pr.clone()                                            # policy = reference
        beta = float(torch.empty(1).uniform_(0.05, 0.9, generator=g))
        expected, _ = finetune.dpo_loss(pc, pr, rc, rr, beta)
        got = call(function, pc, pr, rc, rr, beta)
        _diagnose_dpo(got, pc, pr, rc, rr, beta, expected)
        expect_tensor(f"DPO loss of {rows} pairs at beta {beta:.3f}", got, expected, atol=1e-5)
    return "At the start policy = reference, every margin is 0 and the loss is log 2 = 0.693."


def _diagnose_dpo(got, pc, pr, rc, rr, beta, expected) -> None:
    if not (isinstance(got, torch.Tensor) and got.shape == () and torch.isfinite(got).all()):
        return
    zero = torch.zeros_like(rc)
    margin = beta * ((pc - rc) - (pr - rr))
    mistakes = {
        "the reference is missing: the reward is beta (log pi - log pi_ref)": finetune.dpo_loss(pc, pr, zero, zero, beta)[0],
        "chosen and rejected are swapped: the loss must fall as the chosen reply's reward rises":
            finetune.dpo_loss(pr, pc, rr, rc, beta)[0],
        "beta is missing: it scales the log-ratio (small beta = stay close to the reference)":
            finetune.dpo_loss(pc, pr, rc, rr, 1.0)[0],
        "that is the sum over pairs; take the mean": -F.logsigmoid(margin).sum(),
        "the sign is flipped inside: -log sigmoid(margin), not -log sigmoid(-margin)": -F.logsigmoid(-margin).mean(),
    }
    name_the_mistake(got, expected, mistakes, atol=1e-5)


# ============================================================================ 08.lora_parameters
def count_0_3b(per_layer) -> int:
    """``per_layer(in, out)`` summed over every q, k, v, o, gate, up and down projection of ERNIE-4.5-0.3B."""
    c = CONFIG_0_3B
    h, inner, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),   # (in, out)
              "gate_proj": (h, inner), "up_proj": (h, inner), "down_proj": (inner, h)}
    assert set(shapes) == set(DEFAULT_TARGETS)
    return c["num_hidden_layers"] * sum(per_layer(fan_in, fan_out) for fan_in, fan_out in shapes.values())


@exercise("08.lora_parameters",
          hint="each adapted layer of shape (out, in) adds A (r, in) and B (out, r): r (in + out) numbers; the "
               "0.3B has 18 layers, q: 1024 -> 2048, k and v: 1024 -> 256, o: 2048 -> 1024, gate and up: "
               "1024 -> 3072, down: 3072 -> 1024.")
def lora_parameters(count) -> str:
    r = 8
    expected = count_0_3b(lambda fan_in, fan_out: r * (fan_in + fan_out))
    got = as_number("trainable LoRA numbers", count)
    mistakes = {
        "that is one decoder layer; the 0.3B has 18": expected // 18,
        "that counts A only; B (out, r) trains too": count_0_3b(lambda fan_in, fan_out: r * fan_in),
        "that is the full weights' size, what full fine-tuning trains": count_0_3b(lambda i, o: i * o),
        "that is r times the full matrices; LoRA adds two thin ones, r x in and out x r":
            count_0_3b(lambda i, o: r * i * o),
    }
    for mistake, value in mistakes.items():
        if got == value:
            raise Mismatch(mistake)
    expect_close("trainable LoRA numbers of the 0.3B at r = 8", got, expected, rel=0.0, abs_=0.5)
    return (f"{expected:,} numbers, under 1% of the 0.3B's 360.7 M: the adapter file is about "
            f"{expected * 4 / 1e6:.0f} MB in float32.")


def kit_reply(logits, input_ids, prompt_lengths, attention_mask) -> torch.Tensor:
    """The kit's answer to 08.reply_logps (what the notebook uses until the student's is written)."""
    return kit_reply_logps(logits, input_ids, reply_labels(input_ids, prompt_lengths, attention_mask))

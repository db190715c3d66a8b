"""Exercises of notebook 02 (mixture of experts): the router with its correction bias, sorted dispatch, the
whole MoE block, one token's share of a layer, the balancing loss and balancing by the bias alone.

Every judge draws fresh inputs (`fresh_generator`) at two or more shapes and builds them so that the
shortcuts a student plausibly takes give a different answer: the correction bias changes some tokens'
choice (so ignoring it, or weighing with it, fails), `norm_min` sits at the median of the chosen mass
(so the clamp matters for half the tokens), one expert stays idle in dispatch, token counts are never a
multiple of the expert count (no expert's load can sit exactly on the mean). A mistake is named only when
the answer equals that mistake's output on the same inputs; otherwise the message says what differs.
"""

import copy
import functools

import torch
from torch import nn

from ..exercises import (Mismatch, NotAttempted, as_number, call, exercise, expect_close, expect_equal,
                         expect_tensor, fresh_generator)
from ...model.config import ErnieConfig
from ...model.moe import MoEBlock, dispatch, moe_blocks, route
from ..notebook import cpu_settings


def _one_thread(judge):
    """Run a judge on one CPU thread: its matrices are tiny, and on a busy machine two threads that wait
    on each other made a check of a few milliseconds take seconds."""
    @functools.wraps(judge)
    def run(*answers):
        with cpu_settings(threads=1, flush_denormal=False):
            return judge(*answers)
    return run


@exercise("02.active_per_layer",
          hint="the router weight is (experts x hidden), plus one correction bias per expert; each chosen expert "
               "is a SwiGLU of three hidden x width matrices; 300B-A47B: hidden 8192, 64 experts of width 3584, top-8.")
def active_per_layer(count) -> str:
    from ...model.published import CONFIG_300B_A47B
    from ...model.config import parse_config

    with torch.device("meta"):
        block = MoEBlock(parse_config(CONFIG_300B_A47B), layer_idx=3)
    router = block.gate.weight.numel() + block.moe_statics.e_score_correction_bias.numel()
    one_expert = sum(p.numel() for p in block.experts[0].parameters())
    expected = router + block.k * one_expert
    if count == block.k * one_expert:
        raise Mismatch("you counted the experts but not the router (weight and correction bias)")
    if count == router + len(block.experts) * one_expert:
        raise Mismatch("that is the whole layer: a token uses only the k = 8 experts it is routed to")
    expect_equal("parameters one token uses in one MoE layer", count, expected)
    total = sum(p.numel() for p in block.parameters())
    return f"{expected:,} of the layer's {total:,} ({expected / total:.0%})."


# ------------------------------------------------------------------------------------------------
# 02.route: softmax over all experts, choose with the bias, weigh without it, renormalise with a clamp
# ------------------------------------------------------------------------------------------------

def _choice_changing_bias(probs: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """(E,) a correction bias that changes the chosen set of some tokens (not all): the case that tells
    "choose with the bias" from "ignore it"."""
    plain = probs.topk(k, dim=-1).indices.sort(-1).values
    for scale in (0.05, 0.1, 0.2, 0.4, 0.8, 1.6):
        bias = (torch.rand(probs.shape[1], generator=g) * 2 - 1) * scale
        biased = (probs + bias).topk(k, dim=-1).indices.sort(-1).values
        changed = (biased != plain).any(-1)
        if 0 < int(changed.sum()) < probs.shape[0]:
            return bias
    bias = torch.zeros(probs.shape[1])
    bias[probs.mean(0).argmin()] = 2.0                    # lifts the least likely expert into every choice
    return bias


def _router_cases(g: torch.Generator) -> list[dict]:
    """Three routing problems: (tokens, experts, k, hidden) differ, one in bfloat16, one whose norm_min
    clamps half the tokens (the median chosen mass)."""
    cases = []
    for n, e, k, h, dtype in ((7, 8, 2, 16, torch.float32), (12, 6, 3, 8, torch.float32), (9, 16, 4, 12, torch.bfloat16)):
        x = torch.randn(n, h, generator=g)                                     # (N, H) tokens
        weight = torch.randn(e, h, generator=g) * (1.5 / h ** 0.5)             # (E, H) router weight
        logits = x @ weight.T                                                  # (N, E)
        bias = _choice_changing_bias(logits.softmax(-1), k, g)
        norm_min = 1e-12
        if k == 3:                                   # clamp at the median chosen mass: half the rows are clamped
            kit = route(logits, k, 1e-12, bias)
            norm_min = float(kit.probs.gather(-1, kit.expert_ids).sum(-1).median()) + 1e-4
        cases.append(dict(x=x, weight=weight, logits=logits.to(dtype), k=k, bias=bias, norm_min=norm_min))
    return cases


def _transformers_router(case: dict):
    """transformers' Ernie4_5_MoeTopKRouter on the same router weight and bias (None when not installed)."""
    try:
        from transformers import Ernie4_5_MoeConfig
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter
    except ImportError:
        return None
    e, h = case["weight"].shape
    router = Ernie4_5_MoeTopKRouter(Ernie4_5_MoeConfig(hidden_size=h, moe_num_experts=e, moe_k=case["k"],
                                                       moe_norm_min=case["norm_min"]))
    with torch.no_grad():
        router.weight.copy_(case["weight"])
        router.moe_statics.e_score_correction_bias.copy_(case["bias"][None])
        _, weights, ids = router(case["x"])
    return ids, weights


def _by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k choices of each token listed in expert order: the order of the k slots does not matter."""
    ids_sorted, order = ids.long().sort(dim=-1)
    return ids_sorted, weights.gather(-1, order)


def _same_routing(got, expected, atol: float = 1e-5) -> bool:
    (gi, gw), (ei, ew) = _by_expert(*got), _by_expert(*expected)
    return torch.equal(gi, ei) and bool(torch.allclose(gw.double(), ew.double(), atol=atol))


def _routing_mistakes(case: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """What the usual mistakes return on this case: (expert_ids, weights) each."""
    logits, k, bias, norm_min = case["logits"], case["k"], case["bias"], case["norm_min"]
    probs = logits.float().softmax(-1)                                        # (N, E)

    def renormalised(ids, scores, clamp=True):
        chosen = scores.gather(-1, ids)                                       # (N, k)
        total = chosen.sum(-1, keepdim=True)
        return ids, chosen / (total.clamp(min=norm_min) if clamp else total)

    biased_ids = (probs + bias).topk(k, dim=-1).indices
    mistakes = {
        "you ignore the correction bias: it takes part in the choice (top-k of p + b)":
            renormalised(probs.topk(k, dim=-1).indices, probs),
        "you weigh with the biased scores p + b: the bias only chooses, the weights are the unbiased p":
            renormalised(biased_ids, probs + bias),
        "you add the bias to the logits: ERNIE adds it to the softmax probabilities":
            renormalised((logits.float() + bias).topk(k, dim=-1).indices, probs),
        "the weights are not renormalised: divide the k chosen probabilities by their sum":
            (biased_ids, probs.gather(-1, biased_ids)),
        "you divide by the plain sum: clamp it below, max(sum, norm_min)":
            renormalised(biased_ids, probs, clamp=False),
    }
    if logits.dtype != torch.float32:
        low = logits.softmax(-1)                                              # softmax in the logits' bf16
        low_ids = (low + bias.to(low.dtype)).topk(k, dim=-1).indices
        chosen = low.gather(-1, low_ids)
        mistakes["the softmax ran in bfloat16: ERNIE's router computes in float32 (logits.float())"] = \
            (low_ids, (chosen / chosen.sum(-1, keepdim=True).clamp(min=norm_min)).float())
    return mistakes


def _check_routing(label: str, got, case: dict, expected) -> None:
    n, k = expected[0].shape
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise Mismatch(f"{label}: return two tensors, (expert_ids, weights); got {_describe(got)}")
    ids, weights = got
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise Mismatch(f"{label}: expert_ids must be an integer tensor (as topk(...).indices), got {_describe(ids)}")
    if ids.shape != (n, k):
        raise Mismatch(f"{label}: expert_ids has shape {tuple(ids.shape)}, expected ({n}, {k}): k experts per token")
    expect_tensor(f"{label}: weights", weights, expected[1], atol=float("inf"))    # a finite float (N, k) tensor
    if weights.dtype == torch.float32 and _same_routing((ids, weights), expected):
        return
    matching = [mistake for mistake, answer in _routing_mistakes(case).items()
                if _same_routing((ids, weights), answer, atol=1e-6)]
    if matching:          # on these inputs two mistakes can give the same answer: name each
        raise Mismatch(f"{label}: " + "; or ".join(matching) + ".")
    if weights.dtype != torch.float32:
        raise Mismatch(f"{label}: the weights are {weights.dtype}; the router works in float32 even for "
                       f"{case['logits'].dtype} logits")
    (gi, gw), (ei, ew) = _by_expert(ids, weights), _by_expert(*expected)
    wrong_rows = (gi != ei).any(-1)
    if wrong_rows.any():
        row = int(wrong_rows.nonzero()[0])
        raise Mismatch(f"{label}: token {row} should go to experts {ei[row].tolist()}, yours go to {gi[row].tolist()} "
                       f"({int(wrong_rows.sum())} of {n} tokens chose other experts)")
    raise Mismatch(f"{label}: the right experts, but the weights differ by up to "
                   f"{(gw.double() - ew.double()).abs().max().item():.3g}")


def _describe(value) -> str:
    from ..exercises import describe
    return describe(value)


@exercise("02.route",
          hint="p = logits.float().softmax(-1) over ALL experts; ids = (p + correction_bias).topk(k).indices; "
               "w = p.gather(-1, ids) (the unbiased p); w / w.sum(-1, keepdim=True).clamp(min=norm_min); "
               "return (ids, w).")
@_one_thread
def route_exercise(function) -> str:
    cases = _router_cases(fresh_generator())
    compared_with_transformers = 0
    for i, case in enumerate(cases):
        n, e = case["logits"].shape
        label = f"{n} tokens, {e} experts, k = {case['k']}, {str(case['logits'].dtype).replace('torch.', '')} logits"
        got = call(function, case["logits"], case["k"], case["bias"], case["norm_min"])
        kit = route(case["logits"], case["k"], case["norm_min"], case["bias"])
        _check_routing(label, got, case, (kit.expert_ids, kit.weights))
        reference = _transformers_router(case) if case["logits"].dtype == torch.float32 else None
        if reference is not None:
            _check_routing(f"{label} (against transformers' router)", got, case, reference)
            compared_with_transformers += 1
    also = f" and transformers' Ernie4_5_MoeTopKRouter ({compared_with_transformers} of them)" \
        if compared_with_transformers else ""
    return (f"Matches ernie_lab.moe.route on {len(cases)} fresh routing problems{also}, bias changing some "
            "choices, the clamp active for half the tokens of one of them.")


# ------------------------------------------------------------------------------------------------
# 02.dispatch: group the (token, slot) pairs by expert, run each expert once, put back, weigh
# ------------------------------------------------------------------------------------------------

class _CountingExpert(nn.Module):
    """Wraps an expert and counts the rows of each call that has any."""

    def __init__(self, expert: nn.Module):
        super().__init__()
        self.expert, self.calls = expert, []

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape[0]:
            self.calls.append(rows.shape[0])
        return self.expert(rows)


def _swiglu_experts(count: int, hidden: int, width: int, g: torch.Generator) -> list[nn.Module]:
    from ...model.mlp import SwiGLU

    experts = [SwiGLU(hidden, width) for _ in range(count)]
    with torch.no_grad():
        for p in (p for expert in experts for p in expert.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return experts


def _dispatch_case(n: int, hidden: int, e: int, k: int, g: torch.Generator) -> dict:
    """n tokens, each to k distinct experts out of e - 1 (one expert is idle); weights not summing to 1."""
    idle = int(torch.randint(e, (1,), generator=g))
    busy = torch.tensor([x for x in range(e) if x != idle])
    ids = torch.stack([busy[torch.randperm(e - 1, generator=g)[:k]] for _ in range(n)])   # (N, k)
    return dict(x=torch.randn(n, hidden, generator=g), ids=ids, weights=torch.rand(n, k, generator=g) + 0.1,
                experts=_swiglu_experts(e, hidden, 6, g), idle=idle)


def _dispatch_mistakes(case: dict) -> dict[str, torch.Tensor]:
    x, ids, weights, experts = case["x"], case["ids"], case["weights"], case["experts"]
    n, k = ids.shape
    pairs = ids.reshape(-1)
    order = pairs.argsort(stable=True)
    counts = torch.bincount(pairs, minlength=len(experts)).tolist()
    y_sorted = torch.cat([experts[e](rows) for e, rows in enumerate(x.index_select(0, order // k).split(counts))
                          if counts[e]])                                   # (N*k, H) in expert order
    in_pair_order = y_sorted.index_select(0, order.argsort()).view(n, k, -1)
    return {
        "the mixing weights are missing: multiply each expert's output by its weight before adding":
            in_pair_order.sum(1),
        "the outputs are still in expert order: put them back in (token, slot) order before adding":
            (y_sorted.view(n, k, -1) * weights[..., None]).sum(1),
        "each output is weighted with another slot's weight: weights[t, j] belongs to expert_ids[t, j]":
            (in_pair_order * weights.flip(-1)[..., None]).sum(1),
        "you average the k outputs: the weights already mix them, add the weighted outputs":
            (in_pair_order * weights[..., None]).mean(1),
    }


@exercise("02.dispatch",
          hint="pairs = expert_ids.reshape(-1); order = pairs.argsort(stable=True); counts = torch.bincount(pairs, "
               "minlength=len(experts)); rows = x[order // k] split by counts, each expert called once on its "
               "slice; put the outputs back with order.argsort(), view (N, k, H), weigh and sum over k.")
@_one_thread
def dispatch_exercise(function) -> str:
    g = fresh_generator()
    for n, hidden, e, k in ((9, 8, 5, 2), (14, 12, 7, 3), (1, 4, 3, 2)):
        case = _dispatch_case(n, hidden, e, k, g)
        counting = [_CountingExpert(expert) for expert in case["experts"]]
        label = f"{n} token(s), {e} experts, k = {k}"
        with torch.no_grad():
            got = call(function, case["x"], case["ids"], case["weights"], counting)
            expected = dispatch(case["x"], case["ids"], case["weights"], case["experts"])
            if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.is_floating_point()
                    and torch.allclose(got, expected, atol=1e-5)):
                for mistake, answer in _dispatch_mistakes(case).items():
                    if isinstance(got, torch.Tensor) and got.shape == answer.shape and got.is_floating_point() \
                            and torch.allclose(got, answer, atol=1e-6):
                        raise Mismatch(f"{label}: {mistake}.")
            expect_tensor(f"{label}: output", got, expected, atol=1e-5)
        loads = torch.bincount(case["ids"].reshape(-1), minlength=e).tolist()
        for index, expert in enumerate(counting):
            if len(expert.calls) > 1:
                raise Mismatch(f"{label}: expert {index} ran {len(expert.calls)} times (on {expert.calls} rows): "
                               f"group its {loads[index]} tokens and run it once on all of them")
            if expert.calls and expert.calls[0] != loads[index]:
                raise Mismatch(f"{label}: expert {index} ran on {expert.calls[0]} rows but {loads[index]} tokens "
                               "chose it: run each expert on exactly the tokens routed to it")
            if not expert.calls and loads[index]:
                raise Mismatch(f"{label}: expert {index} never ran, yet {loads[index]} tokens chose it")
    return "Each expert ran once, on all of its tokens, and the output equals ernie_lab.moe.dispatch."


# ------------------------------------------------------------------------------------------------
# 02.moe_block: route, dispatch, shared experts, for a whole (B, T, H) batch
# ------------------------------------------------------------------------------------------------

class _NoForward(RuntimeError):
    pass


def _block_case(batch: int, length: int, hidden: int, e: int, k: int, shared: int, g: torch.Generator) -> dict:
    """A MoE block with fresh weights, a correction bias that changes some choices, and (B, T, H) inputs."""
    config = ErnieConfig(model_type="ernie4_5_moe", hidden_size=hidden, moe_num_experts=e, moe_k=k,
                         moe_intermediate_size=8, moe_num_shared_experts=shared)
    block = MoEBlock(config, layer_idx=1).eval()
    x = torch.randn(batch, length, hidden, generator=g)
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        block.gate.weight.mul_(2.0)
        probs = (x.reshape(-1, hidden) @ block.gate.weight.T).softmax(-1)
        block.moe_statics.e_score_correction_bias.copy_(_choice_changing_bias(probs, k, g)[None])
    return dict(x=x, block=block)


def _transformers_block(block: MoEBlock):
    """transformers' Ernie4_5_MoeSparseMoeBlock holding the same weights (None when not installed)."""
    try:
        from transformers import Ernie4_5_MoeConfig
        from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock
    except ImportError:
        return None
    width = block.experts[0].gate_proj.weight.shape[0]
    shared = 0 if block.shared_experts is None else block.shared_experts.gate_proj.weight.shape[0] // width
    reference = Ernie4_5_MoeSparseMoeBlock(Ernie4_5_MoeConfig(
        hidden_size=block.gate.weight.shape[1], moe_num_experts=block.num_experts, moe_k=block.k,
        moe_intermediate_size=width, moe_num_shared_experts=shared, moe_norm_min=block.norm_min,
        experts_implementation="eager")).eval()
    with torch.no_grad():
        reference.gate.weight.copy_(block.gate.weight)
        reference.gate.moe_statics.e_score_correction_bias.copy_(block.moe_statics.e_score_correction_bias)
        for e, expert in enumerate(block.experts):
            reference.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            reference.experts.down_proj[e].copy_(expert.down_proj.weight)
        if shared:
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(reference.shared_experts, name).weight.copy_(getattr(block.shared_experts, name).weight)
    return reference


def _block_mistakes(x: torch.Tensor, block: MoEBlock) -> dict[str, torch.Tensor]:
    tokens = x.reshape(-1, x.shape[-1])                                        # (N, H)
    logits = block.gate(tokens)                                                # (N, E) float32
    bias = block.moe_statics.e_score_correction_bias[0]
    shared = block.shared_experts(tokens) if block.shared_experts is not None else torch.zeros_like(tokens)

    def routed(correction_bias):
        _, ids, weights = route(logits, block.k, block.norm_min, correction_bias)
        return dispatch(tokens, ids, weights, block.experts)

    mistakes = {"the correction bias is missing from the choice": routed(None) + shared}
    if block.shared_experts is not None:
        mistakes["the shared experts are missing: every token passes through them, added unscaled"] = routed(bias)
        mistakes["the shared experts are scaled: they are added as they are, no router weight"] = \
            routed(bias) + shared / 2
    return {mistake: y.view(x.shape) for mistake, y in mistakes.items()}


def _switched_off(block: MoEBlock) -> MoEBlock:
    """A copy of the block whose own forward refuses to run: the answer must build the block from its parts."""
    copied = copy.deepcopy(block)

    def refuse(*args, **kwargs):
        raise _NoForward("this block's own forward is switched off in the check: compute the output from "
                         "block.gate, block.moe_statics, block.experts and block.shared_experts")
    copied.forward = refuse
    return copied


@exercise("02.moe_block",
          hint="tokens = x.reshape(-1, H); logits = tokens.float() @ block.gate.weight.T; route them with the "
               "correction bias block.moe_statics.e_score_correction_bias[0], k = block.k, norm_min = "
               "block.norm_min; dispatch to block.experts; add block.shared_experts(tokens) when it is not None; "
               "reshape back to x.shape.")
@_one_thread
def moe_block_exercise(function) -> str:
    g = fresh_generator()
    with_transformers = 0
    for batch, length, hidden, e, k, shared in ((2, 5, 16, 6, 2, 2), (1, 7, 12, 8, 3, 0), (3, 3, 8, 5, 1, 1)):
        case = _block_case(batch, length, hidden, e, k, shared, g)
        x, block = case["x"], case["block"]
        label = f"x of shape {tuple(x.shape)}, {e} experts, k = {k}, {shared} shared"
        with torch.no_grad():
            got = call(function, x, _switched_off(block))
            expected = block(x).hidden
            reference = _transformers_block(block)
            if reference is not None:
                theirs = reference(x)
                assert torch.allclose(theirs, expected, atol=1e-5), "ernie_lab's MoEBlock drifted from transformers"
                with_transformers += 1
            if isinstance(got, torch.Tensor) and got.shape == expected.shape and got.is_floating_point() \
                    and not torch.allclose(got, expected, atol=1e-5):
                for mistake, answer in _block_mistakes(x, block).items():
                    if torch.allclose(got, answer, atol=1e-6):
                        raise Mismatch(f"{label}: {mistake}.")
            expect_tensor(f"{label}: output", got, expected, atol=1e-5)
    also = " and transformers' Ernie4_5_MoeSparseMoeBlock" if with_transformers else ""
    return f"Equal to ernie_lab's MoEBlock{also} on the same weights, with and without shared experts."


# ------------------------------------------------------------------------------------------------
# 02.switch_loss: E * sum_e f_e P_e, differentiable through P
# ------------------------------------------------------------------------------------------------

def _routing_case(g: torch.Generator, n: int, e: int, k: int):
    logits = torch.randn(n, e, generator=g) * 1.5
    logits[:, int(torch.randint(e, (1,), generator=g))] += 1.0   # one popular expert: the loss is above its minimum
    probs = logits.softmax(-1)                                   # (N, E)
    return logits, probs, probs.topk(k, dim=-1).indices          # (N, k)


@exercise("02.switch_loss",
          hint="f_e = (number of tokens that chose expert e) / N, P_e = mean router probability of e over the N "
               "tokens; the loss is E * sum_e f_e * P_e (uniform routing gives k, collapse onto k experts gives E); "
               "return it as a tensor, so that it can be backpropagated through P.")
@_one_thread
def switch_loss(function) -> str:
    from ...train.losses import load_balancing_loss

    g = fresh_generator()
    for n, e, k in ((40, 8, 2), (17, 5, 1), (23, 12, 3)):
        logits, probs, ids = _routing_case(g, n, e, k)
        label = f"balancing loss ({n} tokens, {e} experts, k = {k})"
        got = call(function, probs, ids)
        expected = load_balancing_loss(logits, k=k).item()
        value = as_number(label, got)
        if k > 1 and abs(value * k - expected) < 1e-4 * expected:
            raise Mismatch(f"{label}: yours is {value:.4f}, k = {k} times too small: f_e counts tokens, divide by "
                           "N (not by the N k choices)")
        if abs(value * e - expected) < 1e-4 * expected and e != k:
            raise Mismatch(f"{label}: the factor E (number of experts) is missing")
        expect_close(label, value, expected, rel=1e-5)
        if not isinstance(got, torch.Tensor) or got.dim() != 0:
            raise Mismatch(f"{label}: return the loss as a 0-dim tensor (got {_describe(got)}): a loss must stay a "
                           "tensor to be backpropagated")
        _check_gradient(function, probs, ids, label)
    return "Matches ernie_lab.losses.load_balancing_loss, gradient included (dL/dp_te = E f_e / N)."


def _check_gradient(function, probs: torch.Tensor, ids: torch.Tensor, label: str) -> None:
    """The loss must pass a gradient to the probabilities: dL/dp_te = E f_e / N (f is a count, a constant)."""
    n, e = probs.shape
    leaf = probs.detach().clone().requires_grad_(True)
    try:
        loss = function(leaf, ids.clone())
        attached = isinstance(loss, torch.Tensor) and loss.requires_grad
        if attached:
            loss.backward()
    except Exception as err:  # noqa: BLE001  (the student's code may raise anything)
        raise Mismatch(f"{label}: backpropagating through your loss failed ({type(err).__name__}: {err})") from err
    if not attached or leaf.grad is None:
        raise Mismatch(f"{label}: no gradient reaches the probabilities (did a .item() or torch.tensor(...) cut "
                       "the loss off the graph?)")
    f = torch.bincount(ids.reshape(-1), minlength=e).float() / n             # (E,)
    expect_tensor(f"{label}: gradient with respect to probs", leaf.grad, (e * f / n).expand(n, e), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# 02.balance_with_bias: the sign update of every MoE layer's correction bias, batch after batch
# ------------------------------------------------------------------------------------------------

def _moe_model(g: torch.Generator, layers: int, e: int, k: int, shared: int, vocab: int = 96):
    """A small random MoE language model whose routers favour three experts (a lopsided load)."""
    from ...model.decoder import ErnieForCausalLM

    model = ErnieForCausalLM(ErnieConfig.from_dict(dict(
        model_type="ernie4_5_moe", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=e, moe_k=k,
        moe_intermediate_size=16, moe_num_shared_experts=shared, moe_layer_start_index=0))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for block in moe_blocks(model):
            block.gate.weight[:3] *= 4.0                   # three loud router rows
    return model


def bias_update(net: nn.Module, ids: torch.Tensor, gamma: float, blocks: slice = slice(None), sign: float = 1.0,
                proportional: bool = False) -> None:
    """One step of loss-free balancing on one batch: b_e += gamma * sign(mean share - share_e), per MoE layer.

    The keyword arguments produce the usual mistakes (some blocks only, the other sign, a step proportional
    to the gap instead of its sign), so that a judge can name them.
    """
    from ...analysis import routing

    with torch.no_grad(), routing.record(net) as rec:
        net(ids)
    for block, shares in list(zip(moe_blocks(net), rec.load_fraction()))[blocks]:   # shares: (E,)
        gap = shares.mean() - shares
        step = gap if proportional else torch.sign(gap)
        block.moe_statics.e_score_correction_bias[0] += sign * gamma * step


def _biases(net: nn.Module) -> torch.Tensor:
    return torch.stack([block.moe_statics.e_score_correction_bias[0] for block in moe_blocks(net)])   # (L, E)


def _balance_mistakes(start: nn.Module, batches, gamma: float) -> dict[str, torch.Tensor]:
    variants = {
        "only the first MoE block's bias moved: update every block of moe_blocks(net)": dict(blocks=slice(0, 1)),
        "the sign is the wrong way round: raise the bias of experts below the mean share, lower it above": dict(sign=-1.0),
        "the step is gamma * (mean - share); the rule moves by gamma * sign(mean - share), a fixed step": dict(proportional=True),
    }
    out = {}
    for mistake, options in variants.items():
        net = copy.deepcopy(start)
        for ids in batches:
            bias_update(net, ids, gamma, **options)
        out[mistake] = _biases(net)
    stale = copy.deepcopy(start)                          # the first batch's shares, recorded once, reused
    bias_update(stale, batches[0], gamma * len(batches))  # len(batches) equal steps add up to one big one
    out["every step used the first batch's routing: record each batch's routing before its update"] = _biases(stale)
    return out


def _imbalance(net: nn.Module, ids: torch.Tensor) -> float:
    """Largest expert share x E, averaged over MoE layers: 1 = even."""
    from ...analysis import routing

    with torch.no_grad(), routing.record(net) as rec:
        net(ids)
    shares = rec.load_fraction()                          # (layers, E)
    return (shares.max(-1).values * shares.shape[-1]).mean().item()


@exercise("02.balance_with_bias",
          hint="for each batch: record the routing (`with torch.no_grad(), routing.record(net) as rec: net(ids)`), "
               "take `rec.load_fraction()` (one row of shares per MoE layer) and, for every block of "
               "`moe_blocks(net)`, add gamma * sign(mean share - share) to `block.moe_statics.e_score_correction_bias[0]`; "
               "return the biases of all MoE blocks stacked, (layers, E).")
@_one_thread
def balance_with_bias(function) -> str:
    g = fresh_generator()
    remark = ""
    # token counts x k never a multiple of E: no expert's share can sit exactly on the mean (sign 0)
    for layers, e, k, shared, shape, steps in ((2, 8, 2, 0, (3, 15), 6), (3, 7, 3, 1, (2, 13), 4)):
        start = _moe_model(g, layers, e, k, shared)
        batches = [torch.randint(0, 96, shape, generator=g) for _ in range(steps)]
        gamma = float(torch.empty(()).uniform_(0.002, 0.02, generator=g))
        label = f"{layers} MoE layers, {e} experts, k = {k}, batches of {shape}"
        net = copy.deepcopy(start)
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        got = call(function, net, batches, gamma)
        changed = sorted(n for n, p in net.named_parameters() if not torch.equal(before[n], p))
        if not changed and got is None:
            raise NotAttempted
        wrong = [n for n in changed if "e_score_correction_bias" not in n]
        if wrong:
            raise Mismatch(f"{label}: only the correction bias may change, but these changed too: {wrong[:4]}")
        reference = copy.deepcopy(start)
        for ids in batches:
            bias_update(reference, ids, gamma)
        expected, now = _biases(reference), _biases(net)
        if not torch.allclose(now, expected, atol=1e-6):
            for mistake, answer in _balance_mistakes(start, batches, gamma).items():
                if torch.allclose(now, answer, atol=1e-6):
                    raise Mismatch(f"{label}: {mistake}.")
            expect_tensor(f"{label}: the model's correction biases after your updates, (layers, E)", now, expected,
                          atol=1e-6)
        expect_tensor(f"{label}: the biases you return, stacked (layers, E)", got, expected, atol=1e-6)
        if not remark:
            held_out = torch.randint(0, 96, (8, 15), generator=g)
            remark = (f"Imbalance on held-out tokens {_imbalance(start, held_out):.2f} -> "
                      f"{_imbalance(net, held_out):.2f} after {steps} small steps, weights untouched.")
    return remark

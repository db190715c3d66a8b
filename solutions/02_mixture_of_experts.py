"""Solutions to notebook 02's exercises, with the reasoning behind each step and the mistakes that look right.

The three pieces of the MoE spine build on each other: `route_tokens` decides, for every token, which k
experts run and with what weight; `dispatch_tokens` runs them, one call per expert; `moe_block` joins the
two and adds the shared experts. `tests/test_exercises.py` checks that each solution passes on fresh
draws and that each entry of WRONG fails (naming the mistake where a "says" phrase is given).
"""

import torch

from ernie_lab import routing
from ernie_lab.model.moe import moe_blocks


def says(phrase):
    """Mark a wrong answer with the phrase the check's message must hold: the judge names that very mistake."""
    def mark(answer):
        answer.says = phrase
        return answer
    return mark


def _wrong(*answers):
    """WRONG entries for one-function exercises: with the phrase a marked answer's message must hold."""
    return [{"answers": (a,), "says": a.says} if hasattr(a, "says") else (a,) for a in answers]


# ------------------------------------------------------------------------------------------------
# 02.route
# ------------------------------------------------------------------------------------------------

def route_tokens(logits, k, correction_bias, norm_min=1e-12):   # logits: (N, E), correction_bias: (E,)
    # 1. The softmax runs in float32 (a bf16 model still routes in float32: a rounding error here changes
    #    which experts run, not just a digit of the output) and over ALL E experts, so p_e is the share of
    #    the router's belief, comparable across tokens.
    probs = logits.float().softmax(dim=-1)                            # (N, E)
    # 2. The bias takes part in the CHOICE only. It was tuned to even out the load, not to say how much
    #    an expert's output is worth: adding it to the logits (before the softmax) or to the weights would
    #    change what the model computes.
    expert_ids = (probs + correction_bias.float()).topk(k, dim=-1).indices   # (N, k)
    # 3. The weights are the chosen experts' UNBIASED probabilities ...
    chosen = probs.gather(-1, expert_ids)                             # (N, k)
    # 4. ... renormalised to sum to 1 over the k chosen. The clamp max(sum, norm_min) only keeps a token
    #    whose chosen mass is tiny from dividing by ~0 (then its weights stay small instead of exploding).
    weights = chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=norm_min)
    return expert_ids, weights


@says("ignore the correction bias")
def _route_ignoring_bias(logits, k, correction_bias, norm_min=1e-12):
    probs = logits.float().softmax(-1)
    ids = probs.topk(k, dim=-1).indices                               # the bias never chooses
    chosen = probs.gather(-1, ids)
    return ids, chosen / chosen.sum(-1, keepdim=True).clamp(min=norm_min)


@says("weigh with the biased scores")
def _route_weighing_with_bias(logits, k, correction_bias, norm_min=1e-12):
    scores = logits.float().softmax(-1) + correction_bias              # the bias leaks into the weights
    ids = scores.topk(k, dim=-1).indices
    chosen = scores.gather(-1, ids)
    return ids, chosen / chosen.sum(-1, keepdim=True).clamp(min=norm_min)


@says("add the bias to the logits")
def _route_bias_on_logits(logits, k, correction_bias, norm_min=1e-12):
    probs = logits.float().softmax(-1)
    ids = (logits.float() + correction_bias).topk(k, dim=-1).indices   # bias added before the softmax
    chosen = probs.gather(-1, ids)
    return ids, chosen / chosen.sum(-1, keepdim=True).clamp(min=norm_min)


@says("not renormalised")
def _route_not_renormalised(logits, k, correction_bias, norm_min=1e-12):
    probs = logits.float().softmax(-1)
    ids = (probs + correction_bias).topk(k, dim=-1).indices
    return ids, probs.gather(-1, ids)                                  # weights sum to less than 1


@says("clamp it below")
def _route_without_clamp(logits, k, correction_bias, norm_min=1e-12):
    probs = logits.float().softmax(-1)
    ids = (probs + correction_bias).topk(k, dim=-1).indices
    chosen = probs.gather(-1, ids)
    return ids, chosen / chosen.sum(-1, keepdim=True)                  # norm_min ignored


@says("bfloat16")
def _route_in_bf16(logits, k, correction_bias, norm_min=1e-12):
    probs = logits.softmax(-1)                                         # stays in the logits' dtype
    ids = (probs + correction_bias.to(probs.dtype)).topk(k, dim=-1).indices
    chosen = probs.gather(-1, ids)
    return ids, chosen / chosen.sum(-1, keepdim=True).clamp(min=norm_min)


def _route_softmax_over_chosen(logits, k, correction_bias, norm_min=1e-12):
    probs = logits.float().softmax(-1)
    ids = (probs + correction_bias).topk(k, dim=-1).indices
    return ids, logits.float().gather(-1, ids).softmax(-1)             # renormalises, but never clamps


# ------------------------------------------------------------------------------------------------
# 02.dispatch
# ------------------------------------------------------------------------------------------------

def dispatch_tokens(x, expert_ids, weights, experts):   # x: (N, H); expert_ids, weights: (N, k)
    N, k = expert_ids.shape
    # Every token makes k (token, slot) pairs; pair p belongs to token p // k and slot p % k.
    pair_expert = expert_ids.reshape(-1)                               # (N*k,)
    # Sorting the pairs by expert puts each expert's tokens in one contiguous slice (stable: ties keep
    # token order), and bincount gives each slice's length, zero for idle experts.
    order = pair_expert.argsort(stable=True)                           # sorted position -> pair
    counts = torch.bincount(pair_expert, minlength=len(experts)).tolist()
    rows = x.index_select(0, order // k)                               # (N*k, H) token rows, grouped by expert
    # One call per active expert, on all of its rows: E batched matmuls instead of N*k tiny ones.
    outputs = torch.cat([experts[e](chunk) for e, chunk in enumerate(rows.split(counts)) if counts[e]])
    # The outputs are in expert order; order.argsort() is the inverse permutation, back to pair order.
    # Skipping it is the classic bug: the shapes fit, the numbers belong to other tokens.
    in_pairs = outputs.index_select(0, order.argsort()).view(N, k, -1)   # (N, k, H)
    return (in_pairs * weights[..., None]).sum(dim=1)                  # (N, H): sum_j w_tj * Expert(x_t)


@says("run it once")
def _dispatch_token_loop(x, expert_ids, weights, experts):     # right numbers, but N*k expert calls
    return torch.stack([sum(weights[t, j] * experts[int(expert_ids[t, j])](x[t:t + 1])[0]
                            for j in range(expert_ids.shape[1])) for t in range(x.shape[0])])


@says("mixing weights are missing")
def _dispatch_unweighted(x, expert_ids, weights, experts):
    return dispatch_tokens(x, expert_ids, torch.ones_like(weights), experts)


@says("still in expert order")
def _dispatch_not_unsorted(x, expert_ids, weights, experts):
    N, k = expert_ids.shape
    pairs = expert_ids.reshape(-1)
    order = pairs.argsort(stable=True)
    counts = torch.bincount(pairs, minlength=len(experts)).tolist()
    outputs = torch.cat([experts[e](c) for e, c in enumerate(x.index_select(0, order // k).split(counts)) if counts[e]])
    return (outputs.view(N, k, -1) * weights[..., None]).sum(1)        # still in expert order


@says("another slot's weight")
def _dispatch_swapped_slots(x, expert_ids, weights, experts):
    return dispatch_tokens(x, expert_ids, weights.flip(-1), experts)


@says("average the k outputs")
def _dispatch_mean(x, expert_ids, weights, experts):
    return dispatch_tokens(x, expert_ids, weights, experts) / expert_ids.shape[1]


# ------------------------------------------------------------------------------------------------
# 02.moe_block
# ------------------------------------------------------------------------------------------------

def moe_block(x, block):                                 # x: (B, T, H) -> (B, T, H)
    # The block treats tokens independently: flatten batch and time, batch-major like the kit.
    tokens = x.reshape(-1, x.shape[-1])                                # (N, H), N = B * T
    # The router is a bias-free linear layer, run in float32.
    logits = tokens.float() @ block.gate.weight.float().T              # (N, E)
    bias = block.moe_statics.e_score_correction_bias[0]                # (E,) one row: a text model has one group
    expert_ids, weights = route_tokens(logits, block.k, bias, block.norm_min)
    y = dispatch_tokens(tokens, expert_ids, weights.to(tokens.dtype), block.experts)   # (N, H)
    # Shared experts see every token and are added as they are: no router weight scales them.
    if block.shared_experts is not None:
        y = y + block.shared_experts(tokens)
    return y.view(x.shape)


@says("shared experts are missing")
def _block_without_shared(x, block):
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens.float() @ block.gate.weight.float().T
    ids, w = route_tokens(logits, block.k, block.moe_statics.e_score_correction_bias[0], block.norm_min)
    return dispatch_tokens(tokens, ids, w, block.experts).view(x.shape)


@says("correction bias is missing")
def _block_without_bias(x, block):
    tokens = x.reshape(-1, x.shape[-1])
    logits = tokens.float() @ block.gate.weight.float().T
    ids, w = route_tokens(logits, block.k, torch.zeros(logits.shape[-1]), block.norm_min)
    y = dispatch_tokens(tokens, ids, w, block.experts)
    if block.shared_experts is not None:
        y = y + block.shared_experts(tokens)
    return y.view(x.shape)


@says("shared experts are scaled")
def _block_shared_halved(x, block):                      # "two shared experts, so average them"
    y = _block_without_shared(x, block)
    if block.shared_experts is not None:
        y = y + block.shared_experts(x.reshape(-1, x.shape[-1])).view(x.shape) / 2
    return y


def _block_time_major(x, block):                         # flattens (T, B) instead of (B, T)
    tokens = x.transpose(0, 1).reshape(-1, x.shape[-1])
    return moe_block(tokens.view(x.shape[1], x.shape[0], -1), block).view(x.shape)


@says("switched off")
def _block_calls_itself(x, block):                       # hands the job back to the block
    return block(x).hidden


# ------------------------------------------------------------------------------------------------
# 02.active_per_layer, 02.switch_loss, 02.balance_with_bias
# ------------------------------------------------------------------------------------------------

hidden, experts, width, k = 8192, 64, 3584, 8
active_per_layer = experts * hidden + experts + k * 3 * hidden * width   # router + bias + k SwiGLU experts


def switch_loss(probs, expert_ids):              # probs: (N, E), expert_ids: (N, k)
    N, E = probs.shape
    # f_e: the share of TOKENS that chose e (a count, no gradient: topk is not differentiable)
    f = torch.bincount(expert_ids.reshape(-1), minlength=E).float() / N   # (E,), sums to k
    # P_e: the mean router probability of e; the gradient flows through it, pushing down the
    # probability of experts that many tokens chose (dL/dp_te = E f_e / N).
    P = probs.mean(0)                                                     # (E,)
    return E * (f * P).sum()                     # a 0-dim tensor: uniform routing gives k


def balance_with_bias(net, batches, gamma=0.01):
    # Loss-free balancing: no gradient, no loss term. After each batch, every MoE layer's correction bias
    # moves by a fixed step gamma: up for the experts that got less than the mean share, down for those
    # that got more. The sign (not the size of the gap) keeps the step small and steady.
    for ids in batches:
        with torch.no_grad(), routing.record(net) as rec:   # the routing of THIS batch, with the current bias
            net(ids)
        for block, shares in zip(moe_blocks(net), rec.load_fraction()):  # every MoE layer, shares: (E,)
            block.moe_statics.e_score_correction_bias[0] += gamma * torch.sign(shares.mean() - shares)
    return torch.stack([block.moe_statics.e_score_correction_bias[0] for block in moe_blocks(net)])   # (L, E)


SOLUTIONS = {
    "02.route": (route_tokens,),
    "02.dispatch": (dispatch_tokens,),
    "02.moe_block": (moe_block,),
    "02.active_per_layer": (active_per_layer,),
    "02.switch_loss": (switch_loss,),
    "02.balance_with_bias": (balance_with_bias,),
}


@says("times too small")
def _per_choice(probs, expert_ids):              # f divided by N k: uniform gives 1, not k
    return switch_loss(probs, expert_ids) / expert_ids.shape[1]


@says("factor E")
def _without_E(probs, expert_ids):              # forgets the factor E
    return switch_loss(probs, expert_ids) / probs.shape[1]


@says("0-dim tensor")
def _loss_as_float(probs, expert_ids):           # cut off the graph: nothing to backpropagate
    return switch_loss(probs, expert_ids).item()


@says("no gradient")
def _loss_rewrapped(probs, expert_ids):          # looks like a tensor, carries no gradient
    return torch.tensor(switch_loss(probs, expert_ids).item())


def _loss_choice_mean(probs, expert_ids):        # P taken over the chosen probabilities only
    N, E = probs.shape
    f = torch.bincount(expert_ids.reshape(-1), minlength=E).float() / N
    P = torch.zeros(E).scatter_add(0, expert_ids.reshape(-1), probs.gather(-1, expert_ids).reshape(-1)) / N
    return E * (f * P).sum()


@says("wrong way round")
def _backwards(net, batches, gamma=0.01):        # pushes the busy experts further up
    return balance_with_bias(net, batches, -gamma)


def _stacked_biases(net):
    return torch.stack([block.moe_statics.e_score_correction_bias[0] for block in moe_blocks(net)])


def _route_then(net, batches, step):             # the loop of the variants below: route a batch, then step
    for ids in batches:
        with torch.no_grad(), routing.record(net) as rec:
            net(ids)
        step(moe_blocks(net), rec.load_fraction())
    return _stacked_biases(net)


@says("only the first MoE block")
def _first_block_only(net, batches, gamma=0.01):  # the bug the old check let through
    def step(blocks, shares):
        blocks[0].moe_statics.e_score_correction_bias[0] += gamma * torch.sign(shares[0].mean() - shares[0])
    return _route_then(net, batches, step)


@says("fixed step")
def _proportional(net, batches, gamma=0.01):      # gamma * gap instead of gamma * sign(gap)
    def step(blocks, shares):
        for block, row in zip(blocks, shares):
            block.moe_statics.e_score_correction_bias[0] += gamma * (row.mean() - row)
    return _route_then(net, batches, step)


@says("first batch's routing")
def _stale_statistics(net, batches, gamma=0.01):  # records once, then reuses the first batch's shares
    with torch.no_grad(), routing.record(net) as rec:
        net(batches[0])
    for _ in batches:
        for block, row in zip(moe_blocks(net), rec.load_fraction()):
            block.moe_statics.e_score_correction_bias[0] += gamma * torch.sign(row.mean() - row)
    return _stacked_biases(net)


@says("only the correction bias may change")
def _moves_router(net, batches, gamma=0.01):     # "balances" by editing the router weights
    for block in moe_blocks(net):
        block.gate.weight.data.mul_(0.5)
    return _stacked_biases(net)


def _forgets_to_return(net, batches, gamma=0.01):
    balance_with_bias(net, batches, gamma)
    return [block.moe_statics.e_score_correction_bias[0] for block in moe_blocks(net)]   # a list, not (L, E)


WRONG = {
    "02.route": _wrong(_route_ignoring_bias, _route_weighing_with_bias, _route_bias_on_logits, _route_not_renormalised,
                       _route_without_clamp, _route_in_bf16, _route_softmax_over_chosen),
    "02.dispatch": _wrong(_dispatch_token_loop, _dispatch_unweighted, _dispatch_not_unsorted, _dispatch_swapped_slots,
                          _dispatch_mean),
    "02.moe_block": _wrong(_block_without_shared, _block_without_bias, _block_shared_halved, _block_time_major,
                           _block_calls_itself),
    "02.active_per_layer": [(k * 3 * hidden * width,), (experts * hidden + experts + experts * 3 * hidden * width,)],
    "02.switch_loss": _wrong(_per_choice, _without_E, _loss_as_float, _loss_rewrapped, _loss_choice_mean),
    "02.balance_with_bias": _wrong(_backwards, _first_block_only, _proportional, _stale_statistics, _moves_router,
                                   _forgets_to_return),
}

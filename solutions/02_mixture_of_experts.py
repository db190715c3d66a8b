"""Solutions to notebook 02's exercises."""

import torch

from ernie_lab import routing
from ernie_lab.model.moe import moe_blocks

hidden, experts, width, k = 8192, 64, 3584, 8
active_per_layer = experts * hidden + experts + k * 3 * hidden * width   # router + bias + k SwiGLU experts


def switch_loss(probs, expert_ids):              # probs: (N, E), expert_ids: (N, k)
    N, E = probs.shape
    f = torch.bincount(expert_ids.reshape(-1), minlength=E).float() / N   # (E,) share of tokens choosing e
    P = probs.mean(0)                                                     # (E,) mean probability
    return E * (f * P).sum()


def balance_with_bias(net, batches, gamma=0.01):
    for ids in batches:
        with torch.no_grad(), routing.record(net) as rec:
            net(ids)
        for block, shares in zip(moe_blocks(net), rec.load_fraction()):  # shares: (E,) per MoE layer
            block.moe_statics.e_score_correction_bias[0] += gamma * torch.sign(shares.mean() - shares)


SOLUTIONS = {
    "02.active_per_layer": (active_per_layer,),
    "02.switch_loss": (switch_loss,),
    "02.balance_with_bias": (balance_with_bias,),
}


def _backwards(net, batches, gamma=0.01):        # pushes the busy experts further up
    balance_with_bias(net, batches, -gamma)


def _moves_router(net, batches, gamma=0.01):     # "balances" by editing the router weights
    for block in moe_blocks(net):
        block.gate.weight.data.mul_(0.5)


def _per_choice(probs, expert_ids):              # f divided by N k: uniform gives 1, not k
    return switch_loss(probs, expert_ids) / expert_ids.shape[1]


WRONG = {
    "02.active_per_layer": [(k * 3 * hidden * width,), (experts * hidden + experts + experts * 3 * hidden * width,)],
    "02.switch_loss": [(_per_choice,), (lambda probs, ids: switch_loss(probs, ids) / probs.shape[1],)],
    "02.balance_with_bias": [(_backwards,), (_moves_router,)],
}

"""Solutions to notebook 04's exercises, with the reasoning, and the mistakes students make (WRONG).

Paste a function body into the notebook's stub to see the notebook go on with it.
"""

import itertools

import torch
import torch.nn.functional as F

from ernie_lab.model.rope import apply_rope
from ernie_lab.model.rope3d import rope_angles_3d

# ------------------------------------------------------------------------------------------------
# Exercise 1 · the vision experts' weight. A SwiGLU expert holds three hidden x width matrices (gate, up,
# down); the 28B has 64 vision experts of width 512 per MoE layer (not the text experts' 1536).
vision_experts = 64 * 3 * 2560 * 512


# ------------------------------------------------------------------------------------------------
# Exercise 2 · the modality-isolated MoE block, by hand.
def route_group(x, router, bias, k, norm_min):
    """One group's router: (n, H) tokens -> (n, k) chosen experts and their (n, k) mixing weights.

    The softmax runs in float32 over all E experts (ERNIE's router). The correction bias is added only to
    *choose* the k experts (it evens the load out without a gradient); the mixing weights come from the
    plain probabilities of the chosen experts, renormalised to sum to 1 (the sum clamped by norm_min).
    """
    probs = F.linear(x.float(), router.weight.float()).softmax(dim=-1)   # (n, E)
    chosen = (probs + bias).topk(k, dim=-1).indices                     # (n, k) the bias only chooses
    weights = probs.gather(-1, chosen)                                  # (n, k) unbiased probabilities
    return chosen, weights / weights.sum(-1, keepdim=True).clamp(min=norm_min)


def modality_moe(x, is_vision, block):
    """x (N, H) tokens, is_vision (N,) bool -> (N, H): text tokens through the text group, vision tokens
    through the vision group, the shared experts for every token.

    The isolation is the whole point: a text token never reaches a vision expert, because each group has
    its own router (routers[0] text, routers[1] vision), its own experts (of its own width) and its own
    bias row. We loop over the experts of a group (never over tokens): each expert runs once on all the
    tokens that chose it, and its output is added into those tokens' rows with their weights.
    """
    y = torch.zeros_like(x)                                             # (N, H)
    for group in (0, 1):                                                # 0: text, 1: vision
        rows = (is_vision == bool(group)).nonzero().squeeze(1)          # (n,) this group's tokens
        if rows.numel() == 0:
            continue
        tokens = x[rows]                                                # (n, H)
        bias = block.moe_statics.e_score_correction_bias[group]         # (E,)
        chosen, weights = route_group(tokens, block.routers[group], bias, block.k, block.norm_min)
        out = torch.zeros_like(tokens)                                  # (n, H)
        for e, expert in enumerate(block.group_experts(group)):
            token, slot = (chosen == e).nonzero(as_tuple=True)          # which tokens chose e, in which slot
            if token.numel():
                out.index_add_(0, token, weights[token, slot, None].to(x.dtype) * expert(tokens[token]))
        y[rows] = out
    if block.shared_experts is not None:                                # shared experts: every token, unscaled
        y = y + block.shared_experts(x)
    return y


# ------------------------------------------------------------------------------------------------
# Exercise 3 · 3-D positions of a chat with pictures, used to rotate queries.
def rotate(q, positions):
    """The notebook's helper: rotate q (1, heads, T, 128) by 3-D positions (3, 1, T) with ERNIE's rotary."""
    return apply_rope(q, *rope_angles_3d(positions, 128, 500_000.0))


def positions_3d(token_types, image_grids, video_grids):
    """(1, T) types -> (3, 1, T) positions (t, h, w).

    Text counts up with t = h = w. A picture that starts at p lays its tokens on its merged grid:
    t = p + frame pair (an image has one "pair"), h = p + row, w = p + column; the grid is (T/2, H/2, W/2)
    for a video (the adapter merged 2 x 2 patches and 2 frames) and (1, H/2, W/2) for an image. The next
    token starts at p + max(H, W) / 2: a picture costs as many positions as its longer (merged) side, not
    as many as its tokens, so long prompts with big pictures keep small position numbers.
    """
    grids = {1: iter(image_grids.tolist()), 2: iter(video_grids.tolist())}
    pieces, p = [], 0
    for kind, run in itertools.groupby(token_types[0].tolist()):
        n = len(list(run))
        if kind == 0:
            pieces.append(torch.arange(p, p + n).expand(3, n))          # (3, n) text
            p += n
            continue
        frames, h, w = next(grids[kind])
        steps = frames // 2 if kind == 2 else 1                         # two frames make one time step
        t, r, c = torch.meshgrid(torch.arange(steps), torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        pieces.append(torch.stack([t, r, c]).reshape(3, -1) + p)       # (3, steps * h/2 * w/2)
        p += max(h, w) // 2
    return torch.cat(pieces, dim=1)[:, None]                            # (3, 1, T)


def rotate_3d(q, token_types, image_grids, video_grids):
    return rotate(q, positions_3d(token_types, image_grids, video_grids))


# ------------------------------------------------------------------------------------------------
# Exercise 4 · the text group's balancing loss. Only the text tokens count: pooling them with the vision
# tokens (whose load is a different group's business) would let a balanced vision group hide a collapsed
# text group. f_e counts tokens (each token's top-k holds e or not), so uniform routing gives k.
def text_balance_loss(probs, is_vision, k):
    text = probs[~is_vision]                                            # (n, E) text tokens only
    n, E = text.shape
    chosen = text.topk(k, dim=-1).indices                               # (n, k)
    f = torch.zeros(E).index_add_(0, chosen.reshape(-1), torch.ones(n * k)) / n   # (E,) share of tokens
    P = text.mean(0)                                                    # (E,) mean probability
    return (E * (f * P).sum()).item()


SOLUTIONS = {
    "04.vision_experts": (vision_experts,),
    "04.modality_moe": (modality_moe,),
    "04.rotate_3d": (rotate_3d,),
    "04.text_balance_loss": (text_balance_loss,),
}


# ------------------------------------------------------------------------------------------------
# Plausible wrong answers: each must fail, most with the judge naming the mistake.
def _no_isolation(x, is_vision, block):              # one router for all: the text-only MoE of notebook 02
    return modality_moe(x, torch.zeros_like(is_vision), block)


def _swapped(x, is_vision, block):                   # vision tokens through the text group
    return modality_moe(x, ~is_vision, block)


def _no_shared(x, is_vision, block):
    return modality_moe(x, is_vision, block) - block.shared_experts(x)


def _bias_ignored(x, is_vision, block):
    saved = block.moe_statics.e_score_correction_bias.clone()
    block.moe_statics.e_score_correction_bias.data.zero_()
    try:
        return modality_moe(x, is_vision, block)
    finally:
        block.moe_statics.e_score_correction_bias.data.copy_(saved)


def _one_router(x, is_vision, block):                # the right experts, but the text router for both groups
    block.routers[1].weight.data.copy_(block.routers[0].weight.data)
    return modality_moe(x, is_vision, block)


def _one_d(q, token_types, image_grids, video_grids):          # plain text positions 0 .. T-1
    return rotate(q, torch.arange(token_types.shape[1]).expand(3, 1, -1))


def _mistaken_positions(token_types, image_grids, video_grids, by_tokens=False, pair_frames=True):
    """positions_3d with one of two mistakes: text after a picture continues one past its token count, or
    a video's time position counts frames (0, 2, 4, ... for its pairs) instead of frame pairs."""
    grids = {1: iter(image_grids.tolist()), 2: iter(video_grids.tolist())}
    pieces, p = [], 0
    for kind, run in itertools.groupby(token_types[0].tolist()):
        n = len(list(run))
        if kind == 0:
            pieces.append(torch.arange(p, p + n).expand(3, n))
            p += n
            continue
        frames, h, w = next(grids[kind])
        steps = frames // 2 if kind == 2 else 1
        t, r, c = torch.meshgrid(torch.arange(steps), torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
        pieces.append(torch.stack([t if pair_frames else 2 * t, r, c]).reshape(3, -1) + p)
        p += n if by_tokens else max(h, w) // 2
    return torch.cat(pieces, dim=1)[:, None]


def _advance_by_tokens(q, token_types, image_grids, video_grids):
    return rotate(q, _mistaken_positions(token_types, image_grids, video_grids, by_tokens=True))


def _unpaired_frames(q, token_types, image_grids, video_grids):
    return rotate(q, _mistaken_positions(token_types, image_grids, video_grids, pair_frames=False))


def _pooled_loss(probs, is_vision, k):
    return text_balance_loss(probs, torch.zeros_like(is_vision), k)


def _vision_loss(probs, is_vision, k):
    return text_balance_loss(probs, ~is_vision, k)


WRONG = {
    "04.vision_experts": [(64 * 2560 * 512,), (64 * 3 * 2560 * 1536,)],
    "04.modality_moe": [
        {"answers": (_no_isolation,), "says": "every token goes through the text experts"},
        {"answers": (_swapped,), "says": "swapped"},
        {"answers": (_no_shared,), "says": "shared experts are missing"},
        {"answers": (_bias_ignored,), "says": "correction bias is ignored"},
        (_one_router,),
    ],
    "04.rotate_3d": [
        {"answers": (_one_d,), "says": "every token counts one position"},
        {"answers": (_advance_by_tokens,), "says": "token count"},
        {"answers": (_unpaired_frames,), "says": "frames are merged in pairs"},
    ],
    "04.text_balance_loss": [
        {"answers": (_pooled_loss,), "says": "pools text and vision"},
        {"answers": (_vision_loss,), "says": "vision group's loss"},
        {"answers": (lambda probs, is_vision, k: text_balance_loss(probs, is_vision, k) / probs.shape[1],),
         "says": "factor E"},
        {"answers": (lambda probs, is_vision, k: text_balance_loss(probs, is_vision, k) / k,), "says": "too small"},
    ],
}

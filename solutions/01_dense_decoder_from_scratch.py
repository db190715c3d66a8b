"""Solutions to notebook 01's exercises."""

import torch


def rope_rotate_half(x, cos, sin):               # x: (B, H, T, d); cos, sin: (B, T, d/2)
    cos, sin = cos[:, None], sin[:, None]        # (B, 1, T, d/2): one table for every head
    first, second = x.chunk(2, dim=-1)           # (B, H, T, d/2) each: pair i = (first_i, second_i)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def nucleus(probs, p):                           # probs: (V,) -> sorted ids of the top-p nucleus
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    return sorted(order[mass_before < p].tolist())


unchanged_positions = list(range(10))            # a token sees itself and the past, never the future

SOLUTIONS = {
    "01.rope_rotate_half": (rope_rotate_half,),
    "01.nucleus": (nucleus,),
    "01.causal_mask": (unchanged_positions,),
}


def _interleaved(x, cos, sin):                   # the layout ERNIE uses, not the one asked for
    cos, sin = cos[:, None], sin[:, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def _wrong_sign(x, cos, sin):
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos + second * sin, second * cos - first * sin), dim=-1)


def _cumsum_below(probs, p):                     # drops the token that crosses p
    sorted_probs, order = probs.sort(descending=True)
    return sorted(order[sorted_probs.cumsum(0) < p].tolist())


WRONG = {
    "01.rope_rotate_half": [(_interleaved,), (_wrong_sign,)],
    "01.nucleus": [(_cumsum_below,), (lambda probs, p: [int(probs.argmax())],)],
    "01.causal_mask": [(list(range(11)),), (list(range(16)),), ([],)],
}

"""Exercises of notebook 01 (the dense decoder): the other RoPE layout, the top-p nucleus, the causal mask."""

import torch

from ..exercises import Mismatch, as_ints, call, exercise, expect_equal, expect_tensor
from ...model.rope import apply_rope, rope_angles


def _rope_case(seed: int = 0, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, d, generator=g)                                  # (B, H, T, d)
    cos, sin = rope_angles(torch.arange(5).expand(2, 5) * 3, d, 10_000.0)     # (B, T, d/2) each
    return x, cos, sin


def rotate_half_reference(x, cos, sin):
    """Llama's layout: dimension i turns together with dimension i + d/2."""
    cos, sin = cos[:, None], sin[:, None]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


@exercise("01.rope_rotate_half",
          hint="split the head in two halves, first = x[..., :d/2] and second = x[..., d/2:]; pair i is "
               "(first_i, second_i); rotate it by the angle whose cos/sin are cos[..., i], sin[..., i] "
               "(add a head axis: cos[:, None]); concatenate the two rotated halves.")
def rope_rotate_half(function) -> str:
    x, cos, sin = _rope_case()
    got = call(function, x, cos, sin)
    expected = rotate_half_reference(x, cos, sin)
    if isinstance(got, torch.Tensor) and got.shape == x.shape and got.dtype == x.dtype and torch.isfinite(got).all():
        if torch.allclose(got, apply_rope(x, cos, sin), atol=1e-5):
            raise Mismatch("this is ERNIE's interleaved layout (pairs 2i, 2i+1); rotate-half pairs i with i + d/2")
        if not torch.allclose(got.norm(dim=-1), x.norm(dim=-1), atol=1e-4):
            raise Mismatch("the output vectors have different lengths than the inputs: a rotation keeps lengths "
                           "(check the signs: first*cos - second*sin, second*cos + first*sin)")
        if torch.allclose(got, rotate_half_reference(x, cos, -sin), atol=1e-5):
            raise Mismatch("you rotate the wrong way round: the sine terms have the opposite sign")
    expect_tensor("rotate-half RoPE", got, expected, atol=1e-5)
    return "Both layouts are rotations; they differ only in which dimensions are paired."


@exercise("01.nucleus",
          hint="sort the probabilities, largest first; keep a token while the mass of the tokens ranked *before* "
               "it is still below p (so the token that crosses p is kept); return the kept ids as a sorted list.")
def nucleus(function) -> str:
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    for p, expected in ((0.5, [1, 3]), (0.4, [1]), (0.75, [1, 3, 4]), (0.99, [0, 1, 2, 3, 4]), (1e-9, [1])):
        got = call(function, probs, p)
        got = sorted(as_ints(f"nucleus at p = {p}", got))
        if p == 0.5 and got == [1]:
            raise Mismatch("at p = 0.5 you keep only token 1 (0.4): the token that crosses p (token 3) belongs "
                           "to the nucleus too, or the kept mass would be below p")
        expect_equal(f"nucleus of {probs.tolist()} at p = {p}", got, expected)
    return "That is the set `ernie_lab.generation.pick_next_token(..., top_p=p)` samples from."


def causal_mask_reference(length: int = 16, edited: int = 10) -> list[int]:
    """Positions whose logits stay exactly the same when the token at `edited` changes, in a small random model."""
    from ...model.config import ErnieConfig
    from ...model.decoder import ErnieForCausalLM

    torch.manual_seed(0)
    model = ErnieForCausalLM(ErnieConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8)).eval()
    seq = torch.randint(0, 64, (1, length))
    other = seq.clone()
    other[0, edited] = (seq[0, edited] + 1) % 64
    with torch.no_grad():
        same = (model(seq).logits - model(other).logits).abs().amax(-1)[0] < 1e-6   # (length,)
    return same.nonzero().flatten().tolist()


@exercise("01.causal_mask",
          hint="a token's logits depend only on the tokens at its own position and before; which positions "
               "cannot see position 10?")
def causal_mask(positions) -> str:
    expected = causal_mask_reference()
    got = sorted(as_ints("positions", positions))
    if got == list(range(11)):
        raise Mismatch("position 10 itself reads the changed token (its own input), so its logits change too")
    expect_equal("positions whose logits stay the same", got, expected)
    return "Everything before the edit is untouched: that is why a KV cache may keep old keys and values."

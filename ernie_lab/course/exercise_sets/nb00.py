"""Exercises of notebook 00 (the tour): what a long context costs."""

from ...analysis import family as F
from ..exercises import Mismatch, as_number, exercise, expect_close


@exercise("00.kv_crossover",
          hint="bytes of the weights (parameters x 2 in bf16) / KV-cache bytes per token (K and V, every layer, "
               "only the 2 KV heads of width 128, 2 bytes each).")
def kv_crossover(tokens) -> str:
    weights = F.count_params(F.CONFIG_0_3B).total * 2
    per_token = F.kv_cache_bytes_per_token(F.CONFIG_0_3B)
    expected = weights / per_token
    tokens = as_number("tokens", tokens)
    if abs(float(tokens) - expected * 8) < 8:
        raise Mismatch("that is 8x too many: the cache stores only the 2 key/value heads, not all 16 query heads")
    if abs(float(tokens) - expected / 8) < 1:
        raise Mismatch("that is 8x too few: GQA keeps 2 key/value heads per layer, not 16")
    if abs(float(tokens) - expected * 2) < 2:
        raise Mismatch("that is 2x too many: count both the keys and the values")
    expect_close("tokens", tokens, expected, abs_=1.0)
    return (f"After about {expected:,.0f} tokens the cache outweighs the model; the 128K context holds "
            f"{F.kv_cache_bytes(F.CONFIG_0_3B, 131072) / 2**30:.1f} GiB of it.")

"""Exercises of notebook 00 (the tour): what a long context costs."""

from ...analysis import family as F
from ..exercises import Mismatch, as_number, exercise, expect_close


def crossover_mistakes(weights: float, per_token: float) -> dict[str, float]:
    """The answers that common slips give, each named by its slip. Two slips can land on the same number
    (keys only, or 4 bytes per weight, both double it): the diagnosis then names both."""
    config = F.CONFIG_0_3B
    query_heads = config["num_attention_heads"] / config["num_key_value_heads"]
    return {
        "you cached all 16 query heads; GQA keeps only the 2 key/value heads per layer": weights / (per_token * query_heads),
        "you counted one of keys and values (the cache holds both), or 4 bytes per weight (bf16 has 2)":
            weights / (per_token / 2),
        "you counted the weights as one byte per parameter (bf16 has 2)": weights / 2 / per_token,
        "you counted one layer's cache per token; every layer keeps its own": weights / (per_token / config["num_hidden_layers"]),
    }


@exercise("00.kv_crossover",
          hint="bytes of the weights (parameters x 2 in bf16) / KV-cache bytes per token (K and V, every layer, "
               "only the 2 KV heads of width 128, 2 bytes each).")
def kv_crossover(tokens) -> str:
    weights = F.count_params(F.CONFIG_0_3B).total * 2
    per_token = F.kv_cache_bytes_per_token(F.CONFIG_0_3B)
    expected = weights / per_token
    tokens = as_number("tokens", tokens)
    for slip, answer in crossover_mistakes(weights, per_token).items():
        if abs(tokens - answer) <= 1.0:                    # that slip's number, to the token
            raise Mismatch(f"{tokens:,.0f} tokens: {slip}.")
    expect_close("tokens", tokens, expected, abs_=1.0)
    return (f"After about {expected:,.0f} tokens the cache outweighs the model; the 128K context holds "
            f"{F.kv_cache_bytes(F.CONFIG_0_3B, 131072) / 2**30:.1f} GiB of it.")

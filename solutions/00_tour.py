"""Solutions to notebook 00's exercises, with the reasoning.

00.kv_crossover: at what context length does the KV cache of ERNIE-4.5-0.3B weigh as much as its weights?

* The weights: 360,748,032 parameters, 2 bytes each in bf16.
* One token's cache: every layer (18) stores a key AND a value vector for each of its key/value heads. ERNIE
  uses grouped-query attention: 16 query heads share 2 key/value heads, so only 2 heads of width 128 are
  stored, not 16 (the common slip: caching what the queries look like is 8x too much).
* The cross-over is the ratio of the two: about 39 thousand tokens, well inside the 128K context: at long
  contexts the cache, not the model, decides how many conversations fit on a card.
"""

bytes_per_token = 2 * 18 * 2 * 128 * 2          # K and V x 18 layers x 2 KV heads x head_dim 128 x 2 bytes (bf16)
weight_bytes = 360_748_032 * 2                  # every parameter in bf16
kv_crossover = weight_bytes / bytes_per_token   # about 39,144 tokens

SOLUTIONS = {"00.kv_crossover": (kv_crossover,)}
WRONG = {"00.kv_crossover": [
    {"answers": (weight_bytes / (bytes_per_token * 8),), "says": "all 16 query heads"},
    {"answers": (weight_bytes / (bytes_per_token / 2),), "says": "one of keys and values"},    # keys only
    {"answers": (360_748_032 * 4 / bytes_per_token,), "says": "4 bytes per weight"},             # fp32 weights
    {"answers": (360_748_032 / bytes_per_token,), "says": "one byte per parameter"},
    {"answers": (weight_bytes / (bytes_per_token / 18),), "says": "one layer's cache"},
    (kv_crossover * 1.5,),                      # no slip we know: the message must only say what differs
    (float("nan"),), ("39144",), ([kv_crossover, 1.0],),     # not a finite number
]}

if __name__ == "__main__":
    print(SOLUTIONS)

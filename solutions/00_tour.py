"""Solutions to notebook 00's exercises."""

bytes_per_token = 2 * 18 * 2 * 128 * 2          # K and V x 18 layers x 2 KV heads x head_dim 128 x 2 bytes (bf16)
weight_bytes = 360_748_032 * 2                  # every parameter in bf16
kv_crossover = weight_bytes / bytes_per_token   # about 39,144 tokens

SOLUTIONS = {"00.kv_crossover": (kv_crossover,)}
WRONG = {"00.kv_crossover": [(weight_bytes / (bytes_per_token * 8),),     # all 16 query heads cached
                             (weight_bytes / (bytes_per_token / 2),),     # keys only
                             (360_748_032 / bytes_per_token,)]}           # weights counted in bytes = params

if __name__ == "__main__":
    print(SOLUTIONS)

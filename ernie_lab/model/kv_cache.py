"""KV cache: keep every layer's keys and values so each new token costs one row, not a re-run.

Without a cache, generating token t recomputes attention for all t previous tokens. With it,
a decode step computes q, k, v for the new token only, appends k and v here, and attends over
the stored rows. The buffers are allocated once for ``max_len`` tokens (growing if needed),
so decoding writes into place instead of concatenating. Grouped-query attention stores only
the KV heads: for the 0.3B that is 2 heads x 128 dims x 2 (k, v) per layer per token.

:class:`Int8KVCache` stores keys and values as int8, each (token, head) row with its own float32 scale
(row / s, s = max|row| / 127): a quarter of fp32's bytes plus 4 bytes per 128-value row. It hands
attention the dequantized rows.

:class:`StaticKVCache` is the same cache with nothing that changes shape between decode steps, the form
``torch.compile`` can turn into one graph (as in pytorch-labs/gpt-fast): rows are written at slot
numbers held in a tensor (``index_copy_``), and attention always reads the whole buffer, told by a
(B, 1, T, S_max) mask which slots hold a key this query may see. Same attention code, same numbers
up to float rounding; only the bookkeeping differs.
"""

import warnings

import torch

from ..errors import InputError


class KVCache:
    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, kv_heads, max_len, head_dim)  # (B, Hkv, S_max, D)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0  # tokens already stored (the same for every layer between forwards)
        # (B, 1) shift of text positions after a prompt with pictures (VL 3-D rope); None = no shift
        self.position_offset: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, kv_cache_dtype=None, static: bool = False) -> "KVCache":
        """A cache shaped for ``model`` (any ernie-lab model) with room for ``max_len`` tokens;
        ``kv_cache_dtype="int8"`` gives an :class:`Int8KVCache`, ``static=True`` a :class:`StaticKVCache`."""
        cfg = model.config.get_text_config()
        weight = model.norm.weight  # activations (and so keys and values) flow in the norms' dtype
        if kv_cache_dtype in ("int8", torch.int8):
            if static:
                raise InputError("the static KV cache (compile=True / static_cache=True) stores the model's dtype; "
                                 "int8 KV caching works only with the plain cache: drop kv_cache_dtype or the static switch.")
            cls = Int8KVCache
        elif kv_cache_dtype is not None:
            raise InputError(f"kv_cache_dtype must be None (the model's dtype) or 'int8', got {kv_cache_dtype!r}.")
        elif static:
            cls = StaticKVCache
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, max_len,
                   dtype=weight.dtype, device=weight.device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, num_tokens: int) -> None:
        """Make room for ``num_tokens`` more rows (the buffers double when full)."""
        end = self.length + num_tokens
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new rows of one layer and return all rows so far.

        k, v: (B, Hkv, T, D) for the T new tokens.  Returns (B, Hkv, length + T, D) views.
        """
        start, end = self.length, self.length + k.shape[2]
        self.reserve(k.shape[2])
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model once all layers have stored ``num_tokens`` new rows."""
        self.length += num_tokens

    def _grow(self, new_len: int) -> None:
        self.keys = [_bigger(b, new_len) for b in self.keys]
        self.values = [_bigger(b, new_len) for b in self.values]


class Int8KVCache(KVCache):
    """Keys and values as int8 with one scale per (batch, head, token) row; dequantized on the way out."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(num_layers, batch, kv_heads, head_dim, max_len, dtype=torch.int8, device=device)
        self.dtype = dtype  # what attention receives
        scale_shape = (batch, kv_heads, max_len, 1)  # (B, Hkv, S_max, 1)
        self.key_scales = [torch.ones(scale_shape, device=device) for _ in range(num_layers)]
        self.value_scales = [torch.ones(scale_shape, device=device) for _ in range(num_layers)]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        self.reserve(k.shape[2])
        for codes, scales, rows in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            scale = (rows.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)  # (B, Hkv, T, 1)
            codes[layer][:, :, start:end] = (rows.float() / scale).round().clamp(-127, 127).to(torch.int8)
            scales[layer][:, :, start:end] = scale
        keys = (self.keys[layer][:, :, :end].float() * self.key_scales[layer][:, :, :end]).to(self.dtype)
        values = (self.values[layer][:, :, :end].float() * self.value_scales[layer][:, :, :end]).to(self.dtype)
        return keys, values

    def _grow(self, new_len: int) -> None:
        super()._grow(new_len)
        self.key_scales = [_bigger(b, new_len) for b in self.key_scales]
        self.value_scales = [_bigger(b, new_len) for b in self.value_scales]


class StaticKVCache(KVCache):
    """Fixed (B, Hkv, S_max, D) buffers; a forward writes its T rows at slots ``cursor .. cursor + T - 1``
    (a tensor, so a compiled step never sees a changing Python number) and attends over all S_max slots
    through :meth:`mask`. ``filled`` (B, S_max) remembers which slots hold a real token (not padding)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__(num_layers, batch, kv_heads, head_dim, max_len, dtype=dtype, device=device)
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)      # (1,) the next free slot
        self.filled = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # (B, S_max)

    def slots(self, num_tokens: int) -> torch.Tensor:
        """(T,) the slots the next ``num_tokens`` rows go to."""
        return self.cursor + torch.arange(num_tokens, device=self.cursor.device)

    def mask(self, num_tokens: int, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Record which new slots are real tokens; return the bool (B, 1, T, S_max) attention mask.

        Query i (at slot s_i) may see slot j when j <= s_i and slot j holds a real token. A padding query
        sees only itself, so softmax never divides by zero (its output is ignored anyway)."""
        slots = self.slots(num_tokens)                                            # (T,)
        real = torch.ones(self.filled.shape[0], num_tokens, dtype=torch.bool, device=slots.device)
        if attention_mask is not None:
            real = attention_mask[:, -num_tokens:].to(slots.device).bool()       # (B, T)
        self.filled.index_copy_(1, slots, real)
        key_slot = torch.arange(self.capacity, device=slots.device)               # (S_max,)
        causal = key_slot[None, :] <= slots[:, None]                              # (T, S_max)
        itself = key_slot[None, :] == slots[:, None]                              # (T, S_max)
        return ((causal & self.filled[:, None, :]) | itself)[:, None]             # (B, 1, T, S_max)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at their slots; return the whole (B, Hkv, S_max, D) buffers."""
        slots = self.slots(k.shape[2])
        self.keys[layer].index_copy_(2, slots, k)
        self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer], self.values[layer]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens
        self.cursor += num_tokens

    def _grow(self, new_len: int) -> None:
        warnings.warn(f"the static KV cache is full ({self.capacity} slots): reallocating {new_len}. A compiled "
                      "decode step recompiles for the new size; give generate a larger budget to avoid it.",
                      stacklevel=3)
        self.filled = torch.cat([self.filled, self.filled.new_zeros(self.filled.shape[0], new_len - self.capacity)], 1)
        super()._grow(new_len)


def _bigger(buf: torch.Tensor, new_len: int) -> torch.Tensor:
    """A copy of a (B, Hkv, S, X) buffer with room for ``new_len`` rows, the new rows zero."""
    out = buf.new_zeros(*buf.shape[:2], new_len, buf.shape[3])
    out[:, :, : buf.shape[2]] = buf
    return out

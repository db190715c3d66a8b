"""KV cache: keep every layer's keys and values so each new token costs one row, not a re-run.

Without a cache, generating token t recomputes attention for all t previous tokens. With it,
a decode step computes q, k, v for the new token only, appends k and v here, and attends over
the stored rows. The buffers are allocated once for ``max_len`` tokens (growing if needed),
so decoding writes into place instead of concatenating. Grouped-query attention stores only
the KV heads: for the 0.3B that is 2 heads x 128 dims x 2 (k, v) per layer per token.

:class:`Int8KVCache` stores keys and values as int8, each (token, head) row with its own float32 scale
(row / s, s = max|row| / 127): a quarter of fp32's bytes plus 4 bytes per 128-value row. It hands
attention the dequantized rows.
"""

import torch


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
    def for_model(cls, model, batch: int, max_len: int, kv_cache_dtype=None) -> "KVCache":
        """A cache shaped for ``model`` (any ernie-lab model) with room for ``max_len`` tokens;
        ``kv_cache_dtype="int8"`` gives an :class:`Int8KVCache`."""
        cfg = model.config.get_text_config()
        weight = model.norm.weight  # activations (and so keys and values) flow in the norms' dtype
        if kv_cache_dtype in ("int8", torch.int8):
            cls = Int8KVCache
        elif kv_cache_dtype is not None:
            from ..errors import InputError
            raise InputError(f"kv_cache_dtype must be None (the model's dtype) or 'int8', got {kv_cache_dtype!r}.")
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, cfg.head_dim, max_len,
                   dtype=weight.dtype, device=weight.device)

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new rows of one layer and return all rows so far.

        k, v: (B, Hkv, T, D) for the T new tokens.  Returns (B, Hkv, length + T, D) views.
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model once all layers have stored ``num_tokens`` new rows."""
        self.length += num_tokens

    def _grow(self, new_len: int) -> None:
        def bigger(buf):
            out = buf.new_zeros(*buf.shape[:2], new_len, buf.shape[3])
            out[:, :, : buf.shape[2]] = buf
            return out
        self.keys = [bigger(b) for b in self.keys]
        self.values = [bigger(b) for b in self.values]


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
        if end > self.capacity:
            self._grow(max(end, 2 * self.capacity))
        for codes, scales, rows in ((self.keys, self.key_scales, k), (self.values, self.value_scales, v)):
            scale = (rows.float().abs().amax(-1, keepdim=True) / 127).clamp(min=1e-12)  # (B, Hkv, T, 1)
            codes[layer][:, :, start:end] = (rows.float() / scale).round().clamp(-127, 127).to(torch.int8)
            scales[layer][:, :, start:end] = scale
        keys = (self.keys[layer][:, :, :end].float() * self.key_scales[layer][:, :, :end]).to(self.dtype)
        values = (self.values[layer][:, :, :end].float() * self.value_scales[layer][:, :, :end]).to(self.dtype)
        return keys, values

    def _grow(self, new_len: int) -> None:
        def bigger(buf):
            out = buf.new_zeros(*buf.shape[:2], new_len, buf.shape[3])
            out[:, :, : buf.shape[2]] = buf
            return out
        super()._grow(new_len)
        self.key_scales = [bigger(b) for b in self.key_scales]
        self.value_scales = [bigger(b) for b in self.value_scales]

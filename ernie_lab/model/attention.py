"""Causal grouped-query self-attention (GQA) with rotary positions and an optional KV cache.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + mask) V

ERNIE 4.5 0.3B has 16 query heads but only 2 key/value heads: each KV head is shared by a group
of 8 query heads, which shrinks the KV cache 8x. Queries and keys are rotated (RoPE) before the
dot product. The mask lets token i see tokens <= i, and never a padding token.

A prompt's attention is PyTorch's fused kernel (``F.scaled_dot_product_attention``). A decode step's single
query on a CPU is the formula written out (``attend_one_query``), which that kernel runs far slower.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden, bias = config.hidden_size, config.use_bias
        self.q_proj = nn.Linear(hidden, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, hidden, bias=bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x: (B, T, hidden); rope: cos, sin (B, T, D/2); mask: bool (B, 1, T, S) or None = causal."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, D), S = past + T
        out = attend(q, k, v, mask)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, hidden)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention where H query heads share Hkv key/value heads.

    q: (B, H, T, D); k, v: (B, Hkv, S, D); mask: bool (B, 1, T, S), True = may attend.
    With mask None the last T keys are the queries themselves (plain causal attention).
    """
    T, S = q.shape[2], k.shape[2]
    if T == 1 and q.device.type == "cpu":  # a decode step
        return attend_one_query(q, k, v, mask)
    if mask is None:
        mask = causal_mask(T, S, q.device)[None, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One new token's attention on a CPU, written out in fp32: each KV head's G query heads score its S keys.

    PyTorch's CPU attention kernel is built for many queries. For one query (2 threads, 16 heads) it takes
    126 us over 64 bf16 keys against 42 in fp32, and even in fp32 it is twice as slow as these three ops over
    a long cache (511 against 239 us over 2048 keys). Compiled they fuse: the 0.3B's int4 decode step after a
    1000-token prompt went from 16.9 to 13.5 ms.
    q: (B, H, 1, D); k, v: (B, Hkv, S, D); mask: bool (B, 1, 1, S), or None when the query sees every key.
    """
    B, H, _, D = q.shape
    q = q.reshape(B, k.shape[1], H // k.shape[1], D).float()        # (B, Hkv, G, D): head h shares KV head h // G
    scores = (q @ k.float().transpose(-1, -2)) * D ** -0.5          # (B, Hkv, G, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))           # the mask (B, 1, 1, S) covers every head
    out = scores.softmax(-1) @ v.float()                            # (B, Hkv, G, D)
    return out.reshape(B, H, 1, D).to(v.dtype)


def causal_mask(T: int, S: int, device=None) -> torch.Tensor:
    """(T, S) bool: query i (at position S - T + i) may see keys 0 .. S - T + i."""
    q_pos = torch.arange(S - T, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    return k_pos <= q_pos


def padding_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Combine causality with a (B, S) 0/1 padding mask into a bool (B, 1, T, S) mask.

    A query that would see no key at all (a left-padding position) is allowed to see itself, so
    softmax never divides by zero; its output is ignored anyway.
    """
    B, S = attention_mask.shape
    allowed = causal_mask(T, S, attention_mask.device)[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    nobody = ~allowed.any(-1)  # (B, T)
    if nobody.any():
        diagonal = torch.zeros_like(allowed)
        diagonal[:, torch.arange(T), torch.arange(S - T, S)] = True
        allowed = allowed | (diagonal & nobody[..., None])
    return allowed[:, None]  # (B, 1, T, S)

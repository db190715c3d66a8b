# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · The dense ERNIE 4.5 decoder, from scratch
#
# **What you will learn:** every piece of a modern decoder (RMSNorm, rotary positions, grouped-query
# attention with a KV cache, SwiGLU, the pre-norm layer), **written by you** and proven equal to
# `transformers`; loading a checkpoint; greedy decoding and sampling.
#
# **Time:** 167 min (core 125 min). **Memory:** fast mode under 2 GB; full mode (the real 0.3B shape,
# random weights) about 3 GB: two float32 copies of 1.4 GB each at a time, and a temporary 1.4 GB
# checkpoint that is deleted after loading.
#
# ![One ERNIE 4.5 decoder layer](../figures/decoder_layer.png)
#
# The papers behind the pieces are listed, with what each contributes, under *Further reading* at the end.
#
# ERNIE-4.5-0.3B is a plain decoder-only transformer with a few choices of its own: RMSNorm,
# rotary positions on **interleaved** pairs, grouped-query attention with 16 query heads but only
# 2 key/value heads of width 128, a SwiGLU MLP and an output head tied to the embedding.
#
# **You write the pieces**, in this order; each is a function with its formula and shapes in the docstring
# and `...   # your code here` as its body:
#
# | step | you write | the notebook builds from it | checked against |
# |---|---|---|---|
# | 1 | `rms_norm` | `HandRMSNorm` | `Ernie4_5RMSNorm`, `ernie_lab.norm.RMSNorm` |
# | 2 | `rope_interleaved` | `rope_by_hand` | `apply_rotary_pos_emb`, `ernie_lab.rope.apply_rope` |
# | 3 | `gqa_attention` | `HandAttention` | `Ernie4_5Attention`, `ernie_lab.attention.Attention` |
# | 4 | `swiglu` | `HandSwiGLU` | `Ernie4_5MLP`, `ernie_lab.mlp.SwiGLU` |
# | 5 | `decoder_layer` | `HandDecoderLayer`, then `HandErnie` | `Ernie4_5DecoderLayer`, `ernie_lab.model.DecoderLayer` |
# | 8 | `cache_append` | a cached `HandDecoderLayer` | one pass without a cache; `ernie_lab.KVCache` |
#
# After each stub comes one line, like `rms_norm = exercises.use("01.rms_norm", rms_norm, kit=...)`. It
# tests your function on fresh random inputs of several shapes against `ernie_lab` and `transformers`:
# when it is right, the notebook goes on with **your** piece; while it is still a stub, it goes on with the
# kit's (so "Run All" works on a fresh notebook); when it is wrong, the cell turns red and says what differs.
# Then the notebook assembles the model from the pieces and compares it with the reference
# implementation in `transformers` **on the same weights and inputs**, in float32. The finished pieces,
# with the reasoning behind every line, are in `solutions/01_dense_decoder_from_scratch.py`.
#
# `ERNIE_LAB_FAST=1` (set by the tests) builds a narrow 4-layer model with the real vocabulary and
# the real attention geometry; without it every step runs on the real 0.3B shape (random weights,
# about 1.4 GB per copy in float32).

# %%
# %matplotlib inline
import math
import shutil
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn
from tqdm.auto import tqdm

import ernie_lab
from ernie_lab.model.config import ERNIE_0_3B, ErnieConfig
from ernie_lab import exercises, notebook
from ernie_lab.course.notebook import compare, setup

torch.set_grad_enabled(False)  # this notebook only runs models forward
FAST = setup()  # fast mode: from ERNIE_LAB_FAST (make lab FAST=1); write FAST = True here to force it
USE_REAL_WEIGHTS = False  # True: also use a real checkpoint a lecturer has cached (never downloads)

# %% [markdown]
# ## 0 · The configuration and a reference model · core, 7 min
#
# A config is a handful of integers that fix every tensor shape. Note the 0.3B's oddity: 16 query
# heads of width 128 make 2048, twice the model width of 1024, so the query projection *widens*.

# %%
SMALL = ErnieConfig(  # the real vocabulary and attention geometry, narrower and shallower
    vocab_size=103424, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=16, num_key_value_heads=2, head_dim=128,
)
cfg = SMALL if FAST else ERNIE_0_3B

fields = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rope_theta", "rms_norm_eps", "tie_word_embeddings"]
print(f"{'field':22s} {'this notebook':>14s} {'ERNIE-4.5-0.3B':>15s}")
for name in fields:
    print(f"{name:22s} {getattr(cfg, name)!s:>14s} {getattr(ERNIE_0_3B, name)!s:>15s}")

# %% [markdown]
# The reference is `transformers`' `Ernie4_5ForCausalLM` with the same shape and random weights.
# Two adjustments make the comparison meaningful: weights drawn with standard deviation 0.1 instead
# of 0.02 (a model that small-weighted just echoes its input token, and then everything "matches"),
# and norm gains drawn around 1 instead of all ones (a gain of exactly 1 would hide a forgotten
# multiplication). We ask for the reference's *eager* attention: the plain softmax path we rebuild.
#
# `compare` (from `ernie_lab.notebook`) prints the largest difference between two tensors and fails
# above a tolerance: 1e-5 for single pieces, 1e-4 once errors can add up over layers. float32 keeps
# about seven significant digits, so where values exceed 1 the tolerance is taken relative to the
# largest value.

# %%
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

INIT_STD = 0.1


def reference_config(c: ErnieConfig) -> Ernie4_5Config:
    return Ernie4_5Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta},
        initializer_range=INIT_STD, attn_implementation="eager",
    )


reference = Ernie4_5ForCausalLM(reference_config(cfg)).eval()
for name, p in reference.named_parameters():
    if name.endswith("norm.weight"):
        p.normal_(1.0, 0.1)  # gains near 1, but not 1
print(reference.model.layers[0])


# %%
B, T = 2, 12
x = torch.randn(B, T, cfg.hidden_size)                 # (B, T, hidden): a batch of residual-stream vectors
positions = torch.arange(T).expand(B, T)               # (B, T): token positions 0..T-1
ref_layer = reference.model.layers[0]


# %% [markdown]
# ## 1 · RMSNorm · core, 14 min
#
# Before each sub-block the residual vector $x \in \mathbb{R}^h$ is rescaled to unit root mean square
# and multiplied by a learned gain $g$:
#
# $$\mathrm{RMSNorm}(x) = g \odot \frac{x}{\sqrt{\tfrac{1}{h}\sum_{i=1}^{h} x_i^2 + \varepsilon}}, \qquad \varepsilon = 10^{-5}.$$
#
# Unlike LayerNorm there is no mean subtraction and no bias: cheaper, and it works as well. The
# statistics are computed in float32 even when the model runs in bfloat16.
#
# **Your turn.** Write the formula as a function. The check feeds it fresh random vectors of several
# widths, among them tiny ones where $\varepsilon$ decides the result.

# %%
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps), the mean over the last axis (one statistic per vector).

    x: (..., h), weight: (h,)  ->  (..., h). Compute the statistic in float32 (x.float()) and cast the
    normalised vector back to x.dtype before multiplying by the gain.
    """
    ...   # your code here


from ernie_lab.course.exercise_sets.nb01 import kit_rms_norm   # the kit's RMSNorm, as a function

rms_norm = exercises.use("01.rms_norm", rms_norm, kit=kit_rms_norm)

# %% [markdown]
# The module around it holds the learned gain; its weights load from the reference under the same name.

# %%
class HandRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))   # the gain g

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., h) -> (..., h)
        return rms_norm(x, self.weight, self.eps)


hand_norm = HandRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
hand_norm.load_state_dict(ref_layer.input_layernorm.state_dict())
compare("RMSNorm: by hand vs transformers", hand_norm(x), ref_layer.input_layernorm(x))

lab_norm = ernie_lab.norm.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
lab_norm.load_state_dict(ref_layer.input_layernorm.state_dict())
compare("RMSNorm: by hand vs ernie_lab.norm.RMSNorm", hand_norm(x), lab_norm(x))

# %%
# What RMSNorm does: vectors of wildly different sizes come out the same size, except tiny ones,
# where eps (1e-5, compared with the mean square) keeps the division from blowing noise up.
scales = torch.logspace(-4, 2, 400)[:, None]                      # (400, 1)
vectors = torch.randn(400, cfg.hidden_size) * scales              # (400, h)
unit = HandRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)             # gain 1: the pure normalisation
rms_in = vectors.pow(2).mean(-1).sqrt()
rms_out = unit(vectors).pow(2).mean(-1).sqrt()
predicted = rms_in / (rms_in**2 + cfg.rms_norm_eps).sqrt()        # what the formula says

fig, ax = plt.subplots(figsize=(6.5, 3.8))
ax.loglog(rms_in, rms_in, color="gray", ls="--", label="input RMS (no normalisation)")
ax.loglog(rms_in, rms_out, lw=3, alpha=0.6, label="RMS after RMSNorm (gain 1)")
ax.loglog(rms_in, predicted, color="black", lw=1, ls=":", label=r"$r / \sqrt{r^2 + \varepsilon}$")
ax.axvline(math.sqrt(cfg.rms_norm_eps), color="gray", lw=0.8)
ax.text(math.sqrt(cfg.rms_norm_eps) * 1.2, 1e-3, r"$r = \sqrt{\varepsilon}$", fontsize=9)
ax.set_xlabel("RMS r of the input vector")
ax.set_ylabel("RMS")
ax.set_title("RMSNorm maps every vector to RMS 1 (tiny ones excepted)")
ax.legend()
plt.tight_layout()
plt.show()
assert torch.allclose(rms_out, predicted, rtol=1e-4)
assert torch.allclose(rms_out[rms_in > 0.1], torch.ones(1), atol=1e-3)


# %% [markdown]
# ## 2 · Rotary position embedding (RoPE), interleaved · core, 20 min
#
# Attention compares a query with keys by dot products, which know nothing about order. RoPE
# rotates each query and key by an angle proportional to its position. A head vector of width
# $d$ is cut into $d/2$ pairs; pair $i$ at position $p$ is rotated by $p\,\omega_i$ with
# $\omega_i = \theta^{-2i/d}$ and $\theta = 500\,000$:
#
# $$\begin{pmatrix} x'_{2i} \\ x'_{2i+1} \end{pmatrix} =
# \begin{pmatrix} \cos p\omega_i & -\sin p\omega_i \\ \sin p\omega_i & \cos p\omega_i \end{pmatrix}
# \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix}.$$
#
# Because rotations compose, $\langle R_m q, R_n k\rangle = \langle q, R_{n-m} k\rangle$: the score depends
# only on the **distance** $n-m$. Pair $i=0$ turns one radian per token; the last pair turns so
# slowly that it takes millions of tokens to go round once.
#
# **ERNIE's twist:** the pairs are *neighbouring* dimensions $(2i, 2i{+}1)$ (GPT-J / GLM style),
# not the two halves $(i, i{+}d/2)$ that Llama uses in `transformers`.
#
# The angles are the same for every head, so they are computed once per position: a table of
# $\cos p\,\omega_i$ and one of $\sin p\,\omega_i$, each `(B, T, d/2)`.

# %%
def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,): omega_i


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    angles = positions.float()[..., None] * rope_frequencies(head_dim, theta)    # (B, T, d/2): p * omega_i
    return angles.cos(), angles.sin()


# %% [markdown]
# **Your turn.** Turn every pair $(x_{2i}, x_{2i+1})$ of every head by its angle. The check uses batches
# whose size differs from the number of heads, positions far beyond one full turn, and a single decoding
# step ($T = 1$).

# %%
def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the interleaved pairs (x[..., 2i], x[..., 2i+1]) of every head:

        x'[2i]   = x[2i] cos - x[2i+1] sin
        x'[2i+1] = x[2i+1] cos + x[2i] sin,      cos, sin = cos[..., i], sin[..., i]

    x: (B, H, T, d); cos, sin: (B, T, d/2), the same for every head  ->  (B, H, T, d).
    """
    ...   # your code here


from ernie_lab.course.exercise_sets.nb01 import kit_rope   # ernie_lab.rope.apply_rope

rope_interleaved = exercises.use("01.rope_interleaved", rope_interleaved, kit=kit_rope)


def rope_by_hand(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    # x: (B, H, T, d), positions: (B, T) -> (B, H, T, d): your rotation with this section's tables
    return rope_interleaved(x, *rope_tables(positions, x.shape[-1], theta))


# %%
from transformers.models.ernie4_5.modeling_ernie4_5 import apply_rotary_pos_emb

q = torch.randn(B, cfg.num_attention_heads, T, cfg.head_dim)     # (B, H, T, d)
k = torch.randn(B, cfg.num_key_value_heads, T, cfg.head_dim)     # (B, Hkv, T, d)
cos, sin = reference.model.rotary_emb(x, positions)               # the reference's tables, (B, T, d)
q_ref, k_ref = apply_rotary_pos_emb(q, k, cos, sin)
compare("RoPE on q: by hand vs transformers", rope_by_hand(q, positions, cfg.rope_theta), q_ref)
compare("RoPE on k: by hand vs transformers", rope_by_hand(k, positions, cfg.rope_theta), k_ref)

from ernie_lab.model.rope import apply_rope, inverse_frequencies, rope_angles

lab_cos, lab_sin = rope_angles(positions, cfg.head_dim, cfg.rope_theta)  # (B, T, d/2) each
compare("frequencies: by hand vs ernie_lab.rope", rope_frequencies(cfg.head_dim, cfg.rope_theta),
        inverse_frequencies(cfg.head_dim, cfg.rope_theta), atol=0)
compare("RoPE on q: by hand vs ernie_lab.rope.apply_rope", rope_by_hand(q, positions, cfg.rope_theta),
        apply_rope(q, lab_cos, lab_sin))

# %% [markdown]
# Three pictures of RoPE. **Left:** $\cos(p\,\omega_i)$ for every position and pair: the first
# pairs spin fast, the last barely move, so together they tell near and far positions apart.
# **Middle:** the wavelength $2\pi/\omega_i$ of each pair, from $2\pi \approx 6$ tokens for the first pair
# to $2\pi\,\theta^{(d-2)/d} \approx 2.56$ million tokens for the last ($d = 128$, $\theta = 500\,000$;
# computed below), far beyond the 128K context (marked). **Right:** the score $\langle R_m q, R_n k\rangle$ of one fixed query
# and key placed at positions $m$ and $n$: constant along every diagonal, since only $n-m$ matters.

# %%
freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta)
pos = torch.arange(256)
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))

im = axes[0].imshow(torch.cos(pos[:, None] * freqs), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
axes[0].set_xlabel("pair index i (frequency)")
axes[0].set_ylabel("position p")
axes[0].set_title(r"$\cos(p\,\omega_i)$, head_dim %d, theta %g" % (cfg.head_dim, cfg.rope_theta))
fig.colorbar(im, ax=axes[0])

axes[1].semilogy(2 * math.pi / freqs, marker=".")
axes[1].axhline(cfg.max_position_embeddings, color="gray", ls="--", label="context 131,072")
axes[1].set_xlabel("pair index i")
axes[1].set_ylabel("wavelength (tokens, log)")
axes[1].set_title("How many tokens one full turn takes")
axes[1].legend()

one_q, one_k = torch.randn(cfg.head_dim), torch.randn(cfg.head_dim)
n = 48
grid = torch.arange(n).expand(1, n)                                              # (1, n) positions
q_at = rope_by_hand(one_q.expand(1, 1, n, -1), grid, cfg.rope_theta)[0, 0]       # (n, d): q placed at 0..n-1
k_at = rope_by_hand(one_k.expand(1, 1, n, -1), grid, cfg.rope_theta)[0, 0]       # (n, d)
scores = q_at @ k_at.T                                                           # (n, n): query m, key n
im = axes[2].imshow(scores, cmap="viridis")
axes[2].set_xlabel("key position n")
axes[2].set_ylabel("query position m")
axes[2].set_title("Same q and k at every pair of positions")
fig.colorbar(im, ax=axes[2])
plt.tight_layout()
plt.show()

longest = 2 * math.pi * cfg.rope_theta ** ((cfg.head_dim - 2) / cfg.head_dim)
print(f"wavelengths from {2 * math.pi / freqs[0]:.2f} to {2 * math.pi / freqs[-1]:,.0f} tokens")
assert math.isclose(2 * math.pi / freqs[-1].item(), longest, rel_tol=1e-4) and 2.5e6 < longest < 2.6e6
# The picture's claim, checked: shifting both positions by 7 leaves every score unchanged.
compare("RoPE scores depend only on n - m", scores[7:, 7:], scores[:-7, :-7], atol=1e-4)

# %% [markdown]
# Which dimensions form a pair? ERNIE pairs neighbours; Llama (`rotate_half`) pairs dimension $i$
# with $i + d/2$. Both are valid rotary embeddings, but a checkpoint trained with one gives garbage
# with the other. Exercise 1 at the end has you write the rotate-half layout and put it into the
# model, to watch the logits leave the checkpoint's.

# %%
from matplotlib.patches import Arc

width = 16  # draw the first 16 dimensions of a head
fig, axes = plt.subplots(2, 1, figsize=(10, 4))
layouts = [("ERNIE 4.5: interleaved pairs (2i, 2i+1)", [(2 * i, 2 * i + 1) for i in range(width // 2)]),
           ("Llama: rotate-half pairs (i, i + d/2)", [(i, i + width // 2) for i in range(width // 2)])]
colors = plt.cm.tab10(range(width // 2))
for ax, (title, pairs) in zip(axes, layouts):
    for (a, b), color in zip(pairs, colors):
        for dim in (a, b):
            ax.add_patch(plt.Rectangle((dim - 0.4, 0), 0.8, 0.8, color=color, alpha=0.8))
            ax.text(dim, 0.4, str(dim), ha="center", va="center", fontsize=9)
        ax.add_patch(Arc(((a + b) / 2, 0.8), b - a, 0.5 + 0.12 * (b - a), theta1=0, theta2=180, color=color, lw=2))
    ax.set_xlim(-1, width)
    ax.set_ylim(-0.2, 2.2)
    ax.set_title(title)
    ax.axis("off")
fig.suptitle("Which head dimensions are rotated together (same colour = one pair)")
plt.tight_layout()
plt.show()


# %% [markdown]
# ## 3 · Causal grouped-query attention · core, 24 min
#
# Each head $h$ projects the normalised residual into queries, keys and values and mixes the values
# of earlier tokens by how well their keys match its query:
#
# $$\mathrm{head}_h = \mathrm{softmax}\!\Big(\frac{Q_h K_{g(h)}^{\top}}{\sqrt{d}} + M\Big) V_{g(h)}, \qquad
# M_{ts} = \begin{cases} 0 & s \le t \\ -\infty & s > t \end{cases}$$
#
# The causal mask $M$ stops a token from reading the future. In **grouped-query attention** (GQA)
# the 16 query heads share only 2 key/value heads: head $h$ reads KV head $g(h) = \lfloor h / 8 \rfloor$.
# The keys and values, which must be stored for every past token (the KV cache, section 8), shrink
# 8x, while 16 different queries still ask 16 different questions. The head outputs are
# concatenated and projected back to the model width by $W_o$.
#
# One detail matters once a KV cache exists (section 8): the keys may outnumber the queries. With $S$
# keys and $T \le S$ queries, the queries are the **last** $T$ positions, so query $i$ sits at position
# $S - T + i$ and sees keys $0 \dots S - T + i$. A single decoding step ($T = 1$) sees every key.
#
# ![Grouped-query attention over a KV cache](../figures/gqa_kv_cache.png)
#
# **Your turn.** Write the attention of the formula above for already-projected, already-rotated heads.
# The check tries a prefill ($S = T$), one cached decoding step ($T = 1$) and a chunk after a cache, with
# 1 to 3 KV heads shared by groups of 2 to 4 query heads.

# %%
def gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) v, where H query heads share Hkv key/value heads.

    q: (B, H, T, d); k: (B, Hkv, S, d); v: (B, Hkv, S, dv), S >= T  ->  (B, H, T, dv).
    * query head h reads KV head h // (H // Hkv)   (torch.repeat_interleave along axis 1)
    * the queries are the last T of S positions: query i may see keys 0 .. S - T + i; M = -inf elsewhere
    * softmax over the keys (the last axis)
    """
    ...   # your code here


from ernie_lab.course.exercise_sets.nb01 import kit_gqa_attention   # ernie_lab.attention.attend, causal

gqa_attention = exercises.use("01.gqa_attention", gqa_attention, kit=kit_gqa_attention)

# %% [markdown]
# The module around it projects, rotates and (from section 8 on) stores keys and values in a cache.
# `probabilities` gets the attention weights out of your function with a trick: when the values are the
# identity matrix, each output row *is* the row of weights that mixed them.

# %%
class HandAttention(nn.Module):
    def __init__(self, c: ErnieConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.theta = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta)
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c.hidden_size, bias=False)

    def heads(self, x: torch.Tensor, positions: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, Hkv, T, d)
        return rope_by_hand(q, positions, self.theta), rope_by_hand(k, positions, self.theta), v

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.heads(x, positions)
        if cache is not None:  # section 8: this layer's buffers; cache_append is the function you write there
            k = cache_append(cache["k"], cache["length"], k)                             # (B, Hkv, past + T, d)
            v = cache_append(cache["v"], cache["length"], v)
            cache["length"] += T
        out = gqa_attention(q, k, v)                                                     # (B, H, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))  # (B, T, hidden)

    def probabilities(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # (B, H, T, T)
        q, k, _ = self.heads(x, positions)
        B, _, T, _ = k.shape
        identity = torch.eye(T).expand(B, self.n_kv_heads, T, T)   # v = I: output row t = the weights of query t
        return gqa_attention(q, k, identity)


# %%
hand_attn = HandAttention(cfg)
hand_attn.load_state_dict(ref_layer.self_attn.state_dict())
ours, our_weights = hand_attn(x, positions), hand_attn.probabilities(x, positions)

additive_mask = torch.zeros(T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
theirs, their_weights = ref_layer.self_attn(x, position_embeddings=(cos, sin), attention_mask=additive_mask[None, None])
compare("attention output: by hand vs transformers", ours, theirs)
compare("attention probabilities: by hand vs transformers", our_weights, their_weights)

from ernie_lab.model.attention import Attention, causal_mask

lab_attn = Attention(cfg, layer_idx=0)
lab_attn.load_state_dict(ref_layer.self_attn.state_dict())
compare("attention output: by hand vs ernie_lab Attention", ours, lab_attn(x, (lab_cos, lab_sin)))
assert torch.equal(causal_mask(T, T), torch.ones(T, T, dtype=torch.bool).tril())

# %% [markdown]
# **Left:** the causal mask, white where a query may look. **Right:** where head 0 actually looks
# (random weights, so the pattern is arbitrary, but never above the diagonal, and every row sums to 1).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
axes[0].imshow(causal_mask(T, T), cmap="gray")
axes[0].set_title("causal mask: may query t see key s?")
im = axes[1].imshow(our_weights[0, 0], cmap="magma")
axes[1].set_title("attention probabilities, layer 0, head 0")
fig.colorbar(im, ax=axes[1])
for ax in axes:
    ax.set_xlabel("key position s")
    ax.set_ylabel("query position t")
plt.tight_layout()
plt.show()
assert torch.allclose(our_weights.sum(-1), torch.ones(B, cfg.num_attention_heads, T), atol=1e-5)
assert (our_weights.triu(diagonal=1) == 0).all()

# %% [markdown]
# GQA, drawn. **Left:** which KV head each of the 16 query heads reads. **Right:** the 16 heads'
# patterns on the same input: heads in one group share keys and values, yet look at different
# places because their queries differ.

# %%
H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
group = H // Hkv
fig = plt.figure(figsize=(13, 6))
grid = fig.add_gridspec(4, 6, width_ratios=[2.4, 0.15, 1, 1, 1, 1])
ax = fig.add_subplot(grid[:, 0])
for h in range(H):
    ax.plot([0, 1], [h, (h // group) * group + (group - 1) / 2], color=plt.cm.tab10(h // group), lw=1.5)
ax.scatter([0] * H, range(H), s=120, color=[plt.cm.tab10(h // group) for h in range(H)], zorder=3)
ax.scatter([1] * Hkv, [g * group + (group - 1) / 2 for g in range(Hkv)], s=500, marker="s",
           color=[plt.cm.tab10(g) for g in range(Hkv)], zorder=3)
for h in range(H):
    ax.text(-0.08, h, f"q{h}", ha="right", va="center", fontsize=8)
for g in range(Hkv):
    ax.text(1.12, g * group + (group - 1) / 2, f"KV head {g}\n(k and v)", va="center", fontsize=9)
ax.set_xlim(-0.3, 1.6)
ax.invert_yaxis()
ax.axis("off")
ax.set_title(f"{H} query heads share {Hkv} KV heads")

for h in range(H):
    sub = fig.add_subplot(grid[h // 4, 2 + h % 4], xticks=[], yticks=[])
    sub.imshow(our_weights[0, h], cmap="magma")
    sub.set_title(f"q{h} -> kv{h // group}", fontsize=8, color=plt.cm.tab10(h // group))
fig.suptitle("Grouped-query attention: head sharing and the 16 heads' patterns (layer 0)")
plt.tight_layout()
plt.show()


# %% [markdown]
# ## 4 · The SwiGLU MLP · core, 13 min
#
# After attention has moved information between positions, the MLP transforms each position on its
# own. ERNIE uses a *gated* MLP: one projection decides how much of each of the $I$ features passes
# (through $\mathrm{silu}(z) = z\,\sigma(z)$), a second one supplies the features:
#
# $$\mathrm{MLP}(x) = W_{\text{down}}\big(\mathrm{silu}(W_{\text{gate}}\,x) \odot W_{\text{up}}\,x\big), \qquad
# W_{\text{gate}}, W_{\text{up}} \in \mathbb{R}^{I\times h},\; W_{\text{down}} \in \mathbb{R}^{h\times I}.$$
#
# With three matrices the 0.3B's width $I = 3072 = 3h$ costs $9h^2$ parameters per layer, close
# to the $8h^2$ of a classic two-matrix MLP of width $4h$.
#
# **Your turn.** The weights come as `nn.Linear` stores them, `(out, in)`, so projecting a row vector is
# `x @ w.T`.

# %%
def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """W_down( silu(W_gate x) * (W_up x) ),  silu(z) = z * sigmoid(z).

    x: (..., h); w_gate, w_up: (I, h); w_down: (h, I)  ->  (..., h).
    """
    ...   # your code here


from ernie_lab.course.exercise_sets.nb01 import kit_swiglu   # ernie_lab.mlp.SwiGLU, as a function

swiglu = exercises.use("01.swiglu", swiglu, kit=kit_swiglu)


# %%
class HandSwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # (..., h) -> (..., h)
        return swiglu(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)


hand_mlp = HandSwiGLU(cfg.hidden_size, cfg.intermediate_size)
hand_mlp.load_state_dict(ref_layer.mlp.state_dict())
compare("SwiGLU: by hand vs transformers", hand_mlp(x), ref_layer.mlp(x))

lab_mlp = ernie_lab.mlp.SwiGLU(cfg.hidden_size, cfg.intermediate_size)
lab_mlp.load_state_dict(ref_layer.mlp.state_dict())
compare("SwiGLU: by hand vs ernie_lab.mlp.SwiGLU", hand_mlp(x), lab_mlp(x))

# %%
z = torch.linspace(-6, 4, 200)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(z, torch.relu(z), ls="--", label="relu(z)")
ax.plot(z, z * torch.sigmoid(z), lw=2, label="silu(z) = z sigmoid(z)")
ax.axhline(0, color="gray", lw=0.5)
ax.set_xlabel("gate pre-activation z")
ax.set_ylabel("gate value")
ax.set_title("The SwiGLU gate: smooth, and slightly negative below 0")
ax.legend()
plt.tight_layout()
plt.show()


# %% [markdown]
# ## 5 · The decoder layer · core, 13 min
#
# A layer adds two updates to the residual stream, each computed from a normalised copy (pre-norm):
#
# $$x \leftarrow x + \mathrm{Attention}(\mathrm{RMSNorm}_1(x)), \qquad x \leftarrow x + \mathrm{MLP}(\mathrm{RMSNorm}_2(x)).$$
#
# The residual stream itself is never normalised, so a signal (and a gradient) can pass through
# all 18 layers unchanged.
#
# **Your turn.** Wire one layer from its four parts, each a function of a `(B, T, h)` tensor.

# %%
def decoder_layer(x: torch.Tensor, attention, mlp, attn_norm, mlp_norm) -> torch.Tensor:
    """x <- x + attention(attn_norm(x)), then x <- x + mlp(mlp_norm(x)); return x.

    x: (B, T, h); attention, mlp, attn_norm, mlp_norm: (B, T, h) -> (B, T, h)  ->  (B, T, h).
    """
    ...   # your code here


from ernie_lab.course.exercise_sets.nb01 import kit_decoder_layer   # DecoderLayer.forward's wiring

decoder_layer = exercises.use("01.decoder_layer", decoder_layer, kit=kit_decoder_layer)

# %% [markdown]
# We name our sub-modules like the reference does, so its weights load as they are.

# %%
class HandDecoderLayer(nn.Module):
    def __init__(self, c: ErnieConfig):
        super().__init__()
        self.input_layernorm = HandRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = HandAttention(c)
        self.post_attention_layernorm = HandRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = HandSwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        attention = lambda h: self.self_attn(h, positions, cache)                   # (B, T, h) -> (B, T, h)
        return decoder_layer(x, attention, self.mlp, self.input_layernorm, self.post_attention_layernorm)


hand_layer = HandDecoderLayer(cfg)
hand_layer.load_state_dict(ref_layer.state_dict())
their_layer_out = ref_layer(x, attention_mask=additive_mask[None, None], position_embeddings=(cos, sin))
compare("decoder layer: by hand vs transformers", hand_layer(x, positions), their_layer_out, atol=1e-4)

# %% [markdown]
# ernie-lab names its modules more briefly (`attn_norm`, `attn`, `mlp_norm`, `mlp`). The loader's
# `NAME_MAP`, a list of (Hub name, ernie-lab name) templates, is the whole translation;
# `hub_to_lab` applies it. We use it here to move the reference layer's weights across.

# %%
from ernie_lab.io.loading import NAME_MAP, hub_to_lab
from ernie_lab.model.decoder import DecoderLayer

for hub_name, lab_name in NAME_MAP:
    print(f"  {hub_name:52s} -> {lab_name}")


def lab_state(reference_module: nn.Module, hub_prefix: str, lab_prefix: str = "") -> dict:
    # The reference module's tensors under ernie-lab's names (via the loader's NAME_MAP).
    return {hub_to_lab(hub_prefix + name).removeprefix(lab_prefix): tensor
            for name, tensor in reference_module.state_dict().items()}


lab_layer = DecoderLayer(cfg, layer_idx=0)
lab_layer.load_state_dict(lab_state(ref_layer, "model.layers.0.", "layers.0."))
compare("decoder layer: by hand vs ernie_lab DecoderLayer", hand_layer(x, positions),
        lab_layer(x, (lab_cos, lab_sin)), atol=1e-4)


# %% [markdown]
# ## 6 · The whole model · core, 5 min
#
# Token ids pick rows of the embedding matrix $E \in \mathbb{R}^{V\times h}$; the layers update
# the residual stream; a final RMSNorm; and the logits are dot products with the **same** matrix
# $E$ (tied embeddings: the 0.3B saves $V h \approx 106$ M parameters this way):
#
# $$h_0 = E[\text{ids}], \quad h_\ell = \mathrm{Layer}_\ell(h_{\ell-1}), \quad \text{logits} = \mathrm{RMSNorm}(h_L)\,E^{\top}.$$

# %%
class HandErnie(nn.Module):
    def __init__(self, c: ErnieConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(HandDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = HandRMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:         # (B, T) -> (B, T, V)
        B, T = ids.shape
        positions = torch.arange(T).expand(B, T)
        h = self.embed_tokens(ids)                                 # (B, T, h)
        for layer in self.layers:
            h = layer(h, positions)
        return self.norm(h) @ self.embed_tokens.weight.T          # tied head: (B, T, V)


hand_model = HandErnie(cfg)
hand_model.load_state_dict({name.removeprefix("model."): tensor for name, tensor in reference.state_dict().items()
                            if name != "lm_head.weight"})
ids = torch.randint(0, cfg.vocab_size, (B, T))
reference_logits = reference(ids).logits
compare("logits: by hand vs transformers", hand_model(ids), reference_logits, atol=1e-4)

# %%
model = ernie_lab.ErnieForCausalLM(cfg).eval()
model.load_state_dict(lab_state(reference, ""))
compare("logits: by hand vs ernie_lab.ErnieForCausalLM", hand_model(ids), model(ids).logits, atol=1e-4)
assert model.lm_head.weight is model.embed.weight  # tied: one matrix, two uses
del hand_model  # from here on we use the package


# %% [markdown]
# ### Counting parameters
#
# Summing the matrices (the head is free, it *is* the embedding):
#
# $$N = Vh + L\big(\underbrace{2hHd + 2hH_{kv}d}_{q,\,o,\,k,\,v} + \underbrace{3hI}_{\text{SwiGLU}} + 2h\big) + h.$$
#
# For the 0.3B: $103424\cdot1024 + 18\,(2\cdot1024\cdot2048 + 2\cdot1024\cdot256 + 3\cdot1024\cdot3072 + 2048) + 1024 = 360{,}748{,}032$.

# %%
def count_parameters(c: ErnieConfig) -> int:
    h = c.hidden_size
    attention = 2 * h * c.num_attention_heads * c.head_dim + 2 * h * c.num_key_value_heads * c.head_dim
    per_layer = attention + 3 * h * c.intermediate_size + 2 * h
    return c.vocab_size * h + c.num_hidden_layers * per_layer + h


print(f"this notebook's model: {model.num_parameters():,} parameters (formula: {count_parameters(cfg):,})")
assert count_parameters(cfg) == model.num_parameters() == sum(p.numel() for p in reference.parameters())
assert count_parameters(ERNIE_0_3B) == 360_748_032
if not FAST:  # the model above *is* the real 0.3B shape
    assert model.num_parameters() == 360_748_032

with torch.device("meta"):  # the real shape, without memory, to see where its weights live
    real_shape = ernie_lab.ErnieForCausalLM(ERNIE_0_3B)
groups = {"embedding (= LM head)": 0, "attention q, k, v, o": 0, "SwiGLU MLP": 0, "RMSNorm gains": 0}
for name, p in real_shape.named_parameters():
    key = ("embedding (= LM head)" if name.startswith("embed") else "attention q, k, v, o" if ".attn." in name
           else "SwiGLU MLP" if ".mlp." in name else "RMSNorm gains")
    groups[key] += p.numel()
assert sum(groups.values()) == real_shape.num_parameters() == 360_748_032

fig, ax = plt.subplots(figsize=(8, 2.8))
left = 0
for (label, count), color in zip(groups.items(), ["#c6dbef", "#9ecae1", "#a1d99b", "#fdd0a2"]):
    ax.barh(0, count / 1e6, left=left, color=color, edgecolor="black", label=f"{label}: {count / 1e6:.1f} M")
    left += count / 1e6
ax.set_yticks([])
ax.set_xlabel("parameters (millions)")
ax.set_title("Where the 360.7 M parameters of ERNIE-4.5-0.3B live")
ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2, fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7 · Loading a checkpoint · optional, 5 min
#
# A Hub checkpoint is a folder: `config.json` plus `model.safetensors` (or shards listed in
# `model.safetensors.index.json`). `transformers`' `save_pretrained` writes exactly that layout,
# so our reference model becomes a stand-in for a downloaded one. `ernie_lab.load_model` reads the
# config, translates the tensor names with `NAME_MAP`, checks every name and shape against a model
# skeleton built on the `meta` device (shapes only, no memory) before it reads any weights, and
# then fills the skeleton.

# %%
del model  # the package's copy from section 6 is no longer needed: keep at most two models in memory
checkpoint = Path(tempfile.mkdtemp(prefix="ernie-0.3b-shape-"))
reference.save_pretrained(checkpoint)
for file in sorted(checkpoint.iterdir()):
    print(f"  {file.name:26s} {file.stat().st_size / 1e6:9.1f} MB")

loaded = ernie_lab.load_model(checkpoint)
compare("logits: ernie_lab.load_model vs transformers", loaded(ids).logits, reference_logits, atol=1e-4)

# %% [markdown]
# A checkpoint whose weights do not fit its config fails before anything is built, with a message
# that names the problem. Here `config.json` claims one layer more than the weights hold:

# %%
import json

broken = Path(tempfile.mkdtemp(prefix="ernie-broken-"))
config_json = json.loads((checkpoint / "config.json").read_text())
config_json["num_hidden_layers"] += 1
(broken / "config.json").write_text(json.dumps(config_json))
(broken / "model.safetensors").symlink_to(checkpoint / "model.safetensors")
try:
    ernie_lab.load_model(broken)
    raise AssertionError("a config with an extra layer must not load")
except ernie_lab.CheckpointError as err:
    print("CheckpointError:", err)
    assert f"layers.{cfg.num_hidden_layers}." in str(err)

shutil.rmtree(broken)
shutil.rmtree(checkpoint)   # the temporary checkpoint (1.4 GB in full mode) is loaded; delete it

# %% [markdown]
# ## 8 · The KV cache · core, 21 min
#
# Generating token $t+1$ needs attention over all $t$ earlier tokens, but their keys and values
# never change once computed. The KV cache keeps them: after one **prefill** pass over the prompt,
# each **decode** step runs the model on the single new token, appends its key and value rows
# (per layer: $2 \times H_{kv} \times d$ numbers) and attends over everything stored.
# `ernie_lab.KVCache` preallocates the buffers and writes in place.
#
# ![The KV cache](../figures/kv_cache.png)
#
# **Your turn.** The cache's one operation: a layer's key (or value) buffer, `(B, Hkv, capacity, d)`, was
# allocated once for the longest sequence; its first `length` rows hold the tokens so far. Write the `T`
# new rows after them, **in place**, and hand back the filled rows. `HandAttention` (section 3) already
# calls it when it is given a cache.

# %%
def cache_append(buffer: torch.Tensor, length: int, new: torch.Tensor) -> torch.Tensor:
    """Write `new` into rows length .. length + T - 1 of `buffer` (in place); return buffer[:, :, :length + T].

    buffer: (B, Hkv, capacity, d), rows past `length` are leftovers; new: (B, Hkv, T, d)
    ->  (B, Hkv, length + T, d), a view of `buffer` (so the next step finds the rows there).
    """
    ...   # your code here


from ernie_lab.course.exercise_sets.nb01 import kit_cache_append   # ernie_lab.KVCache.update on one buffer

cache_append = exercises.use("01.cache_append", cache_append, kit=kit_cache_append)

# %% [markdown]
# Now all your pieces run cached: the decoder layer of section 5 on a prompt of 8 vectors, then on one
# vector per step, must give what one pass over all 24 gives. Each step's single query sees every stored
# key (your `gqa_attention` with $T = 1$), and your `cache_append` put them there.

# %%
steps = torch.randn(1, 24, cfg.hidden_size)                              # (1, 24, h): a residual stream
one_pass = hand_layer(steps, torch.arange(24)[None])                     # (1, 24, h), no cache
buffers = torch.zeros(2, 1, cfg.num_key_value_heads, 24, cfg.head_dim)   # keys, values: (B, Hkv, 24, d) each
layer_cache = {"k": buffers[0], "v": buffers[1], "length": 0}
outputs = [hand_layer(steps[:, :8], torch.arange(8)[None], layer_cache)]            # prefill 8 positions
for t in range(8, 24):
    outputs.append(hand_layer(steps[:, t:t + 1], torch.tensor([[t]]), layer_cache))  # one position per step
print("rows in your cache:", layer_cache["length"])
compare("your layer: prefill + cached steps vs one pass", torch.cat(outputs, dim=1), one_pass, atol=1e-4)
assert layer_cache["length"] == 24 and buffers[0].abs().amin(-1).gt(0).all()      # every row was written

# %% [markdown]
# The kit's `ernie_lab.KVCache` is the same idea for a whole model, one pair of buffers per layer. The
# check: feeding a sequence as a prompt plus one token at a time through the cache must give the same
# logits as one pass over the whole sequence.

# %%
from ernie_lab import KVCache

sequence = torch.randint(0, cfg.vocab_size, (1, 24))
full = loaded(sequence).logits                                           # (1, 24, V): no cache, all at once

cache = KVCache.for_model(loaded, batch=1, max_len=24)
pieces = [loaded(sequence[:, :8], cache=cache).logits]                  # prefill 8 tokens
for t in range(8, 24):
    pieces.append(loaded(sequence[:, t:t + 1], cache=cache).logits)     # decode: one token per step
print("tokens in the cache:", cache.length, "| key buffer of layer 0:", tuple(cache.keys[0].shape))
compare("logits: cached decode vs full recomputation", torch.cat(pieces, dim=1), full, atol=1e-4)


# %% [markdown]
# What the cache buys: the time to produce the next token after $t$ tokens, recomputing everything
# versus one cached step. Without the cache every step pushes all $t + 1$ tokens through every weight
# matrix: the step's cost grows with $t$ (and the whole generation's with $t^2$). With the cache a step
# has two parts. The **weights** are applied to one token, a cost that is the same at any length.
# **Attention** compares the new query with all $t$ cached keys and mixes $t$ values: that part grows
# linearly with $t$. At short contexts the weights dominate, so a cached step looks almost constant;
# the cell after the plot computes where attention catches up.

# %%
def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up: the first call pays for memory allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


lengths = [32, 128, 256, 512] if FAST else [32, 128, 256, 512, 1024]
long_sequence = torch.randint(0, cfg.vocab_size, (1, max(lengths) + 1))
no_cache, with_cache = [], []
for t in tqdm(lengths, desc="timing"):
    no_cache.append(median_seconds(lambda: loaded(long_sequence[:, :t + 1], logits_to_keep=1)))
    cache = KVCache.for_model(loaded, 1, t + 1)
    loaded(long_sequence[:, :t], cache=cache)

    def one_step():
        cache.length = t  # rewind, so each repeat appends at the same place
        loaded(long_sequence[:, t:t + 1], cache=cache)

    with_cache.append(median_seconds(one_step))

# Left: the work, counted (independent of how busy the machine is): token rows through the model and
# key rows read by attention. Right: the time, median of 5 repeats (a loaded machine adds noise).
fig, (work_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 3.8))
work_ax.plot(lengths, [t + 1 for t in lengths], marker="o", label="recompute: rows through every layer")
work_ax.plot(lengths, [1 for _ in lengths], marker="o", label="cached: rows through every layer")
work_ax.plot(lengths, [t + 1 for t in lengths], ls=":", color="gray", label="cached: key rows read (grows linearly)")
work_ax.set_xlabel("tokens already in the context (t)")
work_ax.set_ylabel("rows per next token")
work_ax.set_title("Work for the next token (counted)")
work_ax.legend(fontsize=9)
time_ax.plot(lengths, [s * 1e3 for s in no_cache], marker="o", label="recompute all t + 1 tokens")
time_ax.plot(lengths, [s * 1e3 for s in with_cache], marker="o", label="one step with the KV cache")
time_ax.set_xlabel("tokens already in the context (t)")
time_ax.set_ylabel("time for the next token (ms, median of 5)")
time_ax.set_title("Time for the next token (measured)")
time_ax.legend()
plt.tight_layout()
plt.show()
print("cached step / recompute, at the longest context:", f"{with_cache[-1] / no_cache[-1]:.2f}")

# %%
# Where attention catches up with the weights, for one cached step of the real 0.3B (per layer, counted):
# the weights cost 2 FLOPs per parameter; attention 2 H d t for q . k over t keys, and as much for the values.
c = ERNIE_0_3B
weights_per_layer = (2 * c.hidden_size * c.num_attention_heads * c.head_dim
                     + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim + 3 * c.hidden_size * c.intermediate_size)
equal_flops_at = 2 * weights_per_layer / (4 * c.num_attention_heads * c.head_dim)
# bytes read per step: the weights once (bf16), and the cached keys and values, 2 Hkv d per token (bf16)
equal_bytes_at = 2 * weights_per_layer / (2 * 2 * c.num_key_value_heads * c.head_dim)
print(f"attention's FLOPs equal the weights' at t = {equal_flops_at:,.0f} tokens; "
      f"the bytes read from the cache equal the weights' at t = {equal_bytes_at:,.0f}")
assert 3_000 < equal_flops_at < 4_000 and 25_000 < equal_bytes_at < 30_000

# %% [markdown]
# ## 9 · Generation · core, 8 min
#
# `ernie_lab.generate` prefills the prompt, then picks one token per step. **Greedy** decoding takes
# the most likely token; it must reproduce `transformers`' `generate` token for token, also for a
# batch of prompts of different lengths (left-padded, with positions that count only real tokens).

# %%
prompts = [[5, 17, 300, 4242, 77, 9], [81, 64, 1000]]
ours = ernie_lab.generate(loaded, prompts, max_new_tokens=12, eos_token_id=[])   # [] = never stop early

padded = torch.tensor([[5, 17, 300, 4242, 77, 9], [0, 0, 0, 81, 64, 1000]])      # left padding, pad id 0
attention_mask = (torch.arange(6) >= torch.tensor([[0], [3]])).long()
theirs = reference.generate(padded, attention_mask=attention_mask, max_new_tokens=12, min_new_tokens=12,
                            do_sample=False, pad_token_id=0)
print("ernie-lab   :", ours.tolist())
print("transformers:", theirs.tolist())
assert torch.equal(ours, theirs)
assert len(set(ours[0, 6:].tolist())) > 2  # a varied continuation, so the match means something

# %% [markdown]
# **Sampling** draws the next token from $p_i \propto \exp(z_i / \tau)$. The temperature $\tau$
# sharpens ($\tau<1$) or flattens ($\tau>1$) the distribution; **top-p** (nucleus) keeps only the
# most likely tokens whose probabilities add up to $p$, so the long tail of unlikely tokens is never
# drawn. A random model is unsure of everything, so its distributions are flat; the mechanics are
# the same as for a trained one.

# %%
from ernie_lab.model.generation import pick_next_token

logits = loaded(torch.tensor([prompts[0]])).logits[:, -1]          # (1, V): the next-token logits
fig, ax = plt.subplots(figsize=(7, 4))
for temperature in (0.5, 1.0, 2.0):
    probs = (logits[0] / temperature).softmax(-1).sort(descending=True).values
    in_nucleus = int((probs.cumsum(0) - probs < 0.9).sum())
    ax.loglog(torch.arange(1, 2001), probs[:2000], label=f"T = {temperature}: top-p 0.9 keeps {in_nucleus:,} tokens")
ax.set_xlabel("rank of the token")
ax.set_ylabel("probability")
ax.set_title("Next-token distribution at three temperatures")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# A random model's distributions are flat, so temperature changes little you can read. The kit's tiny
# trained text model (`data/tiny-ernie-text/`, trained on Python's help pages) shows what temperature does
# to text: greedy repeats the most likely phrase, higher temperatures wander.

# %%
TINY_TEXT = notebook.repo_path("data", "tiny-ernie-text")
tiny_text, tiny_tokenizer = ernie_lab.load_model(TINY_TEXT), ernie_lab.load_tokenizer(TINY_TEXT)
start = [tiny_tokenizer.encode("A list is")]
for temperature in (0.0, 0.7, 1.5):
    out = ernie_lab.generate(tiny_text, start, 24, temperature=temperature, eos_token_id=[],
                             generator=torch.Generator().manual_seed(0))
    print(f"T = {temperature}:", repr(tiny_tokenizer.decode(out[0].tolist())))

# %% [markdown]
# **What its attention heads learned.** Random heads spread their attention almost evenly; trained
# heads pick. Catch the input of the last layer's attention with a forward pre-hook, recompute its
# weights with your `gqa_attention` and the identity as values (the trick of section 3; here query
# head h reads KV head h // 3) and draw every head:

# %%
from ernie_lab.model.rope import apply_rope

sentence = "The return statement leaves the current function call with the expression list."
ids = torch.tensor([tiny_tokenizer.encode(sentence)])                          # (1, T)
attention = tiny_text.layers[-1].attn
captured = {}
hook = attention.register_forward_pre_hook(lambda module, args: captured.update(x=args[0], rope=args[1]))
with torch.no_grad():
    tiny_text(ids)
hook.remove()
x, T = captured["x"], ids.shape[1]
with torch.no_grad():
    q = attention.q_proj(x).view(1, T, attention.n_heads, -1).transpose(1, 2)     # (1, H, T, d)
    k = attention.k_proj(x).view(1, T, attention.n_kv_heads, -1).transpose(1, 2)  # (1, Hkv, T, d)
    q, k = apply_rope(q, *captured["rope"]), apply_rope(k, *captured["rope"])
    weights = gqa_attention(q, k, torch.eye(T).expand(1, attention.n_kv_heads, T, T))[0]   # (H, T, T)

words = [tiny_tokenizer.decode([i]) for i in ids[0].tolist()]
fig, axes = plt.subplots(1, attention.n_heads, figsize=(3.2 * attention.n_heads, 3.6))
for h, ax in enumerate(axes):
    ax.imshow(weights[h], cmap="magma", vmin=0, vmax=1)
    ax.set_title(f"head {h} (KV head {h // (attention.n_heads // attention.n_kv_heads)})", fontsize=10)
    ax.set_xticks(range(T), words, rotation=90, fontsize=7)
    ax.set_yticks(range(T), words if h == 0 else [], fontsize=7)
fig.suptitle("Trained tiny text model, last layer: where each token (row) looks (columns)")
plt.tight_layout()
plt.show()

# a trained head is selective: its rows put far more weight on their favourite key than a uniform row
rows = torch.arange(4, T)                                                 # queries with at least 5 keys
uniform = (1.0 / (rows + 1)).mean()
peak = weights[:, rows].amax(-1).mean(-1)                                 # (H,) mean top weight per head
print("mean top attention weight per head:", [round(v, 2) for v in peak.tolist()], f"(uniform: {uniform:.2f})")
assert torch.allclose(weights.sum(-1), torch.ones(attention.n_heads, T))
with torch.no_grad():  # the weights are the module's own: weights @ v, projected, is its output
    v = attention.v_proj(x).view(1, T, attention.n_kv_heads, -1).transpose(1, 2)
    v = v.repeat_interleave(attention.n_heads // attention.n_kv_heads, dim=1)    # (1, H, T, d)
    by_hand = attention.o_proj((weights[None] @ v).transpose(1, 2).reshape(1, T, -1))
    assert torch.allclose(by_hand, attention(x, captured["rope"]), atol=1e-5)
assert peak.max() > 2 * uniform, "no head of the trained model is more selective than uniform attention"
del tiny_text

# %%
# Checks of the sampler's promises.
greedy = pick_next_token(logits)
assert torch.equal(pick_next_token(logits, temperature=1.0, top_k=1), greedy)         # top-k 1 is greedy
assert torch.equal(pick_next_token(logits, temperature=1.0, top_p=1e-9), greedy)      # a tiny nucleus too

draws = pick_next_token(logits.expand(64, -1), 1.0, top_p=0.5, generator=torch.Generator().manual_seed(0))  # (64,)
probs, order = logits[0].softmax(-1).sort(descending=True)
nucleus = set(order[: int((probs.cumsum(0) - probs < 0.5).sum())].tolist())
assert set(draws.flatten().tolist()) <= nucleus, "a sample fell outside the top-p nucleus"

run = lambda seed: ernie_lab.generate(loaded, prompts, 6, temperature=0.8, top_p=0.9, eos_token_id=[],
                                      generator=torch.Generator().manual_seed(seed))
first, again, other = run(0), run(0), run(1)
assert torch.equal(first, again) and not torch.equal(first, other)  # same seed, same text
print("sampled (T=0.8, top-p 0.9):", first[:, 6:].tolist())

# %% [markdown]
# ## 10 · Text in, text out: tokenizer and chat template · optional, 5 min
#
# The model reads token ids. `ernie_lab.load_tokenizer(folder_or_hub_id)` reads a checkpoint's
# SentencePiece `tokenizer.model`; without one (as for this random model) it falls back, with a warning, to
# the kit's **stand-in**: a small SentencePiece model trained on Python's help texts that keeps
# ERNIE's special tokens at their real ids (`<|begin_of_sentence|>` = 100273, ...). Ordinary words
# get different ids than in the real vocabulary, which does not matter for a random model.
#
# ERNIE 4.5's chat format is plain text around two markers:
# `<|begin_of_sentence|>{system}\nUser: {question}\nAssistant: {answer}<|end_of_sentence|>`.

# %%
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the stand-in's warning: known, and said above
    tokenizer = ernie_lab.load_tokenizer(None)
print(tokenizer)

text = "Rotary embeddings turn pairs of numbers."
text_ids = tokenizer.encode(text)
print(text_ids, "->", [tokenizer.convert_ids_to_tokens(i) for i in text_ids][:8], "...")
assert tokenizer.decode(text_ids) == text

messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is RoPE?"}]
print(repr(tokenizer.apply_chat_template(messages, tokenize=False)))
chat_ids = tokenizer.apply_chat_template(messages)
assert chat_ids[0] == tokenizer.convert_tokens_to_ids("<|begin_of_sentence|>") == 100273
assert tokenizer.decode(chat_ids).endswith("Assistant: ")

# %%
reply = ernie_lab.generate(loaded, [chat_ids], max_new_tokens=12, eos_token_id=tokenizer.stop_token_ids)
reply_ids = reply[0, len(chat_ids):].tolist()
print("reply ids   :", reply_ids)
print("reply tokens:", tokenizer.convert_ids_to_tokens(reply_ids))
print("reply text  :", repr(tokenizer.decode(reply_ids, skip_special_tokens=True)))
# generate's reply is the continuation of the chat ids: the prompt comes back unchanged, then new ids
assert reply[0, :len(chat_ids)].tolist() == chat_ids and 0 < len(reply_ids) <= 12

# %% [markdown]
# The random model picks ids anywhere in the 103,424 rows of its embedding, while the stand-in
# tokenizer has only 8,000 pieces (plus the special tokens), so most of its "words" are reserved ids
# that decode to nothing. With a real checkpoint folder, `load_model(folder)` and
# `load_tokenizer(folder)` give a trained model and its real vocabulary, and the same three calls
# (chat template, generate, decode) produce a readable reply.

# %% [markdown]
# **With real weights (optional).** With `USE_REAL_WEIGHTS = True` in the first cell and the 0.3B cached
# on this machine, the same three calls give a readable reply from the trained model.

# %%
if USE_REAL_WEIGHTS:
    real_model, real_tokenizer = notebook.cached_model("baidu/ERNIE-4.5-0.3B-PT")
    if real_model is not None:
        print(ernie_lab.chat(real_model, real_tokenizer, messages, max_new_tokens=48))
        del real_model

# %% [markdown]
# ## Exercises · optional, 32 min
#
# Three more, each a stub followed by a check from `ernie_lab.exercises` that draws fresh inputs every
# time. Until you write something the check says "not attempted yet" and gives a hint; a wrong answer
# stops with a message that says what differs; a right one says "correct". The solutions, explained, are
# in `solutions/01_dense_decoder_from_scratch.py`.

# %% [markdown]
# ### Exercise 1 · The other RoPE layout, in the model (an experiment)
#
# Write Llama's *rotate-half* RoPE: dimension $i$ turns together with dimension $i + d/2$ (ERNIE's
# interleaved layout turns $2i$ with $2i+1$). `x` is `(B, H, T, d)`, `cos` and `sin` are `(B, T, d/2)`
# as `ernie_lab.rope.rope_angles` makes them.

# %%
def rope_rotate_half(x, cos, sin):
    ...   # your code here


exercises.check("01.rope_rotate_half", rope_rotate_half)

# %% [markdown]
# Now put your layout into the model that loaded the checkpoint, and compare its logits with the
# checkpoint's own (interleaved) logits. Both layouts are valid rotary embeddings; the weights were made
# for one of them. The same rotation applied after permuting the head dimensions
# (`[0, 2, 4, ..., 1, 3, 5, ...]`) would give the interleaved result again: the two layouts differ only
# in how the q and k projections order their output rows.

# %%
probe_ids = torch.randint(0, cfg.vocab_size, (1, 16))
if exercises.check("01.rope_rotate_half", rope_rotate_half):
    with notebook.rope_layout(rope_rotate_half):
        swapped = loaded(probe_ids).logits
    own = loaded(probe_ids).logits
    gap = (swapped - own).abs().amax(-1)[0]                                # (16,): per position
    print("largest logit change per position:", [f"{g:.2f}" for g in gap.tolist()])
    print("same next-token choice at", int((swapped.argmax(-1) == own.argmax(-1)).sum()), "of 16 positions")
    assert gap[0] < 1e-6 < gap[1:].min()   # position 0 is not rotated at all (angle 0); every later one is off

# %% [markdown]
# ### Exercise 2 · The top-p nucleus
#
# Section 9 sampled with `top_p`. Write the nucleus yourself: given next-token probabilities `probs (V,)`
# and `p`, return the ids (sorted) of the smallest set of most likely tokens whose probabilities add up
# to at least `p`. The check uses vocabularies of a few and of hundreds of tokens, and values of `p` that
# fall exactly on a sum of the largest probabilities: there the nucleus stops, with nothing added.

# %%
def nucleus(probs, p):
    ...   # your code here


exercises.check("01.nucleus", nucleus)

# %% [markdown]
# ### Exercise 3 · What the causal mask protects
#
# Change one token in the **middle** of a sequence. Which positions' logits may change? Write the
# positions (0-based) whose logits stay exactly as they were, for a 16-token sequence where position 10
# is changed. Then try it on `loaded` yourself.

# %%
unchanged_positions = None   # your answer: a list of positions

exercises.check("01.causal_mask", unchanged_positions)

# %% [markdown]
# ## Key takeaways
#
# * RMSNorm rescales to unit root-mean-square and multiplies by a gain; no mean, no bias; $\varepsilon$ sits
#   inside the square root.
# * RoPE turns each pair of dimensions by an angle proportional to the position, so scores depend only on
#   distances; ERNIE pairs *neighbouring* dimensions, and a model run with the other layout is wrong from
#   position 1 on.
# * GQA lets 16 query heads share 2 key/value heads (head $h$ reads KV head $h // 8$): an 8x smaller KV cache.
# * With a cache the $T$ queries are the **last** $T$ of $S$ positions; a mask aligned to the top-left is the
#   classic bug.
# * A cached decoding step applies the weights to one token, a cost that does not depend on the length,
#   while its attention reads all $t$ cached keys and values, a cost that grows linearly with $t$. The
#   weights dominate at short contexts (for the 0.3B, attention's arithmetic catches up near 3,500
#   tokens); without a cache every step would redo all $t$ tokens. The causal mask is what makes the cache
#   correct: earlier positions never change.
# * Pre-norm: each block reads a normalised copy and adds to a stream that is never normalised.
#
# ## What we built
#
# Six functions of your own, `rms_norm`, `rope_interleaved`, `gqa_attention`, `swiglu`,
# `decoder_layer` and `cache_append`, each checked on fresh inputs against `ernie_lab` and `transformers`,
# and from them a whole ERNIE-4.5-0.3B-shaped decoder (`HandErnie`) whose logits equal `transformers'`
# on the same weights, and a cached decoder layer equal to its uncached self. Then, with the kit's
# copy of the same model: loading a checkpoint, the KV cache over the whole model, greedy decoding
# equal to `transformers.generate`, sampling with temperature and top-p, and the chat template.
#
# **What comes next:** notebook **02** replaces the MLP of most layers with a *mixture of experts* and
# builds the 21B-A3B; notebook **07** (dense track) quantizes this model.
#
# ## Further reading
#
# * Baidu ERNIE Team (2025). *ERNIE 4.5 Technical Report.*
#   [PDF](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf). The family this notebook
#   rebuilds; the 0.3B is its one dense text model, with the shape of section 0.
# * Vaswani, Shazeer, Parmar, Uszkoreit, Jones, Gomez, Kaiser, Polosukhin (2017). *Attention Is All You
#   Need.* [arXiv:1706.03762](https://arxiv.org/abs/1706.03762). Scaled dot-product attention with many
#   heads and residual blocks; its layers normalise *after* each addition (post-norm), ERNIE before (pre-norm).
# * Zhang & Sennrich (2019). *Root Mean Square Layer Normalization.*
#   [arXiv:1910.07467](https://arxiv.org/abs/1910.07467). Drops LayerNorm's mean and bias and keeps only
#   the rescaling; ERNIE uses it with $\varepsilon = 10^{-5}$ and the statistics in float32.
# * Su, Lu, Pan, Murtadha, Wen, Liu (2021). *RoFormer: Enhanced Transformer with Rotary Position
#   Embedding.* [arXiv:2104.09864](https://arxiv.org/abs/2104.09864). Positions as rotations of pairs of
#   dimensions, so scores depend on distances; ERNIE rotates neighbouring pairs with $\theta = 500\,000$.
# * Shazeer (2020). *GLU Variants Improve Transformer.* [arXiv:2002.05202](https://arxiv.org/abs/2002.05202).
#   Gated MLPs, SwiGLU among them; ERNIE's 0.3B uses SwiGLU with width $3h$.
# * Shazeer (2019). *Fast Transformer Decoding: One Write-Head is All You Need.*
#   [arXiv:1911.02150](https://arxiv.org/abs/1911.02150). One key/value head for all query heads
#   (multi-query attention), to shrink the KV cache that decoding reads at every step.
# * Ainslie, Lee-Thorp, de Jong, Zemlyanskiy, Lebrón, Sanghai (2023). *GQA: Training Generalized
#   Multi-Query Transformer Models from Multi-Head Checkpoints.* [arXiv:2305.13245](https://arxiv.org/abs/2305.13245).
#   The middle ground, groups of query heads sharing a KV head; ERNIE's 0.3B has 16 query heads in 2 groups.
# * Touvron et al. (2023). *LLaMA: Open and Efficient Foundation Language Models.*
#   [arXiv:2302.13971](https://arxiv.org/abs/2302.13971). The same recipe (pre-norm RMSNorm, RoPE,
#   SwiGLU); the Llama of `transformers` rotates the two halves of a head (rotate-half: its conversion
#   script permutes Meta's query and key weights for it) where ERNIE's checkpoints rotate neighbours, and
#   LLaMA does not tie the output head to the embedding as the 0.3B does.
# * Holtzman, Buys, Du, Forbes, Choi (2019). *The Curious Case of Neural Text Degeneration.*
#   [arXiv:1904.09751](https://arxiv.org/abs/1904.09751). Nucleus (top-p) sampling, exercise 2; nothing
#   ERNIE-specific: `ernie_lab.generate` applies it to any of the family's models.

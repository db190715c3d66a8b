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
# # 07 · Quantized inference from scratch
#
# **What you will learn:** how a weight becomes a 4-bit code (round-to-nearest with a scale and a zero
# point per group of columns), how two codes share a byte, how a quantized layer multiplies, how GPTQ
# rounds better by letting the next columns absorb each column's error, how an int8 KV cache stores keys
# and values, what each scheme costs in quality on models that learned something, and where a decode token's
# time goes when the weights are not the problem (a static cache and a compiled step).
# **Time:** 147 min (core 99 min). **Memory:** under 2 GB.
#
# A decode step of a 0.3B model reads every weight once to produce one token. On a CPU that is a
# memory-bandwidth problem, not a compute problem: fewer bytes per weight means more tokens per second.
# You write the pieces of an int4 model yourself: the group-wise grid, the packing, the multiply, GPTQ's
# column update and the int8 KV cache. Each piece is checked against `ernie_lab.quant` on fresh random
# inputs (`exercises.use`), and the notebook goes on with **your** piece once it is right (with the kit's
# until you have written it, so "Run All" always works). Then we measure what quantization does to the
# shipped tiny ERNIE models: perplexity, greedy agreement, and the VL model's answers.

# %%
# %matplotlib inline
import importlib.util
import json
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

import ernie_lab
from ernie_lab import architectures, exercises, family, quant, tiny_models
from ernie_lab.model.config import ErnieConfig
from ernie_lab.analysis import decode_cost
from ernie_lab.model.kv_cache import Int8KVCache, StaticKVCache
from ernie_lab.course.notebook import cpu_settings, figure, repo_path, setup
from ernie_lab.quant import formats, gptq

FAST = setup()

# %% [markdown]
# ## 1 · Number formats and their errors · core, 4 min
# A format is a grid of representable values. Symmetric int b: `w ≈ (u - 2^(b-1)) · s` with
# `s = max|w| / (2^(b-1) - 1)`. Rounding to the nearest grid point errs by at most half a step, `s/2`.
# fp8 (e4m3) is a float grid instead: fine steps near 0, coarse ones far from it.

# %%
torch.manual_seed(0)
w = torch.randn(1, 4096) * 0.02
fig, axes = plt.subplots(1, 4, figsize=(14, 2.5), sharey=True)
errors = {}
for ax, bits in zip(axes, (8, 4, 2)):
    q = formats.quantize_weight(w, bits, 4096, symmetric=bits > 2)
    w_hat = formats.dequantize_weight(q, bits)
    errors[f"int{bits}"] = float((w_hat - w).abs().max() / q.scales.max())
    ax.hist(w[0].numpy(), bins=80, alpha=0.5, label="float")
    ax.hist(w_hat[0].numpy(), bins=80, alpha=0.7, label=f"int{bits}")
    ax.set_title(f"int{bits}: {len(w_hat.unique())} values")
values, scale = formats.quantize_fp8(w)
axes[3].hist(w[0].numpy(), bins=80, alpha=0.5)
axes[3].hist(formats.dequantize_fp8(values, scale)[0].numpy(), bins=80, alpha=0.7)
axes[3].set_title("fp8 e4m3: finer near 0")
axes[0].legend()
plt.show()
print("largest error in steps:", errors)

# %%
# check: round-to-nearest never errs by more than half a step
assert all(e <= 0.5 + 1e-5 for e in errors.values()), errors

# %% [markdown]
# ## 2 · Group-wise int4 with zero points · core, 15 min
# One outlier in a row stretches that row's scale, and every other weight of the row lands on a few codes.
# Cutting each row into **groups** of G consecutive columns (G = 128 in practice), each with its own scale,
# confines the damage to one group. A **zero point** shifts the grid so that it spans exactly the group's
# values: with `low = min(min w, 0)` and `high = max(max w, 0)` (the grid always holds 0 exactly),
#
# $$s = \frac{high - low}{2^b - 1}, \qquad z = \mathrm{round}(-low / s), \qquad u = \mathrm{clamp}(\mathrm{round}(w / s) + z,\ 0,\ 2^b - 1), \qquad w \approx (u - z)\, s .$$
#
# A group whose weights are all positive gets `z = 0` and uses all 16 codes for its values, where a
# symmetric grid would waste the 8 negative ones. The picture shows both ideas, and the packing of the
# next section.

# %%
figure("quantization_groups.png")

# %% [markdown]
# **Write it.** `quantize_groups(w, group)` takes an (N, K) float weight and returns the (N, K) uint8 codes,
# the (N, K / group) float scales and the (N, K / group) uint8 zero points. The check draws fresh weights
# (groups of positive weights only, of negative weights only, an outlier) at two group sizes and compares
# with `ernie_lab.quant.formats.quantize_weight(w, 4, group, symmetric=False)`.

# %%
def quantize_groups(w, group):
    """Asymmetric int4 round-to-nearest, one scale and zero point per `group` columns of each row.

    w: (N, K) float, K a multiple of group -> codes (N, K) uint8 in 0..15, scales (N, K // group) float32,
    zeros (N, K // group) uint8, with w ≈ (codes - zero) * scale inside each group.
    """
    ...   # your code here


def kit_quantize_groups(w, group):
    q = formats.quantize_weight(w, 4, group, symmetric=False)
    return q.codes, q.scales, q.zeros


quantize_groups = exercises.use("07.quantize_groups", quantize_groups, kit=kit_quantize_groups)

# %% [markdown]
# Now use it: a weight with one outlier column, quantized per row (one group of 1024), in groups of 128,
# and in groups of 128 without zero points (the kit's symmetric grid).

# %%
W = torch.randn(256, 1024) * 0.02
W[:, 7] *= 30                                           # an outlier column


def rel_error(W_hat):
    return float((W_hat - W).norm() / W.norm())


def weight_from(codes, scales, zeros):                   # w = (u - z) * s, group by group
    return formats.dequantize_weight(formats.Quantized(codes, scales, zeros), 4)


per_row = rel_error(weight_from(*quantize_groups(W, 1024)))
grouped = rel_error(weight_from(*quantize_groups(W, 128)))
symmetric = rel_error(formats.dequantize_weight(formats.quantize_weight(W, 4, 128, symmetric=True), 4))
print(f"int4 relative error: per row {per_row:.3f}, groups of 128 {grouped:.3f}, "
      f"groups of 128 without zero points {symmetric:.3f}")
assert grouped < per_row and grouped < symmetric

# %% [markdown]
# ## 3 · Two codes per byte · core, 12 min
# A 4-bit code is half a byte, so two of them share one: along each row, the first code of a pair goes
# into the high nibble, `byte = u0 << 4 | u1` (the layout of `QuantLinear.qweight`, see
# `ernie_lab/quant/formats.py`). For codes `[3, 12, 15, 0]` that is `0011 1100`, `1111 0000`.
#
# **Write it.** `pack2(codes)`: (N, K) codes 0..15 (floats straight from `round()`, or uint8) -> (N, K/2)
# uint8 bytes. The check compares with `formats.pack(codes, 4)` on fresh codes of two shapes.

# %%
def pack2(codes):
    """Two int4 codes per byte along the columns, the first in the high nibble: (N, K) -> (N, K // 2) uint8."""
    ...   # your code here


pack2 = exercises.use("07.pack2", pack2, kit=lambda codes: formats.pack(codes.to(torch.uint8), 4))

# %% [markdown]
# With your two pieces we can fill a `QuantLinear` by hand: its buffers are exactly the packed codes, the
# scales and the zero points. Its output must equal the one `QuantLinear.from_linear` makes by itself.

# %%
linear = nn.Linear(512, 384, bias=False)
codes, scales, zeros = quantize_groups(linear.weight.detach(), 128)
by_hand = quant.QuantLinear(512, 384, "w4a16", group_size=128, symmetric=False)
by_hand.qweight, by_hand.scales, by_hand.zeros = pack2(codes), scales, zeros
kit_layer = quant.QuantLinear.from_linear(linear, "w4a16", group_size=128, symmetric=False)
x = torch.randn(3, 512)
print("bytes:", by_hand.qweight.numel(), "for", linear.weight.numel(), "weights;",
      "first bytes", [f"{b:08b}" for b in by_hand.qweight[0, :2].tolist()], "from codes", codes[0, :4].tolist())
assert torch.equal(by_hand.qweight, kit_layer.qweight)
assert torch.allclose(by_hand(x), kit_layer(x), atol=1e-5)

# %% [markdown]
# ## 4 · The dequantize-matmul reference · core, 13 min
# The plainest correct way to multiply by a quantized weight: unpack the codes, turn them back into floats,
# then an ordinary matmul,
#
# $$y = x\, \hat W^{\top}, \qquad \hat W_{nk} = (u_{nk} - z_{n,g(k)})\, s_{n,g(k)}, \qquad g(k) = \lfloor k / G \rfloor .$$
#
# Every fast kernel of `ernie_lab.quant` (the kit's C kernels, PyTorch's packed int4 kernel, CUDA's) is
# checked against this reference (`QuantLinear.reference`).
#
# **Write it.** `dequant_matmul(x, packed, scales, zeros, group)`: x (M, K), packed (N, K/2) uint8, scales
# and zeros (N, K/G) -> y (M, N). Unpack by hand (`>> 4` and `& 15`). The check compares with
# `QuantLinear.reference` for a decode token (M = 1) and a short prefill, on fresh layers.

# %%
def dequant_matmul(x, packed, scales, zeros, group):
    """y = x @ W^T with W = (u - z) * s read from packed int4 codes: x (M, K) -> y (M, N)."""
    ...   # your code here


def kit_dequant_matmul(x, packed, scales, zeros, group):
    W_hat = formats.dequantize_weight(formats.Quantized(formats.unpack(packed, 4), scales, zeros), 4)
    return x @ W_hat.t()


dequant_matmul = exercises.use("07.dequant_matmul", dequant_matmul, kit=kit_dequant_matmul)

# %% [markdown]
# Your reference against every kernel the kit has for this machine, for each scheme: the kernels read the
# packed codes directly. (For w8a16, w2a16 and w8a8 we use `QuantLinear.reference`, the same idea with 8-bit
# codes, four 2-bit codes per byte, or int8 activations.)

# %%
linear = nn.Linear(512, 384)
x = torch.randn(3, 512)
for scheme, symmetric in (("w4a16", False), ("w4a16", True), ("w8a16", True), ("w2a16", False), ("w8a8", True)):
    layer = quant.QuantLinear.from_linear(linear, scheme, group_size=128, symmetric=symmetric)
    if scheme == "w4a16":
        zeros = layer.zeros if not symmetric else torch.full_like(layer.scales, 8, dtype=torch.uint8)
        reference = dequant_matmul(x, layer.qweight, layer.scales, zeros, 128) + linear.bias.detach()   # yours
    else:
        reference = layer.reference(x)
    gap = float((layer(x) - reference).abs().max() / reference.abs().max())
    name = f"{scheme}{'' if symmetric else ' + zero points'}"
    print(f"{name:20s} kernel vs reference {gap:.1e} (relative), weight error "
          f"{float((layer.dequantize() - linear.weight).norm() / linear.weight.norm()):.3f}")
    assert gap < (0.05 if scheme == "w8a8" else 0.02)

# %% [markdown]
# ## 5 · Why weight-only helps batch-1 decode · optional, 8 min
# A decode step reads all weights once, so tokens/s ≤ bandwidth / bytes per token. First we measure
# this machine's read bandwidth: `decode_cost.read_bandwidth` sums an fp32 tensor far larger than the
# caches (64 or 256 MiB) a few times and keeps the best time. Then the bound follows for each precision.

# %%
bandwidth = decode_cost.read_bandwidth(mib=64 if FAST else 256)    # bytes per second
print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
assert 1e9 < bandwidth < 2e12
config = ErnieConfig()                                   # the 0.3B shape
for precision in ("bf16", "int8", "int4", "2bit"):
    print(f"{precision:5s} {family.weight_bytes(config, precision) / 1e9:.2f} GB -> at most "
          f"{bandwidth / family.weight_bytes(config, precision):.0f} tok/s")
assert family.weight_bytes(config, "int4") < family.weight_bytes(config, "bf16") / 3

# %% [markdown]
# ### Reading the codes once: the kit's decode kernel
# To reach that bound a kernel must touch each packed byte once and do little work per weight. The kit's
# decode kernel (`ernie_lab/quant/gemv.c`, about 1,000 lines of C that the kit compiles on first use) does
# two things to keep the work small. First, it pulls the zero point out of the inner loop:
#
# $$y_n = \sum_g s_{ng} \sum_{k \in g} (u_k - z_{ng})\, x_k = \sum_g s_{ng} \Big(\sum_{k \in g} u_k x_k - z_{ng} \sum_{k \in g} x_k\Big)$$
#
# The group sums of $x$ are computed once per token, not once per row. Second, it rounds $x$ once per
# token to int16, with one scale per group. The inner loop then multiplies small integers by small
# integers, 16 at a time, with one AVX2 instruction (`vpmaddwd`). The rounding error is at most
# $2^{-16}$ of the group's largest $|x|$. PyTorch's weight-only kernels round $x$ to bf16, which costs
# $2^{-9}$. (For int4 and int8 codes the C goes one step further: it takes four rows at a time, so that
# each load of $x$ serves four rows. The four must lie far apart in memory, each read as its own sequential
# stream: four neighbouring rows read side by side lose the CPU's prefetchers and run slower than one.)
# Here is the same arithmetic by hand for one int4 layer:

# %%
layer = quant.QuantLinear.from_linear(nn.Linear(512, 64, bias=False), "w4a16", group_size=128, symmetric=False)
x = torch.randn(1, 512)
u = formats.unpack(layer.qweight, 4).float().view(64, 4, 128)          # (N, groups, G) codes
xg = x.view(4, 128)                                                      # (groups, G)
t = xg.abs().amax(-1, keepdim=True) / 32767                              # one int16 scale per group
xq = (xg / t).round()                                                    # x in int16 steps
folded = (layer.scales * t.T * ((u * xq).sum(-1) - layer.zeros.float() * xq.sum(-1))).sum(-1)
reference = (x @ layer.dequantize().t())[0]
gap = float((folded - reference).abs().max() / reference.abs().max())
bf16_gap = float(((x.bfloat16().float() @ layer.dequantize().t())[0] - reference).abs().max() / reference.abs().max())
print(f"folded zero points + int16 activations vs the reference: {gap:.1e}; bf16 activations: {bf16_gap:.1e}")
assert gap < 1e-4 and gap < bf16_gap
if quant.native.available():
    native_y = quant.native.gemv(x, layer.qweight, layer.scales, layer.zeros, 4, 128)[0]
    print("ernie_lab.quant.native.gemv vs the hand-made sum:", float((native_y - folded).abs().max()))
    assert torch.allclose(native_y, folded, atol=1e-5 * float(folded.abs().max()))
    print(quant.native.info())
else:
    print("the C kernels are not built here:", quant.native.why_unavailable(), "(PyTorch's kernels serve instead)")

# %% [markdown]
# The same layer shape of the 0.3B (3072 x 1024), timed both ways. The C kernel reads 1.5 MiB of int4
# codes; PyTorch's int4 CPU kernel (`_weight_int4pack_mm_for_cpu`) reads the same bytes but does more
# work per weight, and without AVX-512 that work, not memory, sets its speed.

# %%
def best_time(fn, repeats=30):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


big = quant.QuantLinear.from_linear(nn.Linear(1024, 3072, bias=False), "w4a16")
xb = torch.randn(1, 1024)
times = {}
with quant.native.off():
    times["PyTorch int4 kernel"] = best_time(lambda: big(xb))
if quant.native.available():
    times["the kit's C kernel"] = best_time(lambda: big(xb))
for name, seconds in times.items():
    print(f"{name:20s} {seconds * 1e6:7.1f} us   {big.qweight.numel() / seconds / 1e9:5.1f} GB/s of codes")

# %% [markdown]
# ## 6 · Activations and outliers (W8A8) · optional, 3 min
# W8A8 also rounds each token's activations to int8 (one scale per token). A single huge activation
# channel — common in LLMs — inflates that token's scale and crushes every other channel.

# %%
acts = torch.randn(4, 1024)
spiky = acts.clone()
spiky[:, 3] = 200.0
def act_error(a):
    q, s = formats.quantize_activations_int8(a)
    keep = torch.arange(a.shape[1]) != 3
    return float(((q.float() * s - a)[:, keep]).norm() / a[:, keep].norm())
print(f"int8 activation error without outlier {act_error(acts):.4f}, with one outlier channel {act_error(spiky):.4f}")
assert act_error(spiky) > 5 * act_error(acts)

# %% [markdown]
# ## 7 · GPTQ: the column update · core, 18 min
# Round-to-nearest treats every weight alone. But what matters is the layer's **output** on real inputs X:
# rounding W to Q costs $\lVert X W^\top - X Q^\top \rVert^2 = \mathrm{tr}(E H E^\top)$ with $E = W - Q$ and
# $H = X^\top X$. GPTQ quantizes one input column at a time, left to right, and after each column lets the
# columns not yet quantized absorb its error, the way the inputs' correlations say is best. With $U$ the
# upper Cholesky factor of $H^{-1}$ ($H^{-1} = U^\top U$), quantizing column $j$ to $q$ does
#
# $$e = \frac{W_{:,j} - q}{U_{jj}}, \qquad W_{:,j:} \leftarrow W_{:,j:} - e\, U_{j,j:} .$$
#
# Column $j$ becomes exactly $q$; the earlier columns, already quantized, are untouched ($U$ is upper
# triangular). The kit's `gptq_quantize` does the same update (`gptq.spread_error_`), in blocks of 128
# columns for speed ("lazy batch" updates).
#
# **Write it.** `gptq_update(W, U, j, q)` returns the updated (N, K) weight (leave the input unchanged).
# The check compares with `gptq.spread_error_` on fresh weights, Hessians and columns.

# %%
def gptq_update(W, U, j, q):
    """Quantize column j of W (N, K) to q (N,) and spread its error over the later columns through row j of U (K, K)."""
    ...   # your code here


def kit_gptq_update(W, U, j, q):
    W = W.clone()
    gptq.spread_error_(W, U, j, q)
    return W


gptq_update = exercises.use("07.gptq_update", gptq_update, kit=kit_gptq_update)

# %% [markdown]
# With your update, your grid and a loop over the columns we have GPTQ. Each group's scale and zero point
# are chosen when its first column is reached, from the weights as the earlier columns' errors left them.
# Inputs whose features are correlated (as activations are) give GPTQ room to help.

# %%
def my_gptq(W, H, group):
    U, _ = gptq.inverse_hessian_factor(H)
    W = W.clone()
    codes = torch.zeros(W.shape, dtype=torch.uint8)
    scales, zeros = [], []
    for j in range(W.shape[1]):
        if j % group == 0:                                   # a new group: its grid from the current weights
            _, s, z = quantize_groups(W[:, j:j + group], group)
            scales.append(s)
            zeros.append(z)
        s, z = scales[-1][:, 0], zeros[-1][:, 0].float()
        codes[:, j] = ((W[:, j] / s).round() + z).clamp(0, 15).to(torch.uint8)
        W = gptq_update(W, U, j, (codes[:, j].float() - z) * s)
    return codes, torch.cat(scales, 1), torch.cat(zeros, 1)


torch.manual_seed(0)
X = torch.randn(2048, 256) @ (torch.randn(256, 256) * torch.logspace(0, -2, 256))     # correlated inputs
Wl = torch.randn(128, 256) * 0.05
H = X.t() @ X / len(X)


def out_error(W_hat):
    return float((X @ (Wl - W_hat).t()).norm() / (X @ Wl.t()).norm())


mine = my_gptq(Wl, H, 64)
kit = gptq.gptq_quantize(Wl, H, 4, 64, symmetric=False)
rtn = formats.quantize_weight(Wl, 4, 64, symmetric=False)
same_codes = float((mine[0] == kit.codes).float().mean())
print(f"int4 output error: round-to-nearest {out_error(weight_from(*rtn)):.4f}, your GPTQ "
      f"{out_error(weight_from(*mine)):.4f}, the kit's GPTQ {out_error(formats.dequantize_weight(kit, 4)):.4f}; "
      f"codes equal to the kit's: {same_codes:.2%}")
assert same_codes > 0.99 and out_error(weight_from(*mine)) < out_error(weight_from(*rtn))
for bits in (4, 2):
    rtn, kit = formats.quantize_weight(Wl, bits, 64, False), gptq.gptq_quantize(Wl, H, bits, 64, False)
    rtn_error, gptq_error = (out_error(formats.dequantize_weight(q, bits)) for q in (rtn, kit))
    print(f"int{bits}: output error RTN {rtn_error:.3f}, GPTQ {gptq_error:.3f}")
    assert gptq_error < rtn_error

# %% [markdown]
# ## 8 · The int8 KV cache · core, 14 min
# Each generated token keeps, per layer, a key and a value vector for every KV head. At 128K tokens that
# rivals the weights. Stored as int8, with one scale per (token, head) row, it takes a quarter of fp32's
# bytes (half of bf16's):
#
# $$s_{b,h,t} = \max_d |k_{b,h,t,d}| / 127, \qquad c_{b,h,t,d} = \mathrm{round}(k_{b,h,t,d} / s_{b,h,t}) \in [-127, 127] .$$
#
# One scale per row, not per tensor or per channel: the cache grows one token at a time, and storing a new
# token must never change the codes of the tokens already there. Attention reads back $c \cdot s$.

# %%
for name in ("ERNIE-4.5-0.3B", "ERNIE-4.5-21B-A3B"):
    cfg = ernie_lab.checkpoints.checkpoint(name).config
    bf16_kv = family.kv_cache_bytes(cfg, 131072, bytes_per_value=2)
    print(f"{name}: KV cache at 128K, bf16 {bf16_kv / 2**30:.1f} GiB, "
          f"int8 {family.kv_cache_bytes(cfg, 131072, bytes_per_value=1) / 2**30:.1f} GiB")

# %% [markdown]
# **Write it.** `quantize_kv(rows)`: keys or values (B, H, T, D) -> int8 codes (B, H, T, D) and float
# scales (B, H, T, 1). The check compares with the kit's `Int8KVCache` on fresh rows of two shapes,
# including an all-zero row (a padded token).

# %%
def quantize_kv(rows):
    """int8 codes and one scale per (batch, head, token) row: (B, H, T, D) -> (B, H, T, D) int8, (B, H, T, 1)."""
    ...   # your code here


quantize_kv = exercises.use("07.quantize_kv", quantize_kv, kit=formats.quantize_activations_int8)

# %% [markdown]
# Attention over your int8 cache, by hand, against the same attention in float32 and against what the
# kit's `Int8KVCache` hands attention:

# %%
torch.manual_seed(0)
B, H_kv, T, D = 1, 2, 64, 32
q, k, v = (torch.randn(B, H_kv, T, D) for _ in range(3))


def attend(q, k, v):                                      # (B, H, T, D) -> (B, H, T, D), causal
    scores = q @ k.transpose(-1, -2) / D ** 0.5          # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1) @ v


k8, v8 = (codes.float() * scale for codes, scale in (quantize_kv(k), quantize_kv(v)))
kit_k, kit_v = Int8KVCache(1, B, H_kv, D, T).update(0, k, v)
gap = float((attend(q, k8, v8) - attend(q, k, v)).abs().max())
print(f"attention over int8 K/V vs float: largest difference {gap:.1e}")
assert torch.allclose(k8, kit_k, atol=1e-6) and torch.allclose(v8, kit_v, atol=1e-6) and gap < 0.05

# %% [markdown]
# And in a whole model: greedy decoding with the kit's int8 cache (`kv_cache_dtype="int8"`) against the
# float cache, on a small random model.

# %%
tiny = architectures.build(ErnieConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, vocab_size=512,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32)).eval()
prompt = torch.randint(3, 512, (1, 8))
same = (ernie_lab.generate(tiny, prompt, 8, eos_token_id=[])
        == ernie_lab.generate(tiny, prompt, 8, eos_token_id=[], kv_cache_dtype="int8"))
print("int8 KV cache: greedy tokens agree on", float(same.float().mean()))
assert float(same.float().mean()) >= 0.75

# %% [markdown]
# ## 9 · 2-bit, and ERNIE's convolutional code quantization · optional, 3 min
# Four levels per group are too few for round-to-nearest (section 1; the table below shows the damage).
# ERNIE 4.5 ships 2-bit weights (FastDeploy's WINT2, four weights per byte) made with **convolutional code
# quantization (CCQ)**. The ERNIE 4.5 technical report describes CCQ as a *scalar* quantization method
# built on convolutional codes: every weight still gets its own low-bit code, as in this notebook, but the
# codes are chosen with the structure of a convolutional code rather than by rounding each weight alone.
# It is not vector quantization (no codebook indexed by whole groups of weights). Reported for 300B-A47B:
# MMLU 86.5 in bf16, 86.2 at about 4.3 bits, 82.6 at about 2.5 bits; FastDeploy's WINT4 -> WINT2 figures
# are IFEval 88.2 -> 86.0 and BBH 94.4 -> 90.1. The kit implements only plain scalar 2-bit with zero
# points (round-to-nearest or GPTQ), which is why its 2-bit quality below is far from Baidu's WINT2.

# %% [markdown]
# ## 10 · Quality on trained weights: the tiny ERNIE models · core, 6 min
# Random weights say how fast a format is, not how much it hurts: a model that learned nothing has nothing
# to lose. The kit ships two small trained models, `data/tiny-ernie-text` and `data/tiny-ernie-vl`.
# `benchmarks/quant_tiny.py` quantizes each with every scheme, round-to-nearest and GPTQ (calibrated on
# training data), and measures held-out perplexity, greedy agreement with the float model (8 prompts x 24
# tokens) and, for the VL model, the share of questions about held-out scenes answered right. Here we run a
# subset live with the benchmark's own functions (fast mode: fewer windows and schemes), then show the
# committed full table.

# %%
spec = importlib.util.spec_from_file_location("quant_tiny", repo_path("benchmarks", "quant_tiny.py"))
quant_tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quant_tiny)                        # the benchmark's functions: quantized(), greedy()

text_model = ernie_lab.load_model(quant_tiny.TEXT).eval()
text_tokenizer = ernie_lab.load_tokenizer(quant_tiny.TEXT)
calibration = [tiny_models.text_batches(text_tokenizer, 1, 128)(step)["input_ids"] for step in range(2 if FAST else 8)]
prompts = tiny_models.eval_windows(text_tokenizer, 128)[:2 if FAST else 8, :16]
float_tokens = quant_tiny.greedy(text_model, prompts, 8 if FAST else 24)
live = {}
for row in (("fp32", "w2a16 RTN", "w2a16 GPTQ") if FAST else tuple(quant_tiny.SCHEMES)):
    scheme, uses_gptq = quant_tiny.SCHEMES[row]
    model = quant_tiny.quantized(text_model, scheme, calibration if uses_gptq else None, 128)
    perplexity = tiny_models.evaluate_text(model, text_tokenizer, max_windows=4 if FAST else None)["val_perplexity"]
    agree = float((quant_tiny.greedy(model, prompts, float_tokens.shape[1]) == float_tokens).float().mean())
    live[row] = (perplexity, agree, quant.weight_bytes(model))
    print(f"{row:11s} perplexity {perplexity:7.3f}  greedy agreement {agree:.2f}  {live[row][2] / 2**20:5.2f} MiB")
assert live["w2a16 RTN"][0] > live["fp32"][0] and live["w2a16 GPTQ"][0] < live["w2a16 RTN"][0]

# %% [markdown]
# The committed full run (`python benchmarks/quant_tiny.py`, 2 CPU threads): every held-out text window, and
# the VL model on 60 held-out scenes with every linear quantized (attention, experts, ViT, adapter).

# %%
tiny_table = json.loads(repo_path("benchmarks", "results", "quant_tiny.json").read_text())
print(f"{'scheme':11s} {'text ppl':>9s} {'vs fp32':>8s} {'greedy':>7s} {'text MiB':>8s} {'VL acc':>7s} {'VL loss':>8s}")
for row, text in tiny_table["text"].items():
    vl = tiny_table["vl"][row]
    print(f"{row:11s} {text['val_perplexity']:9.3f} {tiny_table['text_perplexity_increase'][row]:+8.2%} "
          f"{text['greedy_agreement']:7.2f} {text['weight_bytes'] / 2**20:8.2f} "
          f"{tiny_table['vl_mean_accuracy'][row]:7.1%} {vl['val_loss']:8.4f}")
print("share of RTN's text perplexity increase that GPTQ removes:", {
    k: None if v is None else f"{v:.0%}" for k, v in tiny_table["gptq_gap_closed_text_perplexity"].items()})
assert tiny_table["vl_mean_accuracy"]["w2a16 GPTQ"] > tiny_table["vl_mean_accuracy"]["w2a16 RTN"]

# %% [markdown]
# Read it: 8 and 4 bits cost these models almost nothing (int4 RTN's perplexity is within noise of
# fp32, though one greedy token in sixteen already changes); 2-bit round-to-nearest costs 10% perplexity
# and 7 points of VL accuracy, and GPTQ recovers about half of the text gap and almost all of the VL one.
# The tiny models' weights are small and their embeddings and head (kept in float) a large share of the
# bytes, so the MiB column shrinks less than the bits do.

# %% [markdown]
# ## 11 · Speed on the 0.3B shape · optional, 5 min
# From `benchmarks/results/quant.json`: the 0.3B shape with random weights, CPU, 2 threads, batch-1
# decode. Every row is measured once per round, rounds interleaved. llama.cpp runs on GGUF files
# converted from the same checkpoint. Each kit row also shows its bandwidth bound (measured read
# bandwidth / weight bytes per token).
#
# The recorded run is on a 2-core AMD EPYC VM (its CPU has AVX-512; the kit's kernels use AVX2 and, where
# there, VNNI's byte dot products and AVX512-BF16's pair products). In an earlier run (kept in the file
# under `earlier_run`) the kit's C kernels beat PyTorch's kernels on the same models: 1.2-1.7x, W8A8 4x,
# 2-bit 15x. Even so, the quantized rows land far below their bandwidth bounds when run eagerly. Take w4a8: reading its 347 MB at the
# measured bandwidth would take about 11 ms a token, and a token costs 18-25 ms. The same model with tiny
# widths, where there is almost nothing to read, still costs 8 ms a token: that is eager PyTorch around the
# matmuls, about a thousand small ops and 127 kernel calls per token. llama.cpp runs its whole step as one
# C++ graph, so its rows scale with the bytes. Compiling the step (section 12) cuts that floor to 1.1-1.4 ms
# and gains 1.2-1.6x on every row. Against llama.cpp in the same run (three runs of one night, compiled): fp32
# 1.00-1.09x of F32, bf16 0.99-1.14x of BF16, w8a16 with an int8 head 0.96-1.02x of Q8_0, w4a8 with an int4
# head 1.00-1.13x of Q4_0. Three later runs, with the C reading four rows at a time (section 4): w4a16 with an
# int8 head 0.96, 0.97 and 1.18x of Q4_0, w4a8 with an int8 head 0.95, 1.01 and 1.16x, w4a8 with an int4 head
# 1.04-1.30x, w8a16 with an int8 head 1.21-1.28x of Q8_0 (0.79, 0.88, 1.12 and 0.96x in the night's last run;
# llama.cpp's Q4_0 was noisy in the third). The 4-bit rows that keep the bf16 head stay behind (0.76-1.05x of
# Q4_0), and that is bytes: the
# kit keeps the LM head in bf16 (212 MB of the 347), llama.cpp stores it in 6 bits. w4a16's kernel also splits
# each int16 activation into two bytes, twice the byte products of w4a8's int8 ones. The
# VM's speed moves between runs (bf16 compiled: 42-58 tok/s in three runs of one night), so compare ratios
# measured in one run. A prompt is another matter: its matmuls are compute-bound GEMMs, which PyTorch does
# well, and a quantized model's prompt runs at nearly its bf16 speed (the 512-token prefill: 1.1-1.2x
# llama.cpp in fp32, 1.25-1.9x at the other precisions).
#
# Machines differ: on an Intel Xeon VM with AMX (`intel_xeon_run`; llama.cpp without its AMX kernels, which
# crashed there) both engines decode far below the bound, compute decides, and the compiled kit was
# 1.05-2.2x llama.cpp, its prefill 1.45-5.9x.

# %%
results_file = repo_path("benchmarks/results/quant.json")
if results_file.exists():
    bench = json.loads(results_file.read_text())
    print(f"{'model':52s} {'MiB':>8s} {'logit err':>9s} {'greedy':>6s} {'tok/s':>6s}")
    for name, row in bench["rows"].items():
        if "error" in row:
            print(f"{name:52s} skipped: {row['error'][:60]}")
            continue
        if "file_bytes" in row:  # llama.cpp: its GGUF file's size, same prompt and tokens, no logits compared
            print(f"{name:52s} {row['file_bytes'] / 2**20:8.1f} {'-':>9s} {'-':>6s} {row['decode_tok_s']:6.1f}")
            continue
        print(f"{name:52s} {row['weight_bytes'] / 2**20:8.1f} {row['rel_logit_error']:9.4f} "
              f"{row['greedy_agreement']:6.2f} {row['decode_tok_s']:6.1f}")
    for key, value in bench["ratios"].items():
        print(f"  {key:45s} {'n/a' if value is None else f'{value:.2f}'}")
    print("llama.cpp:", bench["llama_cpp"])
else:
    print("run `python benchmarks/quant.py` to make the table")

# %% [markdown]
# ## 12 · Making it fast: a static cache and a compiled step · optional, 28 min
# Section 11 ended on a puzzle: a model with almost nothing to read still costs milliseconds a token. So
# where does a decode token's time go? We profile a few eager decode steps of the trained tiny text model
# with `torch.profiler` and sort every top-level op into four parts (`ernie_lab/analysis/decode_cost.py`):
# the linear layers, which read the weights; attention over the cached keys and values; the small ops
# (RMSNorm, RoPE, SwiGLU's product, residual adds, cache writes); and what is left of the wall time, which
# is Python and PyTorch's dispatch between the ops. The profile runs on one thread, so that two threads
# waiting on each other do not blur it. The dashed line is the bandwidth bound: this model's weight bytes
# (`decode_cost.step_bytes`) over the bandwidth measured in section 5.

# %%
text_ids = torch.tensor([text_tokenizer.encode("The for statement is used to")])   # (1, T)
with cpu_settings(threads=1):
    cost = decode_cost.profile_decode(text_model, text_ids, steps=8 if FAST else 32)
text_bound = decode_cost.bound_ms(text_model, bandwidth)
parts = decode_cost.PARTS
fig, ax = plt.subplots(figsize=(9, 2.4))
ax.barh(parts[::-1], [cost[p] for p in parts[::-1]], color=["tab:gray", "tab:green", "tab:orange", "tab:blue"])
ax.axvline(text_bound, color="black", ls="--", label=f"bandwidth bound {text_bound:.2f} ms")
ax.set_xlabel("ms per token (eager, one thread, under the profiler)")
ax.set_title(f"tiny-ernie-text: one decode token, {cost['ops per token']:.0f} ops")
ax.legend()
plt.show()
for part in parts:
    print(f"{part:30s} {cost[part]:6.2f} ms  {cost[part] / cost['wall']:5.1%}")
print(f"{'a whole token':30s} {cost['wall']:6.2f} ms; reading {decode_cost.step_bytes(text_model) / 2**20:.1f} MiB "
      f"of weights at {bandwidth / 1e9:.1f} GB/s would take {text_bound:.2f} ms")
assert abs(cost["wall"] - sum(cost[p] for p in parts)) < 1e-6
assert cost["ops per token"] > 20 * text_model.config.num_hidden_layers and cost["wall"] > text_bound

# %% [markdown]
# Some 300 ops for a 4-layer model, about 75 per layer. Each op costs a few microseconds to dispatch,
# however small its tensors, and Python runs between them. The dashed line is what reading the 11 MiB of
# weights from memory costs at the measured bandwidth (a model this small may partly sit in the CPU's cache,
# so its matmuls can even beat the line). The small ops and the dispatch overhead come on top of the
# matmuls, a cost per op that does not shrink with the widths. Those two parts are what compiling removes.
#
# ### Why a graph needs fixed shapes
# `torch.compile` traces the decode step once into a graph, fuses the small ops into a few generated C++
# kernels, and then replays that graph with no Python in between. A graph can be replayed only while
# everything it saw stays the same. The plain `KVCache` does not: its length is a Python int, it writes and
# reads by slicing with it (`keys[:, :, :length]`, a new shape every token), and the attention mask grows
# with it. A graph traced at length 7 would be recompiled at length 8. The `StaticKVCache`
# (`ernie_lab/model/kv_cache.py`) keeps everything fixed:
#
# * its buffers have a fixed number of slots S_max, allocated once (a multiple of 64, so prompts of
#   similar length share one graph);
# * the next free slot is a **tensor**, `cursor`, and a step writes its rows there with
#   `index_copy_(2, slots, k)`, so the graph sees the same code and shapes every time;
# * attention always reads all S_max slots, through **one (B, 1, T, S_max) mask**: query i may see slot j
#   when j is at or before its own slot and holds a real token.
#
# **Write it.** `write_rows(rows, buffer, slots)`, the static cache's write: the rows (B, H, T, D) of T new
# tokens go into the (B, H, S_max, D) buffer at the T slots held in the (T,) tensor `slots`, along the token
# axis; return the buffer. The earlier tokens' rows stay. The check compares with `StaticKVCache.update` on
# fresh buffers, for one decode token and for a chunk of a prompt, with the cursor away from slot 0.

# %%
def write_rows(rows, buffer, slots):
    """Write rows (B, H, T, D) into buffer (B, H, S_max, D) at the slots (T,), a tensor; return the buffer."""
    ...   # your code here


def kit_write_rows(rows, buffer, slots):
    cache = StaticKVCache(1, buffer.shape[0], buffer.shape[1], buffer.shape[3], buffer.shape[2])
    cache.keys[0], cache.cursor = buffer, slots[:1].clone()
    return cache.update(0, rows, rows)[0]


write_rows = exercises.use("07.write_rows", write_rows, kit=kit_write_rows)

# %% [markdown]
# Three prompt tokens, then one decode token, in a cache of 6 slots, and your write beside the cache's:

# %%
demo = StaticKVCache(num_layers=1, batch=1, kv_heads=1, head_dim=4, max_len=6)
prompt_rows, new_row = torch.randn(1, 1, 3, 4), torch.randn(1, 1, 1, 4)          # (B, Hkv, T, D)
demo.mask(3)                                              # the prompt goes to slots 0, 1, 2
demo.update(0, prompt_rows, prompt_rows)
demo.advance(3)
after_prompt = demo.keys[0].clone()                       # (B, Hkv, S_max, D)
mask = demo.mask(1)                                       # (B, 1, T=1, S_max=6) for the next token, at slot 3
keys, _ = demo.update(0, new_row, new_row)                # (B, Hkv, S_max, D): always the whole buffer
yours = write_rows(new_row, after_prompt, demo.slots(1))  # the same write, by your function
print("cursor", demo.cursor.tolist(), "| keys", tuple(keys.shape), "| the new token sees slots",
      mask[0, 0, 0].int().tolist())
assert keys.shape == (1, 1, 6, 4) and torch.equal(keys[0, 0, 3], new_row[0, 0, 0]) and torch.equal(yours, keys)
assert mask[0, 0, 0].tolist() == [True] * 4 + [False] * 2

# %% [markdown]
# The step itself is `decode_step` in `ernie_lab/model/fast_decode.py`: embed the token, run
# `model.run_layers` (the very code the eager forward runs), norm, head. It holds no checks. A line such
# as `if (ids >= vocab).any(): raise ...` reads a tensor's value in Python, and a traced graph cannot contain
# that. So `generate` validates every input once, before the loop. The step is compiled with
# `torch.compile(decode_step, fullgraph=True)`: any graph break is an error, where it would otherwise be a
# silent fallback to Python in the middle of the step. `generate(..., compile=True)` compiles it on the
# first call, once per model, and prints how long that took; inductor's on-disk cache makes later runs
# start warm. The prefill stays eager.
#
# ### The overhead floor, eager and compiled
# To see the overhead alone, keep the depth and make the widths tiny: 18 layers like the 0.3B, hidden size
# 32, vocabulary 64 (`DEEP_MICRO` of `benchmarks/fast_decode.py`). Its weights are a few hundred KiB,
# read in microseconds, so whatever its token costs is overhead. We time it with the benchmark's own
# `measure`, on one thread: eager, the static cache alone (eager), and compiled, interleaved, ms per token
# as (t(1 + N tokens) − t(1 token)) / N, so the prefill cancels out. The first compiled call compiles, which
# takes a minute or so on two cores the first time and seconds once inductor's cache is warm. This is the
# slow cell of the notebook. In full mode the tiny text model is compiled and timed too.

# %%
spec = importlib.util.spec_from_file_location("fast_decode", repo_path("benchmarks", "fast_decode.py"))
fast_decode = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fast_decode)                       # the benchmark's model shape and measure()

floor_model = ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(fast_decode.DEEP_MICRO)).init_weights(seed=0).eval()
new_tokens, rounds = (16, 3) if FAST else (64, 5)
with cpu_settings(threads=1):
    speed = {"micro-18-layers": fast_decode.measure(floor_model, [[5, 9, 11, 30, 2, 7]], new_tokens, rounds)}
    if not FAST:
        speed["tiny-ernie-text"] = fast_decode.measure(text_model, text_ids.tolist(), new_tokens, rounds)
recorded = json.loads(repo_path("benchmarks", "results", "fast_decode.json").read_text())
bounds = {"micro-18-layers": decode_cost.bound_ms(floor_model, bandwidth), "tiny-ernie-text": text_bound}
print(f"{'model':18s} {'eager':>7s} {'static':>7s} {'compiled':>8s} {'speed-up':>8s} {'bound':>7s}  ms per token "
      f"(live: 1 thread; recorded: {recorded['threads']} threads)")
for name in ("micro-18-layers", "tiny-ernie-text"):
    row = speed.get(name, recorded[name])
    where = f"live, first compiled call {row['first_compiled_call_s']:.0f} s" if name in speed else "recorded"
    print(f"{name:18s} {row['eager_ms_per_token']:7.2f} {row['static_ms_per_token']:7.2f} "
          f"{row['compiled_ms_per_token']:8.2f} {row['eager_ms_per_token'] / row['compiled_ms_per_token']:7.1f}x "
          f"{bounds[name]:7.3f}  {where}; greedy tokens identical: {row['greedy_identical']}")
floor = speed["micro-18-layers"]
assert all(all(row["greedy_identical"].values()) for row in speed.values())
assert floor["compiled_ms_per_token"] < floor["eager_ms_per_token"]

# %% [markdown]
# Greedy tokens are the same: the compiled step runs the same arithmetic, in another order inside the fused
# kernels, and these models' top tokens are far enough apart for that rounding not to change them. Here is
# the trained model's text both ways (in fast mode, eager against the static cache alone, uncompiled). A
# static cache has room for the prompt and the new tokens rounded up to 64 slots, and a compiled graph is
# made for one buffer size and one thread count: asking for as many tokens as `measure` did, on one thread,
# reuses the graph it compiled.

# %%
fast_switch = {"static_cache": True} if FAST else {"compile": True}
length = new_tokens + 1                                    # as in measure(): the same cache size, the same graph
with cpu_settings(threads=1):                              # and the same threads (a graph is made for a thread count)
    eager_ids = ernie_lab.generate(text_model, text_ids, length, eos_token_id=[])
    fast_ids = ernie_lab.generate(text_model, text_ids, length, eos_token_id=[], **fast_switch)
print("eager:              ", text_tokenizer.decode(eager_ids[0].tolist()))
print(f"{next(iter(fast_switch))}=True: ", text_tokenizer.decode(fast_ids[0].tolist()))
assert torch.equal(eager_ids, fast_ids)

# %% [markdown]
# Read the table. On the 18-layer floor the compiled step removes most of the per-token cost, because
# almost all of that cost was dispatch and small ops. What remains is the graph's own call and `generate`'s
# Python loop around it, still far above the bound of reading a few hundred KiB. On the tiny text model the
# gain is smaller: its matmuls, which compiling does not make faster, are a larger share of its token. The
# static cache alone gains little or nothing in eager mode (the mask over the whole buffer costs a little);
# it is what makes the graph possible. On the 0.3B shape the same floor in bf16 (section 11) costs 8 ms a
# token eager and about 2 ms compiled: more than the 1.2 ms here, because there every linear calls one of
# the kit's C kernels through an operator, 127 times a token. Defined in Python, such an operator cost about
# 21 us a call and the floor was 3.9 ms; registered from C++ (`ernie_lab/quant/ops.cpp`) a call costs about
# 5 us. Three more things came off. Dynamo checks its guards (one per parameter and switch, about 1 ms at this
# depth) only on the first step of each `generate`. On a CPU inductor writes the code around the kernels, its
# "wrapper", in C++ rather than Python, compiled at -O1 apart from the kernels: the 0.3B's int4 step lost about
# 1 ms a token, and compiles cold in 45 s instead of 28 (`ERNIE_LAB_CPP_WRAPPER=0` keeps the Python wrapper).
# And attention for one query: PyTorch's CPU kernel is built for many. It takes 126 us over 64 cached bf16
# keys and 42 us in fp32, and over 2048 keys even fp32 is twice as slow as the formula written out (scores,
# softmax, values). So `attend_one_query` writes it out in fp32 for a decode step: 1.8 ms a token off the
# 0.3B's 18 layers after a short prompt, and 16.9 -> 13.5 ms for its int4 step after a 1000-token prompt
# (`benchmarks/long_context.py` races it against llama.cpp as the context grows).
#
# **Measured on the kit's machine.** `benchmarks/results/fast_decode.json` records a run of
# `python benchmarks/fast_decode.py` on an idle 2-core AMD EPYC VM (AVX2, 2 threads, 7 interleaved rounds of
# 64 tokens): the 18-layer micro decoder went from 3.72 ms per token eager to 1.15 ms compiled (3.2x), the
# tiny text model from 1.83 to 0.95 ms (1.9x), greedy tokens identical in both. The first compiled calls
# took 3.2 s each there with inductor's cache warm; a cold compile took 47 to 111 s on a busy 2-core
# machine while this section was written (the 0.3B's decode step: 29-34 s cold on the idle machine).
# Absolute figures move between machines, with clock speed, caches and how busy the machine is; compare
# ratios measured in one run.

# %%
for name in ("micro-18-layers", "tiny-ernie-text"):
    row = recorded[name]
    print(f"{name:18s} eager {row['eager_ms_per_token']:5.2f} ms, compiled {row['compiled_ms_per_token']:5.2f} ms "
          f"({row['eager_ms_per_token'] / row['compiled_ms_per_token']:.2f}x), first compiled call "
          f"{row['first_compiled_call_s']} s, greedy identical {row['greedy_identical']}")
print("threads", recorded["threads"], "| rounds", recorded["rounds"], "| tokens", recorded["new_tokens"],
      "| torch", recorded["torch"])
assert all(all(recorded[name]["greedy_identical"].values()) for name in ("micro-18-layers", "tiny-ernie-text"))

# %% [markdown]
# ## 13 · On a GPU · optional, 1 min
# With CUDA present this cell runs the GPU kernels (tinygemm int4, `_int_mm`, `_scaled_mm` fp8) against
# the reference. **No GPU results are recorded yet**: the kit's GPU paths are written but have not been
# run on a GPU.

# %%
if torch.cuda.is_available():
    for scheme in ("w4a16", "w8a8", "fp8"):
        layer = quant.QuantLinear.from_linear(nn.Linear(1024, 1024).cuda().bfloat16(), scheme)
        xg = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
        with quant.reference_only():
            ref = layer(xg)
        print(scheme, float((layer(xg) - ref).abs().max() / ref.abs().max()))
else:
    print("no CUDA device here; recorded GPU results: none yet")

# %% [markdown]
# ## Exercises · core, 17 min
#
# The exercise is a stub for you to fill in, followed by a check from `ernie_lab.exercises`. Until you
# write something the check says "not attempted yet" and gives a hint; a wrong answer stops with a
# message that says what differs; a right one says "correct". The solutions are in `solutions/`.
#
# **Exercise 1 · Which layer does int4 hurt most?** Measure, do not guess. Write
# `most_sensitive_layer(model, ids)` returning `{layer name: damage}` for every layer `quantize` would
# choose (`quant.plan_layers(model, "w4a16", group_size=32)`), where the damage of a layer is the relative
# change of the logits, $\lVert \ell_q - \ell \rVert / \lVert \ell \rVert$, when that layer alone is
# quantized to w4a16 with group 32 and zero points (all others float). Leave the model itself unchanged.
# The check builds fresh random models of two widths and measures the same with the kit's quantized
# layers. *Hint:* `quant.quantize(copy.deepcopy(model), "w4a16", group_size=32, symmetric=False, filter=name)`.

# %%
def most_sensitive_layer(model, ids):
    ...   # your code here


if exercises.check("07.most_sensitive_layer", most_sensitive_layer):
    damage = most_sensitive_layer(text_model, prompts[:1])      # the trained tiny text model
    worst = max(damage, key=damage.get)
    print(f"tiny-ernie-text: {worst} hurts most in int4 ({damage[worst]:.3%} of the logits); the least: "
          f"{min(damage, key=damage.get)}")

# %% [markdown]
# ## Key takeaways
#
# * A weight format is a grid: int b with a scale (and a zero point) per group of columns; round-to-nearest
#   errs by at most half a step, so the step size, set by each group's range, is what matters.
# * Groups confine an outlier's damage to its own columns; zero points let a lopsided group use all codes.
# * Two int4 codes share a byte; a quantized layer is "unpack, dequantize, matmul", and fast kernels are
#   checked against exactly that reference.
# * Batch-1 decode reads every weight once per token: fewer bytes per weight, more tokens per second.
# * GPTQ rounds the same grid better by letting later columns absorb each column's error, weighted by the
#   inputs' correlations ($H^{-1}$); it matters most at 2 bits.
# * An int8 KV cache keeps one scale per (token, head) row, so new tokens never change old codes.
# * On trained weights 8 and 4 bits are nearly free here; plain 2-bit is not, and ERNIE's 2-bit (CCQ) is a
#   different, stronger scalar method.
# * Below the bandwidth bound sits a per-op cost: eager PyTorch dispatches some 75 ops per layer from Python.
#   A static KV cache (fixed buffers, the write slot a tensor, one mask) lets `torch.compile` replay the
#   whole decode step as one graph (`generate(..., compile=True)`), with the same greedy tokens.
#
# ## What we built
#
# * By hand: `quantize_groups` (int4 with zero points), `pack2`, `dequant_matmul`, `gptq_update` and a
#   GPTQ loop around it, `quantize_kv`, a per-layer damage measurement, and the static cache's `write_rows`;
# * checked against `ernie_lab.quant` (`formats`, `QuantLinear.reference`, `gptq.gptq_quantize` /
#   `gptq.spread_error_`) and the model's `Int8KVCache` and `StaticKVCache`;
# * measured: every scheme's quality on the shipped tiny text and VL models (`benchmarks/quant_tiny.py`),
#   and the speed of each scheme on the 0.3B shape (`benchmarks/quant.py`);
# * profiled: a decode token in four parts against its bandwidth bound (`ernie_lab.analysis.decode_cost`), and
#   the 18-layer overhead floor eager against compiled (`benchmarks/fast_decode.py`).
#
# **What comes next:** notebook **08** fine-tunes with LoRA, SFT and DPO (and LoRA on a quantized base).
#
# ## Further reading
#
# * Baidu ERNIE Team, *ERNIE 4.5 Technical Report*, 2025,
#   https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf: the family's deployment precisions
#   (W8A16, W4A16, W4A8, FP8) and convolutional code quantization (CCQ), the scalar 2-bit / 4-bit method
#   behind WINT2; it differs from everything built here in how the codes are chosen.
# * E. Frantar, S. Ashkboos, T. Hoefler, D. Alistarh, *GPTQ: Accurate Post-Training Quantization for
#   Generative Pre-trained Transformers*, 2022, https://arxiv.org/abs/2210.17323: the column-by-column
#   update with the inverse Hessian of section 7; ERNIE's published int4 / 2-bit weights use CCQ instead.
# * J. Lin, J. Tang, H. Tang, S. Yang, X. Dang, C. Gan, S. Han, *AWQ: Activation-aware Weight Quantization
#   for LLM Compression and Acceleration*, 2023, https://arxiv.org/abs/2306.00978: protects the weights of
#   large-activation channels by scaling them before rounding, a cheaper alternative to GPTQ's updates.
# * T. Dettmers, M. Lewis, Y. Belkada, L. Zettlemoyer, *LLM.int8(): 8-bit Matrix Multiplication for
#   Transformers at Scale*, 2022, https://arxiv.org/abs/2208.07339: the outlier activation channels of
#   section 6, handled by keeping them in 16 bits; ERNIE's W8A16 sidesteps them by leaving activations in bf16.
# * G. Xiao, J. Lin, M. Seznec, H. Wu, J. Demouth, S. Han, *SmoothQuant: Accurate and Efficient
#   Post-Training Quantization for Large Language Models*, 2022, https://arxiv.org/abs/2211.10438: moves
#   the activation outliers into the weights so that W8A8 works; the kit's w8a8 does per-token scales only.
# * T. Dettmers, A. Pagnoni, A. Holtzman, L. Zettlemoyer, *QLoRA: Efficient Finetuning of Quantized LLMs*,
#   2023, https://arxiv.org/abs/2305.14314: the NF4 format, a 4-bit grid placed at the quantiles of a
#   normal distribution instead of evenly, used to fine-tune on a frozen 4-bit base (notebook 08).
# * PyTorch team, *Accelerating Generative AI with PyTorch II: GPT, Fast*, 2023,
#   https://pytorch.org/blog/accelerating-generative-ai-2/ and the code at https://github.com/pytorch-labs/gpt-fast:
#   the static KV cache and the decode step compiled once with `fullgraph=True` that section 12 follows.
# * Z. Liu, J. Yuan, H. Jin, S. Zhong, Z. Xu, V. Braverman, B. Chen, X. Hu, *KIVI: A Tuning-Free Asymmetric
#   2bit Quantization for KV Cache*, 2024, https://arxiv.org/abs/2402.02750: quantizes keys per channel and
#   values per token down to 2 bits; the kit's int8 cache uses one scale per (token, head) row for both.

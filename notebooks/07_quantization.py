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
# A decode step of a 0.3B model reads every weight once to produce one token. On a CPU that is a
# memory-bandwidth problem, not a compute problem: fewer bytes per weight means more tokens per second.
# This notebook builds the number formats by hand (int8, int4, int2, fp8), packs bits, checks every
# `ernie_lab.quant` kernel against a plain dequantize-then-matmul reference, and ends with GPTQ, the
# int8 KV cache, 2-bit codes and the measured quality / memory / speed table.

# %%
# %matplotlib inline
import copy
import json
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

import ernie_lab
from ernie_lab import architectures, exercises, family, quant
from ernie_lab.model.config import ErnieConfig
from ernie_lab.course.notebook import repo_path, setup
from ernie_lab.quant import formats

FAST = setup()

# %% [markdown]
# ## 1 · Number formats and their errors
# A format is a grid of representable values. Symmetric int b: `w ≈ (u - 2^(b-1)) · s` with
# `s = max|w| / (2^(b-1) - 1)`. Rounding to the nearest grid point errs by at most half a step, `s/2`.

# %%
torch.manual_seed(0)
w = torch.randn(1, 4096) * 0.02
fig, axes = plt.subplots(1, 4, figsize=(14, 2.5), sharey=True)
errors = {}
for ax, bits in zip(axes, (8, 4, 2)):
    q = formats.quantize_weight(w, bits, 4096, symmetric=bits > 2)
    back = formats.dequantize_weight(q, bits)
    errors[f"int{bits}"] = float((back - w).abs().max() / q.scales.max())
    ax.hist(w[0].numpy(), bins=80, alpha=0.5, label="float")
    ax.hist(back[0].numpy(), bins=80, alpha=0.7, label=f"int{bits}")
    ax.set_title(f"int{bits}: {len(back.unique())} values")
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
# ## 2 · Per-channel vs group-wise scales, and zero points
# One outlier in a row stretches that row's scale; groups of 128 columns confine the damage.
# A zero point shifts the grid so that a group whose values are all positive still uses all 2^b codes.

# %%
W = torch.randn(256, 1024) * 0.02
W[:, 7] *= 30                                           # an outlier column
def rel_error(q, bits):
    return float((formats.dequantize_weight(q, bits) - W).norm() / W.norm())
per_channel = rel_error(formats.quantize_weight(W, 4, 1024), 4)
grouped = rel_error(formats.quantize_weight(W, 4, 128), 4)
zero_points = rel_error(formats.quantize_weight(W, 4, 128, symmetric=False), 4)
print(f"int4 relative error: per-channel {per_channel:.3f}, group 128 {grouped:.3f}, group 128 + zero points {zero_points:.3f}")

# %%
assert grouped < per_channel

# %% [markdown]
# ## 3 · Packing bits by hand
# Two int4 codes per byte, the first column in the high nibble: `byte = u0 << 4 | u1`.

# %%
codes = torch.tensor([[3, 12, 15, 0]], dtype=torch.uint8)
by_hand = torch.tensor([[3 << 4 | 12, 15 << 4 | 0]], dtype=torch.uint8)
print([f"{b:08b}" for b in by_hand[0].tolist()], "==", formats.pack(codes, 4).tolist())
assert torch.equal(formats.pack(codes, 4), by_hand) and torch.equal(formats.unpack(by_hand, 4), codes)

# %% [markdown]
# ## 4 · Every kernel equals the reference
# The reference: unpack, dequantize, then an ordinary matmul. The kernels read the packed codes directly.

# %%
linear = nn.Linear(512, 384)
x = torch.randn(3, 512)
for scheme in ("w8a16", "w4a16", "w2a16", "w8a8"):
    layer = quant.QuantLinear.from_linear(linear, scheme, group_size=128)
    W_hat = layer.dequantize()                                      # by hand: the float weight the codes stand for
    reference = x @ W_hat.t() + linear.bias
    got = layer(x)
    gap = float((got - reference).abs().max() / reference.abs().max())
    print(f"{scheme}: kernel vs hand-made reference {gap:.4f} (relative), weight error "
          f"{float((W_hat - linear.weight).norm() / linear.weight.norm()):.3f}")
    assert gap < (0.05 if scheme == "w8a8" else 0.02)

# %% [markdown]
# ## 5 · Why weight-only helps batch-1 decode
# A decode step reads all weights once, so tokens/s ≤ bandwidth / bytes per token. First we measure
# this machine's read bandwidth by summing a tensor far larger than the caches. Then the bound follows
# for each precision.

# %%
data = torch.ones((16 if FAST else 64) * 2**20)          # 64 or 256 MiB of fp32
data.sum()                                                # warm-up
times = []
for _ in range(5):
    start = time.perf_counter()
    data.sum()
    times.append(time.perf_counter() - start)
bandwidth = data.numel() * 4 / min(times)
print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s ({torch.get_num_threads()} threads)")
assert 1e9 < bandwidth < 2e12
del data
config = ErnieConfig()                                   # the 0.3B shape
for precision in ("bf16", "int8", "int4", "2bit"):
    print(f"{precision:5s} {family.weight_bytes(config, precision) / 1e9:.2f} GB -> at most "
          f"{bandwidth / family.weight_bytes(config, precision):.0f} tok/s")
assert family.weight_bytes(config, "int4") < family.weight_bytes(config, "bf16") / 3

# %% [markdown]
# ## 5b · Reading the codes once: the kit's decode kernel
# To reach that bound a kernel must touch each packed byte once and do little work per weight. The kit's
# decode kernel (`ernie_lab/quant/gemv.c`, about 350 lines of C that the kit compiles on first use) does
# two things to keep the work small. First, it pulls the zero point out of the inner loop:
#
# $$y_n = \sum_g s_{ng} \sum_{k \in g} (u_k - z_{ng})\, x_k = \sum_g s_{ng} \Big(\sum_{k \in g} u_k x_k - z_{ng} \sum_{k \in g} x_k\Big)$$
#
# The group sums of $x$ are computed once per token, not once per row. Second, it rounds $x$ once per
# token to int16, with one scale per group. The inner loop then multiplies small integers by small
# integers, 16 at a time, with one AVX2 instruction (`vpmaddwd`). The rounding error is at most
# $2^{-16}$ of the group's largest $|x|$. PyTorch's weight-only kernels round $x$ to bf16, which costs
# $2^{-9}$. Here is the same arithmetic by hand for one int4 layer:

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
# ## 6 · Activations and outliers (W8A8)
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
# ## 7 · GPTQ's idea
# Quantize one column, then let the columns not yet quantized absorb its error, weighted by how the
# layer's inputs correlate (the Hessian `H = XᵀX`). Same number of bits, smaller output error.

# %%
from ernie_lab.quant.gptq import gptq_quantize
X = torch.randn(2048, 256) @ (torch.randn(256, 256) * torch.logspace(0, -2, 256))
Wl = torch.randn(128, 256) * 0.05
H = X.t() @ X / len(X)
def out_error(q, bits):
    return float((X @ (Wl - formats.dequantize_weight(q, bits)).t()).norm() / (X @ Wl.t()).norm())
for bits in (4, 2):
    rtn, gptq = formats.quantize_weight(Wl, bits, 64, False), gptq_quantize(Wl, H, bits, 64, False)
    print(f"int{bits}: output error RTN {out_error(rtn, bits):.3f}, GPTQ {out_error(gptq, bits):.3f}")
    assert out_error(gptq, bits) < out_error(rtn, bits)

# %% [markdown]
# ## 8 · The KV cache at 128K context, and int8 KV
# Each token keeps, per layer, K and V for every KV head. At 128K tokens that rivals the weights.

# %%
for name in ("ERNIE-4.5-0.3B", "ERNIE-4.5-21B-A3B"):
    cfg = ernie_lab.checkpoints.checkpoint(name).config
    bf16_kv = family.kv_cache_bytes(cfg, 131072, bytes_per_value=2)
    print(f"{name}: KV cache at 128K, bf16 {bf16_kv / 2**30:.1f} GiB, int8 {family.kv_cache_bytes(cfg, 131072, bytes_per_value=1) / 2**30:.1f} GiB")
tiny = architectures.build(ErnieConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256, vocab_size=512,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=32)).eval()
prompt = torch.randint(3, 512, (1, 8))
same = ernie_lab.generate(tiny, prompt, 8, eos_token_id=[]) == ernie_lab.generate(tiny, prompt, 8, eos_token_id=[], kv_cache_dtype="int8")
print("int8 KV cache: greedy tokens agree on", float(same.float().mean()))
assert float(same.float().mean()) >= 0.75

# %% [markdown]
# ## 9 · 2-bit, and the idea of ERNIE's convolutional code quantization
# Four levels per group are too few for round-to-nearest (section 1). ERNIE 4.5's WINT2 ("CCQ") instead
# encodes *groups of weights jointly*: a short code indexes a vector from a structured codebook generated
# by a convolution-like (shift-register) rule, so the codebook need not be stored and the decoder is a few
# shifts and adds. It is vector quantization with a cheap decoder; the kit implements only scalar 2-bit
# with zero points (and GPTQ), which is why its 2-bit quality is far below Baidu's published WINT2.

# %% [markdown]
# ## 10 · The quality / memory / speed table
# From `benchmarks/results/quant.json`: the 0.3B shape with random weights, CPU, 2 threads, batch-1
# decode. Every row is measured once per round, rounds interleaved. llama.cpp runs on GGUF files
# converted from the same checkpoint. Each kit row also shows its bandwidth bound (measured read
# bandwidth / weight bytes per token).
#
# The recorded run is on a 2-core AMD EPYC VM with AVX2 and no AVX-512. The kit's C kernels beat
# PyTorch's kernels on the same models: 1.2-1.7x, W8A8 4x, 2-bit 15x. Even so, every quantized row lands
# near 20-34 tok/s, far below its bandwidth bound. Take w4a16: a token costs about 38 ms, and reading its
# weights at the measured bandwidth would take about 12.5. The same model with tiny widths, where there
# is almost nothing to read, still costs 14 ms a token: that is eager PyTorch around the matmuls, about
# a thousand small ops and 127 kernel calls per token on a slow-clocked VM. On top of that, the int4
# kernel is compute-bound here at about 12 G weights/s per core. llama.cpp runs its whole step as one
# C++ graph, so its rows scale with the bytes (Q4_0 about 71 tok/s). To close that gap the step must be
# compiled, as a CUDA graph does on a GPU; faster matmuls alone will not do it.

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
# ## 11 · On a GPU
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
# ## Exercises
# **1.** Which linear layer of a model hurts most when it alone is quantized to int4? Write
# `most_sensitive_layer(model, ids)` returning the name whose int4 quantization (all others float) changes
# the logits most. *Hint:* `quant.quantize(copy.deepcopy(model), "w4a16", filter=name)` quantizes one layer.

# %%
def most_sensitive_layer(model, ids):
    ...  # your code here


exercises.check("07.most_sensitive_layer", most_sensitive_layer)

# %% [markdown]
# **2.** Write `pack2(codes)` packing four 2-bit codes per byte, first column in the highest bits, without
# `formats.pack`. *Hint:* shifts 6, 4, 2, 0 and `|`.

# %%
def pack2(codes):
    ...  # your code here


exercises.check("07.pack2", pack2)

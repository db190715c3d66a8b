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
# # 09 · The ERNIE 4.5 family at scale
#
# **What you will learn:** where the parameters of each model live, memory at four precisions, the KV
# cache, FLOPs per token, and how the big models are spread over many GPUs.
# **Time:** 70 min (core 56 min). **Memory:** under 1 GB (arithmetic, plus a few tiny models).
#
# Ten checkpoints, five sizes. Nobody runs the 300B or the 424B model in a classroom, but everybody can
# compute what they cost: how many parameters sit where, how many a token actually uses, how many bytes
# the weights and the KV cache take, how many FLOPs a token costs, and how the big models are spread over
# many GPUs. Everything in this notebook is arithmetic on the integers of a `config.json`, done by
# `ernie_lab.family`, and checked against `transformers` wherever `transformers` can check it.
#
# **What you will see**
# 1. the ten checkpoints in one table, and checks that reproduce the published parameter counts exactly;
# 2. where the parameters live (stacked bars) and why the names round the way they do;
# 3. memory at bf16 / int8 / int4 / 2-bit, and the KV cache up to 128K tokens;
# 4. active versus total parameters, FLOPs per token, and what the report's 47% MFU means;
# 5. scale-out on paper: GPUs per checkpoint, expert-parallel and tensor-parallel traffic, intra- vs inter-node;
# 6. what a single H100 or a laptop can run; exercises.

# %%
# %matplotlib inline
import math
import random

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Markdown, display

from ernie_lab import exercises
from ernie_lab import family as F
from ernie_lab.course.notebook import setup

FAST = setup()   # fast mode (fewer samples): from ERNIE_LAB_FAST (make lab FAST=1); FAST = True forces it
plt.rcParams.update({"figure.dpi": 110, "font.size": 11, "axes.grid": True, "grid.alpha": 0.3})

SIZES = ["ERNIE-4.5-0.3B", "ERNIE-4.5-21B-A3B", "ERNIE-4.5-300B-A47B", "ERNIE-4.5-VL-28B-A3B",
         "ERNIE-4.5-VL-424B-A47B"]
SHORT = {name: name.removeprefix("ERNIE-4.5-") for name in SIZES}
COUNTS = {name: F.count_params(F.CHECKPOINTS[name]) for name in SIZES}


def table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    display(Markdown("\n".join(lines)))


def billions(n):
    return f"{n / 1e9:,.2f} B"


# %% [markdown]
# ## 1. Ten checkpoints, five shapes · core, 6 min
#
# Every size comes twice: a **-Base** checkpoint (pre-trained only) and a post-trained one (SFT + DPO/UPO),
# each published with PyTorch weights (`-PT`) and PaddlePaddle weights (`-Paddle`). Base and post-trained
# share every shape, so five config tables describe all ten. The three small ones are exactly the default
# configs of the `transformers` classes; the 300B table holds the published `config.json` values; the
# **VL-424B table is reconstructed** from the model card and the technical report (sources and caveats
# in `ernie_lab/model/published.py`), so its numbers are consistency checks, not measurements.

# %%
rows = []
for c in F.CHECKPOINTS.values():
    s, n = F.model_shape(c), F.count_params(c)
    experts = "-" if s.kind == "dense" else f"{s.num_experts} top-{s.experts_per_token} x {s.expert_size}"
    if s.kind == "vl_moe":
        experts += f" + {s.num_vision_experts} vision x {s.vision_expert_size}"
    if s.num_shared_experts:
        experts += f", {s.num_shared_experts} shared"
    rows.append([c.name, c.kind, "post-trained" if c.post_trained else "base", f"`{c.hub_id}`<br>`{c.paddle_hub_id}`",
                 f"{c.context_length // 1024}K", s.num_layers, s.hidden_size, f"{s.num_heads} / {s.num_kv_heads}",
                 experts, billions(n.total), billions(n.active),
                 "reconstructed" if "RECONSTRUCTED" in c.config_source else "published"])
table(["checkpoint", "kind", "training", "Hub ids", "context", "layers", "hidden", "heads / KV", "experts",
       "total", "active / text token", "config"], rows)

# %% [markdown]
# ### Check: the counts are the counts of the real models
#
# `count_params` never builds a model. Here we build the `transformers` models on PyTorch's **meta device**
# (shapes only, no memory) and compare with `sum(p.numel())`. The three default shapes must give the
# published numbers: 360,748,032 (0.3B), 21,825,437,888 (21B-A3B) and 29,399,294,336 (VL-28B-A3B).

# %%
import torch
import transformers

CLASSES = {"ernie4_5": (transformers.Ernie4_5Config, transformers.Ernie4_5ForCausalLM),
           "ernie4_5_moe": (transformers.Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeForCausalLM),
           "ernie4_5_vl_moe": (transformers.Ernie4_5_VLMoeConfig, transformers.Ernie4_5_VLMoeForConditionalGeneration)}


def meta_numel(table_):
    config_class, model_class = CLASSES[table_["model_type"]]
    config = config_class(**{k: v for k, v in table_.items() if k not in ("model_type", "num_nextn_predict_layers")})
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


PUBLISHED = {"ERNIE-4.5-0.3B": 360_748_032, "ERNIE-4.5-21B-A3B": 21_825_437_888,
             "ERNIE-4.5-VL-28B-A3B": 29_399_294_336}
for name in SIZES:
    built = meta_numel(F.CHECKPOINTS[name].config)
    assert COUNTS[name].total == built, (name, COUNTS[name].total, built)
    if name in PUBLISHED:
        assert built == PUBLISHED[name], name
    print(f"{SHORT[name]:>14}: count_params = transformers on meta = {built:,}")

# %% [markdown]
# ## 2. Where the parameters live · core, 6 min
#
# `count_params` splits the total into components. The left panel shows where the **stored** parameters
# are, the right panel what one **text token** multiplies by. In the MoE models almost everything is in the
# routed experts, and a token uses only k of the E of them.

# %%
PARTS = [("embeddings", "embeddings"), ("lm_head", "lm_head (untied)"), ("attention", "attention"),
         ("dense_mlp", "dense MLP"), ("routed_experts", "routed experts (text)"),
         ("vision_experts", "vision experts"), ("shared_experts", "shared experts"),
         ("vision_encoder", "ViT encoder"), ("adapter", "adapter"), ("other", "norms + routers")]
COLORS = plt.cm.tab10(np.arange(len(PARTS)))


def shares(counts):
    parts = dict(counts)
    parts["other"] = parts.pop("norms") + parts.pop("router")
    total = sum(parts.values())
    return [parts[key] / total for key, _ in PARTS]


fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
for ax, attr, title in ((axes[0], "by_component", "stored parameters"),
                        (axes[1], "active_by_component", "parameters one text token uses")):
    left = np.zeros(len(SIZES))
    data = np.array([shares(getattr(COUNTS[name], attr)) for name in SIZES])
    for j, (_, label) in enumerate(PARTS):
        ax.barh([SHORT[n] for n in SIZES], 100 * data[:, j], left=left, color=COLORS[j], label=label)
        left += 100 * data[:, j]
    ax.set_xlabel("share of parameters (%)")
    ax.set_title(title)
    ax.invert_yaxis()
axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
for ax, attr in zip(axes, ("total", "active")):
    for i, name in enumerate(SIZES):
        ax.text(101, i, billions(getattr(COUNTS[name], attr)), va="center", fontsize=9)
    ax.set_xlim(0, 125)
fig.suptitle("ERNIE 4.5: where the parameters live", y=1.02)
plt.show()


# %% [markdown]
# ### What the names leave out or round
#
# A name is a label, not a count. The arithmetic below explains every gap between a computed total and the
# name; each line is asserted, so if a table changes, the explanation must change with it.
#
# * **0.3B** has 0.36 B parameters: 0.106 B of them are the 103424 x 1024 embedding; the layers alone hold
#   0.25 B. The name sits between the two.
# * **21B-A3B**: 21.83 B total, the name truncates. Active is 3.35 B if the tied embedding (the output
#   projection every token multiplies by) is counted, 3.09 B without it: both round to 3 B.
# * **300B-A47B**: 299.48 B with its separate lm_head (298.64 B if it were tied); the name rounds up.
#   Active 47.08 B = 46.23 B inside the 54 layers + 0.85 B output projection; the input lookup table
#   multiplies nothing and is not active. Its config declares one multi-token-prediction layer
#   (`num_nextn_predict_layers: 1`) that `transformers` does not build and no count here includes.
# * **VL-28B-A3B**: 29.40 B, more than the name: the decoder alone (text and vision experts, without the
#   ViT and the adapter) has 28.62 B, which the name rounds down to 28; the ViT + adapter add 0.77 B.
#   A text token uses exactly what a 21B-A3B token uses (3.35 B); an image token uses the narrower
#   vision experts (2.85 B with the ViT and adapter counted).
# * **VL-424B-A47B** (reconstructed): 423.53 B, of which the vision experts are 123.2 B, and active per text
#   token = the 300B's 47.08 B. The vision expert width (1536) was chosen to land on 424 B, so this total is
#   a consistency check of the reconstruction, not a measurement.

# %%
def layers_only(count):
    return count.total - count.by_component["embeddings"] - count.by_component["lm_head"]


c03, c21, c300 = COUNTS["ERNIE-4.5-0.3B"], COUNTS["ERNIE-4.5-21B-A3B"], COUNTS["ERNIE-4.5-300B-A47B"]
c28, c424 = COUNTS["ERNIE-4.5-VL-28B-A3B"], COUNTS["ERNIE-4.5-VL-424B-A47B"]
assert round(c03.total / 1e9, 2) == 0.36 and round(layers_only(c03) / 1e9, 2) == 0.25
assert int(c21.total / 1e9) == 21 and round(c21.active / 1e9) == 3
assert round((c21.active - c21.active_by_component["embeddings"]) / 1e9) == 3

tied_300b = F.count_params(dict(F.CONFIG_300B_A47B, tie_word_embeddings=True))
assert math.ceil(c300.total / 1e9) == 300 and round(tied_300b.total / 1e9, 2) == 298.64
inside_layers = c300.active - c300.active_by_component["lm_head"]
assert round(c300.active / 1e9) == 47 and round(inside_layers / 1e9, 2) == 46.23

vision_side = c28.by_component["vision_encoder"] + c28.by_component["adapter"]
assert int((c28.total - vision_side) / 1e9) == 28 and round(vision_side / 1e9, 2) == 0.77
assert c28.active == c21.active
assert round(c424.total / 1e9) == 424 and c424.active == c300.active

for name in SIZES:
    n, c = COUNTS[name], F.CHECKPOINTS[name]
    print(f"{SHORT[name]:>14}: total {billions(n.total):>10} vs name {c.named_total / 1e9:g} B"
          f" | active {billions(n.active):>9} vs name {c.named_active / 1e9:g} B")

# %% [markdown]
# ## 3. Memory: weights at four precisions · core, 4 min
#
# ![Weight-only quantization](../figures/quantization.png)
#
# Weights take `bits / 8` bytes each plus, for the quantised formats, one bf16 scale per group of 128
# weights; norms and routers stay in bf16. FastDeploy serves ERNIE 4.5 in BF16, W8A16 (int8), W4A16
# (int4) and 2-bit (convolutional code quantization, CCQ, about 2.5 bits on average in the report).
# The dashed lines are the memory of the devices in question.

# %%
PRECISIONS = ["bf16", "int8", "int4", "2bit"]
gib = {name: [F.weight_bytes(F.CHECKPOINTS[name], p) / F.GIB for p in PRECISIONS] for name in SIZES}

fig, ax = plt.subplots(figsize=(11, 4.5))
width = 0.2
x = np.arange(len(SIZES))
for j, p in enumerate(PRECISIONS):
    ax.bar(x + (j - 1.5) * width, [gib[n][j] for n in SIZES], width, label=p)
for device, style in (("laptop-16GB", ":"), ("H100-80GB", "--"), ("H200-141GB", "-.")):
    mem = F.ACCELERATORS[device].memory_gib
    ax.axhline(mem, color="black", linestyle=style, linewidth=1)
    ax.text(-0.45, mem * 1.08, F.ACCELERATORS[device].name, fontsize=9, ha="left")
ax.set_yscale("log")
ax.set_xticks(x, [SHORT[n] for n in SIZES])
ax.set_ylabel("weights (GiB, log scale)")
ax.set_title("Weight memory by precision (group-128 scales included)")
ax.set_ylim(0.05, 3000)
ax.legend(title="precision", ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
plt.show()

table(["model"] + PRECISIONS, [[SHORT[n]] + [f"{v:,.1f} GiB" for v in gib[n]] for n in SIZES])

# %%
# Check: the bf16 bytes of a real (small) model, measured from its tensors, are what the formula says.
import ernie_lab
from ernie_lab.model.config import parse_config

small = dict(model_type="ernie4_5_moe", vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16, moe_num_experts=4, moe_k=2,
             moe_intermediate_size=32, moe_num_shared_experts=1, moe_layer_start_index=1)
small_model = ernie_lab.ErnieForCausalLM(parse_config(small)).to(torch.bfloat16)
storages = {t.data_ptr(): t.numel() * t.element_size() for t in small_model.state_dict().values()}  # tied: once
measured = sum(storages.values())
print(f"bf16 model: {measured:,} bytes measured, {F.weight_bytes(small, 'bf16'):,} by the formula")
assert measured == F.weight_bytes(small, "bf16")

# %% [markdown]
# ## 4. The KV cache, GQA-aware · core, 4 min
#
# Every generated token leaves a key and a value vector per layer and per **KV head**:
#
#     KV bytes per token = 2 x layers x kv_heads x head_dim x bytes
#
# Grouped-query attention keeps 2 (0.3B), 4 (A3B) or 8 (A47B) KV heads for 16, 20 and 64 query heads, so
# the cache is 8x, 5x and 8x smaller than with full multi-head attention (dashed lines). The VL models
# share their decoder with the text models of the same size, so their caches are the same.

# %%
contexts = 2 ** np.arange(10, 18)          # 1K ... 128K tokens
decoders = {"0.3B": "ERNIE-4.5-0.3B", "21B-A3B / VL-28B-A3B": "ERNIE-4.5-21B-A3B",
            "300B-A47B / VL-424B-A47B": "ERNIE-4.5-300B-A47B"}
fig, ax = plt.subplots(figsize=(10, 4.5))
for (label, name), color in zip(decoders.items(), ("C0", "C1", "C3")):
    cfg = F.CHECKPOINTS[name]
    ax.plot(contexts, [F.kv_cache_bytes(cfg, int(t)) / F.GIB for t in contexts], "o-", color=color,
            label=f"{label} (GQA)")
    ax.plot(contexts, [F.kv_cache_bytes(cfg, int(t), gqa=False) / F.GIB for t in contexts], "--", color=color,
            label=f"{label} if every head kept K/V")
ax.axhline(80, color="black", linestyle=":", linewidth=1)
ax.text(1100, 90, "one H100 (80 GB)", fontsize=9)
ax.set_xscale("log", base=2)
ax.set_yscale("log")
ax.set_xticks(contexts, [f"{t // 1024}K" for t in contexts])
ax.set_xlabel("context length (tokens), one sequence")
ax.set_ylabel("KV cache (GiB, bf16, log scale)")
ax.set_title("KV cache versus context length")
ax.legend(fontsize=8.5)
plt.show()

table(["decoder", "KV heads x head_dim", "bytes per token", "at 128K tokens", "with full MHA at 128K"],
      [[label, f"{F.model_shape(F.CHECKPOINTS[n]).num_kv_heads} x 128",
        f"{F.kv_cache_bytes_per_token(F.CHECKPOINTS[n]):,.0f}",
        f"{F.kv_cache_bytes(F.CHECKPOINTS[n], 131072) / F.GIB:.2f} GiB",
        f"{F.kv_cache_bytes(F.CHECKPOINTS[n], 131072, gqa=False) / F.GIB:.1f} GiB"] for label, n in decoders.items()])

# %%
# Check against a real cache: a tiny random ERNIE decoder in transformers, 2 sequences of 11 tokens.
tiny = dict(model_type="ernie4_5", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
tiny_model = transformers.Ernie4_5ForCausalLM(transformers.Ernie4_5Config(
    **{k: v for k, v in tiny.items() if k != "model_type"})).eval()
with torch.no_grad():
    cache = tiny_model(torch.randint(0, 256, (2, 11)), use_cache=True).past_key_values
measured = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
assert measured == F.kv_cache_bytes(tiny, 11, batch=2, bytes_per_value=4)   # fp32 cache
assert F.kv_cache_bytes_per_token(F.CONFIG_300B_A47B) == 2 * 54 * 8 * 128 * 2
print(f"measured {measured} bytes = formula; "
      f"300B-A47B: {F.kv_cache_bytes_per_token(F.CONFIG_300B_A47B):,.0f} bytes per token")

# %% [markdown]
# ## 5. Active versus total, and what a token costs · optional, 6 min
#
# A MoE model stores every expert but each token runs through only k of them. The A3B models store
# 6.5x (21B) and 8.8x (VL-28B) more parameters than a text token uses, the A47B models 6.4x and 9.0x
# (asserted below).
#
# FLOPs per generated token: a multiply-add is 2 FLOPs, so the weight matrices cost `2 x active`; attention
# adds `4 x layers x heads x head_dim` per token of context (scores `QK^T` and the weighted sum `AV`).

# %%
fig, ax = plt.subplots(figsize=(7.5, 5))
OFFSETS = {"ERNIE-4.5-0.3B": (8, -12), "ERNIE-4.5-21B-A3B": (-60, 8), "ERNIE-4.5-VL-28B-A3B": (8, -14),
           "ERNIE-4.5-300B-A47B": (-75, 8), "ERNIE-4.5-VL-424B-A47B": (8, -14)}
for name in SIZES:
    n = COUNTS[name]
    ax.scatter(n.total, n.active, s=60)
    ax.annotate(SHORT[name], (n.total, n.active), textcoords="offset points", xytext=OFFSETS[name], fontsize=9)
line = np.array([1e8, 1e12])
ax.plot(line, line, "k--", linewidth=1, label="dense: active = total")
ax.set_xscale("log"); ax.set_yscale("log")
ax.set_xlabel("total parameters"); ax.set_ylabel("active parameters per text token")
ax.set_title("Active versus total parameters")
ax.legend()
plt.show()

stored_per_used = {SHORT[n]: COUNTS[n].total / COUNTS[n].active for n in SIZES}
ratios = [round(stored_per_used[k], 1) for k in ("21B-A3B", "VL-28B-A3B", "300B-A47B", "VL-424B-A47B")]
assert ratios == [6.5, 8.8, 6.4, 9.0], ratios
print("stored / used per text token:", {k: round(v, 1) for k, v in stored_per_used.items()})

fig, ax = plt.subplots(figsize=(10, 4.2))
for (label, name), color in zip(decoders.items(), ("C0", "C1", "C3")):
    cfg = F.CHECKPOINTS[name]
    ax.plot(contexts, [F.flops_per_token(cfg, int(t), "decode") / 1e9 for t in contexts], "o-", color=color,
            label=label)
    ax.axhline(2 * COUNTS[name].active / 1e9, color=color, linestyle=":", linewidth=1)
ax.set_xscale("log", base=2); ax.set_yscale("log")
ax.set_xticks(contexts, [f"{t // 1024}K" for t in contexts])
ax.set_xlabel("tokens already in context"); ax.set_ylabel("GFLOPs per generated token (log)")
ax.set_title("Decode cost per token: weights (dotted) + attention over the context")
ax.legend(fontsize=9)
plt.show()

# %% [markdown]
# ### Check: the FLOP formula against PyTorch's FLOP counter
#
# `torch.utils.flop_counter.FlopCounterMode` counts every matrix multiplication PyTorch runs. One decode
# step of a tiny random MoE model (eager attention, eager experts) must cost exactly
# `flops_per_token(config, context, "decode")`, where the context includes the new token itself.

# %%
from torch.utils.flop_counter import FlopCounterMode

tiny_moe = dict(model_type="ernie4_5_moe", vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=16,
                moe_num_shared_experts=1, moe_layer_start_index=1)
cfg = transformers.Ernie4_5_MoeConfig(**{k: v for k, v in tiny_moe.items() if k != "model_type"})
cfg._attn_implementation, cfg._experts_implementation = "eager", "eager"
torch.manual_seed(0)
moe_model = transformers.Ernie4_5_MoeForCausalLM(cfg).eval()
with torch.no_grad():
    cache = moe_model(torch.randint(0, 256, (1, 9)), use_cache=True).past_key_values
    counter = FlopCounterMode(display=False)
    with counter:
        moe_model(torch.randint(0, 256, (1, 1)), past_key_values=cache, use_cache=True)
assert counter.get_total_flops() == F.flops_per_token(tiny_moe, 10, "decode")
print("FlopCounterMode:", counter.get_total_flops(), "= formula")

# %% [markdown]
# ### The 47% MFU claim
#
# The report says ERNIE 4.5 reached **47% model FLOPs utilisation** when pre-training its largest language
# model (FP8 mixed precision, intra-node expert parallelism, memory-efficient pipeline scheduling; the three
# ways of spreading a model over GPUs: **expert parallelism** puts different experts on different GPUs,
# **tensor parallelism** splits every matrix across GPUs, **pipeline parallelism** gives each GPU a range of
# layers; section 6 counts what each one sends):
#
#     MFU = tokens per second x training FLOPs per token / peak FLOP/s
#
# The report does not give the throughput and the hardware peak behind this number, so the notebook does
# not pretend to reproduce it. `F.mfu(tokens_per_second, flops_per_token, peak_flops)` takes them as
# arguments. What we can do is run the formula backwards: the throughput per GPU that 47% would mean for the
# 300B-A47B at a 4096-token sequence on an H800 (NVIDIA datasheet peaks: 989 dense BF16 TFLOPS, 1979
# dense FP8 TFLOPS). Which peak the report divides by is one of the unknowns.

# %%
seq = 4096
train_flops = F.training_flops_per_token(F.CONFIG_300B_A47B, seq)
h800 = F.ACCELERATORS["H800-80GB"]
print(f"training FLOPs per token (6 x active + attention, seq {seq}): {train_flops / 1e9:.1f} GFLOPs")
for label, peak in (("BF16 peak", h800.bf16_tflops * 1e12), ("FP8 peak", h800.fp8_tflops * 1e12)):
    tps = F.tokens_per_second_at_mfu(0.47, train_flops, peak)
    print(f"47% of the H800 {label}: {tps:,.0f} tokens/s per GPU")

# The premise of "training = 3 x forward": a backward pass costs two forwards. Counted, on the tiny model
# of the FLOP check above (every weight trainable, a full sequence):
ids = torch.randint(0, 256, (1, 16))
forward_only, forward_backward = FlopCounterMode(display=False), FlopCounterMode(display=False)
with forward_only:
    moe_model(ids)
with forward_backward:
    moe_model(ids, labels=ids).loss.backward()
print(f"forward + backward / forward = {forward_backward.get_total_flops() / forward_only.get_total_flops():.3f}")
assert forward_backward.get_total_flops() == 3 * forward_only.get_total_flops()
moe_model.zero_grad(set_to_none=True)

# %% [markdown]
# ## 6. Scale-out on paper · optional, 8 min
#
# ### How many GPUs?
#
# The fewest GPUs whose memory (less 10% kept for activations and the runtime) holds the weights and the
# KV cache. Real deployments round this up to a parallel degree the layout allows, usually a power of two.

# %%
CONTEXT, BATCH = 8192, 1
DEVICES = ["laptop-16GB", "laptop-32GB", "H100-80GB", "H200-141GB"]
GPUS = ["H100-80GB", "H200-141GB"]
rows = []
for name in SIZES:
    cfg = F.CHECKPOINTS[name]
    row = [SHORT[name]]
    for device in GPUS:
        need = [F.gpus_needed(cfg, p, F.ACCELERATORS[device].memory_gib, CONTEXT, BATCH) for p in PRECISIONS]
        row.append(" / ".join(str(k) for k in need))
    rows.append(row)
display(Markdown(f"Devices needed at bf16 / int8 / int4 / 2-bit, one sequence of {CONTEXT} tokens:"))
table(["model"] + [F.ACCELERATORS[d].name for d in GPUS], rows)

# %%
# What fits on ONE device (1 = fits):
fits = np.array([[[F.gpus_needed(F.CHECKPOINTS[n], p, F.ACCELERATORS[d].memory_gib, CONTEXT) == 1
                   for p in PRECISIONS] for d in DEVICES] for n in SIZES])
fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharey=True)       # large cells: legible on a projector
for k, (ax, device) in enumerate(zip(axes.flat, DEVICES)):
    ax.imshow(fits[:, k, :], cmap="Greens", vmin=-0.3, vmax=1.2)
    ax.set_xticks(range(len(PRECISIONS)), PRECISIONS, fontsize=12)
    ax.set_yticks(range(len(SIZES)), [SHORT[n] for n in SIZES], fontsize=12)
    ax.set_title(F.ACCELERATORS[device].name, fontsize=14)
    ax.grid(False)
    for i in range(len(SIZES)):
        for j in range(len(PRECISIONS)):
            ax.text(j, i, "fits" if fits[i, k, j] else "-", ha="center", va="center", fontsize=13,
                    color="white" if fits[i, k, j] else "black")
plt.tight_layout()
fig.suptitle(f"What one device can hold (weights + KV cache of {CONTEXT} tokens)", y=1.02, fontsize=15)
plt.show()

assert fits[SIZES.index("ERNIE-4.5-300B-A47B"), DEVICES.index("H200-141GB"), PRECISIONS.index("2bit")]
assert not fits[SIZES.index("ERNIE-4.5-300B-A47B"), DEVICES.index("H100-80GB"), PRECISIONS.index("int4")]
assert fits[SIZES.index("ERNIE-4.5-21B-A3B"), DEVICES.index("laptop-16GB"), PRECISIONS.index("int4")]

# %% [markdown]
# A laptop with 16 GB runs the 0.3B at any precision and the 21B-A3B at 4 bits; one H100 holds both A3B
# models even at bf16 and nothing bigger; the 300B fits on one 141 GB GPU only at 2 bits, which is what
# FastDeploy's 2-bit CCQ release is for. (How fast it runs there is another question: decoding reads every
# active weight once per token, so memory bandwidth, not memory size, sets the speed.)
#
# ### Expert parallelism: the all-to-all
#
# With expert parallelism of degree N the 64 experts of each MoE layer are spread over N GPUs, 64/N each.
# A token's hidden state (8192 values for the A47B models) goes to the GPUs that hold its k chosen
# experts (**dispatch**) and their outputs come back (**combine**):
#
#     bytes per token per MoE layer = 2 x remote copies x hidden x bytes per value
#
# Sent naively, one copy per chosen expert on another GPU: `k (N - 1) / N` copies. Sent once per
# destination GPU (what DeepEP-style kernels do), `(N - 1) (1 - C(E - E/N, k) / C(E, k))`.
#
# For comparison, **tensor parallelism** of degree t splits every matrix across t GPUs and ends each
# layer's attention and MLP with an all-reduce of the hidden vector; a ring all-reduce sends
# `2 (t - 1) / t` of it from every GPU: `2 x 2 (t - 1) / t x hidden x bytes` per token per layer, in every
# layer (dense or MoE). TP traffic is smaller per layer but it sits on the critical path of every matrix
# multiplication, which is why it stays inside a node too.

# %%
DEGREES = [1, 2, 4, 8, 16, 32, 64]
a47b = F.CONFIG_300B_A47B
naive = [F.ep_all_to_all_bytes(a47b, n) / 1024 for n in DEGREES]
dedup = [F.ep_all_to_all_bytes(a47b, n, dedup=True) / 1024 for n in DEGREES]
TP_DEGREES = [1, 2, 4, 8]
tp = [F.tp_all_reduce_bytes(a47b, t) / 1024 for t in TP_DEGREES]

fig, ax = plt.subplots(figsize=(10, 4.2))
ax.plot(DEGREES, naive, "o-", label="EP, one copy per remote expert")
ax.plot(DEGREES, dedup, "s-", label="EP, one copy per remote GPU")
ax.plot(TP_DEGREES, tp, "^--", color="gray", label="TP of degree t: 2 all-reduces, every layer")
ax.set_xscale("log", base=2)
ax.set_xticks(DEGREES, DEGREES)
ax.set_xlabel("parallel degree (EP: N, TP: t)")
ax.set_ylabel("KiB per token per layer (bf16)")
ax.set_title("300B-A47B: bytes one token sends off its GPU in one layer")
ax.legend()
plt.show()

# %%
# Check the two formulas with a simulation: tokens pick k distinct experts at random, experts are spread evenly.
shape = F.model_shape(a47b)
trials = 4000 if FAST else 20000
rng = random.Random(0)
for n in (8, 16):
    remote_experts = remote_gpus = 0
    for _ in range(trials):
        gpus = [e * n // shape.num_experts for e in rng.sample(range(shape.num_experts), shape.experts_per_token)]
        remote = [g for g in gpus if g != 0]
        remote_experts += len(remote)
        remote_gpus += len(set(remote))
    per_copy = 2 * shape.hidden_size * 2
    assert abs(remote_experts / trials * per_copy / F.ep_all_to_all_bytes(a47b, n) - 1) < 0.03
    assert abs(remote_gpus / trials * per_copy / F.ep_all_to_all_bytes(a47b, n, dedup=True) - 1) < 0.03
    print(f"N={n}: simulated {remote_gpus / trials:.2f} remote GPUs per token, "
          f"formula {F.ep_all_to_all_bytes(a47b, n, dedup=True) / per_copy:.2f}")

# %% [markdown]
# ### Intra-node versus inter-node expert parallelism
#
# Inside a node of 8 GPUs the all-to-all runs over NVLink (NVIDIA's direct GPU-to-GPU links inside one
# machine); beyond 8, part of it goes through the network
# card, 4x slower than an H800's NVLink and 9x slower than an H100's (one direction per GPU: NVLink 200
# GB/s on the H800, 450 GB/s on the H100, one 400 Gb/s InfiniBand NIC = 50 GB/s). The report keeps expert
# parallelism **inside a node** and spreads the model over nodes with pipeline parallelism instead, whose
# traffic is one activation per micro-batch per stage boundary, not per layer. The plot is a lower bound
# (bandwidth only, no latency, no overlap with compute) for 4096 tokens per GPU in one MoE layer.

# %%
fig, ax = plt.subplots(figsize=(10, 4.2))
for hw, marker in (("H800-80GB", "o"), ("H100-80GB", "s")):
    ms = [F.ep_all_to_all_seconds(a47b, n, 4096, accelerator=hw) * 1e3 for n in DEGREES]
    ax.plot(DEGREES, ms, marker + "-", label=F.ACCELERATORS[hw].name)
ax.axvspan(1, 8, color="C2", alpha=0.08)
ax.text(1.3, ax.get_ylim()[1] * 0.85, "inside one node (NVLink)", fontsize=9)
ax.set_xscale("log", base=2)
ax.set_xticks(DEGREES, DEGREES)
ax.set_xlabel("expert-parallel degree N (8 GPUs per node)")
ax.set_ylabel("ms per MoE layer (4096 tokens/GPU)")
ax.set_title("All-to-all time of one MoE layer, 300B-A47B, bf16 dispatch")
ax.legend()
plt.show()

t8 = F.ep_all_to_all_seconds(a47b, 8, 4096)
t16 = F.ep_all_to_all_seconds(a47b, 16, 4096)
assert t16 > 2 * t8
print(f"H800, N=8: {t8 * 1e3:.1f} ms per layer; N=16: {t16 * 1e3:.1f} ms ({t16 / t8:.1f}x) for "
      f"{F.ep_all_to_all_bytes(a47b, 16) / F.ep_all_to_all_bytes(a47b, 8):.2f}x the bytes")

# %% [markdown]
# ## Exercises · core, 36 min
#
# Each exercise is a stub, followed by a check from `ernie_lab.exercises`: "not attempted yet" and a hint
# until you write something, a message saying what differs when it is wrong, "correct" when it is right.
# Work by hand, from the formulas above, not by calling the function that is being checked. The solutions
# are in `solutions/`.
#
# **Exercise 1 · Twice the experts.** A hypothetical ERNIE keeps the 300B-A47B backbone but doubles the
# routed experts to 128 per MoE layer (still top-8, width 3584). How many parameters does it store? Count
# the extra experts and the extra router rows (weight + correction bias) yourself.

# %%
more_experts = None   # your answer: a number

exercises.check("09.more_experts", more_experts)

# %% [markdown]
# **Exercise 2 · Conversations that fit.** The 300B-A47B is served in int4 (group-128 scales) on 4 H100s
# (80 GiB each, 10% kept free). How many 32K-token conversations fit into the KV cache memory that is left?

# %%
conversations = None   # your answer: a number

exercises.check("09.conversations", conversations)

# %% [markdown]
# **Exercise 3 · De-duplicated all-to-all.** For the 21B-A3B (64 experts, top-6, hidden 2560), sending one
# copy per destination GPU instead of one per expert saves a lot at small expert-parallel degrees and
# nothing at N = 64 (one expert per GPU). What is the largest power-of-two degree N at which it still saves
# more than 30% of the all-to-all bytes? Reason with `(N - 1)(1 - C(E - E/N, k) / C(E, k))` versus
# `k (N - 1) / N`.

# %%
dedup_degree = None   # your answer: a number

exercises.check("09.dedup_degree", dedup_degree)

# %% [markdown]
# **Exercise 4 · int8 by hand, and the layer that hurts most (an experiment, optional).** Section 3 counted
# the bytes of int8 weights; here is what int8 does to them. Write symmetric round-to-nearest int8
# quantization with one scale per output row: `scale = max|w| / 127`, `q = round(w / scale)`, and return
# the weight as the int8 model sees it, `q * scale`.

# %%
def int8_rtn(weight):
    ...   # your code here


exercises.check("09.int8_rtn", int8_rtn)

# %% [markdown]
# Then quantize **one layer at a time** and see which one hurts most: write
# `layer_damage(model, ids, quantize)`, which, for each `nn.Linear` of the model
# (`ernie_lab.modules.linear_names(model)`), swaps in `quantize(weight)`, measures the largest change of
# the logits, puts the original weight back, and returns `{name: change}`. The check plants one outlier
# weight in a small model (it should stand out); the cell below runs your function on a small random
# ERNIE and draws the damage per layer. Which kind of layer suffers most, and why?

# %%
def layer_damage(model, ids, quantize):
    ...   # your code here


exercises.check("09.layer_damage", layer_damage)

# %%
from ernie_lab.model.linears import linear_names

if exercises.check("09.int8_rtn", int8_rtn) and exercises.check("09.layer_damage", layer_damage):
    torch.manual_seed(0)
    probe = ernie_lab.ErnieForCausalLM(parse_config(dict(small, num_hidden_layers=2))).eval()
    damage = layer_damage(probe, torch.randint(0, 512, (2, 24)), int8_rtn)
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.bar(range(len(damage)), list(damage.values()))
    ax.set_xticks(range(len(damage)), list(damage), rotation=60, ha="right", fontsize=11)
    ax.set_ylabel("largest logit change", fontsize=12)
    ax.set_title("int8 round-to-nearest, one layer at a time (random weights)", fontsize=13)
    plt.tight_layout()
    plt.show()
    print("hurts most:", max(damage, key=damage.get))

# %% [markdown]
# ## Key takeaways
#
# * `ernie_lab.family.count_params` reproduces the `transformers` parameter counts of all five shapes
#   exactly (tested on the meta device), split into embeddings, attention, dense MLP, routed / vision /
#   shared experts, ViT and adapter, with the active count per text or image token.
# * Names round: 0.36 B is "0.3B", 299.5 B is "300B", 3.35 B active is "A3B"; the VL-28B's name counts its
#   decoder and leaves out the 0.77 B ViT + adapter. The VL-424B table is a reconstruction.
# * GQA keeps the 128K-token cache of the largest models at 27 GiB instead of 216 GiB.
# * **Expert parallelism** (experts spread over GPUs) sends every token's hidden state to its experts and
#   back, in every MoE layer; **tensor parallelism** splits each matrix over GPUs; **pipeline
#   parallelism** gives each GPU a range of layers. ERNIE 4.5 keeps expert parallelism on **NVLink** (the
#   fast GPU-to-GPU links inside one node).
#
# **What comes next:** the course ends here. Notebooks **07** (quantization) and **08** (LoRA fine-tuning,
# [Hu et al. 2021](https://arxiv.org/abs/2106.09685)) make these models fit and adapt on smaller machines;
# notebook 08 also runs the first steps of post-training on the tiny model (SFT: supervised fine-tuning on
# answers; DPO: learning from preferred vs rejected answers, [Rafailov et al. 2023](https://arxiv.org/abs/2305.18290)).
# The full recipe of the released models (their SFT data, preference optimisation and reinforcement learning
# at scale) is described in the [technical report](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf).
#
# ## Further reading
#
# * Baidu ERNIE Team, *ERNIE 4.5 Technical Report* (2025),
#   [PDF](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf): the shapes, the parallel
#   layout of training (expert parallelism inside a node) and the quantized deployment this notebook sizes.
# * Kaplan et al., *Scaling Laws for Neural Language Models* (2020), [arXiv:2001.08361](https://arxiv.org/abs/2001.08361):
#   the 6 N FLOPs per training token used here; for an MoE, N is the active count, not the total.
# * Lepikhin et al., *GShard* (2020), [arXiv:2006.16668](https://arxiv.org/abs/2006.16668): experts spread
#   over devices with an all-to-all exchange; section 6 counts what that exchange sends, and how much sending
#   one copy per remote GPU (instead of one per expert) saves.
# * Shoeybi et al., *Megatron-LM* (2019), [arXiv:1909.08053](https://arxiv.org/abs/1909.08053): tensor
#   parallelism, splitting each matrix over GPUs; ERNIE combines it with expert and pipeline parallelism.
# * Dettmers et al., *LLM.int8()* (2022), [arXiv:2208.07339](https://arxiv.org/abs/2208.07339): why a few
#   outlier weights and activations dominate quantization error, as the layer-damage exercise shows.

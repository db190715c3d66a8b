# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 00 · A tour of ERNIE 4.5 and of this kit
#
# ERNIE 4.5 is Baidu's open model family (Apache-2.0, released 30 June 2025): one small dense
# language model, two text mixture-of-experts (MoE) models and two vision-language MoE models.
# This kit, **ernie-lab**, rebuilds them from scratch in plain PyTorch so you can read, run and
# change every line.
#
# In this notebook:
#
# 1. the family: ten checkpoints, five sizes, and what *total* vs *active* parameters means;
# 2. the architecture in one picture;
# 3. how the notebooks are ordered;
# 4. where real weights come from;
# 5. a tiny ERNIE model saved, loaded and run, live.
#
# Set `ERNIE_LAB_FAST=1` in the environment to shrink work (tests do); every check still runs.

# %%
# %matplotlib inline
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import ernie_lab
from ernie_lab import notebook

FAST = notebook.setup()  # seed 0; fast mode from ERNIE_LAB_FAST; prints where ernie_lab comes from

# %% [markdown]
# ## 1 · The family
#
# Every size comes in two flavours: **Base** (pre-trained only) and the post-trained model
# (instruction following, chat). Each of these ten checkpoints is published twice: `-PT` holds
# PyTorch-layout weights for `transformers`, `-Paddle` the same weights in PaddlePaddle's layout
# (linear weights stored transposed). ernie-lab reads both.
#
# | model | kind | total params | active per token | layers | hidden | query / KV heads | experts (routed, top-k, shared) |
# |---|---|---|---|---|---|---|---|
# | ERNIE-4.5-0.3B | dense text | 0.36 B | 0.36 B | 18 | 1024 | 16 / 2 | none |
# | ERNIE-4.5-21B-A3B | text MoE | 21.8 B | ~3 B | 28 | 2560 | 20 / 4 | 64, top-6, 2 shared |
# | ERNIE-4.5-300B-A47B | text MoE | 300 B | 47 B | 54 | 8192 | 64 / 8 | 64, top-8, 0 shared |
# | ERNIE-4.5-VL-28B-A3B | vision-language MoE | 28 B | ~3 B | 28 | 2560 | 20 / 4 | 64 text + 64 vision, top-6, 2 shared |
# | ERNIE-4.5-VL-424B-A47B | vision-language MoE | 424 B | 47 B | 54 | 8192 | 64 / 8 | 64 text + 64 vision, top-8 |
#
# All of them read a context of **128K tokens** (131,072 positions).
#
# The name says the size: `21B-A3B` is 21 billion parameters in total of which about 3 billion
# are *active* for any one token. In a mixture-of-experts layer a small router picks 6 of 64
# expert MLPs per token, so most expert weights sit idle for that token. Memory has to hold all
# 21 B; compute (and, when decoding, memory traffic) scales with the ~3 B that are used.

# %%
SIZES = ["0.3B", "21B-A3B", "300B-A47B", "VL-28B-A3B", "VL-424B-A47B"]


def hub_ids(size: str) -> list[str]:
    """The four Hub repositories of one size: Base / post-trained, each as -PT and -Paddle."""
    return [f"baidu/ERNIE-4.5-{size}{base}-{layout}" for base in ("-Base", "") for layout in ("PT", "Paddle")]


checkpoints = {f"ERNIE-4.5-{size}{base}" for size in SIZES for base in ("-Base", "")}
repositories = [repo for size in SIZES for repo in hub_ids(size)]
for repo in hub_ids("0.3B"):
    print(repo)
print(f"... {len(checkpoints)} checkpoints, {len(repositories)} repositories in all")

# %%
assert len(checkpoints) == 10, checkpoints
assert len(set(repositories)) == 20
assert "baidu/ERNIE-4.5-0.3B-PT" in repositories and "baidu/ERNIE-4.5-VL-424B-A47B-Base-Paddle" in repositories

# %% [markdown]
# ### Counting parameters by hand
#
# A parameter count is a sum of matrix sizes, and writing it out shows where a model keeps its
# weights. For a decoder with vocabulary $V$, width $h$, $L$ layers, $H$ query heads and $H_{kv}$
# key/value heads of width $d$, and an MLP of width $I$:
#
# $$
# N = \underbrace{V h}_{\text{embedding (= LM head, tied)}}
#   + L\,\big(\underbrace{2 h H d + 2 h H_{kv} d}_{\text{attention } q,o,k,v}
#   + \underbrace{3 h I}_{\text{SwiGLU}} + \underbrace{2h}_{\text{two RMSNorms}}\big) + \underbrace{h}_{\text{final norm}}
# $$
#
# In an MoE layer the single MLP is replaced by $E$ experts of width $I_e$, a shared MLP of
# width $S \cdot I_e$ and a router ($E h$ weights plus $E$ correction biases). A token uses only
# $k$ of the $E$ experts, which gives the *active* count. Below, the formula is checked against
# the parameter count of `transformers`' reference classes built on the `meta` device (shapes
# only, no memory).

# %%
from ernie_lab.config import ERNIE_0_3B, ERNIE_21B_A3B


def attention_params(c) -> int:
    return 2 * c.hidden_size * c.num_attention_heads * c.head_dim + 2 * c.hidden_size * c.num_key_value_heads * c.head_dim


def swiglu_params(hidden: int, width: int) -> int:
    return 3 * hidden * width


def moe_params(c, experts_used: int) -> int:
    """One MoE block: `experts_used` routed experts, the shared experts, the router and its bias."""
    routed = experts_used * swiglu_params(c.hidden_size, c.moe_intermediate_size)
    shared = swiglu_params(c.hidden_size, c.moe_num_shared_experts * c.moe_intermediate_size)
    router = c.moe_num_experts * c.hidden_size + c.moe_num_experts
    return routed + shared + router


def count_parameters(c, active: bool = False) -> int:
    """Total (or active-per-token) parameters of an ERNIE 4.5 text decoder with tied embeddings."""
    total = c.vocab_size * c.hidden_size + c.hidden_size  # embedding (shared with the LM head) + final norm
    for layer in range(c.num_hidden_layers):
        total += attention_params(c) + 2 * c.hidden_size
        if c.is_moe_layer(layer):
            total += moe_params(c, c.moe_k if active else c.moe_num_experts)
        else:
            total += swiglu_params(c.hidden_size, c.intermediate_size)
    return total


for name, c in [("0.3B", ERNIE_0_3B), ("21B-A3B", ERNIE_21B_A3B)]:
    print(f"{name:8s} total {count_parameters(c):>15,}   active {count_parameters(c, active=True):>15,}")

# %%
from transformers import Ernie4_5Config, Ernie4_5ForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

with torch.device("meta"):  # shapes without memory: a 21.8-billion-parameter model costs nothing here
    reference_counts = {
        "0.3B": sum(p.numel() for p in Ernie4_5ForCausalLM(Ernie4_5Config()).parameters()),
        "21B-A3B": sum(p.numel() for p in Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig()).parameters()),
    }
print(reference_counts)
assert count_parameters(ERNIE_0_3B) == reference_counts["0.3B"] == 360_748_032
assert count_parameters(ERNIE_21B_A3B) == reference_counts["21B-A3B"] == 21_825_437_888
assert 3.0e9 < count_parameters(ERNIE_21B_A3B, active=True) < 3.5e9  # the "A3B" in the name

# %% [markdown]
# The picture below puts the five sizes side by side (published totals; note the logarithmic
# axis). For the two MoE text models the active share is 15% or less; the dense 0.3B uses every
# weight for every token.

# %%
# Published totals and active counts in billions (the 21B-A3B active count is the formula's).
family = {
    "0.3B": (0.36, 0.36),
    "21B-A3B": (21.8, count_parameters(ERNIE_21B_A3B, active=True) / 1e9),
    "300B-A47B": (300, 47),
    "VL-28B-A3B": (28, 3),
    "VL-424B-A47B": (424, 47),
}
names = list(family)
x = torch.arange(len(names)).float()
fig, ax = plt.subplots(figsize=(9, 4.2))
ax.bar(x - 0.2, [t for t, _ in family.values()], width=0.4, label="total", color="#4c72b0")
ax.bar(x + 0.2, [a for _, a in family.values()], width=0.4, label="active per token", color="#dd8452")
for i, (total, active) in enumerate(family.values()):
    ax.text(i - 0.2, total * 1.1, f"{total:g}", ha="center", fontsize=9)
    ax.text(i + 0.2, active * 1.1, f"{active:.2g}", ha="center", fontsize=9)
ax.set_yscale("log")
ax.set_ylim(0.1, 2000)
ax.set_xticks(x.tolist(), names)
ax.set_ylabel("parameters (billions, log scale)")
ax.set_xlabel("ERNIE 4.5 model")
ax.set_title("ERNIE 4.5: total vs active parameters per token")
ax.legend()
plt.tight_layout()
plt.show()
assert all(active <= total for total, active in family.values())


# %% [markdown]
# ### What a 128K context costs
#
# Attention needs the keys and values of every earlier token. The KV cache holds, per token,
# $2 \times L \times H_{kv} \times d$ numbers. Grouped-query attention (few KV heads) is what
# keeps that affordable at 131,072 tokens:

# %%
def kv_bytes_per_token(c, bytes_per_number: int = 2) -> int:  # bf16: 2 bytes
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * bytes_per_number


for name, c in [("0.3B", ERNIE_0_3B), ("21B-A3B", ERNIE_21B_A3B)]:
    per_token = kv_bytes_per_token(c)
    full = per_token * c.max_position_embeddings
    print(f"{name:8s} {per_token:>7,} bytes/token -> {full / 2**30:5.2f} GiB for {c.max_position_embeddings:,} tokens (bf16)")
assert ERNIE_0_3B.max_position_embeddings == 128 * 1024
assert kv_bytes_per_token(ERNIE_0_3B) == 18_432  # 2 (k, v) x 18 layers x 2 heads x 128 dims x 2 bytes


# %% [markdown]
# ## 2 · The architecture in one picture
#
# All five sizes share one decoder: token embedding, a stack of identical layers, a final norm and
# an output head tied to the embedding. Each layer is *pre-norm*: normalise, transform, add back
# to the residual stream. Dense layers use one SwiGLU MLP; MoE layers swap it for a router and
# experts; the VL models add a vision encoder whose patch features enter as extra tokens.

# %%
def draw_box(ax, y, text, color, width=0.7):
    ax.add_patch(plt.Rectangle((0.5 - width / 2, y - 0.3), width, 0.6, color=color, ec="black"))
    ax.text(0.5, y, text, ha="center", va="center", fontsize=10)


fig, ax = plt.subplots(figsize=(6.5, 7))
rows = [
    ("token ids  (B, T)", "#ffffff"),
    ("embedding  E[ids]  (B, T, hidden)", "#c6dbef"),
    ("RMSNorm", "#fdd0a2"),
    ("GQA attention + interleaved RoPE  (+ KV cache)", "#9ecae1"),
    ("add to residual", "#eeeeee"),
    ("RMSNorm", "#fdd0a2"),
    ("SwiGLU MLP  |  MoE: router + experts", "#a1d99b"),
    ("add to residual", "#eeeeee"),
    ("final RMSNorm", "#fdd0a2"),
    ("LM head = E^T (tied)  ->  logits (B, T, vocab)", "#c6dbef"),
]
ys = list(range(len(rows)))[::-1]
for (text, color), y in zip(rows, ys):
    draw_box(ax, y, text, color)
for y in ys[:-1]:
    ax.annotate("", xy=(0.5, y - 0.7), xytext=(0.5, y - 0.3), arrowprops=dict(arrowstyle="->"))
for src, dst in [(ys[1] - 0.5, ys[4]), (ys[4] - 0.5, ys[7])]:  # the residual stream skips each block
    ax.plot([0.5, 0.11, 0.11], [src, src, dst], color="#555555", lw=1.2)
    ax.annotate("", xy=(0.15, dst), xytext=(0.11, dst), arrowprops=dict(arrowstyle="->", color="#555555"))
    ax.text(0.1, (src + dst) / 2, "residual", rotation=90, ha="right", va="center", fontsize=8, color="#555555")
ax.add_patch(plt.Rectangle((0.04, ys[7] - 0.45), 0.88, ys[2] - ys[7] + 0.9, fill=False, ls="--", ec="gray"))
ax.text(0.93, (ys[2] + ys[7]) / 2, "x L layers\n(18 for 0.3B)", va="center", fontsize=9, color="gray")
ax.set_xlim(0, 1.15)
ax.set_ylim(-0.6, len(rows) - 0.4)
ax.axis("off")
ax.set_title("The ERNIE 4.5 text decoder (one layer drawn)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3 · How to use this kit
#
# Each notebook builds one idea by hand, compares it with `transformers`' reference on the same
# weights, shows that it equals the matching piece of the `ernie_lab` package, and from then on
# uses the package. Read them in order:
#
# | notebook | what you build |
# |---|---|
# | 00 tour | this page |
# | 01 dense decoder from scratch | RMSNorm, interleaved RoPE, GQA attention, SwiGLU, the 0.3B, KV cache, generation |
# | 02 mixture of experts | router, top-k with correction bias, shared experts: the 21B-A3B |
# | 03 vision encoder & 3-D RoPE | the ViT, patch merging, positions in time, height and width |
# | 04 multimodal MoE | modality-isolated routing: text experts and vision experts |
# | 09 family & scale | the large shapes, memory and speed arithmetic for the whole family |
#
# The package itself is small: one module per idea (`norm.py`, `rope.py`, `attention.py`,
# `mlp.py`, `kv_cache.py`, `model.py`, `loading.py`, `generation.py`). The public entry points:
#
# ```python
# model = ernie_lab.load_model(source, dtype=None, device="cpu")      # Hub id or folder
# out   = ernie_lab.generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, top_k=None)
# tok   = ernie_lab.load_tokenizer(source)                              # encode / decode / chat template
# ```

# %%
notebook_dir = notebook.repo_path("notebooks")  # the sources; each .ipynb is made from its .py
present = sorted(p.name for p in notebook_dir.glob("[0-9][0-9]_*.py"))
print("notebooks in this checkout:", *present, sep="\n  ")
assert "00_tour.py" in present

# %% [markdown]
# ## 4 · Where real weights come from
#
# This kit never ships weights. `ernie_lab.load_model` takes either
#
# * a **Hub id** such as `"baidu/ERNIE-4.5-0.3B-PT"`: the files are looked up in the Hugging Face
#   cache (`$HF_HOME`, by default `~/.cache/huggingface`) and downloaded into it if the Hub can be
#   reached (`HF_ENDPOINT` points the download at a mirror, `HF_HUB_OFFLINE=1` forbids it); or
# * a **local folder** with `config.json` and `model.safetensors` (or shards plus
#   `model.safetensors.index.json`), e.g. made on a connected machine with
#
# ```bash
# hf download baidu/ERNIE-4.5-0.3B-PT --local-dir ~/models/ERNIE-4.5-0.3B-PT
# ```
#
# and copied over. `-Paddle` checkpoints load the same way (the loader transposes their linear
# weights). Below: if the 0.3B is already in this machine's cache it is loaded and used; if not,
# you see the message `load_model` gives instead of a stack trace. Set `DOWNLOAD = True` to let it
# fetch about 0.7 GB.

# %%
from huggingface_hub import try_to_load_from_cache

HUB_ID = "baidu/ERNIE-4.5-0.3B-PT"
DOWNLOAD = False  # set to True on a connected machine to fetch the real weights into HF_HOME

in_cache = isinstance(try_to_load_from_cache(HUB_ID, "config.json"), str)
real_model = None
if in_cache or DOWNLOAD:
    real_model = ernie_lab.load_model(HUB_ID)
    print(f"loaded {HUB_ID}: {real_model.num_parameters():,} parameters")
elif os.environ.get("HF_HUB_OFFLINE") == "1":  # safe to ask: offline mode never downloads
    try:
        ernie_lab.load_model(HUB_ID)
    except ernie_lab.CheckpointError as err:
        print("load_model says:\n", err)
        assert "HF_ENDPOINT" in str(err) and HUB_ID in str(err)
else:
    print(f"{HUB_ID} is not in the cache at {os.environ.get('HF_HOME', '~/.cache/huggingface')}; "
          "set DOWNLOAD = True to fetch it, or pass a local folder to load_model.")

# %% [markdown]
# ## 5 · A tiny ERNIE, live
#
# No weights? Make some. `transformers` has the reference ERNIE 4.5 classes; we build one with a
# tiny random config, save it in exactly the layout of a Hub checkpoint (`save_pretrained`),
# load that folder with `ernie_lab.load_model`, and generate. The tokens are noise (the weights
# are random), but every step is the real code path, and ernie-lab's greedy continuation must
# equal the reference's token for token.

# %%
import tempfile

tiny_config = Ernie4_5Config(
    vocab_size=1000, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    initializer_range=0.2,  # larger than the default 0.02, whose random model just repeats its last token
)
reference = Ernie4_5ForCausalLM(tiny_config).eval()
folder = Path(tempfile.mkdtemp(prefix="tiny-ernie-"))
reference.save_pretrained(folder)
print("checkpoint folder:", folder)
for file in sorted(folder.iterdir()):
    print(f"  {file.name:24s} {file.stat().st_size:>9,} bytes")

# %%
model = ernie_lab.load_model(folder)
print(type(model).__name__, f"{model.num_parameters():,} parameters")

prompt = torch.tensor([[1, 17, 42, 256, 7]])  # any ids below vocab_size
ours = ernie_lab.generate(model, prompt, max_new_tokens=8, eos_token_id=[])
with torch.no_grad():
    theirs = reference.generate(prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)
print("ernie-lab   :", ours[0].tolist())
print("transformers:", theirs[0].tolist())
assert torch.equal(ours, theirs)
assert len(set(ours[0, 5:].tolist())) > 1  # a varied continuation, so the match means something

# %% [markdown]
# The same call works on the real 0.3B: only the folder changes. Notebook **01** opens the model
# up and builds every piece of it by hand.

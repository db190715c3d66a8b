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
# # 00 · A tour of ERNIE 4.5 and of this kit
#
# **What you will learn:** what the ERNIE 4.5 family is (ten checkpoints, five sizes), what *total* and
# *active* parameters mean, what a long context costs, how the course is ordered, and how to run a tiny
# ERNIE yourself. **Time:** 25 min (core 23 min). **Memory:** under 1 GB.
#
# ERNIE 4.5 is Baidu's open model family (Apache-2.0, released 30 June 2025; the
# [technical report](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf)): one small dense
# language model, two text mixture-of-experts (MoE) models and two vision-language MoE models. This kit,
# **ernie-lab**, rebuilds them from scratch in plain PyTorch so you can read, run and change every line.
#
# | section | what | time | tag |
# |---|---|---|---|
# | | a first look: a tiny trained ERNIE answers about a picture | 3 min | core |
# | 1 | the family, counting parameters, the cost of a 128K context | 8 min | core |
# | 2 | the architecture in one picture | 4 min | core |
# | 3 | the course: the notebooks and the two lab tracks | 3 min | core |
# | 4 | where real weights come from | 3 min | optional |
# | 5 | a tiny ERNIE saved, loaded and run, live | 5 min | core |
# | | exercise | 5 min | core |
#
# **Fast mode** (smaller models, fewer steps; every check still runs) is the switch in the next cell:
# it reads `ERNIE_LAB_FAST` (`make lab FAST=1` sets it; the tests do too); set `FAST = True` there to force it.

# %%
# %matplotlib inline
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import ernie_lab
from ernie_lab import notebook

FAST = notebook.setup()  # fast mode: from ERNIE_LAB_FAST (make lab FAST=1); write FAST = True to force it
from ernie_lab import exercises
from ernie_lab import family as F

# %% [markdown]
# ## A first look · core, 3 min
#
# The kit ships a tiny vision-language ERNIE, trained on pictures of shapes (`data/tiny-ernie-vl/`). Load
# it, show it a picture, ask, and see which experts each token went to (text tokens to text experts,
# picture tokens to vision experts):

# %%
from ernie_lab import routing, scenes

TINY_VL = notebook.repo_path("data", "tiny-ernie-vl")
vl_model, vl_tokenizer = ernie_lab.load_model(TINY_VL), ernie_lab.load_tokenizer(TINY_VL)
scene = scenes.random_scene(2026)
question = scenes.conversation(scenes.render(scene), "What is in the picture?", "")[:1]
with routing.record(vl_model) as first_look:
    print("Q: What is in the picture?\nA:", ernie_lab.chat(vl_model, vl_tokenizer, question, max_new_tokens=24))
notebook.draw_layer_routing(first_look.layers[-1], vl_model.config.get_text_config().moe_num_experts,
                            "the last MoE layer: which experts each token chose")

# %% [markdown]
# ## 1 · The family · core, 12 min
#
# Every size comes in two flavours: **Base** (pre-trained only) and the post-trained model
# (instruction following, chat). Each of these ten checkpoints is published twice: `-PT` holds
# PyTorch-layout weights for `transformers`, `-Paddle` the same weights in PaddlePaddle's layout
# (linear weights stored transposed). ernie-lab reads both.
#
# | model | kind | total params | active per token | layers | hidden | query / KV heads | experts (routed, top-k, shared) |
# |---|---|---|---|---|---|---|---|
# | ERNIE-4.5-0.3B | dense text | 0.36 B | 0.36 B | 18 | 1024 | 16 / 2 | none |
# | ERNIE-4.5-21B-A3B | text MoE | 21.83 B | 3.35 B | 28 | 2560 | 20 / 4 | 64, top-6, 2 shared |
# | ERNIE-4.5-300B-A47B | text MoE | 299.48 B | 47.08 B | 54 | 8192 | 64 / 8 | 64, top-8, 0 shared |
# | ERNIE-4.5-VL-28B-A3B | vision-language MoE | 29.40 B | 3.35 B | 28 | 2560 | 20 / 4 | 64 text + 64 vision, top-6, 2 shared |
# | ERNIE-4.5-VL-424B-A47B | vision-language MoE | 423.53 B\* | 47.08 B | 54 | 8192 | 64 / 8 | 64 text + 64 vision, top-8 |
#
# All of them read a context of **128K tokens** (131,072 positions).
#
# \* VL-424B's configuration is not published with its weights in a form this kit could read offline; its
# vision-expert width is *reconstructed* so that the count lands on the advertised 424 B (notebooks 04 and 09
# show how). Treat its 423.53 B as a consistent estimate, not a published figure; the other rows are counted
# from the published configurations.
#
# (All counts from `ernie_lab.family`, printed below; notebook 09 explains why the names round as they do.)
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
# The naming rule, checked against the package's table of published checkpoints (ernie_lab.checkpoints)
published = {c.hub_id for c in F.CHECKPOINTS.values()} | {c.paddle_hub_id for c in F.CHECKPOINTS.values()}
assert set(repositories) == published, sorted(set(repositories) ^ published)
assert checkpoints == set(F.CHECKPOINTS), sorted(checkpoints ^ set(F.CHECKPOINTS))

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
from ernie_lab.model.config import ERNIE_0_3B, ERNIE_21B_A3B


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
# The picture below puts the five sizes side by side (note the logarithmic axis), with the counts of
# `ernie_lab.family`, the one source of every headline number in this course. For the two MoE text models
# the active share is 16% or less; the dense 0.3B uses every weight for every token.
#
# ![The ERNIE 4.5 family: total and active parameters](../figures/ernie45_family.png)

# %%
for name, c in F.CHECKPOINTS.items():
    if c.post_trained:
        counts = F.count_params(c)
        print(f"{name:24s} total {counts.total / 1e9:7.2f} B   active per token {counts.active / 1e9:6.2f} B")
# the formula above, applied to the 21B-A3B, agrees with the package's count
assert count_parameters(ERNIE_21B_A3B, active=True) == F.count_params(F.CONFIG_21B_A3B).active


# %% [markdown]
# ### What a 128K context costs
#
# Attention needs the keys and values of every earlier token. The **KV cache** keeps them, so that each
# new token is computed once (notebook 01 builds it):
#
# ![The KV cache](../figures/kv_cache.png)
#
# Per token it holds $2 \times L \times H_{kv} \times d$ numbers. Grouped-query attention
# ([GQA, Ainslie et al. 2023](https://arxiv.org/abs/2305.13245): many query heads share few key/value
# heads) is what keeps that affordable at 131,072 tokens:

# %%
def kv_bytes_per_token(c, bytes_per_number: int = 2) -> int:  # bf16: 2 bytes
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * bytes_per_number


for name, c in [("0.3B", ERNIE_0_3B), ("21B-A3B", ERNIE_21B_A3B)]:
    per_token = kv_bytes_per_token(c)
    full = per_token * c.max_position_embeddings
    print(f"{name:8s} {per_token:>7,} bytes/token -> {full / 2**30:5.2f} GiB for {c.max_position_embeddings:,} tokens (bf16)")

# Checked against the real cache: allocate one for 100 tokens (on the meta device: shapes, no memory)
probe = ernie_lab.KVCache(ERNIE_0_3B.num_hidden_layers, 1, ERNIE_0_3B.num_key_value_heads, ERNIE_0_3B.head_dim,
                          max_len=100, dtype=torch.bfloat16, device="meta")
measured = sum(t.numel() * t.element_size() for t in probe.keys + probe.values) / 100
assert kv_bytes_per_token(ERNIE_0_3B) == measured, (kv_bytes_per_token(ERNIE_0_3B), measured)

# %% [markdown]
# **Exercise · core, 5 min.** How long must a conversation be before the 0.3B's bf16 KV cache is as large
# as the model's own bf16 weights (360,748,032 parameters)? Replace `None` with your number and run the
# cell: the check says "not attempted yet" with a hint until you do, explains what differs when the
# answer is wrong, and says "correct" when it is right. (Solutions of every exercise: `solutions/`.)

# %%
tokens_where_cache_equals_weights = None   # your answer: a number of tokens

exercises.check("00.kv_crossover", tokens_where_cache_equals_weights)


# %% [markdown]
# ## 2 · The architecture in one picture · core, 1 min
#
# All five sizes share one decoder: token embedding, a stack of identical layers, a final norm and
# an output head tied to the embedding. Each layer is *pre-norm*: normalise, transform, add back
# to the residual stream. Dense layers use one SwiGLU MLP; MoE layers swap it for a router and
# experts; the VL models add a vision encoder whose patch features enter as extra tokens.
#
# ![One ERNIE 4.5 decoder layer](../figures/decoder_layer.png)
#
# The **residual stream** is the vector each token carries from layer to layer; every block reads a
# normalised copy and adds its result back. The last layer's stream, multiplied by the output head, gives
# the **logits**: one score per vocabulary entry, which a softmax turns into next-token probabilities.
# An MoE layer replaces the MLP like this (notebook 02):
#
# ![The MoE layer](../figures/moe_layer.png)

# %% [markdown]
# ## 3 · How to use this kit · core, 3 min
#
# Each notebook builds one idea by hand, compares it with `transformers`' reference on the same
# weights, shows that it equals the matching piece of the `ernie_lab` package, and from then on
# uses the package. The course map (blue: dense track, orange: MoE / vision-language track, grey: both):
#
# ![The course map](../figures/course_map.png)
#
# The table below and the lab plans come from one place, `ernie_lab.course.notebook.COURSE` and
# `LAB_PLANS` (README.md shows the same): each notebook's minutes are the sum of its sections' tags, and
# each tag covers reading the section (at about 150 words a minute), running its cells on a 2-core laptop
# and writing its exercises. Sections tagged *optional* are for after the lab.
#
# The package is small and has a room per audience: `ernie_lab/model/` (the networks, one module per
# idea: `norm.py`, `rope.py`, `attention.py`, `mlp.py`, `moe.py`, `kv_cache.py`, `decoder.py`, ...),
# `quant/`, `io/` (loading, saving, tokenizer, chat), `train/`, `tiny/`, `analysis/` and `course/`.
# The public entry points:
#
# ```python
# model = ernie_lab.load_model(source, dtype=None, device="cpu")      # Hub id or folder
# out   = ernie_lab.generate(model, input_ids, max_new_tokens, temperature=0.0, top_p=1.0, top_k=None)
# tok   = ernie_lab.load_tokenizer(source)                              # encode / decode / chat template
# ```

# %%
from IPython.display import Markdown

display(Markdown(notebook.course_table()))
display(Markdown("\n\n".join(notebook.lab_plan_text(track) for track in notebook.LAB_PLANS)))
print("Hours in all:", sum(lesson.minutes for lesson in notebook.COURSE) / 60,
      "| core only:", sum(lesson.core for lesson in notebook.COURSE) / 60)

# %%
notebook_dir = notebook.repo_path("notebooks")  # the sources; each .ipynb is made from its .py
present = sorted(p.name for p in notebook_dir.glob("[0-9][0-9]_*.py"))
print("notebooks in this checkout:", *present, sep="\n  ")
numbers = [number for number, *_ in notebook.COURSE]
assert numbers == [f"{i:02d}" for i in range(len(numbers))], "the course is numbered without gaps"
assert {name[:2] for name in present} <= set(numbers), "every notebook in the checkout is on the course map"

# %% [markdown]
# ## 4 · Where real weights come from · optional, 2 min
#
# Apart from its tiny trained models, this kit ships no weights. `ernie_lab.load_model` takes either
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
# ## 5 · A tiny ERNIE, live · core, 4 min
#
# No weights? Make some. `transformers` has the reference ERNIE 4.5 classes; we build one with a
# tiny random config, save it in exactly the layout of a Hub checkpoint (`save_pretrained`),
# load that folder with `ernie_lab.load_model`, and generate. The tokens are noise (the weights
# are random), but every step is the real code path, and ernie-lab's greedy continuation must
# equal the reference's token for token.

# %%
import shutil
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
shutil.rmtree(folder)  # loaded: the temporary checkpoint can go
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
# The same call works on the real 0.3B: only the folder changes.
#
# ## Key takeaways
#
# * One decoder serves the whole family: pre-norm layers of GQA attention with interleaved RoPE and a
#   SwiGLU MLP, which the MoE models replace by a router and experts in most layers.
# * *Total* parameters decide the memory, *active* ones the compute per token: 21.83 B vs 3.35 B for the
#   21B-A3B (all numbers from `ernie_lab.family`).
# * A long context costs memory in the KV cache; GQA's few key/value heads keep it small.
# * Every piece of ernie-lab is checked against `transformers` on the same weights.
#
# **What comes next:** notebook **01** opens the dense model up and builds every piece of it by hand.
#
# ## Further reading
#
# * Baidu ERNIE Team, *ERNIE 4.5 Technical Report* (2025),
#   [PDF](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf): the family, its
#   heterogeneous multimodal MoE and how it was trained and served; every notebook checks something against it.
# * Vaswani et al., *Attention Is All You Need* (2017), [arXiv:1706.03762](https://arxiv.org/abs/1706.03762):
#   the Transformer; ERNIE keeps its decoder half, with pre-normalisation, RoPE and GQA in place of the originals.
# * Fedus, Zoph and Shazeer, *Switch Transformers* (2021), [arXiv:2101.03961](https://arxiv.org/abs/2101.03961):
#   sparse experts that make total and active parameters differ; ERNIE routes each token to several
#   experts (top-6 or top-8) and adds shared experts and separate vision experts.
# * Ainslie et al., *GQA* (2023), [arXiv:2305.13245](https://arxiv.org/abs/2305.13245): fewer key/value heads
#   than query heads, the reason ERNIE's long-context cache stays small.

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
# # 02 · The mixture of experts
#
# **What you will learn:** how a router sends each token to a few experts, ERNIE's correction bias,
# shared experts, efficient dispatch, and how load balancing works (with a loss, and without one). You
# write the three pieces of the MoE layer yourself (the router, the dispatch, the whole block), each checked
# on fresh random inputs and then used by the rest of the notebook. **Time:** 115 min (core 108 min).
# **Memory:** under 2 GB.
#
# ![The MoE layer](../figures/moe_layer.png)
#
# The papers behind these ideas are listed, one sentence each, under *Further reading* at the end.
#
# In notebook 01 every layer of the decoder ended in one feed-forward network (FFN), a SwiGLU. ERNIE 4.5's
# large text models, **21B-A3B** and **300B-A47B**, replace it in most layers by a *mixture of experts*
# (MoE): many small SwiGLUs, the *experts*, and a *router* that sends every token to only a few of them.
#
# 1. why: parameters grow with the number of experts, compute only with the number *used*;
# 2. the router, with ERNIE's twists (float32 softmax over all experts, a correction bias that only
#    chooses, renormalised weights): **you write it**;
# 3. shared experts, which every token passes through;
# 4. dispatch, running each expert once on all of its tokens: **you write it**;
# 5. the whole MoE block (**you write it**) and the whole model, checked against `transformers`;
# 6. routing records;
# 7. load imbalance, the losses that fix it, and a small training run with and without them;
# 8. expert-load heatmaps, then exercises (the balancing loss, balancing by the bias alone).
#
# **How the exercises work.** A cell with a function whose body is `...   # your code here` is yours to
# write. The cell after it hands your function to `exercises.use(...)`, which checks it on fresh random
# inputs of several shapes (against `ernie_lab` and, where it can, `transformers`): if it is right, the
# rest of the notebook goes on with *your* version; while it is still `...`, it goes on with `ernie_lab`'s
# and says so (so "Run All" always works); if it is wrong, the cell stops and says what differs. The
# worked solutions, with the reasoning and the usual mistakes, are in `solutions/02_mixture_of_experts.py`.
#
# `ERNIE_LAB_FAST=1` shortens the training run; every check still runs.

# %%
# %matplotlib inline
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import ernie_lab
from ernie_lab import exercises, losses, notebook, routing
from ernie_lab.model.config import ERNIE_21B_A3B, ErnieConfig
from ernie_lab.model.mlp import SwiGLU
from ernie_lab.model.moe import MoEBlock, dispatch, moe_blocks, route
from ernie_lab.course.notebook import compare, draw_dispatch, load_heatmap, setup

FAST = setup()  # fast mode: from ERNIE_LAB_FAST (make lab FAST=1); write FAST = True here to force it
USE_REAL_WEIGHTS = False  # True: also use a real checkpoint a lecturer has cached (never downloads)

# %% [markdown]
# ## 1 · Why a mixture of experts: parameters versus compute · core, 9 min
#
# A dense SwiGLU of width $I$ on a residual stream of width $H$ holds $3HI$ parameters, and every token
# multiplies with all of them. An MoE layer holds $E$ experts of width $I_e$ but each token uses only
# $k$ of them:
#
# $$\text{parameters} \approx 3 H I_e E, \qquad \text{work per token} \approx 3 H I_e k .$$
#
# Parameters (what the model can *store*) grow with $E$; compute (what a token *costs*) grows with $k$.
# The names say both numbers: 21B-**A3B** has 21 B parameters of which about 3 B are *active* for a token.
# Below, both models are counted from their config numbers alone. The 21B-A3B numbers are the
# `transformers` default config (the published checkpoint's). The 300B-A47B numbers are those of its
# published `config.json`, read from public copies (the Hub is not reachable here): a FastDeploy test
# fixture and an Ascend MindIE fixture that write the same widths, and a public tensor listing of the
# checkpoint (github.com/Hchnr/test) that shows layers 0-2 dense, a (1, 64) correction bias and a separate
# `lm_head.weight`, i.e. untied embeddings.

# %%
ERNIE_300B_A47B_NUMBERS = dict(
    model_type="ernie4_5_moe", vocab_size=103424, hidden_size=8192, intermediate_size=28672,
    num_hidden_layers=54, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
    tie_word_embeddings=False,                       # a separate lm_head
    moe_num_experts=64, moe_k=8, moe_intermediate_size=3584, moe_num_shared_experts=0,
    moe_layer_start_index=3, moe_layer_interval=1)   # layers 0, 1, 2 dense, 3..53 MoE
configs = {"21B-A3B": ERNIE_21B_A3B, "300B-A47B": ErnieConfig(**ERNIE_300B_A47B_NUMBERS)}


def parameter_count(c):
    '''(total, active): parameters per component; active = those one token's computation uses.'''
    H, L = c.hidden_size, c.num_hidden_layers
    attention = 2 * H * c.num_attention_heads * c.head_dim + 2 * H * c.num_key_value_heads * c.head_dim  # q, o, k, v
    expert = 3 * H * c.moe_intermediate_size            # one SwiGLU expert: gate, up, down
    moe_layers = sum(c.is_moe_layer(i) for i in range(L))
    embedding = c.vocab_size * H
    total = {
        "embedding": embedding,
        "LM head": 0 if c.tie_word_embeddings else embedding,
        "attention": L * attention,
        "norms": 2 * L * H + H,
        "dense FFN": (L - moe_layers) * 3 * H * c.intermediate_size,
        "routed experts": moe_layers * c.moe_num_experts * expert,
        "shared experts": moe_layers * c.moe_num_shared_experts * expert,
        "routers": moe_layers * (c.moe_num_experts * H + c.moe_num_experts),  # weight + correction bias
    }
    active = dict(total)
    active["routed experts"] = moe_layers * c.moe_k * expert   # only k experts per MoE layer
    active["embedding"] = 0                                    # a lookup of one row, not a matmul ...
    if c.tie_word_embeddings:
        active["LM head"] = embedding                          # ... but a tied LM head multiplies with all of it
    return total, active


counts = {name: parameter_count(c) for name, c in configs.items()}
for name, (total, active) in counts.items():
    print(f"{name:10s} total {sum(total.values()):>17,}   active {sum(active.values()):>15,}")
    for part in total:
        print(f"    {part:15s} {total[part]:>17,} {active[part]:>17,}")

# %% [markdown]
# Two independent checks: the same configs built as `ernie_lab` models on PyTorch's *meta* device (shapes
# without memory, so a 300 B model costs nothing) must count exactly the same, and the totals must
# reproduce the published figures: 21,825,437,888 for 21B-A3B (what `transformers` counts for its
# default config), about 300 B and 47 B active for 300B-A47B, about 3 B active for 21B-A3B.

# %%
for name, c in configs.items():
    with torch.device("meta"):
        built = ernie_lab.ErnieForCausalLM(c)
    assert built.num_parameters() == sum(counts[name][0].values()), name
    del built
total_21, active_21 = (sum(d.values()) for d in counts["21B-A3B"])
total_300, active_300 = (sum(d.values()) for d in counts["300B-A47B"])
assert total_21 == 21_825_437_888
assert abs(active_21 - 3e9) < 0.4e9, active_21
assert abs(total_300 - 300e9) / 300e9 < 0.01, total_300
assert abs(active_300 - 47e9) / 47e9 < 0.01, active_300
print(f"21B-A3B: {total_21 / 1e9:.2f} B total, {active_21 / 1e9:.2f} B active ({active_21 / total_21:.1%})")
print(f"300B-A47B: {total_300 / 1e9:.2f} B total, {active_300 / 1e9:.2f} B active ({active_300 / total_300:.1%})")

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 3.4))
colors = plt.cm.tab10(np.arange(8))
for ax, (name, (total, active)) in zip(axes, counts.items()):
    for row, table in enumerate((active, total)):
        left = 0.0
        for j, (part, n) in enumerate(table.items()):
            ax.barh(row, n / 1e9, left=left, color=colors[j], label=part if row == 1 else None)
            left += n / 1e9
        ax.text(left, row, f"  {left:.1f} B", va="center")
    ax.set_yticks([0, 1], ["active", "total"])
    ax.set_xlabel("parameters (billions)")
    ax.set_title(f"ERNIE-4.5-{name}")
    ax.set_xlim(0, max(sum(total.values()) / 1e9 * 1.18, 1))
axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
fig.suptitle("Where the parameters are, and how few a token uses")
plt.tight_layout()
plt.show()

# %% [markdown]
# The routed experts hold 96 % of the 300B model, and a token touches 8 of 64 of them. In 300B-A47B the
# 8 active experts of width 3584 add up to exactly one dense FFN of width 28672 (the width of its three
# dense layers): per token, an MoE layer costs what a dense layer costs, with 8x the parameters to draw on.

# %% [markdown]
# ## 2 · The router, step by step · core, 16 min
#
# For a token $x$ (width $H$), ERNIE's router computes, in float32:
#
# 1. logits $z = W_r x$, one per expert ($W_r$ is `mlp.gate.weight`, shape $(E, H)$);
# 2. probabilities $p = \mathrm{softmax}(z)$ over **all** $E$ experts;
# 3. the chosen experts $S = \text{top-}k(p + b)$, where $b$ is the **correction bias**, one number per
#    expert. It only *chooses*. The released checkpoints carry it as
#    `mlp.moe_statics.e_score_correction_bias` (shape `(1, 64)` in 21B-A3B and 300B-A47B). How it got its
#    values is not in the checkpoint, and the model cards do not say (among the training choices they name
#    a router orthogonal loss and a multimodal token-balanced loss). Baidu's training code (ERNIEKit, `PaddlePaddle/ERNIE`,
#    `examples/pre-training/ernie/src/callbacks/moe_correction_bias_adjust_callback.py`) adds, after each
#    optimizer step, a fixed step times $\mathrm{sign}(\text{mean usage} - \text{usage}_e)$ to each MoE layer's
#    bias: the *auxiliary-loss-free balancing* rule of Wang et al. (2024), also used by DeepSeek-V3. It is
#    never trained by gradient descent. You apply that rule yourself in Exercise 3;
# 4. the mixing weights are the *unbiased* probabilities of the chosen experts, renormalised:
#    $w_e = p_e / \max(\sum_{j \in S} p_j,\ \texttt{moe\_norm\_min})$ for $e \in S$. The clamp
#    (1e-12) only guards against dividing by zero.
#
# The picture, for one token (illustrative numbers): the bias moves the *scores* that choose; the weights
# come from the probabilities alone.

# %%
notebook.figure("router_bias.png")

# %% [markdown]
# **Your turn: the router.** Write `route_tokens` for a whole table of tokens. A few things are easy to get
# wrong, and the check tries each: the softmax must run in float32 even when the logits are bfloat16; the
# bias must change the choice (top-k of $p + b$, not of $p$, and not of the logits plus $b$); the weights
# must come from the unbiased $p$; the sum is clamped below at `norm_min`, so a token whose chosen mass is
# smaller than `norm_min` keeps weights that sum to less than 1. `torch.topk`, `Tensor.gather` and
# `Tensor.clamp` are all you need (5-8 lines).

# %%
def route_tokens(logits, k, correction_bias, norm_min=1e-12):
    """Choose k experts per token and their mixing weights, ERNIE 4.5's way.

    logits: (N, E) router logits (any float dtype); correction_bias: (E,). Returns
    expert_ids (N, k) integer and weights (N, k) float32:
        p   = softmax(logits) in float32, over all E experts            # (N, E)
        ids = top-k of (p + correction_bias)                           # (N, k)  the bias chooses ...
        w   = p[ids] / max(sum_j p[ids_j], norm_min)                   # (N, k)  ... the unbiased p weighs
    """
    ...   # your code here


# %%
def kit_route(logits, k, correction_bias, norm_min=1e-12):   # ernie_lab.moe.route, in route_tokens' signature
    _, expert_ids, weights = route(logits, k, norm_min, correction_bias)
    return expert_ids, weights


route_tokens = exercises.use("02.route", route_tokens, kit=kit_route)

# %% [markdown]
# Now one token with 8 experts and $k = 2$, routed with `route_tokens`. We give the third most likely
# expert just enough bias to overtake the second.

# %%
torch.manual_seed(3)
E, k, H = 8, 2, 16
x = torch.randn(1, H)                           # one token
W_r = torch.randn(E, H) * 0.3                   # the router weight, (E, H)

logits = x @ W_r.T                              # (1, E)
p = logits.softmax(dim=-1)                      # (1, E), over all experts (for the picture)
ranked = p[0].argsort(descending=True)
b = torch.zeros(E)
b[ranked[2]] = float(p[0, ranked[1]] - p[0, ranked[2]]) + 0.01   # a nudge for expert ranked[2]

chosen, w = route_tokens(logits, k, b)          # (1, k) each: the bias chose, the unbiased p weighs
print("probabilities:", [round(v, 3) for v in p[0].tolist()])
print("chosen experts:", chosen[0].tolist(), " weights:", [round(v, 3) for v in w[0].tolist()])

# %%
fig, ax = plt.subplots(figsize=(9, 3.2))
experts = np.arange(E)
is_chosen = np.isin(experts, chosen[0].numpy())
ax.bar(experts, p[0].numpy(), color=np.where(is_chosen, "tab:orange", "lightgray"), label="probability p (softmax)")
ax.scatter(experts, (p + b)[0].numpy(), marker="_", s=600, color="black", label="p + b (used only to choose)")
for e, weight in zip(chosen[0].tolist(), w[0].tolist()):
    ax.annotate(f"w = {weight:.2f}", (e, p[0, e].item()), textcoords="offset points", xytext=(0, 6), ha="center")
ax.set_xticks(experts, [f"E{e}" for e in experts])
ax.set_ylim(0, float((p + b).max()) * 1.25)
ax.set_xlabel("expert")
ax.set_ylabel("probability")
ax.set_title(f"One token, top-{k} of {E}: the bias lifts E{int(ranked[2])} into the choice, its weight stays unbiased")
ax.legend(loc="upper right")
plt.tight_layout()
plt.show()

# %%
# the same with ernie_lab.moe.route (used by the MoE block), and what the bias did
probs, ids, weights = route(logits, k, norm_min=1e-12, correction_bias=b)
assert torch.equal(ids.sort(-1).values, chosen.sort(-1).values) and torch.allclose(probs, p)
assert torch.allclose(weights.gather(-1, ids.argsort(-1)), w.gather(-1, chosen.argsort(-1)))   # slot order aside
assert int(ranked[2]) in ids[0].tolist() and int(ranked[1]) not in ids[0].tolist()
unbiased = route(logits, k).expert_ids
assert int(ranked[1]) in unbiased[0].tolist()
assert torch.isclose(weights.sum(), torch.tensor(1.0))
print("route() agrees; without the bias the choice would be", unbiased[0].tolist())

# %% [markdown]
# ## 3 · Shared experts · core, 3 min
#
# 21B-A3B also has **2 shared experts** in every MoE layer: experts that every token passes through,
# whatever the router says, added to the routed output **unscaled** (no router weight). They hold what
# every token needs, so the routed experts can specialise. 300B-A47B has none.
#
# Two shared SwiGLU experts of width 1536 are stored as **one** SwiGLU of width 2 x 1536 = 3072
# (`mlp.shared_experts.*`): a SwiGLU is a sum over its intermediate features, so two side by side are
# one twice as wide. Check it:

# %%
torch.manual_seed(0)
one, two = SwiGLU(16, 6), SwiGLU(16, 6)
wide = SwiGLU(16, 12)
with torch.no_grad():
    wide.gate_proj.weight.copy_(torch.cat([one.gate_proj.weight, two.gate_proj.weight]))  # rows: features
    wide.up_proj.weight.copy_(torch.cat([one.up_proj.weight, two.up_proj.weight]))
    wide.down_proj.weight.copy_(torch.cat([one.down_proj.weight, two.down_proj.weight], dim=1))  # columns
    tokens = torch.randn(5, 16)
    assert torch.allclose(one(tokens) + two(tokens), wide(tokens), atol=1e-6)
print("two experts of width 6 == one expert of width 12")
print(MoEBlock(ErnieConfig(model_type="ernie4_5_moe", hidden_size=8, moe_num_experts=3, moe_k=2,
                           moe_intermediate_size=4, moe_num_shared_experts=2), layer_idx=1))


# %% [markdown]
# So an MoE layer computes $y = \sum_{e \in S} w_e \,\mathrm{Expert}_e(x) + \mathrm{Shared}(x)$. The
# printout shows the layout the checkpoints use: `gate` (the router), `moe_statics`, `experts.0 ...`,
# `shared_experts`.

# %% [markdown]
# ## 4 · Dispatch: every expert once, on all of its tokens · core, 18 min
#
# The obvious code loops over tokens and, for each, over its $k$ experts: $N k$ tiny matrix-vector
# products, and in Python. Instead, sorted dispatch (what `ernie_lab.moe.dispatch` does, and what you
# write next):
#
# 1. lists the $N k$ (token, slot) *pairs* and **sorts them by expert**: expert $e$'s tokens now sit in
#    one contiguous slice, and `bincount` says how long each slice is;
# 2. gathers the token rows in that order and runs **each active expert once**, on its whole slice
#    (three batched matmuls), skipping idle experts;
# 3. puts the outputs back in pair order and adds each token's $k$ outputs with their weights.
#
# The loop is over experts (at most $E$), never over tokens.

# %%
# `ernie_lab.notebook.draw_dispatch` draws these steps for any (N, k) table of expert ids
example_ids = torch.tensor([[2, 0], [1, 2], [0, 2], [2, 1], [0, 1]])  # 5 tokens, k = 2, E = 4
draw_dispatch(example_ids, num_experts=4)

# %%
# the bookkeeping of step 1, on that example
N, k = example_ids.shape
pairs = example_ids.reshape(-1)                   # pair p = (token p // k, slot p % k)
order = pairs.argsort(stable=True)
counts = torch.bincount(pairs, minlength=4)
print("expert of each pair :", pairs.tolist())
print("pairs sorted        :", order.tolist(), "-> tokens", (order // k).tolist())
print("tokens per expert   :", counts.tolist())

# %% [markdown]
# **Your turn: dispatch.** Write `dispatch_tokens`: steps 1-3 above, for any $N$, $k$ and list of experts
# (each a module mapping `(n, H) -> (n, H)`). The check counts how often each expert runs: exactly once,
# on exactly the tokens routed to it (an idle expert need not run). Two traps: after running the experts
# the outputs are in *expert* order, so put them back in pair order first (`order.argsort()` is the
# inverse of the sort); and `weights[t, j]` belongs to `expert_ids[t, j]`. `Tensor.split(counts)` cuts the
# sorted rows into one slice per expert (10-12 lines).

# %%
def dispatch_tokens(x, expert_ids, weights, experts):
    """sum_j weights[t, j] * experts[expert_ids[t, j]](x[t]) for every token t, one call per active expert.

    x: (N, H); expert_ids, weights: (N, k); experts: E modules mapping (n, H) -> (n, H).
    pairs (N*k,) sorted by expert -> rows x[token of each pair] (N*k, H) -> one call per expert's slice
    -> outputs back in pair order (N*k, H) -> view (N, k, H) -> weighted sum over k -> (N, H)
    """
    ...   # your code here


# %%
dispatch_tokens = exercises.use("02.dispatch", dispatch_tokens, kit=dispatch)

# %%
# your dispatch against the loop over tokens, on the example above
torch.manual_seed(0)
experts = torch.nn.ModuleList(SwiGLU(16, 8) for _ in range(4))
tokens = torch.randn(N, 16)
mix = torch.rand(N, k).softmax(-1)
with torch.no_grad():
    fast = dispatch_tokens(tokens, example_ids, mix, experts)
    slow = torch.stack([sum(mix[t, j] * experts[int(example_ids[t, j])](tokens[t]) for j in range(k)) for t in range(N)])
assert torch.allclose(fast, slow, atol=1e-6)
print("dispatch_tokens == the loop over tokens")

# %%
# why it matters: 512 tokens through 16 experts, top-4
torch.manual_seed(0)
experts = torch.nn.ModuleList(SwiGLU(256, 128) for _ in range(16))
tokens = torch.randn(512, 256)
ids = torch.stack([torch.randperm(16)[:4] for _ in range(512)])
mix = torch.rand(512, 4).softmax(-1)
# one thread, after a warm-up call: on a busy machine two threads that wait on each other blur the timing
with torch.no_grad(), notebook.cpu_settings(threads=1, flush_denormal=False):
    dispatch_tokens(tokens[:8], ids[:8], mix[:8], experts)
    start = time.perf_counter(); fast = dispatch_tokens(tokens, ids, mix, experts); t_fast = time.perf_counter() - start
    start = time.perf_counter()
    slow = torch.stack([sum(mix[t, j] * experts[int(ids[t, j])](tokens[t]) for j in range(4)) for t in range(512)])
    t_slow = time.perf_counter() - start
assert torch.allclose(fast, slow, atol=1e-5)
print(f"loop over tokens: {t_slow * 1e3:.0f} ms   dispatch_tokens: {t_fast * 1e3:.1f} ms   ({t_slow / t_fast:.1f}x)")

# %% [markdown]
# ## 5 · The MoE block, and the whole model, checked against `transformers` · core, 18 min
#
# A small random `Ernie4_5_MoeForCausalLM` (3 layers: one dense, two MoE; 8 experts, top-2, 2 shared),
# saved with `save_pretrained` in the Hub layout, then loaded by `ernie_lab.load_model`. `transformers`
# initialises routers to zero (every token would route alike) and the correction bias to zero: both are
# re-drawn, the bias large enough to change some choices; all weights are drawn wider than the default
# (std 0.3), so that greedy decoding does not just repeat one token.

# %%
from safetensors import safe_open
from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

TINY = dict(vocab_size=160, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, moe_num_experts=8, moe_k=2,
            moe_num_shared_experts=2, moe_layer_start_index=1)
torch.manual_seed(0)
reference = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**TINY)).eval()
with torch.no_grad():
    for param in reference.parameters():  # wider than the default 0.02, so greedy decoding does not repeat one token
        if param.dim() >= 2:
            param.normal_(0.0, 0.3)
    for layer in reference.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.weight.normal_(0.0, 0.3)
            layer.mlp.gate.moe_statics.e_score_correction_bias.uniform_(-0.04, 0.04)
folder = Path(tempfile.mkdtemp()) / "tiny-moe"
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    reference.save_pretrained(folder)
with safe_open(str(folder / "model.safetensors"), "pt") as f:
    for name in sorted(f.keys()):
        if name.startswith("model.layers.1.mlp.") and ".experts." not in name or name.startswith("model.layers.1.mlp.experts.0."):
            print(f"{name:52s} {list(f.get_slice(name).get_shape())}")    # experts 1..7 look like expert 0
model = ernie_lab.load_model(folder)
shutil.rmtree(folder.parent)  # loaded: the temporary checkpoint can go
print(f"ernie_lab model: {model.num_parameters():,} parameters; MoE layers", [b.layer_idx for b in moe_blocks(model)])

# %% [markdown]
# ### Your turn: the MoE block
#
# Everything of sections 2-4 in one function, `moe_block(x, block)`: flatten the `(B, T, H)` batch into
# `N = B * T` tokens (batch-major), compute the router logits in float32 from `block.gate.weight`, route
# them with **your** `route_tokens` (bias `block.moe_statics.e_score_correction_bias[0]`, `block.k`,
# `block.norm_min`), run **your** `dispatch_tokens` over `block.experts`, add `block.shared_experts` (when
# the block has them) unscaled, and give back the `(B, T, H)` shape. The check hands you blocks whose own
# forward is switched off, with fresh weights, with and without shared experts, and compares with
# `ernie_lab`'s `MoEBlock` and `transformers`' `Ernie4_5_MoeSparseMoeBlock` on the same weights (6-8 lines).

# %%
def moe_block(x, block):
    """One ERNIE 4.5 MoE block by hand: y = sum_{e in S} w_e Expert_e(x) + Shared(x), token by token.

    x: (B, T, H); block: an ernie_lab MoEBlock (read its weights, do not call it). Returns (B, T, H).
    tokens (N, H) -> logits (N, E) float32 -> route_tokens -> (N, k) ids and weights
    -> dispatch_tokens over block.experts (N, H) -> + block.shared_experts(tokens) -> (B, T, H)
    """
    ...   # your code here


# %%
def kit_moe_block(x, block):                                  # ernie_lab's MoEBlock, output only
    return block(x).hidden


moe_block = exercises.use("02.moe_block", moe_block, kit=kit_moe_block)

# %% [markdown]
# Your block on layer 1 of the checkpoint just loaded, against `ernie_lab`'s `MoEBlock` and `transformers`'
# block. `MoEBlock` returns two things, its output and `routing`, each token's router logits, chosen
# experts, weights and group (`moe.RouterOutput`): the one way its decisions leave the block, for the
# training losses and for `routing.record`.

# %%
ours_block, ref_block = model.layers[1].mlp, reference.model.layers[1].mlp
hidden_in = torch.randn(2, 10, TINY["hidden_size"])                            # (B, T, H)
with torch.no_grad():
    by_hand = moe_block(hidden_in, ours_block)                                 # (B, T, H)
    compare("MoE block: yours vs ernie_lab.moe.MoEBlock", by_hand, ours_block(hidden_in).hidden)
    compare("MoE block: yours vs transformers", by_hand, ref_block(hidden_in))

# %%
# logits, every routing decision, greedy decoding
torch.manual_seed(1)
prompt = torch.randint(3, TINY["vocab_size"], (1, 8))
with torch.no_grad():
    diff = (model(prompt).logits - reference(prompt).logits).abs().max()
print("max |logits difference|:", float(diff))
assert diff < 1e-4

with notebook.reference_routing(reference) as choices:      # which experts transformers' routers pick
    expected = reference.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                  attention_mask=torch.ones_like(prompt))
with routing.record(model) as record:
    got = ernie_lab.generate(model, prompt, max_new_tokens=20, eos_token_id=[])
print("reference:", expected[0, 8:].tolist())
print("ernie_lab:", got[0, 8:].tolist())
assert torch.equal(got, expected)
assert len(set(got[0, 8:].tolist())) > 1, "one repeated token would be a weak check"
for entry in record.layers:
    ref_ids = torch.cat(choices[entry.layer_idx, 0])         # prefill 8 tokens, then 19 decoding steps
    assert torch.equal(entry.expert_ids.sort(-1).values, ref_ids.sort(-1).values)
print("same experts for all", record.layers[0].num_tokens, "tokens in", len(record.layers), "MoE layers")

# %% [markdown]
# ## 6 · Routing records · optional, 3 min
#
# `ernie_lab.routing.record(model)` is a context manager: every forward pass inside it is recorded, on
# the CPU, one entry per MoE layer in depth order. Each entry holds, for the $N$ tokens that reached the
# layer (batch-major, the prompt first, then one token per row and decoding step):
#
# | field | shape | meaning |
# |---|---|---|
# | `layer_idx` | int | the decoder layer |
# | `expert_ids` | $(N, k)$ long | the chosen experts |
# | `weights` | $(N, k)$ | their mixing weights |
# | `probs` | $(N, E)$ | router probabilities (unbiased) |
# | `modality` | $(N,)$ long | 0 text, 1 vision (all 0 in text models) |
#
# and `rec.load()` counts tokens per expert, `(MoE layers, E)`. The record above, from the generation:

# %%
print(record)
entry = record.layers[0]
print("layer", entry.layer_idx, "| expert_ids", tuple(entry.expert_ids.shape), "| weights", tuple(entry.weights.shape),
      "| probs", tuple(entry.probs.shape), "| modality", tuple(entry.modality.shape))
print("first tokens:", entry.expert_ids[:4].tolist(), [[round(w, 2) for w in row] for row in entry.weights[:4].tolist()])
load = record.load()
print("tokens per expert:\n", load)
assert entry.num_tokens == 8 + 19 and load.sum(-1).tolist() == [entry.num_tokens * TINY["moe_k"]] * len(record.layers)
assert torch.allclose(entry.weights.sum(-1), torch.ones(entry.num_tokens))


# %%
# `ernie_lab.notebook.load_heatmap(ax, fractions, title, row_labels)`: one row per layer, one column per expert
fig, ax = plt.subplots(figsize=(7, 2.4))
image = load_heatmap(ax, record.load_fraction(), "random model: share of expert slots, 27 tokens",
                     [f"layer {e.layer_idx}" for e in record.layers])
fig.colorbar(image, ax=ax, label="share of slots")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7 · Load imbalance and the losses that fix it · core, 10 min
#
# A router trained only on the language-model loss tends to collapse: the experts that win early get more
# gradient, get better, and win more; the others starve. Collapsed experts waste parameters, and in
# expert-parallel training one overloaded expert stalls the whole batch. Three auxiliary losses,
# in `ernie_lab.losses`, each a function of the router logits or weights:
#
# * **load balancing** (Switch Transformer): $L_{bal} = E \sum_e f_e P_e$, with $f_e$ the fraction of tokens
#   that chose expert $e$ (a count, no gradient) and $P_e$ the mean router probability of $e$ (differentiable).
#   The gradient lowers $P_e$ most where $f_e$ is high. Uniform routing gives $L_{bal} = k$.
# * **router z-loss** (ST-MoE): $L_z = \frac1N \sum_t (\log \sum_e e^{z_{te}})^2$ keeps logits small, so the
#   softmax stays soft and float-safe.
# * **router orthogonal loss** (ERNIE 4.5): normalise each expert's router row $w_e$ to unit length;
#   $L_{orth} = \frac{1}{E^2} \sum_{i,j} (w_i \cdot w_j - [i = j])^2$. Rows pointing in different directions
#   mean experts that different tokens choose.
#
# By hand, two tokens and two experts, $k = 1$:

# %%
ln3 = math.log(3.0)
balanced = torch.tensor([[ln3, 0.0], [0.0, ln3]])     # p = (3/4, 1/4) and (1/4, 3/4): f = P = (1/2, 1/2)
collapsed = torch.tensor([[ln3, 0.0], [ln3, 0.0]])    # both choose expert 0: f = (1, 0), P = (3/4, 1/4)
print("balanced :", losses.load_balancing_loss(balanced, k=1).item(), "= 2 * (1/2 * 1/2 + 1/2 * 1/2)")
print("collapsed:", losses.load_balancing_loss(collapsed, k=1).item(), "= 2 * (1 * 3/4 + 0 * 1/4)")
assert math.isclose(losses.load_balancing_loss(balanced, k=1).item(), 1.0, rel_tol=1e-6)
assert math.isclose(losses.load_balancing_loss(collapsed, k=1).item(), 1.5, rel_tol=1e-6)
print("z-loss of logits (0, 0):", losses.router_z_loss(torch.zeros(1, 2)).item(), "= (ln 2)^2 =", math.log(2) ** 2)
assert math.isclose(losses.router_z_loss(torch.zeros(1, 2)).item(), math.log(2) ** 2, rel_tol=1e-6)

random_router = torch.randn(8, 32)
orthonormal_router = torch.linalg.qr(torch.randn(32, 8)).Q.T      # 8 orthonormal rows
print(f"orthogonal loss: random router {losses.router_orthogonal_loss(random_router):.4f}, "
      f"orthonormal rows {losses.router_orthogonal_loss(orthonormal_router):.1e}")
assert losses.router_orthogonal_loss(orthonormal_router) < 1e-10 < losses.router_orthogonal_loss(random_router)

# %%
# transformers computes the balancing loss of an Ernie4_5_MoeForCausalLM itself (aux_loss): the same number
tokens = torch.randint(3, TINY["vocab_size"], (2, 12))
with torch.no_grad():
    ref_aux = reference(tokens, output_router_logits=True).aux_loss
    out = model(tokens, output_router_logits=True)  # out.router_logits: one RouterOutput per MoE layer
ours = losses.load_balancing_loss(out.router_logits, k=TINY["moe_k"])
print(f"transformers aux_loss {ref_aux.item():.6f}   ernie_lab {ours.item():.6f}")
assert torch.allclose(ours, ref_aux, atol=1e-5)

# %% [markdown]
# ### A small experiment: training with and without the balancing losses
#
# A tiny MoE language model (2 layers, both MoE, 8 experts, top-2, no shared experts) learns to predict
# the next character of Python's own documentation (`pydoc_data.topics`, shipped with Python). Two runs
# from the same start: the language-model loss alone, and with
# $0.1\,L_{bal} + 0.001\,L_z + 0.01\,L_{orth}$ per layer. Inside each step, `routing.record` tells us
# how the tokens were spread over the experts.

# %%
from pydoc_data.topics import topics

text = "\n".join(topics[key] for key in sorted(topics))
alphabet = sorted(set(text))
char_id = {c: i for i, c in enumerate(alphabet)}
data = torch.tensor([char_id[c] for c in text])
split = int(0.95 * len(data))
print(f"{len(text):,} characters, {len(alphabet)} distinct; {split:,} for training")

toy = ErnieConfig(model_type="ernie4_5_moe", vocab_size=len(alphabet), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256, moe_num_experts=8, moe_k=2, moe_intermediate_size=64,
                  moe_num_shared_experts=0, moe_layer_start_index=0,
                  tie_word_embeddings=False)   # a separate output layer, as in 300B-A47B
STEPS = 120 if FAST else 600
BATCH, SEQ = 16, 64


def batch(generator, start=0, end=split):
    at = torch.randint(start, end - SEQ - 1, (BATCH,), generator=generator)
    x = torch.stack([data[i:i + SEQ] for i in at])
    return x, torch.stack([data[i + 1:i + SEQ + 1] for i in at])


def train(balance: bool, seed: int = 0, config=toy):
    torch.manual_seed(seed)
    net = ernie_lab.ErnieForCausalLM(config).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    loads, lm_losses = [], []
    for step in tqdm(range(STEPS), desc="with balancing losses" if balance else "language model only"):
        x, y = batch(generator)
        with routing.record(net) as rec:
            out = net(x, output_router_logits=balance)
        loss = lm = F.cross_entropy(out.logits.reshape(-1, config.vocab_size), y.reshape(-1))
        if balance:
            for block, routed in zip(moe_blocks(net), out.router_logits):
                loss = loss + 0.1 * losses.load_balancing_loss(routed.logits, config.moe_k) \
                            + 1e-3 * losses.router_z_loss(routed.logits) \
                            + 1e-2 * losses.router_orthogonal_loss(block.gate.weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loads.append(rec.load_fraction())            # (layers, E) share of slots per expert
        lm_losses.append(lm.item())
    return net.eval(), torch.stack(loads), lm_losses   # loads: (steps, layers, E)


# Tiny matrices: one CPU thread is faster than several that wait on each other, and flushing
# denormals (floats so close to 0 that the CPU computes with them in slow microcode; experts that get
# no tokens see vanishing Adam statistics) avoids a 10x slow-down. Both are restored afterwards.
with notebook.cpu_settings(threads=1, flush_denormal=True):
    plain, plain_loads, plain_lm = train(balance=False)
    balanced_net, balanced_loads, balanced_lm = train(balance=True)


# %%
def imbalance(loads):
    '''max load / mean load per step, averaged over layers: 1 = perfectly even, E/k = total collapse.'''
    return (loads.max(-1).values * loads.shape[-1]).mean(-1)


fig, axes = plt.subplots(2, 2, figsize=(13, 7))
for col, (name, loads) in enumerate((("language model only", plain_loads), ("with balancing losses", balanced_loads))):
    worst = int(loads[-20:].max(-1).values.mean(0).argmax())   # the layer with the largest top share
    image = axes[0, col].imshow(loads[:, worst].T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=0.5,
                                interpolation="nearest")
    axes[0, col].set_title(f"{name}: layer {worst}, share of slots per expert")
    axes[0, col].set_xlabel("training step")
    axes[0, col].set_ylabel("expert")
    fig.colorbar(image, ax=axes[0, col], label="share of slots (even = 1/8)")
steps = np.arange(STEPS)
axes[1, 0].plot(steps, imbalance(plain_loads), label="language model only")
axes[1, 0].plot(steps, imbalance(balanced_loads), label="with balancing losses")
axes[1, 0].axhline(1.0, color="gray", ls=":", label="perfectly even")
axes[1, 0].set_xlabel("training step")
axes[1, 0].set_ylabel("max load / mean load")
axes[1, 0].set_title("load imbalance (mean over the 2 layers)")
axes[1, 0].legend()
axes[1, 1].plot(steps, plain_lm, label="language model only", alpha=0.8)
axes[1, 1].plot(steps, balanced_lm, label="with balancing losses", alpha=0.8)
axes[1, 1].set_xlabel("training step")
axes[1, 1].set_ylabel("next-character cross-entropy (nats)")
axes[1, 1].set_title("language-model loss")
axes[1, 1].legend()
plt.tight_layout()
plt.show()

final_plain, final_balanced = imbalance(plain_loads[-20:]).mean().item(), imbalance(balanced_loads[-20:]).mean().item()
print(f"imbalance over the last 20 steps: {final_plain:.2f} without, {final_balanced:.2f} with the losses")
print(f"language-model loss over the last 20 steps: {np.mean(plain_lm[-20:]):.3f} without, {np.mean(balanced_lm[-20:]):.3f} with")
assert final_balanced < 1.45 and final_plain > final_balanced + 0.4
assert np.mean(balanced_lm[-20:]) < np.mean(balanced_lm[:10]) - 0.5   # it did learn

# %% [markdown]
# Without the losses a few experts take most of the slots and others starve (the dark rows of the left
# heatmap); with them every expert keeps a fair share within a few dozen steps, at no visible cost in
# language-model loss in this run. The exact numbers change with the seed; the contrast does not.

# %% [markdown]
# ## 8 · Expert-load heatmaps from `routing.record` · optional, 4 min
#
# The trained models, on held-out text (the last 5 % of the characters). Left: share of slots per expert
# and layer. Right: which experts the balanced model's first layer gives each kind of character: a glimpse
# of specialisation.

# %%
generator = torch.Generator().manual_seed(123)
held_out, _ = batch(generator, start=split, end=len(data))
records = {}
for name, net in (("language model only", plain), ("with balancing losses", balanced_net)):
    with torch.no_grad(), routing.record(net) as rec:
        net(held_out)
    records[name] = rec

kinds = {"lower-case": str.islower, "upper-case": str.isupper, "digit": str.isdigit,
         "space": lambda c: c == " ", "newline": lambda c: c == "\n",
         "punctuation": lambda c: not (c.isalnum() or c.isspace())}
chars = [alphabet[i] for i in held_out.reshape(-1).tolist()]               # batch-major, like the record
kinds = {name: test for name, test in kinds.items() if any(test(c) for c in chars)}  # kinds in this text
first = records["with balancing losses"].layers[0]
by_kind = torch.zeros(len(kinds), toy.moe_num_experts)
for row, test in enumerate(kinds.values()):
    rows = torch.tensor([test(c) for c in chars])
    by_kind[row] = torch.bincount(first.expert_ids[rows].reshape(-1), minlength=toy.moe_num_experts).float()
by_kind = by_kind / by_kind.sum(-1, keepdim=True).clamp(min=1)

fig, axes = plt.subplots(1, 3, figsize=(16, 3.4), gridspec_kw={"width_ratios": [1, 1, 1.25]}, layout="constrained")
for ax, (name, rec) in zip(axes, records.items()):
    image = load_heatmap(ax, rec.load_fraction(), name, [f"layer {e.layer_idx}" for e in rec.layers], vmax=0.5)
axes[1].set_ylabel("")
fig.colorbar(image, ax=axes[:2], label="share of slots (even = 1/8)")
image = load_heatmap(axes[2], by_kind, "balanced model, layer 0: experts per kind of character", list(kinds),
                     cmap="magma", ylabel="")
fig.colorbar(image, ax=axes[2], label="share of that kind's slots")
plt.show()

for rec in records.values():
    assert rec.load().sum().item() == 2 * held_out.numel() * toy.moe_k
assert imbalance(records["with balancing losses"].load_fraction()[None]).item() < imbalance(records["language model only"].load_fraction()[None]).item()

# %% [markdown]
# **With real weights (optional).** With `USE_REAL_WEIGHTS = True` in the first cell and the 21B-A3B
# cached on this machine, the heatmap of a trained model's routing on a real sentence: the experts
# specialise, unlike the random ones above. Its 44 GB of bf16 weights are rounded to int4 as they are read
# (`quantize="w4a16"`; the routers stay in float32), so a laptop holds it: 11.6 GiB at the peak of the
# load, measured by `benchmarks/big_moe.py` on a 24 GB machine.

# %%
if USE_REAL_WEIGHTS:
    real_model, real_tokenizer = notebook.cached_model("baidu/ERNIE-4.5-21B-A3B-PT", dtype=torch.bfloat16,
                                                       quantize="w4a16")
    if real_model is not None:
        sentence = real_tokenizer.encode("Mixture-of-experts models route every token to a few experts.")
        with torch.no_grad(), routing.record(real_model) as real_record:
            real_model(torch.tensor([sentence]))
        fig, ax = plt.subplots(figsize=(12, 6))
        load_heatmap(ax, real_record.load_fraction(), "21B-A3B: share of the choices per expert",
                     [str(e.layer_idx) for e in real_record.layers])
        plt.show()
        del real_model

# %% [markdown]
# ## Exercises · core, 34 min
#
# Each exercise is a stub for you to fill in, followed by a check from `ernie_lab.exercises`. Until you
# write something the check says "not attempted yet" and gives a hint; a wrong answer stops with a
# message that says what differs; a right one says "correct". The solutions are in `solutions/`.
#
# **Exercise 1 · One token's share of a layer.** In 300B-A47B, how many parameters does one token use in
# *one* MoE layer's feed-forward part: the router weight, its correction bias and the chosen experts?
# (Hidden 8192, 64 experts of width 3584, top-8.)

# %%
active_per_layer = None   # your answer: a number

exercises.check("02.active_per_layer", active_per_layer)


# %% [markdown]
# **Exercise 2 · The balancing loss by hand.** Write the Switch-Transformer load-balancing loss
# $L = E \sum_e f_e P_e$ from a table of router probabilities `probs (N, E)` and the chosen experts
# `expert_ids (N, k)`: $f_e$ is the share of tokens that chose expert $e$, $P_e$ its mean probability.
# Return it as a 0-dim tensor: a loss that became a Python number cannot be backpropagated. The check
# compares with `ernie_lab.losses.load_balancing_loss` on fresh tables of several sizes, and checks the
# gradient that reaches `probs` ($\partial L / \partial p_{te} = E f_e / N$).

# %%
def switch_loss(probs, expert_ids):
    """L = E * sum_e f_e * P_e.  probs: (N, E), expert_ids: (N, k) -> a 0-dim tensor.

    f_e = (tokens that chose e) / N      (E,)  a count: no gradient
    P_e = mean over tokens of probs[:, e] (E,)  the gradient flows through it
    """
    ...   # your code here


exercises.check("02.switch_loss", switch_loss)


# %% [markdown]
# **Exercise 3 · Balancing without a loss (an experiment).** ERNIE 4.5's checkpoints carry a correction
# bias per MoE layer; the sign update shown here is the auxiliary-loss-free balancing rule it comes from
# (Wang et al. 2024; Baidu's ERNIEKit applies it after each optimizer step, see section 2): after each
# batch, raise the bias of under-used experts and lower that of over-used ones by a fixed step $\gamma$,
# $b_e \leftarrow b_e + \gamma\,\mathrm{sign}(\bar f - f_e)$, with $f_e$ expert $e$'s share of the batch's
# choices and $\bar f$ the mean share, in **every** MoE layer. Write `balance_with_bias(net, batches, gamma)`;
# `batches` is a list of `(B, T)` id tensors; return the biases of all MoE layers stacked, `(layers, E)`.
# The check runs it on fresh small lopsided MoE models of two shapes and compares every layer's bias with
# the rule, step by step; the cell after it applies your function to the model trained above *without*
# balancing losses (its weights stay frozen). It will not reach 1: a bias of a few tenths moves the
# tokens that were undecided between experts, not those that strongly prefer one; during pre-training
# the bias moves along with the router, a little every step.

# %%
def balance_with_bias(net, batches, gamma=0.01):
    """For each batch in turn: route it (routing.record), then for every block of moe_blocks(net):
    bias += gamma * sign(mean share - share)   (bias = block.moe_statics.e_score_correction_bias[0], (E,))
    Returns the biases of all MoE blocks, stacked: (layers, E)."""
    ...   # your code here


exercises.check("02.balance_with_bias", balance_with_bias)


# %%
def measure(net):
    with torch.no_grad(), routing.record(net) as rec:
        net(held_out)
    return imbalance(rec.load_fraction()[None]).item()


generator = torch.Generator().manual_seed(5)
bias_before = [b.moe_statics.e_score_correction_bias.clone() for b in moe_blocks(plain)]
before = measure(plain)
balance_with_bias(plain, [batch(generator)[0] for _ in range(40)], gamma=0.01)
if all(torch.equal(b.moe_statics.e_score_correction_bias, old) for b, old in zip(moe_blocks(plain), bias_before)):
    print("(write balance_with_bias above to run this experiment on the model trained without balancing losses)")
else:
    print(f"imbalance on held-out text: {before:.2f} before, {measure(plain):.2f} after adjusting the bias alone")

# %% [markdown]
# **Experiment · k = 1, or a shared expert (optional, 5 min).** The cell below retrains the toy MoE of
# section 7 with balancing losses, once with `moe_k=1` (Switch Transformer's choice: one expert per token,
# half the expert compute) and once with `moe_num_shared_experts=1` (an expert every token passes
# through, as in ERNIE 4.5), and compares the language-model losses with the k = 2 model above. Which
# learns faster per step, and which is cheaper per token? Try other values in `variants`.

# %%
import dataclasses

variants = {"k = 1": dataclasses.replace(toy, moe_k=1),
            "k = 2 + 1 shared": dataclasses.replace(toy, moe_num_shared_experts=1)}
final_lm = {"k = 2 (section 7)": float(np.mean(balanced_lm[-20:]))}
with notebook.cpu_settings(threads=1, flush_denormal=True):
    for name, config in variants.items():
        net, loads, lm_curve = train(balance=True, config=config)
        final_lm[name] = float(np.mean(lm_curve[-20:]))
        with torch.no_grad(), routing.record(net) as rec:
            net(held_out)
        # each token fills exactly k expert slots: the retrained model really routes with its own k
        assert rec.load().sum().item() == len(rec.layers) * held_out.numel() * config.moe_k
        assert bool(moe_blocks(net)[0].shared_experts is not None) == (config.moe_num_shared_experts > 0)
for name, value in final_lm.items():
    print(f"{name:<20} mean LM loss of the last 20 steps: {value:.3f}")

# %% [markdown]
# ## Key takeaways
#
# * An MoE layer stores E experts and runs k of them per token: memory grows with E, compute with k.
# * ERNIE's router: float32 softmax over all experts, a correction bias that only *chooses*, weights
#   renormalised over the chosen k; shared experts are added unscaled.
# * Dispatch sorts (token, slot) pairs by expert so each expert runs once on all its tokens.
# * Without balancing, a few experts take most tokens; a balancing loss or the bias alone evens the load.
#   ERNIE 4.5's checkpoints carry the bias; the sign rule that moves it is the loss-free balancing rule
#   (Wang et al. 2024), which Baidu's ERNIEKit training code applies.
#
# ## What we built
#
# * by hand: `route_tokens` (the bias chooses, the unbiased probabilities weigh), `dispatch_tokens` (each
#   expert once, on all of its tokens), `moe_block` (both, plus the shared experts), equal to `ernie_lab`
#   and `transformers` on the same weights; `switch_loss` and `balance_with_bias`, the two ways to even
#   out the load;
# * in the kit, the same pieces: `ernie_lab.moe`: `route`, `dispatch`, `MoEBlock` (router + experts +
#   shared experts, in the Hub's layout), reused by the vision-language model's two expert groups;
# * `ernie_lab.load_model` reads `Ernie4_5_MoeForCausalLM` checkpoints, equal to `transformers` in
#   logits, greedy decoding and every routing decision;
# * `ernie_lab.routing.record` and `ernie_lab.losses` (load balancing, router z-loss, orthogonal loss).
#
# **What comes next:** notebook **03** turns pictures into tokens, notebook **04** gives the mixture a
# second group of experts for them.
#
# ## Further reading
#
# * Baidu ERNIE Team, *ERNIE 4.5 Technical Report* (2025),
#   [PDF](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf): the family this notebook
#   rebuilds: a heterogeneous MoE with modality-isolated routing, a router orthogonal loss and a
#   multimodal token-balanced loss (the float32 router and the choose-only bias come from the released code).
# * Shazeer et al., *Outrageously Large Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer*
#   (2017), [arXiv:1701.06538](https://arxiv.org/abs/1701.06538): the top-k gated MoE layer with a
#   balancing loss, between LSTM layers; ERNIE uses the same top-k routing inside a Transformer, with
#   softmax over all experts before the choice.
# * Lepikhin et al., *GShard: Scaling Giant Models with Conditional Computation and Automatic Sharding*
#   (2020), [arXiv:2006.16668](https://arxiv.org/abs/2006.16668): MoE in every other Transformer layer,
#   top-2 routing with expert capacity and an auxiliary balancing loss; the released ERNIE inference code
#   (and this kit) routes without a capacity limit, and 21B-A3B adds shared experts.
# * Fedus, Zoph and Shazeer, *Switch Transformers* (2021), [arXiv:2101.03961](https://arxiv.org/abs/2101.03961):
#   top-1 routing and the balancing loss $E \sum_e f_e P_e$ of Exercise 2; ERNIE routes each token to
#   6 or 8 experts.
# * Zoph et al., *ST-MoE: Designing Stable and Transferable Sparse Expert Models* (2022),
#   [arXiv:2202.08906](https://arxiv.org/abs/2202.08906): the router z-loss that keeps router logits
#   small; the same loss appears in section 7 beside ERNIE's orthogonal loss.
# * Dai et al., *DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language
#   Models* (2024), [arXiv:2401.06066](https://arxiv.org/abs/2401.06066): many fine-grained experts plus
#   always-on shared experts; ERNIE 4.5's 21B-A3B has the same split (64 routed, 2 shared), its 300B-A47B
#   no shared experts.
# * Wang et al., *Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts* (2024),
#   [arXiv:2408.15664](https://arxiv.org/abs/2408.15664): the per-expert bias added only to choose,
#   moved by a sign rule after each step (Exercise 3); ERNIE's checkpoints carry such a bias. DeepSeek-AI,
#   *DeepSeek-V3 Technical Report* (2024), [arXiv:2412.19437](https://arxiv.org/abs/2412.19437), trains a
#   671 B MoE with it, adding the bias to sigmoid affinity scores where ERNIE adds it to softmax probabilities.

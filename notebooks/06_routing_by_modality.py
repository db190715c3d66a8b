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
# # 06 · Expert routing by modality, made visible
#
# **What you will learn:** what modality-isolated routing is and why ERNIE 4.5 VL uses it; how to record
# a model's routing yourself with forward hooks; how to read where a trained model sends each image patch
# and each text token; how to measure specialisation
# honestly (against the same architecture at initialisation); when routers settle during training; how
# to point the same pictures at a real checkpoint. **Time:** 85 min (core 51 min). **Memory:** under 2 GB.
#
# ERNIE 4.5 VL's feed-forward layers are mixtures of experts with **modality-isolated routing**. Every MoE
# layer holds two *groups* of experts, each with its own router:
#
# * **text experts** T0..T63 (width 1536 in VL-28B-A3B): a text token is routed by the text router, among
#   these only;
# * **vision experts** V0..V63 (width 512): an image or video token (and the start/end marker around a
#   picture) is routed by the vision router, among these only;
# * shared experts see every token.
#
# Why separate them? Text and image tokens are very different inputs. In one shared pool they would
# compete for the same experts and the same load-balancing budget: a picture of 1,000 tokens would push
# text tokens off "their" experts, and the balancing loss would trade one modality against the other.
# Isolated groups give each modality its own experts, its own balancing (the load-balancing loss is taken
# per group) and its own width: vision experts are a third as wide, so an image token costs less. The
# two groups still share attention, the shared experts and the residual stream, so text and pictures
# still talk to each other.
#
# You first write the instrument: a **routing record** made with forward hooks, which every picture
# below reads. Then this notebook draws where the kit's **trained tiny VL model** (`data/tiny-ernie-vl/`: 8 text + 8 vision
# experts, top-2, 3 MoE layers, trained on synthetic scenes) sends every patch and every token: image by
# image, token by token, layer by layer; how this differs from the same architecture at initialisation;
# how routing settles during training; and an explorer to click through it. Every picture is a function
# of a routing record in `ernie_lab.viz`, and works unchanged on a real
# ERNIE-4.5-VL-28B-A3B checkpoint (last section). `ERNIE_LAB_FAST=1` makes the runs shorter; every check
# still runs.

# %%
# %matplotlib inline
import dataclasses

import torch
from IPython.display import display

import ernie_lab
from ernie_lab import architectures, exercises, routing, scenes, tiny_models, viz
from ernie_lab.course.exercise_sets import nb06 as kit_exercises   # the kit's versions of your pieces
from ernie_lab.course import notebook
from ernie_lab.course.notebook import repo_path, setup
from ernie_lab.io.chat import render_prompt
from ernie_lab.model.moe import moe_blocks
from ernie_lab.model.special_tokens import TEXT, VISION

FAST = setup()
FOLDER = repo_path("data", "tiny-ernie-vl")
model = ernie_lab.load_model(FOLDER).eval()
tokenizer = ernie_lab.load_tokenizer(FOLDER)
text = model.config.get_text_config()
E, K = text.moe_num_experts, text.moe_k
print(f"{model.num_parameters():,} parameters; {E} text + {E} vision experts per MoE layer, top-{K};",
      "MoE layers:", [tap.layer_idx for tap in routing.taps(model)])

# %% [markdown]
# ## 1 · A routing record, from forward hooks · core, 19 min
#
# Every picture in this notebook reads one object: a **routing record**, which says, for every MoE layer
# and every token of a forward pass, which group routed the token, which k experts it chose, with what
# weights, and the router's probabilities over all E experts of its group.
#
# The model keeps none of this. Each MoE block *returns* its decisions with its output,
# `MoEOutput(hidden, routing)`, and `routing` (a `RouterOutput`) holds, for the N = B x T tokens of the
# pass, batch-major: `expert_ids` (N, k), the experts the block ran, best first, chosen by probability
# **plus correction bias**; `weights` (N, k), renormalised to sum to 1; `logits` (N, E), each token's
# router logits in its own group; `modality` (N,), 0 for text, 1 for vision. A **forward hook** reads
# that output: `block.register_forward_hook(hook)` makes PyTorch call `hook(module, args, output)` after
# every forward of the block, and returns a handle whose `.remove()` takes the hook off again.

# %%
notebook.figure("routing_record.png")

# %% [markdown]
# **Exercise · the routing record (core, 10 min).** Write `record_routing(model, inputs)`: one
# `routing.LayerRouting(block.layer_idx, block.num_experts)` per MoE block (`routing.taps(model)` lists
# them in depth order) inside a `routing.RoutingRecord([...])`; a forward hook on each block that appends
# `expert_ids, weights, probs, modality` to its entry (`entry.append(...)`, each tensor detached and on the
# CPU, probs = the softmax of the logits); one pass `model(**inputs)`; and every hook removed afterwards,
# also when the forward raises. Three traps: the MoE layers do not start at 0 (name each entry by
# `layer_idx`, not by its position); the experts are the ones the block chose *with* its correction bias
# (do not recompute a top-k of the probabilities); a hook left behind keeps recording on every later pass.
# The check builds fresh text and vision-language micro MoEs with non-zero biases and compares your
# record with the kit's `routing.record`; it also makes a forward pass raise.

# %%
def record_routing(model, inputs):
    """RoutingRecord of one forward pass model(**inputs): per MoE layer (by block.layer_idx), per token,
    expert_ids (N, k) long, weights (N, k), probs (N, E) softmax of the logits, modality (N,) long;
    N = B * T tokens, batch-major. Every hook is removed afterwards, also when the forward raises."""
    ...   # your code here


record_routing = exercises.use("06.record_routing", record_routing, kit=kit_exercises.kit_record_routing)

# %% [markdown]
# Your recorder on this notebook's model: a chat prompt with a picture. The first few tokens of the first
# MoE layer, as the figure draws them (the image tokens sit between the two markers).

# %%
scene = tiny_models.held_out_scenes(3)[2]
picture = scenes.render(scene)
inputs = render_prompt(model, tokenizer, viz.messages_for(scenes.DESCRIBE, picture))
mine = record_routing(model, inputs)
print(mine)
first = mine.layers[0]
names = viz.token_texts(tokenizer, inputs["input_ids"][0])
start = int((first.modality == VISION).nonzero()[0]) - 2                 # two text tokens before the picture
for row in range(start, start + 6):
    letter = routing.GROUP_LETTER[int(first.modality[row])]
    experts = ", ".join(f"{letter}{int(e)} {float(w):.2f}" for e, w in zip(first.expert_ids[row], first.weights[row]))
    print(f"row {row:3d} {names[row]!r:24} modality {int(first.modality[row])}  experts {experts}"
          f"  max prob {float(first.probs[row].max()):.2f}")
assert not any(m._forward_hooks for m in model.modules()), "a hook was left on the model"


def route_with_yours(prompt, image=None):
    """viz.route's tokens and rows for a chat prompt, with the record made by your recorder."""
    routed = viz.route(model, tokenizer, prompt, image)
    return dataclasses.replace(routed, record=record_routing(model, render_prompt(
        model, tokenizer, viz.messages_for(prompt, image))))


# %% [markdown]
# ## 2 · One picture, patch by patch · core, 5 min
#
# A 112 x 112 scene is cut into 8 x 8 patches of 14 pixels; the adapter merges each 2 x 2 block into one
# token, so the decoder sees a 4 x 4 grid of image tokens. `viz.route` runs the model once on a chat
# prompt with the picture; `route_with_yours` swaps in the record your recorder makes of the same pass. Left: each image token coloured by its top-1 vision
# expert in one layer, with the expert written in the cell and the counts in the legend. Right: the
# router's confidence, the weight of that first expert (with k = 2, 0.5 means "undecided").

# %%
routed = route_with_yours(scenes.DESCRIBE, picture)
print(scenes.caption(scene))
print("prompt:", len(routed.input_ids), "tokens;", len(routed.image_rows), "image tokens on a grid of", routed.grid)
layers = [entry.layer_idx for entry in routed.record.layers]
for layer in layers:
    display(viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=layer))

# %% [markdown]
# The second choice of each token (top-k rank 1) is a different expert by construction; where the first
# choice is confident, the second carries little weight.

# %%
viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=layers[-1], rank=1,
                  confidence=False)

# %% [markdown]
# ### Check: the two groups never mix
#
# Your record says which group routed each row; here we check it against what actually ran. A forward
# hook on every expert module counts the rows it received: text experts must receive exactly the text
# tokens' choices, vision experts exactly the vision tokens' (the placeholders and the two markers), and
# the loads of each group must add up to its tokens times k.

# %%
seen = {}  # (layer, group, expert) -> rows the expert module received


def count_rows(key):
    def hook(module, args, output):
        seen[key] = seen.get(key, 0) + args[0].shape[0]
    return hook


hooks = [expert.register_forward_hook(count_rows((block.layer_idx, *divmod(n, block.num_experts))))
         for block in moe_blocks(model) for n, expert in enumerate(block.experts)]  # group 0's experts first
try:
    rec = record_routing(model, inputs)       # your recorder; the counting hooks run in the same pass
finally:
    for hook in hooks:
        hook.remove()

vision_ids = {model.config.image_token_id, *(tokenizer.special_tokens[t] for t in ("<|IMAGE_START|>", "<|IMAGE_END|>"))}
is_vision = torch.tensor([int(i) in vision_ids for i in inputs["input_ids"][0]])
n_text, n_vision = int((~is_vision).sum()), int(is_vision.sum())
for entry in rec.layers:
    l = entry.layer_idx
    assert torch.equal(entry.modality.bool(), is_vision), "a token was routed in the wrong group"
    ran_text = torch.tensor([seen.get((l, TEXT, e), 0) for e in range(E)])
    ran_vision = torch.tensor([seen.get((l, VISION, e), 0) for e in range(E)])
    assert torch.equal(ran_text, entry.load(TEXT)) and torch.equal(ran_vision, entry.load(VISION))
    assert int(ran_text.sum()) == n_text * K, "text experts received something besides the text tokens' choices"
    assert int(ran_vision.sum()) == n_vision * K, "vision experts received something besides the vision tokens' choices"
    print(f"layer {l}: text experts ran {int(ran_text.sum())} rows = {n_text} text tokens x {K};"
          f" vision experts {int(ran_vision.sum())} = {n_vision} vision tokens x {K}")

# %% [markdown]
# ## 3 · A prompt, token by token · core, 3 min
#
# The text side of the same model: a longer prompt (the captions of a few scenes), every token coloured
# by its top-1 text expert, one band per MoE layer (the record made by your recorder again). Numbers name the expert, so the strip reads in grey too.

# %%
long_text = " ".join(scenes.caption(s) + "." for s in tiny_models.held_out_scenes(6 if FAST else 10))
text_routed = route_with_yours(long_text)
print(len(text_routed.text_rows), "text tokens")
viz.token_strip(text_routed.record, text_routed.tokens, text_routed.text_rows)

# %% [markdown]
# ### One token's route through the layers
#
# A patch and a word, followed through the depth: the k experts of every layer, dot size = mixing weight.

# %%
patch = int(routed.image_rows[5])
display(viz.routing_path(routed.record, patch, routed.tokens))
print(viz.path_table(routed.record, patch))
word = int(text_routed.text_rows[min(12, len(text_routed.text_rows) - 1)])
viz.routing_path(text_routed.record, word, text_routed.tokens)

# %% [markdown]
# ## 4 · Load, co-selection and confidence · core, 3 min
#
# Tokens per expert in every layer, the text and vision groups on separate axes (they are different
# experts: T3 and V3 share nothing but a number). The bars under each heatmap are each expert's total.

# %%
scene_list = tiny_models.held_out_scenes(24 if FAST else 60)
rec, image_rows, labels = viz.route_scenes(model, tokenizer, scene_list)
display(viz.load_heatmap(rec, title=f"Expert load on {len(scene_list)} held-out scenes (caption prompts)"))
routed_tokens = rec.layers[0].num_tokens
for group in (TEXT, VISION):
    tokens_in_group = int((rec.layers[0].modality == group).sum())
    assert (rec.load(group).sum(1) == tokens_in_group * K).all()  # every token picked exactly k experts
print("loads sum to routed tokens x k in every layer and group:", routed_tokens, "tokens")

# %%
display(viz.co_selection(rec, layers[-1]))
viz.confidence_by_layer(rec)

# %% [markdown]
# ## 5 · Specialisation: does an expert mean something? · core, 17 min
#
# Each image token gets the attributes of what lies under it: the colour and kind of the shape in its
# cell (or "background") and the scene's background colour. If the top-1 expert depended on nothing,
# each attribute's tokens would spread over the experts as all tokens do, and the normalised mutual
# information (NMI) between expert and attribute would be 0; 1 would mean the expert names the attribute.
# Right: the layer that specialises most, its tokens per expert split by the attribute, with the counts.

# %%
trained_fig = viz.specialisation(rec, image_rows, labels, title="Trained: vision experts vs what the patch shows")
trained_fig

# %% [markdown]
# ### The same architecture at initialisation
#
# The same shapes with freshly drawn weights (the recipe's initialisation, N(0, 0.02)). Routing at
# initialisation is far from uniform: a random router is a fixed random function of the token's
# features, and a patch's features at initialisation are little more than its pixels, so tokens of the
# same colour land on the same expert. That gives a *high* NMI with the background colour before any
# training, higher than the trained model's: a picture's background is the same under all its tokens,
# and the balancing loss spreads those tokens over more experts. What training adds is routing by what
# lies under a token, its shape's colour and kind: compare each attribute's best layer.

# %%
untrained = architectures.build(model.config).init_weights(std=0.02, seed=0).eval()
rec0, rows0, labels0 = viz.route_scenes(untrained, tokenizer, scene_list)
display(viz.specialisation(rec0, rows0, labels0, title="At initialisation: the same measurement"))


def nmi_per_layer(record, rows, values):
    return [round(r["nmi"], 3) for r in routing.specialisation(record, rows, values)]


print("NMI per MoE layer", layers)
best = {}
for attribute in labels:
    trained_nmi, initial_nmi = nmi_per_layer(rec, image_rows, labels[attribute]), nmi_per_layer(rec0, rows0, labels0[attribute])
    best[attribute] = max(trained_nmi), max(initial_nmi)
    print(f"  {attribute:12s} trained {trained_nmi}   initialisation {initial_nmi}")
for attribute in ("colour", "kind"):
    trained_best, initial_best = best[attribute]
    assert trained_best > initial_best + 0.1, f"after training, some layer's experts should track the {attribute} far more"
    print(f"best layer, NMI(expert; {attribute}): trained {trained_best} against {initial_best} at initialisation")

# %% [markdown]
# **Exercise · the NMI by hand (core, 10 min).** Write `nmi(table)` for a count table (a float tensor,
# experts x labels: how many tokens of each label chose each expert):
# $\mathrm{NMI} = 2\,I(A;B) / (H(A) + H(B))$, with $I(A;B) = \sum_{x,y} p(x,y)\log\frac{p(x,y)}{p(x)\,p(y)}$
# and $H(A) = -\sum_x p(x)\log p(x)$, every probability a count over $n$; empty cells count 0. The check
# draws fresh tables (with an expert nobody chose); the cell after it recomputes the first MoE layer's
# colour number above.

# %%
def nmi(table):
    """() NMI of a (A, B) table of counts; p(x, y) = table / table.sum(), p(x) and p(y) its row / column sums."""
    ...   # your code here


nmi = exercises.use("06.nmi", nmi, kit=lambda table: torch.tensor(
    2 * routing.information(table)[0] / (routing.information(table)[1] + routing.information(table)[2])))

# %%
first_layer = rec.layers[0]
top1 = first_layer.expert_ids[image_rows, 0].tolist()
yours = nmi(routing.contingency(top1, labels["colour"]).float())
kits = routing.specialisation(rec, image_rows, labels["colour"])[0]["nmi"]
print(f"first MoE layer, colour: yours {yours.item():.3f}, routing.specialisation {kits:.3f}")
assert abs(yours.item() - kits) < 1e-4

# %% [markdown]
# The text group, by a simple word class (words, digits, punctuation, other):

# %%
texts = [scenes.caption(s) + "." for s in scene_list] + ["There are 3 shapes: 1 circle, 2 squares; 0 triangles!"]
text_rec, text_rows, classes = viz.route_texts(model, tokenizer, texts)
viz.specialisation(text_rec, text_rows, {"word class": classes}, group=TEXT,
                   title="Trained: text experts vs word class")

# %% [markdown]
# ## 6 · Routing over training: when do the routers settle? · optional, 9 min
#
# OLMoE's analysis asks how early each layer's top-k choices match the final model's ("router
# saturation"). A short retraining of the same recipe keeps checkpoints at a few steps
# (`TrainConfig(keep_checkpoints_at=...)`); every checkpoint routes the same held-out scenes, and we
# count the share of each token's k experts that the last checkpoint also chose. Chance is k / E.
# (`make figures` draws this for a longer run into `figures/routing_saturation.png`.)

# %%
import copy
import tempfile

from ernie_lab.train import TrainConfig, Trainer, checkpoints

steps = 8 if FAST else 120
keep = tuple(sorted({steps // 6, steps // 3, steps // 2, steps}))
start = architectures.build(model.config).init_weights(std=0.02, seed=0)
at_zero = copy.deepcopy(start).eval()                      # step 0: the initialisation itself
probe = [render_prompt(model, tokenizer, viz.messages_for(scenes.DESCRIBE, scenes.render(s))) for s in scene_list[:6]]
with tempfile.TemporaryDirectory(prefix="routing-run-") as run_dir:   # the checkpoints go once their routing is read
    data = tiny_models.vl_batches(tokenizer, start.config, batch_size=4 if FAST else 16)
    config = TrainConfig(lr=1e-3, max_steps=steps, warmup_steps=max(steps // 10, 1), out_dir=run_dir,
                         keep_checkpoints_at=keep, log_every=max(steps // 4, 1), balance=0.01, progress=False,
                         frozen_steps=tiny_models.vl_frozen_steps(steps // 6),   # the shipped main run (no eye warm-up)
                         lr_scale=tiny_models.VL_LR_SCALE)
    Trainer(start, data, config).fit()
    kept = [(0, at_zero)] + checkpoints(run_dir)         # (step, model or step-N folder)
    over_time = viz.records_over_training(kept, probe)
print("checkpoints at steps", [step for step, _ in over_time])
viz.saturation(over_time, over_time[-1][1])

# %%
steps_seen, agreement = routing.saturation(over_time, over_time[-1][1], VISION)
assert torch.allclose(agreement[-1], torch.ones(len(layers)))  # the final model agrees with itself
print("vision top-k overlap with the final checkpoint (rows: steps, columns: MoE layers):")
print(agreement)

# %% [markdown]
# ## 7 · The explorer · core, 4 min
#
# `ernie_lab.widgets.RoutingExplorer` puts the pictures above behind controls: a bundled scene or
# photograph (or an upload), a prompt, the layer, the group, the top-k rank and the view; the position
# slider selects one image token (modality "vision") or text token ("text") and lists its experts and
# weights in every layer; the model's answer to the prompt is shown above the picture. Pictures reach
# the model squeezed to 112 x 112, as it was trained. Where widgets do not render (GitHub, nbviewer, the
# HTML site) the same output shows a static picture of the explorer's first view instead.

# %%
from ernie_lab.analysis.widgets import RoutingExplorer

explorer = RoutingExplorer(model, tokenizer)
explorer  # the live widget (a static picture of it where widgets do not render)

# %% [markdown]
# ## 8 · Pointing it at a real checkpoint · optional, 5 min
#
# Everything here takes any ERNIE 4.5 VL (or text-MoE) model that `ernie_lab.load_model` loads. On a
# machine with the weights in its Hugging Face cache (about 58 GB in bf16 for VL-28B-A3B; the pictures
# need one forward pass, no gradients). A laptop can hold it with the experts rounded to int4 as they are
# read: `benchmarks/big_moe.py` loads a checkpoint of VL-28B-A3B's exact shape (random weights) that way
# on a 2-core, 24 GB machine at a peak of 15.5 GiB, in under five minutes. The routers stay in float32,
# so the tokens route as in bf16 up to the experts' rounding in earlier layers:
#
# ```python
# model = ernie_lab.load_model("baidu/ERNIE-4.5-VL-28B-A3B-PT", dtype=torch.bfloat16,   # or a local folder
#                              quantize="w4a16")                 # drop this line where 64 GB of memory is free
# tokenizer = ernie_lab.load_tokenizer("baidu/ERNIE-4.5-VL-28B-A3B-PT")
# routed = viz.route(model, tokenizer, "Describe the picture.", scenes.photos(["astronaut"])[0].image)
# viz.load_heatmap(routed.record)          # 64 text + 64 vision experts, 28 layers
# viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=10)
# RoutingExplorer(model, tokenizer, image_size=None)   # pictures keep their shape (at most 448 px)
# ```
#
# With 64 experts per group the pictures switch to sparser tick labels and write the expert only where
# it fits; `token_strip` shows 8 of the 28 layers unless given `layers=[...]`. The test suite draws
# every picture on a random 64-expert checkpoint that `transformers` saved, and on a 28-layer record.

# %% [markdown]
# ## 9 · Exercises · optional, 20 min
#
# 1. Record a generation: call `ernie_lab.generate(model, ...)` on a chat prompt with `routing.record`
#    around it (your `record_routing` runs one forward pass only). Which rows are the prompt and which the
#    decoding steps? (The prompt comes first, then B tokens per step.) Does a generated word route to the
#    same text experts as the same word in the prompt?
# 2. Make the balancing bias do its work: add 0.5 to one vision expert's correction bias in the last MoE
#    layer (`moe_statics.e_score_correction_bias[1, e]`), record the picture again with your recorder and
#    compare with the record above. The expert's load rises; are the weights of the tokens that now
#    choose it large or small, and why (what does the bias change, what does it leave alone)?
# 3. A hook can also change what a module returns. What happens to the model's output if your hook
#    returns something instead of None? Why must a recorder's hook return None?

# %% [markdown]
# ## Key takeaways
#
# * Text tokens went only to text experts and vision tokens (placeholders and their markers) only to
#   vision experts, and each group's load adds up to its tokens times k: the isolation is exact.
# * Image tokens pick their vision expert by what they show, and the counts say by how much. At
#   initialisation this is already so for raw colour (a random router hashes the pixels), most of all
#   for the background; training with the balancing loss spreads that load and makes the first MoE layer
#   route by the shape under a token, its colour and kind, three times as tightly as at initialisation.
# * A routing record is one forward hook per MoE block: the block returns its decisions (experts chosen
#   with the correction bias, renormalised weights, logits, group) and the hook keeps a detached copy,
#   named by the decoder layer; the hooks go in a `finally`, so a failing pass leaves nothing behind.
#
# ## What we built
#
# * `record_routing(model, inputs)`: your routing record from forward hooks, checked against
#   `ernie_lab.routing.record` on fresh text and vision-language MoEs, and the record behind the patch,
#   token and path pictures here.
# * `nmi(table)`: the normalised mutual information behind `routing.specialisation`.
# * Pictures of where a trained VL model routes image and text tokens, a measurement of specialisation
#   against the same architecture at initialisation, and router saturation over a short retraining.
#
# **What comes next:** notebook **07** makes the weights smaller (weight-only quantization); the routing
# pictures here are a quick way to see whether a quantized MoE still routes as the original does
# (`routing.agreement` of the two records).
#
# ## Further reading
#
# * Baidu ERNIE Team (2025), [ERNIE 4.5 Technical Report](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf):
#   the heterogeneous MoE whose text and vision experts are separate groups with their own routers
#   (modality-isolated routing), the design whose routing this notebook draws.
# * Muennighoff et al. (2024), [OLMoE: Open Mixture-of-Experts Language Models](https://arxiv.org/abs/2409.02060):
#   routing analyses of an open MoE (router saturation over training, co-activation, domain and
#   vocabulary specialisation), the source of section 6's measurement; OLMoE has one pool of experts for
#   text only, where ERNIE's groups are separated by modality by construction.
# * Zoph et al. (2022), ST-MoE: Designing Stable and Transferable Sparse Expert Models: finds encoder
#   experts specialising by token type (punctuation, proper nouns, ...) in one shared pool; in ERNIE the
#   first split, text versus vision, is not learnt but fixed by the token's modality.
# * Jiang et al. (2024), [Mixtral of Experts](https://arxiv.org/abs/2401.04088): its routing analysis
#   sees no clear topic specialisation but a structure by syntax and by position (consecutive tokens often
#   share an expert); a reminder to measure specialisation against a baseline, as section 5 does.
# * Strehl and Ghosh (2002), Cluster Ensembles: A Knowledge Reuse Framework for Combining Multiple
#   Partitions (JMLR): mutual information normalised to [0, 1] to compare two labellings; they divide by
#   the geometric mean of the entropies, this notebook (like scikit-learn's default) by their arithmetic
#   mean.

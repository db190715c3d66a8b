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
# # 04 · The multimodal mixture of experts
#
# **What you will learn:** modality-isolated routing (text experts and vision experts), narrow vision
# experts, the 3-D positions of a chat with pictures, why balancing is computed per modality, and the
# parameter arithmetic of the VL models. You write the MoE block, the 3-D positions and the text group's
# balancing loss yourself; the notebook goes on with your pieces.
#
# **Time:** 97 min (core 80 min). **Memory:** under 2 GB.
#
# Notebook 03 turned pictures into tokens of the decoder's width. Here they meet the decoder, whose
# feed-forward layers are a **heterogeneous mixture of experts** with **modality-isolated routing**:
#
# * every MoE layer holds two groups of experts: 64 *text* experts and 64 *vision* experts;
# * a text token is routed by the text router among the text experts only, a vision token (an image or
#   video placeholder, or the start/end marker around a picture) by the vision router among the
#   vision experts only; shared experts see every token;
# * the groups have different widths: 1536 for text, 512 for vision in the 28B model.
#
# We build a small random model in `transformers`, load it with `ernie_lab`, check that both agree
# (logits, positions, every routing decision, greedy decoding), look at the routing, write the MoE block
# and the 3-D positions by hand, see why the load-balancing loss is computed per modality, and count the
# parameters of the real models. `ERNIE_LAB_FAST=1` shrinks the inputs; every check still runs.

# %%
# %matplotlib inline
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib.cbook as cbook
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

import ernie_lab
from ernie_lab import exercises, notebook, routing
from ernie_lab.model.moe import moe_blocks
from ernie_lab import family as F
from ernie_lab.train.losses import load_balancing_loss, modality_balancing_losses
from ernie_lab.course.notebook import draw_expert_choices, setup
from ernie_lab.io.processor import VLProcessor
from ernie_lab.model.rope import apply_rope
from ernie_lab.model.rope3d import modality_types, position_ids_3d, rope_angles_3d, routing_types
from ernie_lab.model.vision import tokens_per_item

FAST = setup()  # fast mode: from ERNIE_LAB_FAST (make lab FAST=1); write FAST = True here to force it
USE_REAL_WEIGHTS = False  # True: also use a real checkpoint a lecturer has cached (never downloads)
picture = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")

# %% [markdown]
# ## 1 · A small random VL model, saved the way the Hub stores it · core, 5 min
#
# The reference is `transformers`' `Ernie4_5_VLMoeForConditionalGeneration` with a small decoder
# (3 layers, width 64, 4 text + 4 vision experts, top-2, one shared expert; weights drawn wider than
# the default so that greedy decoding does not just repeat one token) but the real rotary
# layout (head_dim 128, `mrope_section` [22, 22, 20]). `transformers` initialises routers to zero, so
# every token would pick the same experts: we re-draw the routers and their correction biases.
# `save_pretrained` writes the Hub layout: one expert list per layer (text experts first), the
# routers as `gate.weight` / `gate.weight_1`, a (2, E) `moe_statics.e_score_correction_bias`.

# %%
from safetensors import safe_open
from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

E = 4
ref_config = Ernie4_5_VLMoeConfig(
    text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=128, moe_intermediate_size=[32, 16], moe_k=2,
                     moe_num_experts=E, moe_num_shared_experts=1, vocab_size=103424, initializer_range=0.15),
    vision_config=dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, initializer_range=0.08),
)
reference = Ernie4_5_VLMoeForConditionalGeneration(ref_config).eval()
notebook.spread_reference_routers(reference, bias=0.05)  # decisive routing in a random model (no near-ties)
folder = Path(tempfile.mkdtemp()) / "tiny-vl"
reference.save_pretrained(folder)
with safe_open(str(folder / "model.safetensors"), "pt") as f:
    for name in sorted(f.keys()):
        if name.startswith("model.layers.1.mlp.") and ("experts.0." in name or "experts.4." in name or "gate" in name
                                                      or "statics" in name):
            print(f"{name:55s} {list(f.get_slice(name).get_shape())}")

# %%
model = ernie_lab.load_model(folder)
shutil.rmtree(folder.parent)  # loaded: the temporary checkpoint can go
print(type(model).__name__, f"{model.num_parameters():,} parameters")
print("MoE layers:", model.vl_config.moe_layers)
print(model.layers[1].mlp)

# %% [markdown]
# ## 2 · The reference check · core, 5 min
#
# A prompt built by `ernie_lab.processor.VLProcessor`: text, a picture, text. The processor inserts one
# placeholder id per adapter token; `transformers` also needs two token-type tensors
# (`mm_token_type_ids`: 1 on placeholders, for positions; `moe_mm_token_type_ids`: also 1 on the
# start/end markers, for routing), which `ernie_lab` derives from the ids itself.

# %%
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # no real tokenizer here: the kit's stand-in carries the same special ids
    tokenizer = ernie_lab.load_tokenizer()
side = 28 * (4 if FAST else 8)
processor = VLProcessor(tokenizer, image_max_pixels=side * side)
messages = [{"role": "user", "content": [{"type": "image", "image": picture},
                                         {"type": "text", "text": "Who is this?"}]}]
inputs = processor(messages)
ids = inputs["input_ids"]
pixels = {k: v for k, v in inputs.items() if k != "input_ids"}
print("prompt:", ids.shape[1], "tokens, of which", tokens_per_item(pixels["image_grid_thw"])[0], "picture tokens")

with torch.no_grad():
    expected = reference(input_ids=ids, mm_token_type_ids=modality_types(ids),
                         moe_mm_token_type_ids=routing_types(ids), **pixels).logits
    with routing.record(model) as record:
        logits = model(ids, **pixels).logits
print("max |logits difference|:", float((logits - expected).abs().max()))
assert (logits - expected).abs().max() < 1e-4

# %%
# every routing decision: which experts the reference's two routers per layer chose
with torch.no_grad(), notebook.reference_routing(reference) as choices:
    reference(input_ids=ids, **notebook.reference_vl_inputs(ids), **pixels)
vision_rows = routing_types(ids)[0] > 0
for entry in record.layers:
    assert torch.equal(entry.expert_ids[~vision_rows], choices[entry.layer_idx, 0][0])
    assert torch.equal(entry.expert_ids[vision_rows], choices[entry.layer_idx, 1][0])
print("routed experts equal for all", ids.shape[1], "tokens in", len(record.layers), "MoE layers")

# greedy decoding, 10 tokens
ref_out = notebook.reference_vl_generate(reference, ids, 10, **pixels)
our_out = ernie_lab.generate(model, ids, 10, eos_token_id=[], **pixels)
print("reference:", ref_out[0, -10:].tolist())
print("ernie_lab:", our_out[0, -10:].tolist())
assert torch.equal(our_out, ref_out)
assert len(set(ref_out[0, -10:].tolist())) > 1, "a continuation of one repeated token would be a weak check"

# %% [markdown]
# "Who is this?" is a question random weights cannot answer. The kit's tiny trained VL model
# (`data/tiny-ernie-vl/`, trained on pictures of shapes; see its `TRAINING.md`) can answer questions about
# a picture of the kind it learned, here one it never saw; the real VL-28B-A3B answers about the
# photograph with `USE_REAL_WEIGHTS` (below).

# %%
TINY_VL = notebook.repo_path("data", "tiny-ernie-vl")
from ernie_lab import scenes, tiny_models

tiny_vl, tiny_tokenizer = ernie_lab.load_model(TINY_VL), ernie_lab.load_tokenizer(TINY_VL)
held_out = tiny_models.held_out_scenes(1)[0]
plt.figure(figsize=(3, 3)); plt.imshow(scenes.render(held_out)); plt.axis("off"); plt.title("a held-out scene")
plt.show()
for qa in scenes.questions(held_out)[:3]:
    reply = ernie_lab.chat(tiny_vl, tiny_tokenizer, scenes.conversation(scenes.render(held_out), qa.question, "")[:1],
                           max_new_tokens=8)
    print(f"{qa.question:<36} model: {reply!r:<16} truth: {qa.answer_word}")

# %% [markdown]
# The tiny model also saw a few real photographs during training, the ones scikit-image ships
# (`scenes.photos()`), each with a hand-written caption. Ask it "Who is this?" about the astronaut
# photograph: it answers with what it learned about that picture. That is memory, not understanding
# (it has seen 15 photographs, each many times), but it is a real answer read from the pixels: the
# prompt is the same for every photograph, only the picture tokens differ.

# %%
photos = {name: (image, caption) for name, image, caption in tiny_models.photo_images()}
for name in ("astronaut", "coffee"):
    image, caption = photos[name]
    reply = ernie_lab.chat(tiny_vl, tiny_tokenizer, [{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": "Who is this?"}]}], max_new_tokens=24)
    print(f"{name:<10} model: {reply}")
    assert reply.split()[:3] == caption.split()[:3], f"the tiny model should recall the {name} photograph"

# %% [markdown]
# ## 3 · Modality-isolated routing, seen · core, 5 min
#
# `routing.record` keeps, for every MoE layer and token, the chosen experts **numbered inside their
# group** and the token's modality (0 text, 1 vision). To draw them we must label the two groups
# apart: text experts T0..T3 and vision experts V0..V3 are different networks, even though both are
# numbered 0..3 inside their group.

# %%
entry = record.layers[0]
columns = torch.zeros(ids.shape[1], 2 * E)            # token x (T0..T3, V0..V3): mixing weight
for t in range(ids.shape[1]):
    offset = E * int(entry.modality[t])
    for j in range(entry.expert_ids.shape[1]):
        columns[t, offset + int(entry.expert_ids[t, j])] = float(entry.weights[t, j])

draw_expert_choices(columns, entry.modality, E,
                    f"Layer {entry.layer_idx}: mixing weight of the experts each token chose (top-{entry.expert_ids.shape[1]})")

text_load, vision_load = entry.load(modality=0), entry.load(modality=1)
print("tokens per text expert:  ", text_load.tolist())
print("tokens per vision expert:", vision_load.tolist())
assert int(text_load.sum()) == 2 * int((entry.modality == 0).sum())    # k = 2 choices per text token
assert int(vision_load.sum()) == 2 * int((entry.modality == 1).sum())
assert columns[~vision_rows][:, E:].sum() == 0 and columns[vision_rows][:, :E].sum() == 0  # isolation

# %% [markdown]
# **With real weights (optional).** With `USE_REAL_WEIGHTS = True` in the first cell and the VL-28B-A3B
# cached on this machine, ask the trained model about the picture. Its 58 GB of bf16 weights are rounded to
# int4 as they are read (`quantize="w4a16"`), so a laptop holds it: 15.5 GiB at the peak of the load,
# measured by `benchmarks/big_moe.py` on a 24 GB machine.

# %%
if USE_REAL_WEIGHTS:
    real_model, real_tokenizer = notebook.cached_model("baidu/ERNIE-4.5-VL-28B-A3B-PT", dtype=torch.bfloat16,
                                                       quantize="w4a16")
    if real_model is not None:
        question = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": "Who is this? Answer in one sentence."}]}]
        print(ernie_lab.chat(real_model, real_tokenizer, question, max_new_tokens=40))
        del real_model

# %% [markdown]
# ## 4 · Heterogeneous experts: narrow vision experts · core, 3 min
#
# Each expert is a SwiGLU with three matrices of `hidden x width`. In the 28B model a text expert is
# 1536 wide, a vision expert 512: a vision expert has a third of the parameters and a third of the
# compute. Pictures bring many tokens (hundreds per image), each of which needs less processing than a
# text token, so the model spends less on each of them.

# %%
hidden, text_width, vision_width = 2560, 1536, 512
per_expert = {"text expert": 3 * hidden * text_width, "vision expert": 3 * hidden * vision_width,
              "2 shared experts": 3 * hidden * 2 * text_width}
fig, ax = plt.subplots(figsize=(6, 2.6))
ax.barh(list(per_expert), [v / 1e6 for v in per_expert.values()], color=["tab:blue", "tab:orange", "tab:gray"])
ax.set_xlabel("parameters (millions)"); ax.set_title("One expert of ERNIE 4.5 VL 28B-A3B")
for y, v in enumerate(per_expert.values()):
    ax.text(v / 1e6, y, f" {v / 1e6:.1f} M", va="center")
ax.set_xlim(0, 30)
plt.show()
shape_28 = F.model_shape(F.CONFIG_VL_28B_A3B)                    # the published config, read by ernie_lab.family
assert (hidden, text_width, vision_width) == (shape_28.hidden_size, shape_28.expert_size, shape_28.vision_expert_size)
assert per_expert["text expert"] == 3 * per_expert["vision expert"]

layer = model.layers[1].mlp   # our tiny model keeps the same pattern: 32-wide text, 16-wide vision experts
print([e.up_proj.out_features for e in layer.experts])

# %% [markdown]
# ## 5 · The modality-isolated MoE block, by hand · core, 20 min
#
# ![The modality-isolated MoE block](../figures/vl_moe_block.png)
#
# This block is the most distinctive idea of ERNIE 4.5: one feed-forward layer holding two *separate*
# mixtures of experts. For a batch of $N$ tokens $x$ (N, H) with a flag `is_vision` (N,):
#
# * **text rows** ($g = 0$): $p = \mathrm{softmax}(W_0 x)$ over the $E$ text experts (float32), the $k$
#   experts with the largest $p + b_0$ are chosen (the correction bias $b_0$ only *chooses*), their plain
#   probabilities are renormalised to weights $w$ that sum to 1, and
#   $y = \sum_j w_j\,\mathrm{TextExpert}_{e_j}(x)$;
# * **vision rows** ($g = 1$): the same with the vision router $W_1$, bias $b_1$ and the vision experts,
#   which are narrower (width 16 here, 512 in the 28B);
# * **every row**: $+\,\mathrm{Shared}(x)$, unscaled.
#
# A text token never reaches a vision expert: the two groups are isolated, so each can specialise on
# its modality and neither crowds out the other. In `ernie_lab` the parts live in `block.routers[g]`
# (a linear layer, weight (E, H)), `block.moe_statics.e_score_correction_bias[g]` (E,),
# `block.group_experts(g)` (E SwiGLU modules, each maps (n, H) to (n, H)), `block.shared_experts`,
# `block.k` and `block.norm_min`. Write the block; the check compares it with `ernie_lab`'s `MoEBlock`
# and `transformers`' `Ernie4_5_VLMoeMoeBlock` on fresh weights and fresh token masks. (The block's own
# `forward` is switched off during the check: that is the thing you are writing.)

# %%
def modality_moe(x, is_vision, block):
    """The VL MoE block. x (N, H) tokens, is_vision (N,) bool -> (N, H).

    For g in (0 text, 1 vision), on the rows of group g only:
      p = softmax(block.routers[g](x_g))                      # (n, E), float32
      chosen = top-k of p + block.moe_statics.e_score_correction_bias[g]   # (n, k)
      w = p[chosen] / sum p[chosen]                           # (n, k), the bias only chooses
      y_g = sum_j w_j * block.group_experts(g)[chosen_j](x_g)  # (n, H)
    then y = y + block.shared_experts(x) for every row.
    """
    ...   # your code here


# %%
def kit_moe(x, is_vision, block):                              # ernie_lab's MoEBlock on one sequence
    return block(x[None], is_vision[None].long()).hidden[0]


modality_moe = exercises.use("04.modality_moe", modality_moe, kit=kit_moe)

# %% [markdown]
# The notebook goes on with your block. We catch what each MoE layer of the tiny model received during
# the reference check of section 2 and run your block on it: it must give what the model's layer gave.
# Then we break every vision expert (zero their output matrices): the text rows must not move at all.

# %%
import copy

seen = {}
hooks = [block.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], args[1], out.hidden)))
         for i, block in enumerate(moe_blocks(model))]
with torch.no_grad():
    model(ids, **pixels)
for hook in hooks:
    hook.remove()

with torch.no_grad():
    for i, block in enumerate(moe_blocks(model)):
        h, groups, out = seen[i]                               # (1, T, H), (1, T), (1, T, H)
        mine = modality_moe(h[0], groups[0].bool(), block)     # (T, H)
        notebook.compare(f"MoE layer {block.layer_idx}: your block vs the model's", mine, out[0], atol=1e-4)

    block = moe_blocks(model)[0]
    broken = copy.deepcopy(block)
    for expert in broken.group_experts(1):
        expert.down_proj.weight.zero_()                        # every vision expert now outputs 0
    h, groups, _ = seen[0]
    is_vision = groups[0].bool()
    before, after = modality_moe(h[0], is_vision, block), modality_moe(h[0], is_vision, broken)
    moved = (after - before).abs().amax(-1)                    # (T,) how far each token's output moved
print(f"vision experts zeroed: text rows moved by at most {moved[~is_vision].max():.1e}, "
      f"vision rows by up to {moved[is_vision].max():.2f}")
assert moved[~is_vision].max() == 0 and moved[is_vision].max() > 0

# %% [markdown]
# ## 6 · 3-D positions of a chat with pictures · core, 20 min
#
# Notebook 03 placed one picture on the (t, h, w) axes. A chat has several: text, a picture, more text,
# a video, ... Walk the sequence in runs of equal token type (0 text, 1 image placeholder, 2 video
# placeholder; the start/end markers are text for positions), with $p$ the next free position:
#
# * a text run of length $n$: positions $p, \dots, p+n-1$ on all three axes; then $p \mathrel{+}= n$;
# * a picture with patch grid $(T, H, W)$: the adapter merged 2 x 2 patches (and, for a video, 2 frames),
#   so its tokens sit on a merged grid of $T' \times H/2 \times W/2$ ($T' = 1$ for an image, $T/2$ for a
#   video), in frame, row, column order: $t = p + \text{frame pair}$, $h = p + \text{row}$,
#   $w = p + \text{column}$; then $p \mathrel{+}= \max(H, W)/2$.
#
# The grids come in order of appearance, one list per kind (`image_grids` (images, 3), `video_grids`
# (videos, 3), as the preprocessor returns them). Positions are only useful through the rotary, so the
# function returns the queries `q` (1, heads, T, 128) rotated with them: build the (3, 1, T) positions,
# then `return rotate(q, positions)` with the helper below (ERNIE's interleaved rotary, the frequency
# pairs split between t, h and w as in notebook 03). The check compares with `transformers`' own
# `get_rope_index` and `ernie_lab.rope3d.position_ids_3d` on fresh random chats.

# %%
def rotate(q, positions):                                      # q (1, heads, T, 128), positions (3, 1, T)
    return apply_rope(q, *rope_angles_3d(positions, 128, 500_000.0))


def rotate_3d(q, token_types, image_grids, video_grids):
    """q (1, heads, T, 128), token_types (1, T) 0/1/2, grids (n, 3) -> q rotated by 3-D positions (3, 1, T)."""
    ...   # your code here


# %%
def kit_rotate_3d(q, token_types, image_grids, video_grids):
    return rotate(q, position_ids_3d(token_types, image_grids, video_grids)[0])


rotate_3d = exercises.use("04.rotate_3d", rotate_3d, kit=kit_rotate_3d)

# %% [markdown]
# Now a real chat from the processor: two pictures of different shapes with text between them. Your
# rotation must equal the one `transformers` applies inside the reference model (its `get_rope_index`,
# then its rotary). Then a property worth seeing: a query and a key on the same picture score by their
# *offset* only, so moving the whole picture later in the chat changes nothing inside it.

# %%
from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (Ernie4_5_VLMoeTextRotaryEmbedding,
                                                                           apply_rotary_pos_emb)

wide = picture.crop((0, 150, 512, 406))                        # a wide strip of the photograph
chat = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "and"},
                                     {"type": "image", "image": wide}, {"type": "text", "text": "Same person?"}]}]
chat_inputs = processor(chat)
chat_ids, chat_grids = chat_inputs["input_ids"], chat_inputs["image_grid_thw"]
chat_types = modality_types(chat_ids)
no_video = torch.zeros(0, 3, dtype=torch.long)
q = torch.randn(1, 2, chat_ids.shape[1], 128)
reference_positions, _ = reference.model.get_rope_index(chat_ids, chat_types, chat_grids, None)
reference_q, _ = apply_rotary_pos_emb(q, q, *Ernie4_5_VLMoeTextRotaryEmbedding(ref_config.text_config)(q, reference_positions))
print("grids", chat_grids.tolist(), "| tokens", chat_ids.shape[1], "| last position", reference_positions[:, 0, -1].tolist())
notebook.compare("your 3-D rotation vs transformers, a chat with two pictures", rotate_3d(q, chat_types, chat_grids, no_video),
                 reference_q, atol=1e-4)

# %%
padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), chat_types], dim=1)   # 7 more text tokens in front
q_pad = torch.cat([torch.randn(1, 2, 7, 128), q], dim=2)
first_picture = (chat_types[0] == 1).nonzero().squeeze(1)[:tokens_per_item(chat_grids)[0]]   # the first picture's tokens
here = rotate_3d(q, chat_types, chat_grids, no_video)[0, 0, first_picture]    # (n, 128)
later = rotate_3d(q_pad, padded, chat_grids, no_video)[0, 0, first_picture + 7]
scores_here, scores_later = here @ here.T, later @ later.T                    # (n, n) q.k inside the picture
print(f"scores inside the picture, moved 7 positions later: max change {(scores_here - scores_later).abs().max():.1e}")
assert torch.allclose(scores_here, scores_later, atol=1e-3)

# %% [markdown]
# ## 7 · Why the balancing loss is computed per modality · core, 15 min
#
# The load-balancing loss $L = E \sum_e f_e P_e$ ($f_e$: share of the token choices that went to expert
# $e$, $P_e$: mean router probability of $e$) is smallest when the load is even. The two groups share no
# experts, and their token counts differ wildly from batch to batch. Pooled into one table, a balanced
# group hides a collapsed one. So ERNIE computes the loss per group: write the text group's.
#
# With the text rows only ($n$ tokens): $f_e$ = the share of those tokens whose top-$k$ (of the plain
# probabilities) holds $e$, $P_e$ = their mean probability of $e$, $L_\text{text} = E \sum_e f_e P_e$.
# Uniform routing gives $k$, a collapse onto $k$ experts gives $E$. Return a Python number.

# %%
def text_balance_loss(probs, is_vision, k):
    """probs (N, E) router probabilities (each row from its own group's router), is_vision (N,) bool, k.

    text = probs[~is_vision]                         # (n, E)
    f_e = (tokens whose top-k holds e) / n,  P_e = mean of text[:, e]
    return E * sum_e f_e P_e   (a float)
    """
    ...   # your code here


# %%
def kit_text_loss(probs, is_vision, k):
    return modality_balancing_losses([probs.log()], is_vision.long(), k=k)["text"].item()


text_balance_loss = exercises.use("04.text_balance_loss", text_balance_loss, kit=kit_text_loss)

# %% [markdown]
# Below, with your function: text tokens collapse onto expert 0 while vision tokens are split evenly
# (E = 2, k = 1). The vision group's loss is the same function with the flags flipped; the pooled loss
# treats every row as one group.

# %%
probs = torch.tensor([[0.8, 0.2], [0.8, 0.2],      # two text tokens: both choose expert 0
                      [0.7, 0.3], [0.3, 0.7]])     # two vision tokens: one each
is_vision = torch.tensor([False, False, True, True])
text_only, vision_only = text_balance_loss(probs, is_vision, 1), text_balance_loss(probs, ~is_vision, 1)
pooled = text_balance_loss(probs, torch.zeros(4, dtype=torch.bool), 1)
print(f"text {text_only:.3f}   vision {vision_only:.3f}   pooled {pooled:.3f}   (balanced = 1.0)")
assert math.isclose(text_only, 1.6, rel_tol=1e-6) and math.isclose(vision_only, 1.0, rel_tol=1e-6)
assert math.isclose(pooled, load_balancing_loss(probs.log(), k=1).item(), rel_tol=1e-6)
assert pooled < text_only   # pooling dilutes the text group's collapse

# %% [markdown]
# The dilution grows with the picture: as more vision tokens join the batch, the pooled loss drifts to
# the vision group's value and stops seeing the collapsed text group at all.

# %%
n_vision = [2, 8, 32, 128, 512] if FAST else [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
pooled_values = []
for n in tqdm(n_vision, desc="vision tokens"):
    vision = torch.tensor([[0.7, 0.3], [0.3, 0.7]]).repeat(n // 2, 1)
    table = torch.cat([probs[:2], vision])                          # (2 + n, 2)
    pooled_values.append(text_balance_loss(table, torch.zeros(len(table), dtype=torch.bool), 1))
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.semilogx(n_vision, pooled_values, "o-", label="pooled over both groups")
ax.axhline(text_only, color="tab:red", ls="--", label="text group alone (collapsed)")
ax.axhline(1.0, color="gray", ls=":", label="perfectly balanced")
ax.set_xlabel("vision tokens in the batch (2 text tokens)"); ax.set_ylabel("load-balancing loss")
ax.set_title("A collapsed text group disappears in the pooled loss"); ax.legend()
plt.show()
assert pooled_values[-1] < 1.01 and pooled_values[0] > pooled_values[-1]


# %% [markdown]
# ## 8 · Experiment: balance each group with its bias alone · optional, 10 min
#
# ERNIE keeps one
# correction-bias row per group (`block.moe_statics.e_score_correction_bias[group]`, 0 text, 1 vision).
# Write `balance_groups(model, batches, gamma)`: for each batch, record the routing, and for each MoE
# block and each group nudge that group's bias by $\gamma\,\mathrm{sign}(\bar f - f_e)$, with $f$ from
# `rec.load_fraction(modality=group)`. The cell after it runs your function on the tiny model above and
# prints each group's imbalance before and after; the weights stay as they are.

# %%
def balance_groups(model, batches, gamma=0.005):
    ...   # your code here


# %%
def group_imbalance(model, group):
    with torch.no_grad(), routing.record(model) as rec:
        model(ids, **pixels)
    shares = rec.load_fraction(modality=group)                    # (MoE layers, E)
    return (shares.max(-1).values * shares.shape[-1]).mean().item()


biases_before = [b.moe_statics.e_score_correction_bias.clone() for b in moe_blocks(model)]
before = [group_imbalance(model, g) for g in (0, 1)]
balance_groups(model, [ids] * 30)
if all(torch.equal(b.moe_statics.e_score_correction_bias, old) for b, old in zip(moe_blocks(model), biases_before)):
    print("(write balance_groups above to run this experiment)")
else:
    after = [group_imbalance(model, g) for g in (0, 1)]
    print(f"imbalance, text group: {before[0]:.2f} -> {after[0]:.2f}; vision group: {before[1]:.2f} -> {after[1]:.2f}")
    for block, old in zip(moe_blocks(model), biases_before):           # undo, for the sections below
        block.moe_statics.e_score_correction_bias.copy_(old)

# %% [markdown]
# ## 9 · Parameter arithmetic: 28B-A3B and 424B-A47B · optional, 7 min
#
# Per layer, with width $h$, $H$ query and $H_{kv}$ key/value heads of size $d$:
#
# * attention: $2hHd + 2hH_{kv}d$; two RMSNorms: $2h$;
# * dense layer: a SwiGLU of width $I$: $3hI$;
# * MoE layer: $E$ text experts $3hI_t$ each, $E$ vision experts $3hI_v$ each, shared experts $3h\,S I_t$,
#   two routers $2Eh$ and the correction biases $2E$.
#
# Plus the embedding $Vh$ (tied with the LM head), a final norm, the ViT and the adapter. *Active* per
# token counts the $k$ chosen experts of the token's own group instead of all of them.

# %%
def vit_params(width=1280, depth=32, mlp=5120, patch=14):
    block = 4 * width * width + 4 * width + 2 * width * mlp + mlp + width + 4 * width   # qkv+proj, fc1+fc2, 2 LayerNorms
    return 3 * patch * patch * width + depth * block + 2 * width


def adapter_params(width=1280, text_hidden=2560):
    merged = 4 * width
    spatial = 2 * (merged * merged + merged) + 2 * merged
    temporal = (2 * merged * merged + merged) + (merged * merged + merged) + 2 * merged
    return spatial + temporal + merged * text_hidden + text_hidden + text_hidden


def decoder_params(V, h, L, H, Hkv, d, I, E, k, It, Iv, S, moe_layers, tied=True):
    attention = 2 * h * H * d + 2 * h * Hkv * d + 2 * h
    groups = 2 if Iv else 1                               # a text-only model has one expert group
    router = E * h + E                                    # one router's weights + its correction biases
    dense, moe = L - moe_layers, moe_layers
    total = V * h * (1 if tied else 2) + h + L * attention + dense * 3 * h * I \
        + moe * (3 * h * S * It + groups * router + E * 3 * h * (It + Iv))
    # active per text token: the output projection once (the input lookup multiplies nothing), the text
    # group's router, the shared experts and the k chosen text experts
    active_text = V * h + h + L * attention + dense * 3 * h * I + moe * (3 * h * S * It + router + k * 3 * h * It)
    return total, active_text


vl28 = decoder_params(V=103424, h=2560, L=28, H=20, Hkv=4, d=128, I=12288, E=64, k=6, It=1536, Iv=512, S=2, moe_layers=27)
vision_28 = vit_params() + adapter_params(text_hidden=2560)
total_28 = vl28[0] + vision_28
counts_28 = F.count_params(F.CONFIG_VL_28B_A3B)                 # the one source of the headline numbers
assert (total_28, vl28[1]) == (counts_28.total, counts_28.active), "the formula must agree with ernie_lab.family"
print(f"VL-28B-A3B: decoder {vl28[0] / 1e9:.2f} B + ViT and adapter {vision_28 / 1e9:.2f} B = {total_28:,} parameters")
print(f"            active per text token {counts_28.active / 1e9:.2f} B, "
      f"per vision token {F.count_params(F.CONFIG_VL_28B_A3B, 'vision').active / 1e9:.2f} B (ernie_lab.family)")

# %%
# check: the same count from transformers' reference class, and from ernie_lab's model, both on the meta device
from ernie_lab.model.vl_model import ErnieVLForConditionalGeneration, VLConfig

with torch.device("meta"):
    hf_count = sum(p.numel() for p in Ernie4_5_VLMoeForConditionalGeneration(Ernie4_5_VLMoeConfig()).parameters())
    lab_count = ErnieVLForConditionalGeneration(VLConfig.from_dict(Ernie4_5_VLMoeConfig().to_dict())).num_parameters()
print(f"transformers {hf_count:,}   ernie_lab {lab_count:,}   formula {total_28:,}")
assert hf_count == lab_count == total_28
assert 28e9 < vl28[0] < 29e9          # "28B": the language model; the ViT and adapter add 0.8 B
assert 2.9e9 < vl28[1] < 3.5e9        # "A3B": about 3 B active per text token

# %% [markdown]
# ### 424B-A47B
#
# The large VL model shares its decoder shape with ERNIE-4.5-300B-A47B (54 layers of width 8192, 64
# query / 8 KV heads, dense width 28672, 3 dense layers then MoE, 64 text experts of width 3584, top-8,
# no shared experts, untied embeddings) and adds 64 vision experts per MoE layer. Its config.json is
# not on this machine, so the vision-expert width is *inferred*: the 124 B that separate 424 B from
# 300 B, spread over 51 MoE layers x 64 experts x 3 x 8192, give a width of about 1536. (In the 28B the
# vision width is a third of the text width; 1536 is no such simple fraction of 3584, so treat it as the
# number the published total implies.) Point the formula at the published config.json to replace it.

# %%
text300 = decoder_params(V=103424, h=8192, L=54, H=64, Hkv=8, d=128, I=28672, E=64, k=8, It=3584, Iv=0, S=0,
                         moe_layers=51, tied=False)
vl424 = decoder_params(V=103424, h=8192, L=54, H=64, Hkv=8, d=128, I=28672, E=64, k=8, It=3584, Iv=1536, S=0,
                       moe_layers=51, tied=False)
total_424 = vl424[0] + vit_params() + adapter_params(text_hidden=8192)
counts_300, counts_424 = F.count_params(F.CONFIG_300B_A47B), F.count_params(F.CONFIG_VL_424B_A47B)
assert (text300[0], text300[1]) == (counts_300.total, counts_300.active)
assert (total_424, vl424[1]) == (counts_424.total, counts_424.active)
print(f"300B-A47B : total {counts_300.total / 1e9:6.2f} B, active {counts_300.active / 1e9:.2f} B")
print(f"VL-424B   : total {counts_424.total / 1e9:6.2f} B, active per text token {counts_424.active / 1e9:.2f} B, "
      f"per vision token {F.count_params(F.CONFIG_VL_424B_A47B, 'vision').active / 1e9:.2f} B")

fig, ax = plt.subplots(figsize=(7, 3))
names = ["VL-28B-A3B", "VL-424B-A47B"]
totals, actives = [total_28 / 1e9, total_424 / 1e9], [vl28[1] / 1e9, vl424[1] / 1e9]
ax.bar(np.arange(2) - 0.2, totals, 0.4, label="total")
ax.bar(np.arange(2) + 0.2, actives, 0.4, label="active per text token")
ax.set_yscale("log"); ax.set_ylim(1, 2000); ax.set_xticks(range(2), names); ax.set_ylabel("parameters (billions, log scale)")
ax.set_title("Total vs active parameters"); ax.legend()
for x, (t, a) in enumerate(zip(totals, actives)):
    ax.text(x - 0.2, t, f"{t:.0f}", ha="center", va="bottom"); ax.text(x + 0.2, a, f"{a:.1f}", ha="center", va="bottom")
plt.show()

# %% [markdown]
# ## Exercises · core, 7 min
#
# Each exercise is a stub, followed by a check from `ernie_lab.exercises`: "not attempted yet" and a hint
# until you write something, a message saying what differs when it is wrong, "correct" when it is right.
# The solutions, with their reasoning, are in `solutions/04_multimodal_moe.py`. (Sections 5 to 7 held
# the exercises you built the notebook with: the MoE block, the 3-D positions, the text group's loss.)
#
# **Exercise · The vision experts' weight.** In the 28B model, how many parameters does one MoE layer
# hold in its *vision* experts alone?

# %%
vision_experts_per_layer = None   # your answer: a number

exercises.check("04.vision_experts", vision_experts_per_layer)

# %% [markdown]
# ## Key takeaways
#
# * Each MoE layer of the VL models holds two expert groups with their own routers and correction biases;
#   a token is routed only inside its own modality's group, and the shared experts see every token. You
#   wrote that block in about twenty lines and it equals `transformers`' on the same weights.
# * Vision experts are narrower (512 vs 1536 in the 28B): picture tokens are many and cheap.
# * In a chat, text counts up one position per token, while a picture spreads over a (t, h, w) grid and
#   costs only its longer merged side in positions; attention inside a picture sees offsets only.
# * A pooled balancing loss hides a collapsed group; ERNIE balances each modality separately.
#
# ## What we built
#
# * `modality_moe` (yours): the modality-isolated heterogeneous MoE block, the kit's `moe.MoEBlock` with
#   two groups;
# * `rotate_3d` (yours): 3-D positions of a chat with several pictures, the kit's `rope3d.position_ids_3d`;
# * `text_balance_loss` (yours): the per-modality balancing loss, the kit's `losses.modality_balancing_losses`;
# * `ernie_lab.vl_model.ErnieVLForConditionalGeneration`, loaded by `ernie_lab.load_model` from a
#   `ernie4_5_vl_moe` checkpoint, equal to `transformers` in logits, positions, routing and decoding;
#   `ernie_lab.processor.VLProcessor`: a conversation with pictures -> ids and pixels.
#
# **What comes next:** notebook **05** trains the tiny models of this course, notebook **06** looks
# inside them (attention and routing pictures).
#
# ## Further reading
#
# * Baidu ERNIE Team (2025), [ERNIE 4.5 Technical Report](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf):
#   the heterogeneous MoE with modality-isolated routing, narrower vision experts and per-modality
#   balancing that this notebook rebuilds.
# * Fedus, Zoph, Shazeer (2021), [Switch Transformers](https://arxiv.org/abs/2101.03961): the
#   load-balancing loss $E \sum_e f_e P_e$; ERNIE applies it to each modality's group on its own tokens.
# * Dai et al. (2024), [DeepSeekMoE](https://arxiv.org/abs/2401.06066): fine-grained experts plus
#   always-on shared experts; ERNIE keeps the shared experts and adds a second, modality-specific group.
# * Mustafa et al. (2022), [Multimodal Contrastive Learning with LIMoE](https://arxiv.org/abs/2206.02770):
#   one MoE for images and text whose experts specialise by themselves under per-modality balancing
#   losses; ERNIE instead separates the groups by construction (routing is isolated, not learnt).
# * Wang et al. (2024), [Qwen2-VL](https://arxiv.org/abs/2409.12191): M-RoPE, the (t, h, w) positions
#   with text continuing after a picture's largest position; ERNIE interleaves the h and w frequencies
#   and gives time the slowest ones.

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
# # 05 · Train a tiny ERNIE from scratch
#
# Notebooks 01, 02 and 04 loaded models that the kit had already trained (the shipped tiny models in
# `data/`), and notebook 03 ran its vision encoder with random weights. Here we train one ourselves, of the real ERNIE 4.5 VL architecture (ViT with 2-D RoPE,
# the adapter's 2x2 merge, 3-D RoPE, modality-isolated experts of two widths, a shared expert), on data
# that a few lines of Python draw: pictures of coloured shapes, with questions about them.
#
# You write the heart of it yourself: the answer-only loss, the learning-rate schedule and one whole
# training step, each checked against the kit's `Trainer`, which then trains the model.
#
# **What you will learn:** how training data for a vision-language model is built (and which tokens carry
# loss), what the training loop does (AdamW, warm-up + cosine, clipping, the MoE balancing losses), how
# a loss curve tells you it is learning, and how the same loop runs on several GPUs with `torchrun`.
#
# **Time:** 93 min (core 78 min). **Memory**: under 2 GB.
# **Fast mode** (`FAST = True` below, or `make lab FAST=1`) trains a few steps to show the loop, then loads
# the shipped checkpoint `data/tiny-ernie-vl` (trained by `make train-tiny`) and continues from it.

# %%
# %matplotlib inline
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib.pyplot as plt
import torch

import ernie_lab
from ernie_lab import exercises, notebook, scenes, tiny_models, train, vision_warmup
from ernie_lab.course.exercise_sets import nb05 as kit_exercises   # the kit's versions of your pieces
from ernie_lab.model.config import ErnieConfig, parse_config
from ernie_lab.model.decoder import causal_lm_loss

FAST = notebook.setup()  # the fast-mode switch: True under ERNIE_LAB_FAST=1 (CI, `make lab FAST=1`)
SHIPPED = notebook.repo_path("data", "tiny-ernie-vl")

# %% [markdown]
# ## 1 · The data: scenes with words · core, 5 min
#
# `ernie_lab.scenes` draws a 112 x 112 picture with one to three shapes (circle, square, triangle), each of
# its own colour, size and place, on a white, black or gray background. Every scene comes with a caption
# and questions from five templates; each answer begins with the answer word, so grading is exact.

# %%
rng = scenes.as_rng(3)
examples = [scenes.random_scene(rng) for _ in range(6)]
fig, axes = plt.subplots(1, 6, figsize=(15, 3.2))
for ax, scene in zip(axes, examples):
    ax.imshow(scenes.render(scene))
    ax.set_title(textwrap.fill(scenes.caption(scene), 28), fontsize=8)
    ax.axis("off")
fig.suptitle("Six random scenes and their captions")
plt.show()
for qa in scenes.questions(examples[0]):
    print(f"{qa.template:>10}: {qa.question:<32} -> {qa.answer}")

# %%
first = examples[0]
qas = scenes.questions(first)
assert {qa.template for qa in qas} == set(scenes.TEMPLATES)
assert all(qa.answer.startswith(qa.answer_word) for qa in qas)
count = next(qa for qa in qas if qa.template == "count")
assert count.answer_word == scenes.NUMBER_WORDS[len(first.shapes)]

# %% [markdown]
# Held-out scenes never appear in training: a scene's *split* is decided by a hash of its contents
# (1 in 20 is held out), so the questions we grade the model on are about pictures it has never seen.

# %%
train_keys = {s.key() for s, _ in zip(scenes.scene_stream(0, "train"), range(2000))}
held_out = tiny_models.held_out_scenes(200)
assert not any(s.key() in train_keys for s in held_out)
print(f"{len(held_out)} held-out scenes, none among the first 2,000 training scenes")

# %% [markdown]
# ## 2 · The tokenizer and one training sequence · core, 5 min
#
# The tiny models use a compact SentencePiece vocabulary of 6,012 ids (`data/tiny-tokenizer`), trained on
# the same text. The special tokens (picture placeholders, start/end markers, end of sentence) sit right
# after the pieces, at other ids than in the big ERNIE checkpoints: the kit reads them from the
# checkpoint's files. A training sequence is the picture (one placeholder per vision token, 16 for a
# 112-pixel picture), then question/answer turns in ERNIE's chat format. **Only the answers carry loss**
# (their labels are the tokens; everything else is -100): the model is not taught to predict questions.

# %%
tok = ernie_lab.load_tokenizer(notebook.repo_path("data", "tiny-tokenizer"))
config = parse_config(tiny_models.tiny_config(tiny_models.VL_CONFIG, tok))
print({name: tok.special_tokens[name] for name in ("<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|end_of_sentence|>")})

from ernie_lab.io.processor import VLProcessor  # noqa: E402

processor = VLProcessor(tok, config=config)
example = tiny_models.vl_example(processor, scenes.render(first), tiny_models.scene_turns(first, scenes.as_rng(0), 3))
ids, labels = example["ids"], example["labels"]
pieces = [tok.decode([i]) or tok.special_ids.get(i, "?") for i in ids]
fig, ax = plt.subplots(figsize=(15, 1.6))
ax.imshow([[1.0 if label != -100 else 0.15 for label in labels]], cmap="Greens", vmin=0, vmax=1, aspect="auto")
ax.set_yticks([])
ax.set_xticks(range(len(ids)))
ax.set_xticklabels([p.replace("\n", "\\n")[:8] for p in pieces], rotation=90, fontsize=7)
ax.set_title("One training sequence: dark cells carry loss (the answers and their end-of-sentence token)")
plt.show()

# %%
answer_tokens = [i for i, label in zip(ids, labels) if label != -100]
assert ids.count(config.image_token_id) == 16
assert all(label in (-100, i) for i, label in zip(ids, labels))
assert tok.special_tokens["<|end_of_sentence|>"] in answer_tokens
assert config.image_token_id not in answer_tokens

# %% [markdown]
# ## 3 · The model · core, 3 min
#
# The tiny VL model is the VL-28B-A3B design scaled down: 4 decoder layers of width 128 (the first dense,
# the rest MoE with 8 text experts of width 128 and 8 vision experts of width 64, top-2, one shared expert),
# a 3-block ViT of width 96. `ernie_lab.family` counts it from the config alone, like the real ones.
# Weights start at N(0, 0.02), except the query and key projections (`attention_std`, 0.08): attention
# starts sharper, which helps the decoder single out one picture token among sixteen.

# %%
torch.manual_seed(0)
model = ernie_lab.architectures.build(config).init_weights(seed=0, attention_std=tiny_models.VL_ATTENTION_STD)
counted = ernie_lab.family.count_params(config)
print(f"{model.num_parameters():,} parameters; family.count_params says {counted.total:,}")
assert counted.total == model.num_parameters()

# %% [markdown]
# ## 4 · The training loop: write one step · core, 60 min
#
# `ernie_lab.train.Trainer` is the loop the shipped models were trained with. One step:
#
# * a batch is a function of the step (`batches(step, rank, world_size)`), so a run is deterministic, can be
#   resumed exactly, and each of several processes reads its own slice;
# * the loss is the language-model loss plus, for a MoE, small auxiliary terms: **load balancing** per modality
#   group ($E \sum_e f_e P_e$ over the text tokens and text experts, and over the vision tokens and vision
#   experts, so a balanced group cannot hide a collapsed one), the router **z-loss** (keeps router logits
#   small) and ERNIE's **router orthogonal loss** (pushes router rows apart, so experts specialise);
# * AdamW with decoupled weight decay, the learning rate warmed up linearly then decayed on a cosine,
#   the gradient norm clipped at 1;
# * parts of the model at their own pace: the ViT and the adapter sit out the first 100 updates
#   (`frozen_steps`) and then learn at a tenth and a fiftieth of the decoder's rate (`lr_scale`). The next
#   cell shows why.
#
# You write three pieces of it, then the Trainer takes over.

# %%
notebook.figure("training_step.png")

# %% [markdown]
# **Build it (1/3): the answer-only loss.** Given the logits (B, T, V), the token ids (B, T) and which
# tokens belong to an answer (B, T), return the mean next-token cross-entropy over the answer tokens.
# The check draws conversations with two separate answers per row and compares with the decoder's loss.


# %%
def answer_loss(logits, ids, is_answer):
    """() mean over answer tokens of -log softmax(logits[b, t - 1])[ids[b, t]].

    logits (B, T, V) float; ids (B, T) long; is_answer (B, T) bool.
    labels = ids where is_answer, -100 elsewhere; logits[:, t] predicts token t + 1 (compare logits[:, :-1]
    with labels[:, 1:]); F.cross_entropy(..., ignore_index=-100) averages over the counted tokens.
    """
    ...  # your code here


answer_loss = exercises.use("05.answer_loss", answer_loss,
                            kit=lambda logits, ids, is_answer: causal_lm_loss(logits, torch.where(is_answer, ids, -100)))

# %% [markdown]
# Your loss on a real batch of the VL data, against the loss the model computes itself from the labels:

# %%
vl_batch = tiny_models.vl_batches(tok, config, batch_size=4)(0, 0, 1)
with torch.no_grad():
    out = model(**{k: v for k, v in vl_batch.items() if k != "labels"}, labels=vl_batch["labels"])
    yours = answer_loss(out.logits, vl_batch["input_ids"], vl_batch["labels"] != -100)
print(f"answer-only loss: yours {yours.item():.4f}, the model's {out.loss.item():.4f} (log of the vocabulary: "
      f"{math.log(config.vocab_size):.2f})")
assert abs(yours.item() - out.loss.item()) < 1e-4

# %% [markdown]
# **Build it (2/3): the schedule.** Return the learning rate of each update in `steps` (a float tensor of
# step numbers, so one call draws the whole curve): linear warm-up over the first W updates, then a cosine
# down to `min_lr` at the last update T - 1. The check draws schedules and looks hard at the boundaries.


# %%
def lr_schedule(steps, peak_lr, warmup, total, min_lr):
    """(n,) learning rates of the updates `steps` (n,), 0-based.

    t < W:  peak_lr (t + 1) / W
    t >= W: min_lr + (peak_lr - min_lr) (1 + cos(pi p)) / 2,   p = (t - W) / (T - 1 - W)
    """
    ...  # your code here


lr_schedule = exercises.use("05.lr_schedule", lr_schedule, kit=lambda steps, peak_lr, warmup, total, min_lr: torch.tensor(
    [train.learning_rate(int(t), train.TrainConfig(lr=peak_lr, warmup_steps=warmup, max_steps=total,
                                                   min_lr_ratio=min_lr / peak_lr)) for t in steps], dtype=torch.float64))

# %%
schedule = train.TrainConfig(lr=1e-3, warmup_steps=100, max_steps=2000, min_lr_ratio=0.1)
steps = torch.arange(schedule.max_steps, dtype=torch.float64)
curve = lr_schedule(steps, schedule.lr, schedule.warmup_steps, schedule.max_steps, schedule.min_lr)
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(steps, curve)
ax.set(xlabel="step", ylabel="learning rate", title="Warm-up then cosine decay (the shipped VL model's schedule)")
plt.show()
assert all(abs(curve[s].item() - train.learning_rate(s, schedule)) < 1e-6 * schedule.lr for s in (0, 99, 100, 1000, 1999))
assert abs(curve[-1].item() - schedule.min_lr) < 1e-6 * schedule.lr

# %% [markdown]
# **Build it (3/3): one training step.** Put it together for a text MoE: set this update's learning rate
# on every parameter group, forward with the router logits, add the balancing loss and the z-loss
# (`ernie_lab.losses.load_balancing_loss(out.router_logits, k, mask)`, `router_z_loss(out.router_logits,
# mask)`) with their weights `config.balance` and `config.z_loss`, backward, clip the gradient norm at
# `config.max_grad_norm`, take the AdamW step, zero the gradients; return the loss. The check runs your
# step and the kit's `Trainer.train_step` on copies of a fresh micro MoE: every parameter must agree to 1e-6.


# %%
def training_step(model, optimizer, batch, step, config):
    """One update of `model` on `batch` ({"input_ids", "labels", "attention_mask"}, each (B, T)); returns the
    loss () = LM + config.balance * L_bal + config.z_loss * L_z, detached. `step` is 0-based; `config` a
    train.TrainConfig (lr, warmup_steps, max_steps, min_lr, balance, z_loss, max_grad_norm)."""
    ...  # your code here


training_step = exercises.use("05.training_step", training_step, kit=kit_exercises.kit_training_step)

# %% [markdown]
# Your step trains a small text MoE for a few updates; the Trainer trains a copy from the same start.
# The two curves are the same curve:

# %%
text_moe = ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(dict(
    model_type="ernie4_5_moe", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_num_experts=4, moe_k=2, moe_intermediate_size=16,
    moe_layer_start_index=1))).init_weights(seed=0)
ids = torch.tensor([tok.encode(scenes.caption(s))[:12] for s in examples[:4]])                 # (4, 12)
text_batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
plan = train.TrainConfig(lr=3e-3, warmup_steps=2, max_steps=8, balance=0.01, z_loss=1e-3, progress=False)
by_trainer = copy.deepcopy(text_moe)
kit_history = train.Trainer(by_trainer, train.from_batches([text_batch]), plan).fit()
optimizer = torch.optim.AdamW(train.parameter_groups(text_moe, plan.weight_decay), lr=plan.lr, betas=plan.betas,
                              eps=plan.eps)
your_losses = [training_step(text_moe, optimizer, text_batch, s, plan).item() for s in range(plan.max_steps)]
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot([h["loss"] for h in kit_history], "o-", label="the kit's Trainer")
ax.plot(your_losses, "x--", label="your training_step")
ax.set(xlabel="update", ylabel="loss", title="One step, written twice")
ax.legend()
plt.show()
assert all(abs(a - h["loss"]) < 1e-4 for a, h in zip(your_losses, kit_history)), (your_losses, kit_history)

# %% [markdown]
# **Why the eyes wait.** Train everything at the decoder's rate from the first step, and within a few
# dozen updates every image token of a picture becomes nearly the same vector. At initialisation the
# decoder's attention is spread evenly, so every image token receives the same gradient, and the quickest
# way down the loss is a constant the answers can lean on: the adapter learns it, its LayerNorm and RMSNorm
# squeeze out everything else, and what the individual shapes look like never reaches the decoder again.
# Measure the spread of one picture's tokens around their mean (relative to their length), for a copy of
# the model trained briefly with and without the wait:

# %%
def token_spread(net, picture):
    """Mean distance of a picture's adapter tokens from their mean, relative to their mean length."""
    inputs = processor([{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "?"}]}])
    with torch.no_grad():
        tokens = net.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])  # (16, hidden)
    return float((tokens - tokens.mean(0)).norm(dim=-1).mean() / tokens.norm(dim=-1).mean())

picture = scenes.render(held_out[0])
quick = dict(lr=1e-3, warmup_steps=0, max_steps=6 if FAST else 25, progress=False)
probe_data = tiny_models.vl_batches(tok, config, batch_size=8, text_every=0)
eager, patient = copy.deepcopy(model), copy.deepcopy(model)
train.Trainer(eager, probe_data, train.TrainConfig(**quick)).fit()
train.Trainer(patient, probe_data, train.TrainConfig(**quick, frozen_steps=tiny_models.vl_frozen_steps(100))).fit()
spreads = {"initialisation": token_spread(model, picture), "all parts at once": token_spread(eager, picture),
           "vision waits": token_spread(patient, picture)}
for name, value in spreads.items():
    print(f"{name:<18} spread of the picture's tokens: {value:.4f}")
assert spreads["vision waits"] == spreads["initialisation"]          # frozen: the eyes did not move
assert spreads["all parts at once"] < 0.5 * spreads["initialisation"], spreads  # the collapse, measured

# %% [markdown]
# **Teach the eyes first.** Waiting keeps the picture tokens apart, but it does not make them *say* much.
# To answer "What colour is the circle?" the decoder's attention must find the tokens whose keys say
# *circle*, then read *red* from their values, and keys and values are linear maps of the tokens. Trained
# end to end from random weights, the tokens never say *circle* clearly enough: a linear probe reads the kind
# of the shape under a token 77% right (its colour 100%), and a model trained that way (2,000 steps) ties a
# colour to its shape no better than a guess among the colours present (colour 47%, shape 34%, position 45%).
# A real ERNIE 4.5-VL starts from a pretrained vision encoder. Ours gets a small stand-in: before the main
# run, `ernie_lab.vision_warmup` trains the ViT and the adapter alone, for every picture token, to name the
# shapes it shows (colour x kind, kind, colour, place, kind x place, size) through a linear probe that is
# thrown away afterwards. The place matters twice: the ViT has no position embedding (2-D RoPE only turns
# queries and keys), and the decoder's values carry none either, so "Where is the triangle?" can only be
# answered if the token itself says *left*. The targets of one held-out scene, token by token:

# %%
scene = held_out[1]
targets = vision_warmup.token_targets(scene, 4, 4)                       # (16 tokens, 49 labels)
fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.imshow(scenes.render(scene), extent=(0, 112, 112, 0))
for token in range(16):
    r, c = divmod(token, 4)
    names = [label for (group, label), on in zip(vision_warmup.LABELS, targets[token]) if on and group == "kind place"]
    ax.text(28 * c + 14, 28 * r + 14, "\n".join(names).replace(" ", "\n", 1) or "-", ha="center", va="center",
            fontsize=6, color="black", bbox=dict(facecolor="white", alpha=0.7, lw=0))
ax.set_xticks(range(0, 113, 28))
ax.set_yticks(range(0, 113, 28))
ax.grid(color="gray", lw=0.8)
ax.set_title("Warm-up targets ('kind place' group) per picture token")
plt.show()
print(scenes.caption(scene))
assert targets[:, [vision_warmup.LABEL_INDEX["kind", s.kind] for s in scene.shapes]].sum(0).min() >= 1

# %% [markdown]
# Warm up the eyes of our fresh model (the shipped one had 1,500 updates, `tiny_models.VL_VISION_WARMUP`;
# here 30 in fast mode, 300 otherwise, about a minute) and read the held-out probe accuracy: the share of
# tokens with every label of a group right (a token with no shape counts too, so chance is not zero).
# After only 30 updates (fast mode) every group tends to read the same number, about 63%: that is the share
# of tokens that show no shape at all, whose labels are all "off". The eyes have learned "nothing here" and
# nothing else yet; with 300 updates the groups part ways.

# %%
warmed = vision_warmup.warm_up_vision(model, steps=30 if FAST else 300, batch_size=8 if FAST else 32, log_every=5)
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot([h["step"] for h in warmed.history], [h["loss"] for h in warmed.history])
ax.set(xlabel="warm-up step", ylabel="BCE per label", yscale="log", title="The eyes learn to name what they see")
plt.show()
print({group: f"{value:.0%}" for group, value in warmed.accuracy.items()})
first_loss, last_loss = warmed.history[0]["loss"], warmed.history[-1]["loss"]
assert last_loss < 0.5 * first_loss, (first_loss, last_loss)

# %% [markdown]
# Now train the whole model from there with the shipped recipe's options, with a live curve. Fast mode
# takes a few steps; full mode 300 (about 5 minutes).

# %%
steps = 8 if FAST else 300
data = tiny_models.vl_batches(tok, config, batch_size=8 if FAST else 32)
run = train.TrainConfig(lr=1e-3, warmup_steps=max(1, steps // 10), max_steps=steps, balance=0.01, z_loss=1e-3,
                        orthogonal=1e-3, log_every=1, progress=True,
                        frozen_steps=tiny_models.vl_frozen_steps(steps // 3),
                        lr_scale=tiny_models.VL_LR_SCALE)        # {"vision": 0.1, "adapter": 0.02}
before = tiny_models.vl_val_loss(model, tok, batches=2)
history = train.Trainer(model, data, run).fit()
after = tiny_models.vl_val_loss(model, tok, batches=2)
logged = [h for h in history if "lm_loss" in h]
fig, ax = plt.subplots(figsize=(7, 3))
ax.plot([h["step"] for h in logged], [h["lm_loss"] for h in logged])
ax.set(xlabel="step", ylabel="loss (nats / answer token)", yscale="log", title=f"Training from scratch, {steps} steps")
plt.show()
print(f"held-out loss before {before:.2f}, after {after:.2f}")
assert after < before

# %% [markdown]
# ## 5 · Answers before and after · core, 5 min
#
# The model we just trained (a few steps) against the shipped one (1,500 warm-up updates of its eyes, then
# 2,000 steps), asked through `ernie_lab.chat` about held-out pictures.

# %%
shipped = ernie_lab.load_model(SHIPPED)
shipped_tok = ernie_lab.load_tokenizer(SHIPPED)
scene = held_out[0]
image = scenes.render(scene)
rows = []
for qa in scenes.questions(scene):
    ask = scenes.conversation(image, qa.question, "")[:1]
    rows.append((qa.question, qa.answer_word, ernie_lab.chat(model, tok, ask, max_new_tokens=6),
                 ernie_lab.chat(shipped, shipped_tok, ask, max_new_tokens=6)))
plt.figure(figsize=(2.5, 2.5))
plt.imshow(image)
plt.axis("off")
plt.title("a held-out scene")
plt.show()
for question, truth, fresh, trained in rows:
    print(f"{question:<32} truth {truth:<9} | {steps} steps: {fresh!r:<14} | shipped: {trained!r}")

# %%
background = next(trained for question, _, _, trained in rows if "background" in question)
assert scenes.first_word(background) == scene.background, background
assert all(scenes.first_word(trained) == truth for _, truth, _, trained in rows), rows  # every question, right
recorded = json.loads((SHIPPED / "metrics.json").read_text())["accuracy"]
print(json.dumps(recorded, indent=1))
assert all(recorded[template] >= goal for template, goal in tiny_models.VL_TARGETS.items()), recorded  # the kit's targets

# %% [markdown]
# The shipped model's numbers on 100 held-out scenes are in `data/tiny-ernie-vl/TRAINING.md`, with its curves
# and how much each MoE layer's vision experts specialised by colour, shape and background. It answers
# every template right at least 99 times in 100. It was not always so: the same model trained the same way
# but without the eyes' warm-up (section 4) answered the background and the count every time and named the
# colours in its captions, yet tied a colour to *its* shape about half the time (colour 47%, shape 34%,
# position 45%): with three shapes it must find the tokens of the shape asked about, and nothing in those
# tokens said clearly which shape they showed. A warm-up without the place labels fixed colour and shape
# (100%) but not "Where is the triangle?" (66%). `benchmarks/results/vl_recipe_trials.json` records every
# recipe tried on the way (sharper attention, curricula of shape counts, hidden answers, a faster ViT),
# measured the same way. Experiments worth running with this notebook: how few warm-up updates are enough?
# Which label group of the warm-up matters most?
#
# ### What the tiny models cannot do
#
# They are small models trained on a narrow world; read this before you ask them anything else.
# * **Pictures are 112 x 112.** The VL model saw every scene and photograph squeezed to 112 x 112 pixels
#   (`tiny_models.photo_images`); give it a picture any other size and its answers fall apart (a full-size
#   photograph gives "three three three ..."). Resize first: `image.resize((112, 112))`.
# * **Only its own scenes and photographs.** Off that distribution it invents: a picture it has not seen
#   is described as one of the scenes it knows (shapes that are not there) or as one of the 15 photographs.
# * **It miscounts and misplaces** shapes in scenes unlike its training ones (more shapes, overlapping,
#   other colours), and a question phrased unlike its templates gets a template's answer: a yes/no question
#   is answered with a place ("on the left").
# * **The text model knows a few paragraphs**, not the world: it continues the kit's help pages and captions
#   and makes up the rest. Neither model reasons, follows instructions beyond its templates, or refuses.
#
# ## 6 · Continue from a checkpoint · optional, 5 min
#
# A checkpoint is a folder in the Hub layout: `ernie_lab.load_model` reads it, and so does `transformers`.
# Training continues from it like from any model; with the trainer's own checkpoints (`checkpoint_every`,
# `out_dir`), `resume_from` also restores the optimizer and the step, so the curve continues exactly.

# %%
continued = ernie_lab.load_model(SHIPPED)
start = tiny_models.vl_val_loss(continued, shipped_tok, batches=2)
# the ViT and adapter keep their slow pace (without it, 4 steps at 2e-4 raise this loss from 0.0007 to 0.069)
more = train.TrainConfig(lr=1e-4, warmup_steps=2, max_steps=4 if FAST else 50, balance=0.01, progress=False,
                         lr_scale=tiny_models.VL_LR_SCALE)
train.Trainer(continued, tiny_models.vl_batches(shipped_tok, continued.config, 8, seed=5), more).fit()
end = tiny_models.vl_val_loss(continued, shipped_tok, batches=2)
print(f"held-out loss of the shipped model {start:.2g}; after {more.max_steps} more steps {end:.2g}")
assert end < start + 0.1  # a small learning rate keeps what was learnt

# %% [markdown]
# ## 7 · The same loop on several GPUs: `torchrun` · optional, 5 min
#
# `torchrun --nproc_per_node=N script.py` starts N processes; the Trainer sees `WORLD_SIZE > 1`, joins the
# process group (NCCL on GPUs, gloo on CPUs), wraps the model in `DistributedDataParallel` and has rank r
# read `batches(step, r, N)`. Gradients are averaged across ranks after every backward pass, so N ranks with
# batch b take the same steps as one process with batch N x b. On an 8-GPU machine:
#
#     torchrun --nproc_per_node=8 scripts/train_tiny.py vl
#
# Below, two CPU processes train a tiny text model for 3 steps, as a test of the plumbing.

# %%
script = textwrap.dedent("""
    import torch, ernie_lab
    from ernie_lab import train
    from ernie_lab.model.config import ErnieConfig
    torch.manual_seed(0)
    model = ernie_lab.ErnieForCausalLM(ErnieConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)).init_weights(seed=0)
    def batches(step, rank, world):
        g = torch.Generator().manual_seed(1000 * step + rank)
        ids = torch.randint(0, 64, (4, 16), generator=g)
        return {"input_ids": ids, "labels": ids}
    history = train.Trainer(model, batches, train.TrainConfig(lr=1e-2, max_steps=3, progress=False)).fit()
    import torch.distributed as dist
    if dist.get_rank() == 0:
        print("world size", dist.get_world_size(), "final loss", round(history[-1]["loss"], 3))
""")
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "ddp_demo.py")
    with open(path, "w") as f:
        f.write(script)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", path],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
print(result.stdout.strip()[-300:])
assert result.returncode == 0, result.stderr[-2000:]
assert "world size 2" in result.stdout

# %% [markdown]
# ## 8 · Exercises · optional, 5 min
#
# **Exercise (an experiment).** Train the tiny VL model for 300 steps with `balance=0` and `z_loss=0` and
# again with the default weights, record each run with `ernie_lab.routing.record` on held-out scenes, and
# compare the vision experts' loads (`rec.load(modality=1)`): which run leaves experts idle? (No check:
# look at the loads.)
#
# ## Key takeaways
#
# * Training data for a VL model is a conversation with pictures; only the answers carry loss (labels -100
#   elsewhere), and logits at position t are scored against token t + 1.
# * The loop is ordinary (AdamW, warm-up + cosine, clipping); a MoE adds small balancing losses, per
#   modality group for ERNIE 4.5 VL.
# * Deterministic batches make runs reproducible, resumable and easy to split over ranks.
#
# ## What we built
#
# * `answer_loss`, `lr_schedule` and `training_step`: one update written by hand, equal parameter for
#   parameter to the kit's `Trainer.train_step`, and used to train a small text MoE.
# * With the kit: a tiny ERNIE 4.5 VL model warmed up and trained from scratch, compared with the shipped one.
#
# ## Further reading
#
# * Loshchilov & Hutter, 2017, *Decoupled Weight Decay Regularization*
#   ([arXiv:1711.05101](https://arxiv.org/abs/1711.05101)): AdamW, the optimizer used here, with decay
#   applied to the weights directly; the kit decays only the linear weights.
# * Loshchilov & Hutter, 2016, *SGDR: Stochastic Gradient Descent with Warm Restarts*
#   ([arXiv:1608.03983](https://arxiv.org/abs/1608.03983)): the cosine schedule; here one cycle after a
#   linear warm-up, ending at min_lr instead of restarting.
# * Fedus, Zoph & Shazeer, 2021, *Switch Transformers* ([arXiv:2101.03961](https://arxiv.org/abs/2101.03961)):
#   the load-balancing loss E sum f_e P_e; ERNIE 4.5 VL computes it per modality group.
# * Zoph et al., 2022, *ST-MoE: Designing Stable and Transferable Sparse Expert Models*
#   ([arXiv:2202.08906](https://arxiv.org/abs/2202.08906)): the router z-loss that keeps router logits small.
# * Baidu, 2025, *ERNIE 4.5 Technical Report*
#   ([PDF](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf)): the pre-training recipe
#   at scale: the router orthogonal loss, the multimodal token-balanced loss, staged training of the
#   vision parts, FP8 mixed precision.
#
# **Next**: notebook 06 looks inside the trained model: which experts its text and image tokens choose.

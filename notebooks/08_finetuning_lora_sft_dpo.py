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
# # 08 · Fine-tuning: LoRA, SFT with prompt masking, DPO, QLoRA
#
# The tiny text model of notebook 05 read English prose and scene captions; it has never answered a
# question. Here we teach it to, without touching its weights: LoRA trains small low-rank updates beside
# the frozen layers, supervised fine-tuning (SFT) shows it conversations and learns only from the
# assistant's words, and DPO then learns from pairs of answers which one people prefer. The adapter we
# train is a peft adapter: `peft` loads it onto the `transformers` model and gets the same logits.
#
# You build the three pieces yourself: the LoRA layer, the SFT mask (as the log-probability of a reply)
# and the DPO loss; the notebook then trains the tiny model with them and checks them against the kit
# and against `peft`.
#
# **What you will learn:** why a weight update can be low-rank and how to write a LoRA layer (with merge
# and unmerge), which layers of a MoE to adapt (and what that costs at 21B-A3B), how prompt masking
# works, what the DPO loss optimises, how to save, load, merge and share an adapter, and what QLoRA saves
# by freezing an int4 base.
#
# **Time:** 100 min (core 73 min). **Memory**: under 1 GB.
# **Fast mode** (`FAST = True` below, or `make lab FAST=1`) trains a few steps of each method to show the
# loop, then loads the adapter shipped in `data/adapters/tiny-text-colours-sft` (trained by
# `scripts/finetune_evidence.py`, 800 steps, about 2 minutes on one core) to show the trained result.

# %%
# %matplotlib inline
import copy
import json
import os
import shutil
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib.pyplot as plt
import torch

import ernie_lab
from ernie_lab import checkpoints, exercises, family, lora, notebook, quant
from ernie_lab import finetune as ft
from ernie_lab import finetune_data as fd
from ernie_lab.course.exercise_sets import nb08 as kit_exercises   # the kit's versions of your pieces
from torch import nn

FAST = notebook.setup()  # the fast-mode switch: True under ERNIE_LAB_FAST=1 (CI, `make lab FAST=1`)
torch.set_num_threads(1)
BASE = notebook.repo_path("data", "tiny-ernie-text")
SHIPPED_SFT = notebook.repo_path("data", "adapters", "tiny-text-colours-sft")
EVIDENCE = json.loads(notebook.repo_path("benchmarks", "results", "finetune_evidence.json").read_text())
tokenizer = ernie_lab.load_tokenizer(BASE)
base = ernie_lab.load_model(BASE).eval()
print(f"{sum(p.numel() for p in base.parameters()):,} parameters; fast mode: {FAST}")

# %% [markdown]
# ## 1 · The low-rank idea: write a LoRA layer · core, 25 min
#
# A linear layer computes `y = W x`. Fine-tuning changes W by some `dW` of the same shape, out x in
# numbers. LoRA (Hu et al., 2021) bets that a useful `dW` has low rank and learns it as a product of two
# thin matrices, with W frozen:
#
#     y = W x + (alpha / r) * B (A x)        A: (r, in) random,   B: (out, r) zeros
#
# At the start B = 0, so the adapted model *is* the base model. Only A and B train: r (in + out) numbers
# per layer instead of in x out. `alpha / r` keeps the update's size stable when r changes
# (r = 8, alpha = 16 are typical values; Baidu's ERNIEKit example configs for the 0.3B, e.g.
# `examples/configs/ERNIE-4.5-0.3B/sft/run_sft_lora_8k.yaml` in PaddlePaddle/ERNIE, use `lora_rank: 32`).

# %%
notebook.figure("lora.png")

# %% [markdown]
# **Build it.** Write the layer. It wraps a frozen `nn.Linear` and keeps peft's names, so that the kit
# and `peft` can read its weights: `base_layer`, `lora_A` (an `nn.Linear(in, r, bias=False)`, left at its
# random initialisation) and `lora_B` (an `nn.Linear(r, out, bias=False)` set to zeros). `merge` folds the
# update into the base weight, `unmerge` takes it out again; while merged, `forward` must not add it a
# second time. The check builds your layer around fresh random linears of three shapes, gives it the
# same A and B as the kit's `LoRALinear` and peft's `lora.Linear`, and compares outputs and merged weights.

# %%
class LoRALinear(nn.Module):
    """y = base_layer(x) + (alpha / r) * lora_B(lora_A(x)), with base_layer frozen.

    base_layer: nn.Linear, weight W (out, in)      lora_A: weight (r, in), random
    scale = alpha / r                              lora_B: weight (out, r), zeros at the start
    merge():   W <- W + scale * B @ A (then forward is base_layer(x) alone);  unmerge(): W <- W - scale * B @ A
    """

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float):
        super().__init__()
        ...  # your code here

    def forward(self, x: torch.Tensor) -> torch.Tensor:     # (..., in) -> (..., out)
        ...  # your code here

    def merge(self) -> None:
        ...  # your code here

    def unmerge(self) -> None:
        ...  # your code here


LoRALinear = exercises.use("08.lora_linear", LoRALinear, kit=lora.LoRALinear)

# %% [markdown]
# The notebook adapts the model with *your* class from here on: freeze everything, then put a
# `LoRALinear` around every attention and MLP projection (`lora.wrap_layers` does the swapping).


# %%
def adapt(model: nn.Module, r: int = 8, alpha: float = 16) -> nn.Module:
    """Freeze `model` and wrap each q, k, v, o, gate, up and down projection in a LoRALinear."""
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(lora.DEFAULT_TARGETS)]
    lora.wrap_layers(model, names, lambda name, linear: LoRALinear(linear, r, alpha))
    return model


def lora_modules(model: nn.Module) -> dict:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def update_of(layer) -> torch.Tensor:
    """(out, in) the weight change a LoRA layer makes, read off its own merge."""
    before = layer.base_layer.weight.clone()
    layer.merge()
    change = layer.base_layer.weight - before
    layer.unmerge()
    return change

# %% [markdown]
# Is the bet reasonable? Below, full fine-tuning (every weight trains) and LoRA run the same SFT steps
# from the same base; then we look at the singular values of the update each made to one layer. A
# full update spreads over many directions, but its first few singular values carry most of it; LoRA's
# update has at most r non-zero ones by construction.

# %%
train_set = fd.instruction_set(3000, language="english", max_shapes=1)
conversations = [item["messages"] for item in train_set]
STEPS = 30 if FAST else 150

full = copy.deepcopy(base)
full_history = ft.sft(full, tokenizer, conversations, ft.sft_config(lr=3e-4, max_steps=STEPS), batch_size=16)
adapted = adapt(copy.deepcopy(base), r=8, alpha=16)
lora_history = ft.sft(adapted, tokenizer, conversations, ft.sft_config(lr=5e-3, max_steps=STEPS), batch_size=16)

LAYER = "layers.2.mlp.down_proj"
full_update = full.get_submodule(LAYER).weight - base.get_submodule(LAYER).weight       # (out, in)
lora_update = update_of(adapted.get_submodule(LAYER))                                  # (out, in), rank <= 8
full_sv = torch.linalg.svdvals(full_update.detach())
lora_sv = torch.linalg.svdvals(lora_update.detach())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 3.6))
ax1.semilogy(full_sv[:40] / full_sv[0], "o-", label="full fine-tuning")
ax1.semilogy(lora_sv[:40] / lora_sv[0] + 1e-12, "s-", label="LoRA r = 8")
ax1.set_ylim(1e-7, 2)
ax1.set(xlabel="singular value index", ylabel="sigma_i / sigma_0", title=f"Singular values of dW ({LAYER})")
ax1.legend()
ax2.plot([h["loss"] for h in full_history], label="full fine-tuning, lr 3e-4")
ax2.plot([h["loss"] for h in lora_history], label="LoRA r = 8, lr 5e-3")
ax2.set(xlabel="step", ylabel="SFT loss (answer tokens)", title="The same steps, two ways")
ax2.legend()
plt.show()
energy = (full_sv[:8] ** 2).sum() / (full_sv ** 2).sum()
print(f"full update: the first 8 of {len(full_sv)} directions carry {energy:.0%} of its energy")
print(f"trainable: full {sum(p.numel() for p in full.parameters()):,}, LoRA {lora.trainable_parameters(adapted):,}")

# %%
assert (lora_sv[8:] < 1e-5 * lora_sv[0]).all(), "a rank-8 LoRA update has at most 8 non-zero singular values"
assert (full_sv[8:] > 1e-5 * full_sv[0]).any(), "full fine-tuning's update is not confined to 8 directions"
assert lora.trainable_parameters(adapted) == sum(8 * (m.base_layer.in_features + m.base_layer.out_features)
                                                 for m in lora_modules(adapted).values())

# %% [markdown]
# ## 2 · Which layers to adapt in a MoE · core, 4 min
#
# `apply_lora` adapts every linear layer whose name ends in a target (`q_proj`, ..., `down_proj`); in a
# MoE those names also match every routed expert and the shared experts. Is that wise? At ERNIE 4.5
# 21B-A3B, the parameter arithmetic from its config (`ernie_lab.checkpoints`, `ernie_lab.family`):

# %%
config = checkpoints.CONFIG_21B_A3B
shape = family.model_shape(config)
count = family.count_params(config)
r, h = 8, shape.hidden_size
q_out, kv_out = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
moe_layers = sum(shape.moe_layers)


def lora_numbers(fan_in: int, fan_out: int) -> int:
    return r * (fan_in + fan_out)


def swiglu_lora(width: int) -> int:  # gate, up (h -> width) and down (width -> h)
    return 2 * lora_numbers(h, width) + lora_numbers(width, h)


parts = {
    "attention (q, k, v, o), 28 layers": shape.num_layers * (2 * lora_numbers(h, q_out) + 2 * lora_numbers(h, kv_out)),
    "dense MLP of layer 0": swiglu_lora(shape.intermediate_size),
    "shared experts, 27 layers": moe_layers * swiglu_lora(shape.num_shared_experts * shape.expert_size),
    "routed experts, 64 x 27": moe_layers * shape.num_experts * swiglu_lora(shape.expert_size),
}
for name, n in parts.items():
    print(f"{name:38s} {n / 1e6:8.1f} M LoRA numbers at r = 8")
print(f"{'the model':38s} {count.total / 1e9:8.2f} B parameters, {count.active / 1e9:.2f} B active per token")
seen = shape.experts_per_token / shape.num_experts
print(f"each routed expert sees {seen:.0%} of the tokens: its adapter gets about a tenth of the training signal")

# %%
assert parts["routed experts, 64 x 27"] > 10 * parts["attention (q, k, v, o), 28 layers"]
assert 20e9 < count.total < 23e9 and 3e9 < count.active < 3.6e9

# %% [markdown]
# Adapting the routed experts multiplies the adapter by about 40 and gives each expert's adapter only the
# tokens routed to it; attention and the shared experts see every token. A common choice for a MoE is
# therefore attention (+ shared experts): `apply_lora(model, target_modules=("q_proj", "k_proj", "v_proj",
# "o_proj", r"layers\.\d+\.mlp\.shared_experts\..*"))` (a target is a leaf name or a regex over the
# module's full name). When the experts are adapted, the kit saves them per expert, a layout peft >= 0.21
# turns into the fused `gate_up_proj` / `down_proj` parameters of transformers 5 when it loads them
# (`ernie_lab/train/lora/peft_format.py`'s docstring lists exactly what interoperates).

# %% [markdown]
# ## 3 · SFT with prompt masking · core, 20 min
#
# A training conversation is rendered with ERNIE's chat format and trained with the next-token loss,
# but only on the assistant's tokens: the question is given, not learnt. Every prompt token's label is
# -100, which the loss skips. The task: a scene described in words, a colour question, a one-word answer.

# %%
example = ft.conversation_example(tokenizer, train_set[0]["messages"])
pieces = [tokenizer.decode([i]) for i in example["ids"]]
carries = [label != -100 for label in example["labels"]]
fig, ax = plt.subplots(figsize=(14, 2.2))
x, y = 0.0, 0.8
for piece, counted in zip(pieces, carries):
    text = piece.replace("\n", "\\n") or " "
    width = 0.0075 * len(text) + 0.004
    if x + width > 1.0:
        x, y = 0.0, y - 0.3
    ax.text(x, y, text, fontsize=9, family="monospace", va="center",
            bbox=dict(facecolor="tab:orange" if counted else "whitesmoke", edgecolor="none", pad=1.5))
    x += width + 0.002
ax.axis("off")
ax.set_title("One SFT example: only the orange tokens carry loss (the reply and its end token)")
plt.show()
print("labelled:", tokenizer.decode([i for i, c in zip(example["ids"], carries) if c]))

# %%
assert tokenizer.decode([i for i, c in zip(example["ids"], carries) if c]) == (
    fd.answer(train_set[0]["qa"], "english") + "<|end_of_sentence|>")
assert not carries[0] and len(example["ids"]) == len(example["labels"])

# %% [markdown]
# **Build it.** DPO, below, needs how likely the model finds a whole reply: the sum of the log-probabilities
# of the reply's tokens, exactly the tokens SFT puts its loss on. Write it for a right-padded batch. A
# token is part of the reply when its position is at or after its row's prompt length and its
# attention mask is 1; the logits at position t predict token t + 1. The check draws padded batches
# with a different prompt length per row and compares with the kit's `finetune.sequence_logps`.


# %%
def reply_logps(logits, input_ids, prompt_lengths, attention_mask):
    """(B,) summed log-probability of each row's reply tokens.

    logits (B, T, V) float; input_ids, attention_mask (B, T) long (1 = real token, 0 = padding);
    prompt_lengths (B,) long: tokens 0 .. prompt_lengths[b] - 1 of row b are the prompt.
    labels (B, T) = input_ids on the reply, -100 elsewhere; sum over t of log_softmax(logits[:, t])[labels[:, t + 1]].
    """
    ...  # your code here


reply_logps = exercises.use("08.reply_logps", reply_logps, kit=kit_exercises.kit_reply)

# %%
one = ft.collate([example], tokenizer.pad_token_id or 0)
first_label = torch.tensor([example["labels"].index(next(x for x in example["labels"] if x != -100))])  # (1,)
with torch.no_grad():
    one_logits = base(input_ids=one["input_ids"]).logits                      # (1, T, V)
    ours_logp = reply_logps(one_logits, one["input_ids"], first_label, one["attention_mask"])
    kits_logp = ft.sequence_logps(base, one)
print(f"log pi(reply | prompt) under the base model: yours {ours_logp.item():.3f}, the kit's {kits_logp.item():.3f}")
assert torch.allclose(ours_logp, kits_logp, atol=1e-4)

# %% [markdown]
# Conversations of different lengths are right-padded into one batch; the attention mask hides the
# padding and its labels are -100 too. `ft.sft` runs on the kit's training loop (`ernie_lab.train.Trainer`,
# so also under `torchrun`), with `logits_for_labels_only`: the LM head runs only at the few labelled
# positions. Before training, the model answers like this:

# %%
held_out = fd.instruction_set(40 if FAST else 200, split="val", seed=7, language="english", max_shapes=1)


def accuracy(model, items) -> float:
    replies = [ernie_lab.chat(model, tokenizer, item["messages"][:-1], max_new_tokens=6) for item in items]
    return sum(fd.is_correct(item["qa"], reply, "english") for item, reply in zip(items, replies)) / len(items)


def show(model, items, n=3):
    for item in items[:n]:
        reply = ernie_lab.chat(model, tokenizer, item["messages"][:-1], max_new_tokens=6)
        print(f"{item['messages'][0]['content'][16:]}\n    -> {reply!r}   (expected {fd.answer(item['qa'], 'english')!r})")


show(base, held_out)
before = accuracy(base, held_out)
print(f"held-out accuracy before: {before:.0%}")

# %% [markdown]
# Now LoRA SFT. The full run (`scripts/finetune_evidence.py`) takes 800 steps of 16 conversations at
# lr 5e-3, far above the typical 1e-4 to 3e-4 of LoRA on large models (the 0.3B example config above uses 1e-4): the tiny model's update has to go far in few
# steps. In fast mode we take a few steps to see the loop, then load the shipped adapter.

# %%
student = lora.apply_lora(copy.deepcopy(base), r=8, alpha=16)
history = ft.sft(student, tokenizer, conversations,
                 ft.sft_config(lr=5e-3, max_steps=20 if FAST else 800, warmup_steps=10, log_every=1), batch_size=16)
if FAST:
    student = lora.load_adapter(copy.deepcopy(base), SHIPPED_SFT)
curve = [entry["loss"] for entry in EVIDENCE["sft"]["log"] if "loss" in entry]
plt.figure(figsize=(6, 3))
plt.plot(range(5, 5 * len(curve) + 1, 5), curve, label="shipped adapter's run (800 steps)")
plt.plot(range(1, len(history) + 1), [h["loss"] for h in history], label="this run")
plt.xlabel("step"), plt.ylabel("SFT loss"), plt.legend(), plt.title("SFT-LoRA on the tiny text model")
plt.show()
show(student, held_out)
after = accuracy(student, held_out)
print(f"held-out accuracy: before {before:.0%}, after SFT {after:.0%} "
      f"(the full evidence run: {EVIDENCE['before']['accuracy']:.0%} -> {EVIDENCE['after_sft']['accuracy']:.0%})")

# %%
assert before < 0.1 and after >= 0.75, (before, after)

# %% [markdown]
# (The scenes here have one shape: the question is then "the shape's colour or the background's". With
# two or three shapes the model must bind the colour to the named shape; the tiny model does not learn
# that in a few minutes, about 25% after 300 steps. Try it: `max_shapes=None`.)
#
# ## 4 · DPO: learning from preferences · core, 18 min
#
# DPO (Rafailov et al., 2023) learns from pairs of answers to one prompt, a chosen `y_w` and a rejected
# `y_l`, without a reward model. With `log pi(y | x)` the summed log-probability of an answer's tokens
# under the model being trained and `log pi_ref` under a frozen reference:
#
#     reward(y) = beta * (log pi(y | x) - log pi_ref(y | x))      how much more likely training made y
#     loss      = -log sigmoid(reward(y_w) - reward(y_l))          push the margin up
#
# At the start pi = pi_ref, every margin is 0 and the loss is log 2. `beta` (0.1 is a typical value) sets how far
# the policy may drift from the reference. DPO usually follows SFT; the finished SFT model already
# prefers the right answer in every held-out pair, so we start from the briefly trained LoRA model of
# section 1, merged with your `merge`. The new LoRA adapter switched off *is* that reference, so no second
# copy is held (`lora.adapters_disabled`). Half the pairs reject a verbose answer, half a wrong colour.

# %%
notebook.figure("sft_dpo.png")

# %% [markdown]
# **Build it.** Write the DPO loss from the four (B,) tensors of summed log-probabilities (your
# `reply_logps` gives them) and beta: the mean over pairs of -log sigmoid(margin), a 0-d tensor. The
# check draws fresh log-probabilities (one batch with policy = reference) and compares with the kit's
# `finetune.dpo_loss`.


# %%
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """() mean over pairs of -log sigmoid(beta (pc - rc) - beta (pr - rr)); each input (B,)."""
    ...  # your code here


dpo_loss = exercises.use("08.dpo_loss", dpo_loss, kit=lambda *logps_and_beta: ft.dpo_loss(*logps_and_beta)[0])

# %%
all_pairs = fd.preference_pairs(2000, language="english", max_shapes=1)
for pair in all_pairs[:2]:
    print(json.dumps({k: pair[k] for k in ("kind", "chosen", "rejected")}))
pairs = [pair for pair in all_pairs if pair["kind"] == "wrong"]   # the verbose ones are already won (see below)
held_pairs = fd.preference_pairs(40 if FAST else 200, split="val", seed=8, language="english", max_shapes=1)


def pair_batch(pairs) -> dict:
    """The B chosen sequences, then the B rejected ones, in order: (2B, T)."""
    examples = [ft.pair_examples(tokenizer, p["prompt"], p["chosen"], p["rejected"]) for p in pairs]
    return ft.collate([c for c, _ in examples] + [r for _, r in examples], tokenizer.pad_token_id or 0)


@torch.no_grad()
def pair_logps(model, batch) -> torch.Tensor:
    """(2B,) your reply_logps of every row; a row's prompt ends where its first label is."""
    prompt_lengths = (batch["labels"] != -100).int().argmax(dim=1)            # (2B,)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return reply_logps(logits, batch["input_ids"], prompt_lengths, batch["attention_mask"])


def preferred_rate(model, pairs) -> float:
    logps = pair_logps(model, pair_batch(pairs))                   # (2B,) chosen rows first
    return (logps[:len(pairs)] > logps[len(pairs):]).float().mean().item()


def merged_plain(model: nn.Module) -> nn.Module:
    """A copy of `model` with every LoRA update merged (your merge) and the plain linear put back."""
    model = copy.deepcopy(model)
    for name, layer in lora_modules(model).items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.base_layer)
    return model


policy = lora.apply_lora(merged_plain(adapted), r=8, alpha=16)
rate_before = preferred_rate(policy, held_pairs)
dpo_log = ft.train_steps(policy, ft.dpo_batches(tokenizer, pairs, batch_size=8), 15 if FAST else 60, lr=5e-4,
                         objective="dpo", beta=0.1, warmup=5, log_every=1)
rate_after = preferred_rate(policy, held_pairs)
with torch.no_grad():
    kit_held_loss, held_metrics = ft.dpo_batch_loss(policy, pair_batch(held_pairs), beta=0.1)  # held-out rewards
    held = pair_logps(policy, pair_batch(held_pairs))                          # (2B,) policy
    with lora.adapters_disabled(policy):
        held_ref = pair_logps(policy, pair_batch(held_pairs))                  # (2B,) reference: adapters off
n = len(held_pairs)
your_held_loss = dpo_loss(held[:n], held[n:], held_ref[:n], held_ref[n:], 0.1)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.2))
ax1.plot([e["reward_margin"] for e in dpo_log], label="this run")
ax1.plot([e["reward_margin"] for e in EVIDENCE["dpo"]["log"]], alpha=0.6, label="evidence run")
ax1.set(xlabel="step", ylabel="reward margin", title="DPO: chosen minus rejected reward")
ax1.legend()
ax2.plot([e["loss"] for e in dpo_log])
ax2.axhline(0.6931, color="gray", linestyle=":", label="log 2 (margin 0)")
ax2.set(xlabel="step", ylabel="DPO loss")
ax2.legend()
plt.show()
start = f"sft_step_{EVIDENCE['dpo']['from_sft_step']}"
print(f"held-out preferred-answer rate: {rate_before:.0%} -> {rate_after:.0%}   (evidence run, from SFT step "
      f"{EVIDENCE['dpo']['from_sft_step']}: {EVIDENCE[start]['preferred_rate']:.0%} -> "
      f"{EVIDENCE['after_dpo']['preferred_rate']:.0%})")
print(f"held-out pairs: reward margin {held_metrics['reward_margin']:.2f}, "
      f"chosen reward above rejected in {held_metrics['accuracy']:.0%}; DPO loss yours "
      f"{your_held_loss.item():.4f}, the kit's {kit_held_loss.item():.4f}")

# %% [markdown]
# We train on the pairs that reject a wrong colour. Pairs against the verbose answer are won from the
# start (a long reply has a much lower summed log-probability), and DPO can widen their margin without
# limit by making the verbose reply ever less likely: at a high learning rate those easy margins take
# over the loss and the held-out rate on the hard pairs falls. Watching the held-out margin, not only
# the training one, is the lesson.

# %%
assert abs(dpo_log[0]["loss"] - 0.6931) < 1e-3 and dpo_log[0]["reward_margin"] == 0.0  # B = 0: policy = reference
assert max(e["reward_margin"] for e in dpo_log) > 0.1
assert held_metrics["reward_margin"] > 0 and held_metrics["accuracy"] > 0.5, held_metrics  # it generalises
assert abs(your_held_loss.item() - kit_held_loss.item()) < 1e-4

# %% [markdown]
# ## 5 · Saving an adapter, loading it in peft · core, 4 min
#
# `lora.save_adapter` writes peft's two files: `adapter_config.json` (rank, alpha, targets) and
# `adapter_model.safetensors` (each layer's A and B under the `transformers` module name). The adapter
# is a few hundred kB; the base it needs is not copied. `peft` loads it onto the `transformers` model:

# %%
from peft import PeftModel
from transformers import AutoModelForCausalLM

folder = tempfile.mkdtemp()
lora.save_adapter(student, folder)
saved = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
print({k: saved[k] for k in ("peft_type", "r", "lora_alpha", "target_modules")},
      f"{os.path.getsize(os.path.join(folder, 'adapter_model.safetensors')) / 1e3:.0f} kB")
with warnings.catch_warnings():  # peft 0.21 reads transformers' deprecated is_gradient_checkpointing: not ours
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), folder).eval()
prompt = tokenizer.apply_chat_template(held_out[0]["messages"][:-1], add_generation_prompt=True, tokenize=False)
ids = torch.tensor([tokenizer.encode(prompt)])                                    # (1, T)
with torch.no_grad():
    ours, theirs = student(ids).logits, reference(input_ids=ids).logits
notebook.compare("ernie-lab LoRA vs peft on transformers", ours, theirs, atol=1e-4)

# %%
reloaded = lora.load_adapter(copy.deepcopy(base), folder)
with torch.no_grad():
    assert torch.allclose(reloaded(ids).logits, ours, atol=1e-5)
assert saved["r"] == 8 and saved["lora_alpha"] == 16 and "q_proj" in saved["target_modules"]
shutil.rmtree(folder)  # the adapter is read back: its temporary folder can go

# %% [markdown]
# ## 6 · Merging · core, 2 min
#
# For serving, fold the update into the weight: `W <- W + (alpha / r) B A`, what your `merge` does; the
# kit's `merge_lora` does it for every layer of a model. The merged model has no extra
# cost per token; `unmerge_lora` takes the update out again (up to rounding), and `merge_lora(model,
# unload=True)` gives back plain linear layers that `ernie_lab.save_model` writes as an ordinary checkpoint.

# %%
with torch.no_grad():
    lora.merge_lora(student)
    merged = student(ids).logits
    lora.unmerge_lora(student)
    unmerged = student(ids).logits
notebook.compare("merged vs adapter form", merged, ours, atol=1e-4)
notebook.compare("unmerged vs adapter form", unmerged, ours, atol=1e-4)

# %% [markdown]
# ## 7 · QLoRA: LoRA on an int4 base · optional, 4 min
#
# The frozen base does not need full precision: QLoRA (Dettmers et al., 2023) stores it in 4 bits and
# trains float adapters beside it. `quant.quantize(model, "w4a16")` packs every linear layer into int4
# codes with a scale per group; `apply_lora` wraps those quantized layers like any other. The backward
# needs only the input gradient `dL/dy W`, computed from W dequantized on the fly; the codes never change.

# %%
qmodel = quant.quantize(copy.deepcopy(base), "w4a16")
int4_bytes, fp32_bytes = quant.weight_bytes(qmodel), quant.weight_bytes(base)
lora.apply_lora(qmodel, r=8, alpha=16)
adapter_bytes = 4 * lora.trainable_parameters(qmodel)
qlog = ft.train_steps(qmodel, ft.sft_batches(tokenizer, conversations, 16), 20 if FAST else 100, lr=5e-3, log_every=1)
layers = [m for m in base.modules() if isinstance(m, torch.nn.Linear) and m is not base.lm_head]
linear_fp32 = sum(m.weight.numel() * 4 for m in layers)
linear_int4 = sum(quant.weight_bytes(m) for m in quant.quantized_layers(qmodel).values())
plt.figure(figsize=(6, 3))
plt.bar(["LoRA, fp32 base", "QLoRA, int4 base"], [fp32_bytes / 1e6, int4_bytes / 1e6], label="base weights")
plt.bar(["LoRA, fp32 base", "QLoRA, int4 base"], [adapter_bytes / 1e6] * 2,
        bottom=[fp32_bytes / 1e6, int4_bytes / 1e6], label="adapter")
plt.ylabel("MB"), plt.legend(), plt.title("Weight memory while fine-tuning")
plt.show()
print(f"QLoRA loss {qlog[0]['loss']:.2f} -> {qlog[-1]['loss']:.2f}; base weights {fp32_bytes / 1e6:.1f} MB -> "
      f"{int4_bytes / 1e6:.1f} MB; the linear layers alone {linear_fp32 / 1e6:.1f} -> {linear_int4 / 1e6:.2f} MB "
      f"({linear_fp32 / linear_int4:.1f}x); the tied embedding stays float32")

# %%
assert qlog[-1]["loss"] < qlog[0]["loss"]
assert linear_int4 < 0.2 * linear_fp32
with tempfile.TemporaryDirectory() as qfolder:
    lora.save_adapter(qmodel, qfolder)
    assert os.path.getsize(os.path.join(qfolder, "adapter_model.safetensors")) < 2e6

# %% [markdown]
# At 21B-A3B the same arithmetic is what matters: bf16 weights take about 44 GB, int4 about 11 GB, and a
# LoRA of attention at r = 8 adds a few tens of MB: fine-tuning fits on one consumer GPU.

# %%
for precision in ("bf16", "int4"):
    print(f"21B-A3B weights in {precision}: {family.weight_bytes(config, precision) / 1e9:5.1f} GB")

# %% [markdown]
# ## 8 · SFT on the vision-language model · optional, 3 min
#
# The same `ft.sft`, with a processor: the picture goes through the VL chat template as the first item
# of the user's turn, its placeholder tokens and the question carry no loss, the reply does. The shipped
# tiny VL model counts shapes and names backgrounds, but was never asked for both in one brief reply
# ("three on white."). LoRA on the decoder (experts included) teaches it the form in a minute;
# `scripts/finetune_vl_evidence.py` is the full run (numbers in `benchmarks/results/finetune_vl_evidence.json`),
# with DPO-LoRA on the same pictures too: preferring the right brief reply over one with a wrong count or
# background raises the held-out preferred-answer rate of the shipped model from 73% to 100% in 150 steps.

# %%
from ernie_lab import scenes
from ernie_lab.io.processor import VLProcessor

VL_FOLDER = notebook.repo_path("data", "tiny-ernie-vl")
vl_model, vl_tokenizer = ernie_lab.load_model(VL_FOLDER).eval(), ernie_lab.load_tokenizer(VL_FOLDER)
BRIEF = "How many shapes, on what background? Answer briefly."


def brief_conversation(scene):
    return [{"role": "user", "content": [{"type": "image", "image": scenes.render(scene)}, {"type": "text", "text": BRIEF}]},
            {"role": "assistant", "content": f"{scenes.NUMBER_WORDS[len(scene.shapes)]} on {scene.background}."}]


def brief_is_right(scene, reply):
    words = reply.replace(".", " ").split()
    return words[:1] == [scenes.NUMBER_WORDS[len(scene.shapes)]] and scene.background in words[1:3]


vl_held_out = [scene for scene, _ in zip(scenes.scene_stream(21, "val"), range(12))]
vl_train = [brief_conversation(scene) for scene, _ in zip(scenes.scene_stream(5, "train"), range(300))]


def brief_accuracy(net):
    replies = [ernie_lab.chat(net, vl_tokenizer, brief_conversation(s)[:1], max_new_tokens=8) for s in vl_held_out]
    return sum(brief_is_right(s, r) for s, r in zip(vl_held_out, replies)) / len(vl_held_out), replies


vl_before, replies_before = brief_accuracy(vl_model)
lora.apply_lora(vl_model, r=8, alpha=16)
ft.sft(vl_model, vl_tokenizer, vl_train, ft.sft_config(lr=2e-3, max_steps=40, warmup_steps=5), batch_size=8,
       processor=VLProcessor(vl_tokenizer, config=vl_model.config))
vl_after, replies_after = brief_accuracy(vl_model)
print(f"held-out, new answer form: before {vl_before:.0%} (e.g. {replies_before[0]!r}), "
      f"after 40 SFT-LoRA steps {vl_after:.0%} (e.g. {replies_after[0]!r})")
assert vl_before == 0.0 and vl_after >= 0.75

# %% [markdown]
# ## 9 · Exercises · optional, 20 min
#
# **Exercise 1.** How many numbers does LoRA at r = 8 train on all seven projections (q, k, v, o, gate,
# up, down) of every layer of ERNIE-4.5-0.3B? Its shapes: 18 layers, hidden 1024, q 1024 -> 2048,
# k and v 1024 -> 256, o 2048 -> 1024, gate and up 1024 -> 3072, down 3072 -> 1024.

# %%
lora_numbers_0_3b = ...  # your answer: a number

exercises.check("08.lora_parameters", lora_numbers_0_3b)

# %% [markdown]
# **Exercise 2 (an experiment).** Train SFT-LoRA with `r=1`, `r=4` and `r=32` for 300 steps each (same
# lr and alpha = 2r) and compare held-out accuracy: does rank matter for this task?
#
# ## Key takeaways
#
# * LoRA trains `(alpha / r) B A` beside each frozen linear layer: r (in + out) numbers instead of in x out,
#   and the adapted model starts exactly at the base (B = 0).
# * SFT's loss sits on the assistant's tokens only (labels -100 elsewhere, padding included); the same
#   mask gives the reply's log-probability that DPO compares.
# * DPO raises the chosen answer's likelihood relative to the rejected one, measured against a frozen
#   reference: the same model with its adapters off.
# * An adapter is two small files in peft's format; merging folds it into the weights for free inference.
# * QLoRA keeps the frozen base in int4: the memory of fine-tuning is then mostly the int4 weights.
#
# ## What we built
#
# * `LoRALinear`: your LoRA layer with merge and unmerge, equal to the kit's and to peft's on the same
#   weights; the notebook adapted the tiny model with it and trained it with SFT.
# * `reply_logps`: the SFT label mask turned into the log-probability of each reply of a padded batch.
# * `dpo_loss`: the DPO objective, equal to the kit's on the held-out pairs of the trained policy.
# * With the kit: a LoRA adapter trained by SFT, saved in peft's format and loaded by peft, a DPO run,
#   a QLoRA run on an int4 base and an SFT run on the VL model.
#
# ## Further reading
#
# * Hu et al., 2021, *LoRA: Low-Rank Adaptation of Large Language Models*
#   ([arXiv:2106.09685](https://arxiv.org/abs/2106.09685)): the low-rank update B A beside a frozen weight,
#   B zero at the start, alpha / r scaling; here applied to ERNIE's attention and MLP projections, and
#   (optionally) to each routed expert of a MoE, which the paper did not consider.
# * Dettmers et al., 2023, *QLoRA: Efficient Finetuning of Quantized LLMs*
#   ([arXiv:2305.14314](https://arxiv.org/abs/2305.14314)): LoRA over a 4-bit NormalFloat base with double
#   quantization and paged optimizers; the kit's QLoRA uses its plain int4 weight-only format instead.
# * Ouyang et al., 2022, *Training language models to follow instructions with human feedback*
#   ([arXiv:2203.02155](https://arxiv.org/abs/2203.02155)): InstructGPT's SFT, then a reward model and
#   PPO; SFT on the reply tokens is the first step of the recipe used here.
# * Rafailov et al., 2023, *Direct Preference Optimization: Your Language Model is Secretly a Reward Model*
#   ([arXiv:2305.18290](https://arxiv.org/abs/2305.18290)): the loss written above, which replaces the reward
#   model and PPO by a classification loss on preference pairs.
# * Baidu, 2025, *ERNIE 4.5 Technical Report*
#   ([PDF](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf)): post-training with SFT,
#   DPO and a unified preference optimisation (UPO); ERNIEKit offers SFT, LoRA, DPO and QAT.
#
# **Next**: notebook 09 scales the arithmetic up: the whole ERNIE 4.5 family, memory and parallelism.

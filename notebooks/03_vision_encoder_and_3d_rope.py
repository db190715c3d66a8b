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
# # 03 · The vision encoder and 3-D rotary positions
#
# **What you will learn:** how a picture becomes decoder tokens (patches, a ViT with 2-D rotary
# positions, the adapter's merges) and how the decoder places them in time, height and width. You write
# patchify, the ViT block with its 2-D rotary positions and the adapter's merges yourself; the notebook
# goes on with your pieces.
#
# **Time:** 82 min (core 79 min). **Memory:** under 2 GB.
#
# ![The vision-language pipeline](../figures/vl_pipeline.png)
#
# ERNIE 4.5 VL reads pictures and videos alongside text. Before the decoder sees anything, four
# steps turn pixels into tokens:
#
# 1. **preprocess**: resize so both sides are multiples of 28, normalise, cut into 14x14 patches;
# 2. **ViT**: a vision transformer mixes the patches of each frame, with 2-D rotary positions;
# 3. **adapter**: merges each 2x2 window of patches, then each pair of frames, into one token of the
#    decoder's width (a still image is paired with itself);
# 4. **3-D positions**: the decoder gives every token a (time, height, width) position and splits
#    its rotary frequencies between the three axes.
#
# ![3-D positions](../figures/positions_3d.png)
#
# Each step is built with `ernie_lab` and checked against `transformers`' reference on the same
# weights. `ERNIE_LAB_FAST=1` shrinks the pictures; every check still runs.

# %%
# %matplotlib inline
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import matplotlib.cbook as cbook
import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from ernie_lab import exercises, hub_names, image_processing, rope3d, vision
from ernie_lab import notebook
from ernie_lab.course.notebook import setup
from ernie_lab.model.rope import apply_rope

FAST = setup()  # fast mode: from ERNIE_LAB_FAST (make lab FAST=1); write FAST = True here to force it
MAX_PIXELS = 28 * 28 * (60 if FAST else 300)   # bounds for our demo picture: ~60 or ~300 tokens
picture = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
print("picture:", picture.size)

# %% [markdown]
# ## 1 · From pixels to patches · core, 17 min
#
# The side lengths must be multiples of $28 = 14 \times 2$: 14 is the patch size and 2 the merge
# window of the adapter. `fit_to_grid` rounds each side to the nearest multiple of 28; if the area
# leaves the bounds `[min_pixels, max_pixels]`, it scales both sides by one factor and rounds again
# (down when shrinking, up when growing), so the aspect ratio survives as well as 28-pixel steps allow.
# The defaults allow 56x56 up to about 4.8 megapixels (6177 merged tokens).

# %%
height, width = image_processing.fit_to_grid(picture.height, picture.width, max_pixels=MAX_PIXELS)
batch = image_processing.preprocess_images([picture], max_pixels=MAX_PIXELS)
pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
print(f"{picture.width}x{picture.height} -> {width}x{height} pixels")
print("pixel_values", tuple(pixels.shape), "image_grid_thw", grid.tolist())
print("decoder tokens for this picture:", vision.tokens_per_item(grid))

# %%
t, gh, gw = grid[0].tolist()
assert height % 28 == 0 and width % 28 == 0 and height * width <= MAX_PIXELS
assert (gh, gw) == (height // 14, width // 14) and pixels.shape == (gh * gw, 3 * 14 * 14)
assert vision.tokens_per_item(grid) == [gh * gw // 4]

# The same numbers as transformers' image processor (its PIL backend: no torchvision needed)
from transformers import Ernie4_5_VLMoeImageProcessorPil

reference = Ernie4_5_VLMoeImageProcessorPil()([picture], size={"shortest_edge": 56 * 56, "longest_edge": MAX_PIXELS},
                                              return_tensors="pt")
assert torch.equal(reference["image_grid_thw"], grid)
assert (reference["pixel_values"] - pixels).abs().max() < 1e-5
print("preprocessing matches transformers")

# %% [markdown]
# ### In which order are the patches stored?
#
# Not row by row. `patchify` stores the four patches of each 2x2 merge window next to each other,
# windows row by row. The adapter can then merge a window with a plain `reshape`. The numbers
# below are the row index of each patch in `pixel_values`.

# %%
order = torch.arange(gh * gw)
positions = vision.vision_positions(grid)            # (N, 2): (row, column) of each stored patch
where = torch.zeros(gh, gw, dtype=torch.long)
where[positions[:, 0], positions[:, 1]] = order

resized = picture.resize((width, height), Image.Resampling.BICUBIC)
fig, ax = plt.subplots(figsize=(10, 7.5))
ax.imshow(resized)
for r in range(gh):
    for c in range(gw):
        if r < 6 and c < 8:
            ax.text(c * 14 + 7, r * 14 + 7, str(int(where[r, c])), ha="center", va="center", fontsize=13,
                    color="yellow", bbox=dict(facecolor="black", alpha=0.5, pad=0.5, linewidth=0))
for k in range(0, max(gh, gw) + 1):
    lw = 1.2 if k % 2 == 0 else 0.3
    ax.axhline(k * 14 - 0.5, color="white", lw=lw)
    ax.axvline(k * 14 - 0.5, color="white", lw=lw)
ax.set_xlim(0, 8 * 14); ax.set_ylim(6 * 14, 0)
ax.set_title("Top-left corner: 14x14 patches (thin) and 2x2 merge windows (thick),\nlabelled with their row in pixel_values")
ax.set_xlabel("x (pixels)"); ax.set_ylabel("y (pixels)")
plt.show()

# %%
assert where[0, :2].tolist() == [0, 1] and where[1, :2].tolist() == [2, 3]   # first window: rows 0-3
assert where[0, 2] == 4                                                     # the next window starts at row 4
patch_5 = pixels[5].reshape(3, 14, 14)                                      # a patch is channel-major 3x14x14
r, c = positions[5].tolist()
expected = image_processing.normalize(torch.from_numpy(np.array(resized)).permute(2, 0, 1))[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14]
assert torch.allclose(patch_5, expected, atol=1e-6)

# %% [markdown]
# **Write it: patchify.** Frames (T, 3, H, W), H and W multiples of 28, to patches (T H W / 196, 588):
# each patch flattened channel-major (3, 14, 14), the four patches of each 2 x 2 window on consecutive
# rows, windows row by row, frames one after the other. One `reshape`, one `permute`, one `reshape`.

# %%
def patchify(frames):
    """(T, C, H, W) -> (T * H/14 * W/14, C * 14 * 14) in merge-window order."""
    ...   # your code here


# %%
patchify = exercises.use("03.patchify", patchify, kit=image_processing.patchify)
frame = image_processing.normalize(torch.from_numpy(np.array(resized)).permute(2, 0, 1))[None]   # (1, 3, H, W)
notebook.compare("your patchify vs the preprocessor's pixel_values", patchify(frame), pixels, atol=1e-5)

# %% [markdown]
# ## 2 · 2-D rotary positions inside the ViT · core, 5 min
#
# The ViT knows where a patch is only through rotary embeddings. Each head of width $d$ is cut in
# two halves; a quarter of the usual frequencies $\omega_j = 10000^{-4j/d}$ serve both axes:
#
# $$\text{angles} = [\,\text{row}\cdot\omega_0, \dots, \text{row}\cdot\omega_{d/4-1},\;
# \text{col}\cdot\omega_0, \dots, \text{col}\cdot\omega_{d/4-1}\,]$$
#
# and dimension $i$ is rotated together with dimension $i + d/2$ (the *rotate-half* layout of
# Llama-style code, unlike ERNIE's text decoder, which rotates neighbouring pairs). After rotation,
# $q \cdot k$ depends only on the offset between two patches, in both directions. The map below is
# the score of one fixed query at the centre against the same key placed everywhere.

# %%
head_dim = 80                                       # the real ViT: 1280 wide / 16 heads
q = torch.randn(1, 1, head_dim); k = q.clone()
rows, cols = torch.meshgrid(torch.arange(25), torch.arange(25), indexing="ij")
grid_positions = torch.stack([rows.flatten(), cols.flatten()], -1)       # (625, 2)
cos, sin = vision.vision_rope_angles(grid_positions, head_dim, 10000.0)
centre = 12 * 25 + 12
q_rot = vision.apply_rope_half(q.expand(625, 1, head_dim), cos, sin)[centre]
k_rot = vision.apply_rope_half(k.expand(625, 1, head_dim), cos, sin)
scores = (k_rot * q_rot).sum(-1).reshape(25, 25)

fig, ax = plt.subplots(figsize=(5, 4.2))
im = ax.imshow(scores, cmap="viridis", extent=(-12.5, 12.5, 12.5, -12.5))
ax.set_title("q·k of a patch at (0, 0) with the same vector\nplaced at every (row, column) offset")
ax.set_xlabel("column offset (patches)"); ax.set_ylabel("row offset (patches)")
fig.colorbar(im, ax=ax, label="score")
plt.show()


# %%
def score(p, r):
    cp, sp = vision.vision_rope_angles(torch.tensor([p]), head_dim, 10000.0)
    cr, sr = vision.vision_rope_angles(torch.tensor([r]), head_dim, 10000.0)
    return (vision.apply_rope_half(q, cp, sp) * vision.apply_rope_half(k, cr, sr)).sum()

assert torch.allclose(score((2, 3), (0, 0)), score((12, 13), (10, 10)), atol=1e-4)   # only the offset counts
assert scores[12, 12] == scores.max()                                              # a vector agrees most with itself
print("frequencies per axis:", head_dim // 4)

# %% [markdown]
# ## 3 · The ViT and the adapter, compared with transformers · core, 35 min
#
# We build a small random `transformers` ERNIE 4.5 VL model, save it with `save_pretrained` (the
# Hub's tensor names: `vision_model.*`, `resampler_model.*`) and load its vision tensors into
# `ernie_lab.vision.VisionEncoder` and `VisionAdapter` through `hub_names.VISION_NAME_MAP`, the whole name
# translation (checkpoint names live with the other Hub names in `ernie_lab.hub_names`):

# %%
for hub, lab in hub_names.VISION_NAME_MAP:
    print(f"{hub:50s} -> {lab}")

# %%
import shutil
import tempfile

from safetensors.torch import load_file
from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

torch.manual_seed(0)
ref_config = Ernie4_5_VLMoeConfig(
    text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=128, moe_intermediate_size=[32, 16], moe_k=2, moe_num_experts=4,
                     moe_num_shared_experts=1, vocab_size=104000),
    vision_config=dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=128),
)
reference_model = Ernie4_5_VLMoeForConditionalGeneration(ref_config).eval()
with torch.no_grad():   # move norms and biases off their 1 / 0 initial values so that mistakes show
    for name, p in reference_model.named_parameters():
        if "vision_tower" in name or "resampler" in name:
            p.add_(0.1 * torch.randn_like(p))
folder = Path(tempfile.mkdtemp()) / "tiny-vl"
reference_model.save_pretrained(folder)
hub_tensors = load_file(folder / "model.safetensors")
shutil.rmtree(folder.parent)  # read: the temporary checkpoint can go

config = vision.VisionConfig.from_dict(ref_config.vision_config.to_dict(), ref_config.text_config.hidden_size)
encoder, adapter = vision.VisionEncoder(config).eval(), vision.VisionAdapter(config).eval()
encoder_state, adapter_state = hub_names.vision_state_from_hub(hub_tensors)
encoder.load_state_dict(encoder_state, strict=True)
adapter.load_state_dict(adapter_state, strict=True)
print(encoder.__class__.__name__, sum(p.numel() for p in encoder.parameters()), "parameters;",
      adapter.__class__.__name__, sum(p.numel() for p in adapter.parameters()))

# %%
with torch.no_grad():
    features = encoder(pixels, grid)                          # (patches, ViT width)
    tokens = adapter(features, grid)                          # (tokens, text width)
    ref_features = reference_model.model.vision_tower(pixels, grid).last_hidden_state
    ref_tokens = torch.cat(reference_model.model.get_image_features(pixels, grid).pooler_output)
print("features", tuple(features.shape), "max |diff|", float((features - ref_features).abs().max()))
print("tokens  ", tuple(tokens.shape), "max |diff|", float((tokens - ref_tokens).abs().max()))
assert (features - ref_features).abs().max() < 1e-4
assert (tokens - ref_tokens).abs().max() < 1e-4
assert tokens.shape == (gh * gw // 4, ref_config.text_config.hidden_size)

# %% [markdown]
# ### The ViT block and the adapter, written by you
#
# The same computation with nothing but the loaded weights. **A ViT block** is pre-norm LayerNorm,
# bidirectional attention with the 2-D rotate-half RoPE of section 2 (every patch sees every patch of its
# frame: no mask), and an MLP with the "quick GELU" $z\,\sigma(1.702z)$. Its parts: `block.norm1`,
# `block.attn.qkv` (width -> 3 width: q, k, v, each heads x d), `block.attn.num_heads`, `block.attn.proj`,
# `block.norm2`, `block.mlp.fc1`, `block.mlp.fc2`. The angles: $\omega_j = 10000^{-4j/d}$ for $j < d/4$,
# $[\text{row}\,\omega, \text{col}\,\omega]$, and dim $i$ turns with dim $i + d/2$.
#
# **The adapter** concatenates each 2 x 2 window (section 1 stored them on 4 consecutive rows) and runs
# `adapter.spatial_merge`; pairs frame $2k$ with frame $2k+1$ window by window (an image with itself),
# concatenates and runs `adapter.temporal_merge`; then `adapter.norm(adapter.proj(x))`. Both are checked
# against `ernie_lab.vision` on fresh weights; then the notebook runs yours against `transformers`.

# %%
def vit_block(x, block, positions):
    """One ViT block on one frame. x (N, width), positions (N, 2) (row, column) -> (N, width)."""
    ...   # your code here


def adapter_merge(features, grid, adapter):
    """features (N, width) of one picture with patch grid (t, h, w) -> (max(t/2, 1) * h * w / 4, text width)."""
    ...   # your code here


# %%
import torch.nn.functional as F


def kit_vit_block(x, block, positions):
    d = x.shape[-1] // block.attn.num_heads
    return block(x, vision.vision_rope_angles(positions, d, 10000.0), [len(x)])


vit_block = exercises.use("03.vit_block", vit_block, kit=kit_vit_block)
adapter_merge = exercises.use("03.adapter_merge", adapter_merge, kit=lambda f, grid, adapter: adapter(f, grid[None]))

patch_positions = vision.vision_positions(grid)                # (patches, 2): row, column
cos, sin = vision.vision_rope_angles(patch_positions, config.hidden_size // config.num_heads, config.rope_theta)
with torch.no_grad():
    x = pixels @ encoder.patch_embed.proj.weight.T                             # (patches, width)
    first_block = vit_block(x, encoder.blocks[0], patch_positions)
    notebook.compare("ViT block: yours vs ernie_lab.vision", first_block,
                     encoder.blocks[0](x, (cos, sin), [x.shape[0]]), atol=1e-4)
    for block in encoder.blocks[1:]:
        first_block = vit_block(first_block, block, patch_positions)
    hand_features = F.layer_norm(first_block, (config.hidden_size,), encoder.ln.weight, encoder.ln.bias, encoder.ln.eps)
    notebook.compare("ViT features: yours vs transformers", hand_features, ref_features, atol=1e-4)
    notebook.compare("adapter tokens: yours vs transformers", adapter_merge(hand_features, grid[0], adapter), ref_tokens,
                     atol=1e-4)

# %% [markdown]
# **Experiment · what the ViT's positions mean (optional, 5 min).** Predict first, then run: (a) every
# patch's (row, column) moved by the same offset, say 5 rows down and 3 columns right; (b) rows and
# columns swapped, as if the picture were transposed but the pixels were not. Which one changes the
# ViT's features? Try other offsets, or scale the positions by 2.

# %%
def vit_features(positions):                                   # (patches, 2) positions -> (patches, width)
    h = pixels @ encoder.patch_embed.proj.weight.T
    with torch.no_grad():
        for block in encoder.blocks:
            h = vit_block(h, block, positions)
    return F.layer_norm(h, (config.hidden_size,), encoder.ln.weight, encoder.ln.bias, encoder.ln.eps)


shifted = (vit_features(patch_positions + torch.tensor([5, 3])) - hand_features).abs().max().item()
swapped = (vit_features(patch_positions.flip(-1)) - hand_features).abs().max().item()
print(f"(a) all positions shifted: features change by {shifted:.1e}   (b) rows and columns swapped: {swapped:.1e}")
assert shifted < 1e-3 < swapped    # rotary attention sees only offsets between patches, in both directions

# %% [markdown]
# ### What the adapter does
#
# $$x_s = \text{MLP}_s\big([f_{a}; f_{b}; f_{c}; f_{d}]\big) \quad\text{(a 2x2 window, 4w numbers)}$$
# $$x_t = \text{MLP}_t\big([x_s^{(2k)}; x_s^{(2k+1)}]\big) \quad\text{(two frames; an image: } [x_s; x_s])$$
# $$\text{token} = \text{RMSNorm}(W x_t)$$
#
# where each MLP is Linear → GELU → Linear → LayerNorm. So an image of $h \times w$ patches becomes
# $hw/4$ tokens and a video of $t$ frames $t\,hw/8$. Below: the norm of each token, drawn where its
# window sits in the picture (random weights, so the pattern only shows *where* tokens come from).

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
axes[0].imshow(resized); axes[0].set_title(f"resized picture {width}x{height}")
axes[0].set_xlabel("x (pixels)"); axes[0].set_ylabel("y (pixels)")
norms = tokens.norm(dim=-1).reshape(gh // 2, gw // 2)
im = axes[1].imshow(norms, cmap="magma")
axes[1].set_title(f"{norms.numel()} decoder tokens, one per 2x2 window\n(norm of each, random weights)")
axes[1].set_xlabel("window column"); axes[1].set_ylabel("window row")
fig.colorbar(im, ax=axes[1], label="token norm")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 4 · A short video · optional, 3 min
#
# A video is a stack of frames of one size. Frames are merged in pairs, so an odd count gets its
# last frame repeated. Each frame attends only to itself inside the ViT; the adapter's temporal
# MLP then joins frame $2k$ with frame $2k+1$. Our clip: the picture sliding left, 4 frames.

# %%
side = 112 if FAST else 224
frames = np.stack([np.array(picture.crop((40 * i, 100, 40 * i + 300, 400)).resize((side, side))) for i in range(4)])
video = image_processing.preprocess_video(frames, min_pixels=side * side, max_pixels=side * side)
video_pixels, video_grid = video["pixel_values_videos"], video["video_grid_thw"]
with torch.no_grad():
    video_tokens = adapter(encoder(video_pixels, video_grid), video_grid)
    ref_video = torch.cat(reference_model.model.get_video_features(video_pixels, video_grid).pooler_output)
print("video grid", video_grid.tolist(), "->", tuple(video_tokens.shape), "tokens;",
      "max |diff|", float((video_tokens - ref_video).abs().max()))
assert video_tokens.shape[0] == vision.tokens_per_item(video_grid)[0] == 4 * (side // 14) ** 2 // 8
assert (video_tokens - ref_video).abs().max() < 1e-4

fig, axes = plt.subplots(1, 4, figsize=(10, 2.8))
for i, ax in enumerate(axes):
    ax.imshow(frames[i]); ax.set_title(f"frame {i} (pair {i // 2})"); ax.set_xlabel("x"); ax.set_ylabel("y")
plt.tight_layout(); plt.show()

# %% [markdown]
# ## 5 · 3-D positions in the decoder · core, 7 min
#
# The decoder sees text tokens and picture tokens in one sequence. Text counts up 0, 1, 2, ...
# with the same number on all three axes. A picture block of $H \times W$ tokens that starts at
# position $p$ gets $t = p$, $h = p + \text{row}$, $w = p + \text{column}$, and the text after it
# resumes at $p + \max(H, W)$: a picture costs as many positions as its longer side. (The markers
# `<|IMAGE_START|>` / `<|IMAGE_END|>` around a picture are text tokens for positions.)
#
# Below: the prompt `"Describe" <start> [picture] <end> "please"` with our picture.

# %%
IMG, START, END = 100295, 101304, 101305
n_image = vision.tokens_per_item(grid)[0]
ids = torch.tensor([[11, 12, START] + [IMG] * n_image + [END, 13, 14]])
types = rope3d.modality_types(ids)
positions, deltas = rope3d.position_ids_3d(types, grid)        # (3, 1, T), (1, 1)
print("sequence length", ids.shape[1], "| last position", positions[:, 0, -1].tolist(), "| delta", deltas.item())

reference_positions, reference_deltas = reference_model.model.get_rope_index(ids, types, grid, None)
assert torch.equal(positions, reference_positions) and torch.equal(deltas, reference_deltas)
print("3-D positions match transformers' get_rope_index")

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 5.5))
block = positions[:, 0, 3:3 + n_image].reshape(3, gh // 2, gw // 2)
for ax, axis_name, values in zip(axes[:2], ["height", "width"], [block[1], block[2]]):
    ax.imshow(resized, extent=(0, gw // 2, gh // 2, 0))
    ax.imshow(values, cmap="cool", alpha=0.55, extent=(0, gw // 2, gh // 2, 0))
    step = max(1, (gw // 2) // 5)                    # a few large labels, legible when projected
    for r in range(0, gh // 2, step):
        for c in range(0, gw // 2, step):
            ax.text(c + 0.5, r + 0.5, str(int(values[r, c])), ha="center", va="center", fontsize=13,
                    color="white", bbox=dict(facecolor="black", alpha=0.6, pad=1, linewidth=0))
    ax.set_title(f"{axis_name} position of each picture token", fontsize=13)
    ax.set_xlabel("token column"); ax.set_ylabel("token row")
for name, row in zip(["time", "height", "width"], positions[:, 0]):
    axes[2].plot(row, label=name, lw=1)
axes[2].set_title("positions along the sequence"); axes[2].set_xlabel("token index"); axes[2].set_ylabel("position")
axes[2].legend()
plt.tight_layout(); plt.show()

# %% [markdown]
# ### Which rotary frequencies carry which axis
#
# The decoder's heads are 128 wide: 64 rotary pairs. `mrope_section = [22, 22, 20]` gives the first
# 44 pairs to height and width, alternating (even pair: height, odd pair: width), and the last 20
# (slowest) pairs to time. For text, $t = h = w$, and this is exactly the 1-D rotary of the text models.

# %%
axis = rope3d.axis_of_pair(128)
fig, ax = plt.subplots(figsize=(10, 1.6))
colors = np.array([[0.85, 0.4, 0.1], [0.1, 0.45, 0.8], [0.2, 0.65, 0.3]])   # time, height, width
ax.imshow(colors[axis.numpy()][None], aspect="auto")
ax.set_yticks([]); ax.set_xlabel("rotary pair i (frequency theta^(-2i/128) falls to the right)")
ax.set_title("axis per pair: orange = time, blue = height, green = width")
plt.show()

from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (Ernie4_5_VLMoeTextRotaryEmbedding,
                                                                           apply_rotary_pos_emb)
rotary = Ernie4_5_VLMoeTextRotaryEmbedding(ref_config.text_config)
x = torch.randn(1, 2, ids.shape[1], 128)
ref_rotated, _ = apply_rotary_pos_emb(x, x, *rotary(x, positions))
ours = apply_rope(x, *rope3d.rope_angles_3d(positions, 128, 500000.0))
print("rotated queries, max |diff| vs transformers:", float((ours - ref_rotated).abs().max()))
assert (ours - ref_rotated).abs().max() < 1e-5
assert axis[:44].tolist() == [1, 2] * 22 and axis[44:].tolist() == [0] * 20

# %% [markdown]
# ## Exercises · core, 15 min
#
# Each exercise is a stub, followed by a check from `ernie_lab.exercises`: "not attempted yet" and a hint
# until you write something, a message saying what differs when it is wrong, "correct" when it is right.
# The solutions, with their reasoning, are in `solutions/03_vision_encoder_and_3d_rope.py`.
#
# **Exercise 1 · A phone photo.** A photo of 4032 x 3024 pixels with the default bounds: how many decoder
# tokens does it become? Use only `math` and the rule of section 1 (round to multiples of 28; when the
# area exceeds the maximum, shrink both sides by $\sqrt{HW / \text{max}}$ and round *down* to multiples of
# 28), then count 14 x 14 patches and divide by 4.

# %%
photo_tokens = None   # your answer: a number

exercises.check("03.photo_tokens", photo_tokens)

# %% [markdown]
# **Exercise 2 · Positions after a picture.** The prompt is 5 text tokens, then `<start>`, an image of
# grid (1, 8, 12), `<end>` and 3 more text tokens. What are the (t, h, w) positions of the last text
# token? Work it out by hand (the start marker is text; the image block starts at the position after it).

# %%
last_position = None   # your answer: [t, h, w]

exercises.check("03.last_position", last_position)

# %% [markdown]
# ## Key takeaways
#
# * A picture is resized to multiples of 28, cut into 14 x 14 patches, mixed by a ViT within each frame,
#   and merged 2 x 2 (and two frames at a time) into tokens of the decoder's width.
# * Inside the ViT, 2-D rotary positions (rotate-half) tell patches apart; in the decoder, every token has
#   a (t, h, w) position, and text continues after a picture one past the largest position it used.
#
# ## What we built
#
# * `patchify`, `vit_block` and `adapter_merge` (yours), equal to `image_processing.patchify`,
#   `vision.VisionBlock` and `vision.VisionAdapter`, and through them to `transformers`;
# * `image_processing.preprocess_images` / `preprocess_video`, `vision.VisionEncoder`, `vision.VisionAdapter`;
# * `rope3d.position_ids_3d` and `rope3d.rope_angles_3d`: the decoder's 3-D positions.
#
# **What comes next:** notebook **04** puts these in front of the multimodal mixture-of-experts decoder.
#
# ## Further reading
#
# * Baidu ERNIE Team (2025), [ERNIE 4.5 Technical Report](https://ernie.baidu.com/blog/publication/ERNIE_Technical_Report.pdf):
#   the variable-resolution ViT, the adapter's spatial and temporal merges and the 3-D rotary positions.
# * Dosovitskiy et al. (2020), [An Image is Worth 16x16 Words](https://arxiv.org/abs/2010.11929): the ViT,
#   a transformer over image patches; ERNIE's ViT takes 14 x 14 patches at the picture's own resolution
#   and uses 2-D rotary positions instead of learnt position embeddings.
# * Su et al. (2021), [RoFormer](https://arxiv.org/abs/2104.09864): rotary position embedding; the ViT
#   applies it per axis (row, column), the decoder per (t, h, w).
# * Dehghani et al. (2023), [Patch n' Pack: NaViT](https://arxiv.org/abs/2307.06304): pictures of any
#   aspect ratio as variable-length patch sequences; ERNIE's ViT likewise attends within each frame.
# * Wang et al. (2024), [Qwen2-VL](https://arxiv.org/abs/2409.12191): M-RoPE and a 2 x 2 patch merger;
#   ERNIE adds a temporal merge of frame pairs and interleaves the h and w rotary frequencies.

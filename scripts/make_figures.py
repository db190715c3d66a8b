"""Draw the pictures of the ideas into figures/ (`make figures`); the notebooks and the README show them.

Static diagrams, one function each: the decoder layer, the MoE layer, the VL pipeline, 3-D positions,
the KV cache, LoRA, weight-only quantization, the course map, and the family chart. Each is a few boxes
and arrows drawn with matplotlib at a size that stays legible when projected (text >= 12 pt at 100 dpi
on a 12-inch-wide figure). The family chart's numbers come from `ernie_lab.family`, the one source.

The routing pictures (`routing`, `routing_saturation`) come from the shipped tiny VL model,
data/tiny-ernie-vl/, on held-out scenes (ernie_lab.viz draws them). Router saturation needs checkpoints
from *during* training, which the kit does not ship (size): the same recipe is retrained briefly from
the same initialisation, keeping checkpoints at a few steps (``TrainConfig(keep_checkpoints_at=...)``),
and each checkpoint's top-k choices are compared with that run's last one.

    python scripts/make_figures.py            # all of them
    python scripts/make_figures.py moe_layer  # one
    python scripts/make_figures.py routing_saturation --saturation-steps 40   # a shorter retraining
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures"
sys.path.insert(0, str(ROOT))

BLUE, ORANGE, GREEN, GREY, PURPLE, RED, YELLOW = "#c6dbef", "#fdd0a2", "#c7e9c0", "#eeeeee", "#dadaeb", "#fcbba1", "#fff7bc"
FONT = 13


def canvas(width: float, height: float, title: str):
    """A figure with data coordinates = inches, no axes."""
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.set_title(title, fontsize=FONT + 3, fontweight="bold")
    return fig, ax


def box(ax, x, y, w, h, text, color=GREY, fontsize=FONT, style="round,pad=0.02", **kw):
    """A box with its lower-left corner at (x, y) and centred text; returns its centre."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, fc=color, ec="black", lw=1.2, **kw))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, wrap=True)
    return x + w / 2, y + h / 2


def arrow(ax, start, end, color="black", style="-|>", lw=1.6, **kw):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=16, color=color, lw=lw, **kw))


def note(ax, x, y, text, fontsize=FONT - 1, color="#444444", **kw):
    ax.text(x, y, text, fontsize=fontsize, color=color, **kw)


def save(fig, name: str) -> Path:
    path = FIGURES / name
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ figures
def decoder_layer():
    fig, ax = canvas(9, 9.5, "One ERNIE 4.5 decoder layer (pre-norm, residual stream)")
    x, w, h = 2.6, 4.6, 0.7
    rows = [(8.0, "x: residual stream  (B, T, hidden)", GREY), (6.9, "RMSNorm", ORANGE),
            (5.8, "GQA attention + interleaved RoPE\n16 query heads share 2 key/value heads", BLUE),
            (4.7, "+  (add back to the stream)", GREY), (3.6, "RMSNorm", ORANGE),
            (2.5, "SwiGLU MLP:  down( silu(gate x) * up x )\nMoE layers: router + experts instead", GREEN),
            (1.4, "+  (add back to the stream)", GREY)]
    centres = [box(ax, x, y, w, h, text, color) for y, text, color in rows]
    for (cx, cy), (_, ny) in zip(centres, centres[1:]):
        arrow(ax, (cx, cy - h / 2), (cx, ny + h / 2))
    for top, bottom in ((0, 3), (3, 6)):                          # the skip connections
        y0, y1 = centres[top][1], centres[bottom][1]
        ax.plot([x, 1.6, 1.6], [y0, y0, y1], color="#555555", lw=1.6)
        arrow(ax, (1.6, y1), (x, y1), color="#555555")
        note(ax, 0.35, (y0 + y1) / 2, "residual", rotation=90, va="center")
    arrow(ax, (centres[-1][0], 1.4), (centres[-1][0], 0.6))
    note(ax, centres[-1][0] + 0.15, 0.75, "to the next layer (x 18 in the 0.3B)")
    note(ax, x + w + 0.15, 5.9, "KV cache:\nkeys and values\nof past tokens", fontsize=FONT - 1)
    return save(fig, "decoder_layer.png")


def moe_layer():
    fig, ax = canvas(12, 6.5, "The MoE layer: a router picks k experts per token; shared experts see every token")
    box(ax, 0.3, 2.9, 1.6, 0.8, "token x", GREY)
    box(ax, 2.6, 4.3, 2.6, 1.0, "router\nsoftmax(W x), float32", PURPLE)
    box(ax, 2.6, 2.7, 2.6, 1.2, "top-k of p + b\n(bias b: choice only)\nweights renormalised", PURPLE, fontsize=FONT - 1)
    arrow(ax, (1.9, 3.3), (2.6, 4.7))
    arrow(ax, (3.9, 4.3), (3.9, 3.9))
    experts = [(6.2 + 0.95 * i, i in (1, 4)) for i in range(6)]
    for i, (ex, chosen) in enumerate(experts):
        box(ax, ex, 4.0, 0.8, 1.2, f"E{i}", GREEN if chosen else "white", fontsize=FONT)
        if chosen:
            arrow(ax, (5.2, 3.3), (ex + 0.4, 4.0), color="#2ca02c")
    note(ax, 6.2, 5.45, "routed experts (64 in 21B-A3B, k = 6 chosen; white = idle)", fontsize=FONT - 1)
    box(ax, 5.6, 1.2, 4.3, 0.9, "shared experts (2): every token, unscaled", ORANGE, fontsize=FONT - 1)
    arrow(ax, (1.9, 3.1), (5.6, 1.6))
    box(ax, 10.2, 2.0, 1.7, 1.2, "y = sum w_i E_i(x)\n+ shared(x)", YELLOW, fontsize=FONT - 2)
    for ex, chosen in experts:
        if chosen:
            arrow(ax, (ex + 0.4, 4.0), (11.05, 3.2), color="#2ca02c")
    arrow(ax, (9.9, 1.65), (10.6, 2.0))
    note(ax, 0.3, 0.4, "Memory holds every expert; compute uses k of them: 21.8 B stored, 3 B active per token.")
    return save(fig, "moe_layer.png")


def vl_pipeline():
    fig, ax = canvas(13, 5.2, "The vision-language pipeline of ERNIE 4.5 VL")
    steps = [("pixels\n(resized to\nmultiples of 28)", GREY), ("14 x 14\npatches\n(588 numbers)", BLUE),
             ("ViT\n2-D RoPE,\nLayerNorm,\nper frame", BLUE), ("adapter\n2x2 spatial +\n2-frame\ntemporal merge", ORANGE),
             ("picture tokens\nin the prompt\n(3-D positions)", YELLOW), ("decoder:\ntext experts +\nvision experts,\ntwo routers", GREEN)]
    x = 0.2
    centres = []
    for text, color in steps:
        centres.append(box(ax, x, 2.0, 1.85, 1.5, text, color, fontsize=FONT - 1))
        x += 2.15
    for (ax0, ay), (bx, _) in zip(centres, centres[1:]):
        arrow(ax, (ax0 + 0.95, ay), (bx - 0.95, ay))
    note(ax, 0.2, 1.2, "an image of h x w patches becomes h w / 4 tokens; a video of t frames t h w / 8", fontsize=FONT)
    note(ax, 0.2, 0.6, "text tokens route only to text experts, picture tokens only to vision experts (modality isolation)",
         fontsize=FONT)
    note(ax, 0.2, 4.2, "<|IMAGE_START|>  placeholder x N  <|IMAGE_END|> in the token stream; the adapter's outputs replace "
         "the placeholders", fontsize=FONT - 1)
    return save(fig, "vl_pipeline.png")


def positions_3d():
    fig, ax = canvas(12, 5.6, "3-D positions (t, h, w): text counts up on all three, a picture spreads over h and w")
    tokens = [("text", (0, 0, 0)), ("text", (1, 1, 1)), ("<start>", (2, 2, 2))]
    grid = [(3, 3 + r, 3 + c) for r in range(2) for c in range(3)]   # t stays at the start position
    x = 0.3
    for label, (t, h, w) in tokens:
        box(ax, x, 2.4, 1.2, 1.2, f"{label}\n({t}, {h}, {w})", BLUE, fontsize=FONT - 1)
        x += 1.35
    gx = x
    for i, (t, h, w) in enumerate(grid):
        r, c = divmod(i, 3)
        box(ax, gx + c * 1.3, 3.3 - r * 1.25, 1.2, 1.1, f"({t}, {h}, {w})", ORANGE, fontsize=FONT - 1)
    note(ax, gx, 4.6, "picture: 2 x 3 merged tokens, one time step", fontsize=FONT)
    x = gx + 3 * 1.3 + 0.3
    for label, (t, h, w) in (("<end>", (6, 6, 6)), ("text", (7, 7, 7))):
        box(ax, x, 2.4, 1.2, 1.2, f"{label}\n({t}, {h}, {w})", BLUE, fontsize=FONT - 1)
        x += 1.35
    note(ax, 0.3, 1.1, "After the picture, text continues one past the largest position the picture used (5 -> 6).", fontsize=FONT)
    note(ax, 0.3, 0.5, "Rotary pairs are shared out between the axes: ERNIE gives h and w alternate pairs, t the slowest.",
         fontsize=FONT)
    return save(fig, "positions_3d.png")


def kv_cache():
    fig, ax = canvas(12, 5.4, "The KV cache: prefill once, then one token per step")
    note(ax, 0.3, 4.5, "prefill: the whole prompt in one pass", fontsize=FONT, color="black")
    for i in range(5):
        box(ax, 0.3 + i * 0.9, 3.4, 0.8, 0.8, f"t{i}", BLUE)
    note(ax, 0.3, 2.7, "decode: only the new token runs", fontsize=FONT, color="black")
    box(ax, 0.3 + 5 * 0.9, 1.7, 0.8, 0.8, "t5", ORANGE)
    box(ax, 6.0, 2.8, 5.7, 1.6, "cache, per layer: keys and values of t0 ... t4\n2 x kv_heads x head_dim numbers per token\n(0.3B: 18,432 bytes per token in bf16)",
        YELLOW, fontsize=FONT - 1)
    arrow(ax, (4.7, 3.8), (6.0, 3.8))
    arrow(ax, (5.1, 2.1), (6.6, 2.8), color="#d62728")
    note(ax, 6.7, 2.2, "t5 attends to all cached keys,\nthen appends its own key and value", fontsize=FONT - 1)
    note(ax, 0.3, 0.6, "Without the cache every step recomputes all t tokens: cost grows with t per step, t^2 in all.",
         fontsize=FONT)
    return save(fig, "kv_cache.png")


def lora():
    fig, ax = canvas(10, 5.6, "LoRA: a frozen weight plus a trainable low-rank update")
    box(ax, 0.3, 2.3, 1.3, 1.0, "x\n(d_in)", GREY)
    box(ax, 2.4, 3.4, 3.0, 1.3, "W  (d_out x d_in)\nfrozen", BLUE)
    box(ax, 2.4, 1.2, 1.3, 1.3, "A\nr x d_in", ORANGE)
    box(ax, 4.1, 1.2, 1.3, 1.3, "B\nd_out x r\n(starts at 0)", ORANGE, fontsize=FONT - 2)
    box(ax, 6.6, 2.3, 3.0, 1.0, "y = W x + (alpha / r) B A x", YELLOW)
    arrow(ax, (1.6, 2.9), (2.4, 4.0))
    arrow(ax, (1.6, 2.7), (2.4, 1.9))
    arrow(ax, (3.7, 1.85), (4.1, 1.85))
    arrow(ax, (5.4, 4.0), (6.6, 3.0))
    arrow(ax, (5.4, 1.85), (6.6, 2.6))
    note(ax, 0.3, 0.4, "Train r (d_in + d_out) numbers instead of d_in d_out; after training, merge: W + (alpha/r) B A.",
         fontsize=FONT - 1)
    return save(fig, "lora.png")


def quantization():
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100, gridspec_kw=dict(width_ratios=[1.1, 1]))
    fig.suptitle("Weight-only quantization: store weights on a coarse grid, compute in bf16", fontsize=FONT + 3,
                 fontweight="bold")
    rng = np.random.default_rng(0)
    w = rng.normal(0, 1, 24)
    scale = np.abs(w).max() / 7                               # int4, symmetric: -7 .. 7
    q = np.clip(np.round(w / scale), -7, 7)
    left.stem(range(24), w, linefmt="C0-", markerfmt="C0o", basefmt=" ", label="bf16 weight")
    left.plot(range(24), q * scale, "s", color="C3", label="int4: round(w / s) x s")
    for level in range(-7, 8):
        left.axhline(level * scale, color="gray", lw=0.4)
    left.set_xlabel("weight index in one group", fontsize=FONT)
    left.set_ylabel("value", fontsize=FONT)
    left.legend(fontsize=FONT - 1, loc="lower right")
    left.tick_params(labelsize=FONT - 2)
    right.axis("off")
    right.set_xlim(0, 6)
    right.set_ylim(0, 4.6)
    box(right, 0.1, 2.9, 2.6, 1.1, "int4 codes\n+ 1 scale / 128", ORANGE)
    box(right, 3.3, 2.9, 2.6, 1.1, "dequantize\nW = q x s (bf16)", BLUE)
    box(right, 1.7, 0.9, 2.6, 1.1, "y = W x\n(bf16 matmul)", GREEN)
    arrow(right, (2.7, 3.45), (3.3, 3.45))
    arrow(right, (4.6, 2.9), (3.6, 2.0))
    right.text(0.1, 0.2, "4 bits + 2 bytes / 128 weights = 0.26 of bf16", fontsize=FONT - 1)
    fig.tight_layout()
    path = FIGURES / "quantization.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path




def course_map():
    fig, ax = canvas(13, 5.4, "The course: ten notebooks, two 90-minute tracks")
    colors = {"both": GREY, "dense": BLUE, "moe": ORANGE}
    from ernie_lab.course.notebook import COURSE

    for i, (number, title, minutes, _, track, _) in enumerate(COURSE):
        row, col = divmod(i, 5)
        x, y = 0.3 + col * 2.55, 3.0 - row * 1.9
        words = title.split()
        title = " ".join(words[:len(words) // 2 + 1]) + "\n" + " ".join(words[len(words) // 2 + 1:])
        box(ax, x, y, 2.3, 1.3, f"{number}  ({minutes} min)\n{title}", colors[track], fontsize=FONT - 1)
        if col < 4:
            arrow(ax, (x + 2.3, y + 0.65), (x + 2.55, y + 0.65))
    arrow(ax, (0.3 + 4 * 2.55 + 1.15, 3.0), (1.45, 2.4), connectionstyle="arc3,rad=0.0", color="gray")
    box(ax, 0.3, 0.15, 2.6, 0.55, "dense track", BLUE, fontsize=FONT - 1)
    box(ax, 3.1, 0.15, 2.6, 0.55, "MoE / VL track", ORANGE, fontsize=FONT - 1)
    box(ax, 5.9, 0.15, 2.6, 0.55, "both tracks", GREY, fontsize=FONT - 1)
    return save(fig, "course_map.png")


def family_chart():
    from ernie_lab import family as F

    names = ["0.3B", "21B-A3B", "300B-A47B", "VL-28B-A3B", "VL-424B-A47B*"]
    configs = [F.CONFIG_0_3B, F.CONFIG_21B_A3B, F.CONFIG_300B_A47B, F.CONFIG_VL_28B_A3B, F.CONFIG_VL_424B_A47B]
    counts = [F.count_params(c) for c in configs]
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=100)
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [c.total / 1e9 for c in counts], width=0.4, label="total parameters", color="#4C72B0")
    ax.bar([i + 0.2 for i in x], [c.active / 1e9 for c in counts], width=0.4, label="active per token", color="#DD8452")
    for i, c in enumerate(counts):
        ax.text(i - 0.2, c.total / 1e9 * 1.15, f"{c.total / 1e9:.3g}", ha="center", fontsize=FONT - 2)
        ax.text(i + 0.2, c.active / 1e9 * 1.15, f"{c.active / 1e9:.3g}", ha="center", fontsize=FONT - 2)
    ax.set_yscale("log")
    ax.set_xticks(list(x), names, fontsize=FONT - 1)
    ax.set_ylabel("parameters (billions, log scale)", fontsize=FONT)
    ax.set_title("The ERNIE 4.5 family (ernie_lab.family): MoE models touch a fraction of their weights", fontsize=FONT)
    ax.set_ylim(0.1, 3000)
    ax.legend(loc="upper left", fontsize=FONT - 1)
    ax.text(0.99, 0.96, "* VL-424B: vision-expert width reconstructed\nto land on the advertised 424 B", va="top",
            transform=ax.transAxes, ha="right", fontsize=FONT - 3, color="#444444")
    return save(fig, "ernie45_family.png")


def save_figure(fig, name: str) -> Path:
    """Save a matplotlib.figure.Figure made by ernie_lab.viz (it keeps its own constrained layout)."""
    path = FIGURES / name
    fig.savefig(path, dpi=110)
    return path


def tiny_vl():
    import ernie_lab

    folder = ROOT / "data" / "tiny-ernie-vl"
    return ernie_lab.load_model(folder).eval(), ernie_lab.load_tokenizer(folder)


SCENES = 40             # held-out scenes routed for the load and specialisation pictures
SATURATION_STEPS = 150  # steps of the retraining behind routing_saturation.png


def routing() -> list[Path]:
    """Every routing picture of ernie_lab.viz except saturation, on the shipped tiny VL model."""
    import torch

    from ernie_lab import architectures, routing as records, scenes, tiny_models, viz
    from ernie_lab.model.special_tokens import TEXT

    torch.manual_seed(0)
    model, tokenizer = tiny_vl()
    held_out = tiny_models.held_out_scenes(SCENES)
    rec, rows, labels = viz.route_scenes(model, tokenizer, held_out)
    per_attribute = [records.specialisation(rec, rows, values) for values in labels.values()]
    best = max((r for results in per_attribute for r in results), key=lambda r: r["nmi"])["layer"]  # most specialised
    untrained = architectures.build(model.config).init_weights(std=0.02, seed=0).eval()
    rec0, rows0, labels0 = viz.route_scenes(untrained, tokenizer, held_out)

    scene = next(s for s in held_out if len(s.shapes) == 3)  # a busy picture
    routed = viz.route(model, tokenizer, scenes.DESCRIBE, scenes.render(scene))
    by_colour = max(records.specialisation(rec, rows, labels["colour"]), key=lambda r: r["nmi"])["layer"]  # tracks colour most
    text_routed = viz.route(model, tokenizer, " ".join(scenes.caption(s) + "." for s in held_out[:8]))
    texts = [scenes.caption(s) + "." for s in held_out] + ["There are 3 shapes: 1 circle, 2 squares; 0 triangles!"]
    text_rec, text_rows, classes = viz.route_texts(model, tokenizer, texts)
    pictures = {
        "routing_load.png": viz.load_heatmap(rec, title=f"Expert load of the tiny VL model on {SCENES} held-out scenes"),
        "routing_specialisation.png": viz.specialisation(
            rec, rows, labels, title="Trained tiny VL model: vision experts vs what the patch shows"),
        "routing_specialisation_init.png": viz.specialisation(
            rec0, rows0, labels0, title="The same architecture at initialisation"),
        "routing_co_selection.png": viz.co_selection(rec, best),
        "routing_confidence.png": viz.confidence_by_layer(rec),
        "routing_patches.png": viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows,
                                                 layer=by_colour),
        "routing_patches_second_choice.png": viz.patch_overlay(routed.record, routed.image, routed.grid,
                                                               routed.image_rows, layer=by_colour, rank=1,
                                                               confidence=False),
        "routing_path.png": viz.routing_path(routed.record, int(routed.image_rows[5]), routed.tokens),
        "routing_tokens.png": viz.token_strip(text_routed.record, text_routed.tokens, text_routed.text_rows),
        "routing_text_specialisation.png": viz.specialisation(
            text_rec, text_rows, {"word class": classes}, group=TEXT,
            title="Trained tiny VL model: text experts vs word class"),
    }
    return [save_figure(fig, name) for name, fig in pictures.items()]


def routing_saturation() -> Path:
    """Retrain the tiny VL recipe for SATURATION_STEPS steps, keeping checkpoints; draw router saturation."""
    import copy
    import tempfile

    from ernie_lab import architectures, scenes, tiny_models, viz
    from ernie_lab.io.chat import render_prompt
    from ernie_lab.train import TrainConfig, Trainer, checkpoints

    steps = SATURATION_STEPS
    shipped, tokenizer = tiny_vl()
    model = architectures.build(shipped.config).init_weights(std=0.02, seed=0)
    at_zero = copy.deepcopy(model).eval()
    keep = tuple(sorted({max(1, round(steps * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)}))
    with tempfile.TemporaryDirectory(prefix="saturation-") as run_dir:
        config = TrainConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=max(steps // 15, 1), max_steps=steps,
                             weight_decay=0.01, seed=0, keep_checkpoints_at=keep, out_dir=run_dir,
                             log_every=max(steps // 10, 1), balance=0.01, z_loss=1e-3, orthogonal=1e-3,
                             # the shipped main run's schedule (scripts/train_tiny.py, without the vision warm-up)
                             frozen_steps=tiny_models.vl_frozen_steps(steps // 20),
                             lr_scale=tiny_models.VL_LR_SCALE)
        Trainer(model, tiny_models.vl_batches(tokenizer, shipped.config, 16), config).fit()
        probe = [render_prompt(at_zero, tokenizer, viz.messages_for(scenes.DESCRIBE, scenes.render(s)))
                 for s in tiny_models.held_out_scenes(8)]
        over_time = viz.records_over_training([(0, at_zero)] + checkpoints(run_dir), probe)
    fig = viz.saturation(over_time, over_time[-1][1])
    fig.suptitle(f"Router saturation of the tiny VL recipe, retrained for {steps} steps")
    return save_figure(fig, "routing_saturation.png")


ALL = [decoder_layer, moe_layer, vl_pipeline, positions_3d, kv_cache, lora, quantization, course_map, family_chart,
       routing, routing_saturation]


# --- notebook 04 ---
def vl_moe_block():
    """The modality-isolated, heterogeneous MoE block of ERNIE 4.5 VL (notebook 04)."""
    fig, ax = canvas(13, 7.2, "ERNIE 4.5 VL's MoE block: each token is routed only inside its own modality's group")
    box(ax, 0.2, 4.6, 1.9, 0.8, "text token", BLUE)
    box(ax, 0.2, 1.6, 1.9, 0.8, "picture token\n(or its markers)", ORANGE, fontsize=FONT - 1)
    box(ax, 2.8, 4.5, 2.3, 1.0, "text router\nrouters[0] + bias[0]", PURPLE, fontsize=FONT - 1)
    box(ax, 2.8, 1.5, 2.3, 1.0, "vision router\nrouters[1] + bias[1]", PURPLE, fontsize=FONT - 1)
    arrow(ax, (2.1, 5.0), (2.8, 5.0))
    arrow(ax, (2.1, 2.0), (2.8, 2.0))
    for i in range(6):                                           # text experts: wide (1536 in the 28B)
        box(ax, 5.9 + 0.9 * i, 4.3, 0.75, 1.4, f"T{i}", GREEN if i in (0, 3) else "white")
    for i in range(6):                                           # vision experts: narrow (512)
        box(ax, 5.9 + 0.9 * i, 1.75, 0.75, 0.5, f"V{i}", GREEN if i in (2, 5) else "white", fontsize=FONT - 2)
    for i in (0, 3):
        arrow(ax, (5.1, 5.0), (5.9 + 0.9 * i + 0.37, 4.3), color="#2ca02c")
    for i in (2, 5):
        arrow(ax, (5.1, 1.8), (5.9 + 0.9 * i + 0.37, 1.75), color="#2ca02c", connectionstyle="arc3,rad=0.3")
    note(ax, 5.9, 5.9, "text experts: 64, width 1536 (top-6 chosen)")
    note(ax, 5.9, 2.4, "vision experts: 64, width 512, a third of a text expert", fontsize=FONT - 2)
    box(ax, 5.9, 3.05, 5.3, 0.7, "shared experts (2 x width 1536): every token", YELLOW)
    for y in (4.6, 2.4):                                         # both kinds of token reach the shared experts
        arrow(ax, (1.15, y), (5.9, 3.4), color="#888888", lw=1.0)
    box(ax, 11.6, 2.6, 1.25, 1.6, "y = sum w E(x)\n+ shared(x)\nback in\ntoken order", GREY, fontsize=FONT - 3)
    for y in (4.3, 2.25):
        arrow(ax, (11.2, y), (11.6, 3.4))
    arrow(ax, (11.2, 3.4), (11.6, 3.4))
    note(ax, 0.2, 0.45, "No routed expert is shared between the groups: a text token never reaches a vision expert. "
         "Each group has its own router,\nits own correction-bias row and its own balancing loss; the Hub stores "
         "both groups in one list (text first).", fontsize=FONT - 1)
    return save(fig, "vl_moe_block.png")


ALL.append(vl_moe_block)


# --- notebook 02 ---
def router_bias():
    """The router with its correction bias, for one token: CHOOSE with p + b, WEIGH with p alone."""
    import numpy as np

    p = np.array([0.30, 0.24, 0.20, 0.12, 0.09, 0.05])           # softmax over all 6 experts (illustrative)
    b = np.array([-0.08, 0.00, 0.06, 0.00, 0.10, -0.02])         # correction bias: + for under-used experts
    k = 2
    chosen = np.argsort(-(p + b))[:k]                            # E2 and E1 win with the bias
    plain = np.argsort(-p)[:k]                                   # E0 and E1 would win without it
    weights = p[chosen] / max(p[chosen].sum(), 1e-12)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6), dpi=100, gridspec_kw={"width_ratios": [1.6, 1]})
    x = np.arange(len(p))
    left.bar(x, p, color=[ORANGE if e in chosen else GREY for e in x], ec="black", label="p = softmax(W x), float32")
    left.scatter(x, p + b, marker="_", s=900, lw=3, color="#6a51a3", label="p + b: used only to CHOOSE", zorder=3)
    for e in x:
        if b[e]:
            left.annotate("", (e, p[e] + b[e]), (e, p[e]), arrowprops=dict(arrowstyle="-|>", color="#6a51a3", lw=1.5))
    left.set_xticks(x, [f"E{e}" for e in x], fontsize=FONT)
    left.set_ylabel("score", fontsize=FONT)
    left.set_title(f"1 · choose: top-{k} of p + b -> E{chosen[0]}, E{chosen[1]} "
                   f"(without b: E{plain[0]}, E{plain[1]})", fontsize=FONT)
    left.legend(fontsize=FONT - 2, loc="upper right")
    left.set_ylim(0, 0.42)
    right.bar([f"E{e}" for e in chosen], weights, color=ORANGE, ec="black")
    for i, e in enumerate(chosen):
        right.text(i, weights[i] + 0.02, f"{p[e]:.2f} / {p[chosen].sum():.2f}\n= {weights[i]:.2f}", ha="center",
                   fontsize=FONT - 1)
    right.set_ylim(0, 1.0)
    right.set_title("2 · weigh: the UNBIASED p of the chosen,\nrenormalised: p / max(sum, norm_min)", fontsize=FONT)
    fig.suptitle("ERNIE 4.5's router: the correction bias chooses, it never weighs", fontsize=FONT + 3,
                 fontweight="bold")
    return save(fig, "router_bias.png")


ALL.append(router_bias)


# --- notebook 08 ---
def sft_dpo():
    """Top: which tokens of an SFT example carry loss. Bottom: a DPO pair scored by policy and reference."""
    fig, ax = canvas(12, 6.4, "SFT puts its loss on the reply; DPO compares two replies to one prompt")
    tokens = [("<prompt>", GREY), ("What", GREY), ("colour", GREY), ("?", GREY), ("Assistant:", GREY),
              ("Red", ORANGE), (".", ORANGE), ("<end>", ORANGE), ("<pad>", "white"), ("<pad>", "white")]
    for i, (text, color) in enumerate(tokens):
        box(ax, 0.3 + 1.15 * i, 4.5, 1.05, 0.7, text, color, fontsize=FONT - 2)
        label = "-100" if color != ORANGE else "id"
        note(ax, 0.55 + 1.15 * i, 4.1, label, fontsize=FONT - 2)
    note(ax, 0.3, 3.6, "labels: -100 on the prompt and the padding (no loss); the reply's ids (orange) are learnt",
         fontsize=FONT - 1)
    box(ax, 0.3, 1.6, 2.2, 0.9, "prompt x", GREY)
    box(ax, 3.3, 2.2, 2.6, 0.8, "chosen y_w", GREEN)
    box(ax, 3.3, 1.0, 2.6, 0.8, "rejected y_l", RED)
    arrow(ax, (2.5, 2.2), (3.3, 2.6))
    arrow(ax, (2.5, 1.9), (3.3, 1.4))
    box(ax, 6.6, 2.2, 2.4, 0.8, "log pi - log pi_ref", YELLOW, fontsize=FONT - 1)
    box(ax, 6.6, 1.0, 2.4, 0.8, "log pi - log pi_ref", YELLOW, fontsize=FONT - 1)
    arrow(ax, (5.9, 2.6), (6.6, 2.6))
    arrow(ax, (5.9, 1.4), (6.6, 1.4))
    box(ax, 9.6, 1.4, 2.2, 1.2, "-log sigmoid(\nbeta (r_w - r_l))", BLUE, fontsize=FONT - 1)
    arrow(ax, (9.0, 2.6), (9.6, 2.2))
    arrow(ax, (9.0, 1.4), (9.6, 1.8))
    note(ax, 0.3, 0.3, "log pi(y | x) sums the log-probabilities of the reply's tokens (the SFT mask); pi_ref is "
         "the model with its adapters off", fontsize=FONT - 2)
    return save(fig, "sft_dpo.png")


ALL.append(sft_dpo)


# --- notebook 05 ---
def training_step():
    """One update of the training loop and the terms of its loss."""
    fig, ax = canvas(12, 5.4, "One training step: loss terms, backward, clip, AdamW at the scheduled rate")
    box(ax, 0.2, 2.4, 1.6, 1.0, "batch\nids, labels", GREY)
    box(ax, 2.4, 2.4, 1.6, 1.0, "model\nforward", BLUE)
    box(ax, 4.6, 3.9, 2.6, 0.8, "LM: answer tokens\n(labels != -100)", ORANGE, fontsize=FONT - 2)
    box(ax, 4.6, 2.5, 2.6, 0.8, "c_bal E sum f_e P_e", ORANGE, fontsize=FONT - 2)
    box(ax, 4.6, 1.1, 2.6, 0.8, "c_z mean (logsumexp z)^2", ORANGE, fontsize=FONT - 2)
    box(ax, 7.8, 2.4, 1.3, 1.0, "sum,\nbackward", YELLOW, fontsize=FONT - 1)
    box(ax, 9.5, 2.4, 1.0, 1.0, "clip\n||g||", YELLOW, fontsize=FONT - 1)
    box(ax, 10.8, 2.4, 1.0, 1.0, "AdamW\nstep", GREEN, fontsize=FONT - 1)
    box(ax, 9.3, 4.2, 2.6, 0.7, "lr_t: warm-up, cosine", PURPLE, fontsize=FONT - 2)
    arrow(ax, (1.8, 2.9), (2.4, 2.9))
    for y in (4.3, 2.9, 1.5):
        arrow(ax, (4.0, 2.9), (4.6, y))
        arrow(ax, (7.2, y), (7.8, 2.9))
    arrow(ax, (9.1, 2.9), (9.5, 2.9))
    arrow(ax, (10.5, 2.9), (10.8, 2.9))
    arrow(ax, (11.3, 4.2), (11.3, 3.4))
    note(ax, 2.2, 1.9, "router logits", fontsize=FONT - 2)
    note(ax, 0.2, 0.3, "f_e: share of tokens routed to expert e (no gradient); P_e: its mean router probability; "
         "z: router logits", fontsize=FONT - 2)
    return save(fig, "training_step.png")


ALL.append(training_step)


# --- notebook 07 ---
def quantization_groups():
    """Group-wise int4 with zero points (one row, two groups, each with its own grid), and two codes per byte."""
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), dpi=100, gridspec_kw=dict(width_ratios=[1.25, 1]))
    fig.suptitle("int4 with zero points: a grid per group of columns, two codes per byte", fontsize=FONT + 3,
                 fontweight="bold")
    rng = np.random.default_rng(1)
    group = 12
    row = np.concatenate([rng.normal(0.5, 0.35, group).clip(0.02), rng.normal(0.0, 1.2, group)])  # (2 * group,)
    for g, colour in ((0, "C2"), (1, "C1")):
        w = row[g * group:(g + 1) * group]
        low, high = min(w.min(), 0.0), max(w.max(), 0.0)
        scale = (high - low) / 15
        zero = round(-low / scale)
        u = np.clip(np.round(w / scale) + zero, 0, 15)
        xs = np.arange(g * group, (g + 1) * group)
        for code in range(16):
            left.hlines((code - zero) * scale, xs[0] - 0.4, xs[-1] + 0.4, color=colour, lw=0.5, alpha=0.6)
        left.plot(xs, w, "o", color="C0", label="float weight" if g == 0 else None)
        left.plot(xs, (u - zero) * scale, "s", mfc="none", color="C3", label="(u - z) s" if g == 0 else None)
        left.text(xs[0], high + 0.25, f"group {g}: s = {scale:.3f}, z = {zero}", fontsize=FONT - 1, color=colour)
    left.axvline(group - 0.5, color="black", lw=1, ls="--")
    left.axhline(0, color="black", lw=0.8)
    left.set(xlabel="column of one weight row (group size 12 here, 128 in practice)", ylabel="value")
    left.legend(fontsize=FONT - 2, loc="lower left")
    draw_packing(right)
    fig.tight_layout()
    return save(fig, "quantization_groups.png")


def draw_packing(right):
    """Two 4-bit codes, then the byte they share (first code in the high nibble)."""
    right.set(xlim=(0, 8.6), ylim=(0, 5))
    right.axis("off")
    right.text(0.1, 4.55, "codes u0 = 3, u1 = 12 of one row, packed", fontsize=FONT)
    for i, bit in enumerate("0011"):
        box(right, 0.3 + i * 0.9, 3.2, 0.85, 0.8, bit, GREEN)
    for i, bit in enumerate("1100"):
        box(right, 4.5 + i * 0.9, 3.2, 0.85, 0.8, bit, ORANGE)
    note(right, 1.3, 2.85, "u0 << 4: high nibble", fontsize=FONT - 1)
    note(right, 5.4, 2.85, "u1: low nibble", fontsize=FONT - 1)
    arrow(right, (2.1, 2.7), (3.6, 1.9))
    arrow(right, (6.3, 2.7), (4.8, 1.9))
    for i, bit in enumerate("00111100"):
        box(right, 0.7 + i * 0.9, 0.9, 0.85, 0.8, bit, GREEN if i < 4 else ORANGE)
    note(right, 0.7, 0.35, "one byte = u0 << 4 | u1 = 60: half a byte per weight", fontsize=FONT - 1)


ALL.append(quantization_groups)


# --- notebook 01 ---
def gqa_kv_cache():
    """Grouped-query attention over a preallocated KV cache: 8 query heads per KV head, the new rows written
    at `length`, the last query seeing every stored key."""
    fig, ax = canvas(12, 6.6, "Grouped-query attention over a KV cache (one decoding step, one layer)")
    colors = (BLUE, GREEN)
    for h in range(16):                                            # query heads of the new token
        y = 5.5 - h * 0.29 - (0.2 if h >= 8 else 0)
        box(ax, 0.3, y, 1.0, 0.24, f"q{h}", colors[h // 8], fontsize=FONT - 4)
        arrow(ax, (1.3, y + 0.12), (2.5, 4.25 - 2.35 * (h // 8)), color="#888888", lw=0.8, style="-")
    note(ax, 0.25, 0.2, "16 query heads\n(the new token)", fontsize=FONT - 1)
    note(ax, 1.45, 5.85, "query head h reads KV head h // 8", fontsize=FONT - 1)
    capacity, length = 10, 6
    for g, base in enumerate((3.55, 1.2)):                          # two KV heads, each a key and a value buffer
        note(ax, 2.55, base + 1.3, f"KV head {g}: keys and values, (capacity, d)", fontsize=FONT - 1)
        for part, dy in (("k", 0.65), ("v", 0.0)):
            for s in range(capacity):
                stored, new = s < length, s == length
                color = colors[g] if stored else ORANGE if new else "white"
                label = f"{part}{s}" if stored or new else ""
                ax.add_patch(FancyBboxPatch((2.6 + s * 0.62, base + dy), 0.54, 0.5, boxstyle="square,pad=0",
                                            fc=color, ec="black", lw=1.0, ls="-" if stored or new else ":"))
                ax.text(2.87 + s * 0.62, base + dy + 0.25, label, ha="center", va="center", fontsize=FONT - 3)
    note(ax, 2.6, 0.55, "rows 0 .. length-1: stored tokens   |   row length: written now, in place (cache_append)   |   "
         "dotted: room left", fontsize=FONT - 2)
    box(ax, 9.05, 3.0, 2.75, 2.9, "new query at position\nS - 1 = length:\nsees all S = length + 1\nstored keys\n\n"
        "with T new queries:\nquery i sees keys\n0 .. S - T + i", YELLOW, fontsize=FONT - 2)
    note(ax, 9.05, 1.5, "cache per token, per layer:\n2 (k, v) x 2 KV heads x 128\n(one KV head per query head: 8x)",
         fontsize=FONT - 2)
    return save(fig, "gqa_kv_cache.png")


ALL.append(gqa_kv_cache)


# --- notebook 06 ---
def routing_record():
    """What a routing record holds: one forward hook per MoE block fills one LayerRouting per MoE layer, one
    row per token: its modality (expert group), its k chosen experts, their weights and the router's
    probabilities. Illustrative numbers, made the way the block makes them (choose by p + b, weigh by p)."""
    import numpy as np

    rng = np.random.default_rng(6)
    tokens = ["What", "is", "<IMG_START>", "<img>", "<img>", "<IMG_END>", "?"]
    modality = [0, 0, 1, 1, 1, 1, 0]                            # 0 text group, 1 vision group
    E, k = 6, 2
    logits = rng.normal(0, 1.2, (len(tokens), E))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)          # (N, E) softmax in the token's group
    bias = rng.uniform(-0.05, 0.05, (2, E))                                # one correction-bias row per group
    chosen = np.argsort(-(probs + bias[modality]), axis=1)[:, :k]          # (N, k) top-k of p + b
    picked = np.take_along_axis(probs, chosen, 1)
    weights = picked / picked.sum(1, keepdims=True)                        # (N, k) renormalised p

    fig, ax = canvas(12, 6.2, "A routing record: one entry per MoE layer, one row per token")
    for behind, name in ((2, "layer 3"), (1, "layer 2")):                  # the entries behind, as cards
        off = 0.16 * behind
        ax.add_patch(FancyBboxPatch((3.2 + off, 0.5 + off), 8.3, 4.75, boxstyle="round,pad=0.02", fc="white",
                                    ec="#888888", lw=1.0))
        note(ax, 11.55 + off - 0.16, 5.1 + off, name, fontsize=FONT - 4, color="#888888")
    ax.add_patch(FancyBboxPatch((3.2, 0.5), 8.3, 4.75, boxstyle="round,pad=0.02", fc="white", ec="black", lw=1.4))
    note(ax, 3.35, 4.9, "LayerRouting(layer_idx=1, num_experts=6)", fontsize=FONT - 1, color="black")
    columns = [("token", 3.35), ("modality", 4.85), ("expert_ids (N, k)", 6.15), ("weights (N, k)", 7.85),
               ("probs (N, E)", 9.55)]
    for title, x in columns:
        note(ax, x, 4.45, title, fontsize=FONT - 2, color="black", fontweight="bold")
    group = {0: ("text", BLUE, "T"), 1: ("vision", ORANGE, "V")}
    for row, token in enumerate(tokens):
        y = 3.95 - 0.5 * row
        word, colour, letter = group[modality[row]]
        note(ax, 3.35, y, token, fontsize=FONT - 3, color="black")
        box(ax, 4.85, y - 0.08, 1.0, 0.34, f"{modality[row]} {word}", colour, fontsize=FONT - 4)
        note(ax, 6.2, y, "  ".join(f"{letter}{e}" for e in chosen[row]), fontsize=FONT - 2, color="black")
        note(ax, 7.9, y, "  ".join(f"{w:.2f}" for w in weights[row]), fontsize=FONT - 2, color="black")
        for e in range(E):                                              # the probabilities as a small heat strip
            shade = plt.cm.Purples(0.15 + 0.85 * probs[row, e] / probs.max())
            ax.add_patch(plt.Rectangle((9.55 + 0.3 * e, y - 0.08), 0.28, 0.34, fc=shade,
                                       ec="black" if e in chosen[row] else "none", lw=1.4))
    note(ax, 9.55, 0.62, "framed: the chosen k", fontsize=FONT - 4)
    note(ax, 6.15, 0.62, "ids inside the group", fontsize=FONT - 4)
    note(ax, 7.85, 0.62, "each row sums to 1", fontsize=FONT - 4)

    box(ax, 0.2, 3.6, 2.3, 1.1, "MoE block\n(decoder layer 1)", GREEN, fontsize=FONT - 1)
    box(ax, 0.2, 1.9, 2.3, 1.1, "forward hook\nhook(module,\nargs, output)", YELLOW, fontsize=FONT - 2)
    arrow(ax, (1.35, 3.6), (1.35, 3.0))
    note(ax, 1.45, 3.2, "output.routing", fontsize=FONT - 4)
    arrow(ax, (2.5, 2.45), (3.2, 2.45))
    note(ax, 0.2, 1.3, "appends its N = B x T\nrows (batch-major);\nremoved in finally", fontsize=FONT - 3)
    return save(fig, "routing_record.png")


ALL.append(routing_record)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"figures to draw (default: all): {[d.__name__ for d in ALL]}")
    parser.add_argument("--saturation-steps", type=int, default=SATURATION_STEPS)
    args = parser.parse_args()
    SATURATION_STEPS = args.saturation_steps
    FIGURES.mkdir(exist_ok=True)
    for draw in ALL:
        if not args.names or draw.__name__ in args.names:
            made = draw()
            for path in made if isinstance(made, list) else [made]:
                print("wrote", path.relative_to(ROOT))


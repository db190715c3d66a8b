"""What every notebook does first, and the pictures several notebooks share.

A notebook should read as a story about ERNIE, not as set-up code. Here live, written once:

* `setup()`: the first cell of every notebook (fast mode from `ERNIE_LAB_FAST`, a fixed seed, where
  `ernie_lab` was imported from);
* `repo_path()`: files of the kit (data/, figures/, notebooks/), found from the package, so a notebook
  runs from any folder (the tests execute fresh copies in a temporary one);
* `compare()`: one line per "ours equals the reference" check, failing above a tolerance;
* `load_heatmap()`, `draw_dispatch()`, `draw_expert_choices()`, `draw_layer_routing()`: the routing
  pictures of notebooks 00, 02 and 04;
* `figure()`: a diagram from figures/ (made by `scripts/make_figures.py`) shown in a notebook;
* `cached_model()`: a real checkpoint a lecturer has cached, for the `USE_REAL_WEIGHTS` switch;
* plumbing the lessons should not show: `reference_routing()` (which experts `transformers`' routers
  chose), `reference_vl_generate()`, `cpu_settings()` (threads and denormals, always restored) and
  `rope_layout()` (run a model with another RoPE function, for the experiment of notebook 01).

matplotlib is imported inside the drawing functions: `import ernie_lab` stays free of plotting.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds ernie_lab/

class Lesson(NamedTuple):
    number: str        # "01"
    title: str
    minutes: int       # the whole notebook; equal to the sum of its section tags (ernie_lab/course/times.py)
    core: int          # the sections tagged core
    track: str         # "dense", "moe" (MoE / vision-language) or "both"
    builds: str        # what the student builds and checks, one line


# The course, in order. README.md's table, notebook 00 and figures/course_map.png are made from or checked
# against this; each notebook's "**Time:**" header and section tags are checked against it.
COURSE = [
    Lesson("00", "Tour: the family and the kit", 25, 23, "both",
           "the ten ERNIE 4.5 checkpoints, total vs active parameters, the cost of a long context, a tiny ERNIE live"),
    Lesson("01", "The dense decoder from scratch", 167, 125, "dense",
           "RMSNorm, interleaved RoPE, grouped-query attention with a KV cache, SwiGLU, the decoder layer, generation"),
    Lesson("02", "Mixture of experts", 115, 108, "moe",
           "the router with its correction bias, sorted token dispatch, an MoE block with shared experts, balancing"),
    Lesson("03", "Vision encoder and 3-D RoPE", 82, 79, "moe",
           "patchify, a ViT block with 2-D RoPE, the adapter's 2x2 spatial / 2-frame temporal merge"),
    Lesson("04", "Multimodal MoE", 97, 80, "moe",
           "3-D position ids, the modality-isolated heterogeneous MoE block, per-modality balancing"),
    Lesson("05", "Train a tiny ERNIE", 93, 78, "both",
           "one training step by hand (answer-only labels, MoE losses, clipping, AdamW, warm-up + cosine), then the loop"),
    Lesson("06", "Routing by modality", 85, 51, "moe",
           "a routing record from forward hooks; where the trained tiny VL model sends patches and words"),
    Lesson("07", "Quantization", 147, 99, "dense",
           "int4 with zero points, packing, dequantize-matmul, GPTQ's update, int8 KV cache; quality on trained "
           "weights; a static cache and a compiled decode step"),
    Lesson("08", "Fine-tuning: LoRA, SFT, DPO", 100, 73, "dense",
           "a LoRA linear with merge / unmerge, the SFT label mask, the DPO loss; peft adapters, QLoRA"),
    Lesson("09", "The family at scale", 70, 56, "both",
           "parameters, memory, KV cache, FLOPs and GPUs for every checkpoint; int8 one layer at a time"),
]

TRACK_NAMES = {"dense": "dense", "moe": "MoE / VL", "both": "both"}

# The two 90-minute lab plans: for each track, the core sections a lab works through, by notebook and
# section title (each section's minutes come from its tag; tests/test_course_times.py adds them up).
LAB_PLANS = {
    "dense": [("00", ["A first look", "2 · The architecture in one picture", "3 · How to use this kit"]),
              ("01", ["0 · The configuration and a reference model", "1 · RMSNorm",
                      "2 · Rotary position embedding (RoPE), interleaved", "3 · Causal grouped-query attention",
                      "4 · The SwiGLU MLP"])],
    "moe": [("00", ["A first look", "2 · The architecture in one picture", "3 · How to use this kit"]),
            ("02", ["1 · Why a mixture of experts: parameters versus compute", "2 · The router, step by step",
                    "3 · Shared experts", "5 · The MoE block, and the whole model, checked against `transformers`"]),
            ("04", ["3 · Modality-isolated routing, seen", "4 · Heterogeneous experts: narrow vision experts",
                    "5 · The modality-isolated MoE block, by hand"])],
}


def course_table() -> str:
    """COURSE as the markdown table that README.md shows and notebook 00 displays."""
    stems = {p.name[:2]: p.stem for p in repo_path("notebooks").glob("[0-9][0-9]_*.py")}
    rows = [f"| `{stems.get(lesson.number, lesson.number)}` | {lesson.builds} | {lesson.minutes} min (core {lesson.core}) "
            f"| {TRACK_NAMES[lesson.track]} |" for lesson in COURSE]
    return "\n".join(["| notebook | what you build and check | time | track |", "|---|---|---|---|", *rows])


def lab_plan_text(track: str) -> str:
    """One line of markdown: the sections of a 90-minute lab on `track`, with their minutes."""
    from .times import timed_sections

    parts, total = [], 0
    for number, titles in LAB_PLANS[track]:
        found = {s.title: s.minutes for s in timed_sections(next(repo_path("notebooks").glob(f"{number}_*.py")).read_text())}
        for title in titles:
            parts.append(f"{number} {title} ({found.get(title, '?')})")
            total += found.get(title, 0)
    return f"**{TRACK_NAMES[track]} track, {total} min:** " + "; ".join(parts) + "."


def repo_path(*parts: str) -> Path:
    """A path inside the kit's checkout: `repo_path("data", "tokenizer")`, `repo_path("notebooks")`."""
    return REPO_ROOT.joinpath(*parts)


def fast_mode() -> bool:
    """True when `ERNIE_LAB_FAST=1`: notebooks shrink their work (tests and `make lab FAST=1` set it)."""
    return os.environ.get("ERNIE_LAB_FAST") == "1"


def setup(seed: int = 0) -> bool:
    """Seed torch, say where `ernie_lab` comes from and whether fast mode is on; return fast mode."""
    torch.manual_seed(seed)
    fast = fast_mode()
    print("ernie_lab from", Path(__file__).resolve().parents[1], "| fast mode:", fast)
    return fast


def figure(name: str, width: int = 720):
    """Show figures/`name` (a diagram drawn by scripts/make_figures.py) in the notebook's output."""
    from IPython.display import Image

    return Image(filename=str(repo_path("figures", name)), width=width)


@contextmanager
def cpu_settings(threads: int = 1, flush_denormal: bool = True):
    """Run a block with `threads` CPU threads and denormal floats flushed to zero; restore both afterwards.

    Denormals are floats so close to 0 that the CPU handles them in slow microcode; training tiny models
    produces many (an expert that gets no tokens sees vanishing optimizer statistics).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        torch.set_flush_denormal(False)


@contextmanager
def rope_layout(apply_rope):
    """Inside the block every ernie_lab attention layer rotates q and k with `apply_rope(x, cos, sin)`."""
    from ..model import attention

    original = attention.apply_rope
    attention.apply_rope = apply_rope
    try:
        yield
    finally:
        attention.apply_rope = original


def _reference_routers(reference):
    """(layer index, group, router module) of a transformers ERNIE MoE or VL-MoE model (group 1 = vision)."""
    inner = getattr(reference.model, "language_model", reference.model)
    for idx, layer in enumerate(inner.layers):
        if hasattr(layer.mlp, "text_moe"):
            yield idx, 0, layer.mlp.text_moe.gate
            yield idx, 1, layer.mlp.vision_moe.gate
        elif hasattr(layer.mlp, "gate"):
            yield idx, 0, layer.mlp.gate


@torch.no_grad()
def spread_reference_routers(reference, std: float = 0.5, bias: float = 0.0):
    """Redraw a random transformers model's router weights from N(0, std^2) (and its correction biases
    from U(-bias, bias) when ``bias``), so that a tiny test model routes decisively, not by ties.
    Text group then vision group, layer by layer; returns the model."""
    for _, _, router in _reference_routers(reference):
        router.weight.normal_(0.0, std)
        if bias:
            router.moe_statics.e_score_correction_bias.uniform_(-bias, bias)
    return reference


@contextmanager
def reference_routing(reference):
    """Record the experts `transformers`' routers choose: yields {(layer, group): [(N, k) ids per call]}."""
    chosen, handles = {}, []
    for idx, group, router in _reference_routers(reference):
        calls = chosen.setdefault((idx, group), [])
        # the reference router returns (weights, scores, expert ids): the ids are its third output
        handles.append(router.register_forward_hook(lambda m, i, out, calls=calls: calls.append(out[2].clone())))
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


def reference_vl_inputs(input_ids: torch.Tensor) -> dict:
    """The token-type tensors transformers' VL model wants next to the ids (ernie_lab derives them itself)."""
    from ..model.rope3d import modality_types, routing_types

    return dict(mm_token_type_ids=modality_types(input_ids), moe_mm_token_type_ids=routing_types(input_ids))


def reference_vl_generate(reference, input_ids: torch.Tensor, max_new_tokens: int, **pixels) -> torch.Tensor:
    """Greedy decoding with transformers' VL model from a clean state (it caches 3-D position offsets)."""
    reference.model.rope_deltas = None
    return reference.generate(input_ids=input_ids, **reference_vl_inputs(input_ids), max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0, **pixels)


def cached_model(hub_id: str, **load_options):
    """(model, tokenizer) of a real checkpoint a lecturer has cached, or (None, None) with a note; never downloads.

    Looks in the Hugging Face cache ($HF_HOME) for `hub_id`, or in the folder named by the environment
    variable ERNIE_LAB_WEIGHTS_<SIZE> (e.g. ERNIE_LAB_WEIGHTS_0_3B for "baidu/ERNIE-4.5-0.3B-PT").
    ``load_options`` go to ``load_model`` (e.g. ``quantize="w4a16"``: the MoE models' experts rounded to int4
    as they are read, so the 21B-A3B fits in 12 GiB and the VL-28B-A3B in 16).
    """
    from huggingface_hub import try_to_load_from_cache

    from ..io.loading import load_model
    from ..io.tokenizer import load_tokenizer

    size = hub_id.split("ERNIE-4.5-")[-1].removesuffix("-PT").removesuffix("-Paddle").replace(".", "_").replace("-", "_")
    folder = os.environ.get(f"ERNIE_LAB_WEIGHTS_{size.upper()}")
    if folder is None:
        found = try_to_load_from_cache(hub_id, "config.json")
        folder = str(Path(found).parent) if isinstance(found, str) else None
    if folder is None or not Path(folder, "config.json").is_file():
        print(f"USE_REAL_WEIGHTS: {hub_id} is not cached on this machine (download it on a connected machine "
              f"with `hf download {hub_id}`, or set ERNIE_LAB_WEIGHTS_{size.upper()} to its folder); "
              "the notebook goes on with the small models.")
        return None, None
    print("USE_REAL_WEIGHTS: loading", folder)
    return load_model(folder, **load_options), load_tokenizer(folder)


class Difference(float):
    """The largest difference `compare` found: a float that a notebook does not echo (the printed line says it)."""

    def _ipython_display_(self) -> None:
        pass


def compare(label: str, ours: torch.Tensor, theirs: torch.Tensor, atol: float = 1e-5) -> float:
    """Print the largest difference of two tensors and fail when it exceeds `atol`; return it.

    Where values exceed 1 the tolerance is taken relative to the largest value: float32 keeps about
    seven significant digits, so big numbers carry bigger round-off.
    """
    assert ours.shape == theirs.shape, f"{label}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}"
    diff = (ours.float() - theirs.float()).abs().max().item()
    scale = max(1.0, theirs.float().abs().max().item())
    print(f"{label:52s} max |diff| = {diff:.1e}  (values up to {scale:5.1f}; tolerance {atol:.0e} x {scale:.1f})")
    assert diff <= atol * scale, f"{label}: max difference {diff:.2e} exceeds {atol:.0e} x {scale:.1f}"
    return Difference(diff)


def load_heatmap(ax, fractions: torch.Tensor, title: str, row_labels: list[str], vmax: float | None = None,
                 cmap: str = "viridis", ylabel: str = "MoE layer"):
    """Draw a (rows, experts) table of shares on `ax`, one column per expert; return the image for a colorbar."""
    image = ax.imshow(fractions.numpy(), cmap=cmap, aspect="auto", vmin=0, vmax=vmax)
    ax.set_xticks(range(fractions.shape[1]), [f"E{e}" for e in range(fractions.shape[1])], fontsize=8)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel("expert")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return image


def draw_dispatch(expert_ids: torch.Tensor, num_experts: int) -> None:
    """Tokens -> (token, slot) pairs sorted by expert -> one call per active expert -> back to tokens.

    `expert_ids` is (N, k): the k experts each of N tokens chose.
    """
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    N, k = expert_ids.shape
    pairs = expert_ids.reshape(-1)                       # (N k,): pair p = (token p // k, slot p % k)
    order = pairs.argsort(stable=True)
    counts = torch.bincount(pairs, minlength=num_experts)  # (E,)
    colors = plt.cm.Set2(np.arange(num_experts))
    rows = N * k
    idle = [e for e in range(num_experts) if counts[e] == 0]
    fig, ax = plt.subplots(figsize=(12, 0.6 * (rows + len(idle)) + 1.2))
    token_y = {t: rows - 1 - (t + 0.5) * rows / N + 0.5 for t in range(N)}
    box = dict(boxstyle="round,pad=0.05")
    for t in range(N):
        ax.add_patch(FancyBboxPatch((0, token_y[t] - 0.35), 1.3, 0.7, fc="white", ec="black", **box))
        ax.text(0.65, token_y[t], f"token {t}", ha="center", va="center")
    for pos, pair in enumerate(order.tolist()):
        t, slot, e = pair // k, pair % k, int(pairs[pair])
        y = rows - 1 - pos
        ax.add_patch(FancyBboxPatch((3, y - 0.35), 1.6, 0.7, fc=colors[e], ec="gray", **box))
        ax.text(3.8, y, f"t{t} slot {slot} -> E{e}", ha="center", va="center", fontsize=9)
        ax.add_patch(FancyArrowPatch((1.4, token_y[t]), (2.95, y), arrowstyle="->", color=colors[e],
                                     mutation_scale=12, lw=1.5))
    start = 0
    for e in range(num_experts):
        n = int(counts[e])
        if n == 0:
            continue
        top, bottom = rows - 1 - start + 0.4, rows - 1 - (start + n - 1) - 0.4
        mid = (top + bottom) / 2
        ax.add_patch(FancyBboxPatch((6, mid - 0.35), 2.6, 0.7, fc=colors[e], ec="black", **box))
        ax.text(7.3, mid, f"expert {e}: one call on {n} rows", ha="center", va="center", fontsize=9)
        ax.plot([4.75, 4.75], [bottom + 0.05, top - 0.05], color="black", lw=2)
        ax.add_patch(FancyArrowPatch((4.8, mid), (5.95, mid), arrowstyle="->", color="black", mutation_scale=12))
        ax.add_patch(FancyArrowPatch((8.65, mid), (9.55, rows / 2 - 0.5), arrowstyle="->", color=colors[e],
                                     mutation_scale=12))
        start += n
    for j, e in enumerate(idle):
        y = -1 - j
        ax.add_patch(FancyBboxPatch((6, y - 0.35), 2.6, 0.7, fc="white", ec="gray", ls="--", **box))
        ax.text(7.3, y, f"expert {e}: no tokens, skipped", ha="center", va="center", fontsize=9, color="gray")
    ax.text(10.6, rows / 2 - 0.5, "outputs back in\n(token, slot) order;\neach token adds its\nk outputs, weighted",
            ha="center", va="center", fontsize=9, bbox=dict(boxstyle="round", fc="lightyellow", ec="gray"))
    for x, label in ((0.65, "tokens"), (3.8, "pairs, sorted by expert"), (7.3, "experts"), (10.6, "combine")):
        ax.text(x, rows + 0.2, label, ha="center", fontweight="bold")
    ax.set_xlim(-0.2, 11.8)
    ax.set_ylim(-0.8 - len(idle), rows + 0.7)
    ax.axis("off")
    fig.suptitle("dispatch: (token, slot) pairs sorted by expert; each active expert runs once on its slice")
    plt.tight_layout()
    plt.show()


def draw_expert_choices(columns: torch.Tensor, modality: torch.Tensor, experts_per_group: int, title: str) -> None:
    """Draw which expert each token chose, and with what weight, in a model with text and vision groups.

    `columns` is (T, 2 E): the mixing weight of text experts T0..T(E-1), then vision experts V0..V(E-1);
    `modality` is (T,): 1 marks a vision token, shaded orange.
    """
    import matplotlib.pyplot as plt

    E = experts_per_group
    fig, ax = plt.subplots(figsize=(11, 3.2))
    ax.imshow(columns.T, aspect="auto", cmap="Blues", interpolation="nearest")
    ax.axhline(E - 0.5, color="black", lw=1)               # text group above, vision group below
    ax.set_yticks(range(2 * E), [f"T{e}" for e in range(E)] + [f"V{e}" for e in range(E)])
    for t in range(columns.shape[0]):
        if modality[t]:
            ax.axvspan(t - 0.5, t + 0.5, color="orange", alpha=0.12, lw=0)
    ax.set_xlabel("token position (orange band: vision tokens, picture placeholders and their markers)")
    ax.set_ylabel("expert")
    ax.set_title(title)
    plt.show()


def expert_columns(entry, experts_per_group: int) -> torch.Tensor:
    """(T, 2 E) mixing weights of one layer's routing record: text experts T0.., then vision experts V0.."""
    columns = torch.zeros(entry.num_tokens, 2 * experts_per_group)
    offsets = entry.modality[:, None] * experts_per_group                  # (T, 1): vision experts come after
    columns.scatter_(1, entry.expert_ids + offsets, entry.weights)
    return columns


def draw_layer_routing(entry, experts_per_group: int, title: str) -> None:
    """The experts every token of one MoE layer chose, and with what weight (text and vision groups apart)."""
    draw_expert_choices(expert_columns(entry, experts_per_group), entry.modality, experts_per_group, title)

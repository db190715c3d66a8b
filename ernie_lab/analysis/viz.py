"""Pictures of expert routing: where ERNIE 4.5 sends each text token and each image patch.

    routed = viz.route(model, tokenizer, "Describe the picture.", image=picture)   # one forward, recorded
    viz.load_heatmap(routed.record)                              # tokens per expert, text | vision groups
    viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=2)
    viz.token_strip(routed.record, routed.tokens, routed.text_rows)
    viz.routing_path(routed.record, row=12, tokens=routed.tokens)

Every picture is a function of a routing record (``ernie_lab.routing.record``) and returns a
matplotlib Figure; the numbers come from the pure functions in ``ernie_lab.routing``. A VL model's
experts come in two groups, text T0..T(E-1) and vision V0..V(E-1): they are different modules, so
they are drawn on different axes, never mixed. The same code draws the kit's tiny model (8 + 8
experts, 3 MoE layers) and a real ERNIE 4.5 checkpoint (64 + 64 experts, up to 28 layers): expert
numbers are written beside their colours, so a picture stays readable in print and in grey.

matplotlib is imported here only: ``import ernie_lab`` stays free of plotting. Figures are made with
``matplotlib.figure.Figure`` (not pyplot), so a widget can redraw them without piling up windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from . import routing
from ..errors import InputError, require_int
from ..model.special_tokens import TEXT, VISION

GROUP_NAME = {TEXT: "text", VISION: "vision"}


# ====================================================================================== one forward
@dataclass(eq=False)
class Routed:
    """One prompt's forward pass with its routing record, and what the pictures need to read it."""

    record: routing.RoutingRecord
    input_ids: torch.Tensor        # (T,) the ids fed to the model
    tokens: list[str]              # T token texts
    image: object | None           # the PIL picture (None for a text prompt)
    grid: tuple[int, int] | None   # (rows, cols) of the picture's tokens after the adapter's 2x2 merge
    image_rows: torch.Tensor       # (rows * cols,) record rows of the picture's tokens, row-major
    text_rows: torch.Tensor        # record rows routed by the text group


def check_tokenizer(tokenizer, *needs: str) -> None:
    """Refuse an object that lacks the tokenizer methods ``needs`` (and can name no token), naming ``tokenizer``."""
    names = ("convert_ids_to_tokens", "decode")
    missing = [n for n in needs if not callable(getattr(tokenizer, n, None))]
    if missing or not any(callable(getattr(tokenizer, n, None)) for n in names):
        raise InputError(f"tokenizer must be an ERNIE 4.5 tokenizer (with {', '.join(needs + ('decode',))}), got "
                         f"{type(tokenizer).__name__}; load it with ernie_lab.load_tokenizer(folder).")


def check_model(model) -> None:
    """Refuse what is not a model with MoE layers, before anything runs."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise InputError(f"model must be an ernie-lab model, got {type(model).__name__}; load one with "
                         "ernie_lab.load_model(folder).")
    if not routing.taps(model):
        raise InputError("this model has no MoE layers, so there is no routing to draw; load an ERNIE 4.5 MoE "
                         "or VL checkpoint (a dense 0.3B model routes nothing).")


def token_texts(tokenizer, ids) -> list[str]:
    """The text of every token id (SentencePiece pieces, markers as written)."""
    check_tokenizer(tokenizer)
    ids = [int(i) for i in ids]
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return [tokenizer.decode([i]) for i in ids]


def messages_for(prompt: str, image=None) -> list[dict]:
    """A one-turn conversation: the prompt, after the picture if there is one."""
    if image is None:
        return [{"role": "user", "content": prompt}]
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]


@torch.no_grad()
def route(model, tokenizer, prompt: str, image=None) -> Routed:
    """Run ``model`` once on a chat prompt (with a picture for a VL model) and keep its routing."""
    from ..io.chat import render_prompt

    check_model(model)
    check_tokenizer(tokenizer, "apply_chat_template")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a str, got {type(prompt).__name__}.")
    if image is not None and not hasattr(model.config, "vision"):
        raise InputError("image: this is a text-only model, it cannot see pictures; pass image=None or load an "
                         "ERNIE 4.5 VL model.")
    model.eval()
    inputs = render_prompt(model, tokenizer, messages_for(prompt, image))
    with routing.record(model) as rec:
        model(**inputs)
    ids = inputs["input_ids"][0]
    grid, image_rows = None, torch.zeros(0, dtype=torch.long)
    if image is not None:
        _, h, w = inputs["image_grid_thw"][0].tolist()
        merge = model.config.vision.spatial_merge_size
        grid = (h // merge, w // merge)
        image_rows = (ids == model.config.image_token_id).nonzero().squeeze(1)
    text_rows = routing.modality_rows(rec.layers[0], TEXT)
    return Routed(rec, ids, token_texts(tokenizer, ids), image, grid, image_rows, text_rows)


@torch.no_grad()
def route_scenes(model, tokenizer, scene_list, question: str | None = None,
                 attributes=("colour", "kind", "background")):
    """Route many scene pictures in one record: (record, image rows (n,), {attribute: n labels}).

    Each image token gets the attribute of the shape that covers most of it, or "background"
    (``scenes.patch_labels``); "background" labels a token with the scene's background colour.
    """
    from ..tiny import scenes

    question = question or scenes.DESCRIBE
    scene_list = list(scene_list) if not isinstance(scene_list, (str, bytes)) and hasattr(scene_list, "__iter__") else None
    if not scene_list or not all(isinstance(s, scenes.Scene) for s in scene_list):
        raise InputError("scene_list must be a non-empty list of scenes.Scene (e.g. tiny.models.held_out_scenes(8)).")
    attributes = check_attributes(attributes)
    rows, labels, offset = [], {a: [] for a in attributes}, 0
    with routing.record(model) as rec:
        for scene in scene_list:
            routed = route(model, tokenizer, question, scenes.render(scene))
            rows.append(routed.image_rows + offset)
            offset += len(routed.input_ids)
            for attribute in attributes:
                if attribute == "background":
                    labels[attribute] += [scene.background] * len(routed.image_rows)
                else:
                    labels[attribute] += cell_labels(scene, routed.grid, attribute)
    return rec, torch.cat(rows), labels


def cell_labels(scene, grid: tuple[int, int], attribute: str, min_share: float = 1 / 16, fine: int = 4) -> list[str]:
    """The attribute of the shape in each merged token's cell (row-major), "background" where none is.

    A merged token of the tiny model covers 28 x 28 pixels, more than a small shape, and the scenes'
    places sit on cell corners, so a shape rarely covers most of any cell. A cell takes the shape
    that covers most of at least ``min_share`` of it, counted on ``scenes.patch_labels`` of a
    ``fine`` times finer grid.
    """
    from collections import Counter

    from ..tiny import scenes

    gh, gw = grid
    finer = scenes.patch_labels(scene, gh * fine, gw * fine, attribute=attribute)
    out = []
    for r in range(gh):
        for c in range(gw):
            votes = Counter(finer[r * fine + i][c * fine + j] for i in range(fine) for j in range(fine))
            votes.pop("background", None)
            label, n = votes.most_common(1)[0] if votes else ("background", 0)
            out.append(label if n >= min_share * fine * fine else "background")
    return out


def check_attributes(attributes) -> tuple:
    """Scene attributes to label tokens by: some of 'colour', 'kind', 'size', 'place' and 'background'."""
    known = ("colour", "kind", "size", "place", "background")
    if isinstance(attributes, str):
        attributes = (attributes,)
    attributes = tuple(attributes)
    bad = [a for a in attributes if a not in known]
    if not attributes or bad:
        raise InputError(f"attributes must be some of {known}, got {attributes!r}.")
    return attributes


@torch.no_grad()
def route_texts(model, tokenizer, texts: list[str]):
    """Route plain texts (no chat markers) in one record: (record, rows (n,), word class of each row)."""
    check_model(model)
    check_tokenizer(tokenizer, "encode")
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
        raise InputError(f"texts must be a non-empty list of strings (one text per entry), got {texts!r:.60}.")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise InputError(f"texts[{i}] must be a non-empty str, got {text!r:.60}.")
    rows, tokens = [], []
    with routing.record(model) as rec:
        for text in texts:
            ids = tokenizer.encode(text)
            model(torch.tensor([ids]))
            rows.append(torch.arange(len(ids)) + len(tokens))
            tokens += token_texts(tokenizer, ids)
    return rec, torch.cat(rows), [routing.word_class(t) for t in tokens]


def records_over_training(checkpoints, inputs: list[dict]) -> list[tuple[int, routing.RoutingRecord]]:
    """(step, record) for each (step, model or checkpoint folder), all fed the same ``inputs`` (forward kwargs).

    ``ernie_lab.train.checkpoints(out_dir)`` lists a training run's folders in this form.
    """
    from ..io.loading import load_model

    if isinstance(inputs, dict) or not isinstance(inputs, (list, tuple)) or not inputs \
            or not all(isinstance(batch, dict) for batch in inputs):
        raise InputError("inputs must be a non-empty list of forward kwargs dicts, e.g. [{'input_ids': ids}], "
                         f"got {type(inputs).__name__}.")
    checkpoints = list(checkpoints)
    for i, pair in enumerate(checkpoints):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InputError(f"checkpoints[{i}] must be a (step, model or folder) pair, got {type(pair).__name__}.")
        try:
            int(pair[0])
        except (TypeError, ValueError):
            raise InputError(f"checkpoints[{i}]: the step must be an integer, got {pair[0]!r}.") from None
    out = []
    for step, source in checkpoints:
        model = source if isinstance(source, torch.nn.Module) else load_model(source)
        model.eval()
        with torch.no_grad(), routing.record(model) as rec:
            for batch in inputs:
                model(**batch)
        out.append((int(step), rec))
    return out


def check_tokens(record: routing.RoutingRecord, tokens) -> list:
    """``tokens``: the text of every record row (as viz.route gives them), or an InputError naming ``tokens``."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (list, tuple)):
        raise InputError(f"tokens must be a list with the text of every record row (routed.tokens), got "
                         f"{type(tokens).__name__}.")
    if len(tokens) != record.num_tokens:
        raise InputError(f"tokens holds {len(tokens)} texts but the record has {record.num_tokens} tokens: give the "
                         "text of every recorded token, from the same prompt (routed.tokens).")
    return tokens


def check_position(name: str, value, count: int) -> None:
    """``value`` is None or an index 0 .. count - 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise InputError(f"{name} must be None or a position from 0 to {count - 1}, got {value!r}.")


def check_title(title) -> None:
    if title is not None and not isinstance(title, str):
        raise InputError(f"title must be a str or None, got {type(title).__name__}.")


def check_image(image):
    """A PIL picture (a path or the bytes of an image file are opened); anything else an InputError."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if image is None:
        raise InputError("image is None: patch_overlay draws a picture's tokens; give the picture that was routed "
                         "(routed.image).")
    from ..io.image_processing import open_image

    return open_image(image)  # a path or bytes; anything else is refused there, naming what it got


# ====================================================================================== colours
def expert_colours(num_experts: int) -> np.ndarray:
    """(E, 4) RGBA: distinct colours for up to 60 experts (tab20, tab20b, tab20c), then evenly spaced hues."""
    from matplotlib import colormaps

    # the strong shade of every hue first, so neighbouring expert numbers never look alike
    base = np.concatenate([colormaps["tab20"](np.r_[0:20:2, 1:20:2]),
                           *(colormaps[name](np.r_[0:20:4, 2:20:4, 1:20:4, 3:20:4]) for name in ("tab20b", "tab20c"))])
    if num_experts <= len(base):
        return base[:num_experts]
    extra = colormaps["hsv"](np.linspace(0, 1, num_experts - len(base), endpoint=False))
    return np.concatenate([base, extra])


def ink_for(colour) -> str:
    """Black or white text, whichever reads better on ``colour``."""
    r, g, b = colour[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def ordinal(rank: int) -> str:
    """How a top-k rank reads: 0 -> 'top-1', 1 -> '2nd', 2 -> '3rd', 5 -> '6th'."""
    return {0: "top-1", 1: "2nd", 2: "3rd"}.get(rank, f"{rank + 1}th")


def layer_entry(record: routing.RoutingRecord, layer: int | None) -> routing.LayerRouting:
    """The entry of decoder layer ``layer`` (None: the first MoE layer)."""
    check_nonempty(record)
    if layer is None:
        return record.layers[0]
    return record.layer(layer)  # routing.NotAnMoELayer, an InputError naming the layers there are


EMPTY = ("the routing record is empty ({why}): record a forward pass of an ERNIE 4.5 MoE or VL model first, "
         "`with routing.record(model) as rec: model(ids)`.")


def check_nonempty(record) -> routing.RoutingRecord:
    """``record`` if it is a RoutingRecord with MoE layers and tokens; else an InputError that says why not."""
    routing.check_record(record)
    if not record.layers:
        raise InputError(EMPTY.format(why="no MoE layers: a dense model routes nothing"))
    if not record.num_tokens:
        raise InputError(EMPTY.format(why="no tokens: nothing ran inside the `with`"))
    return record


def groups_of(record: routing.RoutingRecord) -> list[int]:
    check_nonempty(record)
    groups = routing.routed_modalities(record)
    if not groups:
        raise InputError("the routing record is empty: record a forward pass of an MoE model first.")
    return groups


# ====================================================================================== load
def load_heatmap(record: routing.RoutingRecord, title: str | None = None) -> Figure:
    """Tokens per expert in every MoE layer: one heatmap per expert group (text | vision), side by side,
    each with its colour bar and, below it, every expert's total over the layers."""
    groups = groups_of(record)
    check_title(title)
    E, L = record.layers[0].num_experts, len(record.layers)
    annotate = E <= 16 and L <= 12
    width = max(5.0, 1.6 + 0.13 * E) if E > 16 else 5.5
    fig = Figure(figsize=(width * len(groups), 1.6 + 0.32 * L + 1.6), layout="constrained")
    columns = fig.subfigures(1, len(groups), squeeze=False)[0]
    for column, group in zip(columns, groups):
        counts = record.load(group)                                          # (L, E)
        heat, totals = column.subplots(2, 1, height_ratios=[max(L, 2), 2], sharex=True)
        image = heat.imshow(counts.numpy(), cmap="viridis", aspect="auto", interpolation="nearest")
        routed = int(counts[0].sum()) // record.layers[0].expert_ids.shape[1]
        heat.set_yticks(range(L), [f"layer {e.layer_idx}" for e in record.layers], fontsize=8)
        heat.set_title(f"{GROUP_NAME[group]} experts ({routed} tokens x k={record.layers[0].expert_ids.shape[1]})")
        if annotate:
            top = float(counts.max()) or 1.0
            for (l, e), n in np.ndenumerate(counts.numpy()):
                heat.text(e, l, str(n), ha="center", va="center", fontsize=7,
                          color="black" if n > 0.6 * top else "white")
        column.colorbar(image, ax=heat, label="tokens", shrink=0.9)
        total = counts.sum(0).numpy()
        totals.bar(range(E), total, color="#4C72B0" if group == TEXT else "#DD8452")
        totals.set_ylabel("all layers")
        step = 1 if E <= 16 else 4
        labels = routing.expert_labels(E, group)
        totals.set_xticks(range(0, E, step), labels[::step], fontsize=7 if E <= 16 else 6, rotation=0 if E <= 16 else 90)
        totals.set_xlabel(f"{GROUP_NAME[group]} expert")
        if E <= 16:
            for e, n in enumerate(total):
                totals.text(e, n, str(n), ha="center", va="bottom", fontsize=6)
    fig.suptitle(title or "Expert load per MoE layer (each group has its own experts)")
    return fig


# ====================================================================================== image
def patch_overlay(record: routing.RoutingRecord, image, grid: tuple[int, int], rows: torch.Tensor,
                  layer: int | None = None, rank: int = 0, confidence: bool = True,
                  selected: int | None = None) -> Figure:
    """The picture with its merged token grid coloured by each token's ``rank``-th vision expert in
    ``layer`` (legend: experts and their token counts); beside it the router's confidence (top-1 weight).

    ``rows`` are the record rows of the picture's tokens (row-major over ``grid``); ``selected`` marks one
    token (its index in the grid) with a frame.
    """
    entry = layer_entry(record, layer)
    image = check_image(image)
    if (not isinstance(grid, (tuple, list)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid)):
        raise InputError(f"grid must be (rows, cols) of the picture's merged tokens, two positive ints (viz.route "
                         f"gives it as routed.grid), got {grid!r}.")
    gh, gw = grid
    rows = routing.check_rows(record, rows)
    if len(rows) != gh * gw:
        raise InputError(f"rows: the grid {gh} x {gw} has {gh * gw} cells but {len(rows)} image rows were given.")
    rank = routing.check_rank(record, rank)
    if not (entry.modality[rows] == VISION).all():
        raise InputError("rows: some of these rows were routed by the text experts; give the picture's token rows "
                         "(routed.image_rows), not text rows.")
    check_position("selected", selected, gh * gw)
    experts = entry.expert_ids[rows, rank].view(gh, gw).numpy()           # (gh, gw)
    weights = entry.weights[rows, 0].view(gh, gw).numpy()                 # (gh, gw) top-1 weight
    colours = expert_colours(entry.num_experts)
    panels = 2 if confidence else 1
    fig = Figure(figsize=(5.2 * panels + 1.6, 5.0), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    picture = np.asarray(image.convert("RGB"))
    extent = (0, gw, gh, 0)                                               # one unit per merged token
    ax = axes[0]
    ax.imshow(picture, extent=extent, interpolation="bilinear")
    ax.imshow(colours[experts], extent=extent, alpha=0.55, interpolation="nearest")
    if gh * gw <= 400:
        for (r, c), e in np.ndenumerate(experts):
            ax.text(c + 0.5, r + 0.5, f"V{e}", ha="center", va="center", fontsize=8 if gw <= 12 else 6,
                    color=ink_for(colours[e]), fontweight="bold")
    grid_lines(ax, gh, gw)
    mark(ax, selected, gw)
    ax.set_title(f"layer {entry.layer_idx}: {ordinal(rank)} vision expert of each image token", fontsize=10)
    used, counts = np.unique(experts, return_counts=True)
    order = np.argsort(-counts)
    handles = [Patch(color=colours[used[i]], label=f"V{used[i]}: {counts[i]} token{'s' if counts[i] != 1 else ''}")
               for i in order]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="expert",
              ncol=1 if len(handles) <= 16 else 2, frameon=False)
    if confidence:
        ax = axes[1]
        ax.imshow(np.asarray(image.convert("L")), extent=extent, cmap="gray", interpolation="bilinear")
        k = entry.expert_ids.shape[1]
        shown = ax.imshow(weights, extent=extent, cmap="magma", alpha=0.7, vmin=1 / k, vmax=1.0,
                          interpolation="nearest")
        grid_lines(ax, gh, gw)
        mark(ax, selected, gw)
        ax.set_title(f"router confidence: top-1 weight (1/k = {1 / k:.2f}: undecided)", fontsize=10)
        fig.colorbar(shown, ax=ax, label="weight of the first expert", shrink=0.85)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def grid_lines(ax, gh: int, gw: int) -> None:
    for r in range(gh + 1):
        ax.axhline(r, color="white", lw=0.5, alpha=0.8)
    for c in range(gw + 1):
        ax.axvline(c, color="white", lw=0.5, alpha=0.8)


def mark(ax, cell: int | None, gw: int) -> None:
    """Frame one grid cell (index in row-major order)."""
    if cell is None:
        return
    from matplotlib.patches import Rectangle

    r, c = divmod(int(cell), gw)
    ax.add_patch(Rectangle((c, r), 1, 1, fill=False, ec="cyan", lw=3))


# ====================================================================================== text
def default_layers(record: routing.RoutingRecord, most: int = 8) -> list[int]:
    """All MoE layers when there are at most ``most``, else ``most`` of them evenly spread (first and last kept)."""
    routing.check_record(record)
    require_int("most", most, 1)
    indices = [e.layer_idx for e in record.layers]
    if len(indices) <= most:
        return indices
    picks = np.linspace(0, len(indices) - 1, most).round().astype(int)
    return [indices[i] for i in sorted(set(picks.tolist()))]


def short(piece: str, width: int = 7) -> str:
    text = piece.replace("\u2581", "\u00b7").replace("\n", "\\n")
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def token_strip(record: routing.RoutingRecord, tokens: list[str], rows: torch.Tensor | None = None,
                layers: list[int] | None = None, rank: int = 0, per_line: int = 24,
                selected: int | None = None, highlight: int | None = None) -> Figure:
    """A prompt's text tokens, each coloured by its ``rank``-th text expert, one band per MoE layer.

    Tokens wrap into lines of ``per_line`` (100+ tokens stay readable); each cell names its expert.
    ``rows``: the record rows to show (default: every text-group row), ``tokens``: the text of every
    record row; ``layers``: decoder layers (default: up to 8 spread over the depth); ``selected``: a
    position in ``rows`` to frame; ``highlight``: a layer whose band is marked (and shown).
    """
    from matplotlib.patches import Rectangle

    check_nonempty(record)
    first = record.layers[0]
    check_tokens(record, tokens)
    rows = routing.modality_rows(first, TEXT) if rows is None else routing.check_rows(record, rows)
    if len(rows) == 0:
        raise InputError("rows: there are no text tokens in this record to draw.")
    if not (first.modality[rows] == TEXT).all():
        raise InputError("rows: some of these rows were routed by the vision experts; give text rows "
                         "(routed.text_rows), or draw the picture's tokens with patch_overlay.")
    rank = routing.check_rank(record, rank)
    require_int("per_line", per_line, 1)
    check_position("selected", selected, len(rows))
    if layers is not None:
        if isinstance(layers, (int, str)) or not hasattr(layers, "__iter__"):
            raise InputError(f"layers must be a list of decoder layer indices, got {layers!r}.")
        layers = [layer_entry(record, l).layer_idx for l in layers]
        if not layers:
            raise InputError(f"layers is empty: give some of the MoE layers {[e.layer_idx for e in record.layers]}, "
                             "or None for the default.")
    layers = default_layers(record) if layers is None else list(layers)
    if highlight is not None and highlight not in layers:
        layers = sorted([*layers, layer_entry(record, highlight).layer_idx])
    picks = {l: layer_entry(record, l).expert_ids[rows, rank].numpy() for l in layers}
    colours = expert_colours(first.num_experts)
    lines = math.ceil(len(rows) / per_line)
    band = len(layers) + 1.4                                              # header row + one row per layer
    fig = Figure(figsize=(1.2 + 0.62 * min(per_line, len(rows)), 0.9 + 0.3 * band * lines), layout="constrained")
    ax = fig.add_subplot()
    for line in range(lines):
        top = line * band
        for slot in range(per_line):
            i = line * per_line + slot
            if i >= len(rows):
                break
            ax.text(slot + 0.5, top + 0.6, short(tokens[int(rows[i])]), ha="center", va="center", fontsize=7,
                    family="monospace", fontweight="bold" if i == selected else "normal")
            for depth, l in enumerate(layers):
                e = int(picks[l][i])
                y = top + 1.2 + depth
                ax.add_patch(Rectangle((slot, y), 1, 1, fc=colours[e], ec="white", lw=0.8))
                ax.text(slot + 0.5, y + 0.5, str(e), ha="center", va="center", fontsize=6.5, color=ink_for(colours[e]))
            if i == selected:
                ax.add_patch(Rectangle((slot, top + 1.2), 1, len(layers), fill=False, ec="black", lw=2.5))
        for depth, l in enumerate(layers):
            marked = l == highlight
            ax.text(-0.15, top + 1.7 + depth, f"\u25b6 L{l}" if marked else f"L{l}", ha="right", va="center",
                    fontsize=8 if marked else 7, fontweight="bold" if marked else "normal")
            if marked:
                ax.add_patch(Rectangle((0, top + 1.2 + depth), min(per_line, len(rows) - line * per_line), 1,
                                       fill=False, ec="black", lw=1.5))
    ax.set_xlim(-1.2, min(per_line, len(rows)))
    ax.set_ylim(lines * band, 0)
    ax.axis("off")
    ax.set_title(f"{len(rows)} text tokens, coloured by their {ordinal(rank)} text expert (number = T-expert) "
                 f"in MoE layers {', '.join(map(str, layers))}", fontsize=9)
    return fig


# ====================================================================================== statistics
def co_selection(record: routing.RoutingRecord, layer: int | None = None) -> Figure:
    """Which experts are chosen together: P(j chosen | i chosen) in one layer, one panel per group."""
    entry = layer_entry(record, layer)
    groups = groups_of(record)
    E = entry.num_experts
    fig = Figure(figsize=(5.2 * len(groups) + 0.8, 4.8 if E <= 16 else 6.0), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        counts = routing.co_selection(entry, group).double()            # (E, E)
        chosen = counts.diagonal().clone()
        share = counts / chosen.clamp(min=1)[:, None]                    # row i: P(j | i)
        share.fill_diagonal_(float("nan"))
        shown = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=max(float(np.nanmax(share.numpy())), 1e-9))
        labels = routing.expert_labels(E, group)
        step = 1 if E <= 16 else 8
        ax.set_xticks(range(0, E, step), labels[::step], fontsize=7)
        ax.set_yticks(range(0, E, step), labels[::step], fontsize=7)
        ax.set_xlabel("also chosen: expert j")
        ax.set_ylabel("tokens that chose expert i")
        ax.set_title(f"{GROUP_NAME[group]} group, layer {entry.layer_idx}", fontsize=10)
        if E <= 10:
            for (i, j), p in np.ndenumerate(share.numpy()):
                if not np.isnan(p):
                    ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if p > 0.6 * np.nanmax(share.numpy()) else "black")
        fig.colorbar(shown, ax=ax, label="P(j chosen | i chosen)", shrink=0.85)
    fig.suptitle("Expert co-selection: which experts a token's k choices pair up")
    return fig


def confidence_by_layer(record: routing.RoutingRecord) -> Figure:
    """Per MoE layer and group: the mean routing entropy and the mean top-1 weight."""
    groups = groups_of(record)
    E, k = record.layers[0].num_experts, record.layers[0].expert_ids.shape[1]
    depth = [e.layer_idx for e in record.layers]
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    for group in groups:
        style = dict(marker="o" if group == TEXT else "s", ls="-" if group == TEXT else "--",
                     color="#4C72B0" if group == TEXT else "#DD8452", label=f"{GROUP_NAME[group]} tokens")
        left.plot(depth, routing.per_layer(record, routing.entropy, group).numpy(), **style)
        right.plot(depth, routing.per_layer(record, routing.top1_weight, group).numpy(), **style)
    left.axhline(math.log(E), color="gray", ls=":", label=f"uniform over {E} experts (log E)")
    left.set_ylabel("mean router entropy (nats)")
    left.set_ylim(0, math.log(E) * 1.08)
    right.axhline(1 / k, color="gray", ls=":", label=f"1/k = {1 / k:.2f} (no preference)")
    right.set_ylabel("mean top-1 weight")
    right.set_ylim(0, 1.02)
    for ax, title in ((left, "how spread the router's probabilities are"), (right, "how much the first expert counts")):
        ax.set_xlabel("decoder layer")
        ax.set_xticks(depth if len(depth) <= 14 else depth[::2])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Routing confidence per layer, by modality")
    return fig


def specialisation(record: routing.RoutingRecord, rows: torch.Tensor, labels: dict[str, list],
                   group: int = VISION, rank: int = 0, title: str | None = None, layer: int | None = None) -> Figure:
    """Do experts specialise? NMI between each token's expert and its attributes, per layer (left), and
    one layer's load split by its most telling attribute, with the counts (right): ``layer``, or by
    default the layer that specialises most.

    ``rows``: record rows (all routed in ``group``); ``labels``: {attribute: one label per row}.
    """
    check_nonempty(record)
    routing.check_modality(group, allow_none=False)
    check_title(title)
    rows = routing.check_rows(record, rows)
    if len(rows) == 0:
        raise InputError("rows is empty: give the record rows of the tokens to measure.")
    if not isinstance(labels, dict) or not labels:
        raise InputError("labels must be a non-empty dict {attribute name: one label per row}, e.g. "
                         f"{{'colour': [...]}}, got {type(labels).__name__}.")
    for name, values in labels.items():
        values = routing.as_label_list(values, f"labels[{name!r}]")
        if len(values) != len(rows):
            raise InputError(f"labels[{name!r}] holds {len(values)} labels for {len(rows)} rows: give one per row.")
    if not (record.layers[0].modality[rows] == group).all():
        raise InputError(f"rows: some of these rows were not routed by the {GROUP_NAME[group]} experts; pass "
                         f"group={GROUP_NAME[1 - group].upper()} or rows of the {GROUP_NAME[group]} tokens only.")
    results = {name: routing.specialisation(record, rows, values, rank) for name, values in labels.items()}
    depth = [e.layer_idx for e in record.layers]
    if layer is not None and layer not in depth:
        raise InputError(f"layer {layer} is not an MoE layer; MoE layers: {depth}.")
    candidates = [depth.index(layer)] if layer is not None else range(len(depth))
    best_attr, best_i = max(((a, i) for a in results for i in candidates), key=lambda ai: results[ai[0]][ai[1]]["nmi"])
    best = results[best_attr][best_i]
    E = record.layers[0].num_experts
    fig = Figure(figsize=(5 + max(5.0, 0.45 * E), 1.8 + max(2.6, 0.42 * len(best["names"]))), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1, max(1.2, E / 8)])
    width = 0.8 / len(results)
    for n, (attribute, per_layer) in enumerate(results.items()):
        values = [r["nmi"] for r in per_layer]
        xs = np.arange(len(depth)) + (n - (len(results) - 1) / 2) * width
        bars = left.bar(xs, values, width, label=attribute)
        if len(depth) <= 8:
            left.bar_label(bars, fmt="%.2f", fontsize=6)
    left.axvspan(best_i - 0.45, best_i + 0.45, color="gold", alpha=0.25, lw=0)  # the layer drawn on the right
    left.set_xticks(range(len(depth)), [str(d) if len(depth) <= 14 or i % 2 == 0 else "" for i, d in enumerate(depth)])
    left.set_xlabel("decoder layer")
    left.set_ylabel("NMI(expert ; attribute)")
    left.set_title("specialisation per layer (0: none)", fontsize=10)
    left.legend(fontsize=8)
    table = best["table"].double()
    shares = table / table.sum(1, keepdim=True).clamp(min=1)          # each label's tokens, spread over experts
    shown = right.imshow(shares.numpy(), cmap="Greens", aspect="auto", vmin=0)
    right.set_yticks(range(len(best["names"])), [f"{name} ({int(table[i].sum())})" for i, name in enumerate(best["names"])],
                     fontsize=8)
    step = 1 if E <= 16 else 4
    right.set_xticks(range(0, E, step), routing.expert_labels(E, group)[::step], fontsize=7)
    right.set_xlabel(f"{ordinal(rank)} {GROUP_NAME[group]} expert")
    if E <= 16:
        for (i, j), n in np.ndenumerate(table.numpy().astype(int)):
            if n:
                right.text(j, i, str(n), ha="center", va="center", fontsize=7,
                           color="white" if shares[i, j] > 0.5 * float(shares.max()) else "black")
    right.set_title(f"layer {best['layer']}, split by {best_attr} (NMI {best['nmi']:.2f}): tokens per expert",
                    fontsize=10)
    fig.colorbar(shown, ax=right, label="share of the label's tokens", shrink=0.85)
    fig.suptitle(title or f"Expert specialisation of {GROUP_NAME[group]} tokens")
    return fig


# ====================================================================================== paths
def routing_path(record: routing.RoutingRecord, row: int, tokens: list[str] | None = None) -> Figure:
    """One token's experts layer by layer: its k choices per layer, sized by weight, the top-1 joined up."""
    check_nonempty(record)
    if tokens is not None:
        check_tokens(record, tokens)
    ids, weights, group = routing.path(record, row)                     # (L, k), (L, k)
    row = routing.check_row(record, row)
    depth = [e.layer_idx for e in record.layers]
    E = record.layers[0].num_experts
    colours = expert_colours(E)
    fig = Figure(figsize=(max(5.5, 1.5 + 0.5 * len(depth)), 3.2 + (0.1 * min(E, 64) if E > 16 else 1.0)),
                 layout="constrained")
    ax = fig.add_subplot()
    ax.plot(depth, ids[:, 0].numpy(), color="gray", lw=1.5, zorder=1, label="top-1 path")
    for l, (choice, weight) in enumerate(zip(ids.tolist(), weights.tolist())):
        for slot, (e, w) in enumerate(zip(choice, weight)):
            ax.scatter(depth[l], e, s=80 + 700 * w, color=colours[e], ec="black", lw=1.2 if slot == 0 else 0.4, zorder=2)
            if len(depth) <= 14:
                ax.annotate(f"{routing.GROUP_LETTER[group]}{e} {w:.2f}", (depth[l], e), xytext=(9, 3),
                            textcoords="offset points", fontsize=7)
    ax.set_xticks(depth if len(depth) <= 14 else depth[::2])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"{GROUP_NAME[group]} expert")
    ax.set_ylim(-0.8, E - 0.2)
    step = 1 if E <= 16 else 8
    ax.set_yticks(range(0, E, step), routing.expert_labels(E, group)[::step], fontsize=7)
    ax.grid(alpha=0.3)
    name = f" {short(tokens[row], 14)!r}" if tokens is not None else ""
    ax.set_title(f"route of token {row}{name}: its {ids.shape[1]} {GROUP_NAME[group]} experts per layer\n"
                 f"(dot size = mixing weight)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return fig


def path_table(record: routing.RoutingRecord, row: int) -> str:
    """One token's experts and weights in every layer, as text: 'layer 1: V3 0.61, V5 0.39'."""
    check_nonempty(record)
    ids, weights, group = routing.path(record, row)
    letter = routing.GROUP_LETTER[group]
    return "\n".join(f"layer {entry.layer_idx:2d}: " + ", ".join(f"{letter}{e} {w:.2f}" for e, w in zip(i, w_))
                     for entry, i, w_ in zip(record.layers, ids.tolist(), weights.tolist()))


# ====================================================================================== training
def saturation(step_records: list[tuple[int, routing.RoutingRecord]], final: routing.RoutingRecord) -> Figure:
    """Router saturation over training: the share of each layer's top-k choices that already agree with the
    final model's on the same tokens, step by step, one panel per group (chance: k / E)."""
    groups = groups_of(final)
    if not isinstance(step_records, (str, bytes, dict)) and hasattr(step_records, "__iter__"):
        step_records = list(step_records)  # read a generator once
    routing.saturation(step_records, final)  # validates the pairs and their layers before anything is drawn
    if not step_records:
        raise InputError("step_records is empty: give (step, record) pairs, as viz.records_over_training returns.")
    E, k = final.layers[0].num_experts, final.layers[0].expert_ids.shape[1]
    colours = expert_colours(max(len(final.layers), 1))
    fig = Figure(figsize=(5.2 * len(groups) + 0.6, 3.9), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, group in zip(axes, groups):
        steps, table = routing.saturation(step_records, final, group)   # (S, L)
        ax.set_title(f"{GROUP_NAME[group]} tokens (chance: k/E = {k / E:.2f})", fontsize=10)
        ax.set_xlabel("training step")
        if len(final.layers) > 8:  # many layers: one row per layer, one column per step
            shown = ax.imshow(table.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
            ax.set_yticks(range(len(final.layers)), [f"layer {e.layer_idx}" for e in final.layers], fontsize=6)
            fig.colorbar(shown, ax=ax, label="top-k overlap with the final model", shrink=0.85)
            continue
        for l, entry in enumerate(final.layers):
            ax.plot(steps, table[:, l].numpy(), marker="o", ms=3, color=colours[l], label=f"layer {entry.layer_idx}")
        ax.axhline(k / E, color="gray", ls=":", label="chance")
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("top-k overlap with the final model")
        ax.legend(fontsize=7)
    fig.suptitle("Router saturation: when each layer's choices settle")
    return fig


def png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for ipywidgets.Image, IPython.display.Image, files)."""
    import io

    from matplotlib.figure import FigureBase

    if not isinstance(fig, FigureBase) or not hasattr(fig, "savefig"):
        hint = " (an Axes: pass ax.figure)" if hasattr(fig, "figure") and hasattr(fig, "plot") else ""
        raise InputError(f"fig must be a matplotlib Figure{hint}, got {type(fig).__name__}.")
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not 1 <= dpi <= 1200:
        raise InputError(f"dpi must be a number from 1 to 1200 (100 is a screen), got {dpi!r}.")

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()

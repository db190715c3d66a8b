"""Do the tiny VL model's vision experts specialise? The numbers its ``TRAINING.md`` records.

For every MoE layer, the top-1 vision expert of every image token is set against the scene attribute
under that token (the colour or kind of the shape that covers it, or the picture's background), over
held-out scenes that each ask for a description:

    NMI(expert, attribute) = 2 I(E; A) / (H(E) + H(A))      0: the expert says nothing, 1: it names it

The NMI and the per-label loads are :func:`routing.mutual_information` and :func:`routing.load_by_label`
of one :func:`routing.record`; this module adds only the scenes and how a token gets its label.
"""

from __future__ import annotations

import torch

from . import routing
from ..errors import InputError, require_int
from ..io.chat import render_prompt
from ..tiny import scenes
from ..tiny.models import held_out_scenes


def token_labels(scene: scenes.Scene, grid_h: int, grid_w: int, attribute: str, min_share: float = 0.04,
                 size: int = scenes.IMAGE_SIZE) -> list[str]:
    """The ``attribute`` of the shape under each merged image token (row-major), or "background".

    A token covers size/grid pixels on a side; a small shape fills only part of one, so a token takes the
    shape that covers the most of it when that is at least ``min_share`` of its pixels.
    """
    if not isinstance(scene, scenes.Scene):
        raise InputError(f"scene must be a scenes.Scene, got {type(scene).__name__}.")
    for name, value in (("grid_h", grid_h), ("grid_w", grid_w), ("size", size)):
        require_int(name, value, 1)
    if attribute not in ("colour", "kind", "size", "place"):
        raise InputError(f"attribute must be 'colour', 'kind', 'size' or 'place', got {attribute!r}.")
    if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 <= min_share <= 1:
        raise InputError(f"min_share must be a number from 0 to 1, got {min_share!r}.")
    labels = []
    for counts in scenes.cell_pixel_counts(scene, grid_h, grid_w, size):   # (background, shape 1, ...)
        best = int(counts[1:].argmax()) + 1
        covered = counts[best] >= min_share * counts.sum()
        labels.append(getattr(scene.shapes[best - 1], attribute) if covered else "background")
    return labels


@torch.no_grad()
def scene_specialisation(model, tokenizer, count: int = 60, seed: int = 12345,
                         attributes=("colour", "kind", "background")) -> dict:
    """Per MoE layer: the top-1 vision expert of every image token against the scene attribute under it.

    Returns {layer: {attribute: {"nmi": float, "load": {label: [tokens per expert]}}}}.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(getattr(model, "config", None), "vision"):
        raise InputError(f"model must be an ernie-lab ERNIE 4.5 VL model (it routes pictures), got "
                         f"{type(model).__name__}; load the tiny one with ernie_lab.load_model(folder).")
    if not routing.taps(model):
        raise InputError("model: this model has no MoE layers, so its experts cannot specialise.")
    require_int("count", count, 1)
    if isinstance(attributes, str):
        attributes = (attributes,)
    attributes = tuple(attributes)
    bad = [a for a in attributes if a not in ("colour", "kind", "size", "place", "background")]
    if not attributes or bad:
        raise InputError(f"attributes must be some of 'colour', 'kind', 'size', 'place', 'background', got "
                         f"{attributes!r}.")
    model.eval()
    labels = {a: [] for a in attributes}
    picks: dict[int, list[torch.Tensor]] = {}                  # layer -> top-1 experts of each scene's image tokens
    merge = model.config.vision.spatial_merge_size * model.config.vision.patch_size
    for scene in held_out_scenes(count, seed):
        image = scenes.render(scene)
        grid = image.height // merge, image.width // merge
        prompt = render_prompt(model, tokenizer, scenes.conversation(image, scenes.DESCRIBE, "")[:1])
        with routing.record(model) as rec:
            model(**prompt)
        image_rows = (prompt["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        for entry, top1 in zip(rec.layers, routing.choices(rec, image_rows)):
            picks.setdefault(entry.layer_idx, []).append(top1)
        for attribute in attributes:
            if attribute == "background":
                labels[attribute] += [scene.background] * len(image_rows)
            else:
                labels[attribute] += token_labels(scene, *grid, attribute)
    E = model.config.text.moe_num_experts
    out = {}
    for layer, experts in picks.items():
        out[layer] = {}
        for attribute, values in labels.items():
            names, table = routing.load_by_label(torch.cat(experts), values, E)   # (labels, E) token counts
            out[layer][attribute] = {"nmi": routing.mutual_information(table), "load": dict(zip(names, table.tolist()))}
    return out

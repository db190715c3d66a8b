"""Teach the eyes first: a warm-up that makes every picture token say which shapes it shows.

A real ERNIE 4.5-VL starts from a vision encoder that was pretrained on images; the kit's tiny VL model
starts from random weights. Its decoder answers "What colour is the circle?" by attention: the query
"circle" must find the picture tokens whose keys say *circle*, and read *red* from their values. Trained
end to end from scratch, the tokens never say *circle* clearly enough: a linear probe reads the kind of
the shape under a token 77% right (colour 100%), and the model ties colours to shapes no better than a
guess among the colours present. So before the main run the ViT and the adapter learn, on their own, a
dense per-token task. For every merged token t of a scene (the 2x2 windows of 14-pixel patches):

    y_t = multi-hot over the attributes of every shape that covers >= 4% of t's pixels:
          colour x kind ("red circle", 18), kind (3), colour (6), place (5), kind x place (15), size (2)
    z_t = W adapter(ViT(pixels))_t + b          W: (49, text width), a linear probe, thrown away after
    loss = mean over tokens and labels of BCE(z_t, y_t)

Linear readability is the point: the decoder's keys and values are linear maps of these tokens, so
what a linear probe reads here is what attention can search by. The ERNIE-specific twist is where the
place comes from: the ViT has no position embedding (2-D RoPE only rotates queries and keys), so a
token's place must be worked out by attention over its neighbours (the picture's edges differ from
its middle); the probe asks for it, and the decoder, whose values carry no position either, can then
answer "Where is the triangle?" by reading it off the token it found.

The probe's starting scale matters, because the ViT learns through the probe's weights. Drawn at std 0.02
(the shipped recipe), 1200 updates leave the place labels 63% right on held-out tokens; drawn as
``nn.Linear`` draws it (``probe_std=None``, U(-1/sqrt(d), 1/sqrt(d)), 4x wider) they are 100% right
(``benchmarks/results/vl_recipe_trials.json``).

    result = warm_up_vision(model, steps=1500)      # the model's ViT and adapter are updated in place
    result.accuracy                                 # held-out exact-match per label group

Data is drawn as a function of the step (seeded), so a warm-up is deterministic.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import scenes
from ..errors import InputError
from ..io.image_processing import preprocess_images

SIZES = tuple(scenes.SIZES)
PLACES = tuple(scenes.PLACES)
GROUPS = {  # label group -> the attribute names of one shape it holds
    "colour kind": lambda s: f"{s.colour} {s.kind}",
    "kind": lambda s: s.kind,
    "colour": lambda s: s.colour,
    "place": lambda s: s.place,
    "kind place": lambda s: f"{s.kind} {scenes.PLACE_PHRASES[s.place]}",
    "size": lambda s: s.size,
}
GROUP_LABELS = {
    "colour kind": tuple(f"{c} {k}" for k in scenes.KINDS for c in scenes.COLOURS),
    "kind": scenes.KINDS,
    "colour": scenes.COLOURS,
    "place": PLACES,
    "kind place": tuple(f"{k} {scenes.PLACE_PHRASES[p]}" for p in PLACES for k in scenes.KINDS),
    "size": SIZES,
}
LABELS = tuple((group, label) for group, labels in GROUP_LABELS.items() for label in labels)  # 49 outputs
LABEL_INDEX = {entry: i for i, entry in enumerate(LABELS)}


def token_targets(scene: scenes.Scene, grid_h: int, grid_w: int, size: int = scenes.IMAGE_SIZE,
                  min_share: float = 0.04) -> torch.Tensor:
    """(grid_h * grid_w, len(LABELS)) 0/1, tokens row-major: the labels of every shape covering a token.

    A shape counts for a token when it covers at least ``min_share`` of the token's pixels (a shape at a
    place sits where four tokens meet, so each of them sees a quarter of it; a token can see two shapes).
    """
    targets = torch.zeros(grid_h * grid_w, len(LABELS))
    for token, counts in enumerate(scenes.cell_pixel_counts(scene, grid_h, grid_w, size)):  # (background, shape 1, ...)
        for shape, pixels in zip(scene.shapes, counts[1:]):
            if pixels >= min_share * counts.sum():
                for group, name in GROUPS.items():
                    targets[token, LABEL_INDEX[group, name(shape)]] = 1.0
    return targets


def scene_batch(rng: random.Random, count: int, config, split: str = "train",
                size: int = scenes.IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` random scenes of ``split``: pixel_values (patches, 588), image_grid_thw, targets (tokens, 49)."""
    images, targets = [], []
    merge = config.spatial_merge_size * config.patch_size
    while len(images) < count:
        scene = scenes.random_scene(rng)
        if scenes.split_of(scene) != split:
            continue
        images.append(scenes.render(scene, size))
        targets.append(token_targets(scene, size // merge, size // merge, size))
    inputs = preprocess_images(images)
    return inputs["pixel_values"], inputs["image_grid_thw"], torch.cat(targets)


@dataclass
class WarmUpResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)   # {"step", "loss"} every ``log_every`` steps
    accuracy: dict[str, float] = field(default_factory=dict)  # held-out: group -> tokens with every label right


def group_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Per label group: the share of tokens whose predicted labels (logit > 0) equal the targets exactly."""
    out = {}
    for group, labels in GROUP_LABELS.items():
        columns = [LABEL_INDEX[group, label] for label in labels]
        right = ((logits[:, columns] > 0).float() == targets[:, columns]).all(dim=1)
        out[group] = float(right.float().mean())
    return out


def warm_up_vision(model: nn.Module, steps: int = 1200, *, lr: float = 1e-3, batch_size: int = 32, seed: int = 0,
                   warmup_steps: int = 30, weight_decay: float = 0.01, max_grad_norm: float = 1.0,
                   eval_scenes: int = 64, log_every: int = 50, progress: bool = True,
                   probe_std: float | None = 0.02) -> WarmUpResult:
    """Train ``model.vision`` and ``model.adapter`` (in place) on :func:`token_targets` for ``steps`` updates.

    AdamW at ``lr`` after a linear warm-up of ``warmup_steps``, gradient norm clipped to ``max_grad_norm``;
    the decoder is not touched. The probe starts at N(0, ``probe_std``^2), or as ``nn.Linear`` starts when
    ``probe_std`` is None. Returns the loss history and the probe's accuracy on ``eval_scenes`` held-out
    scenes (``scenes.split_of(scene) == "val"``).
    """
    from tqdm.auto import tqdm

    if not (hasattr(model, "vision") and hasattr(model, "adapter")):
        raise InputError("warm_up_vision needs a vision-language model (with .vision and .adapter); "
                         f"got a {type(model).__name__}.")
    if not isinstance(steps, int) or steps < 1 or batch_size < 1:
        raise InputError(f"steps and batch_size must be positive ints, got steps={steps!r}, batch_size={batch_size!r}.")
    vision_config = model.config.vision
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(model.config.text.hidden_size, len(LABELS))
    with torch.no_grad():
        if probe_std is None:  # nn.Linear's own initialisation, U(-1/sqrt(d), 1/sqrt(d)), but seeded
            bound = probe.in_features ** -0.5
            probe.weight.uniform_(-bound, bound, generator=generator)
            probe.bias.uniform_(-bound, bound, generator=generator)
        else:
            probe.weight.normal_(0.0, probe_std, generator=generator)
            probe.bias.zero_()
    device = model.embed.weight.device
    probe.to(device)
    params = [*model.vision.parameters(), *model.adapter.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    was_training, started, result = model.training, time.time(), WarmUpResult(steps=steps, seconds=0.0)
    model.train()
    for step in tqdm(range(steps), desc="vision warm-up", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / max(warmup_steps, 1))
        pixels, grid, targets = scene_batch(random.Random(seed * 1_000_003 + step), batch_size, vision_config)
        logits = probe(model.encode_vision(pixels, grid).float())  # (tokens, 49)
        loss = F.binary_cross_entropy_with_logits(logits, targets.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        if step % log_every == 0 or step == steps - 1:
            result.history.append({"step": step + 1, "loss": float(loss.detach())})
    for p in params:
        p.grad = None
    model.eval()
    pixels, grid, targets = scene_batch(random.Random(seed + 12345), eval_scenes, vision_config, split="val")
    with torch.no_grad():
        result.accuracy = group_accuracy(probe(model.encode_vision(pixels, grid).float()).cpu(), targets)
    model.train(was_training)
    result.seconds = time.time() - started
    return result

"""The vision warm-up: per-token targets that name the shapes a token shows, and a loop that learns them."""

import json
import random
from pathlib import Path

import pytest
import torch

import ernie_lab
from ernie_lab import scenes, vision_warmup
from ernie_lab.errors import InputError

VL = Path(__file__).resolve().parent.parent / "data" / "tiny-ernie-vl"


def named(targets: torch.Tensor, token: int) -> set[str]:
    return {label for (group, label), on in zip(vision_warmup.LABELS, targets[token].tolist()) if on}


def test_a_shape_at_a_place_is_named_by_the_four_tokens_that_meet_there():
    scene = scenes.Scene("white", (scenes.Shape("circle", "red", "large", "left"),))
    targets = vision_warmup.token_targets(scene, 4, 4)                 # (16, 49)
    assert targets.shape == (16, len(vision_warmup.LABELS)) == (16, 49)
    covered = {r * 4 + c for r in (1, 2) for c in (0, 1)}                # left = (1/4, 1/2): rows 1-2, columns 0-1
    for token in range(16):
        expected = {"red circle", "circle", "red", "left", "circle on the left", "large"} if token in covered else set()
        assert named(targets, token) == expected, token


def test_a_token_between_two_shapes_names_both_and_a_small_shape_its_size():
    scene = scenes.Scene("gray", (scenes.Shape("square", "blue", "small", "left"),
                                  scenes.Shape("triangle", "yellow", "large", "centre")))
    targets = vision_warmup.token_targets(scene, 4, 4)
    between = named(targets, 1 * 4 + 1)                                 # row 1, column 1: both shapes reach it
    assert {"blue square", "yellow triangle", "left", "centre", "large", "small"} <= between
    assert "red" not in between and "circle" not in between
    assert named(targets, 0) == set()                                   # a corner shows only background


def test_group_accuracy_counts_a_token_right_only_when_its_whole_group_is():
    scene = scenes.Scene("white", (scenes.Shape("circle", "red", "large", "left"),))
    targets = vision_warmup.token_targets(scene, 4, 4)
    perfect = torch.where(targets > 0, 5.0, -5.0)
    assert set(vision_warmup.group_accuracy(perfect, targets).values()) == {1.0}
    wrong = perfect.clone()
    wrong[4, vision_warmup.LABEL_INDEX["kind", "square"]] = 5.0           # one token also claims a square
    accuracy = vision_warmup.group_accuracy(wrong, targets)
    assert accuracy["kind"] == 15 / 16 and accuracy["colour"] == 1.0


@pytest.fixture(scope="module")
def fresh_vl():
    tok = ernie_lab.load_tokenizer(VL)
    config = ernie_lab.config.parse_config(json.loads((VL / "config.json").read_text()))
    torch.manual_seed(0)
    return ernie_lab.architectures.build(config).init_weights(std=0.02, seed=0), tok


def test_warm_up_lowers_the_loss_and_touches_only_the_vision_tower_and_adapter(fresh_vl):
    model, _ = fresh_vl
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    result = vision_warmup.warm_up_vision(model, steps=40, batch_size=8, log_every=1, eval_scenes=8, progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith(("vision.", "adapter.")) for name in changed), changed
    assert any(n.startswith("vision.") for n in changed) and any(n.startswith("adapter.") for n in changed)
    assert all(p.grad is None for p in model.parameters())
    assert set(result.accuracy) == set(vision_warmup.GROUP_LABELS)
    assert all(0.0 <= v <= 1.0 for v in result.accuracy.values()) and result.seconds > 0


def test_warm_up_is_deterministic(fresh_vl):
    _, tok = fresh_vl
    config = ernie_lab.config.parse_config(json.loads((VL / "config.json").read_text()))
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        model = ernie_lab.architectures.build(config).init_weights(std=0.02, seed=1)
        vision_warmup.warm_up_vision(model, steps=3, batch_size=4, eval_scenes=4, progress=False)
        runs.append(model.adapter.proj.weight.detach().clone())
    assert torch.equal(*runs)


def test_warm_up_refuses_a_text_model_and_bad_steps(fresh_vl):
    text = ernie_lab.load_model(VL.parent / "tiny-ernie-text")
    with pytest.raises(InputError, match="vision-language"):
        vision_warmup.warm_up_vision(text, steps=2)
    with pytest.raises(InputError, match="positive"):
        vision_warmup.warm_up_vision(fresh_vl[0], steps=0)


def test_scene_batch_draws_only_the_asked_split():
    config = ernie_lab.config.parse_config(json.loads((VL / "config.json").read_text())).vision
    pixels, grid, targets = vision_warmup.scene_batch(random.Random(5), 3, config, split="val")
    assert pixels.shape == (3 * 64, 588) and grid.tolist() == [[1, 8, 8]] * 3 and targets.shape == (48, 49)
    rng, wanted = random.Random(5), []
    while len(wanted) < 3:  # the same draws, kept by hand
        scene = scenes.random_scene(rng)
        if scenes.split_of(scene) == "val":
            wanted.append(scene)
    assert torch.equal(targets, torch.cat([vision_warmup.token_targets(s, 4, 4) for s in wanted]))
    assert torch.equal(pixels, ernie_lab.image_processing.preprocess_images([scenes.render(s) for s in wanted])["pixel_values"])

"""Routing pictures and the numbers behind them (ernie_lab.routing's statistics, ernie_lab.viz, the explorer).

The numbers are checked on records written by hand, where the right answer is known; the pictures on
records of a real forward pass: the kit's tiny VL model at initialisation, and random-weight ERNIE 4.5
VL and text-MoE checkpoints that transformers saves, with the real 64 experts per group.
"""

import math
import random
import warnings
from collections import Counter

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import ernie_lab  # noqa: E402
from ernie_lab import InputError, routing, scenes, tiny_models, viz  # noqa: E402
from ernie_lab.course.notebook import spread_reference_routers  # noqa: E402
from ernie_lab.analysis.routing import LayerRouting, RoutingRecord  # noqa: E402
from ernie_lab.model.special_tokens import TEXT, VISION  # noqa: E402


def hand_record(ids_per_layer, modality, num_experts=4, probs=None):
    """A record written by hand: one (N, k) expert-id table per layer, the same modality for all."""
    layers = []
    for layer_idx, ids in enumerate(ids_per_layer, 1):
        ids = torch.tensor(ids)
        weights = torch.linspace(0.9, 0.1, ids.shape[1]).expand(ids.shape[0], -1).clone()
        weights /= weights.sum(-1, keepdim=True)
        p = torch.full((ids.shape[0], num_experts), 1.0 / num_experts) if probs is None else probs
        entry = LayerRouting(layer_idx, num_experts)
        entry.append(ids, weights, p, torch.tensor(modality))
        layers.append(entry)
    return RoutingRecord(layers)


def test_import_ernie_lab_does_not_import_matplotlib_or_ipywidgets():
    import subprocess
    import sys

    code = "import sys, ernie_lab, ernie_lab.analysis.routing; print(sorted({'matplotlib', 'ipywidgets'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ numbers
def test_co_selection_counts_pairs_and_its_diagonal_is_the_load():
    rec = hand_record([[[0, 1], [0, 2], [1, 0], [3, 2]]], [0, 0, 0, 1])
    entry = rec.layers[0]
    both = routing.co_selection(entry)
    assert both[0, 1] == both[1, 0] == 2 and both[0, 2] == 1 and both[2, 3] == 1 and both[1, 3] == 0
    assert torch.equal(both.diagonal(), entry.load())
    text_only = routing.co_selection(entry, TEXT)
    assert text_only[2, 3] == 0 and torch.equal(text_only.diagonal(), entry.load(TEXT))


def test_entropy_and_top1_weight_by_modality():
    probs = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]])
    rec = hand_record([[[0, 1], [2, 3], [0, 1]]], [0, 1, 1], probs=probs)
    entry = rec.layers[0]
    assert torch.allclose(routing.entropy(entry), torch.tensor([0.0, math.log(4), math.log(2)]))
    assert torch.allclose(routing.entropy(entry, VISION), torch.tensor([math.log(4), math.log(2)]))
    assert torch.allclose(routing.top1_weight(entry, TEXT), torch.tensor([0.9]))
    means = routing.per_layer(rec, routing.entropy, VISION)
    assert means.shape == (1,) and math.isclose(float(means[0]), (math.log(4) + math.log(2)) / 2, rel_tol=1e-6)


def test_choices_path_and_rank_errors():
    rec = hand_record([[[0, 1], [2, 3]], [[3, 0], [1, 2]]], [0, 0])
    assert routing.choices(rec, torch.tensor([1, 0]), rank=1).tolist() == [[3, 1], [2, 0]]
    ids, weights, group = routing.path(rec, 1)
    assert ids.tolist() == [[2, 3], [1, 2]] and group == TEXT and torch.allclose(weights.sum(-1), torch.ones(2))
    with pytest.raises(InputError, match="rank"):
        routing.choices(rec, torch.tensor([0]), rank=2)
    assert "layer  2: T1 0.90, T2 0.10" in viz.path_table(rec, 1)


def list_nmi(a: list, b: list) -> float:
    """2 I(A; B) / (H(A) + H(B)) of two label sequences, from counts (the exercise of notebook 06)."""
    n = len(a)
    joint, pa, pb = Counter(zip(a, b)), Counter(a), Counter(b)
    mi = sum(c / n * math.log(c * n / (pa[x] * pb[y])) for (x, y), c in joint.items())
    h = lambda counts: -sum(c / n * math.log(c / n) for c in counts.values())  # noqa: E731
    return 2 * mi / (h(pa) + h(pb))


def test_load_by_label_and_mutual_information():
    picks = torch.tensor([0, 0, 1, 1, 2, 2])
    names, table = routing.load_by_label(picks, ["red", "red", "blue", "blue", "red", "blue"], 3)
    assert names == ["blue", "red"] and table.tolist() == [[0, 2, 1], [2, 0, 1]]
    assert math.isclose(routing.mutual_information(torch.tensor([[5, 0], [0, 5]])), 1.0)
    assert routing.mutual_information(torch.tensor([[5, 5], [5, 5]])) == pytest.approx(0.0, abs=1e-12)
    rng = random.Random(0)  # the same number as the NMI written out over two label lists
    labels = [rng.choice("abc") for _ in range(300)]
    experts = [("abc".index(x) + rng.choice([0, 0, 1])) % 4 for x in labels]
    _, table = routing.load_by_label(torch.tensor(experts), labels, 4)
    assert routing.mutual_information(table) == pytest.approx(list_nmi(labels, experts), abs=1e-9)
    assert routing.mutual_information(routing.contingency(experts, labels)) == pytest.approx(
        list_nmi(labels, experts), abs=1e-9)
    assert routing.contingency(["x", "y", "x"], [2, 2, 1]).tolist() == [[1, 1], [0, 1]]
    with pytest.raises(InputError, match="one label per"):
        routing.load_by_label(picks, ["red"], 3)


def test_word_classes():
    assert [routing.word_class(p) for p in ["\u2581The", ",", "42", "\u25813", "<|IMAGE_START|>", "\u2581", "x2"]] == \
        ["words", "punctuation", "digits", "digits", "other", "other", "words"]


def test_agreement_and_saturation():
    final = hand_record([[[0, 1], [2, 3]]], [0, 1])
    same = hand_record([[[1, 0], [2, 3]]], [0, 1])       # same sets, other order
    half = hand_record([[[0, 2], [0, 1]]], [0, 1])       # text: one of two; vision: none
    assert routing.agreement(same.layers[0], final.layers[0]) == 1.0
    assert routing.agreement(half.layers[0], final.layers[0], TEXT) == 0.5
    assert routing.agreement(half.layers[0], final.layers[0], VISION) == 0.0
    steps, table = routing.saturation([(0, half), (5, same)], final)
    assert steps == [0, 5] and table.tolist() == [[0.25], [1.0]]
    with pytest.raises(InputError, match="same inputs"):
        routing.agreement(hand_record([[[0, 1]]], [0]).layers[0], final.layers[0])


def test_cell_labels_find_shapes_smaller_than_a_cell():
    scene = scenes.Scene("white", (scenes.Shape("circle", "red", "small", "left"),))
    labels = viz.cell_labels(scene, (4, 4), "colour")
    assert len(labels) == 16 and "red" in labels and labels.count("red") <= 4
    assert set(labels) == {"red", "background"}


# ------------------------------------------------------------------------------------------ pictures
def tick_texts(ax):
    return [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels() if t.get_text()]


def test_load_heatmap_keeps_the_groups_on_separate_axes():
    rec = hand_record([[[0, 1], [2, 3], [1, 2]], [[3, 2], [0, 1], [1, 0]]], [0, 1, 1])
    fig = viz.load_heatmap(rec)
    groups = {"T": 0, "V": 0}
    for ax in fig.get_axes():
        letters = {t[0] for t in tick_texts(ax) if t[0] in "TV" and t[1:].isdigit()}
        assert len(letters) <= 1, "text and vision experts on one axis"
        for letter in letters:
            groups[letter] += 1
    assert groups["T"] >= 1 and groups["V"] >= 1
    assert fig._suptitle.get_text()
    text_only = viz.load_heatmap(hand_record([[[0, 1]]], [0]))
    assert not any(t.startswith("V") for ax in text_only.get_axes() for t in tick_texts(ax))


@pytest.fixture(scope="module")
def tiny_vl():
    """The tiny VL model's architecture at initialisation, with the tiny tokenizer."""
    from ernie_lab.model.config import parse_config
    from ernie_lab.course.notebook import repo_path

    tokenizer = ernie_lab.load_tokenizer(repo_path("data", "tiny-tokenizer"))
    config = parse_config(tiny_models.tiny_config(tiny_models.VL_CONFIG, tokenizer))
    torch.manual_seed(0)
    model = ernie_lab.architectures.build(config).eval()
    with torch.no_grad():  # routers drawn wider than nn.Linear's default, so tokens spread over experts
        for block in ernie_lab.moe.moe_blocks(model):
            for router in block.routers:
                router.weight.normal_(0.0, 0.5)
    return model, tokenizer


def every_picture(routed: viz.Routed):
    """Draw every picture of one routed prompt; return the figures."""
    rec = routed.record
    layer = rec.layers[-1].layer_idx
    figures = [viz.load_heatmap(rec), viz.co_selection(rec, layer), viz.confidence_by_layer(rec),
               viz.token_strip(rec, routed.tokens, routed.text_rows),
               viz.routing_path(rec, int(routed.text_rows[0]), routed.tokens)]
    if routed.image is not None:
        figures += [viz.patch_overlay(rec, routed.image, routed.grid, routed.image_rows, layer=layer),
                    viz.patch_overlay(rec, routed.image, routed.grid, routed.image_rows, layer=layer, rank=1),
                    viz.routing_path(rec, int(routed.image_rows[0]), routed.tokens)]
    for fig in figures:
        assert len(viz.png(fig, dpi=40)) > 1000
        assert fig._suptitle is not None or any(ax.get_title() for ax in fig.get_axes())
    return figures


def test_route_keeps_patches_and_text_apart(tiny_vl):
    model, tokenizer = tiny_vl
    image = scenes.render(scenes.random_scene(1))
    routed = viz.route(model, tokenizer, "What colour is the circle?", image)
    assert routed.grid == (4, 4) and len(routed.image_rows) == 16
    ids = routed.input_ids
    assert (ids[routed.image_rows] == model.config.image_token_id).all()
    for entry in routed.record.layers:
        assert (entry.modality[routed.image_rows] == VISION).all() and (entry.modality[routed.text_rows] == TEXT).all()
    assert len(routed.tokens) == len(ids) and not set(routed.image_rows.tolist()) & set(routed.text_rows.tolist())
    every_picture(routed)


def test_patch_overlay_colours_cells_by_the_chosen_rank(tiny_vl):
    model, tokenizer = tiny_vl
    routed = viz.route(model, tokenizer, scenes.DESCRIBE, scenes.render(scenes.random_scene(2)))
    entry = routed.record.layers[0]
    for rank in (0, 1):
        fig = viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, rank=rank)
        written = [t.get_text() for t in fig.get_axes()[0].texts]
        assert written == [f"V{e}" for e in entry.expert_ids[routed.image_rows, rank].tolist()]
        legend = [t.get_text() for t in fig.get_axes()[0].get_legend().get_texts()]
        assert sum(int(t.split(": ")[1].split()[0]) for t in legend) == 16
    with pytest.raises(InputError, match="cells"):
        viz.patch_overlay(routed.record, routed.image, (3, 3), routed.image_rows)
    with pytest.raises(InputError, match="not an MoE layer"):
        viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=0)


def test_token_strip_reads_100_tokens(tiny_vl):
    model, tokenizer = tiny_vl
    text = " ".join(scenes.caption(scenes.random_scene(s)) for s in range(6))
    routed = viz.route(model, tokenizer, text)
    assert len(routed.text_rows) >= 100
    fig = viz.token_strip(routed.record, routed.tokens, routed.text_rows, per_line=24)
    assert fig.get_figwidth() < 20  # wrapped into lines, not one endless row
    numbers = [t.get_text() for t in fig.get_axes()[0].texts if t.get_text().isdigit()]
    assert len(numbers) == len(routed.text_rows) * len(routed.record.layers)


def test_specialisation_on_scenes_and_text(tiny_vl):
    model, tokenizer = tiny_vl
    rec, rows, labels = viz.route_scenes(model, tokenizer, tiny_models.held_out_scenes(4))
    assert len(rows) == 4 * 16 and all(len(v) == len(rows) for v in labels.values())
    assert all((entry.modality[rows] == VISION).all() for entry in rec.layers)
    results = routing.specialisation(rec, rows, labels["background"])
    assert all(int(r["table"].sum()) == len(rows) for r in results)
    fig = viz.specialisation(rec, rows, labels)
    assert "NMI" in fig.get_axes()[1].get_title()
    viz.specialisation(rec, rows, labels, layer=rec.layers[1].layer_idx)
    rec, rows, classes = viz.route_texts(model, tokenizer, ["The 3 circles, and 2 squares.", "Blue."])
    assert {"words", "digits", "punctuation"} <= set(classes)
    viz.specialisation(rec, rows, {"word class": classes}, group=TEXT)


def test_saturation_from_models_and_the_final_one(tiny_vl):
    model, tokenizer = tiny_vl
    inputs = [{"input_ids": torch.tensor([tokenizer.encode("a red circle on the left")])}]
    records = viz.records_over_training([(0, model), (10, model)], inputs)
    steps, table = routing.saturation(records, records[-1][1])
    assert steps == [0, 10] and torch.equal(table, torch.ones(2, 3))
    viz.saturation(records, records[-1][1])


# ------------------------------------------------------------------------------- real checkpoints
@pytest.fixture(scope="module")
def hub_vl(tmp_path_factory):
    """A random ERNIE 4.5 VL checkpoint that transformers saves: tiny widths, the real 64 + 64 experts."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(0)
    config = Ernie4_5_VLMoeConfig(
        text_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, moe_intermediate_size=[16, 8], moe_k=6,
                         moe_num_experts=64, moe_num_shared_experts=2, initializer_range=0.08),
        vision_config=dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, initializer_range=0.08))
    reference = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    spread_reference_routers(reference)
    folder = tmp_path_factory.mktemp("hub-vl-64")
    reference.save_pretrained(folder)
    return ernie_lab.load_model(folder)


def stand_in_tokenizer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ernie_lab.load_tokenizer()


def test_every_picture_on_a_hub_vl_checkpoint_with_64_experts(hub_vl):
    image = scenes.render(scenes.random_scene(5), 224)
    routed = viz.route(hub_vl, stand_in_tokenizer(), "What is in the picture?", image)
    rec = routed.record
    assert rec.layers[0].num_experts == 64 and rec.layers[0].expert_ids.shape[1] == 6
    assert routed.grid == (8, 8)
    loads = rec.load(TEXT), rec.load(VISION)
    assert int(loads[0][0].sum()) == 6 * len(routed.text_rows)
    assert int(loads[1][0].sum()) == 6 * (len(routed.image_rows) + 2)  # + the picture's start / end markers
    figures = every_picture(routed)
    assert any("V63" in tick_texts(ax) or "V60" in tick_texts(ax) for ax in figures[0].get_axes())


def test_pictures_of_a_28_layer_text_moe_record():
    """A record of the 21B-A3B's shape (28 layers, 64 experts, k = 6) from a model with cheap widths."""
    from ernie_lab.model.config import ErnieConfig

    config = ErnieConfig.from_dict(dict(model_type="ernie4_5_moe", vocab_size=512, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                        moe_num_experts=64, moe_k=6, moe_intermediate_size=8, moe_num_shared_experts=2,
                                        moe_layer_start_index=1))
    torch.manual_seed(0)
    model = ernie_lab.ErnieForCausalLM(config).eval()
    with torch.no_grad():
        for block in ernie_lab.moe.moe_blocks(model):
            block.gate.weight.normal_(0.0, 1.0)
        with routing.record(model) as rec:
            model(torch.randint(0, 512, (1, 48)))
    assert len(rec.layers) == 27
    tokens = [f"t{i}" for i in range(48)]
    text_rows = torch.arange(48)
    figures = [viz.load_heatmap(rec), viz.co_selection(rec, 27), viz.confidence_by_layer(rec),
               viz.token_strip(rec, tokens, text_rows), viz.routing_path(rec, 5, tokens),
               viz.specialisation(rec, text_rows, {"parity": [i % 2 for i in range(48)]}, group=TEXT),
               viz.saturation([(0, rec), (1, rec)], rec)]
    assert len(viz.default_layers(rec)) == 8
    for fig in figures:
        assert len(viz.png(fig, dpi=30)) > 1000


# ------------------------------------------------------------------------------------------ explorer
def test_explorer_redraws_on_every_control_and_lists_the_selected_token(tiny_vl):
    pytest.importorskip("ipywidgets")
    from ernie_lab.analysis.widgets import RoutingExplorer

    model, tokenizer = tiny_vl
    images = {f"scene {s}": scenes.render(scenes.random_scene(s)) for s in range(2)}
    explorer = RoutingExplorer(model, tokenizer, images=images, max_new_tokens=2, spec_scenes=2)
    assert explorer.answer.value.startswith("<b>model's answer:</b>")
    seen = [explorer.snapshot()]
    for control, value in ((explorer.layer, 3), (explorer.rank, 1), (explorer.position, 5),
                           (explorer.view_pick, "token strip"), (explorer.modality, TEXT),
                           (explorer.view_pick, "load heatmap"), (explorer.view_pick, "specialisation"),
                           (explorer.view_pick, "patch overlay"), (explorer.image_pick, "scene 1")):
        control.value = value
        assert explorer.snapshot() not in seen, f"{control.description} = {value!r} did not change the picture"
        seen.append(explorer.snapshot())
    explorer.modality.value = VISION
    explorer.position.value = 3
    listed = explorer.experts.value
    row = int(explorer.routed.image_rows[3])
    assert "image token" in listed and viz.path_table(explorer.routed.record, row) in listed
    assert listed.count("layer ") == len(explorer.routed.record.layers)


def test_explorer_takes_an_uploaded_picture(tiny_vl):
    pytest.importorskip("ipywidgets")
    import io

    from ernie_lab.analysis.widgets import RoutingExplorer

    model, tokenizer = tiny_vl
    explorer = RoutingExplorer(model, tokenizer, images={"one": scenes.render(scenes.random_scene(0))},
                               max_new_tokens=1)
    buffer = io.BytesIO()
    scenes.render(scenes.random_scene(9), 168).save(buffer, format="PNG")
    explorer._on_upload({"new": ({"name": "mine.png", "content": memoryview(buffer.getvalue())},)})
    # squeezed to 112 x 112 as the tiny model was trained: a 4 x 4 grid of merged tokens
    assert explorer.image_pick.value == "upload: mine.png" and explorer.routed.grid == (4, 4)
    kept = RoutingExplorer(model, tokenizer, images={"wide": scenes.render(scenes.random_scene(9), 168)},
                           max_new_tokens=1, image_size=None)  # a real checkpoint's way: the shape kept
    assert kept.routed.grid == (6, 6)


def test_the_explorer_gives_the_model_pictures_as_it_was_trained_and_it_names_every_bundled_photo():
    """Every bundled photograph, through the explorer's own path (picked in its dropdown, squeezed by
    model_picture, routed, answered by ernie_lab.chat), gets its caption from the shipped tiny VL model;
    and the answer is not cut short (the captions run to 30 tokens)."""
    pytest.importorskip("ipywidgets")
    pytest.importorskip("skimage")
    import html

    from ernie_lab.analysis.widgets import RoutingExplorer, bundled_images, model_picture
    from ernie_lab.course.notebook import repo_path

    assert model_picture(scenes.render(scenes.random_scene(1), 300)).size == (scenes.IMAGE_SIZE,) * 2
    folder = repo_path("data", "tiny-ernie-vl")
    model, tokenizer = ernie_lab.load_model(folder).eval(), ernie_lab.load_tokenizer(folder)
    photos = {f"photo: {p.name}": p.caption for p in scenes.photos()}
    images = {name: image for name, image in bundled_images(1).items() if name in photos}
    explorer = RoutingExplorer(model, tokenizer, images=images, spec_scenes=2)
    wrong = []
    for name, caption in photos.items():
        if explorer.image_pick.value != name:
            explorer.image_pick.value = name  # routes the picture and asks the model, as a click does
        answer = html.unescape(explorer.answer.value.split("</b>", 1)[1].strip())
        if answer != caption + ".":
            wrong.append((name, answer))
    assert not wrong, f"{len(wrong)} of {len(photos)} photos described wrongly through the explorer: {wrong}"


def test_draw_explains_views_that_do_not_apply(tiny_vl):
    from ernie_lab import widgets

    model, tokenizer = tiny_vl
    routed = viz.route(model, tokenizer, "Hello there.")
    with pytest.raises(InputError, match="no picture"):
        widgets.draw(routed, widgets.View(name="patch overlay"))
    with pytest.raises(InputError, match="view must be one of"):
        widgets.draw(routed, widgets.View(name="sideways"))
    assert widgets.selected_row(routed, widgets.View(modality=VISION)) is None
    widgets.draw(routed, widgets.View(name="token strip", modality=TEXT, position=2))


def test_explorer_on_a_text_moe_model():
    pytest.importorskip("ipywidgets")
    from ernie_lab.model.config import ErnieConfig
    from ernie_lab.analysis.widgets import RoutingExplorer

    config = ErnieConfig.from_dict(dict(model_type="ernie4_5_moe", vocab_size=103424, hidden_size=16,
                                        intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=8, moe_num_experts=64, moe_k=6,
                                        moe_intermediate_size=8, moe_num_shared_experts=2, moe_layer_start_index=1))
    torch.manual_seed(0)
    model = ernie_lab.ErnieForCausalLM(config).eval()
    with torch.no_grad():
        for block in ernie_lab.moe.moe_blocks(model):
            block.gate.weight.normal_(0.0, 1.0)
    explorer = RoutingExplorer(model, stand_in_tokenizer(), prompt="Where do these words go?", max_new_tokens=2)
    assert explorer.view_pick.options == ("token strip", "load heatmap") and explorer.routed.image is None
    before = explorer.snapshot()
    explorer.layer.value = 2
    assert explorer.snapshot() != before
    explorer.position.value = 2
    assert "text token" in explorer.experts.value and "layer  2: T" in explorer.experts.value

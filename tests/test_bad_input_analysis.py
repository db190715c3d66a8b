"""The bad-input catalogue of the analysis surfaces: routing records and their statistics, routing pictures,
the routing explorer and the family calculator.

Each case asserts one outcome, as tests/test_bad_input.py does for the loader: a specific ErnieLabError
subclass whose message names the argument (or record, row, label) at fault and says what to do; a
documented warning; or, for input that is legitimate, the correct result. A refused record leaves no hook
behind; a refused upload leaves the explorer as it was.
"""

import io
import math

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

import ernie_lab  # noqa: E402
from conftest import micro_moe, refused  # noqa: E402
from ernie_lab import ConfigError, InputError, routing, viz  # noqa: E402
from ernie_lab.analysis import family, widgets  # noqa: E402
from ernie_lab.analysis.routing import LayerRouting, RoutingRecord  # noqa: E402
from ernie_lab.model.config import ErnieConfig  # noqa: E402
from ernie_lab.model.moe import moe_blocks  # noqa: E402
from ernie_lab.model.special_tokens import TEXT, VISION  # noqa: E402

DENSE = dict(model_type="ernie4_5", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, head_dim=8)


@pytest.fixture(scope="module")
def moe():
    return micro_moe()


@pytest.fixture(scope="module")
def rec(moe):
    with torch.no_grad(), routing.record(moe) as rec:
        moe(torch.randint(0, 64, (1, 6)))
    return rec


def hooks(model) -> int:
    return sum(len(block._forward_hooks) for block in moe_blocks(model))


class Tok:
    """A stand-in tokenizer: one token per character."""

    def encode(self, text):
        return [3 + ord(c) % 60 for c in text]

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=False):
        return self.encode(" ".join(m["content"] for m in messages))

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [chr(97 + i % 26) for i in ids]


# ============================================================================ routing records
def test_record_of_a_non_model_names_model():
    refused(lambda: routing.record("ERNIE-4.5-21B").__enter__(), InputError, "model", "load_model")


def test_record_of_a_dense_model_warns_and_is_empty_and_its_statistics_are_empty():
    torch.manual_seed(0)
    dense = ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(DENSE)).eval()
    with pytest.warns(UserWarning, match="no MoE layers"), torch.no_grad(), routing.record(dense) as rec:
        dense(torch.randint(0, 64, (1, 3)))
    assert rec.layers == [] and rec.num_tokens == 0 and rec.load().shape == (0, 0)
    assert routing.routed_modalities(rec) == [] and routing.per_layer(rec, routing.entropy).numel() == 0
    refused(lambda: rec.layer(1), InputError, "layer 1", "no MoE layers")
    refused(lambda: routing.path(rec, 0), InputError, "empty")


def test_an_exception_inside_the_record_removes_its_hooks(moe):
    before = hooks(moe)
    with pytest.raises(RuntimeError, match="boom"), routing.record(moe):
        assert hooks(moe) == before + 3
        raise RuntimeError("boom")
    assert hooks(moe) == before


def test_nested_records_both_record_and_leave_no_hooks(moe):
    ids = torch.randint(0, 64, (1, 4))
    with torch.no_grad(), routing.record(moe) as outer:
        moe(ids)
        with routing.record(moe) as inner:
            moe(ids)
    assert outer.num_tokens == 8 and inner.num_tokens == 4 and hooks(moe) == 0
    assert torch.equal(outer.layers[0].expert_ids[4:], inner.layers[0].expert_ids)


def test_an_empty_record_gives_empty_statistics(moe):
    with routing.record(moe) as rec:
        pass
    assert rec.num_tokens == 0 and rec.load().tolist() == [[0] * 6] * 3
    assert torch.isnan(routing.per_layer(rec, routing.entropy)).all()
    assert routing.co_selection(rec.layers[0]).sum() == 0
    refused(lambda: viz.load_heatmap(rec), InputError, "empty", "no tokens")


def test_layer_out_of_range_is_a_kit_error_and_still_a_key_error(rec):
    message = refused(lambda: rec.layer(9), routing.NotAnMoELayer, "layer 9", "[1, 2, 3]")
    assert not message.startswith("'")
    with pytest.raises(KeyError):
        rec.layer(0)
    refused(lambda: rec.layer("2"), InputError, "layer", "'2'")


def test_rows_and_row_out_of_range(rec):
    refused(lambda: routing.choices(rec, torch.tensor([0, 6])), InputError, "rows", "row 6", "6 tokens")
    refused(lambda: routing.choices(rec, torch.tensor([0.5])), InputError, "rows", "integer")
    refused(lambda: routing.path(rec, 6), InputError, "row 6", "6 tokens")
    assert torch.equal(routing.path(rec, -1)[0], routing.path(rec, 5)[0])  # negative counts from the end


def test_rank_out_of_range_or_not_an_int(rec):
    refused(lambda: routing.choices(rec, torch.arange(6), rank=2), InputError, "rank", "k - 1 = 1")
    refused(lambda: routing.choices(rec, torch.arange(6), rank=0.0), InputError, "rank")


def test_bad_modality_is_refused_not_a_silent_zero_load(rec):
    refused(lambda: rec.load(modality=2), InputError, "modality", "2")
    refused(lambda: routing.entropy(rec.layers[0], "text"), InputError, "modality")
    refused(lambda: routing.expert_labels(4, 7), InputError, "modality")


def test_statistics_of_a_whole_record_where_one_layer_is_wanted(rec):
    refused(lambda: routing.co_selection(rec), InputError, "entry", "rec.layers[i]")
    refused(lambda: routing.per_layer(rec, "entropy"), InputError, "statistic")
    refused(lambda: routing.choices(rec.layers[0], [0]), InputError, "record", "RoutingRecord")


def test_labels_of_the_wrong_length():
    picks = torch.tensor([0, 1, 2])
    refused(lambda: routing.load_by_label(picks, ["a", "b"], 3), InputError, "labels", "2 labels for 3 tokens")
    refused(lambda: routing.contingency(["a", "b"], [1]), InputError, "a and b", "2 and 1")
    refused(lambda: routing.specialisation(RoutingRecord([]), [], ["x"]), InputError, "labels", "1 labels for 0 rows")


def test_picks_beyond_num_experts_name_num_experts():
    refused(lambda: routing.load_by_label(torch.tensor([0, 7]), ["a", "b"], 4), InputError, "picks", "expert 7",
            "num_experts")
    refused(lambda: routing.load_by_label(torch.tensor([0, 1]), ["a", "b"], 0), InputError, "num_experts")


def test_label_tensors_are_read_as_values_not_as_objects():
    names, table = routing.load_by_label(torch.tensor([0, 1, 0, 1]), torch.tensor([3, 3, 4, 4]), 2)
    assert names == [3, 4] and table.tolist() == [[1, 1], [1, 1]]
    assert routing.contingency(torch.tensor([1, 1, 2]), [5, 5, 6]).tolist() == [[2, 0], [0, 1]]


def test_mixed_and_unhashable_and_nan_labels():
    names, table = routing.load_by_label([0, 1, 1], [1, "one", 1], 2)  # mixed types: sorted by type, then text
    assert names == [1, "one"] and table.tolist() == [[1, 1], [0, 1]]
    refused(lambda: routing.contingency([[1], [2]], [1, 2]), InputError, "a[0]", "list")
    refused(lambda: routing.load_by_label([0, 1], ["a", float("nan")], 2), InputError, "labels[1]", "NaN")
    refused(lambda: routing.contingency("abc", "abd"), InputError, "a", "str")


def test_tables_with_nan_negative_or_no_counts():
    refused(lambda: routing.mutual_information(torch.tensor([[1.0, float("nan")], [0, 1]])), InputError, "table", "NaN")
    refused(lambda: routing.mutual_information(torch.tensor([[1, -1], [0, 1]])), InputError, "table", "negative")
    refused(lambda: routing.mutual_information(torch.zeros(0, 4)), InputError, "table", "no counts")
    refused(lambda: routing.mutual_information(torch.zeros(2, 2)), InputError, "table", "no counts")
    refused(lambda: routing.information(torch.ones(4)), InputError, "table", "2-D")
    assert routing.mutual_information([[5, 0], [0, 5]]) == pytest.approx(1.0)  # a list of lists is a table


def test_agreement_and_saturation_of_records_from_different_models(rec, moe):
    other = LayerRouting(1, 8)
    other.append(rec.layers[0].expert_ids, rec.layers[0].weights, torch.zeros(6, 8), rec.layers[0].modality)
    refused(lambda: routing.agreement(rec.layers[0], other), InputError, "different models", "6 and 8")
    short = RoutingRecord(rec.layers[:2])
    refused(lambda: routing.saturation([(0, short)], rec), InputError, "step_records[0]", "[1, 2]", "[1, 2, 3]")
    refused(lambda: routing.saturation([rec], rec), InputError, "step_records[0]", "(step, RoutingRecord)")
    steps, table = routing.saturation([], rec)
    assert steps == [] and table.shape == (0, 3)


def test_word_class_of_a_non_string():
    refused(lambda: routing.word_class(17), InputError, "piece", "int")


# ============================================================================ routing pictures
def test_pictures_of_a_dense_models_record_say_so():
    empty = RoutingRecord([])
    for draw in (viz.load_heatmap, viz.confidence_by_layer, lambda r: viz.co_selection(r, 1),
                 lambda r: viz.token_strip(r, []), lambda r: viz.routing_path(r, 0), lambda r: viz.path_table(r, 0)):
        refused(lambda: draw(empty), InputError, "empty", "dense model")


def test_pictures_of_what_is_not_a_record(rec):
    routed = viz.Routed(rec, torch.zeros(6), list("abcdef"), None, None, torch.zeros(0), torch.arange(6))
    refused(lambda: viz.load_heatmap(routed), InputError, "record", "RoutingRecord", ".record")
    refused(lambda: viz.load_heatmap({"layers": []}), InputError, "record", "dict")


def test_token_strip_with_fewer_or_more_tokens_than_the_record(rec):
    refused(lambda: viz.token_strip(rec, list("abc")), InputError, "tokens", "3 texts", "6 tokens")
    refused(lambda: viz.token_strip(rec, list("abcdefgh")), InputError, "tokens", "8 texts")
    refused(lambda: viz.token_strip(rec, "abcdef"), InputError, "tokens", "str")
    refused(lambda: viz.routing_path(rec, 2, tokens=list("ab")), InputError, "tokens", "2 texts")


def test_token_strip_wrong_layer_rank_rows_per_line_and_selection(rec):
    tokens = list("abcdef")
    refused(lambda: viz.token_strip(rec, tokens, layers=[0, 1]), InputError, "layer 0", "[1, 2, 3]")
    refused(lambda: viz.token_strip(rec, tokens, layers=[]), InputError, "layers is empty")
    refused(lambda: viz.token_strip(rec, tokens, highlight=7), InputError, "layer 7")
    refused(lambda: viz.token_strip(rec, tokens, rank=5), InputError, "rank")
    refused(lambda: viz.token_strip(rec, tokens, torch.tensor([0, 9])), InputError, "rows", "row 9")
    refused(lambda: viz.token_strip(rec, tokens, per_line=0), InputError, "per_line")
    refused(lambda: viz.token_strip(rec, tokens, selected=6), InputError, "selected", "0 to 5")
    assert len(viz.png(viz.token_strip(rec, tokens, layers=[3], selected=5), dpi=20)) > 100  # valid: drawn


def test_co_selection_and_path_of_a_layer_or_row_that_is_not_there(rec):
    refused(lambda: viz.co_selection(rec, 0), InputError, "layer 0", "[1, 2, 3]")
    refused(lambda: viz.routing_path(rec, 60), InputError, "row 60", "6 tokens")
    refused(lambda: viz.path_table(rec, "0"), InputError, "row", "'0'")


def vl_hand_record(num_tokens=6, vision=(2, 3, 4, 5)):
    """A one-layer VL-like record: rows in ``vision`` routed by the vision group, the rest by the text group."""
    entry = LayerRouting(1, 4)
    modality = torch.tensor([VISION if i in vision else TEXT for i in range(num_tokens)])
    ids = torch.stack([torch.arange(num_tokens) % 4, (torch.arange(num_tokens) + 1) % 4], 1)
    entry.append(ids, torch.full((num_tokens, 2), 0.5), torch.full((num_tokens, 4), 0.25), modality)
    return RoutingRecord([entry])


def test_patch_overlay_wrong_grid_rows_image_and_selection():
    from PIL import Image

    rec, picture = vl_hand_record(), Image.new("RGB", (56, 56), "red")
    rows = torch.tensor([2, 3, 4, 5])
    refused(lambda: viz.patch_overlay(rec, picture, (3, 3), rows), InputError, "rows", "9 cells", "4 image rows")
    refused(lambda: viz.patch_overlay(rec, picture, (2,), rows), InputError, "grid", "routed.grid")
    refused(lambda: viz.patch_overlay(rec, picture, (2, 2), torch.tensor([0, 1, 2, 3])), InputError, "rows", "text")
    refused(lambda: viz.patch_overlay(rec, picture, (2, 2), torch.tensor([2, 3, 4, 8])), InputError, "rows", "row 8")
    refused(lambda: viz.patch_overlay(rec, None, (2, 2), rows), InputError, "image", "routed.image")
    refused(lambda: viz.patch_overlay(rec, torch.zeros(3, 56, 56), (2, 2), rows), InputError, "image", "Tensor")
    refused(lambda: viz.patch_overlay(rec, picture, (2, 2), rows, selected=4), InputError, "selected", "0 to 3")
    refused(lambda: viz.patch_overlay(rec, picture, (2, 2), rows, rank=2), InputError, "rank")
    assert len(viz.png(viz.patch_overlay(rec, picture, (2, 2), rows, selected=3), dpi=20)) > 100


def test_specialisation_picture_with_bad_labels_or_group():
    rec, rows = vl_hand_record(), torch.tensor([2, 3, 4, 5])
    refused(lambda: viz.specialisation(rec, rows, ["r", "g", "r", "g"]), InputError, "labels", "dict")
    refused(lambda: viz.specialisation(rec, rows, {}), InputError, "labels", "non-empty")
    refused(lambda: viz.specialisation(rec, rows, {"colour": ["r", "g"]}), InputError, "labels['colour']", "2 labels")
    refused(lambda: viz.specialisation(rec, rows, {"colour": list("rgrg")}, group=TEXT), InputError, "rows", "text")
    refused(lambda: viz.specialisation(rec, rows, {"colour": list("rgrg")}, group=5), InputError, "modality")
    refused(lambda: viz.specialisation(rec, rows, {"colour": list("rgrg")}, layer=4), InputError, "layer 4")
    assert viz.specialisation(rec, rows, {"colour": list("rgrg")})  # valid: drawn


def test_saturation_picture_without_steps_or_with_other_layers(rec):
    refused(lambda: viz.saturation([], rec), InputError, "step_records is empty")
    refused(lambda: viz.saturation([(0, vl_hand_record())], rec), InputError, "step_records[0]")


def test_png_of_what_is_not_a_figure_or_at_a_bad_dpi(rec):
    fig = viz.load_heatmap(rec)
    refused(lambda: viz.png(fig.axes[0]), InputError, "fig", "ax.figure")
    refused(lambda: viz.png("figure.png"), InputError, "fig", "str")
    refused(lambda: viz.png(fig, dpi=0), InputError, "dpi")
    refused(lambda: viz.png(fig, dpi="high"), InputError, "dpi")
    refused(lambda: viz.load_heatmap(rec, title=3), InputError, "title")


def test_route_with_a_tokenizer_that_is_not_one_or_a_dense_model(moe):
    refused(lambda: viz.route(moe, object(), "hi"), InputError, "tokenizer", "load_tokenizer")
    refused(lambda: viz.route(moe, "tokenizer", "hi"), InputError, "tokenizer", "str")
    refused(lambda: viz.route(moe, Tok(), ["hi"]), InputError, "prompt", "list")
    refused(lambda: viz.route(moe, Tok(), "hi", image=object()), InputError, "image", "text-only")
    refused(lambda: viz.route("model", Tok(), "hi"), InputError, "model", "load_model")
    torch.manual_seed(0)
    dense = ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(DENSE)).eval()
    calls = []
    dense.register_forward_hook(lambda *a: calls.append(1))
    refused(lambda: viz.route(dense, Tok(), "hi"), InputError, "no MoE layers")
    assert not calls  # refused before the model ran
    routed = viz.route(moe, Tok(), "hello")
    assert len(routed.tokens) == routed.record.num_tokens


def test_route_texts_given_one_string_or_nothing(moe):
    refused(lambda: viz.route_texts(moe, Tok(), "a whole text"), InputError, "texts", "list")
    refused(lambda: viz.route_texts(moe, Tok(), []), InputError, "texts")
    refused(lambda: viz.route_texts(moe, Tok(), ["fine", 3]), InputError, "texts[1]")
    refused(lambda: viz.records_over_training([(0, moe)], {"input_ids": torch.ones(1, 2, dtype=torch.long)}),
            InputError, "inputs", "list")


# ============================================================================ the explorer
def test_explorer_refuses_bad_arguments_before_building_anything(moe):
    pytest.importorskip("ipywidgets")
    make = widgets.RoutingExplorer
    refused(lambda: make("ERNIE-4.5-VL", Tok()), InputError, "model", "load_model")
    refused(lambda: make(torch.nn.Linear(2, 2), Tok()), InputError, "model", "Linear")
    torch.manual_seed(0)
    refused(lambda: make(ernie_lab.ErnieForCausalLM(ErnieConfig.from_dict(DENSE)), Tok()), InputError, "no MoE layers")
    refused(lambda: make(moe, object()), InputError, "tokenizer")
    refused(lambda: make(moe, Tok(), max_new_tokens=0), InputError, "max_new_tokens", "0")
    refused(lambda: make(moe, Tok(), max_new_tokens=2.5), InputError, "max_new_tokens")
    refused(lambda: make(moe, Tok(), image_size=0), InputError, "image_size", "28")
    refused(lambda: make(moe, Tok(), image_size="112"), InputError, "image_size")
    refused(lambda: make(moe, Tok(), dpi=-1), InputError, "dpi")
    refused(lambda: make(moe, Tok(), spec_scenes=0), InputError, "spec_scenes")
    refused(lambda: make(moe, Tok(), prompt=5), InputError, "prompt")
    refused(lambda: make(moe, Tok(), images={"a": "not a picture"}), InputError, "images['a']", "str")
    refused(lambda: make(moe, Tok(), images={}), InputError, "images", "non-empty")


def test_upload_that_is_not_a_picture_empty_or_too_large():
    from PIL import Image

    refused(lambda: widgets.upload_picture("notes.txt", b"hello, not a picture"), InputError, "notes.txt",
            "not a picture")
    refused(lambda: widgets.upload_picture("empty.png", b""), InputError, "empty.png", "empty")
    refused(lambda: widgets.upload_picture("none.png", None), InputError, "none.png", "empty")
    buffer = io.BytesIO()
    Image.new("RGB", (60, 40), "blue").save(buffer, format="PNG")
    refused(lambda: widgets.upload_picture("cut.png", buffer.getvalue()[:60]), InputError, "cut.png")
    huge = io.BytesIO()
    Image.new("1", (12000, 8000)).save(huge, format="PNG")  # 96 M pixels, a small file: refused from the header
    refused(lambda: widgets.upload_picture("huge.png", huge.getvalue()), InputError, "huge.png", "12000x8000",
            "scale it down")
    rgba = io.BytesIO()
    Image.new("RGBA", (30, 20), (0, 0, 0, 0)).save(rgba, format="PNG")
    picture = widgets.upload_picture("clear.png", memoryview(rgba.getvalue()))  # transparent: white, not black
    assert picture.mode == "RGB" and picture.getpixel((0, 0)) == (255, 255, 255)


def test_model_picture_and_shrink_of_what_is_not_a_picture():
    from PIL import Image

    refused(lambda: widgets.model_picture("cat.png"), InputError, "image", "PIL")
    refused(lambda: widgets.model_picture(Image.new("RGB", (9, 9)), size=-3), InputError, "image_size")
    refused(lambda: widgets.shrink(Image.new("RGB", (9, 9)), 0), InputError, "longest")
    assert widgets.model_picture(Image.new("L", (300, 200), 128)).size == (112, 112)


def test_draw_of_what_is_not_a_view_or_routed(rec):
    routed = viz.Routed(rec, torch.zeros(6), list("abcdef"), None, None, torch.zeros(0, dtype=torch.long),
                        torch.arange(6))
    refused(lambda: widgets.draw(routed, "token strip"), InputError, "view", "View(")
    refused(lambda: widgets.draw(rec, widgets.View()), InputError, "routed", "viz.route")
    refused(lambda: widgets.draw(routed, widgets.View(name="specialisation"), specialisation=(rec,)), InputError,
            "specialisation")
    # a negative position is clamped to the first token, as the slider would
    assert widgets.draw(routed, widgets.View(name="token strip", modality=TEXT, position=-3))


def test_upload_errors_show_in_the_explorer_and_leave_it_as_it_was(moe):
    pytest.importorskip("ipywidgets")
    explorer = widgets.RoutingExplorer(moe, Tok(), prompt="hi", max_new_tokens=1)
    options, routed = explorer.image_pick.options, explorer.routed
    explorer._on_upload({"new": ({"name": "notes.txt", "content": memoryview(b"plain text")},)})
    assert "notes.txt" in explorer.status.value and "not a picture" in explorer.status.value
    assert explorer.image_pick.options == options and explorer.routed is routed
    explorer._on_upload({"new": ({"name": "empty.png", "content": b""},)})
    assert "empty.png" in explorer.status.value and "empty" in explorer.status.value
    assert explorer.image_pick.options == options and explorer.routed is routed
    explorer._on_upload({"new": ()})  # the widget clearing itself: nothing happens
    explorer.layer.value = 2  # a good action clears the message
    assert explorer.status.value == ""


# ============================================================================ the family calculator
def test_family_configs_missing_negative_or_zero_fields():
    base = dict(family.CONFIG_0_3B)
    refused(lambda: family.count_params({k: v for k, v in base.items() if k != "hidden_size"}), ConfigError,
            "hidden_size")
    refused(lambda: family.count_params({**base, "num_hidden_layers": 0}), ConfigError, "num_hidden_layers")
    refused(lambda: family.count_params({**base, "vocab_size": -5}), ConfigError, "vocab_size", "-5")
    refused(lambda: family.count_params(None), ConfigError, "NoneType")
    refused(lambda: family.count_params("ERNIE-9B"), ConfigError, "ERNIE-9B", "published")
    assert family.count_params("ERNIE-4.5-0.3B").total == family.count_params(base).total  # a name reads as its config


def test_family_unknown_precisions_and_group_sizes():
    base = family.CONFIG_0_3B
    refused(lambda: family.weight_bytes(base, "fp64"), InputError, "fp64", "bf16")
    refused(lambda: family.weight_bytes(base, 16), InputError, "16")
    refused(lambda: family.weight_bytes(base, "int4", group_size=1.5), InputError, "group_size")
    refused(lambda: family.weight_bytes(base, "int4", group_size=True), InputError, "group_size")
    assert family.weight_bytes(base, "BF16") == family.weight_bytes(base, "bf16")


def test_gpus_needed_with_zero_memory_batch_or_context_and_wrong_types():
    base = family.CONFIG_21B_A3B
    refused(lambda: family.gpus_needed(base, "bf16", 0), InputError, "gpu_memory_gib", "> 0")
    refused(lambda: family.gpus_needed(base, "bf16", float("nan")), InputError, "gpu_memory_gib", "finite")
    refused(lambda: family.gpus_needed(base, "bf16", "80"), InputError, "gpu_memory_gib", "'80'")
    refused(lambda: family.gpus_needed(base, "bf16", "H100-80GB"), InputError, "memory_gib", "80")
    refused(lambda: family.gpus_needed(base, "bf16", 80, batch=0), InputError, "batch", "0")
    refused(lambda: family.gpus_needed(base, "bf16", 80, context_tokens=1.5), InputError, "context_tokens")
    refused(lambda: family.gpus_needed(base, "bf16", 80, reserve_fraction=1), InputError, "reserve_fraction")
    refused(lambda: family.gpus_needed(base, "fp3", 80), InputError, "fp3")
    assert family.gpus_needed(base, "bf16", 80, context_tokens=0) == family.gpus_needed(base, "bf16", 80)
    assert family.kv_cache_bytes(base, 0) == 0  # context 0: no cache, a correct answer


def test_compute_and_scale_out_arguments():
    moe = family.CONFIG_21B_A3B
    refused(lambda: family.mfu(float("nan"), 1, 1), InputError, "tokens_per_second")
    refused(lambda: family.mfu(1, "1", 1), InputError, "flops_per_token")
    refused(lambda: family.tokens_per_second_at_mfu(1.5, 1, 1), InputError, "mfu", "1.5")
    refused(lambda: family.flops_per_token(moe, float("inf")), InputError, "context_tokens")
    refused(lambda: family.training_flops_per_token(moe, 0), InputError, "seq_len")
    refused(lambda: family.ep_all_to_all_bytes(moe, 8, modality="image"), InputError, "modality", "image")
    refused(lambda: family.ep_all_to_all_bytes(moe, 8, modality="vision"), InputError, "vision", "VL")
    refused(lambda: family.ep_all_to_all_bytes(moe, 2.0), InputError, "ep_degree")
    refused(lambda: family.tp_all_reduce_bytes(moe, 2.5), InputError, "tp_degree", "integer")
    refused(lambda: family.kv_cache_bytes_per_token(moe, 0), InputError, "bytes_per_value")
    refused(lambda: family.ep_all_to_all_seconds(moe, 8, -5), InputError, "tokens_per_gpu")
    refused(lambda: family.ep_all_to_all_seconds(moe, 8, 5, gpus_per_node=0), InputError, "gpus_per_node")
    refused(lambda: family.ep_all_to_all_seconds(moe, 8, 5, accelerator=["H800"]), InputError, "accelerator")
    assert math.isclose(family.mfu(10, 2, 100), 0.2)


def test_a_vl_explorer_shows_a_bad_upload_and_keeps_its_picture():
    pytest.importorskip("ipywidgets")
    from ernie_lab import scenes, tiny_models
    from ernie_lab.course.notebook import repo_path
    from ernie_lab.model.config import parse_config

    tokenizer = ernie_lab.load_tokenizer(repo_path("data", "tiny-tokenizer"))
    torch.manual_seed(0)
    model = ernie_lab.architectures.build(parse_config(tiny_models.tiny_config(tiny_models.VL_CONFIG, tokenizer))).eval()
    explorer = widgets.RoutingExplorer(model, tokenizer, images={"one": scenes.render(scenes.random_scene(0))},
                                       max_new_tokens=1)
    options, routed, shown = explorer.image_pick.options, explorer.routed, explorer.snapshot()
    explorer._on_upload({"new": ({"name": "song.mp3", "content": memoryview(b"ID3\x03\x00 not a picture")},)})
    assert "song.mp3" in explorer.status.value and "not a picture" in explorer.status.value
    assert explorer.image_pick.options == options and explorer.routed is routed and explorer.snapshot() == shown

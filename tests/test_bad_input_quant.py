"""The bad-input catalogue of quantization: ``quant.quantize``, ``QuantLinear``, GPTQ calibration, quantized
checkpoints and quantize-on-read.

Each case asserts one outcome: the kit error class with a message naming the argument, batch, layer, file or
tensor; or the correct result. A refused ``quantize`` leaves the model exactly as it was (parameters,
buffers, module classes, ``quantization_config``); a refused load leaves the folder as it was.
"""

import copy
import hashlib
import json
import math
import shutil
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ernie_lab
from ernie_lab import architectures, quant
from ernie_lab.errors import CheckpointError, InputError
from ernie_lab.model.config import parse_config

H = "model.layers.0.self_attn.q_proj."   # the Hub names of one quantized layer's tensors
IDS = torch.tensor([[1, 17, 99, 5, 7, 3]])


def tiny_config(**overrides):
    raw = {"model_type": "ernie4_5", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
           "max_position_embeddings": 128, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0, **overrides}
    return parse_config(raw)


_BASE = {}


def tiny_model():
    """A fresh copy of one small random full-precision model (built once)."""
    if "model" not in _BASE:
        torch.manual_seed(0)
        model = architectures.build(tiny_config()).eval()
        for p in model.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.05)
        _BASE["model"] = model
    return copy.deepcopy(_BASE["model"])


def snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {name: type(m) for name, m in model.named_modules()},
            copy.deepcopy(getattr(model, "quantization_config", "absent")))


def assert_unchanged(model, before):
    tensors, classes, record = snapshot(model)
    assert classes == before[1], "a refused call swapped modules"
    assert tensors.keys() == before[0].keys()
    assert all(tensors[k].is_meta or same_bits(tensors[k], before[0][k]) for k in tensors), \
        "a refused call changed a tensor"


def same_bits(a, b):
    """Equal, NaN included (a NaN weight planted by a test must still be there)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                                                                     b.contiguous().reshape(-1).view(torch.uint8))
    assert record == before[2], "a refused call changed quantization_config"


def refused(model, call, error, *words):
    """``call(model)`` raises ``error`` naming every word and leaves ``model`` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(error) as info:
        call(model)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert_unchanged(model, before)
    return str(info.value)


def folder_digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def load_refused(folder, error, *words, **kwargs):
    before = folder_digest(folder)
    with pytest.raises(error) as info:
        ernie_lab.load_model(folder, **kwargs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert folder_digest(folder) == before, "a refused load changed the folder"
    return str(info.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(full-precision folder, w4a16 group-32 folder) of the tiny model."""
    root = tmp_path_factory.mktemp("quant-folders")
    ernie_lab.save_model(tiny_model(), root / "fp")
    ernie_lab.save_model(quant.quantize(tiny_model(), "w4a16", group_size=32), root / "q")
    return root / "fp", root / "q"


def edited(folder, tmp_path, *, config=None, tensors=None):
    """A copy of ``folder`` with config.json and / or the weights edited in place by the given functions."""
    copy_ = tmp_path / "edited"
    shutil.copytree(folder, copy_)
    if config is not None:
        raw = json.loads((copy_ / "config.json").read_text())
        config(raw)
        (copy_ / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        stored = load_file(copy_ / "model.safetensors")
        tensors(stored)
        save_file(stored, copy_ / "model.safetensors")
    return copy_


def entry(raw, name="layers.0.attn.q_proj"):
    return raw["quantization_config"]["modules"][name]


# ------------------------------------------------------------------------------ quantizing twice
def test_requantizing_with_another_scheme_is_refused_and_changes_nothing():
    model = quant.quantize(tiny_model(), "w8a16")
    message = refused(model, lambda m: quant.quantize(m, "w4a16"), InputError, "already quantized", "w8a16",
                      "layers.0.attn.q_proj", "reload")
    assert "w4a16" in message
    assert model.quantization_config["scheme"] == "w8a16"


def test_requantizing_with_another_group_or_symmetry_is_refused():
    model = quant.quantize(tiny_model(), "w4a16", group_size=32)
    refused(model, lambda m: quant.quantize(m, "w4a16", group_size=64), InputError, "already quantized", "group 32")
    refused(model, lambda m: quant.quantize(m, "w4a16", group_size=32, symmetric=False), InputError,
            "symmetric=True")


def test_repeating_the_same_quantize_is_a_no_op():
    model = quant.quantize(tiny_model(), "w4a16", group_size=32)
    before = snapshot(model)
    assert quant.quantize(model, "w4a16", group_size=32) is model
    assert_unchanged(model, before)


def test_mixed_precision_by_disjoint_filters_works_and_says_mixed(tmp_path):
    model = quant.quantize(tiny_model(), "w8a16", filter=r".*attn.*")
    quant.quantize(model, "w4a16", group_size=32, filter=r".*mlp.*")
    schemes = {name: layer.scheme for name, layer in quant.quantized_layers(model).items()}
    assert schemes["layers.0.attn.q_proj"] == "w8a16" and schemes["layers.0.mlp.up_proj"] == "w4a16"
    record = model.quantization_config
    assert record["scheme"] == "mixed" and record["modules"]["layers.0.attn.q_proj"]["scheme"] == "w8a16"
    ernie_lab.save_model(model, tmp_path / "mixed")
    loaded = ernie_lab.load_model(tmp_path / "mixed")
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_quantize_after_stream_linears_quantizes_the_streaming_layers():
    model = tiny_model()
    quant.stream_linears(model)
    quant.quantize(model, "w8a16")
    assert isinstance(model.layers[0].attn.q_proj, quant.QuantLinear)
    assert "layers.0.mlp.down_proj" in model.quantization_config["modules"]


# ------------------------------------------------------------------------------ quantize's arguments
@pytest.mark.parametrize("scheme,words", [("W4A16", ["'W4A16'", "did you mean 'w4a16'"]), ("int4", ["'int4'", "w4a16"]),
                                          (None, ["None"]), (["w4a16"], ["['w4a16']"])])
def test_unknown_or_misspelt_scheme_is_refused(scheme, words):
    refused(tiny_model(), lambda m: quant.quantize(m, scheme), InputError, "unknown quantization scheme", *words)


@pytest.mark.parametrize("group_size", [0, -32, 64.0, "64", True, None])
def test_bad_group_size_is_refused(group_size):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", group_size=group_size), InputError, "group_size",
            repr(group_size))


def test_a_small_group_that_divides_is_honoured_and_its_kernels_agree():
    model = quant.quantize(tiny_model(), "w4a16", group_size=16)
    layer = model.layers[0].attn.q_proj
    assert layer.group_size == 16 and model.quantization_config["modules"]["layers.0.attn.q_proj"]["group_size"] == 16
    x = torch.randn(3, 64)
    with torch.no_grad():
        fast = layer(x)
        with quant.reference_only():
            slow = layer(x)
    assert torch.allclose(fast, slow, atol=1e-2 * float(slow.abs().max()))


def test_a_group_that_does_not_divide_falls_back_as_documented():
    model = quant.quantize(tiny_model(), "w4a16", group_size=48)     # 48 divides neither 64 nor 128
    groups = {name: spec["group_size"] for name, spec in model.quantization_config["modules"].items()}
    layers = quant.quantized_layers(model)
    assert all(layers[name].in_features % g == 0 and layers[name].group_size == g for name, g in groups.items())


@pytest.mark.parametrize("argument", ["skip", "filter"])
def test_skip_or_filter_of_the_wrong_type_is_refused(argument):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", **{argument: 5}), InputError, "skip", "int")


def test_filter_that_is_not_a_regex_is_refused():
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", filter="layers.(["), InputError, "filter=",
            "regular expression")


@pytest.mark.parametrize("kwargs", [{"filter": "layers.0.attn"}, {"skip": "."}, {"filter": r"nothing\..*"}])
def test_a_choice_of_no_layer_is_refused_and_lists_the_linears(kwargs):
    message = refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", **kwargs), InputError,
                      "no linear layer", "layers.0.attn.q_proj", "fullmatch")
    assert repr(next(iter(kwargs.values()))) in message


def test_choosing_only_a_layer_kept_by_rule_warns_and_changes_nothing():
    model = tiny_model()                                 # its LM head is the embedding: never quantized
    before = snapshot(model)
    with pytest.warns(UserWarning, match="stay in full precision by rule"):
        assert quant.quantize(model, "w4a16", filter="lm_head", skip=()) is model
    assert_unchanged(model, before)


@pytest.mark.parametrize("symmetric", ["no", 0, 1.0])
def test_symmetric_of_the_wrong_type_is_refused(symmetric):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", symmetric=symmetric), InputError, "symmetric",
            repr(symmetric))


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8"])
def test_zero_points_on_an_8_bit_scheme_are_refused(scheme):
    # int8 codes have no zero point: an asymmetric scale would clip half of each row's range
    refused(tiny_model(), lambda m: quant.quantize(m, scheme, symmetric=False), InputError, scheme,
            "symmetric=False", "w4a16")


@pytest.mark.parametrize("damp", [-0.1, "0.01", float("nan"), None])
def test_bad_damp_is_refused(damp):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", damp=damp, calibration=[IDS]), InputError, "damp")


@pytest.mark.parametrize("thing,words", [("data/tiny-ernie-text", ["str", "load_model(folder, quantize="]),
                                         ({"weight": torch.zeros(2, 2)}, ["dict"]), (nn.ReLU(), ["no parameters"])])
def test_something_that_is_not_a_model_is_refused(thing, words):
    with pytest.raises(InputError) as info:
        quant.quantize(thing, "w4a16")
    assert all(word in str(info.value) for word in words), str(info.value)


def test_a_model_on_the_meta_device_is_refused():
    with torch.device("meta"):
        model = architectures.build(tiny_config())
    refused(model, lambda m: quant.quantize(m, "w4a16"), InputError, "meta", "load_model")


def test_nan_weights_are_refused_before_any_layer_is_swapped():
    model = tiny_model()
    model.layers[0].mlp.down_proj.weight.data[3, 5] = float("nan")   # the last layer quantize reaches
    refused(model, lambda m: quant.quantize(m, "w4a16"), InputError, "layers.0.mlp.down_proj.weight", "NaN", "skip=")


def test_an_ordinary_module_with_linears_is_quantized():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(2, 64)
    with torch.no_grad():
        expected = model(x)
    quant.quantize(model, "w8a16")
    assert isinstance(model[0], quant.QuantLinear) and isinstance(model[2], quant.QuantLinear)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=0.05 * float(expected.abs().max()))


# ------------------------------------------------------------------------------ GPTQ calibration
@pytest.mark.parametrize("calibration", [[], (), iter([])])
def test_empty_calibration_is_refused_not_silently_rounded(calibration):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=calibration), InputError,
            "calibration is empty", "round-to-nearest")


def test_nan_activations_in_calibration_name_the_batch_and_the_layer():
    model = tiny_model()
    model.embed.weight.data[99] = float("nan")      # token 99 (in the second batch) embeds as NaN
    message = refused(model, lambda m: quant.quantize(m, "w4a16", calibration=[IDS[:, :2], IDS]), InputError,
                      "calibration batch 1", "NaN", "layers.0.attn.q_proj")
    assert "Cholesky" not in message and "cholesky" not in message


def test_float_token_ids_in_calibration_are_refused():
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=[IDS, IDS.float() + 0.5]), InputError,
            "calibration batch 1", "torch.float32", "integers")


def test_calibration_ids_outside_the_vocabulary_name_the_batch():
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=[IDS, torch.tensor([[1, 4000]])]),
            InputError, "calibration batch 1", "4000", "vocabulary")


@pytest.mark.parametrize("batch", [torch.ones(2, 2, 3, dtype=torch.long), torch.ones(1, 0, dtype=torch.long),
                                   torch.tensor(5)])
def test_calibration_batches_of_the_wrong_shape_are_refused(batch):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=[batch]), InputError,
            "calibration batch 0", "shape", "(B, T)")


@pytest.mark.parametrize("calibration", ["some text", 5, {"input_ids": IDS}])
def test_calibration_that_is_not_a_list_of_batches_is_refused(calibration):
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=calibration), InputError,
            "calibration must be a list", "calibration=[ids]")


def test_calibration_batch_that_is_not_token_ids_is_refused():
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=[IDS, object()]), InputError,
            "calibration batch 1", "object", "token ids")


def test_calibration_dict_with_unknown_inputs_names_the_batch():
    refused(tiny_model(), lambda m: quant.quantize(m, "w4a16", calibration=[{"ids": IDS}]), InputError,
            "calibration batch 0", "'ids'", "input_ids")


def test_calibration_as_a_generator_or_one_dimensional_batches_works():
    expected = quant.quantize(tiny_model(), "w4a16", group_size=32, calibration=[IDS]).state_dict()
    got = quant.quantize(tiny_model(), "w4a16", group_size=32, calibration=(row for row in IDS)).state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_layers_no_calibration_token_reaches_are_named_in_a_warning():
    model = tiny_model()
    model.extra = nn.Linear(64, 64)       # a linear the forward never calls
    with pytest.warns(UserWarning, match=r"no calibration token reached 1 of 8 layers \(extra\)"):
        quant.quantize(model, "w4a16", group_size=32, calibration=[IDS])
    assert isinstance(model.extra, quant.QuantLinear)


# ------------------------------------------------------------------------------ QuantLinear
def layer(scheme="w4a16", **kwargs):
    torch.manual_seed(0)
    return quant.QuantLinear.from_linear(nn.Linear(64, 32), scheme, group_size=32, **kwargs)


@pytest.mark.parametrize("x,words", [(torch.ones(2, 64, dtype=torch.long), ["torch.int64", "floating-point"]),
                                     (torch.ones(2, 48), ["(2, 48)", "(..., 64)"]),
                                     (torch.ones(2, 64, device="meta"), ["on meta", "on cpu"]),
                                     ([0.0] * 64, ["list"]), (torch.tensor(1.0), ["()"])])
def test_quant_linear_refuses_inputs_it_cannot_multiply(x, words):
    with pytest.raises(InputError) as info:
        layer()(x)
    assert all(word in str(info.value) for word in words), str(info.value)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_quant_linear_computes_other_float_dtypes_in_that_dtype(dtype):
    ql = layer()
    x = torch.randn(3, 64)
    with torch.no_grad():
        y = ql(x.to(dtype))
        expected = x @ ql.dequantize().t() + ql.bias
    assert y.dtype == dtype
    assert torch.allclose(y.float(), expected, atol=2e-2 * float(expected.abs().max()))


def state_refused(ql, state, *words, strict=True):
    before = {k: v.clone() for k, v in ql.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        ql.load_state_dict(state, strict=strict)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert all(torch.equal(before[k], v) for k, v in ql.state_dict().items())


def test_state_dict_of_another_shape_is_refused():
    other = quant.QuantLinear.from_linear(nn.Linear(128, 32), "w4a16", group_size=32).state_dict()
    state_refused(layer(), other, "qweight", "(32, 64)", "(32, 32)")


def test_state_dict_with_signed_codes_is_refused_not_cast():
    ql = layer()
    state = {**ql.state_dict(), "qweight": ql.qweight.view(torch.int8).clone()}
    state_refused(ql, state, "qweight", "torch.int8", "torch.uint8")


def test_state_dict_with_nan_scales_is_refused():
    ql = layer()
    scales = ql.scales.clone()
    scales[0, 0] = float("nan")
    state_refused(ql, {**ql.state_dict(), "scales": scales}, "scales", "NaN")


def test_state_dict_with_zero_points_for_a_symmetric_layer_is_refused():
    ql = layer()
    state_refused(ql, {**ql.state_dict(), "zeros": torch.zeros(32, 2, dtype=torch.uint8)}, "zeros", "symmetric")


def test_state_dict_with_zero_points_off_the_grid_is_refused():
    ql = layer("w2a16", symmetric=False)
    zeros = ql.zeros.clone()
    zeros[0, 0] = 9                                    # a 2-bit grid is 0..3
    state_refused(ql, {**ql.state_dict(), "zeros": zeros}, "zeros", "[0, 3]")


def test_state_dict_of_another_scheme_into_a_quantized_model_names_the_tensor():
    target = quant.quantize(tiny_model(), "w4a16", group_size=32)
    state = quant.quantize(tiny_model(), "w8a16").state_dict()
    with pytest.raises(CheckpointError, match=r"layers\.0\.attn\.q_proj\.qweight"):
        target.load_state_dict(state)


@pytest.mark.parametrize("kwargs,words", [
    (dict(in_features=63, out_features=8, scheme="w4a16", group_size=63), ["63", "multiple of 2"]),
    (dict(in_features=64, out_features=8, scheme="w8a16", symmetric=False), ["w8a16", "symmetric=False"]),
    (dict(in_features=64, out_features=0, scheme="w8a16"), ["out_features", "0"]),
    (dict(in_features=64, out_features=8, scheme="w4a16", group_size=48), ["group_size 48", "64"]),
    (dict(in_features=64, out_features=8, scheme="w4a16", symmetric="yes"), ["symmetric", "'yes'"]),
])
def test_quant_linear_constructor_refuses_layouts_it_cannot_hold(kwargs, words):
    with pytest.raises(InputError) as info:
        quant.QuantLinear(**kwargs)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_quant_linear_default_group_and_from_a_non_linear():
    assert quant.QuantLinear(256, 8, "w4a16").group_size == 128
    with pytest.raises(InputError, match="nn.Linear, got Conv1d"):
        quant.QuantLinear.from_linear(nn.Conv1d(4, 4, 1), "w4a16")


# ------------------------------------------------------------------------------ quantized checkpoints
def test_codes_without_a_quantization_config_are_refused(folders, tmp_path):
    folder = edited(folders[1], tmp_path, config=lambda raw: raw.pop("quantization_config"))
    load_refused(folder, CheckpointError, "qweight", "no quantization_config", "Restore")


@pytest.mark.parametrize("record,words", [("w4a16", ["quantization_config is a str"]),
                                          ({"quant_method": "gptq", "bits": 4}, ["'gptq'", "another tool"]),
                                          ({"quant_method": "ernie-lab", "modules": {}}, ["'modules'"]),
                                          ({"quant_method": "ernie-lab"}, ["'modules'"])])
def test_garbled_quantization_config_is_refused(folders, tmp_path, record, words):
    folder = edited(folders[1], tmp_path, config=lambda raw: raw.__setitem__("quantization_config", record))
    load_refused(folder, CheckpointError, *words)


@pytest.mark.parametrize("name,spec,words", [
    ("layers.0.attn.q_proj", "w4a16", ["'layers.0.attn.q_proj'", "known scheme"]),
    ("layers.9.attn.q_proj", {"scheme": "w4a16"}, ["'layers.9.attn.q_proj'", "does not have"]),
    ("norm", {"scheme": "w4a16"}, ["'norm'", "not a linear layer"]),
    ("lm_head", {"scheme": "w4a16", "group_size": 32}, ["'lm_head'", "tied"]),
    ("layers.0.attn.q_proj", {"scheme": "w4a16", "group_size": "abc", "symmetric": True}, ["group_size", "'abc'"]),
    ("layers.0.attn.q_proj", {"scheme": "w4a16", "group_size": 32, "symmetric": "yes"}, ["symmetric", "'yes'"]),
    ("layers.0.attn.q_proj", {"scheme": "w4a16", "group_size": 48, "symmetric": True}, ["group_size 48"]),
])
def test_bad_module_entries_name_the_entry(folders, tmp_path, name, spec, words):
    folder = edited(folders[1], tmp_path,
                    config=lambda raw: raw["quantization_config"]["modules"].__setitem__(name, spec))
    load_refused(folder, CheckpointError, *words)


@pytest.mark.parametrize("edit,words", [
    (lambda t: t.pop(H + "qweight"), ["missing", H + "qweight"]),
    (lambda t: t.__setitem__(H + "zeros", torch.zeros(64, 2, dtype=torch.uint8)), ["no place for", H + "zeros"]),
    (lambda t: t.__setitem__(H + "scales", t[H + "scales"][:, :1].contiguous()), ["wrong shapes", H + "scales"]),
    (lambda t: t.__setitem__(H + "scales", t[H + "scales"].bfloat16()), ["layers.0.attn.q_proj.scales", "bfloat16"]),
    (lambda t: t[H + "scales"].__setitem__((2, 1), float("inf")), ["layers.0.attn.q_proj.scales", "NaN or Inf"]),
    (lambda t: t.__setitem__(H + "qweight", t[H + "qweight"].to(torch.int32)), [H + "qweight", "I32"]),
])
def test_bad_stored_codes_name_the_tensor(folders, tmp_path, edit, words):
    load_refused(edited(folders[1], tmp_path, tensors=edit), CheckpointError, *words)


def test_a_config_naming_another_scheme_than_the_codes_is_refused(folders, tmp_path):
    folder = edited(folders[1], tmp_path, config=lambda raw: entry(raw).__setitem__("scheme", "w8a16"))
    load_refused(folder, CheckpointError, "wrong shapes", H + "qweight")


# ------------------------------------------------------------------------------ quantize-on-read
@pytest.mark.parametrize("kwargs,words", [
    (dict(quantize="w4"), ["quantize='w4'", "unknown quantization scheme"]),
    (dict(quantize="w4a16", group_size=0), ["group_size", "0"]),
    (dict(quantize="w4a16", group_size="64"), ["group_size", "'64'"]),
    (dict(group_size=64), ["group_size=64", "quantize="]),
    (dict(quantize="fp8"), ["fp8", "CUDA"]),
])
def test_quantize_on_read_arguments_are_checked_first(folders, kwargs, words):
    load_refused(folders[0], InputError, *words, **kwargs)


def test_quantize_on_read_of_a_quantized_folder_is_refused(folders):
    load_refused(folders[1], CheckpointError, "already quantized", "without quantize=", quantize="w8a16")


def test_quantize_on_read_of_nan_weights_names_the_tensor(folders, tmp_path):
    folder = edited(folders[0], tmp_path, tensors=lambda t: t[H + "weight"].__setitem__((0, 0), float("nan")))
    load_refused(folder, CheckpointError, "layers.0.attn.q_proj.weight", "NaN", quantize="w4a16")


def test_quantize_on_read_default_group_equals_quantize_after_loading(folders):
    on_read = ernie_lab.load_model(folders[0], quantize="w2a16")
    after = quant.quantize(ernie_lab.load_model(folders[0]), "w2a16")
    a, b = on_read.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on_read.quantization_config == after.quantization_config

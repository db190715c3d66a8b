"""W4A8: int4 weights (w4a16's codes) meeting activations rounded to int8 per block of 32 inputs.

The C kernel (``gemv.c``, ``native.int8_int4``) against the plain reference (``QuantLinear.reference``:
round x per block, dequantize both, matmul); the C's rounding against ``formats``' bit for bit; the
portable C where AVX2 is missing; the scheme's checks; checkpoints, quantize-on-read and GPTQ."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import ernie_lab
from ernie_lab import quant
from ernie_lab.errors import CheckpointError, InputError
from ernie_lab.quant import formats, kernels, native
from ernie_lab.quant.linear import QuantLinear

from conftest import micro_model, refused

needs_native = pytest.mark.skipif(not native.available(), reason="the kit's C kernels could not be built here")


def w4a8_layer(K, N, group, symmetric=True, bias=False, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(K, N, bias=bias), "w4a8", group_size=group, symmetric=symmetric)


# ------------------------------------------------------------------ rounding the activations
def test_activations_round_per_block_half_to_even():
    block = torch.zeros(32)
    block[:6] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -3.5])      # s = 127 / 127 = 1: exact ties
    x = torch.cat([block, torch.zeros(32), torch.full((32,), -2.0)])[None]     # (1, 96): three blocks
    xq, xs = formats.quantize_activations_blocks(x)
    assert xq.dtype == torch.int8 and xq.shape == (1, 96) and xs.shape == (1, 3)
    assert xq[0, :6].tolist() == [127, 0, 2, 2, 0, -4]                 # half to even, as torch.round
    assert xs[0].tolist() == [1.0, pytest.approx(1e-12), pytest.approx(2 / 127)] and not xq[0, 32:64].any()
    assert xq[0, 64:].tolist() == [-127] * 32
    back = formats.dequantize_activations_blocks(xq, xs)
    assert float((back - x).abs().max()) <= 0.5                        # half a step of the largest block


@needs_native
def test_the_c_rounds_activations_exactly_as_the_reference():
    torch.manual_seed(1)
    x = torch.randn(5, 1024) * torch.logspace(-6, 3, 5)[:, None]       # rows of very different sizes
    x[0, :32] = 0.0                                                    # an all-zero block
    x[1, 32:64] = torch.arange(32) - 15.5                              # ties at s = 16.5 / 127 ... of its own
    x[2, 64:96] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -3.5] + [0.0] * 26)
    expected, got = formats.quantize_activations_blocks(x), native.quantize_blocks(x)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ------------------------------------------------------------------ the kernel against the reference
@needs_native
@pytest.mark.parametrize("K,N,group", [(64, 16, 32), (256, 48, 64), (1024, 100, 128), (96, 24, 96), (512, 256, 512), (256, 50, 64), (128, 7, 128)])
@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "zero-points"])
def test_the_kernel_equals_the_reference(K, N, group, symmetric):
    """M = 1..4 rows, with and without a bias, fp32 and bf16 activations; 1024 x 100 and 512 x 256 are large
    enough for the threaded loop."""
    for bias in (False, True):
        layer = w4a8_layer(K, N, group, symmetric, bias, seed=K + N)
        with torch.no_grad():
            for M in (1, 2, 3, 4):
                x = torch.randn(M, K) * 3
                assert kernels.choose(layer, x).name == "native_w4a8"
                expected, got = layer.reference(x), layer(x)
                assert got.shape == (M, N) and got.dtype == torch.float32
                assert float((got - expected).abs().max()) <= 2e-6 * float(expected.abs().max()) + 1e-6
            x = torch.randn(2, K, dtype=torch.bfloat16)
            expected, got = layer.reference(x), layer(x)
            assert got.dtype == torch.bfloat16
            assert torch.allclose(got.float(), expected.float(), rtol=2 ** -7, atol=2 ** -7 * float(expected.abs().max()))


@needs_native
def test_the_zero_point_term_is_the_codes_own():
    """Symmetric layers use z = 8; with zero points every group has its own z, and both meet the same x."""
    torch.manual_seed(2)
    layer = w4a8_layer(128, 8, 32, symmetric=False)
    layer.zeros.copy_(torch.randint(0, 16, layer.zeros.shape, dtype=torch.uint8))   # z all over the grid
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.reference(x), rtol=1e-5, atol=1e-5)


@needs_native
def test_a_prompt_goes_through_the_dequantizer_and_one_gemm():
    layer = w4a8_layer(256, 64, 64, symmetric=False)
    x = torch.randn(3, 7, 256)                                         # 21 rows: longer than native.MAX_ROWS
    with torch.no_grad():
        assert kernels.choose(layer, x).name == "native_w4a8_gemm"
        assert torch.allclose(layer(x), layer.reference(x), rtol=1e-5, atol=1e-5)
        with native.off():
            assert kernels.choose(layer, x[:, :1]).name == "reference"


@needs_native
@pytest.mark.parametrize("dtype_in", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype_out", [torch.float32, torch.bfloat16])
def test_the_c_rounds_a_prompts_rows_and_back_as_the_reference(dtype_in, dtype_out):
    """native.round_blocks (one pass) gives bit for bit what formats' rounding and its inverse give, for
    rows of any scale, a block of zeros among them."""
    torch.manual_seed(3)
    for M, K in [(1, 32), (7, 256), (300, 1024)]:
        x = (torch.randn(M, K) * torch.rand(M, K // 32).repeat_interleave(32, 1) * 10).to(dtype_in)
        x[0, :32] = 0
        xq, xs = formats.quantize_activations_blocks(x)
        expected = formats.dequantize_activations_blocks(xq, xs).to(dtype_out)
        assert torch.equal(native.round_blocks(x, dtype_out), expected), (M, K)
    with pytest.raises(ValueError, match="multiple of 32"):
        native.round_blocks(torch.randn(2, 48))


@needs_native
def test_a_bf16_prompt_runs_in_bf16_like_the_weight_only_schemes():
    """A bf16 prompt's GEMM runs in bf16 (the rows rounded per block, then as bf16; the weight as bf16), the
    reference too; with a gradient wanted, PyTorch's rounding serves so the gradient reaches x."""
    layer = w4a8_layer(256, 64, 64, symmetric=False, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 9, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        xq, xs = formats.quantize_activations_blocks(x.reshape(-1, 256))
        rows = formats.dequantize_activations_blocks(xq, xs).to(torch.bfloat16)
        weight = layer.dequantize().to(torch.bfloat16)
        expected = ((rows @ weight.t()) + layer.bias.float()).to(torch.bfloat16).reshape(2, 9, 64)
        assert torch.equal(layer.reference(x), expected)
        assert torch.equal(layer(x), expected)                        # the C's rounding and dequantizer
    x.requires_grad_(True)
    layer(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_training_keeps_the_reference_path():
    """The C has no autograd: a bias being trained takes the reference, whose gradient reaches it."""
    layer = w4a8_layer(64, 16, 32, bias=True)
    x = torch.randn(1, 64)
    assert kernels.choose(layer, x).name != "native_w4a8"
    layer(x).sum().backward()
    assert torch.equal(layer.bias.grad, torch.ones(16))


@pytest.mark.skipif(sys.platform != "linux" or not native.available(), reason="needs the kit's C build")
def test_the_portable_c_without_avx2_agrees(tmp_path):
    """gemv.c built without -march=native (so without AVX2): its scalar W4A8 loop gives the same answers, its
    scalar dequantizer the same weights."""
    script = textwrap.dedent("""
        import torch
        from torch import nn
        from ernie_lab.quant import QuantLinear, formats, native
        native.FLAGS = [f for f in native.FLAGS if f != "-march=native"]
        assert native.info()["avx2"] is False, native.info()
        torch.manual_seed(0)
        worst = 0.0
        for K, N, G, symmetric in [(64, 16, 32, True), (256, 48, 64, False), (96, 8, 96, False)]:
            layer = QuantLinear.from_linear(nn.Linear(K, N), "w4a8", group_size=G, symmetric=symmetric)
            x = torch.randn(3, K)
            with torch.no_grad():
                expected = layer.reference(x)
                worst = max(worst, float((layer(x) - expected).abs().max() / expected.abs().max()))
            assert torch.equal(native.quantize_blocks(x)[0], formats.quantize_activations_blocks(x)[0])
            xs, _, t = native.prepare_int16(x[0].contiguous(), G, 2)   # the scalar int16 rounding, as the AVX2 one
            v = x[0].reshape(-1, G) / t[:, None]
            q = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5)).to(torch.int16).reshape(-1)
            assert torch.equal(xs, torch.cat([q[0::2], q[1::2]]))
            for dtype in (torch.float32, torch.bfloat16):   # the scalar dequantizer, as the AVX2 one
                assert torch.equal(native.dequantize(layer.qweight, layer.scales, layer.zeros, 4, G, dtype),
                                   layer.dequantize().to(dtype))
        print(worst)
    """)
    env = {**os.environ, "ERNIE_LAB_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) <= 2e-6


# ------------------------------------------------------------------ the scheme's checks
def test_groups_and_widths_must_hold_whole_activation_blocks(tmp_path):
    refused(lambda: QuantLinear(64, 16, "w4a8", group_size=48), InputError, "group_size 48", "multiple of 32")
    refused(lambda: QuantLinear(48, 16, "w4a8", group_size=48), InputError, "in_features 48", "multiple of 32")
    model = micro_model()
    refused(lambda: quant.quantize(model, "w4a8", group_size=16), InputError, "group_size 16", "multiple of 32")
    assert not quant.quantized_layers(model)                            # refused before anything changed
    ernie_lab.save_model(model, tmp_path, tokenizer=False)
    refused(lambda: ernie_lab.load_model(tmp_path, quantize="w4a8", group_size=80), InputError, "quantize='w4a8'",
            "multiple of 32")


def test_layers_whose_width_is_not_a_multiple_of_32_stay_in_full_precision():
    model = micro_model(intermediate_size=48)                           # down_proj reads 48 inputs
    plan = quant.plan_layers(model, "w4a8", group_size=32)
    assert "layers.0.mlp.up_proj" in plan and "layers.0.mlp.down_proj" not in plan
    quant.quantize(model, "w4a8", group_size=32)
    assert isinstance(model.layers[0].mlp.up_proj, QuantLinear) and type(model.layers[0].mlp.down_proj) is nn.Linear


def test_bad_inputs_are_refused():
    layer = w4a8_layer(64, 16, 32)
    refused(lambda: layer(torch.randint(0, 9, (1, 64))), InputError, "floating-point", "(..., 64)")
    refused(lambda: layer(torch.randn(1, 32)), InputError, "(1, 32)")
    refused(lambda: QuantLinear(64, 16, "w4a9"), InputError, "w4a9", "'w4a8'")
    bad = {"qweight": torch.zeros(16, 32, dtype=torch.int8), "scales": layer.scales}
    refused(lambda: layer.load_state_dict(bad), CheckpointError, "qweight", "torch.uint8")


# ------------------------------------------------------------------ models and checkpoints
def test_w4a8_stores_what_w4a16_stores():
    model = micro_model()
    w4a8 = quant.quantize(micro_model(), "w4a8", group_size=32)
    w4a16 = quant.quantize(model, "w4a16", group_size=32)
    assert quant.weight_bytes(w4a8) == quant.weight_bytes(w4a16)
    a, b = w4a8.layers[0].mlp.up_proj, w4a16.layers[0].mlp.up_proj
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.scales, b.scales)   # the same codes


def test_gptq_checkpoint_with_zero_points_reloads_bit_exactly(tmp_path):
    model = micro_model()
    calibration = [torch.randint(3, 64, (2, 16)) for _ in range(2)]
    rtn = quant.quantize(micro_model(), "w4a8", group_size=32, symmetric=False)
    quant.quantize(model, "w4a8", group_size=32, symmetric=False, calibration=calibration)
    assert not torch.equal(model.layers[0].attn.q_proj.qweight, rtn.layers[0].attn.q_proj.qweight)   # GPTQ ran
    ids = torch.randint(3, 64, (1, 9))
    with torch.no_grad():
        logits = model(ids).logits
    ernie_lab.save_model(model, tmp_path, tokenizer=False)
    record = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (record["scheme"], record["symmetric"], record["group_size"]) == ("w4a8", False, 32)
    loaded = ernie_lab.load_model(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.layers[0].attn.q_proj.scheme == "w4a8"
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, logits)


def test_quantize_on_read_equals_quantize_after_loading(tmp_path):
    ernie_lab.save_model(micro_model(), tmp_path, tokenizer=False)
    on_read = ernie_lab.load_model(tmp_path, quantize="w4a8", group_size=32)
    after = quant.quantize(ernie_lab.load_model(tmp_path), "w4a8", group_size=32)
    a, b = on_read.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert on_read.quantization_config["scheme"] == "w4a8"

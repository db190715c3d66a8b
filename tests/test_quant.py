"""ernie_lab.quant: number formats, packing, kernels against the dequantize reference, GPTQ, quantized
models and checkpoints, quantize-on-read memory, the int8 KV cache."""

import contextlib
import copy
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ernie_lab
from ernie_lab import architectures, quant
from ernie_lab.model.config import parse_config
from ernie_lab.errors import CheckpointError, InputError
from ernie_lab.model.kv_cache import Int8KVCache, KVCache
from ernie_lab.quant import formats
from ernie_lab.quant.gptq import gptq_quantize

WEIGHT_ONLY = ["w8a16", "w4a16", "w2a16"]
CPU_SCHEMES = ["w8a16", "w4a16", "w2a16", "w8a8", "w4a8"]


def text_config(**overrides):
    raw = {"model_type": "ernie4_5", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 384,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
           "max_position_embeddings": 256, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0, **overrides}
    return parse_config(raw)


def random_model(config, seed=0, std=0.05):
    torch.manual_seed(seed)
    model = architectures.build(config).eval()
    for name, p in model.named_parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=std)
    return model


def moe_model():
    return random_model(text_config(model_type="ernie4_5_moe", moe_num_experts=4, moe_k=2, moe_intermediate_size=128,
                                    moe_num_shared_experts=1, moe_layer_start_index=1))


# ------------------------------------------------------------------------------ formats, packing
@pytest.mark.parametrize("bits", [2, 4])
def test_packing_round_trips_and_puts_the_first_column_high(bits):
    codes = torch.randint(0, 2 ** bits, (5, 32), dtype=torch.uint8)
    packed = formats.pack(codes, bits)
    assert packed.shape == (5, 32 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(formats.unpack(packed, bits), codes)
    byte = formats.pack(torch.tensor([[1, 2, 3, 0][: 8 // bits] if bits == 2 else [1, 2]], dtype=torch.uint8), bits)
    assert byte.item() == (0b01101100 if bits == 2 else 0x12)


@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False), (2, False), (2, True)])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, symmetric):
    torch.manual_seed(1)
    w = torch.randn(16, 256) * torch.logspace(-2, 0, 16)[:, None]     # rows of very different sizes
    q = formats.quantize_weight(w, bits, 64 if bits < 8 else 256, symmetric)
    err = (formats.dequantize_weight(q, bits) - w).abs().reshape(16, q.scales.shape[1], -1)
    assert bool((err <= q.scales[..., None] / 2 + 1e-6).all())
    assert float((err.amax(-1) / q.scales).amax()) > 0.3               # the bound is nearly reached: not vacuous


def test_known_values_land_on_the_grid():
    w = torch.tensor([[-7.0, -3, 0, 2, 4, 7, 5, -2]]) / 7
    q = formats.quantize_weight(w, 4, 8, symmetric=True)               # s = 1/7
    assert torch.allclose(q.scales, torch.tensor([[1 / 7]]))
    assert q.codes.tolist() == [[1, 5, 8, 10, 12, 15, 13, 6]]          # u = round(7 w) + 8
    a = formats.quantize_weight(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 4, symmetric=False)
    assert a.zeros.item() == 0 and a.codes.tolist() == [[0, 1, 2, 3]]  # 2-bit grid {0, 1, 2, 3} * 1
    assert torch.equal(formats.dequantize_weight(a, 2), torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


def test_fp8_format_has_three_mantissa_bits():
    w = torch.randn(8, 64)
    values, scale = formats.quantize_fp8(w)
    rel = (formats.dequantize_fp8(values, scale) - w).abs() / w.abs().clamp(min=scale * 2 ** -6)
    assert values.dtype == torch.float8_e4m3fn and float(rel.max()) <= 2 ** -4 + 1e-6


# ------------------------------------------------------------------------------ kernels vs reference
@pytest.mark.parametrize("scheme,symmetric", [("w8a16", True), ("w4a16", True), ("w4a16", False),
                                              ("w2a16", False), ("w8a8", True), ("w4a8", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("streaming", [True, False], ids=["native", "torch-kernels"])
def test_every_kernel_equals_the_dequantize_reference(scheme, symmetric, dtype, streaming):
    torch.manual_seed(0)
    linear = nn.Linear(256, 192, bias=True).to(dtype)
    layer = quant.QuantLinear.from_linear(linear, scheme, group_size=64, symmetric=symmetric)
    use = contextlib.nullcontext() if streaming else quant.native.off()
    with use, torch.no_grad():                                  # as in generation
        for rows in (1, 5):                                     # 3 rows (decode-sized) and 15 rows (prefill)
            x = torch.randn(rows, 3, 256, dtype=dtype)
            with quant.reference_only():
                expected = layer(x)
            got = layer(x)
            assert got.dtype == dtype and got.shape == (rows, 3, 192)
            tol = 2e-2 * float(expected.float().abs().max())
            assert float((got.float() - expected.float()).abs().max()) <= tol
            kernel = quant.kernels.choose(layer, x).name
            native = streaming and quant.native.available()
            if scheme == "w4a8":
                assert kernel == ("reference" if not native else "native_w4a8" if rows == 1 else "native_w4a8_gemm")
            elif rows == 1 and native and scheme != "w8a8":
                assert kernel == "native_gemv"                  # the kit's own decode kernel ran
            elif scheme == "w8a8":
                assert kernel == ("native_int8_int8" if rows == 1 and native else "int_mm")
            elif scheme in ("w8a16", "w4a16", "w2a16") and native:
                assert kernel == "native_dequantize"            # the kit's dequantizer, then one GEMM
            elif scheme == "w2a16":
                assert kernel == "reference"                    # no PyTorch kernel: the reference path
            else:
                assert kernel == {"w8a16": "int8_weight_only", "w4a16": "int4_cpu"}[scheme]


@pytest.mark.skipif(not quant.native.available(), reason="the kit's C kernels could not be built here")
@pytest.mark.parametrize("scheme,symmetric,group", [("w8a16", True, 64), ("w4a16", True, 16), ("w4a16", False, 32),
                                                    ("w4a16", False, 128), ("w2a16", False, 64), ("w4a8", False, 64)])
def test_the_c_dequantizer_writes_the_layers_own_weight(scheme, symmetric, group):
    """native.dequantize (eight or sixteen weights a step where AVX2 is there) writes exactly the weight the
    layer's plain dequantize gives, as fp32 and as bf16; into a caller's buffer too."""
    torch.manual_seed(4)
    layer = quant.QuantLinear.from_linear(nn.Linear(256, 40), scheme, group_size=group, symmetric=symmetric)
    expected = layer.dequantize()                                                    # (N, K) fp32
    for dtype in (torch.float32, torch.bfloat16):
        got = quant.native.dequantize(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, dtype)
        assert torch.equal(got, expected.to(dtype)), dtype
        buffer = torch.full((50 * 256,), float("nan"), dtype=dtype)
        into = quant.native.dequantize(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size, dtype,
                                       out=buffer)
        assert into.shape == (40, 256) and into.data_ptr() == buffer.data_ptr() and torch.equal(into, got)
    with pytest.raises(ValueError, match="at least 10240"):
        quant.native.dequantize(layer.qweight, layer.scales, layer.zeros, layer.bits, layer.group_size,
                                torch.float32, out=torch.empty(100))


@pytest.mark.skipif(not quant.native.available(), reason="the kit's C kernels could not be built here")
@pytest.mark.parametrize("group,phases", [(128, 1), (128, 2), (64, 2), (32, 4), (24, 1), (12, 2)])
def test_the_c_rounds_decode_rows_to_int16_as_pytorch_does(group, phases):
    """The int16 kernels' rounding of a decode row (eight lanes a step where AVX2 is there, the scalar loop
    for groups not a multiple of 8), against the same arithmetic in PyTorch: per group t = max|x| / 32767,
    q = trunc(x / t + 0.5 sign), stored by phase; ties, zeros and a zero group included."""
    torch.manual_seed(6)
    K = 384
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(K) * scale
        x[:group] = 0                                                   # a group of zeros: t = 1
        x[group:2 * group] = torch.round(x[group:2 * group] * 8) / 8     # many values on a tie
        xs, sums, scales = quant.native.prepare_int16(x, group, phases)
        top = x.reshape(-1, group).abs().amax(-1)
        t = torch.where(top > 0, top / 32767, torch.ones_like(top))                          # (K/G,)
        v = x.reshape(-1, group) / t[:, None]
        q = torch.trunc(v + torch.where(v >= 0, 0.5, -0.5)).to(torch.int16).reshape(K)      # (K,)
        assert torch.equal(scales, t) and torch.equal(sums, q.reshape(-1, group).sum(-1, dtype=torch.int32))
        assert torch.equal(xs, torch.cat([q[p::phases] for p in range(phases)])), (scale, group, phases)


@pytest.mark.skipif(not quant.native.available(), reason="the kit's C kernels could not be built here")
def test_a_prompt_reuses_one_buffer_only_without_a_gradient():
    """Without a gradient a prompt's dequantized weights share one buffer (its GEMM has consumed each before
    the next is written): two layers in turn still give their own answers. With a gradient each weight is its
    own tensor, so what backward keeps is the right weight, and x's gradient is exact."""
    torch.manual_seed(5)
    first, second = (quant.QuantLinear.from_linear(nn.Linear(128, 128), "w4a16", group_size=32) for _ in range(2))
    x = torch.randn(20, 128)
    with torch.no_grad():
        expected = x @ first.dequantize().t() + first.bias
        expected = expected @ second.dequantize().t() + second.bias
        assert quant.kernels.choose(first, x).name == "native_dequantize"
        assert torch.allclose(second(first(x)), expected, rtol=1e-5, atol=1e-5)
        buffers = quant.kernels._scratch.buffers
        assert any(b.numel() >= 128 * 128 for b in buffers.values())
    x.requires_grad_(True)
    second(first(x)).sum().backward()
    with torch.no_grad():
        wanted = second.dequantize().sum(0) @ first.dequantize()        # d/dx of sum(W2 (W1 x + b1) + b2)
    assert torch.allclose(x.grad, wanted.expand(20, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme,symmetric", [("w8a16", True), ("w4a16", True), ("w4a16", False),
                                              ("w2a16", False), ("w8a8", True), ("w4a8", True), ("fp8", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_here_agrees_with_the_reference(scheme, symmetric, dtype):
    """Every entry of the kernel table that applies on this machine, run directly (whatever the table's
    order would pick), at a decode shape (1 row) and a prompt shape (14 rows)."""
    devices = [d for d in ("cpu", "cuda") if d == "cpu" or torch.cuda.is_available()]
    if scheme == "fp8" and "cuda" not in devices:
        pytest.skip("fp8 runs on CUDA only")
    ran = set()
    for device in devices if scheme != "fp8" else ["cuda"]:
        torch.manual_seed(0)
        linear = nn.Linear(256, 192, bias=True).to(device, dtype)
        layer = quant.QuantLinear.from_linear(linear, scheme, group_size=64, symmetric=symmetric)
        with torch.no_grad():
            for shape in ((1, 256), (2, 7, 256)):
                x = torch.randn(*shape, dtype=dtype, device=device)
                expected = layer.reference(x)
                tol = 2e-2 * float(expected.float().abs().max())
                for kernel in quant.kernels.KERNELS:
                    if kernel.applies(layer, x):
                        got = kernel.run(layer, x)
                        assert got.dtype == dtype and got.shape == expected.shape, kernel.name
                        assert float((got.float() - expected.float()).abs().max()) <= tol, (kernel.name, shape)
                        ran.add(kernel.name)
    if scheme != "fp8":
        native = {"w8a8": {"native_int8_int8"}, "w4a8": {"native_w4a8", "native_w4a8_gemm"}}.get(
            scheme, {"native_gemv", "native_dequantize"})
        torch_kernels = {"w8a16": {"int8_weight_only"}, "w4a16": {"int4_cpu"}, "w2a16": set(), "w8a8": {"int_mm"},
                         "w4a8": set()}
        assert ran >= {"reference"} | torch_kernels[scheme] | (native if quant.native.available() else set()), ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_here_agrees_with_f_linear_for_streaming_linears(dtype):
    torch.manual_seed(0)
    layer = quant.StreamingLinear(256, 192).to(dtype)
    ran = set()
    with torch.no_grad():
        for shape in ((1, 256), (2, 7, 256)):
            x = torch.randn(*shape, dtype=dtype)
            expected = layer.reference(x)
            tol = 1e-5 if dtype == torch.float32 else 2e-2          # as test_streaming_linear_equals_nn_linear...
            for kernel in quant.kernels.KERNELS:
                if kernel.applies(layer, x):
                    got = kernel.run(layer, x)
                    assert got.dtype == dtype and got.shape == expected.shape, kernel.name
                    assert float((got.float() - expected.float()).abs().max()) <= tol * float(expected.float().abs().max())
                    ran.add(kernel.name)
    assert ran == {"reference"} | ({"native_linear"} if quant.native.available() else set())


@pytest.mark.skipif(not quant.native.available(), reason="the kit's C kernels could not be built here")
def test_bf16_rows_on_bf16_weights_equal_the_widened_sum():
    """bf16 rows times a bf16 weight (vdpbf16ps where the CPU has AVX512-BF16, widening elsewhere) against the
    same rows widened to fp32 first (always the widening FMAs): the products are exact either way, so only the
    order of the fp32 sums differs; the same rows on fp32 weights too. Widths with a tail past the 32-wide steps,
    several rows, on one thread and split among threads in four-row shares with leftovers."""
    torch.manual_seed(7)
    for M, N, K in [(1, 300, 2560), (3, 64, 1000), (2, 17, 40)]:
        x, w = torch.randn(M, K).bfloat16(), torch.randn(N, K).bfloat16()
        got = quant.native.linear(x, w)                                                 # (M, N) fp32
        widened = quant.native.linear(x.float(), w)
        exact = x.double() @ w.double().t()
        assert float((got.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max()), (M, N, K)
        assert float((got - widened).abs().max()) <= 1e-5 * float(widened.abs().max()), (M, N, K)
        fp32 = quant.native.linear(x.float(), w.float())                                 # fp32 weights
        assert float((fp32.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max()), (M, N, K)


def test_the_switches_are_filters_on_the_kernel_table():
    layer = quant.QuantLinear.from_linear(nn.Linear(256, 64), "w4a16", group_size=64)
    x = torch.randn(1, 256)
    with torch.no_grad():
        with quant.reference_only():
            assert quant.kernels.choose(layer, x).name == "reference"
        with quant.native.off():
            assert quant.kernels.choose(layer, x).name == "int4_cpu"
        with quant.kernels.only("int4_cpu"):
            assert quant.kernels.choose(layer, x).name == "int4_cpu"
        if quant.native.available():
            assert quant.kernels.choose(layer, x).name == "native_gemv"


@pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")
@pytest.mark.parametrize("bits,symmetric,K,group", [(8, True, 200, 200), (8, True, 256, 256), (4, True, 320, 64), (4, False, 96, 32),
                                                    (2, False, 384, 128), (2, True, 160, 32)])
def test_streaming_kernels_equal_the_dequantized_matmul_in_fp32(bits, symmetric, K, group):
    torch.manual_seed(1)
    weight = torch.randn(37, K) * 0.05                         # odd widths exercise the scalar tails
    q = formats.quantize_packed(weight, bits, group, symmetric)
    codes = q.codes if bits == 8 else formats.unpack(q.codes, bits)
    dequantized = formats.dequantize_weight(formats.Quantized(codes, q.scales, q.zeros), bits)
    for rows in (1, 2, quant.native.MAX_ROWS):
        x = torch.randn(rows, K)
        got = quant.native.gemv(x, q.codes, q.scales.float().contiguous(), q.zeros, bits, group)
        expected = x.double() @ dequantized.double().t()
        assert got.dtype == torch.float32 and got.shape == (rows, 37)
        # int4 / int2, and int8 when K is a multiple of 128, meet x rounded to int16 per group (2^-16)
        tol = 1e-6 if bits == 8 and K % quant.native.Q8_GROUP else 1e-4
        assert float((got.double() - expected).abs().max()) <= tol * float(expected.abs().max())
    wrong = formats.dequantize_weight(formats.Quantized(codes.flip(-1), q.scales, q.zeros), bits)
    assert float((got.double() - x.double() @ wrong.double().t()).abs().max()) > 1e-3   # the order matters


@pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")
@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 128), (4, False, 64), (4, False, 256), (8, True, 1024)])
def test_four_row_kernels_equal_the_dequantized_matmul(bits, symmetric, group):
    """int8 codes, and int4 codes with groups of 64 or more, go four rows at a time (rows n, n + q, n + 2q, n + 3q
    of each thread's share, the leftover rows one by one): every row lands in its own place, on one thread and
    on several."""
    torch.manual_seed(2)
    N, K = 203, 1024                                           # 203 rows: shares of 4q rows plus a tail
    weight = torch.randn(N, K) * 0.05
    q = formats.quantize_packed(weight, bits, group, symmetric)
    codes = q.codes if bits == 8 else formats.unpack(q.codes, bits)
    dequantized = formats.dequantize_weight(formats.Quantized(codes, q.scales, q.zeros), bits)
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, 2, 3, threads}):
            torch.set_num_threads(count)
            for rows in (1, 3):
                x = torch.randn(rows, K)
                got = quant.native.gemv(x, q.codes, q.scales.float().contiguous(), q.zeros, bits, group)
                expected = x.double() @ dequantized.double().t()                 # (rows, N)
                assert float((got.double() - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")
def test_native_w8a8_equals_torch_int_mm_exactly():
    torch.manual_seed(2)
    q = torch.randint(-127, 128, (40, 3072), dtype=torch.int8)          # K 127^2 > 2^24: fp32 would round
    scales = torch.rand(40, 1) + 0.5
    xq, xs = formats.quantize_activations_int8(torch.randn(3, 3072))
    expected = torch._int_mm(torch.cat([xq, xq.new_zeros(14, 3072)]), q.t())[:3].double() * xs.double() * scales.t().double()
    got = quant.native.int8_int8(xq, xs, q, scales)
    assert float((got.double() - expected).abs().max()) <= 1e-6 * float(expected.abs().max())


@pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")
def test_native_kernels_refuse_layouts_they_would_misread():
    q = formats.quantize_packed(torch.randn(16, 128), 4, 64, True)
    scales, x = q.scales.float().contiguous(), torch.randn(1, 128)
    for codes, s, why in ((q.codes.t().contiguous().t(), scales, "strided codes"),
                          (q.codes.view(torch.int8), scales, "signed codes"),
                          (q.codes, scales.double(), "float64 scales"),
                          (q.codes, scales[:, :1].contiguous(), "too few scales")):
        with pytest.raises(ValueError, match="native kernels want"):
            quant.native.gemv(x, codes, s, None, 4, 64)
    with pytest.raises(ValueError, match="rows of shape"):
        quant.native.gemv(torch.randn(1, 96), q.codes, scales, None, 4, 64)


@pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")
@pytest.mark.parametrize("bits,symmetric", [(8, True), (4, True), (4, False), (2, False), (2, True)])
def test_native_dequantize_equals_the_python_one_exactly(bits, symmetric):
    weight = torch.randn(48, 256) * 0.05
    group = 256 if bits == 8 else 64
    q = formats.quantize_packed(weight, bits, group, symmetric)
    codes = q.codes if bits == 8 else formats.unpack(q.codes, bits)
    expected = formats.dequantize_weight(formats.Quantized(codes, q.scales, q.zeros), bits)
    got = quant.native.dequantize(q.codes, q.scales.float().contiguous(), q.zeros, bits, group)
    assert torch.equal(got, expected)
    assert torch.equal(quant.native.dequantize(q.codes, q.scales.float().contiguous(), q.zeros, bits, group,
                                               torch.bfloat16), expected.to(torch.bfloat16))


@pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streaming_linear_equals_nn_linear_and_keeps_the_model_the_same(dtype):
    model = random_model(text_config()).to(dtype)
    reference = copy.deepcopy(model)
    names = quant.stream_linears(model)
    assert "lm_head" in names and not any("router" in n for n in names)
    assert model.lm_head.weight is model.embed.weight                               # still tied
    assert model.state_dict().keys() == reference.state_dict().keys()
    prompt = torch.randint(3, 500, (1, 2 * quant.native.MAX_ROWS))
    with torch.inference_mode():
        got, expected = model(prompt).logits.float(), reference(prompt).logits.float()  # prefill: F.linear
        assert torch.equal(got, expected)
        step, ref_step = model(prompt[:, :1]).logits.float(), reference(prompt[:, :1]).logits.float()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert float((step - ref_step).abs().max()) <= tol * float(ref_step.abs().max())
    assert torch.equal(ernie_lab.generate(model, prompt, 8, eos_token_id=[]),
                       ernie_lab.generate(reference, prompt, 8, eos_token_id=[])) or dtype == torch.bfloat16
    model.float().train()
    loss = model(prompt, labels=prompt).loss                                        # gradients: F.linear
    loss.backward()
    assert model.layers[0].attn.q_proj.weight.grad is not None


@pytest.mark.skipif(sys.platform != "linux" or not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                    reason="the kit builds its kernels on Linux with a C compiler")
def test_the_kernels_build_wherever_a_compiler_exists():
    assert quant.native.available(), quant.native.why_unavailable()
    assert quant.native.info()["avx2"] == ("avx2" in open("/proc/cpuinfo").read())


@pytest.mark.parametrize("scheme", WEIGHT_ONLY + ["w8a8", "w4a8"])
def test_casting_a_quantized_model_keeps_its_format(scheme):
    """quantize first, then model.to(bfloat16): the scales stay float32, every path still runs."""
    model = quant.quantize(random_model(text_config()), scheme, group_size=64)
    expected = model.layers[0].mlp.up_proj.dequantize()
    with quant.native.off():
        model.float()(torch.randint(3, 500, (1, 4)))                  # PyTorch's int4 kernel tiles the codes
    model.to(torch.bfloat16)
    layer = model.layers[0].mlp.up_proj
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.dequantize(), expected)
    with torch.inference_mode():
        for use in (contextlib.nullcontext(), quant.native.off()):
            with use:
                for prompt in (torch.randint(3, 500, (1, 4)), torch.randint(3, 500, (1, 20))):
                    assert torch.isfinite(model(prompt).logits).all()


def test_a_trainable_bias_still_gets_its_gradient_at_decode_sizes():
    """The C kernels add the bias themselves, without autograd: a bias being trained keeps PyTorch's path."""
    torch.manual_seed(3)
    for layer in (quant.QuantLinear.from_linear(nn.Linear(128, 32), "w4a16", group_size=64),
                  quant.StreamingLinear(128, 32)):
        layer(torch.randn(1, 128)).sum().backward()
        assert layer.bias.grad is not None and float(layer.bias.grad.abs().sum()) > 0


def test_without_a_compiler_the_kernels_say_why_and_the_model_still_runs(tmp_path):
    script = textwrap.dedent("""
        import torch, torch.nn as nn
        from ernie_lab import quant
        layer = quant.QuantLinear.from_linear(nn.Linear(128, 64), "w4a16", group_size=64)
        y = layer(torch.randn(1, 128))
        kernel = quant.kernels.choose(layer, torch.randn(1, 128)).name
        print(quant.native.available(), "|", quant.native.why_unavailable(), "|", kernel, tuple(y.shape))
    """)
    for env, reason in (({"ERNIE_LAB_NATIVE": "0"}, "ERNIE_LAB_NATIVE=0"),
                        ({"PATH": os.path.dirname(sys.executable)}, "no C compiler"),
                        ({"CC": "/bin/false"}, "could not build gemv.c")):
        run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             env={**{k: v for k, v in os.environ.items() if k != "CC"}, "ERNIE_LAB_CACHE": str(tmp_path), **env})
        assert run.returncode == 0, run.stderr
        available, why, rest = run.stdout.strip().split(" | ")
        assert available == "False" and reason in why and rest == "int4_cpu (1, 64)"


def test_int4_cpu_tiling_is_the_kernels_own_copy():
    """PyTorch's int4 CPU kernel wants the codes re-tiled: it keeps its own tiled copy, so the layer's qweight,
    its state_dict and every other kernel see the documented plain packing; the copy follows the codes."""
    layer = quant.QuantLinear.from_linear(nn.Linear(256, 64), "w4a16", group_size=128)
    plain = layer.qweight.clone()
    with quant.native.off():
        layer(torch.randn(1, 256))                                    # PyTorch's int4 kernel tiles a copy
    tiled, _ = quant.kernels.cached(layer, "int4_cpu", lambda: pytest.fail("the tiled copy was not kept"))
    assert tiled.dtype == torch.uint8 and not torch.equal(tiled, plain)
    assert torch.equal(layer.qweight, plain) and torch.equal(layer.state_dict()["qweight"], plain)
    layer.to(torch.bfloat16)                                          # the codes and scales keep their tensors
    assert quant.kernels.cached(layer, "int4_cpu", lambda: pytest.fail("rebuilt"))[0] is tiled
    layer.load_state_dict(quant.QuantLinear.from_linear(nn.Linear(256, 64), "w4a16", group_size=128).state_dict())
    x = torch.randn(1, 256)
    with quant.native.off(), torch.no_grad():
        got, expected = layer(x), layer.reference(x)                  # new codes, written in place: tiled again
    assert quant.kernels.cached(layer, "int4_cpu", lambda: pytest.fail("not kept"))[0] is not tiled
    assert float((got.float() - expected.float()).abs().max()) <= 2e-2 * float(expected.float().abs().max())


def test_fp8_needs_cuda_and_says_so():
    with pytest.raises(InputError, match="CUDA"):
        quant.quantize(random_model(text_config()), "fp8")
    with pytest.raises(InputError, match="unknown quantization scheme"):
        quant.quantize(random_model(text_config()), "w3a16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("scheme", ["w4a16", "w8a8", "fp8"])
def test_cuda_kernels_equal_the_reference(scheme):  # pragma: no cover - no GPU on the course machines
    layer = quant.QuantLinear.from_linear(nn.Linear(256, 256).cuda().bfloat16(), scheme, group_size=128)
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    with quant.reference_only():
        expected = layer(x)
    assert torch.allclose(layer(x).float(), expected.float(), atol=5e-2 * float(expected.abs().max()))


# ------------------------------------------------------------------------------ GPTQ
@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(bits):
    torch.manual_seed(0)
    X = torch.randn(1024, 128) @ (torch.randn(128, 128) * torch.logspace(0, -2, 128))  # correlated features
    W = torch.randn(64, 128) * 0.05
    H = X.t() @ X / len(X)

    def output_error(q):
        return float((X @ (W - formats.dequantize_weight(q, bits)).t()).norm() / (X @ W.t()).norm())

    rtn, gptq = formats.quantize_weight(W, bits, 32, False), gptq_quantize(W, H, bits, 32, False)
    assert output_error(gptq) < 0.8 * output_error(rtn)


def test_quantize_with_calibration_runs_gptq_and_reduces_layer_error():
    model = random_model(text_config())
    calib = [torch.randint(3, 512, (4, 32)) for _ in range(2)]
    inputs = {}
    hook = model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.setdefault("x", a[0]))
    model(calib[0])
    hook.remove()
    x, W = inputs["x"], model.layers[1].mlp.down_proj.weight
    errors = {}
    for name, kwargs in {"rtn": {}, "gptq": {"calibration": calib}}.items():
        q = quant.quantize(copy.deepcopy(model), "w4a16", group_size=32, **kwargs).layers[1].mlp.down_proj
        errors[name] = float((x @ (W - q.dequantize()).t()).norm() / (x @ W.t()).norm())
    assert errors["gptq"] < 0.9 * errors["rtn"]
    with pytest.raises(InputError, match="GPTQ"):
        quant.quantize(copy.deepcopy(model), "w8a16", calibration=calib)


# ------------------------------------------------------------------------------ quantized models
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_quantize_replaces_linears_keeps_routers_and_shrinks_memory(scheme):
    model = moe_model()
    before = quant.weight_bytes(model)
    linear_bytes = sum(m.weight.numel() * 4 for n, m in model.named_modules()
                       if type(m) is nn.Linear and "routers" not in n and n != "lm_head")
    quant.quantize(model, scheme, group_size=64)
    layers = quant.quantized_layers(model)
    assert "layers.0.attn.q_proj" in layers and "layers.1.mlp.experts.3.down_proj" in layers
    assert "layers.1.mlp.shared_experts.up_proj" in layers
    assert type(model.layers[1].mlp.routers[0]).__name__ == "Router" and model.layers[1].mlp.routers[0].weight.dtype == torch.float32
    bits = {"w8a16": 8, "w8a8": 8, "w4a16": 4, "w2a16": 2, "w4a8": 4}[scheme]
    saved = before - quant.weight_bytes(model)
    assert saved >= linear_bytes * (1 - bits / 32) * 0.95                # the packed codes really are smaller


def test_quantized_experts_keep_the_grouped_dispatch():
    model = quant.quantize(moe_model(), "w4a16", group_size=64)
    calls = []
    for expert in model.layers[1].mlp.experts:
        expert.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model(torch.randint(3, 512, (2, 16)))
    assert len(calls) <= 4 and sum(calls) == 2 * 16 * 2               # one call per active expert, k=2


def test_vision_tower_and_adapter_are_quantized():
    from ernie_lab import notebook, tiny_models
    tokenizer = ernie_lab.load_tokenizer(notebook.repo_path("data/tiny-tokenizer"))
    config = parse_config(tiny_models.tiny_config(tiny_models.VL_CONFIG, tokenizer))
    model = quant.quantize(random_model(config), "w8a16")
    names = set(quant.quantized_layers(model))
    assert any(n.startswith("vision.blocks.0.") for n in names) and any(n.startswith("adapter") for n in names)
    assert not any("routers" in n for n in names)


def test_gptq_calibrates_a_vl_model_on_batches_with_pictures():
    """Calibration batches may be a model's full inputs: the ViT and adapter layers then get Hessians too."""
    from ernie_lab import notebook, tiny_models
    tokenizer = ernie_lab.load_tokenizer(notebook.repo_path("data/tiny-tokenizer"))
    config = parse_config(tiny_models.tiny_config(tiny_models.VL_CONFIG, tokenizer))
    model = random_model(config)
    batch = tiny_models.vl_batches(tokenizer, config, 2, text_every=0)(0)
    rtn = quant.quantize(copy.deepcopy(model), "w4a16", group_size=32)
    gptq = quant.quantize(copy.deepcopy(model), "w4a16", group_size=32, calibration=[batch])
    for name in ("vision.blocks.0.attn.qkv", "adapter.proj", "layers.0.attn.q_proj"):
        a, b = rtn.get_submodule(name), gptq.get_submodule(name)
        assert not torch.equal(a.dequantize(), b.dequantize()), name   # GPTQ moved the codes: a Hessian reached it
    with torch.no_grad():
        reference = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        errors = {label: float((m(**{k: v for k, v in batch.items() if k != "labels"}).logits - reference).norm())
                  for label, m in (("rtn", rtn), ("gptq", gptq))}
    assert errors["gptq"] < errors["rtn"], errors


def agreement(a, b):
    return float((a == b).float().mean())


@pytest.mark.parametrize("streaming", [True, False], ids=["native", "torch-kernels"])
def test_greedy_generation_stays_close_to_the_unquantized_model(record_property, streaming):
    """On the shipped tiny text model (a random model is chaotic: one changed token changes the rest)."""
    from ernie_lab import tiny_models
    folder = Path(__file__).resolve().parents[1] / "data" / "tiny-ernie-text"
    model, tok = ernie_lab.load_model(folder).eval(), ernie_lab.load_tokenizer(folder)
    prompts = tiny_models.eval_windows(tok, 128)[:8, :16]                 # 8 held-out prompts of 16 tokens
    base = ernie_lab.generate(model, prompts, 24, eos_token_id=[])[:, 16:]
    rates = {}
    with contextlib.nullcontext() if streaming else quant.native.off():
        for scheme in CPU_SCHEMES:
            q = quant.quantize(copy.deepcopy(model), scheme)
            rates[scheme] = agreement(ernie_lab.generate(q, prompts, 24, eos_token_id=[])[:, 16:], base)
    record_property("greedy_agreement", json.dumps(rates))
    print("greedy agreement with the unquantized model:", rates)
    assert rates["w8a16"] >= 0.95 and rates["w8a8"] >= 0.9 and rates["w4a16"] >= 0.8 and rates["w4a8"] >= 0.85
    assert rates["w2a16"] < rates["w4a16"] <= rates["w8a16"]


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("scheme", CPU_SCHEMES)
def test_quantized_checkpoints_reload_bit_exactly(tmp_path, scheme):
    model = quant.quantize(moe_model(), scheme, group_size=64)
    ids = torch.randint(3, 512, (1, 12))
    logits = model(ids).logits                                        # (int4: the kernel re-tiles first)
    ernie_lab.save_model(model, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert stored["model.layers.0.self_attn.q_proj.qweight"].dtype == (torch.int8 if "8" in scheme[:2] else torch.uint8)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["scheme"] == scheme
    loaded = ernie_lab.load_model(tmp_path)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(loaded(ids).logits, logits)


def test_quantize_on_read_equals_quantize_after_loading(tmp_path):
    model = moe_model()
    ernie_lab.save_model(model, tmp_path)
    on_read = ernie_lab.load_model(tmp_path, quantize="w4a16", group_size=64)
    after = quant.quantize(ernie_lab.load_model(tmp_path), "w4a16", group_size=64)
    a, b = on_read.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="unknown quantization scheme"):
        ernie_lab.load_model(tmp_path, quantize="int3")


def broken_copy(tmp_path, edit):
    model = quant.quantize(moe_model(), "w4a16", group_size=64)
    folder = tmp_path / "q"
    ernie_lab.save_model(model, folder)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_missing_scales_are_a_clear_error(tmp_path):
    folder = broken_copy(tmp_path, lambda t: t.pop("model.layers.0.self_attn.q_proj.scales"))
    with pytest.raises(CheckpointError, match="missing.*q_proj.scales"):
        ernie_lab.load_model(folder)


def test_wrong_packing_is_a_clear_error(tmp_path):
    def unpacked(t):  # one code per byte instead of two
        name = "model.layers.0.mlp.up_proj.qweight"
        t[name] = formats.unpack(t[name], 4)
    with pytest.raises(CheckpointError, match="wrong shapes.*up_proj.qweight"):
        ernie_lab.load_model(broken_copy(tmp_path, unpacked))


def test_wrong_code_dtype_is_a_clear_error(tmp_path):
    def signed(t):
        name = "model.layers.0.mlp.up_proj.qweight"
        t[name] = t[name].view(torch.int8)
    with pytest.raises(CheckpointError, match="packing does not match"):
        ernie_lab.load_model(broken_copy(tmp_path, signed))


def test_bad_quantization_config_is_a_clear_error(tmp_path):
    folder = broken_copy(tmp_path, lambda t: None)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules"]["layers.0.attn.q_proj"]["scheme"] = "w5a16"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="known scheme"):
        ernie_lab.load_model(folder)


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import ernie_lab
    from ernie_lab.model.config import ErnieConfig
    from ernie_lab.io.loading import build_empty

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    build_empty(ErnieConfig(num_hidden_layers=1))
    torch.ones(1) @ torch.ones(1)
    base = rss("VmRSS:")
    model = ernie_lab.load_model(sys.argv[1], quantize="w4a16")
    print(json.dumps({"peak": rss("VmHWM:") - base, "bytes": ernie_lab.quant.weight_bytes(model)}))
""")


def test_quantize_on_read_peaks_near_the_quantized_size(tmp_path):
    config = text_config(vocab_size=256, hidden_size=1024, intermediate_size=3072, num_hidden_layers=3,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    with torch.device("meta"):
        float_bytes = sum(p.numel() * 4 for p in architectures.build(config).parameters())
    model = architectures.build(config)
    ernie_lab.save_model(model, tmp_path)
    del model
    # glibc's default malloc raises its mmap threshold after the first big free and then keeps freed
    # temporaries in its heap, so VmHWM wandered between 60 and 90 MiB from run to run on the same load
    # (one CI run crossed the bound). A fixed threshold hands every big free back to the kernel: the
    # peak then measures the loader's live memory (56-57 MiB in five runs), not the allocator's cache.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    biggest = 3072 * 1024 * 4                                         # one fp32 MLP weight
    print(f"quantize-on-read peak {result['peak'] / 2**20:.0f} MiB, quantized model {result['bytes'] / 2**20:.0f} MiB,"
          f" fp32 model {float_bytes / 2**20:.0f} MiB")
    assert result["bytes"] < 0.2 * float_bytes
    # quantized size + the scratch tensor + quantization temporaries and allocator slack (a few tensors)
    assert result["peak"] < result["bytes"] + 6 * biggest and result["peak"] < 0.75 * float_bytes


# ------------------------------------------------------------------------------ int8 KV cache
def test_int8_kv_cache_quarters_the_bytes_and_keeps_generation_close():
    model = random_model(text_config(), std=0.08)
    prompts = torch.randint(3, 512, (2, 8))
    base = ernie_lab.generate(model, prompts, 12, eos_token_id=[])
    int8 = ernie_lab.generate(model, prompts, 12, eos_token_id=[], kv_cache_dtype="int8")
    assert agreement(int8[:, 8:], base[:, 8:]) >= 0.8
    cache = KVCache.for_model(model, 1, 64, kv_cache_dtype="int8")
    assert isinstance(cache, Int8KVCache) and cache.keys[0].dtype == torch.int8
    k = torch.randn(1, 2, 5, 32)
    keys, _ = cache.update(0, k, k)
    assert float((keys - k).abs().max()) <= float(k.abs().amax(-1).max()) / 127 / 2 + 1e-6
    with pytest.raises(InputError, match="kv_cache_dtype"):
        ernie_lab.generate(model, prompts, 2, kv_cache_dtype="int4")


def test_tiny_model_quality_table_belongs_to_the_shipped_models():
    """benchmarks/results/quant_tiny.json was measured on the checkpoints in data/ (its fp32 rows equal their
    TRAINING.md numbers), and it shows what the issue expects: w8a16 within 1% perplexity, GPTQ closing at
    least half of round-to-nearest's gap at 2 bits."""
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    table = json.loads((root / "benchmarks" / "results" / "quant_tiny.json").read_text())
    text = json.loads((root / "data" / "tiny-ernie-text" / "metrics.json").read_text())
    assert table["text"]["fp32"]["val_perplexity"] == pytest.approx(text["val_perplexity"], rel=1e-4)
    vl = json.loads((root / "data" / "tiny-ernie-vl" / "metrics.json").read_text())
    assert table["vl"]["fp32"]["val_loss"] == pytest.approx(vl["val_loss"], rel=0.5)  # 4 batches against 8
    assert table["text_perplexity_increase"]["w8a16"] < 0.01
    assert table["gptq_gap_closed_text_perplexity"]["w2a16"] >= 0.5

"""The kit's C kernels as PyTorch custom operators (``quant.ops``): each passes ``torch.library.opcheck``,
and ``torch.compile(fullgraph=True)`` of quantized layers keeps one graph, with the kit's operators (or
PyTorch's packed kernels) as nodes in it, and computes what eager computes."""

import contextlib
import io

import pytest
import torch
from torch import nn

import ernie_lab
from ernie_lab import quant
from ernie_lab.quant import formats, ops
from ernie_lab.quant.linear import QuantLinear
from ernie_lab.quant.streaming import StreamingLinear
from conftest import micro_model

needs_native = pytest.mark.skipif(not quant.native.available(), reason="the kit's C kernels could not be built here")


def _codes(bits, group, symmetric=True, N=16, K=64):
    q = formats.quantize_packed(torch.randn(N, K), bits, group, symmetric)
    return q.codes, q.scales.float().contiguous(), q.zeros


@needs_native
@pytest.mark.parametrize("bits,group,symmetric", [(8, 64, True), (4, 32, False), (2, 32, True)])
def test_opcheck_gemv_and_dequantize(bits, group, symmetric):
    torch.manual_seed(bits)
    codes, scales, zeros = _codes(bits, group, symmetric)
    for x, bias, out_dtype in ((torch.randn(2, 64), None, torch.float32),
                               (torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(16), torch.bfloat16)):
        torch.library.opcheck(ops.gemv, (x, codes, scales, zeros, bits, group, bias, out_dtype))
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.dequantize, (codes, scales, zeros, bits, group, dtype))


@needs_native
def test_opcheck_linear_and_int8_int8():
    torch.manual_seed(0)
    for weight_dtype, out_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
        weight, bias = torch.randn(16, 64, dtype=weight_dtype), torch.randn(16)
        torch.library.opcheck(ops.linear, (torch.randn(3, 64), weight, bias, out_dtype))
        torch.library.opcheck(ops.linear, (torch.randn(1, 64), weight, None, out_dtype))
    xq, xs = formats.quantize_activations_int8(torch.randn(2, 64))
    q = formats.quantize_packed(torch.randn(16, 64), 8, 64, True)
    torch.library.opcheck(ops.int8_int8, (xq, xs, q.codes, q.scales.float().contiguous()))


@needs_native
def test_opcheck_int8_int4():
    torch.manual_seed(3)
    for symmetric, group in ((True, 64), (False, 32)):
        codes, scales, zeros = _codes(4, group, symmetric)
        torch.library.opcheck(ops.int8_int4, (torch.randn(2, 64), codes, scales, zeros, group, None, torch.float32))
        torch.library.opcheck(ops.int8_int4, (torch.randn(1, 64, dtype=torch.bfloat16), codes, scales, zeros, group,
                                              torch.randn(16), torch.bfloat16))


@needs_native
def test_ops_are_the_native_kernels():
    """The operator returns exactly what the ctypes call returns (the boundary changes no numerics)."""
    torch.manual_seed(1)
    codes, scales, zeros = _codes(4, 32, symmetric=False)
    x = torch.randn(2, 64)
    assert torch.equal(ops.gemv(x, codes, scales, zeros, 4, 32, None, torch.float32),
                       quant.native.gemv(x, codes, scales, zeros, 4, 32))
    assert torch.equal(ops.dequantize(codes, scales, zeros, 4, 32, torch.bfloat16),
                       quant.native.dequantize(codes, scales, zeros, 4, 32, torch.bfloat16))
    # the fake kernel agrees with the real one on shape and dtype, also for an fp16 request (the C writes fp32)
    from torch._subclasses.fake_tensor import FakeTensorMode
    half = x.half()
    real = ops.gemv(half, codes, scales, zeros, 4, 32, None, torch.float16)
    with FakeTensorMode() as mode:
        fake = ops.gemv(mode.from_tensor(half), mode.from_tensor(codes), mode.from_tensor(scales),
                        mode.from_tensor(zeros), 4, 32, None, torch.float16)
    assert (fake.shape, fake.dtype) == (real.shape, real.dtype) == ((2, 16), torch.float32)


# ------------------------------------------------------------------ torch.compile of quantized layers
class Stack(nn.Module):
    """One layer of each scheme the kit's C computes (w4a8 included), and a streaming fp32 linear: 64 -> ... -> 32."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            QuantLinear.from_linear(nn.Linear(64, 64, bias=True), "w8a16"),
            QuantLinear.from_linear(nn.Linear(64, 64), "w4a16", group_size=32, symmetric=False),
            QuantLinear.from_linear(nn.Linear(64, 64), "w2a16", group_size=32),
            QuantLinear.from_linear(nn.Linear(64, 64, bias=True), "w8a8"),
            QuantLinear.from_linear(nn.Linear(64, 64, bias=True), "w4a8", group_size=32, symmetric=False),
            StreamingLinear.from_linear(nn.Linear(64, 32)))

    def forward(self, x):
        return self.layers(x)


class Recorder:
    """A torch.compile backend that notes every operator of each graph, then hands it to inductor."""

    def __init__(self):
        self.graphs: list[list[str]] = []

    def __call__(self, gm, example_inputs):
        self.graphs.append([str(node.target) for node in gm.graph.nodes if node.op == "call_function"])
        return torch._inductor.compile(gm, example_inputs)


@pytest.fixture(scope="module")
def compiled_stack():
    """One compile (two graphs: a decode shape and a prompt shape), shared by the tests below."""
    torch.manual_seed(0)
    model, recorder = Stack().eval(), Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True, dynamic=False)
    return model, compiled, recorder


@needs_native
def test_compiled_decode_calls_the_kits_operators(compiled_stack, one_thread):
    model, compiled, recorder = compiled_stack
    x = torch.randn(1, 2, 64)                       # 2 rows: the decode kernels
    with torch.no_grad():
        assert [quant.kernels.choose(layer, x).name for layer in model.layers[:5]] == \
            ["native_gemv"] * 3 + ["native_int8_int8", "native_w4a8"]
        eager, got = model(x), compiled(x)
    assert torch.allclose(got, eager, atol=1e-5, rtol=1e-5), (got - eager).abs().max()
    ops_in_graph = [name for name in recorder.graphs[0] if name.startswith("ernie_lab.")]
    assert ops_in_graph == ["ernie_lab.gemv.default"] * 3 + ["ernie_lab.int8_int8.default",
                                                             "ernie_lab.int8_int4.default",
                                                             "ernie_lab.linear.default"]


@needs_native
def test_compiled_prompt_calls_the_dequantizer(compiled_stack, one_thread):
    model, compiled, recorder = compiled_stack
    x = torch.randn(1, 3 * quant.native.MAX_ROWS, 64)   # a prompt: the C dequantizes, then one GEMM
    with torch.no_grad():
        eager, got = model(x), compiled(x)
    assert torch.allclose(got, eager, atol=1e-5, rtol=1e-5), (got - eager).abs().max()
    graph = recorder.graphs[-1]
    assert graph.count("ernie_lab.dequantize.default") == 4 and "ernie_lab.gemv.default" not in graph
    assert "ernie_lab.int8_int4.default" not in graph                 # w4a8: the dequantizer, x rounded, one GEMM
    assert graph.count("ernie_lab.round_blocks.default") == 1          # the rounding as one C operator


def test_compiled_pytorch_kernels_and_the_switch(one_thread):
    """Without the C (``native.off()``) the table picks PyTorch's packed kernels, the CPU cousins of the CUDA
    entries (int8 / int4 weight-only, ``_int_mm``); they and their tiled copies trace into the graph too,
    and switching ``native.off()`` on or off makes torch.compile trace again rather than run a stale choice."""
    torch.manual_seed(2)
    model, graphs = Stack().eval(), []

    def record(gm, example_inputs):
        graphs.append({str(node.target) for node in gm.graph.nodes if node.op == "call_function"})
        return gm.forward

    compiled = torch.compile(model, backend=record, fullgraph=True, dynamic=False)
    x = torch.randn(2, 64)
    with torch.no_grad(), quant.native.off():
        assert [quant.kernels.choose(layer, x).name for layer in model.layers[:5]] == \
            ["int8_weight_only", "int4_cpu", "reference", "int_mm", "reference"]
        assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert {"aten._weight_int8pack_mm", "aten._convert_weight_to_int4pack_for_cpu",
            "aten._weight_int4pack_mm_for_cpu"} <= graphs[0]
    assert not any(name.startswith("ernie_lab.") for name in graphs[0])
    if quant.native.available():
        with torch.no_grad():
            assert torch.allclose(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        assert len(graphs) == 2 and "ernie_lab.gemv.default" in graphs[1]


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_pytorch_kernels_compile_with_inductor_and_read_their_copies_as_inputs(scheme):
    """native.off() puts w8a16 / w4a16 on PyTorch's packed kernels, which keep their own copy of the codes
    (bf16 scales; tiled int4 codes and scales). Built inside the compiled graph, that copy was remade at every
    step, and inductor's lowering failed on it (an AssertionError), so generate(compile=True) died. generate
    now primes the copies outside the graph: the compiled tokens are eager's, and no step repacks the codes."""
    from torch.profiler import profile
    model = micro_model(seed=4).eval()
    quant.quantize(model, scheme, group_size=32)
    kernel = {"w8a16": "int8_weight_only", "w4a16": "int4_cpu"}[scheme]
    ids = [[5, 9, 11, 30, 2, 7]]
    with quant.native.off():
        assert quant.kernels.choose(model.layers[0].mlp.up_proj, torch.randn(1, 1, 32)).name == kernel
        eager = ernie_lab.generate(model, ids, 5, eos_token_id=[])
        model = quant.quantize(micro_model(seed=4).eval(), scheme, group_size=32)   # the same, no copy made yet
        with contextlib.redirect_stdout(io.StringIO()), profile() as prof:
            compiled = ernie_lab.generate(model, ids, 5, eos_token_id=[], compile=True)
    assert torch.equal(compiled, eager)
    repacks = sum(e.count for e in prof.key_averages() if e.key == "aten::_convert_weight_to_int4pack_for_cpu")
    layers = len(quant.quantized_layers(model))
    assert repacks == (layers if scheme == "w4a16" else 0)   # once per layer, when primed; none per step


# ------------------------------------------------------------------ the C++ registration and its stand-in
_STAND_IN = r"""
import json, torch
from torch import nn
from ernie_lab.quant import ops
from ernie_lab.quant.linear import QuantLinear
torch.manual_seed(0)
layer = QuantLinear.from_linear(nn.Linear(64, 48, bias=True), "w4a8", group_size=64).eval()
x = torch.randn(1, 64)
with torch.no_grad():
    eager, compiled = layer(x), torch.compile(layer, fullgraph=True, dynamic=False)(x)
print(json.dumps({"in_cpp": ops.IN_CPP, "equal": torch.equal(eager, compiled),
                  "schemas": [str(getattr(ops, name)._opoverload._schema) for name in ops.HOT]}))
"""


@needs_native
def test_the_python_operators_stand_in_for_the_cpp_ones_with_the_same_schemas():
    """Where ops.cpp does not build (here: ERNIE_LAB_CPP_OPS=0) the Python operators serve, with the same
    names and schemas, and a compiled layer still computes what eager computes."""
    import json
    import os
    import subprocess
    import sys
    from ernie_lab.quant import cpp_ops
    env = dict(os.environ, ERNIE_LAB_CPP_OPS="0")
    done = subprocess.run([sys.executable, "-c", _STAND_IN], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    stand_in = json.loads(done.stdout.strip().splitlines()[-1])
    assert stand_in["in_cpp"] is False and stand_in["equal"] is True
    assert ops.IN_CPP == (cpp_ops.why_unavailable() is None)
    if ops.IN_CPP:          # the C++ schemas, as the dispatcher holds them, equal the Python ones
        cpp = [str(getattr(torch.ops.ernie_lab, name).default._schema) for name in ops.HOT]
        assert cpp == stand_in["schemas"], (cpp, stand_in["schemas"])


@needs_native
def test_the_cpp_operators_refuse_what_the_kernels_would_misread():
    """The C trusts its pointers: the C++ operators check the layout first, as native.py does."""
    codes, scales, zeros = _codes(4, 32)
    x = torch.randn(1, 64)
    for bad in ((x, codes.t(), scales, zeros, 4, 32, None, torch.float32),           # codes not contiguous
                (x, codes, scales.double(), zeros, 4, 32, None, torch.float32),       # fp64 scales
                (torch.randn(1, 63), codes, scales, zeros, 4, 32, None, torch.float32),  # the wrong width
                (x, codes, scales, zeros, 4, 48, None, torch.float32)):                # a group not dividing K
        with pytest.raises((RuntimeError, ValueError)):
            ops.gemv(*bad)
    with pytest.raises((RuntimeError, ValueError)):
        ops.int8_int4(x, codes, scales, zeros, 16, None, torch.float32)                 # groups of 16 < a block
    with pytest.raises((RuntimeError, ValueError)):
        ops.linear(x, torch.randn(8, 64, dtype=torch.float16), None, torch.float32)     # an fp16 weight


def test_eager_mode_calls_the_cpp_operators_when_they_are_registered():
    """kernels.c_kernel: the C++ operator in eager mode too (about 5 us a call against the ctypes call's 8);
    the ctypes function when the operators are Python ones (11 us more each); never an op that is not hot."""
    from ernie_lab.quant import kernels
    expected = ops.gemv if ops.IN_CPP else quant.native.gemv
    assert kernels.c_kernel("gemv") is expected
    assert kernels.c_kernel("dequantize") is quant.native.dequantize

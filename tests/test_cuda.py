"""GPU path: the same logits on CUDA as on CPU. Skipped where no GPU exists (CI is CPU-only)."""

import pytest
import torch

import ernie_lab

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_cuda_matches_cpu(tiny_checkpoint):
    _, folder = tiny_checkpoint
    cpu = ernie_lab.load_model(folder)
    gpu = ernie_lab.load_model(folder, device="cuda")
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        diff = (gpu(ids.cuda()).logits.cpu() - cpu(ids).logits).abs().max().item()
    assert diff < 1e-3  # TF32 / different kernels: looser than CPU-vs-CPU
    out = ernie_lab.generate(gpu, ids.cuda(), 8, eos_token_id=[])
    assert out.shape == (2, 24) and out.device.type == "cuda"


def test_cuda_kernels_compile_into_cuda_graphs():
    """The CUDA entries (int4 tinygemm, ``_int_mm``, ``_scaled_mm`` where the GPU has fp8) trace into one graph
    and replay as a CUDA graph (``mode="reduce-overhead"``), equal to eager."""
    from torch import nn

    from ernie_lab import quant

    torch.manual_seed(0)
    schemes = [("w4a16", {"group_size": 32}), ("w8a8", {})]
    if torch.cuda.get_device_capability() >= (8, 9):
        schemes.append(("fp8", {}))
    model = nn.Sequential(*[quant.QuantLinear.from_linear(nn.Linear(128, 128, bias=True), scheme, **options)
                            for scheme, options in schemes]).cuda().eval()
    x = torch.randn(2, 128, device="cuda")
    assert [quant.kernels.choose(layer, x).name for layer in model] == \
        ["int4_cuda", "int_mm", "scaled_mm_fp8"][:len(schemes)]
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = model(x)
        for _ in range(3):   # warm-up runs, then the recorded graph replays
            torch.compiler.cudagraph_mark_step_begin()
            got = compiled(x).clone()
    assert torch.allclose(got, eager, atol=2e-2, rtol=2e-2), (got - eager).abs().max()

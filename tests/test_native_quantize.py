"""native.quantize_symmetric: the one-pass C rounding that quantize-on-read uses gives PyTorch's codes bit for bit."""

import pytest
import torch

from conftest import refused
from ernie_lab import quant
from ernie_lab.errors import InputError
from ernie_lab.quant import formats
from ernie_lab.quant.linear import QuantLinear

pytestmark = pytest.mark.skipif(not quant.native.available(), reason="the streaming kernels could not be built here")


def hard_weight(dtype) -> torch.Tensor:
    """Random rows plus the cases rounding gets wrong: exact ties (x.5 steps), an all-zero group, a lone max."""
    torch.manual_seed(0)
    w = torch.randn(40, 256) * 0.05
    w[0, :64] = 0.0
    w[0, :29] = torch.arange(-14, 15) * 0.125            # int4: max |w| = 1.75, s = 1.75 / 7 = 0.25 exactly,
                                                         # so w / s = k / 2: exact ties, rounded half to even
    w[1, 64:128] = 0.0                                   # scale clamped to 1e-12, codes all "zero"
    w[2, 5] = 3.0                                        # one large weight in a group
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group", [(4, 64), (4, 256), (8, 256)])
def test_native_codes_and_scales_equal_pytorchs(dtype, bits, group):
    w = hard_weight(dtype)
    expected = formats.quantize_weight(w, bits, group, symmetric=True)          # PyTorch ops only
    codes, scales = quant.native.quantize_symmetric(w, bits, group)
    assert torch.equal(scales, expected.scales)
    assert torch.equal(codes, expected.codes if bits == 8 else formats.pack(expected.codes, bits))
    packed = formats.quantize_packed(w, bits, group)                             # the path loading takes
    assert torch.equal(packed.codes, codes) and packed.zeros is None


def test_native_path_declines_what_it_does_not_do():
    w = hard_weight(torch.float32)
    assert quant.native.quantize_symmetric(w, 2, 64) is None                    # int2: PyTorch's ops
    assert quant.native.quantize_symmetric(w.half(), 4, 64) is None             # fp16 weights
    with quant.native.off():
        assert quant.native.quantize_symmetric(w, 4, 64) is None
    w[3, 7] = float("nan")
    assert quant.native.quantize_symmetric(w, 4, 64) is None                    # left to the refusal below


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_set_weight_still_refuses_nan_and_inf(scheme, bad):
    with torch.device("meta"):
        layer = QuantLinear(256, 40, scheme, group_size=64, symmetric=True, bias=False, dtype=torch.bfloat16)
    w = hard_weight(torch.bfloat16)
    w[3, 7] = bad
    refused(lambda: layer.set_weight(w), InputError, "NaN or Inf", scheme)


def test_cached_library_builds_once_per_key_and_falls_back_to_the_temporary_folder(tmp_path, monkeypatch):
    """native.cached_library (gemv.c's and ops.cpp's cache): one build per key, reused after; where the
    cache cannot be written (a read-only home) the library goes under the temporary folder."""
    import tempfile
    from ernie_lab.quant import native
    monkeypatch.setenv("ERNIE_LAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    built = []

    def build(out):
        built.append(out)
        out.write_bytes(b"a library")

    first = native.cached_library("demo", [b"one"], build)
    assert first.parent == tmp_path / "cache" / "native" and first.read_bytes() == b"a library"
    assert native.cached_library("demo", [b"one"], build) == first and len(built) == 1
    other = native.cached_library("demo", [b"two"], build)
    assert other != first and len(built) == 2

    def read_only_home(out):
        if str(out).startswith(str(tmp_path / "cache")):
            raise PermissionError(out)
        build(out)

    fallback = native.cached_library("demo", [b"three"], read_only_home)
    assert fallback.is_relative_to(tmp_path / "tmp") and fallback.read_bytes() == b"a library"
    assert sorted(p.name for p in (tmp_path / "cache" / "native").iterdir()) == sorted([first.name, other.name])

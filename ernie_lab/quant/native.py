"""The kit's own decode kernels (``gemv.c``), compiled on first use with the machine's C compiler.

At batch-1 decode a linear layer costs the time to read its weight once, so a kernel should touch each
stored byte once and do little work per weight. PyTorch's one-row kernels reach only part of the memory
bandwidth on some machines, and its int4 CPU kernel is compute-bound without AVX-512. ``gemv.c`` (C with
AVX2, portable C elsewhere) reads fp32, bf16, int8 and packed int4 / int2 weights in their stored layout;
its header explains the arithmetic (zero points folded out, activations rounded once to int16 per group).

    native.available() / why_unavailable() / info()   built and loaded? if not, why; the library's path
    native.linear(x, weight, bias, out_dtype)     (M, K) rows @ an fp32 / bf16 (N, K) weight -> (M, N)
    native.gemv(x, qweight, scales, zeros, bits, group_size, bias, out_dtype)   rows @ int8 / int4 / int2 codes
    native.int8_int8(xq, xs, qweight, scales)     W8A8: int8 activations @ int8 codes, exact in int32
    native.int8_int4(x, qweight, scales, zeros, group_size, bias, out_dtype)   W4A8: rows rounded to int8
                                          per block of 32 inputs @ int4 codes, each block exact in int32
    native.quantize_blocks(x)             that rounding alone: (M, K) -> int8 (M, K), scales (M, K / 32)
    native.round_blocks(x, dtype)         rounded and back, s_b q (M, K) in fp32 / bf16: a prompt's W4A8 rows
    native.prepare_int16(x, group_size, phases)     the int16 kernels' rounding of one row (for the tests)
    native.dequantize(qweight, scales, zeros, bits, group_size, dtype, out)     codes -> the float weight
    native.quantize_symmetric(w, bits, group_size)     fp32 / bf16 weight -> int8 or packed int4 codes, scales
    native.off()                          a block in which the kit uses PyTorch's kernels only

Built once per source / compiler / CPU into ``$ERNIE_LAB_CACHE`` (default ``~/.cache/ernie_lab``) with
``cc -O3 -march=native -fopenmp`` and loaded with ctypes; the OpenMP runtime is the one PyTorch already
loaded (same soname), so the kernels share its threads (``torch.set_num_threads``). ``ERNIE_LAB_NATIVE=0``
turns them off. Without a C compiler (or off Linux) everything still runs, on PyTorch's kernels.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ..atomic import atomic_file

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
MAX_GROUP = 2048    # int4 / int2 groups up to this size are summed exactly in int32
Q8_GROUP = 128      # int8 weights meet x rounded to int16 in groups of this many inputs
W4A8_KIND = 48      # ernie_linear's kind for int4 codes meeting int8 activation blocks (KIND_W4A8 in gemv.c)
BLOCK = 32          # w4a8: inputs per int8 activation scale (formats.ACTIVATION_BLOCK)
MAX_ROWS = 8        # decode sizes; longer inputs (prompts) are compute-bound: dequantize + PyTorch's GEMM

_lock = threading.Lock()
_state: dict = {}
_ENABLED = [True]


@contextlib.contextmanager
def off():
    """Inside this block the streaming kernels are not used (PyTorch's kernels serve decode too)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def cached_library(stem: str, key_parts: list[bytes], build) -> Path:
    """The library ``$ERNIE_LAB_CACHE/native/<stem>-<hash of key_parts, the CPU, the machine>.so``, made by
    ``build(path)`` when missing, atomically (a half-written library never sits at that path); under the
    temporary folder when the cache cannot be written (a read-only home)."""
    key = hashlib.sha256(b"\0".join([*key_parts, _cpu_signature().encode(), platform.machine().encode()]))
    cache = Path(os.environ.get("ERNIE_LAB_CACHE", Path.home() / ".cache" / "ernie_lab"))
    path = cache / "native" / f"{stem}-{key.hexdigest()[:16]}.so"
    for place in (path, Path(tempfile.gettempdir()) / f"ernie_lab-{os.getuid()}" / "native" / path.name):
        if place.is_file():
            return place
        try:
            with atomic_file(place) as out:
                build(out)
            return place
        except PermissionError:
            continue
    raise OSError(f"nowhere to write {path.name}: neither {path.parent} nor the temporary folder is writable")


def run_compiler(command: list[str], what: str) -> None:
    """Run one compiler command; an OSError with the end of its messages when it fails."""
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{command[0]} could not build {what} (exit {result.returncode}): {result.stderr.strip()[-600:]}")


def _load():
    if "lib" in _state or "error" in _state:
        return _state.get("lib")
    with _lock:
        if "lib" in _state or "error" in _state:
            return _state.get("lib")
        try:
            if os.environ.get("ERNIE_LAB_NATIVE", "1") == "0":
                raise OSError("disabled by ERNIE_LAB_NATIVE=0")
            if platform.system() != "Linux":
                raise OSError(f"built only on Linux (this is {platform.system()})")
            compiler = _compiler()
            if compiler is None:
                raise OSError("no C compiler (cc, gcc or clang) on PATH")
            path = cached_library("gemv", [SOURCE.read_bytes(), compiler.encode(), " ".join(FLAGS).encode()],
                                  lambda out: run_compiler([compiler, *FLAGS, str(SOURCE), "-o", str(out)], SOURCE.name))
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _state["lib"], _state["path"] = lib, path
        except OSError as err:
            _state["error"] = str(err)
    return _state.get("lib")


def _declare(lib) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ernie_linear.argtypes = [i32, p, i32, p, p, p, p, p, i32, i64, i64, i64, i64, i32]
    lib.ernie_gemv_i8i8.argtypes = [p, p, p, p, p, i64, i64, i64, i32]
    lib.ernie_dequantize_packed.argtypes = [p, p, p, p, i64, i64, i64, i32, i32, i32]
    lib.ernie_quantize_symmetric.argtypes = [p, i32, p, p, i64, i64, i64, i32, i32]
    lib.ernie_quantize_symmetric.restype = ctypes.c_longlong
    lib.ernie_quantize_blocks.argtypes = [p, p, p, i64, i64]
    lib.ernie_round_blocks.argtypes = [p, i32, p, i32, i64, i64, i32]
    lib.ernie_prepare_int16.argtypes = [p, p, p, p, i64, i64, i32]
    for fn in ("ernie_linear", "ernie_gemv_i8i8", "ernie_dequantize_packed", "ernie_quantize_blocks", "ernie_round_blocks",
               "ernie_prepare_int16"):
        getattr(lib, fn).restype = None
    lib.ernie_gemv_has_avx2.restype = i32


def available() -> bool:
    return _load() is not None


def active() -> bool:
    """Loaded and not switched off by ``off()``."""
    return _ENABLED[-1] and available()


def why_unavailable() -> str | None:
    _load()
    return _state.get("error")


def info() -> dict:
    """What was loaded: the library's path and whether it uses the AVX2 paths (or why it is absent)."""
    lib = _load()
    if lib is None:
        return {"available": False, "reason": _state.get("error")}
    return {"available": True, "path": str(_state["path"]), "avx2": bool(lib.ernie_gemv_has_avx2())}


def usable(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Decode-sized CPU rows, the kernels loaded, and no gradient wanted for ``x`` or any of the layer's
    ``params`` (weight, bias): the C computes without autograd, so training keeps PyTorch's path."""
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    return (_ENABLED[-1] and x.device.type == "cpu" and x.numel() // max(x.shape[-1], 1) <= MAX_ROWS
            and not wants_grad and available())


def _library():
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the streaming kernels are not available: {_state.get('error')}")
    return lib


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check_codes(qweight, scales, zeros, bits: int, group_size: int) -> tuple[int, int]:
    """The C code trusts its pointers: refuse anything but the documented CPU layout. Returns (N, K)."""
    N, K = qweight.shape[0], qweight.shape[1] * 8 // bits
    groups = 1 if bits == 8 else K // group_size
    ok = (qweight.dim() == 2 and qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
          and qweight.is_contiguous() and qweight.device.type == "cpu"
          and scales.dtype == torch.float32 and scales.is_contiguous() and scales.numel() == N * groups
          and (bits == 8 or K % group_size == 0)
          and (zeros is None or (zeros.dtype == torch.uint8 and zeros.is_contiguous() and zeros.numel() == N * groups)))
    if not ok:
        raise ValueError(f"native kernels want contiguous CPU codes ({'int8' if bits == 8 else 'uint8'} (N, K*{bits}/8)), "
                         f"float32 scales and uint8 zeros of (N, K/group); got {qweight.dtype} {tuple(qweight.shape)}, "
                         f"{scales.dtype} {tuple(scales.shape)}, {None if zeros is None else (zeros.dtype, tuple(zeros.shape))}")
    return N, K


def _rows(x: torch.Tensor, K: int) -> torch.Tensor:
    """(M, K) contiguous fp32 or bf16 rows (the two dtypes the C reads)."""
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"rows of shape {tuple(x.shape)} for a layer of {K} inputs")
    if x.dtype not in (torch.float32, torch.bfloat16):
        x = x.float()
    return x.contiguous()


def _run(kind: int, rows: torch.Tensor, weight, scales, zeros, bias, out_dtype, N: int, K: int, group: int):
    out_dtype = torch.float32 if out_dtype not in (torch.float32, torch.bfloat16) else out_dtype
    y = torch.empty(rows.shape[0], N, dtype=out_dtype)
    if bias is not None:
        bias = bias.detach().float().contiguous()
    _library().ernie_linear(kind, _ptr(rows), int(rows.dtype == torch.bfloat16), _ptr(weight), _ptr(scales),
                            _ptr(zeros), _ptr(bias), _ptr(y), int(out_dtype == torch.bfloat16), rows.shape[0], N, K,
                            group, torch.get_num_threads())
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) fp32 / bf16 rows @ an fp32 or bf16 (N, K) weight (+ bias) -> (M, N) in ``out_dtype`` (fp32 or bf16)."""
    if weight.dtype not in (torch.bfloat16, torch.float32) or weight.device.type != "cpu" or weight.dim() != 2:
        raise TypeError(f"native.linear takes a 2-D fp32 or bf16 CPU weight, not {weight.dtype} on {weight.device}")
    N, K = weight.shape
    kind = 16 if weight.dtype == torch.bfloat16 else 32
    return _run(kind, _rows(x, K), weight.contiguous(), None, None, bias, out_dtype, N, K, K)


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         bits: int, group_size: int, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) rows @ int8 or plain-packed int4 / int2 codes (``formats`` layout) with float32 scales (+ bias)
    -> (M, N) in ``out_dtype``. int8 and packed codes meet x rounded to int16 per group (``gemv.c``)."""
    N, K = _check_codes(qweight, scales, zeros, bits, group_size)
    if bits != 8 and group_size > MAX_GROUP:
        raise ValueError(f"native.gemv sums a group exactly in int32 only up to {MAX_GROUP} inputs, not {group_size}")
    return _run(bits, _rows(x, K), qweight, scales, zeros, bias, out_dtype, N, K, group_size)


def int8_int8(xq: torch.Tensor, xs: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8: (M, K) int8 activations with (M, 1) float scales @ int8 (N, K) codes with per-row scales -> (M, N)
    float32, the integer dot products exact in int32."""
    N, K = _check_codes(qweight, scales, None, 8, qweight.shape[1])
    if xq.dtype != torch.int8 or xq.dim() != 2 or xq.shape[1] != K or xs.numel() != xq.shape[0]:
        raise ValueError(f"int8 activations (M, {K}) and M scales, got {xq.dtype} {tuple(xq.shape)}, {tuple(xs.shape)}")
    M = xq.shape[0]
    wide, row_scales = xq.to(torch.int16).contiguous(), xs.float().contiguous()
    y = torch.empty(M, N, dtype=torch.float32)
    _library().ernie_gemv_i8i8(_ptr(wide), _ptr(row_scales), _ptr(qweight), _ptr(scales), _ptr(y), M, N, K,
                               torch.get_num_threads())
    return y


def int8_int4(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
              group_size: int, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W4A8: (M, K) fp32 / bf16 rows @ plain-packed int4 codes (+ bias) -> (M, N) in ``out_dtype``. The C rounds
    each block of 32 inputs of a row to int8 (as ``quantize_blocks``; no framework op per call at decode), then
    sums u * xq exactly in int32 per block, scaled in fp32 (``gemv.c``). ``group_size`` and K: multiples of 32."""
    N, K = _check_codes(qweight, scales, zeros, 4, group_size)
    if K % BLOCK or group_size % BLOCK:
        raise ValueError(f"native.int8_int4 wants K ({K}) and group_size ({group_size}) multiples of {BLOCK}")
    return _run(W4A8_KIND, _rows(x, K), qweight, scales, zeros, bias, out_dtype, N, K, group_size)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The C's rounding of (M, K) fp32 rows to int8 per block of 32 inputs: (M, K) int8, (M, K / 32) float32
    scales, the values ``formats.quantize_activations_blocks`` gives."""
    if x.dim() != 2 or x.shape[1] % BLOCK or x.device.type != "cpu":
        raise ValueError(f"native.quantize_blocks wants CPU rows (M, K) with K a multiple of {BLOCK}, got "
                         f"{tuple(x.shape)} on {x.device}")
    rows = x.float().contiguous()
    M, K = rows.shape
    xq, xs = torch.empty(M, K, dtype=torch.int8), torch.empty(M, K // BLOCK, dtype=torch.float32)
    _library().ernie_quantize_blocks(_ptr(rows), _ptr(xq), _ptr(xs), M, K)
    return xq, xs


def prepare_int16(x: torch.Tensor, group_size: int, phases: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int16 kernels' rounding of one fp32 row x (K,): per group of ``group_size`` inputs t = max|x| / 32767
    (1 where all are 0) and q = x / t rounded half away from zero. Returns q (K,) int16 stored by phase (inputs
    p, p + phases, ... first for p = 0, then 1, ...: how packed int4 / int2 codes meet them), the int32 sums of q
    per group and the float32 t per group. For the tests: the kernels do this inside each call."""
    K = x.numel()
    if x.dim() != 1 or x.dtype != torch.float32 or group_size <= 0 or phases not in (1, 2, 4) or K % group_size or K % phases:
        raise ValueError(f"native.prepare_int16 wants one fp32 row whose length {K} groups of {group_size} and "
                         f"{phases} phases divide")
    row = x.contiguous()
    xs, sums = torch.empty(K, dtype=torch.int16), torch.empty(K // group_size, dtype=torch.int32)
    scales = torch.empty(K // group_size, dtype=torch.float32)
    _library().ernie_prepare_int16(_ptr(row), _ptr(xs), _ptr(sums), _ptr(scales), K, group_size, phases)
    return xs, sums, scales


def round_blocks(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(M, K) fp32 / bf16 CPU rows, each block of 32 inputs rounded to int8 and back (s_b q), in ``dtype`` (fp32 or
    bf16): the rows a prompt's W4A8 GEMM multiplies, the values of ``formats.dequantize_activations_blocks`` of
    ``quantize_blocks`` in one pass."""
    if x.dim() != 2 or x.shape[1] % BLOCK or x.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"native.round_blocks wants CPU rows (M, K) with K a multiple of {BLOCK} and an fp32 or bf16 "
                         f"output, got {tuple(x.shape)} on {x.device} -> {dtype}")
    rows = (x if x.dtype in (torch.float32, torch.bfloat16) else x.float()).contiguous()
    out = torch.empty(rows.shape, dtype=dtype)
    _library().ernie_round_blocks(_ptr(rows), int(rows.dtype == torch.bfloat16), _ptr(out), int(dtype == torch.bfloat16),
                                  rows.shape[0], rows.shape[1], torch.get_num_threads())
    return out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int,
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """int8 or plain-packed int4 / int2 codes -> the (N, K) fp32 or bf16 weight, q * s or (u - z) * s (for
    longer inputs). int8 takes one scale per row (``group_size`` = K). ``out``: a contiguous CPU tensor of
    ``dtype`` with at least N K elements, written and returned as (N, K) (a scratch buffer a caller reuses)."""
    if dtype not in (torch.float32, torch.bfloat16) or bits not in (8, 4, 2):
        raise TypeError(f"native.dequantize writes fp32 or bf16 from int8 / int4 / int2 codes, not {dtype} from {bits} bits")
    N, K = _check_codes(qweight, scales, zeros, bits, group_size)
    if out is None:
        out = torch.empty(N, K, dtype=dtype)
    elif out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu" or out.numel() < N * K:
        raise ValueError(f"native.dequantize: out must be a contiguous CPU {dtype} tensor of at least {N * K} "
                         f"elements, got {out.dtype} {tuple(out.shape)} on {out.device}")
    else:
        out = out.view(-1)[:N * K].view(N, K)
    _library().ernie_dequantize_packed(_ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(out), N, K, group_size, bits,
                                       int(dtype == torch.bfloat16), torch.get_num_threads())
    return out


def quantize_symmetric(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A 2-D fp32 / bf16 CPU weight -> (int8 (N, K) or packed int4 (N, K/2) codes, float32 (N, K/group) scales),
    bit for bit what ``formats.quantize_packed`` computes for symmetric codes, in one pass. None when the
    kernels are off or the weight holds NaN / Inf (the caller's PyTorch path then does what it does)."""
    if (bits not in (8, 4) or w.dim() != 2 or w.dtype not in (torch.float32, torch.bfloat16)
            or w.device.type != "cpu" or w.shape[1] % group_size or group_size % (8 // bits) or not active()):
        return None
    w = w.detach().contiguous()
    N, K = w.shape
    codes = torch.empty(N, K * bits // 8, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.empty(N, K // group_size, dtype=torch.float32)
    bad = _library().ernie_quantize_symmetric(_ptr(w), int(w.dtype == torch.bfloat16), _ptr(codes), _ptr(scales),
                                              N, K, group_size, bits, torch.get_num_threads())
    return None if bad else (codes, scales)

"""Build and load ``ops.cpp``: the hot decode operators (``ernie_lab::linear``, ``::gemv``, ``::int8_int4``)
registered with PyTorch's dispatcher from C++.

A compiled decode step calls one of them per linear layer and token. Defined in Python (``torch.library.
custom_op`` around the ctypes calls of ``native.py``) a call costs about 11 us of Python on top of the
kernel; registered from C++ it is the dispatcher's own lookup and the kernel. ``quant.ops`` asks
:func:`load` once, on first use, and defines the Python operators instead when it returns False.

Built once per source / torch / compiler / CPU into ``$ERNIE_LAB_CACHE/native`` (like ``gemv.c``): ``gemv.c``
with the C compiler and native.py's flags, then ``ops.cpp`` against the headers and libraries of the
installed torch (``torch.utils.cpp_extension.include_paths``; no Python headers, no ninja), about half a
minute on two cores. ``ERNIE_LAB_CPP_OPS=0`` turns it off (the Python operators then serve), and
``ERNIE_LAB_NATIVE=0`` with the rest of the kit's C.

    load() -> bool            built (or found) and loaded; the three operators are registered
    why_unavailable()         why not, or None
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("ops.cpp")
CXX_FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp"]

_lock = threading.Lock()
_state: dict = {}


def _torch_paths() -> tuple[list[str], str]:
    from torch.utils import cpp_extension
    return cpp_extension.include_paths(), str(Path(torch.__file__).parent / "lib")


def _abi_flag() -> str:
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def _build(cxx: str, compiler: str, out: Path) -> None:
    """gemv.c to an object, then ops.cpp linked with it and torch's libraries, into ``out``."""
    includes, lib = _torch_paths()
    with tempfile.TemporaryDirectory() as work:
        gemv = str(Path(work) / "gemv.o")
        c_flags = [f for f in native.FLAGS if f != "-shared"]
        native.run_compiler([compiler, *c_flags, "-c", str(native.SOURCE), "-o", gemv], native.SOURCE.name)
        native.run_compiler([cxx, *CXX_FLAGS, _abi_flag(), *[f"-I{path}" for path in includes], str(SOURCE), gemv,
                             f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}", "-o", str(out)], SOURCE.name)


def load() -> bool:
    """Build (first time) and load ops.cpp; True when ``ernie_lab::linear / gemv / int8_int4`` come from it."""
    if "loaded" in _state or "error" in _state:
        return "loaded" in _state
    with _lock:
        if "loaded" in _state or "error" in _state:
            return "loaded" in _state
        try:
            if os.environ.get("ERNIE_LAB_CPP_OPS", "1") == "0":
                raise OSError("disabled by ERNIE_LAB_CPP_OPS=0")
            if not native.available():
                raise OSError(f"the C kernels are off or unbuilt: {native.why_unavailable()}")
            cxx, compiler = shutil.which(os.environ.get("CXX") or "c++") or shutil.which("g++"), native._compiler()
            if cxx is None or compiler is None:
                raise OSError("no C++ compiler (c++ or g++) on PATH")
            key = [SOURCE.read_bytes(), native.SOURCE.read_bytes(), cxx.encode(), compiler.encode(),
                   torch.__version__.encode(), _abi_flag().encode(), " ".join(CXX_FLAGS + native.FLAGS).encode()]
            path = native.cached_library("ops", key, lambda out: _build(cxx, compiler, out))
            torch.ops.load_library(str(path))
            _state["loaded"], _state["path"] = True, path
        except (OSError, RuntimeError) as err:
            _state["error"] = str(err)
    return "loaded" in _state


def why_unavailable() -> str | None:
    return _state.get("error")


def path() -> Path | None:
    return _state.get("path")

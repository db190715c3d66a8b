"""llama.cpp for the benchmarks and the interop check: its own converter, and greedy decoding through llama-cpp-python.

    llama_cpp_source()            llama.cpp's source tree, for convert_hf_to_gguf.py
    convert_to_gguf(folder, out)  an export (save_model's folder) -> one GGUF file, by llama.cpp's converter
    open_gguf(path)               a llama_cpp.Llama on that file (f32 KV cache by default)
    crash_on_load(path)           None if llama.cpp loads the file and decodes with it in a child process, else why not
    llama_greedy(llm, ids, n)     llama.cpp's greedy continuation of token ids

The converter reads the folder as a serving engine does: config.json, the safetensors, and the tokenizer's
files (tokenizer.model, tokenizer_config.json, added_tokens.json, chat_template.jinja) that
``ernie_lab.save_model`` writes beside them. For ERNIE 4.5 it splits Paddle's fused qkv / up_gate weights,
renames ``ernie.`` to ``model.``, stacks the MoE experts into one tensor per layer and drops MTP tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"  # the llama-cpp-python of pyproject's `bench` extra


def llama_cpp_source() -> Path:
    """llama.cpp's source tree (for convert_hf_to_gguf.py): $LLAMA_CPP_DIR, or the vendored copy inside the
    llama-cpp-python sdist, fetched once with pip into build/ (from the configured index, offline-friendly)."""
    if os.environ.get("LLAMA_CPP_DIR"):
        tree = Path(os.environ["LLAMA_CPP_DIR"])
        if not (tree / "convert_hf_to_gguf.py").is_file():
            raise FileNotFoundError(f"LLAMA_CPP_DIR={tree} holds no convert_hf_to_gguf.py (a llama.cpp checkout?)")
        return tree
    build = ROOT / "build" / "llama-cpp-src"
    tree = build / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        "--retries", "1", "-d", str(build), f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True)
        with tarfile.open(next(build.glob("llama_cpp_python-*.tar.gz"))) as archive:
            archive.extractall(build, filter="data")
    return tree


def convert_to_gguf(folder: Path, out: Path, outtype: str = "f32") -> Path:
    """llama.cpp's own convert_hf_to_gguf.py on ``folder``; its last output lines in the error if it fails."""
    done = subprocess.run([sys.executable, str(llama_cpp_source() / "convert_hf_to_gguf.py"), str(folder),
                           "--outtype", outtype, "--outfile", str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder}:\n{done.stderr[-2000:]}")
    return out


def open_gguf(path: Path, *, threads: int = 2, n_ctx: int = 512, f32_cache: bool = True):
    """A llama_cpp.Llama on ``path``; ``f32_cache`` keeps keys and values in f32 (llama.cpp's default is f16)."""
    import llama_cpp

    cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if f32_cache else {}
    return llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False,
                           **cache)


PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_threads=2, n_ctx=64, verbose=False)
llm.create_completion([1, 2, 3], max_tokens=2, temperature=0)
"""


def crash_on_load(path: Path) -> str | None:
    """Load ``path`` and decode two tokens in a child process: None if that worked, else what happened. A
    llama.cpp that crashes (seen: its AMX repacking of Q4_0 / Q8_0 weights, SIGSEGV on an Intel Xeon VM whose
    CPU lists AMX) would otherwise take the whole benchmark, and every row measured before it, down with it."""
    done = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    how = f"signal {-done.returncode}" if done.returncode < 0 else f"exit code {done.returncode}"
    return f"llama.cpp failed to load and run {path.name} ({how}): {done.stderr.strip()[-300:]}"


def llama_greedy(llm, ids: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """llama.cpp's greedy continuation of ``ids``: up to ``max_new_tokens`` tokens, the first stop id included."""
    llm.reset()  # no prefix reuse from an earlier prompt
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if token in stop_ids or len(out) == max_new_tokens:
            break
    return out

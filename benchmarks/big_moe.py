"""The text MoE at its real size on a 2-core, 24 GB machine: a few 21B-A3B layers against llama.cpp, then the whole model.

    python benchmarks/big_moe.py --part layers              # 4 layers at 21B-A3B widths vs llama.cpp
    python benchmarks/big_moe.py --part full                # the whole 21B-A3B: write 44 GB, load w4a16, decode
    python benchmarks/big_moe.py --part full --keep         # ... and keep the checkpoint folder
    python benchmarks/big_moe.py --part full --reuse DIR    # ... on a folder written before (skips the slow write)
    python benchmarks/big_moe.py --part heap                # a 6-layer cut loaded again and again: heap trims on / off
    python benchmarks/big_moe.py --quick                    # both parts at small widths (smoke test, no json)

Both parts write random weights (N(0, 0.02); norms 1, biases 0) as a bf16 safetensors checkpoint in the Hub's
layout, tensor by tensor straight into the files (never the whole model in memory; ``write_checkpoint``).

* ``--part layers``: the ERNIE-4.5-21B-A3B config cut to ``--layers`` layers (layer 0 dense, the rest MoE:
  64 experts of 1536, top-6, 2 shared). llama.cpp's converter turns it into a GGUF (F32) and llama.cpp
  quantizes it (BF16, Q8_0, Q4_0: ``quant.gguf_files``). Each pair (kit scheme, llama.cpp format) is loaded
  alone (two models of this size at once would not fit), the kit's model by ``load_model(quantize=...)``;
  batch-1 decode tok/s with ``--threads``, medians of ``--rounds`` interleaved rounds; the kit's rows eager
  (grouped expert dispatch) and compiled when ``generate(compile=True)`` takes an MoE model. The rows
  "w8a16+int8 head" and "w4a8+w4a8 head" quantize the LM head too (untied from the embedding), as llama.cpp's
  files do: at a few layers the 21B-A3B's bf16 head (530 MB) is most of a step's bytes.
* ``--part full``: the whole ERNIE-4.5-21B-A3B (and ``--models VL-28B-A3B`` when the disk has room), loaded
  in a fresh process with ``load_model(folder, dtype=bf16, quantize=scheme)``: load seconds and peak resident
  memory (VmHWM), then greedy decode tok/s (8-token prompt, ``--new`` tokens, ``--rounds`` rounds).

* ``--part heap``: a ``--heap-layers`` cut of the 21B-A3B loaded with quantize-on-read in ``--rounds`` pairs of
  fresh processes, one with ``ernie_lab.heap``'s trims and one without: the sampled peak of anonymous memory
  against the weights' bytes. Without the trims glibc's heap keeps the holes between codes and temporaries,
  and the peak wanders from run to run (it is why whole-model loads were killed out of memory).

Every kit row gets its bandwidth bound: measured streaming-read bandwidth / ``quant.decode_bytes`` (the bytes
one decode step reads: attention, dense MLP, shared experts, the router and only the k routed experts a
token visits, plus the head). Tok/s measured on a machine shared with other jobs are disturbed: compare
the ratios of one run, and rerun on an idle machine for absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import ernie_lab
from ernie_lab import architectures, quant
from ernie_lab.analysis import decode_cost, family
from ernie_lab.atomic import atomic_folder
from ernie_lab.io.hub_names import INDEX_FILE, is_transposed, lab_to_hub
from ernie_lab.io.loading import SAFETENSORS_DTYPES, available_memory
from ernie_lab.io.saving import split_into_shards
from ernie_lab.model import moe
from ernie_lab.model.config import parse_config
from ernie_lab.model.published import CONFIG_21B_A3B, CONFIG_VL_28B_A3B

from fast_decode import seconds  # benchmarks/fast_decode.py
from llama_cpp_tools import LLAMA_CPP_VERSION, crash_on_load  # benchmarks/llama_cpp_tools.py
from quant import decode_speed, gguf_files, llama_speed, quantize_head  # benchmarks/quant.py

RESULTS = Path(__file__).parent / "results" / "big_moe.json"
SCRATCH = Path(os.environ.get("BIG_MOE_SCRATCH", "/work/scratch-bigmoe"))
GiB = 1024**3

# kit scheme -> (the llama.cpp format it is compared with, the dtype of the model's float parts)
PAIRS = {"fp32": ("F32", torch.float32), "bf16": ("BF16", torch.bfloat16), "w8a16": ("Q8_0", torch.bfloat16),
         "w4a16": ("Q4_0", torch.bfloat16), "w4a8": ("Q4_0", torch.bfloat16),
         # the head quantized too (untied from the embedding), as llama.cpp's Q8_0 / Q4_0 files hold it: the
         # 21B-A3B's bf16 head is 530 MB, most of what a decode step of a few layers reads
         "w8a16+int8 head": ("Q8_0", torch.bfloat16), "w4a8+w4a8 head": ("Q4_0", torch.bfloat16)}
HEADS = {"+int8 head": "w8a16", "+w4a8 head": "w4a8"}
# llama.cpp's converter takes the shared experts' width to be intermediate_size // num_key_value_heads (true of
# the 21B-A3B: 12288 // 4 = 2 x 1536), so the small smoke-test shape keeps that relation: 256 // 2 = 1 x 128
QUICK_MOE = dict(CONFIG_21B_A3B, vocab_size=8192, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, moe_num_experts=8, moe_k=2, moe_intermediate_size=128, moe_num_shared_experts=1)
MODELS = {"21B-A3B": CONFIG_21B_A3B, "VL-28B-A3B": CONFIG_VL_28B_A3B}


# ------------------------------------------------------------------------------ random checkpoints
def cut_to(config: dict, layers: int) -> dict:
    """A text-MoE config.json table with only its first ``layers`` layers (layer 0 stays the dense one)."""
    return dict(config, num_hidden_layers=layers, moe_layer_end_index=layers - 1)


def hub_tensors(config: dict) -> dict[str, torch.Tensor]:
    """Hub name -> a meta tensor of the shape and dtype (bf16) the checkpoint stores: the model on meta, renamed."""
    with torch.device("meta"):
        model = architectures.build(parse_config(config))
    table = architectures.name_table(model.config)
    tied = model.config.get_text_config().tie_word_embeddings
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        shape = tensor.shape[::-1] if is_transposed(name, table) else tensor.shape
        tensors[lab_to_hub(name, table)] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    return tensors


def random_tensor(name: str, meta: torch.Tensor, seed: int) -> torch.Tensor:
    """N(0, 0.02) for matrices; ones for norm weights, zeros for biases (and the routers' correction biases)."""
    if meta.dim() >= 2:
        return torch.empty(meta.shape, dtype=meta.dtype).normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    fill = 1.0 if "norm" in name and name.endswith("weight") else 0.0
    return torch.full(meta.shape, fill, dtype=meta.dtype)


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], seed: int) -> None:
    """A safetensors file whose values are drawn one tensor at a time, right into the file (header first:
    8-byte length, JSON of {name: dtype, shape, data_offsets}, padded to 8 bytes, then the bytes in order)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, meta in tensors.items():
        size = meta.numel() * meta.element_size()
        header[name] = {"dtype": SAFETENSORS_NAMES[meta.dtype], "shape": list(meta.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
        for i, (name, meta) in enumerate(tensors.items()):
            handle.write(random_tensor(name, meta, seed + i).reshape(-1).view(torch.uint8).numpy().data)


def write_checkpoint(config: dict, folder: Path, seed: int = 0, shard_bytes: int = 5 * GiB) -> Path:
    """config.json, the shards and their index of a random bf16 checkpoint (atomic: all of it or nothing)."""
    tensors = hub_tensors(config)
    shards = split_into_shards(tensors, shard_bytes)
    weight_map, start = {}, time.perf_counter()
    with atomic_folder(folder) as staging:
        for n, shard in enumerate(shards, start=1):
            name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(staging / name, shard, seed=seed + 1_000_003 * n)
            weight_map.update(dict.fromkeys(shard, name))
            print(f"  wrote {name} ({sum(t.numel() for t in shard.values()) * 2 / GiB:.1f} GiB, "
                  f"{time.perf_counter() - start:.0f} s)", flush=True)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (staging / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
        raw = parse_config(config).to_dict()
        (staging / "config.json").write_text(json.dumps({**raw, "dtype": "bfloat16"}, indent=2) + "\n")
    return folder


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------------ speed
def compile_switches(model) -> tuple[dict, str]:
    """generate's switch for the compiled rows: the one-token step compiled, its experts one opaque operator."""
    return {"compile": True}, "torch.compile(fullgraph=True) of the one-token step (experts: ernie_lab::moe_experts)"


def kit_model(folder: Path, scheme: str):
    """The kit's row of ``scheme``: the checkpoint loaded (quantized on read), its float linears streaming."""
    dtype = PAIRS[scheme][1]
    body, head = split_head(scheme)
    model = ernie_lab.load_model(folder, dtype=dtype, quantize=None if body in ("fp32", "bf16") else body)
    if head:
        quantize_head(model, head)
    quant.stream_linears(model)
    return model


def split_head(scheme: str) -> tuple[str, str | None]:
    """'w4a8+w4a8 head' -> ('w4a8', 'w4a8'): the scheme of the body, and that of the head (None: it stays)."""
    for suffix, head in HEADS.items():
        if scheme.endswith(suffix):
            return scheme[: -len(suffix)], head
    return scheme, None


def known_schemes(schemes: list[str]) -> tuple[list[str], dict]:
    """The schemes quant knows (fp32 / bf16 are no quantization); a message for each one skipped."""
    kept, skipped = [], {}
    for scheme in schemes:
        body = split_head(scheme)[0]
        if body in ("fp32", "bf16") or body in quant.SCHEMES:
            kept.append(scheme)
        else:
            skipped[scheme] = f"skipped: ernie_lab.quant has no scheme {scheme!r} (known: {sorted(quant.SCHEMES)})"
            print(f"{scheme}: {skipped[scheme]}")
    return kept, skipped


def layers_part(args, bandwidth: float) -> dict:
    import llama_cpp

    config = cut_to(QUICK_MOE if args.quick else CONFIG_21B_A3B, args.layers)
    schemes, rows = known_schemes(args.schemes)
    work = Path(tempfile.mkdtemp(prefix="layers-", dir=SCRATCH))
    try:
        folder = write_checkpoint(config, work / "kit-checkpoint")  # gguf_files uses and deletes work/checkpoint
        base = ernie_lab.load_model(folder, dtype=torch.bfloat16)
        files = gguf_files(base, work)  # F32 by llama.cpp's converter, then BF16 / Q8_0 / Q4_0 by its quantizer
        del base
        prompt = torch.randint(3, config["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
        for scheme in schemes:
            rows.update(measure_pair(folder, scheme, files[PAIRS[scheme][0]], prompt, args, bandwidth, llama_cpp))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"config": config, "rows": rows,
            "active_params": family.count_params(config).active, "total_params": family.count_params(config).total,
            "llama_cpp": f"llama-cpp-python {LLAMA_CPP_VERSION}: GGUF by convert_hf_to_gguf.py (F32) from the same "
                         "checkpoint, quantized by llama.cpp (Q4_0 keeps its default Q6_K head)"}


def measure_pair(folder: Path, scheme: str, gguf: Path, prompt, args, bandwidth: float, llama_cpp) -> dict:
    """One kit scheme (eager, and compiled when possible) and its llama.cpp format, in interleaved rounds."""
    fmt, needed = PAIRS[scheme][0], 2 * gguf.stat().st_size + 2 * GiB  # the kit's model is about the GGUF's size
    free = available_memory(torch.device("cpu"))
    if free is not None and needed > free:
        note = (f"skipped: the pair needs about {needed / GiB:.1f} GiB of memory (two models of "
                f"{gguf.stat().st_size / GiB:.1f} GiB and room), {free / GiB:.1f} GiB are free; use fewer --layers")
        print(f"{scheme}: {note}")
        return {scheme: {"note": note}}
    crashed = crash_on_load(gguf)
    if crashed:
        print(f"{scheme}: skipped, {crashed}")
        return {scheme: {"note": f"skipped: {crashed}"}}
    model = kit_model(folder, scheme)
    switches, compile_note = compile_switches(model)
    llm = llama_cpp.Llama(str(gguf), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=256, verbose=False)
    speeds = {scheme: lambda: decode_speed(model, prompt, args.new),
              f"llama.cpp {fmt} (vs {scheme})": lambda: llama_speed(llm, prompt[0].tolist(), args.new)}
    with contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        seconds(model, prompt, 2, switches)  # compiles the step once
    compile_note += f", first call {time.perf_counter() - start:.0f} s"
    speeds[f"{scheme} compiled"] = lambda: decode_speed(model, prompt, args.new, **switches)
    for speed in speeds.values():
        speed()  # warm-up
    rounds = {name: [] for name in speeds}
    for _ in range(args.rounds):
        for name, speed in speeds.items():
            rounds[name].append(speed())
    step_bytes = quant.decode_bytes(model)
    rows = {}
    for name, values in rounds.items():
        row = {"decode_tok_s": statistics.median(values), "decode_tok_s_rounds": values}
        if not name.startswith("llama.cpp"):
            row.update(bytes_per_token=step_bytes, bandwidth_bound_tok_s=bandwidth / step_bytes,
                       weight_bytes=quant.weight_bytes(model))
        rows[name] = row
    llama = rows[f"llama.cpp {fmt} (vs {scheme})"]
    llama["file_bytes"] = gguf.stat().st_size
    for name in rounds:
        if not name.startswith("llama.cpp"):
            rows[name][f"ratio_vs_llama_cpp_{fmt}"] = rows[name]["decode_tok_s"] / llama["decode_tok_s"]
    rows[f"{scheme} compiled"]["note"] = compile_note
    for name, row in rows.items():
        print(f"{name:32s} " + (f"{row['decode_tok_s']:7.2f} tok/s" if "decode_tok_s" in row else row["note"])
              + (f"  (bandwidth bound {row['bandwidth_bound_tok_s']:.2f}, ratio vs llama.cpp "
                 f"{row[f'ratio_vs_llama_cpp_{fmt}']:.2f})" if "bandwidth_bound_tok_s" in row else ""), flush=True)
    return rows


# ------------------------------------------------------------------------------ the whole model
def status_bytes(*names: str) -> list[int]:
    """Fields of /proc/self/status (VmHWM, VmRSS, RssAnon, ...) in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return [int(fields[name].split()[0]) * 1024 for name in names]


class AnonymousPeak:
    """The peak of RssAnon (memory the process allocated, not file pages mapped from the checkpoint), sampled
    every 20 ms in a thread. VmHWM also counts the safetensors pages the loader maps: the kernel drops those
    under memory pressure, so on an idle machine VmHWM overstates what the load needs."""

    def __init__(self):
        self.peak, self.running = 0, True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self):
        while self.running:
            self.peak = max(self.peak, status_bytes("RssAnon")[0])
            time.sleep(0.02)

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak


def peak_memory(anonymous: AnonymousPeak | None = None) -> dict:
    """This process's peak and current resident memory (VmHWM, VmRSS) in bytes, and the sampled anonymous peak."""
    peak, rss = status_bytes("VmHWM", "VmRSS")
    return {"peak_rss": peak, "rss": rss, **({"peak_anonymous": anonymous.peak} if anonymous else {})}


def load_and_decode(folder: Path, scheme: str, new_tokens: int, rounds: int) -> dict:
    """In a fresh process: load with quantize-on-read, then greedy decode; what it cost."""
    anonymous = AnonymousPeak()
    start = time.perf_counter()
    model = ernie_lab.load_model(folder, dtype=torch.bfloat16, quantize=scheme)
    loaded = {"load_s": time.perf_counter() - start,
              **{f"after_load_{k}": v for k, v in peak_memory(anonymous).items()}}
    quant.stream_linears(model)  # the bf16 head on the streaming kernel, as in the other rows
    vocab = model.config.get_text_config().vocab_size
    prompt = torch.randint(3, vocab, (1, 8), generator=torch.Generator().manual_seed(1))
    decode_speed(model, prompt, 3)  # warm-up
    switches, _ = compile_switches(model)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        seconds(model, prompt, 2, switches)  # compiles the step once
    compile_s = time.perf_counter() - start
    speeds, compiled, unbound = [], [], []
    for _ in range(rounds):  # eager, compiled and compiled with the experts through dispatch, interleaved
        speeds.append(decode_speed(model, prompt, new_tokens))
        compiled.append(decode_speed(model, prompt, new_tokens, **switches))
        with moe.experts_unbound():
            unbound.append(decode_speed(model, prompt, new_tokens, **switches))
    return {**loaded, "decode_tok_s": statistics.median(speeds), "decode_tok_s_rounds": speeds,
            "compiled_decode_tok_s": statistics.median(compiled), "compiled_decode_tok_s_rounds": compiled,
            "compiled_experts_unbound_tok_s": statistics.median(unbound),
            "compiled_experts_unbound_tok_s_rounds": unbound,
            "compile_s": compile_s,
            "bytes_per_token": quant.decode_bytes(model), "weight_bytes": quant.weight_bytes(model),
            **{f"after_decode_{k}": v for k, v in peak_memory(anonymous).items()}}


def heap_probe(folder: Path, scheme: str, trim: bool) -> dict:
    """In a fresh process: one quantize-on-read load, with or without ``ernie_lab.heap``'s trims."""
    from ernie_lab import heap
    if not trim:
        heap.release_freed_memory = lambda: False
    anonymous, start = AnonymousPeak(), time.perf_counter()
    model = ernie_lab.load_model(folder, dtype=torch.bfloat16, quantize=scheme)
    return {"load_s": time.perf_counter() - start, "peak_anonymous": anonymous.stop(),
            "weight_bytes": quant.weight_bytes(model)}


def heap_part(args) -> dict:
    config, scheme = cut_to(CONFIG_21B_A3B, args.heap_layers), "w4a16"
    folder = write_checkpoint(config, SCRATCH / f"heap-cut-{args.heap_layers}")
    runs = {"trim": [], "no trim": []}
    try:
        for _ in range(args.rounds):
            for mode in runs:
                result = child_result(["--heap-child", str(folder), "--schemes", scheme, "--threads", str(args.threads)]
                                      + (["--no-trim"] if mode == "no trim" else []))
                if "error" in result:
                    raise RuntimeError(f"the heap probe ({mode}) failed: {result['error']}")
                runs[mode].append(result)
                print(f"heap {mode:8s} peak {runs[mode][-1]['peak_anonymous'] / GiB:.2f} GiB, load "
                      f"{runs[mode][-1]['load_s']:.1f} s", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {"layers": args.heap_layers, "scheme": scheme, "weight_bytes": runs["trim"][0]["weight_bytes"],
            **{mode: {"peak_anonymous": [r["peak_anonymous"] for r in rows], "load_s": [r["load_s"] for r in rows]}
               for mode, rows in runs.items()}}


def child_result(flags: list[str]) -> dict:
    """This script in a new Python process with ``flags`` (a child part): the JSON its last line prints, or
    {"error": ...} with the end of its stderr."""
    done = subprocess.run([sys.executable, __file__, *flags], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_fresh_process(folder: Path, scheme: str, args) -> dict:
    """``load_and_decode`` in a new Python process, so its peak memory is the load's alone."""
    return child_result(["--child", str(folder), "--schemes", scheme, "--new", str(args.new),
                         "--rounds", str(args.rounds), "--threads", str(args.threads)])


def full_part(args, bandwidth: float) -> dict:
    results = {}
    for name in args.models:
        config = cut_to(QUICK_MOE, 4) if args.quick else MODELS[name]
        results[name] = one_full_model(name, config, args, bandwidth)
    return results


def one_full_model(name: str, config: dict, args, bandwidth: float) -> dict:
    size = family.weight_bytes(config, "bf16")
    result = {"checkpoint_bytes_bf16": size, "active_params": family.count_params(config).active}
    schemes, result["skipped"] = known_schemes([s for s in args.schemes if s not in ("fp32", "bf16")])
    folder = args.reuse
    if folder is None:
        free = free_disk(SCRATCH)
        if free < size + 8 * GiB:
            result["not_run"] = (f"the disk has {free / GiB:.0f} GiB free, the bf16 checkpoint needs "
                                 f"{size / GiB:.0f} GiB plus 8 GiB of room")
            print(f"{name}: {result['not_run']}")
            return result
        folder = SCRATCH / f"random-{name}"
        print(f"{name}: writing {size / GiB:.1f} GiB of random bf16 weights to {folder}", flush=True)
        start = time.perf_counter()
        write_checkpoint(config, folder)
        result["write_s"] = time.perf_counter() - start
    try:
        for scheme in schemes:
            row = in_fresh_process(folder, scheme, args)
            if "bytes_per_token" in row:
                row["bandwidth_bound_tok_s"] = bandwidth / row["bytes_per_token"]
                row["fraction_of_bound"] = row["decode_tok_s"] / row["bandwidth_bound_tok_s"]
                row["compiled_fraction_of_bound"] = row["compiled_decode_tok_s"] / row["bandwidth_bound_tok_s"]
                print(f"{name} {scheme}: load {row['load_s']:.0f} s, peak {row['after_load_peak_rss'] / GiB:.2f} GiB "
                      f"(after decode {row['after_decode_peak_rss'] / GiB:.2f}; anonymous "
                      f"{row.get('after_decode_peak_anonymous', float('nan')) / GiB:.2f}), decode {row['decode_tok_s']:.2f} tok/s "
                      f"= {row['fraction_of_bound']:.0%} of its bound {row['bandwidth_bound_tok_s']:.2f}; compiled "
                      f"{row['compiled_decode_tok_s']:.2f} tok/s = {row['compiled_fraction_of_bound']:.0%} (experts "
                      f"unbound {row['compiled_experts_unbound_tok_s']:.2f})", flush=True)
            else:
                print(f"{name} {scheme}: {row['error']}")
            result[scheme] = row
    finally:
        if args.reuse is None and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
            result["checkpoint"] = "deleted after the run"
    return result


# ------------------------------------------------------------------------------ main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("layers", "full", "both", "heap"), default="both")
    parser.add_argument("--schemes", nargs="+", default=None,
                        help="kit schemes (layers: fp32 bf16 w8a16 w4a16 w4a8; full: w4a16 w4a8)")
    parser.add_argument("--layers", type=int, default=4, help="layers of the cut 21B-A3B (layers part)")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=["21B-A3B"], help="full part")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new", type=int, default=None, help="new tokens per timing (32 layers, 16 full)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the full checkpoint folder")
    parser.add_argument("--reuse", type=Path, default=None, help="a full checkpoint folder written before")
    parser.add_argument("--quick", action="store_true", help="small widths, both parts, no json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--heap-layers", type=int, default=6, help="layers of the cut the heap part loads")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--heap-child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-trim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child is not None:
        print(json.dumps(load_and_decode(args.child, args.schemes[0], args.new, args.rounds)))
        return
    if args.heap_child is not None:
        print(json.dumps(heap_probe(args.heap_child, args.schemes[0], trim=not args.no_trim)))
        return
    SCRATCH.mkdir(parents=True, exist_ok=True)
    bandwidth = decode_cost.read_bandwidth(512)  # bytes/s on args.threads threads
    print(f"streaming read bandwidth: {bandwidth / 1e9:.1f} GB/s, {args.threads} threads", flush=True)
    result = json.loads(args.out.read_text()) if args.out.is_file() and not args.quick else {}
    result.update(date=datetime.date.today().isoformat(), threads=args.threads, torch=torch.__version__,
                  read_bandwidth_GB_s=bandwidth / 1e9, native_kernels=quant.native.info(),
                  load_average_at_start=os.getloadavg()[0])
    if args.part in ("layers", "both"):
        run = argparse.Namespace(**{**vars(args), "new": args.new or (16 if args.quick else 32),
                                    "schemes": args.schemes or list(PAIRS),
                                    "layers": 2 if args.quick else args.layers})
        result["layers"] = {"layers": run.layers, "new_tokens": run.new, "rounds": run.rounds,
                            "read_bandwidth_GB_s": bandwidth / 1e9, **layers_part(run, bandwidth)}
    if args.part in ("full", "both"):
        run = argparse.Namespace(**{**vars(args), "new": args.new or 16, "schemes": args.schemes or ["w4a16", "w4a8"]})
        result["full"] = {"new_tokens": run.new, "rounds": run.rounds, "prompt_tokens": 8,
                          "read_bandwidth_GB_s": bandwidth / 1e9, **full_part(run, bandwidth)}
    if args.part == "heap":
        result["heap"] = heap_part(args)
    if not args.quick:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

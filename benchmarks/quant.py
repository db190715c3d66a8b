"""Quantized inference: quality, memory and CPU decode speed per scheme, against torchao and llama.cpp.

    python benchmarks/quant.py            # 0.3B shape, random weights, 2 threads; writes benchmarks/results/quant.json
    python benchmarks/quant.py --quick    # a small shape (vocabulary 8192, so the tiny tokenizer fits llama.cpp): a smoke test

* quality: relative logit error ||z_q - z|| / ||z|| on one 64-token batch and greedy-token agreement
  (4 prompts x 24 new tokens) against the unquantized model;
* memory: weight bytes held in memory per scheme (``quant.weight_bytes``) and, by arithmetic, for every
  checkpoint of the family (``family.weight_bytes``);
* speed: batch-1 decode tokens/s = (n - 1) / (time(n new) - time(1 new)), median of interleaved rounds
  (every row once per round). The kit's rows run its streaming kernels (``quant.native``); the
  "(PyTorch kernels)" rows are the same models on PyTorch's kernels only. Each row also gets its
  bandwidth bound: the measured streaming-read bandwidth / the weight bytes one decode step reads.
  Peers: torchao (``Int8WeightOnlyConfig``, ``PrototypeInt4WeightOnlyConfig(group_size=128)``) and
  llama.cpp through ``llama_cpp`` when it is importable and a GGUF can be converted (else skipped with a
  message). The targets of the issue are printed beside the ratios, met or not. w4a8 (int4 codes, bf16
  model, each linear's input rounded to int8 per block of 32) is the kit's counterpart of llama.cpp's
  Q4_0 x Q8_0 dot product; it has no "(PyTorch kernels)" row (PyTorch has no int8 x int4 CPU kernel: it
  would run the reference). The kit keeps the LM head in bf16 by default (212 MB of the 0.3B's step);
  llama.cpp quantizes it (Q8_0 in Q8_0 files, Q6_K in Q4_0 ones). The "+int8 head" rows give the head an
  int8 (w8a16) copy and "+w4a8 head" an int4 one, so the bytes read per token match more closely.
* the compiled path (issue 26): every kit row again with ``generate(..., compile=True)`` (static KV cache,
  one compiled decode step; compiled once per row, its seconds recorded, greedy tokens checked against
  eager); the per-token overhead floor eager and compiled; and the prefill of a 512-token prompt, eager
  and compiled (``compile_prefill=True``), against llama.cpp's prompt evaluation at each precision
  pairing (``PAIRINGS``), medians of interleaved rounds.

The full run compiles about a dozen graphs of the 0.3B (a minute or two each on 2 cores while inductor's
on-disk cache is cold, much less on a second run); 3 rounds by default (5 before the compiled rows came)
keep its length down.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ernie_lab
from ernie_lab import architectures, family, quant
from ernie_lab.analysis import decode_cost
from ernie_lab.model.published import CHECKPOINTS
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.fast_decode import compiled_step
from ernie_lab.model.fast_prefill import compiled_prefill
from fast_decode import seconds  # benchmarks/fast_decode.py
from llama_cpp_tools import LLAMA_CPP_VERSION, convert_to_gguf, crash_on_load  # benchmarks/llama_cpp_tools.py

RESULTS = Path(__file__).parent / "results" / "quant.json"
PREFILL_TOKENS = 512
# (kit row, llama.cpp row) at one precision: the compiled-decode and prefill comparisons of issue 26.
# New schemes (w4a8 vs Q4_0) join by adding a pair here.
PAIRINGS = [("fp32", "llama.cpp F32"), ("bf16", "llama.cpp BF16"), ("w8a16", "llama.cpp Q8_0"),
            ("w8a16+int8 head", "llama.cpp Q8_0"),
            ("w4a16", "llama.cpp Q4_0"), ("w4a16+int8 head", "llama.cpp Q4_0"),
            ("w4a8", "llama.cpp Q4_0"), ("w4a8+int8 head", "llama.cpp Q4_0"), ("w4a8+w4a8 head", "llama.cpp Q4_0")]


def random_model(config: ErnieConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = architectures.build(config).eval()
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model


def quantize_head(model: nn.Module, scheme: str) -> None:
    """Untie the LM head from the embedding and quantize it with ``scheme`` (w8a16: int8, w4a8: int4); the
    embedding stays as it is (a decode step reads one row of it), as llama.cpp quantizes its output matrix."""
    model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
    quant.quantize(model, scheme, skip=("embed",), filter="lm_head")


def variants(base: nn.Module) -> dict:
    """name -> (a function building that model from the fp32 base, whether the kit's own kernels run).

    The kit's rows run its streaming decode kernels (``quant.native``): ``quantize`` uses them inside every
    QuantLinear, and ``stream_linears`` puts the layers that stay in fp32 / bf16 (the LM head) on them.
    The "(PyTorch kernels)" rows are the same models with ``native.off()``: PyTorch's own kernels only."""
    def float_model(dtype, streaming):
        def build():
            model = copy.deepcopy(base).to(dtype)
            if streaming:
                quant.stream_linears(model)
            return model
        return build

    def scheme(name, head=None, dtype=torch.bfloat16):
        def build():
            model = copy.deepcopy(base).to(dtype)
            quant.quantize(model, name)
            if head:
                quantize_head(model, head)
            quant.stream_linears(model)  # what stays in full precision (the head) streams too
            return model
        return build

    def torchao(kind):
        def build():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
            model = copy.deepcopy(base).to(torch.bfloat16)
            config = Int8WeightOnlyConfig() if kind == "int8" else PrototypeInt4WeightOnlyConfig(group_size=128)
            quantize_(model, config, filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "lm_head")
            return model
        return build

    return {"fp32": (float_model(torch.float32, True), True), "bf16": (float_model(torch.bfloat16, True), True),
            "w8a16": (scheme("w8a16"), True), "w8a16+int8 head": (scheme("w8a16", "w8a16"), True),
            "w4a16": (scheme("w4a16"), True),
            "w4a16+int8 head": (scheme("w4a16", "w8a16"), True),
            "w8a8": (scheme("w8a8", dtype=torch.float32), True), "w2a16": (scheme("w2a16"), True),
            "w4a8": (scheme("w4a8"), True), "w4a8+int8 head": (scheme("w4a8", "w8a16"), True),
            "w4a8+w4a8 head": (scheme("w4a8", "w4a8"), True),
            "fp32 (PyTorch kernels)": (float_model(torch.float32, False), False),
            "bf16 (PyTorch kernels)": (float_model(torch.bfloat16, False), False),
            "w8a16 (PyTorch kernels)": (scheme("w8a16"), False),
            "w4a16 (PyTorch kernels)": (scheme("w4a16"), False),
            "w4a16+int8 head (PyTorch kernels)": (scheme("w4a16", "w8a16"), False),
            "w8a8 (PyTorch kernels)": (scheme("w8a8", dtype=torch.float32), False),
            "w2a16 (PyTorch kernels)": (scheme("w2a16"), False),
            "torchao int8 (Int8WeightOnlyConfig)": (torchao("int8"), False),
            "torchao int4 (PrototypeInt4WeightOnlyConfig g128)": (torchao("int4"), False)}


def overhead_floor(config: ErnieConfig, prompt, new_tokens: int, rounds: int) -> dict:
    """Milliseconds per decode token of a model with the 0.3B's depth, heads and call pattern but tiny widths
    (its weights are read in microseconds): the per-token cost of everything but reading the weights,
    eager and compiled (rounds interleaved), and the seconds the compiled step took to compile."""
    narrow = ErnieConfig(num_hidden_layers=config.num_hidden_layers, hidden_size=128, intermediate_size=256,
                         vocab_size=1024, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = random_model(narrow).to(torch.bfloat16)
    quant.stream_linears(model)
    small = prompt.clamp(max=narrow.vocab_size - 1)
    compile_s = compile_decode(model, small, new_tokens)["compile_s"]
    decode_speed(model, small, 4)
    ms = {"eager": [], "compiled": []}
    for _ in range(rounds):
        ms["eager"].append(1e3 / decode_speed(model, small, new_tokens))
        ms["compiled"].append(1e3 / decode_speed(model, small, new_tokens, compile=True))
    return {mode: statistics.median(v) for mode, v in ms.items()} | {"compile_s": compile_s}


def decode_time(model, prompt, new_tokens: int, **switches) -> float:
    """Seconds of one ``generate`` call; ``switches``: compile=True, compile_prefill=True."""
    return seconds(model, prompt, new_tokens, switches)[0]


def _kit_speed(model, streaming: bool, prompt, new_tokens: int, **switches) -> float:
    with contextlib.nullcontext() if streaming else quant.native.off():
        return decode_speed(model, prompt, new_tokens, **switches)


def decode_speed(model, prompt, new_tokens: int, **switches) -> float:
    """Decode tok/s = (n - 1) / (t(n new) - t(1 new)): the prefill cancels out."""
    return (new_tokens - 1) / (decode_time(model, prompt, new_tokens, **switches)
                               - decode_time(model, prompt, 1, **switches))


def compile_decode(model, prompt, new_tokens: int) -> dict:
    """Compile ``model``'s decode step (the first ``compile=True`` call); its seconds, and whether its greedy
    tokens equal eager's on ``prompt``."""
    with contextlib.redirect_stdout(io.StringIO()):  # generate prints the compile time; it is recorded here
        compiled = ernie_lab.generate(model, prompt, new_tokens, eos_token_id=[], compile=True)
    eager = ernie_lab.generate(model, prompt, new_tokens, eos_token_id=[])
    return {"compile_s": compiled_step(model).compile_seconds, "compiled_greedy_identical": torch.equal(eager, compiled)}


def compile_prefill(model, prompt) -> dict:
    """Compile ``model``'s prefill (the first ``compile_prefill=True`` call); its seconds, and whether it picks
    eager's first token."""
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = ernie_lab.generate(model, prompt, 1, eos_token_id=[], compile_prefill=True)
    eager = ernie_lab.generate(model, prompt, 1, eos_token_id=[])
    return {"prefill_compile_s": compiled_prefill(model).compile_seconds,
            "compiled_prefill_same_token": torch.equal(eager, compiled)}


def quality(model, reference_logits, ids, prompts, reference_tokens) -> dict:
    with torch.inference_mode():
        logits = model(ids).logits.float()
    tokens = ernie_lab.generate(model, prompts, reference_tokens.shape[1], eos_token_id=[])[:, prompts.shape[1]:]
    return {"rel_logit_error": float((logits - reference_logits).norm() / reference_logits.norm()),
            "greedy_agreement": float((tokens == reference_tokens).float().mean())}


def family_memory() -> dict:
    rows = {}
    for name, ckpt in CHECKPOINTS.items():
        if name.endswith("-Base"):
            continue
        rows[name] = {p: family.weight_bytes(ckpt.config, p) for p in ("bf16", "fp8", "int8", "int4", "2bit")}
    return rows


LLAMA_CPP_FORMATS = ("F32", "BF16", "Q8_0", "Q4_0")
TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "tiny-tokenizer"


def gguf_files(base: nn.Module, work: Path) -> dict[str, Path]:
    """The random checkpoint -> GGUF at F32 (llama.cpp's converter), then BF16 / Q8_0 / Q4_0 (llama.cpp's
    quantizer; Q4_0 keeps the output head at Q6_K, as llama.cpp does by default). The export carries the
    tiny tokenizer (save_model writes its files; llama.cpp pads the vocabulary to the config's)."""
    import shutil

    import llama_cpp

    folder = work / "checkpoint"
    ernie_lab.save_model(base, folder, tokenizer=ernie_lab.load_tokenizer(TINY_TOKENIZER))
    files = {"F32": convert_to_gguf(folder, work / "model-f32.gguf")}
    shutil.rmtree(folder)
    for fmt in LLAMA_CPP_FORMATS[1:]:
        files[fmt] = work / f"model-{fmt.lower()}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{fmt}")
        params.nthread = 2
        if llama_cpp.llama_model_quantize(str(files["F32"]).encode(), str(files[fmt]).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize to {fmt}")
    return files


def llama_decode_time(llm, prompt: list[int], new_tokens: int) -> float:
    llm.reset()  # no prefix reuse: every round evaluates the prompt again, as ernie_lab.generate does
    start = time.perf_counter()
    for count, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True), start=1):
        if count == new_tokens:
            break
    return time.perf_counter() - start


def llama_cpp_models(base: nn.Module, work: Path, threads: int):
    """{"llama.cpp F32": (Llama, file bytes), ...} on GGUFs converted from ``base`` (a message for a format that
    llama.cpp crashed on), or a message saying why not."""
    try:
        import llama_cpp
    except ImportError:
        return ("skipped: llama-cpp-python is not installed (`make bench` installs the `bench` extra, which builds "
                "it from source: several minutes on 2 cores)")
    try:
        files = gguf_files(base, work)
    except Exception as err:  # no converter source, or a conversion error: say so, keep the run
        return f"skipped: no GGUF ({type(err).__name__}: {str(err)[:200]})"
    crashes = {fmt: crash_on_load(path) for fmt, path in files.items()}   # a message where llama.cpp crashed
    return {f"llama.cpp {fmt}": crashes[fmt] or (llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads,
                                                 n_ctx=2 * PREFILL_TOKENS, n_batch=PREFILL_TOKENS, verbose=False),
                                                 path.stat().st_size)
            for fmt, path in files.items()}


def llama_speed(llm, prompt: list[int], new_tokens: int) -> float:
    return (new_tokens - 1) / (llama_decode_time(llm, prompt, new_tokens) - llama_decode_time(llm, prompt, 1))


def compiled_decode_timers(name: str, model, row: dict, prompt, new_tokens: int) -> dict:
    """Compile a kit row's decode step (``row`` gets its seconds and the greedy check); its timer."""
    row |= compile_decode(model, prompt, new_tokens)
    decode_speed(model, prompt, 4, compile=True)  # warm-up
    print(f"{name}: decode step compiled in {row['compile_s']:.1f} s", flush=True)
    return {(name, "compiled_decode_tok_s"): lambda: decode_speed(model, prompt, new_tokens, compile=True)}


def prefill_timers(name: str, model, row: dict, prompt, compiled: bool = True) -> dict:
    """A kit row's prefill of ``prompt`` (tokens/s), eager and (``compiled``) compiled, its compile seconds in
    ``row``; the fp32 and bf16 rows also record the share of matmuls in the eager prefill."""
    if name in ("fp32", "bf16"):
        row["prefill_gemm_share"] = gemm_share(model, prompt)
    tokens = prompt.shape[1]
    timers = {(name, "prefill_tok_s"): lambda: tokens / decode_time(model, prompt, 1)}
    if compiled:
        row |= compile_prefill(model, prompt)
        print(f"{name}: prefill compiled in {row['prefill_compile_s']:.1f} s", flush=True)
        timers[name, "compiled_prefill_tok_s"] = lambda: tokens / decode_time(model, prompt, 1, compile_prefill=True)
    return timers


def llama_prefill_time(llm, prompt: list[int]) -> float:
    """Seconds of llama.cpp's prompt evaluation (one batch of ``len(prompt)`` tokens, the last one's logits)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    return time.perf_counter() - start


def interleaved(rows: dict, timers: dict, rounds: int, label: str) -> None:
    """``timers``: {(row name, key): a function returning one measurement}. Every timer runs once per round
    (so drifts of the machine hit all); ``rows[name][key]`` gets the median, ``key + "_rounds"`` every value."""
    values = {where: [] for where in timers}
    for round_ in range(rounds):
        for where, timer in timers.items():
            values[where].append(timer())
        print(f"{label}: round {round_ + 1}/{rounds} done", flush=True)
    for (name, key), v in values.items():
        rows[name][key + "_rounds"] = v
        rows[name][key] = statistics.median(v)


def gemm_share(model, prompt) -> float:
    """The share of an eager prefill's CPU time spent in matrix multiplications (torch.profiler, one run)."""
    with torch.profiler.profile() as profile:
        ernie_lab.generate(model, prompt, 1, eos_token_id=[])
    events = profile.key_averages()
    matmuls = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu")
    return sum(e.self_cpu_time_total for e in events if e.key in matmuls) / sum(e.self_cpu_time_total for e in events)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the full run writes its json")
    parser.add_argument("--eager-prefill-only", action="store_true",
                        help="time the 512-token prefill eager only (compiling it costs minutes per row)")
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only these rows of the kit and its PyTorch peers (all by default; llama.cpp always runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ErnieConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=768, vocab_size=8192,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64) if args.quick else ErnieConfig()
    base = random_model(config)
    ids = torch.randint(3, config.vocab_size, (1, 64))
    prompts = torch.randint(3, config.vocab_size, (4, 8))
    with torch.inference_mode():
        reference_logits = base(ids).logits.float()
    reference_tokens = ernie_lab.generate(base, prompts, 24, eos_token_id=[])[:, 8:]
    prompt1, new = torch.randint(3, config.vocab_size, (1, 16)), 16 if args.quick else 32
    long_prompt = torch.randint(3, config.vocab_size, (1, PREFILL_TOKENS))
    pairs = dict(PAIRINGS)

    bandwidth = decode_cost.read_bandwidth(512)  # bytes/s, args.threads threads
    print(f"streaming read bandwidth: {bandwidth / 1e9:.1f} GB/s; the kit's kernels: {quant.native.info()}")
    floor = overhead_floor(config, prompt1, new, args.rounds)  # first: later, a dozen 0.3B models fill the memory
    rows, built, speeds, prefills = {}, variants(base), {}, {}
    if args.rows is not None:
        unknown = sorted(set(args.rows) - set(built))
        if unknown:
            raise SystemExit(f"--rows: unknown {unknown}; the rows are {sorted(built)}")
        built = {name: value for name, value in built.items() if name in args.rows}
    for name, (build, streaming) in built.items():
        with contextlib.nullcontext() if streaming else quant.native.off():
            try:
                model = build()
            except Exception as err:  # a peer that does not run here: say why, keep going
                rows[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
                print(f"{name}: skipped ({rows[name]['error']})")
                continue
            rows[name] = {"weight_bytes": quant.weight_bytes(model), "bytes_per_token": quant.decode_bytes(model),
                          **quality(model, reference_logits, ids, prompts, reference_tokens)}
            decode_speed(model, prompt1, 4)  # warm-up (PyTorch's int4 kernel re-tiles its codes on the first call)
        speeds[name, "decode_tok_s"] = (lambda m=model, s=streaming: _kit_speed(m, s, prompt1, new))
        if streaming:  # a kit row: the compiled decode step too, and (paired rows) the prefill
            speeds |= compiled_decode_timers(name, model, rows[name], prompt1, new)
            if name in pairs:
                prefills |= prefill_timers(name, model, rows[name], long_prompt, not args.eager_prefill_only)
    work = tempfile.TemporaryDirectory(prefix="gguf-")
    peers = llama_cpp_models(base, Path(work.name), args.threads)
    llama_note = peers if isinstance(peers, str) else (
        f"llama-cpp-python {LLAMA_CPP_VERSION}, GGUF converted from the same random checkpoint by llama.cpp's "
        "convert_hf_to_gguf.py (F32) and quantized by llama.cpp (BF16, Q8_0, Q4_0 with its default Q6_K head)")
    if not isinstance(peers, str):
        for name, peer in peers.items():
            if isinstance(peer, str):
                rows[name] = {"error": peer}
                print(f"{name}: skipped ({peer})", flush=True)
                continue
            llm, size = peer
            rows[name] = {"file_bytes": size}
            llama_speed(llm, prompt1[0].tolist(), 4)  # warm-up
            speeds[name, "decode_tok_s"] = (lambda m=llm: llama_speed(m, prompt1[0].tolist(), new))
            if name in pairs.values():
                llama_prefill_time(llm, long_prompt[0].tolist())  # warm-up
                prefills[name, "prefill_tok_s"] = (
                    lambda m=llm: PREFILL_TOKENS / llama_prefill_time(m, long_prompt[0].tolist()))
    print("llama.cpp:", llama_note)

    interleaved(rows, speeds, args.rounds, "decode")
    interleaved(rows, prefills, args.rounds, f"prefill of {PREFILL_TOKENS} tokens")
    for name, row in rows.items():
        if "decode_tok_s" not in row:
            continue
        if "bytes_per_token" in row:
            row["bandwidth_bound_tok_s"] = bandwidth / row["bytes_per_token"]
            compiled = (f"  compiled {row['compiled_decode_tok_s']:6.1f} (compile {row['compile_s']:.0f} s)"
                        if "compiled_decode_tok_s" in row else "")
            print(f"{name:50s} {row['weight_bytes'] / 2**20:8.1f} MiB  logit err {row['rel_logit_error']:.4f}  "
                  f"greedy {row['greedy_agreement']:.2f}  decode {row['decode_tok_s']:6.1f} tok/s{compiled} "
                  f"(bandwidth bound {row['bandwidth_bound_tok_s']:5.1f})")
        else:
            print(f"{name:50s} {row['file_bytes'] / 2**20:8.1f} MiB (file)  decode {row['decode_tok_s']:6.1f} tok/s")
    print(f"\nprefill of {PREFILL_TOKENS} tokens, ms (eager / compiled / llama.cpp at the same precision):")
    for kit, peer in PAIRINGS:
        ms = [1e3 * PREFILL_TOKENS / rows[n][k] if k in rows.get(n, {}) else float("nan")
              for n, k in ((kit, "prefill_tok_s"), (kit, "compiled_prefill_tok_s"), (peer, "prefill_tok_s"))]
        print(f"  {kit:18s} {ms[0]:8.0f} {ms[1]:8.0f}   {peer:16s} {ms[2]:8.0f}")
    print("share of matmuls in the eager prefill: " + ", ".join(
        f"{name} {rows[name]['prefill_gemm_share']:.0%}" for name in ("fp32", "bf16") if "prefill_gemm_share" in rows.get(name, {})))
    work.cleanup()
    print(f"per-token cost of everything but reading the weights (same depth, tiny widths, bf16): eager "
          f"{floor['eager']:.1f} ms, compiled {floor['compiled']:.1f} ms (target <= 2; compile {floor['compile_s']:.0f} s)")

    def ratio(a, b, key="decode_tok_s", key_b=None):
        ra, rb = rows.get(a, {}).get(key), rows.get(b, {}).get(key_b or key)
        return None if not ra or not rb else ra / rb

    ratios = {
        "w8a16 / fp32 (target >= 1.6)": ratio("w8a16", "fp32"),
        "w4a16 / fp32 (target >= 3)": ratio("w4a16", "fp32"),
        "w4a16+int8 head / fp32 (target >= 3)": ratio("w4a16+int8 head", "fp32"),
        "w4a16 / torchao int4 (target >= 1.2)": ratio("w4a16", "torchao int4 (PrototypeInt4WeightOnlyConfig g128)"),
        "w8a16 / torchao int8": ratio("w8a16", "torchao int8 (Int8WeightOnlyConfig)"),
        "w8a16 / llama.cpp Q8_0 (target >= 1.0)": ratio("w8a16", "llama.cpp Q8_0"),
        "w8a16+int8 head / llama.cpp Q8_0 (target >= 1.0)": ratio("w8a16+int8 head", "llama.cpp Q8_0"),
        "w4a16 / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a16", "llama.cpp Q4_0"),
        "w4a16+int8 head / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a16+int8 head", "llama.cpp Q4_0"),
        "w4a8 / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a8", "llama.cpp Q4_0"),
        "w4a8+int8 head / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a8+int8 head", "llama.cpp Q4_0"),
        "w4a8+w4a8 head / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a8+w4a8 head", "llama.cpp Q4_0"),
        "w4a8 / w4a16": ratio("w4a8", "w4a16"),
        "w4a16+int8 head / torchao int4 (target >= 1.2)": ratio("w4a16+int8 head", "torchao int4 (PrototypeInt4WeightOnlyConfig g128)"),
        "bf16 / llama.cpp BF16 (target >= 1.0)": ratio("bf16", "llama.cpp BF16"),
        "fp32 / llama.cpp F32": ratio("fp32", "llama.cpp F32"),
        "bf16 / fp32": ratio("bf16", "fp32"),
        "w8a8 / fp32": ratio("w8a8", "fp32"),
        "w2a16 / fp32": ratio("w2a16", "fp32"),
        "fp32 / fp32 (PyTorch kernels)": ratio("fp32", "fp32 (PyTorch kernels)"),
        "bf16 / bf16 (PyTorch kernels)": ratio("bf16", "bf16 (PyTorch kernels)"),
        "w8a16 / w8a16 (PyTorch kernels)": ratio("w8a16", "w8a16 (PyTorch kernels)"),
        "w4a16 / w4a16 (PyTorch kernels)": ratio("w4a16", "w4a16 (PyTorch kernels)"),
        "w4a16+int8 head / w4a16+int8 head (PyTorch kernels)": ratio("w4a16+int8 head", "w4a16+int8 head (PyTorch kernels)"),
        "w8a8 / w8a8 (PyTorch kernels)": ratio("w8a8", "w8a8 (PyTorch kernels)"),
        "w2a16 / w2a16 (PyTorch kernels)": ratio("w2a16", "w2a16 (PyTorch kernels)"),
        "w8a16 (PyTorch kernels) / fp32 (PyTorch kernels)": ratio("w8a16 (PyTorch kernels)", "fp32 (PyTorch kernels)"),
        "w4a16 (PyTorch kernels) / fp32 (PyTorch kernels)": ratio("w4a16 (PyTorch kernels)", "fp32 (PyTorch kernels)"),
    }
    for kit, peer in PAIRINGS:  # the compiled path against llama.cpp (issue 26)
        ratios[f"{kit} compiled / {peer} (target >= 1.0)"] = ratio(kit, peer, "compiled_decode_tok_s", "decode_tok_s")
    for kit, peer in PAIRINGS:
        ratios[f"prefill {PREFILL_TOKENS}: {kit} / {peer} (target >= 2)"] = ratio(kit, peer, "prefill_tok_s")
        ratios[f"prefill {PREFILL_TOKENS}: {kit} compiled / {peer} (target >= 2)"] = ratio(
            kit, peer, "compiled_prefill_tok_s", "prefill_tok_s")
    for name, row in rows.items():
        if "compiled_decode_tok_s" in row:
            ratios[f"{name} compiled / {name} eager"] = ratio(name, name, "compiled_decode_tok_s", "decode_tok_s")
    print("\nratios (decode or prefill tok/s, same run):")
    for key, value in ratios.items():
        print(f"  {key:55s} {'n/a' if value is None else f'{value:.2f}'}")
    compile_s = {name: row["compile_s"] for name, row in rows.items() if "compile_s" in row}
    print("compile of the decode step (target <= 60 s on 2 cores): " +
          ", ".join(f"{name} {s:.0f} s" for name, s in compile_s.items()))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu, "shape": "quick" if args.quick else "ERNIE-4.5-0.3B",
              "threads": args.threads, "torch": torch.__version__, "rows": rows, "ratios": ratios,
              "llama_cpp": llama_note, "read_bandwidth_GB_s": bandwidth / 1e9,
              "overhead_floor_ms_per_token": floor["eager"],
              "overhead_floor_compiled_ms_per_token": floor["compiled"],
              "overhead_floor_compile_s": floor["compile_s"],
              "decode_step_compile_s": compile_s, "prefill_tokens": PREFILL_TOKENS, "rounds": args.rounds,
              "rows_measured": "all" if args.rows is None else args.rows,
              "compiled_prefill": not args.eager_prefill_only,
              "native_kernels": quant.native.info(), "family_weight_bytes": family_memory(),
              "gpu": "not measured: no GPU in this run"}
    if not args.quick:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

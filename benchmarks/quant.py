"""Quantized inference: quality, memory and CPU decode speed per scheme, against torchao and llama.cpp.

    python benchmarks/quant.py            # 0.3B shape, random weights, 2 threads; writes benchmarks/results/quant.json
    python benchmarks/quant.py --quick    # a small shape in seconds (smoke test)

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
  would run the reference).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ernie_lab
from ernie_lab import architectures, family, quant
from ernie_lab.model.published import CHECKPOINTS
from ernie_lab.model.config import ErnieConfig
from llama_cpp_tools import LLAMA_CPP_VERSION, convert_to_gguf  # benchmarks/llama_cpp_tools.py

RESULTS = Path(__file__).parent / "results" / "quant.json"


def random_model(config: ErnieConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = architectures.build(config).eval()
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model


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

    def scheme(name, head_int8=False, dtype=torch.bfloat16):
        def build():
            model = copy.deepcopy(base).to(dtype)
            quant.quantize(model, name)
            if head_int8:  # untie: the head gets its own int8 copy, the embedding stays bf16
                model.lm_head.weight = nn.Parameter(model.embed.weight.detach().clone())
                quant.quantize(model, "w8a16", skip=("embed",), filter="lm_head")
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
            "w8a16": (scheme("w8a16"), True), "w4a16": (scheme("w4a16"), True),
            "w4a16+int8 head": (scheme("w4a16", True), True),
            "w8a8": (scheme("w8a8", dtype=torch.float32), True), "w2a16": (scheme("w2a16"), True),
            "w4a8": (scheme("w4a8"), True), "w4a8+int8 head": (scheme("w4a8", True), True),
            "fp32 (PyTorch kernels)": (float_model(torch.float32, False), False),
            "bf16 (PyTorch kernels)": (float_model(torch.bfloat16, False), False),
            "w8a16 (PyTorch kernels)": (scheme("w8a16"), False),
            "w4a16 (PyTorch kernels)": (scheme("w4a16"), False),
            "w4a16+int8 head (PyTorch kernels)": (scheme("w4a16", True), False),
            "w8a8 (PyTorch kernels)": (scheme("w8a8", dtype=torch.float32), False),
            "w2a16 (PyTorch kernels)": (scheme("w2a16"), False),
            "torchao int8 (Int8WeightOnlyConfig)": (torchao("int8"), False),
            "torchao int4 (PrototypeInt4WeightOnlyConfig g128)": (torchao("int4"), False)}


def bytes_per_token(model: nn.Module) -> int:
    """Weight bytes one decode step reads: every linear layer's weight (quantized: codes, scales, zeros).
    The embedding table is not read, only one row of it (a tied head is counted once, as the head)."""
    total = 0
    for module in model.modules():
        if isinstance(module, quant.QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (module.qweight, module.scales, module.zeros)
                         if t is not None)
        elif isinstance(module, nn.Linear):  # torchao's quantized weights are tensor subclasses: their real bytes
            total += quant._tensor_bytes(module.weight)
    return total


def read_bandwidth(threads: int) -> float:
    """Bytes per second of summing a 512 MiB fp32 tensor (a streaming read), median of 5."""
    data = torch.ones(128 * 2**20)
    data.sum()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / statistics.median(times)


def overhead_floor(config: ErnieConfig, prompt, new_tokens: int, rounds: int) -> float:
    """Seconds per decode token of a model with the 0.3B's depth, heads and call pattern but tiny widths
    (its weights are read in microseconds): the per-token cost of everything but reading the weights."""
    narrow = ErnieConfig(num_hidden_layers=config.num_hidden_layers, hidden_size=128, intermediate_size=256,
                         vocab_size=1024, num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    model = random_model(narrow).to(torch.bfloat16)
    quant.stream_linears(model)
    small = prompt.clamp(max=narrow.vocab_size - 1)
    decode_speed(model, small, 4)
    return 1 / statistics.median(decode_speed(model, small, new_tokens) for _ in range(rounds))


def decode_time(model, prompt, new_tokens: int) -> float:
    start = time.perf_counter()
    ernie_lab.generate(model, prompt, new_tokens, eos_token_id=[])
    return time.perf_counter() - start


def _kit_speed(model, streaming: bool, prompt, new_tokens: int) -> float:
    with contextlib.nullcontext() if streaming else quant.native.off():
        return decode_speed(model, prompt, new_tokens)


def decode_speed(model, prompt, new_tokens: int) -> float:
    return (new_tokens - 1) / (decode_time(model, prompt, new_tokens) - decode_time(model, prompt, 1))


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
    """{"llama.cpp F32": (Llama, file bytes), ...} on GGUFs converted from ``base``, or a message saying why not."""
    try:
        import llama_cpp
    except ImportError:
        return ("skipped: llama-cpp-python is not installed (`make bench` installs the `bench` extra, which builds "
                "it from source: several minutes on 2 cores)")
    try:
        files = gguf_files(base, work)
    except Exception as err:  # no converter source, or a conversion error: say so, keep the run
        return f"skipped: no GGUF ({type(err).__name__}: {str(err)[:200]})"
    return {f"llama.cpp {fmt}": (llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=256,
                                                 verbose=False), path.stat().st_size)
            for fmt, path in files.items()}


def llama_speed(llm, prompt: list[int], new_tokens: int) -> float:
    return (new_tokens - 1) / (llama_decode_time(llm, prompt, new_tokens) - llama_decode_time(llm, prompt, 1))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = ErnieConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=768, vocab_size=2048,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64) if args.quick else ErnieConfig()
    base = random_model(config)
    ids = torch.randint(3, config.vocab_size, (1, 64))
    prompts = torch.randint(3, config.vocab_size, (4, 8))
    with torch.inference_mode():
        reference_logits = base(ids).logits.float()
    reference_tokens = ernie_lab.generate(base, prompts, 24, eos_token_id=[])[:, 8:]
    prompt1, new = torch.randint(3, config.vocab_size, (1, 16)), 16 if args.quick else 32

    bandwidth = read_bandwidth(args.threads)
    print(f"streaming read bandwidth: {bandwidth / 1e9:.1f} GB/s; the kit's kernels: {quant.native.info()}")
    rows, built, speeds = {}, variants(base), {}
    for name, (build, streaming) in built.items():
        with contextlib.nullcontext() if streaming else quant.native.off():
            try:
                model = build()
            except Exception as err:  # a peer that does not run here: say why, keep going
                rows[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
                print(f"{name}: skipped ({rows[name]['error']})")
                continue
            rows[name] = {"weight_bytes": quant.weight_bytes(model), "bytes_per_token": bytes_per_token(model),
                          **quality(model, reference_logits, ids, prompts, reference_tokens)}
            decode_speed(model, prompt1, 4)  # warm-up (PyTorch's int4 kernel re-tiles its codes on the first call)
        speeds[name] = (lambda m=model, s=streaming: _kit_speed(m, s, prompt1, new))
    work = tempfile.TemporaryDirectory(prefix="gguf-")
    peers = llama_cpp_models(base, Path(work.name), args.threads)
    llama_note = peers if isinstance(peers, str) else (
        f"llama-cpp-python {LLAMA_CPP_VERSION}, GGUF converted from the same random checkpoint by llama.cpp's "
        "convert_hf_to_gguf.py (F32) and quantized by llama.cpp (BF16, Q8_0, Q4_0 with its default Q6_K head)")
    if not isinstance(peers, str):
        for name, (llm, size) in peers.items():
            rows[name] = {"file_bytes": size}
            llama_speed(llm, prompt1[0].tolist(), 4)  # warm-up
            speeds[name] = (lambda m=llm: llama_speed(m, prompt1[0].tolist(), new))
    print("llama.cpp:", llama_note)

    for name in speeds:
        rows[name]["decode_tok_s_rounds"] = []
    for round_ in range(args.rounds):  # interleaved: every row once per round, so drifts of the machine hit all
        for name, speed in speeds.items():
            rows[name]["decode_tok_s_rounds"].append(speed())
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    for name in speeds:
        row = rows[name]
        row["decode_tok_s"] = statistics.median(row["decode_tok_s_rounds"])
        if "bytes_per_token" in row:
            row["bandwidth_bound_tok_s"] = bandwidth / row["bytes_per_token"]
            print(f"{name:50s} {row['weight_bytes'] / 2**20:8.1f} MiB  logit err {row['rel_logit_error']:.4f}  "
                  f"greedy {row['greedy_agreement']:.2f}  decode {row['decode_tok_s']:6.1f} tok/s "
                  f"(bandwidth bound {row['bandwidth_bound_tok_s']:5.1f})")
        else:
            print(f"{name:50s} {row['file_bytes'] / 2**20:8.1f} MiB (file)  decode {row['decode_tok_s']:6.1f} tok/s")
    work.cleanup()
    floor = overhead_floor(config, prompt1, new, args.rounds)
    print(f"per-token cost of everything but reading the weights (same depth, tiny widths, bf16): {floor * 1e3:.1f} ms")

    def ratio(a, b):
        ra, rb = rows.get(a, {}).get("decode_tok_s"), rows.get(b, {}).get("decode_tok_s")
        return None if not ra or not rb else ra / rb

    ratios = {
        "w8a16 / fp32 (target >= 1.6)": ratio("w8a16", "fp32"),
        "w4a16 / fp32 (target >= 3)": ratio("w4a16", "fp32"),
        "w4a16+int8 head / fp32 (target >= 3)": ratio("w4a16+int8 head", "fp32"),
        "w4a16 / torchao int4 (target >= 1.2)": ratio("w4a16", "torchao int4 (PrototypeInt4WeightOnlyConfig g128)"),
        "w8a16 / torchao int8": ratio("w8a16", "torchao int8 (Int8WeightOnlyConfig)"),
        "w8a16 / llama.cpp Q8_0 (target >= 1.0)": ratio("w8a16", "llama.cpp Q8_0"),
        "w4a16 / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a16", "llama.cpp Q4_0"),
        "w4a16+int8 head / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a16+int8 head", "llama.cpp Q4_0"),
        "w4a8 / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a8", "llama.cpp Q4_0"),
        "w4a8+int8 head / llama.cpp Q4_0 (target >= 1.0)": ratio("w4a8+int8 head", "llama.cpp Q4_0"),
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
    print("\nratios (decode tok/s, same run):")
    for key, value in ratios.items():
        print(f"  {key:45s} {'n/a' if value is None else f'{value:.2f}'}")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    result = {"date": datetime.date.today().isoformat(), "cpu": cpu, "shape": "quick" if args.quick else "ERNIE-4.5-0.3B",
              "threads": args.threads, "torch": torch.__version__, "rows": rows, "ratios": ratios,
              "llama_cpp": llama_note, "read_bandwidth_GB_s": bandwidth / 1e9,
              "overhead_floor_ms_per_token": floor * 1e3,
              "native_kernels": quant.native.info(), "family_weight_bytes": family_memory(),
              "gpu": "not measured: no GPU in this run"}
    if not args.quick:
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

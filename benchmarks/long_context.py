"""Decode speed after a long prompt: the kit's compiled step against llama.cpp, as the cached context grows.

    python benchmarks/long_context.py            # 0.3B shape, random weights, 2 threads; writes results/long_context.json
    python benchmarks/long_context.py --quick    # a small shape, no json (smoke test)

``benchmarks/quant.py`` decodes after a 16-token prompt, where a token's time is reading the weights. After a
long prompt each token also attends over every cached key: 18 layers x 2 KV heads x S keys x 128 dims, read
twice (keys, values). This times batch-1 greedy decode, ``generate(compile=True)``, after prompts of
``--contexts`` tokens, for bf16 against llama.cpp's BF16 file and w4a8 with an int4 head against its Q4_0
file (both converted from the same checkpoint, as in quant.py). tok/s = (n - 1) / (t(n new) - t(1 new)):
the prompt's evaluation cancels; medians of ``--rounds`` interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import shutil
import statistics
import tempfile
from pathlib import Path

import torch

import ernie_lab
from ernie_lab.model.config import ErnieConfig
from quant import decode_speed, gguf_files, llama_speed, random_model, variants  # benchmarks/quant.py
from llama_cpp_tools import crash_on_load  # benchmarks/llama_cpp_tools.py

RESULTS = Path(__file__).parent / "results" / "long_context.json"
PAIRS = {"bf16": "BF16", "w4a8+w4a8 head": "Q4_0"}  # kit row -> llama.cpp file


def timers(kit: dict, llms: dict, contexts: list[int], vocab: int, new_tokens: int) -> dict:
    """(row, context) -> a function returning tok/s; each kit graph compiled (and each prompt seen) once first."""
    out, generator = {}, torch.Generator().manual_seed(0)
    for context in contexts:
        prompt = torch.randint(3, vocab, (1, context), generator=generator)
        for name, model in kit.items():
            with contextlib.redirect_stdout(io.StringIO()):
                ernie_lab.generate(model, prompt, new_tokens, eos_token_id=[], compile=True)  # compiles this buffer size
            out[name, context] = lambda m=model, p=prompt: decode_speed(m, p, new_tokens, compile=True)
            fmt = PAIRS[name]
            out[f"llama.cpp {fmt}", context] = lambda f=fmt, p=prompt: llama_speed(llms[f], p[0].tolist(), new_tokens)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", type=int, nargs="+", default=[16, 512, 1500])
    parser.add_argument("--new", type=int, default=129, help="new tokens per timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import llama_cpp

    torch.set_num_threads(args.threads)
    config = ErnieConfig(num_hidden_layers=2, hidden_size=256, intermediate_size=768, vocab_size=8192,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64) if args.quick else ErnieConfig()
    contexts = [16, 100] if args.quick else args.contexts
    base = random_model(config)
    work = Path(tempfile.mkdtemp(prefix="long-context-"))
    try:
        files = gguf_files(base, work)
        built = variants(base)
        kit = {name: built[name][0]() for name in PAIRS}
        del base
        room = max(contexts) + args.new + 1
        crashed = [why for why in (crash_on_load(files[fmt]) for fmt in PAIRS.values()) if why]
        if crashed:  # every row is a pair with llama.cpp: stop now, before minutes of compiling
            raise SystemExit("; ".join(crashed) + ". `make bench` builds llama-cpp-python without its AMX kernels.")
        llms = {fmt: llama_cpp.Llama(str(files[fmt]), n_threads=args.threads, n_threads_batch=args.threads,
                                     n_ctx=room, n_batch=512, verbose=False) for fmt in PAIRS.values()}
        speeds = timers(kit, llms, contexts, config.vocab_size, args.new)
        rounds = {key: [] for key in speeds}
        for r in range(args.rounds):
            for key, speed in speeds.items():
                rounds[key].append(speed())
            print(f"round {r + 1}/{args.rounds} done", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = {}
    for (name, context), values in rounds.items():
        rows.setdefault(name, {})[str(context)] = {"decode_tok_s": statistics.median(values), "rounds": values}
    ratios = {f"{name} compiled / llama.cpp {fmt}, {context}-token prompt":
              rows[name][str(context)]["decode_tok_s"] / rows[f"llama.cpp {fmt}"][str(context)]["decode_tok_s"]
              for name, fmt in PAIRS.items() for context in contexts}
    for key, value in ratios.items():
        print(f"  {key:55s} {value:.2f}")
    if not args.quick:
        RESULTS.write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "threads": args.threads, "torch": torch.__version__,
            "new_tokens": args.new, "rounds": args.rounds, "contexts": contexts, "rows": rows, "ratios": ratios},
            indent=2) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

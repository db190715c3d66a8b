"""Eager vs static-cache vs compiled decoding: milliseconds per generated token (batch 1, 2 threads).

    python benchmarks/fast_decode.py            # prints a table and writes benchmarks/results/fast_decode.json
    python benchmarks/fast_decode.py --quick    # fewer rounds (smoke test)

Models: the shipped tiny text model (``data/tiny-ernie-text``, 4 layers, hidden 192) and a micro decoder of
the 0.3B's depth (18 layers, hidden 32), where per-op overhead is everything. Per-token time is
(t(1 + N new tokens) - t(1 new token)) / N, so the prefill cancels out; each round runs every mode once
(interleaved) and the table gives medians over rounds. Greedy tokens are compared with eager.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from pathlib import Path

import torch

import ernie_lab
from ernie_lab import ErnieConfig, ErnieForCausalLM

ROOT = Path(__file__).resolve().parents[1]
DEEP_MICRO = dict(model_type="ernie4_5", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=18,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
MODES = {"eager": {}, "static": {"static_cache": True}, "compiled": {"compile": True}}


def seconds(model, prompt, new_tokens, switches, inputs=None) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = ernie_lab.generate(model, prompt, new_tokens, eos_token_id=[], **switches, **(inputs or {}))
    return time.perf_counter() - start, out


def measure(model, prompt, new_tokens: int, rounds: int, inputs: dict | None = None) -> dict:
    """``inputs``: extra prefill inputs (a VL model's picture)."""
    compile_out = io.StringIO()
    with contextlib.redirect_stdout(compile_out):
        compile_s, _ = seconds(model, prompt, new_tokens + 1, MODES["compiled"], inputs)  # compiles, warms up
    ms = {mode: [] for mode in MODES}
    tokens = {}
    for _ in range(rounds):
        for mode, switches in MODES.items():
            one, _ = seconds(model, prompt, 1, switches, inputs)
            many, tokens[mode] = seconds(model, prompt, new_tokens + 1, switches, inputs)
            ms[mode].append(1000 * (many - one) / new_tokens)
    result = {f"{mode}_ms_per_token": round(statistics.median(v), 3) for mode, v in ms.items()}
    result["first_compiled_call_s"] = round(compile_s, 1)
    result["greedy_identical"] = {m: bool(torch.equal(tokens["eager"], tokens[m])) for m in ("static", "compiled")}
    return result


def run(description: str, cases, out_name: str) -> None:
    """The command line of the decode benchmarks: ``cases(quick)`` -> {name: (model, prompt, prefill inputs)},
    each timed by :func:`measure` on 2 threads (``--threads``: on a loaded machine 1 thread is steadier);
    prints the table, writes ``benchmarks/results/<out_name>``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds, new_tokens = (3, 16) if args.quick else (7, 64)
    results = {name: measure(model, prompt, new_tokens, rounds, inputs)
               for name, (model, prompt, inputs) in cases().items()}
    results.update(threads=args.threads, rounds=rounds, new_tokens=new_tokens, torch=torch.__version__)
    print(json.dumps(results, indent=1))
    if not args.quick:
        (ROOT / "benchmarks/results" / out_name).write_text(json.dumps(results, indent=1) + "\n")


def cases() -> dict:
    tiny = ernie_lab.load_model(ROOT / "data/tiny-ernie-text")
    tok = ernie_lab.load_tokenizer(ROOT / "data/tiny-ernie-text")
    deep = ErnieForCausalLM(ErnieConfig.from_dict(DEEP_MICRO)).init_weights(seed=0).eval()
    return {"tiny-ernie-text": (tiny, [tok.encode("The for statement is used to")], None),
            "micro-18-layers": (deep, [[5, 9, 11, 30, 2, 7]], None)}


def main() -> None:
    run(__doc__.split("\n")[0], cases, "fast_decode.json")


if __name__ == "__main__":
    main()

"""Tokens per second of ernie-lab's MoE block vs transformers' on the same weights.

One MoE layer of ERNIE-4.5-21B-A3B's shape (hidden 2560, 64 experts of width 1536, top-6, 2 shared
experts), batches of 1, 16 and 512 tokens, float32, CPU (and CUDA when present). ernie-lab's experts
are views into transformers' fused tensors, so both blocks read the very same memory.

    python benchmarks/moe.py                       # writes benchmarks/results/moe.json
    python benchmarks/moe.py --small               # a 16-expert toy shape, for a quick check

Timings alternate between the two implementations, so both see the same machine load. Tokens/s and
the speedup use the fastest of the repeats (the least disturbed by other processes); the ratio of
medians is printed beside it and every time is kept in the json. Compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernie_lab.model.config import ErnieConfig  # noqa: E402
from ernie_lab.model.moe import MoEBlock  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "moe.json"


def build_pair(hidden: int, experts: int, k: int, width: int, shared: int, device: str,
               implementation: str = "grouped_mm"):
    """transformers' Ernie4_5_MoeSparseMoeBlock with random weights, and ours sharing its tensors.

    ``implementation`` is transformers' experts kernel; a full model picks "grouped_mm" by default.
    """
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeSparseMoeBlock

    torch.manual_seed(0)
    ref_config = Ernie4_5_MoeConfig(hidden_size=hidden, moe_num_experts=experts, moe_k=k,
                                    moe_intermediate_size=width, moe_num_shared_experts=shared,
                                    experts_implementation=implementation)
    with torch.device(device):
        ref = Ernie4_5_MoeSparseMoeBlock(ref_config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
        ref.gate.weight.normal_(0.0, 0.5)
        ref.gate.moe_statics.e_score_correction_bias.uniform_(-1e-3, 1e-3)

    config = ErnieConfig(model_type="ernie4_5_moe", hidden_size=hidden, moe_num_experts=experts, moe_k=k,
                         moe_intermediate_size=width, moe_num_shared_experts=shared)
    with torch.device("meta"):
        ours = MoEBlock(config, layer_idx=1).eval()
    state = {"gate.weight": ref.gate.weight, "moe_statics.e_score_correction_bias": ref.gate.moe_statics.e_score_correction_bias}
    for e in range(experts):  # views, no copies: gate_up_proj[e] is [gate; up] stacked on dim 0
        state[f"experts.{e}.gate_proj.weight"] = ref.experts.gate_up_proj[e, :width]
        state[f"experts.{e}.up_proj.weight"] = ref.experts.gate_up_proj[e, width:]
        state[f"experts.{e}.down_proj.weight"] = ref.experts.down_proj[e]
    if shared:
        for name in ("gate_proj", "up_proj", "down_proj"):
            state[f"shared_experts.{name}.weight"] = getattr(ref.shared_experts, name).weight
    ours.load_state_dict(state, assign=True, strict=True)
    return ref, ours, ref_config._experts_implementation


def time_alternating(fns, x, repeats: int, sync) -> list[list[float]]:
    """Run every function once per round, ``repeats`` rounds; the wall times of each, in seconds."""
    times = [[] for _ in fns]
    with torch.inference_mode():
        for fn in fns:  # warm-up
            fn(x)
        sync()
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn(x)
                sync()
                times[i].append(time.perf_counter() - start)
    return times


def run(device: str, sizes, repeats: int, shape: dict) -> list[dict]:
    ref, ours, implementation = build_pair(**shape, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = []
    for n in sizes:
        x = torch.randn(1, n, shape["hidden"], device=device)
        with torch.inference_mode():
            diff = (ours(x).hidden - ref(x)).abs().max().item()
        reps = repeats if n < 512 or device == "cuda" else max(5, repeats // 2)
        t_ours, t_ref = time_alternating([ours, ref], x, reps, sync)
        best_ours, best_ref = min(t_ours), min(t_ref)
        rows.append(dict(device=device, tokens=n, ernie_lab_tok_s=n / best_ours, transformers_tok_s=n / best_ref,
                         speedup=best_ref / best_ours,
                         speedup_of_medians=statistics.median(t_ref) / statistics.median(t_ours),
                         ernie_lab_ms=[round(t * 1e3, 2) for t in t_ours],
                         transformers_ms=[round(t * 1e3, 2) for t in t_ref],
                         max_abs_diff=diff, transformers_experts_implementation=implementation))
        print(f"{device:>6} {n:>6} {n / best_ours:>15.1f} {n / best_ref:>18.1f} {best_ref / best_ours:>8.2f}x "
              f"{rows[-1]['speedup_of_medians']:>8.2f}x {diff:>10.1e}", flush=True)
    del ref, ours
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--small", action="store_true", help="toy shape (hidden 256, 16 experts of 128), no json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    shape = dict(hidden=2560, experts=64, k=6, width=1536, shared=2)
    if args.small:
        shape = dict(hidden=256, experts=16, k=4, width=128, shared=2)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"MoE block, hidden {shape['hidden']}, {shape['experts']} experts of {shape['width']}, top-{shape['k']}, "
          f"{shape['shared']} shared, float32, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(f"{'device':>6} {'tokens':>6} {'ernie-lab tok/s':>15} {'transformers tok/s':>18} {'speedup':>9} "
          f"{'(median)':>9} {'max |diff|':>10}")
    rows = [row for device in devices for row in run(device, args.sizes, args.repeats, shape)]
    worst = min(row["speedup"] for row in rows)
    print(f"slowest ratio: {worst:.2f}x transformers")
    if not args.small:
        import transformers

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(
            benchmark="MoE block tokens/s, ernie-lab vs transformers, same weights", shape=shape, dtype="float32",
            torch=torch.__version__, transformers=transformers.__version__, cpu_threads=torch.get_num_threads(),
            machine=platform.machine(), processor=platform.processor() or platform.platform(),
            statistic="fastest of alternating repeats (tok/s, speedup); speedup_of_medians beside it", rows=rows), indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

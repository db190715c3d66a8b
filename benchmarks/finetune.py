"""Step time and peak memory of fine-tuning: ernie-lab LoRA vs ernie-lab full fine-tuning vs peft LoRA on
transformers, on the same shape, data and batch.

    python benchmarks/finetune.py                 # 0.3B shape (random weights) + the tiny text model -> results/finetune.json
    python benchmarks/finetune.py --shapes tiny   # quick

A step is forward + backward + AdamW update of the trainable parameters (LoRA r=8, alpha 16 on
q, k, v, o, gate, up, down; or every weight for full fine-tuning; QLoRA: the same LoRA over a base
quantized with ``quant.quantize(model, "w4a16")``), float32, batch 1 x 256 tokens
(0.3B) or 8 x 128 (tiny). Each (shape, method) runs in its own subprocess, so its peak memory
(the process's maximum resident set, minus the resident set after the model is built; CUDA: peak
allocated) is its own. Times: median of the measured steps after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results" / "finetune.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"0.3b": dict(batch=1, seq=256, warmup=1, steps=3), "tiny": dict(batch=8, seq=128, warmup=3, steps=20)}
METHODS = ("ernie-lab lora", "ernie-lab full", "peft lora", "ernie-lab qlora")


def raw_config(shape: str) -> dict:
    from transformers import Ernie4_5Config

    if shape == "0.3b":
        return json.loads(Ernie4_5Config().to_json_string())             # the published 0.3B shape
    from ernie_lab.tiny.models import TEXT_CONFIG

    return dict(TEXT_CONFIG)


def build(shape: str, method: str, device: str):
    """(model, trainable parameters) with random weights for one method."""
    torch.manual_seed(0)
    raw = raw_config(shape)
    if method.startswith("peft"):
        from peft import LoraConfig, get_peft_model
        from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

        keep = {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "transformers_version")}
        model = get_peft_model(Ernie4_5ForCausalLM(Ernie4_5Config(**keep)), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    else:
        from ernie_lab import lora
        from ernie_lab.model.config import parse_config
        from ernie_lab.model.decoder import ErnieForCausalLM

        model = ErnieForCausalLM(parse_config(raw))
        if method.endswith("qlora"):
            from ernie_lab import quant

            quant.quantize(model, "w4a16")                               # frozen int4 base (QLoRA)
        if method.endswith("lora"):
            lora.apply_lora(model, r=8, alpha=16, target_modules=TARGETS)
    model.to(device).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(shape: str, method: str, device: str) -> dict:
    settings = SHAPES[shape]
    model, params = build(shape, method, device)
    vocab = model.config.vocab_size if hasattr(model.config, "vocab_size") else model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (settings["batch"], settings["seq"]), generator=g).to(device)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    baseline = current_rss()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    times = []
    for step in range(settings["warmup"] + settings["steps"]):
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= settings["warmup"]:
            times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else rss_bytes()) - baseline
    from ernie_lab.quant import weight_bytes

    return {"shape": shape, "method": method, "device": device, "trainable_parameters": sum(p.numel() for p in params),
            "weight_bytes": weight_bytes(model),
            "step_seconds_median": statistics.median(times), "step_seconds": times,
            "peak_memory_above_model_bytes": max(peak, 0), "batch": settings["batch"], "seq": settings["seq"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("SHAPE", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.device)))
        return
    rows = []
    for shape in args.shapes:
        for method in METHODS:
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", shape, method],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{shape:>5} {method:<15} weights {r['weight_bytes'] / 2**20:8.1f} MiB trainable {r['trainable_parameters']:>12,}  step "
                  f"{r['step_seconds_median']:7.3f} s  peak +{r['peak_memory_above_model_bytes'] / 2**30:6.2f} GiB", flush=True)
    summary = {}
    for shape in args.shapes:
        by = {r["method"]: r for r in rows if r["shape"] == shape}
        summary[shape] = {"lora_vs_peft_step_time": by["ernie-lab lora"]["step_seconds_median"] / by["peft lora"]["step_seconds_median"],
                          "lora_vs_full_peak_memory": by["ernie-lab lora"]["peak_memory_above_model_bytes"]
                          / max(by["ernie-lab full"]["peak_memory_above_model_bytes"], 1),
                          "qlora_vs_lora_weight_bytes": by["ernie-lab qlora"]["weight_bytes"]
                          / by["ernie-lab lora"]["weight_bytes"]}
        print(f"{shape}: ernie-lab LoRA step time / peft's = {summary[shape]['lora_vs_peft_step_time']:.2f}; "
              f"LoRA peak / full peak = {summary[shape]['lora_vs_full_peak_memory']:.2f}; "
              f"QLoRA weight bytes / LoRA's = {summary[shape]['qlora_vs_lora_weight_bytes']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                                    "torch": torch.__version__, "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()

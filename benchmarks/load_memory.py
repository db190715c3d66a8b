"""Peak memory of load_model on a 0.3B-shape fp32 checkpoint, loaded in fp32 and in bf16.

    python benchmarks/load_memory.py            # prints a table, writes benchmarks/results/load_memory.json

Each load runs in a fresh process; the figure is the peak resident memory (VmHWM) minus the resident
memory just before ``load_model``, after one forward pass, as a multiple of the fp32 weight bytes.
The bf16 result itself is 0.5x; streaming tensor by tensor adds about the largest tensor (the
embedding, 0.29x of the 0.3B).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import ernie_lab
from ernie_lab.model.config import ERNIE_0_3B, ErnieConfig

RESULTS = Path(__file__).resolve().parent / "results" / "load_memory.json"
MEASURE = """
import json, sys, torch
import ernie_lab
from ernie_lab.model.config import ErnieConfig
from ernie_lab.io.loading import build_empty

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

build_empty(ErnieConfig(num_hidden_layers=1))  # one-time costs of building on the meta device
warm = ernie_lab.load_model(sys.argv[3])       # ... and of a first load and forward (lazy imports, kernel
with torch.no_grad():                           # set-up), on a tiny checkpoint
    warm(torch.tensor([[1, 2, 3]]))
del warm
base = rss("VmRSS:")
dtype = None if sys.argv[2] == "none" else getattr(torch, sys.argv[2])
model = ernie_lab.load_model(sys.argv[1], dtype=dtype)
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))
print(json.dumps({"peak": rss("VmHWM:") - base}))
"""


def peak(folder: Path, dtype: str) -> int:
    warm = folder.parent / "warm-up"
    if not warm.exists():
        ernie_lab.save_model(ernie_lab.ErnieForCausalLM(ErnieConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8)), warm,
                             tokenizer=False)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder), dtype, str(warm)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = ernie_lab.ErnieForCausalLM(ERNIE_0_3B)
        weight_bytes = 4 * model.num_parameters()
        ernie_lab.save_model(model, Path(tmp) / "model", max_shard_bytes=500 * 2**20, tokenizer=False)  # weights only
        del model
        rows = {dtype: peak(Path(tmp) / "model", dtype) / weight_bytes for dtype in ("none", "bfloat16")}
    print(f"0.3B shape, fp32 checkpoint of {weight_bytes / 2**30:.2f} GiB")
    print(f"{'load dtype':>12} | peak / fp32 weight bytes")
    for dtype, ratio in rows.items():
        print(f"{'fp32' if dtype == 'none' else dtype:>12} | {ratio:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"shape": "ERNIE-4.5-0.3B", "fp32_weight_bytes": weight_bytes,
                                   "peak_over_fp32_bytes": {"float32": rows["none"], "bfloat16": rows["bfloat16"]},
                                   "torch": torch.__version__, "ernie_lab": ernie_lab.__file__ and "main"},
                                  indent=2) + "\n")


if __name__ == "__main__":
    main()

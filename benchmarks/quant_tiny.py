"""Quantized quality on models that learned something: the shipped tiny ERNIE models, per scheme, RTN and GPTQ.

    python benchmarks/quant_tiny.py              # writes benchmarks/results/quant_tiny.json (about 10 minutes, 2 cores)
    python benchmarks/quant_tiny.py --quick      # fewer windows and scenes (smoke test)
    python benchmarks/quant_tiny.py --only "w4a8 RTN" "w4a8 GPTQ"   # recompute these rows, keep the others

* text (``data/tiny-ernie-text``): held-out perplexity (``tiny_models.evaluate_text``) and greedy-token
  agreement with the unquantized model (8 held-out prompts x 24 new tokens);
* VL (``data/tiny-ernie-vl``): question accuracy per template on held-out scenes through ``ernie_lab.chat``
  (``tiny_models.evaluate_vl``), every linear quantized: attention, dense MLP, every routed and shared
  expert, the ViT and the adapter (routers, norms, embeddings and the tied head stay in full precision).

GPTQ calibrates on training data only: 8 text windows of 128 tokens; for the VL model 4 scene batches of
16 (pictures included, so the ViT's and adapter's layers get their own Hessians). ``gap closed`` is the
share of round-to-nearest's perplexity increase that GPTQ removes: (ppl_RTN - ppl_GPTQ) / (ppl_RTN - ppl_fp32),
null where RTN is already within 0.5% of fp32 (nothing to close). w4a8 keeps w4a16's codes and also rounds
every linear's input to int8 per block of 32 (as llama.cpp's Q4_0 x Q8_0); its GPTQ is w4a16's (the
Hessian of the float inputs).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ernie_lab  # noqa: E402
from ernie_lab import quant, tiny_models  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quant_tiny.json"
NOISE = 0.005  # RTN within 0.5% of fp32: no gap for GPTQ to close (the share is reported as null)
TEXT, VL = ROOT / "data" / "tiny-ernie-text", ROOT / "data" / "tiny-ernie-vl"
SCHEMES = {  # row name -> (scheme, uses GPTQ)
    "fp32": (None, False),
    "w8a16": ("w8a16", False),
    "w8a8": ("w8a8", False),
    "w4a16 RTN": ("w4a16", False),
    "w4a16 GPTQ": ("w4a16", True),
    "w4a8 RTN": ("w4a8", False),
    "w4a8 GPTQ": ("w4a8", True),
    "w2a16 RTN": ("w2a16", False),
    "w2a16 GPTQ": ("w2a16", True),
}


def quantized(base, scheme: str | None, calibration, group_size: int):
    model = copy.deepcopy(base)
    if scheme is not None:
        quant.quantize(model, scheme, group_size=group_size, calibration=calibration)
    return model.eval()


def greedy(model, prompts: torch.Tensor, new: int) -> torch.Tensor:
    return ernie_lab.generate(model, prompts, new, eos_token_id=[])[:, prompts.shape[1]:]


def text_rows(group_size: int, windows: int | None, names) -> dict:
    base, tok = ernie_lab.load_model(TEXT).eval(), ernie_lab.load_tokenizer(TEXT)
    calibration = [tiny_models.text_batches(tok, 1, 128)(step)["input_ids"] for step in range(8)]
    prompts = tiny_models.eval_windows(tok, 128)[:8, :16]
    reference = greedy(base, prompts, 24)
    rows = {}
    for name in names:
        scheme, gptq = SCHEMES[name]
        started = time.time()
        model = quantized(base, scheme, calibration if gptq else None, group_size)
        metrics = tiny_models.evaluate_text(model, tok, max_windows=windows)
        rows[name] = {"val_perplexity": metrics["val_perplexity"], "weight_bytes": quant.weight_bytes(model),
                      "greedy_agreement": float((greedy(model, prompts, 24) == reference).float().mean()),
                      "seconds": round(time.time() - started, 1)}
        print(f"text {name:12s} perplexity {rows[name]['val_perplexity']:7.3f}  greedy {rows[name]['greedy_agreement']:.2f}  "
              f"{rows[name]['weight_bytes'] / 2**20:5.2f} MiB", flush=True)
    return rows


def vl_rows(group_size: int, scenes_count: int, names) -> dict:
    base, tok = ernie_lab.load_model(VL).eval(), ernie_lab.load_tokenizer(VL)
    data = tiny_models.vl_batches(tok, base.config, 16, text_every=0)
    calibration = [data(step) for step in range(4)]
    rows = {}
    for name in names:
        scheme, gptq = SCHEMES[name]
        started = time.time()
        model = quantized(base, scheme, calibration if gptq else None, group_size)
        accuracy = tiny_models.evaluate_vl(model, tok, scenes_count)
        rows[name] = {"accuracy": accuracy, "val_loss": tiny_models.vl_val_loss(model, tok, batches=4),
                      "weight_bytes": quant.weight_bytes(model), "seconds": round(time.time() - started, 1)}
        print(f"vl   {name:12s} " + "  ".join(f"{k} {v:.0%}" for k, v in accuracy.items()) +
              f"  loss {rows[name]['val_loss']:.3f}", flush=True)
    return rows


def gap_closed(rows: dict, value) -> dict:
    out = {}
    for bits in ("w4a16", "w4a8", "w2a16"):
        fp, rtn, gptq = value(rows["fp32"]), value(rows[f"{bits} RTN"]), value(rows[f"{bits} GPTQ"])
        out[bits] = None if rtn - fp <= NOISE * abs(fp) else (rtn - gptq) / (rtn - fp)  # no gap to close
    return out


def kept_rows(path: Path, args, part: str, new: dict) -> dict:
    """``new`` rows merged into the ``part`` rows of an earlier result run with the same settings, in table order."""
    old = json.loads(path.read_text())
    if (old["group_size"], old["quick"], old["threads"]) != (args.group_size, args.quick, args.threads):
        raise SystemExit(f"--only: {path} was run with other settings; run every row instead")
    merged = {**old[part], **new}
    return {name: merged[name] for name in SCHEMES if name in merged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=128, help="w4a16 / w4a8 / w2a16 group (a 96-wide ViT layer takes 32)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--only", nargs="+", choices=list(SCHEMES), metavar="ROW",
                        help="recompute only these rows; the others are kept from --out (same settings)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.only or list(SCHEMES)
    text = text_rows(args.group_size, 8 if args.quick else None, names)
    vl = vl_rows(args.group_size, 6 if args.quick else 60, names)
    if args.only:
        text, vl = kept_rows(args.out, args, "text", text), kept_rows(args.out, args, "vl", vl)
    mean_accuracy = lambda row: sum(row["accuracy"].values()) / len(row["accuracy"])  # noqa: E731
    result = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__, "threads": args.threads,
        "group_size": args.group_size, "quick": args.quick,
        "rows_recomputed": names if args.only else "all", "text": text, "vl": vl,
        "text_perplexity_increase": {k: v["val_perplexity"] / text["fp32"]["val_perplexity"] - 1 for k, v in text.items()},
        "gptq_gap_closed_text_perplexity": gap_closed(text, lambda r: r["val_perplexity"]),
        "gptq_gap_closed_vl_loss": gap_closed(vl, lambda r: r["val_loss"]),
        "vl_mean_accuracy": {k: mean_accuracy(v) for k, v in vl.items()},
    }
    print("\ntext perplexity increase over fp32:",
          {k: f"{v:+.2%}" for k, v in result["text_perplexity_increase"].items()})
    print("GPTQ closes of RTN's gap (text perplexity):",
          {k: None if v is None else f"{v:.0%}" for k, v in result["gptq_gap_closed_text_perplexity"].items()})
    print("GPTQ closes of RTN's gap (VL answer loss):",
          {k: None if v is None else f"{v:.0%}" for k, v in result["gptq_gap_closed_vl_loss"].items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

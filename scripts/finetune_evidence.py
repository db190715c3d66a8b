"""Evidence that fine-tuning changes behaviour: SFT-LoRA teaches the tiny text model Italian colour names,
DPO-LoRA then raises the preferred-answer rate on held-out pairs. Writes benchmarks/results/finetune.json's
sibling ``finetune_evidence.json`` and (``--save-adapter``) the trained adapter for the notebook's fast mode.

    python scripts/finetune_evidence.py                          # needs data/tiny-ernie-text/
    python scripts/finetune_evidence.py --model random --sft-steps 20 --dpo-steps 5 --held-out 20   # smoke run

Held-out accuracy: greedy replies (``ernie_lab.chat``) to colour questions about validation scenes, graded by
``finetune_data.is_correct`` (first word = the Italian colour). Preferred-answer rate: the share of held-out
pairs whose chosen reply has the higher summed log-probability.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ernie_lab  # noqa: E402
from ernie_lab import finetune as ft  # noqa: E402
from ernie_lab import finetune_data as fd  # noqa: E402
from ernie_lab import lora  # noqa: E402
from ernie_lab.tiny_tokenizer import TINY_TOKENIZER_DIR  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "finetune_evidence.json"


def load(model_source: str):
    tokenizer = ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR if model_source == "random" else model_source)
    if model_source == "random":
        from ernie_lab.config import parse_config
        from ernie_lab.model import ErnieForCausalLM
        from ernie_lab.tiny_models import TEXT_CONFIG, tiny_config

        torch.manual_seed(0)
        return ErnieForCausalLM(parse_config(tiny_config(TEXT_CONFIG, tokenizer))).eval(), tokenizer
    return ernie_lab.load_model(model_source).eval(), tokenizer


def held_out_accuracy(model, tokenizer, items) -> float:
    right = 0
    for item in items:
        reply = ernie_lab.chat(model, tokenizer, item["messages"][:-1], max_new_tokens=6)
        right += fd.is_correct(item["qa"], reply)
    return right / len(items)


def preferred_rate(model, tokenizer, pairs) -> float:
    batches = ft.dpo_batches(tokenizer, pairs, batch_size=len(pairs))
    with torch.no_grad():
        logps = ft.sequence_logps(model, batches(0))
    half = len(pairs)
    return (logps[:half] > logps[half:]).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "data" / "tiny-ernie-text"))
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--save-adapter", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    held_out = fd.instruction_set(args.held_out, split="val", seed=7)
    held_pairs = fd.preference_pairs(args.held_out, split="val", seed=8)
    result = {"model": args.model, "before": {"accuracy": held_out_accuracy(model, tokenizer, held_out),
                                               "preferred_rate": preferred_rate(model, tokenizer, held_pairs)}}
    lora.apply_lora(model, r=8, alpha=16)
    train = [x["messages"] for x in fd.instruction_set(3000, split="train")]
    started = time.perf_counter()
    sft_log = ft.train_steps(model, ft.sft_batches(tokenizer, train, batch_size=16), args.sft_steps, lr=1e-3, warmup=10)
    result["after_sft"] = {"accuracy": held_out_accuracy(model, tokenizer, held_out),
                           "preferred_rate": preferred_rate(model, tokenizer, held_pairs),
                           "seconds": time.perf_counter() - started, "final_loss": sft_log[-1]["loss"]}
    lora.merge_lora(model, unload=True)        # the SFT model becomes the DPO reference
    lora.apply_lora(model, r=8, alpha=16)
    pairs = fd.preference_pairs(1000, split="train")
    dpo_log = ft.train_steps(model, ft.dpo_batches(tokenizer, pairs, batch_size=8), args.dpo_steps, lr=1e-4,
                             objective="dpo", beta=0.1, log_every=5)
    result["after_dpo"] = {"accuracy": held_out_accuracy(model, tokenizer, held_out),
                           "preferred_rate": preferred_rate(model, tokenizer, held_pairs)}
    result["sft_log"], result["dpo_log"] = sft_log, dpo_log
    print(json.dumps({k: result[k] for k in ("before", "after_sft", "after_dpo")}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.save_adapter:
        lora.save_adapter(model, args.save_adapter)


if __name__ == "__main__":
    main()

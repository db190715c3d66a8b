"""Evidence that SFT-LoRA and DPO-LoRA change a vision-language model's behaviour: the shipped tiny VL
model (data/tiny-ernie-vl/) learns a new answer format that needs the picture.

The tiny VL model counts the shapes of a scene and names its background (100% each, its TRAINING.md),
but was never asked both at once. The new instruction, "How many shapes, on what background? Answer
briefly.", wants replies like "three on white.": words the model knows, in a form it never produced,
about the picture it is shown. Conversations go through the VL chat template with the picture as the
first item; the loss is on the reply only (prompt masking); LoRA (r 8, alpha 16) on the decoder's
attention and MLP linears, every routed and shared expert included; the ViT and adapter stay frozen.

    nice -n 15 python scripts/finetune_vl_evidence.py        # about 2 minutes on 2 cores
    python scripts/finetune_vl_evidence.py --steps 5 --held-out 8 --out /tmp/vl_sft.json     # smoke

DPO-LoRA starts again from the shipped model (the base with adapters off is the frozen reference) on
preference pairs: the brief reply preferred over the same reply with a wrong count or a wrong
background. Held-out preferred-answer rate: the share of held-out pairs whose chosen reply has the
higher summed log-probability.

Held-out accuracy: greedy replies (``ernie_lab.chat``) on validation scenes, right when the reply's
first two words are the count and the background colour. Writes
benchmarks/results/finetune_vl_evidence.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ernie_lab  # noqa: E402
from ernie_lab import finetune as ft  # noqa: E402
from ernie_lab import lora, scenes  # noqa: E402
from ernie_lab.io.processor import VLProcessor  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "finetune_vl_evidence.json"
QUESTION = "How many shapes, on what background? Answer briefly."


def reply_for(scene: scenes.Scene) -> str:
    return f"{scenes.NUMBER_WORDS[len(scene.shapes)]} on {scene.background}."


def conversations(count: int, split: str, seed: int) -> list[dict]:
    """``{"scene", "messages"}``: the picture and the question, then the brief reply."""
    rng, out = random.Random(seed), []
    while len(out) < count:
        scene = scenes.random_scene(rng)
        if scenes.split_of(scene) != split:
            continue
        messages = [{"role": "user", "content": [{"type": "image", "image": scenes.render(scene)},
                                                 {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": reply_for(scene)}]
        out.append({"scene": scene, "messages": messages})
    return out


def is_right(scene: scenes.Scene, reply: str) -> bool:
    words = reply.replace(".", " ").replace(",", " ").split()
    return words[:1] == [scenes.NUMBER_WORDS[len(scene.shapes)]] and scene.background in words[1:3]


def preference_pairs(count: int, split: str, seed: int) -> list[dict]:
    """``{"prompt", "chosen", "rejected", "kind"}``: the brief reply over one with a wrong count or background."""
    rng, out = random.Random(seed + 5), []
    for item in conversations(count, split, seed):
        scene, n = item["scene"], len(item["scene"].shapes)
        if rng.random() < 0.5:
            kind, wrong = "count", f"{scenes.NUMBER_WORDS[rng.choice([k for k in (1, 2, 3) if k != n])]} on {scene.background}."
        else:
            other = rng.choice([b for b in scenes.BACKGROUNDS if b != scene.background])
            kind, wrong = "background", f"{scenes.NUMBER_WORDS[n]} on {other}."
        out.append({"prompt": item["messages"][:1], "chosen": item["messages"][1]["content"], "rejected": wrong,
                    "kind": kind})
    return out


def preferred_rate(model, tokenizer, processor, pairs) -> float:
    examples = [ft.pair_examples(tokenizer, p["prompt"], p["chosen"], p["rejected"], processor) for p in pairs]
    batch = ft.collate([c for c, _ in examples] + [r for _, r in examples], tokenizer.pad_token_id or 0)
    with torch.no_grad():
        logps = ft.sequence_logps(model, batch)
    return (logps[:len(pairs)] > logps[len(pairs):]).float().mean().item()


def accuracy(model, tokenizer, items) -> tuple[float, list[str]]:
    replies = [ernie_lab.chat(model, tokenizer, item["messages"][:1], max_new_tokens=8) for item in items]
    return sum(is_right(item["scene"], r) for item, r in zip(items, replies)) / len(items), replies


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "data" / "tiny-ernie-vl"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--dpo-lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, tokenizer = ernie_lab.load_model(args.model).eval(), ernie_lab.load_tokenizer(args.model)
    processor = VLProcessor(tokenizer, config=model.config)
    held_out = conversations(args.held_out, "val", seed=11)
    before, before_replies = accuracy(model, tokenizer, held_out)
    print(f"before: {before:.1%}, e.g. {before_replies[:3]}", flush=True)

    lora.apply_lora(model, r=8, alpha=16)
    train = [c["messages"] for c in conversations(1000, "train", seed=3)]
    config = ft.sft_config(lr=args.lr, max_steps=args.steps, warmup_steps=min(10, args.steps // 2), log_every=5)
    started = time.perf_counter()
    log = ft.sft(model, tokenizer, train, config, batch_size=16, processor=processor)
    seconds = time.perf_counter() - started
    after, after_replies = accuracy(model, tokenizer, held_out)
    print(f"after {args.steps} SFT-LoRA steps ({seconds:.0f} s): {after:.1%}, e.g. {after_replies[:3]}", flush=True)
    result = {"model": Path(args.model).name, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}", "question": QUESTION, "held_out_scenes": len(held_out),
              "before": {"accuracy": before, "examples": before_replies[:5]},
              "sft": {"steps": args.steps, "batch_size": 16, "lr": args.lr, "r": 8, "alpha": 16,
                      "trainable_parameters": lora.trainable_parameters(model), "examples": len(train),
                      "seconds": seconds, "log": log},
              "after_sft": {"accuracy": after, "examples": after_replies[:5]}}

    model = ernie_lab.load_model(args.model).eval()            # DPO from the shipped model itself
    held_pairs = preference_pairs(args.held_out, "val", seed=11)
    result["dpo_before"] = {"preferred_rate": preferred_rate(model, tokenizer, processor, held_pairs)}
    lora.apply_lora(model, r=8, alpha=16)
    pairs = preference_pairs(600, "train", seed=3)
    started = time.perf_counter()
    dpo_log = ft.train_steps(model, ft.dpo_batches(tokenizer, pairs, batch_size=8, processor=processor),
                             args.dpo_steps, lr=args.dpo_lr, objective="dpo", beta=args.beta, warmup=5, log_every=10)
    model.eval()
    result["dpo"] = {"steps": args.dpo_steps, "batch_size": 8, "lr": args.dpo_lr, "beta": args.beta,
                     "pairs": len(pairs), "seconds": time.perf_counter() - started, "log": dpo_log}
    result["dpo_after"] = {"preferred_rate": preferred_rate(model, tokenizer, processor, held_pairs),
                           "accuracy": accuracy(model, tokenizer, held_out)[0]}
    print(f"DPO-LoRA: held-out preferred rate {result['dpo_before']['preferred_rate']:.1%} -> "
          f"{result['dpo_after']['preferred_rate']:.1%} in {args.dpo_steps} steps "
          f"({result['dpo']['seconds']:.0f} s); greedy accuracy after DPO {result['dpo_after']['accuracy']:.1%}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""Train the kit's tiny ERNIE 4.5 models from scratch and write them, with their evidence, into data/.

    python scripts/train_tiny.py text        # data/tiny-ernie-text/
    python scripts/train_tiny.py vl          # data/tiny-ernie-vl/
    make train-tiny                          # both

Deterministic (seeded data by step, seeded init, a fixed thread count per model: the text model on one
thread, the VL model on both of the kit's two cores; a different count changes the last bits of the
sums and so the trained weights). Each run rewrites the
checkpoint folder: config.json + model.safetensors, the tokenizer files, TRAINING.md, metrics.json
(the numbers the tests check) and figures/ (the curves). ``--steps`` shortens a run for a try-out;
``--notes-only`` rewrites TRAINING.md from metrics.json (after a change to how the notes are written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing

import ernie_lab  # noqa: E402
from ernie_lab import tiny_models, vision_warmup  # noqa: E402
from ernie_lab.analysis.specialisation import scene_specialisation  # noqa: E402
from ernie_lab.model.config import parse_config  # noqa: E402
from ernie_lab.train import TrainConfig, Trainer  # noqa: E402

TOKENIZER = ROOT / "data" / "tiny-tokenizer"
TARGETS = tiny_models.VL_TARGETS  # VL, held out

RECIPES = {
    "text": dict(folder="tiny-ernie-text", config=tiny_models.TEXT_CONFIG, steps=800, lr=3e-3, warmup=80,
                 batch=16, seq_len=128, threads=1, options={}),
    # VL: the eyes first learn to see (tiny_models.VL_VISION_WARMUP), then, in the main run, sit out the first
    # 100 updates and learn slowly (tiny_models.VL_LR_SCALE); queries and keys start sharp (VL_ATTENTION_STD)
    "vl": dict(folder="tiny-ernie-vl", config=tiny_models.VL_CONFIG, steps=2000, lr=1e-3, warmup=100,
               batch=32, threads=2, photos=1, vision_warmup=tiny_models.VL_VISION_WARMUP,
               attention_std=tiny_models.VL_ATTENTION_STD, options=dict(balance=0.01, z_loss=1e-3, orthogonal=1e-3, logits_for_labels_only=True,
                                      frozen_steps=tiny_models.vl_frozen_steps(100),
                                      lr_scale=tiny_models.VL_LR_SCALE)),
}


def build(kind: str, tokenizer, seed: int = 0):
    recipe = RECIPES[kind]
    config = parse_config(tiny_models.tiny_config(recipe["config"], tokenizer))
    torch.manual_seed(seed)
    model = ernie_lab.architectures.build(config)
    model.init_weights(std=0.02, seed=seed, attention_std=recipe.get("attention_std"))
    return model


def data_for(kind: str, tokenizer, config):
    recipe = RECIPES[kind]
    if kind == "text":
        return (tiny_models.text_batches(tokenizer, recipe["batch"], recipe["seq_len"]),
                tiny_models.text_batches(tokenizer, recipe["batch"], recipe["seq_len"], split="val", seed=99))
    return (tiny_models.vl_batches(tokenizer, config, recipe["batch"], photos=recipe["photos"],
                                   shape_schedule=recipe.get("shape_schedule"),
                                   hidden_answers=recipe.get("hidden_answers", False)),
            tiny_models.vl_batches(tokenizer, config, 16, split="val", seed=999, text_every=0))


def train(kind: str, steps: int | None, out_root: Path) -> Path:
    recipe = RECIPES[kind]
    tokenizer = ernie_lab.load_tokenizer(TOKENIZER)
    model = build(kind, tokenizer)
    train_data, eval_data = data_for(kind, tokenizer, model.config)
    steps = steps or recipe["steps"]
    work = Path(tempfile.mkdtemp(prefix=f"train-{kind}-"))
    config = TrainConfig(lr=recipe["lr"], min_lr_ratio=0.1, warmup_steps=min(recipe["warmup"], steps // 10),
                         max_steps=steps, weight_decay=0.01, max_grad_norm=1.0, seed=0, eval_every=max(steps // 10, 1),
                         eval_batches=4, checkpoint_every=0, out_dir=str(work), log_every=10, **recipe["options"])
    start = time.time()
    warmed = vision_warmup.warm_up_vision(model, **recipe["vision_warmup"]) if recipe.get("vision_warmup") else None
    history = Trainer(model, train_data, config, eval_data=eval_data).fit()
    wall = time.time() - start
    shutil.rmtree(work, ignore_errors=True)
    folder = out_root / recipe["folder"]
    write_checkpoint(model, tokenizer, folder)
    metrics = evidence(kind, model, tokenizer)
    metrics.update(steps=steps, wall_seconds=round(wall, 1), parameters=model.num_parameters(),
                   machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                   torch=torch.__version__)
    if warmed is not None:
        metrics["vision_warmup"] = {"steps": warmed.steps, "seconds": round(warmed.seconds, 1),
                                    "probe_accuracy": {k: round(v, 4) for k, v in warmed.accuracy.items()}}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    draw_curves(history, folder / "figures", kind)
    (folder / "TRAINING.md").write_text(training_notes(kind, recipe, metrics, history))
    return folder


def write_checkpoint(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.safetensors"):
        stale.unlink()
    ernie_lab.save_model(model, folder, tokenizer=tokenizer)  # with the tokenizer files, template, generation config


def evidence(kind: str, model, tokenizer) -> dict:
    model.eval()
    if kind == "text":
        return tiny_models.evaluate_text(model, tokenizer)
    spec = scene_specialisation(model, tokenizer, count=60)
    nmi = {str(layer): {a: round(v["nmi"], 4) for a, v in attrs.items()} for layer, attrs in spec.items()}
    return {"val_loss": tiny_models.vl_val_loss(model, tokenizer), "accuracy": tiny_models.evaluate_vl(model, tokenizer, 100),
            "accuracy_first_20": tiny_models.evaluate_vl(model, tokenizer, 20),  # what the tests recompute
            "nmi": nmi, "load": {str(layer): {a: v["load"] for a, v in attrs.items()} for layer, attrs in spec.items()}}


def draw_curves(history: list[dict], folder: Path, kind: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["step"] for h in train], [h.get("lm_loss", h["loss"]) for h in train], label="training loss", lw=1)
    ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], "o-", label="held-out loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats per token)", yscale="log",
           title=f"tiny-ernie-{kind}: training from scratch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=120)
    plt.close(fig)


def schedule_notes(recipe: dict, metrics: dict | None = None) -> list[str]:
    """TRAINING.md lines on the parts of the VL recipe that decide whether the model learns its pictures."""
    options, lines = recipe["options"], []
    if recipe.get("vision_warmup"):
        warm = recipe["vision_warmup"]
        lines += [f"First the eyes: {warm['steps']} updates of `ernie_lab.vision_warmup.warm_up_vision` (AdamW "
                  f"{warm.get('lr', 1e-3):g}, batch {warm.get('batch_size', 32)})",
                  "train the ViT and the adapter alone to say, for every picture token, which shapes it shows (colour x kind,",
                  "kind, colour, place, kind x place, size; a linear probe that is then thrown away). Without it the tokens",
                  "never say *circle* clearly enough for attention to find it, and the model ties a colour to its shape or",
                  "place no better than a guess among the colours present (colour 47%, shape 34%, position 45%)."]
        if metrics and "vision_warmup" in metrics:
            probe = metrics["vision_warmup"]["probe_accuracy"]
            lines += ["Held-out tokens with every label of a group right after the warm-up: " +
                      ", ".join(f"{group} {value:.1%}" for group, value in probe.items()) +
                      f" ({metrics['vision_warmup']['seconds'] / 60:.1f} min of the wall time)."]
        lines += [""]
    if "frozen_steps" in options:
        lines += ["The ViT and the adapter sit out the first "
                  f"{options['frozen_steps']['vision']} updates (`TrainConfig.frozen_steps`), then learn at "
                  f"{options['lr_scale']['vision']:g}x and {options['lr_scale']['adapter']:g}x the",
                  "decoder's rate (`lr_scale`). Trained at full speed from the first step, the adapter turns every image",
                  "token of a picture into nearly the same vector within 25 updates (the spread of the tokens around their",
                  "mean falls from 20% of their length to 0.3%): the picture's overall colour survives, its shapes do not,",
                  "and the earlier checkpoint answered colour 18%, count 41%, position 18%, caption colours 3%."]
    if recipe.get("attention_std"):
        lines += ["", f"Query and key projections start at std {recipe['attention_std']:g} instead of 0.02 "
                  "(`init_weights(attention_std=...)`): attention starts sharper, and the",
                  "search \"which picture token is the circle?\" leaves its plateau sooner."]
    if recipe.get("shape_schedule"):
        steps = ", ".join(f"from step {start}: at most {most}" for start, most in sorted(recipe["shape_schedule"].items()))
        lines += ["", f"A curriculum of shape counts (`vl_batches(shape_schedule=...)`; {steps} shapes): one-shape",
                  "scenes first, where every question is answered without tying a colour to a shape, so the model",
                  "first learns what a circle, a square and a triangle look like."]
    if recipe.get("hidden_answers"):
        lines += ["", "No turn of a training conversation gives away another's answer (`vl_batches(hidden_answers=True)`):",
                  "the caption comes only last, and \"What colour is the circle?\" and \"What shape is red?\" are never asked",
                  "about the same shape, so the answers must come from the picture, not be copied from earlier turns."]
    return lines


def training_notes(kind: str, recipe: dict, m: dict, history: list[dict]) -> str:
    lines = [f"# tiny-ernie-{kind}", "",
             "Trained from scratch by `python scripts/train_tiny.py " + kind + "` (`make train-tiny`), deterministic",
             "(seeded initialisation, data drawn as a function of the step).", "",
             "| | |", "|---|---|",
             f"| parameters | {m['parameters']:,} |",
             f"| steps | {m['steps']} (batch {recipe['batch']}, AdamW lr {recipe['lr']}, warm-up + cosine) |",
             f"| wall time | {m['wall_seconds'] / 60:.1f} min"
             + (" (over the kit's 30-minute budget on this machine)" if m["wall_seconds"] > 1800 else "") + " |",
             f"| machine | {m['machine']}, torch {m['torch']} |",
             f"| final held-out loss | {m['val_loss']:.3f} |", ""]
    if kind == "text":
        lines += ["## Data", "",
                  "English prose from Python's own help pages (`pydoc_data.topics`, `ernie_lab.corpus`) and captions of",
                  "synthetic scenes (`ernie_lab.scenes`); 1 section in 20 held out (by a hash of its name).", "",
                  "## Evidence that it learned", "",
                  f"- held-out perplexity **{m['val_perplexity']:.1f}** against a unigram baseline of "
                  f"{m['unigram_perplexity']:.1f} on the same {m['val_tokens']:,} tokens;",
                  f"- held-out loss {m['val_loss']:.3f} against {m['shuffled_loss']:.3f} on the same tokens shuffled "
                  "(order carries information the model uses).", ""]
    else:
        acc = m["accuracy"]
        best = max(m["nmi"], key=lambda layer: max(m["nmi"][layer].values()))
        lines += ["## Data", "",
                  "Synthetic scenes generated on the fly (`ernie_lab.scenes`): 112 x 112 pictures of 1-3 shapes, a caption",
                  "request and the five question templates as chat turns (answers only carry loss), with one plain-text",
                  "batch in four (help pages and captions), and in every scene batch one of the bundled photographs",
                  "(`scenes.photos()`) asked about, its hand-written caption as the answer (\"Who is this?\" in notebook 04).",
                  "Load balancing per modality group (0.01), router z-loss (0.001) and the router orthogonal loss (0.001) on.", "",
                  *schedule_notes(recipe, m), "",
                  "## Answers on 100 fresh held-out scenes, through `ernie_lab.chat`", "",
                  "| question | accuracy |", "|---|---|"]
        lines += [f"| {template} | {value:.1%} |" for template, value in acc.items()]
        lines += ["", "## Routing specialisation (image tokens, top-1 vision expert, 60 held-out scenes)", "",
                  "Normalised mutual information between a token's expert and the scene attribute under it:", "",
                  "| MoE layer | colour | shape | background |", "|---|---|---|---|"]
        lines += [f"| {layer} | {v['colour']:.3f} | {v['kind']:.3f} | {v['background']:.3f} |" for layer, v in m["nmi"].items()]
        lines += ["", f"Layer {best} specialises most. Per-expert loads by attribute are in `metrics.json` (`load`).", ""]
        missed = {t: v for t, v in TARGETS.items() if acc.get(t, 0.0) < v}
        lines += ["## Targets", "",
                  "The kit asks for: " + ", ".join(f"{t} >= {v:.0%}" for t, v in TARGETS.items()) + "."]
        if missed:
            lines += ["", "**Not met yet**: " + ", ".join(f"{t} ({acc.get(t, 0.0):.0%})" for t in missed) + ". The model",
                      "counts the shapes and names the colours that are in the picture, but does not yet tie a colour to its",
                      "shape or place reliably (\"What shape is red?\" is near a guess among the three kinds). This checkpoint",
                      "is the kit's current one, not a finished result; see the note of the issue that tracks it.", ""]
        else:
            lines += ["", "All met, on scenes the model never saw: it ties each colour to its shape and its place, and its",
                      "captions name every colour in the picture.", ""]
    lines += ["## Curves", "", "![loss](figures/loss.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kinds", nargs="*", default=["text", "vl"], choices=sorted(RECIPES))
    parser.add_argument("--steps", type=int, default=None, help="fewer steps for a try-out")
    parser.add_argument("--out", type=Path, default=ROOT / "data", help="where the checkpoint folders go")
    parser.add_argument("--notes-only", action="store_true",
                        help="rewrite each folder's TRAINING.md from its metrics.json, without training")
    args = parser.parse_args()
    if args.notes_only:
        for kind in args.kinds:
            folder = args.out / RECIPES[kind]["folder"]
            metrics = json.loads((folder / "metrics.json").read_text())
            (folder / "TRAINING.md").write_text(training_notes(kind, RECIPES[kind], metrics, []))
            print(f"rewrote {folder / 'TRAINING.md'}")
        return
    for kind in args.kinds:  # one after the other, each on its recipe's threads (ERNIE_LAB_THREADS overrides)
        torch.set_num_threads(int(os.environ.get("ERNIE_LAB_THREADS", RECIPES[kind]["threads"])))
        print(f"trained {train(kind, args.steps, args.out)}")


if __name__ == "__main__":
    main()

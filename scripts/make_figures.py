"""Regenerate every picture in figures/ (`make figures`): the family chart and the routing pictures.

    python scripts/make_figures.py                    # all, from the shipped tiny VL model
    python scripts/make_figures.py --saturation-steps 40   # a shorter retraining for router saturation

The routing pictures come from the shipped tiny VL model, data/tiny-ernie-vl/, on held-out scenes
(ernie_lab.viz draws them). Router saturation needs checkpoints from *during* training, which the
kit does not ship (size): the same recipe is retrained briefly from the same initialisation, keeping
checkpoints at a few steps (``TrainConfig(keep_checkpoints_at=...)``), and each checkpoint's top-k
choices are compared with that run's last one. Deterministic: the same files come out every time.
"""

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
FIGURES = ROOT / "figures"

# Published totals and active parameters per token, in billions (model cards, technical report).
FAMILY = [
    ("0.3B", 0.36, 0.36, "dense text"),
    ("21B-A3B", 21.8, 3.0, "text MoE"),
    ("300B-A47B", 300.0, 47.0, "text MoE"),
    ("VL-28B-A3B", 28.0, 3.0, "vision-language MoE"),
    ("VL-424B-A47B", 424.0, 47.0, "vision-language MoE"),
]


def family_chart(path: Path) -> None:
    names = [f[0] for f in FAMILY]
    fig, ax = plt.subplots(figsize=(8, 4.2), dpi=120)
    x = range(len(FAMILY))
    ax.bar([i - 0.2 for i in x], [f[1] for f in FAMILY], width=0.4, label="total parameters", color="#4C72B0")
    ax.bar([i + 0.2 for i in x], [f[2] for f in FAMILY], width=0.4, label="active per token", color="#DD8452")
    for i, f in enumerate(FAMILY):
        ax.text(i, f[1] * 1.15, f[3], ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("parameters (billions, log scale)")
    ax.set_title("The ERNIE 4.5 family: mixture-of-experts models touch a fraction of their weights")
    ax.set_ylim(0.1, 2000)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save(fig, name: str) -> None:
    path = FIGURES / name
    fig.savefig(path, dpi=110)
    print("wrote", path.relative_to(ROOT))


def routing_figures(scene_count: int = 40, saturation_steps: int = 150) -> None:
    """Every routing picture of ernie_lab.viz, on the shipped tiny VL model."""
    import torch

    import ernie_lab
    from ernie_lab import architectures, routing, scenes, tiny_models, viz
    from ernie_lab.special_tokens import TEXT

    torch.manual_seed(0)
    folder = ROOT / "data" / "tiny-ernie-vl"
    model = ernie_lab.load_model(folder).eval()
    tokenizer = ernie_lab.load_tokenizer(folder)
    held_out = tiny_models.held_out_scenes(scene_count)

    rec, rows, labels = viz.route_scenes(model, tokenizer, held_out)
    save(viz.load_heatmap(rec, title=f"Expert load of the tiny VL model on {scene_count} held-out scenes"),
         "routing_load.png")
    save(viz.specialisation(rec, rows, labels, title="Trained tiny VL model: vision experts vs what the patch shows"),
         "routing_specialisation.png")
    layers = [entry.layer_idx for entry in rec.layers]
    per_attribute = [routing.specialisation(rec, rows, values) for values in labels.values()]
    best = max((r for results in per_attribute for r in results), key=lambda r: r["nmi"])["layer"]  # most specialised
    save(viz.co_selection(rec, best), "routing_co_selection.png")
    save(viz.confidence_by_layer(rec), "routing_confidence.png")
    untrained = architectures.build(model.config).init_weights(std=0.02, seed=0).eval()
    rec0, rows0, labels0 = viz.route_scenes(untrained, tokenizer, held_out)
    save(viz.specialisation(rec0, rows0, labels0, title="The same architecture at initialisation"),
         "routing_specialisation_init.png")

    scene = next(s for s in held_out if len(s.shapes) == 3)  # a busy picture
    routed = viz.route(model, tokenizer, scenes.DESCRIBE, scenes.render(scene))
    deepest = layers[-1]  # where the trained model's experts track the shapes' colour most (notebook 06)
    save(viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=deepest),
         "routing_patches.png")
    save(viz.patch_overlay(routed.record, routed.image, routed.grid, routed.image_rows, layer=deepest, rank=1,
                           confidence=False), "routing_patches_second_choice.png")
    save(viz.routing_path(routed.record, int(routed.image_rows[5]), routed.tokens), "routing_path.png")
    text = " ".join(scenes.caption(s) + "." for s in held_out[:8])
    text_routed = viz.route(model, tokenizer, text)
    save(viz.token_strip(text_routed.record, text_routed.tokens, text_routed.text_rows), "routing_tokens.png")
    texts = [scenes.caption(s) + "." for s in held_out] + ["There are 3 shapes: 1 circle, 2 squares; 0 triangles!"]
    text_rec, text_rows, classes = viz.route_texts(model, tokenizer, texts)
    save(viz.specialisation(text_rec, text_rows, {"word class": classes}, group=TEXT,
                            title="Trained tiny VL model: text experts vs word class"), "routing_text_specialisation.png")

    if saturation_steps:
        save(saturation_figure(model.config, tokenizer, held_out[:8], saturation_steps), "routing_saturation.png")


def saturation_figure(config, tokenizer, probe_scenes, steps: int):
    """Retrain the tiny VL recipe for ``steps`` steps, keeping checkpoints; draw router saturation."""
    from ernie_lab import architectures, scenes, tiny_models, viz
    from ernie_lab.chat import render_prompt
    from ernie_lab.train import TrainConfig, Trainer, checkpoints

    model = architectures.build(config).init_weights(std=0.02, seed=0)
    at_zero = copy.deepcopy(model).eval()
    keep = tuple(sorted({max(1, round(steps * f)) for f in (0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)}))
    with tempfile.TemporaryDirectory(prefix="saturation-") as run_dir:
        train_config = TrainConfig(lr=2e-3, min_lr_ratio=0.1, warmup_steps=max(steps // 15, 1), max_steps=steps,
                                   weight_decay=0.01, seed=0, keep_checkpoints_at=keep, out_dir=run_dir,
                                   log_every=max(steps // 10, 1), balance=0.01, z_loss=1e-3, orthogonal=1e-3)
        Trainer(model, tiny_models.vl_batches(tokenizer, config, 16), train_config).fit()
        probe = [render_prompt(at_zero, tokenizer, viz.messages_for(scenes.DESCRIBE, scenes.render(s)))
                 for s in probe_scenes]
        over_time = viz.records_over_training([(0, at_zero)] + checkpoints(run_dir), probe)
    fig = viz.saturation(over_time, over_time[-1][1])
    fig.suptitle(f"Router saturation of the tiny VL recipe, retrained for {steps} steps")
    return fig


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=40, help="held-out scenes to route (default 40)")
    parser.add_argument("--saturation-steps", type=int, default=150,
                        help="steps of the retraining for router saturation (0: skip it)")
    args = parser.parse_args(argv)
    FIGURES.mkdir(exist_ok=True)
    family_chart(FIGURES / "ernie45_family.png")
    print("wrote figures/ernie45_family.png")
    routing_figures(args.scenes, args.saturation_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())

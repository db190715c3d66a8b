"""Eager vs static-cache vs compiled decoding of the MoE models: milliseconds per token (batch 1, 2 threads).

    python benchmarks/compiled_moe.py            # prints a table, writes benchmarks/results/compiled_moe.json
    python benchmarks/compiled_moe.py --quick    # fewer rounds (smoke test); --threads 1 on a loaded machine

Models: a micro text MoE of the 0.3B's depth (18 layers, hidden 32, 8 experts top-2 and a shared expert
from layer 1 on), where per-op overhead is everything, and the shipped tiny VL model (``data/tiny-ernie-vl``)
decoding after a prefill with a picture. The timing is ``fast_decode.run`` (interleaved rounds, medians,
the prefill cancelled out); greedy tokens are compared with eager.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ernie_lab  # noqa: E402
from ernie_lab import ErnieConfig, ErnieForCausalLM  # noqa: E402
from ernie_lab.model.moe import moe_blocks  # noqa: E402
from fast_decode import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEEP_MOE = dict(model_type="ernie4_5_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=18,
                num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=8, moe_k=2,
                moe_intermediate_size=16, moe_num_shared_experts=1, moe_layer_start_index=1, tie_word_embeddings=True)


def deep_moe() -> ErnieForCausalLM:
    """The 18-layer micro MoE with N(0, 1) routers, so tokens spread over the experts."""
    model = ErnieForCausalLM(ErnieConfig.from_dict(DEEP_MOE)).init_weights(seed=0).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(block.layer_idx))
    return model


def vl_picture_prompt():
    """The tiny VL model and a prompt with one picture: (model, ids, picture inputs)."""
    from ernie_lab import scenes, tiny_models
    from ernie_lab.io.chat import render_prompt

    folder = ROOT / "data/tiny-ernie-vl"
    model, tok = ernie_lab.load_model(folder), ernie_lab.load_tokenizer(folder)
    image = scenes.render(tiny_models.held_out_scenes(1)[0])
    prompt = render_prompt(model, tok, scenes.conversation(image, "What colour is the background?", "")[:1])
    return model, prompt.pop("input_ids"), prompt


def cases() -> dict:
    vl, vl_ids, picture = vl_picture_prompt()
    return {"micro-moe-18-layers": (deep_moe(), [[5, 9, 11, 30, 2, 7]], None),
            "tiny-ernie-vl-after-a-picture": (vl, vl_ids, picture)}


def main() -> None:
    run(__doc__.split("\n")[0], cases, "compiled_moe.json")


if __name__ == "__main__":
    main()

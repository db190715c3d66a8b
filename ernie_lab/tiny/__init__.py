"""The tiny models and their synthetic data: everything made offline, deterministic by seed.

    scenes          coloured shapes on a background, their captions and questions; bundled photographs
    corpus          the text corpus (captions and prose that installed packages carry)
    tokenizer       the compact tokenizer of the tiny models
    models          the tiny models' shapes, data streams, evaluation and recipes
    finetune_data   instruction and preference data for SFT / DPO
    vision_warmup   a warm-up that teaches the ViT and adapter to see the shapes

May import: ``ernie_lab.errors``, ``ernie_lab.atomic``, ``model``, ``quant``, ``io``, ``train``.
"""

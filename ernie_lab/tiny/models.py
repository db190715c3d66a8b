"""The kit's own tiny ERNIE 4.5 models: their shapes, their training data, and the evidence that they learned.

Two models of the real architectures, small enough to train from scratch on 2 CPU cores and to ship:

* ``tiny-ernie-text``: the dense 0.3B design scaled down (GQA, interleaved RoPE, tied embeddings), trained
  on English prose that ships with Python (``corpus.text_documents``) plus scene captions;
* ``tiny-ernie-vl``: the VL-28B-A3B design scaled down: a ViT with 2-D RoPE, the adapter's 2x2 spatial
  merge, 3-D RoPE in the decoder, and modality-isolated MoE layers whose text and vision experts have
  different widths, with a shared expert; trained on synthetic scenes (``scenes.py``): captions and
  question/answer turns, with some plain text, and the per-modality balancing losses on.

Both use the compact tokenizer of ``tiny_tokenizer.py`` (6,012 ids), so their special ids differ from
the big checkpoints' and are read from the checkpoint's files. Batches are *functions of the step*
(``batches(step, rank, world_size) -> dict``), so training is deterministic, resumable and splits across
ranks for ``torchrun``. :func:`evaluate_text` and :func:`evaluate_vl` compute the numbers that ``TRAINING.md``
records and the tests check (its routing specialisation comes from ``ernie_lab.analysis.specialisation``).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from functools import lru_cache

import torch

from . import corpus, scenes
from ..model.decoder import IGNORE_INDEX
from ..train.finetune import collate

TEXT_CONFIG = {
    "model_type": "ernie4_5",
    "vocab_size": 6016,              # the tiny tokenizer's 6,012 ids, rounded up to a multiple of 64
    "hidden_size": 192,              # 0.3B: 1024
    "intermediate_size": 576,        # 3 x hidden, as the 0.3B
    "num_hidden_layers": 4,          # 0.3B: 18
    "num_attention_heads": 6,
    "num_key_value_heads": 2,        # GQA: 3 query heads share a K/V head (0.3B: 8)
    "head_dim": 32,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "use_bias": False,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}

VL_CONFIG = {
    "model_type": "ernie4_5_vl_moe",
    "tie_word_embeddings": True,
    "text_config": {
        "vocab_size": 6016,
        "hidden_size": 128,
        "intermediate_size": 384,            # the dense first layer
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,                      # 16 rotary pairs: 6 height, 6 width, 4 time (28B: 22, 22, 20)
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "use_bias": False,
        "moe_num_experts": 8,                # 8 text AND 8 vision experts per MoE layer (28B: 64 + 64)
        "moe_k": 2,
        "moe_intermediate_size": [128, 64],  # text experts twice as wide as vision experts (28B: 1536, 512)
        "moe_num_shared_experts": 1,
        "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 6, 4]},
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    },
    "vision_config": {
        "depth": 3, "hidden_size": 96, "num_heads": 4, "intermediate_size": 384, "patch_size": 14,
        "in_channels": 3, "spatial_merge_size": 2, "temporal_merge_size": 2,
    },
}


# The VL model's eyes learn slower than its decoder: the ViT at a tenth of the decoder's learning rate, the
# adapter at a fiftieth (TrainConfig.lr_scale), after sitting out the first updates (frozen_steps) — trained
# at full speed from the start, the adapter turns every image token into one vector (train.py says why).
VL_LR_SCALE = {"vision": 0.1, "adapter": 0.02}

# Before that, the eyes learn to see on their own (vision_warmup.py): 1500 updates of a per-token task that
# makes every picture token say which shapes it shows, so attention can find "the circle" among them.
VL_VISION_WARMUP = {"steps": 1500, "lr": 1e-3, "batch_size": 32}
# Queries and keys start 4x wider than the other weights (init_weights(attention_std=...)): sharper attention
# from the first step, so the search for the asked-about shape leaves its plateau sooner.
VL_ATTENTION_STD = 0.08
# What the VL model must answer right on held-out scenes (the targets; TRAINING.md and the tests read them).
VL_TARGETS = {"background": 0.95, "colour": 0.95, "shape": 0.90, "count": 0.80, "position": 0.80}


def vl_frozen_steps(steps: int) -> dict[str, int]:
    """``frozen_steps`` for the VL recipe: the ViT and adapter sit out the first ``steps`` updates."""
    return dict.fromkeys(VL_LR_SCALE, steps)


def tiny_config(raw: dict, tokenizer) -> dict:
    """A config table with the tokenizer's picture token ids filled in (VL) — the model reads them from it."""
    config = {**raw}
    if "vision_config" in raw:
        from ..io.processor import picture_token_ids
        from ..model.special_tokens import PICTURE_TOKENS

        ids = picture_token_ids(tokenizer)
        config.update({config_key: ids[key] for key, (_, config_key) in PICTURE_TOKENS.items()})
    return config


# ====================================================================================== text data
@lru_cache(maxsize=4)
def token_stream(tokenizer, split: str, captions: int = 2000) -> torch.Tensor:
    """One long (n,) stream of ids: the help-text documents and scene captions of ``split``, each ended by </s>."""
    docs = corpus.text_documents(split) + corpus.caption_documents(captions if split == "train" else captions // 10,
                                                                    seed=1, split=split)
    random.Random(0).shuffle(docs)
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc) + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def text_batches(tokenizer, batch_size: int = 16, seq_len: int = 128, split: str = "train", seed: int = 0):
    """``batches(step, rank=0, world_size=1)``: random windows of the token stream, labels = inputs."""
    stream = token_stream(tokenizer, split)

    def batch(step: int, rank: int = 0, world_size: int = 1) -> dict:
        rng = torch.Generator().manual_seed(seed * 1_000_003 + step * world_size + rank)
        starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=rng)
        ids = torch.stack([stream[s:s + seq_len] for s in starts.tolist()])  # (B, T)
        return {"input_ids": ids, "labels": ids.clone()}

    return batch


def eval_windows(tokenizer, seq_len: int = 128, split: str = "val") -> torch.Tensor:
    """(n, seq_len) consecutive windows covering the held-out stream once."""
    stream = token_stream(tokenizer, split)
    n = len(stream) // seq_len
    return stream[:n * seq_len].view(n, seq_len)


# ====================================================================================== VL data
def scene_turns(scene: scenes.Scene, rng: random.Random, max_turns: int = 4,
                hidden_answers: bool = False) -> list[tuple[str, str]]:
    """Up to ``max_turns`` (question, answer) turns about one scene, in random order; the caption request is one.

    With ``hidden_answers`` no turn gives away a later one's answer, so the model must look at the picture,
    not copy from the conversation: the caption (which names every colour, kind and place) comes only last,
    and of "What colour is the circle?" / "What shape is red?" about the same shape only one is asked.
    """
    caption = (scenes.DESCRIBE, scenes.caption(scene) + ".")
    if not hidden_answers:
        turns = [(q.question, q.answer) for q in scenes.questions(scene)] + [caption]
        rng.shuffle(turns)
        return turns[:max_turns]
    # a colour answer or a kind answer names one shape: every shape's colour and kind differ from the others'
    shape_named_by = {word: n for n, s in enumerate(scene.shapes) for word in (s.colour, s.kind)}
    asked = scenes.questions(scene)
    rng.shuffle(asked)
    shapes_asked, turns = set(), []
    for q in asked:
        if q.template in ("colour", "shape"):
            shape = shape_named_by[q.answer_word]
            if shape in shapes_asked:
                continue
            shapes_asked.add(shape)
        turns.append((q.question, q.answer))
    if rng.random() < 1 / (len(turns) + 1):  # about as often as one turn in the shuffle, but only ever last
        return turns[:max_turns - 1] + [caption]
    return turns[:max_turns]


def vl_example(processor, image, turns: list[tuple[str, str]]) -> dict:
    """One training sequence: a picture, then question/answer turns; only the answers carry labels.

    The first turn is rendered exactly as ``ernie_lab.chat`` renders a question (non-thinking prompt),
    later turns continue the conversation in the same format.
    """
    from ..io.chat_format import NO_THINKING
    from ..model.special_tokens import END_OF_SENTENCE

    tokenizer = processor.tokenizer
    end = tokenizer.special_tokens[END_OF_SENTENCE]
    first_q = turns[0][0]
    prompt = processor([{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": first_q}]}])
    ids = prompt["input_ids"][0].tolist()
    labels = [IGNORE_INDEX] * len(ids)
    for n, (question, answer) in enumerate(turns):
        if n:
            asked = tokenizer.encode(f"User: {question}\nAssistant: ") + tokenizer.encode(NO_THINKING)
            ids += asked
            labels += [IGNORE_INDEX] * len(asked)
        said = tokenizer.encode(answer) + [end]
        ids += said
        labels += said
    return {"ids": ids, "labels": labels, "pixel_values": prompt["pixel_values"],
            "image_grid_thw": prompt["image_grid_thw"]}


PHOTO_QUESTIONS = ("Describe the picture.", "Who is this?", "What is in the picture?")


@lru_cache(maxsize=1)
def photo_images(size: int = scenes.IMAGE_SIZE) -> tuple:
    """The bundled photographs (``scenes.photos()``), squeezed to ``size`` x ``size``, with their captions."""
    return tuple((p.name, p.image.convert("RGB").resize((size, size)), p.caption) for p in scenes.photos())


def vl_batches(tokenizer, config, batch_size: int = 16, split: str = "train", seed: int = 0, text_every: int = 4,
               text_batch: int = 8, image_size: int = scenes.IMAGE_SIZE, max_turns: int = 4, photos: int = 0,
               shape_schedule: dict[int, int] | None = None, hidden_answers: bool = False):
    """``batches(step, rank=0, world_size=1)``: fresh random scenes with question turns; every ``text_every``-th
    step a batch of plain text instead (0: never), so the decoder keeps its language. ``photos`` > 0 adds that
    many of the bundled photographs to each scene batch, asked to be described (their captions are the answers).
    ``shape_schedule`` ``{from_step: most_shapes}`` is a curriculum: ``{0: 1, 500: 3}`` draws one-shape scenes
    for the first 500 steps (nothing to tie together yet, so the eyes learn what a circle is), then 1-3.
    ``hidden_answers``: no turn gives away another's answer (``scene_turns``)."""
    from ..io.processor import VLProcessor

    processor = VLProcessor(tokenizer, config=config)
    text = text_batches(tokenizer, text_batch, 64, seed=seed + 7) if text_every else None

    def batch(step: int, rank: int = 0, world_size: int = 1) -> dict:
        if text is not None and step % text_every == text_every - 1:
            return text(step, rank, world_size)
        rng = random.Random(seed * 1_000_003 + step * world_size + rank)
        examples = []
        most = most_shapes(shape_schedule, step)
        while len(examples) < batch_size:
            scene = scenes.random_scene(rng)
            if scenes.split_of(scene) != split or len(scene.shapes) > most:
                continue
            image = scenes.render(scene, image_size)
            examples.append(vl_example(processor, image, scene_turns(scene, rng, max_turns, hidden_answers)))
        for _ in range(photos):
            name, image, words = rng.choice(photo_images(image_size))
            examples.append(vl_example(processor, image, [(rng.choice(PHOTO_QUESTIONS), words + ".")]))
        return collate(examples, tokenizer.pad_token_id or 0)

    return batch


def most_shapes(schedule: dict[int, int] | None, step: int) -> int:
    """The curriculum's largest shape count at ``step`` (3, every scene, without a schedule)."""
    if not schedule:
        return 3
    return schedule[max((start for start in schedule if start <= step), default=min(schedule))]


def held_out_scenes(count: int, seed: int = 12345) -> list[scenes.Scene]:
    """``count`` validation scenes, always the same for a seed."""
    return [scene for scene, _ in zip(scenes.scene_stream(seed, "val"), range(count))]


# ====================================================================================== evidence
@torch.no_grad()
def evaluate_text(model, tokenizer, seq_len: int = 128, max_windows: int | None = None) -> dict:
    """Held-out loss and perplexity, the unigram baseline on the same tokens, and the loss on shuffled tokens."""
    model.eval()
    windows = eval_windows(tokenizer, seq_len)
    if max_windows:
        windows = windows[:max_windows]
    shuffled = windows.reshape(-1)[torch.randperm(windows.numel(), generator=torch.Generator().manual_seed(0))]
    shuffled = shuffled.view_as(windows)
    losses, shuffled_losses = [], []
    for rows, bucket in ((windows, losses), (shuffled, shuffled_losses)):
        for chunk in rows.split(16):
            bucket.append(model(chunk, labels=chunk).loss.item() * chunk.shape[0])
    loss = sum(losses) / len(windows)
    train = token_stream(tokenizer, "train")
    unigram = corpus.unigram_perplexity(train.tolist(), windows.reshape(-1).tolist(), model.config.vocab_size)
    return {"val_loss": loss, "val_perplexity": math.exp(loss), "unigram_perplexity": unigram,
            "shuffled_loss": sum(shuffled_losses) / len(windows), "val_tokens": windows.numel()}


@torch.no_grad()
def vl_val_loss(model, tokenizer, batches: int = 8, batch_size: int = 16) -> float:
    """Mean answer-token loss on held-out scene batches (no plain-text batches)."""
    model.eval()
    data = vl_batches(tokenizer, model.config, batch_size, split="val", seed=999, text_every=0)
    return sum(model(**data(i)).loss.item() for i in range(batches)) / batches


@torch.no_grad()
def evaluate_vl(model, tokenizer, count: int = 60, seed: int = 12345) -> dict:
    """Accuracy per question template on ``count`` held-out scenes, through ``ernie_lab.chat``; and how
    often a caption names every colour in the picture."""
    from ..io.chat import chat

    model.eval()
    right, asked = Counter(), Counter()
    for scene in held_out_scenes(count, seed):
        image = scenes.render(scene)
        for qa in scenes.questions(scene):
            reply = chat(model, tokenizer, scenes.conversation(image, qa.question, "")[:1], max_new_tokens=6)
            asked[qa.template] += 1
            right[qa.template] += scenes.check_answer(qa, reply)
        described = chat(model, tokenizer, scenes.conversation(image, scenes.DESCRIBE, "")[:1], max_new_tokens=48)
        asked["caption colours"] += 1
        right["caption colours"] += all(s.colour in described for s in scene.shapes)
    return {template: right[template] / asked[template] for template in asked}

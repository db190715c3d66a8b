"""The shipped tiny ERNIE models: complete checkpoints that load in both libraries and did learn.

``data/tiny-ernie-text`` and ``data/tiny-ernie-vl`` are written by ``scripts/train_tiny.py`` together with
``metrics.json``; these tests recompute the evidence from the shipped weights and compare.
"""

import json
import random
from pathlib import Path

import pytest
import torch

import ernie_lab
from ernie_lab import scenes, tiny_models
from ernie_lab.model.config import VLConfig

DATA = Path(__file__).resolve().parent.parent / "data"
TEXT, VL = DATA / "tiny-ernie-text", DATA / "tiny-ernie-vl"


def metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.fixture(scope="module")
def text_model():
    return ernie_lab.load_model(TEXT), ernie_lab.load_tokenizer(TEXT)


@pytest.fixture(scope="module")
def vl_model():
    return ernie_lab.load_model(VL), ernie_lab.load_tokenizer(VL)


@pytest.mark.parametrize("folder", [TEXT, VL], ids=["text", "vl"])
def test_checkpoint_is_complete_and_small(folder):
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "TRAINING.md",
                 "metrics.json", "figures/loss.png"):
        assert (folder / name).is_file(), f"{folder.name} lacks {name}"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{folder.name} is {size / 2**20:.1f} MB (budget 25 MB)"
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) <= 60 * 2**20


def test_special_ids_come_from_the_checkpoint(vl_model):
    model, tok = vl_model
    config = model.config
    assert isinstance(config, VLConfig) and config.text.vocab_size <= 16384
    assert config.image_token_id == tok.special_tokens["<|IMAGE_PLACEHOLDER|>"] != 100295
    assert config.image_start_token_id == tok.special_tokens["<|IMAGE_START|>"]
    from ernie_lab.io.chat import render_prompt

    image = scenes.render(tiny_models.held_out_scenes(1)[0])
    prompt = render_prompt(model, tok, scenes.conversation(image, "What colour is the background?", "")[:1])
    assert int((prompt["input_ids"] == config.image_token_id).sum()) == 16  # 112 px: 8 x 8 patches -> 4 x 4 tokens


def test_text_model_equals_transformers(text_model):
    from transformers import AutoModelForCausalLM

    model, tok = text_model
    reference = AutoModelForCausalLM.from_pretrained(TEXT).eval()
    ids = torch.tensor([tok.encode("The break statement terminates the nearest enclosing loop.")])
    with torch.no_grad():
        assert (model(ids).logits - reference(ids).logits).abs().max() < 1e-4


def test_vl_model_equals_transformers(vl_model):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    from ernie_lab.io.chat import render_prompt
    from ernie_lab.model.vl_model import routing_groups

    model, tok = vl_model
    reference = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(VL).eval()
    image = scenes.render(tiny_models.held_out_scenes(2)[1])
    prompt = render_prompt(model, tok, scenes.conversation(image, "How many shapes are there?", "")[:1])
    ids = prompt["input_ids"]
    types = routing_groups(ids, model.config)
    mm = (ids == model.config.image_token_id).long()
    with torch.no_grad():
        ours = model(**prompt).logits
        theirs = reference(input_ids=ids, pixel_values=prompt["pixel_values"], image_grid_thw=prompt["image_grid_thw"],
                           mm_token_type_ids=mm, moe_mm_token_type_ids=types).logits
    assert (ours - theirs).abs().max() < 1e-4


def test_text_model_learned_far_more_than_a_unigram_model(text_model):
    model, tok = text_model
    recorded = metrics(TEXT)
    now = tiny_models.evaluate_text(model, tok)
    assert abs(now["val_loss"] - recorded["val_loss"]) < 1e-3
    assert now["val_perplexity"] < 0.5 * now["unigram_perplexity"]
    assert now["val_loss"] < now["shuffled_loss"] - 1.0


def test_text_model_continues_python_prose(text_model):
    model, tok = text_model
    reply = ernie_lab.generate(model, [tok.encode("The for statement is used to")], 12)
    text = tok.decode(reply[0].tolist())
    assert len(set(reply[0, -12:].tolist())) > 4, text  # not one repeated token


def test_vl_model_answers_held_out_scene_questions_at_its_recorded_accuracy(vl_model):
    model, tok = vl_model
    recorded = metrics(VL)
    now = tiny_models.evaluate_vl(model, tok, count=20)
    assert now == pytest.approx(recorded["accuracy_first_20"], abs=1e-9)
    assert recorded["accuracy"]["background"] >= TARGETS["background"]
    assert recorded["accuracy"]["count"] >= TARGETS["count"]
    assert recorded["accuracy"]["caption colours"] >= 0.9  # captions name every colour in the picture


def test_vl_model_describes_the_bundled_photographs_it_was_shown(vl_model):
    """Notebook 04's "Who is this?": the photographs (and their captions) were part of the training data."""
    model, tok = vl_model
    for name, image, caption in tiny_models.photo_images()[:3]:
        question = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Who is this?"}]}]
        reply = ernie_lab.chat(model, tok, question, max_new_tokens=12)
        assert reply.split()[:4] == caption.split()[:4], (name, reply)


TARGETS = tiny_models.VL_TARGETS


def test_vl_model_meets_every_accuracy_target():
    """On 100 held-out scenes (TRAINING.md) and on the first 20, which the test above recomputes."""
    for key in ("accuracy", "accuracy_first_20"):
        recorded = metrics(VL)[key]
        assert all(recorded[template] >= target for template, target in TARGETS.items()), (key, recorded)
    assert metrics(VL)["accuracy"]["caption colours"] >= 0.95


def test_vl_model_reaches_its_recorded_validation_loss(vl_model):
    model, tok = vl_model
    assert tiny_models.vl_val_loss(model, tok) == pytest.approx(metrics(VL)["val_loss"], rel=1e-2, abs=1e-5)


def test_vl_model_answers_through_chat(vl_model):
    model, tok = vl_model
    for background in scenes.BACKGROUNDS:
        scene = scenes.Scene(background, (scenes.Shape("circle", "red", "large", "left"),
                                          scenes.Shape("square", "yellow", "small", "right")))
        reply = ernie_lab.chat(model, tok, scenes.conversation(scenes.render(scene), "What colour is the background?",
                                                               "")[:1], max_new_tokens=8)
        assert scenes.first_word(reply) == background, reply


def test_shape_schedule_draws_one_shape_scenes_first_then_all_counts():
    tok = ernie_lab.load_tokenizer(VL)
    config = VLConfig.from_dict(json.loads((VL / "config.json").read_text()))
    assert [tiny_models.most_shapes({0: 1, 500: 2, 1000: 3}, s) for s in (0, 499, 500, 999, 1000, 10**6)] == \
        [1, 1, 2, 2, 3, 3]
    assert tiny_models.most_shapes(None, 0) == 3

    def answers(batch) -> str:
        labels = batch["labels"]
        return tok.decode(labels[labels != -100].tolist())

    early = tiny_models.vl_batches(tok, config, 16, text_every=0, shape_schedule={0: 1, 3: 3})
    plain = tiny_models.vl_batches(tok, config, 16, text_every=0)
    for step in range(3):  # captions say "one shape on ..."; count answers are "one"
        said = answers(early(step))
        assert "two shapes" not in said and "three shapes" not in said and "one shape" in said, said
    assert any("three shapes" in answers(plain(step)) for step in range(3))
    assert any("three shapes" in answers(early(step)) for step in range(3, 6))  # the curriculum moves on


def test_hidden_answers_keeps_the_caption_last_and_never_asks_both_ways_about_one_shape():
    rng = random.Random(3)
    captions_seen = 0
    for _ in range(200):
        scene = scenes.random_scene(rng)
        turns = tiny_models.scene_turns(scene, rng, max_turns=12, hidden_answers=True)
        questions = [q for q, _ in turns]
        assert scenes.DESCRIBE not in questions[:-1], questions
        captions_seen += questions[-1] == scenes.DESCRIBE
        colour_of = {q.split()[-1].rstrip("?") for q in questions if q.startswith("What colour is the ")} - {"background"}
        shape_of = {a.rstrip(".") for q, a in turns if q.startswith("What shape is ")}
        assert not colour_of & shape_of, turns  # "What colour is the circle?" would give away "What shape is red?"
    assert 10 < captions_seen < 60  # about one scene in seven, as when the caption is shuffled in
    plain = [tiny_models.scene_turns(scenes.random_scene(rng), rng, max_turns=12) for _ in range(50)]
    assert any(t[0][0] == scenes.DESCRIBE for t in plain)  # without the option the caption may come first

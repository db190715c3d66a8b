"""Fine-tuning data built offline from the synthetic scenes: a new language of colour names, and preferences.

**Instructions** (SFT). A scene is described in words, a question asked about it, and the answer given
in *Italian colour names* -- something the tiny models never saw::

    User: In the picture: a large red circle on the left and a small blue square at the top.
          What colour is the circle? Answer in Italian.
    Assistant: rosso.

The VL form shows the picture instead of describing it. Colour questions (shapes and background) get
Italian answers; a held-out split (scenes whose hash falls in ``scenes.split_of(...) == "val"``) measures
whether the model learned the new words rather than memorised the scenes.

**Preferences** (DPO). The same prompts with two replies: the concise correct answer is *chosen*; the
*rejected* one is verbose (the right word buried in a sentence) or wrong (another colour's name).
"""

from __future__ import annotations

import random

from . import scenes

ITALIAN = {"red": "rosso", "green": "verde", "blue": "blu", "yellow": "giallo", "purple": "viola",
           "orange": "arancione", "white": "bianco", "black": "nero", "gray": "grigio"}
INSTRUCTION = "Answer in Italian."
VERBOSE = "Well, looking at the picture carefully, I would say that the colour is {word}, I think."


def colour_questions(scene: scenes.Scene) -> list[scenes.QA]:
    """The scene's colour questions (background and each shape's colour)."""
    return [q for q in scenes.questions(scene) if q.template in ("background", "colour")]


def describe(scene: scenes.Scene) -> str:
    return f"In the picture: {scenes.caption(scene)}."


def prompt_messages(scene: scenes.Scene, question: str, image=None) -> list[dict]:
    """The user turn: the scene in words (text models) or the picture itself (``image``, VL models)."""
    if image is None:
        return [{"role": "user", "content": f"{describe(scene)} {question} {INSTRUCTION}"}]
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": f"{question} {INSTRUCTION}"}]}]


def italian_answer(qa: scenes.QA) -> str:
    return f"{ITALIAN[qa.answer_word]}."


def scene_items(count: int, split: str = "train", seed: int = 0) -> list[tuple[scenes.Scene, scenes.QA]]:
    """``count`` (scene, colour question) items from fresh scenes of one split, deterministic in ``seed``."""
    rng = random.Random(seed)
    items: list[tuple[scenes.Scene, scenes.QA]] = []
    while len(items) < count:
        scene = scenes.random_scene(rng)
        if scenes.split_of(scene) != split:
            continue
        items.append((scene, rng.choice(colour_questions(scene))))
    return items


def instruction_set(count: int = 3000, split: str = "train", seed: int = 0, images: bool = False) -> list[dict]:
    """Conversations ``{"messages", "scene", "qa"}``: question about a scene, the answer in Italian."""
    out = []
    for scene, qa in scene_items(count, split, seed):
        image = scenes.render(scene) if images else None
        messages = prompt_messages(scene, qa.question, image) + [{"role": "assistant", "content": italian_answer(qa)}]
        out.append({"messages": messages, "scene": scene, "qa": qa})
    return out


def is_correct(qa: scenes.QA, reply: str) -> bool:
    """The reply's first word is the Italian name of the answer colour."""
    return scenes.first_word(reply) == ITALIAN[qa.answer_word]


def preference_pairs(count: int = 1000, split: str = "train", seed: int = 1, images: bool = False) -> list[dict]:
    """``{"prompt", "chosen", "rejected", "kind"}``: concise correct over verbose (half) or wrong (half)."""
    rng = random.Random(seed + 99)
    pairs = []
    for n, (scene, qa) in enumerate(scene_items(count, split, seed)):
        image = scenes.render(scene) if images else None
        right = ITALIAN[qa.answer_word]
        if n % 2 == 0:
            kind, rejected = "verbose", VERBOSE.format(word=right)
        else:
            kind = "wrong"
            rejected = f"{ITALIAN[rng.choice([c for c in ITALIAN if c != qa.answer_word])]}."
        pairs.append({"prompt": prompt_messages(scene, qa.question, image), "chosen": f"{right}.",
                      "rejected": rejected, "kind": kind})
    return pairs

"""Fine-tuning data built offline from the synthetic scenes: a new language of colour names, and preferences.

**Instructions** (SFT). A scene is described in words, a question asked about it, and the answer given
in *Italian colour names* -- something the tiny models never saw::

    User: In the picture: a large red circle on the left and a small blue square at the top.
          What colour is the circle? Answer in Italian.
    Assistant: rosso.

``language="english"`` asks for one English word instead (``Answer in one word.`` / ``red.``): the
shipped tiny text model learnt English colour words from the captions but never answered a question, so
this is the skill without the new vocabulary. (Italian pieces such as ``ver`` or ``ross`` never occur in
its training text: their embedding rows, which LoRA keeps frozen and the tied head shares, were pushed
away from every hidden state, and a rank-8 update of the layers moves them only slowly.)

The VL form shows the picture instead of describing it. Colour questions (shapes and background) get
Italian answers; a held-out split (scenes whose hash falls in ``scenes.split_of(...) == "val"``) measures
whether the model learned the new words rather than memorised the scenes.

**Preferences** (DPO). The same prompts with two replies: the concise correct answer is *chosen*; the
*rejected* one is verbose (the right word buried in a sentence) or wrong (another colour's name).
"""

from __future__ import annotations

import random

from . import scenes
from ..errors import InputError

ITALIAN = {"red": "rosso", "green": "verde", "blue": "blu", "yellow": "giallo", "purple": "viola",
           "orange": "arancione", "white": "bianco", "black": "nero", "gray": "grigio"}
ENGLISH = {colour: colour for colour in ITALIAN}
INSTRUCTION = "Answer in Italian."
LANGUAGES = {"italian": (ITALIAN, INSTRUCTION), "english": (ENGLISH, "Answer in one word.")}
VERBOSE = "Well, looking at the picture carefully, I would say that the colour is {word}, I think."


def colour_questions(scene: scenes.Scene) -> list[scenes.QA]:
    """The scene's colour questions (background and each shape's colour)."""
    return [q for q in scenes.questions(scene) if q.template in ("background", "colour")]


def describe(scene: scenes.Scene) -> str:
    return f"In the picture: {scenes.caption(scene)}."


def _language(language: str) -> tuple[dict, str]:
    if language not in LANGUAGES:
        raise InputError(f"language must be one of {sorted(LANGUAGES)}, got {language!r}.")
    return LANGUAGES[language]


def prompt_messages(scene: scenes.Scene, question: str, image=None, language: str = "italian") -> list[dict]:
    """The user turn: the scene in words (text models) or the picture itself (``image``, VL models)."""
    instruction = _language(language)[1]
    if image is None:
        return [{"role": "user", "content": f"{describe(scene)} {question} {instruction}"}]
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": f"{question} {instruction}"}]}]


def italian_answer(qa: scenes.QA) -> str:
    return f"{ITALIAN[qa.answer_word]}."


def answer(qa: scenes.QA, language: str = "italian") -> str:
    """The concise reply: the colour's name in ``language`` and a full stop."""
    return f"{_language(language)[0][qa.answer_word]}."


def scene_items(count: int, split: str = "train", seed: int = 0,
                max_shapes: int | None = None) -> list[tuple[scenes.Scene, scenes.QA]]:
    """``count`` (scene, colour question) items from fresh scenes of one split, deterministic in ``seed``;
    ``max_shapes`` keeps scenes with at most that many shapes."""
    check_items(count, split, seed, max_shapes)
    rng = random.Random(seed)
    items: list[tuple[scenes.Scene, scenes.QA]] = []
    while len(items) < count:
        scene = scenes.random_scene(rng)
        if scenes.split_of(scene) != split or (max_shapes and len(scene.shapes) > max_shapes):
            continue
        items.append((scene, rng.choice(colour_questions(scene))))
    return items


def check_items(count, split, seed, max_shapes) -> None:
    """InputErrors naming the argument (a wrong split or max_shapes would otherwise search forever)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise InputError(f"count must be an integer >= 0, got {count!r}.")
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', got {split!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}.")
    if max_shapes is not None and (isinstance(max_shapes, bool) or not isinstance(max_shapes, int)
                                   or not 1 <= max_shapes):
        raise InputError(f"max_shapes must be None or an integer >= 1 (scenes hold 1 to {scenes.MAX_SHAPES} "
                         f"shapes), got {max_shapes!r}.")


def instruction_set(count: int = 3000, split: str = "train", seed: int = 0, images: bool = False,
                    language: str = "italian", max_shapes: int | None = None) -> list[dict]:
    """Conversations ``{"messages", "scene", "qa"}``: question about a scene, the answer in ``language``.
    ``finetune.sft`` takes these records as they are (or their ``"messages"``)."""
    _language(language)
    out = []
    for scene, qa in scene_items(count, split, seed, max_shapes):
        image = scenes.render(scene) if images else None
        messages = (prompt_messages(scene, qa.question, image, language)
                    + [{"role": "assistant", "content": answer(qa, language)}])
        out.append({"messages": messages, "scene": scene, "qa": qa})
    return out


def is_correct(qa: scenes.QA, reply: str, language: str = "italian") -> bool:
    """The reply's first word is the answer colour's name in ``language``."""
    return scenes.first_word(reply) == _language(language)[0][qa.answer_word]


def preference_pairs(count: int = 1000, split: str = "train", seed: int = 1, images: bool = False,
                     language: str = "italian", max_shapes: int | None = None) -> list[dict]:
    """``{"prompt", "chosen", "rejected", "kind"}``: concise correct over verbose (half) or wrong (half)."""
    names = _language(language)[0]
    check_items(count, split, seed, max_shapes)
    rng = random.Random(seed + 99)
    pairs = []
    for n, (scene, qa) in enumerate(scene_items(count, split, seed, max_shapes)):
        image = scenes.render(scene) if images else None
        right = names[qa.answer_word]
        if n % 2 == 0:
            kind, rejected = "verbose", VERBOSE.format(word=right)
        else:
            kind = "wrong"
            rejected = f"{names[rng.choice([c for c in names if c != qa.answer_word])]}."
        pairs.append({"prompt": prompt_messages(scene, qa.question, image, language), "chosen": f"{right}.",
                      "rejected": rejected, "kind": kind})
    return pairs

"""Synthetic scenes: coloured shapes on a plain background, with captions and question/answer pairs.

The kit's tiny vision-language model learns from pictures it can check itself. A *scene* is a
square image on a white, black or gray background holding one to three shapes; every shape has a
different kind, colour and place, so a question like "What colour is the circle?" has exactly one
answer, and the five places are so far apart that shapes never overlap:

    kinds    circle, square, triangle (pointing up)
    colours  red, green, blue, yellow, purple, orange   (pillow's named colours)
    sizes    small = a sixth of the side across, large = a quarter of the side across
    places   left (1/4, 1/2)  right (3/4, 1/2)  top (1/2, 1/4)  bottom (1/2, 3/4)  centre (1/2, 1/2)

Every scene has a caption and one question per template ("background", "colour", "shape",
"count", "position"); each answer is one word and a full stop ("red."), so a reply is graded by
its first word. Nothing is stored: ``scene_stream`` draws an endless, seeded stream, and a
scene's hash decides once and for all whether it belongs to the training or the validation split.

    import random
    from ernie_lab import scenes

    scene = scenes.random_scene(random.Random(0))
    image = scenes.render(scene)                     # a 112 x 112 RGB PIL image
    scenes.caption(scene)        # 'two shapes on a black background: a large yellow square at the top and
                                 #  a large purple circle at the bottom'
    qa = scenes.questions(scene)[0]
    qa.question, qa.answer       # ('What colour is the background?', 'black.')
    scenes.check_answer(qa, "Black, I think")         # True: the first word is what counts
    labels = scenes.patch_labels(scene, 8, 8, attribute="colour")   # 8 x 8 grid of 'yellow' / 'background' ...
    chats = scenes.chat_examples(scene)                # conversations in the VL processor's format
    train = scenes.scene_stream(seed=0, split="train") # endless; next(train) -> Scene

``photos()`` adds a handful of real photographs that ship inside the scikit-image wheel, each with
a short hand-written caption, to show the model what the world looks like beyond coloured shapes.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from PIL import Image, ImageColor, ImageDraw

from ..errors import InputError

BACKGROUNDS = ("white", "black", "gray")
KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = {"small": 1 / 6, "large": 1 / 4}  # width across, as a fraction of the image side
PLACES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
          "centre": (0.5, 0.5)}            # the shape's centre (x, y), as fractions of the side
PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "centre": "in the centre"}
NUMBER_WORDS = ("zero", "one", "two", "three")
IMAGE_SIZE = 112
MAX_SHAPES = 3
VAL_BUCKETS = 20  # one scene in 20 (by hash) belongs to the validation split
TEMPLATES = ("background", "colour", "shape", "count", "position")
DESCRIBE = "Describe the picture."


# ------------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    kind: str    # circle, square, triangle
    colour: str  # red, green, blue, yellow, purple, orange
    size: str    # small, large
    place: str   # left, right, top, bottom, centre

    def __post_init__(self):
        for field, value, allowed in (("kind", self.kind, KINDS), ("colour", self.colour, COLOURS),
                                      ("size", self.size, tuple(SIZES)), ("place", self.place, tuple(PLACES))):
            if value not in allowed:
                raise InputError(f"a shape's {field} must be one of {allowed}, got {value!r}.")


@dataclass(frozen=True)
class Scene:
    """A background colour and 1-3 shapes, kept in the fixed order of PLACES (so equal scenes compare equal)."""

    background: str
    shapes: tuple[Shape, ...]

    def __post_init__(self):
        if self.background not in BACKGROUNDS:
            raise InputError(f"the background must be one of {BACKGROUNDS}, got {self.background!r}.")
        shapes = tuple(self.shapes)
        if not 1 <= len(shapes) <= MAX_SHAPES or not all(isinstance(s, Shape) for s in shapes):
            raise InputError(f"a scene holds 1 to {MAX_SHAPES} Shape objects, got {self.shapes!r}.")
        for field in ("kind", "colour", "place"):
            values = [getattr(s, field) for s in shapes]
            if len(set(values)) != len(values):
                raise InputError(f"every shape in a scene needs a different {field}, got {values}: questions "
                                 f"such as 'What colour is the circle?' must have one answer.")
        object.__setattr__(self, "shapes", tuple(sorted(shapes, key=lambda s: list(PLACES).index(s.place))))

    def key(self) -> str:
        """A canonical text for the scene: 'gray|small blue square left|large red circle centre'."""
        return "|".join([self.background, *(f"{s.size} {s.colour} {s.kind} {s.place}" for s in self.shapes)])


def random_scene(rng: random.Random | int) -> Scene:
    """A scene drawn from ``rng`` (a ``random.Random``, or an int seed for a fresh one): the same draws every time."""
    rng = as_rng(rng)
    background = rng.choice(BACKGROUNDS)
    count = rng.randint(1, MAX_SHAPES)
    kinds, colours, places = rng.sample(KINDS, count), rng.sample(COLOURS, count), rng.sample(list(PLACES), count)
    shapes = [Shape(kind, colour, rng.choice(list(SIZES)), place) for kind, colour, place in zip(kinds, colours, places)]
    return Scene(background, tuple(shapes))


def as_rng(rng: random.Random | int) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return random.Random(rng)
    raise InputError(f"give a random.Random or an int seed, got {type(rng).__name__}.")


def split_of(scene: Scene) -> str:
    """'val' for the scenes whose hash falls in one of VAL_BUCKETS buckets, 'train' for the rest."""
    digest = hashlib.sha256(scene.key().encode("utf-8")).digest()
    return "val" if int.from_bytes(digest[:8], "big") % VAL_BUCKETS == 0 else "train"


def scene_stream(seed: int = 0, split: str = "train") -> Iterator[Scene]:
    """An endless, deterministic stream of the scenes of one split; no val scene ever appears in train."""
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', got {split!r}.")
    rng = random.Random(f"scenes:{seed}:{split}")  # str seeds hash the same way on every machine
    while True:
        scene = random_scene(rng)
        if split_of(scene) == split:
            yield scene


# ---------------------------------------------------------------------------------------- rendering
def shape_box(shape: Shape, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """The pixel box (x0, y0, x1, y1), both ends inside the shape, of ``shape`` in a ``size`` x ``size`` image.

    A shape is ``floor(size * fraction)`` pixels across; neighbouring places are ``size / 4`` apart,
    so two shapes can at most touch, never share a pixel.
    """
    across = int(size * SIZES[shape.size])
    fx, fy = PLACES[shape.place]
    x0, y0 = round(fx * size - across / 2), round(fy * size - across / 2)
    return x0, y0, x0 + across - 1, y0 + across - 1


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, size: int, fill) -> None:
    x0, y0, x1, y1 = shape_box(shape, size)
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # a triangle pointing up: apex at the top middle, base along the bottom edge
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as a ``size`` x ``size`` RGB image."""
    if not isinstance(size, int) or size < 24:
        raise InputError(f"size must be an int of at least 24 pixels (so a small shape is 4 pixels across), got {size!r}.")
    image = Image.new("RGB", (size, size), ImageColor.getrgb(scene.background))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        draw_shape(draw, shape, size, ImageColor.getrgb(shape.colour))
    return image


def owner_map(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) uint8: 0 where the background shows, i + 1 where ``scene.shapes[i]`` is drawn."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for i, shape in enumerate(scene.shapes):
        draw_shape(draw, shape, size, i + 1)
    return np.asarray(mask)


def cell_pixel_counts(scene: Scene, grid_h: int, grid_w: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(grid_h * grid_w, len(scene.shapes) + 1) pixels per grid cell (row-major) of the background (column 0)
    and of each shape (column i + 1 for ``scene.shapes[i]``).

    Cells are the image cut into equal parts (row r spans rows ``r*size//grid_h`` up to ``(r+1)*size//grid_h``),
    as a ViT's patches or merged tokens cut a picture that was only rescaled; a row sums to its cell's pixels.
    """
    if not all(isinstance(n, int) and 1 <= n <= size for n in (grid_h, grid_w)):
        raise InputError(f"grid_h and grid_w must be ints from 1 to the image size {size}, got {grid_h}, {grid_w}.")
    owners = owner_map(scene, size)
    rows = [size * r // grid_h for r in range(grid_h + 1)]
    cols = [size * c // grid_w for c in range(grid_w + 1)]
    counts = np.zeros((grid_h * grid_w, len(scene.shapes) + 1), dtype=np.int64)
    for r in range(grid_h):
        for c in range(grid_w):
            cell = owners[rows[r]:rows[r + 1], cols[c]:cols[c + 1]]   # (cell_h, cell_w)
            counts[r * grid_w + c] = np.bincount(cell.ravel(), minlength=len(scene.shapes) + 1)
    return counts


def patch_owners(scene: Scene, grid_h: int, grid_w: int, size: int = IMAGE_SIZE) -> list[list[Shape | None]]:
    """For each cell of a grid_h x grid_w grid over the image: the shape covering most of it, or None (background).

    Cells as in :func:`cell_pixel_counts`. Ties go to the background.
    """
    best = cell_pixel_counts(scene, grid_h, grid_w, size).argmax(axis=1)  # argmax picks the first: background wins ties
    owners = [None if b == 0 else scene.shapes[b - 1] for b in best.tolist()]
    return [owners[r * grid_w:(r + 1) * grid_w] for r in range(grid_h)]


def patch_labels(scene: Scene, grid_h: int, grid_w: int, attribute: str = "kind",
                 size: int = IMAGE_SIZE) -> list[list[str]]:
    """For each grid cell, the ``attribute`` (kind, colour, size, place) of its shape, or "background"."""
    if attribute not in ("kind", "colour", "size", "place"):
        raise InputError(f"attribute must be 'kind', 'colour', 'size' or 'place', got {attribute!r}.")
    return [["background" if shape is None else getattr(shape, attribute) for shape in line]
            for line in patch_owners(scene, grid_h, grid_w, size)]


# ------------------------------------------------------------------------------------------- language
def describe_shape(shape: Shape) -> str:
    return f"a {shape.size} {shape.colour} {shape.kind} {PLACE_PHRASES[shape.place]}"


def join_words(parts: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """'two shapes on a white background: a large red circle on the left and a small blue triangle at the top'."""
    count = len(scene.shapes)
    noun = "shape" if count == 1 else "shapes"
    return (f"{NUMBER_WORDS[count]} {noun} on a {scene.background} background: "
            f"{join_words([describe_shape(s) for s in scene.shapes])}")


@dataclass(frozen=True)
class QA:
    question: str
    answer: str       # the answer word and a full stop: "red."
    template: str     # background, colour, shape, count, position
    answer_word: str  # "red": what a reply's first word must be


def qa(question: str, template: str, word: str) -> QA:
    return QA(question, f"{word}.", template, word)


def questions(scene: Scene) -> list[QA]:
    """Every question the templates ask about ``scene``, in a fixed order."""
    out = [qa("What colour is the background?", "background", scene.background)]
    out += [qa(f"What colour is the {s.kind}?", "colour", s.colour) for s in scene.shapes]
    out += [qa(f"What shape is {s.colour}?", "shape", s.kind) for s in scene.shapes]
    out.append(qa("How many shapes are there?", "count", NUMBER_WORDS[len(scene.shapes)]))
    out += [qa(f"Where is the {s.kind}?", "position", s.place) for s in scene.shapes]
    return out


def first_word(reply: str) -> str:
    """The first word of a reply, lower-cased, without punctuation: ' Red, the circle.' -> 'red'."""
    if not isinstance(reply, str):
        raise InputError(f"a reply is a str, got {type(reply).__name__}.")
    words = reply.strip().split(maxsplit=1)
    return words[0].strip(".,;:!?\"'()").lower() if words else ""


def check_answer(qa: QA, reply: str) -> bool:
    """True when the reply's first word is the answer word."""
    return first_word(reply) == qa.answer_word


def answer_is_correct(question: str, reply: str, scene: Scene) -> bool:
    """Grade ``reply`` to one of the template questions about ``scene`` by its first word."""
    for item in questions(scene):
        if item.question == question:
            return check_answer(item, reply)
    raise InputError(f"{question!r} is not one of the template questions for this scene; "
                     f"they are {[item.question for item in questions(scene)]}.")


# ----------------------------------------------------------------------------------- conversations
def conversation(image: Image.Image, question: str, answer: str) -> list[dict]:
    """One question about one picture, in the chat format ``ernie_lab.processor.VLProcessor`` reads."""
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": answer}]


def chat_examples(scene: Scene, size: int = IMAGE_SIZE) -> list[list[dict]]:
    """The VL model's training conversations about one scene: the caption request, then every question.

    All conversations share one rendered image.
    """
    image = render(scene, size)
    return ([conversation(image, DESCRIBE, caption(scene) + ".")]
            + [conversation(image, item.question, item.answer) for item in questions(scene)])


# -------------------------------------------------------------------------------------------- photos
# Photographs bundled inside the scikit-image wheel (skimage/data/*.png, *.jpg; nothing is downloaded),
# each with a caption written by hand for this kit.
PHOTOS = {
    "astronaut": "a woman astronaut in an orange space suit, smiling, with a flag and a model space shuttle behind her",
    "camera": "a man in a dark coat looking through a film camera on a tripod, on a lawn; black and white",
    "coffee": "a cup of coffee on a red saucer with a spoon, on a wooden table",
    "chelsea": "a close view of a tabby cat's face with green eyes",
    "rocket": "a white rocket standing on its launch pad between tall towers, at dusk",
    "coins": "rows of old silver coins on a dark background; black and white",
    "moon": "the gray surface of the moon, with small craters",
    "page": "a printed page of text about image segmentation, photographed at a slant",
    "text": "handwritten numbers and symbols on squared paper, photographed at a slant",
    "hubble_deep_field": "many small bright galaxies scattered on the black of deep space",
    "immunohistochemistry": "cells under a microscope, stained brown and blue",
    "retina": "the back of a human eye: an orange disk with red blood vessels",
    "brick": "a wall of gray bricks",
    "grass": "a patch of grass seen from above; black and white",
    "gravel": "gray gravel seen from above",
}


@dataclass(frozen=True)
class Photo:
    name: str
    image: Image.Image
    caption: str


def photos(names: list[str] | None = None) -> list[Photo]:
    """The bundled photographs (all of PHOTOS, or the ones named) as RGB PIL images with their captions."""
    names = list(PHOTOS) if names is None else list(names)
    unknown = [n for n in names if n not in PHOTOS]
    if unknown:
        raise InputError(f"no bundled photograph named {unknown[0]!r}; the photographs are {list(PHOTOS)}.")
    try:
        import skimage.data  # imported here: only the photographs need scikit-image
    except ImportError:
        raise InputError("photos() needs scikit-image: pip install scikit-image==0.26.0") from None
    return [Photo(name, Image.fromarray(getattr(skimage.data, name)()).convert("RGB"), PHOTOS[name]) for name in names]


def photo_chat_examples(names: list[str] | None = None) -> list[list[dict]]:
    """One caption conversation ("Describe the picture.") per bundled photograph."""
    return [conversation(p.image, DESCRIBE, p.caption + ".") for p in photos(names)]

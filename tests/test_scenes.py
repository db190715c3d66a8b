"""The synthetic scenes: geometry checked on rendered pixels, exact language templates, splits, photos offline."""

import itertools
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageColor

from ernie_lab import scenes
from ernie_lab.errors import InputError
from ernie_lab.tiny.scenes import Scene, Shape

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = Scene("white", (Shape("triangle", "blue", "small", "top"), Shape("circle", "red", "large", "left")))
ALL_SHAPES = [Shape(k, "red", s, p) for k in scenes.KINDS for s in scenes.SIZES for p in scenes.PLACES]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)  # (H, W, 3)


def shape_mask(shape: Shape, size: int) -> np.ndarray:
    """(size, size) bool: the pixels a shape paints when it is alone on a white background."""
    return (pixels(scenes.render(Scene("white", (shape,)), size)) != 255).any(axis=-1)


# ---------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("size", [112, 56, 50])
def test_shapes_at_different_places_never_share_a_pixel(size):
    masks = {shape: shape_mask(shape, size) for shape in ALL_SHAPES}
    for a, b in itertools.combinations(ALL_SHAPES, 2):
        if a.place != b.place:
            assert not (masks[a] & masks[b]).any(), (a, b, size)


@pytest.mark.parametrize("size", [112, 56])
def test_shapes_are_a_sixth_or_a_quarter_across_and_centred_on_their_place(size):
    for shape in ALL_SHAPES:
        ys, xs = np.nonzero(shape_mask(shape, size))
        across = {"small": size // 6, "large": size // 4}[shape.size]
        assert xs.max() - xs.min() + 1 == across and ys.max() - ys.min() + 1 == across, shape
        fx, fy = scenes.PLACES[shape.place]
        assert abs((xs.min() + xs.max() + 1) / 2 - fx * size) <= 1 and abs((ys.min() + ys.max() + 1) / 2 - fy * size) <= 1


def test_triangle_points_up_square_fills_its_box():
    tri = shape_mask(Shape("triangle", "red", "large", "centre"), 112)
    rows = tri.sum(axis=1)
    filled = rows[rows > 0]
    assert filled[0] < 4 and filled[-1] == 28 and (np.diff(filled) >= 0).all()   # narrow at the top, widest at the base
    square = shape_mask(Shape("square", "red", "large", "centre"), 112)
    assert square.sum() == 28 * 28


def test_rendered_colours_are_pillows_named_colours_and_nothing_else():
    rng = random.Random(1)
    for _ in range(30):
        scene = scenes.random_scene(rng)
        image = scenes.render(scene)
        assert image.mode == "RGB" and image.size == (112, 112)
        seen = {tuple(c) for c in pixels(image).reshape(-1, 3)}
        expected = {ImageColor.getrgb(scene.background), *(ImageColor.getrgb(s.colour) for s in scene.shapes)}
        assert seen == expected  # no anti-aliasing blends, every shape visible
        assert pixels(image)[0, 0].tolist() == list(ImageColor.getrgb(scene.background))


def test_each_shape_shows_in_its_own_colour_where_it_is_drawn():
    scene = Scene("gray", (Shape("circle", "orange", "large", "centre"), Shape("square", "purple", "small", "right")))
    image = pixels(scenes.render(scene))
    for shape in scene.shapes:
        assert (image[shape_mask(shape, 112)] == ImageColor.getrgb(shape.colour)).all()


def test_image_size_is_a_parameter():
    assert scenes.render(EXAMPLE, size=56).size == (56, 56)
    with pytest.raises(InputError):
        scenes.render(EXAMPLE, size=8)


# ---------------------------------------------------------------------------------------- scenes
def test_scenes_validate_and_compare_regardless_of_shape_order():
    a, b = EXAMPLE.shapes
    assert Scene("white", (b, a)) == Scene("white", (a, b))
    assert [s.place for s in EXAMPLE.shapes] == ["left", "top"]
    with pytest.raises(InputError, match="different colour"):
        Scene("white", (Shape("circle", "red", "small", "left"), Shape("square", "red", "small", "top")))
    with pytest.raises(InputError, match="different place"):
        Scene("white", (Shape("circle", "red", "small", "left"), Shape("square", "blue", "small", "left")))
    with pytest.raises(InputError, match="background"):
        Scene("pink", (a,))
    with pytest.raises(InputError, match="colour"):
        Shape("circle", "magenta", "small", "left")
    with pytest.raises(InputError):
        Scene("white", ())


def test_random_scenes_are_deterministic_and_cover_the_space():
    assert scenes.random_scene(7) == scenes.random_scene(random.Random(7))
    drawn = [scenes.random_scene(random.Random(seed)) for seed in range(300)]
    assert len(set(drawn)) > 250
    assert {len(s.shapes) for s in drawn} == {1, 2, 3}
    assert {s.background for s in drawn} == set(scenes.BACKGROUNDS)
    assert {sh.place for s in drawn for sh in s.shapes} == set(scenes.PLACES)
    with pytest.raises(InputError):
        scenes.random_scene("seven")


def test_streams_are_deterministic_and_train_val_disjoint():
    first = list(itertools.islice(scenes.scene_stream(0, "train"), 50))
    assert first == list(itertools.islice(scenes.scene_stream(0, "train"), 50))
    assert first != list(itertools.islice(scenes.scene_stream(1, "train"), 50))
    train = set(itertools.islice(scenes.scene_stream(0, "train"), 3000))
    val = set(itertools.islice(scenes.scene_stream(0, "val"), 300))
    assert len(val) > 100 and not train & val
    assert all(scenes.split_of(s) == "val" for s in val)
    with pytest.raises(InputError):
        next(scenes.scene_stream(0, "test"))


# ---------------------------------------------------------------------------------------- language
def test_caption_follows_the_template():
    assert scenes.caption(EXAMPLE) == ("two shapes on a white background: a large red circle on the left and a small "
                                       "blue triangle at the top")
    one = Scene("black", (Shape("square", "green", "large", "centre"),))
    assert scenes.caption(one) == "one shape on a black background: a large green square in the centre"
    three = Scene("gray", (Shape("circle", "yellow", "small", "bottom"), Shape("square", "orange", "large", "right"),
                           Shape("triangle", "purple", "small", "centre")))
    assert scenes.caption(three) == ("three shapes on a gray background: a large orange square on the right, a small "
                                     "yellow circle at the bottom and a small purple triangle in the centre")


def test_questions_use_the_exact_templates():
    got = [(q.template, q.question, q.answer, q.answer_word) for q in scenes.questions(EXAMPLE)]
    assert got == [
        ("background", "What colour is the background?", "white.", "white"),
        ("colour", "What colour is the circle?", "red.", "red"),
        ("colour", "What colour is the triangle?", "blue.", "blue"),
        ("shape", "What shape is red?", "circle.", "circle"),
        ("shape", "What shape is blue?", "triangle.", "triangle"),
        ("count", "How many shapes are there?", "two.", "two"),
        ("position", "Where is the circle?", "left.", "left"),
        ("position", "Where is the triangle?", "top.", "top"),
    ]


def test_answers_begin_with_their_word_and_count_what_is_drawn():
    rng = random.Random(3)
    for _ in range(50):
        scene = scenes.random_scene(rng)
        qas = scenes.questions(scene)
        assert {q.template for q in qas} == set(scenes.TEMPLATES)
        assert all(q.answer.split()[0].rstrip(".") == q.answer_word for q in qas)
        count = next(q for q in qas if q.template == "count")
        colours_drawn = {tuple(c) for c in pixels(scenes.render(scene)).reshape(-1, 3)} - {
            ImageColor.getrgb(scene.background)}
        assert count.answer_word == scenes.NUMBER_WORDS[len(colours_drawn)]


def test_replies_are_graded_by_their_first_word():
    qa = scenes.questions(EXAMPLE)[1]  # What colour is the circle? red.
    assert scenes.check_answer(qa, "red.") and scenes.check_answer(qa, " Red, the circle is red.")
    assert not scenes.check_answer(qa, "blue. not red") and not scenes.check_answer(qa, "")
    assert scenes.answer_is_correct("Where is the triangle?", "top", EXAMPLE)
    assert not scenes.answer_is_correct("Where is the triangle?", "left", EXAMPLE)
    with pytest.raises(InputError, match="not one of the template questions"):
        scenes.answer_is_correct("What colour is the square?", "red", EXAMPLE)


# ---------------------------------------------------------------------------------------- patches
def test_patch_labels_on_a_known_scene():
    scene = Scene("black", (Shape("square", "red", "large", "left"), Shape("circle", "blue", "large", "centre")))
    labels = scenes.patch_labels(scene, 8, 8, attribute="colour")   # 14-pixel cells, like ViT patches at 112
    expected = [["background"] * 8 for _ in range(8)]
    for r, c in itertools.product((3, 4), (1, 2)):
        expected[r][c] = "red"      # the square spans pixels 14..41 x 42..69: exactly cells 1-2 x 3-4
    for r, c in itertools.product((3, 4), (3, 4)):
        expected[r][c] = "blue"     # each quarter of the circle covers ~79% of its cell
    assert labels == expected
    kinds = scenes.patch_labels(scene, 8, 8)
    assert kinds[3][1] == "square" and kinds[4][4] == "circle" and kinds[0][0] == "background"
    assert scenes.patch_owners(scene, 8, 8)[3][1] == scene.shapes[0]


def test_patch_labels_agree_with_rendered_pixels():
    rng = random.Random(5)
    for _ in range(20):
        scene = scenes.random_scene(rng)
        image = pixels(scenes.render(scene))                 # (112, 112, 3)
        owners = scenes.patch_owners(scene, 16, 16)          # 7-pixel cells
        for r, c in itertools.product(range(16), range(16)):
            cell = image[7 * r:7 * r + 7, 7 * c:7 * c + 7].reshape(-1, 3)
            colour = ImageColor.getrgb(scene.background if owners[r][c] is None else owners[r][c].colour)
            assert (cell == colour).all(axis=-1).mean() >= 0.5


def test_patch_labels_reject_bad_arguments():
    with pytest.raises(InputError):
        scenes.patch_labels(EXAMPLE, 0, 4)
    with pytest.raises(InputError):
        scenes.patch_labels(EXAMPLE, 4, 4, attribute="texture")


# ------------------------------------------------------------------------------------ conversations
def test_chat_examples_are_vl_conversations_about_one_image():
    chats = scenes.chat_examples(EXAMPLE)
    assert len(chats) == 1 + len(scenes.questions(EXAMPLE))
    image = chats[0][0]["content"][0]["image"]
    assert isinstance(image, Image.Image) and image.size == (112, 112)
    assert chats[0][0]["content"][1] == {"type": "text", "text": "Describe the picture."}
    assert chats[0][1] == {"role": "assistant", "content": scenes.caption(EXAMPLE) + "."}
    for chat, qa in zip(chats[1:], scenes.questions(EXAMPLE)):
        user, assistant = chat
        assert user["role"] == "user" and user["content"][0] == {"type": "image", "image": image}
        assert user["content"][1] == {"type": "text", "text": qa.question}
        assert assistant == {"role": "assistant", "content": qa.answer}


# -------------------------------------------------------------------------------------------- photos
def test_photos_load_from_the_wheel_with_the_network_off(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    photos = scenes.photos()
    assert [p.name for p in photos] == list(scenes.PHOTOS)
    for photo in photos:
        assert photo.image.mode == "RGB" and min(photo.image.size) >= 100
        assert np.asarray(photo.image).std() > 10  # a real picture, not a blank
        assert photo.caption == scenes.PHOTOS[photo.name] and len(photo.caption.split()) >= 4
    chats = scenes.photo_chat_examples(["coffee"])
    assert chats[0][1]["content"] == scenes.PHOTOS["coffee"] + "."
    with pytest.raises(InputError, match="no bundled photograph"):
        scenes.photos(["eagle"])  # in skimage's registry, but downloaded, not bundled


def test_scikit_image_is_imported_only_for_photos():
    code = "import sys, ernie_lab.tiny.scenes, ernie_lab.tiny.corpus; assert 'skimage' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cell_pixel_counts_split_every_pixel_between_background_and_shapes():
    scene = scenes.Scene("white", (scenes.Shape("square", "red", "large", "centre"),))
    counts = scenes.cell_pixel_counts(scene, 4, 4)                    # (16 cells, background + 1 shape)
    assert counts.shape == (16, 2) and counts.sum() == 112 * 112
    assert (counts.sum(axis=1) == 28 * 28).all()                     # 112 / 4 = 28 pixels a side per cell
    side = scenes.shape_box(scene.shapes[0])[2] - scenes.shape_box(scene.shapes[0])[0] + 1
    assert counts[:, 1].sum() == side * side                         # the square's every pixel, once
    assert {int(i) for i in counts[:, 1].nonzero()[0]} == {5, 6, 9, 10}  # centre = where cells 5, 6, 9, 10 meet
    uneven = scenes.cell_pixel_counts(scene, 3, 5)
    assert uneven.sum() == 112 * 112 and len(set(uneven.sum(axis=1).tolist())) > 1
    with pytest.raises(InputError, match="grid_h and grid_w"):
        scenes.cell_pixel_counts(scene, 0, 4)

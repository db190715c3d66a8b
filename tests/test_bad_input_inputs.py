"""Bad inputs on the picture, processor, chat and exercise surfaces, and what the kit answers.

Each case asserts one outcome, as in test_bad_input.py: a kit error (InputError, or ExerciseFailed for
an exercise answer) whose message names the argument, picture, message or answer and says what to do;
or the correct result (pixel values of every picture mode, a plain-string chat). Pictures are checked
from their header before a pixel is decoded, and a refused file is not left open.
"""

import base64
import io
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

import ernie_lab
from ernie_lab import InputError
from ernie_lab.course import exercises
from ernie_lab.course.exercises import ExerciseFailed, Mismatch, expect_close, expect_equal, expect_tensor
from ernie_lab.io.image_processing import load_rgb, preprocess_images, preprocess_video, to_rgb
from ernie_lab.io.processor import VLProcessor

REPO = Path(__file__).resolve().parents[1]


def refused(call, error: type, *words: str) -> str:
    """``call`` raises ``error`` naming every word, and leaves no file open."""
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(error) as caught:
        call()
    message = str(caught.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert len(os.listdir("/proc/self/fd")) <= fds, "a refused call left a file open"
    return message


def png(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **options)
    return buffer.getvalue()


def rgb(image) -> np.ndarray:
    return np.asarray(to_rgb(image)).astype(int)


# ==================================================================================== picture modes
def test_16_bit_greyscale_png_keeps_its_range():
    """Was all white: PIL's I;16 -> RGB conversion clips every value above 255."""
    values = np.array([[0, 2570, 30000, 65535]], dtype=np.uint16)
    opened = load_rgb(png(Image.fromarray(values)))
    assert np.asarray(opened)[0, :, 0].tolist() == [0, 10, 117, 255]
    assert (np.asarray(opened) == np.asarray(opened)[..., :1]).all()  # grey stays grey


def test_16_bit_big_endian_greyscale():
    image = Image.frombytes("I;16B", (3, 1), np.array([0, 32896, 65535], dtype=">u2").tobytes())
    assert rgb(image)[0, :, 1].tolist() == [0, 128, 255]


def test_32_bit_integer_pictures_read_as_16_bit_when_they_need_it():
    wide = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32))
    narrow = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert rgb(wide)[0, :, 0].tolist() == [0, 100, 255]
    assert rgb(narrow)[0, :, 0].tolist() == [0, 100, 255]  # an 8-bit picture in mode 'I' is left as it is


def test_32_bit_integer_picture_out_of_range_is_refused():
    image = Image.fromarray(np.array([[-5, 10]], dtype=np.int32))
    refused(lambda: preprocess_images(image), InputError, "mode 'I'", "-5", "scale it")


@pytest.mark.parametrize("values, expected", [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 255.0], [0, 100, 255])])
def test_float_pictures_read_as_0_1_or_0_255(values, expected):
    assert rgb(Image.fromarray(np.array([values], dtype=np.float32)))[0, :, 2].tolist() == expected


@pytest.mark.parametrize("values, words", [([0.0, math.nan], ["NaN"]), ([0.0, math.inf], ["Inf"]),
                                           ([-1.0, 0.5], ["-1 .. 0.5", "0 .. 1"]), ([0.0, 300.0], ["300"])])
def test_float_pictures_with_nan_or_out_of_range_are_refused(values, words):
    image = Image.fromarray(np.array([values], dtype=np.float32))
    refused(lambda: preprocess_images(image), InputError, "mode 'F'", *words)


def test_palette_with_a_transparent_index_becomes_white_there():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    reread = Image.open(io.BytesIO(png(image, transparency=1)))
    for picture in (image, reread):
        assert rgb(picture)[0].tolist() == [[255, 0, 0], [255, 255, 255]]


def test_half_transparent_rgba_is_composited_on_white():
    image = Image.new("RGBA", (1, 1), (255, 0, 0, 128))
    assert rgb(image)[0, 0].tolist() == pytest.approx([255, 127, 127], abs=1)


def test_grey_with_alpha_is_composited_on_white():
    image = Image.merge("LA", (Image.new("L", (2, 1), 0), Image.frombytes("L", (2, 1), bytes([255, 0]))))
    assert rgb(image)[0].tolist() == [[0, 0, 0], [255, 255, 255]]


def test_cmyk_is_converted_multiplicatively():
    image = Image.new("CMYK", (1, 1), (255, 0, 0, 0))
    mixed = Image.new("CMYK", (1, 1), (128, 0, 0, 128))
    assert rgb(image)[0, 0].tolist() == [0, 255, 255]
    assert rgb(mixed)[0, 0].tolist() == pytest.approx([255 * (127 / 255) ** 2, 127, 127], abs=1)


def test_one_bit_pictures_are_black_and_white():
    image = Image.frombytes("1", (8, 1), bytes([0b10100000]))
    assert rgb(image)[0, :3, 0].tolist() == [255, 0, 255]


def test_rgb_and_grey_pictures_are_unchanged():
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (rgb(Image.fromarray(pixels)) == pixels).all()
    assert (rgb(Image.fromarray(pixels[..., 0]))[..., 1] == pixels[..., 0]).all()


def test_mode_pil_cannot_convert_is_named():
    refused(lambda: preprocess_images(Image.new("La", (30, 30))), InputError, "'La'", "'RGB'")


# ==================================================================================== size before decoding
def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (valid CRC) with almost no pixel data behind it."""
    data = bytearray(png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.fixture()
def no_decoding(monkeypatch):
    """Fails the test if any picture is decoded."""
    def load(self):
        raise AssertionError("a picture was decoded before its size was checked")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_picture_between_the_two_pil_limits_is_refused_from_its_header(tmp_path, no_decoding):
    """Was decoded in full (89 M .. 179 M pixels: PIL only warns) before the size check refused it."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_claiming(10_000, 10_000))
    refused(lambda: preprocess_images(path), InputError, "huge.png", "10000x10000", "exceeds", "downscale")
    refused(lambda: preprocess_images(path.read_bytes()), InputError, "10000x10000", "exceeds")


def test_picture_over_twice_the_limit_is_refused(no_decoding):
    refused(lambda: preprocess_images(png_header_claiming(20_000, 20_000)), InputError, "too large", "Downscale")


def test_lazily_opened_pil_image_is_checked_before_it_decodes(no_decoding):
    with warnings.catch_warnings():  # PIL warns on open; the kit refuses before decoding
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        lazy = Image.open(io.BytesIO(png_header_claiming(12_000, 9_000)))
    refused(lambda: preprocess_images([lazy]), InputError, "12000x9000", "exceeds")


# ==================================================================================== files and sources
def test_truncated_file_is_named_and_closed(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:300])
    refused(lambda: preprocess_images(path), InputError, "cut.png", "truncated or corrupt")


def test_directory_is_not_a_picture(tmp_path):
    refused(lambda: preprocess_images(tmp_path), InputError, str(tmp_path), "is a folder")


def test_missing_file_is_named(tmp_path):
    refused(lambda: preprocess_images(str(tmp_path / "nope.jpg")), InputError, "nope.jpg", "no image file")


def test_web_address_is_not_downloaded():
    refused(lambda: preprocess_images("https://example.com/cat.png"), InputError, "cat.png", "downloads no pictures")


@pytest.mark.parametrize("source, words", [
    (b"", ["0 bytes", "not an image file"]),
    (b"GIF89a" + b"\0" * 20, ["26 bytes", "not an image file"]),
    (torch.zeros(3, 8, 8, dtype=torch.uint8), ["Tensor", "permute(1, 2, 0)"]),
    (np.zeros((8, 8, 3)), ["ndarray", "PIL.Image.fromarray"]),
    (None, ["NoneType"]),
    (Image.new("RGB", (0, 7)), ["0x7", "empty"]),
    (Image.new("RGB", (1, 300)), ["elongated", "crop"]),
])
def test_bad_picture_sources(source, words):
    refused(lambda: preprocess_images(source), InputError, *words)


def test_the_failing_picture_of_a_list_is_named():
    refused(lambda: preprocess_images([Image.new("RGB", (30, 30)), 42]), InputError, "image 1", "int")


@pytest.mark.parametrize("bounds, words", [(dict(min_pixels=0), ["min_pixels", "0"]),
                                           (dict(max_pixels="big"), ["max_pixels", "'big'"])])
def test_bad_pixel_bounds(bounds, words):
    refused(lambda: preprocess_images(Image.new("RGB", (30, 30)), **bounds), InputError, *words)


@pytest.mark.parametrize("frames, words", [("clip.mp4", ["video frames", "str"]),
                                           (np.array([[None]]), ["video frames", "ndarray"])])
def test_video_that_is_not_frames(frames, words):
    refused(lambda: preprocess_video(frames), InputError, *words)


# ==================================================================================== processor
@pytest.fixture(scope="module")
def vl():
    return ernie_lab.load_model(REPO / "data" / "tiny-ernie-vl")


@pytest.fixture(scope="module")
def tokenizer():
    return ernie_lab.load_tokenizer(REPO / "data" / "tiny-ernie-vl")


@pytest.fixture(scope="module")
def text_model():
    return ernie_lab.load_model(REPO / "data" / "tiny-ernie-text")


@pytest.fixture(scope="module")
def text_tokenizer():
    return ernie_lab.load_tokenizer(REPO / "data" / "tiny-ernie-text")


@pytest.fixture(scope="module")
def processor(tokenizer):
    return VLProcessor(tokenizer)


RED = Image.new("RGB", (56, 56), (220, 30, 30))


def asking(*items) -> list[dict]:
    return [{"role": "user", "content": [*items, {"type": "text", "text": "What colour?"}]}]


@pytest.mark.parametrize("tokenizer_like", [None, "tokenizer", {"encode": 1}])
def test_processor_needs_a_tokenizer(tokenizer_like):
    refused(lambda: VLProcessor(tokenizer_like), InputError, "VLProcessor(tokenizer)", "load_tokenizer")


def test_processor_bounds_are_checked(tokenizer):
    refused(lambda: VLProcessor(tokenizer, image_min_pixels=-5), InputError, "min_pixels", "-5")


def test_processor_refuses_an_empty_conversation(processor):
    refused(lambda: processor([]), InputError, "no messages")


@pytest.mark.parametrize("flag", ["enable_thinking", "add_generation_prompt"])
def test_processor_flags_must_be_bool(processor, flag):
    refused(lambda: processor(asking({"type": "image", "image": RED}), **{flag: "yes"}), InputError, flag, "'yes'")


def test_one_picture_or_one_video_needs_no_list(processor):
    one = processor(asking({"type": "image"}), images=RED)
    listed = processor(asking({"type": "image"}), images=[RED])
    assert torch.equal(one["pixel_values"], listed["pixel_values"])
    clip = np.full((2, 56, 56, 3), 90, dtype=np.uint8)
    video = processor(asking({"type": "video"}), videos=clip)
    assert video["video_grid_thw"].shape == (1, 3)


def test_a_picture_of_the_wrong_kind_names_its_message_and_item(processor):
    messages = [{"role": "user", "content": "Hi"}, {"role": "user", "content": [{"type": "text", "text": "x"},
                                                                               {"type": "image", "image": 42}]}]
    refused(lambda: processor(messages), InputError, "message 1, item 1", "int")


def test_a_missing_picture_file_names_its_item(processor, tmp_path):
    refused(lambda: processor(asking({"type": "image", "image": str(tmp_path / "gone.png")})), InputError,
            "message 0, item 0", "gone.png", "no image file")


def test_image_url_items_read_paths_and_data_urls(processor, tmp_path):
    (tmp_path / "red.png").write_bytes(png(RED))
    expected = processor(asking({"type": "image", "image": RED}))["pixel_values"]
    data = "data:image/png;base64," + base64.b64encode(png(RED)).decode()
    for url in (str(tmp_path / "red.png"), f"file://{tmp_path / 'red.png'}", data):
        got = processor(asking({"type": "image_url", "image_url": {"url": url}}))["pixel_values"]
        assert torch.equal(got, expected), url


@pytest.mark.parametrize("url, words", [("https://example.com/x.png", ["message 0, item 0", "downloads no pictures"]),
                                        ("data:image/png;base64,@@@", ["message 0, item 0", "base64"]),
                                        (42, ["message 0, item 0", "image_url must be a str"])])
def test_bad_image_urls(processor, url, words):
    refused(lambda: processor(asking({"type": "image_url", "image_url": {"url": url}})), InputError, *words)


def test_more_pictures_than_markers_in_a_prompt_string(processor):
    refused(lambda: processor("no marker here", images=[RED]), InputError, "0 image placeholder", "1 image(s)")


def test_images_argument_of_the_wrong_kind(processor):
    refused(lambda: processor(asking({"type": "image"}), images={"a": RED}), InputError, "images=", "dict")


# ==================================================================================== chat
def test_chat_takes_a_plain_string_as_one_user_turn(text_model, text_tokenizer):
    as_list = ernie_lab.chat(text_model, text_tokenizer, [{"role": "user", "content": "Where is Paris?"}],
                             max_new_tokens=4)
    assert ernie_lab.chat(text_model, text_tokenizer, "Where is Paris?", max_new_tokens=4) == as_list


def test_chat_with_a_picture(vl, tokenizer):
    reply = ernie_lab.chat(vl, tokenizer, asking({"type": "image", "image": RED}), max_new_tokens=4)
    assert isinstance(reply, str) and reply


def test_picture_for_a_text_only_model(text_model, text_tokenizer):
    messages = asking({"type": "image", "image": RED})
    refused(lambda: ernie_lab.chat(text_model, text_tokenizer, messages, max_new_tokens=2), InputError, "message 0",
            "text-only")


@pytest.mark.parametrize("messages, words", [
    (asking({"type": "audio", "audio": b""}), ["item 0", "'image' or 'video'"]),
    ([{"content": "Hi"}], ["message 0", "'role'"]),
    ([{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hi"}], ["message 1", "robot"]),
    (asking({"type": "image"}), ["1 image item(s) without a picture"]),
    (asking({"type": "image", "image": 3.5}), ["message 0, item 0", "float"]),
])
def test_bad_vl_chat_messages(vl, tokenizer, messages, words):
    refused(lambda: ernie_lab.chat(vl, tokenizer, messages, max_new_tokens=2), InputError, *words)


@pytest.mark.parametrize("kwargs, words", [(dict(max_new_tokens=0), ["max_new_tokens"]),
                                           (dict(max_new_tokens="8"), ["max_new_tokens"]),
                                           (dict(top_p=2.0), ["top_p"]), (dict(temperature=-1.0), ["temperature"])])
def test_bad_vl_chat_sampling(vl, tokenizer, kwargs, words):
    messages = asking({"type": "image", "image": RED})
    refused(lambda: ernie_lab.chat(vl, tokenizer, messages, **kwargs), InputError, *words)


def test_chat_with_something_that_is_not_a_tokenizer(vl):
    refused(lambda: ernie_lab.chat(vl, "tokenizer", "Hi"), InputError, "tokenizer", "str")


# ==================================================================================== exercise checker
def test_nan_is_never_correct():
    """Was marked correct: abs(nan - expected) > tol is False."""
    for answer in (math.nan, math.inf, -math.inf):
        refused(lambda: exercises.check("06.nmi", lambda table: torch.tensor(answer)), ExerciseFailed, "06.nmi",
                "NaN or Inf")
        refused(lambda: exercises.check("00.kv_crossover", answer), ExerciseFailed, "tokens", "finite number")


@pytest.mark.parametrize("name, answer, words", [
    ("00.kv_crossover", "45000", ["tokens", "expected a number", "str"]),
    ("01.causal_mask", "0 to 9", ["positions", "list of whole numbers", "str"]),
    ("03.last_position", [1.5, 2, 3], ["whole numbers", "1.5"]),
    ("02.active_per_layer", [1, 2], ["expected a number", "list"]),
    ("06.nmi", 0.5, ["expected a function", "float"]),
])
def test_answers_of_the_wrong_kind(name, answer, words):
    message = refused(lambda: exercises.check(name, answer), ExerciseFailed, name, *words)
    assert "Hint:" in message


@pytest.mark.parametrize("function, words", [
    (lambda x, cos, sin: x.tolist(), ["expected a tensor", "list"]),
    (lambda x, cos, sin: x.long(), ["dtype torch.int64", "floating-point"]),
    (lambda x, cos, sin: x[..., :4], [", 4), expected (", "shape ("]),   # the judge draws its shapes fresh
    (lambda x, cos, sin: x * math.nan, ["NaN"]),
    (lambda x, cos, sin: x.reshape(-1)[10**9], ["raised IndexError"]),
])
def test_rope_answers_of_the_wrong_kind(function, words):
    refused(lambda: exercises.check("01.rope_rotate_half", function), ExerciseFailed, "01.rope_rotate_half", *words)


def test_a_function_that_forgets_return_is_wrong_not_unattempted():
    def nmi(table):
        score = table.sum()  # noqa: F841  (computed, never returned)

    refused(lambda: exercises.check("06.nmi", nmi), ExerciseFailed, "returned None", "return")


def test_a_stub_is_still_not_attempted(capsys):
    def nmi(table):
        """Your code here."""
        ...

    assert exercises.check("06.nmi", nmi) is None
    assert "not attempted yet" in capsys.readouterr().out


def test_a_judge_that_cannot_read_the_answer_fails_with_the_expected_kind():
    """09.layer_damage compares the dict's values as numbers: a str value used to be a raw TypeError."""
    def layer_damage(model, ids, quantize):
        from ernie_lab.model.linears import linear_names
        return {name: "big" for name in linear_names(model)}

    refused(lambda: exercises.check("09.layer_damage", layer_damage), ExerciseFailed, "09.layer_damage",
            "expected a number", "str", "Hint:")


def test_a_raising_function_in_a_judge_that_calls_it_directly():
    def balance_with_bias(net, batches, gamma=0.01):
        raise KeyError("e_score_correction_bias")

    refused(lambda: exercises.check("02.balance_with_bias", balance_with_bias), ExerciseFailed,
            "02.balance_with_bias", "KeyError")


def test_unknown_exercise_is_named():
    refused(lambda: exercises.check("06.no_such_exercise", 1), InputError, "'06.no_such_exercise'", "06.nmi")
    refused(lambda: exercises.check("nothing", 1), InputError, "'nothing'")


@pytest.mark.parametrize("got, words", [(math.nan, ["nan", "finite"]), ("1.0", ["expected a number", "str"]),
                                        (torch.ones(2), ["expected a number", "list"]), (True, ["bool"])])
def test_expect_close_refuses_what_is_not_a_finite_number(got, words):
    refused(lambda: expect_close("x", got, 1.0), Mismatch, "x:", *words)


def test_expect_close_takes_numpy_and_one_element_tensors():
    expect_close("x", np.float32(0.5), 0.5)
    expect_close("x", torch.tensor(0.5), 0.5)
    expect_close("x", torch.tensor([0.5]), 0.5)


def test_expect_equal_compares_tensors_by_value_and_names_the_kind():
    expect_equal("ids", torch.tensor([1, 2]), [1, 2])
    refused(lambda: expect_equal("ids", torch.tensor([[1, 2], [3, 4]]), [1, 2]), Mismatch, "ids", "[[1, 2], [3, 4]]")
    refused(lambda: expect_equal("count", "12", 12), Mismatch, "count", "expected a number", "str")
    refused(lambda: expect_equal("losses", [1.0, math.nan], [1.0, 2.0]), Mismatch, "losses", "NaN")


def test_expect_tensor_refuses_nan_even_where_nan_is_expected():
    refused(lambda: expect_tensor("y", torch.tensor([math.nan]), torch.tensor([math.nan])), Mismatch, "y", "NaN")
    refused(lambda: expect_tensor("y", np.zeros(2), torch.zeros(2)), Mismatch, "y", "expected a tensor", "ndarray")

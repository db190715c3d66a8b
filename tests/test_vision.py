"""Vision side of ERNIE 4.5 VL: preprocessing, ViT, adapter — each compared with transformers.

The reference image processor here is transformers' PIL backend (what ``Ernie4_5_VLMoeImageProcessor``
resolves to when torchvision is absent, as in this project's environment). The reference video
processor imports torchvision; its tests run where torchvision is installed and skip otherwise.
"""

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ernie_lab import InputError, hub_names, image_processing, vision
from ernie_lab.io.image_processing import fit_to_grid, preprocess_images, preprocess_video
from ernie_lab.io.hub_names import vision_state_from_hub
from ernie_lab.model.vision import VisionAdapter, VisionConfig, VisionEncoder, tokens_per_item

RNG = np.random.default_rng(1234)


def noise(height, width, channels=3):
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def smooth(height, width):
    """A gradient with a disc: the kind of picture where resampling filters agree least with noise."""
    y, x = np.mgrid[0:height, 0:width]
    red = 255 * x / max(width - 1, 1)
    green = 255 * y / max(height - 1, 1)
    blue = 255.0 * ((x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(height, width) / 3) ** 2)
    return np.stack([red, green, blue], -1).astype(np.uint8)


def sample_images():
    """Several modes and sizes: upscaled, kept, and (with small bounds below) downscaled."""
    palette = Image.fromarray(noise(61, 47)).convert("P", palette=Image.Palette.ADAPTIVE)
    transparent = palette.copy()
    transparent.info["transparency"] = 3
    return {
        "RGB small 50x70": Image.fromarray(noise(50, 70)),
        "RGB smooth 333x517": Image.fromarray(smooth(333, 517)),
        "RGBA 120x90": Image.fromarray(noise(120, 90, 4), "RGBA"),
        "L 200x300": Image.fromarray(noise(200, 300, 1)[..., 0], "L"),
        "LA 64x64": Image.fromarray(noise(64, 64, 2), "LA"),
        "P 61x47": palette,
        "P with transparency": transparent,
        "CMYK 90x140": Image.fromarray(noise(90, 140, 4), "CMYK"),
        "tall 700x60": Image.fromarray(smooth(700, 60)),
    }


def reference_image_processor():
    from transformers import Ernie4_5_VLMoeImageProcessorPil

    return Ernie4_5_VLMoeImageProcessorPil()


# ----------------------------------------------------------------------------- preprocessing
@pytest.mark.parametrize("name", list(sample_images()))
def test_preprocess_matches_reference_per_mode(name):
    image = sample_images()[name]
    ref = reference_image_processor()([image], return_tensors="pt")
    ours = preprocess_images([image])
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert ours["pixel_values"].dtype == torch.float32
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-5


def test_preprocess_batch_of_mixed_sizes_and_downscaling_bounds():
    images = list(sample_images().values())
    ref = reference_image_processor()(images, return_tensors="pt")
    ours = preprocess_images(images)
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-5
    # tight bounds force the shrinking branch (and the growing one for the small images)
    low, high = 28 * 28 * 6, 28 * 28 * 12
    ref = reference_image_processor()(images, size={"shortest_edge": low, "longest_edge": high}, return_tensors="pt")
    ours = preprocess_images(images, min_pixels=low, max_pixels=high)
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-5


def test_fit_to_grid_equals_reference_and_respects_bounds():
    from transformers.models.ernie4_5_vl_moe.image_processing_pil_ernie4_5_vl_moe import smart_resize

    for height, width in RNG.integers(1, 4000, (300, 2)).tolist():
        if max(height, width) / min(height, width) > 200:
            continue
        try:
            expected = smart_resize(height, width, 28, 56 * 56, 28 * 28 * 6177)
        except ValueError:
            continue
        h, w = fit_to_grid(height, width)
        assert (h, w) == expected
        assert h % 28 == 0 and w % 28 == 0 and 56 * 56 <= h * w <= 28 * 28 * 6177


def test_grid_and_token_counts():
    out = preprocess_images([Image.fromarray(noise(56, 84))])  # already a multiple of 28: kept
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    assert out["pixel_values"].shape == (4 * 6, 3 * 14 * 14)
    assert tokens_per_item(out["image_grid_thw"]) == [6]  # 4x6 patches -> 2x3 merged tokens
    assert tokens_per_item(torch.tensor([[4, 4, 6]])) == [12]  # 4 frames -> 2 pairs x 6


def test_patch_layout_groups_merge_windows():
    """The 4 patches of a 2x2 window are consecutive rows, each a (C, 14, 14) block of the picture."""
    frames = torch.arange(3 * 56 * 56, dtype=torch.float32).reshape(1, 3, 56, 56)
    patches = image_processing.patchify(frames)  # 16 patches
    window_1 = patches[4:8].reshape(4, 3, 14, 14)  # second window: rows 0-27, columns 28-55
    expected = [frames[0, :, r:r + 14, c:c + 14] for r in (0, 14) for c in (28, 42)]
    for got, want in zip(window_1, expected):
        assert torch.equal(got, want)


def test_paths_and_bytes_give_the_same_pixels(tmp_path):
    image = Image.fromarray(smooth(80, 120))
    path = tmp_path / "picture.png"
    image.save(path)
    from_pil = preprocess_images([image])["pixel_values"]
    assert torch.equal(preprocess_images([path])["pixel_values"], from_pil)
    assert torch.equal(preprocess_images([str(path)])["pixel_values"], from_pil)
    assert torch.equal(preprocess_images([path.read_bytes()])["pixel_values"], from_pil)


def test_unreadable_and_truncated_files_raise_input_error(tmp_path):
    image = Image.fromarray(noise(200, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    with pytest.raises(InputError, match="truncated or corrupt"):
        preprocess_images([truncated])
    with pytest.raises(InputError, match="not an image file"):
        preprocess_images([text])
    with pytest.raises(InputError, match="not an image file"):
        preprocess_images([b"\x00\x01garbage"])
    with pytest.raises(InputError, match="no image file"):
        preprocess_images([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="PIL.Image, a file path or bytes"):
        preprocess_images([np.zeros((30, 30, 3), dtype=np.uint8)])
    with pytest.raises(InputError, match="no images"):
        preprocess_images([])


def test_images_outside_the_pixel_bounds_raise_input_error(monkeypatch):
    with pytest.raises(InputError, match="too elongated"):
        preprocess_images([Image.new("RGB", (3000, 10))])
    with pytest.raises(InputError, match="empty"):
        preprocess_images([Image.new("RGB", (0, 10))])
    with pytest.raises(InputError, match="cannot be fitted"):  # 150:1 is grown to 28 x 700 > 28 x 560
        preprocess_images([Image.new("RGB", (1500, 10))], max_pixels=28 * 28 * 20)
    with pytest.raises(InputError, match="cannot be fitted"):
        preprocess_images([Image.new("RGB", (64, 64))], min_pixels=100_000, max_pixels=50_000)
    monkeypatch.setattr(image_processing, "MAX_INPUT_PIXELS", 100 * 100)
    with pytest.raises(InputError, match="exceeds"):
        preprocess_images([Image.new("RGB", (101, 100))])


def test_torch_resize_matches_the_torchvision_backend():
    pytest.importorskip("torchvision", reason="transformers' torchvision image backend needs torchvision")
    from transformers import Ernie4_5_VLMoeImageProcessor

    images = [Image.fromarray(noise(50, 70)), Image.fromarray(smooth(333, 517))]
    ref = Ernie4_5_VLMoeImageProcessor()(images, return_tensors="pt")
    ours = preprocess_images(images, resize_with="torch")
    assert torch.equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert (ours["pixel_values"] - ref["pixel_values"]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- video
def test_video_frames_pad_to_pairs_and_lists_equal_arrays():
    frames = noise(5 * 60, 80).reshape(5, 60, 80, 3)
    out = preprocess_video(frames, min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)
    t, h, w = out["video_grid_thw"][0].tolist()
    assert t == 6  # 5 frames + the last one repeated
    assert out["pixel_values_videos"].shape == (t * h * w, 588)
    per_frame = h * w
    last, repeated = out["pixel_values_videos"][4 * per_frame: 5 * per_frame], out["pixel_values_videos"][5 * per_frame:]
    assert torch.equal(last, repeated)
    as_list = preprocess_video([Image.fromarray(f) for f in frames], min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 20)
    assert torch.equal(as_list["pixel_values_videos"], out["pixel_values_videos"])
    assert tokens_per_item(out["video_grid_thw"]) == [t * h * w // 8]


def test_video_timestamps_are_drawn_top_left():
    import matplotlib

    font = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    frames = np.full((2, 112, 112, 3), 128, dtype=np.uint8)
    plain = preprocess_video(frames, min_pixels=112 * 112, max_pixels=112 * 112)["pixel_values_videos"]
    stamped = preprocess_video(frames, min_pixels=112 * 112, max_pixels=112 * 112, fps=2, font=font)
    changed = (stamped["pixel_values_videos"] != plain).any(-1)  # which patches the text touched
    assert changed[0] and not changed[15]  # first patch (top-left) yes, last (bottom-right) no
    assert image_processing.timestamp_text(62.5) == "time: 00:01:02.50"


def test_bad_video_input_raises_input_error():
    with pytest.raises(InputError, match="uint8 of shape"):
        preprocess_video(np.zeros((4, 30, 30), dtype=np.uint8))
    with pytest.raises(InputError, match="uint8 of shape"):
        preprocess_video(np.zeros((4, 30, 30, 3), dtype=np.float32))
    with pytest.raises(InputError, match="one size"):
        preprocess_video([Image.new("RGB", (30, 30)), Image.new("RGB", (40, 30))])
    with pytest.raises(InputError, match="no frames"):
        preprocess_video([])


def test_video_matches_reference_processor():
    pytest.importorskip("torchvision", reason="transformers' video processor imports torchvision")
    import matplotlib
    from transformers import Ernie4_5_VLMoeVideoProcessor

    font = os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    frames = noise(5 * 60, 80).reshape(5, 60, 80, 3)
    bounds = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 20}
    ref = Ernie4_5_VLMoeVideoProcessor()(frames, size=bounds, draw_on_frames=False, do_sample_frames=False,
                                          return_tensors="pt")
    ours = preprocess_video(frames, min_pixels=bounds["shortest_edge"], max_pixels=bounds["longest_edge"])
    assert torch.equal(ours["video_grid_thw"], ref["video_grid_thw"])
    assert (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max() < 1e-5
    ref = Ernie4_5_VLMoeVideoProcessor(font=font)(frames, size=bounds, video_metadata={"fps": 2.0, "total_num_frames": 5},
                                                   return_tensors="pt")
    ours = preprocess_video(frames, min_pixels=bounds["shortest_edge"], max_pixels=bounds["longest_edge"],
                            fps=2.0, font=font)
    assert (ours["pixel_values_videos"] - ref["pixel_values_videos"]).abs().max() < 1e-5


# ----------------------------------------------------------------------------- encoder + adapter
@pytest.fixture(scope="module")
def reference_vl(tmp_path_factory):
    """A small random transformers VL model, saved with save_pretrained; (model, Hub tensors)."""
    from transformers import Ernie4_5_VLMoeConfig, Ernie4_5_VLMoeForConditionalGeneration

    torch.manual_seed(0)
    config = Ernie4_5_VLMoeConfig(
        text_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=24, moe_intermediate_size=[16, 8], moe_k=2,
                         moe_num_experts=4, moe_num_shared_experts=1, vocab_size=104000,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "mrope_section": [4, 4, 4]}),
        vision_config=dict(depth=2, hidden_size=64, num_heads=4, intermediate_size=96),
    )
    model = Ernie4_5_VLMoeForConditionalGeneration(config).eval()
    with torch.no_grad():  # the default init leaves norms at 1 / biases at 0: randomise so mistakes show
        for name, p in model.named_parameters():
            if "vision_tower" in name or "resampler" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("tiny-vl")
    model.save_pretrained(folder)
    return model, load_file(folder / "model.safetensors")


def lab_vision(reference_vl):
    model, tensors = reference_vl
    config = VisionConfig.from_dict(model.config.vision_config.to_dict(), model.config.text_config.hidden_size,
                                    model.config.text_config.rms_norm_eps)
    encoder, adapter = VisionEncoder(config).eval(), VisionAdapter(config).eval()
    encoder_state, adapter_state = vision_state_from_hub(tensors)
    encoder.load_state_dict(encoder_state, strict=True)
    adapter.load_state_dict(adapter_state, strict=True)
    return encoder, adapter


def test_name_map_covers_every_vision_tensor(reference_vl):
    _, tensors = reference_vl
    vision_names = [n for n in tensors if n.startswith(("model.vision_model.", "model.resampler_model."))]
    assert vision_names, "save_pretrained wrote no vision tensors?"
    assert all(hub_names.hub_to_lab_vision(n) is not None for n in vision_names)
    assert hub_names.hub_to_lab_vision("model.layers.0.mlp.gate.weight") is None
    encoder, adapter = lab_vision(reference_vl)  # strict loading: nothing missing, nothing extra
    expected = len(encoder.state_dict()) + len(adapter.state_dict())
    assert len(vision_names) == expected


@torch.no_grad()
def test_encoder_and_adapter_match_reference_for_two_images(reference_vl):
    model, _ = reference_vl
    encoder, adapter = lab_vision(reference_vl)
    batch = preprocess_images([Image.fromarray(smooth(90, 150)), Image.fromarray(noise(60, 60))])
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    ref_features = model.model.vision_tower(pixels, grid).last_hidden_state
    features = encoder(pixels, grid)
    assert (features - ref_features).abs().max() < 1e-4
    ref_tokens = torch.cat(model.model.get_image_features(pixels, grid).pooler_output)
    tokens = adapter(features, grid)
    assert tokens.shape == (sum(tokens_per_item(grid)), model.config.text_config.hidden_size)
    assert (tokens - ref_tokens).abs().max() < 1e-4


@torch.no_grad()
def test_encoder_and_adapter_match_reference_for_a_video(reference_vl):
    model, _ = reference_vl
    encoder, adapter = lab_vision(reference_vl)
    frames = np.stack([smooth(56, 84)] * 2 + [noise(56, 84)] * 2)
    batch = preprocess_video(frames, min_pixels=56 * 84, max_pixels=56 * 84)
    pixels, grid = batch["pixel_values_videos"], batch["video_grid_thw"]
    assert grid.tolist() == [[4, 4, 6]]
    ref_tokens = torch.cat(model.model.get_video_features(pixels, grid).pooler_output)
    tokens = adapter(encoder(pixels, grid), grid)
    assert tokens.shape == (12, model.config.text_config.hidden_size)
    assert (tokens - ref_tokens).abs().max() < 1e-4


def test_frames_attend_only_within_themselves():
    """Changing frame 1 of a video leaves the ViT features of frame 0 untouched."""
    torch.manual_seed(0)
    config = VisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, text_hidden_size=16)
    encoder = VisionEncoder(config).eval()
    grid = torch.tensor([[2, 2, 2]])
    pixels = torch.randn(8, 588)
    changed = pixels.clone()
    changed[4:] += 1.0
    with torch.no_grad():
        a, b = encoder(pixels, grid), encoder(changed, grid)
    assert torch.allclose(a[:4], b[:4]) and not torch.allclose(a[4:], b[4:])


def test_2d_rope_scores_depend_only_on_offsets():
    """q.k after rotation is the same for patch pairs with equal (row, column) offsets."""
    torch.manual_seed(0)
    head_dim = 16
    q, k = torch.randn(1, 1, head_dim), torch.randn(1, 1, head_dim)

    def score(p, r):
        cos_p, sin_p = vision.vision_rope_angles(torch.tensor([p]), head_dim, 10000.0)
        cos_r, sin_r = vision.vision_rope_angles(torch.tensor([r]), head_dim, 10000.0)
        return (vision.apply_rope_half(q, cos_p, sin_p) * vision.apply_rope_half(k, cos_r, sin_r)).sum()

    assert torch.allclose(score((3, 5), (1, 2)), score((7, 9), (5, 6)), atol=1e-5)
    assert not torch.allclose(score((3, 5), (1, 2)), score((3, 5), (2, 1)), atol=1e-3)


def test_bad_grids_raise_input_error():
    config = VisionConfig(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, text_hidden_size=16)
    encoder, adapter = VisionEncoder(config), VisionAdapter(config)
    with pytest.raises(InputError, match="describes 16 patches"):
        encoder(torch.randn(12, 588), torch.tensor([[1, 4, 4]]))
    with pytest.raises(InputError, match=r"\(patches, 588\)"):
        encoder(torch.randn(16, 500), torch.tensor([[1, 4, 4]]))
    with pytest.raises(InputError, match="even number of frames"):
        adapter(torch.randn(12, 32), torch.tensor([[3, 2, 2]]))

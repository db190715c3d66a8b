"""Exercises of notebook 03 (vision encoder and 3-D RoPE): patchify, a ViT block with 2-D rotary positions,
the adapter's 2 x 2 and 2-frame merges, tokens of a photo, positions after a picture.

The function judges draw fresh pictures, weights and grids on every call (two sizes each) and compare with
``ernie_lab`` (``image_processing.patchify``, ``vision.VisionBlock``, ``vision.VisionAdapter``, themselves
checked against ``transformers`` in the notebook and the tests). A diagnosis names a mistake only when the
answer equals that mistake's output on the same inputs.
"""

import copy
import math

import torch
import torch.nn.functional as F

from ..exercises import (Mismatch, as_ints, call, exercise, expect_equal, expect_tensor, draw_int, fresh_generator,
                         name_the_mistake, switched_off)

PHOTO = (3024, 4032)        # a phone photo, height x width
IMAGE, START, END = 100295, 101304, 101305   # <|IMAGE_PLACEHOLDER|>, <|IMAGE_START|>, <|IMAGE_END|>


@exercise("03.photo_tokens",
          hint="shrink both sides by sqrt(H W / max_pixels) with max_pixels = 28 * 28 * 6177, round each side *down* "
               "to a multiple of 28, count 14 x 14 patches and divide by 4 (the adapter merges 2 x 2 patches).")
def photo_tokens(tokens) -> str:
    from ...io.image_processing import fit_to_grid

    h, w = fit_to_grid(*PHOTO)
    expected = (h // 14) * (w // 14) // 4
    if tokens == (h // 14) * (w // 14):
        raise Mismatch("that is the number of patches; the adapter merges every 2 x 2 patches into one token")
    shrink = math.sqrt(PHOTO[0] * PHOTO[1] / (28 * 28 * 6177))
    nearest = round(PHOTO[0] / shrink / 28) * 28 * round(PHOTO[1] / shrink / 28) * 28 // 14 // 14 // 4
    if tokens == nearest and nearest != expected:
        raise Mismatch("rounding to the nearest multiple of 28 can exceed the pixel budget; round down")
    expect_equal("decoder tokens of a 4032 x 3024 photo", tokens, expected)
    return f"The photo is resized to {h} x {w} and becomes {expected:,} tokens."


@exercise("03.last_position",
          hint="text tokens count 0, 1, 2, ...; the picture's tokens start at the position after <start> and span "
               "max(h, w) / 2 positions (t, h and w each count over the merged grid); <end> takes the next position.")
def last_position(position) -> str:
    from ...model.rope3d import modality_types, position_ids_3d

    ids = torch.tensor([[1, 2, 3, 4, 5, START] + [IMAGE] * (8 * 12 // 4)
                        + [END, 6, 7, 8]])
    positions, _ = position_ids_3d(modality_types(ids), torch.tensor([[1, 8, 12]]))
    expected = positions[:, 0, -1].tolist()
    got = as_ints("(t, h, w) position", position)
    if got == [ids.shape[1] - 1] * 3:
        raise Mismatch("that counts every token one position; the picture's 24 tokens share a 2-D grid of "
                       "positions that spans only max(4, 6) = 6")
    expect_equal("(t, h, w) position of the last token", got, expected)
    return "After a picture, text positions continue from the largest position the picture used."


# ================================================================================ patchify
def _even(g, low, high) -> int:
    return 2 * draw_int(g, low, high)


@exercise("03.patchify",
          hint="reshape (T, C, H, W) to (T, C, H/28, 2, 14, W/28, 2, 14) (window row, row in window, pixel row, "
               "window column, column in window, pixel column), permute to (T, H/28, W/28, 2, 2, C, 14, 14) and "
               "flatten to (T * H/14 * W/14, C * 14 * 14).")
def patchify(function) -> str:
    from ...io.image_processing import patchify as kit_patchify

    g = fresh_generator()
    for frames in (1, 2):
        h, w = 14 * _even(g, 2, 4), 14 * _even(g, 2, 4)                        # two windows or more each way
        if h == w:
            w += 28                                                              # never square
        pixels = torch.randn(frames, 3, h, w, generator=g)                       # (T, C, H, W)
        expected = kit_patchify(pixels)                                          # (N, 588)
        row_major = pixels.unfold(2, 14, 14).unfold(3, 14, 14)                   # (T, C, H/14, W/14, 14, 14)
        mistakes = {
            "your patches are in plain row-major order; the model stores the 4 patches of each 2 x 2 merge "
            "window next to each other (windows row by row)": row_major.permute(0, 2, 3, 1, 4, 5).reshape(-1, 588),
            "a patch's 588 numbers must be channel-major (3, 14, 14), not pixel-major (14, 14, 3)":
                expected.view(-1, 3, 14, 14).permute(0, 2, 3, 1).reshape(-1, 588),
        }
        got = call(function, pixels)
        name_the_mistake(got, expected, mistakes)
        expect_tensor(f"patches of {frames} frame(s) of {h} x {w} pixels", got, expected, atol=1e-6)
    return "Equal to ernie_lab.image_processing.patchify: the adapter can now merge a window with a reshape."


# ================================================================================ a ViT block with 2-D RoPE
def random_vision_block(g: torch.Generator, width: int, heads: int):
    from ...model.config import VisionConfig
    from ...model.vision import VisionBlock

    config = VisionConfig.from_dict(dict(depth=1, hidden_size=width, num_heads=heads, intermediate_size=2 * width),
                                    text_hidden_size=width)
    block = VisionBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 and p.shape[0] == width else 0))
    return block


def _exact_gelu(block):
    changed = copy.deepcopy(block)
    changed.mlp.forward = lambda x: changed.mlp.fc2(F.gelu(changed.mlp.fc1(x)))
    return changed


@exercise("03.vit_block",
          hint="h = LayerNorm1(x); q, k, v = qkv(h) split into (N, heads, d); angles = [row * w_j, col * w_j] with "
               "w_j = 10000^(-4j/d), j < d/4, written twice (dim i and i + d/2 share an angle); rotate q and k "
               "rotate-half; softmax(q k^T / sqrt d) v over all patches (no mask); x += proj(...); then "
               "x += fc2(quick_gelu(fc1(LayerNorm2(x)))) with quick_gelu(z) = z * sigmoid(1.702 z).")
def vit_block(function) -> str:
    from ...model.vision import vision_positions, vision_rope_angles

    g = fresh_generator()
    for width, heads in ((32, 2), (48, 4)):
        grid = torch.tensor([[1, _even(g, 1, 3), _even(g, 2, 4)]])
        positions = vision_positions(grid)                                       # (N, 2) row, column
        x = torch.randn(len(positions), width, generator=g)                      # (N, width)
        block = random_vision_block(g, width, heads)
        d = width // heads

        def run(b, pos):
            with torch.no_grad():
                return b(x, vision_rope_angles(pos, d, 10000.0), [len(pos)])
        expected = run(block, positions)
        mistakes = {"rows and columns are swapped: the first d/4 frequencies rotate with the row, the next d/4 "
                    "with the column": run(block, positions.flip(-1)),
                    "no rotary positions: rotate q and k by the angles of each patch's (row, column)":
                        run(block, torch.zeros_like(positions)),
                    "the ViT's MLP uses quick GELU, z * sigmoid(1.702 z), not the exact GELU": run(_exact_gelu(block),
                                                                                                   positions)}
        student = switched_off(block, "use its norms, qkv, proj and mlp yourself")
        got = call(function, x, student, positions)
        name_the_mistake(got, expected, mistakes, atol=1e-4)
        expect_tensor(f"ViT block output ({len(positions)} patches, width {width}, {heads} heads)", got, expected,
                      atol=1e-4)
    return "Equal to ernie_lab.vision.VisionBlock (itself equal to transformers' Ernie4_5_VLMoeVisionBlock)."


# ================================================================================ the adapter's merges
def random_adapter(g: torch.Generator, width: int, text_width: int):
    from ...model.config import VisionConfig
    from ...model.vision import VisionAdapter

    config = VisionConfig.from_dict(dict(depth=1, hidden_size=width, num_heads=2, intermediate_size=2 * width),
                                    text_hidden_size=text_width)
    adapter = VisionAdapter(config).eval()
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    return adapter


def _pairs_of_windows(features, adapter):
    """The mistake: pair each merged window with its neighbour instead of with the same window of the next frame."""
    x = adapter.spatial_merge(features.reshape(-1, 4 * features.shape[-1]))       # (N/4, 4w)
    return adapter.norm(adapter.proj(adapter.temporal_merge(x.reshape(-1, 2 * x.shape[-1]))))


@exercise("03.adapter_merge",
          hint="windows = features.reshape(-1, 4 * width) (patchify put each 2 x 2 window on 4 rows); x = "
               "spatial_merge(windows); pair frame 2k with 2k+1 window by window (an image with itself): "
               "concat along the last axis; x = temporal_merge(pairs); tokens = norm(proj(x)).")
def adapter_merge(function) -> str:
    g = fresh_generator()
    for width, text_width, frames in ((16, 12, 4), (8, 24, 1)):
        grid = torch.tensor([frames, _even(g, 1, 3), _even(g, 1, 3) + 2])
        features = torch.randn(int(grid.prod()), width, generator=g)            # (N, width)
        adapter = random_adapter(g, width, text_width)
        with torch.no_grad():
            expected = adapter(features, grid[None])                            # (tokens, text width)
            mistakes = {"you paired each window with its neighbouring window; pair it with the same window of the "
                        "next frame (windows of one frame are h w / 4 rows apart)": _pairs_of_windows(features, adapter)
                        } if frames > 1 else {}
        student = switched_off(adapter, "use its spatial and temporal linears and mlp yourself")
        got = call(function, features, grid, student)
        name_the_mistake(got, expected, mistakes, atol=1e-4)
        expect_tensor(f"adapter tokens of grid {grid.tolist()}", got, expected, atol=1e-4)
    return "Equal to ernie_lab.vision.VisionAdapter: 4 patches x 2 frames make one decoder token."

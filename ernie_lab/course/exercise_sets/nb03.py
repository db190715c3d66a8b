"""Exercises of notebook 03 (vision encoder and 3-D RoPE): tokens of a photo, positions after a picture."""

import math

import torch

from ..exercises import Mismatch, as_ints, exercise, expect_equal

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

"""Solutions to notebook 03's exercises."""

import math

MAX = 28 * 28 * 6177
H, W = 3024, 4032
shrink = math.sqrt(H * W / MAX)                  # the photo is larger than the budget: shrink both sides
h_side = math.floor(H / shrink / 28) * 28        # round down, so the area stays within the budget
w_side = math.floor(W / shrink / 28) * 28
photo_tokens = (h_side // 14) * (w_side // 14) // 4

start = 6                                        # 5 text tokens (0..4) and <start> (5): the picture begins at 6
after_image = start + max(8, 12) // 2            # the merged grid is 4 x 6: positions 6..11 in h and w
last_position = [after_image + 3] * 3            # <end> takes after_image, then 3 text tokens

SOLUTIONS = {"03.photo_tokens": (photo_tokens,), "03.last_position": (last_position,)}
WRONG = {
    "03.photo_tokens": [((h_side // 14) * (w_side // 14),),
                        (math.ceil(H / shrink / 28) * 28 // 14 * (math.ceil(W / shrink / 28) * 28 // 14) // 4,)],
    "03.last_position": [([33, 33, 33],), ([after_image + 2] * 3,)],
}

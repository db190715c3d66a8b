"""3-D positions and the height/width/time rotary, compared with transformers' Ernie 4.5 VL."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from ernie_lab import ConfigError, InputError
from ernie_lab.model.rope import apply_rope, rope_angles
from ernie_lab.model.rope3d import (modality_types, position_ids_3d, rope_angles_3d, routing_types,
                              vision_block_positions)

IMG, VID = 100295, 103367
IMG_START, IMG_END, VID_START, VID_END = 101304, 101305, 101306, 101307


def image_block(grid):
    t, h, w = grid
    return [IMG_START] + [IMG] * (h * w // 4) + [IMG_END]


def video_block(grid):
    t, h, w = grid
    return [VID_START] + [VID] * (t * h * w // 8) + [VID_END]


@pytest.fixture(scope="module")
def reference():
    """transformers' Ernie4_5_VLMoeModel, tiny (get_rope_index uses only its config)."""
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeModel

    config = Ernie4_5_VLMoeConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=128, moe_intermediate_size=[8, 8], moe_k=1,
                         moe_num_experts=2, moe_num_shared_experts=0, vocab_size=104000),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16),
    )
    return Ernie4_5_VLMoeModel(config).eval()


CASES = {
    "text + image + text": ([5, 6, 7] + image_block((1, 4, 6)) + [8, 9], [[1, 4, 6]], None),
    "two images of different sizes": ([5] + image_block((1, 8, 4)) + [6, 7] + image_block((1, 4, 10)) + [8],
                                      [[1, 8, 4], [1, 4, 10]], None),
    "a short video": ([5, 6] + video_block((4, 4, 6)) + [7, 8, 9], None, [[4, 4, 6]]),
    "image then video": ([5] + image_block((1, 6, 6)) + video_block((2, 4, 4)) + [7], [[1, 6, 6]], [[2, 4, 4]]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_positions_equal_reference(reference, case):
    ids, image_grid, video_grid = CASES[case]
    ids = torch.tensor([ids])
    image_grid = torch.tensor(image_grid) if image_grid else None
    video_grid = torch.tensor(video_grid) if video_grid else None
    types = modality_types(ids)
    expected, expected_deltas = reference.get_rope_index(ids, types, image_grid, video_grid)
    positions, deltas = position_ids_3d(types, image_grid, video_grid)
    assert torch.equal(positions, expected)
    assert torch.equal(deltas, expected_deltas)


def test_positions_of_a_left_padded_batch_equal_reference(reference):
    first = [5] + image_block((1, 4, 4)) + [6, 7, 8, 9, 10]
    second = [5, 6] + image_block((1, 8, 6)) + [7]
    width = max(len(first), len(second))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in (first, second)])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (first, second)])
    grids = torch.tensor([[1, 4, 4], [1, 8, 6]])
    types = modality_types(ids)
    expected, expected_deltas = reference.get_rope_index(ids, types, grids, None, attention_mask=mask)
    positions, deltas = position_ids_3d(types, grids, None, attention_mask=mask)
    assert torch.equal(positions, expected) and torch.equal(deltas, expected_deltas)


def test_image_positions_by_hand():
    """2x3 tokens starting at 4: t stays 4, h = 4 + row, w = 4 + column; text resumes at 4 + 3."""
    block = vision_block_positions(4, (1, 4, 6))
    assert block.tolist() == [[4] * 6, [4, 4, 4, 5, 5, 5], [4, 5, 6, 4, 5, 6]]
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0]])
    positions, deltas = position_ids_3d(types, torch.tensor([[1, 4, 6]]))
    assert positions[:, 0, -1].tolist() == [7, 7, 7]
    assert deltas.item() == 8 - 11  # next token: index 11 + (-3) = position 8


def test_routing_types_mark_start_and_end_as_vision():
    ids = torch.tensor([[5] + image_block((1, 2, 2)) + video_block((2, 2, 2)) + [6]])
    assert modality_types(ids).tolist() == [[0, 0, 1, 0, 0, 2, 0, 0]]
    assert routing_types(ids).tolist() == [[0, 1, 1, 1, 2, 2, 2, 0]]


@pytest.mark.parametrize("head_dim, section", [(128, [22, 22, 20]), (64, [8, 8, 16])])
def test_rotary_equals_reference(head_dim, section):
    from transformers import Ernie4_5_VLMoeTextConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeTextRotaryEmbedding, apply_rotary_pos_emb)

    config = Ernie4_5_VLMoeTextConfig(hidden_size=64, num_attention_heads=2, head_dim=head_dim,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0,
                                                       "mrope_section": section})
    rotary = Ernie4_5_VLMoeTextRotaryEmbedding(config)
    ids, image_grid, video_grid = CASES["image then video"]
    positions, _ = position_ids_3d(modality_types(torch.tensor([ids])), torch.tensor(image_grid),
                                   torch.tensor(video_grid))
    positions = positions.expand(3, 2, -1) + torch.tensor([0, 1000])[None, :, None]  # 2 rows, one far out
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, positions.shape[-1], head_dim), torch.randn(2, 1, positions.shape[-1], head_dim)
    cos, sin = rotary(q, positions)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours = rope_angles_3d(positions, head_dim, 500000.0, section)
    assert (apply_rope(q, *ours) - ref_q).abs().max() < 1e-5
    assert (apply_rope(k, *ours) - ref_k).abs().max() < 1e-5


def test_text_positions_reduce_to_plain_rope():
    positions = torch.arange(40)[None]  # (1, 40)
    cos3, sin3 = rope_angles_3d(positions[None].expand(3, 1, 40), 128, 500000.0)
    cos1, sin1 = rope_angles(positions, 128, 500000.0)
    assert torch.equal(cos3, cos1) and torch.equal(sin3, sin1)


def test_errors():
    types = torch.tensor([[0, 1, 1, 1, 0]])
    with pytest.raises(InputError, match="does not match its grid"):
        position_ids_3d(types, torch.tensor([[1, 4, 4]]))  # 4 tokens expected, 3 given
    with pytest.raises(InputError, match="more image blocks"):
        position_ids_3d(types, None)
    with pytest.raises(ConfigError, match="mrope_section"):
        rope_angles_3d(torch.zeros(3, 1, 2, dtype=torch.long), 64, 500000.0)  # default section needs 128
    with pytest.raises(ConfigError, match="mrope_section"):
        rope_angles_3d(torch.zeros(3, 1, 2, dtype=torch.long), 128, 500000.0, [24, 20, 20])

"""MoE auxiliary losses on hand-computed cases, and against transformers where it has the same loss."""

import math

import pytest
import torch

from ernie_lab.errors import InputError
from ernie_lab.train.losses import load_balancing_loss, router_orthogonal_loss, router_z_loss

LN3 = math.log(3.0)


def test_load_balancing_by_hand():
    # two tokens, two experts, k = 1; probabilities (3/4, 1/4) and (1/4, 3/4): f = P = (1/2, 1/2)
    balanced = torch.tensor([[LN3, 0.0], [0.0, LN3]])
    assert load_balancing_loss(balanced, k=1).item() == pytest.approx(2 * (0.5 * 0.5 + 0.5 * 0.5))
    # both tokens prefer expert 0: f = (1, 0), P = (3/4, 1/4) -> 2 * 3/4
    collapsed = torch.tensor([[LN3, 0.0], [LN3, 0.0]])
    assert load_balancing_loss(collapsed, k=1).item() == pytest.approx(1.5)
    # uniform probabilities give exactly k whatever the tie-breaking of top-k
    assert load_balancing_loss(torch.zeros(6, 4), k=2).item() == pytest.approx(2.0)


def test_load_balancing_mask_leaves_padding_out():
    logits = torch.tensor([[LN3, 0.0], [0.0, LN3], [5.0, 0.0]])
    masked = load_balancing_loss(logits, k=1, attention_mask=torch.tensor([1, 1, 0]))
    assert masked.item() == pytest.approx(load_balancing_loss(logits[:2], k=1).item())


def test_load_balancing_equals_transformers():
    ernie_moe = pytest.importorskip("transformers.models.ernie4_5_moe.modeling_ernie4_5_moe")
    torch.manual_seed(0)
    layers = tuple(torch.randn(2 * 7, 8) * 2 for _ in range(3))  # 3 layers, batch 2 x 7 tokens, 8 experts
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    for attention_mask in (None, mask):
        expected = ernie_moe.load_balancing_loss_func(layers, 8, 2, attention_mask)
        got = load_balancing_loss(layers, k=2, attention_mask=attention_mask)
        assert torch.allclose(got, expected, atol=1e-6)


def test_load_balancing_gradient_lowers_the_favourite():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]], requires_grad=True)
    load_balancing_loss(logits, k=1).backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1:] < 0).all()  # descent lowers expert 0


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])  # log-partitions ln 2 and ln 4 = 2 ln 2
    expected = (math.log(2) ** 2 + (2 * math.log(2)) ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected)
    assert router_z_loss(logits, attention_mask=torch.tensor([1, 0])).item() == pytest.approx(math.log(2) ** 2)


def test_z_loss_equals_transformers_switch():
    switch = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 8) * 3  # (groups, tokens, experts)
    assert torch.allclose(router_z_loss(logits), switch.router_z_loss_func(logits), atol=1e-5)


def test_orthogonal_loss_by_hand():
    assert router_orthogonal_loss(torch.eye(3, 5) * 7).item() == pytest.approx(0.0, abs=1e-7)  # orthogonal rows
    # two identical rows: gram = all ones, off-diagonal error 1 twice -> 2 / 4
    assert router_orthogonal_loss(torch.tensor([[1.0, 0.0], [2.0, 0.0]])).item() == pytest.approx(0.5)
    # unit rows (0.6, 0.8) and (0.8, 0.6): cosine 0.96 -> 2 * 0.96^2 / 4
    assert router_orthogonal_loss(torch.tensor([[3.0, 4.0], [4.0, 3.0]])).item() == pytest.approx(0.4608)
    # E identical rows: (E^2 - E) / E^2; a zero row is clamped, not divided by zero
    assert router_orthogonal_loss(torch.ones(4, 3)).item() == pytest.approx(0.75)
    assert torch.isfinite(router_orthogonal_loss(torch.zeros(2, 3)))


def test_orthogonal_loss_gradient_step_separates_rows():
    w = torch.tensor([[1.0, 0.1], [1.0, -0.1]], requires_grad=True)
    before = router_orthogonal_loss(w)
    before.backward()
    with torch.no_grad():
        after = router_orthogonal_loss(w - 0.1 * w.grad)
    assert after < before


def test_bad_inputs():
    with pytest.raises(InputError, match="2-D"):
        router_orthogonal_loss(torch.ones(2, 3, 4))
    with pytest.raises(InputError, match="empty"):
        load_balancing_loss([], k=1)
    with pytest.raises(InputError, match="attention_mask"):
        router_z_loss(torch.zeros(4, 3), attention_mask=torch.ones(5))

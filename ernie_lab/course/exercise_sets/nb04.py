"""Exercises of notebook 04 (multimodal MoE): the vision experts' weight, the text group's balancing loss."""

import math

import torch

from ...analysis import family as F
from ..exercises import Mismatch, as_number, exercise, expect_close, expect_equal


@exercise("04.vision_experts",
          hint="VL-28B-A3B: 64 vision experts per MoE layer, each a SwiGLU (three matrices) of hidden 2560 and "
               "width 512.")
def vision_experts(per_layer) -> str:
    shape = F.model_shape(F.CONFIG_VL_28B_A3B)
    counts = F.count_params(F.CONFIG_VL_28B_A3B)
    expected = counts.by_component["vision_experts"] // sum(shape.moe_layers)
    if per_layer == expected // 3:
        raise Mismatch("a SwiGLU expert has three matrices (gate, up, down), you counted one")
    if per_layer == shape.num_vision_experts * 3 * shape.hidden_size * shape.expert_size:
        raise Mismatch("that uses the text experts' width (1536); the vision experts are narrower (512)")
    expect_equal("vision-expert parameters in one MoE layer", per_layer, expected)
    decoder = counts.total - counts.by_component["vision_encoder"] - counts.by_component["adapter"]
    return (f"{sum(shape.moe_layers)} MoE layers x {expected:,} = {counts.by_component['vision_experts'] / 1e9:.2f} B, "
            f"{counts.by_component['vision_experts'] / decoder:.0%} of the decoder.")


TEXT_PROBS = [[0.1, 0.9]] * 3
VISION_PROBS = [[0.6, 0.4], [0.4, 0.6], [0.55, 0.45]]


@exercise("04.text_balance_loss",
          hint="only the 3 text tokens count: f = share of text choices per expert, P = mean text router probability "
               "per expert; L = E * sum_e f_e P_e with E = 2.")
def text_balance_loss(loss) -> str:
    from ...train.losses import load_balancing_loss, modality_balancing_losses

    table = torch.tensor(TEXT_PROBS + VISION_PROBS).log()
    modality = torch.tensor([0, 0, 0, 1, 1, 1])
    expected = modality_balancing_losses([table], modality, k=1)
    pooled = load_balancing_loss(table, k=1).item()
    loss = as_number("text group's balancing loss", loss)
    if math.isclose(float(loss), pooled, rel_tol=1e-4):
        raise Mismatch("that pools text and vision tokens; the text group's loss uses the text tokens only")
    if math.isclose(float(loss), expected["text"].item() / 2, rel_tol=1e-4):
        raise Mismatch("the factor E = 2 is missing")
    expect_close("text group's balancing loss", loss, expected["text"].item(), rel=1e-5)
    return f"Pooled with the vision tokens it would read {pooled:.3f}: the text group's collapse would hide."

"""Exercises of notebook 02 (mixture of experts): one token's share of a layer, the balancing loss, the bias."""

import torch

from ..exercises import Mismatch, as_number, call, exercise, expect_close, expect_equal


@exercise("02.active_per_layer",
          hint="the router weight is (experts x hidden), plus one correction bias per expert; each chosen expert "
               "is a SwiGLU of three hidden x width matrices; 300B-A47B: hidden 8192, 64 experts of width 3584, top-8.")
def active_per_layer(count) -> str:
    from ...model.published import CONFIG_300B_A47B
    from ...model.config import parse_config
    from ...model.moe import MoEBlock

    with torch.device("meta"):
        block = MoEBlock(parse_config(CONFIG_300B_A47B), layer_idx=3)
    router = block.gate.weight.numel() + block.moe_statics.e_score_correction_bias.numel()
    one_expert = sum(p.numel() for p in block.experts[0].parameters())
    expected = router + block.k * one_expert
    if count == block.k * one_expert:
        raise Mismatch("you counted the experts but not the router (weight and correction bias)")
    if count == router + len(block.experts) * one_expert:
        raise Mismatch("that is the whole layer: a token uses only the k = 8 experts it is routed to")
    expect_equal("parameters one token uses in one MoE layer", count, expected)
    total = sum(p.numel() for p in block.parameters())
    return f"{expected:,} of the layer's {total:,} ({expected / total:.0%})."


def _routing_case(seed: int = 3, n: int = 40, e: int = 8, k: int = 2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, e, generator=g) * 1.5
    logits[:, 0] += 1.0                                   # expert 0 popular: the loss is above its minimum
    probs = logits.softmax(-1)                            # (N, E)
    return logits, probs, probs.topk(k, dim=-1).indices   # (N, k)


@exercise("02.switch_loss",
          hint="f_e = (number of tokens that chose expert e) / N, P_e = mean router probability of e over the N "
               "tokens; the loss is E * sum_e f_e * P_e (uniform routing gives k, collapse onto k experts gives E).")
def switch_loss(function) -> str:
    from ...train.losses import load_balancing_loss

    logits, probs, ids = _routing_case()
    got = call(function, probs, ids)
    expected = load_balancing_loss(logits, k=ids.shape[1]).item()
    got = as_number("balancing loss", got)
    if abs(got * ids.shape[1] - expected) < 1e-4:
        raise Mismatch(f"yours is {got:.4f}, k = {ids.shape[1]} times too small: f_e counts tokens, divide by N "
                       "(not by the N k choices)")
    if abs(got * probs.shape[1] - expected) < 1e-4:
        raise Mismatch("the factor E (number of experts) is missing")
    expect_close("balancing loss", got, expected, rel=1e-5)
    return f"Matches ernie_lab.losses.load_balancing_loss: {expected:.4f} (minimum k = {ids.shape[1]})."


def _skewed_moe(seed: int = 0):
    from ...model.config import ErnieConfig
    from ...model.decoder import ErnieForCausalLM
    from ...model.moe import moe_blocks

    torch.manual_seed(seed)
    model = ErnieForCausalLM(ErnieConfig.from_dict(dict(
        model_type="ernie4_5_moe", vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, moe_num_experts=8, moe_k=2,
        moe_intermediate_size=16, moe_num_shared_experts=0, moe_layer_start_index=0))).eval()
    with torch.no_grad():
        for block in moe_blocks(model):
            block.gate.weight.normal_(0.0, 0.3)
            block.gate.weight[:3] *= 4.0                   # three loud router rows: a lopsided load
    return model


def imbalance(model, ids) -> float:
    """Largest expert share x E, averaged over MoE layers: 1 = even, E/k = collapsed."""
    from ...analysis import routing

    with torch.no_grad(), routing.record(model) as rec:
        model(ids)
    shares = rec.load_fraction()                          # (layers, E)
    return (shares.max(-1).values * shares.shape[-1]).mean().item()


@exercise("02.balance_with_bias",
          hint="for each batch: record the routing (`with routing.record(net) as rec: net(ids)`), take "
               "`rec.load_fraction()` (one row per MoE layer) and, per block of `moe_blocks(net)`, add "
               "gamma * sign(mean share - share) to `block.moe_statics.e_score_correction_bias[0]`.")
def balance_with_bias(function) -> str:
    model = _skewed_moe()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 120, (4, 32), generator=g) for _ in range(40)]
    held_out = torch.randint(0, 120, (8, 32), generator=g)
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = imbalance(model, held_out)
    result = function(model, batches, gamma=0.002)    # small steps: the bias adds to probabilities ~1/8
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(before_params[n], p))
    if not changed and result is None:
        from ..exercises import NotAttempted
        raise NotAttempted
    wrong = [n for n in changed if "e_score_correction_bias" not in n]
    if wrong:
        raise Mismatch(f"only the correction bias may change, but these changed too: {wrong[:4]}")
    after = imbalance(model, held_out)
    if after > before:
        raise Mismatch(f"the imbalance grew from {before:.2f} to {after:.2f}: raise the bias of the experts "
                       "that get *less* than the mean share, lower it for those that get more")
    if not after < 0.9 * before:
        raise Mismatch(f"the imbalance barely moved ({before:.2f} -> {after:.2f}); does every batch update the bias "
                       "of every MoE layer?")
    return f"Imbalance {before:.2f} -> {after:.2f} with the weights untouched: no loss term needed."

"""Solutions to notebook 09's exercises, with the reasoning.

09.more_experts: doubling 300B-A47B's experts adds, in each of the 51 MoE layers, 64 experts (three
  hidden x width matrices each) AND 64 router rows (a weight row of width hidden plus one correction bias):
  the router grows with the number of experts too. Active parameters barely move (only the router rows).
09.conversations: what is left of 4 x 80 GiB after the int4 weights (at 90% usable memory), divided by one
  32K-token conversation's KV cache (K and V, 54 layers, 8 KV heads of width 128, bf16), rounded DOWN:
  a conversation that does not fit whole cannot be served.
09.dedup_degree: de-duplicated all-to-all sends a token once per device that holds any of its k experts;
  the saving shrinks as experts spread over more devices (fewer of a token's experts share one).
09.int8_rtn: one scale per output row (a row's outliers then cost only that row its precision), round to the
  nearest integer (truncation biases every weight towards zero), clamp to the symmetric grid [-127, 127],
  and clamp the scale away from zero so a pruned (all-zero) row stays zero instead of 0/0 = NaN.
09.layer_damage: quantize one layer at a time, measure, and put the original weight back; otherwise each
  measurement includes the damage of every layer before it. The damage must be measured by running the
  model: the largest |w| of a layer says nothing about how its outputs move.
"""

import math

import torch

from ernie_lab import family as F
from ernie_lab.model.linears import linear_names

hidden, width, moe_layers = 8192, 3584, 51
extra_experts = 64 * moe_layers * 3 * hidden * width          # gate, up, down of 64 more experts per layer
extra_router = 64 * moe_layers * (hidden + 1)                 # 64 more router rows + correction biases
more_experts = F.count_params(F.CONFIG_300B_A47B).total + extra_experts + extra_router

free = 4 * 80 * F.GIB * 0.9 - F.weight_bytes(F.CONFIG_300B_A47B, "int4")
per_conversation = 2 * 54 * 8 * 128 * 2 * 32768               # K and V, layers, KV heads, head_dim, bf16
conversations = int(free // per_conversation)

E, k = 64, 6


def saving(n):
    naive = k * (n - 1) / n
    dedup = (n - 1) * (1 - math.comb(E - E // n, k) / math.comb(E, k))
    return 1 - dedup / naive


dedup_degree = max(n for n in (2, 4, 8, 16, 32, 64) if saving(n) > 0.30)


def int8_rtn(weight):                            # (out, in) -> (out, in), on the int8 grid of each row
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


@torch.no_grad()
def layer_damage(model, ids, quantize):
    reference = model(ids).logits
    damage = {}
    for name in linear_names(model):
        linear = model.get_submodule(name)
        original = linear.weight.detach().clone()
        linear.weight.copy_(quantize(original))
        damage[name] = (model(ids).logits - reference).abs().max().item()
        linear.weight.copy_(original)
    return damage


SOLUTIONS = {
    "09.more_experts": (more_experts,),
    "09.conversations": (conversations,),
    "09.dedup_degree": (dedup_degree,),
    "09.int8_rtn": (int8_rtn,),
    "09.layer_damage": (layer_damage,),
}


def _per_tensor(weight):                         # one scale for the matrix: small rows round to zero
    scale = weight.abs().max() / 127
    return (weight / scale).round() * scale


def _truncate(weight):                           # truncation pulls every weight towards zero
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scale).trunc() * scale


@torch.no_grad()
def _forgets_to_restore(model, ids, quantize):
    for name in linear_names(model):
        model.get_submodule(name).weight.copy_(quantize(model.get_submodule(name).weight))
    return {name: 1.0 if name == "layers.1.mlp.down_proj" else 0.0 for name in linear_names(model)}


@torch.no_grad()
def _largest_weight(model, ids, quantize):       # the shortcut: never runs the model
    return {name: model.get_submodule(name).weight.abs().max().item() for name in linear_names(model)}


@torch.no_grad()
def _all_at_once(model, ids, quantize):          # every earlier layer stays quantized while the next is measured
    reference = model(ids).logits
    originals = {name: model.get_submodule(name).weight.detach().clone() for name in linear_names(model)}
    damage = {}
    for name in linear_names(model):
        model.get_submodule(name).weight.copy_(quantize(originals[name]))
        damage[name] = (model(ids).logits - reference).abs().max().item()
    for name, weight in originals.items():
        model.get_submodule(name).weight.copy_(weight)
    return damage


@torch.no_grad()
def _mean_change(model, ids, quantize):          # the average change hides the worst token
    reference = model(ids).logits
    damage = {}
    for name in linear_names(model):
        linear = model.get_submodule(name)
        original = linear.weight.detach().clone()
        linear.weight.copy_(quantize(original))
        damage[name] = (model(ids).logits - reference).abs().mean().item()
        linear.weight.copy_(original)
    return damage


def _no_clamp(weight):                           # a row of zeros gives 0 / 0 = NaN
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


def _per_column(weight):                         # one scale per input column: the wrong axis
    scale = weight.abs().amax(dim=0, keepdim=True).clamp(min=1e-12) / 127
    return (weight / scale).round().clamp(-127, 127) * scale


WRONG = {
    "09.more_experts": [(more_experts - extra_router,), (more_experts + extra_experts + extra_router,)],
    "09.conversations": [(conversations + 1,)],
    "09.dedup_degree": [(2,), (64,)],
    "09.int8_rtn": [{"answers": (_per_tensor,), "says": "one scale for the whole matrix"},
                    {"answers": (_truncate,), "says": "truncated towards zero"},
                    {"answers": (_no_clamp,), "says": "clamp the scale away from zero"}, (_per_column,),
                    (lambda weight: weight,)],
    "09.layer_damage": [{"answers": (_forgets_to_restore,), "says": "put every weight back"},
                        (_largest_weight,), (_all_at_once,), (_mean_change,),
                        (lambda model, ids, quantize: {"lm_head": 1.0},),
                        (lambda model, ids, quantize: "layers.1.mlp.down_proj",)],
}

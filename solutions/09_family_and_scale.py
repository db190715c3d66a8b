"""Solutions to notebook 09's exercises."""

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


def _per_tensor(weight):
    scale = weight.abs().max() / 127
    return (weight / scale).round() * scale


def _truncate(weight):
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    return (weight / scale).trunc() * scale


@torch.no_grad()
def _forgets_to_restore(model, ids, quantize):
    for name in linear_names(model):
        model.get_submodule(name).weight.copy_(quantize(model.get_submodule(name).weight))
    return {name: 1.0 if name == "layers.1.mlp.down_proj" else 0.0 for name in linear_names(model)}


WRONG = {
    "09.more_experts": [(more_experts - extra_router,), (more_experts + extra_experts + extra_router,)],
    "09.conversations": [(conversations + 1,)],
    "09.dedup_degree": [(2,), (64,)],
    "09.int8_rtn": [(_per_tensor,), (_truncate,)],
    "09.layer_damage": [(_forgets_to_restore,), (lambda model, ids, quantize: {"lm_head": 1.0},),
                        (lambda model, ids, quantize: "layers.1.mlp.down_proj",)],
}

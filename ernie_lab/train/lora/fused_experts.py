"""peft's LoRA of fused MoE experts <-> the kit's per-expert LoRAs (one rank-r LoRA per projection).

transformers 5 keeps one group's E experts as two 3-D parameters, ``gate_up_proj`` (E, 2I, H) and
``down_proj`` (E, H, I). peft adapts such a parameter with one ``ParamWrapper`` (``target_parameters``)
whose two factors hold every expert, rank R each:

    A  (E*R, in)     expert e's rows      e*R, e*R+1, ..., e*R+R-1
    B  (out, R*E)    expert e's columns   e, E+e, 2E+e, ...          (rank index major, expert minor)
    W_e' = W_e + (alpha / R) * B_e @ A_e

The kit's gate and up LoRAs of one expert (rank r, same alpha) are one rank-2r LoRA of ``gate_up_proj``
(gate's rows on top: transformers splits the fused output with ``chunk(2)``, gate first):

    A_e = [A_gate; A_up]   (2r, H)        B_e = [[B_gate, 0], [0, B_up]]   (2I, 2r)

saved with ``rank_pattern`` 2r and ``alpha_pattern`` 2*alpha, so the scale stays alpha / r. Reading back,
when every expert's B_e is block-diagonal (the kit's layout) they are split into the two rank-r LoRAs
again; otherwise (peft trains B_e whole) gate and up each get the whole rank-2r A_e and their half of B_e's
rows. Both are the same update, exactly. (An untrained peft adapter, B = 0, counts as block-diagonal: it
loads as rank-r gate and up LoRAs, with fewer trainable numbers than peft's rank-2r one.)

ERNIE 4.5 VL's twist: each MoE layer has two such groups (``text_moe`` then ``vision_moe``, the kit's
experts 0..E-1 and E..2E-1) and peft does not rewrite per-expert names for this model (it does for the
text MoE), so the kit writes the fused layout itself. Only what peft's layout can hold is written: a
group's projection adapted in all E experts or in none, gate and up together.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple

import torch
from torch import nn

from ...errors import CheckpointError, ConfigError, InputError
from ...model.moe import MoEBlock

GROUPS = ("text_moe", "vision_moe")                      # transformers' VL expert groups, in the kit's order
VL_EXPERTS_PATH = "model.language_model.layers.{i}.mlp.{group}.experts"   # transformers' VL module path
FUSED_EXPERTS = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(?:(text_moe|vision_moe)\.)?experts(?:\.base_layer)*$")
GATE_UP_PATTERN = "experts.gate_up_proj"                 # rank_pattern / alpha_pattern key of the fused gate/up


class FusedLoRA(NamedTuple):
    """One peft ParamWrapper's adapter: ``path`` (peft module path), ``target`` (its target_parameters
    entry), A (E*R, in), B (out, R*E), and the kit layers it holds."""
    path: str
    target: str
    A: torch.Tensor
    B: torch.Tensor
    kit_names: tuple[str, ...]


# ----------------------------------------------------------------------------------- the layout
def stack_experts(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """E per-expert factors A_e (R, in), B_e (out, R) -> peft's A (E*R, in), B (out, R*E)."""
    A = torch.cat(As, 0)                                  # (E*R, in)
    B = torch.stack(Bs, -1)                               # (out, R, E)
    return A, B.flatten(1)                                # (out, R*E)


def unstack_experts(A: torch.Tensor, B: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's A (E*R, in), B (out, R*E) -> A (E, R, in), B (E, out, R): the inverse of stack_experts."""
    return A.reshape(E, -1, A.shape[-1]), B.reshape(B.shape[0], -1, E).permute(2, 0, 1)


def fuse_gate_up(gate: nn.Module, up: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's gate and up LoRAs (rank r) -> A (2r, H) and block-diagonal B (2I, 2r) of gate_up_proj."""
    A = torch.cat([gate.lora_A.weight, up.lora_A.weight], 0)           # (2r, H)
    B = torch.block_diag(gate.lora_B.weight, up.lora_B.weight)         # (2I, 2r)
    return A, B


def block_diagonal(B: torch.Tensor) -> bool:
    """B (2I, R) of one expert's gate_up_proj is [[B_gate, 0], [0, B_up]] with R/2 columns each."""
    I, R = B.shape[0] // 2, B.shape[1]
    return R % 2 == 0 and not B[:I, R // 2:].any() and not B[I:, :R // 2].any()


def split_gate_up(A: torch.Tensor, B: torch.Tensor, halve: bool) -> tuple[tuple, tuple]:
    """A (R, H), B (2I, R) of one expert's gate_up_proj -> gate (A, B), up (A, B).

    ``halve`` (B block-diagonal): rank R/2 each, their own halves of A; else both keep the whole A."""
    I, r = B.shape[0] // 2, B.shape[1] // 2
    if halve:
        return (A[:r], B[:I, :r]), (A[r:], B[I:, r:])
    return (A, B[:I]), (A.clone(), B[I:])


# ----------------------------------------------------------------------------------- saving
def moe_blocks_by_name(model: nn.Module) -> dict[str, MoEBlock]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MoEBlock)}


def has_expert_groups(model: nn.Module) -> bool:
    """A VL model: MoE blocks with text and vision expert groups (fused per group in transformers)."""
    return any(block.num_groups > 1 for block in moe_blocks_by_name(model).values())


def fused_adapters(model: nn.Module, layers: dict) -> list[FusedLoRA]:
    """The VL routed experts' LoRAs in peft's fused layout, one entry per adapted 3-D parameter.

    When a group has both parameters adapted, peft nests its wrappers: ``gate_up_proj`` inside
    (``experts.base_layer``), ``down_proj`` outside (``experts``)."""
    if not has_expert_groups(model):
        return []
    fused = []
    for block_name, block in moe_blocks_by_name(model).items():
        for group in range(block.num_groups):
            path = VL_EXPERTS_PATH.format(i=block.layer_idx, group=GROUPS[group])
            experts = [f"{block_name}.experts.{group * block.num_experts + e}" for e in range(block.num_experts)]
            found = [_group_parameter(experts, layers, param) for param in ("gate_up_proj", "down_proj")]
            nested = all(found)
            for param, adapted in zip(("gate_up_proj", "down_proj"), found):
                if adapted:
                    inner = nested and param == "gate_up_proj"
                    fused.append(FusedLoRA(path + ".base_layer" * inner, f"{GROUPS[group]}.experts.{param}",
                                           *_fuse(experts, layers, param), kit_names=adapted))
    return fused


def _group_parameter(experts: list[str], layers: dict, param: str) -> tuple[str, ...]:
    """The kit layers one fused parameter of a group holds; () if none is adapted; refuses a partial set."""
    kinds = ("gate_proj", "up_proj") if param == "gate_up_proj" else ("down_proj",)
    names = tuple(f"{expert}.{kind}" for expert in experts for kind in kinds)
    adapted = [n for n in names if n in layers]
    if adapted and len(adapted) < len(names):
        lacking = next(n for n in names if n not in layers)
        raise InputError(
            f"{adapted[0]!r} has a LoRA but {lacking!r} has none. transformers fuses this expert group's "
            f"{' and '.join(kinds)} of all {len(experts)} experts into one parameter ({param}), and peft adapts it "
            f"whole, so the adapter cannot be saved in peft's format: adapt all of the group's experts (gate_proj "
            f"and up_proj together), e.g. apply_lora(model, target_modules=lora.LORA_TARGETS['VL routed experts'].kit).")
    return tuple(adapted)


def _fuse(experts: list[str], layers: dict, param: str) -> tuple[torch.Tensor, torch.Tensor]:
    if param == "down_proj":
        factors = [(layers[f"{e}.down_proj"].lora_A.weight, layers[f"{e}.down_proj"].lora_B.weight) for e in experts]
    else:
        factors = [fuse_gate_up(layers[f"{e}.gate_proj"], layers[f"{e}.up_proj"]) for e in experts]
    A, B = stack_experts([a for a, _ in factors], [b for _, b in factors])
    return A.detach().cpu().contiguous(), B.detach().cpu().contiguous()


# ----------------------------------------------------------------------------------- loading
def is_fused_experts(hub_module: str) -> bool:
    """``model.layers.1.mlp.experts`` (text MoE) or ``...mlp.vision_moe.experts.base_layer`` (VL)."""
    return FUSED_EXPERTS.search(hub_module) is not None


def split_fused_experts(model: nn.Module, hub: str, A: torch.Tensor, B: torch.Tensor,
                        alpha_of: Callable[[str], float], folder) -> dict:
    """peft's LoRA of one fused expert parameter -> {kit layer: (A (r, in), B (out, r), r, alpha)}.

    The parameter (gate_up_proj or down_proj) is told by the shapes; ``alpha_of(path)`` is the config's
    lora_alpha / alpha_pattern for ``<experts path>.<parameter>``."""
    block_name, block, group = _block_of(model, hub, folder)
    E, expert = block.num_experts, block.experts[group * block.num_experts]
    H, I = expert.gate_proj.in_features, expert.gate_proj.out_features
    fan_in, fan_out = A.shape[-1], B.shape[0]
    if (fan_in, fan_out) not in ((H, 2 * I), (I, H)):
        raise CheckpointError(f"{folder}: {hub!r} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} fit neither the "
                              f"fused gate_up_proj ({H} -> {2 * I}) nor down_proj ({I} -> {H}) of these experts.")
    if A.shape[0] % E or B.shape[1] != A.shape[0]:
        raise CheckpointError(f"{folder}: {hub!r} has {A.shape[0]} LoRA rows, not a multiple of the {E} experts.")
    param = "gate_up_proj" if (fan_in, fan_out) == (H, 2 * I) else "down_proj"
    alpha = alpha_of(re.sub(r"(\.base_layer)+$", "", hub) + f".{param}")
    R = A.shape[0] // E
    As, Bs = unstack_experts(A, B, E)                     # (E, R, in), (E, out, R)
    halve = param == "gate_up_proj" and all(block_diagonal(b) for b in Bs)   # the kit's own layout
    r, a = (R // 2, alpha / 2) if halve else (R, alpha)  # the same scale alpha / R
    out = {}
    for e in range(E):
        name = f"{block_name}.experts.{group * E + e}"
        if param == "down_proj":
            out[f"{name}.down_proj"] = (As[e], Bs[e].contiguous(), R, alpha)
            continue
        gate, up = split_gate_up(As[e], Bs[e], halve)
        out[f"{name}.gate_proj"] = (gate[0].contiguous(), gate[1].contiguous(), r, a)
        out[f"{name}.up_proj"] = (up[0].contiguous(), up[1].contiguous(), r, a)
    return out


def _block_of(model: nn.Module, hub: str, folder) -> tuple[str, MoEBlock, int]:
    """(kit block name, block, group) of a fused experts path; a ConfigError if this model has no such group."""
    match = FUSED_EXPERTS.search(hub)
    layer, group = int(match.group(1)), GROUPS.index(match.group(2)) if match.group(2) else 0
    for name, block in moe_blocks_by_name(model).items():
        if block.layer_idx == layer and group < block.num_groups:
            return name, block, group
    raise ConfigError(f"{folder}: {hub!r} adapts the experts of layer {layer}"
                      f"{f' ({match.group(2)})' if match.group(2) else ''}, which is not an MoE layer of this model "
                      f"(or has no such expert group); was the adapter made for another base model?")

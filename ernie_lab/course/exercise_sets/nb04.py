"""Exercises of notebook 04 (multimodal MoE): the modality-isolated MoE block, 3-D positions of a chat with
pictures, the text group's balancing loss, the vision experts' weight.

The judges draw fresh inputs on every call: random weights, token-type masks and prompt layouts at two
sizes, compared with ``ernie_lab`` (``moe.MoEBlock``, ``rope3d.position_ids_3d``,
``losses.modality_balancing_losses``) and with ``transformers``' Ernie4_5_VLMoe classes on the same weights.
A diagnosis names a mistake only when the answer equals that mistake's output on the same inputs.
"""

import functools
import itertools
import math
from types import SimpleNamespace

import torch

from ...analysis import family as F
from ...model.moe import MoEBlock, dispatch, route
from ...model.rope import apply_rope
from ...model.rope3d import position_ids_3d, rope_angles_3d, vision_block_positions
from ..exercises import (Mismatch, as_number, call, exercise, expect_close, expect_equal, expect_tensor,
                         draw_int, fresh_generator, name_the_mistake, switched_off)


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


# ================================================================================ the modality-isolated MoE block
def random_vl_block(g: torch.Generator, hidden: int, experts: int, k: int, widths: tuple[int, int],
                    shared: int) -> MoEBlock:
    """A two-group MoE block (text experts, then narrower vision experts) with every weight drawn from `g`,
    and correction biases large enough to change some tokens' choice of experts."""
    from ...model.config import ErnieConfig

    config = ErnieConfig.from_dict(dict(
        model_type="ernie4_5_moe", vocab_size=32, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1, head_dim=8, moe_num_experts=experts,
        moe_k=k, moe_intermediate_size=widths[0], moe_num_shared_experts=shared, moe_layer_start_index=0))
    block = MoEBlock(config, 0, group_widths=widths).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        bias = block.moe_statics.e_score_correction_bias                          # (2, E)
        bias.copy_((torch.rand(bias.shape, generator=g) - 0.5) * 0.3)
    return block


def reference_vl_block(block: MoEBlock):
    """transformers' Ernie4_5_VLMoeMoeBlock holding the same weights as `block` (it fuses gate and up)."""
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import Ernie4_5_VLMoeMoeBlock

    widths = [block.group_experts(g)[0].up_proj.out_features for g in (0, 1)]
    shared = block.shared_experts.up_proj.out_features // widths[0] if block.shared_experts is not None else 0
    config = Ernie4_5_VLMoeConfig(text_config=dict(
        hidden_size=block.routers[0].in_features, moe_intermediate_size=widths, moe_k=block.k,
        moe_num_experts=block.num_experts, moe_num_shared_experts=shared, moe_norm_min=block.norm_min)).text_config
    config._experts_implementation = "eager"
    reference = Ernie4_5_VLMoeMoeBlock(config).eval()
    with torch.no_grad():
        for group, moe in enumerate((reference.text_moe, reference.vision_moe)):
            experts = block.group_experts(group)
            moe.gate.weight.copy_(block.routers[group].weight)                                 # (E, H)
            moe.gate.moe_statics.e_score_correction_bias.copy_(block.moe_statics.e_score_correction_bias[group:group + 1])
            moe.experts.gate_up_proj.copy_(torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight])
                                                        for e in experts]))                   # (E, 2I, H)
            moe.experts.down_proj.copy_(torch.stack([e.down_proj.weight for e in experts]))   # (E, H, I)
        if block.shared_experts is not None:
            reference.shared_experts.load_state_dict(block.shared_experts.state_dict())
    return reference


def moe_variant(block: MoEBlock, x: torch.Tensor, is_vision: torch.Tensor, *, isolate: bool = True,
                swap: bool = False, shared: bool = True, bias: bool = True, bias_in_weights: bool = False,
                renormalise: bool = True) -> torch.Tensor:
    """The block's output (N, H) with one of the mistakes students make switched on (all off: the right one)."""
    groups = is_vision.long() if isolate else torch.zeros_like(is_vision, dtype=torch.long)
    if swap:
        groups = 1 - groups
    y = torch.zeros_like(x)
    for group in (0, 1):
        rows = groups == group
        if not bool(rows.any()):
            continue
        correction = block.moe_statics.e_score_correction_bias[group]
        probs, ids, weights = route(block.routers[group](x[rows]), block.k, block.norm_min,
                                    correction if bias else None)                  # (n, E), (n, k), (n, k)
        if bias_in_weights or not renormalise:
            scores = probs + correction if bias_in_weights else probs
            weights = scores.gather(-1, ids)
            weights = weights / weights.sum(-1, keepdim=True) if renormalise else weights
        y[rows] = dispatch(x[rows], ids, weights, block.group_experts(group))
    if shared and block.shared_experts is not None:
        y = y + block.shared_experts(x)
    return y


MOE_MISTAKES = {
    "every token goes through the text experts: route vision tokens with the vision router among the vision "
    "experts (group 1)": dict(isolate=False),
    "text and vision groups are swapped: text tokens belong to group 0 (routers[0], experts 0..E-1)": dict(swap=True),
    "the shared experts are missing: add block.shared_experts(x) for every token": dict(shared=False),
    "the correction bias is ignored: it decides which k experts are chosen (top-k of p + b)": dict(bias=False),
    "the correction bias leaks into the mixing weights: it only chooses the experts, the weights come from p alone":
        dict(bias_in_weights=True),
    "the k weights are not renormalised to sum to 1": dict(renormalise=False),
}


@exercise("04.modality_moe",
          hint="for group 0 (text tokens) and group 1 (vision tokens) separately: p = softmax(block.routers[g](x_g)); "
               "choose top-k of p + block.moe_statics.e_score_correction_bias[g]; weights = the chosen p / their sum; "
               "y_g = sum_j w_j block.group_experts(g)[e_j](x_g); put y_g back in the group's rows; add "
               "block.shared_experts(x) for every token.")
def modality_moe(function) -> str:
    g = fresh_generator()
    for hidden, experts, k, widths, shared, n in ((16, 4, 2, (12, 6), 1, 9), (24, 6, 3, (20, 8), 2, 14)):
        block = random_vl_block(g, hidden, experts, k, widths, shared)
        x = torch.randn(n, hidden, generator=g)                                    # (N, H)
        is_vision = torch.rand(n, generator=g) < 0.5
        is_vision[:2] = torch.tensor([False, True])                                # both groups always present
        with torch.no_grad():
            expected = block(x[None], is_vision[None].long()).hidden[0]            # (N, H) ernie_lab
            reference = reference_vl_block(block)(x[None], is_vision[None].long())[0][0]   # (N, H) transformers
            mistakes = {says: moe_variant(block, x, is_vision, **how) for says, how in MOE_MISTAKES.items()}
        student_block = switched_off(block, "call its routers, experts and shared experts yourself")
        got = call(function, x, is_vision, student_block)
        name_the_mistake(got, expected, mistakes, atol=1e-4)
        expect_tensor(f"MoE output ({n} tokens, {int(is_vision.sum())} of them vision)", got, expected, atol=1e-4)
        expect_tensor("MoE output against transformers' Ernie4_5_VLMoeMoeBlock", got, reference, atol=1e-4)
    return ("Equal to ernie_lab's MoEBlock and transformers' Ernie4_5_VLMoeMoeBlock: text and picture tokens "
            "never share a routed expert, only the shared ones.")


# ================================================================================ 3-D positions of a chat
TEXT, IMAGE, VIDEO = 0, 1, 2
THETA = 500_000.0


def random_layout(g: torch.Generator, pictures: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token types (1, T) of a chat: text runs with pictures between them (images of grid (1, 2a, 2b), a video
    of grid (2c, 2a, 2b): two frames make one time step), and the grids of each kind in order of appearance."""
    types, grids = [TEXT] * draw_int(g, 1, 4), {IMAGE: [], VIDEO: []}
    kinds = [VIDEO] + [IMAGE] * (pictures - 1)                                     # one video, then images
    for kind in [kinds[i] for i in torch.randperm(pictures, generator=g).tolist()]:
        a, b = draw_int(g, 1, 4), draw_int(g, 1, 4)
        if a == b:
            b += 1                                                                 # a non-square picture
        frames = 2 * draw_int(g, 2, 3) if kind == VIDEO else 1   # two or three frame pairs
        grids[kind].append([frames, 2 * a, 2 * b])
        types += [kind] * (max(frames // 2, 1) * a * b) + [TEXT] * draw_int(g, 1, 3)      # markers and text after it
    as_grid = lambda rows: torch.tensor(rows, dtype=torch.long).reshape(-1, 3)    # noqa: E731
    return torch.tensor([types]), as_grid(grids[IMAGE]), as_grid(grids[VIDEO])


@functools.lru_cache(maxsize=1)
def _reference_rope_index():
    """transformers' own get_rope_index and text rotary (default VL-28B config: merges 2 x 2 and 2 frames)."""
    from transformers import Ernie4_5_VLMoeConfig
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import (
        Ernie4_5_VLMoeModel, Ernie4_5_VLMoeTextRotaryEmbedding)

    config = Ernie4_5_VLMoeConfig(text_config=dict(rope_parameters={"rope_type": "default", "rope_theta": THETA}))
    # get_rope_index reads only the merge sizes from self.config and calls get_vision_position_ids:
    # run it on a stand-in instead of building a whole model
    stand_in = SimpleNamespace(config=config)
    stand_in.get_vision_position_ids = functools.partial(Ernie4_5_VLMoeModel.get_vision_position_ids, stand_in)
    index = functools.partial(Ernie4_5_VLMoeModel.get_rope_index, stand_in)
    return index, Ernie4_5_VLMoeTextRotaryEmbedding(config.text_config)


def rotate_3d_reference(q, types, image_grids, video_grids):
    """q (1, heads, T, 128) rotated by transformers' 3-D positions and rotary; and those positions (3, 1, T)."""
    from transformers.models.ernie4_5_vl_moe.modeling_ernie4_5_vl_moe import apply_rotary_pos_emb

    index, rotary = _reference_rope_index()
    positions, _ = index(types, types, image_grids if len(image_grids) else None,
                         video_grids if len(video_grids) else None)
    rotated, _ = apply_rotary_pos_emb(q, q, *rotary(q, positions))
    return rotated, positions


def positions_variant(types: torch.Tensor, image_grids, video_grids, *, advance: str = "longer side",
                      time_pairs: bool = True, offset_block: bool = True) -> torch.Tensor:
    """(3, 1, T) positions with one mistake: text advancing by the picture's token count or its unmerged side,
    video frames not paired on the time axis, or a picture's rows and columns not offset by its start."""
    grids = {IMAGE: iter(image_grids.tolist()), VIDEO: iter(video_grids.tolist())}
    pieces, start = [], 0
    for kind, run in itertools.groupby(types[0].tolist()):
        n = len(list(run))
        if kind == TEXT:
            pieces.append(torch.arange(start, start + n).expand(3, n))
            start += n
            continue
        t, h, w = next(grids[kind])
        block = vision_block_positions(start if offset_block else 0, (t, h, w), 2 if kind == VIDEO else 1)
        if not time_pairs:                                   # time counted in frames: 0, 2, 4, ... per pair
            block[0] = 2 * block[0] - (start if offset_block else 0)
        pieces.append(block)                                 # (3, n)
        start += {"longer side": max(h, w) // 2, "tokens": n, "unmerged side": max(h, w)}[advance]
    return torch.cat(pieces, dim=1)[:, None]


POSITION_MISTAKES = {
    "every token counts one position (1-D text positions): a picture's tokens share a grid of (t, h, w) "
    "positions": "one_d",
    "the text after a picture continues one past the picture's *token count*; it continues at start + "
    "max(H, W) / 2 (the merged grid's longer side)": dict(advance="tokens"),
    "the text after a picture continues at start + max(H, W) of the patch grid; the adapter merged 2 x 2 "
    "patches, so the merged grid's side is max(H, W) / 2": dict(advance="unmerged side"),
    "a video's frames are merged in pairs: its time position grows by one per pair of frames, not by two": dict(
        time_pairs=False),
    "a picture's rows and columns start at 0; they start at the picture's start position p (h = p + row, "
    "w = p + column)": dict(offset_block=False),
}


@exercise("04.rotate_3d",
          hint="walk the runs of equal token types: text of length n takes positions p .. p+n-1 on all three axes; "
               "a picture of grid (T, H, W) that starts at p gives its tokens t = p + frame // 2 (an image: p), "
               "h = p + row, w = p + column over the merged (H/2) x (W/2) grid, and the next token starts at "
               "p + max(H, W) / 2; then `rotate(q, positions)`.")
def rotate_3d(function) -> str:
    g = fresh_generator()
    for pictures, heads in ((2, 1), (3, 2)):
        types, image_grids, video_grids = random_layout(g, pictures)
        q = torch.randn(1, heads, types.shape[1], 128, generator=g)               # (1, heads, T, 128)
        reference, positions = rotate_3d_reference(q, types, image_grids, video_grids)
        kit, _ = position_ids_3d(types, image_grids, video_grids)                  # (3, 1, T)
        if not torch.equal(kit, positions):
            raise RuntimeError("ernie_lab's position_ids_3d and transformers' get_rope_index disagree")
        expected = apply_rope(q, *rope_angles_3d(positions, 128, THETA))
        mistakes = {says: apply_rope(q, *rope_angles_3d(
            torch.arange(types.shape[1]).expand(3, 1, -1) if how == "one_d"
            else positions_variant(types, image_grids, video_grids, **how), 128, THETA))
            for says, how in POSITION_MISTAKES.items()}
        got = call(function, q, types, image_grids, video_grids)
        name_the_mistake(got, expected, mistakes, atol=1e-4)
        label = (f"rotated queries of a chat with {len(image_grids)} image(s) {image_grids.tolist()} and a video "
                 f"{video_grids.tolist()}, {types.shape[1]} tokens")
        expect_tensor(label, got, expected, atol=1e-4)
        expect_tensor(label + " against transformers (get_rope_index + its rotary)", got, reference, atol=1e-4)
    return "Your positions equal transformers' get_rope_index and ernie_lab's rope3d.position_ids_3d."


# ================================================================================ the text group's balancing loss
def _routing_case(g: torch.Generator, n: int, experts: int, collapse: bool):
    """(N, E) router probabilities and (N,) vision flags; with `collapse` the text tokens pile on expert 0."""
    logits = torch.randn(n, experts, generator=g) * 1.5
    is_vision = torch.rand(n, generator=g) < 0.6
    is_vision[:3] = torch.tensor([False, False, True])
    if collapse:
        logits[~is_vision, 0] += 4.0
    return logits.softmax(-1), is_vision


def _switch(probs: torch.Tensor, k: int) -> float:
    """E sum_e f_e P_e over the rows of probs (ernie_lab.losses.load_balancing_loss, which takes logits)."""
    from ...train.losses import load_balancing_loss

    return load_balancing_loss(probs.log(), k=k).item() if len(probs) else 0.0


@exercise("04.text_balance_loss",
          hint="keep the text rows only (probs[~is_vision]); f_e = share of those tokens whose top-k holds e, "
               "P_e = their mean probability of e; L = E * sum_e f_e P_e (uniform gives k, collapse gives E).")
def text_balance_loss(function) -> str:
    from ...train.losses import modality_balancing_losses

    g = fresh_generator()
    remarks = []
    for n, experts, k, collapse in ((12, 4, 1, True), (30, 6, 2, False), (21, 8, 2, True)):
        probs, is_vision = _routing_case(g, n, experts, collapse)
        expected = modality_balancing_losses([probs.log()], is_vision.long(), k=k)["text"].item()
        wrong = {"that pools text and vision tokens; the text group's loss uses the text tokens only":
                 _switch(probs, k),
                 "that is the vision group's loss: keep the rows where is_vision is False": _switch(probs[is_vision], k),
                 "the factor E (number of experts) is missing": expected / experts,
                 f"yours is k = {k} times too small: f_e is the share of *tokens* that chose e (divide by the number "
                 "of text tokens, not by their k choices)": expected / k}
        got = as_number(f"text group's balancing loss ({n} tokens, E = {experts}, k = {k})",
                        call(function, probs, is_vision, k))
        if not math.isclose(got, expected, rel_tol=1e-5):
            for says, value in wrong.items():
                if math.isclose(got, value, rel_tol=1e-5):
                    raise Mismatch(says)
        expect_close(f"text group's balancing loss ({n} tokens, E = {experts}, k = {k})", got, expected, rel=1e-5)
        remarks.append(f"{expected:.3f} (pooled {_switch(probs, k):.3f})")
    return "Text loss " + ", ".join(remarks) + ": pooled with the vision tokens, a collapsed text group hides."

"""Exercises of notebook 06 (routing by modality): a routing record from forward hooks, and the normalised
mutual information behind specialisation.

``06.record_routing``: the student hooks every MoE block of a model, runs one forward pass and returns a
``RoutingRecord``. The judge builds fresh micro models on every call (a text MoE whose first MoE layer is
drawn, and a vision-language MoE with a text and a vision expert group, fed fresh pixels), with non-zero
correction biases (one expert per group pushed up, so choosing without the bias gives other experts),
at several batch sizes and lengths, and compares the answer with ``analysis.routing.record`` on the same
model and inputs. It then checks that no hook is left on the model, also after a forward pass that
raises. A mistake is named only when the answer equals that mistake's output on the same inputs.

``06.nmi``: the judge draws fresh count tables (experts x labels) at several shapes on every call, with the
edge cases a shortcut gets wrong: empty rows and columns (0 log 0 = 0), an expert that names its label
(NMI 1), and compares with ``analysis.routing.information``, the kit's own numbers.
"""

import contextlib

import torch
from torch import nn

from ...analysis import routing
from ...analysis.routing import LayerRouting, RoutingRecord, information
from ...model.config import ErnieConfig, VLConfig
from ...model.decoder import ErnieForCausalLM
from ...model.moe import moe_blocks
from ...model.vl_model import ErnieVLForConditionalGeneration
from ..exercises import Mismatch, call, copied, describe, exercise, expect_tensor, fresh_generator

# ================================================================================ 06.record_routing
VOCAB = 64
IMAGE_IDS = dict(image_start_token_id=58, image_end_token_id=59, image_token_id=60, video_token_id=61,
                 video_start_token_id=62, video_end_token_id=63)


def kit_record_routing(model: nn.Module, inputs: dict) -> RoutingRecord:
    """The kit's answer: ``routing.record`` around one forward pass ``model(**inputs)``."""
    with torch.no_grad(), routing.record(model) as rec:
        model(**inputs)
    return rec


def _seed(g) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=g))


def _spread_routers(model: nn.Module, g) -> nn.Module:
    """Routers N(0, 1) so tokens route apart; correction biases U(-0.1, 0.1) with one expert per group
    pushed up by 0.5, so that the biased choice differs from the unbiased one for most tokens."""
    with torch.no_grad():
        for block in moe_blocks(model):
            for router in block.routers:
                router.weight.normal_(0.0, 1.0, generator=g)
            bias = block.moe_statics.e_score_correction_bias                    # (groups, E)
            bias.uniform_(-0.1, 0.1, generator=g)
            favoured = torch.randint(0, block.num_experts, (bias.shape[0],), generator=g)
            bias[torch.arange(bias.shape[0]), favoured] += 0.5
    return model.eval()


def _text_case(g, experts: int, batch: int, length: int):
    """A fresh text MoE (its first MoE layer drawn: 1 or 2 dense layers before it) and random ids."""
    start = int(torch.randint(1, 3, (1,), generator=g))
    config = ErnieConfig.from_dict(dict(
        model_type="ernie4_5_moe", vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=start + 2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, moe_num_experts=experts, moe_k=2,
        moe_intermediate_size=8, moe_num_shared_experts=1, moe_layer_start_index=start))
    model = _spread_routers(ErnieForCausalLM(config).init_weights(std=0.5, seed=_seed(g)), g)
    ids = torch.randint(0, VOCAB - len(IMAGE_IDS), (batch, length), generator=g)
    return model, {"input_ids": ids}


def _vl_case(g, experts: int, grid: tuple[int, int]):
    """A fresh vision-language MoE (a text and a vision group) and one prompt with a picture of fresh pixels:
    text, <|IMAGE_START|>, one placeholder per merged 2 x 2 patch block, <|IMAGE_END|>, text."""
    config = VLConfig.from_dict(dict(
        model_type="ernie4_5_vl_moe", **IMAGE_IDS,
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, moe_num_experts=experts, moe_k=2,
                         moe_intermediate_size=[16, 8], moe_num_shared_experts=1,
                         rope_parameters=dict(mrope_section=[3, 3, 2]), mlp_layer_types=["dense", "sparse", "sparse"]),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32)))
    model = _spread_routers(ErnieVLForConditionalGeneration(config).init_weights(std=0.5, seed=_seed(g)), g)
    rows, cols = grid                                                     # merged tokens of the picture
    before, after = (torch.randint(0, 58, (n,), generator=g) for n in torch.randint(1, 5, (2,), generator=g).tolist())
    ids = torch.cat([before, torch.tensor([58] + [60] * (rows * cols) + [59]), after])[None]   # (1, T)
    pixels = torch.randn(rows * cols * 4, 3 * 14 * 14, generator=g)                          # (patches, 588)
    return model, {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 2 * rows, 2 * cols]])}


def _cases(g):
    """(what, model, inputs): two text MoEs at different expert counts, batches and (odd) lengths, and a VL MoE."""
    grid = tuple(torch.randint(1, 3, (2,), generator=g).tolist())
    return [("a text MoE, batch 2", *_text_case(g, 4, 2, int(torch.randint(3, 8, (1,), generator=g)) * 2 + 1)),
            ("a text MoE, batch 1", *_text_case(g, 6, 1, int(torch.randint(8, 14, (1,), generator=g)))),
            ("a vision-language MoE (text and vision groups)", *_vl_case(g, 4, grid))]


def hooks_left(model: nn.Module) -> list[str]:
    """Names of the modules that still carry a forward (pre-)hook, and 'torch (global)' for a global one."""
    from torch.nn.modules import module as torch_module

    left = [name or "the model" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        left.append("torch (a global module hook)")
    return left


@contextlib.contextmanager
def _kit_recorder_refused():
    """While the student's function runs, ``routing.record`` (the kit's recorder) refuses to listen."""
    listen = routing.listen

    def refuse(*args, **kwargs):
        raise Mismatch("your function used ernie_lab's own recorder (routing.record); the exercise is to write "
                       "the hooks yourself")
    routing.listen = refuse
    try:
        yield
    finally:
        routing.listen = listen


def _run(function, model, inputs):
    with _kit_recorder_refused():
        try:
            return call(function, model, inputs)
        except Mismatch as err:
            if isinstance(err.__cause__, Mismatch):          # our refusal, raised inside the student's code
                raise err.__cause__ from None
            raise


def _compare(what: str, got, expected: RoutingRecord) -> None:
    """Say what differs between the student's record and the kit's, naming a mistake only when it is one."""
    if not isinstance(got, RoutingRecord):
        raise Mismatch(f"{what}: expected a routing.RoutingRecord (RoutingRecord([LayerRouting(...), ...])), "
                       f"got {describe(got)}.")
    want = [entry.layer_idx for entry in expected.layers]
    have = [getattr(entry, "layer_idx", None) for entry in got.layers]
    if have != want:
        if have == list(range(len(want))):
            raise Mismatch(f"{what}: your layers are numbered {have}, their positions among the MoE blocks; a record "
                           f"names each entry by its decoder layer, block.layer_idx: {want}")
        raise Mismatch(f"{what}: your record's layers are {have}, expected one entry per MoE block, in depth order: {want}.")
    for mine, kits in zip(got.layers, expected.layers):
        _compare_layer(f"{what}, layer {kits.layer_idx}", mine, kits)


def _compare_layer(what: str, mine: LayerRouting, kits: LayerRouting) -> None:
    if mine.num_tokens == 0:
        raise Mismatch(f"{what}: your entry holds no tokens: did a hook run during the forward pass and append to "
                       "this layer's entry (register the hooks before model(**inputs))?")
    if mine.num_tokens != kits.num_tokens:
        times = f" ({mine.num_tokens / kits.num_tokens:g} times the tokens)" if kits.num_tokens else ""
        raise Mismatch(f"{what}: you recorded {mine.num_tokens} tokens, the forward pass routed {kits.num_tokens}{times}.")
    columns = {"expert_ids": mine.expert_ids, "weights": mine.weights, "probs": mine.probs, "modality": mine.modality}
    held = [name for name, t in columns.items() if isinstance(t, torch.Tensor) and t.requires_grad]
    if held:
        raise Mismatch(f"{what}: your {', '.join(held)} still require grad (they hold the autograd graph of the "
                       "forward pass): keep tensor.detach() copies")
    _compare_ids(what, mine.expert_ids, kits)
    _compare_weights(what, mine.weights, kits)
    probs = mine.probs
    logits_like = isinstance(probs, torch.Tensor) and probs.shape == kits.probs.shape and probs.is_floating_point()
    if logits_like and not torch.allclose(probs.sum(-1), torch.ones(len(probs)), atol=1e-4) \
            and torch.allclose(probs.softmax(-1), kits.probs, atol=1e-5):
        raise Mismatch(f"{what}: your probs are the router's logits; the record keeps their softmax over the group's "
                       "experts")
    expect_tensor(f"{what}: probs (router probabilities, one row per token)", probs, kits.probs, atol=1e-5)
    modality = mine.modality
    if isinstance(modality, torch.Tensor) and modality.shape == kits.modality.shape and not modality.any() \
            and kits.modality.any():
        raise Mismatch(f"{what}: your modality is 0 (text) for every token, but {int(kits.modality.sum())} tokens "
                       "were routed by the vision group: record routing.modality")
    _expect_equal_ints(f"{what}: modality (0 text, 1 vision)", modality, kits.modality)


def _expect_equal_ints(label: str, got, expected: torch.Tensor) -> None:
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise Mismatch(f"{label}: expected a tensor of shape {tuple(expected.shape)}, got {describe(got)}.")
    if got.is_floating_point() or got.is_complex() or got.dtype == torch.bool:
        raise Mismatch(f"{label}: expected whole numbers (a long tensor), got dtype {got.dtype}.")
    if not torch.equal(got.long(), expected):
        wrong = int((got.long() != expected).any(-1).sum()) if got.dim() > 1 else int((got.long() != expected).sum())
        raise Mismatch(f"{label}: {wrong} of {len(expected)} rows differ from the kit's record.")


def _compare_ids(what: str, ids, kits: LayerRouting) -> None:
    k = kits.expert_ids.shape[1]
    if isinstance(ids, torch.Tensor) and ids.shape == kits.expert_ids.shape and not ids.is_floating_point():
        unbiased = kits.probs.topk(k, dim=-1).indices                    # the choice without the correction bias
        if torch.equal(ids.long(), unbiased) and not torch.equal(unbiased, kits.expert_ids):
            raise Mismatch(f"{what}: your experts are the top-{k} of the probabilities alone; the router chooses by "
                           "probability + correction bias (moe_statics), so take the experts the block chose "
                           "(output.routing.expert_ids)")
        if torch.equal(ids.long(), kits.expert_ids.sort(-1).values) and not torch.equal(ids.long(), kits.expert_ids):
            raise Mismatch(f"{what}: your experts are sorted by number; keep them best first, as the router ranked them")
    _expect_equal_ints(f"{what}: expert_ids (N, k)", ids, kits.expert_ids)


def _compare_weights(what: str, weights, kits: LayerRouting) -> None:
    if isinstance(weights, torch.Tensor) and weights.shape == kits.weights.shape and weights.is_floating_point():
        chosen = kits.probs.gather(-1, kits.expert_ids)                   # (N, k) before renormalising
        if torch.allclose(weights.double(), chosen.double(), atol=1e-6) and \
                not torch.allclose(chosen, kits.weights, atol=1e-6):
            raise Mismatch(f"{what}: your weights are the chosen experts' probabilities before renormalising; the "
                           "block mixes with weights that sum to 1 over the k experts (output.routing.weights)")
    expect_tensor(f"{what}: weights (N, k)", weights, kits.weights, atol=1e-5)


def _raising_forward(function, g) -> None:
    """A forward pass that raises (an id beyond the vocabulary): the error must come through, the hooks must go."""
    model, inputs = _text_case(g, 4, 1, 5)
    inputs["input_ids"][0, -1] = VOCAB + 3
    try:
        with _kit_recorder_refused():
            function(model, copied(inputs))
    except Mismatch:
        raise
    except Exception:  # noqa: BLE001  (the model's own error, as expected)
        left = hooks_left(model)
        if left:
            raise Mismatch(f"after a forward pass that raised, hooks were left on: {', '.join(left)}. Remove them in "
                           "a `finally:` block so that they go even when the model raises") from None
        return
    raise Mismatch("the forward pass raised an error (an id beyond the vocabulary), but your function returned "
                   "normally: let the model's error through (try / finally, no except)")


@exercise("06.record_routing",
          hint="blocks = routing.taps(model); rec = routing.RoutingRecord([routing.LayerRouting(b.layer_idx, "
               "b.num_experts) for b in blocks]); on each block register_forward_hook(hook) whose hook(module, args, output) appends "
               "output.routing's expert_ids, weights, logits.softmax(-1) and modality (detached, on the CPU) to its "
               "entry; model(**inputs) in a try, handle.remove() for every hook in the finally; return rec.")
def record_routing(function) -> str:
    g = fresh_generator()
    for what, model, inputs in _cases(g):
        expected = kit_record_routing(model, inputs)
        got = _run(function, model, inputs)
        left = hooks_left(model)
        if left:
            raise Mismatch(f"{what}: after your function returned, hooks were left on {', '.join(left[:4])}: "
                           "remove every handle (handle.remove()) once the forward pass is over")
        _compare(what, got, expected)
    _raising_forward(function, g)
    return ("a record is nothing but a forward hook per MoE block; every picture below reads one, and the "
            "hooks are gone once it is made.")


# ================================================================================ 06.nmi
def _tables(g):
    """Count tables (as float tensors): random ones with an empty row and column, and a permutation (NMI 1)."""
    tables = []
    for experts, labels in ((6, 3), (4, 5), (8, 2)):
        table = torch.randint(0, 9, (experts, labels), generator=g).float()
        table[int(torch.randint(0, experts, (1,), generator=g))] = 0            # an expert nobody chose
        table[0, 0] += 1                                                        # at least one count
        tables.append(table)
    size = int(torch.randint(2, 6, (1,), generator=g))
    permuted = torch.eye(size)[torch.randperm(size, generator=g)] * torch.randint(1, 9, (size, 1), generator=g)
    tables.append(permuted.float())                                             # each expert names one label
    return tables


def _expected(table):
    mi, ha, hb = information(table.long() if not table.is_floating_point() else table)
    return mi, ha, hb, 2 * mi / (ha + hb)


@exercise("06.nmi", hint="p(x, y) = table / table.sum(); p(x), p(y) its row and column sums; I = sum over p(x, y) > 0 "
                         "of p(x, y) log(p(x, y) / (p(x) p(y))); H = -sum p log p over p > 0; NMI = 2 I / (H(A) + H(B)), "
                         "a 0-d tensor.")
def nmi(function) -> str:
    for table in _tables(fresh_generator()):
        mi, ha, hb, expected = _expected(table)
        got = call(function, table)
        if isinstance(got, torch.Tensor) and got.shape == () and torch.isfinite(got).all():
            value = float(got)
            if abs(value - mi) < 1e-6 and abs(mi - expected) > 1e-6:
                raise Mismatch(f"you returned I(A; B) = {mi:.4f}: normalise it by the mean entropy, "
                               "2 I / (H(A) + H(B)), so that 1 means 'names it'")
            for h in (ha, hb, max(ha, hb), min(ha, hb)):
                if abs(value - mi / h) < 1e-6 and abs(mi / h - expected) > 1e-6:
                    raise Mismatch("divide by the mean of the two entropies, (H(A) + H(B)) / 2, not by one of them")
        expect_tensor(f"NMI of a {tuple(table.shape)} count table", got, torch.tensor(expected, dtype=torch.float64),
                      atol=1e-5)
    return ("0 when the expert says nothing about the label, 1 when each determines the other; "
            "the notebook's specialisation numbers are this, per layer.")

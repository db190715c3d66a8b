"""Solutions to notebook 06's exercises, with the reasoning behind each step and the mistakes to avoid.

SOLUTIONS maps an exercise to its answers; WRONG lists plausible wrong answers (tests/test_exercises.py
checks that every one of them fails, and that the judge names the mistake where a "says" phrase is given).
"""

import torch

from ernie_lab import routing
from ernie_lab.analysis.routing import LayerRouting, RoutingRecord


# ------------------------------------------------------------------------------------------------ 06.record_routing
def _listener(entry):
    """The hook of one MoE block: it appends what the block decided to that block's entry.

    A forward hook is called as hook(module, args, output) after the module's forward. An MoE block returns
    MoEOutput(hidden, routing); routing is a RouterOutput whose rows are the N = B * T tokens, batch-major:
    * expert_ids (N, k): the experts the block really ran, best first. They were chosen by probability +
      correction bias, so they must be read from here, not recomputed as the top-k of the probabilities
      (the bias lives in moe_statics and only the block applies it);
    * weights (N, k): the mixing weights, already renormalised to sum to 1 over the k experts;
    * logits (N, E): each token's router logits in its own group; the record keeps their softmax;
    * modality (N,): 0 for a token routed by the text group, 1 for the vision group.
    detach() lets go of the autograd graph (a record made during training would otherwise keep every
    layer's activations alive), and .cpu() keeps GPU memory free: a record may cover many passes.
    """
    def hook(module, args, output):
        decided = output.routing
        entry.append(decided.expert_ids.detach().long().cpu(),             # (N, k)
                     decided.weights.detach().float().cpu(),               # (N, k)
                     decided.logits.detach().float().softmax(-1).cpu(),    # (N, E)
                     decided.modality.detach().long().cpu())               # (N,)
    return hook


def record_routing(model, inputs):
    """One forward pass model(**inputs), with a forward hook on every MoE block; returns its RoutingRecord.

    * One LayerRouting per MoE block, named by block.layer_idx, the decoder layer it sits in: the MoE
      layers do not start at 0 (ERNIE 4.5's first layers are dense), so the position among the blocks is
      the wrong name.
    * The hooks must go when the pass is over, also when it raises: a hook left behind keeps appending to
      a record nobody reads, on every later forward pass. try / finally does that and still lets the
      model's error reach the caller (an except that swallows it would hand back a half-filled record).
    """
    blocks = routing.taps(model)                                           # MoE blocks, in depth order
    record = RoutingRecord([LayerRouting(block.layer_idx, block.num_experts) for block in blocks])
    handles = [block.register_forward_hook(_listener(entry)) for block, entry in zip(blocks, record.layers)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return record


def _recorder(append, layer_name=lambda position, block: block.layer_idx, remove="finally", grad=False,
              swallow=False):
    """A recorder with one mistake built in, for WRONG below: ``append(entry, output)`` fills the entry."""
    def recorder(model, inputs):
        blocks = routing.taps(model)
        record = RoutingRecord([LayerRouting(layer_name(i, b), b.num_experts) for i, b in enumerate(blocks)])
        handles = [b.register_forward_hook(lambda m, a, out, entry=entry: append(entry, out))
                   for b, entry in zip(blocks, record.layers)]
        context = torch.enable_grad() if grad else torch.no_grad()
        try:
            with context:
                model(**inputs)
        except Exception:
            if not swallow:
                raise
        finally:
            if remove == "finally":
                for handle in handles:
                    handle.remove()
        if remove == "after":
            for handle in handles:
                handle.remove()
        return record
    return recorder


def _append(entry, out, ids=None, weights=None, probs=None, modality=None, keep_graph=False):
    r = out.routing
    take = (lambda t: t) if keep_graph else (lambda t: t.detach())
    entry.append(take(r.expert_ids if ids is None else ids(r)), take(r.weights if weights is None else weights(r)),
                 take(r.logits.softmax(-1) if probs is None else probs(r)),
                 take(r.modality if modality is None else modality(r)))


def _unbiased(r):
    """The top-k of the probabilities alone: what the router would choose without its correction bias."""
    return r.logits.softmax(-1).topk(r.expert_ids.shape[1], dim=-1).indices


def _unnormalised(r):
    return r.logits.softmax(-1).gather(-1, r.expert_ids)


def _record_with_the_kit(model, inputs):
    with torch.no_grad(), routing.record(model) as record:
        model(**inputs)
    return record


# ------------------------------------------------------------------------------------------------ 06.nmi
def _parts(table):
    """p(x, y), and I(A; B), H(A), H(B) in nats.

    * Probabilities are counts over the total: p(x, y) = n_xy / n; the marginals are its row and column sums.
    * An empty cell contributes nothing: p log p -> 0 as p -> 0. Computing log 0 gives -inf, and 0 * -inf is
      NaN, so the sums run over the non-zero cells only (an expert nobody chose is an empty row).
    """
    joint = table.double() / table.sum()                             # (A, B)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)  # (A, 1), (1, B)
    cells = joint > 0
    mi = (joint[cells] * (joint[cells] / (pa @ pb)[cells]).log()).sum()

    def entropy(p):
        p = p[p > 0]
        return -(p * p.log()).sum()
    return mi, entropy(pa), entropy(pb)


def nmi(table):
    """NMI = 2 I(A; B) / (H(A) + H(B)): the mutual information divided by the mean of the two entropies, so
    that it is 1 when each variable determines the other and 0 when they are independent. I alone has no
    fixed scale (it grows with the number of experts and labels): numbers of different layers or models
    could not be compared."""
    mi, ha, hb = _parts(table)
    return 2 * mi / (ha + hb)


SOLUTIONS = {"06.record_routing": (record_routing,), "06.nmi": (nmi,)}
WRONG = {"06.record_routing": [
    {"answers": (_recorder(_append, remove="never"),), "says": "hooks were left on"},
    {"answers": (_recorder(_append, remove="after"),), "says": "finally"},
    {"answers": (_recorder(_append, layer_name=lambda position, block: position),), "says": "block.layer_idx"},
    {"answers": (_recorder(lambda e, out: _append(e, out, ids=_unbiased)),), "says": "correction bias"},
    {"answers": (_recorder(lambda e, out: _append(e, out, weights=_unnormalised)),), "says": "before renormalising"},
    {"answers": (_recorder(lambda e, out: _append(e, out, probs=lambda r: r.logits)),), "says": "softmax"},
    {"answers": (_recorder(lambda e, out: _append(e, out, modality=lambda r: torch.zeros_like(r.modality))),),
     "says": "record routing.modality"},
    {"answers": (_recorder(lambda e, out: _append(e, out, keep_graph=True), grad=True),), "says": "detach"},
    {"answers": (_recorder(_append, swallow=True),), "says": "let the model's error through"},
    {"answers": (_record_with_the_kit,), "says": "own recorder"},
    (_recorder(lambda e, out: _append(e, out) or _append(e, out)),),                 # every token recorded twice
    (_recorder(lambda e, out: _append(e, out, ids=lambda r: r.expert_ids.flip(-1))),),  # second choice first
],
    "06.nmi": [{"answers": (lambda t: _parts(t)[0],), "says": "normalise it by the mean entropy"},
               {"answers": (lambda t: _parts(t)[0] / _parts(t)[2],), "says": "not by one of them"},
               (lambda t: torch.nan_to_num(nmi(t + 0.5)),),
               (lambda t: nmi(t).item(),)]}

"""Routing records: which experts every token chose, in every MoE layer, kept on the CPU.

    with ernie_lab.routing.record(model) as rec:
        model(ids)                                  # or ernie_lab.generate(model, ...)
    rec.layers[0].expert_ids                        # (N, k) experts chosen by the first MoE layer
    rec.load()                                      # (num MoE layers, E) tokens per expert

Every MoE block returns its routing with its output (``moe.MoEOutput(hidden, routing)``); ``record``
puts a forward hook on each block for the length of the ``with``, so the model holds no recording code.
Inside it, every forward pass appends one chunk per MoE layer: the N = B * T tokens of that pass,
batch-major (row b's tokens, then row b+1's). A generation therefore records the prompt (prefill)
first, then B tokens per decoding step. Left-padding positions are routed like any token and are
recorded too. Expert ids are numbered inside their group (0..E-1); ``modality`` says which group
(0 = text, 1 = vision), so a vision-language block records its two groups in one layer entry.

The second half of the module holds the numbers the pictures of ``ernie_lab.viz`` show, as pure
functions of a record: choices per layer, one token's path, co-selection, router entropy and top-1
weight, loads split by a token attribute with their normalised mutual information, and the agreement
of two records' choices (router saturation over training).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..model.moe import MoEBlock, MoEOutput, moe_blocks
from ..model.special_tokens import TEXT, VISION  # modality codes: the two expert groups


@dataclass(eq=False)
class LayerRouting:
    """The routing decisions of one MoE layer, for every token recorded (all tensors on CPU).

    ``expert_ids`` (N, k) long, ``weights`` (N, k) mixing weights, ``probs`` (N, E) router
    probabilities, ``modality`` (N,) long. Chunks from successive forward passes are joined lazily.
    """

    layer_idx: int                  # index of the decoder layer this MoE block sits in
    num_experts: int                # E: experts per group
    _chunks: list = field(default_factory=list, repr=False)

    def append(self, expert_ids, weights, probs, modality) -> None:
        self._chunks.append((expert_ids, weights, probs, modality))

    def _column(self, i: int) -> torch.Tensor:
        if len(self._chunks) != 1:  # join once, then keep the joined tensors
            if not self._chunks:
                empty = (torch.empty(0, 0, dtype=torch.long), torch.empty(0, 0),
                         torch.empty(0, self.num_experts), torch.empty(0, dtype=torch.long))
                return empty[i]
            self._chunks = [tuple(torch.cat(parts) for parts in zip(*self._chunks))]
        return self._chunks[0][i]

    expert_ids = property(lambda self: self._column(0))
    weights = property(lambda self: self._column(1))
    probs = property(lambda self: self._column(2))
    modality = property(lambda self: self._column(3))

    @property
    def num_tokens(self) -> int:
        return sum(chunk[0].shape[0] for chunk in self._chunks)

    def load(self, modality: int | None = None) -> torch.Tensor:
        """(E,) long: how many tokens chose each expert (optionally only tokens of one modality)."""
        ids = self.expert_ids
        if modality is not None:
            ids = ids[self.modality == modality]
        return torch.bincount(ids.reshape(-1), minlength=self.num_experts)


class RoutingRecord:
    """One entry per MoE layer of the model, in depth order: ``rec.layers[i]`` is a LayerRouting."""

    def __init__(self, layers: list[LayerRouting]):
        self.layers = layers

    def layer(self, layer_idx: int) -> LayerRouting:
        """The entry of decoder layer ``layer_idx`` (raises KeyError for a dense layer)."""
        for entry in self.layers:
            if entry.layer_idx == layer_idx:
                return entry
        raise KeyError(f"layer {layer_idx} is not an MoE layer; MoE layers: {[e.layer_idx for e in self.layers]}")

    def load(self, modality: int | None = None) -> torch.Tensor:
        """(num MoE layers, E) long: tokens per expert in every MoE layer."""
        if not self.layers:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack([entry.load(modality) for entry in self.layers])

    def load_fraction(self, modality: int | None = None) -> torch.Tensor:
        """(num MoE layers, E) float: share of the k * N expert slots each expert got (rows sum to 1)."""
        counts = self.load(modality).float()
        return counts / counts.sum(-1, keepdim=True).clamp(min=1)

    def __repr__(self) -> str:
        tokens = self.layers[0].num_tokens if self.layers else 0
        return f"RoutingRecord({len(self.layers)} MoE layers, {tokens} tokens)"


def listen(block: MoEBlock, entry: LayerRouting):
    """Hook ``block`` so that each of its forward passes appends its routing to ``entry``; returns the handle."""

    def hook(module, args, output: MoEOutput) -> None:
        routing = output.routing
        probs = routing.logits.softmax(dim=-1)                     # (N, E) over the token's group
        entry.append(*(t.detach().to("cpu") for t in (routing.expert_ids.long(), routing.weights.float(),
                                                     probs, routing.modality.long())))

    return block.register_forward_hook(hook)


def taps(model: torch.nn.Module) -> list[MoEBlock]:
    """The MoE blocks a record listens to (each knows its ``layer_idx``), sorted by decoder layer."""
    return sorted(moe_blocks(model), key=lambda block: block.layer_idx)


@contextlib.contextmanager
def record(model: torch.nn.Module):
    """Record every forward pass of ``model`` inside the ``with`` block; yields a RoutingRecord.

    A dense model yields a record with no layers. Records may be nested or run side by side.
    """
    blocks = taps(model)
    rec = RoutingRecord([LayerRouting(block.layer_idx, block.num_experts) for block in blocks])
    handles = [listen(block, entry) for block, entry in zip(blocks, rec.layers)]
    try:
        yield rec
    finally:
        for handle in handles:
            handle.remove()


# ================================================================ the numbers behind the pictures
# Pure functions of a record (tensors in, tensors or lists out); ernie_lab.viz draws them.
# Expert ids are numbered inside their group; a VL model's text experts are T0..T(E-1), its vision
# experts V0..V(E-1): the two groups are different modules and are never put on one axis.
GROUP_LETTER = {TEXT: "T", VISION: "V"}


def expert_labels(num_experts: int, modality: int = TEXT) -> list[str]:
    """['T0', 'T1', ...] for the text group, ['V0', ...] for the vision group."""
    return [f"{GROUP_LETTER[modality]}{e}" for e in range(num_experts)]


def modality_rows(entry: LayerRouting, modality: int) -> torch.Tensor:
    """(n,) long: the recorded rows routed in the group of ``modality``."""
    return (entry.modality == modality).nonzero().squeeze(1)


def routed_modalities(record: RoutingRecord) -> list[int]:
    """The groups that routed at least one recorded token: [TEXT], [VISION] or [TEXT, VISION]."""
    if not record.layers:
        return []
    present = set(record.layers[0].modality.unique().tolist())
    return [m for m in (TEXT, VISION) if m in present]


def choices(record: RoutingRecord, rows: torch.Tensor, rank: int = 0) -> torch.Tensor:
    """(num MoE layers, len(rows)) long: the ``rank``-th expert (0 = top-1) each of ``rows`` chose, per layer."""
    if not record.layers:
        return torch.zeros(0, len(rows), dtype=torch.long)
    k = record.layers[0].expert_ids.shape[1]
    if not 0 <= rank < k:
        raise InputError(f"rank must be from 0 (the top choice) to k - 1 = {k - 1}, got {rank}.")
    return torch.stack([entry.expert_ids[rows, rank] for entry in record.layers])


def path(record: RoutingRecord, row: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One token's route through the depth: (L, k) expert ids, (L, k) weights, and its group."""
    ids = torch.stack([entry.expert_ids[row] for entry in record.layers])    # (L, k)
    weights = torch.stack([entry.weights[row] for entry in record.layers])   # (L, k)
    return ids, weights, int(record.layers[0].modality[row])


def co_selection(entry: LayerRouting, modality: int | None = None) -> torch.Tensor:
    """(E, E) long: how many tokens chose experts i and j together (diagonal: tokens that chose i)."""
    ids = entry.expert_ids if modality is None else entry.expert_ids[entry.modality == modality]
    picked = torch.zeros(ids.shape[0], entry.num_experts, dtype=torch.long)  # (n, E) one-hot of the k choices
    picked.scatter_(1, ids, 1)
    return picked.T @ picked


def entropy(entry: LayerRouting, modality: int | None = None) -> torch.Tensor:
    """(n,) entropy of each token's router distribution over its group's E experts, in nats (max log E)."""
    probs = entry.probs if modality is None else entry.probs[entry.modality == modality]
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


def top1_weight(entry: LayerRouting, modality: int | None = None) -> torch.Tensor:
    """(n,) the mixing weight of each token's first expert: the router's confidence (1/k: undecided)."""
    weights = entry.weights if modality is None else entry.weights[entry.modality == modality]
    return weights[:, 0]


def per_layer(record: RoutingRecord, statistic, modality: int | None = None) -> torch.Tensor:
    """(L,) the mean of ``statistic(entry, modality)`` (entropy, top1_weight) in every MoE layer (nan if no token)."""
    means = []
    for entry in record.layers:
        values = statistic(entry, modality)
        means.append(values.mean() if values.numel() else torch.tensor(float("nan")))
    return torch.stack(means) if means else torch.zeros(0)


def load_by_label(picks: torch.Tensor, labels: list, num_experts: int) -> tuple[list, torch.Tensor]:
    """Split one layer's load by a token attribute: (sorted label names, (len(names), E) token counts).

    ``picks`` (n,) expert ids, ``labels`` n labels (a colour, a word class, ...) of the same tokens.
    """
    if len(labels) != len(picks):
        raise InputError(f"give one label per routed token: {len(labels)} labels for {len(picks)} tokens.")
    names = sorted(set(labels))
    index = torch.tensor([names.index(label) for label in labels], dtype=torch.long)
    table = torch.zeros(len(names), num_experts, dtype=torch.long)
    table.index_put_((index, picks.long()), torch.ones(len(picks), dtype=torch.long), accumulate=True)
    return names, table


def contingency(a: list, b: list) -> torch.Tensor:
    """(values of a, values of b) counts of the pairs (a[i], b[i]) of two equally long label lists."""
    if len(a) != len(b):
        raise InputError(f"give two equally long lists: {len(a)} and {len(b)} labels.")
    rows, cols = sorted(set(a)), sorted(set(b))
    index_a, index_b = {x: i for i, x in enumerate(rows)}, {y: j for j, y in enumerate(cols)}
    table = torch.zeros(len(rows), len(cols), dtype=torch.long)
    for x, y in zip(a, b):
        table[index_a[x], index_b[y]] += 1
    return table


def information(table: torch.Tensor) -> tuple[float, float, float]:
    """I(A; B), H(A) and H(B) in nats of an (A values, B values) count table, probabilities as counts / n."""
    joint = table.double() / table.sum().clamp(min=1)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nonzero = joint > 0
    mi = (joint[nonzero] * (joint[nonzero] / (pa @ pb)[nonzero]).log()).sum()
    h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    return float(mi), float(h(pa)), float(h(pb))


def mutual_information(table: torch.Tensor) -> float:
    """NMI = 2 I(A; B) / (H(A) + H(B)) of a (labels, experts) count table: 0 independent, 1 one decides the other."""
    mi, ha, hb = information(table)
    return 2 * mi / (ha + hb) if ha + hb > 0 else 0.0


def specialisation(record: RoutingRecord, rows: torch.Tensor, labels: list, rank: int = 0) -> list[dict]:
    """Per MoE layer: {"layer", "names", "table" (labels, E) counts, "nmi"} of ``rows``' ``rank``-th choices
    split by their ``labels`` (one per row)."""
    out = []
    for entry, picks in zip(record.layers, choices(record, rows, rank)):
        names, table = load_by_label(picks, labels, entry.num_experts)
        out.append({"layer": entry.layer_idx, "names": names, "table": table, "nmi": mutual_information(table)})
    return out


def word_class(piece: str) -> str:
    """A text token's simple class: 'punctuation', 'digits', 'words', or 'other' (markers, spaces)."""
    text = piece.replace("\u2581", "").strip()  # SentencePiece writes a leading space as U+2581
    if not text or (text.startswith("<") and text.endswith(">")):
        return "other"
    if text.isdigit():
        return "digits"
    if all(not ch.isalnum() for ch in text):
        return "punctuation"
    return "words"


def agreement(entry: LayerRouting, final: LayerRouting, modality: int | None = None) -> float:
    """Mean share of each token's k experts that ``final`` also chose for it (same tokens; 1: identical)."""
    if entry.expert_ids.shape != final.expert_ids.shape:
        raise InputError(f"the two records hold different tokens ({tuple(entry.expert_ids.shape)} vs "
                         f"{tuple(final.expert_ids.shape)}): record the same inputs with both models.")
    rows = slice(None) if modality is None else entry.modality == modality
    a, b = entry.expert_ids[rows], final.expert_ids[rows]             # (n, k) each
    if a.numel() == 0:
        return float("nan")
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)          # (n,) experts in both top-k sets
    return float(shared.float().mean() / a.shape[1])


def saturation(step_records: list[tuple[int, RoutingRecord]], final: RoutingRecord,
               modality: int | None = None) -> tuple[list[int], torch.Tensor]:
    """Router saturation (as in OLMoE's analysis): (steps, (S, L) agreement of each step's top-k with the final's)."""
    steps = [step for step, _ in step_records]
    table = torch.tensor([[agreement(entry, last, modality) for entry, last in zip(rec.layers, final.layers)]
                          for _, rec in step_records])
    return steps, table

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
import math
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import InputError, require_int
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
        check_modality(modality)
        ids = self.expert_ids
        if modality is not None:
            ids = ids[self.modality == modality]
        return torch.bincount(ids.reshape(-1), minlength=self.num_experts)


class NotAnMoELayer(InputError, KeyError):
    """A decoder layer asked of a record that holds no MoE block at that depth (an InputError and a KeyError)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


class RoutingRecord:
    """One entry per MoE layer of the model, in depth order: ``rec.layers[i]`` is a LayerRouting."""

    def __init__(self, layers: list[LayerRouting]):
        if not isinstance(layers, (list, tuple)) or not all(isinstance(e, LayerRouting) for e in layers):
            raise InputError("RoutingRecord(layers): layers must be a list of LayerRouting entries; "
                             "make records with `with ernie_lab.routing.record(model) as rec:`.")
        self.layers = list(layers)

    def layer(self, layer_idx: int) -> LayerRouting:
        """The entry of decoder layer ``layer_idx`` (raises NotAnMoELayer, a KeyError and InputError, for a dense
        layer or an index the model does not have)."""
        known = [e.layer_idx for e in self.layers]
        if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
            raise NotAnMoELayer(f"layer must be a decoder layer index (an int), got {layer_idx!r}; "
                                f"MoE layers of this record: {known}.")
        for entry in self.layers:
            if entry.layer_idx == layer_idx:
                return entry
        if not known:
            raise NotAnMoELayer(f"layer {layer_idx} is not an MoE layer: this record holds no MoE layers (a dense "
                                "model routes nothing); record an ERNIE 4.5 MoE or VL model.")
        raise NotAnMoELayer(f"layer {layer_idx} is not an MoE layer; MoE layers: {known}. Pass one of those.")

    @property
    def num_tokens(self) -> int:
        """Tokens recorded (0 for an empty record)."""
        return self.layers[0].num_tokens if self.layers else 0

    def load(self, modality: int | None = None) -> torch.Tensor:
        """(num MoE layers, E) long: tokens per expert in every MoE layer."""
        check_modality(modality)
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

    A dense model yields a record with no layers (with a UserWarning: there is nothing to record).
    Records may be nested or run side by side. The hooks are removed when the block ends, also when
    it ends with an exception.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"record(model): model must be an ernie-lab model (a torch.nn.Module), got "
                         f"{type(model).__name__}; load one with ernie_lab.load_model(folder).")
    blocks = taps(model)
    if not blocks:
        warnings.warn(f"record(model): this {type(model).__name__} has no MoE layers, so the record stays empty; "
                      "routing needs an ERNIE 4.5 MoE or VL model.", UserWarning, stacklevel=3)
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


def check_modality(modality, allow_none: bool = True) -> None:
    """Refuse a modality that is not TEXT (0), VISION (1) or, where allowed, None (every token)."""
    if modality is None and allow_none:
        return
    if isinstance(modality, bool) or modality not in (TEXT, VISION):
        allowed = "0 (text), 1 (vision) or None (all tokens)" if allow_none else "0 (text) or 1 (vision)"
        raise InputError(f"modality must be {allowed}, got {modality!r}.")


def check_record(record, name: str = "record") -> RoutingRecord:
    """``record`` if it is a RoutingRecord, else an InputError that says how to get one."""
    if not isinstance(record, RoutingRecord):
        hint = " (a viz.Routed: pass its .record)" if hasattr(record, "record") else ""
        raise InputError(f"{name} must be a RoutingRecord{hint}, got {type(record).__name__}; "
                         "make one with `with ernie_lab.routing.record(model) as rec: model(ids)`.")
    return record


def check_rows(record: RoutingRecord, rows, name: str = "rows") -> torch.Tensor:
    """``rows`` as a (n,) long tensor of valid record rows, or an InputError naming ``name``."""
    try:
        rows = torch.as_tensor(rows)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"{name} must be a list or 1-D tensor of record row indices, got {type(rows).__name__}.") from None
    if rows.dim() != 1 or (rows.numel() and (rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool)):
        raise InputError(f"{name} must be a 1-D list or tensor of integer row indices, got shape "
                         f"{tuple(rows.shape)} of {rows.dtype}.")
    rows = rows.long()
    n = record.num_tokens
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        bad = int(rows.max()) if int(rows.max()) >= n else int(rows.min())
        raise InputError(f"{name} holds row {bad}, but the record has {n} tokens (rows 0 .. {n - 1}); were the rows "
                         "taken from another prompt or another record?")
    return rows


def check_row(record: RoutingRecord, row, name: str = "row") -> int:
    """One valid record row (a negative row counts from the end, as in Python), or an InputError."""
    if isinstance(row, torch.Tensor) and row.numel() == 1 and not row.is_floating_point():
        row = int(row)
    if isinstance(row, bool) or not isinstance(row, int):
        raise InputError(f"{name} must be an integer record row, got {row!r}.")
    n = record.num_tokens
    if not -n <= row < n:
        raise InputError(f"{name} {row} is out of range: the record has {n} tokens (rows 0 .. {n - 1}).")
    return row % n


def check_rank(record: RoutingRecord, rank) -> int:
    """A valid top-k rank of the record's layers (0 .. k - 1), or an InputError."""
    k = record.layers[0].expert_ids.shape[1] if record.layers and record.num_tokens else None
    if isinstance(rank, bool) or not isinstance(rank, int) or (k is not None and not 0 <= rank < k):
        top = f"k - 1 = {k - 1}" if k is not None else "k - 1"
        raise InputError(f"rank must be from 0 (the top choice) to {top}, got {rank!r}.")
    return rank


def as_label_list(labels, name: str) -> list:
    """A label sequence as a plain list of hashable, non-NaN labels (tensors and arrays are read as values)."""
    if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
        raise InputError(f"{name} must be a list with one label per token, got {type(labels).__name__}.")
    if hasattr(labels, "tolist"):  # a tensor or an array: its elements are values, not distinct objects
        labels = labels.tolist()
    labels = list(labels)
    for i, label in enumerate(labels):
        try:
            hash(label)
        except TypeError:
            raise InputError(f"{name}[{i}] is a {type(label).__name__}, which cannot be a label; give strings "
                             "or numbers.") from None
        if isinstance(label, float) and math.isnan(label):
            raise InputError(f"{name}[{i}] is NaN: give every token a label (for example 'unknown').")
    return labels


def sorted_names(labels: list) -> list:
    """The distinct labels, sorted (labels of mixed types sort by type name, then text)."""
    distinct = set(labels)
    try:
        return sorted(distinct)
    except TypeError:
        return sorted(distinct, key=lambda x: (type(x).__name__, str(x)))


def expert_labels(num_experts: int, modality: int = TEXT) -> list[str]:
    """['T0', 'T1', ...] for the text group, ['V0', ...] for the vision group."""
    require_int("num_experts", num_experts, 0)
    check_modality(modality, allow_none=False)
    return [f"{GROUP_LETTER[modality]}{e}" for e in range(num_experts)]


def modality_rows(entry: LayerRouting, modality: int) -> torch.Tensor:
    """(n,) long: the recorded rows routed in the group of ``modality``."""
    check_modality(modality, allow_none=False)
    return (entry.modality == modality).nonzero().squeeze(1)


def routed_modalities(record: RoutingRecord) -> list[int]:
    """The groups that routed at least one recorded token: [TEXT], [VISION] or [TEXT, VISION]."""
    check_record(record)
    if not record.layers:
        return []
    present = set(record.layers[0].modality.unique().tolist())
    return [m for m in (TEXT, VISION) if m in present]


def choices(record: RoutingRecord, rows: torch.Tensor, rank: int = 0) -> torch.Tensor:
    """(num MoE layers, len(rows)) long: the ``rank``-th expert (0 = top-1) each of ``rows`` chose, per layer."""
    check_record(record)
    rows = check_rows(record, rows)
    if not record.layers:
        return torch.zeros(0, len(rows), dtype=torch.long)
    check_rank(record, rank)
    return torch.stack([entry.expert_ids[rows, rank] for entry in record.layers])


def path(record: RoutingRecord, row: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One token's route through the depth: (L, k) expert ids, (L, k) weights, and its group."""
    check_record(record)
    if not record.layers:
        raise InputError("the routing record is empty (a dense model, or nothing run inside the `with`): "
                         "record a forward pass of an MoE model first.")
    row = check_row(record, row)
    ids = torch.stack([entry.expert_ids[row] for entry in record.layers])    # (L, k)
    weights = torch.stack([entry.weights[row] for entry in record.layers])   # (L, k)
    return ids, weights, int(record.layers[0].modality[row])


def check_entry(entry, name: str = "entry") -> LayerRouting:
    """``entry`` if it is one layer's LayerRouting, else an InputError that says how to get one."""
    if not isinstance(entry, LayerRouting):
        hint = " (a whole record: pass rec.layers[i] or rec.layer(layer_idx))" if isinstance(entry, RoutingRecord) else ""
        raise InputError(f"{name} must be one layer's LayerRouting{hint}, got {type(entry).__name__}.")
    return entry


def co_selection(entry: LayerRouting, modality: int | None = None) -> torch.Tensor:
    """(E, E) long: how many tokens chose experts i and j together (diagonal: tokens that chose i)."""
    check_entry(entry)
    check_modality(modality)
    ids = entry.expert_ids if modality is None else entry.expert_ids[entry.modality == modality]
    picked = torch.zeros(ids.shape[0], entry.num_experts, dtype=torch.long)  # (n, E) one-hot of the k choices
    picked.scatter_(1, ids, 1)
    return picked.T @ picked


def entropy(entry: LayerRouting, modality: int | None = None) -> torch.Tensor:
    """(n,) entropy of each token's router distribution over its group's E experts, in nats (max log E)."""
    check_entry(entry)
    check_modality(modality)
    probs = entry.probs if modality is None else entry.probs[entry.modality == modality]
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


def top1_weight(entry: LayerRouting, modality: int | None = None) -> torch.Tensor:
    """(n,) the mixing weight of each token's first expert: the router's confidence (1/k: undecided)."""
    check_entry(entry)
    check_modality(modality)
    weights = entry.weights if modality is None else entry.weights[entry.modality == modality]
    return weights[:, 0]


def per_layer(record: RoutingRecord, statistic, modality: int | None = None) -> torch.Tensor:
    """(L,) the mean of ``statistic(entry, modality)`` (entropy, top1_weight) in every MoE layer (nan if no token)."""
    check_record(record)
    if not callable(statistic):
        raise InputError(f"statistic must be a function of (entry, modality), such as routing.entropy or "
                         f"routing.top1_weight, got {statistic!r}.")
    check_modality(modality)
    means = []
    for entry in record.layers:
        values = statistic(entry, modality)
        means.append(values.mean() if values.numel() else torch.tensor(float("nan")))
    return torch.stack(means) if means else torch.zeros(0)


def load_by_label(picks: torch.Tensor, labels: list, num_experts: int) -> tuple[list, torch.Tensor]:
    """Split one layer's load by a token attribute: (sorted label names, (len(names), E) token counts).

    ``picks`` (n,) expert ids, ``labels`` n labels (a colour, a word class, ...) of the same tokens.
    """
    require_int("num_experts", num_experts, 1)
    try:
        picks = torch.as_tensor(picks)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"picks must be a 1-D tensor of expert ids, got {type(picks).__name__}.") from None
    if picks.dim() != 1 or (picks.numel() and (picks.is_floating_point() or picks.dtype == torch.bool)):
        raise InputError(f"picks must be a 1-D tensor of integer expert ids, got shape {tuple(picks.shape)} "
                         f"of {picks.dtype}.")
    labels = as_label_list(labels, "labels")
    if len(labels) != len(picks):
        raise InputError(f"labels: give one label per routed token: {len(labels)} labels for {len(picks)} tokens.")
    if picks.numel() and (int(picks.min()) < 0 or int(picks.max()) >= num_experts):
        raise InputError(f"picks holds expert {int(picks.max()) if int(picks.max()) >= num_experts else int(picks.min())}"
                         f", outside 0 .. num_experts - 1 = {num_experts - 1}: is num_experts that of the model "
                         "that was recorded?")
    names = sorted_names(labels)
    position = {name: i for i, name in enumerate(names)}
    index = torch.tensor([position[label] for label in labels], dtype=torch.long)
    table = torch.zeros(len(names), num_experts, dtype=torch.long)
    table.index_put_((index, picks.long()), torch.ones(len(picks), dtype=torch.long), accumulate=True)
    return names, table


def contingency(a: list, b: list) -> torch.Tensor:
    """(values of a, values of b) counts of the pairs (a[i], b[i]) of two equally long label lists."""
    a, b = as_label_list(a, "a"), as_label_list(b, "b")
    if len(a) != len(b):
        raise InputError(f"give two equally long lists a and b: {len(a)} and {len(b)} labels.")
    rows, cols = sorted_names(a), sorted_names(b)
    index_a, index_b = {x: i for i, x in enumerate(rows)}, {y: j for j, y in enumerate(cols)}
    table = torch.zeros(len(rows), len(cols), dtype=torch.long)
    for x, y in zip(a, b):
        table[index_a[x], index_b[y]] += 1
    return table


def information(table: torch.Tensor) -> tuple[float, float, float]:
    """I(A; B), H(A) and H(B) in nats of an (A values, B values) count table, probabilities as counts / n."""
    table = check_table(table)
    joint = table.double() / table.sum().clamp(min=1)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nonzero = joint > 0
    mi = (joint[nonzero] * (joint[nonzero] / (pa @ pb)[nonzero]).log()).sum()
    h = lambda p: -(p[p > 0] * p[p > 0].log()).sum()  # noqa: E731
    return float(mi), float(h(pa)), float(h(pb))


def check_table(table) -> torch.Tensor:
    """A 2-D table of finite, non-negative counts with at least one count, or an InputError naming ``table``."""
    try:
        table = torch.as_tensor(table)
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"table must be a 2-D tensor of counts, got {type(table).__name__}.") from None
    if table.dim() != 2 or table.dtype == torch.bool or table.is_complex():
        raise InputError(f"table must be a 2-D (labels, experts) tensor of counts, got shape {tuple(table.shape)} "
                         f"of {table.dtype}.")
    if table.is_floating_point() and not torch.isfinite(table).all():
        raise InputError(f"table holds {int((~torch.isfinite(table)).sum())} NaN or infinite entries; counts must "
                         "be finite (check how the table was made).")
    if table.numel() and float(table.min()) < 0:
        raise InputError(f"table holds a negative count ({float(table.min()):g}); counts must be >= 0.")
    if table.numel() == 0 or float(table.sum()) == 0:
        raise InputError(f"table {tuple(table.shape)} holds no counts, so there is no information to measure; "
                         "route some tokens first (were the rows or labels empty?).")
    return table


def mutual_information(table: torch.Tensor) -> float:
    """NMI = 2 I(A; B) / (H(A) + H(B)) of a (labels, experts) count table: 0 independent, 1 one decides the other."""
    mi, ha, hb = information(table)
    return 2 * mi / (ha + hb) if ha + hb > 0 else 0.0


def specialisation(record: RoutingRecord, rows: torch.Tensor, labels: list, rank: int = 0) -> list[dict]:
    """Per MoE layer: {"layer", "names", "table" (labels, E) counts, "nmi"} of ``rows``' ``rank``-th choices
    split by their ``labels`` (one per row)."""
    check_record(record)
    rows = check_rows(record, rows)
    labels = as_label_list(labels, "labels")
    if len(labels) != len(rows):
        raise InputError(f"labels: give one label per row: {len(labels)} labels for {len(rows)} rows.")
    if record.layers and not len(rows):
        raise InputError("rows is empty: give the record rows of the tokens whose experts are to be measured.")
    out = []
    for entry, picks in zip(record.layers, choices(record, rows, rank)):
        names, table = load_by_label(picks, labels, entry.num_experts)
        out.append({"layer": entry.layer_idx, "names": names, "table": table, "nmi": mutual_information(table)})
    return out


def word_class(piece: str) -> str:
    """A text token's simple class: 'punctuation', 'digits', 'words', or 'other' (markers, spaces)."""
    if not isinstance(piece, str):
        raise InputError(f"piece must be a token's text (a str), got {type(piece).__name__}.")
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
    check_entry(entry, "entry")
    check_entry(final, "final")
    check_modality(modality)
    if entry.num_experts != final.num_experts:
        raise InputError(f"the two records come from different models: {entry.num_experts} and {final.num_experts} "
                         "experts per group; compare checkpoints of one model.")
    if entry.expert_ids.shape != final.expert_ids.shape or not torch.equal(entry.modality, final.modality):
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
    check_record(final, "final")
    if isinstance(step_records, (str, bytes, dict)) or not hasattr(step_records, "__iter__"):
        raise InputError("step_records must be a list of (step, RoutingRecord) pairs, as "
                         f"viz.records_over_training returns, got {type(step_records).__name__}.")
    step_records = list(step_records)
    depth = [e.layer_idx for e in final.layers]
    for i, pair in enumerate(step_records):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[1], RoutingRecord)):
            raise InputError(f"step_records[{i}] must be a (step, RoutingRecord) pair, got {type(pair).__name__}.")
        if [e.layer_idx for e in pair[1].layers] != depth:
            raise InputError(f"step_records[{i}] (step {pair[0]!r}) holds MoE layers "
                             f"{[e.layer_idx for e in pair[1].layers]}, but final holds {depth}: record checkpoints "
                             "of one model.")
    steps = [step for step, _ in step_records]
    table = torch.tensor([[agreement(entry, last, modality) for entry, last in zip(rec.layers, final.layers)]
                          for _, rec in step_records], dtype=torch.float32).reshape(len(step_records), len(depth))
    return steps, table

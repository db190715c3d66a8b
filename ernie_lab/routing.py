"""Routing records: which experts every token chose, in every MoE layer, kept on the CPU.

    with ernie_lab.routing.record(model) as rec:
        model(ids)                                  # or ernie_lab.generate(model, ...)
    rec.layers[0].expert_ids                        # (N, k) experts chosen by the first MoE layer
    rec.load()                                      # (num MoE layers, E) tokens per expert

Each MoE block owns a :class:`RoutingTap`. Outside a ``record`` context the tap does nothing;
inside it, every forward pass appends one chunk per MoE layer: the N = B * T tokens of that pass,
batch-major (row b's tokens, then row b+1's). A generation therefore records the prompt (prefill)
first, then B tokens per decoding step. Left-padding positions are routed like any token and are
recorded too. Expert ids are numbered inside their group (0..E-1); ``modality`` says which group
(0 = text, 1 = vision), so a vision-language block records its two groups in one layer entry.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .special_tokens import TEXT, VISION  # modality codes: the two expert groups


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


class RoutingTap:
    """The hook an MoE block calls after routing; a no-op unless a ``record`` context listens."""

    def __init__(self, layer_idx: int, num_experts: int):
        self.layer_idx = layer_idx
        self.num_experts = num_experts
        self.listeners: list[LayerRouting] = []

    def __call__(self, expert_ids: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor,
                 modality: torch.Tensor | None = None) -> None:
        """Report N routed tokens: expert_ids/weights (N, k), probs (N, E), modality (N,) or None = text."""
        if not self.listeners:
            return
        if modality is None:
            modality = torch.full((expert_ids.shape[0],), TEXT, dtype=torch.long)
        chunk = tuple(t.detach().to("cpu") for t in (expert_ids.long(), weights.float(), probs.float(), modality.long()))
        for entry in self.listeners:
            entry.append(*chunk)


def taps(model: torch.nn.Module) -> list[RoutingTap]:
    """Every RoutingTap in ``model``, sorted by decoder layer."""
    found = [m.routing_tap for m in model.modules() if isinstance(getattr(m, "routing_tap", None), RoutingTap)]
    return sorted(found, key=lambda tap: tap.layer_idx)


@contextlib.contextmanager
def record(model: torch.nn.Module):
    """Record every forward pass of ``model`` inside the ``with`` block; yields a RoutingRecord.

    A dense model yields a record with no layers. Records may be nested or run side by side.
    """
    model_taps = taps(model)
    rec = RoutingRecord([LayerRouting(tap.layer_idx, tap.num_experts) for tap in model_taps])
    for tap, entry in zip(model_taps, rec.layers):
        tap.listeners.append(entry)
    try:
        yield rec
    finally:
        for tap, entry in zip(model_taps, rec.layers):
            tap.listeners[:] = [listener for listener in tap.listeners if listener is not entry]

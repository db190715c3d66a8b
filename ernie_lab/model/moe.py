"""Mixture of experts: a router sends each token to k of E small SwiGLU experts; shared experts see all.

    p   = softmax(W_r x)                          router probabilities over the E experts (float32)
    S   = top-k of (p + b)                        the k experts chosen for this token
    w_e = p_e / max(sum_{j in S} p_j, norm_min)   mixing weights for e in S (they sum to 1)
    y   = sum_{e in S} w_e Expert_e(x) + Shared(x)

ERNIE 4.5's twists: the router runs in float32 and its softmax covers *all* E experts (not just the
chosen k); the correction bias b (``moe_statics.e_score_correction_bias``, learnt without gradients
to even out the load) is added only to *choose* the experts, never to the weights; the weights are
renormalised with a sum clamped below at ``moe_norm_min``; the shared experts are added unscaled.

One :class:`MoEBlock` serves the text MoE models and the vision-language ones. Its experts come in
*groups*, each with its own router and correction bias: a text model has one group; ERNIE 4.5 VL has
two (modality-isolated routing), text experts then vision experts, of different widths, and a token is
routed only inside the group of its modality. Each group is :func:`route` (logits -> chosen experts and
weights) then :func:`dispatch` (tokens -> experts -> mixed outputs). Dispatch sorts the N * k
(token, expert) pairs by expert, so each expert runs once, on all of its tokens together; the outputs
are put back in token order and mixed with the weights: a loop over experts, never over tokens.

The router's decisions leave the block one way: its output, ``MoEOutput(hidden, routing)``, whose
:class:`RouterOutput` holds each token's router logits, chosen experts, weights and group. The decoder
collects them per layer when asked (``output_router_logits=True``, for the training losses), and
``ernie_lab.routing.record`` reads them with forward hooks: the block itself keeps nothing.

A compiled decode step (``fast_decode.py``, ``torch.compile(fullgraph=True)``) cannot trace dispatch: how
many tokens each expert gets is data (``bincount(...).tolist()``), and a graph holds no shapes that depend
on data. So while compiling, the expert part is one opaque operator, ``ernie_lab::moe_experts``, whose
fake kernel says only "an output shaped like x" and whose real kernel runs this very :func:`dispatch`
on the block's own experts (the block found by a key, an int, in a registry that ``register_for_compile``
fills). The router, softmax, top-k and the shared experts stay in the graph. Why this and not gpt-fast's
Mixtral form (experts stacked into (E, ...) tensors, ``w[expert_ids]`` gathered per token): one copy of
the expert math, which works for every expert format the eager dispatch runs (fp32, bf16, quantized:
quantizing the experts of a compiled model needs no recompile), and no per-step copy of the chosen
experts' weights (on a bandwidth-bound CPU that triples expert traffic). The price: the experts run
eagerly inside the graph, a few Python-dispatched ops per chosen expert, which at tiny widths is most of
a decode step (an 18-layer micro MoE: 1.2x faster compiled, where a dense one gains 2.6x). So within a
compiled generate a single token's experts skip the layers' forwards and run on kernels bound to their
weights once (:func:`bound_experts`, the same C calls, the same numbers): about 90 instead of 430 us of
Python per MoE layer and token. Compiled decode of the whole 21B-A3B (random weights): 1.02x in w4a16 and
1.05x in w4a8 (1.09x at its shape with 8 experts a layer, which reads fewer distinct weights).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ErnieConfig
from ..errors import InputError
from .mlp import SwiGLU, swiglu


class Routing(NamedTuple):
    """What :func:`route` decides for one group's tokens."""

    probs: torch.Tensor       # (N, E) float32 softmax over all experts
    expert_ids: torch.Tensor  # (N, k) long, chosen experts (best first)
    weights: torch.Tensor     # (N, k) float32 mixing weights, each row sums to 1


class RouterOutput(NamedTuple):
    """What one MoE layer's routers decided, for every token: read by the losses and the routing record."""

    logits: torch.Tensor      # (N, E) float32, N = B * T tokens batch-major; each row from its own group's router
    expert_ids: torch.Tensor  # (N, k) long, chosen experts (best first), numbered inside the token's group
    weights: torch.Tensor     # (N, k) float32 mixing weights, each row sums to 1
    modality: torch.Tensor    # (N,) long: the group (0 = text, 1 = vision) that routed each token

    def group(self, code: int) -> torch.Tensor:
        """(n, E) the logits of the tokens routed in group ``code``."""
        return self.logits[self.modality.to(self.logits.device) == code]


class MoEOutput(NamedTuple):
    hidden: torch.Tensor      # (B, T, H) the block's output
    routing: RouterOutput     # how its N = B * T tokens were routed


class Router(nn.Linear):
    """The router of one expert group: (N, H) tokens -> (N, E) logits, always in float32 (even under
    autocast or in a bf16 model), since tiny rounding here changes which experts run."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__(hidden, num_experts, bias=False, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())


def route(logits: torch.Tensor, k: int, norm_min: float = 1e-12,
          correction_bias: torch.Tensor | None = None) -> Routing:
    """Choose k experts per token from (N, E) router logits; the (E,) bias only affects the choice."""
    probs = logits.float().softmax(dim=-1)                         # (N, E)
    scores = probs if correction_bias is None else probs + correction_bias.float()
    expert_ids = scores.topk(k, dim=-1).indices                    # (N, k)
    chosen = probs.gather(-1, expert_ids)                          # (N, k) unbiased probabilities
    weights = chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=norm_min)
    return Routing(probs, expert_ids, weights)


def dispatch(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
             experts: Sequence[nn.Module], idle_too: bool = False) -> torch.Tensor:
    """sum_j weights[t, j] * experts[expert_ids[t, j]](x[t]) for every token t, grouped by expert.

    x (N, H); expert_ids, weights (N, k); experts: E modules mapping (n, H) -> (n, H). Returns (N, H).
    The N * k (token, slot) pairs are sorted by expert, so expert e's tokens form one slice of the
    sorted list: each active expert runs once, as batched matmuls over all of its tokens. ``idle_too``
    runs an expert without tokens as well, on 0 rows: its weights then get a zero gradient instead of
    none, so every rank of a sharded (FSDP) run reduces the same tensors. A single token (batch-1 decode)
    skips the sorting: its k experts run in turn, a third less work per layer for the same numbers.
    """
    N, k = expert_ids.shape
    if N == 1 and not idle_too:  # one token (batch-1 decode): its k experts in turn, nothing to sort
        return one_token(x, weights, [experts[e] for e in expert_ids[0].tolist()])
    pair_expert = expert_ids.reshape(-1)                            # (N*k,) pair p = (token p // k, slot p % k)
    order = pair_expert.argsort(stable=True)                        # sorted position -> pair
    counts = torch.bincount(pair_expert, minlength=len(experts)).tolist()  # tokens per expert
    x_sorted = x.index_select(0, order // k)                        # (N*k, H) token rows, grouped by expert
    y_sorted = torch.cat([experts[e](rows)                          # (N*k, H) one call per active expert
                          for e, rows in enumerate(x_sorted.split(counts)) if counts[e] or idle_too])
    y_pairs = y_sorted.index_select(0, order.argsort())             # (N*k, H) back in pair order
    return (y_pairs.view(N, k, -1) * weights[..., None]).sum(dim=1)  # (N, H) weighted sum over the k slots


def one_token(x: torch.Tensor, weights: torch.Tensor, experts: Sequence) -> torch.Tensor:
    """x (1, H), one token, through its k chosen experts (callables (1, H) -> (1, H), best first), mixed by
    weights (1, k): the weighted sum of ``dispatch``, in the same order."""
    y_slots = torch.stack([expert(x) for expert in experts], dim=1)   # (1, k, H)
    return (y_slots * weights[..., None]).sum(dim=1)                 # (1, H)


class MoEStatics(nn.Module):
    """Holds the correction bias, one row of E per expert group (1 for text models, 2 for VL)."""

    def __init__(self, groups: int, num_experts: int):
        super().__init__()
        self.e_score_correction_bias = nn.Parameter(torch.zeros(groups, num_experts), requires_grad=False)


class MoEBlock(nn.Module):
    """The feed-forward block of an ERNIE 4.5 MoE layer (replaces the SwiGLU of dense layers).

    ``group_widths`` gives one expert width per group: ``(1536,)`` for the 21B text model,
    ``(1536, 512)`` for the VL-28B's text and vision experts. Every group has E experts, its own
    router (``routers[g]``) and its own correction-bias row. Submodule names follow the Hub:
    ``experts.{n}.{gate,up,down}_proj`` (group 0's experts first), ``shared_experts.*``, ``moe_statics``.
    """

    def __init__(self, config: ErnieConfig, layer_idx: int, group_widths: Sequence[int] | None = None):
        super().__init__()
        hidden, num_experts = config.hidden_size, config.moe_num_experts
        widths = tuple(group_widths or (config.moe_intermediate_size,))
        self.layer_idx = layer_idx                                  # the decoder layer this block sits in
        self.num_experts, self.num_groups = num_experts, len(widths)
        self.k, self.norm_min = config.moe_k, config.moe_norm_min
        self.idle_experts_run = False   # the Trainer's FSDP mode: idle experts get zero gradients (dispatch)
        self.compile_key: int | None = None  # this block's key in the compiled step's registry (register_for_compile)
        self.routers = nn.ModuleList(Router(hidden, num_experts) for _ in widths)
        use_bias = config.extra.get("moe_use_aux_free", True)
        self.moe_statics = MoEStatics(len(widths), num_experts) if use_bias else None
        self.experts = nn.ModuleList(SwiGLU(hidden, width, config.use_bias) for width in widths
                                     for _ in range(num_experts))
        shared = config.moe_num_shared_experts
        # n shared experts of width I act as one SwiGLU of width n * I (I: the first group's width)
        self.shared_experts = SwiGLU(hidden, widths[0] * shared, config.use_bias) if shared else None

    @property
    def gate(self) -> Router:
        """The (first group's) router, under the Hub's name for it."""
        return self.routers[0]

    def group_experts(self, group: int) -> nn.ModuleList:
        """The E experts of one group."""
        return self.experts[group * self.num_experts:(group + 1) * self.num_experts]

    def forward(self, x: torch.Tensor, modality: torch.Tensor | None = None) -> MoEOutput:
        """x (B, T, H); modality (B, T) group of each token (None: all in group 0).
        Returns the (B, T, H) output and the layer's :class:`RouterOutput`."""
        tokens = x.reshape(-1, x.shape[-1])                         # (N, H), N = B * T, batch-major
        if modality is not None:
            modality = self._checked_modality(modality.reshape(-1).to(tokens.device))  # (N,) or None
        if modality is None:
            y, routing = self._route_group(tokens, 0)
            routing = routing._replace(modality=torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device))
        else:
            y, routing = self._route_groups(tokens, modality)
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)
        return MoEOutput(y.view(x.shape), routing)

    def _checked_modality(self, modality: torch.Tensor) -> torch.Tensor | None:
        """Codes outside the groups are an error; a single-group block routes every token in group 0 (None)."""
        if bool((modality < 0).any() | (modality >= self.num_groups).any()):
            raise InputError(f"modality codes must be in [0, {self.num_groups}) for this MoE layer, "
                             f"got {sorted(set(modality.tolist()))}.")
        return None if self.num_groups == 1 else modality

    def _route_group(self, tokens: torch.Tensor, group: int) -> tuple[torch.Tensor, RouterOutput]:
        """Route ``tokens`` (n, H) inside one group: outputs (n, H) and their routing (modality left None)."""
        logits = self.routers[group](tokens)                        # (n, E) float32
        bias = self.moe_statics.e_score_correction_bias[group] if self.moe_statics is not None else None
        _, expert_ids, weights = route(logits, self.k, self.norm_min, bias)
        if torch.compiler.is_compiling():  # the experts as one opaque node of the graph (module docstring)
            y = torch.ops.ernie_lab.moe_experts(tokens, expert_ids, weights.to(tokens.dtype),
                                                self._compile_key(), group)
        else:
            y = dispatch(tokens, expert_ids, weights.to(tokens.dtype), self.group_experts(group),
                         idle_too=self.idle_experts_run and torch.is_grad_enabled())
        return y, RouterOutput(logits, expert_ids, weights, None)

    def _compile_key(self) -> int:
        """The key set by :func:`register_for_compile` (read while tracing, so only a None check here)."""
        if self.compile_key is None:
            raise InputError(f"MoE layer {self.layer_idx} is being compiled but is not registered for it: compile "
                             "through ernie_lab.generate(..., compile=True), or call "
                             "ernie_lab.model.moe.register_for_compile(model) before torch.compile.")
        return self.compile_key

    def _route_groups(self, tokens: torch.Tensor, modality: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """Modality-isolated routing: each token routed only inside its own group; results in token order."""
        N, E = tokens.shape[0], self.num_experts
        y = torch.zeros_like(tokens)
        logits = tokens.new_zeros(N, E, dtype=torch.float32)
        ids = torch.zeros(N, self.k, dtype=torch.long, device=tokens.device)
        weights = tokens.new_zeros(N, self.k, dtype=torch.float32)
        for group in range(self.num_groups):
            rows = (modality == group).nonzero().squeeze(1)          # the tokens of this group
            if rows.numel() == 0:
                continue
            y_g, routed = self._route_group(tokens[rows], group)
            y = y.index_put((rows,), y_g)
            logits = logits.index_put((rows,), routed.logits)
            ids[rows], weights[rows] = routed.expert_ids, routed.weights
        return y, RouterOutput(logits, ids, weights, modality)


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE blocks of a model (text or vision-language), in depth order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]


# ------------------------------------------------------------------ the experts as one operator, for torch.compile
_REGISTERED: "weakref.WeakValueDictionary[int, MoEBlock]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


def register_for_compile(model: nn.Module) -> None:
    """Give every MoE block of ``model`` a key the ``ernie_lab::moe_experts`` operator finds it by.
    A block keeps its key; a copy of a block (``copy.deepcopy``) gets a new one here (until then it holds
    its original's key, so register a copied model before compiling it: ``generate`` always does)."""
    for block in moe_blocks(model):
        if _REGISTERED.get(block.compile_key) is not block:
            block.compile_key = next(_KEYS)
            _REGISTERED[block.compile_key] = block


@torch.library.custom_op("ernie_lab::moe_experts", mutates_args=())
def experts_operator(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, block_key: int,
                     group: int) -> torch.Tensor:
    """:func:`dispatch` on the experts of group ``group`` of the registered block ``block_key``: (N, H) -> (N, H).
    Inside ``bound_experts`` a single token's experts run on their bound kernels (the same numbers)."""
    experts = _REGISTERED[block_key].group_experts(group)
    if _BINDING["active"] and x.shape[0] == 1:
        kernels = [_bound_expert(experts, block_key, group, e, x.dtype) for e in expert_ids[0].tolist()]
        if None not in kernels:
            return one_token(x, weights, kernels)
    return dispatch(x, expert_ids, weights, experts)


@experts_operator.register_fake
def _(x, expert_ids, weights, block_key, group):
    return torch.empty_like(x)                                      # (N, H), all the tracer needs


# ------------------------------------------------------------------ a one-token step's experts, their kernels bound
# In a compiled decode step the experts still run eagerly, inside the operator: each of a token's k experts is
# three layer calls, and each layer call checks its input and asks the kernel table which kernel runs it, about
# 40 us of Python per expert around a few us of C (k = 6 experts in each of the 21B-A3B's 27 MoE layers: ~7 ms
# a token). A step that vouches nothing changed since the last one can bind each expert's three kernels to its
# weights once (``kernels.bound``: the very calls the layers make) and reuse them: the same numbers, no choosing.
_BINDING = {"active": False, "allowed": True}
_BOUND: dict = {}   # (block key, group, expert, dtype) -> the expert on its bound kernels, or None (this binding)


@contextlib.contextmanager
def bound_experts(fresh: bool):
    """Inside this block ``ernie_lab::moe_experts`` runs a single token's experts on bound kernels.
    ``fresh``: bind again (the model, its weights or the kernel switches may have changed since the last
    step); else reuse the kernels bound by earlier steps. ``fast_decode.CompiledStep`` runs each step in it."""
    if fresh:
        _BOUND.clear()   # every earlier binding is stale, and may hold tensors the model has dropped since
    _BINDING["active"] = _BINDING["allowed"]
    try:
        yield
    finally:
        _BINDING["active"] = False


@contextlib.contextmanager
def experts_unbound():
    """Inside this block compiled steps run every expert through ``dispatch`` (to measure what binding gains)."""
    allowed, _BINDING["allowed"] = _BINDING["allowed"], False
    try:
        yield
    finally:
        _BINDING["allowed"] = allowed


def _bound_expert(experts: nn.ModuleList, block_key: int, group: int, expert: int, dtype: torch.dtype):
    """``experts[expert]`` (of group ``group`` of the block registered as ``block_key``) as one function of a (1, H)
    ``dtype`` row: SwiGLU on its three layers' bound kernels (``decode_kernel``), bound once per binding
    (``bound_experts``); None where one of them has no such kernel (a plain nn.Linear, LoRA, a PyTorch kernel)
    or the expert is not a plain SwiGLU."""
    key = (block_key, group, expert, dtype)
    if key not in _BOUND:
        _BOUND[key] = _bind_swiglu(experts[expert], dtype)
    return _BOUND[key]


def _bind_swiglu(expert: nn.Module, dtype: torch.dtype):
    """A (1, H) -> (1, H) function computing ``expert`` (a SwiGLU) on its layers' bound kernels, or None."""
    if type(expert) is not SwiGLU:
        return None
    layers = (expert.gate_proj, expert.up_proj, expert.down_proj)
    kernels = [getattr(layer, "decode_kernel", lambda dtype: None)(dtype) for layer in layers]
    return None if None in kernels else functools.partial(swiglu, gate=kernels[0], up=kernels[1], down=kernels[2])

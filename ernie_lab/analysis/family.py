"""The ERNIE 4.5 family at scale: parameters, memory, compute and scale-out, from a config alone.

Nothing here builds a model; every number follows from the integers of a parsed config (``config.py``
reads every config.json dialect; the family's published shapes are tables in ``model/published.py``)::

    total params    = embeddings (+ untied lm_head) + L x (attention + norms) + dense MLPs + MoE layers
                      (+ vision encoder + adapter for the VL models)
    active params   = the weights one token multiplies by: k of the E routed experts per MoE layer, none
                      of the other modality's experts, and the V x H matrix of the output projection once
    KV bytes/token  = 2 (K and V) x L x kv_heads x head_dim x bytes_per_value          (GQA: kv_heads << heads)
    FLOPs/token     ~ 2 x active + 4 x L x heads x head_dim x context                 (matmuls + attention)
    MFU             = tokens/s x FLOPs/token / peak FLOP/s

The ERNIE twist is the heterogeneous MoE of the VL models: one MoE layer holds two expert banks of
different widths (64 text experts of width 1536 and 64 vision experts of width 512 in the 28B), each
with its own router, and a token pays only for the k experts of its own modality; the shared experts
see every token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..model.published import (CHECKPOINTS, CONFIG_0_3B, CONFIG_21B_A3B, CONFIG_300B_A47B, CONFIG_VL_28B_A3B,  # noqa: F401
                          CONFIG_VL_424B_A47B, Checkpoint, checkpoint)
from ..model.config import ErnieConfig, VLConfig, parse_config
from ..errors import ConfigError, InputError

# ================================================================================================
# 3. Reading a config into the handful of integers that fix every shape
# ================================================================================================

@dataclass(frozen=True)
class VisionShape:
    """The ViT encoder and the adapter that feeds its output to the decoder."""

    depth: int                # ViT blocks
    width: int                # ViT hidden size
    mlp_width: int            # ViT MLP width
    num_heads: int
    patch_size: int
    in_channels: int
    spatial_merge: int        # adapter merges spatial_merge^2 patches ...
    temporal_merge: int       # ... and temporal_merge frames into one decoder token


@dataclass(frozen=True)
class ModelShape:
    """Everything :func:`count_params` needs, derived from a parsed config (see :func:`model_shape`)."""

    kind: str                          # "dense", "moe" or "vl_moe"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int             # dense MLP width
    tie_word_embeddings: bool
    use_bias: bool
    max_position_embeddings: int
    moe_layers: tuple[bool, ...]       # per layer: MoE block (True) or dense MLP (False)
    num_experts: int = 0               # routed (text) experts per MoE layer
    experts_per_token: int = 0         # k
    expert_size: int = 0               # width of one routed (text) expert
    num_shared_experts: int = 0        # shared experts act as one MLP of num_shared x expert_size
    num_vision_experts: int = 0        # VL only: the second expert bank
    vision_experts_per_token: int = 0
    vision_expert_size: int = 0
    vision: VisionShape | None = None

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)


def model_shape(config: Any) -> ModelShape:
    """The shape of a model from its config: a parsed ``ErnieConfig`` / ``VLConfig``, or anything
    :func:`ernie_lab.config.parse_config` reads (a config.json dict in any dialect, a ``transformers``
    config or any object with ``.to_dict()``, a dataclass with config fields, a :class:`Checkpoint`)."""
    return shape_of(parsed(config))


def parsed(config: Any) -> ErnieConfig | VLConfig:
    """``config`` as the kit's parsed config (config.py is the only reader of config.json dialects)."""
    if isinstance(config, (ErnieConfig, VLConfig)):
        return config
    return parse_config(_as_dict(config), source=f"the {type(config).__name__} given")


def _as_dict(config: Any) -> dict:
    if isinstance(config, str):
        try:  # a published checkpoint's name or Hub id: its config
            return dict(checkpoint(config).config)
        except InputError:
            pass
        raise ConfigError(f"config {config!r} is not a published checkpoint name (known: {', '.join(CHECKPOINTS)}); "
                          "for a folder, pass the dict that json.load reads from its config.json.")
    if isinstance(config, Checkpoint):
        return dict(config.config)
    if isinstance(config, dict):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    raise ConfigError(f"Cannot read a model config from a {type(config).__name__}: pass a config.json dict, "
                      "an object with .to_dict() (transformers or ernie_lab config), or a Checkpoint.")


def shape_of(config: ErnieConfig | VLConfig) -> ModelShape:
    """Derive the counting shape from a parsed config."""
    text = config.get_text_config()
    fields = dict(vocab_size=text.vocab_size, hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
                  num_heads=text.num_attention_heads, num_kv_heads=text.num_key_value_heads, head_dim=text.head_dim,
                  intermediate_size=text.intermediate_size, tie_word_embeddings=text.tie_word_embeddings,
                  use_bias=text.use_bias, max_position_embeddings=text.max_position_embeddings,
                  moe_layers=text.moe_layers)
    if not text.is_moe:
        return ModelShape(kind="dense", **fields)
    experts = dict(num_experts=text.moe_num_experts, experts_per_token=text.moe_k,
                   expert_size=text.moe_intermediate_size, num_shared_experts=text.moe_num_shared_experts)
    if not isinstance(config, VLConfig):
        return ModelShape(kind="moe", **experts, **fields)
    v = config.vision
    vision = VisionShape(depth=v.depth, width=v.hidden_size, mlp_width=v.intermediate_size, num_heads=v.num_heads,
                         patch_size=v.patch_size, in_channels=v.in_channels, spatial_merge=v.spatial_merge_size,
                         temporal_merge=v.temporal_merge_size)
    return ModelShape(kind="vl_moe", num_vision_experts=text.moe_num_experts, vision_experts_per_token=text.moe_k,
                      vision_expert_size=config.vision_moe_intermediate_size, vision=vision, **experts, **fields)


def _number(name: str, value, *, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, below: float | None = None, integer: bool = False) -> float:
    """``value`` checked as a finite real number (an int where ``integer``) in range, or an InputError naming it."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise InputError(f"{name} must be {kind}, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    bounds = [(minimum, lambda v, b: v >= b, ">="), (above, lambda v, b: v > b, ">"),
              (maximum, lambda v, b: v <= b, "<="), (below, lambda v, b: v < b, "<")]
    for bound, ok, sign in bounds:
        if bound is not None and not ok(value, bound):
            raise InputError(f"{name} must be {sign} {bound:g}, got {value!r}.")
    return value


def _precision(precision) -> str:
    """A precision name of PRECISION_BITS (any case, surrounding spaces ignored), or an InputError."""
    name = precision.strip().lower() if isinstance(precision, str) else None
    if name not in PRECISION_BITS:
        raise InputError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISION_BITS)}.")
    return name


def _modality(modality) -> str:
    if modality not in ("text", "vision"):
        raise InputError(f"modality must be 'text' or 'vision', got {modality!r}.")
    return modality


# ================================================================================================
# 4. Parameter counts, by component
# ================================================================================================

COMPONENTS = ("embeddings", "lm_head", "attention", "norms", "dense_mlp", "router", "routed_experts",
              "vision_experts", "shared_experts", "vision_encoder", "adapter")


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one model, total and active per token, split by component (see COMPONENTS)."""

    by_component: dict[str, int]
    active_by_component: dict[str, int]
    modality: str = "text"            # the kind of token "active" is counted for

    @property
    def total(self) -> int:
        return sum(self.by_component.values())

    @property
    def active(self) -> int:
        return sum(self.active_by_component.values())

    def __str__(self) -> str:
        return f"{self.total / 1e9:.2f} B total, {self.active / 1e9:.2f} B active per {self.modality} token"


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _swiglu(hidden: int, width: int, bias: bool) -> int:
    """gate_proj and up_proj (hidden -> width) and down_proj (width -> hidden)."""
    return 2 * _linear(hidden, width, bias) + _linear(width, hidden, bias)


def _attention(s: ModelShape) -> int:
    """q_proj, k_proj, v_proj, o_proj; K and V have only num_kv_heads heads (GQA)."""
    q_width, kv_width = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    return (_linear(s.hidden_size, q_width, s.use_bias) + 2 * _linear(s.hidden_size, kv_width, s.use_bias)
            + _linear(q_width, s.hidden_size, s.use_bias))


def _router(num_experts: int, hidden: int) -> int:
    """Gate weight (experts x hidden) plus the per-expert correction bias used only to pick the top-k."""
    return num_experts * hidden + num_experts


def _experts(num_experts: int, hidden: int, width: int) -> int:
    """Routed experts are bias-free SwiGLUs."""
    return num_experts * _swiglu(hidden, width, bias=False)


def _vision_encoder(v: VisionShape) -> int:
    """Patch projection (no bias), `depth` pre-LayerNorm ViT blocks, final LayerNorm."""
    w = v.width
    block = (2 * 2 * w                                  # two LayerNorms (weight + bias)
             + _linear(w, 3 * w, True) + _linear(w, w, True)  # fused qkv and output projection
             + _linear(w, v.mlp_width, True) + _linear(v.mlp_width, w, True))
    return v.in_channels * v.patch_size ** 2 * w + v.depth * block + 2 * w


def _adapter(v: VisionShape, text_hidden: int) -> int:
    """Merge 2x2 patches (and 2 frames) by concatenation, two MLPs + LayerNorm each, project, RMSNorm."""
    spatial = v.width * v.spatial_merge ** 2            # 1280 x 4 = 5120
    temporal = spatial * v.temporal_merge               # 10240
    spatial_mlp = 2 * _linear(spatial, spatial, True) + 2 * spatial
    temporal_mlp = _linear(temporal, spatial, True) + _linear(spatial, spatial, True) + 2 * spatial
    return spatial_mlp + temporal_mlp + _linear(spatial, text_hidden, True) + text_hidden


def count_params(config: Any, modality: str = "text") -> ParamCount:
    """Count the parameters of the ``transformers`` model that ``config`` describes, without building it.

    ``total`` equals ``sum(p.numel())`` of ``Ernie4_5ForCausalLM`` / ``Ernie4_5_MoeForCausalLM`` /
    ``Ernie4_5_VLMoeForConditionalGeneration`` built from the same config. ``active`` counts the weights
    one ``modality`` token ("text" or "vision") multiplies by::

        active = total - (E - k)/E of the routed experts - the other modality's experts and router
                 - the input embedding table when untied (a lookup reads one row, it multiplies nothing)
                 - the vision encoder and adapter (for a text token)

    A tied embedding counts once in ``active``: its matrix is the output projection.
    """
    _modality(modality)
    s = model_shape(config)
    if modality == "vision" and s.vision is None:
        raise InputError(f"A {s.kind} model has no vision tokens; count a VL config or use modality='text'.")
    total = dict.fromkeys(COMPONENTS, 0)
    active = dict.fromkeys(COMPONENTS, 0)
    h, vocab, n_moe = s.hidden_size, s.vocab_size, s.num_moe_layers

    total["embeddings"] = vocab * h
    lm_head_bias = vocab if (s.kind == "moe" and s.use_bias) else 0   # only the text-MoE class has one
    total["lm_head"] = (0 if s.tie_word_embeddings else vocab * h) + lm_head_bias
    if s.tie_word_embeddings:
        active["embeddings"], active["lm_head"] = vocab * h, lm_head_bias
    else:
        active["lm_head"] = total["lm_head"]

    total["attention"] = active["attention"] = s.num_layers * _attention(s)
    total["norms"] = active["norms"] = (2 * s.num_layers + 1) * h
    total["dense_mlp"] = active["dense_mlp"] = (s.num_layers - n_moe) * _swiglu(h, s.intermediate_size, s.use_bias)
    shared_width = s.num_shared_experts * s.expert_size
    total["shared_experts"] = active["shared_experts"] = n_moe * (_swiglu(h, shared_width, s.use_bias)
                                                                  if shared_width else 0)
    total["routed_experts"] = n_moe * _experts(s.num_experts, h, s.expert_size)
    total["router"] = n_moe * _router(s.num_experts, h)
    if s.kind == "vl_moe":
        total["vision_experts"] = n_moe * _experts(s.num_vision_experts, h, s.vision_expert_size)
        total["router"] += n_moe * _router(s.num_vision_experts, h)
        total["vision_encoder"] = _vision_encoder(s.vision)
        total["adapter"] = _adapter(s.vision, h)
    if modality == "text":
        active["routed_experts"] = n_moe * _experts(s.experts_per_token, h, s.expert_size)
        active["router"] = n_moe * _router(s.num_experts, h)
    else:
        active["vision_experts"] = n_moe * _experts(s.vision_experts_per_token, h, s.vision_expert_size)
        active["router"] = n_moe * _router(s.num_vision_experts, h)
        active["vision_encoder"], active["adapter"] = total["vision_encoder"], total["adapter"]
    return ParamCount(total, active, modality)


# ================================================================================================
# 5. Memory: weights at a precision, and the KV cache
# ================================================================================================

PRECISION_BITS = {"bf16": 16, "fp8": 8, "int8": 8, "int4": 4, "2bit": 2}


def weight_bytes(config: Any, precision: str = "bf16", group_size: int | None = 128) -> int:
    """Bytes to hold every weight at ``precision``.

    Quantised weights store ``bits/8`` bytes per value plus one bf16 scale per ``group_size`` values
    (``group_size=None``: one scale per row, negligible). Norms and routers stay in 16-bit, as
    deployments usually keep them (they are < 0.1% of the parameters)::

        bytes = matrices x bits / 8 + matrices / group_size x 2 + (norms + routers) x 2
    """
    precision = _precision(precision)
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
        raise InputError(f"group_size must be a positive integer or None, got {group_size!r}.")
    counts = count_params(config)
    small = counts.by_component["norms"] + counts.by_component["router"]
    matrices = counts.total - small
    bits = PRECISION_BITS[precision]
    scales = 0 if bits == 16 or group_size is None else math.ceil(matrices / group_size) * 2
    return math.ceil(matrices * bits / 8) + scales + small * 2


def kv_cache_bytes_per_token(config: Any, bytes_per_value: float = 2, gqa: bool = True) -> float:
    """2 (K and V) x layers x kv_heads x head_dim x bytes. ``gqa=False``: as if every head kept its K/V."""
    _number("bytes_per_value", bytes_per_value, above=0)
    if not isinstance(gqa, bool):
        raise InputError(f"gqa must be True or False, got {gqa!r}.")
    s = model_shape(config)
    heads = s.num_kv_heads if gqa else s.num_heads
    return 2 * s.num_layers * heads * s.head_dim * bytes_per_value


def kv_cache_bytes(config: Any, context_tokens: int, batch: int = 1, bytes_per_value: float = 2,
                   gqa: bool = True) -> float:
    """KV cache of ``batch`` sequences of ``context_tokens`` tokens each."""
    _number("context_tokens", context_tokens, minimum=0, integer=True)
    _number("batch", batch, minimum=1, integer=True)
    return kv_cache_bytes_per_token(config, bytes_per_value, gqa) * context_tokens * batch


# ================================================================================================
# 6. Compute: FLOPs per token and model FLOPs utilisation
# ================================================================================================

def flops_per_token(config: Any, context_tokens: int, phase: str = "decode") -> float:
    """Forward FLOPs for one text token (a multiply-add = 2 FLOPs).

    decode  (the token attends to ``context_tokens`` keys, itself included)::

        2 x active + 4 x L x heads x head_dim x context

    prefill (a prompt of ``context_tokens`` tokens, causal: token i attends to i+1 tokens, so the
    average token sees (context + 1) / 2)::

        2 x active + 4 x L x heads x head_dim x (context + 1) / 2

    "active" here means the active weight *matrices*: norms and the routers' correction biases are
    additions, not multiplications, and are left out, as are RoPE and the softmax (O(hidden) per token).
    Linear-layer biases (only with ``use_bias``) are counted as if they were weights.
    """
    if phase not in ("decode", "prefill"):
        raise InputError(f"phase must be 'decode' or 'prefill', got {phase!r}.")
    _number("context_tokens", context_tokens, minimum=0, integer=True)
    s = model_shape(config)
    active = count_params(config).active_by_component
    matrices = sum(active.values()) - active["norms"] - s.num_moe_layers * s.num_experts  # minus correction biases
    seen = context_tokens if phase == "decode" else (context_tokens + 1) / 2
    return 2 * matrices + 4 * s.num_layers * s.num_heads * s.head_dim * seen


def training_flops_per_token(config: Any, seq_len: int) -> float:
    """Forward + backward = 3 x forward (the backward pass costs two forwards): 6 x active + attention."""
    _number("seq_len", seq_len, minimum=1, integer=True)
    return 3 * flops_per_token(config, seq_len, phase="prefill")


def mfu(tokens_per_second: float, flops_per_token_: float, peak_flops: float) -> float:
    """Model FLOPs utilisation = useful FLOP/s / peak FLOP/s, all per GPU (or all for the cluster)."""
    _number("tokens_per_second", tokens_per_second, above=0)
    _number("flops_per_token", flops_per_token_, above=0)
    _number("peak_flops", peak_flops, above=0)
    return tokens_per_second * flops_per_token_ / peak_flops


def tokens_per_second_at_mfu(mfu_: float, flops_per_token_: float, peak_flops: float) -> float:
    """The inverse: the throughput that a given MFU means on given hardware."""
    _number("mfu", mfu_, above=0, maximum=1)
    _number("flops_per_token", flops_per_token_, above=0)
    _number("peak_flops", peak_flops, above=0)
    return mfu_ * peak_flops / flops_per_token_


# ================================================================================================
# 7. Hardware (NVIDIA datasheet numbers; links quoted as one direction per GPU)
# ================================================================================================

@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gib: float                 # nominal device memory
    bf16_tflops: float | None         # dense BF16 tensor-core peak (no sparsity)
    fp8_tflops: float | None          # dense FP8 peak
    intra_node_gb_s: float | None     # NVLink, GB/s each way per GPU (datasheets quote both ways summed)
    inter_node_gb_s: float | None     # one 400 Gb/s InfiniBand NIC per GPU = 50 GB/s each way


ACCELERATORS = {
    "A100-80GB": Accelerator("A100 SXM 80GB", 80, 312, None, 300, 25),   # NVLink3 600 GB/s, HDR 200 Gb/s
    "H100-80GB": Accelerator("H100 SXM 80GB", 80, 989, 1979, 450, 50),   # NVLink4 900 GB/s, NDR 400 Gb/s
    "H800-80GB": Accelerator("H800 SXM 80GB", 80, 989, 1979, 200, 50),   # export part: NVLink 400 GB/s
    "H200-141GB": Accelerator("H200 SXM 141GB", 141, 989, 1979, 450, 50),
    "laptop-16GB": Accelerator("laptop, 16 GB RAM", 16, None, None, None, None),
    "laptop-32GB": Accelerator("laptop, 32 GB unified memory", 32, None, None, None, None),
}


# ================================================================================================
# 8. Scale-out on paper: how many GPUs, and what they say to each other
# ================================================================================================

GIB = 2 ** 30


def gpus_needed(config: Any, precision: str, gpu_memory_gib: float, context_tokens: int = 0, batch: int = 1,
                reserve_fraction: float = 0.1, kv_bytes_per_value: float = 2) -> int:
    """Fewest GPUs whose memory holds the weights and the KV cache::

        ceil((weight_bytes + kv_cache_bytes) / (gpu_memory x (1 - reserve_fraction)))

    ``reserve_fraction`` keeps room for activations, CUDA context and fragmentation. Real deployments
    round up to a parallel degree the layout allows (usually a power of two).
    """
    if isinstance(gpu_memory_gib, str) and gpu_memory_gib in ACCELERATORS:
        raise InputError(f"gpu_memory_gib must be a number of GiB, got {gpu_memory_gib!r}; for that card pass "
                         f"ACCELERATORS[{gpu_memory_gib!r}].memory_gib ({ACCELERATORS[gpu_memory_gib].memory_gib}).")
    _number("gpu_memory_gib", gpu_memory_gib, above=0)
    _number("reserve_fraction", reserve_fraction, minimum=0, below=1)
    precision = _precision(precision)
    _number("context_tokens", context_tokens, minimum=0, integer=True)
    _number("batch", batch, minimum=1, integer=True)
    _number("kv_bytes_per_value", kv_bytes_per_value, above=0)
    need = weight_bytes(config, precision) + kv_cache_bytes(config, context_tokens, batch, kv_bytes_per_value)
    return max(1, math.ceil(need / (gpu_memory_gib * GIB * (1 - reserve_fraction))))


def _remote_copies(num_experts: int, k: int, ep_degree: int, dedup: bool) -> float:
    """Expected copies of a token's hidden state that leave its GPU in one dispatch.

    Experts are spread evenly, E/N per GPU; the token's own GPU holds one N-th of them.
    Without de-duplication each of the k chosen experts on another GPU gets its own copy:
    k x (N - 1) / N. With it (one copy per destination GPU, as DeepEP-style kernels do), the expected
    number of other GPUs hit is (N - 1) x (1 - C(E - E/N, k) / C(E, k)).
    """
    if not dedup:
        return k * (ep_degree - 1) / ep_degree
    per_gpu = num_experts // ep_degree
    miss = math.comb(num_experts - per_gpu, k) / math.comb(num_experts, k)
    return (ep_degree - 1) * (1 - miss)


def ep_all_to_all_bytes(config: Any, ep_degree: int, bytes_per_value: float = 2, dedup: bool = False,
                        modality: str = "text") -> float:
    """Bytes one token sends off its GPU in one MoE layer under expert parallelism of degree N::

        2 (dispatch + combine) x remote copies x hidden x bytes_per_value

    (bytes_per_value 1 for an FP8 dispatch). Shared experts and attention are replicated, not dispatched.
    """
    _modality(modality)
    _number("bytes_per_value", bytes_per_value, above=0)
    if not isinstance(dedup, bool):
        raise InputError(f"dedup must be True or False, got {dedup!r}.")
    s = model_shape(config)
    if modality == "vision" and s.vision is None:
        raise InputError(f"A {s.kind} model has no vision experts; use a VL config or modality='text'.")
    experts, k = ((s.num_vision_experts, s.vision_experts_per_token) if modality == "vision"
                  else (s.num_experts, s.experts_per_token))
    if not experts:
        raise InputError("A dense model has no experts to spread: expert parallelism needs a MoE config.")
    if isinstance(ep_degree, bool) or not isinstance(ep_degree, int) or ep_degree < 1 or experts % ep_degree:
        raise InputError(f"ep_degree must divide the {experts} experts evenly, got {ep_degree}.")
    return 2 * _remote_copies(experts, k, ep_degree, dedup) * s.hidden_size * bytes_per_value


def tp_all_reduce_bytes(config: Any, tp_degree: int, bytes_per_value: float = 2) -> float:
    """Bytes one GPU sends per token per layer under Megatron-style tensor parallelism of degree t.

    Each layer ends its attention and its MLP with an all-reduce of the (hidden,) activation; a ring
    all-reduce sends 2 (t - 1) / t of the buffer from every GPU::

        2 all-reduces x 2 (t - 1) / t x hidden x bytes_per_value
    """
    _number("tp_degree", tp_degree, minimum=1, integer=True)
    _number("bytes_per_value", bytes_per_value, above=0)
    s = model_shape(config)
    return 2 * 2 * (tp_degree - 1) / tp_degree * s.hidden_size * bytes_per_value


def ep_all_to_all_seconds(config: Any, ep_degree: int, tokens_per_gpu: int, accelerator: str = "H800-80GB",
                          gpus_per_node: int = 8, bytes_per_value: float = 2, dedup: bool = False) -> float:
    """Bandwidth-only time of one MoE layer's all-to-all, NVLink inside a node and InfiniBand across.

    Of the N - 1 other GPUs of the expert-parallel group, min(N, g) - 1 sit in the same node of g
    GPUs; their share of the traffic goes over NVLink, the rest over the NIC::

        seconds = tokens x bytes_per_token x (f_intra / nvlink + f_inter / infiniband)

    No latency, no overlap with compute: a lower bound that shows why ERNIE 4.5 keeps its expert
    parallelism inside one node.
    """
    if not isinstance(accelerator, str) or accelerator not in ACCELERATORS \
            or ACCELERATORS[accelerator].inter_node_gb_s is None:
        known = [k for k, a in ACCELERATORS.items() if a.inter_node_gb_s]
        raise InputError(f"accelerator must be one of {known}, got {accelerator!r}.")
    _number("tokens_per_gpu", tokens_per_gpu, minimum=0)
    _number("gpus_per_node", gpus_per_node, minimum=1, integer=True)
    hw = ACCELERATORS[accelerator]
    per_token = ep_all_to_all_bytes(config, ep_degree, bytes_per_value, dedup)
    if ep_degree == 1:
        return 0.0
    intra = (min(ep_degree, gpus_per_node) - 1) / (ep_degree - 1)
    seconds_per_byte = intra / (hw.intra_node_gb_s * 1e9) + (1 - intra) / (hw.inter_node_gb_s * 1e9)
    return tokens_per_gpu * per_token * seconds_per_byte

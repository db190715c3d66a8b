"""Quantized inference from scratch: store weights as small integers plus scales, compute with them.

    ernie_lab.quant.quantize(model, "w4a16")     # in place; returns the model

Schemes (W = weight bits, A = activation bits; "a16" = weight-only, activations stay bf16 / fp32):

    w8a16   int8 per output channel, symmetric      w ~ q * s,            q in [-127, 127]
    w4a16   int4 per group of 128 inputs            w ~ (u - 8) * s       u in [0, 15]    (symmetric)
                              or with zero points   w ~ (u - z) * s       z in [0, 15]    (symmetric=False)
    w2a16   int2 per group, zero points by default  w ~ (u - z) * s       u, z in [0, 3]
    w8a8    int8 weights as w8a16, and each token's activations quantized on the fly to int8 with
            their own scale: y = (q_x q_w^T) * s_x * s_w, an int8 x int8 -> int32 matmul
    w4a8    int4 weights as w4a16 (groups a multiple of 32), and activations rounded on the fly to int8
            per block of 32 inputs, one scale each (llama.cpp's Q4_0 x Q8_0): an int8 x int4 -> int32 sum
            per block, scaled in fp32: y = sum_b s_b s_w (sum_k xq_k u_k - z sum_k xq_k)
    fp8     float8 e4m3 weights (one scale per output row) and per-token e4m3 activations (CUDA only)

Stored tensors per quantized linear ``<name>`` (state_dict, and safetensors under the Hub name
of ``<name>.weight`` with ``weight`` replaced):

    <name>.qweight  w8a16 / w8a8: int8 (N, K); fp8: float8_e4m3fn (N, K)
                    w4a16 / w4a8: uint8 (N, K/2), byte j = u[2j] << 4 | u[2j+1]  (first column high nibble)
                    w2a16: uint8 (N, K/4), byte j = u[4j] << 6 | u[4j+1] << 4 | u[4j+2] << 2 | u[4j+3]
    <name>.scales   float32 (N, K / group)  (group = K for per-channel schemes)
    <name>.zeros    uint8 (N, K / group) zero points, only for asymmetric layers
    <name>.bias     the float bias, when the layer has one

and ``config.json`` gains ``quantization_config``: ``{"quant_method": "ernie-lab", "scheme", "group_size",
"symmetric", "modules": {name: {"scheme", "group_size", "symmetric"}}}``, so ``load_model`` rebuilds
exactly those layers. Routers (``mlp.routers.N``, float32), norms, embeddings and the LM head stay in
full precision by default. MoE experts are ordinary linears inside each expert: quantized, they keep
the grouped dispatch of ``moe.dispatch`` (one call per active expert, never a loop over tokens).

The modules: ``formats`` (rounding, packing), ``linear`` (``QuantLinear``: the codes and the plain
dequantize-then-matmul forward), ``kernels`` (the table of faster kernels that must agree with it),
``native`` (the kit's C decode kernels), ``ops`` (those kernels as custom operators ``torch.compile``
traces; the three per-token ones registered from C++ by ``cpp_ops``), ``streaming`` (full-precision linears on them), ``gptq``.
May import: ``ernie_lab.errors``, ``ernie_lab.atomic``, ``ernie_lab.model`` (quantized checkpoints on disk
are ``ernie_lab.io.quantized``'s business).

``calibration=`` (a few (B, T) batches of token ids, or dicts of a model's inputs such as a VL batch with
``pixel_values``) enables GPTQ for w4a16 / w4a8 / w2a16 (``gptq.py``); a layer no batch reaches is rounded (RTN),
with a warning naming it.

Bad input is refused before anything changes (``check_options``, ``check_model``, ``check_calibration``,
``check_not_requantized`` next to ``quantize``; ``check_layout`` / ``check_input`` / ``check_state`` next to
``QuantLinear``): an ``InputError`` (a ``CheckpointError`` for stored codes) naming the argument, batch,
layer or tensor. A model is quantized once from full-precision weights: quantizing already-quantized
layers with another scheme is refused, not silently skipped.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import torch
from torch import nn

from .. import heap
from ..errors import InputError
from ..model.linears import name_matcher, replace_linears, tied_head_name
from . import formats
from .gptq import HessianCollector, gptq_quantize
from . import kernels, native, ops
from .kernels import reference_only
from .linear import SCHEMES, QuantLinear, check_block_group, check_scheme
from .streaming import StreamingLinear, stream_linears

__all__ = ["quantize", "QuantLinear", "SCHEMES", "reference_only", "weight_bytes", "decode_bytes", "formats",
           "quantized_layers", "plan_layers", "native", "ops", "kernels", "stream_linears", "StreamingLinear"]

DEFAULT_SKIP = ("lm_head", "embed", "router")
DEFAULT_SYMMETRIC = {"w8a16": True, "w4a16": True, "w2a16": False, "w8a8": True, "w4a8": True, "fp8": True}
GPTQ_SCHEMES = ("w4a16", "w4a8", "w2a16")


def quantize(model: nn.Module, scheme: str, *, group_size: int = 128, skip=DEFAULT_SKIP, calibration=None,
             symmetric: bool | None = None, filter=None, damp: float = 0.01) -> nn.Module:
    """Replace the model's linear layers by :class:`QuantLinear` of ``scheme``, in place; returns the model.

    ``skip``: substrings (or regexes, searched in the module name) of layers kept in full precision.
    ``filter``: optional regex / function choosing the layers (``model.linears.name_matcher``); choosing
    no linear layer is refused; choosing only layers kept by rule (routers, a tied head) warns and
    changes nothing.
    ``calibration``: a non-empty iterable of (B, T) integer token-id batches or of input dicts; enables
    GPTQ (w4a16 / w4a8 / w2a16 only). NaN / Inf activations are refused; layers no batch reaches are rounded
    to nearest, with a warning naming them.
    ``symmetric``: None = the scheme's default (zero points for w2a16 only); False only for w4a16 / w2a16.
    ``group_size``: a positive int; a layer whose input width it does not divide uses the largest halving
    of it that does (down to 32), else one group per row (``plan_layers``).

    Quantizing works from full-precision weights and never rounds codes twice. Layers that are already
    quantized are left as they are: a second call may quantize *other* layers (mixed precision, e.g.
    ``filter=r".*attn.*"`` in w8a16, then ``filter=r".*mlp.*"`` in w4a16), and repeating a call is a no-op.
    Choosing layers that are already quantized with another scheme, group size or symmetry is refused:
    reload the full-precision model and quantize it once. Every argument (and GPTQ for every layer) is
    checked before the first layer is swapped: a refused call (an ``InputError`` naming the argument,
    batch or layer) leaves the model exactly as it was.
    """
    spec, symmetric = check_options(scheme, group_size, symmetric, damp)
    device = check_model(model)
    if scheme == "fp8" and device.type != "cuda":
        raise InputError("fp8 needs a CUDA GPU (torch._scaled_mm on e4m3): move the model to cuda first, "
                         "or use w8a16 / w8a8 on CPU.")
    if calibration is not None and scheme not in GPTQ_SCHEMES:
        raise InputError(f"calibration (GPTQ) is for {', '.join(GPTQ_SCHEMES)}, not {scheme}; drop calibration= "
                         "for RTN.")
    layers = plan_layers(model, scheme, group_size=group_size, skip=skip, filter=filter)
    done = check_not_requantized(model, scheme, group_size, symmetric, skip, filter)
    if not layers:
        if done:   # every chosen layer already is exactly this: the same call again
            return model
        if _chooses_a_linear(model, skip, filter):   # only layers kept by rule: routers, a tied head, odd widths
            warnings.warn("quantize: the chosen layers stay in full precision by rule (routers, the tied LM head, "
                          "widths that cannot be packed); the model is unchanged.", stacklevel=2)
            return model
        raise InputError(f"quantize chose no linear layer (filter={filter!r}, skip={skip!r}): nothing to quantize. "
                         f"The model's linear layers are {_some(_linear_names(model))}; filter is matched against "
                         "the whole name (re.fullmatch), skip anywhere in it.")
    hessians = collect_hessians(model, layers, check_calibration(calibration)) if calibration is not None else {}
    replacements, trimmer = {}, heap.Trimmer()  # all built, then swapped
    for name in layers:
        linear = model.get_submodule(name)
        replacements[name] = _quantized_layer(linear, name, scheme, layers[name], symmetric, hessians.get(name), damp)
        trimmer.converted(linear.weight.nbytes)  # its temporaries' holes handed back now and then (heap.py)
    replace_linears(model, lambda name, linear: replacements[name], filter=lambda name, module: name in layers)
    del linear  # the last float layer too, so its weight is freed before the trim
    heap.release_freed_memory()  # the float weights just dropped
    model.quantization_config = _record(getattr(model, "quantization_config", None), layers, scheme, group_size,
                                        symmetric)
    return model


# ------------------------------------------------------------------ quantize's checks (before anything changes)
def check_options(scheme, group_size, symmetric, damp) -> tuple:
    """(the Scheme, the symmetric flag to use), or an InputError naming the argument."""
    spec = check_scheme(scheme)
    check_group_size(group_size, scheme)
    if symmetric is not None and not isinstance(symmetric, bool):
        raise InputError(f"symmetric must be True, False or None (the scheme's default), got {symmetric!r}.")
    symmetric = DEFAULT_SYMMETRIC[scheme] if symmetric is None else symmetric
    if not symmetric and spec.bits == 8:
        raise InputError(f"{scheme} is symmetric (int8 / fp8 codes around 0, no zero points): symmetric=False is "
                         "for w4a16, w4a8 and w2a16. Drop symmetric= or pass True.")
    if (not isinstance(damp, (int, float)) or isinstance(damp, bool) or not math.isfinite(damp) or damp < 0):
        raise InputError(f"damp must be a number >= 0 (GPTQ adds damp * mean(diag H) to the Hessian's "
                         f"diagonal; 0.01 is usual), got {damp!r}.")
    return spec, symmetric


def check_group_size(group_size, scheme: str | None = None) -> None:
    """A positive int; for w4a8 also a multiple of 32 (its groups hold whole activation blocks)."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise InputError(f"group_size must be a positive int (inputs per scale, e.g. 32, 64 or 128), got "
                         f"{group_size!r}.")
    check_block_group(scheme, group_size)


def check_model(model) -> torch.device:
    """The device of a model whose weights hold values; an InputError for anything else."""
    if not isinstance(model, nn.Module):
        hint = " Pass the model, not its folder: ernie_lab.load_model(folder, quantize=...)." \
            if isinstance(model, (str, os.PathLike)) else ""
        raise InputError(f"quantize needs a model (an nn.Module), got {type(model).__name__}.{hint}")
    params = list(model.parameters())
    if not params:
        raise InputError(f"quantize: the {type(model).__name__} has no parameters, so no linear layer to quantize.")
    if any(p.is_meta for p in params):
        raise InputError("quantize: the model is on the meta device: its weights hold no values to round. Load "
                         "the weights first, or quantize while loading: ernie_lab.load_model(folder, quantize=...).")
    return params[0].device


def check_not_requantized(model, scheme: str, group_size: int, symmetric: bool, skip, filter) -> bool:
    """True when ``filter`` / ``skip`` choose layers that are already quantized exactly so (a repeated call);
    an InputError when any of them is quantized otherwise (re-rounding codes would lose precision twice)."""
    dropped = _matcher(skip, "skip", whole=False) if skip is not None else (lambda name, module: False)
    chosen = _matcher(filter, "filter")
    already = {name: m for name, m in model.named_modules()
               if isinstance(m, QuantLinear) and chosen(name, m) and not dropped(name, m)}
    grouped = SCHEMES[scheme].grouped
    other = [name for name, m in already.items()
             if (m.scheme, m.symmetric) != (scheme, symmetric)
             or (grouped and m.group_size != _group_for(m.in_features, group_size))]
    if other:
        layer = already[other[0]]
        raise InputError(f"{_some(other)} already quantized ({layer.scheme}, group {layer.group_size}, "
                         f"symmetric={layer.symmetric}); quantize works from full-precision weights and does not "
                         f"re-round codes to {scheme}. To change the scheme, reload the model and quantize it once; "
                         "to quantize only the layers still in full precision, choose them with filter=.")
    return bool(already)


def check_calibration(calibration):
    """The calibration batches, each checked as it is reached (an iterable is read once): integer token ids
    of shape (T,) or (B, T), or a dict of a model's inputs. An InputError names the batch."""
    if isinstance(calibration, (str, bytes, dict)) or not hasattr(calibration, "__iter__"):
        raise InputError(f"calibration must be a list (or other iterable) of batches of token ids, got "
                         f"{type(calibration).__name__}; one batch is calibration=[ids].")
    count = 0
    for i, batch in enumerate(calibration):
        count += 1
        if isinstance(batch, dict):
            if not batch or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in batch.items()):
                raise InputError(f"calibration batch {i}: a dict of inputs maps names (input_ids, pixel_values, ...) "
                                 "to tensors, and holds at least one.")
            yield i, batch
            continue
        try:
            ids = torch.as_tensor(batch)
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"calibration batch {i} is a {type(batch).__name__}, not token ids: give (B, T) "
                             "integer tensors (tokenizer output).") from None
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise InputError(f"calibration batch {i} is {ids.dtype}: token ids must be integers (torch.long); "
                             "calibration runs the model on token ids, not on activations.")
        if ids.dim() not in (1, 2) or ids.numel() == 0:
            raise InputError(f"calibration batch {i} has shape {tuple(ids.shape)}: give token ids of shape (T,) or "
                             "(B, T), with at least one token.")
        yield i, ids
    if count == 0:
        raise InputError("calibration is empty: GPTQ needs at least one batch of token ids. Drop calibration= "
                         "for round-to-nearest.")


def _quantized_layer(linear: nn.Linear, name: str, scheme: str, group: int, symmetric: bool, hessian, damp: float):
    """The QuantLinear for one layer (GPTQ when a Hessian was collected); a failed GPTQ names the layer."""
    if not bool(torch.isfinite(linear.weight).all()):
        raise InputError(f"{name}.weight holds NaN or Inf: its scales (and every weight of its groups) would be "
                         "NaN. Repair or reload the model's weights, or keep the layer out with skip=.")
    codes = None
    if hessian is not None:
        try:
            codes = gptq_quantize(linear.weight, hessian, SCHEMES[scheme].bits, group, symmetric, damp=damp)
        except torch.linalg.LinAlgError as err:
            raise InputError(f"GPTQ for {name}: the input Hessian could not be inverted ({err.args[0][:80]}...); "
                             f"raise damp= (now {damp}) or give more calibration tokens.") from None
    return QuantLinear.from_linear(linear, scheme, group_size=group, symmetric=symmetric, quantized=codes)


def _record(old, layers: dict, scheme: str, group_size: int, symmetric: bool) -> dict:
    """The model's new quantization_config: every quantized layer in ``modules``; the top-level scheme,
    group_size and symmetric say this call's, or "mixed" when earlier calls quantized layers otherwise."""
    old = old if isinstance(old, dict) and isinstance(old.get("modules"), dict) else {"modules": {}}
    modules = {**old["modules"], **{name: {"scheme": scheme, "group_size": layers[name], "symmetric": symmetric}
                                    for name in layers}}
    uniform = len({(spec.get("scheme"), spec.get("symmetric")) for spec in modules.values()}) == 1
    same_group = not old["modules"] or old.get("group_size") == group_size
    return {**old, "quant_method": "ernie-lab", "modules": modules, "scheme": scheme if uniform else "mixed",
            "group_size": group_size if uniform and same_group else "mixed",
            "symmetric": symmetric if uniform else "mixed"}


def _matcher(pattern, argument: str, whole: bool = True):
    try:
        return name_matcher(pattern, whole=whole)
    except re.error as err:
        raise InputError(f"{argument}={pattern!r} is not a valid regular expression ({err}).") from None


def _chooses_a_linear(model, skip, filter) -> bool:
    dropped = _matcher(skip, "skip", whole=False) if skip is not None else (lambda name, module: False)
    chosen = _matcher(filter, "filter")
    return any(isinstance(m, nn.Linear) and chosen(name, m) and not dropped(name, m)
               for name, m in model.named_modules())


def _linear_names(model) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _some(names: list[str], shown: int = 3) -> str:
    if not names:
        return "(none)"
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def plan_layers(model: nn.Module, scheme: str, *, group_size: int = 128, skip=DEFAULT_SKIP,
                filter=None) -> dict[str, int]:
    """{linear name: its group size} for the full-precision layers ``quantize`` would replace.

    A layer whose input width the group does not divide uses the largest halving of it that does (down to
    32), else one group per row; one that cannot be
    packed at all (width not a multiple of 4 for 2-bit, of 32 for w4a8's activation blocks) stays in full
    precision. Routers never change.
    Full-precision linears are ``nn.Linear`` and ``StreamingLinear`` (the same weights); layers already
    quantized are not planned again.
    """
    from ..model.moe import Router
    spec = check_scheme(scheme)
    check_group_size(group_size, scheme)
    dropped = _matcher(skip, "skip", whole=False) if skip is not None else (lambda name, module: False)
    chosen = _matcher(filter, "filter")
    tied = tied_head_name(model)
    layers = {}
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, StreamingLinear) or isinstance(module, Router) or name == tied:
            continue
        if dropped(name, module) or not chosen(name, module):
            continue
        K = module.in_features
        group = _group_for(K, group_size) if spec.grouped else K
        packs = K % (8 // spec.bits if spec.bits < 8 else 1) == 0
        blocks = spec.activations != "int8 blocks" or K % formats.ACTIVATION_BLOCK == 0
        if not (packs and blocks):
            continue
        layers[name] = group
    return layers


def _group_for(K: int, group_size: int) -> int:
    """``group_size`` if it divides K, else the largest of its halves (down to 32) that does, else K."""
    if K % group_size == 0:
        return group_size
    group = group_size
    while group >= 32:
        if K % group == 0:
            return group
        group //= 2
    return K


def collect_hessians(model: nn.Module, layers: dict[str, int], calibration) -> dict[str, torch.Tensor]:
    """Run the calibration batches once through the full-precision model; (K, K) input Hessian per layer.

    ``calibration`` yields (index, batch) pairs (``check_calibration``). A batch the model refuses, or one
    whose activations reach a layer as NaN / Inf, is an InputError naming the batch (and the layer); layers
    no batch reaches are named in a warning (they are rounded to nearest)."""
    collectors, hooks = {}, []
    for name in layers:
        linear = model.get_submodule(name)
        collectors[name] = HessianCollector(linear.in_features, device=linear.weight.device)
        hooks.append(linear.register_forward_pre_hook(collectors[name]))
    device = _device(model)
    try:
        with torch.no_grad():
            for i, batch in calibration:
                _run_calibration_batch(model, i, batch, device)
                bad = next((name for name, c in collectors.items() if not c.finite), None)
                if bad is not None:
                    raise InputError(f"calibration batch {i} reaches {bad} with NaN or Inf activations, so its "
                                     "GPTQ Hessian is meaningless. Check the model's weights (torch.isfinite) and "
                                     "its dtype (float16 overflows; use bfloat16 or float32), or drop the batch.")
    finally:
        for hook in hooks:
            hook.remove()
    overflow = next((name for name, c in collectors.items() if not bool(torch.isfinite(c.H).all())), None)
    if overflow is not None:
        raise InputError(f"the calibration inputs of {overflow} are too large: their Hessian overflows float32. "
                         "Check the model's weights, or calibrate with fewer / shorter batches.")
    unreached = [name for name, c in collectors.items() if not c.rows]
    if unreached:
        warnings.warn(f"GPTQ: no calibration token reached {len(unreached)} of {len(layers)} layers "
                      f"({_some(unreached)}): they are rounded to nearest (RTN).", stacklevel=3)
    return {name: c.hessian() for name, c in collectors.items() if c.rows}


def _run_calibration_batch(model: nn.Module, i: int, batch, device) -> None:
    """One forward pass; the model's own refusals (ids outside the vocabulary, unknown inputs) name the batch."""
    try:
        if isinstance(batch, dict):  # a model's full inputs (a VL batch: ids, pixels, grids)
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
        else:
            ids = batch.to(device=device, dtype=torch.long)
            model(ids if ids.dim() == 2 else ids[None])
    except InputError as err:
        raise InputError(f"calibration batch {i}: {err}") from None
    except TypeError as err:
        raise InputError(f"calibration batch {i} does not fit the model's inputs ({err}); give token ids or a "
                         "dict of the model's keyword inputs (input_ids, pixel_values, ...).") from None


def check_is_module(model, where: str) -> None:
    if not isinstance(model, nn.Module):
        raise InputError(f"{where} needs a model (an nn.Module), got {type(model).__name__}.")


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    check_is_module(model, "quantized_layers")
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors counted once), as held in memory."""
    check_is_module(model, "weight_bytes")
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        plain = type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type != "meta"
        key = tensor.untyped_storage().data_ptr() if plain else id(tensor)
        if key not in seen:
            seen.add(key)
            total += _tensor_bytes(tensor)
    return total


def decode_bytes(model: nn.Module) -> int:
    """Weight bytes one batch-1 decode step of a text token reads: the memory traffic that bounds its speed.

        bytes = sum over linear layers of their weight bytes (quantized: codes + scales + zeros)
                but of each MoE block's E routed experts only the k a token visits (k/E of their bytes)

    The embedding gives one row (not counted); a tied LM head is counted once, as the head. Experts of
    other groups (the VL vision experts) and the vision encoder and adapter do not run on a text token.
    Works on the meta device too (shapes only): the bound of a model too big to build.
    """
    check_is_module(model, "decode_bytes")
    from ..model.moe import moe_blocks
    share = {}                                  # id(linear) -> the fraction of it a token reads
    for block in moe_blocks(model):
        for linear in block.group_experts(0).modules():
            share[id(linear)] = block.k / block.num_experts
        for linear in [*block.experts[block.num_experts:].modules(), *block.routers[1:]]:
            share[id(linear)] = 0.0             # the other groups' experts and routers
    skipped = {id(m) for part in ("vision", "adapter") if isinstance(getattr(model, part, None), nn.Module)
               for m in getattr(model, part).modules()}
    total = 0.0
    for module in model.modules():
        if id(module) in skipped:
            continue
        if isinstance(module, QuantLinear):
            tensors = [t for t in (module.qweight, module.scales, module.zeros) if t is not None]
        elif isinstance(module, nn.Linear):
            tensors = [module.weight]
        else:
            continue
        total += share.get(id(module), 1.0) * sum(_tensor_bytes(t) for t in tensors)
    return round(total)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a tensor, or of the inner tensors of a tensor subclass (e.g. torchao's quantized weights)."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def _device(model) -> torch.device:
    return next(model.parameters()).device

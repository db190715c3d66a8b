"""LoRA: fine-tune a frozen model through small low-rank updates of its linear layers.

A linear layer computes ``y = W x``. Fine-tuning changes W by some ``dW``; LoRA (Hu et al., 2021) bets
that a useful ``dW`` has low rank and learns it as a product of two thin matrices::

    y = W x + (alpha / r) B A x        A: (r, in) random,  B: (out, r) zeros,  W frozen

At the start ``B = 0``, so the adapted model *is* the base model; only A and B train, r * (in + out)
numbers per layer instead of in * out. ``alpha / r`` keeps the update's size stable when r changes.
``merge`` folds ``(alpha / r) B A`` into W (no extra cost at inference), ``unmerge`` takes it out again.

LoRA is an option of the existing linear layers, not a copy of the model: :func:`apply_lora` swaps the
chosen linears for a :class:`LoRALinear` that wraps the original, through the kit's one module swap
(``model.linears.replace_linears``). Names follow peft (``base_layer``, ``lora_A``, ``lora_B``).

QLoRA (Dettmers et al., 2023) is LoRA over a quantized base: ``quant.quantize(model, "w4a16")`` then
``apply_lora(model)``. The int4 weights stay frozen and packed; the backward needs only the input
gradient ``dL/dy W``, for which :class:`FrozenQuantized` dequantizes W on the fly. Merging into int4
codes is refused (dequantize first).
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
from torch import nn

from ...errors import ConfigError, InputError
from ...model.linears import replace_linears, tied_head_name

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_TARGETS = ("qkv", "proj", "fc1", "fc2")   # the ViT's attention and MLP linears
VISION_PREFIXES = ("vision.", "adapter.")         # the vision tower and its adapter in the VL model


class LoRALinear(nn.Module):
    """``base_layer(x) + (alpha / r) * lora_B(lora_A(dropout(x)))``, with the base frozen."""

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__()
        check_settings(r, alpha, dropout)
        in_features, out_features = _features(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Linear(in_features, r, bias=False)     # weight (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=False)    # weight (out, r)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.merged, self.enabled = False, True
        self.reset_lora()
        dtype, device = _weight_dtype_device(base_layer)
        self.lora_A.to(device=device, dtype=dtype)
        self.lora_B.to(device=device, dtype=dtype)

    def reset_lora(self) -> None:
        """peft's default start: A kaiming-uniform (as nn.Linear initialises), B zero, so dW = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        quantized = not isinstance(self.base_layer, nn.Linear) and hasattr(self.base_layer, "dequantize")
        y = FrozenQuantized.apply(x, self.base_layer) if quantized and torch.is_grad_enabled() else self.base_layer(x)
        if self.merged or not self.enabled:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(out, in) the update this adapter adds to the base weight: (alpha / r) B A."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def merge(self) -> None:
        if not self.merged:
            weight = _float_weight(self.base_layer)
            with torch.no_grad():
                weight += self.delta_weight().to(weight.dtype)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            weight = _float_weight(self.base_layer)
            with torch.no_grad():
                weight -= self.delta_weight().to(weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


class FrozenQuantized(torch.autograd.Function):
    """QLoRA's frozen base: ``y = base(x)`` through the quantized kernel, and the input gradient
    ``dL/dx = dL/dy W`` with W dequantized on the fly in the backward (never stored). Integer kernels
    have no derivative of their own; the base's weights get none (they are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:   # (..., in) -> (..., out)
        ctx.layer = layer
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):                               # (..., out) -> (..., in)
        weight = ctx.layer.dequantize().to(grad_y.dtype)                   # (out, in)
        return grad_y @ weight, None


# ----------------------------------------------------------------------------------- apply / merge
def check_settings(r, alpha, dropout=0.0, where: str = "") -> None:
    """An InputError naming the setting unless r is a positive int, alpha a finite number and dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{where}LoRA rank r must be a positive integer, got {r!r}.")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InputError(f"{where}LoRA alpha (lora_alpha) must be a finite number (the update is scaled by "
                         f"alpha / r; peft's default is 8), got {alpha!r}.")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise InputError(f"{where}LoRA dropout must be a number in [0, 1), got {dropout!r}.")


def check_model(model, where: str) -> None:
    """An InputError unless ``model`` is a torch module (a tokenizer or a folder name is a common slip)."""
    if not isinstance(model, nn.Module):
        raise InputError(f"{where} needs the model (an ernie-lab nn.Module) as its first argument, got "
                         f"{type(model).__name__}.")


def check_flag(value, name: str) -> None:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be True or False, got {value!r}.")


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, dropout: float = 0.0,
               target_modules=DEFAULT_TARGETS, *, vision: bool = False) -> nn.Module:
    """Wrap the targeted linear layers of ``model`` in :class:`LoRALinear` and freeze everything else.

    ``target_modules``: leaf names (``"q_proj"``, ...; MoE experts and shared experts use the same
    names) or regexes over full module names. ``vision=True`` also adapts the ViT and its adapter
    (adding their leaf names ``qkv``, ``proj``, ``fc1``, ``fc2`` to the targets). Every target must match
    at least one layer. Returns the model (changed in place).
    """
    check_model(model, "apply_lora")
    check_flag(vision, "apply_lora: vision")
    if vision and not any(name.startswith(VISION_PREFIXES) for name, _ in model.named_modules()):
        raise InputError(f"apply_lora(vision=True): this {type(model).__name__} has no vision tower to adapt; "
                         "vision=True is for an ERNIE 4.5 VL model (leave it False for a text model).")
    if lora_layers(model):
        raise InputError("this model already has LoRA layers; merge_lora(model, unload=True) first, or load "
                         "a second adapter into a fresh model.")
    check_settings(r, alpha, dropout)
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    if (not isinstance(target_modules, (list, tuple, set, frozenset)) or not target_modules
            or not all(isinstance(t, str) and t for t in target_modules)):
        raise InputError(f"target_modules must be a non-empty list of module names or regexes (like "
                         f"{list(DEFAULT_TARGETS[:2])}), got {target_modules!r}.")
    for t in target_modules:
        try:
            re.compile(t)
        except re.error as err:
            raise InputError(f"target_modules: {t!r} is neither a module name nor a valid regex ({err}).") from None
    target_modules = tuple(target_modules)
    targets = tuple(target_modules) + (tuple(t for t in VISION_TARGETS if t not in target_modules) if vision else ())
    keep, hit = target_filter(targets, vision)
    tied = tied_head_name(model)   # wrapping a tied head would untie it from the embedding
    names = [n for n, m in model.named_modules() if is_linear_like(m) and keep(n, m) and n != tied]
    missing = [t for t in target_modules if not any(hit(t, n) for n in names)]
    if missing or not names:
        raise ConfigError(f"target modules {missing or list(target_modules)} match no linear layer of this "
                          f"{type(model).__name__}; its linear layers end in "
                          f"{sorted({n.rsplit('.', 1)[-1] for n, m in model.named_modules() if is_linear_like(m)})}"
                          + ("" if vision else " (the vision tower is left out unless vision=True)") + ".")
    for p in model.parameters():
        p.requires_grad_(False)
    wrap_layers(model, names, lambda name, linear: LoRALinear(linear, r, alpha, dropout))
    model.lora_config = dict(r=r, alpha=alpha, dropout=dropout, target_modules=list(targets), vision=vision)
    return model


def wrap_layers(model: nn.Module, names: list[str], factory) -> None:
    """Put ``factory(name, layer)`` in place of each named layer (linear or quantized linear)."""
    chosen = set(names)
    replace_linears(model, factory, filter=lambda name, module: name in chosen, kind=nn.Module, tied_head=True)


def merge_lora(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold every adapter into its base weight. ``unload=True`` also puts the plain base layers back
    (a model that ``save_model`` writes and that no longer knows it was adapted)."""
    check_model(model, "merge_lora")
    check_flag(unload, "merge_lora: unload")
    layers = lora_layers(model)
    if not layers:
        raise InputError("merge_lora: this model has no LoRA layers (apply_lora or load_adapter first; a model "
                         "merged with unload=True has none left).")
    for name, layer in layers.items():   # every base checked first: a refusal merges none of them
        if not layer.merged:
            try:
                _float_weight(layer.base_layer)
            except InputError as err:
                raise InputError(f"merge_lora: {name}: {err}") from None
    for layer in layers.values():
        layer.merge()                    # a merged layer stays as it is (merging twice adds nothing)
    if unload:
        replace_linears_back(model, layers)
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take the adapters out of the base weights again (exactly, up to rounding); unmerged layers stay
    as they are (unmerging twice takes nothing more out)."""
    check_model(model, "unmerge_lora")
    layers = lora_layers(model)
    if not layers:
        raise InputError("unmerge_lora: this model has no LoRA layers (merge_lora(model, unload=True) removed "
                         "them for good; keep the adapter and load_adapter it into the base model instead).")
    for layer in layers.values():
        layer.unmerge()
    return model


def replace_linears_back(model: nn.Module, layers: dict[str, LoRALinear]) -> None:
    """Put each named LoRA layer's ``base_layer`` back in its place."""
    replace_linears(model, lambda name, layer: layer.base_layer, filter=lambda name, module: name in layers,
                    kind=LoRALinear, tied_head=True)
    if hasattr(model, "lora_config"):
        del model.lora_config


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run the base model inside the block: adapters off (merged ones taken out), back on afterwards."""
    layers = list(lora_layers(model).values())
    merged = [layer for layer in layers if layer.merged]
    for layer in merged:
        layer.unmerge()
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True
        for layer in merged:
            layer.merge()


# ----------------------------------------------------------------------------------- finding layers
def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name (names of the wrapped linears)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers an optimiser updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def target_filter(target_modules, vision: bool = False):
    """(name, module) -> bool choosing the layers to adapt: a target is a module's last name component
    (``"q_proj"``) or a regex matched against the whole name (``r"layers\\.0\\.attn\\..*"``)."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)

    def hit(target: str, name: str) -> bool:
        return name.rsplit(".", 1)[-1] == target or re.fullmatch(target, name) is not None

    def keep(name: str, module: nn.Module) -> bool:
        if not vision and name.startswith(VISION_PREFIXES):
            return False
        if ".routers." in name or name == "lm_head":   # routers and the head only by full name
            return name in targets
        return any(hit(t, name) for t in targets)

    return keep, hit


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear``, or a quantized linear (``ernie_lab.quant.QuantLinear``: codes + ``dequantize``)."""
    return isinstance(module, nn.Linear) or (hasattr(module, "dequantize") and hasattr(module, "in_features"))


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear-like module."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise InputError(f"LoRA wraps linear-like modules with in_features and out_features; "
                     f"{type(module).__name__} has neither.")


def _weight_dtype_device(module: nn.Module):
    """The dtype / device the adapter should live in: the base's floating parameters (float32 if none)."""
    floats = [p for p in module.parameters() if p.is_floating_point()]
    floats += [b for b in module.buffers() if b.is_floating_point()]
    dtype = getattr(module, "compute_dtype", None) or (floats[0].dtype if floats else torch.float32)
    device = floats[0].device if floats else (next(module.buffers()).device if list(module.buffers()) else "cpu")
    return dtype, device


def _float_weight(module: nn.Module) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not (isinstance(weight, torch.Tensor) and weight.is_floating_point()):
        raise InputError(f"cannot merge a LoRA into a {type(module).__name__}: it has no floating-point weight "
                         f"(a quantized base keeps its adapter unmerged; dequantize it first).")
    return weight.data


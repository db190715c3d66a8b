"""The one seam every linear layer passes through: swap ``nn.Linear`` modules by name.

Every matmul of every ernie-lab model is an ``nn.Linear`` (or a subclass, like the MoE ``Router``):
attention projections, SwiGLU and expert projections, routers, the LM head, the ViT's patch embedding,
attention and MLP, the adapter. Nothing reads a linear layer's ``.weight`` to do its own matmul, and no
forward casts its input to a weight's dtype. So a quantized linear, a LoRA-wrapped linear or an fp8
linear is one module swap away::

    replace_linears(model, lambda name, linear: QuantLinear.from_linear(linear),
                    filter=r"layers\\..*\\.(q|k|v|o)_proj")

``filter`` is a regular expression matched against the full module name (``re.fullmatch``) or a
function ``(name, module) -> bool``; ``skip`` names patterns that are never swapped. Tied weights stay
tied only if the factory keeps them so: by default the LM head of a tied model is skipped.

This is the kit's only module swap. ``kind`` widens it beyond ``nn.Linear``: LoRA wraps quantized linears
too (``kind=nn.Module``, chosen by name) and unwraps its own ``LoRALinear`` again (``kind=LoRALinear``);
``tied_head=True`` offers a tied LM head to a factory that keeps its weight shared (LoRA's wrapper,
``quant.stream_linears``).
"""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from ..errors import InputError

LinearFactory = Callable[[str, nn.Linear], nn.Module]   # (module name, the linear) -> its replacement


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` (subclasses included) in ``model``, in module order."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def name_matcher(pattern, *, whole: bool = True) -> Callable[[str, nn.Module], bool]:
    """``(name, module) -> bool`` from None (every module), a function, a regex or a list of regexes.

    ``whole``: a regex must match the whole name (``re.fullmatch``); otherwise anywhere in it (``re.search``).
    """
    if pattern is None:
        return lambda name, module: True
    if callable(pattern):
        return pattern
    if isinstance(pattern, str):
        regex = re.compile(pattern)
        find = regex.fullmatch if whole else regex.search
        return lambda name, module: find(name) is not None
    if isinstance(pattern, (list, tuple)):
        matchers = [name_matcher(p, whole=whole) for p in pattern]
        return lambda name, module: any(m(name, module) for m in matchers)
    raise InputError(f"filter / skip must be a regex string, a list of them or a function (name, module) -> bool, "
                     f"got {type(pattern).__name__}.")


def replace_linears(model: nn.Module, factory: LinearFactory, filter=None, *, skip=None,
                    kind: type | tuple = nn.Linear, tied_head: bool = False) -> list[str]:
    """Replace the modules of ``model`` of class ``kind`` (``nn.Linear``) whose names match ``filter``
    (and not ``skip``) in place.

    ``factory(name, module)`` returns the new module. The LM head of a model with tied embeddings is
    skipped (replacing it would untie it) unless ``tied_head`` says the factory keeps it tied. Returns the
    names that were replaced, in module order.
    """
    keep, drop = name_matcher(filter), name_matcher(skip) if skip is not None else (lambda name, module: False)
    tied = None if tied_head else tied_head_name(model)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, kind) and name and name != tied and keep(name, module) and not drop(name, module)]
    for name, module in chosen:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        replacement = factory(name, module)
        if not isinstance(replacement, nn.Module):
            raise InputError(f"the factory returned a {type(replacement).__name__} for {name!r}; it must return an nn.Module.")
        setattr(parent, leaf, replacement)
    return [name for name, _ in chosen]


def tied_head_name(model: nn.Module) -> str | None:
    """'lm_head' when the model's head holds the embedding's very weight tensor (not merely an equal one), else None."""
    head, embed = getattr(model, "lm_head", None), getattr(model, "embed", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0):
        return "lm_head"
    return None

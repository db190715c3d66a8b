"""Solutions to the exercises of notebooks/07_quantization.py."""

import copy

import torch

from ernie_lab import quant
from ernie_lab.model.linears import linear_names


def most_sensitive_layer(model, ids):
    """The linear layer whose int4 quantization alone moves the logits most."""
    with torch.no_grad():
        reference = model(ids).logits
        damage = {}
        for name in linear_names(model):
            if name == "lm_head":
                continue
            one = quant.quantize(copy.deepcopy(model), "w4a16", filter=name, skip=())
            if name in quant.quantized_layers(one):
                damage[name] = float((one(ids).logits - reference).norm())
    return max(damage, key=damage.get)


def pack2(codes):
    """Four 2-bit codes per byte, the first column in the highest bits."""
    c = codes.to(torch.uint8).reshape(codes.shape[0], -1, 4)
    return c[..., 0] << 6 | c[..., 1] << 4 | c[..., 2] << 2 | c[..., 3]


SOLUTIONS = {"07.most_sensitive_layer": (most_sensitive_layer,), "07.pack2": (pack2,)}
WRONG = {"07.most_sensitive_layer": [(lambda model, ids: "lm_head",), (lambda model, ids: "layers.0.attn.q_proj",)],
         "07.pack2": [(lambda codes: codes.to(torch.uint8).reshape(codes.shape[0], -1, 4)[..., 0],),
                      (lambda codes: (lambda c: c[..., 3] << 6 | c[..., 2] << 4 | c[..., 1] << 2 | c[..., 0])(
                          codes.to(torch.uint8).reshape(codes.shape[0], -1, 4)),)]}

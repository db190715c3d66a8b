"""Exercises of notebook 07 (quantization): the layer that hurts most, and 2-bit packing by hand."""

import torch

from ..exercises import Mismatch, call, exercise, expect_equal


def sensitive_model():
    """A small text model whose layers.1.mlp.down_proj is made very sensitive (one input column x 50)."""
    from ...io import architectures
    from ...model.config import ErnieConfig

    torch.manual_seed(0)
    model = architectures.build(ErnieConfig(num_hidden_layers=2, hidden_size=128, intermediate_size=256,
                                            vocab_size=512, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=32)).eval()
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight[:, 0] *= 50
    return model, torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(1))


@exercise("07.most_sensitive_layer",
          hint="for each name in modules.linear_names(model) but lm_head: quantize a deep copy with "
               "quant.quantize(copy, 'w4a16', filter=name, skip=()), measure how far its logits move, keep the largest.")
def most_sensitive_layer(function) -> str:
    model, ids = sensitive_model()
    got = call(function, model, ids)
    if got == "lm_head":
        raise Mismatch("the tied head is the embedding: leave it out, quantize the layers one at a time")
    expect_equal("the most sensitive layer", got, "layers.1.mlp.down_proj")
    return "One outlier column makes a whole layer fragile: that is why GPTQ and per-group scales exist."


@exercise("07.pack2", hint="c = codes.reshape(rows, -1, 4); byte = c[..., 0] << 6 | c[..., 1] << 4 | c[..., 2] << 2 | c[..., 3]")
def pack2(function) -> str:
    from ...quant import formats

    codes = torch.randint(0, 4, (3, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = call(function, codes)
    expected = formats.pack(codes, 2)
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, formats.pack(codes.flip(-1), 2).flip(-1)):
        raise Mismatch("the order is reversed: the FIRST code goes into the highest two bits")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        raise Mismatch(f"expected a uint8 tensor of shape {tuple(expected.shape)} (four codes per byte)")
    expect_equal("packed bytes", got.tolist(), expected.tolist())
    return "Four weights in one byte: a 2-bit model reads a quarter of an int8 model's bytes."

"""Each from-scratch component against its transformers counterpart, on the same weights."""

import torch
from transformers.models.ernie4_5 import modeling_ernie4_5 as ref_mod

from ernie_lab.model.attention import Attention
from ernie_lab.model.config import ErnieConfig
from ernie_lab.model.mlp import SwiGLU
from ernie_lab.model.decoder import DecoderLayer
from ernie_lab.model.norm import RMSNorm
from ernie_lab.model.rope import apply_rope, rope_angles

from conftest import reference_dense

TOL = 1e-5


def ref_and_config():
    ref = reference_dense(seed=1)
    return ref, ErnieConfig.from_dict(ref.config.to_dict())


def rope_inputs(ref, T=11, B=2):
    positions = torch.arange(T).expand(B, T)
    x = torch.randn(B, T, ref.config.hidden_size)
    ref_cos_sin = ref.model.rotary_emb(x, positions)
    return x, positions, ref_cos_sin


def test_rmsnorm_matches_reference():
    ref = ref_mod.Ernie4_5RMSNorm(48, eps=1e-5)
    torch.nn.init.normal_(ref.weight)
    ours = RMSNorm(48, eps=1e-5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 48) * 5
    assert (ours(x) - ref(x)).abs().max() < TOL
    # bfloat16 inputs: statistics in fp32, same rounding as the reference
    xb = x.bfloat16()
    assert torch.equal(ours.bfloat16()(xb), ref.bfloat16()(xb))


def test_rope_is_interleaved_and_matches_reference():
    ref, config = ref_and_config()
    x, positions, (cos, sin) = rope_inputs(ref)
    q = torch.randn(2, 4, 11, config.head_dim)
    k = torch.randn(2, 2, 11, config.head_dim)
    ref_q, ref_k = ref_mod.apply_rotary_pos_emb(q, k, cos, sin)
    our_cos, our_sin = rope_angles(positions, config.head_dim, config.rope_theta)
    assert (apply_rope(q, our_cos, our_sin) - ref_q).abs().max() < TOL
    assert (apply_rope(k, our_cos, our_sin) - ref_k).abs().max() < TOL
    # interleaved pairs: rotating by a position moves dims (0, 1) together, not (0, D/2)
    e0 = torch.zeros(1, 1, 1, config.head_dim)
    e0[..., 0] = 1.0
    c, s = rope_angles(torch.tensor([[1]]), config.head_dim, config.rope_theta)
    rotated = apply_rope(e0, c, s)
    assert rotated[..., 1].abs() > 0.5 and rotated[..., config.head_dim // 2].abs() < 1e-7


def test_rope_keeps_relative_positions():
    """q(m) . k(n) depends only on m - n."""
    D = 32
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        cm, sm = rope_angles(torch.tensor([[m]]), D, 10000.0)
        cn, sn = rope_angles(torch.tensor([[n]]), D, 10000.0)
        return (apply_rope(q, cm, sm) * apply_rope(k, cn, sn)).sum()

    assert torch.allclose(score(7, 3), score(104, 100), atol=1e-4)


def test_attention_matches_reference():
    ref, config = ref_and_config()
    ref_attn = ref.model.layers[0].self_attn
    ours = Attention(config, layer_idx=0)
    ours.load_state_dict(ref_attn.state_dict())
    x, positions, cos_sin = rope_inputs(ref)
    mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    expected, _ = ref_attn(x, position_embeddings=cos_sin, attention_mask=mask)
    got = ours(x, rope_angles(positions, config.head_dim, config.rope_theta))
    assert (got - expected).abs().max() < TOL


def test_mlp_matches_reference():
    ref, config = ref_and_config()
    ref_mlp = ref.model.layers[0].mlp
    ours = SwiGLU(config.hidden_size, config.intermediate_size)
    ours.load_state_dict(ref_mlp.state_dict())
    x = torch.randn(2, 5, config.hidden_size)
    assert (ours(x) - ref_mlp(x)).abs().max() < TOL


def test_decoder_layer_matches_reference():
    ref, config = ref_and_config()
    ref_layer = ref.model.layers[1]
    ours = DecoderLayer(config, layer_idx=1)
    renamed = {k.replace("input_layernorm", "attn_norm").replace("post_attention_layernorm", "mlp_norm")
               .replace("self_attn", "attn"): v for k, v in ref_layer.state_dict().items()}
    ours.load_state_dict(renamed)
    x, positions, cos_sin = rope_inputs(ref)
    mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    expected = ref_layer(x, attention_mask=mask, position_embeddings=cos_sin)
    got = ours(x, rope_angles(positions, config.head_dim, config.rope_theta))
    assert (got - expected).abs().max() < TOL


def test_one_query_attends_by_the_written_out_formula_equal_to_sdpa():
    """A decode step's attention on a CPU (attend_one_query: fp32 scores, softmax, values) against PyTorch's
    attention on the same fp32 inputs: masked (static cache) or not, GQA groups of 1, 4 and 8, bf16 rounded once."""
    from ernie_lab.model.attention import attend
    import torch.nn.functional as F
    for S, H, Hkv in ((1, 4, 4), (5, 8, 2), (64, 16, 2), (130, 8, 1)):
        q = torch.randn(2, H, 1, 16)
        k, v = torch.randn(2, Hkv, S, 16), torch.randn(2, Hkv, S, 16)
        mask = torch.rand(2, 1, 1, S) < 0.7
        mask[..., 0] = True
        for m in (mask, None):
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
            assert (attend(q, k, v, m) - want).abs().max() < 1e-6
            got = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)
            exact = F.scaled_dot_product_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                                                   attn_mask=m, enable_gqa=True)
            assert got.dtype == torch.bfloat16 and (got.float() - exact).abs().max() <= exact.abs().max() * 2 ** -8
        if S > 1:
            assert not torch.equal(attend(q, k, v, mask), attend(q, k, v, None))  # the mask is applied

"""pqmim_kernels.nn attention modules: MaskedSelfAttention and MaskedTransformerBlock."""

from __future__ import annotations

import pytest
import torch

from pqmim_kernels.nn import MaskedSelfAttention, MaskedTransformerBlock


def _manual_attention(mod: MaskedSelfAttention, x, visible):
    """Plain eager multi-head attention with the module's weights; visible: (B, L) bool."""
    b, length, w = x.shape
    h, dh = mod.heads, mod.head_dim
    q, k, v = mod.qkv(x).split(w, dim=-1)
    q, k, v = (t.view(b, length, h, dh).transpose(1, 2) for t in (q, k, v))
    s = q @ k.transpose(-1, -2) / dh**0.5
    s = s.masked_fill(~visible[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = (p @ v).transpose(1, 2).reshape(b, length, w)
    return mod.proj(out)


def test_self_attention_matches_manual_computation():
    torch.manual_seed(0)
    mod = MaskedSelfAttention(48, 3)
    x = torch.randn(2, 20, 48)
    lengths = torch.tensor([7, 20])
    visible = torch.arange(20)[None, :] < lengths[:, None]
    got = mod(x, key_lengths=lengths)
    torch.testing.assert_close(got, _manual_attention(mod, x, visible), rtol=1e-5, atol=1e-5)


def test_block_shapes_dtype_and_mask_equivalence():
    torch.manual_seed(1)
    block = MaskedTransformerBlock(64, 4, mlp_ratio=2.0)
    x = torch.randn(3, 33, 64, requires_grad=True)
    lengths = torch.tensor([0, 10, 33])
    km = torch.arange(33)[None, :] < lengths[:, None]
    a = block(x, key_lengths=lengths)
    b = block(x, key_mask=km)
    assert a.shape == x.shape and a.dtype == x.dtype
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for p in block.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_hidden_tokens_never_act_as_keys():
    # Known-first order: tokens past key_lengths are queries only, so changing them must not
    # change the output of any other token.
    torch.manual_seed(2)
    block = MaskedTransformerBlock(32, 2)
    x = torch.randn(2, 16, 32)
    lengths = torch.tensor([5, 9])
    y = block(x, key_lengths=lengths)
    x2 = x.clone()
    x2[0, 5:] = torch.randn(11, 32) * 10
    x2[1, 12] = 100.0
    y2 = block(x2, key_lengths=lengths)
    torch.testing.assert_close(y2[0, :5], y[0, :5], rtol=0, atol=0)
    keep = torch.ones(16, dtype=torch.bool)
    keep[12] = False
    torch.testing.assert_close(y2[1, keep], y[1, keep], rtol=0, atol=0)


def test_block_accepts_attn_mask_and_low_precision():
    torch.manual_seed(3)
    block = MaskedTransformerBlock(32, 4).to(torch.bfloat16)
    x = torch.randn(2, 10, 32, dtype=torch.bfloat16)
    am = torch.rand(2, 1, 10, 10) < 0.5
    y = block(x, attn_mask=am)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_block_compiles_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(4)
    block = MaskedTransformerBlock(32, 2)
    x = torch.randn(2, 12, 32)
    lengths = torch.tensor([4, 12])
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, key_lengths=lengths), block(x, key_lengths=lengths))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((30, 4), "width 30 is not a multiple of heads 4"),
        ((0, 4), "width and heads must be positive ints"),
        ((32, 2.0), "width and heads must be positive ints"),
    ],
)
def test_bad_construction_raises(args, match):
    with pytest.raises(ValueError, match=match):
        MaskedSelfAttention(*args)


def test_bad_mlp_ratio_and_input_raise():
    with pytest.raises(ValueError, match="mlp_ratio must be > 0"):
        MaskedTransformerBlock(32, 2, mlp_ratio=0)
    block = MaskedTransformerBlock(32, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 32\)"):
        block(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match=r"key_mask must have shape \(B, Lk\)"):
        block(torch.randn(2, 5, 32), key_mask=torch.ones(2, 4, dtype=torch.bool))

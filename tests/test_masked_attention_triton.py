"""The Triton masked-attention kernels (forward + backward) against the eager spec.

Runs on CUDA when available, else on the CPU under ``TRITON_INTERPRET=1`` (which must be set
before Triton is imported; ``test_masked_attention.py`` launches this file in such a
subprocess). Interpreted shapes are tiny and ragged (16-wide blocks, ~5 ms per program-tile
iteration); bf16 is checked on CUDA only (bf16 ``tl.dot`` is wrong in the interpreter).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from masked_attention_cases import (  # noqa: E402
    MASK_FORMS,
    check_ratio,
    empty_rows_of,
    make_case,
    oracle_and_yardstick,
)

from pqmim_kernels.functional import masked_attention  # noqa: E402
from pqmim_kernels.reference.attention import masked_attention_reference  # noqa: E402

if torch.cuda.is_available():
    DEVICE = "cuda"
elif os.environ.get("TRITON_INTERPRET") == "1":
    DEVICE = "cpu"
else:
    pytest.skip(
        "needs CUDA or TRITON_INTERPRET=1 (test_masked_attention.py runs this file under the "
        "interpreter)",
        allow_module_level=True,
    )
pytest.importorskip("triton")

DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if DEVICE == "cuda" else ())
# Interpreted sizes stay tiny; on a GPU the same cases are cheap.
B, H, LQ, LK, DH = 2, 2, 37, 45, 32


def _triton(q, k, v, do, masks, **kw):
    # On CUDA the pinned configs run: one compile per kernel variant instead of one per autotune
    # candidate (the autotuned path is covered by test_masked_attention_cuda.py).
    kw.setdefault("pinned", DEVICE == "cuda")
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*ins, backend="triton", **masks, **kw)
    grads = torch.autograd.grad(out, ins, do)
    return (out.detach(), *grads)


def _case(*args, **kw):
    q, k, v, do, masks = make_case(*args, device=DEVICE, **kw)
    return q, k, v, do, masks


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", MASK_FORMS)
def test_error_ratio_every_mask_form(form, dtype):
    q, k, v, do, masks = _case(B, H, LQ, LK, DH, form, dtype, seed=11)
    got = _triton(q, k, v, do, masks)
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks)
    for name, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        assert a.dtype == dtype and a.device.type == DEVICE
        check_ratio(f"{form}/{dtype}/{name}", a, o, y, dtype)


@pytest.mark.parametrize("dh", (16, 24, 64, 128))
def test_head_dims(dh):
    # 24 is padded to 32 inside the kernel (masked loads on the head dim).
    q, k, v, do, masks = _case(1, 2, 19, 23, dh, "key_lengths", torch.float16, seed=dh)
    got = _triton(q, k, v, do, masks)
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks)
    for name, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        check_ratio(f"dh={dh}/{name}", a, o, y, torch.float16)


def test_empty_rows_zero_output_zero_grads_and_lse():
    from pqmim_kernels.ops.masked_attention import masked_attention_forward

    q, k, v, do, masks = _case(3, 2, 21, 33, 16, "attn_bool", torch.float32, seed=12)
    masks["key_lengths"] = torch.tensor([0, 7, 33], device=DEVICE)
    empty = empty_rows_of(q.cpu(), k.cpu(), {n: m.cpu() for n, m in masks.items()}).to(DEVICE)
    assert empty.any() and not empty.all()
    out, dq, dk, dv = _triton(q, k, v, do, masks)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert (dk[0] == 0).all() and (dv[0] == 0).all()
    assert (dk[1, :, 7:] == 0).all() and (dv[1, :, 7:] == 0).all()
    _, lse = masked_attention_forward(q, k, v, scale=0.25, **masks)
    _, lse_ref = masked_attention_reference(q, k, v, scale=0.25, return_lse=True, **masks)
    assert torch.isneginf(lse[empty]).all()
    torch.testing.assert_close(lse[~empty], lse_ref[~empty], rtol=1e-5, atol=1e-5)


def test_key_lengths_zero_and_full():
    q, k, v, do, _ = _case(2, 1, 17, 29, 16, "none", torch.float32, seed=13)
    zero = _triton(q, k, v, do, {"key_lengths": torch.zeros(2, dtype=torch.int64, device=DEVICE)})
    for t in zero:
        assert (t == 0).all()
    full = _triton(q, k, v, do, {"key_lengths": torch.full((2,), 29, device=DEVICE)})
    plain = _triton(q, k, v, do, {})
    for a, b in zip(full, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_key_lengths_equals_prefix_key_mask_bitwise():
    q, k, v, do, _ = _case(3, 2, 20, 40, 32, "none", torch.float16, seed=14)
    lengths = torch.tensor([5, 16, 40], device=DEVICE)
    km = torch.arange(40, device=DEVICE)[None, :] < lengths[:, None]
    a = _triton(q, k, v, do, {"key_lengths": lengths})
    b = _triton(q, k, v, do, {"key_mask": km})
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_keys_past_the_length_are_never_read():
    # NaN in hidden keys/values past key_lengths: skipped blocks and masked loads never touch
    # them, so nothing is NaN (the eager reference would propagate 0 * NaN).
    q, k, v, do, _ = _case(2, 2, 18, 48, 16, "none", torch.float32, seed=15)
    lengths = torch.tensor([9, 33], device=DEVICE)
    clean = _triton(q, k, v, do, {"key_lengths": lengths})
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 9:] = float("nan")
    v2[1, :, 33:] = float("nan")
    dirty = _triton(q, k2, v2, do, {"key_lengths": lengths})
    for a, b in zip(dirty[:2], clean[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_strided_inputs_from_fused_qkv_and_block():
    from pqmim_kernels.nn import MaskedTransformerBlock

    torch.manual_seed(16)
    block = MaskedTransformerBlock(32, 2, backend="triton").to(DEVICE)
    ref = MaskedTransformerBlock(32, 2, backend="reference").to(DEVICE)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(2, 21, 32, device=DEVICE)
    lengths = torch.tensor([6, 21], device=DEVICE)
    torch.testing.assert_close(
        block(x, key_lengths=lengths), ref(x, key_lengths=lengths), rtol=1e-5, atol=1e-5
    )


def test_empty_sequences():
    q = torch.randn(1, 2, 0, 16, device=DEVICE)
    k = torch.randn(1, 2, 5, 16, device=DEVICE)
    assert masked_attention(q, k, k, backend="triton").shape == (1, 2, 0, 16)
    q = torch.randn(1, 2, 4, 16, device=DEVICE, requires_grad=True)
    k0 = torch.randn(1, 2, 0, 16, device=DEVICE)
    out = masked_attention(q, k0, k0, backend="triton")
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_head_dim_limit_raises():
    q = torch.randn(1, 1, 4, 264, device=DEVICE)
    with pytest.raises(ValueError, match="supports head dim Dh <= 256"):
        masked_attention(q, q, q, backend="triton")


def test_grid_limit_on_batch_times_heads_raises():
    # B * H programs sit on the second grid axis, which CUDA caps at 65535.
    q = torch.zeros(256, 257, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="supports B \\* H <= 65535, got 65792"):
        masked_attention(q, q, q, backend="triton")


def test_opcheck_triton_custom_op():
    q, k, v, _, masks = _case(1, 1, 16, 20, 16, "combined", torch.float32, seed=17)
    for t in (q, k, v):
        t.requires_grad_()
    torch.library.opcheck(
        torch.ops.pqmim.masked_attention_fwd.default,
        (
            q,
            k,
            v,
            masks["key_lengths"],
            masks["key_mask"],
            masks["attn_mask"],
            0.25,
            "triton",
            DEVICE == "cuda",
        ),
    )


def test_torch_compile_fullgraph_triton_path():
    torch._dynamo.reset()

    def loss_fn(q, k, v, lengths):
        return masked_attention(q, k, v, key_lengths=lengths, backend="triton").square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    q, k, v, _, masks = _case(2, 1, 16, 18, 16, "key_lengths", torch.float32, seed=18)
    ins = [t.requires_grad_() for t in (q, k, v)]
    with warnings.catch_warnings():
        # Backend selection must not make dynamo trace a cache wrapper (it warns when it does).
        warnings.filterwarnings("error", message=".*lru_cache.*")
        got = compiled(*ins, masks["key_lengths"])
    g_got = torch.autograd.grad(got, ins)
    want = loss_fn(*ins, masks["key_lengths"])
    g_want = torch.autograd.grad(want, ins)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("form", ("key_lengths", "combined"))
def test_gpu_sized_blocks(form, monkeypatch):
    # GPU-sized tiles (64 x 32) on a ragged 130 x 200 problem: partial tiles on both axes.
    # Under the interpreter the fixed config is patched; on CUDA the autotuned configs run.
    from pqmim_kernels.ops import masked_attention as ma

    monkeypatch.setitem(ma._INTERPRETER_CONFIG, "BLOCK_M", 64)
    monkeypatch.setitem(ma._INTERPRETER_CONFIG, "BLOCK_N", 32)
    q, k, v, do, masks = _case(2, 1, 130, 200, 64, form, torch.float16, seed=19)
    got = _triton(q, k, v, do, masks, pinned=False)
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks)
    for name, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        check_ratio(f"{form}/{name}", a, o, y, torch.float16)

"""masked_attention: semantics, the reference/CPU path, the custom op, and error paths.

The Triton kernels are tested in ``test_masked_attention_triton.py`` (on CUDA, or on the CPU
under ``TRITON_INTERPRET=1``); ``test_triton_kernels_under_interpreter`` below runs that file
in a subprocess with the interpreter enabled, so one plain ``pytest`` run covers both.
"""

from __future__ import annotations

import os
import subprocess
import sys
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

import pqmim_kernels  # noqa: E402
from pqmim_kernels.functional import masked_attention  # noqa: E402
from pqmim_kernels.reference.attention import (  # noqa: E402
    masked_attention_backward_reference,
    masked_attention_reference,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run(q, k, v, do, masks, backend="reference", scale=None):
    ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = masked_attention(*ins, backend=backend, scale=scale, **masks)
    grads = torch.autograd.grad(out, ins, do)
    return (out.detach(), *grads)


def test_public_alias_is_the_functional_op():
    assert pqmim_kernels.masked_attention is masked_attention


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", MASK_FORMS)
def test_reference_path_error_ratio(form, dtype):
    q, k, v, do, masks = make_case(2, 3, 37, 45, 32, form, dtype, seed=1)
    got = _run(q, k, v, do, masks)
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks)
    for name, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        check_ratio(f"{form}/{dtype}/{name}", a, o, y, dtype)
        assert a.dtype == dtype


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=str)
@pytest.mark.parametrize("form", ("key_lengths", "key_mask", "attn_float"))
def test_reference_path_normal_size(form, dtype):
    # The CPU fallback at a size a trainer uses: B=2, H=4, L=256 (ragged lengths), Dh=64.
    q, k, v, do, masks = make_case(2, 4, 256, 256, 64, form, dtype, seed=2)
    got = _run(q, k, v, do, masks)
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks)
    for name, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        check_ratio(f"{form}/{name}", a, o, y, dtype)


@pytest.mark.parametrize("form", ("key_lengths", "key_mask", "attn_bool", "attn_float"))
def test_empty_rows_give_zero_output_and_zero_finite_grads(form):
    q, k, v, do, masks = make_case(3, 2, 21, 19, 16, form, torch.float32, seed=3)
    empty = empty_rows_of(q, k, masks)
    assert empty.any() and not empty.all()
    out, dq, dk, dv = _run(q, k, v, do, masks)
    for t in (out, dq, dk, dv):
        assert torch.isfinite(t).all()
    assert (out[empty] == 0).all()
    assert (dq[empty] == 0).all()


def test_key_lengths_zero_and_full():
    q, k, v, do, _ = make_case(2, 2, 13, 17, 16, "none", torch.float32, seed=4)
    zero = _run(q, k, v, do, {"key_lengths": torch.tensor([0, 0])})
    for t in zero:
        assert torch.isfinite(t).all() and (t == 0).all()
    full = _run(q, k, v, do, {"key_lengths": torch.tensor([17, 17])})
    none = _run(q, k, v, do, {})
    for a, b in zip(full, none):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Lengths outside [0, Lk] are clamped (no device sync to validate them).
    clamped = _run(q, k, v, do, {"key_lengths": torch.tensor([-5, 1000])})
    expect = _run(q, k, v, do, {"key_lengths": torch.tensor([0, 17])})
    for a, b in zip(clamped, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_key_lengths_equal_prefix_key_mask(dtype):
    q, k, v, do, _ = make_case(3, 2, 29, 40, 32, "none", dtype, seed=5)
    lengths = torch.tensor([0, 11, 40])
    km = torch.arange(40)[None, :] < lengths[:, None]
    a = _run(q, k, v, do, {"key_lengths": lengths})
    b = _run(q, k, v, do, {"key_mask": km})
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_hidden_keys_do_not_influence_output():
    # Changing hidden keys/values (even to huge values) must not change anything visible.
    q, k, v, do, _ = make_case(2, 2, 9, 12, 16, "none", torch.float32, seed=6)
    masks = {"key_lengths": torch.tensor([5, 8])}
    base = _run(q, k, v, do, masks)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 5:] = 1e4
    v2[1, :, 8:] = -1e4
    pert = _run(q, k2, v2, do, masks)
    torch.testing.assert_close(pert[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(pert[1], base[1], rtol=0, atol=0)


def test_matches_sdpa_on_non_empty_rows():
    q, k, v, _, masks = make_case(2, 3, 16, 24, 32, "attn_bool", torch.float32, empty_rows=False)
    am = masks["attn_mask"].clone()
    am[..., 0] = True  # every row sees key 0, so SDPA is NaN-free
    ours = masked_attention(q, k, v, attn_mask=am, backend="reference")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=am)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_scale_argument():
    q, k, v, do, masks = make_case(1, 2, 8, 8, 16, "key_lengths", torch.float32, seed=7)
    got = _run(q, k, v, do, masks, scale=0.3)
    oracle, yard = oracle_and_yardstick(q, k, v, do, masks, scale=0.3)
    for name, a, o, y in zip(("out", "dq", "dk", "dv"), got, oracle, yard):
        check_ratio(name, a, o, y, torch.float32)


def test_reference_flags_build_oracle_and_yardstick():
    q, k, v, _, masks = make_case(2, 2, 40, 50, 32, "key_lengths", torch.float16, seed=21)
    exact = masked_attention_reference(q.double(), k.double(), v.double(), upcast=False, **masks)
    up = masked_attention_reference(q, k, v, upcast=True, **masks)
    low = masked_attention_reference(q, k, v, upcast=False, **masks)
    assert up.dtype == low.dtype == torch.float16
    # upcast=True is the fp32 oracle; upcast=False the (worse) same-precision yardstick.
    err_up = (up.double() - exact).abs().max().item()
    err_low = (low.double() - exact).abs().max().item()
    assert err_up < err_low, (err_up, err_low)
    # reorder_ops folds the scale into q (rounded in fp16) before the product ...
    scale = 32**-0.5
    reordered = masked_attention_reference(q, k, v, upcast=False, reorder_ops=True, **masks)
    manual = masked_attention_reference(q * scale, k, v, scale=1.0, upcast=False, **masks)
    torch.testing.assert_close(reordered, manual, rtol=0, atol=0)
    # ... which in exact arithmetic is the same function.
    r64 = masked_attention_reference(
        q.double(), k.double(), v.double(), upcast=False, reorder_ops=True, **masks
    )
    torch.testing.assert_close(r64, exact, rtol=1e-12, atol=1e-12)


def test_backward_reference_matches_autograd_with_lse():
    q, k, v, do, masks = make_case(2, 2, 11, 14, 16, "combined", torch.float64, seed=8)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = masked_attention_reference(*ins, return_lse=True, **masks)
    auto = torch.autograd.grad(out, ins, do)
    manual = masked_attention_backward_reference(do, q, k, v, out.detach(), lse, **masks)
    for a, b in zip(manual, auto):
        torch.testing.assert_close(a, b)
    # lse is the logsumexp of the masked scores (-inf on empty rows)
    s = (q @ k.transpose(-1, -2)) / 4.0 + torch.where(masks["attn_mask"], 0.0, float("-inf"))
    s = s.masked_fill(~masks["key_mask"][:, None, None, :], float("-inf"))
    s = s.masked_fill(
        torch.arange(14)[None, None, None, :] >= masks["key_lengths"][:, None, None, None],
        float("-inf"),
    )
    torch.testing.assert_close(lse, torch.logsumexp(s, dim=-1))


def test_gradcheck_reference_double():
    q, k, v, _, masks = make_case(1, 2, 5, 6, 8, "combined", torch.float64, seed=9)
    ins = [t.requires_grad_() for t in (q, k, v)]
    assert torch.autograd.gradcheck(
        lambda a, b, c: masked_attention_reference(a, b, c, **masks), ins
    )


def test_zero_length_keys_and_queries():
    q = torch.randn(2, 2, 5, 16, requires_grad=True)
    kv = torch.randn(2, 2, 0, 16, requires_grad=True)
    out = masked_attention(q, kv, kv)
    assert out.shape == (2, 2, 5, 16) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
    q0 = torch.randn(2, 2, 0, 16)
    k = torch.randn(2, 2, 3, 16)
    assert masked_attention(q0, k, k).shape == (2, 2, 0, 16)


def test_strided_views_are_accepted():
    x = torch.randn(2, 10, 3, 4, 16)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    out = masked_attention(q, k, v, key_lengths=torch.tensor([3, 10]))
    ref = masked_attention_reference(
        q.contiguous(), k.contiguous(), v.contiguous(), key_lengths=torch.tensor([3, 10])
    )
    torch.testing.assert_close(out, ref)


# ---- torch.library custom op / torch.compile ----


def test_opcheck_custom_op():
    q, k, v, _, masks = make_case(2, 2, 7, 9, 16, "combined", torch.float32, seed=10)
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
            "reference",
            False,
        ),
    )


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()

    def loss_fn(q, k, v, lengths):
        return masked_attention(q, k, v, key_lengths=lengths).square().sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    q, k, v, _, masks = make_case(2, 2, 9, 11, 16, "key_lengths", torch.float32, seed=11)
    ins = [t.requires_grad_() for t in (q, k, v)]
    got = compiled(*ins, masks["key_lengths"])
    g_got = torch.autograd.grad(got, ins)
    want = loss_fn(*ins, masks["key_lengths"])
    g_want = torch.autograd.grad(want, ins)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device_class", ["sm_80", "sm_86", "sm_90"])
def test_autotuned_gpu_launch_prunes_configs(monkeypatch, device_class):
    """The GPU launchers through the real Triton autotuner (benchmark and launch stubbed out, so
    no GPU is needed): the prune sees its launch arguments and the device's limits (faked per
    device class) and keeps only configs that fit them."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    from pqmim_kernels.ops import _launch
    from pqmim_kernels.ops import masked_attention as ma

    limits = _launch.DEVICE_CLASSES[device_class]
    monkeypatch.setattr(ma, "device_limits", lambda _: limits)
    pruned = {}
    for name, tuned in (
        ("fwd", ma._fwd_tuned),
        ("dq", ma._bwd_dq_tuned),
        ("dkdv", ma._bwd_dkdv_tuned),
    ):

        def recording_prune(configs, named_args, _name=name, _real=tuned.early_config_prune, **kw):
            pruned[_name] = _real(configs, named_args, **kw)
            return pruned[_name]

        monkeypatch.setattr(tuned, "early_config_prune", recording_prune)
        monkeypatch.setattr(tuned, "cache", {})
        monkeypatch.setattr(tuned, "_bench", lambda *a, config, **k: [float(config.num_stages)])
        monkeypatch.setattr(tuned.fn, "run", lambda *a, **k: None)
    monkeypatch.setattr(
        ma, "_launch_params", lambda q, kernel, d_pad, pinned, *mask: ({"INTERPRETER": False}, True)
    )
    for dtype, dh in ((torch.float16, 64), (torch.float32, 128), (torch.float32, 256)):
        q, k, v, do, masks = make_case(1, 2, 40, 50, dh, "combined", dtype, seed=22)
        out, lse = ma.masked_attention_forward(q, k, v, scale=0.1, **masks)
        ma.masked_attention_backward(do, q, k, v, out, lse, scale=0.1, **masks)
        assert set(pruned) == {"fwd", "dq", "dkdv"}
        d_pad = max(16, 1 << (dh - 1).bit_length())
        for name, kept in pruned.items():
            assert kept, (name, dtype, dh)
            # "combined": a bool attention mask (mode 1) and a key mask
            wgmma = limits.capability >= (9, 0)
            costs = [ma.config_cost(name, c, d_pad, dtype.itemsize, 1, True, wgmma) for c in kept]
            fitting = [_launch.fits(*cost, c.num_warps, limits) for c, cost in zip(kept, costs)]
            assert all(fitting) or (len(kept) == 1 and kept[0] in ma._FALLBACKS), (name, kept)
            for smem, _ in costs:
                assert smem + _launch.SMEM_RESERVE <= limits.smem_per_block
        if dtype == torch.float32:  # fp32 at Dh >= 128 cannot take every candidate
            assert len(pruned["fwd"]) < len(ma._fwd_tuned.configs)
        pruned.clear()


# ---- errors ----


def _qkv(b=2, h=2, lq=4, lk=5, dh=8, dtype=torch.float32):
    return torch.randn(b, h, lq, dh, dtype=dtype), *torch.randn(2, b, h, lk, dh, dtype=dtype)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
        ({"q": torch.randn(2, 4, 8)}, ValueError, r"q must have shape \(B, H, L, Dh\)"),
        ({"k": torch.randn(2, 2, 5, 8, dtype=torch.float64)}, TypeError, "k must be float16"),
        ({"v": torch.randn(2, 2, 5, 8).half()}, TypeError, "must share one dtype"),
        ({"v": torch.randn(2, 2, 6, 8)}, ValueError, "k and v must have the same shape"),
        (
            {"k": torch.randn(2, 3, 5, 8), "v": torch.randn(2, 3, 5, 8)},
            ValueError,
            "does not match q shape",
        ),
        (
            {
                "q": torch.randn(2, 2, 4, 0),
                "k": torch.randn(2, 2, 5, 0),
                "v": torch.randn(2, 2, 5, 0),
            },
            ValueError,
            "head dim Dh must be positive",
        ),
        ({"key_lengths": [1, 2]}, TypeError, "key_lengths must be a torch.Tensor"),
        ({"key_lengths": torch.tensor([1.0, 2.0])}, TypeError, "key_lengths must be an integer"),
        (
            {"key_lengths": torch.tensor([1, 2, 3])},
            ValueError,
            r"key_lengths must have shape \(B,\)",
        ),
        ({"key_mask": torch.ones(2, 5, dtype=torch.int64)}, TypeError, "key_mask must be a bool"),
        (
            {"key_mask": torch.ones(2, 4, dtype=torch.bool)},
            ValueError,
            r"key_mask must have shape \(B, Lk\)",
        ),
        ({"key_mask": "x"}, TypeError, "key_mask must be a torch.Tensor"),
        (
            {"attn_mask": torch.ones(2, 2, 4, 5, dtype=torch.int32)},
            TypeError,
            "attn_mask must be bool",
        ),
        (
            {"attn_mask": torch.ones(3, 2, 4, 5, dtype=torch.bool)},
            ValueError,
            r"attn_mask must have shape \(B or 1, H or 1, Lq, Lk\)",
        ),
        ({"attn_mask": torch.ones(4, 5, dtype=torch.bool)}, ValueError, "attn_mask must have"),
        ({"attn_mask": 3}, TypeError, "attn_mask must be a torch.Tensor"),
        (
            {"attn_mask": torch.zeros(1, 1, 4, 5, requires_grad=True)},
            ValueError,
            "attn_mask is treated as a constant",
        ),
        ({"scale": "big"}, TypeError, "scale must be a float"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_arguments_raise(kwargs, exc, match):
    q, k, v = _qkv()
    args = {"q": q, "k": k, "v": v}
    for name in ("q", "k", "v"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    with pytest.raises(exc, match=match):
        masked_attention(args["q"], args["k"], args["v"], **kwargs)


def test_device_mismatch_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        masked_attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="key_lengths is on meta but q is on cpu"):
        masked_attention(q, k, v, key_lengths=torch.ones(2, dtype=torch.int64, device="meta"))


def test_pinned_must_be_bool():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="masked_attention: pinned must be a bool, got str"):
        masked_attention(q, k, v, pinned="yes")
    # On the reference path pinned changes nothing.
    torch.testing.assert_close(
        masked_attention(q, k, v, pinned=True), masked_attention(q, k, v), rtol=0, atol=0
    )


def test_kernel_limits_auto_falls_back_explicit_triton_raises(monkeypatch):
    """Beyond the kernel's limits (Dh > 256, B * H > 65535) "auto" takes the eager path and an
    explicit "triton" says why not (resolve_backend is forced to "triton", as on a GPU)."""
    import pqmim_kernels.functional as F

    monkeypatch.setattr(F, "resolve_backend", lambda *a, **k: "triton")
    seen = []
    real_op = F._masked_attention_fwd_op
    monkeypatch.setattr(F, "_masked_attention_fwd_op", lambda *a: seen.append(a[7]) or real_op(*a))
    wide = torch.randn(1, 1, 3, 264)
    many = torch.randn(256, 257, 1, 16)
    for q, match in (
        (wide, "supports head dim Dh <= 256, got 264"),
        (many, r"supports B \* H <= 65535, got 65792"),
    ):
        out = masked_attention(q, q, q, backend="auto")
        assert seen[-1] == "reference" and out.shape == q.shape
        with pytest.raises(ValueError, match=match):
            masked_attention(q, q, q, backend="triton")


def test_triton_backend_without_cuda_raises():
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton can run here")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="backend='triton' needs CUDA tensors"):
        masked_attention(q, k, v, backend="triton")


def test_triton_kernels_under_interpreter():
    """Run the Triton kernel tests on the CPU interpreter in a fresh process.

    The interpreter must be enabled before Triton is imported, which this process may already
    have done, hence the subprocess. Skipped where the Triton file runs natively instead.
    """
    pytest.importorskip("triton")
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("test_masked_attention_triton.py runs directly in this configuration")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            str(root / "tests" / "test_masked_attention_triton.py"),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " skipped" not in proc.stdout.splitlines()[-1], tail

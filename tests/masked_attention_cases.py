"""Shared cases and the error-ratio check for the masked-attention tests (not a test module).

The check is flash-attention's rule: the error of the code under test against an fp64 oracle
(computed from the very same rounded inputs) must be at most ``RATIO`` times the error of the
same eager code run in the input precision, plus a small absolute floor so that fp32 cases,
whose yardstick error can be ~1e-7, are not judged on rounding noise.
"""

from __future__ import annotations

import torch

from pqmim_kernels.reference.attention import masked_attention_reference

RATIO = 2.0
# Absolute floors, relative to the oracle's max magnitude (values and gradients are O(1) here).
FLOOR = {torch.float32: 2e-5, torch.float16: 2e-4, torch.bfloat16: 2e-3}

MASK_FORMS = (
    "none",
    "key_lengths",
    "key_mask",
    "attn_bool",
    "attn_bool_bcast",
    "attn_float",
    "combined",
)


def make_case(
    b: int,
    h: int,
    lq: int,
    lk: int,
    dh: int,
    form: str,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    device: str = "cpu",
    empty_rows: bool = True,
):
    """Random (q, k, v, grad_out, mask kwargs) for one mask form.

    With ``empty_rows``, some query rows see no key at all: batch 0 gets ``key_lengths = 0``
    (or an all-False key mask); attention masks hide every key of a few rows.
    """
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k, v = rnd(b, h, lq, dh), rnd(b, h, lk, dh), rnd(b, h, lk, dh)
    do = rnd(b, h, lq, dh)
    masks: dict[str, torch.Tensor] = {}
    lengths = torch.randint(1, lk + 1, (b,), generator=g)
    if empty_rows:
        lengths[0] = 0
    if b > 1:
        lengths[-1] = lk
    if form in ("key_lengths", "combined"):
        masks["key_lengths"] = lengths.to(device=device, dtype=torch.int32)
    if form == "key_mask":
        km = torch.rand(b, lk, generator=g) < 0.6
        if empty_rows:
            km[0] = False
        masks["key_mask"] = km.to(device)
    if form in ("attn_bool", "attn_bool_bcast", "combined"):
        shape = (
            (1, h, lq, lk)
            if form == "attn_bool_bcast"
            else (b, 1 if form == "combined" else h, lq, lk)
        )
        am = torch.rand(*shape, generator=g) < 0.7
        if empty_rows:
            am[..., ::5, :] = False
        masks["attn_mask"] = am.to(device)
    if form == "combined":
        km = torch.rand(b, lk, generator=g) < 0.8
        masks["key_mask"] = km.to(device)
    if form == "attn_float":
        bias = torch.randn(b, h, lq, lk, generator=g)
        bias = bias.masked_fill(torch.rand(b, h, lq, lk, generator=g) < 0.3, float("-inf"))
        if empty_rows:
            bias[:, :, ::4, :] = float("-inf")
        masks["attn_mask"] = bias.to(device=device, dtype=dtype)
    return q, k, v, do, masks


def oracle_and_yardstick(q, k, v, do, masks, *, scale=None):
    """fp64 oracle and same-precision eager yardstick: ((out, dq, dk, dv), (out, dq, dk, dv))."""
    results = []
    for kind in ("oracle", "yardstick"):
        if kind == "oracle":
            ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
            mk = {n: (m.double() if m.dtype.is_floating_point else m) for n, m in masks.items()}
            out = masked_attention_reference(*ins, scale=scale, upcast=False, **mk)
            grads = torch.autograd.grad(out, ins, do.double())
        else:
            ins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
            out = masked_attention_reference(*ins, scale=scale, upcast=False, **masks)
            grads = torch.autograd.grad(out, ins, do)
        results.append((out.detach(), *grads))
    return results[0], results[1]


def check_ratio(name: str, actual, oracle, yardstick, dtype) -> tuple[float, float]:
    """Assert the error-ratio rule; return (error, yardstick error) for reporting."""
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = (actual.double() - oracle).abs().max().item() if actual.numel() else 0.0
    base = (yardstick.double() - oracle).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, oracle.abs().max().item()) if actual.numel() else 1.0
    bound = RATIO * base + FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3e} > {RATIO} x yardstick {base:.3e} + floor"
    return err, base


def empty_rows_of(q, k, masks):
    """Bool (B, H, Lq): rows with no visible key, from the fp64 reference logsumexp."""
    _, lse = masked_attention_reference(
        q.double(),
        k.double(),
        k.double(),
        return_lse=True,
        **{n: (m.double() if m.dtype.is_floating_point else m) for n, m in masks.items()},
    )
    return torch.isneginf(lse)

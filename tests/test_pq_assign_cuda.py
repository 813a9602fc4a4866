"""pq_assign and pq_ema_statistics on a real GPU (skipped without CUDA).

What the interpreter cannot show: native fp16/bf16 tensor-core dots, the tf32x3 path on real
TF32 hardware, the autotuner and the prune on the actual device, pinned launches, and N·D past
2^31 elements (int64 offsets). The broad matrix launches pinned (one compile per kernel
variant); a few cases go through the autotuner. ``bench/gpu_suite.py`` runs this file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).parent))

from pq_cases import assert_argmin_criterion, clustered_inputs, make_inputs  # noqa: E402

from pqmim_kernels import functional as F  # noqa: E402
from pqmim_kernels.reference import pq as ref  # noqa: E402

DEV = "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# name: (z dtype, codebook dtype, fp32_precision)
OPERANDS = {
    "fp32-tf32x3": (F32, F32, "tf32x3"),
    "fp32-ieee": (F32, F32, "ieee"),
    "fp16": (F16, F16, "tf32x3"),
    "bf16": (BF16, BF16, "tf32x3"),
    "bf16z-fp32cb-tf32x3": (BF16, F32, "tf32x3"),
    "bf16z-fp32cb-ieee": (BF16, F32, "ieee"),
    "fp32z-fp16cb": (F32, F16, "tf32x3"),
}
SUBSPACES = {1: 8, 12: 3, 256: 2}  # d -> M
K = 300


def _inputs(operands, d, n, seed):
    z_dtype, cb_dtype, _ = OPERANDS[operands]
    z, cb = make_inputs((n,), SUBSPACES[d], K, d, F32, seed=seed, device=DEV)
    return z.to(z_dtype), cb.to(cb_dtype)


def _check_stats(z, codes, k):
    counts, sums = F.pq_ema_statistics(z, codes, k, backend="triton")
    exp_counts, exp_sums = ref.pq_ema_statistics(z, codes, k)
    assert torch.equal(counts, exp_counts)
    torch.testing.assert_close(sums, exp_sums, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("d", sorted(SUBSPACES))
@pytest.mark.parametrize("operands", sorted(OPERANDS))
def test_pinned_assign_and_statistics(operands, d):
    n = 777 if d < 256 else 301  # not a block multiple
    z, cb = _inputs(operands, d, n, seed=d)
    kw = dict(backend="triton", fp32_precision=OPERANDS[operands][2], pinned=True)
    codes, dists = F.pq_assign(z, cb, return_distances=True, **kw)
    assert codes.device.type == "cuda" and dists.dtype == torch.float32
    assert_argmin_criterion(z, cb, codes, dists)
    assert torch.equal(F.pq_assign(z, cb, **kw), codes)  # the WITH_DIST=False variant
    again = F.pq_assign(z, cb, return_distances=True, **kw)
    assert torch.equal(again[0], codes) and torch.equal(again[1], dists)  # pinned: bitwise
    _check_stats(z, codes, K)


@pytest.mark.parametrize(
    ("operands", "d"), [("fp32-tf32x3", 12), ("fp32-tf32x3", 256), ("bf16", 12), ("fp16", 256)]
)
def test_autotuned_assign(operands, d):
    z, cb = _inputs(operands, d, 2000, seed=100 + d)
    codes, dists = F.pq_assign(
        z, cb, return_distances=True, backend="triton", fp32_precision=OPERANDS[operands][2]
    )
    assert_argmin_criterion(z, cb, codes, dists)


def test_goal_shape_autotuned_every_dtype():
    """The benchmark's goal shape family (M = 16, K = 1024, d = 16) on a slice of rows."""
    for z_dtype in (F32, BF16, F16):
        z, cb = make_inputs((4096,), 16, 1024, 16, F32, seed=5, device=DEV)
        z, cb = z.to(z_dtype), cb.to(z_dtype)
        codes, dists = F.pq_assign(z, cb, return_distances=True)
        assert_argmin_criterion(z[:512], cb, codes[:512], dists[:512])


@pytest.mark.parametrize("precision", F.FP32_PRECISIONS)
@pytest.mark.parametrize("pinned", [True, False])
def test_clustered_codebook_needs_more_than_tf32(precision, pinned):
    """Both fp32 paths meet the criterion on clustered codebooks, where one TF32 product per
    term (torch's TF32 matmul, the same expanded score) does not: the test has teeth."""
    z, cb = clustered_inputs(512, 2, K, 8, device=DEV)
    codes, dists = F.pq_assign(
        z, cb, return_distances=True, backend="triton", fp32_precision=precision, pinned=pinned
    )
    assert_argmin_criterion(z, cb, codes, dists)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        zs = z.reshape(-1, 2, 8).transpose(0, 1)
        scores = torch.baddbmm((cb * cb).sum(-1)[:, None], zs, cb.transpose(1, 2), alpha=-2.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    with pytest.raises(AssertionError):
        assert_argmin_criterion(z, cb, scores.argmin(-1).t(), None)


@pytest.mark.parametrize("pinned", [True, False])
def test_exact_ties_take_the_lowest_index(pinned):
    g = torch.Generator().manual_seed(0)
    cb = torch.randint(-2, 3, (2, K, 4), generator=g).float()
    cb[0, 10] = cb[0, 3]
    cb[0, 250] = cb[0, 3]  # a later K tile whatever the tiling
    cb[1] = 9.0
    z = torch.cat([cb[0, 3], torch.zeros(4)]).repeat(100, 1)
    for dtype in (F32, BF16, F16):
        for precision in F.FP32_PRECISIONS:
            codes = F.pq_assign(
                z.to(DEV, dtype), cb.to(DEV, dtype), fp32_precision=precision, pinned=pinned
            )
            assert codes.tolist() == [[3, 0]] * 100, (dtype, precision)


def test_autotune_key_follows_the_size_of_the_call():
    from pqmim_kernels.ops import pq_assign as pa

    z, cb = make_inputs((70_000,), 4, 64, 8, F32, seed=3, device=DEV)
    before = len(pa._pq_assign_tuned.cache)
    F.pq_assign(z[:100], cb)
    F.pq_assign(z, cb)
    assert len(pa._pq_assign_tuned.cache) == before + 2  # N·M = 400 and 280,000: two buckets


@pytest.mark.parametrize("pinned", [True, False])
def test_more_than_2_31_elements(pinned):
    """N·D > 2^31 (4.3 GB of bf16): offsets past 2^31 elements are int64 in both kernels. The
    criterion is checked on rows at both ends and a random sample; the statistics count every
    row once."""
    m, d, k = 16, 16, K
    n = (1 << 31) // (m * d) + 4099
    g = torch.Generator(device=DEV).manual_seed(0)
    z = torch.randn(n, m * d, device=DEV, dtype=BF16, generator=g)
    cb = torch.randn(m, k, d, device=DEV, dtype=BF16, generator=g)
    codes, dists = F.pq_assign(z, cb, return_distances=True, backend="triton", pinned=pinned)
    rows = torch.cat(
        [
            torch.arange(1024, device=DEV),
            torch.arange(n - 1024, n, device=DEV),
            torch.randint(0, n, (1024,), device=DEV, generator=g),
        ]
    )
    assert int(rows.max()) * m * d > 2**31
    assert_argmin_criterion(z[rows], cb, codes[rows], dists[rows])
    counts, sums = F.pq_ema_statistics(z, codes, k, backend="triton")
    assert torch.equal(counts.sum(-1), torch.full((m,), float(n), device=DEV))
    del dists
    exp_counts, exp_sums = ref.pq_ema_statistics(z, codes, k)
    assert torch.equal(counts, exp_counts)
    torch.testing.assert_close(sums, exp_sums, rtol=1e-4, atol=1e-2)

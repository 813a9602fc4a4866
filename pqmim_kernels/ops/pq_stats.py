"""Fused EMA statistics of the product quantizer in Triton: per-codeword counts and sums.

One program reads a (BLOCK_N, d) tile of sub-space m of ``z`` and its codes once and scatters
both the count and the sub-vector sum into fp32 accumulators with atomic adds, in one pass:
no one-hot (N, K) matrix and no second read of z. Atomic adds make the summation order depend
on scheduling, so results agree with the eager ``index_add_`` path to fp32 rounding, not
bitwise (the EMA is insensitive to that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["pq_ema_statistics_triton"]


@triton.jit
def _pq_stats_kernel(
    z_ptr,
    codes_ptr,
    counts_ptr,
    sums_ptr,
    N,
    M,
    stride_zn,
    stride_zd,
    stride_cn,
    stride_cm,
    K: tl.constexpr,
    D_SUB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D_SUB
    code = tl.load(codes_ptr + rows.to(tl.int64) * stride_cn + m * stride_cm, mask=row_ok, other=0)
    z = tl.load(
        z_ptr
        + rows[:, None].to(tl.int64) * stride_zn
        + (m * D_SUB + offs_d[None, :]).to(tl.int64) * stride_zd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    slot = m.to(tl.int64) * K + code.to(tl.int64)
    tl.atomic_add(counts_ptr + slot, tl.full([BLOCK_N], 1.0, tl.float32), mask=row_ok)
    tl.atomic_add(
        sums_ptr + slot[:, None] * D_SUB + offs_d[None, :],
        z,
        mask=row_ok[:, None] & d_ok[None, :],
    )


def pq_ema_statistics_triton(
    z: torch.Tensor, codes: torch.Tensor, num_codes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (M, K) and sums (M, K, d), fp32, of z (..., D) grouped by codes (..., M) int64.

    Inputs are validated by :func:`pqmim_kernels.functional.pq_ema_statistics`, including the
    range of the codes: out-of-range codes would scatter out of bounds here.
    """
    m = codes.shape[-1]
    d = z.shape[-1] // m
    z2 = z.reshape(-1, m * d)
    c2 = codes.reshape(-1, m)
    n = z2.shape[0]
    counts = torch.zeros(m, num_codes, dtype=torch.float32, device=z.device)
    sums = torch.zeros(m, num_codes, d, dtype=torch.float32, device=z.device)
    if n == 0:
        return counts, sums
    block_n = 64
    grid = (triton.cdiv(n, block_n), m)
    _pq_stats_kernel[grid](
        z2,
        c2,
        counts,
        sums,
        n,
        m,
        z2.stride(0),
        z2.stride(1),
        c2.stride(0),
        c2.stride(1),
        K=num_codes,
        D_SUB=d,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return counts, sums

"""Fused product-quantization assignment in Triton.

One program owns a block of BLOCK_N rows of one sub-space m. It loads its (BLOCK_N, d) slice of
``z`` once, streams the K codewords of ``codebooks[m]`` in BLOCK_K tiles, and keeps a running
(min, argmin) per row; the N×K score matrix only ever exists as one register tile. Memory
traffic is one read of z and one read of each codebook per row block; the outputs are the codes
(N, M) int64 and the distances (N, M) fp32.

Numerics (the same choice as the eager spec, :mod:`pqmim_kernels.reference.pq`):

- Score = ``‖c‖² − 2 z·c`` (``‖z‖²`` is constant per row). ``z·c`` is a ``tl.dot`` with fp32
  accumulation: native fp16/bf16 tensor-core inputs when z and the codebooks share that dtype;
  IEEE fp32 (not TF32, whose 10-bit mantissa would make near-ties much worse) for fp32 inputs
  or mixed dtypes (both operands upcast in registers). ``‖c‖²`` is summed in fp32 from the tile.
- Ties: ``tl.min(..., return_indices=True)`` breaks ties to the left inside a tile and a later
  tile replaces the running best only when strictly smaller, so ties go to the lowest index,
  as ``torch.argmin``.
- The returned distance is recomputed directly as ``Σ (z − c*)²`` in fp32 for the winner c*,
  so it is accurate relative to itself (the expanded score is not, for small distances).
- d is padded to a power of two ≥ 16 (``tl.dot`` needs K-dim ≥ 16) with masked loads of zeros,
  which change neither dots nor norms; K is masked to +inf scores past the end.

Under the Triton interpreter (CPU tests) the bf16 ``tl.dot`` is wrong, so bf16 operands are
upcast there; on GPU the native bf16 dot is used.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_SUBSPACE_DIM", "pq_assign_triton"]

# Largest sub-vector length d held in registers by one program (BLOCK_D).
MAX_SUBSPACE_DIM = 256


@triton.jit
def _pq_assign_kernel(
    z_ptr,
    cb_ptr,
    codes_ptr,
    dist_ptr,
    N,
    M,
    stride_zn,
    stride_zd,
    K: tl.constexpr,
    D_SUB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    WITH_DIST: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D_SUB
    # int64 offsets: N·D may exceed 2^31 elements for large batches.
    z_ptrs = (
        z_ptr
        + rows[:, None].to(tl.int64) * stride_zn
        + (m * D_SUB + offs_d[None, :]).to(tl.int64) * stride_zd
    )
    z = tl.load(z_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        z = z.to(tl.float32)
    cb_base = cb_ptr + m.to(tl.int64) * (K * D_SUB)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        c = tl.load(
            cb_base + offs_k[:, None] * D_SUB + offs_d[None, :],
            mask=k_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        cf = c.to(tl.float32)
        cnorm = tl.sum(cf * cf, axis=1)
        if UPCAST:
            dot = tl.dot(z, tl.trans(cf), input_precision="ieee")
        elif z.dtype == tl.float32:
            dot = tl.dot(z, tl.trans(c), input_precision="ieee")
        else:
            dot = tl.dot(z, tl.trans(c), out_dtype=tl.float32)
        score = cnorm[None, :] - 2.0 * dot
        score = tl.where(k_ok[None, :], score, float("inf"))
        tile_min, tile_arg = tl.min(
            score, axis=1, return_indices=True, return_indices_tie_break_left=True
        )
        better = tile_min < best
        best_idx = tl.where(better, tile_arg.to(tl.int32) + k0, best_idx)
        best = tl.where(better, tile_min, best)

    out = rows.to(tl.int64) * M + m
    tl.store(codes_ptr + out, best_idx.to(tl.int64), mask=row_ok)
    if WITH_DIST:
        c_best = tl.load(
            cb_base + best_idx[:, None].to(tl.int64) * D_SUB + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        diff = z.to(tl.float32) - c_best.to(tl.float32)
        tl.store(dist_ptr + out, tl.sum(diff * diff, axis=1), mask=row_ok)


def _configs():
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn, bk, w, s in [
            (64, 64, 4, 3),
            (128, 64, 4, 3),
            (128, 128, 8, 3),
            (64, 128, 4, 4),
            (128, 256, 8, 3),
            (256, 128, 8, 3),
        ]
    ]


# H100: 227 KiB of shared memory per block; keep a margin for the compiler's own buffers.
_SMEM_BUDGET = 200 * 1024
# Always fits: 4 B · 256 · (32 + 32) = 64 KiB at the largest d.
_FALLBACK_CONFIG = triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2)


def _smem_bytes(config, block_d: int, elem: int) -> int:
    """Shared memory of one program: the z tile plus the pipelined codebook tiles.

    ptxas (sm_90) uses this plus < 1 KiB; sm_80 adds up to ~4 KiB of reduction scratch, which
    the margin under the 227 KiB limit covers (measured by compiling ahead of time).
    """
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    return elem * block_d * (bn + bk * max(1, config.num_stages - 1))


def _prune_configs(configs, named_args, **kwargs):
    """Drop tilings that would not fit in shared memory at this d (large d, fp32 operands)."""
    # The autotuner passes positional launch arguments in named_args, keyword ones in kwargs.
    args = {**named_args, **kwargs}
    elem = 4 if args["UPCAST"] or args["z_ptr"].dtype == torch.float32 else 2
    kept = [c for c in configs if _smem_bytes(c, args["BLOCK_D"], elem) <= _SMEM_BUDGET]
    return kept or [_FALLBACK_CONFIG]


# Autotuned on GPU, keyed on the compile-time shape; the interpreter uses one small tiling.
_pq_assign_tuned = triton.autotune(
    configs=_configs(),
    key=["K", "D_SUB", "UPCAST", "WITH_DIST"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_pq_assign_kernel)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def pq_assign_triton(
    z: torch.Tensor, codebooks: torch.Tensor, *, with_distances: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused assignment (inputs already validated by the caller).

    Args:
        z: (..., D) float32/float16/bfloat16, any strides (the leading dims are flattened with
            ``reshape``, which copies only when they cannot be viewed as one).
        codebooks: (M, K, d) with M·d = D and d ≤ ``MAX_SUBSPACE_DIM``.

    Returns:
        codes (..., M) int64 and distances to the chosen codewords (..., M) float32 (``None``
        without ``with_distances``, which skips their computation).
    """
    m, k, d = codebooks.shape
    if d > MAX_SUBSPACE_DIM:
        raise ValueError(
            f"pq_assign: the Triton kernel supports sub-vector length d ≤ {MAX_SUBSPACE_DIM}, "
            f"got d = {d}; use backend='reference'"
        )
    lead = z.shape[:-1]
    z2 = z.reshape(-1, m * d)
    n = z2.shape[0]
    codes = torch.empty(n, m, dtype=torch.int64, device=z.device)
    dists = torch.empty(n if with_distances else 0, m, dtype=torch.float32, device=z.device)

    def result():
        return codes.reshape(*lead, m), dists.reshape(*lead, m) if with_distances else None

    if n == 0:
        return result()
    cb = codebooks.contiguous()
    interpret = _interpreting()
    upcast = z.dtype != cb.dtype or (interpret and z.dtype == torch.bfloat16)
    block_d = max(16, triton.next_power_of_2(d))
    args = (z2, cb, codes, dists, n, m, z2.stride(0), z2.stride(1))
    if interpret:
        block_n, block_k = 32, 64
        grid = (triton.cdiv(n, block_n), m)
        _pq_assign_kernel[grid](
            *args,
            K=k,
            D_SUB=d,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            UPCAST=upcast,
            WITH_DIST=with_distances,
        )
    else:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), m)

        _pq_assign_tuned[grid](
            *args, K=k, D_SUB=d, BLOCK_D=block_d, UPCAST=upcast, WITH_DIST=with_distances
        )
    return result()

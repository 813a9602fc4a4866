"""Fused product-quantization assignment in Triton.

One program owns a block of BLOCK_N rows of one sub-space m. It loads its (BLOCK_N, d) slice of
``z`` once, streams the K codewords of ``codebooks[m]`` in BLOCK_K tiles, and keeps a running
(min, argmin) per row; the N×K score matrix only ever exists as one register tile. Memory
traffic is one read of z and one read of each codebook per row block; the outputs are the codes
(N, M) int64 and the distances (N, M) fp32.

Numerics (the same choice as the eager spec, :mod:`pqmim_kernels.reference.pq`):

- Score = ``‖c‖² − 2 z·c`` (``‖z‖²`` is constant per row). ``z·c`` is a ``tl.dot`` with fp32
  accumulation, in one of three modes (constexpr ``DOT``):

  * ``"f16"``: native fp16/bf16 tensor-core inputs when z and the codebooks share that dtype
    (products of 16-bit values are exact in fp32).
  * ``"tf32x3"`` (default for fp32 or mixed dtypes): each fp32 operand is split into
    ``hi + lo`` with both parts rounded to TF32 (10-bit mantissa) and ``z·c`` is
    ``lo_z·hi_c + hi_z·lo_c + hi_z·hi_c`` as three TF32 tensor-core dots. Every product of two
    TF32 values is exact in fp32, so what is lost is ``lo_z·lo_c`` and the rounding of the
    ``lo`` parts: ≤ ~3·2⁻²² relative per product, against 2⁻¹¹ for plain TF32. The split is
    written out (bit operations, not ``input_precision="tf32x3"``) so that the interpreter,
    which ignores ``input_precision``, computes the very same products as the GPU.
  * ``"ieee"``: IEEE fp32 FMA (no tensor cores), the exact path behind the
    ``fp32_precision="ieee"`` flag.

  Either fp32 mode meets the argmin criterion of the tests (the chosen codeword's distance within
  ``1e-5·(‖z‖² + max‖c‖²)`` of the true minimum). ``‖c‖²`` is summed in fp32 from the tile.
- Ties: ``tl.min(..., return_indices=True)`` breaks ties to the left inside a tile and a later
  tile replaces the running best only when strictly smaller, so ties go to the lowest index,
  as ``torch.argmin``.
- The returned distance is recomputed directly as ``Σ (z − c*)²`` in fp32 for the winner c*,
  so it is accurate relative to itself (the expanded score is not, for small distances).
- d is padded to a power of two ≥ 16 (``tl.dot`` needs K-dim ≥ 16) with masked loads of zeros,
  which change neither dots nor norms; K is masked to +inf scores past the end.
- Long sub-vectors: up to BLOCK_D = 64 (16-bit), 32 (tf32x3) or 16 (ieee) the z tile stays in
  registers for the whole K loop (``D_CHUNK == BLOCK_D``); beyond, each K tile is a small matmul
  over d in D_CHUNK slices with z re-read from cache, so no operand outgrows the registers.

Launch configs: autotuned on the GPU, keyed on the compile-time shape and a power-of-two
bucket of N·M (the grid size, so one small first call does not fix the tiling for every later
size); the candidates are pruned to those that fit the device's shared memory and registers
(:mod:`pqmim_kernels.ops._launch`). ``pinned=True`` launches one fixed tiling per (BLOCK_D,
operand width) instead (only its pipeline depth adapts to the device), so results depend only
on the inputs, the GPU model and the Triton version. Under the Triton interpreter (CPU tests)
one small tiling runs and bf16 operands are upcast (the interpreter's bf16 ``tl.dot`` is wrong).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pqmim_kernels.ops._launch import (
    device_limits,
    fitting_configs,
    interpreting,
    pinned_config,
    pow2_bucket,
)

__all__ = ["FP32_PRECISIONS", "pq_assign_triton"]

FP32_PRECISIONS = ("tf32x3", "ieee")


@triton.jit
def _round_tf32(x):
    """fp32 -> nearest TF32 value (10 explicit mantissa bits; ties away from zero), as fp32."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)  # -8192 = 0xFFFFE000


@triton.jit
def _split_tf32(x):
    """x = hi + lo + r: hi and lo TF32 values, |r| ≤ 2⁻²² |x|."""
    hi = _round_tf32(x)
    return hi, _round_tf32(x - hi)


@triton.jit
def _dot_acc(z, c, acc, DOT: tl.constexpr):
    """acc + z @ c^T for a (rows, dk) z tile and a (BLOCK_K, dk) codebook tile, fp32 accumulate."""
    if DOT == "tf32x3":
        z_hi, z_lo = _split_tf32(z.to(tl.float32))
        c_hi, c_lo = _split_tf32(c.to(tl.float32))
        # Small terms first: they are accumulated before the large one is added.
        acc = tl.dot(z_lo, tl.trans(c_hi), acc, input_precision="tf32")
        acc = tl.dot(z_hi, tl.trans(c_lo), acc, input_precision="tf32")
        acc = tl.dot(z_hi, tl.trans(c_hi), acc, input_precision="tf32")
    elif DOT == "ieee":
        acc = tl.dot(z.to(tl.float32), tl.trans(c.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(z, tl.trans(c), acc, out_dtype=tl.float32)
    return acc


@triton.jit
def _pq_assign_kernel(
    z_ptr,
    cb_ptr,
    codes_ptr,
    dist_ptr,
    N,
    M,
    NM_BUCKET,
    stride_zn,
    stride_zd,
    K: tl.constexpr,
    D_SUB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT: tl.constexpr,
    WITH_DIST: tl.constexpr,
):
    """One (BLOCK_N rows, sub-space m) block. With D_CHUNK == BLOCK_D the z tile stays in
    registers for the whole K loop; with D_CHUNK < BLOCK_D (large d) every K tile is a small
    matmul over d in D_CHUNK slices, z re-read from cache, so no operand outgrows the registers.
    NM_BUCKET is read by the autotuner's key only."""
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 offsets: N·D may exceed 2^31 elements for large batches.
    z_rows = z_ptr + rows[:, None].to(tl.int64) * stride_zn + (m * D_SUB).to(tl.int64) * stride_zd
    cb_base = cb_ptr + m.to(tl.int64) * (K * D_SUB)
    if D_CHUNK == BLOCK_D:
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D_SUB
        z = tl.load(
            z_rows + offs_d[None, :] * stride_zd,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            z = z.to(tl.float32)
        if DOT == "tf32x3":
            z = z.to(tl.float32)
            z_hi, z_lo = _split_tf32(z)

    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        dot = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        if D_CHUNK == BLOCK_D:
            c = tl.load(
                cb_base + offs_k[:, None] * D_SUB + offs_d[None, :],
                mask=k_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            cf = c.to(tl.float32)
            cnorm = tl.sum(cf * cf, axis=1)
            if DOT == "tf32x3":  # z split once, outside the loop
                c_hi, c_lo = _split_tf32(cf)
                dot = tl.dot(z_lo, tl.trans(c_hi), dot, input_precision="tf32")
                dot = tl.dot(z_hi, tl.trans(c_lo), dot, input_precision="tf32")
                dot = tl.dot(z_hi, tl.trans(c_hi), dot, input_precision="tf32")
            else:
                dot = _dot_acc(z, c, dot, DOT)
        else:
            cnorm = tl.zeros([BLOCK_K], tl.float32)
            for d0 in range(0, BLOCK_D, D_CHUNK):
                offs_d = d0 + tl.arange(0, D_CHUNK)
                d_ok = offs_d < D_SUB
                zc = tl.load(
                    z_rows + offs_d[None, :] * stride_zd,
                    mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                if UPCAST:
                    zc = zc.to(tl.float32)
                c = tl.load(
                    cb_base + offs_k[:, None] * D_SUB + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :],
                    other=0.0,
                )
                cf = c.to(tl.float32)
                cnorm += tl.sum(cf * cf, axis=1)
                dot = _dot_acc(zc, cf if UPCAST else c, dot, DOT)
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
        c_rows = cb_base + best_idx[:, None].to(tl.int64) * D_SUB
        dist = tl.zeros([BLOCK_N], tl.float32)
        for d0 in range(0, BLOCK_D, D_CHUNK):
            offs_d = d0 + tl.arange(0, D_CHUNK)
            ok = row_ok[:, None] & (offs_d < D_SUB)[None, :]
            zc = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=ok, other=0.0)
            c_best = tl.load(c_rows + offs_d[None, :], mask=ok, other=0.0)
            diff = zc.to(tl.float32) - c_best.to(tl.float32)
            dist += tl.sum(diff * diff, axis=1)
        tl.store(dist_ptr + out, dist, mask=row_ok)


# ---- launch configs --------------------------------------------------------------------------


def _config(bn, bk, warps, stages):
    return triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _configs():
    return [
        _config(bn, bk, w, s)
        for bn, bk, w, s in [
            (64, 64, 4, 3),
            (128, 64, 4, 3),
            (128, 128, 8, 3),
            (64, 128, 4, 4),
            (256, 128, 8, 3),
            (32, 64, 4, 3),
            (64, 32, 4, 2),
        ]
    ]


# Ever smaller tilings for when no candidate fits; the last fits any device class at d = 256.
_FALLBACKS = [_config(32, 32, 4, 2), _config(16, 32, 4, 1)]


def _operand_bytes(upcast: bool, dot: str, z_dtype: torch.dtype) -> int:
    return 4 if upcast or dot != "f16" or z_dtype == torch.float32 else 2


# The z tile stays in registers up to BLOCK_D = _RESIDENT_D; beyond, the kernel loops over d in
# _D_CHUNK slices. Ahead-of-time compiles (sm_80/sm_90) showed resident fp32 z spilling
# registers in most tilings from d = 64 on sm_80 (tf32x3: hi and lo both live) and the IEEE FMA
# dot spilling from d = 64; sliced, no kept tiling spills up to d = 256.
_RESIDENT_D = {"f16": 64, "tf32x3": 32, "ieee": 16}
_D_CHUNK = {"f16": 64, "tf32x3": 32, "ieee": 16}


def d_chunk(dot: str, block_d: int) -> int:
    """D_CHUNK of the kernel: BLOCK_D itself (z resident) or the slice of the d loop."""
    return block_d if block_d <= _RESIDENT_D[dot] else _D_CHUNK[dot]


def config_cost(config, block_d: int, elem: int, dot: str) -> tuple[int, float]:
    """(shared memory bytes, registers per thread) of one program under ``config``.

    Shared memory: the z tile (or z slice), the pipelined codebook tiles (``num_stages - 1`` in
    flight) and for ``tf32x3`` the staged hi/lo operand copies. Registers, per thread: the fp32
    score tile (BLOCK_N x BLOCK_K), the z operand (twice for hi/lo) and the codebook tile
    (three copies for the split) in flight, plus indices, pointers and the running argmin.
    The register weights were fitted to ptxas's counts on sm_80 and sm_90 (Triton 3.9) so that
    no kept config spills; the FMA dot of ``ieee`` holds its operands broadcast in registers
    and scales with the score tile alone. Upper bounds in spirit, not predictions.
    """
    bn, bk = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"]
    dk = d_chunk(dot, block_d)
    split = 2 if dot == "tf32x3" else 1
    ring = max(1, config.num_stages - 1)
    if dk == block_d:  # z resident, codebook tiles streamed
        smem = elem * dk * (bn * split + bk * (ring + split))
    else:  # z and codebook slices both streamed
        smem = elem * dk * ((bn + bk) * ring + split * (bn + bk))
    threads = 32 * config.num_warps
    words = elem / 4
    acc = bn * bk / threads
    if dot == "ieee":
        regs = 2.0 * acc + 50
    else:
        z_op = split * bn * dk * words / threads
        c_op = (2 * split - 1) * bk * dk * words / threads
        regs = 1.5 * acc + 0.5 * z_op + 1.5 * c_op + 50
    return smem, regs


def _cost_of(args):
    elem = _operand_bytes(args["UPCAST"], args["DOT"], args["z_ptr"].dtype)
    return lambda c: config_cost(c, args["BLOCK_D"], elem, args["DOT"])


def _prune_configs(configs, named_args, **kwargs):
    """Keep the tilings that fit this device at this d and operand width (see ``_launch``)."""
    # The autotuner passes positional launch arguments in named_args, keyword ones in kwargs.
    args = {**named_args, **kwargs}
    return fitting_configs(configs, _cost_of(args), device_limits(args["z_ptr"]), _FALLBACKS)


_pq_assign_tuned = triton.autotune(
    configs=_configs(),
    key=["NM_BUCKET", "K", "D_SUB", "UPCAST", "DOT", "WITH_DIST"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_pq_assign_kernel)


# Pinned tilings (BLOCK_N, BLOCK_K, num_warps) by operand width and BLOCK_D, picked among the
# tilings that compile without spills on sm_80 and sm_90; only the pipeline depth adapts to the
# device (it does not change results). Block sizes and warps are what fix the arithmetic.
_PINNED = {
    2: {16: (128, 64, 4), 32: (128, 64, 4), 64: (64, 64, 4), 128: (64, 64, 4), 256: (64, 64, 4)},
    4: {16: (64, 64, 4), 32: (64, 64, 4), 64: (64, 64, 4), 128: (64, 64, 4), 256: (64, 64, 4)},
}


def pinned_pq_config(block_d: int, elem: int, dot: str, limits):
    """The pinned config for this BLOCK_D / operand width on a device with ``limits``."""
    bn, bk, warps = _PINNED[elem][block_d]

    def cost(c):
        return config_cost(c, block_d, elem, dot)

    return pinned_config(lambda s: _config(bn, bk, warps, s), cost, limits, _FALLBACKS)


# The interpreter runs one small tiling: autotuning would only multiply the (slow) work.
_INTERPRETER_BLOCKS = {"BLOCK_N": 32, "BLOCK_K": 64}


def pq_assign_triton(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    with_distances: bool = True,
    fp32_precision: str = "tf32x3",
    pinned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the fused assignment (inputs validated by :func:`pqmim_kernels.functional.pq_assign`).

    Args:
        z: (..., D) float32/float16/bfloat16, any strides (the leading dims are flattened with
            ``reshape``, which copies only when they cannot be viewed as one).
        codebooks: (M, K, d) with M·d = D and d ≤ ``PQ_MAX_SUBSPACE_DIM``.
        with_distances: also compute the distances (else ``None`` is returned for them).
        fp32_precision: ``"tf32x3"`` or ``"ieee"``: the dot of fp32 (or mixed-dtype) operands.
        pinned: launch the fixed tiling of :func:`pinned_pq_config` instead of autotuning.

    Returns:
        codes (..., M) int64 and distances to the chosen codewords (..., M) float32.
    """
    m, k, d = codebooks.shape
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
    interpret = interpreting()
    upcast = z.dtype != cb.dtype or (interpret and z.dtype == torch.bfloat16)
    dot = fp32_precision if upcast or z.dtype == torch.float32 else "f16"
    block_d = max(16, triton.next_power_of_2(d))
    args = (z2, cb, codes, dists, n, m, pow2_bucket(n * m, 1 << 12, 1 << 24))
    args += (z2.stride(0), z2.stride(1))
    meta = dict(K=k, D_SUB=d, BLOCK_D=block_d, D_CHUNK=d_chunk(dot, block_d), UPCAST=upcast)
    meta.update(DOT=dot, WITH_DIST=with_distances)
    if interpret or pinned:
        if interpret:
            fixed = dict(_INTERPRETER_BLOCKS)
        else:
            elem = _operand_bytes(upcast, dot, z.dtype)
            c = pinned_pq_config(block_d, elem, dot, device_limits(z.device))
            fixed = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        grid = (triton.cdiv(n, fixed["BLOCK_N"]), m)
        _pq_assign_kernel[grid](*args, **meta, **fixed)
    else:

        def grid(meta):
            return (triton.cdiv(n, meta["BLOCK_N"]), m)

        _pq_assign_tuned[grid](*args, **meta)
    return result()

"""Masked flash attention in Triton: forward, backward, host launchers.

Reads top to bottom: the shared score tile (masks as constexpr variants), the forward kernel
(online softmax, logsumexp saved), the two backward kernels (dq + delta, then dk/dv), autotune
configs, and the host launchers called by :mod:`pqmim_kernels.functional` (which owns the
autograd wiring through a torch custom op). The spec is
:func:`pqmim_kernels.reference.attention.masked_attention_reference`.

Mask variants (constexpr flags of one kernel, never copies):

- ``HAS_BOUND``: a per-batch key bound ``n_end`` in ``[0, Lk]``, from ``key_lengths`` and/or the
  last visible key of ``key_mask``. Every loop over keys stops at ``n_end``, so key blocks past
  it are never loaded: the cost follows the number of known keys ("known first" token order).
- ``HAS_KEY_MASK``: per-key bytes (B, Lk), 1 = visible.
- ``MASK_MODE``: 0 none, 1 bool ``attn_mask`` bytes, 2 additive float bias; both with
  broadcast strides over B and H.

Numerics: scores are computed as ``q @ k^T * (scale * log2 e)`` with fp32 accumulation and
``exp2``; the running max ``m`` is replaced by 0 while it is still ``-inf`` (no visible key yet)
so that ``exp2(-inf - m)`` is 0 rather than NaN; a row whose sum stays 0 has no visible key,
returns 0 and stores ``lse = -inf``, which the backward maps to ``+inf`` so that every
recomputed probability of that row is exactly 0. fp32 inputs use IEEE fp32 dots (not TF32),
so fp32 results meet the fp32 error bound.

Loops: on GPU every loop over blocks is a ``for ... in range(lo, hi, BLOCK)`` with a runtime
bound, which Triton software-pipelines. The Triton 3.6 interpreter cannot take a runtime
``range`` bound with numpy >= 2.4 (it calls ``int()`` on a 1-element array), so under the
interpreter (``INTERPRETER`` constexpr) the very same step helper runs in a ``while`` loop.

Launch configs: each kernel autotunes over a handful of candidates, pruned to those whose
shared memory and registers fit the device (:mod:`pqmim_kernels.ops._launch`; a smaller
fallback when none does). Autotuning picks by timing, so two processes may tile the same shape
differently and round differently; ``pinned=True`` launches one fixed config per kernel instead
(:func:`pinned_attention_config`), for callers that must reproduce results exactly.
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

__all__ = ["masked_attention_backward", "masked_attention_forward"]

LOG2E = 1.4426950408889634  # log2(e): scores are kept in log2 units for exp2
LN2 = 0.6931471805599453  # ln(2): back to natural-log units for the saved logsumexp
# The same constants for the kernels (Triton reads module globals only when constexpr).
_LOG2E: tl.constexpr = tl.constexpr(LOG2E)
_LN2: tl.constexpr = tl.constexpr(LN2)


@triton.jit
def _score_tile(
    q, k, b, h, offs_m, offs_n, m_valid, n_end, KMASK, AMASK, qk_scale,
    stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
    HAS_KEY_MASK: tl.constexpr, MASK_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHECK_N: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 scores in log2 units, hidden keys at -inf.

    ``CHECK_N=False`` for key blocks wholly below ``n_end``: no per-element bound select.
    """
    s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * qk_scale
    n_valid = offs_n < n_end
    if MASK_MODE != 0:
        am_ptrs = (
            AMASK
            + b.to(tl.int64) * stride_amb
            + h.to(tl.int64) * stride_amh
            + offs_m[:, None].to(tl.int64) * stride_amm
            + offs_n[None, :] * stride_amn
        )
        tile_valid = m_valid[:, None] & n_valid[None, :]
        if MASK_MODE == 1:
            am = tl.load(am_ptrs, mask=tile_valid, other=0)
            s = tl.where(am != 0, s, float("-inf"))
        else:
            bias = tl.load(am_ptrs, mask=tile_valid, other=0.0).to(tl.float32)
            s = s + bias * _LOG2E
    if HAS_KEY_MASK:
        km = tl.load(KMASK + b.to(tl.int64) * stride_kmb + offs_n, mask=n_valid, other=0)
        s = tl.where((km != 0)[None, :], s, float("-inf"))
    if CHECK_N:
        s = tl.where(n_valid[None, :], s, float("-inf"))
    return s


@triton.jit
def _load_rows(ptrs, offs, end, d_valid, CHECK: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, D_PAD) tile; rows >= end and padded head-dim columns read as 0."""
    if CHECK:
        x = tl.load(ptrs, mask=(offs < end)[:, None] & d_valid[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_valid[None, :], other=0.0)
    return x


@triton.jit
def _fwd_step(
    q, m_i, l_i, acc, start_n, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
    m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
    HAS_KEY_MASK: tl.constexpr, MASK_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHECK_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """One key block of the online softmax: returns the updated (m_i, l_i, acc)."""
    offs_n = start_n + offs_n0
    k = _load_rows(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        offs_n, n_end, d_valid, CHECK_N, EVEN_D,
    )  # fmt: skip
    s = _score_tile(
        q, k, b, h, offs_m, offs_n, m_valid, n_end, KMASK, AMASK, qk_scale,
        stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
        HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, CHECK_N,
    )  # fmt: skip
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # While a row has seen no visible key its max is -inf; shifting by 0 instead keeps
    # exp2(-inf - shift) = 0 (no NaN) and the row's sum at 0.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_rows(
        v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        offs_n, n_end, d_valid, CHECK_N, EVEN_D,
    )  # fmt: skip
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=INPUT_PRECISION)
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _masked_attn_fwd(
    Q,
    K,
    V,
    O,
    LSE,
    BOUND,
    KMASK,
    AMASK,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_kmb,
    stride_amb,
    stride_amh,
    stride_amm,
    stride_amn,
    H,
    LQ,
    LK,
    LQ_BUCKET,
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_BOUND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    MASK_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_valid = offs_m < LQ
    d_valid = offs_d < HEAD_DIM

    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=m_valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    n_end = LK
    if HAS_BOUND:
        n_end = tl.load(BOUND + b)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    # Key blocks wholly below n_end skip the bound check; one partial tail block follows.
    n_full = n_end - n_end % BLOCK_N
    if INTERPRETER:
        start_n = 0
        while start_n < n_full:
            m_i, l_i, acc = _fwd_step(
                q, m_i, l_i, acc, start_n, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
                m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
                stride_kn, stride_kd, stride_vn, stride_vd,
                stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
                HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, False, HEAD_DIM == D_PAD,
            )  # fmt: skip
            start_n += BLOCK_N
    else:
        for start_n in range(0, n_full, BLOCK_N):
            m_i, l_i, acc = _fwd_step(
                q, m_i, l_i, acc, start_n, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
                m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
                stride_kn, stride_kd, stride_vn, stride_vd,
                stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
                HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, False, HEAD_DIM == D_PAD,
            )  # fmt: skip
    if n_full < n_end:
        m_i, l_i, acc = _fwd_step(
            q, m_i, l_i, acc, n_full, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
            m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
            HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, True, HEAD_DIM == D_PAD,
        )  # fmt: skip

    # A visible row's sum is >= 1 (its max term is exp2(0)); 0 means no visible key.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * _LN2)
    o_ptrs = (
        O
        + b.to(tl.int64) * stride_ob
        + h.to(tl.int64) * stride_oh
        + offs_m[:, None] * stride_om
        + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, lse, mask=m_valid)


@triton.jit
def _dq_step(
    q, do, dq, lse2, delta, start_n, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
    m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
    HAS_KEY_MASK: tl.constexpr, MASK_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    CHECK_N: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """One key block of dq = sum_n dS[:, n] k[n] (unscaled); returns the updated dq."""
    offs_n = start_n + offs_n0
    k = _load_rows(
        k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        offs_n, n_end, d_valid, CHECK_N, EVEN_D,
    )  # fmt: skip
    v = _load_rows(
        v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        offs_n, n_end, d_valid, CHECK_N, EVEN_D,
    )  # fmt: skip
    s = _score_tile(
        q, k, b, h, offs_m, offs_n, m_valid, n_end, KMASK, AMASK, qk_scale,
        stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
        HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, CHECK_N,
    )  # fmt: skip
    p = tl.math.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.jit
def _masked_attn_bwd_dq(
    Q,
    K,
    V,
    O,
    DO,
    LSE,
    DELTA,
    DQ,
    BOUND,
    KMASK,
    AMASK,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_kmb,
    stride_amb,
    stride_amh,
    stride_amm,
    stride_amn,
    H,
    LQ,
    LK,
    LQ_BUCKET,
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_BOUND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    MASK_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq for one query block; also stores delta = rowsum(dO * O) for the dk/dv kernel.

    O, dO and dQ share the contiguous (B, H, Lq, Dh) strides ``stride_o*``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_valid = offs_m < LQ
    d_valid = offs_d < HEAD_DIM
    md_mask = m_valid[:, None] & d_valid[None, :]

    q = tl.load(
        Q
        + b.to(tl.int64) * stride_qb
        + h.to(tl.int64) * stride_qh
        + offs_m[:, None] * stride_qm
        + offs_d[None, :] * stride_qd,
        mask=md_mask,
        other=0.0,
    )
    o_off = b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    o_tile = offs_m[:, None] * stride_om + offs_d[None, :]
    o = tl.load(O + o_off + o_tile, mask=md_mask, other=0.0).to(tl.float32)
    do = tl.load(DO + o_off + o_tile, mask=md_mask, other=0.0)
    delta = tl.sum(o * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, delta, mask=m_valid)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * LQ + offs_m, mask=m_valid, other=float("inf"))
    # Natural-log lse -> log2 units; an empty row (lse = -inf) becomes +inf so that every
    # recomputed probability exp2(s - lse) of that row is exactly 0.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)

    n_end = LK
    if HAS_BOUND:
        n_end = tl.load(BOUND + b)
    k_base = K + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_full = n_end - n_end % BLOCK_N
    if INTERPRETER:
        start_n = 0
        while start_n < n_full:
            dq = _dq_step(
                q, do, dq, lse2, delta, start_n, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
                m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
                stride_kn, stride_kd, stride_vn, stride_vd,
                stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
                HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, False, HEAD_DIM == D_PAD,
            )  # fmt: skip
            start_n += BLOCK_N
    else:
        for start_n in range(0, n_full, BLOCK_N):
            dq = _dq_step(
                q, do, dq, lse2, delta, start_n, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
                m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
                stride_kn, stride_kd, stride_vn, stride_vd,
                stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
                HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, False, HEAD_DIM == D_PAD,
            )  # fmt: skip
    if n_full < n_end:
        dq = _dq_step(
            q, do, dq, lse2, delta, n_full, k_base, v_base, b, h, offs_m, offs_n0, offs_d,
            m_valid, d_valid, n_end, KMASK, AMASK, qk_scale,
            stride_kn, stride_kd, stride_vn, stride_vd,
            stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
            HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, True, HEAD_DIM == D_PAD,
        )  # fmt: skip
    dq = dq * sm_scale
    tl.store(DQ + o_off + o_tile, dq.to(DQ.dtype.element_ty), mask=md_mask)


@triton.jit
def _dkdv_step(
    k, v, dk, dv, start_m, q_base, do_base, LSE, DELTA, pid_bh, b, h, offs_n,
    offs_m0, offs_d, d_valid, n_end, LQ, KMASK, AMASK, qk_scale,
    stride_qm, stride_qd, stride_om,
    stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
    HAS_KEY_MASK: tl.constexpr, MASK_MODE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One query block's contribution to (dk unscaled, dv) of a key block."""
    offs_m = start_m + offs_m0
    m_valid = offs_m < LQ
    md_mask = m_valid[:, None] & d_valid[None, :]
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=md_mask,
        other=0.0,
    )
    do = tl.load(do_base + offs_m[:, None] * stride_om + offs_d[None, :], mask=md_mask, other=0.0)
    row = pid_bh.to(tl.int64) * LQ + offs_m
    lse = tl.load(LSE + row, mask=m_valid, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + row, mask=m_valid, other=0.0)
    s = _score_tile(
        q, k, b, h, offs_m, offs_n, m_valid, n_end, KMASK, AMASK, qk_scale,
        stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
        HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION, True,
    )  # fmt: skip
    p = tl.math.exp2(s - lse2[:, None])
    dv = tl.dot(tl.trans(p).to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds).to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.jit
def _masked_attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    BOUND,
    KMASK,
    AMASK,
    qk_scale,
    sm_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_om,
    stride_kmb,
    stride_amb,
    stride_amh,
    stride_amm,
    stride_amn,
    H,
    LQ,
    LK,
    LQ_BUCKET,
    LK_BUCKET,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_BOUND: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    MASK_MODE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INTERPRETER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dk, dv for one key block, looping over every query block.

    dO shares the (B, H, Lq, Dh) strides ``stride_o*``; dK and dV are contiguous (B, H, Lk, Dh).
    A key block entirely past the bound skips the loop and stores zeros.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_valid = offs_d < HEAD_DIM

    n_end = LK
    if HAS_BOUND:
        n_end = tl.load(BOUND + b)
    kv_mask = (offs_n < n_end)[:, None] & d_valid[None, :]
    k = tl.load(
        K
        + b.to(tl.int64) * stride_kb
        + h.to(tl.int64) * stride_kh
        + offs_n[:, None] * stride_kn
        + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V
        + b.to(tl.int64) * stride_vb
        + h.to(tl.int64) * stride_vh
        + offs_n[:, None] * stride_vn
        + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    do_base = DO + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    m_stop = tl.where(start_n < n_end, LQ, 0)
    if INTERPRETER:
        start_m = 0
        while start_m < m_stop:
            dk, dv = _dkdv_step(
                k, v, dk, dv, start_m, q_base, do_base, LSE, DELTA, pid_bh, b, h, offs_n,
                offs_m0, offs_d, d_valid, n_end, LQ, KMASK, AMASK, qk_scale,
                stride_qm, stride_qd, stride_om,
                stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
                HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION,
            )  # fmt: skip
            start_m += BLOCK_M
    else:
        for start_m in range(0, m_stop, BLOCK_M):
            dk, dv = _dkdv_step(
                k, v, dk, dv, start_m, q_base, do_base, LSE, DELTA, pid_bh, b, h, offs_n,
                offs_m0, offs_d, d_valid, n_end, LQ, KMASK, AMASK, qk_scale,
                stride_qm, stride_qd, stride_om,
                stride_kmb, stride_amb, stride_amh, stride_amm, stride_amn,
                HAS_KEY_MASK, MASK_MODE, INPUT_PRECISION,
            )  # fmt: skip
    dk = dk * sm_scale
    out_mask = (offs_n < LK)[:, None] & d_valid[None, :]
    dkv_tile = pid_bh.to(tl.int64) * LK * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + dkv_tile, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + dkv_tile, dv.to(DV.dtype.element_ty), mask=out_mask)


# ---- launch configs (GPU) ----

_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_BOUND", "HAS_KEY_MASK", "MASK_MODE"]


def _config(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# A small candidate set per kernel (each candidate costs a compile and a timing on the first
# call of every key); (BLOCK_M, BLOCK_N, num_warps, num_stages).
_CANDIDATES = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2),
            (64, 32, 4, 3), (128, 32, 8, 3)],
    "dq": [(64, 64, 4, 2), (64, 32, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (32, 64, 4, 2)],
    "dkdv": [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2), (64, 32, 4, 3)],
}  # fmt: skip
# Ever smaller configs for when no candidate fits; the last fits any device class at Dh = 256.
_FALLBACKS = [_config(32, 32, 4, 2), _config(16, 16, 1, 1)]
# Pinned (BLOCK_M, BLOCK_N, num_warps) per kernel by D_PAD (<= 64, 128, 256) for 16-bit inputs;
# fp32 inputs take the next row down (512: fp32 at D_PAD = 256, sized to fit 99 KiB at one
# stage). The pipeline depth adapts to the device; blocks and warps never do.
_PINNED = {
    "fwd": {64: (64, 64, 4), 128: (64, 32, 4), 256: (64, 32, 4), 512: (32, 16, 2)},
    "dq": {64: (64, 32, 4), 128: (64, 32, 4), 256: (32, 32, 4), 512: (16, 16, 2)},
    "dkdv": {64: (64, 32, 4), 128: (64, 32, 4), 256: (32, 32, 4), 512: (16, 16, 2)},
}


def config_cost(
    kernel: str,
    config,
    d_pad: int,
    elem: int,
    mask_mode: int = 0,
    key_mask: bool = False,
    wgmma: bool = True,
) -> tuple[int, float]:
    """(shared memory bytes, registers per thread) of one program of ``kernel`` (see
    :mod:`pqmim_kernels.ops._launch`).

    Shared memory: the streamed (BLOCK, D_PAD) operand tiles pipelined ``num_stages`` deep,
    the tiles kept for the whole program, and the pipelined attention-mask tile. Registers: the
    fp32 accumulators and score-sized temporaries spread over all threads, plus the dot
    operands of the program's rows, which are replicated across the warps that do not split
    those rows (an MMA tile has 16 rows: ``BLOCK // 16`` warps can split them), plus the
    mask's pointer and value tiles. Before Hopper (``wgmma=False``: sm_80/86/89 MMA) the
    streamed operands pass through registers too. Weights fitted to ptxas's counts on sm_90
    and sm_80 (Triton 3.9), erring towards pruning.
    """
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    warps = config.num_warps
    stages = max(1, config.num_stages)
    words = elem / 4
    mask_bytes = {0: 0, 1: 1}.get(mask_mode, elem)
    if kernel == "fwd":  # streams k, v; keeps q; acc (BM, D); s, p
        smem = elem * d_pad * (bm + 2 * bn * stages)
        rows, fp32_tiles, operands = bm, bm * d_pad + 2 * bm * bn, (bm * d_pad + bm * bn) * words
        streamed = 2 * bn * d_pad * words
    elif kernel == "dq":  # streams k, v; keeps q, do; acc dq; s, p, dp, ds
        smem = elem * d_pad * (2 * bm + 2 * bn * stages)
        rows, fp32_tiles = bm, bm * d_pad + 3 * bm * bn
        operands = (2 * bm * d_pad + bm * bn) * words
        streamed = 2 * bn * d_pad * words
    else:  # dkdv: streams q, do; keeps k, v; acc dk, dv; s, p, dp, ds (transposed)
        smem = elem * d_pad * (2 * bn + 2 * bm * stages) + elem * bm * bn
        rows, fp32_tiles = bn, 2 * bn * d_pad + 3 * bm * bn
        operands = (2 * bn * d_pad + 2 * bm * bn) * words
        streamed = 2 * bm * d_pad * words
    smem += mask_bytes * bm * bn * max(1, stages - 1) + (bn * stages if key_mask else 0)
    threads = 32 * warps
    row_warps = min(warps, max(1, rows // 16))
    regs = fp32_tiles / threads + operands / (32 * row_warps) + 50
    if not wgmma:
        regs += 0.5 * streamed / (32 * (warps // row_warps))
    if mask_mode:
        regs += 2.5 * bm * bn / threads
    return smem, regs


def _prune(kernel: str):
    def prune(configs, named_args, **kwargs):
        # The autotuner passes positional launch arguments in named_args and keyword ones
        # (D_PAD, MASK_MODE, HAS_KEY_MASK here) in kwargs; look in both.
        args = {**named_args, **kwargs}
        q = args["Q"]
        mode, key_mask = args.get("MASK_MODE", 0), args.get("HAS_KEY_MASK", False)
        limits = device_limits(q)
        wgmma = limits.capability >= (9, 0)

        def cost(c):
            return config_cost(kernel, c, args["D_PAD"], q.element_size(), mode, key_mask, wgmma)

        return fitting_configs(configs, cost, limits, _FALLBACKS)

    return prune


def _tuned(kernel: str, fn):
    return triton.autotune(
        configs=[_config(*c) for c in _CANDIDATES[kernel]],
        key=_TUNE_KEY,
        prune_configs_by={"early_config_prune": _prune(kernel)},
    )(fn)


_fwd_tuned = _tuned("fwd", _masked_attn_fwd)
_bwd_dq_tuned = _tuned("dq", _masked_attn_bwd_dq)
_bwd_dkdv_tuned = _tuned("dkdv", _masked_attn_bwd_dkdv)

# The CPU interpreter runs one fixed small config: autotuning there would only multiply the
# (slow) interpreted work, and 16-wide blocks exercise multi-block loops on tiny shapes.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}


def pinned_attention_config(
    kernel: str, d_pad: int, elem: int, limits, mask_mode: int = 0, key_mask: bool = False
):
    """The pinned config of ``kernel`` (fwd | dq | dkdv) at this D_PAD and element size.

    Block sizes and warps are fixed per (kernel, D_PAD, dtype width), so results under
    ``pinned=True`` depend only on the inputs, the GPU model and the Triton version; the
    pipeline depth is the deepest of 3, 2, 1 that fits ``limits``.
    """
    row = max(64, d_pad) * (2 if elem == 4 else 1)
    bm, bn, warps = _PINNED[kernel][min(row, 512)]
    wgmma = limits.capability >= (9, 0)

    def cost(c):
        return config_cost(kernel, c, d_pad, elem, mask_mode, key_mask, wgmma)

    return pinned_config(lambda s: _config(bm, bn, warps, s), cost, limits, _FALLBACKS)


# ---- host side ----


def _mask_args(q, k, key_lengths, key_mask, attn_mask):
    """Kernel mask arguments: (bound, kmask, amask, amask strides, flags)."""
    b, h, lq, _ = q.shape
    lk = k.shape[2]
    device = q.device
    bound = None
    if key_lengths is not None:
        bound = key_lengths.to(device=device, dtype=torch.int32).clamp(0, lk)
    kmask = None
    if key_mask is not None:
        kmask = key_mask.to(device=device, dtype=torch.bool).contiguous().view(torch.uint8)
        # The last visible key + 1 also bounds the key loop: blocks after it are skipped.
        idx = torch.arange(1, lk + 1, device=device, dtype=torch.int32)
        last = (kmask.to(torch.int32) * idx).amax(dim=1) if lk > 0 else idx.new_zeros(b)
        bound = last if bound is None else torch.minimum(bound, last)
    mode, amask, am_strides = 0, None, (0, 0, 0, 0)
    if attn_mask is not None:
        amask = attn_mask.to(device)
        if amask.dtype == torch.bool:
            mode, amask = 1, amask.view(torch.uint8)
        else:
            mode = 2
        am_strides = tuple(0 if amask.shape[i] == 1 else amask.stride(i) for i in range(4))
    return bound, kmask, amask, am_strides, mode


def _launch_params(q, kernel: str, d_pad: int, pinned: bool, mask_mode=0, key_mask=False):
    """(extra launch kwargs, use the autotuned kernel) for ``kernel`` in fwd | dq | dkdv."""
    if interpreting():
        return {**_INTERPRETER_CONFIG, "INTERPRETER": True}, False
    if pinned:
        limits = device_limits(q)
        c = pinned_attention_config(kernel, d_pad, q.element_size(), limits, mask_mode, key_mask)
        fixed = {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
        return {**fixed, "INTERPRETER": False}, False
    return {"INTERPRETER": False}, True


def _d_pad(dh: int) -> int:
    return max(16, triton.next_power_of_2(dh))


def masked_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float,
    pinned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Arguments and kernel limits (Dh <= ``ATTN_MAX_HEAD_DIM``,
    B * H <= ``ATTN_MAX_GRID_BH``) are checked by :func:`pqmim_kernels.functional.masked_attention`.

    Returns ``out`` (B, H, Lq, Dh) contiguous in q's dtype and ``lse`` (B, H, Lq) fp32
    (natural log, ``-inf`` for rows with no visible key). ``pinned``: one fixed config per
    kernel instead of autotuning (see :func:`pinned_attention_config`).
    """
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    out = torch.empty((b, h, lq, dh), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    bound, kmask, amask, am_strides, mode = _mask_args(q, k, key_lengths, key_mask, attn_mask)
    d_pad = _d_pad(dh)
    fixed, tuned = _launch_params(q, "fwd", d_pad, pinned, mode, kmask is not None)
    kernel = _fwd_tuned if tuned else _masked_attn_fwd

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    kernel[grid](
        q, k, v, out, lse,
        bound if bound is not None else lse,
        kmask if kmask is not None else lse,
        amask if amask is not None else lse,
        scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        kmask.stride(0) if kmask is not None else 0,
        *am_strides,
        h, lq, lk, pow2_bucket(lq), pow2_bucket(lk),
        HEAD_DIM=dh,
        D_PAD=d_pad,
        HAS_BOUND=bound is not None,
        HAS_KEY_MASK=kmask is not None,
        MASK_MODE=mode,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **fixed,
    )  # fmt: skip
    return out, lse


def masked_attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float,
    pinned: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels; returns ``(dq, dk, dv)`` in the input dtype.

    ``out`` and ``lse`` come from :func:`masked_attention_forward`; ``pinned`` as there.
    """
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    grad_out = grad_out.contiguous()
    out = out.contiguous()
    dq = torch.empty((b, h, lq, dh), device=q.device, dtype=q.dtype)
    dk = torch.empty((b, h, lk, dh), device=q.device, dtype=k.dtype)
    dv = torch.empty((b, h, lk, dh), device=q.device, dtype=v.dtype)
    if lq == 0 or lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    bound, kmask, amask, am_strides, mode = _mask_args(q, k, key_lengths, key_mask, attn_mask)
    d_pad = _d_pad(dh)
    common = dict(
        HEAD_DIM=dh,
        D_PAD=d_pad,
        HAS_BOUND=bound is not None,
        HAS_KEY_MASK=kmask is not None,
        MASK_MODE=mode,
        INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    mask_ptrs = (
        bound if bound is not None else lse,
        kmask if kmask is not None else lse,
        amask if amask is not None else lse,
    )
    strides = (
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        kmask.stride(0) if kmask is not None else 0,
        *am_strides,
        h, lq, lk, pow2_bucket(lq), pow2_bucket(lk),
    )  # fmt: skip
    sm_scale = float(scale)
    qk_scale = sm_scale * LOG2E

    # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads.
    fixed, tuned = _launch_params(q, "dq", d_pad, pinned, mode, kmask is not None)
    dq_kernel = _bwd_dq_tuned if tuned else _masked_attn_bwd_dq
    dq_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)](
        q, k, v, out, grad_out, lse, delta, dq, *mask_ptrs, qk_scale, sm_scale, *strides,
        **common, **fixed,
    )  # fmt: skip
    fixed, tuned = _launch_params(q, "dkdv", d_pad, pinned, mode, kmask is not None)
    dkdv_kernel = _bwd_dkdv_tuned if tuned else _masked_attn_bwd_dkdv
    dkdv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, *mask_ptrs, qk_scale, sm_scale, *strides,
        **common, **fixed,
    )  # fmt: skip
    return dq, dk, dv

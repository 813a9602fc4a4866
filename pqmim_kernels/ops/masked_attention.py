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
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = [
    "masked_attention_backward",
    "masked_attention_forward",
    "pinned_launch_configs",
]

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256


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
            s = s + bias * 1.4426950408889634
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
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
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
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

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
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
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


# ---- autotune configs (GPU) ----

_TUNE_KEY = ["LQ_BUCKET", "LK_BUCKET", "HEAD_DIM", "HAS_BOUND", "HAS_KEY_MASK", "MASK_MODE"]
# H100: 227 KiB of shared memory per block; keep a margin for the compiler's own buffers.
_SMEM_BUDGET = 200 * 1024


def _configs(block_ms, block_ns):
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm in block_ms
        for bn in block_ns
        for w in (4, 8)
        for s in (2, 3, 4)
        if not (w == 8 and bm * bn < 64 * 64)
    ]


def _prune(tiles_per_stage: int, resident_tiles: int):
    """Drop configs whose pipelined operand tiles would not fit in shared memory.

    ``tiles_per_stage``: streamed (BLOCK, D) tiles per pipeline stage; ``resident_tiles``: tiles
    kept for the whole program. Estimated with 2-byte elements; fp32 inputs get half the stages.
    """

    def prune(configs, named_args, **kwargs):
        # The autotuner passes positional launch arguments in named_args and keyword ones
        # (D_PAD here) in kwargs; look in both.
        args = {**named_args, **kwargs}
        d = args["D_PAD"]
        elem = args["Q"].element_size()
        kept = []
        for c in configs:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            streamed = tiles_per_stage * max(bm, bn) * d * elem * c.num_stages
            resident = resident_tiles * max(bm, bn) * d * elem
            if streamed + resident <= _SMEM_BUDGET:
                kept.append(c)
        return kept or configs[:1]

    return prune


_fwd_tuned = triton.autotune(
    configs=_configs((64, 128), (32, 64, 128)),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune(2, 1)},
)(_masked_attn_fwd)
_bwd_dq_tuned = triton.autotune(
    configs=_configs((32, 64, 128), (32, 64)),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune(2, 3)},
)(_masked_attn_bwd_dq)
_bwd_dkdv_tuned = triton.autotune(
    configs=_configs((32, 64), (32, 64, 128)),
    key=_TUNE_KEY,
    prune_configs_by={"early_config_prune": _prune(2, 4)},
)(_masked_attn_bwd_dkdv)

# The CPU interpreter runs one fixed small config: autotuning there would only multiply the
# (slow) interpreted work, and 16-wide blocks exercise multi-block loops on tiny shapes.
_INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 1, "num_stages": 1}

# One fixed GPU config per kernel for pinned_launch_configs(); sized to fit Dh <= 128 with
# three stages (and Dh <= 256 with two) in an H100's shared memory.
_PINNED_CONFIGS = {
    "fwd": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    "dq": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "dkdv": {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
}
_pinned_depth = 0


@contextlib.contextmanager
def pinned_launch_configs():
    """Launch one fixed config per kernel instead of autotuning, inside this context.

    Autotuning picks the fastest config by timing, so two processes can pick different block
    sizes for the same shape and round differently. Results under a pinned config depend only
    on the inputs, the GPU model and the Triton version: what an encoder and a decoder in
    different processes need to derive identical probabilities. Not thread-safe (a counter).
    """
    global _pinned_depth
    _pinned_depth += 1
    try:
        yield
    finally:
        _pinned_depth -= 1


# ---- host side ----


def _bucket(n: int) -> int:
    return 1 << max(4, (max(n, 1) - 1).bit_length())


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


def _check_kernel_shape(q):
    b, h, _, dh = q.shape
    if dh > _MAX_HEAD_DIM:
        raise ValueError(
            f"masked_attention: the Triton kernel supports head dim Dh <= {_MAX_HEAD_DIM}, "
            f"got {dh}; use backend='reference'"
        )
    if b * h > 65535:
        raise ValueError(
            f"masked_attention: the Triton kernel supports B * H <= 65535, got {b * h}"
        )


def _launch_params(q, kernel: str, d_pad: int):
    """(extra launch kwargs, use the autotuned kernel) for ``kernel`` in fwd | dq | dkdv."""
    if q.device.type == "cpu":
        return {**_INTERPRETER_CONFIG, "INTERPRETER": True}, False
    if _pinned_depth > 0:
        config = dict(_PINNED_CONFIGS[kernel])
        if d_pad > 128:
            config["num_stages"] = 2
        return {**config, "INTERPRETER": False}, False
    return {"INTERPRETER": False}, True


def masked_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Arguments are pre-validated by the public API.

    Returns ``out`` (B, H, Lq, Dh) contiguous in q's dtype and ``lse`` (B, H, Lq) fp32
    (natural log, ``-inf`` for rows with no visible key).
    """
    _check_kernel_shape(q)
    b, h, lq, dh = q.shape
    lk = k.shape[2]
    out = torch.empty((b, h, lq, dh), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, h, lq), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out, lse
    bound, kmask, amask, am_strides, mode = _mask_args(q, k, key_lengths, key_mask, attn_mask)
    d_pad = max(16, triton.next_power_of_2(dh))
    fixed, tuned = _launch_params(q, "fwd", d_pad)
    kernel = _fwd_tuned if tuned else _masked_attn_fwd

    def grid(meta):
        return (triton.cdiv(lq, meta["BLOCK_M"]), b * h)

    kernel[grid](
        q, k, v, out, lse,
        bound if bound is not None else lse,
        kmask if kmask is not None else lse,
        amask if amask is not None else lse,
        scale * _LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride()[:3],
        kmask.stride(0) if kmask is not None else 0,
        *am_strides,
        h, lq, lk, _bucket(lq), _bucket(lk),
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the two backward kernels; returns ``(dq, dk, dv)`` in the input dtype.

    ``out`` and ``lse`` come from :func:`masked_attention_forward`.
    """
    _check_kernel_shape(q)
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
    d_pad = max(16, triton.next_power_of_2(dh))
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
        h, lq, lk, _bucket(lq), _bucket(lk),
    )  # fmt: skip
    sm_scale = float(scale)
    qk_scale = sm_scale * _LOG2E

    # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads.
    fixed, tuned = _launch_params(q, "dq", d_pad)
    dq_kernel = _bwd_dq_tuned if tuned else _masked_attn_bwd_dq
    dq_kernel[lambda meta: (triton.cdiv(lq, meta["BLOCK_M"]), b * h)](
        q, k, v, out, grad_out, lse, delta, dq, *mask_ptrs, qk_scale, sm_scale, *strides,
        **common, **fixed,
    )  # fmt: skip
    fixed, tuned = _launch_params(q, "dkdv", d_pad)
    dkdv_kernel = _bwd_dkdv_tuned if tuned else _masked_attn_bwd_dkdv
    dkdv_kernel[lambda meta: (triton.cdiv(lk, meta["BLOCK_N"]), b * h)](
        q, k, v, grad_out, lse, delta, dk, dv, *mask_ptrs, qk_scale, sm_scale, *strides,
        **common, **fixed,
    )  # fmt: skip
    return dq, dk, dv

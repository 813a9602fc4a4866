"""Eager masked attention: the spec of the Triton kernel, its CPU fallback and its test oracle.

Semantics shared by every backend (``pqmim_kernels.masked_attention`` documents the public face):

- ``q`` (B, H, Lq, Dh), ``k`` and ``v`` (B, H, Lk, Dh); scores ``S = scale * q @ k^T``.
- A key is visible to a query when every given mask allows it:
  ``key_lengths`` (B,) int -> keys ``[0, len)`` (lengths are clamped to ``[0, Lk]``);
  ``key_mask`` (B, Lk) bool -> True = visible;
  ``attn_mask`` (B|1, H|1, Lq, Lk) bool (True = attend) or float (added to ``S``; ``-inf``
  hides the key).
- A query row with no visible key (all scores ``-inf``) returns zeros, its logsumexp is
  ``-inf``, and every gradient through it is zero: never NaN.

Two flags build both sides of the flash-attention error-ratio test rule:

- ``upcast=True`` computes in fp32 from low-precision inputs (the oracle); ``upcast=False``
  computes in the input dtype (the same-precision eager yardstick).
- ``reorder_ops=True`` folds ``scale`` into ``q`` before the product, the order the kernel uses,
  instead of scaling the scores afterwards.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SUPPORTED_DTYPES",
    "check_masked_attention_args",
    "masked_attention_backward_reference",
    "masked_attention_reference",
    "visibility_and_bias",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_masked_attention_args(q, k, v, key_lengths, key_mask, attn_mask, scale) -> float:
    """Validate the arguments of :func:`pqmim_kernels.functional.masked_attention` (shapes,
    dtypes, devices of q/k/v and of each mask, the scale); return the resolved scale.

    Raises ``TypeError`` for non-tensors and wrong dtypes, ``ValueError`` for wrong shapes,
    devices, a mask that requires grad, or a non-finite scale.
    """
    op = "masked_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"{op}: {name} must have shape (B, H, L, Dh), got {tuple(t.shape)} ({t.dim()} dims)"
            )
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"{op}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    b, h, lq, dh = q.shape
    if k.shape != v.shape:
        raise ValueError(
            f"{op}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != dh:
        raise ValueError(
            f"{op}: k/v shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} "
            "(need the same B, H and Dh)"
        )
    if dh == 0:
        raise ValueError(f"{op}: head dim Dh must be positive, got shape {tuple(q.shape)}")
    lk = k.shape[2]
    if key_lengths is not None:
        if not isinstance(key_lengths, torch.Tensor):
            raise TypeError(
                f"{op}: key_lengths must be a torch.Tensor, got {type(key_lengths).__name__}"
            )
        if key_lengths.dtype.is_floating_point or key_lengths.dtype in (
            torch.bool,
            torch.complex64,
            torch.complex128,
        ):
            raise TypeError(f"{op}: key_lengths must be an integer tensor, got {key_lengths.dtype}")
        if tuple(key_lengths.shape) != (b,):
            raise ValueError(
                f"{op}: key_lengths must have shape (B,) = ({b},), got {tuple(key_lengths.shape)}"
            )
        if key_lengths.device != q.device:
            raise ValueError(f"{op}: key_lengths is on {key_lengths.device} but q is on {q.device}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor):
            raise TypeError(f"{op}: key_mask must be a torch.Tensor, got {type(key_mask).__name__}")
        if key_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_mask must be a bool tensor, got {key_mask.dtype}")
        if tuple(key_mask.shape) != (b, lk):
            raise ValueError(
                f"{op}: key_mask must have shape (B, Lk) = ({b}, {lk}), got {tuple(key_mask.shape)}"
            )
        if key_mask.device != q.device:
            raise ValueError(f"{op}: key_mask is on {key_mask.device} but q is on {q.device}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(
                f"{op}: attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(
                f"{op}: attn_mask must be bool (True = attend) or a float bias, got "
                f"{attn_mask.dtype}"
            )
        shape = tuple(attn_mask.shape)
        if (
            len(shape) != 4
            or shape[0] not in (1, b)
            or shape[1] not in (1, h)
            or shape[2:] != (lq, lk)
        ):
            raise ValueError(
                f"{op}: attn_mask must have shape (B or 1, H or 1, Lq, Lk) with B={b}, H={h}, "
                f"Lq={lq}, Lk={lk}; got {shape}"
            )
        if attn_mask.device != q.device:
            raise ValueError(f"{op}: attn_mask is on {attn_mask.device} but q is on {q.device}")
        if attn_mask.requires_grad:
            raise ValueError(
                f"{op}: attn_mask is treated as a constant and receives no gradient; "
                "pass attn_mask.detach() (a learned bias needs an eager attention)"
            )
    if scale is None:
        return 1.0 / float(dh) ** 0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{op}: scale must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"{op}: scale must be finite, got {scale}")
    return scale


def visibility_and_bias(
    batch: int,
    lq: int,
    lk: int,
    *,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Combine the mask arguments into one broadcastable visibility mask and one float bias.

    Returns ``(visible, bias)``: ``visible`` is a bool tensor broadcastable to (B, H, Lq, Lk)
    (True = the key may be attended) or None when nothing is masked; ``bias`` is the float
    ``attn_mask`` (B|1, H|1, Lq, Lk) or None. Shapes are assumed valid (the public API checks).
    """
    visible = None
    if key_lengths is not None:
        lengths = key_lengths.to(device=device, dtype=torch.int64).clamp(0, lk)
        cols = torch.arange(lk, device=device)
        visible = (cols[None, :] < lengths[:, None]).view(batch, 1, 1, lk)
    if key_mask is not None:
        km = key_mask.to(device=device, dtype=torch.bool).view(batch, 1, 1, lk)
        visible = km if visible is None else visible & km
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            am = attn_mask.to(device)
            visible = am if visible is None else visible & am
        else:
            bias = attn_mask.to(device)
    return visible, bias


def _scores(q, k, scale, visible, bias, reorder_ops):
    if reorder_ops:
        s = (q * scale) @ k.transpose(-1, -2)
    else:
        s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    return s


def masked_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
    reorder_ops: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in eager PyTorch, differentiable by autograd.

    Args:
        q: (B, H, Lq, Dh) float tensor; ``k``, ``v``: (B, H, Lk, Dh), same dtype and device.
        key_lengths, key_mask, attn_mask: see the module docstring.
        scale: score scale, default ``1 / sqrt(Dh)``.
        upcast: compute in fp32 (when the inputs are fp16/bf16; fp64 stays fp64) and cast the
            result back.
        reorder_ops: scale ``q`` before the product (kernel order) instead of the scores after.
        return_lse: also return the logsumexp of the masked scores, (B, H, Lq), fp32 (fp64
            for fp64 inputs), ``-inf`` for rows with no visible key.

    Returns:
        (B, H, Lq, Dh) in the dtype of ``q`` (and the logsumexp when ``return_lse``).
    """
    dtype = q.dtype
    b, _, lq, dh = q.shape
    lk = k.shape[-2]
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    if lk == 0:
        # No keys at all: every row is empty (a reduction over an empty axis has no max).
        out = q.new_zeros(q.shape)
        lse = torch.full(q.shape[:-1], float("-inf"), device=q.device)
        return (out, lse) if return_lse else out
    if upcast:
        ct = torch.promote_types(dtype, torch.float32)
        q, k, v = q.to(ct), k.to(ct), v.to(ct)
    visible, bias = visibility_and_bias(
        b, lq, lk, key_lengths=key_lengths, key_mask=key_mask, attn_mask=attn_mask, device=q.device
    )
    s = _scores(q, k, scale, visible, bias, reorder_ops)
    # The row max only shifts the exponent (softmax is invariant to it), so it is detached; an
    # empty row has max -inf, which is replaced by 0 so that exp(-inf - 0) = 0, not NaN.
    row_max = s.detach().amax(dim=-1, keepdim=True)
    empty = torch.isneginf(row_max)
    row_max = row_max.masked_fill(empty, 0.0)
    p = torch.exp(s - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    # Non-empty rows have denom >= 1 (the max term is exp(0)); empty rows have p == 0 everywhere,
    # so dividing by 1 keeps both the output and its gradient at exactly zero.
    p = p / denom.masked_fill(empty, 1.0)
    out = (p @ v).to(dtype)
    if not return_lse:
        return out
    lse_dtype = torch.promote_types(dtype, torch.float32)
    lse = (row_max + torch.log(denom)).squeeze(-1).to(lse_dtype)
    lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return out, lse


def masked_attention_backward_reference(
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
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`masked_attention_reference` from the saved output and logsumexp.

    The same recomputation the Triton backward does, written eagerly (in fp32): with
    ``P = exp(S - lse)`` (0 on hidden keys and empty rows), ``dV = P^T dO``,
    ``dP = dO V^T``, ``dS = P * (dP - rowsum(dO * O))``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``. Computed in fp32 (fp64 for fp64 inputs).

    Args:
        grad_out, out: (B, H, Lq, Dh); q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh);
        lse: (B, H, Lq) fp32 as returned with ``return_lse=True``.

    Returns:
        ``(dq, dk, dv)`` in the dtypes of ``q``, ``k``, ``v``.
    """
    b, _, lq, dh = q.shape
    lk = k.shape[-2]
    scale = 1.0 / math.sqrt(dh) if scale is None else float(scale)
    ct = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for fp64 test inputs
    qf, kf, vf, of, gf = (t.to(ct) for t in (q, k, v, out, grad_out))
    visible, bias = visibility_and_bias(
        b, lq, lk, key_lengths=key_lengths, key_mask=key_mask, attn_mask=attn_mask, device=q.device
    )
    s = _scores(qf, kf, scale, visible, bias, reorder_ops=False)
    empty = torch.isneginf(lse)[..., None]
    p = torch.exp(s - lse.to(ct).masked_fill(empty.squeeze(-1), 0.0)[..., None])
    p = p.masked_fill(empty, 0.0)
    dv = p.transpose(-1, -2) @ gf
    dp = gf @ vf.transpose(-1, -2)
    delta = (gf * of).sum(dim=-1, keepdim=True)
    ds = p * (dp - delta)
    dq = (ds @ kf) * scale
    dk = (ds.transpose(-1, -2) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

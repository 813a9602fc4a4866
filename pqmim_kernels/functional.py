"""The one place that chooses a backend for every op.

Each public op takes ``backend="auto" | "triton" | "reference"``:

- ``"auto"``: the Triton kernel when the inputs are CUDA tensors and Triton is importable,
  otherwise the eager reference (which is also the CPU path).
- ``"triton"``: force the Triton kernel. CUDA tensors, or CPU tensors when the process runs the
  Triton interpreter (``TRITON_INTERPRET=1`` set before Triton was imported; used by the tests).
- ``"reference"``: force the eager implementation in :mod:`pqmim_kernels.reference`.

Nothing here reads the environment at import time, and nothing swaps a backend silently: an
explicit ``"triton"`` that cannot run raises an error that says why.
"""

from __future__ import annotations

import torch

from pqmim_kernels.ops._launch import (
    ATTN_MAX_GRID_BH,
    ATTN_MAX_HEAD_DIM,
    PQ_MAX_SUBSPACE_DIM,
    interpreting,
)

__all__ = ["BACKENDS", "FP32_PRECISIONS", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "triton", "reference")
# How the Triton pq_assign kernel multiplies fp32 (or mixed-dtype) operands: three TF32
# tensor-core products of hi/lo splits (error ~fp32), or IEEE fp32 FMA (exact path, slower).
FP32_PRECISIONS = ("tf32x3", "ieee")


_TRITON_IMPORTABLE: list[bool] = []  # memo of triton_available()


def triton_available() -> bool:
    """True when ``import triton`` works in this process (checked once)."""
    if not _TRITON_IMPORTABLE:
        try:
            import triton  # noqa: F401
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_IMPORTABLE.append(False)
        else:
            _TRITON_IMPORTABLE.append(True)
    return _TRITON_IMPORTABLE[0]


# torch.compile calls triton_available once and folds the answer. This is the mark that
# torch.compiler.assume_constant_result sets (torch 2.11-2.13); calling that function would
# import torch._dynamo, ~2 s, on every import of this module (the codec's first call paid it).
# tests/test_functional_import.py checks that the decorator still sets exactly this mark.
triton_available._dynamo_marked_constant = True


def resolve_backend(backend: str, *tensors: torch.Tensor, op: str = "op") -> str:
    """Return ``"triton"`` or ``"reference"`` for ``backend`` and the given input tensors.

    Raises ``ValueError`` for an unknown backend name and ``RuntimeError`` when ``"triton"`` is
    requested but cannot run on these tensors.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if not triton_available():
        raise RuntimeError(f"{op}: backend='triton' requested but Triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
            "interpreter); got tensors on " + ", ".join(sorted({str(t.device) for t in tensors}))
        )
    return "triton"


def _check_launch_options(op: str, pinned, fp32_precision=None) -> None:
    if not isinstance(pinned, bool):
        raise TypeError(f"{op}: pinned must be a bool, got {type(pinned).__name__}")
    if fp32_precision is not None and fp32_precision not in FP32_PRECISIONS:
        raise ValueError(
            f"{op}: fp32_precision must be one of {FP32_PRECISIONS}, got {fp32_precision!r}"
        )


# ---- product quantization: pq_assign, pq_quantize ----

__all__ += ["pq_assign", "pq_ema_statistics", "pq_quantize"]

@torch.library.custom_op("pqmim::pq_assign", mutates_args=())
def _pq_assign_op(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    backend: str,
    with_distances: bool,
    fp32_precision: str,
    pinned: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # One opaque op for torch.compile: the backend is resolved before tracing reaches here, so
    # the graph holds a single node and the kernels are never traced by dynamo. Without
    # with_distances the second output is an empty placeholder (a custom op has fixed outputs).
    if backend == "triton":
        from pqmim_kernels.ops.pq_assign import pq_assign_triton

        codes, dists = pq_assign_triton(
            z,
            codebooks,
            with_distances=with_distances,
            fp32_precision=fp32_precision,
            pinned=pinned,
        )
    else:
        from pqmim_kernels.reference.pq import pq_assign_chunked

        codes, dists = pq_assign_chunked(z, codebooks, with_distances=with_distances)
    return codes, dists if with_distances else z.new_empty(0, dtype=torch.float32)


@_pq_assign_op.register_fake
def _pq_assign_fake(z, codebooks, backend, with_distances, fp32_precision, pinned):
    shape = (*z.shape[:-1], codebooks.shape[0])
    dist_shape = shape if with_distances else (0,)
    return z.new_empty(shape, dtype=torch.int64), z.new_empty(dist_shape, dtype=torch.float32)


def pq_assign(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    return_distances: bool = False,
    backend: str = "auto",
    fp32_precision: str = "tf32x3",
    pinned: bool = False,
):
    """Product-quantization codes: nearest codeword per sub-space in squared L2.

    Args:
        z: (..., D) float32/float16/bfloat16, any leading shape and strides.
        codebooks: (M, K, d) float32/float16/bfloat16 with M·d = D, on z's device.
        return_distances: also return the squared distances to the chosen codewords.
        backend: ``"auto" | "triton" | "reference"`` (see module docstring). ``"auto"`` on
            CUDA runs the Triton kernel when d ≤ 256, the chunked eager path otherwise.
        fp32_precision: how the Triton kernel multiplies fp32 or mixed-dtype operands:
            ``"tf32x3"`` (default: three TF32 tensor-core products of hi/lo splits, error close
            to fp32's) or ``"ieee"`` (fp32 FMA, slower). Both meet the argmin criterion of
            :mod:`pqmim_kernels.reference.pq`. 16-bit operands and the reference path ignore it.
        pinned: launch one fixed tiling instead of autotuning, so that the codes and distances
            depend only on the inputs, the GPU model and the Triton version (autotuning picks
            by timing, and a different tiling may round near-ties differently). For callers
            that must reproduce results across processes, e.g. an encoder. Triton backend
            only (the reference path has nothing to tune).

    Returns:
        codes (..., M) int64 in [0, K), ties to the lowest index; with ``return_distances`` a
        tuple ``(codes, distances)`` where distances (..., M) are float32 and carry no gradient
        (use :func:`pq_quantize` for gradients).

    Registered as the torch custom op ``pqmim::pq_assign``, so ``torch.compile`` traces it as one
    node (no graph break). Raises ``TypeError``/``ValueError`` for bad dtypes, shapes, devices
    or options.
    """
    from pqmim_kernels.reference.pq import check_pq_inputs

    _, _, d = check_pq_inputs(z, codebooks, "pq_assign")
    _check_launch_options("pq_assign", pinned, fp32_precision)
    chosen = resolve_backend(backend, z, codebooks, op="pq_assign")
    if chosen == "triton" and d > PQ_MAX_SUBSPACE_DIM:
        if backend == "triton":
            raise ValueError(
                f"pq_assign: the Triton kernel supports sub-vector length d ≤ "
                f"{PQ_MAX_SUBSPACE_DIM}, got d = {d}; use backend='reference' or 'auto'"
            )
        chosen = "reference"  # documented rule of "auto": the kernel keeps d in registers
    if chosen == "reference" and not torch.compiler.is_compiling():
        # Eager reference path called directly: the custom op's dispatcher would import
        # torch._dynamo (~2 s) on the first call, which every one-image `pqmim compress` paid.
        from pqmim_kernels.reference.pq import pq_assign_chunked

        codes, dists = pq_assign_chunked(
            z.detach(), codebooks.detach(), with_distances=bool(return_distances)
        )
    else:
        codes, dists = _pq_assign_op(
            z.detach(), codebooks.detach(), chosen, bool(return_distances), fp32_precision, pinned
        )
    return (codes, dists) if return_distances else codes


def pq_quantize(
    z: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    backend: str = "auto",
    fp32_precision: str = "tf32x3",
    pinned: bool = False,
):
    """Quantize ``z`` (..., D) with ``codebooks`` (M, K, d): returns ``(z_q, codes)``.

    ``z_q`` (..., D) in z's dtype equals the chosen codewords exactly in the forward pass; its
    gradient reaches ``z`` unchanged (straight-through estimator) and ``codebooks`` through the
    lookup (when they require grad). ``codes`` (..., M) int64 as in :func:`pq_assign`, which
    also documents ``backend``, ``fp32_precision`` and ``pinned``.
    """
    from pqmim_kernels.reference.pq import pq_lookup

    codes = pq_assign(
        z, codebooks, backend=backend, fp32_precision=fp32_precision, pinned=pinned
    )
    looked_up = pq_lookup(codes, codebooks).to(z.dtype)
    # z - z.detach() is exactly zero, so the value is the codeword, the gradient the identity.
    return looked_up + (z - z.detach()), codes


def pq_ema_statistics(
    z: torch.Tensor, codes: torch.Tensor, num_codes: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-codeword counts (M, K) and sums (M, K, d), fp32, of z (..., D) under codes (..., M).

    The statistics of the EMA codebook update in :class:`pqmim_kernels.nn.ProductQuantizer`:
    a fused Triton kernel (atomic adds, fp32) on CUDA, ``index_add_`` otherwise. Summation
    order differs between backends, so results agree to fp32 rounding, not bitwise.
    """
    if not isinstance(z, torch.Tensor) or not isinstance(codes, torch.Tensor):
        raise TypeError("pq_ema_statistics: z and codes must be torch.Tensors")
    if codes.dtype != torch.int64:
        raise TypeError(f"pq_ema_statistics: codes must be int64, got {codes.dtype}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"pq_ema_statistics: z must be float32, float16 or bfloat16, got {z.dtype}")
    if codes.dim() < 1 or z.shape[:-1] != codes.shape[:-1] or z.shape[-1] % codes.shape[-1]:
        raise ValueError(
            "pq_ema_statistics: z (..., D) and codes (..., M) must share leading dims with M "
            f"dividing D, got {tuple(z.shape)} and {tuple(codes.shape)}"
        )
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 1:
        raise ValueError(f"pq_ema_statistics: num_codes must be a positive int, got {num_codes!r}")
    if z.device != codes.device:
        raise ValueError(
            f"pq_ema_statistics: z and codes must be on the same device, got {z.device} and "
            f"{codes.device}"
        )
    if codes.numel() and bool(((codes < 0) | (codes >= num_codes)).any()):
        raise ValueError(f"pq_ema_statistics: codes must lie in [0, K) = [0, {num_codes})")
    chosen = resolve_backend(backend, z, codes, op="pq_ema_statistics")
    if chosen == "triton":
        from pqmim_kernels.ops.pq_stats import pq_ema_statistics_triton

        return pq_ema_statistics_triton(z.detach(), codes, num_codes)
    from pqmim_kernels.reference.pq import pq_ema_statistics as eager

    return eager(z, codes, num_codes)


# ---- masked attention: masked_attention ----

__all__ += ["masked_attention"]

_MA_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor? key_lengths, Tensor? key_mask, Tensor? attn_mask, "
    "float scale, str backend, bool pinned) -> (Tensor, Tensor)"
)
_MA_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? key_lengths, Tensor? key_mask, Tensor? attn_mask, float scale, str backend, "
    "bool pinned) "
    "-> (Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("pqmim::masked_attention_fwd", mutates_args=(), schema=_MA_FWD_SCHEMA)
def _masked_attention_fwd_op(q, k, v, key_lengths, key_mask, attn_mask, scale, backend, pinned):
    """Custom op: ``(out (B,H,Lq,Dh) in q.dtype, lse (B,H,Lq) fp32)``; arguments pre-checked."""
    if backend == "triton":
        from pqmim_kernels.ops.masked_attention import masked_attention_forward

        return masked_attention_forward(
            q,
            k,
            v,
            key_lengths=key_lengths,
            key_mask=key_mask,
            attn_mask=attn_mask,
            scale=scale,
            pinned=pinned,
        )
    from pqmim_kernels.reference.attention import masked_attention_reference

    return masked_attention_reference(
        q,
        k,
        v,
        key_lengths=key_lengths,
        key_mask=key_mask,
        attn_mask=attn_mask,
        scale=scale,
        upcast=True,
        return_lse=True,
    )


@_masked_attention_fwd_op.register_fake
def _(q, k, v, key_lengths, key_mask, attn_mask, scale, backend, pinned):
    b, h, lq, dh = q.shape
    return q.new_empty((b, h, lq, dh)), q.new_empty((b, h, lq), dtype=torch.float32)


@torch.library.custom_op("pqmim::masked_attention_bwd", mutates_args=(), schema=_MA_BWD_SCHEMA)
def _masked_attention_bwd_op(
    grad_out, q, k, v, out, lse, key_lengths, key_mask, attn_mask, scale, backend, pinned
):
    """Custom op: ``(dq, dk, dv)`` of the forward op, from its saved output and logsumexp."""
    if backend == "triton":
        from pqmim_kernels.ops.masked_attention import masked_attention_backward

        return masked_attention_backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse,
            key_lengths=key_lengths,
            key_mask=key_mask,
            attn_mask=attn_mask,
            scale=scale,
            pinned=pinned,
        )
    from pqmim_kernels.reference.attention import masked_attention_backward_reference

    return masked_attention_backward_reference(
        grad_out,
        q,
        k,
        v,
        out,
        lse,
        key_lengths=key_lengths,
        key_mask=key_mask,
        attn_mask=attn_mask,
        scale=scale,
    )


@_masked_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, key_lengths, key_mask, attn_mask, scale, backend, pinned):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _masked_attention_setup_context(ctx, inputs, output):
    q, k, v, key_lengths, key_mask, attn_mask, scale, backend, pinned = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_lengths, key_mask, attn_mask)
    ctx.scale = scale
    ctx.backend = backend
    ctx.pinned = pinned


def _masked_attention_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_lengths, key_mask, attn_mask = ctx.saved_tensors
    dq, dk, dv = _masked_attention_bwd_op(
        grad_out.contiguous(),
        q,
        k,
        v,
        out,
        lse,
        key_lengths,
        key_mask,
        attn_mask,
        ctx.scale,
        ctx.backend,
        ctx.pinned,
    )
    return dq, dk, dv, None, None, None, None, None, None


_masked_attention_fwd_op.register_autograd(
    _masked_attention_backward, setup_context=_masked_attention_setup_context
)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_lengths: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    pinned: bool = False,
) -> torch.Tensor:
    """Softmax attention in which hidden keys are never attended (flash attention on CUDA).

    Args:
        q: (B, H, Lq, Dh) float16/bfloat16/float32. ``k``, ``v``: (B, H, Lk, Dh), same dtype
            and device. Any Lq, Lk; Dh in {16, 32, 64, 128} is the tuned range (the Triton
            kernel takes any Dh <= 256, the reference any Dh). Strided views are fine.
        key_lengths: (B,) integer tensor: keys ``[0, len)`` of each batch row are visible
            (lengths are clamped to ``[0, Lk]``, with no device sync). Order tokens "known
            first" and the kernel skips every key block past the length, so the cost scales
            with the number of visible keys.
        key_mask: (B, Lk) bool, True = visible key, any pattern (key blocks after the last
            visible key are skipped as well).
        attn_mask: (B or 1, H or 1, Lq, Lk): bool (True = attend) or a float bias added to the
            scaled scores (``-inf`` hides a key). Treated as a constant: no gradient.
        scale: score scale, default ``1 / sqrt(Dh)``.
        backend: ``"auto" | "triton" | "reference"`` (see :func:`resolve_backend`). ``"auto"``
            on CUDA runs the Triton kernels when Dh <= 256 and B * H <= 65535, the eager
            reference otherwise.
        pinned: launch one fixed config per kernel (forward and backward) instead of
            autotuning, so that results depend only on the inputs, the GPU model and the Triton
            version. Triton backend only.

    The masks combine: a key is visible when every given mask allows it. A query row with no
    visible key returns zeros and receives zero gradients (never NaN).

    Returns:
        (B, H, Lq, Dh) in the dtype of ``q``; differentiable in q, k, v.

    Raises:
        TypeError / ValueError for bad types, dtypes, shapes or devices; RuntimeError when
        ``backend="triton"`` cannot run here.
    """
    from pqmim_kernels.reference.attention import check_masked_attention_args

    scale = check_masked_attention_args(q, k, v, key_lengths, key_mask, attn_mask, scale)
    _check_launch_options("masked_attention", pinned)
    masks = [t for t in (key_lengths, key_mask, attn_mask) if t is not None]
    chosen = resolve_backend(backend, q, k, v, *masks, op="masked_attention")
    if chosen == "triton":
        b, h, _, dh = q.shape
        if dh > ATTN_MAX_HEAD_DIM:
            limit = f"head dim Dh <= {ATTN_MAX_HEAD_DIM}, got {dh}"
        elif b * h > ATTN_MAX_GRID_BH:
            limit = f"B * H <= {ATTN_MAX_GRID_BH}, got {b * h}"
        else:
            limit = None
        if limit is not None:
            if backend == "triton":
                raise ValueError(
                    f"masked_attention: the Triton kernel supports {limit}; "
                    "use backend='reference' or 'auto'"
                )
            chosen = "reference"  # documented rule of "auto"
    out, _ = _masked_attention_fwd_op(
        q, k, v, key_lengths, key_mask, attn_mask, scale, chosen, pinned
    )
    return out


# ---- the integer entropy model (issue: entropy model v2) ----

_INT_BACKENDS = ("auto", "reference", "cpp")


def _int_backend(backend: str, device: torch.device, op: str) -> str:
    from pqmim_kernels.coding import int_kernels

    if backend not in _INT_BACKENDS:
        raise ValueError(f"{op}: backend must be one of {_INT_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return backend
    if device.type != "cpu":
        if backend == "cpp":
            raise RuntimeError(f"{op}: the C++ engine takes CPU tensors only, got {device}")
        return "reference"
    if int_kernels.available():
        return "cpp"
    if backend == "cpp":
        raise RuntimeError(f"{op}: the C++ engine is unavailable: {int_kernels.why()}")
    return "reference"


def int_session(model, grid: tuple[int, int], key_stage: torch.Tensor, backend: str = "auto"):
    """Per-image coding session of an integer entropy model
    (:class:`pqmim_kernels.reference.int_mim.IntMIM`): ``query`` / ``known`` / ``head_logits`` /
    ``cdfs``, see :class:`pqmim_kernels.reference.int_mim.IntSession`.

    ``backend``: ``"auto"`` takes the compiled C++ engine for a model on the CPU when it is built
    and current, and the torch spec otherwise (any device); ``"reference"`` always the spec;
    ``"cpp"`` requires the engine. Every backend gives the same integers.
    """
    from pqmim_kernels.reference.int_mim import IntSession

    if _int_backend(backend, model.device, "int_session") == "cpp":
        from pqmim_kernels.coding.int_kernels import CppSession

        return CppSession(model, grid, key_stage)
    return IntSession(model, grid, key_stage)


def int_window_attention(*args, backend: str = "auto", **kwargs) -> torch.Tensor:
    """Integer local attention of the entropy model: arguments and result of
    :func:`pqmim_kernels.reference.int_mim.window_attention_int` (its spec); ``backend`` as in
    :func:`int_session`."""
    from pqmim_kernels.reference.int_mim import window_attention_int

    q = args[0] if args else kwargs["q"]
    if _int_backend(backend, q.device, "int_window_attention") == "cpp":
        from pqmim_kernels.coding import int_kernels

        return int_kernels.window_attention(*args, **kwargs)
    return window_attention_int(*args, **kwargs)

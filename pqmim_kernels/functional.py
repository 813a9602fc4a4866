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

import functools
import os

import torch

__all__ = ["BACKENDS", "resolve_backend", "triton_available"]

BACKENDS = ("auto", "triton", "reference")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works in this process."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the install
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    if not on_cuda and not _interpreting():
        raise RuntimeError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
            "interpreter); got tensors on " + ", ".join(sorted({str(t.device) for t in tensors}))
        )
    return "triton"


# ---- product quantization: pq_assign, pq_quantize ----


# ---- masked attention: masked_attention ----

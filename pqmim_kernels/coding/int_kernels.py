"""Python face of the compiled integer entropy-model engine (``pqmim_kernels._intmim``).

The engine (``csrc/int_mim.cpp``) reproduces :mod:`pqmim_kernels.reference.int_mim` bit for bit
(``tests/test_int_mim.py`` compares them); it only makes the CPU path fast. When the extension
is missing, or stale in a source checkout (built from other C++ sources than the checkout's),
:func:`available` is False and the codec computes the same integers with the torch spec.

Threading contract: a :class:`CppSession` belongs to one image and one thread at a time (a
second thread gets RuntimeError); different sessions run in parallel without the GIL.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["CppSession", "available", "logits_to_cdfs", "window_attention", "why"]

EXPECTED_ABI_VERSION = 1
_SOURCES = ("csrc/int_mim.cpp", "csrc/int_mim.hpp", "python/int_mim_binding.cpp")

_ext = None
_error: str | None = None


def _fingerprint(root: Path) -> str | None:
    files = [root / name for name in _SOURCES]
    if not all(f.is_file() for f in files):
        return None
    digests = "".join(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()


def _load():
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    if os.environ.get("PQMIM_NO_INT_KERNELS"):
        _error = "disabled by PQMIM_NO_INT_KERNELS"
        return None
    try:
        ext = importlib.import_module("pqmim_kernels._intmim")
    except ImportError as exc:
        _error = f"pqmim_kernels._intmim is not built ({exc}); run `pip install -e .`"
        return None
    if getattr(ext, "ABI_VERSION", None) != EXPECTED_ABI_VERSION:
        _error = "pqmim_kernels._intmim is stale (ABI version); run `pip install -e .`"
        return None
    expected = _fingerprint(Path(__file__).resolve().parents[2])
    if expected is not None and getattr(ext, "SOURCE_FINGERPRINT", None) != expected:
        _error = "pqmim_kernels._intmim was built from other C++ sources; run `pip install -e .`"
        return None
    _ext = ext
    return ext


def available() -> bool:
    """Whether the compiled engine can be used."""
    return _load() is not None


def why() -> str:
    """Why the engine is unavailable ("" when it is)."""
    _load()
    return _error or ""


def _require():
    ext = _load()
    if ext is None:
        raise RuntimeError(f"the integer entropy-model engine is unavailable: {_error}")
    return ext


def _np(t, dtype) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(t, dtype=dtype)


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _table(bits: int) -> np.ndarray:
    from pqmim_kernels.reference.int_mim import exp2_table

    return exp2_table(bits).numpy()


def window_attention(
    q, q_pos, q_limit, k_cache, v_cache, key_stage, grid, radius, score_mult, score_shift, bias
) -> torch.Tensor:
    """The engine's :func:`pqmim_kernels.reference.int_mim.window_attention_int` (same
    arguments and integers; CPU tensors in, int64 tensor out)."""
    from pqmim_kernels.reference.int_mim import ATT_EXP_BITS

    ext = _require()
    h, w = grid
    out = ext.window_attention(
        _np(q, np.int8),
        _np(q_pos, np.int64),
        _np(q_limit, np.int64),
        _np(k_cache, np.int8),
        _np(v_cache, np.int8),
        _np(key_stage, np.int64),
        int(h),
        int(w),
        int(radius),
        int(score_mult),
        int(score_shift),
        _np(bias, np.int32),
        _table(ATT_EXP_BITS),
        _threads(),
    )
    return torch.from_numpy(out).to(torch.int64)


def logits_to_cdfs(logits, precision: int = 24) -> np.ndarray:
    """The engine's :func:`pqmim_kernels.reference.int_mim.logits_to_cdfs`: (n, K+1) int32."""
    from pqmim_kernels.reference.int_mim import PROB_EXP_BITS

    return _require().logits_to_cdfs(
        _np(logits, np.int32), int(precision), _table(PROB_EXP_BITS), _threads()
    )


def _cpp_model(model):
    """The engine's model for an :class:`~pqmim_kernels.reference.int_mim.IntMIM` (cached)."""
    from pqmim_kernels.reference.int_mim import ATT_EXP_BITS, PROB_EXP_BITS

    cached = getattr(model, "_cpp_model", None)
    if cached is None:
        tensors = {k: v.numpy() for k, v in model.tensors.items()}
        cached = _require().Model(
            tensors, dict(model.meta), _table(ATT_EXP_BITS), _table(PROB_EXP_BITS)
        )
        model._cpp_model = cached
    return cached


class CppSession:
    """Per-image coding state in the engine: same methods and integers as
    :class:`pqmim_kernels.reference.int_mim.IntSession` (CPU only)."""

    def __init__(self, model, grid: tuple[int, int], key_stage: torch.Tensor) -> None:
        self._s = _require().Session(
            _cpp_model(model), int(grid[0]), int(grid[1]), _np(key_stage, np.int64)
        )

    def query(self, pos: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(
            self._s.query_stream(_np(pos, np.int64), _np(stage, np.int64), _threads())
        )

    def set_key_stage(self, pos: torch.Tensor, stage: torch.Tensor) -> None:
        self._s.set_key_stage(_np(pos, np.int64), _np(stage, np.int64))

    def known(self, codes: torch.Tensor, pos: torch.Tensor, stage: torch.Tensor) -> None:
        self._s.known_stream(
            _np(codes, np.int64), _np(pos, np.int64), _np(stage, np.int64), _threads()
        )

    def head_logits(self, xq: torch.Tensor, prefix: torch.Tensor, m: int) -> torch.Tensor:
        return torch.from_numpy(
            self._s.head_logits(_np(xq, np.int32), _np(prefix, np.int64), int(m), _threads())
        )

    @staticmethod
    def cdfs(logits: torch.Tensor) -> np.ndarray:
        return logits_to_cdfs(logits)

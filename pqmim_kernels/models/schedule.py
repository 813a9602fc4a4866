"""The deterministic, input-independent coding schedule of PQMIM.md §4.

A token grid of ``h × w`` positions is coded in ``S`` stages. Stage ``s`` (0-based) codes the
positions ``order[cum[s]:cum[s + 1]]`` given every earlier stage. Both ``order`` and ``cum``
depend on ``(h, w, S)`` only and are computed with integer arithmetic, so encoder and decoder
agree on every platform and library version (no torch/numpy RNG streams, no floats).

- ``cum[s] = floor(N · s² / S²)``: a quadratic (power-2) schedule, so few tokens are sent first
  (when the model has no context and predicts poorly) and the bulk is sent last, when most of
  the neighbourhood is known.
- ``order``: coarse-to-fine and spatially spread. A position's *level* is the number of trailing
  zero bits shared by its row and column (``min(tz(y), tz(x))``, capped), so the positions of a
  coarse dyadic lattice come first, then the lattice at half the spacing, and so on; inside a
  level, positions are shuffled by a fixed 32-bit integer hash of ``(y, x, h, w)``.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["DEFAULT_STAGES", "coding_order", "stage_bounds", "stage_of_position", "mix32"]

DEFAULT_STAGES = 10
_MAX_LEVEL = 15
_M32 = 0xFFFFFFFF


def mix32(x: np.ndarray) -> np.ndarray:
    """A fixed 32-bit integer hash (lowbias32 finaliser) applied elementwise.

    ``x``: integer array; returns uint64 values in ``[0, 2**32)``. Pure integer arithmetic in
    uint64 with explicit masking, so the result is the same on every platform.
    """
    x = np.asarray(x, dtype=np.uint64) & np.uint64(_M32)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & np.uint64(_M32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & np.uint64(_M32)
    x ^= x >> np.uint64(16)
    return x


def _trailing_zeros(v: np.ndarray) -> np.ndarray:
    """Trailing zero bits of non-negative ints, with 0 mapped to ``_MAX_LEVEL``."""
    v = v.astype(np.int64)
    tz = np.zeros_like(v)
    for b in range(_MAX_LEVEL):
        tz += ((v & ((1 << (b + 1)) - 1)) == 0).astype(np.int64)
    return tz


def _check_grid(h: int, w: int, stages: int | None = None) -> None:
    for name, v in (("h", h), ("w", w)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"coding schedule: {name} must be a positive int, got {v!r}")
    if stages is not None and (
        not isinstance(stages, (int, np.integer)) or isinstance(stages, bool) or stages < 1
    ):
        raise ValueError(f"coding schedule: stages must be a positive int, got {stages!r}")


@functools.lru_cache(maxsize=64)
def _coding_order_cached(h: int, w: int) -> np.ndarray:
    ys, xs = np.divmod(np.arange(h * w, dtype=np.int64), w)
    level = np.minimum(_trailing_zeros(ys), _trailing_zeros(xs))
    key = mix32(mix32(ys * 0x9E3779B1 + xs) ^ mix32(np.int64(h) * 0x85EBCA6B + w))
    # lexsort: last key is primary -> higher level first, then hash, then raster index (ties).
    order = np.lexsort((np.arange(h * w), key, -level))
    order.setflags(write=False)
    return order


def coding_order(h: int, w: int) -> np.ndarray:
    """Return the coding order of an ``h × w`` token grid.

    Returns a read-only int64 array of shape ``(h*w,)``: a permutation of raster indices
    ``y*w + x``, coarse-to-fine and spatially spread (see the module docstring).
    """
    _check_grid(h, w)
    return _coding_order_cached(int(h), int(w))


def stage_bounds(num_tokens: int, stages: int = DEFAULT_STAGES) -> np.ndarray:
    """Cumulative token counts: int64 array ``(stages + 1,)`` with ``cum[0] = 0``,
    ``cum[-1] = num_tokens``, non-decreasing, ``cum[s] = floor(num_tokens · s² / stages²)``.
    """
    if not isinstance(num_tokens, (int, np.integer)) or num_tokens < 1:
        raise ValueError(f"coding schedule: num_tokens must be a positive int, got {num_tokens!r}")
    _check_grid(1, 1, stages)
    s = np.arange(stages + 1, dtype=np.int64)
    return (int(num_tokens) * s * s) // (int(stages) * int(stages))


def stage_of_position(h: int, w: int, stages: int = DEFAULT_STAGES) -> np.ndarray:
    """Stage index (0-based) of every raster position: int64 array ``(h*w,)``."""
    _check_grid(h, w, stages)
    order = coding_order(h, w)
    cum = stage_bounds(h * w, stages)
    stage = np.empty(h * w, dtype=np.int64)
    for s in range(stages):
        stage[order[cum[s] : cum[s + 1]]] = s
    return stage

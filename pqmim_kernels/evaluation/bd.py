"""Bjøntegaard delta metrics: BD-rate and BD-PSNR between two rate-distortion curves.

Following Bjøntegaard (VCEG-M33, 2001) each curve is a handful of (rate, PSNR) points and the
rate enters through ``log10(rate)``:

- **BD-rate** (%): interpolate ``log10(rate)`` as a function of PSNR for both curves, integrate
  both over the PSNR interval the two curves share, and turn the mean log-rate difference ``d``
  into a percentage ``(10**d - 1) * 100``. Negative = the test codec needs fewer bits for the
  same quality (-50 % means half the rate).
- **BD-PSNR** (dB): interpolate PSNR as a function of ``log10(rate)``, integrate over the shared
  log-rate interval, mean difference in dB. Positive = the test codec is better.

Interpolation. ``method="pchip"`` (default) uses a piecewise cubic Hermite interpolant
(Fritsch-Carlson monotone slopes, ``scipy.interpolate.PchipInterpolator``) through the points,
as the modern reference implementations (JVET CTC spreadsheets since 2017, CompressAI's tools)
do: it passes through every point, never overshoots between them, and works for any number of
points >= 2. ``method="cubic"`` is the original VCEG-M33 least-squares cubic polynomial (needs
>= 4 points); it can wiggle when the points are uneven, which is why PCHIP replaced it.

Only the overlapping range is integrated; curves that do not overlap raise ``ValueError``
(extrapolation would report numbers nobody measured).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METHODS = ("pchip", "cubic")


def _prepare(rate: Sequence[float], quality: Sequence[float], label: str) -> tuple:
    r = np.asarray(rate, dtype=np.float64)
    q = np.asarray(quality, dtype=np.float64)
    if r.ndim != 1 or q.ndim != 1 or r.shape != q.shape:
        raise ValueError(
            f"{label}: rate and PSNR must be 1-D sequences of equal length, "
            f"got shapes {r.shape} and {q.shape}"
        )
    if r.size < 2:
        raise ValueError(f"{label}: need at least 2 rate-distortion points, got {r.size}")
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(q))):
        raise ValueError(f"{label}: rate and PSNR must be finite")
    if np.any(r <= 0):
        raise ValueError(f"{label}: rates must be positive (BD metrics use log10(rate))")
    return np.log10(r), q


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str, label: str):
    """Integral over [lo, hi] of the interpolant of y(x) through the points."""
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if np.any(np.diff(x) == 0):
        raise ValueError(
            f"{label}: repeated abscissa {x[np.flatnonzero(np.diff(x) == 0)[0]]:.6g}; "
            "an RD curve needs distinct values to be interpolated"
        )
    if method == "pchip":
        from scipy.interpolate import PchipInterpolator

        return float(PchipInterpolator(x, y).integrate(lo, hi))
    if x.size < 4:
        raise ValueError(f"{label}: method='cubic' needs at least 4 points, got {x.size}")
    poly = np.polynomial.Polynomial.fit(x, y, 3).integ()
    return float(poly(hi) - poly(lo))


def _delta(x_a, y_a, x_t, y_t, method: str, what: str) -> float:
    if method not in METHODS:
        raise ValueError(f"unknown BD method {method!r}; choose from {', '.join(METHODS)}")
    lo = max(x_a.min(), x_t.min())
    hi = min(x_a.max(), x_t.max())
    if not hi > lo:
        raise ValueError(
            f"{what}: the curves do not overlap (anchor spans [{x_a.min():.4g}, "
            f"{x_a.max():.4g}], test spans [{x_t.min():.4g}, {x_t.max():.4g}])"
        )
    int_a = _integral(x_a, y_a, lo, hi, method, f"{what} anchor")
    int_t = _integral(x_t, y_t, lo, hi, method, f"{what} test")
    return (int_t - int_a) / (hi - lo)


def bd_rate(
    anchor_rate: Sequence[float],
    anchor_psnr: Sequence[float],
    test_rate: Sequence[float],
    test_psnr: Sequence[float],
    method: str = "pchip",
) -> float:
    """BD-rate of the test curve against the anchor, in percent (negative = fewer bits).

    Args:
        anchor_rate, test_rate: positive rates (bpp or bits), any order, one per point.
        anchor_psnr, test_psnr: the matching PSNR values in dB (distinct within a curve).
        method: ``"pchip"`` (default) or ``"cubic"`` (VCEG-M33 polynomial).
    """
    la, qa = _prepare(anchor_rate, anchor_psnr, "bd_rate anchor")
    lt, qt = _prepare(test_rate, test_psnr, "bd_rate test")
    d = _delta(qa, la, qt, lt, method, "bd_rate")
    return float((10.0**d - 1.0) * 100.0)


def bd_psnr(
    anchor_rate: Sequence[float],
    anchor_psnr: Sequence[float],
    test_rate: Sequence[float],
    test_psnr: Sequence[float],
    method: str = "pchip",
) -> float:
    """BD-PSNR of the test curve against the anchor, in dB (positive = better quality).

    Same arguments as :func:`bd_rate`; the integration runs over the shared ``log10(rate)``
    interval.
    """
    la, qa = _prepare(anchor_rate, anchor_psnr, "bd_psnr anchor")
    lt, qt = _prepare(test_rate, test_psnr, "bd_psnr test")
    return float(_delta(la, qa, lt, qt, method, "bd_psnr"))


def interpolate_psnr(rate: Sequence[float], psnr: Sequence[float], at_rate: float) -> float:
    """PSNR of a curve at ``at_rate`` by PCHIP over ``log10(rate)`` (the BD-PSNR interpolant).

    Raises ``ValueError`` if ``at_rate`` lies outside the curve's rate range (no extrapolation).
    """
    from scipy.interpolate import PchipInterpolator

    lr, q = _prepare(rate, psnr, "interpolate_psnr")
    if at_rate <= 0:
        raise ValueError(f"interpolate_psnr: rate must be positive, got {at_rate}")
    x = float(np.log10(at_rate))
    if not lr.min() <= x <= lr.max():
        raise ValueError(
            f"interpolate_psnr: rate {at_rate:.4g} is outside the curve's range "
            f"[{10 ** lr.min():.4g}, {10 ** lr.max():.4g}]"
        )
    order = np.argsort(lr, kind="stable")
    return float(PchipInterpolator(lr[order], q[order])(x))

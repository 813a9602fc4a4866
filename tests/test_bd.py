"""Bjøntegaard metrics (pqmim_kernels.evaluation.bd) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pqmim_kernels.evaluation.bd import bd_psnr, bd_rate, interpolate_psnr

RATES = [0.1, 0.2, 0.4, 0.8, 1.2]
PSNRS = [27.0, 29.5, 32.0, 34.2, 35.6]


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_identical_curves_are_zero(method):
    assert bd_rate(RATES, PSNRS, RATES, PSNRS, method=method) == pytest.approx(0.0, abs=1e-9)
    assert bd_psnr(RATES, PSNRS, RATES, PSNRS, method=method) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("method", ["pchip", "cubic"])
def test_half_rate_is_minus_fifty_percent(method):
    half = [r / 2 for r in RATES]
    assert bd_rate(RATES, PSNRS, half, PSNRS, method=method) == pytest.approx(-50.0, abs=1e-9)
    # and the anchor seen from the better codec needs twice the rate
    assert bd_rate(half, PSNRS, RATES, PSNRS, method=method) == pytest.approx(100.0, abs=1e-9)


def test_constant_psnr_gain_is_bd_psnr():
    better = [p + 1.25 for p in PSNRS]
    assert bd_psnr(RATES, PSNRS, RATES, better) == pytest.approx(1.25, abs=1e-12)


def test_linear_in_log_rate_hand_case():
    # PSNR = 20 + 6 log10(R): halving the rate at equal PSNR is a left shift by log10(2), so at
    # equal rate the PSNR gain is 6 log10(2) dB everywhere (PCHIP reproduces linear data).
    r = np.array([0.05, 0.1, 0.3, 0.5, 1.0])
    p = 20 + 6 * np.log10(r)
    assert bd_psnr(r, p, r / 2, p) == pytest.approx(6 * math.log10(2), abs=1e-9)
    # A curve at 3/4 of the rate: BD-rate -25 %, only over the shared PSNR range.
    assert bd_rate(r, p, 0.75 * r, p) == pytest.approx(-25.0, abs=1e-9)


def test_point_order_does_not_matter():
    perm = [3, 0, 4, 1, 2]
    test_r = [0.09, 0.17, 0.36, 0.7, 1.1]
    test_p = [27.4, 29.9, 32.3, 34.4, 35.9]
    a = bd_rate(RATES, PSNRS, test_r, test_p)
    b = bd_rate([RATES[i] for i in perm], [PSNRS[i] for i in perm], test_r[::-1], test_p[::-1])
    assert a == pytest.approx(b, abs=1e-12)
    assert a < 0  # the test curve is better everywhere


def test_only_overlap_is_integrated():
    # Two-point curves are straight lines in (PSNR, log10 R), where PCHIP is exact.
    # Anchor: log R = (p - 20) / 6 on p in [28, 34]; test: log R = c + (p - 20) / 3 on [30, 40].
    # On the shared range [30, 34] the mean difference is c + (32 - 20) / 6 = c + 2, so with
    # c = -2 - log10(2) the BD-rate is exactly -50 %; any other range would give another value.
    c = -2 - math.log10(2)
    pa, pt = np.array([28.0, 34.0]), np.array([30.0, 40.0])
    ra, rt = 10 ** ((pa - 20) / 6), 10 ** (c + (pt - 20) / 3)
    assert bd_rate(ra, pa, rt, pt) == pytest.approx(-50.0, abs=1e-9)


def test_interpolate_psnr_hits_points_and_refuses_extrapolation():
    assert interpolate_psnr(RATES, PSNRS, 0.4) == pytest.approx(32.0, abs=1e-12)
    mid = interpolate_psnr(RATES, PSNRS, 0.3)
    assert 29.5 < mid < 32.0
    with pytest.raises(ValueError, match=r"rate 2 is outside the curve's range \[0.1, 1.2\]"):
        interpolate_psnr(RATES, PSNRS, 2.0)
    with pytest.raises(ValueError, match="rate must be positive, got 0"):
        interpolate_psnr(RATES, PSNRS, 0)


def test_bd_errors():
    with pytest.raises(ValueError, match="the curves do not overlap"):
        bd_rate(RATES, PSNRS, RATES, [p + 20 for p in PSNRS])
    with pytest.raises(ValueError, match="need at least 2 rate-distortion points, got 1"):
        bd_rate(RATES, PSNRS, [0.1], [30.0])
    with pytest.raises(ValueError, match="method='cubic' needs at least 4 points, got 3"):
        bd_rate(RATES[:3], PSNRS[:3], RATES[:3], PSNRS[:3], method="cubic")
    with pytest.raises(ValueError, match="rates must be positive"):
        bd_psnr([0.0, 0.2], [30, 31], RATES, PSNRS)
    with pytest.raises(ValueError, match="unknown BD method 'spline'; choose from pchip, cubic"):
        bd_rate(RATES, PSNRS, RATES, PSNRS, method="spline")
    with pytest.raises(ValueError, match="repeated abscissa 30"):
        bd_rate([0.1, 0.2, 0.3], [30, 30, 31], RATES, PSNRS)
    with pytest.raises(ValueError, match=r"equal length, got shapes \(5,\) and \(4,\)"):
        bd_rate(RATES, PSNRS[:4], RATES, PSNRS)
    with pytest.raises(ValueError, match="must be finite"):
        bd_psnr(RATES, [*PSNRS[:4], float("inf")], RATES, PSNRS)

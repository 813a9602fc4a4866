"""PSNR and MS-SSIM (pqmim_kernels.evaluation.metrics) against hand-computed values and an
independent implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pqmim_kernels.evaluation.metrics import (
    MS_SSIM_MIN_SIDE,
    MS_SSIM_WEIGHTS,
    ms_ssim,
    ms_ssim_db,
    mse,
    psnr,
)


def _smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A natural-ish test image: smooth gradients plus texture, uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = 128 + 60 * np.sin(xx / 17.0)[..., None] * np.cos(yy / 23.0)[..., None]
    base = base + np.array([0.0, 20.0, -20.0]) + rng.normal(0, 12, (h, w, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def test_psnr_constant_offset_matches_closed_form():
    a = np.full((10, 12, 3), 100, np.uint8)
    b = a + 5  # MSE = 25 exactly
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-12)
    assert mse(a, b) == 25.0


def test_psnr_counts_every_channel_once():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[..., 0] = 30  # only red differs: MSE = 900 / 3
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 300), abs=1e-12)


def test_psnr_identical_is_inf_and_symmetric():
    a = _smooth_image(20, 30, 0)
    assert psnr(a, a) == math.inf
    b = _smooth_image(20, 30, 1)
    assert psnr(a, b) == psnr(b, a)


def test_psnr_does_not_wrap_uint8():
    # 0 vs 255 must be a difference of 255, not (0 - 255) % 256 = 1.
    a = np.zeros((2, 2), np.uint8)
    b = np.full((2, 2), 255, np.uint8)
    assert psnr(a, b) == pytest.approx(0.0, abs=1e-12)


def test_ms_ssim_identical_is_one():
    a = _smooth_image(MS_SSIM_MIN_SIDE, 200, 2)
    assert ms_ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_ms_ssim_constant_images_closed_form():
    # For constant images every contrast-structure term is C2/C2 = 1, so MS-SSIM reduces to
    # the coarsest-scale luminance term l = (2ab + C1) / (a^2 + b^2 + C1) to the power w_5.
    a = np.full((176, 176, 3), 100, np.uint8)
    b = np.full((176, 176, 3), 140, np.uint8)
    c1 = (0.01 * 255) ** 2
    lum = (2 * 100 * 140 + c1) / (100**2 + 140**2 + c1)
    assert ms_ssim(a, b) == pytest.approx(lum ** MS_SSIM_WEIGHTS[-1], rel=1e-12)


def test_ms_ssim_decreases_with_noise_and_is_symmetric():
    a = _smooth_image(192, 224, 3)
    rng = np.random.default_rng(0)
    light = np.clip(a + rng.normal(0, 3, a.shape), 0, 255).astype(np.uint8)
    heavy = np.clip(a + rng.normal(0, 25, a.shape), 0, 255).astype(np.uint8)
    s_light, s_heavy = ms_ssim(a, light), ms_ssim(a, heavy)
    assert 0.0 < s_heavy < s_light < 1.0
    assert ms_ssim(light, a) == pytest.approx(s_light, abs=1e-12)


def test_ms_ssim_grayscale_equals_single_channel():
    a = _smooth_image(170, 180, 4)
    b = _smooth_image(170, 180, 5)
    assert ms_ssim(a[..., 1], b[..., 1]) == pytest.approx(
        ms_ssim(a[..., 1:2], b[..., 1:2]), abs=1e-14
    )


@pytest.mark.parametrize("shape", [(192, 256), (224, 176)])
def test_ms_ssim_matches_pytorch_msssim(shape):
    torch = pytest.importorskip("torch")
    ref = pytest.importorskip("pytorch_msssim")
    a = _smooth_image(*shape, seed=6)
    rng = np.random.default_rng(1)
    b = np.clip(a + rng.normal(0, 15, a.shape), 0, 255).astype(np.uint8)

    def to_t(x):
        return torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)[None].double()

    expected = ref.ms_ssim(to_t(a), to_t(b), data_range=255, size_average=True).item()
    # Same window, constants and weights; the remaining difference is their float32 window.
    assert ms_ssim(a, b) == pytest.approx(expected, abs=1e-5)


def test_ms_ssim_db():
    assert ms_ssim_db(0.9) == pytest.approx(10.0)
    assert ms_ssim_db(0.99) == pytest.approx(20.0)
    assert ms_ssim_db(1.0) == math.inf
    with pytest.raises(ValueError, match=r"MS-SSIM must lie in \[0, 1\], got 1.5"):
        ms_ssim_db(1.5)


def test_ms_ssim_rejects_small_images():
    a = np.zeros((160, 300, 3), np.uint8)
    with pytest.raises(ValueError, match="too small for 5 scales .* >= 161"):
        ms_ssim(a, a)


def test_metric_input_errors():
    a = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="psnr: b must have dtype uint8, got float32"):
        psnr(a, a.astype(np.float32))
    with pytest.raises(TypeError, match="psnr: a must be a numpy array, got list"):
        psnr([[0]], a)
    with pytest.raises(ValueError, match=r"psnr: shape mismatch \(8, 8, 3\) vs \(8, 9, 3\)"):
        psnr(a, np.zeros((8, 9, 3), np.uint8))
    with pytest.raises(ValueError, match=r"ms_ssim: a must have shape \(H, W\) or \(H, W, 1\|3\)"):
        ms_ssim(np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match="mse: empty image"):
        mse(np.zeros((0, 8), np.uint8), np.zeros((0, 8), np.uint8))


def test_grid_blockiness_sees_seams_and_not_smooth_images():
    from pqmim_kernels.evaluation.metrics import grid_blockiness, grid_steps

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:80]
    smooth = np.clip(100 + xx + 0.5 * yy + rng.normal(0, 2, xx.shape), 0, 255).astype(np.uint8)
    assert grid_steps(smooth) == pytest.approx(1.0, abs=0.15)
    # a piecewise-constant copy (one value per 16x16 token): every step is on a grid line
    tokens = smooth.reshape(4, 16, 5, 16).mean((1, 3)).round().astype(np.uint8)
    blocky = np.kron(tokens, np.ones((16, 16), dtype=np.uint8))
    assert grid_steps(blocky) > 100
    assert grid_blockiness(smooth, blocky) > 100
    assert grid_blockiness(smooth, smooth) == 1.0
    rgb = np.stack([smooth] * 3, -1)
    assert grid_steps(rgb) == pytest.approx(grid_steps(smooth))
    # shifted by 8 px the same seams are off the 16-px grid
    assert grid_steps(np.roll(blocky, 8, axis=(0, 1))) < 0.1
    with pytest.raises(ValueError, match="smaller than two 16-px periods"):
        grid_steps(smooth[:20])
    with pytest.raises(TypeError, match="uint8"):
        grid_steps(smooth.astype(np.float32))
    with pytest.raises(ValueError, match="shape mismatch"):
        grid_blockiness(smooth, smooth[:32])


def test_periodic_excess_sees_a_repeating_pattern():
    from pqmim_kernels.evaluation.metrics import periodic_excess, periodic_peak

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:96]
    photo = np.clip(90 + xx + 0.7 * yy + rng.normal(0, 6, xx.shape), 0, 255)
    base = photo.round().astype(np.uint8)
    dots = 12.0 * ((yy % 4 == 0) & (xx % 4 == 0))  # a dot every 4 px, as a checkerboard decoder
    dotted = np.clip(photo + dots, 0, 255).round().astype(np.uint8)
    assert periodic_excess(base, base, 4) == 1.0
    assert periodic_excess(base, dotted, 4) > 20  # the dots' period
    assert periodic_excess(base, dotted, 8) == pytest.approx(1.0, abs=0.2)  # not an 8-px one
    assert periodic_excess(base, dotted, 16) == pytest.approx(1.0, abs=0.2)
    rgb = np.stack([base] * 3, -1)
    assert periodic_peak(rgb, 8) == pytest.approx(periodic_peak(base, 8))
    assert periodic_peak(base[:63, :95], 4) > 0  # cropped to whole periods
    with pytest.raises(ValueError, match="smaller than two 16-px periods"):
        periodic_peak(base[:20], 16)
    with pytest.raises(ValueError, match="period must be an int >= 2"):
        periodic_peak(base, 1)
    with pytest.raises(TypeError, match="uint8"):
        periodic_peak(base.astype(np.float32), 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        periodic_excess(base, base[:32], 4)

"""Distortion metrics on 8-bit RGB images: PSNR and MS-SSIM.

Both take two ``(H, W, 3)`` (or ``(H, W)``) ``uint8`` arrays of the same shape and return a
Python ``float``. They follow the conventions of the learned-compression literature so that our
numbers sit next to published ones:

- PSNR is computed from the MSE over all pixels *and* channels of the 8-bit RGB image (no
  colour conversion, no per-channel PSNR averaging), peak 255.
- MS-SSIM follows Wang, Simoncelli & Bovik, "Multi-scale structural similarity for image
  quality assessment" (Asilomar 2003): an 11x11 Gaussian window with sigma 1.5 (valid
  filtering, no padding), K1 = 0.01, K2 = 0.03, L = 255, five scales with the published exponents
  (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), 2x2 average pooling between scales. Colour images are
  scored per channel and the per-channel MS-SSIM values are averaged, as common RGB evaluations
  do. Negative contrast-structure terms (possible for anti-correlated content) are clamped to 0
  before the fractional powers, which would otherwise be undefined.
  Matches ``pytorch_msssim.ms_ssim`` to ~1e-7 on even-sized images; on odd sizes the two differ
  by ~1e-4 because it zero-pads inside its average pooling where we replicate the last row or
  column (as the original MATLAB code's symmetric filtering does).
"""

from __future__ import annotations

import math

import numpy as np

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_WIN_SIZE = 11
_WIN_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
# Smallest side for which every one of the 5 scales still holds one full 11x11 window:
# (11 - 1) * 2**4 + 1 = 161.
MS_SSIM_MIN_SIDE = (_WIN_SIZE - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) + 1


def _check_pair(a: np.ndarray, b: np.ndarray, name: str) -> None:
    for label, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name}: {label} must be a numpy array, got {type(x).__name__}")
        if x.dtype != np.uint8:
            raise TypeError(f"{name}: {label} must have dtype uint8, got {x.dtype}")
        if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[2] not in (1, 3)):
            raise ValueError(
                f"{name}: {label} must have shape (H, W) or (H, W, 1|3), got {tuple(x.shape)}"
            )
    if a.shape != b.shape:
        raise ValueError(f"{name}: shape mismatch {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.size == 0:
        raise ValueError(f"{name}: empty image of shape {tuple(a.shape)}")


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over all pixels and channels of two uint8 images (float64 math)."""
    _check_pair(a, b, "mse")
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(diff * diff))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 images of the same shape, peak 255; ``inf`` if identical.

    Args:
        a, b: ``(H, W)`` or ``(H, W, C)`` ``uint8`` arrays (C in {1, 3}).
    """
    _check_pair(a, b, "psnr")
    m = mse(a, b)
    if m == 0.0:
        return math.inf
    return 10.0 * math.log10(255.0**2 / m)


def _gaussian_window() -> np.ndarray:
    x = np.arange(_WIN_SIZE, dtype=np.float64) - (_WIN_SIZE - 1) / 2
    g = np.exp(-(x**2) / (2 * _WIN_SIGMA**2))
    return g / g.sum()


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of ``x`` (H, W, C) with the 1-D window ``g`` on H and W.

    Eleven shifted multiply-adds per axis: exact float64 arithmetic, no FFT round-off, and fast
    enough for Kodak-sized images without any compiled dependency.
    """
    n = g.shape[0]
    h, w = x.shape[0] - n + 1, x.shape[1] - n + 1
    rows = g[0] * x[0:h]
    for k in range(1, n):
        rows = rows + g[k] * x[k : k + h]
    out = g[0] * rows[:, 0:w]
    for k in range(1, n):
        out = out + g[k] * rows[:, k : k + w]
    return out


def _ssim_terms(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean SSIM and mean contrast-structure term at one scale, each shape (C,)."""
    c1 = (_K1 * 255.0) ** 2
    c2 = (_K2 * 255.0) ** 2
    mu_x = _filter_valid(x, g)
    mu_y = _filter_valid(y, g)
    # Variances as E[x^2] - E[x]^2 in float64: the cancellation error is ~1e-10 relative for
    # 8-bit data, far below the C2 = 58.5 stabiliser.
    sxx = _filter_valid(x * x, g) - mu_x * mu_x
    syy = _filter_valid(y * y, g) - mu_y * mu_y
    sxy = _filter_valid(x * y, g) - mu_x * mu_y
    cs_map = (2.0 * sxy + c2) / (sxx + syy + c2)
    lum_map = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
    return (lum_map * cs_map).mean(axis=(0, 1)), cs_map.mean(axis=(0, 1))


def _downsample(x: np.ndarray) -> np.ndarray:
    """2x2 average pooling; an odd trailing row/column is replicated first (edge padding)."""
    if x.shape[0] % 2:
        x = np.concatenate([x, x[-1:]], axis=0)
    if x.shape[1] % 2:
        x = np.concatenate([x, x[:, -1:]], axis=1)
    return 0.25 * (x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2])


def ms_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Multi-scale SSIM (Wang et al. 2003) of two uint8 images, in [0, 1]; 1 iff identical.

    Args:
        a, b: ``(H, W)`` or ``(H, W, C)`` ``uint8`` arrays (C in {1, 3}) with
            ``min(H, W) >= 161`` (five scales of an 11x11 window).

    Returns:
        The mean over channels of ``prod_{j<5} cs_j^w_j * ssim_5^w_5``.
    """
    _check_pair(a, b, "ms_ssim")
    if min(a.shape[0], a.shape[1]) < MS_SSIM_MIN_SIDE:
        raise ValueError(
            f"ms_ssim: image of {a.shape[0]}x{a.shape[1]} is too small for 5 scales "
            f"(both sides must be >= {MS_SSIM_MIN_SIDE})"
        )
    x = a.astype(np.float64)
    y = b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[:, :, None], y[:, :, None]
    g = _gaussian_window()
    weights = np.asarray(MS_SSIM_WEIGHTS)
    cs_values = []
    for scale in range(len(weights)):
        ssim_c, cs_c = _ssim_terms(x, y, g)
        if scale < len(weights) - 1:
            cs_values.append(cs_c)
            x, y = _downsample(x), _downsample(y)
    terms = np.stack([*cs_values, ssim_c], axis=0)  # (5, C)
    terms = np.maximum(terms, 0.0)
    per_channel = np.prod(terms ** weights[:, None], axis=0)
    return float(per_channel.mean())


def ms_ssim_db(value: float) -> float:
    """MS-SSIM expressed in dB as ``-10 log10(1 - value)`` (``inf`` for a perfect score)."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"ms_ssim_db: MS-SSIM must lie in [0, 1], got {value}")
    if value >= 1.0:
        return math.inf
    return -10.0 * math.log10(1.0 - value)


def _luma(img: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(img, np.ndarray) or img.dtype != np.uint8:
        raise TypeError(f"{what}: img must be a uint8 numpy array")
    if img.ndim == 3 and img.shape[2] == 3:
        return img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return img.reshape(img.shape[0], img.shape[1]).astype(np.float64)
    raise ValueError(f"{what}: img must be (H, W) or (H, W, 1|3), got {img.shape}")


def grid_steps(img: np.ndarray, period: int = 16) -> float:
    """How much larger the luma steps across the lines of a ``period``-pixel grid are than the
    steps between other neighbouring pixels: ``mean |step| across grid lines / mean |step|
    elsewhere`` (horizontal and vertical neighbours, BT.601 luma, on a ``uint8`` ``(H, W)`` or
    ``(H, W, 3)`` image of at least 2 periods per side). About 1.0 for a photo; a codec that
    works in ``period``-pixel tokens or blocks and leaves seams between them scores above its
    original's value (:func:`grid_blockiness`)."""
    luma = _luma(img, "grid_steps")
    if isinstance(period, bool) or not isinstance(period, int) or period < 2:
        raise ValueError(f"grid_steps: period must be an int >= 2, got {period!r}")
    h, w = luma.shape
    if min(h, w) < 2 * period:
        raise ValueError(f"grid_steps: image {h}x{w} is smaller than two {period}-px periods")
    on_sum = off_sum = 0.0
    on_n = off_n = 0
    for d, n in ((np.abs(np.diff(luma, axis=1)), w), (np.abs(np.diff(luma, axis=0)).T, h)):
        # step i lies between pixels i and i + 1: a grid line when i + 1 is a multiple of period
        line = (np.arange(n - 1) + 1) % period == 0
        on_sum, on_n = on_sum + d[:, line].sum(), on_n + d[:, line].size
        off_sum, off_n = off_sum + d[:, ~line].sum(), off_n + d[:, ~line].size
    return float((on_sum / on_n) / max(off_sum / off_n, 1e-12))


def periodic_peak(img: np.ndarray, period: int) -> float:
    """How strongly a ``period``-pixel pattern repeats over a ``uint8`` ``(H, W)`` or
    ``(H, W, 3)`` image: the power spectrum of its mean-free, Hann-windowed BT.601 luma (cropped
    to whole periods, at least 2 per side) at the pattern's three fundamentals (vertical,
    horizontal, diagonal), over the median power of the frequencies that share their row or
    column; about 1 for noise. Compare against the original with :func:`periodic_excess`: a
    grid of ``period``-pixel tokens, or a transposed convolution's checkerboard, raises it."""
    luma = _luma(img, "periodic_peak")
    if isinstance(period, bool) or not isinstance(period, int) or period < 2:
        raise ValueError(f"periodic_peak: period must be an int >= 2, got {period!r}")
    h, w = (n - n % period for n in luma.shape)
    if min(h, w) < 2 * period:
        raise ValueError(
            f"periodic_peak: image {luma.shape[0]}x{luma.shape[1]} is smaller than two "
            f"{period}-px periods"
        )
    y = luma[:h, :w] - luma[:h, :w].mean()
    # a Hann window: the image's edges would otherwise put a cross of power on both axes
    y = y * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(y)) ** 2
    fy, fx = h // period, w // period
    peak = power[fy, 0] + power[0, fx] + power[fy, fx]
    band = np.concatenate([power[fy, 1 : w // 2], power[1 : h // 2, fx]])
    return float(peak / (3 * max(np.median(band), 1e-12)))


def periodic_excess(original: np.ndarray, decoded: np.ndarray, period: int) -> float:
    """``periodic_peak(decoded) / periodic_peak(original)`` (both ``uint8``, same shape): 1.0 = a
    ``period``-pixel pattern stands out of the spectrum around it no more than in the original;
    10 = ten times as much. A blurry decode has little power around a high-frequency peak, so a
    faint pattern there stands out more: read it beside the decode's sharpness."""
    _check_pair(original, decoded, "periodic_excess")
    return periodic_peak(decoded, period) / max(periodic_peak(original, period), 1e-12)


def grid_blockiness(original: np.ndarray, decoded: np.ndarray, period: int = 16) -> float:
    """Seams a ``period``-pixel codec left: ``grid_steps(decoded) / grid_steps(original)`` (both
    ``uint8``, same shape). 1.0 = no more step across the grid lines than the original has; 1.2
    = steps across them 20 % larger, relative to the other steps, than in the original."""
    _check_pair(original, decoded, "grid_blockiness")
    return grid_steps(decoded, period) / max(grid_steps(original, period), 1e-12)

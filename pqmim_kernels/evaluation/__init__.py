"""Rate-distortion evaluation of PQ-MIM against classical codecs (``pqmim eval``).

- :mod:`.metrics`: PSNR and MS-SSIM on 8-bit RGB.
- :mod:`.bd`: Bjøntegaard BD-rate / BD-PSNR (PCHIP over the overlapping range).
- :mod:`.codecs`: codec adapters (Pillow JPEG/WebP, imagecodecs AVIF/JPEG XL, pillow-heif HEIC,
  PQ-MIM) with their quality sweeps and versions.
- :mod:`.reference`: published Kodak curves shipped as data (``ref:NAME``).
- :mod:`.runner`: the evaluation itself (parallel over images) and its JSON / markdown outputs.
- :mod:`.plot`: the RD plot (matplotlib, Agg).

Imports are light: third-party codec libraries, scipy and matplotlib load only when used.
"""

from __future__ import annotations

from .bd import bd_psnr, bd_rate
from .metrics import ms_ssim, psnr

__all__ = ["bd_psnr", "bd_rate", "ms_ssim", "psnr"]

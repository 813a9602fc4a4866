"""Rate-distortion evaluation of PQ-MIM against classical codecs (``pqmim eval``).

- :mod:`.metrics`: PSNR and MS-SSIM on 8-bit RGB.
- :mod:`.bd`: Bjøntegaard BD-rate / BD-PSNR (PCHIP over the overlapping range).
- :mod:`.codecs`: codec adapters (Pillow JPEG/WebP, imagecodecs AVIF/JPEG XL, pillow-heif HEIC,
  PQ-MIM) with their quality sweeps and versions.
- :mod:`.reference`: published Kodak curves shipped as data (``ref:NAME``).
- :mod:`.images`: which files of a folder are images, read as 8-bit RGB.
- :mod:`.selection`: ``--codecs`` / ``--qualities`` / ``--pqmim-*`` -> adapters (PQ-MIM
  presets included).
- :mod:`.requirements`: the optional packages a run needs, checked before any work.
- :mod:`.sweep`: measuring every image x codec x setting (parallel over images).
- :mod:`.summary`: curves, BD metrics against the anchor, the JPEG consistency check.
- :mod:`.merge`: curves of an earlier ``results.json`` joining a run (``--merge``).
- :mod:`.report`: ``results.json``, ``results.md`` and the printed summary.
- :mod:`.plot`: the RD plot (matplotlib, Agg).
- :mod:`.runner`: the pipeline that chains them (:func:`.runner.evaluate`).

Imports are light: third-party codec libraries, scipy and matplotlib load only when used.
"""

from __future__ import annotations

from .bd import bd_psnr, bd_rate
from .metrics import ms_ssim, psnr

__all__ = ["bd_psnr", "bd_rate", "ms_ssim", "psnr"]

"""Measuring: every image x codec x setting, encoded, decoded and scored.

Conventions, as in learned-compression papers: per image, bpp = 8 * (bytes of the whole file) /
(H * W); PSNR on 8-bit RGB; MS-SSIM where both sides are at least
:data:`~pqmim_kernels.evaluation.metrics.MS_SSIM_MIN_SIDE`. Encode/decode times are wall-clock
seconds of the library call in a worker process, measured while ``workers`` jobs run side by
side; one-off costs (model loading, first calls) are paid in :meth:`Codec.prepare`, untimed.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .codecs import Codec
from .images import load_rgb
from .metrics import MS_SSIM_MIN_SIDE, ms_ssim, psnr


def evaluate_image(path: str | os.PathLike, codec: Codec) -> list[dict[str, Any]]:
    """All settings of ``codec`` on one image: one record per setting.

    Record keys: image, codec, setting, bytes, bpp, psnr, ms_ssim (None if the image is smaller
    than :data:`~pqmim_kernels.evaluation.metrics.MS_SSIM_MIN_SIDE`), encode_s, decode_s.
    Raises ``RuntimeError`` if the codec decodes to another shape or dtype than the image's.
    """
    img = load_rgb(path)
    h, w = img.shape[:2]
    codec.prepare()  # model loading and first-call costs stay out of the timings
    records = []
    for setting in codec.settings:
        t0 = time.perf_counter()
        data = codec.encode(img, setting)
        t1 = time.perf_counter()
        rec = codec.decode(data, setting)
        t2 = time.perf_counter()
        if not isinstance(rec, np.ndarray) or rec.shape != img.shape or rec.dtype != np.uint8:
            got = (getattr(rec, "shape", None), getattr(rec, "dtype", type(rec).__name__))
            raise RuntimeError(
                f"{codec.name} at {codec.setting_name}={setting} decoded {Path(path).name} to "
                f"shape/dtype {got}, expected {img.shape} uint8"
            )
        records.append(
            {
                "image": Path(path).name,
                "codec": codec.name,
                "setting": setting,
                "bytes": len(data),
                "bpp": 8.0 * len(data) / (h * w),
                "psnr": psnr(img, rec),
                "ms_ssim": ms_ssim(img, rec) if min(h, w) >= MS_SSIM_MIN_SIDE else None,
                "encode_s": t1 - t0,
                "decode_s": t2 - t1,
            }
        )
    return records


def _worker_init() -> None:
    # One image per process at a time: keep BLAS/OpenMP/torch from oversubscribing the cores.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"


def run_codecs(
    images: Sequence[Path],
    codecs: Sequence[Codec],
    workers: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (image, codec) job; ``workers > 1`` uses a process pool (spawn context).

    Returns all per-image records, ordered by codec, then image, then setting.
    """
    from tqdm import tqdm

    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = [(img, codec) for codec in codecs for img in images]
    results: dict[int, list] = {}
    bar = tqdm(total=len(jobs), desc="eval", unit="job", disable=not progress, file=sys.stderr)
    try:
        if workers == 1 or len(jobs) == 1:
            for i, (img, codec) in enumerate(jobs):
                bar.set_postfix_str(f"{codec.name} {Path(img).name}", refresh=False)
                results[i] = evaluate_image(img, codec)
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(
                max_workers=min(workers, len(jobs)), mp_context=ctx, initializer=_worker_init
            ) as pool:
                futures = {
                    pool.submit(evaluate_image, img, codec): i
                    for i, (img, codec) in enumerate(jobs)
                }
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()
    return [rec for i in range(len(jobs)) for rec in results[i]]


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured (CPU model, cores, OS, Python and numpy versions)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }

"""End-to-end codec speed: the default preset's model on Kodak images (issue: entropy model v2).

``pytest bench/bench_codec.py --benchmark-only`` times ``compress_image`` and
``decompress_image`` on 768x512 Kodak images (goal: <= 0.3 s each on the 2-core CPU machine),
with the integer entropy model in the C++ engine and in the torch spec (same bytes), and the
phases of one encode (conv encoder + PQ, entropy model, rANS) as ``extra_info``. Threads: torch's
default (all cores). Needs ``../shared/data/kodak`` (skipped otherwise).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

KODAK = Path(__file__).resolve().parents[2] / "shared" / "data" / "kodak"
IMAGES = ["kodim01.png", "kodim04.png", "kodim23.png"]  # landscape, portrait, landscape


@pytest.fixture(scope="module")
def setup():
    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.models import compress_image, load_model

    if not KODAK.is_dir():
        pytest.skip(f"Kodak images not found at {KODAK}")
    model = load_model()  # the default preset (presets.DEFAULT_PRESET)
    imgs = [read_image(KODAK / name) for name in IMAGES]
    files = [compress_image(img, model) for img in imgs]  # warm-up (first-call costs)
    return model, imgs, files


def _info(benchmark, machine_name, model, imgs, files):
    from pqmim_kernels.coding import int_kernels

    pixels = sum(img.shape[0] * img.shape[1] for img in imgs)
    benchmark.extra_info.update(
        machine=machine_name("cpu"),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        images=IMAGES,
        bpp=8 * sum(len(f) for f in files) / pixels,
        int_backend=model.int_backend if not int_kernels.available() else "cpp",
        seconds_per_image_note="stats are per call of all images; divide by len(images)",
    )


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("op", ["compress", "decompress"])
def bench_codec_kodak(benchmark, setup, machine_name, op, backend):
    from pqmim_kernels.coding import int_kernels
    from pqmim_kernels.models import compress_image, decompress_image

    model, imgs, files = setup
    if backend == "cpp" and not int_kernels.available():
        pytest.skip(int_kernels.why())
    if op == "compress":
        work = lambda: [compress_image(img, model) for img in imgs]  # noqa: E731
    else:
        work = lambda: [decompress_image(f, model) for f in files]  # noqa: E731
    model.int_backend = backend
    try:
        out = benchmark.pedantic(work, rounds=3 if backend == "cpp" else 1, iterations=1)
    finally:
        model.int_backend = "auto"
    if op == "compress":
        assert out == files  # every backend writes the same bytes
        benchmark.extra_info.update(_phases(model, imgs[0]))
    else:
        assert [o.shape for o in out] == [img.shape for img in imgs]
    _info(benchmark, machine_name, model, imgs, files)
    benchmark.extra_info["int_backend"] = backend


def _phases(model, img) -> dict:
    """Seconds of the phases of one encode of ``img`` (conv + PQ, entropy model + rANS)."""
    from pqmim_kernels.models import _as_tensor

    x = _as_tensor(img)
    t0 = time.perf_counter()
    with torch.no_grad():
        codes = model.encode_codes(x)[0]
    t1 = time.perf_counter()
    model.compress_codes(codes, img.shape[:2])
    t2 = time.perf_counter()
    return {"phase_conv_pq_s": t1 - t0, "phase_entropy_rans_s": t2 - t1}


@pytest.mark.parametrize("steps", [30])
def bench_codec_latent_search(benchmark, setup, machine_name, steps):
    """``compress_image(..., latent_steps=30)`` on one Kodak image: the price of the encoder's
    decoder-aware search (30 forward + backward passes of g_s), against the plain encode above;
    the file's bpp and PSNR gain go in ``extra_info``."""
    from pqmim_kernels.evaluation.metrics import psnr
    from pqmim_kernels.models import compress_image, decompress_image

    model, imgs, files = setup
    img = imgs[0]
    data = benchmark.pedantic(
        lambda: compress_image(img, model, latent_steps=steps), rounds=1, iterations=1
    )
    pixels = img.shape[0] * img.shape[1]
    benchmark.extra_info.update(
        machine=machine_name("cpu"),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        images=IMAGES[:1],
        latent_steps=steps,
        bpp=8 * len(data) / pixels,
        bpp_plain=8 * len(files[0]) / pixels,
        psnr=psnr(img, decompress_image(data, model)),
        psnr_plain=psnr(img, decompress_image(files[0], model)),
    )

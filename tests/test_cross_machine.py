"""Files decode bit-exactly whatever the decoding process computes with (issue: entropy model v2).

Each case encodes real images in one process and decodes them in another whose environment
changes what PyTorch and the BLAS do: other thread counts, PyTorch's non-SIMD kernels
(``ATEN_CPU_CAPABILITY=default``) or AVX2 ones, oneDNN capped at AVX2, oneDNN allowed to
compute float32 products in bf16 (``DNNL_DEFAULT_FPMATH_MODE=BF16``), MKL's conditional
numerical reproducibility mode, and the torch spec of the integer model instead of the C++
engine (``PQMIM_NO_INT_KERNELS=1``). Every decode must give exactly the encoder's codes. Before
entropy model v2, ``ATEN_CPU_CAPABILITY=default`` and ``ONEDNN_MAX_CPU_ISA=SSE41`` decoded 0 of
6 Kodak images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
WORKER = HERE / "cross_machine_worker.py"
KODAK = HERE.parents[1] / "shared" / "data" / "kodak"
SAMPLE = HERE.parent / "pqmim_kernels" / "data" / "sample.png"

VARIANTS = {
    "1 thread": ({}, 1),
    "3 threads": ({}, 3),
    "ATEN_CPU_CAPABILITY=default": ({"ATEN_CPU_CAPABILITY": "default"}, 2),
    "ATEN_CPU_CAPABILITY=avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, 2),
    "ONEDNN_MAX_CPU_ISA=AVX2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, 2),
    "ONEDNN_MAX_CPU_ISA=SSE41": ({"ONEDNN_MAX_CPU_ISA": "SSE41"}, 2),
    "DNNL_DEFAULT_FPMATH_MODE=BF16": ({"DNNL_DEFAULT_FPMATH_MODE": "BF16"}, 2),
    "MKL_CBWR=COMPATIBLE": ({"MKL_CBWR": "COMPATIBLE"}, 2),
    "torch spec (no C++ engine)": ({"PQMIM_NO_INT_KERNELS": "1"}, 2),
}


def _images():
    imgs = [SAMPLE]
    if KODAK.is_dir():
        imgs += [KODAK / "kodim03.png", KODAK / "kodim19.png"]  # landscape and portrait
    return [str(p) for p in imgs]


def _run(env_extra, threads, *args):
    env = {k: v for k, v in os.environ.items() if k not in _ALL_KEYS}
    env.update(env_extra)
    res = subprocess.run(
        [sys.executable, str(WORKER), "--threads", str(threads), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[0])


_ALL_KEYS = {k for env, _ in VARIANTS.values() for k in env}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """The default model encodes the images in a default process."""
    from pqmim_kernels.models import DEFAULT_MODEL_PATH

    out = tmp_path_factory.mktemp("encoded")
    imgs = _images()
    info = _run({}, 2, "encode", str(DEFAULT_MODEL_PATH), str(out), *imgs)
    return out, len(imgs), info


def _decode_and_compare(out, count, env, threads):
    from pqmim_kernels.models import DEFAULT_MODEL_PATH

    info = _run(env, threads, "decode", str(DEFAULT_MODEL_PATH), str(out), str(count))
    for i in range(count):
        want = np.load(out / f"{i}.npy")
        got = np.load(out / f"{i}.decoded.npy")
        assert np.array_equal(got, want), f"image {i} decoded to other codes under {env}"
    return info


@pytest.mark.parametrize("name", list(VARIANTS))
def test_decode_in_another_environment_is_bit_exact(encoded, name, tmp_path):
    out, count, _ = encoded
    env, threads = VARIANTS[name]
    work = tmp_path / "dec"
    work.mkdir()
    for f in out.iterdir():
        if f.suffix in (".pqm", ".npy") and ".decoded" not in f.name:
            (work / f.name).write_bytes(f.read_bytes())
    info = _decode_and_compare(work, count, env, threads)
    if name.startswith("ATEN_CPU_CAPABILITY"):
        assert info["capability"].lower() == env["ATEN_CPU_CAPABILITY"].lower()
    if name.startswith("torch spec"):
        assert info["int_backend"] == "reference"


@pytest.mark.parametrize(
    "name", ["ATEN_CPU_CAPABILITY=default", "torch spec (no C++ engine)", "1 thread"]
)
def test_encode_in_another_environment_decodes_in_the_default_one(name, tmp_path):
    """The other direction: the file is written under the variant, read by a default process."""
    from pqmim_kernels.models import DEFAULT_MODEL_PATH

    env, threads = VARIANTS[name]
    imgs = _images()
    _run(env, threads, "encode", str(DEFAULT_MODEL_PATH), str(tmp_path), *imgs)
    _decode_and_compare(tmp_path, len(imgs), {}, 2)

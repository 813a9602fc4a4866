"""The bundled models: present, small, and round-tripping the bundled sample image (the default
preset without a model argument)."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pqmim_kernels.cli.codec import psnr, read_image
from pqmim_kernels.coding import pqm_format as fmt
from pqmim_kernels.models import (
    DEFAULT_MODEL_PATH,
    compress_image,
    decompress_image,
    load_model,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "pqmim_kernels" / "data" / "sample.png"


@pytest.fixture(scope="module")
def sample():
    return read_image(SAMPLE)


def test_bundled_models_are_there_and_small():
    from pqmim_kernels.models import presets

    assert DEFAULT_MODEL_PATH.is_file()  # the first bundled model (retired: decodes only)
    files = {p.path for p in presets.every()}  # a retired variant shares its successor's file
    assert sum(f.stat().st_size for f in files) < 40 * 2**20
    for preset in presets.every():
        assert preset.path.stat().st_size < 20 * 2**20
        model = load_model(preset.name)
        assert not model.training
        assert bool(model.quantizer.initted)  # trained codebooks, not the random init
    cfg = load_model("default").config
    assert (cfg.num_subspaces, cfg.codebook_size) == (8, 256)


def test_default_round_trip_on_sample(sample):
    h, w = sample.shape[:2]
    data = compress_image(sample)  # model=None: the cached default
    header, _ = fmt.unpack(data)
    assert (header.height, header.width) == (h, w)
    out = decompress_image(data)
    model = load_model()  # the default preset
    x = torch.from_numpy(sample.copy()).permute(2, 0, 1)[None].float() / 255
    ref = model.decode_codes(model.encode_codes(x), (h, w))
    ref8 = (ref[0].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(out, ref8)
    bpp = 8 * len(data) / (h * w)
    assert bpp < model.config.raw_bpp + 8 * 11 / (h * w)  # the entropy model saves bits
    assert psnr(sample, out) > 20.0  # a trained model, not noise (README: the measured figure)


def test_cli_on_bundled_sample(tmp_path):
    out = tmp_path / "s.pqm"
    r = subprocess.run(
        [sys.executable, "-m", "pqmim_kernels.cli.main", "compress", str(SAMPLE), "-o", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert re.search(r"\(250x166\) -> .*s\.pqm: \d+ bytes, [\d.]+ bpp", r.stdout)

"""Golden-file tests: md5 of .pqm bytes for fixed inputs guard against silent format drift.

Regenerate only on purpose (a deliberate format or default-model change), with
``.venv/bin/python tests/golden/make_golden.py`` -- see that file's docstring.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

EXPECTED = json.loads((HERE / "golden.json").read_text())
HINT = "bitstream drift; if intended, regenerate with `python tests/golden/make_golden.py`"


def _md5(b):
    return hashlib.md5(b).hexdigest()


def test_container_golden():
    assert _md5(golden.container_bytes()) == EXPECTED["container"], HINT


@pytest.mark.parametrize("h,w", golden.SIZES)
def test_tiny_model_golden(h, w):
    from pqmim_kernels.models import compress_image, decompress_image, load_model

    tiny = load_model(str(golden.TINY_MODEL))
    data = compress_image(golden.synthetic_image(h, w), tiny)
    assert _md5(data) == EXPECTED[f"tiny_{h}x{w}"], HINT
    assert _md5(decompress_image(data, tiny).tobytes()) == EXPECTED[f"tiny_{h}x{w}_decoded"], HINT


def test_default_model_golden():
    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.models import DEFAULT_MODEL_PATH, compress_image

    if "default_sample" not in EXPECTED or not DEFAULT_MODEL_PATH.is_file():
        pytest.fail("the bundled default model or its golden entry is missing")
    data = compress_image(read_image(golden.SAMPLE))
    assert len(data) == EXPECTED["default_sample_bytes"], HINT
    assert _md5(data) == EXPECTED["default_sample"], HINT

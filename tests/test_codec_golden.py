"""Golden files: committed .pqm files, their codes and decoded images guard the bitstream.

Machine independent by construction (see ``tests/golden/make_golden.py``): a committed file must
decode to its committed codes exactly and the committed codes must encode to the committed bytes
exactly (the integer entropy model computes the same integers everywhere); the decoded image is
compared with the committed one within a tolerance (the conv decoder is float). Regenerate only
on purpose, with ``.venv/bin/python tests/golden/make_golden.py``.
"""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)

EXPECTED = json.loads((HERE / "golden.json").read_text())
HINT = "bitstream drift; if intended, regenerate with `python tests/golden/make_golden.py`"
CASES = sorted(EXPECTED["cases"])
# Decoded images: the float conv decoder may round a few pixels differently on another machine.
MAX_PIXEL_DIFF = 2
MAX_DIFF_FRACTION = 0.01


def _model(name):
    from pqmim_kernels.models import load_model

    return load_model(dict((n, path) for n, path, _ in golden.cases())[name])


def _files(name):
    data = (HERE / f"{name}.pqm").read_bytes()
    codes = torch.from_numpy(np.load(HERE / f"{name}.codes.npy").astype(np.int64))
    return data, codes


def test_container_golden():
    assert hashlib.md5(golden.container_bytes()).hexdigest() == EXPECTED["container"], HINT


def test_every_model_case_is_present():
    names = {name for name, _, _ in golden.cases()}
    assert names == set(CASES), "golden.json and the cases of make_golden.py differ"
    assert "default_sample" in CASES, "the bundled default model has no golden case"


def test_every_bundled_preset_has_a_golden_case():
    from pqmim_kernels.models import presets

    for preset in presets.every():
        assert preset.path.is_file(), f"preset {preset.name!r}: {preset.path} is missing"
        assert f"{preset.name}_sample" in CASES, f"preset {preset.name!r} has no golden case"


@pytest.mark.parametrize("name", CASES)
def test_golden_file_decodes_to_golden_codes(name):
    data, codes = _files(name)
    assert len(data) == EXPECTED["cases"][name]["bytes"]
    assert hashlib.md5(data).hexdigest() == EXPECTED["cases"][name]["md5"]
    decoded, size = _model(name).decompress_codes(data)
    assert tuple(size) == tuple(EXPECTED["cases"][name]["size"])
    assert torch.equal(decoded[0].cpu(), codes), HINT


@pytest.mark.parametrize("name", CASES)
def test_golden_codes_encode_to_golden_bytes(name):
    data, codes = _files(name)
    size = tuple(EXPECTED["cases"][name]["size"])
    assert _model(name).compress_codes(codes, size) == data, HINT


@pytest.mark.parametrize("name", CASES)
def test_golden_file_decodes_to_golden_image_within_tolerance(name):
    from PIL import Image

    from pqmim_kernels.models import decompress_image

    data, _ = _files(name)
    got = decompress_image(data, _model(name)).astype(np.int64)
    want = np.asarray(Image.open(HERE / f"{name}.png").convert("RGB"), dtype=np.int64)
    assert got.shape == want.shape
    diff = np.abs(got - want)
    assert diff.max() <= MAX_PIXEL_DIFF
    assert (diff > 0).mean() <= MAX_DIFF_FRACTION


@pytest.mark.parametrize("name", CASES)
def test_image_round_trip_on_this_machine(name):
    """image -> codes is not pinned (float encoder), but on one machine it round-trips exactly."""
    from pqmim_kernels.models import compress_image

    model = _model(name)
    img = dict((n, im) for n, _, im in golden.cases())[name]
    data = compress_image(img, model)
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    decoded, _ = model.decompress_codes(data)
    assert torch.equal(decoded, model.encode_codes(x))


# Legacy cases: files of models that are gone but whose id a preset's model reads (an alias:
# the encoder was refined, the decoder and entropy model are the same).
LEGACY = sorted(EXPECTED.get("legacy", {}))


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_file_decodes_with_the_preset_that_reads_it(name):
    check_legacy(HERE, name, EXPECTED["legacy"][name])


def check_legacy(folder: Path, name: str, entry: dict) -> None:
    """A legacy case (``make_golden.py --legacy``): the file of a model that is gone decodes
    with the preset whose model lists its id as an alias, to its codes and (within the
    tolerance) its image, and that model's entropy model codes those codes to its payload."""
    from PIL import Image

    from pqmim_kernels.coding import pqm_format
    from pqmim_kernels.models import decompress_image, load_model, model_for_file

    data = (folder / f"{name}.pqm").read_bytes()
    codes = torch.from_numpy(np.load(folder / f"{name}.codes.npy").astype(np.int64))
    assert len(data) == entry["bytes"] and hashlib.md5(data).hexdigest() == entry["md5"]
    header, payload = pqm_format.unpack(data)
    assert header.model_id.hex() == entry["model_id"]
    model = load_model(entry["preset"])
    assert model.model_id().hex() != entry["model_id"] and model.reads(header.model_id)
    assert model_for_file(data)[1].name == entry["preset"]
    decoded, size = model.decompress_codes(data)
    assert tuple(size) == tuple(entry["size"]) and torch.equal(decoded[0].cpu(), codes), HINT
    # the entropy model is the one that wrote it: the same codes give the same payload today
    again = model.compress_codes(codes, tuple(size))
    assert pqm_format.unpack(again)[1] == payload, HINT
    got = decompress_image(data).astype(np.int64)
    want = np.asarray(Image.open(folder / f"{name}.png").convert("RGB"), dtype=np.int64)
    diff = np.abs(got - want)
    assert got.shape == want.shape and diff.max() <= MAX_PIXEL_DIFF
    assert (diff > 0).mean() <= MAX_DIFF_FRACTION

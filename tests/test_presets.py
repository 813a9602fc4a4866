"""The preset registry and everything that picks a model from it: ``load_model(NAME)``,
``compress_image`` / ``decompress_image`` without a model, the ``max_bytes`` search over presets
and stages, ``pqmim compress --quality / --max-bytes``, ``pqmim decompress`` without ``--model``
and ``pqmim eval --codecs pqmim`` / ``pqmim@NAME``.

Every test but the first uses a registry of two tiny models built in a temporary folder, so
none depends on the bundled weights.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from _tiny import make_coding_ready
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.coding import pqm_format
from pqmim_kernels.evaluation import runner
from pqmim_kernels.evaluation.selection import build_codecs, group_pqmim
from pqmim_kernels.models import (
    PQMIM,
    PQMIMConfig,
    compress_image,
    compress_to_fit,
    decompress_image,
    load_model,
    model_for_file,
    presets,
    save_model,
)
from pqmim_kernels.models.presets import Preset
from pqmim_kernels.models.schedule import stage_bounds

H, W = 128, 160  # 8 x 10 = 80 tokens; with 6 stages, stage 1 codes 2 of them
TOKENS = 80


def _tiny_model(num_subspaces: int, seed: int) -> PQMIM:
    torch.manual_seed(seed)
    cfg = PQMIMConfig(
        channels=(8, 8, 8, 8),
        latent_dim=8,
        num_subspaces=num_subspaces,
        codebook_size=16,
        mim_width=16,
        mim_depth=1,
        mim_heads=2,
        stages=6,
    )
    model = PQMIM(cfg).train()
    with torch.no_grad():
        model.quantize(model.encode_latent(torch.rand(4, 3, 64, 64)))
    return make_coding_ready(model.eval(), seed=seed)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """small: M=2 sub-codes per token; big: M=4 (about twice the bits); other: no preset."""
    folder = tmp_path_factory.mktemp("presets")
    files = {}
    for name, m, seed in (("small", 2, 0), ("big", 4, 1), ("other", 2, 2)):
        files[name] = folder / f"{name}.pt"
        save_model(_tiny_model(m, seed), files[name])
    return files


@pytest.fixture
def registry(model_files, monkeypatch):
    tiny = (
        Preset("small", str(model_files["small"]), 1, "tiny, M=2", 0.5),
        Preset("big", str(model_files["big"]), 2, "tiny, M=4", 1.0),
    )
    monkeypatch.setattr(presets, "PRESETS", tiny)
    monkeypatch.setattr(presets, "RETIRED", ())
    monkeypatch.setattr(presets, "DEFAULT_PRESET", "small")
    return tiny


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([xx * 255 // W, yy * 255 // H, (xx * yy) % 256], -1)
    return np.clip(img + rng.integers(-30, 30, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def photo(tmp_path, image):
    path = tmp_path / "photo.png"
    Image.fromarray(image).save(path)
    return path


# ---------------------------------------------------------------------------------- registry
def test_bundled_registry_is_consistent():
    reg = presets.registry()
    assert [p.quality for p in reg] == list(range(1, len(reg) + 1))
    assert presets.default().name == presets.DEFAULT_PRESET
    assert presets.default() in reg
    for p in presets.every():
        assert p.path.parent == presets.DATA_DIR and p.path.is_file(), p
        assert p.description and p.nominal_bpp > 0
    # every bundled model loads, and each preset's nominal rate is what its (M, K) allows
    for p in reg:
        cfg = load_model(p.name).config
        assert p.nominal_bpp < cfg.raw_bpp, p
    # the first bundled model is retired, not removed: its files must keep decoding; so are
    # medium and high before their decoders were refined (variants of the refined files)
    assert [p.name for p in presets.RETIRED] == ["default", "medium-v1", "high-v1"]
    for name in ("medium", "high"):
        old, new = load_model(f"{name}-v1"), load_model(name)
        assert old.model_id() != new.model_id() and presets.get(f"{name}-v1").variant
        assert new.config.decoder_extra_blocks == (2, 2, 1)
        assert old.config.decoder_extra_blocks == (0, 0, 0)
    # a file's model id names one bundled model: no id or alias is claimed by two of them
    claimed = [i for p in presets.every() for i in (load_model(p.name).model_id(),
                                                     *load_model(p.name).aliases)]  # fmt: skip
    assert len(claimed) == len(set(claimed)), [i.hex() for i in claimed]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: (), "preset registry: no presets"),
        (lambda r: (dataclasses.replace(r[0], name="Big One"), r[1]), "name 'Big One' must be"),
        (lambda r: (r[0], dataclasses.replace(r[1], name="small")), "'small' is used twice"),
        (lambda r: (r[0], dataclasses.replace(r[1], quality=3)), r"must be 1..2, got \[1, 3\]"),
        (lambda r: (r[0], dataclasses.replace(r[1], nominal_bpp=0.4)), "quality 2 .* must make"),
        (lambda r: (dataclasses.replace(r[0], nominal_bpp=0.0), r[1]), "has nominal_bpp 0.0"),
        (
            lambda r: (dataclasses.replace(r[1], quality=1),),
            "default preset 'small' is not one of big",
        ),
    ],
)
def test_broken_registry_is_refused(registry, monkeypatch, change, message):
    monkeypatch.setattr(presets, "PRESETS", change(registry))
    with pytest.raises(RuntimeError, match=message):
        presets.registry()


def test_lookups(registry):
    assert presets.names() == ("small", "big") and presets.qualities() == (1, 2)
    assert presets.get("big") is registry[1] and presets.by_quality(1) is registry[0]
    assert presets.find("nope") is None
    listing = "small (quality 1, ~0.5 bpp), big (quality 2, ~1 bpp)"
    with pytest.raises(ValueError, match=re.escape(f"no preset named 'nope'; presets: {listing}")):
        presets.get("nope")
    with pytest.raises(ValueError) as exc:
        presets.by_quality(3)
    assert str(exc.value) == f"no preset of quality 3; available qualities: {listing}"


# ---------------------------------------------------------------------------------- models API
def test_load_model_takes_preset_names(registry, model_files, tmp_path, monkeypatch):
    assert load_model("big").config.num_subspaces == 4
    assert load_model("small").model_id() == load_model(str(model_files["small"])).model_id()
    with pytest.raises(FileNotFoundError) as exc:
        load_model("nope")
    assert (
        str(exc.value) == "load_model: no model file at nope; nor is 'nope' a preset (small, big)"
    )
    with pytest.raises(FileNotFoundError, match="^load_model: no model file at .*/x.pt$"):
        load_model(str(tmp_path / "x.pt"))
    gone = (registry[0], dataclasses.replace(registry[1], file=str(tmp_path / "gone.pt")))
    monkeypatch.setattr(presets, "PRESETS", gone)
    with pytest.raises(FileNotFoundError, match=r"no model file at .*gone.pt \(preset big\)$"):
        load_model("big")


def test_no_model_means_the_default_preset_and_the_file_names_its_model(registry, image):
    small, big = load_model("small"), load_model("big")
    data = compress_image(image)
    assert pqm_format.unpack(data)[0].model_id == small.model_id()
    assert np.array_equal(decompress_image(data), decompress_image(data, small))
    data = compress_image(image, big)
    assert model_for_file(data)[1].name == "big"  # found by the model id in the header
    assert np.array_equal(decompress_image(data), decompress_image(data, big))
    other = load_model(str(registry[0].path).replace("small", "other"))
    with pytest.raises(ValueError) as exc:
        decompress_image(compress_image(image, other))
    assert str(exc.value) == (
        f"this .pqm file was made by model {other.model_id().hex()}, which is none of the "
        f"presets (small {small.model_id().hex()}, big {big.model_id().hex()}); give the model "
        "file it was made with"
    )


def _sizes(model, image):
    x = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    sizes = [len(model.compress(x, stages=s)) for s in range(1, model.config.stages + 1)]
    assert sizes == sorted(sizes)  # what the binary search relies on
    return sizes


def _oracle(sizes: dict, budget: int):
    """The documented rule by brute force: the highest quality whose complete file fits, else
    the partial file coding the most tokens (ties: higher quality). -> (preset, stages)."""
    complete = [q for q in sizes if sizes[q][-1] <= budget]
    if complete:
        return max(complete), len(sizes[max(complete)])
    best = None
    for q in sorted(sizes, reverse=True):
        fits = [s for s, n in enumerate(sizes[q], 1) if n <= budget]
        if fits:
            coded = int(stage_bounds(TOKENS, len(sizes[q]))[max(fits)])
            if best is None or coded > best[0]:
                best = (coded, q, max(fits))
    return None if best is None else best[1:]


def test_max_bytes_search_over_presets_and_stages(registry, image):
    models = {1: load_model("small"), 2: load_model("big")}
    sizes = {q: _sizes(m, image) for q, m in models.items()}
    assert sizes[1][-1] < sizes[2][-1]  # quality 2 makes the larger complete file
    budgets = sorted({n + d for q in sizes for n in sizes[q] for d in (-1, 0)})
    picked = set()
    for budget in budgets:
        want = _oracle(sizes, budget)
        if want is None:
            with pytest.raises(ValueError) as exc:
                compress_to_fit(image, budget, downscale=False)
            assert str(exc.value) == (
                f"nothing fits in max_bytes={budget}: the smallest file, one coding stage of "
                f"preset {registry[0].label()}, is {sizes[1][0]} bytes"
            )
            continue
        fit = compress_to_fit(image, budget, downscale=False)
        assert (fit.preset.quality, fit.stages_sent) == want, budget
        assert len(fit.data) == sizes[want[0]][want[1] - 1] <= budget
        assert pqm_format.unpack(fit.data)[0].model_id == models[want[0]].model_id()
        assert fit.model.model_id() == models[want[0]].model_id()
        # model=None searches too
        assert compress_image(image, max_bytes=budget, downscale=False) == fit.data
        picked.add((want[0], want[1] == 6))
    # the budgets reach every case: both complete files and partial files
    assert {(1, True), (2, True), (1, False)} <= picked
    # a budget between the two complete files: the smaller model's complete file, not a part
    # of the bigger one
    assert _oracle(sizes, sizes[2][-1] - 1) == (1, 6)
    # one preset only (what --quality 2 --max-bytes B searches)
    fit = compress_to_fit(image, sizes[2][2], [registry[1]], downscale=False)
    assert (fit.preset.name, fit.stages_sent) == ("big", 3)
    with pytest.raises(ValueError, match="max_bytes must be a positive int, got 0"):
        compress_to_fit(image, 0)


# ---------------------------------------------------------------------------------- CLI
def test_cli_quality_and_automatic_decompress(registry, photo, capsys):
    out = photo.with_suffix(".pqm")
    assert main(["compress", str(photo), "--quality", "2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", quality 2 (preset big)")
    assert pqm_format.unpack(out.read_bytes())[0].model_id == load_model("big").model_id()
    assert main(["decompress", str(out), "--original", str(photo)]) == 0  # no --model: big
    assert "photo.decoded.png (160x128)" in capsys.readouterr().out
    assert main(["compress", str(photo), "-f"]) == 0  # neither: the default preset
    assert capsys.readouterr().out.rstrip().endswith(", quality 1 (preset small)")
    assert main(["compress", str(photo), "-f", "--model", "big", "--stages", "2"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("(2 of 6 stages)")  # a name, not a path
    assert main(["decompress", str(out), "-f", "--model", "small"]) == 1
    assert "was made by model" in capsys.readouterr().err


def test_cli_quality_errors(registry, photo, model_files, capsys):
    assert main(["compress", str(photo), "--quality", "3"]) == 1
    assert capsys.readouterr().err == (
        "pqmim compress: error: no preset of quality 3; available qualities: small (quality 1, "
        "~0.5 bpp), big (quality 2, ~1 bpp)\n"
    )
    assert main(["compress", str(photo), "--quality", "1", "--model", "big"]) == 1
    assert capsys.readouterr().err == "pqmim compress: error: give --model or --quality, not both\n"
    assert main(["compress", str(photo), "--quality", "1", "--stages", "7"]) == 1
    assert "--stages 7: the model codes 6 stages" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", str(photo), "--quality", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_cli_max_bytes_searches_presets(registry, photo, image, capsys):
    sizes = {q: _sizes(load_model(n), image) for q, n in ((1, "small"), (2, "big"))}
    out = photo.with_suffix(".pqm")
    base = ["compress", str(photo), "-f", "--no-downscale", "--max-bytes"]
    assert main([*base, str(sizes[2][-1] - 1)]) == 0  # big does not fit whole: small does
    captured = capsys.readouterr()
    assert out.stat().st_size == sizes[1][-1] and captured.err == ""
    assert captured.out.rstrip().endswith(", quality 1 (preset small)")
    assert main([*base, str(sizes[1][3])]) == 0  # nothing complete: small, 4 of 6 stages
    captured = capsys.readouterr()
    assert out.stat().st_size == sizes[1][3]
    assert "(4 of 6 stages), quality 1 (preset small)" in captured.out
    assert "holds only 4 of 6 coding stages" in captured.err
    assert main([*base, str(sizes[2][2]), "--quality", "2"]) == 0  # big only
    assert "(3 of 6 stages), quality 2 (preset big)" in capsys.readouterr().out
    tight = sizes[1][0] - 1
    if tight >= 12:  # over the header: the search runs and finds nothing
        assert main([*base, str(tight)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"pqmim compress: error: nothing fits in max_bytes={tight}: ")
        assert err.count("\n") == 1
    assert main([*base, "11"]) == 1  # below the 12-byte header of a 160x128 file
    assert "below the smallest possible .pqm file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- eval
def test_eval_sweeps_presets(registry, photo, tmp_path):
    codecs, _, skipped = build_codecs(["pqmim"], log=lambda m: None)
    assert skipped == {} and codecs[0].settings == ("small", "big")  # every preset, by quality
    codecs, _, _ = build_codecs(["jpeg", "pqmim@big"], log=lambda m: None)
    assert [c.name for c in codecs] == ["jpeg", "pqmim"] and codecs[1].settings == ("big",)
    codecs, _, _ = build_codecs(["pqmim"], pqmim_stages=[2, 6], log=lambda m: None)
    assert codecs[0].settings == ("small@2", "small@6", "big@2", "big@6")
    result = runner.evaluate(photo.parent, ["pqmim"], progress=False, log=lambda m: None)
    pq = result["codecs"]["pqmim"]
    assert [p["setting"] for p in pq["points"]] == ["small", "big"]  # sorted by bpp
    assert pq["points"][0]["bpp"] < pq["points"][1]["bpp"]
    assert pq["params"]["model big"]["preset_quality"] == 2
    assert pq["params"]["model big"]["model_id"] == load_model("big").model_id().hex()


def test_eval_preset_entry_errors(registry, photo, tmp_path, capsys):
    assert group_pqmim(["jpeg", "pqmim@big", "webp", "pqmim@small"]) == (
        ["jpeg", "pqmim", "webp"],
        ["big", "small"],
    )
    with pytest.raises(ValueError) as exc:
        group_pqmim(["pqmim", "pqmim@big"])
    assert str(exc.value) == (
        "--codecs: 'pqmim' already sweeps every preset; drop it or the pqmim@big"
    )
    with pytest.raises(ValueError, match="give pqmim@NAME entries in --codecs or --pqmim-models"):
        build_codecs(["pqmim@big"], pqmim_models=["m.pt"])
    argv = ["eval", str(photo.parent), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--codecs", "jpeg,pqmim@hq"]) == 1
    assert capsys.readouterr().err == (
        "pqmim eval: error: --codecs: pqmim@hq: no preset named 'hq' (presets: small, big); "
        "model files go in --pqmim-models\n"
    )
    assert not (tmp_path / "o").exists()


def test_a_retired_model_still_decodes_its_files_but_no_longer_compresses(
    registry, model_files, image, monkeypatch
):
    """Retiring a model (moving it to RETIRED) keeps every file it wrote decodable."""
    old = load_model(str(model_files["other"]))
    data = compress_image(image, old)
    monkeypatch.setattr(presets, "RETIRED", (Preset("other", str(model_files["other"]), 0,
                                                    "tiny, retired", 0.5),))  # fmt: skip
    assert presets.names() == ("small", "big")  # not offered for compressing
    assert [p.name for p in presets.every()] == ["small", "big", "other"]
    assert "retired: decodes only" in presets.get("other").label()
    got, preset = model_for_file(data)
    assert preset.name == "other" and got.model_id() == old.model_id()
    assert np.array_equal(decompress_image(data), decompress_image(data, old))
    assert load_model("other").model_id() == old.model_id()
    with pytest.raises(ValueError, match="no preset of quality 0"):
        presets.by_quality(0)
    monkeypatch.setattr(presets, "RETIRED", (Preset("big", "x.pt", 0, "clash", 0.5),))
    with pytest.raises(RuntimeError, match="retired name 'big' is malformed or used"):
        presets.registry()
    monkeypatch.setattr(presets, "RETIRED", (Preset("old", "x.pt", 2, "bad", 0.5),))
    with pytest.raises(RuntimeError, match="retired 'old' must have quality 0"):
        presets.registry()


def test_load_model_without_a_name_loads_the_default_preset(registry):
    assert load_model().model_id() == load_model("small").model_id()

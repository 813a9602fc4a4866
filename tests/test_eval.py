"""The evaluation harness: codec adapters, runner, outputs and the ``pqmim eval`` CLI."""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.evaluation import runner
from pqmim_kernels.evaluation.codecs import (
    CODEC_NAMES,
    CodecUnavailable,
    PQMIMCodec,
    make_codec,
)
from pqmim_kernels.evaluation.metrics import psnr
from pqmim_kernels.evaluation.reference import reference_curve, reference_names


def _image(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = 120 + 70 * np.sin(xx / 9.0 + seed)[..., None] * np.cos(yy / 13.0)[..., None]
    img = img + np.array([10.0, 0.0, -15.0]) + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def image_dir(tmp_path):
    """Three tiny images (MS-SSIM needs both sides >= 161) plus a non-image file to ignore."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i, (h, w) in enumerate([(168, 176), (176, 168), (161, 200)]):
        Image.fromarray(_image(h, w, i)).save(d / f"im{i}.png")
    (d / "README.txt").write_text("not an image")
    return d


class FakePQMIM:
    """Stands in for pqmim_kernels.models: a lossy codec with a 'model' = quantisation step."""

    def __init__(self):
        self.loaded = []

    def load_model(self, name_or_path, device="cpu"):
        if name_or_path not in ("coarse", "fine", "default"):
            raise FileNotFoundError(f"no model {name_or_path}")
        self.loaded.append(name_or_path)
        return {"coarse": 64, "fine": 8, "default": 16}[name_or_path]

    def compress_image(self, img, model=None):
        q = (img // model).astype(np.uint8)
        return struct.pack("<HHB", img.shape[0], img.shape[1], model) + zlib.compress(q.tobytes())

    def decompress_image(self, data, model=None):
        h, w, step = struct.unpack("<HHB", data[:5])
        assert step == model, "decoded with a different model than encoded"
        q = np.frombuffer(zlib.decompress(data[5:]), np.uint8).reshape(h, w, 3)
        return (q.astype(np.int32) * step + step // 2).clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ codecs
@pytest.mark.parametrize("name", ["jpeg", "jpeg444", "webp", "avif", "jxl", "heic"])
def test_classical_codec_round_trip(name):
    codec = make_codec(name)
    try:
        codec.check_available()
    except CodecUnavailable as exc:
        pytest.skip(str(exc))
    img = _image(40, 56, 7)
    low, high = codec.settings[0], codec.settings[-1]
    data_low, data_high = codec.encode(img, low), codec.encode(img, high)
    assert isinstance(data_low, bytes) and len(data_low) < len(data_high)
    rec = codec.decode(data_high, high)
    assert rec.shape == img.shape and rec.dtype == np.uint8
    assert psnr(img, rec) > psnr(img, codec.decode(data_low, low)) > 15
    assert codec.versions() and codec.describe()["settings"] == list(codec.settings)


def test_jpeg_subsampling_is_applied():
    img = _image(64, 64, 1)
    j420, j444 = make_codec("jpeg"), make_codec("jpeg444")
    assert len(j444.encode(img, 50)) > len(j420.encode(img, 50))
    with Image.open(io.BytesIO(j420.encode(img, 50))) as im:
        assert im.format == "JPEG"


def test_codec_setting_errors():
    with pytest.raises(ValueError, match="unknown codec 'bpg'; choose from pqmim, jpeg"):
        make_codec("bpg")
    with pytest.raises(ValueError, match=r"codec 'jpeg': quality 0 is outside \[1, 100\]"):
        make_codec("jpeg", [0, 50])
    with pytest.raises(ValueError, match="codec 'webp': quality must be an integer, got 2.5"):
        make_codec("webp", [2.5])
    with pytest.raises(ValueError, match=r"codec 'jxl': distance 30 is outside \[0.1, 25\]"):
        make_codec("jxl", [30])
    with pytest.raises(ValueError, match="codec 'avif': the settings sweep is empty"):
        make_codec("avif", [])
    with pytest.raises(ValueError, match="codec 'pqmim': a setting must be a model name or path"):
        make_codec("pqmim", [3])


def test_missing_library_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecodecs", None)  # import fails with ImportError
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    messages = []
    codecs, refs, skipped = runner.build_codecs(
        ["jpeg", "avif", "jxl", "heic", "ref:vtm"], log=messages.append
    )
    assert [c.name for c in codecs] == ["jpeg"] and [r["name"] for r in refs] == ["ref:vtm"]
    assert set(skipped) == {"avif", "jxl", "heic"}
    assert "imagecodecs is not installed" in skipped["avif"]
    assert "pillow-heif is not installed" in skipped["heic"]
    assert messages[0].startswith("skipping avif: imagecodecs is not installed")


def test_pqmim_adapter_with_injected_api():
    api = FakePQMIM()
    codec = PQMIMCodec(["coarse", "fine"], api=api)
    codec.check_available()
    img = _image(32, 48, 3)
    coarse = codec.encode(img, "coarse")
    fine = codec.encode(img, "fine")
    assert len(coarse) < len(fine)
    assert psnr(img, codec.decode(fine, "fine")) > psnr(img, codec.decode(coarse, "coarse"))
    assert api.loaded == ["coarse", "fine"]  # models are loaded once and cached


def test_pqmim_adapter_unavailable_paths():
    class Partial:
        def load_model(self, name, device="cpu"):
            return None

    with pytest.raises(CodecUnavailable, match="does not provide compress_image, decompress_image"):
        PQMIMCodec(api=Partial()).check_available()
    with pytest.raises(CodecUnavailable, match="cannot load model 'nope.pt': no model nope.pt"):
        PQMIMCodec(["nope.pt"], api=FakePQMIM()).check_available()


def test_reference_curves_are_the_published_table():
    assert set(reference_names()) == {"jpeg-published", "balle2018", "minnen2018", "bpg", "vtm"}
    vtm = reference_curve("vtm")
    assert vtm["published"] and vtm["bpp"][0] == 0.048 and vtm["psnr"][-1] == 34.26
    with pytest.raises(ValueError, match="unknown reference curve 'hific'; choose from ref:"):
        reference_curve("hific")


# ------------------------------------------------------------------------------ runner
def test_list_and_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images directory not found"):
        runner.list_images(tmp_path / "missing")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="no images found in .* \\(looked for .png"):
        runner.list_images(tmp_path)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    assert runner.list_images(tmp_path) == [bad]
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        runner.load_rgb(bad)
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        runner.list_images(tmp_path, limit=0)


def test_argument_parsers():
    assert runner.parse_codec_list("jpeg, webp,ref:vtm") == ["jpeg", "webp", "ref:vtm"]
    with pytest.raises(ValueError, match="--codecs: empty entry"):
        runner.parse_codec_list("jpeg,,webp")
    with pytest.raises(ValueError, match="--codecs: duplicate entries jpeg"):
        runner.parse_codec_list("jpeg,webp,jpeg")
    assert runner.parse_qualities(["jpeg=10,20", "jxl=1.5,3"]) == {
        "jpeg": [10, 20],
        "jxl": [1.5, 3.0],
    }
    with pytest.raises(ValueError, match="--qualities: expected CODEC=V1,V2,..., got 'jpeg'"):
        runner.parse_qualities(["jpeg"])
    with pytest.raises(ValueError, match="--qualities: 'x' in 'jpeg=10,x' is not a number"):
        runner.parse_qualities(["jpeg=10,x"])
    with pytest.raises(ValueError, match="--qualities given for codecs not in --codecs: webp"):
        runner.build_codecs(["jpeg"], {"webp": [10]})
    with pytest.raises(ValueError, match="PQ-MIM rate points are models: use --pqmim-models"):
        runner.build_codecs(["pqmim"], {"pqmim": [1]})


def test_evaluate_with_fake_pqmim(image_dir):
    result = runner.evaluate(
        image_dir,
        ["jpeg", "pqmim"],
        qualities={"jpeg": [5, 20, 50, 90]},
        pqmim_models=["coarse", "default", "fine"],
        pqmim_api=FakePQMIM(),
        progress=False,
        log=lambda msg: None,
    )
    assert result["n_images"] == 3 and result["images"] == ["im0.png", "im1.png", "im2.png"]
    pq = result["codecs"]["pqmim"]
    assert [p["setting"] for p in pq["points"]] == ["coarse", "default", "fine"]  # sorted by bpp
    recs = [r for r in result["per_image"] if r["codec"] == "pqmim" and r["setting"] == "fine"]
    # Mean of per-image values, as papers average; bpp counts every byte of the file.
    assert pq["points"][2]["bpp"] == pytest.approx(np.mean([r["bpp"] for r in recs]))
    img0 = np.asarray(Image.open(image_dir / "im0.png"))
    data = FakePQMIM().compress_image(img0, model=8)
    assert recs[0]["bytes"] == len(data) and recs[0]["bpp"] == 8 * len(data) / (168 * 176)
    assert all(r["ms_ssim"] is not None and 0 < r["ms_ssim"] <= 1 for r in result["per_image"])
    bd = result["bd"]["pqmim"]
    assert set(bd) >= {"bd_rate_pct", "bd_psnr_db", "bd_rate_msssim_pct"}


def test_summary_handles_missing_anchor_and_non_overlap(image_dir):
    result = runner.evaluate(
        image_dir,
        ["webp", "ref:vtm"],
        qualities={"webp": [10, 60]},
        anchor="jpeg",
        progress=False,
        log=lambda m: None,
        limit=1,
    )
    assert result["bd"] == {} and "anchor 'jpeg' was not evaluated" in result["bd_note"]
    assert result["jpeg_check"] is None
    result = runner.evaluate(
        image_dir,
        ["jpeg", "ref:vtm"],
        qualities={"jpeg": [90, 95]},
        progress=False,
        log=lambda m: None,
        limit=1,
    )
    # High-quality JPEG only (several bpp) shares no rate range with VTM (<= 0.49 bpp): the
    # BD-PSNR is reported as missing with the reason, not extrapolated.
    entry = result["bd"]["ref:vtm"]
    assert entry["bd_psnr_db"] is None
    assert any(
        n.startswith("bd_psnr_db: bd_psnr: the curves do not overlap") for n in entry["notes"]
    )


def test_bd_method_choice(image_dir):
    kw = dict(qualities={"jpeg": [10, 30, 60, 90], "webp": [10, 30, 60, 90]}, progress=False)
    cubic = runner.evaluate(image_dir, ["jpeg", "webp"], bd_method="cubic", limit=1, **kw)
    pchip = runner.evaluate(image_dir, ["jpeg", "webp"], limit=1, **kw)
    assert cubic["bd_method"] == "cubic" and pchip["bd_method"] == "pchip"
    # Same data, two interpolants: close but not identical numbers.
    a, b = cubic["bd"]["webp"]["bd_rate_pct"], pchip["bd"]["webp"]["bd_rate_pct"]
    assert a != b and abs(a - b) < 10
    with pytest.raises(ValueError, match="unknown BD method 'spline'; choose from pchip, cubic"):
        runner.evaluate(image_dir, ["jpeg"], bd_method="spline", progress=False)


def test_decoder_shape_mismatch_is_an_error(image_dir):
    class Cropping(FakePQMIM):
        def decompress_image(self, data, model=None):
            return super().decompress_image(data, model)[:-1]

    codec = PQMIMCodec(["fine"], api=Cropping())
    with pytest.raises(RuntimeError, match=r"pqmim at model=fine decoded im0.png to shape"):
        runner.evaluate_image(image_dir / "im0.png", codec)


def test_jpeg_consistency_check_logic():
    pub = reference_curve("jpeg-published")
    same = {"bpp": pub["bpp"], "psnr": pub["psnr"]}
    chk = runner.jpeg_consistency(same, pub)
    assert chk["consistent"] and chk["max_abs_diff_db"] == pytest.approx(0.0, abs=1e-12)
    worse = {"bpp": pub["bpp"][1:], "psnr": [p - 0.5 for p in pub["psnr"][1:]]}
    chk = runner.jpeg_consistency(worse, pub)
    assert not chk["consistent"] and chk["max_abs_diff_db"] == pytest.approx(0.5)
    assert chk["points"][0]["our_psnr"] is None  # 0.221 bpp lies outside our curve


# ------------------------------------------------------------------------------ CLI
def test_cli_end_to_end(image_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "eval",
            str(image_dir),
            "--codecs",
            "jpeg,jpeg444,webp,ref:vtm,ref:jpeg-published",
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
            "--qualities",
            "jpeg=5,15,40,80",
            "--qualities",
            "jpeg444=5,15,40,80",
            "--qualities",
            "webp=5,30,70",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "BD against jpeg (pchip):" in printed and "JPEG 4:4:4 (Pillow)" in printed
    result = json.loads((out / "results.json").read_text())
    assert result["n_images"] == 3 and result["skipped"] == {}
    assert result["codecs"]["jpeg"]["versions"]["pillow"]
    assert result["machine"]["cpu_count"] >= 1
    assert result["references"]["ref:vtm"]["published"] is True
    assert result["bd"]["jpeg444"]["bd_rate_pct"] is not None
    # bpp is 8 * bytes of the file Pillow writes at that setting
    img = np.asarray(Image.open(image_dir / "im1.png"))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=15, subsampling=2)
    rec = next(
        r
        for r in result["per_image"]
        if r["codec"] == "jpeg" and r["setting"] == 15 and r["image"] == "im1.png"
    )
    assert rec["bytes"] == len(buf.getvalue())
    md = (out / "results.md").read_text()
    assert "## BD metrics against `jpeg`" in md and "published numbers" in md
    with Image.open(out / "rd.png") as im:
        assert im.size[0] > 800


def test_cli_skips_missing_codec(image_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "imagecodecs", None)
    rc = main(
        [
            "eval",
            str(image_dir),
            "--codecs",
            "jpeg,avif",
            "--out",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--no-progress",
            "--no-plot",
            "--limit",
            "1",
            "--qualities",
            "jpeg=10,50",
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    assert "pqmim eval: skipping avif: imagecodecs is not installed" in err
    result = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(result["codecs"]) == ["jpeg"] and "avif" in result["skipped"]
    rc = main(
        ["eval", str(image_dir), "--codecs", "avif", "--out", str(tmp_path / "o2"), "--no-progress"]
    )
    assert rc == 1
    assert "none of the requested codecs can run here" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv_extra", "message"),
    [
        (["--codecs", "jpeg,png"], "unknown codec 'png'"),
        (["--codecs", "ref:hific"], "unknown reference curve 'hific'"),
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--pqmim-models", "a.pt,"], "--pqmim-models: empty entry"),
    ],
)
def test_cli_argument_errors(image_dir, tmp_path, capsys, argv_extra, message):
    rc = main(["eval", str(image_dir), "--out", str(tmp_path / "o"), "--no-progress", *argv_extra])
    assert rc == 1
    assert message in capsys.readouterr().err


def test_cli_empty_dir_and_unreadable_image(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--codecs", "jpeg", "--out", str(tmp_path / "o")]) == 1
    assert "pqmim eval: error: no images found in" in capsys.readouterr().err
    (empty / "a.png").write_bytes(b"garbage")
    assert main(["eval", str(empty), "--codecs", "jpeg", "--out", str(tmp_path / "o")]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "--codecs", "jpeg", "--out", "x"]) == 1
    assert "images directory not found" in capsys.readouterr().err


def test_codec_names_are_all_buildable():
    for name in CODEC_NAMES:
        assert make_codec(name).name == name


def test_merge_adds_codecs_to_an_earlier_run(image_dir, tmp_path):
    first = runner.evaluate(
        image_dir,
        ["jpeg", "webp"],
        qualities={"jpeg": [10, 40, 80], "webp": [10, 60]},
        progress=False,
    )
    runner.write_outputs(first, tmp_path / "a", plot=False)
    prev = tmp_path / "a" / "results.json"
    merged = runner.evaluate(
        image_dir,
        ["pqmim", "webp"],
        pqmim_models=["coarse", "fine"],
        pqmim_api=FakePQMIM(),
        qualities={"webp": [20, 70]},
        progress=False,
        merge=prev,
    )
    assert list(merged["codecs"]) == ["jpeg", "pqmim", "webp"]  # kept, then this run
    # jpeg comes unchanged from the earlier file, webp is the new sweep
    assert merged["codecs"]["jpeg"]["points"] == first["codecs"]["jpeg"]["points"]
    assert merged["codecs"]["webp"]["settings"] == [20, 70]
    assert merged["merged_from"]["codecs"] == ["jpeg"]
    # BD of the new curves against the merged anchor
    assert merged["bd"]["webp"]["bd_rate_pct"] is not None and "pqmim" in merged["bd"]
    assert "Curves of jpeg come from" in runner.markdown_report(merged)
    with pytest.raises(ValueError, match="--merge: .* was measured on other images"):
        runner.evaluate(image_dir, ["webp"], progress=False, merge=prev, limit=2)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a results.json written by pqmim eval"):
        runner.evaluate(image_dir, ["webp"], progress=False, merge=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="--merge: cannot read"):
        runner.evaluate(image_dir, ["webp"], progress=False, merge=tmp_path / "none.json")


# ------------------------------------------------------------------------------ real PQ-MIM
TINY_MODEL = Path(__file__).resolve().parent / "golden" / "tiny_model.pt"


def test_pqmim_stage_settings():
    from pqmim_kernels.evaluation.codecs import split_setting, stage_settings

    assert split_setting("m.pt") == ("m.pt", None)
    assert split_setting("runs/a@b/m.pt@4") == ("runs/a@b/m.pt", 4)
    assert split_setting("user@host.pt") == ("user@host.pt", None)
    with pytest.raises(ValueError, match=r"stages in 'm.pt@0' must be >= 1"):
        split_setting("m.pt@0")
    assert stage_settings(["a", "b"], [2, 6]) == ["a@2", "a@6", "b@2", "b@6"]
    with pytest.raises(ValueError, match="--pqmim-stages: stage counts must be integers >= 1"):
        stage_settings(["a"], [0])
    codec = PQMIMCodec([f"{TINY_MODEL}@7"])
    with pytest.raises(CodecUnavailable, match="asks for 7 stages; the model codes 6"):
        codec.check_available()


def test_model_loading_happens_before_the_timed_calls(image_dir):
    """The first setting's encode time must not include loading the model."""
    events = []

    class Recording(FakePQMIM):
        def load_model(self, name_or_path, device="cpu"):
            events.append("load")
            return super().load_model(name_or_path, device)

        def compress_image(self, img, model=None):
            events.append("compress")
            return super().compress_image(img, model)

    codec = PQMIMCodec(["coarse", "fine"], api=Recording())
    records = runner.evaluate_image(image_dir / "im0.png", codec)
    assert [r["setting"] for r in records] == ["coarse", "fine"]
    # two loads, each followed by one untimed warm-up call, then the two timed encodes
    assert events == ["load", "compress", "load", "compress", "compress", "compress"]


def test_cli_merge_adds_real_pqmim_stage_sweep(image_dir, tmp_path, capsys):
    """The lead's workflow: classical codecs first, then PQ-MIM merged into the same folder,
    with a real (tiny) model, a stage sweep and two worker processes."""
    from pqmim_kernels.models import compress_image, decompress_image, load_model

    out = tmp_path / "kodak"
    base = ["eval", str(image_dir), "--out", str(out), "--no-progress"]
    classical = ["--codecs", "jpeg,ref:vtm", "--qualities", "jpeg=10,50,90", "--no-plot"]
    assert main([*base, *classical]) == 0
    first = json.loads((out / "results.json").read_text())
    capsys.readouterr()
    rc = main(
        [
            *base, "--codecs", "pqmim", "--pqmim-models", str(TINY_MODEL),
            "--pqmim-stages", "2,6", "--merge", str(out / "results.json"), "--workers", "2",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "PQ-MIM (ours)" in capsys.readouterr().out
    result = json.loads((out / "results.json").read_text())
    assert list(result["codecs"]) == ["jpeg", "pqmim"]
    assert list(result["references"]) == ["ref:vtm"]  # published curves of the first run stay
    assert result["codecs"]["jpeg"]["points"] == first["codecs"]["jpeg"]["points"]
    pq = result["codecs"]["pqmim"]
    assert [p["setting"] for p in pq["points"]] == [f"{TINY_MODEL}@2", f"{TINY_MODEL}@6"]
    assert pq["points"][0]["bpp"] < pq["points"][1]["bpp"]
    # whole-file bpp and PSNR of the real codec, recomputed here
    model = load_model(str(TINY_MODEL))
    img = np.asarray(Image.open(image_dir / "im2.png"))
    data = compress_image(img, model)
    rec = next(
        r
        for r in result["per_image"]
        if r["codec"] == "pqmim" and r["image"] == "im2.png" and r["setting"].endswith("@6")
    )
    assert rec["bytes"] == len(data) and rec["bpp"] == 8 * len(data) / (161 * 200)
    assert rec["psnr"] == pytest.approx(psnr(img, decompress_image(data, model)), abs=1e-9)
    assert "bd_rate_pct" in result["bd"]["pqmim"]
    info = pq["params"][f"model {TINY_MODEL}"]
    assert info["model_id"] == model.model_id().hex() and info["stages"] == 6
    assert pq["params"]["device"] == "cpu"
    md = (out / "results.md").read_text()
    assert "Curves of jpeg come from" in md
    assert f"model {TINY_MODEL} (model_id {model.model_id().hex()}, num_subspaces 2," in md
    if result["bd"]["pqmim"]["bd_rate_pct"] is None:  # the markdown says why the cell is empty
        assert "- PQ-MIM (ours): bd_rate_pct: " in md
    assert (out / "rd.png").is_file()
    assert main([*base, "--codecs", "pqmim", "--pqmim-stages", "2,x"]) == 1
    assert "--pqmim-stages: expected comma-separated integers, got '2,x'" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main([*base, "--codecs", "pqmim", "--device", "cuda"]) == 1
        assert "--device cuda: CUDA is not available here" in capsys.readouterr().err


def test_pqmim_setting_grammar_with_lambdas():
    from pqmim_kernels.evaluation.codecs import lambda_settings, parse_setting

    assert parse_setting("m.pt") == ("m.pt", None, None)
    assert parse_setting("m.pt~0.002") == ("m.pt", None, 0.002)
    assert parse_setting("m.pt@4~0.01") == ("m.pt", 4, 0.01)
    assert parse_setting("m.pt~0.01@4") == ("m.pt", 4, 0.01)
    assert parse_setting("runs/a~b/m.pt") == ("runs/a~b/m.pt", None, None)
    for bad in ("m.pt~-1", "m.pt~nan", "m.pt~inf"):
        with pytest.raises(ValueError, match="rate lambda in .* must be a finite number >= 0"):
            parse_setting(bad)
    assert lambda_settings(["a", "b@3"], [0, 0.002]) == ["a", "a~0.002", "b@3", "b@3~0.002"]
    with pytest.raises(ValueError, match="--pqmim-lambdas: lambdas must be finite numbers >= 0"):
        lambda_settings(["a"], [-1.0])


def test_pareto_front():
    from pqmim_kernels.evaluation.summary import pareto_front

    # a point beaten by a cheaper one goes; at equal rate the better one stays
    assert pareto_front([0.1, 0.2, 0.15, 0.3, 0.3], [20, 19, 21, 22, 23]) == (
        [0.1, 0.15, 0.3],
        [20, 21, 23],
    )
    assert pareto_front([0.3, 0.1, 0.2], [3, 1, 2]) == ([0.1, 0.2, 0.3], [1, 2, 3])
    assert pareto_front([], []) == ([], [])


def test_cli_pqmim_lambda_sweep(image_dir, tmp_path, capsys):
    import torch

    from pqmim_kernels.models import decompress_image, load_model

    out = tmp_path / "rd"
    base = ["eval", str(image_dir), "--out", str(out), "--no-progress", "--no-plot"]
    rc = main([*base, "--codecs", "pqmim,jpeg", "--qualities", "jpeg=10,50",
               "--pqmim-models", str(TINY_MODEL), "--pqmim-lambdas", "0,1"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    pq = result["codecs"]["pqmim"]
    assert sorted(p["setting"] for p in pq["points"]) == sorted(
        [str(TINY_MODEL), f"{TINY_MODEL}~1"]
    )
    by = {p["setting"]: p for p in pq["points"]}
    assert by[f"{TINY_MODEL}~1"]["bpp"] < by[str(TINY_MODEL)]["bpp"]
    # the lambda file is what compress --rate-lambda writes, and decodes as measured
    model = load_model(str(TINY_MODEL))
    img = np.asarray(Image.open(image_dir / "im2.png"))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    data = model.compress(x, rate_lambda=1.0)
    rec = next(r for r in result["per_image"]
               if r["setting"] == f"{TINY_MODEL}~1" and r["image"] == "im2.png")  # fmt: skip
    assert rec["bytes"] == len(data)
    assert rec["psnr"] == pytest.approx(psnr(img, decompress_image(data, model)), abs=1e-9)
    capsys.readouterr()
    assert main([*base, "--codecs", "jpeg", "--pqmim-lambdas", "0.1"]) == 1
    assert "--pqmim-lambdas: add pqmim" in capsys.readouterr().err
    assert main([*base, "--codecs", "pqmim", "--pqmim-lambdas", "0,x"]) == 1
    assert "--pqmim-lambdas: expected comma-separated numbers" in capsys.readouterr().err


def test_cli_pqmim_latent_steps(image_dir, tmp_path, capsys):
    import torch

    from pqmim_kernels.models import load_model

    out = tmp_path / "rd"
    base = ["eval", str(image_dir), "--out", str(out), "--no-progress", "--no-plot"]
    rc = main([*base, "--codecs", "pqmim", "--pqmim-models", str(TINY_MODEL),
               "--pqmim-lambdas", "0,1", "--pqmim-latent-steps", "2"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    result = json.loads((out / "results.json").read_text())
    settings = sorted(p["setting"] for p in result["codecs"]["pqmim"]["points"])
    assert settings == sorted([f"{TINY_MODEL}+2", f"{TINY_MODEL}~1+2"])
    # each file is what compress --latent-steps writes
    model = load_model(str(TINY_MODEL))
    img = np.asarray(Image.open(image_dir / "im2.png"))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float() / 255
    rec = next(r for r in result["per_image"]
               if r["setting"] == f"{TINY_MODEL}~1+2" and r["image"] == "im2.png")  # fmt: skip
    assert rec["bytes"] == len(model.compress(x, rate_lambda=1.0, latent_steps=2))
    capsys.readouterr()
    assert main([*base, "--codecs", "jpeg", "--pqmim-latent-steps", "2"]) == 1
    assert "--pqmim-latent-steps: add pqmim" in capsys.readouterr().err
    assert main([*base, "--codecs", "pqmim", "--pqmim-latent-steps", "-1"]) == 1
    assert "--pqmim-latent-steps: latent_steps must be an int in [0, 10000]" in (
        capsys.readouterr().err
    )

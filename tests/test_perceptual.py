"""The perceptual decoder (pqmim_kernels/models/perceptual.py, issue 13): same codes, same files,
same model id; a second g_s chosen at decode time."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import TINY, make_coding_ready
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import PQMIM, compress_image, decompress_image, load_model, save_model
from pqmim_kernels.models.perceptual import (
    PatchDiscriminator,
    PerceptualConfig,
    blend_decoders,
    generator_loss,
    sharpness,
    train_perceptual,
)

CFG = dataclasses.replace(TINY, mim_radius=2)


def _photos(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, 80, 96), dtype=torch.uint8, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_coding_ready(PQMIM(CFG).eval())


def test_sharpness_measures_fine_detail():
    x = torch.rand(1, 3, 64, 64)
    assert sharpness(x, x) == pytest.approx(1.0)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert sharpness(blurred, x) < 0.5


def test_patch_discriminator_shapes():
    d = PatchDiscriminator().eval()  # (train mode runs a power iteration per call)
    x = torch.rand(2, 3, 64, 96)
    assert d(x).shape == (2, 1, 4, 6)
    feats = d.features(x)
    assert len(feats) == 5 and torch.allclose(feats[-1], d(x))


def test_perceptual_decoder_reads_the_same_files(model, tmp_path):
    save_model(model, tmp_path / "m.pt")
    base = load_model(str(tmp_path / "m.pt"))  # ids are of the stored (fp16) weights
    before = base.model_id()
    x = torch.rand(1, 3, 48, 64)
    data = base.compress(x)
    dec = train_perceptual(
        base, _photos(), PerceptualConfig(steps=4, warmup=2, batch_size=2, crop=32, log_every=2),
        log=lambda s: None,
    )  # fmt: skip
    assert not any(p.requires_grad for p in dec.parameters())
    base.perceptual_decoder = dec
    assert base.model_id() == before  # not part of the state dict
    assert not any(k.startswith("perceptual") for k in base.state_dict())
    save_model(base, tmp_path / "p.pt")
    loaded = load_model(str(tmp_path / "p.pt"))
    assert loaded.model_id() == before and loaded.perceptual_decoder is not None
    mse = loaded.decompress(data)  # the file written before the fine-tuning
    perc = loaded.decompress(data, decoder="perceptual")
    assert mse.shape == perc.shape == (1, 3, 48, 64) and not torch.equal(mse, perc)


def test_perceptual_decoder_errors(model):
    data = model.compress(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="this model has no perceptual decoder"):
        model.decompress(data, decoder="perceptual")
    with pytest.raises(ValueError, match="decoder must be 'mse' or 'perceptual', got 'gan'"):
        model.decompress(data, decoder="gan")


def _synthesise(model, g, x):
    """x (B, 3, H, W) -> g applied to the dequantised codes of x (what the decoders see)."""
    with torch.no_grad():
        codes = model.encode_codes(x)
        b, h, w, m = codes.shape
        y = model.quantizer.get_output_from_indices(codes.reshape(b, h * w, m))
        return g(y.reshape(b, h, w, -1).permute(0, 3, 1, 2).float())


def test_blend_decoders_interpolates_weights(model):
    import copy

    torch.manual_seed(1)
    base = model.decoder
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.rand(1, 3, 32, 48)
    assert torch.equal(_synthesise(model, blend_decoders(base, other, 0.0), x),
                       _synthesise(model, base, x))  # fmt: skip
    assert torch.allclose(_synthesise(model, blend_decoders(base, other, 1.0), x),
                          _synthesise(model, other, x))  # fmt: skip
    half = blend_decoders(base, other, 0.5)
    assert half is not other and not half.training
    for a, b, c in zip(base.parameters(), other.parameters(), half.parameters()):
        assert torch.allclose(c, (a + b) / 2)
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\], got 1.5"):
        blend_decoders(base, other, 1.5)
    with pytest.raises(ValueError, match="different architectures"):
        blend_decoders(base, torch.nn.Conv2d(1, 1, 1), 0.5)


def test_generator_loss_terms():
    """The block-mean term charges a flat colour shift lf_weight times more than texture of
    the same MSE (a +-0.05 checkerboard, zero mean over every 8x8 block); the GAN terms only
    with a discriminator."""
    x = torch.rand(2, 3, 32, 32)
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = 0.05 * (1 - 2 * ((yy + xx) % 2)).float()
    cfg = PerceptualConfig(lf_weight=10.0)
    loss_shift, mse_shift, adv = generator_loss(x + 0.05, x, cfg)
    loss_tex, mse_tex, _ = generator_loss(x + checker, x, cfg)
    assert float(mse_shift) == pytest.approx(0.0025) and float(mse_tex) == pytest.approx(0.0025)
    assert float(loss_shift) == pytest.approx(11 * 0.0025, rel=1e-4)
    assert float(loss_tex) == pytest.approx(0.0025, rel=1e-4) and float(adv) == 0.0
    off = dataclasses.replace(cfg, lf_weight=0.0)
    assert float(generator_loss(x + 0.05, x, off)[0]) == pytest.approx(0.0025)
    d = PatchDiscriminator().eval()
    loss_d, _, adv_d = generator_loss(x + checker, x, cfg, d)
    assert float(adv_d.detach()) > 0 and float(loss_d.detach()) > float(loss_tex)


def test_finetune_perceptual_cli(model, tmp_path, capsys):
    src = tmp_path / "m.pt"
    save_model(model, src)
    data_dir = tmp_path / "photos"
    data_dir.mkdir()
    for i, p in enumerate(_photos(2, seed=1)):
        Image.fromarray(p.permute(1, 2, 0).numpy()).save(data_dir / f"{i}.png")
    out = tmp_path / "with_perceptual.pt"
    args = ["finetune-perceptual", "--model", str(src), "--data", str(data_dir), "--out", str(out)]
    assert main([*args, "--steps", "2", "--batch-size", "1", "--crop", "32"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    loaded = load_model(str(out))
    same_id = load_model(str(src)).model_id()  # ids are of the stored (fp16) weights
    assert loaded.perceptual_decoder is not None and loaded.model_id() == same_id
    assert main([*args, "--steps", "2"]) == 1  # exists: no overwrite without --force
    assert "exists" in capsys.readouterr().err
    pqm = tmp_path / "x.pqm"
    img = np.asarray(Image.open(data_dir / "0.png"))
    Image.fromarray(img).save(tmp_path / "x.png")
    assert main(["compress", str(tmp_path / "x.png"), "-o", str(pqm), "--model", str(out)]) == 0
    dec = tmp_path / "x.out.png"
    cmd = ["decompress", str(pqm), "-o", str(dec), "--model", str(out), "--decoder", "perceptual"]
    assert main(cmd) == 0
    want = decompress_image(pqm.read_bytes(), loaded, decoder="perceptual")
    assert np.array_equal(np.asarray(Image.open(dec)), want)
    # --blend 0 keeps none of the fine-tuning: the perceptual decoder decodes as the MSE one
    out0 = tmp_path / "blend0.pt"
    cmd = ["finetune-perceptual", "--model", str(src), "--data", str(data_dir), "--out", str(out0)]
    assert main([*cmd, "--steps", "2", "--batch-size", "1", "--crop", "32", "--blend", "0"]) == 0
    m0 = load_model(str(out0))
    assert np.array_equal(decompress_image(pqm.read_bytes(), m0, decoder="perceptual"),
                          decompress_image(pqm.read_bytes(), m0))  # fmt: skip
    assert main([*cmd, "--blend", "1.5", "-f"]) == 1
    assert "--blend must be in [0, 1], got 1.5" in capsys.readouterr().err


@pytest.fixture(scope="module")
def perceptual_file(model, tmp_path_factory):
    """(a model file with a perceptual decoder, the same model without one)."""
    tmp = tmp_path_factory.mktemp("perc")
    save_model(model, tmp / "m.pt")
    m = load_model(str(tmp / "m.pt"))
    cfg = PerceptualConfig(steps=2, warmup=1, batch_size=2, crop=32, log_every=1)
    m.perceptual_decoder = train_perceptual(m, _photos(), cfg, log=lambda s: None)
    save_model(m, tmp / "p.pt")
    return tmp / "p.pt", tmp / "m.pt"


def _tool(name):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "tools" / f"{name}.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _image_folder(path, n=2, shape=(176, 192, 3)):
    path.mkdir()
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 256, shape, dtype=np.uint8)).save(path / f"{i}.png")
    return path


def test_perceptual_eval_tool(perceptual_file, tmp_path):
    """tools/perceptual_eval.py: one file per stage count, decoded by both decoders (same codes,
    greedy fill) and, for partial files, sampled + perceptual; means, rows and crops written."""
    import json

    tool = _tool("perceptual_eval")
    with_p, without = perceptual_file
    imgs = _image_folder(tmp_path / "imgs")
    args = [str(imgs), "--model", str(with_p), "--stages", f"{CFG.stages},2"]
    assert tool.main([*args, "--crops", "1", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["image"], r["stages"]) for r in res["rows"]] == [
        (f"{i}.png", s) for i in range(2) for s in (CFG.stages, 2)]  # fmt: skip
    full, part = res["means"][str(CFG.stages)], res["means"]["2"]
    assert "psnr_sampled_perceptual" not in full and "psnr_sampled_perceptual" in part
    assert full["psnr_mse"] != full["psnr_perceptual"] and full["bpp"] > part["bpp"]
    assert Image.open(tmp_path / "out" / "crops.png").size == (3 * 256, 2 * 256)
    with pytest.raises(SystemExit, match="has no perceptual decoder"):
        tool.main([str(imgs), "--model", str(without), "--out", str(tmp_path / "o2")])


def test_tiny_files_tool(perceptual_file, tmp_path):
    """tools/tiny_files.py: every file within the budget, the hybrid file too, five columns
    (original, greedy, sampled + perceptual, hybrid, JPEG), means over the rows."""
    import json

    tool = _tool("tiny_files")
    with_p, _ = perceptual_file
    imgs = _image_folder(tmp_path / "imgs", shape=(96, 128, 3))
    m = load_model(str(with_p))
    x = torch.from_numpy(np.array(Image.open(imgs / "0.png"))).permute(2, 0, 1)[None] / 255.0
    full = len(m.compress(x.float()))
    budget = full // 2  # no complete full-size file fits
    args = [str(imgs), "--model", str(with_p), "--max-bytes", str(budget), "--thumb", "64",
            "--excerpt", "1"]  # fmt: skip
    assert tool.main([*args, "--hybrid-downscale", "1", "--out", str(tmp_path / "out")]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["images"] == 2 and res["perceptual_decoder"]
    for r in res["rows"]:
        assert r["bytes"] <= budget and r["hybrid_bytes"] <= budget and r["hybrid_downscale"] == 1
        assert 1 <= r["hybrid_stages_sent"] <= CFG.stages
    assert res["mean"]["bytes"] == pytest.approx(np.mean([r["bytes"] for r in res["rows"]]))
    sheet = Image.open(tmp_path / "out" / "contact_sheet.jpg")
    assert sheet.size == (5 * 64, 2 * 48)
    assert Image.open(tmp_path / "out" / "contact_sheet_excerpt.jpg").size == (5 * 64, 48)


# ------------------------------------------- perceptual decoders of another size, and variants
def _grown_with_variant(tmp_path):
    """(file, old, new): ``new`` = ``old`` with a decoder grown by (1, 0, 0) blocks and trained
    (fp16 values), stored with ``old`` as variant "v1"; both as the file stores them."""
    from pqmim_kernels.models.refine import refined_model

    save_model(make_coding_ready(PQMIM(CFG).eval()), tmp_path / "old.pt")
    old = load_model(tmp_path / "old.pt")
    new = refined_model(old, (1, 0, 0))
    with torch.no_grad():
        for p in new.decoder.parameters():
            p.copy_((p + 0.01 * torch.randn_like(p)).half().float())
    path = tmp_path / "grown.pt"
    save_model(new, path, variants={"v1": old})
    return path, load_model(path, variant="v1"), load_model(path)


def _noisy_copy(decoder, seed=5):
    import copy

    g = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(decoder)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_((p + 0.05 * torch.randn(p.shape, generator=g)).half().float())
    return out.eval()


def test_a_perceptual_decoder_of_another_size_is_stored_with_its_size(tmp_path):
    path, old, new = _grown_with_variant(tmp_path)
    new.perceptual_decoder = _noisy_copy(old.decoder)  # the smaller decoder's architecture
    assert new.perceptual_decoder.extra_blocks == (0, 0, 0) != new.config.decoder_extra_blocks
    data = new.compress(torch.rand(1, 3, 48, 64))
    want = new.decompress(data, decoder="perceptual")
    save_model(new, tmp_path / "p.pt")
    back = load_model(tmp_path / "p.pt")
    assert back.perceptual_decoder.extra_blocks == (0, 0, 0)
    assert back.model_id() == new.model_id()
    assert torch.equal(back.decompress(data, decoder="perceptual"), want)
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    assert blob["perceptual_decoder_blocks"] == [0, 0, 0]
    blob["perceptual_decoder_blocks"] = [2, 0, 0]  # damaged: not the size of its weights
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"perceptual decoder in .*bad.pt does not load.*damaged"):
        load_model(tmp_path / "bad.pt")
    blob["perceptual_decoder_blocks"] = "x"
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="does not load"):
        load_model(tmp_path / "bad.pt")


def test_files_without_the_perceptual_size_load_at_the_decoders_size(tmp_path):
    """Model files written before the size was stored (the bundled default's): the perceptual
    decoder has the MSE decoder's size."""
    _, _, new = _grown_with_variant(tmp_path)
    new.perceptual_decoder = _noisy_copy(new.decoder)
    save_model(new, tmp_path / "p.pt")
    blob = torch.load(tmp_path / "p.pt", weights_only=True)
    del blob["perceptual_decoder_blocks"]
    torch.save(blob, tmp_path / "old_style.pt")
    back = load_model(tmp_path / "old_style.pt")
    assert back.perceptual_decoder.extra_blocks == (1, 0, 0)
    x = torch.rand(1, 3, 32, 48)
    data = new.compress(x)
    assert torch.equal(
        back.decompress(data, decoder="perceptual"), new.decompress(data, decoder="perceptual")
    )


def test_variants_decode_with_the_files_perceptual_decoder(tmp_path):
    path, old, new = _grown_with_variant(tmp_path)
    img = (torch.rand(40, 56, 3) * 255).round().to(torch.uint8).numpy()
    data = compress_image(img, old)  # written by the retired model
    new.perceptual_decoder = _noisy_copy(old.decoder)
    save_model(new, path, variants={"v1": old})
    v1 = load_model(path, variant="v1")
    assert v1.model_id() == old.model_id() and v1.perceptual_decoder is not None
    got = decompress_image(data, v1, decoder="perceptual")
    same_codes = compress_image(img, load_model(path))  # the refined model's file of it
    assert np.array_equal(got, decompress_image(same_codes, load_model(path), decoder="perceptual"))
    assert not np.array_equal(got, decompress_image(data, v1))
    save_model(load_model(path), tmp_path / "again.pt", variants={"v1": v1})  # the file's own
    other = load_model(path, variant="v1")
    other.perceptual_decoder = _noisy_copy(old.decoder, seed=6)
    with pytest.raises(ValueError, match="variant 'v1' has another perceptual decoder"):
        save_model(load_model(path), tmp_path / "x.pt", variants={"v1": other})


def _photo_folder(tmp_path, n=2):
    data_dir = tmp_path / "photos"
    data_dir.mkdir()
    for i, p in enumerate(_photos(n, seed=1)):
        Image.fromarray(p.permute(1, 2, 0).numpy()).save(data_dir / f"{i}.png")
    return data_dir


def test_finetune_perceptual_keeps_the_variants_and_starts_from_one(tmp_path, capsys):
    from pqmim_kernels.models import load_variants

    path, old, new = _grown_with_variant(tmp_path)
    data_dir = _photo_folder(tmp_path)
    out = tmp_path / "perc.pt"
    args = ["finetune-perceptual", "--model", str(path), "--data", str(data_dir), "--out",
            str(out), "--steps", "2", "--batch-size", "1", "--crop", "32"]  # fmt: skip
    assert main([*args, "--from-variant", "v1", "--blend", "0"]) == 0
    m = load_model(out)
    assert m.model_id() == new.model_id() and m.perceptual_decoder.extra_blocks == (0, 0, 0)
    assert list(load_variants(out)) == ["v1"]
    v1 = load_model(out, variant="v1")
    assert v1.model_id() == old.model_id()
    codes = new.encode_codes(torch.rand(1, 3, 48, 64))
    # --blend 0: the perceptual decoder is the variant's decoder, the one it started from
    assert torch.equal(m.decode_codes(codes, decoder="perceptual"), v1.decode_codes(codes))
    assert not torch.equal(m.decode_codes(codes), v1.decode_codes(codes))
    assert "perceptual_decoder_q" not in torch.load(out, weights_only=True)
    assert main([*args, "-f", "--int8"]) == 0  # from the model's own (grown) decoder
    assert load_model(out).perceptual_decoder.extra_blocks == (1, 0, 0)
    assert "perceptual_decoder_q" in torch.load(out, weights_only=True)
    assert list(load_variants(out)) == ["v1"]
    capsys.readouterr()
    assert main([*args, "-f", "--from-variant", "v9"]) == 1
    assert "--from-variant v9: the model file holds no such variant (it holds: v1)" in (
        capsys.readouterr().err
    )


def test_load_variants(tmp_path):
    from pqmim_kernels.models import load_variants

    path, old, _ = _grown_with_variant(tmp_path)
    got = load_variants(path)
    assert list(got) == ["v1"] and got["v1"].model_id() == old.model_id()
    assert load_variants(tmp_path / "old.pt") == {}
    with pytest.raises(FileNotFoundError, match="load_variants: no model file at"):
        load_variants(tmp_path / "nope.pt")


def test_a_perceptual_decoder_stored_as_int8_rows(tmp_path):
    """Half the bytes of float16, decodes within the rounding of 8-bit weights, and saved again
    as it was loaded (the refinement commands re-save models they did not tune)."""
    from pqmim_kernels.models.refine import refined_model

    _, old, new = _grown_with_variant(tmp_path)
    new.perceptual_decoder = _noisy_copy(old.decoder)
    save_model(new, tmp_path / "f16.pt")
    save_model(new, tmp_path / "q8.pt", perceptual_int8=True)
    blob = torch.load(tmp_path / "q8.pt", weights_only=True)
    assert "perceptual_decoder" not in blob  # a release without int8 rows sees no such decoder
    q = blob["perceptual_decoder_q"]
    w = next(k for k, v in q["tensors"].items() if v.ndim == 4)
    assert q["tensors"][w].dtype == torch.int8 and q["scales"][w].shape == (
        q["tensors"][w].shape[0],
    )
    size = lambda d: sum(v.numel() * v.element_size() for v in d.values())  # noqa: E731
    f16 = torch.load(tmp_path / "f16.pt", weights_only=True)["perceptual_decoder"]
    assert size(q["tensors"]) + size(q["scales"]) < 0.6 * size(f16)
    back = load_model(tmp_path / "q8.pt")
    assert back.model_id() == new.model_id()
    x = torch.rand(1, 3, 48, 64)
    codes = new.encode_codes(x)
    want = new.decode_codes(codes, decoder="perceptual")
    got = back.decode_codes(codes, decoder="perceptual")
    err = float((got - want).abs().max())
    assert 0 < err < 0.02
    for p, r in zip(
        back.perceptual_decoder.state_dict().values(), new.perceptual_decoder.state_dict().values()
    ):
        if p.ndim >= 2:  # each weight within half a step of its row's scale
            s = r.abs().amax(dim=tuple(range(1, r.ndim)), keepdim=True) / 127
            assert bool(((p - r).abs() <= s / 2 + 1e-7).all())
    save_model(back, tmp_path / "again.pt")  # kept as int8, and the same int8 values
    again = torch.load(tmp_path / "again.pt", weights_only=True)["perceptual_decoder_q"]
    assert all(torch.equal(again["tensors"][k], q["tensors"][k]) for k in q["tensors"])
    grown = refined_model(back, (0, 1, 0))  # a decoder refinement keeps it, and how it is stored
    save_model(grown, tmp_path / "grown.pt")
    assert "perceptual_decoder_q" in torch.load(tmp_path / "grown.pt", weights_only=True)
    save_model(back, tmp_path / "f16b.pt", perceptual_int8=False)
    assert "perceptual_decoder" in torch.load(tmp_path / "f16b.pt", weights_only=True)
    del blob["perceptual_decoder_q"]["scales"]
    torch.save(blob, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="perceptual decoder in .*bad.pt does not load"):
        load_model(tmp_path / "bad.pt")


def test_perceptual_blend_tool(perceptual_file, tmp_path):
    tool = _tool("perceptual_blend")
    path, _ = perceptual_file
    data = _image_folder(tmp_path / "photos", n=10, shape=(48, 64, 3))  # photo 9 is held out
    out = tmp_path / "rows.json"
    args = ["--model", str(path), "--tuned", str(path), "--data", str(data), "--images", "3"]
    assert tool.main([*args, "--alphas", "0,1", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    mse, zero, one = got["rows"]
    assert got["images"] == 1 and mse["blend"] == "mse"
    assert zero["psnr"] == pytest.approx(mse["psnr"], abs=1e-9)  # blend 0 = the MSE decoder
    assert one["psnr"] != pytest.approx(mse["psnr"], abs=1e-6)
    assert tool.main([*args, "--alphas", "0", "--int8", "--out", str(out)]) == 0
    q = json.loads(out.read_text())["rows"][1]
    assert q["int8"] and q["psnr"] == pytest.approx(mse["psnr"], abs=0.05)
    with pytest.raises(SystemExit, match="every alpha in"):
        tool.main([*args, "--alphas", "1.5"])


def test_side_by_side_tool_with_the_perceptual_column(perceptual_file, tmp_path, monkeypatch):
    from pqmim_kernels.models import presets
    from pqmim_kernels.models.presets import Preset

    with_p, without = perceptual_file
    monkeypatch.setattr(presets, "PRESETS", (
        Preset("tiny", str(with_p), 1, "tiny, perceptual", 0.5),
        Preset("plain", str(without), 2, "tiny, none", 0.6)))  # fmt: skip
    monkeypatch.setattr(presets, "RETIRED", ())
    monkeypatch.setattr(presets, "DEFAULT_PRESET", "tiny")
    tool = _tool("side_by_side")
    images = _image_folder(tmp_path / "kodak", n=1, shape=(48, 64, 3))
    out = tmp_path / "out" / "sbs"
    args = [str(images), "--images", "0", "--crop", "32", "--out", str(out)]
    assert tool.main([*args, "--presets", "tiny", "--perceptual"]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    (row,) = meta["rows"]
    m = load_model(str(with_p))
    img = np.asarray(Image.open(images / "0.png"))
    from pqmim_kernels.evaluation.metrics import psnr

    want = psnr(img, decompress_image(compress_image(img, m), m, decoder="perceptual"))
    assert row["pqmim_perceptual_psnr"] == pytest.approx(want)
    sheet = Image.open(out.with_suffix(".png"))
    assert sheet.width == 5 * 32 + 4 * 4  # original | PQ-MIM | perceptual | JPEG | WebP
    assert tool.main([*args, "--presets", "plain"]) == 0
    assert Image.open(out.with_suffix(".png")).width == 4 * 32 + 3 * 4
    with pytest.raises(SystemExit):
        tool.main([*args, "--presets", "tiny,plain", "--perceptual"])


def test_decompress_perceptual_without_one_names_the_model(perceptual_file, tmp_path, capsys):
    _, without = perceptual_file
    img = (np.random.default_rng(1).random((32, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "x.png")
    pqm = tmp_path / "x.pqm"
    assert main(["compress", str(tmp_path / "x.png"), "-o", str(pqm), "--model", str(without)]) == 0
    capsys.readouterr()
    cmd = ["decompress", str(pqm), "--model", str(without), "--decoder", "perceptual"]
    assert main([*cmd, "-o", str(tmp_path / "y.png")]) == 1
    mid = load_model(str(without)).model_id().hex()
    err = capsys.readouterr().err
    assert f"--decoder perceptual: the model given (model {mid}) has no perceptual decoder" in err
    assert "Use --decoder mse" in err and not (tmp_path / "y.png").exists()

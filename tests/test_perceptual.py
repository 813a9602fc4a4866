"""The perceptual decoder (pqmim_kernels/models/perceptual.py, issue 13): same codes, same files,
same model id; a second g_s chosen at decode time."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import TINY, make_coding_ready
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import PQMIM, decompress_image, load_model, save_model
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

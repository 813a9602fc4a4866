"""Decoder-aware latent optimisation (``latent_steps``): encoder-side only, so every file still
decodes to exactly the codes the encoder chose; the search never decodes worse than the
encoder's own codes on what it measures, and leaves the model as it was."""

import re

import numpy as np
import pytest
import torch
from _tiny import TINY, coding_tiny, smooth_image
from PIL import Image

import pqmim_kernels.models.latent_opt as latent_opt
from pqmim_kernels.cli.main import main
from pqmim_kernels.models import (
    compress_image,
    compress_to_fit,
    decompress_image,
    load_model,
    save_model,
)
from pqmim_kernels.models.latent_opt import optimize_latent


@pytest.fixture(scope="module")
def model():
    return coding_tiny()


@pytest.fixture(scope="module")
def sharp():
    return _sharp()


def _sharp():
    """The tiny model with a decoder that every code changes a lot: a random 1x1 conv to
    16 x 16 RGB pixels per token (the untrained tiny g_s is nearly constant, so no search could
    find better codes for it)."""
    m = coding_tiny()
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(TINY.latent_dim, 3 * 256, 1)
    with torch.no_grad():
        conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=g))
        conv.bias.fill_(0.5)
    m.decoder = torch.nn.Sequential(conv, torch.nn.PixelShuffle(16))
    return m


@pytest.fixture
def lr(monkeypatch):
    """A step size for the tiny models' codebooks (the bundled models' default is smaller)."""
    monkeypatch.setattr(latent_opt, "LATENT_LR", 0.03)


_image = smooth_image


def _mse(model, x, data):
    return float(((model.decompress(data) - x) ** 2).mean())


def test_zero_steps_is_the_encoder(model):
    x = _image(40, 56, 1)
    with torch.no_grad():
        y = model.encode_latent(x)
    assert torch.equal(optimize_latent(model, x, 0), y)
    assert model.compress(x, latent_steps=0) == model.compress(x)
    assert torch.equal(model.encode_codes(x, latent_steps=0), model.encode_codes(x))
    # coding a given latent is what compress does with the encoder's latent
    assert model.compress_latent(y[0], (40, 56)) == model.compress(x)
    assert model.compress_latent(y[0], (40, 56), rate_lambda=0.1) == model.compress(
        x, rate_lambda=0.1
    )
    assert model.compress_latent(y[0], (40, 56), stages=2) == model.compress(x, stages=2)


def test_search_decodes_closer_and_files_decode_to_its_codes(sharp, lr):
    # ragged size (edge padding outside the loss), one tile
    model, x = sharp, _image(50, 70, 2)
    before = _mse(model, x, model.compress(x))
    data = model.compress(x, latent_steps=8)
    after = _mse(model, x, data)
    assert after < before  # step 0 bounds the loss; a few steps find better codes
    latent = optimize_latent(model, x, 8)
    codes = model.assign(latent)
    got, size = model.decompress_codes(data)
    assert torch.equal(got, codes) and size == (50, 70)
    assert torch.equal(model.encode_codes(x, latent_steps=8), codes)
    # with a rate lambda the optimised latent is coded rate-aware
    rated = model.compress(x, latent_steps=8, rate_lambda=0.1)
    assert rated == model.compress_latent(latent[0], (50, 70), rate_lambda=0.1)
    assert torch.equal(model.decompress_codes(rated)[0], model.assign(latent, 0.1))


def test_search_leaves_the_model_untouched(model):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mid = model.model_id()
    model.compress(_image(32, 48, 3), latent_steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert model.model_id() == mid
    assert torch.is_grad_enabled()  # no global state flipped


def test_tiles_cover_the_grid(sharp, lr, monkeypatch):
    """A latent larger than a tile: every tile searched (halo from the tiles before it), each
    token of the result from its own tile, and the decode still closer."""
    monkeypatch.setattr(latent_opt, "OPT_TILE", 2)
    monkeypatch.setattr(latent_opt, "OPT_HALO", 1)
    model, x = sharp, _image(72, 100, 4)  # 5 x 7 tokens: 3 x 4 tiles, ragged ones at the edges
    seen = []
    real = latent_opt._search

    def spy(model_, embed, start, *args):
        seen.append(tuple(start.shape[1:3]))
        return real(model_, embed, start, *args)

    monkeypatch.setattr(latent_opt, "_search", spy)
    latent = optimize_latent(model, x, 6)
    assert latent.shape == (1, 5, 7, TINY.latent_dim)
    assert len(seen) == 12 and (4, 4) in seen and (2, 2) in seen  # interior and corner windows
    base = float(((model.decode_codes(model.encode_codes(x), (72, 100)) - x) ** 2).mean())
    got = float(((model.decode_codes(model.assign(latent), (72, 100)) - x) ** 2).mean())
    assert got < base


def test_progress_bar(model, capsys):
    optimize_latent(model, _image(32, 32, 5), 2, progress=True)
    assert "latent search" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [-1, 1.5, True, None, "3", 10_001])
def test_bad_steps_are_refused(model, bad):
    x = _image(16, 16)
    with pytest.raises(ValueError, match=r"latent_steps must be an int in \[0, 10000\]"):
        model.compress(x, latent_steps=bad)
    with pytest.raises(ValueError, match=r"latent_steps must be an int in \[0, 10000\]"):
        model.encode_codes(x, latent_steps=bad)
    with pytest.raises(ValueError, match=r"latent_steps must be an int in \[0, 10000\]"):
        optimize_latent(model, x, bad)


def test_bad_inputs_are_refused(model):
    x = _image(32, 48)
    with pytest.raises(ValueError, match=r"one image \(1, 3, H, W\), got \(2, 3, 32, 48\)"):
        optimize_latent(model, x.expand(2, 3, 32, 48), 1)
    with pytest.raises(ValueError, match="latent grid 3x3 does not match a 48x32 image"):
        optimize_latent(model, x, 1, latent=torch.zeros(1, 3, 3, 8))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        optimize_latent(model, x.numpy(), 1)
    with pytest.raises(ValueError, match="lr must be > 0, got -1.0"):
        optimize_latent(model, x, 1, lr=-1)
    with torch.no_grad():
        y = model.encode_latent(x)[0]
    dim = y.shape[-1]
    with pytest.raises(ValueError, match=r"latent must have shape \(h, w, D\), got \(1, 2, 3, "):
        model.compress_latent(y[None], (32, 48))
    with pytest.raises(ValueError, match=rf"latent must be float \(h, w, {dim}\), got \(2, 3, 5\)"):
        model.compress_latent(torch.zeros(2, 3, 5), (32, 48))
    with pytest.raises(ValueError, match=rf"latent must be float \(h, w, {dim}\)"):
        model.compress_latent(y.long(), (32, 48))
    with pytest.raises(ValueError, match="a 48x32 image at downscale 1 has a 1x2 token grid, "
                       "the latent 2x3"):  # fmt: skip
        model.compress_latent(y, (32, 48), downscale=1)
    with pytest.raises(ValueError, match=r"downscale must be an int in \[0, 3\]"):
        model.compress_latent(y, (32, 48), downscale=4)
    with pytest.raises(ValueError, match=r"stages must be an int in \[1, "):
        model.compress_latent(y, (32, 48), stages=0)


def test_byte_budget_searches_each_latent_once(sharp, lr, monkeypatch):
    """compress_to_fit optimises the latent once per (model, downscale) it codes, however many
    stage counts and lambdas it tries, and its file decodes to the searched codes."""
    model = sharp
    img = (_image(96, 128, 6)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    full = model.compress(x, latent_steps=4)
    assert full != model.compress(x)
    calls = []
    real = latent_opt.optimize_latent

    def count(model_, x_, steps, *args, **kwargs):
        calls.append((tuple(x_.shape), steps))
        return real(model_, x_, steps, *args, **kwargs)

    monkeypatch.setattr(latent_opt, "optimize_latent", count)
    assert compress_to_fit(img, len(full), model=model, latent_steps=4).data == full
    assert calls == [((1, 3, 96, 128), 4)]
    calls.clear()
    fit = compress_to_fit(img, len(full) - 1, model=model, latent_steps=4)
    assert len(fit.data) < len(full)
    assert len(calls) == len(set(calls))  # every (image size) searched once
    assert all(steps == 4 for _, steps in calls)
    assert compress_image(img, model, latent_steps=4) == full


def test_cli_latent_steps(tmp_path, model, capsys):
    path = tmp_path / "tiny.pt"
    save_model(model, path)
    loaded = load_model(str(path))
    src = tmp_path / "in.png"
    img = (_image(48, 64, 7)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(src)
    out = tmp_path / "s.pqm"
    assert main(["compress", str(src), "-o", str(out), "--model", str(path),
                 "--latent-steps", "5"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(", 5 latent steps")
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    assert out.read_bytes() == loaded.compress(x, latent_steps=5)
    # the PSNR printed is that of the file's decode
    want = decompress_image(out.read_bytes(), loaded).astype(np.float64)
    mse = float(((want - img.astype(np.float64)) ** 2).mean())
    got = float(re.search(r"PSNR ([\d.]+) dB", printed).group(1))
    assert got == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)
    for bad in ("-1", "x", "10001"):
        with pytest.raises(SystemExit):
            main(["compress", str(src), "-f", "--model", str(path), "--latent-steps", bad])
        assert "--latent-steps" in capsys.readouterr().err


def test_setting_grammar_with_latent_steps():
    from pqmim_kernels.evaluation.codecs import (
        latent_step_settings,
        parse_setting,
        setting_latent_steps,
        split_setting,
    )

    assert parse_setting("m.pt+30") == ("m.pt", None, None)
    assert setting_latent_steps("m.pt+30") == 30
    assert setting_latent_steps("m.pt") == 0
    for s in ("m.pt@4~0.01+30", "m.pt+30@4~0.01", "m.pt~0.01+30@4"):
        assert parse_setting(s) == ("m.pt", 4, 0.01) and setting_latent_steps(s) == 30
    assert split_setting("high+30@4") == ("high", 4)
    assert parse_setting("runs/a+b/m.pt") == ("runs/a+b/m.pt", None, None)
    assert setting_latent_steps("runs/a+b/m.pt") == 0
    assert latent_step_settings(["a", "b~0.1"], 30) == ["a+30", "b~0.1+30"]
    assert latent_step_settings(["a"], 0) == ["a"]
    with pytest.raises(ValueError, match="--pqmim-latent-steps: expected an integer >= 0"):
        latent_step_settings(["a"], -1)


def test_eval_codec_passes_latent_steps():
    from pqmim_kernels.evaluation.codecs import PQMIMCodec

    seen = []

    class Api:
        def load_model(self, name, device="cpu"):
            return object()

        def compress_image(self, img, model=None, **kwargs):
            seen.append(kwargs)
            return b"x"

        def decompress_image(self, data, model=None):
            return np.zeros((2, 2, 3), np.uint8)

    codec = PQMIMCodec(["m~0.001+30@4"], api=Api())
    codec.check_available()
    seen.clear()
    codec.encode(np.zeros((2, 2, 3), np.uint8), "m~0.001+30@4")
    assert seen == [{"stages": 4, "rate_lambda": 0.001, "latent_steps": 30}]


def test_a_rate_term_finds_cheaper_codes(lr):
    """With an entropy model that makes low codes cheap (the untrained one is near uniform),
    the search with a rate term ends on codes that cost fewer bits under it."""
    model, x = _sharp(), _image(48, 64, 6)
    with torch.no_grad():
        bias = model.entropy_model.out.bias
        bias.copy_(torch.linspace(4.0, -4.0, bias.numel()))
    plain = optimize_latent(model, x, 8)
    cheap = optimize_latent(model, x, 8, rate_weight=3.0)
    with torch.no_grad():
        bits = [float(model.mim_bits(model.assign(lat)).sum()) for lat in (plain, cheap)]
    assert bits[1] < bits[0] - 5
    with pytest.raises(ValueError, match="rate_weight must be >= 0"):
        optimize_latent(model, x, 2, rate_weight=-1.0)
    with pytest.raises(ValueError, match="rate_weight must be >= 0"):
        optimize_latent(model, x, 2, rate_weight=float("nan"))

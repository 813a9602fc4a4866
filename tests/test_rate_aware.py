"""Rate-aware code assignment (``rate_lambda``): encoder-side only, so every file still decodes to
exactly the codes the encoder chose, and the choice follows its rule."""

import re

import numpy as np
import pytest
import torch
from _tiny import TINY, coding_tiny, smooth_image
from PIL import Image

from pqmim_kernels.cli.main import main
from pqmim_kernels.models import (
    compress_image,
    decompress_image,
    load_model,
    save_model,
)

LAMS = [0.0, 0.01, 0.1, 1.0]


@pytest.fixture(scope="module")
def model():
    return coding_tiny()


_image = smooth_image


def _sq_dist(model, x, codes):
    """Total squared distance of the latent of ``x`` to the codewords ``codes`` picks."""
    with torch.no_grad():
        y = model.encode_latent(x)
        q = model.quantizer.get_output_from_indices(codes.reshape(1, -1, TINY.num_subspaces))
    return float(((y.reshape(q.shape) - q) ** 2).sum())


def test_lambda_zero_is_the_nearest_codeword_assignment(model):
    x = _image(48, 64, 1)
    assert torch.equal(model.encode_codes(x, 0.0), model.encode_codes(x))
    assert model.compress(x, rate_lambda=0) == model.compress(x)
    # the rate-aware path's own distances (sub-space slices of the latent) agree with the
    # quantizer's argmin: a vanishing lambda picks the nearest codewords too
    assert torch.equal(model.encode_codes(x, 1e-12), model.encode_codes(x))


@pytest.mark.parametrize("lam", LAMS[1:])
@pytest.mark.parametrize("stages", [None, 2])
def test_files_decode_to_the_chosen_codes(model, lam, stages):
    x = _image(80, 112, 2)
    codes = model.encode_codes(x, lam)
    data = model.compress(x, stages=stages, rate_lambda=lam)
    # the codes of a stage depend only on earlier stages: any prefix is the same choice
    assert data == model.compress_codes(codes[0], (80, 112), stages=stages)
    got, size = model.decompress_codes(data)
    if stages is None:
        assert torch.equal(got, codes)
    assert size == (80, 112)


def test_larger_lambda_trades_distortion_for_rate(model):
    xs = [_image(80, 112, s) for s in range(3)]
    sizes, dists = [], []
    for lam in LAMS:
        sizes.append(sum(len(model.compress(x, rate_lambda=lam)) for x in xs))
        dists.append(sum(_sq_dist(model, x, model.encode_codes(x, lam)) for x in xs))
    # the nearest codewords have the least distortion; more lambda, fewer bytes
    assert dists[0] == min(dists)
    assert sizes[-1] < sizes[0]
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))
    assert dists[-1] > dists[0]


def test_huge_lambda_picks_the_most_likely_codes(model):
    """An independent check of the rule: at lam -> inf only the bits count, so every code is
    the most likely one in its context, which is what the decoder's greedy fill computes for
    every stage after the first."""
    x = _image(64, 80, 3)
    codes = model.encode_codes(x, 1e12)
    filled, _ = model.decompress_codes(model.compress(x, stages=1, rate_lambda=1e12))
    assert torch.equal(codes, filled)
    assert not torch.equal(codes, model.encode_codes(x))


def test_compress_image_and_byte_budgets_use_lambda(model):
    img = (_image(48, 64, 4)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    data = compress_image(img, model, rate_lambda=0.1)
    assert data == model.compress(x, rate_lambda=0.1)
    assert compress_image(img, model, max_bytes=10**6, rate_lambda=0.1) == data
    assert decompress_image(data, model).shape == img.shape


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_lambda_is_refused(model, bad):
    x = _image(16, 16)
    with pytest.raises(ValueError, match="rate_lambda must be a"):
        model.compress(x, rate_lambda=bad)
    with pytest.raises(ValueError, match="rate_lambda must be a"):
        model.encode_codes(x, bad)


def test_cli_rate_lambda(tmp_path, model, capsys):
    path = tmp_path / "tiny.pt"
    save_model(model, path)
    model = load_model(str(path))  # the file's fp16 weights: another model id
    src = tmp_path / "in.png"
    img = (_image(48, 64, 5)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(src)
    sizes = {}
    for lam in ("0", "1"):
        out = tmp_path / f"l{lam}.pqm"
        assert main(["compress", str(src), "-o", str(out), "--model", str(path),
                     "--rate-lambda", lam]) == 0  # fmt: skip
        printed = capsys.readouterr().out
        sizes[lam] = out.stat().st_size
        # the PSNR printed is that of the file's decode
        want = decompress_image(out.read_bytes(), model).astype(np.float64)
        mse = float(((want - img.astype(np.float64)) ** 2).mean())
        got = float(re.search(r"PSNR ([\d.]+) dB", printed).group(1))
        assert got == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)
    assert sizes["1"] < sizes["0"]
    for bad in ("-1", "nan", "x"):
        with pytest.raises(SystemExit):
            main(["compress", str(src), "-f", "--model", str(path), "--rate-lambda", bad])
        assert "--rate-lambda" in capsys.readouterr().err


def test_byte_budget_raises_lambda_before_dropping_stages(model, monkeypatch):
    """No complete file fits at the asked lambda: complete files at larger lambdas of the
    grid join the PSNR competition with partial and shrunk files (rate_search)."""
    import pqmim_kernels.models as models
    from pqmim_kernels.coding import pqm_format as fmt
    from pqmim_kernels.models import compress_to_fit

    img = (_image(96, 128, 6)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    grid = (0.1, 1.0, 10.0)
    monkeypatch.setattr(models, "BUDGET_LAMBDAS", grid)
    sizes = [len(model.compress(x, rate_lambda=v)) for v in (0.0, *grid)]
    assert sizes[2] < sizes[0]
    budget = sizes[2]  # lambda 1 fits; 0 (and maybe 0.1) does not
    want_lam = next(v for v, n in zip(grid, sizes[1:]) if n <= budget)
    # score complete files above everything else: the rated file must win
    monkeypatch.setattr(
        models, "_fit_psnr",
        lambda fit, x: 100.0 * fmt.unpack(fit.data)[0].stages_sent
        - fmt.unpack(fit.data)[0].downscale,
    )  # fmt: skip
    fit = compress_to_fit(img, budget, model=model)
    assert fit.data == model.compress(x, rate_lambda=want_lam)
    assert fit.rate_lambda == want_lam and fit.stages_sent == TINY.stages and fit.preset is None
    # without the search the same budget gives a partial or shrunk file
    old = compress_to_fit(img, budget, model=model, rate_search=False)
    assert old.rate_lambda == 0 and old.data != fit.data
    assert compress_image(img, model, max_bytes=budget, rate_search=False) == old.data
    with pytest.raises(ValueError, match="give candidates or model, not both"):
        compress_to_fit(img, budget, [], model=model)


def test_cli_max_bytes_says_which_lambda_it_used(tmp_path, model, monkeypatch, capsys):
    import pqmim_kernels.models as models

    path = tmp_path / "tiny.pt"
    save_model(model, path)
    loaded = load_model(str(path))
    src = tmp_path / "in.png"
    img = (_image(96, 128, 6)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(img).save(src)
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    monkeypatch.setattr(models, "BUDGET_LAMBDAS", (1.0,))
    budget = len(loaded.compress(x, rate_lambda=1.0))
    assert budget < len(loaded.compress(x))
    monkeypatch.setattr(models, "_fit_psnr", lambda fit, x: float(fit.rate_lambda))
    out = tmp_path / "b.pqm"
    assert main(["compress", str(src), "-o", str(out), "--model", str(path),
                 "--max-bytes", str(budget)]) == 0  # fmt: skip
    printed = capsys.readouterr()
    assert out.read_bytes() == loaded.compress(x, rate_lambda=1.0)
    assert printed.out.rstrip().endswith(", rate lambda 1")
    assert "warning" not in printed.err  # a complete file: nothing predicted, nothing shrunk
    # the PSNR printed is that of the file's decode (not of the nearest codes)
    want = decompress_image(out.read_bytes(), loaded).astype(np.float64)
    mse = float(((want - img.astype(np.float64)) ** 2).mean())
    got = float(re.search(r"PSNR ([\d.]+) dB", printed.out).group(1))
    assert got == pytest.approx(10 * np.log10(255**2 / mse), abs=0.01)

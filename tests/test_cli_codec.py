"""``pqmim compress`` / ``pqmim decompress``: subprocess runs and every user-facing error."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import TINY, make_coding_ready
from PIL import Image

from pqmim_kernels.cli import codec as cli_codec
from pqmim_kernels.cli.main import main
from pqmim_kernels.models import PQMIM, save_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = PQMIM(TINY).train()
    with torch.no_grad():
        model.quantize(model.encode_latent(torch.rand(4, 3, 64, 64)))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(make_coding_ready(model.eval()), path)
    return path


def _rgb(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1)
    return np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "pqmim_kernels.cli.main", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compress_decompress_subprocess(tmp_path, model_file):
    src = tmp_path / "in.png"
    Image.fromarray(_rgb(37, 50)).save(src)
    original_bytes = src.read_bytes()
    r = _run("compress", src, "--model", model_file)
    assert r.returncode == 0, r.stderr
    pqm = tmp_path / "in.pqm"
    size = pqm.stat().st_size
    m = re.search(
        r"\(50x37\) -> .*in\.pqm: (\d+) bytes, ([\d.]+) bpp, encode [\d.]+ s, PSNR ([\d.]+) dB",
        r.stdout,
    )
    assert m, r.stdout
    assert int(m.group(1)) == size
    assert float(m.group(2)) == pytest.approx(8 * size / (37 * 50), abs=1e-4)
    # the default output is in.decoded.png: the original in.png is left alone
    r = _run("decompress", pqm, "--model", model_file, "--original", src)
    assert r.returncode == 0, r.stderr
    d = re.search(
        r"in\.decoded\.png \(50x37\): (\d+) bytes, [\d.]+ bpp, decode [\d.]+ s, PSNR ([\d.]+) dB",
        r.stdout,
    )
    assert d, r.stdout
    # compress predicts the PSNR of what decompress really returns
    assert int(d.group(1)) == size and d.group(2) == m.group(3)
    back = np.asarray(Image.open(tmp_path / "in.decoded.png"))
    assert back.shape == (37, 50, 3) and back.dtype == np.uint8
    assert src.read_bytes() == original_bytes


def test_compress_partial_stages_in_process(tmp_path, model_file, capsys):
    src = tmp_path / "p.png"
    Image.fromarray(_rgb(64, 96)).save(src)
    sizes = []
    for stages in ("2", "6"):
        out = tmp_path / f"p{stages}.pqm"
        args = ["compress", str(src), "-o", str(out), "--model", str(model_file)]
        assert main([*args, "--stages", stages]) == 0
        sizes.append(out.stat().st_size)
        assert (
            main(["decompress", str(out), "--model", str(model_file), "--original", str(src)]) == 0
        )
        assert (tmp_path / f"p{stages}.decoded.png").is_file()
    assert sizes[0] < sizes[1]
    captured = capsys.readouterr()
    assert "PSNR" in captured.out and "(2 of 6 stages)" in captured.out
    assert "warning" not in captured.err  # --stages asked for it: no warning
    budget = tmp_path / "b.pqm"
    args = ["compress", str(src), "-o", str(budget), "--model", str(model_file), "--force"]
    args.append("--no-downscale")  # stage selection alone (downscaled files: test_codec.py)
    assert main([*args, "--max-bytes", str(sizes[0])]) == 0
    assert budget.read_bytes() == (tmp_path / "p2.pqm").read_bytes()  # stage 3 does not fit
    captured = capsys.readouterr()
    assert "(2 of 6 stages)" in captured.out
    psnr_printed = re.search(r"PSNR ([\d.]+) dB", captured.out).group(1)
    # a budget that forces a partial file says so on stderr, with the PSNR it costs
    assert captured.err == (
        f"pqmim compress: warning: --max-bytes {sizes[0]} holds only 2 of 6 coding stages; the "
        f"decoder predicts the rest (PSNR {psnr_printed} dB)\n"
    )
    assert main([*args, "--max-bytes", str(sizes[1])]) == 0
    assert capsys.readouterr().err == ""  # everything fits: no warning
    assert main([*args, "--max-bytes", "8"]) == 1  # the header alone is 11 bytes
    assert "--max-bytes 8 is below the smallest possible .pqm file of a 96x64 image (11 bytes" in (
        capsys.readouterr().err
    )
    assert main([*args, "--max-bytes", "500", "--stages", "2"]) == 1
    assert "give --stages or --max-bytes, not both" in capsys.readouterr().err
    assert main(["compress", str(src), "--model", str(model_file), "--stages", "9"]) == 1
    assert "--stages 9: the model codes 6 stages" in capsys.readouterr().err


def test_cli_errors_exit_1_with_message(tmp_path, model_file, capsys):
    assert main(["compress", str(tmp_path / "nope.png"), "--model", str(model_file)]) == 1
    assert "pqmim compress: error: no such image file" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    assert main(["compress", str(junk), "--model", str(model_file)]) == 1
    assert "not an image Pillow can read" in capsys.readouterr().err
    notpqm = tmp_path / "x.pqm"
    notpqm.write_bytes(b"GIF89a....")
    assert main(["decompress", str(notpqm), "--model", str(model_file)]) == 1
    assert "not a .pqm file (bad magic bytes)" in capsys.readouterr().err
    assert main(["decompress", str(tmp_path / "missing.pqm")]) == 1
    assert "no such .pqm file" in capsys.readouterr().err
    assert main(["decompress", str(notpqm), "-o", str(tmp_path / "o.jpg")]) == 1
    assert "unsupported suffix '.jpg'" in capsys.readouterr().err
    src = tmp_path / "a.png"
    Image.fromarray(_rgb(16, 16)).save(src)
    assert main(["compress", str(src), "--model", str(tmp_path / "none.pt")]) == 1
    assert "load_model: no model file at" in capsys.readouterr().err


def test_read_image_modes(tmp_path):
    rgb = _rgb(9, 7)
    grey = rgb[..., 0]
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    assert np.array_equal(
        cli_codec.read_image(tmp_path / "g.png"), np.repeat(grey[..., None], 3, 2)
    )
    g16 = (grey.astype(np.uint16) * 257).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert np.array_equal(cli_codec.read_image(tmp_path / "g16.png")[..., 1], grey)
    opaque = np.concatenate([rgb, np.full((9, 7, 1), 255, np.uint8)], axis=2)
    Image.fromarray(opaque, "RGBA").save(tmp_path / "o.png")
    assert np.array_equal(cli_codec.read_image(tmp_path / "o.png"), rgb)
    clear = opaque.copy()
    clear[3, 3, 3] = 10
    Image.fromarray(clear, "RGBA").save(tmp_path / "t.png")
    with pytest.raises(ValueError, match="transparent pixels"):
        cli_codec.read_image(tmp_path / "t.png")
    Image.fromarray(rgb).save(tmp_path / "j.jpg", quality=95)
    assert cli_codec.read_image(tmp_path / "j.jpg").shape == (9, 7, 3)
    # EXIF orientation 6 (rotate 90 degrees clockwise to display): applied
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(tmp_path / "rot.png", exif=exif)
    assert np.array_equal(cli_codec.read_image(tmp_path / "rot.png"), np.rot90(rgb, -1))
    # 16-bit RGB PNG (Pillow reduces it to 8 bits): read as RGB of the right size
    rgb16 = rgb.astype(">u2") * 257
    _write_png16_rgb(tmp_path / "c16.png", rgb16)
    assert np.array_equal(cli_codec.read_image(tmp_path / "c16.png"), rgb)
    # palette with a transparent index: refused like any alpha; opaque palette: RGB
    Image.fromarray(rgb).quantize(8).save(tmp_path / "pal.png")
    assert cli_codec.read_image(tmp_path / "pal.png").shape == (9, 7, 3)
    Image.fromarray(rgb).quantize(8).save(tmp_path / "palt.png", transparency=0)
    with pytest.raises(ValueError, match="transparent pixels"):
        cli_codec.read_image(tmp_path / "palt.png")
    Image.fromarray(grey.astype(np.float32), "F").save(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="unsupported pixel format 'F'"):
        cli_codec.read_image(tmp_path / "f.tif")
    with pytest.raises(ValueError, match="unsupported suffix '.gif'"):
        cli_codec.write_image(tmp_path / "x.gif", rgb)


def _write_png16_rgb(path, arr):
    """A 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[i].astype(">u2").tobytes() for i in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
    path.write_bytes(png + chunk(b"IEND", b""))


def test_psnr():
    a = _rgb(8, 8)
    assert cli_codec.psnr(a, a) == float("inf")
    b = a.astype(np.int16)
    b[0, 0, 0] = (b[0, 0, 0] + 16) % 256
    expect = 10 * np.log10(255**2 / ((a[0, 0, 0] - b[0, 0, 0]) ** 2 / a.size))
    assert cli_codec.psnr(a, b.astype(np.uint8)) == pytest.approx(expect)
    with pytest.raises(ValueError, match="PSNR: images differ in size"):
        cli_codec.psnr(a, a[:4])


def test_decompress_fill_options(tmp_path, model_file, capsys):
    """--fill sample decodes a partial file into another plausible image per --seed; a bad
    option is a one-line error before any decoding."""
    src = tmp_path / "f.png"
    Image.fromarray(_rgb(128, 160, seed=3)).save(src)
    pqm = tmp_path / "f.pqm"
    model = ["--model", str(model_file)]
    assert main(["compress", str(src), "-o", str(pqm), *model, "--stages", "1"]) == 0
    outs = {}
    for name, extra in (
        ("greedy", []),
        ("s1", ["--fill", "sample", "--seed", "1", "--temperature", "3"]),
        ("s1b", ["--fill", "sample", "--seed", "1", "--temperature", "3"]),
        ("s2", ["--fill", "sample", "--seed", "2", "--iterations", "3", "--temperature", "3"]),
    ):
        out = tmp_path / f"{name}.png"
        assert main(["decompress", str(pqm), "-o", str(out), *model, *extra]) == 0
        outs[name] = np.asarray(Image.open(out))
    from pqmim_kernels.models import decompress_image, load_model

    tiny, data = load_model(str(model_file)), pqm.read_bytes()
    assert np.array_equal(outs["s1"], outs["s1b"])
    assert np.array_equal(outs["greedy"], decompress_image(data, tiny))
    want = decompress_image(data, tiny, fill="sample", seed=1, temperature=3.0)
    assert np.array_equal(outs["s1"], want)
    want = decompress_image(data, tiny, fill="sample", seed=2, iterations=3, temperature=3.0)
    assert np.array_equal(outs["s2"], want)
    # (the tiny model's decoder maps the differing codes to nearly equal pixels, so the images
    # are compared with the library's, not with each other; test_sampling.py checks the codes)
    capsys.readouterr()
    bad = ["decompress", str(pqm), "-o", str(tmp_path / "x.png"), "--model", str(model_file)]
    assert main([*bad, "--fill", "sample", "--seed", "-3"]) == 1
    assert capsys.readouterr().err == (
        "pqmim decompress: error: seed must be a non-negative int, got -3\n"
    )
    assert not (tmp_path / "x.png").exists()

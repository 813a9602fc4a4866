"""``pqmim`` never loses a file, refuses bad outputs and inputs before any work, and never shows a
traceback for bad input (issues 14 and 15): every path asserts its message and exit code."""

import errno
import os
import subprocess
import sys
import warnings
import zlib
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


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if encoding or decoding starts (errors must come before any work)."""
    import pqmim_kernels.models as models

    def boom(*a, **k):
        raise AssertionError("encoding/decoding started before the error")

    monkeypatch.setattr(models, "compress_image", boom)
    monkeypatch.setattr(models, "decompress_image", boom)


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no traceback
    return err.strip()


def _compress(*args, model_file):
    return main(["compress", *map(str, args), "--model", str(model_file)])


def _decompress(*args, model_file):
    return main(["decompress", *map(str, args), "--model", str(model_file)])


# ---- no data loss -------------------------------------------------------------------------------


def test_round_trip_with_default_names_keeps_the_original(photo, model_file, capsys):
    before = photo.read_bytes()
    assert _compress(photo, model_file=model_file) == 0
    pqm = photo.with_suffix(".pqm")
    assert _decompress(pqm, model_file=model_file) == 0
    assert photo.read_bytes() == before  # x.pqm decodes to x.decoded.png, never to x.png
    decoded = photo.parent / "photo.decoded.png"
    assert np.asarray(Image.open(decoded)).shape == (40, 56, 3)
    assert "photo.decoded.png (56x40)" in capsys.readouterr().out


def test_an_input_is_never_overwritten_even_with_force(photo, model_file, capsys, no_work):
    before = photo.read_bytes()
    for force in ([], ["--force"]):
        assert _compress(photo, "-o", photo, *force, model_file=model_file) == 1
        assert _err(capsys) == (
            f"pqmim compress: error: output {photo} is the input file {photo}; refusing to "
            "overwrite an input (give another -o)"
        )
    # the same file under another name (a hard link) is the input too
    link = photo.parent / "link.png"
    os.link(photo, link)
    assert _compress(photo, "-o", link, "--force", model_file=model_file) == 1
    assert "is the input file" in _err(capsys)
    # compress x.pqm: the default output x.pqm is the input
    odd = photo.parent / "odd.pqm"
    odd.write_bytes(before)
    assert _compress(odd, model_file=model_file) == 1
    assert f"output {odd} is the input file {odd}" in _err(capsys)
    # decompress onto its --original, onto the .pqm itself, onto the model file
    pqm = photo.parent / "x.pqm"
    pqm.write_bytes(b"\xb5Q")
    args = ("--original", photo)
    assert _decompress(pqm, "-o", photo, *args, "--force", model_file=model_file) == 1
    assert f"output {photo} is the input file {photo}" in _err(capsys)
    assert _decompress(pqm, "-o", pqm, "--force", model_file=model_file) == 1
    assert f"output {pqm} is the input file {pqm}" in _err(capsys)
    assert _compress(photo, "-o", model_file, "--force", model_file=model_file) == 1
    assert f"is the input file {model_file}" in _err(capsys)
    assert photo.read_bytes() == before


def test_existing_outputs_need_force(photo, model_file, capsys):
    out = photo.parent / "out.pqm"
    out.write_bytes(b"keep me")
    assert _compress(photo, "-o", out, model_file=model_file) == 1
    assert _err(capsys) == (
        f"pqmim compress: error: output {out} already exists; pass --force to overwrite it"
    )
    assert out.read_bytes() == b"keep me"
    assert _compress(photo, "-o", out, "--force", model_file=model_file) == 0
    assert out.read_bytes()[:2] == b"\xb5Q"
    decoded = photo.parent / "out.decoded.png"
    decoded.write_bytes(b"old")
    assert _decompress(out, model_file=model_file) == 1
    assert "out.decoded.png already exists; pass --force" in _err(capsys)
    assert _decompress(out, "-f", model_file=model_file) == 0
    assert Image.open(decoded).size == (56, 40)
    # no temporary files left behind
    assert not [p.name for p in photo.parent.iterdir() if p.name.endswith(".tmp")]


def test_write_output_refuses_a_file_that_appeared_meanwhile_and_replaces_atomically(tmp_path):
    out = tmp_path / "late.pqm"
    out.write_bytes(b"someone else's")
    with pytest.raises(ValueError, match="late.pqm already exists; pass --force"):
        cli_codec.write_output(out, b"new")
    assert out.read_bytes() == b"someone else's"
    cli_codec.write_output(out, b"new", force=True)
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.pqm"]


# ---- bad outputs: one line, before any work -----------------------------------------------------


def test_output_folders_missing_folders_and_unwritable_folders(
    tmp_path, photo, model_file, capsys, no_work, monkeypatch
):
    folder = tmp_path / "some_directory"
    folder.mkdir()
    pqm = tmp_path / "a.pqm"
    pqm.write_bytes(b"\xb5Q\x20\0\0\x01\x01\0\0")
    for cmd in (_compress, _decompress):
        src = photo if cmd is _compress else pqm
        name = "compress" if cmd is _compress else "decompress"
        for target in (str(folder), str(folder) + "/", str(tmp_path / "missing") + "/"):
            assert cmd(src, "-o", target, model_file=model_file) == 1
            assert _err(capsys).startswith(f"pqmim {name}: error: output {target} is a folder;")
        missing = tmp_path / "missing" / "x.png"
        assert cmd(src, "-o", missing, model_file=model_file) == 1
        assert _err(capsys) == (
            f"pqmim {name}: error: output folder {missing.parent} does not exist "
            f"(for output {missing})"
        )
        under_file = photo / "x.png"
        assert cmd(src, "-o", under_file, model_file=model_file) == 1
        assert f"output folder {photo} is not a folder" in _err(capsys)

    def read_only(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cli_codec.tempfile, "mkstemp", read_only)
    assert _compress(photo, "-o", folder / "x.pqm", model_file=model_file) == 1
    assert _err(capsys) == (
        f"pqmim compress: error: output folder {folder} is not writable (Permission denied)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_for_real(tmp_path, photo, model_file, capsys, no_work):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        assert _compress(photo, "-o", folder / "x.pqm", model_file=model_file) == 1
        assert "is not writable (Permission denied)" in _err(capsys)
    finally:
        folder.chmod(0o700)


def test_os_errors_while_writing_are_one_line(photo, model_file, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "photo.pqm")

    monkeypatch.setattr(cli_codec, "write_output", full)
    assert _compress(photo, model_file=model_file) == 1
    assert _err(capsys) == "pqmim compress: error: photo.pqm: No space left on device"


# ---- budgets ------------------------------------------------------------------------------------


def test_impossible_byte_budget_fails_before_encoding(tmp_path, model_file, capsys, no_work):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(big)
    # 300x500: the header alone is 12 bytes (the compact rANS framing can be empty)
    assert _compress(big, "--max-bytes", 11, model_file=model_file) == 1
    assert _err(capsys) == (
        "pqmim compress: error: --max-bytes 11 is below the smallest possible .pqm file of a "
        "500x300 image (12 bytes: header and one coding stage)"
    )


def test_budget_above_the_bound_but_below_one_stage(tmp_path, model_file, capsys):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((300, 500, 3), np.uint8)).save(big)
    assert _compress(big, "--no-downscale", "--max-bytes", 20, model_file=model_file) == 1
    err = _err(capsys)
    assert err.startswith("pqmim compress: error: nothing fits in max_bytes=20: the smallest file")
    assert not (tmp_path / "big.pqm").exists()
    # allowed to shrink the image, the same budget fits (a warning says what it holds)
    assert _compress(big, "--max-bytes", 20, model_file=model_file) == 0
    assert "pqmim compress: warning: --max-bytes 20 holds " in capsys.readouterr().err
    assert (tmp_path / "big.pqm").stat().st_size <= 20


def test_lower_bound_is_a_lower_bound(tmp_path, model_file):
    from pqmim_kernels.coding import RansEncoder
    from pqmim_kernels.models import compress_image, load_model
    from pqmim_kernels.models.schedule import stage_bounds

    model = load_model(str(model_file))
    for h, w in ((16, 16), (64, 96), (300, 500)):
        data = compress_image(np.zeros((h, w, 3), np.uint8), model, stages=1)
        tokens = -(-h // 16) * -(-w // 16)
        assert len(data) >= cli_codec._min_file_bytes(h, w, int(stage_bounds(tokens, 6)[1]))
    # the bound is tight: the payload's compact rANS framing of one symbol coded from the empty
    # state at interval start 0 is empty, so a file can be just its header
    enc = RansEncoder(framing="compact")
    p = 1 << 24
    enc.encode_cdfs(np.zeros(1, np.int64), np.array([[0, p - 1, p]], np.int32))
    assert enc.finish() == b""


@pytest.mark.parametrize("flag", ["--max-bytes", "--stages"])
@pytest.mark.parametrize("value", ["0", "-3", "abc"])
def test_budget_arguments_are_positive_ints(photo, flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", str(photo), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected a positive integer, got" in err and "Traceback" not in err


# ---- inputs -------------------------------------------------------------------------------------


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height, with a tiny (undecodable) image body."""
    import struct

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.mark.parametrize("side", [10000, 20000])  # 20000^2 is over Pillow's own hard limit too
def test_pixel_limit_from_the_header_without_decoding(tmp_path, side, model_file, capsys, no_work):
    from pqmim_kernels.models.codec import MAX_DECODE_PIXELS

    huge = tmp_path / "huge.png"
    _png_header_only(huge, side, side)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail here
        assert _compress(huge, model_file=model_file) == 1
    err = _err(capsys)
    limit = f"over the codec's limit of {MAX_DECODE_PIXELS} px (MAX_DECODE_PIXELS); split it"
    assert limit in err
    if side == 10000:
        assert f"a 10000x10000 image (100000000 px) is {limit}" in err
    assert not (tmp_path / "huge.pqm").exists()


def test_read_image_pixel_limit_argument(photo):
    with pytest.raises(ValueError, match=r"a 56x40 image \(2240 px\) is over the codec's limit of"):
        cli_codec.read_image(photo, max_pixels=2000)
    assert cli_codec.read_image(photo, max_pixels=None).shape == (40, 56, 3)


def _frames(n, size=(20, 16)):
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)) for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("name", "fmt", "kind"),
    [("anim.gif", "GIF", "GIF"), ("anim.png", "PNG", "PNG"), ("pages.tif", "TIFF", "TIFF")],
)
def test_multi_frame_inputs_are_refused(tmp_path, name, fmt, kind, model_file, capsys, no_work):
    path = tmp_path / name
    first, *rest = _frames(3)
    first.save(path, format=fmt, save_all=True, append_images=rest)
    assert _compress(path, model_file=model_file) == 1
    assert _err(capsys) == (
        f"pqmim compress: error: {path}: {kind} file with 3 frames (animated or multi-page); "
        "pqmim codes one still image - save the frame you want as PNG first"
    )
    # one frame of the same formats is fine
    single = tmp_path / f"one_{name}"
    first.save(single, format=fmt)
    assert cli_codec.read_image(single).shape == (16, 20, 3)


def test_folders_as_inputs_and_mismatched_original(tmp_path, photo, model_file, capsys, no_work):
    assert _compress(tmp_path, model_file=model_file) == 1
    assert _err(capsys) == f"pqmim compress: error: {tmp_path} is a folder, not an image file"
    assert _decompress(tmp_path, model_file=model_file) == 1
    assert _err(capsys) == f"pqmim decompress: error: {tmp_path} is a folder, not a .pqm file"
    pqm = tmp_path / "a.pqm"
    from pqmim_kernels.coding import pqm_format

    header = pqm_format.PqmHeader(b"\0\0", 10, 12, 1, check=0)
    pqm.write_bytes(pqm_format.pack(header, b""))
    assert _decompress(pqm, "--original", photo, model_file=model_file) == 1
    assert _err(capsys) == (
        f"pqmim decompress: error: --original {photo} is 56x40 but {pqm} holds a 12x10 image"
    )
    assert _decompress(pqm, "--original", tmp_path / "nope.png", model_file=model_file) == 1
    assert "no such image file" in _err(capsys)


# ---- every sub-command, as a user runs it ------------------------------------------------------


def test_bad_input_never_prints_a_traceback_subprocess(tmp_path, photo):
    """Real processes (exit codes as the shell sees them); one per sub-command."""
    folder = tmp_path / "d"
    folder.mkdir()
    cases = [
        (["decompress", str(photo.with_suffix(".pqm")), "-o", str(folder) + "/"], 1, "no such"),
        (["compress", str(photo), "-o", str(folder) + "/"], 1, "is a folder"),
        (["eval", str(tmp_path / "none"), "--out", str(tmp_path / "o")], 1, "not found"),
        (["train", "--crop", "abc"], 2, "invalid int value: 'abc'"),
        (["compress"], 2, "the following arguments are required: input"),
    ]
    for args, code, text in cases:
        r = subprocess.run(
            [sys.executable, "-m", "pqmim_kernels.cli.main", *args],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert r.returncode == code, (args, r.stderr)
        assert text in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_eval_checks_its_output_folder_before_evaluating(tmp_path, photo, capsys, monkeypatch):
    from pqmim_kernels.evaluation import runner

    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("evaluation started"))
    a_file = tmp_path / "results.txt"
    a_file.write_text("x")
    assert main(["eval", str(photo.parent), "--out", str(a_file), "--codecs", "jpeg"]) == 1
    assert _err(capsys) == f"pqmim eval: error: --out {a_file} is a file, not a folder"
    assert main(["eval", str(photo.parent), "--out", str(a_file / "sub"), "--codecs", "jpeg"]) == 1
    assert f"pqmim eval: error: --out {a_file / 'sub'}: cannot write there" in _err(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["eval", str(empty), "--out", str(tmp_path / "o")]) == 1
    assert "pqmim eval: error: no images found in" in _err(capsys)
    assert not (tmp_path / "o").exists()  # nothing created for a run that cannot start


def test_train_output_that_is_a_file(tmp_path, capsys):
    a_file = tmp_path / "run"
    a_file.write_text("x")
    data = tmp_path / "imgs"
    data.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data / "a.png")
    assert main(["train", "--data", str(data), "--out", str(a_file), "--no-progress"]) == 1
    assert _err(capsys) == f"pqmim train: error: {a_file}: File exists"


# ---- help and argument errors without torch ------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["compress", "--help"], ["eval", "--help"],
     ["compress"], ["train", "--crop", "abc"], ["decompress", "x.pqm", "--nope"]],
)  # fmt: skip
def test_help_and_argument_errors_do_not_import_torch(argv):
    code = (
        "import sys\n"
        "from pqmim_kernels.cli.main import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert "torch imported: False" in r.stderr, r.stderr


def test_train_help_shows_defaults_and_the_default_example():
    import argparse
    import dataclasses

    from pqmim_kernels.cli import train as cli_train
    from pqmim_kernels.models.config import PQMIMConfig
    from pqmim_kernels.models.train import TrainConfig

    # defaults read from source equal the dataclasses'
    train_fields, model_fields = cli_train._fields()
    assert {n: d for n, _, d, _ in train_fields} == dataclasses.asdict(TrainConfig())
    expect = dataclasses.asdict(PQMIMConfig())
    assert {n: d for n, _, d, _ in model_fields} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in expect.items()
    }
    parser = argparse.ArgumentParser()
    cli_train.register(parser.add_subparsers(dest="command"))
    text = parser._subparsers._group_actions[0].choices["train"].format_help()
    flat = " ".join(text.split())
    assert "--crop CROP square crop size (multiple of 16) (default: 256)" in flat
    assert "--subspaces NUM_SUBSPACES product-quantizer sub-spaces M (D / M dims each) " in flat
    assert "(default: 32,64,96,128)" in flat
    example = "pqmim train --data ../shared/data/train --out runs/train"
    assert f"example (every option at its default):\n  {example}\n" in text
    # the example is the defaults, and every dataclass field is a flag
    defaults = parser.parse_args(["train"])
    assert vars(parser.parse_args(example.split()[1:])) == vars(defaults)
    assert set(defaults.train_fields) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(defaults.model_fields) == {f.name for f in dataclasses.fields(PQMIMConfig)}


def test_dataclass_fields_reads_defaults_and_comments_from_source(tmp_path):
    from pqmim_kernels.cli.train import dataclass_fields

    src = tmp_path / "cfg.py"
    src.write_text(
        "class C:\n"
        '    """doc"""\n\n'
        '    a: str = "x#y"  # the a\n'
        "    b: int = 3\n"
        "    c: tuple[int, int] = (1,\n"
        "        2)  # two\n"
        "class D:\n"
        "    x: int = len('ab')\n"
    )
    assert dataclass_fields(src, "C") == [
        ("a", "str", "x#y", "the a"),
        ("b", "int", 3, ""),
        ("c", "tuple[int, int]", (1, 2), "two"),
    ]
    with pytest.raises(ValueError, match="no class E"):
        dataclass_fields(src, "E")
    with pytest.raises(ValueError):  # not a literal: the caller falls back to importing
        dataclass_fields(src, "D")

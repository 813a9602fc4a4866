"""``pqmim compress`` and ``pqmim decompress``: image files <-> ``.pqm`` files.

Input images: PNG or JPEG (anything Pillow opens), 8-bit RGB; grey is expanded to RGB; 16-bit
grey is rounded to 8 bits and 16-bit RGB is reduced to 8 bits by Pillow (high byte); palette
images are expanded; the EXIF orientation of a photo is applied; an alpha channel is dropped
when fully opaque and refused otherwise (PQ-MIM codes RGB only). Animated or multi-page files
(GIF, APNG, TIFF, WebP with several frames) are refused; a multi-picture JPEG (MPO, e.g. from a
phone with a depth map) is read as its primary picture. The size is checked from the file's
header before any pixel is decoded: images over the codec's limit (``MAX_DECODE_PIXELS``) are
refused. Any size below it: the codec pads to multiples of 16 by edge replication and crops
after decoding.

Outputs: never an input file, never an existing file unless ``--force`` (then replaced
atomically), never a folder; a missing or read-only output folder is an error before any
work. Defaults: ``compress x.png`` writes ``x.pqm``; ``decompress x.pqm`` writes
``x.decoded.png`` (not ``x.png``, which is usually the original).

Both commands print the file size, bits per pixel of the whole file, the time, and the PSNR
whenever the original is known (always for ``compress``; ``decompress --original FILE``).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where it is used, so `pqmim --help` stays instant
    import numpy as np

__all__ = ["check_output", "psnr", "read_image", "register", "write_image", "write_output"]

_WRITE_SUFFIXES = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}
DECODED_SUFFIX = ".decoded.png"  # default decompress output: x.pqm -> x.decoded.png
_DEFAULT = object()


def read_image(path: str | os.PathLike, max_pixels=_DEFAULT) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB.

    ``max_pixels``: refuse images with more pixels, checked from the file's header before the
    pixels are decoded (default: the codec's ``MAX_DECODE_PIXELS``; ``None``: no limit).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable file,
    an image over ``max_pixels``, an animated or multi-page file, a transparent alpha channel or
    an unsupported pixel format.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if max_pixels is _DEFAULT:
        from pqmim_kernels.models.codec import MAX_DECODE_PIXELS as max_pixels
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an image file")
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with warnings.catch_warnings():
            # Our own limit is lower than Pillow's bomb threshold and is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
        with im:
            width, height = im.size
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(
                    f"{path}: a {width}x{height} image ({width * height} px) is over the "
                    f"codec's limit of {max_pixels} px (MAX_DECODE_PIXELS); split it into tiles"
                )
            frames = getattr(im, "n_frames", 1)
            if frames > 1 and im.format != "MPO":
                raise ValueError(
                    f"{path}: {im.format} file with {frames} frames (animated or multi-page); "
                    "pqmim codes one still image - save the frame you want as PNG first"
                )
            im.load()
            return _to_rgb8(ImageOps.exif_transpose(im), path)
    except Image.DecompressionBombError as exc:  # over Pillow's hard limit, far above ours
        raise ValueError(
            f"{path}: the image is over the codec's limit of {max_pixels} px "
            "(MAX_DECODE_PIXELS); split it into tiles"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not an image Pillow can read") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def _to_rgb8(im, path) -> np.ndarray:
    import numpy as np

    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit (or 32-bit int) grey: round to 8 bits (65535 -> 255).
        arr = np.asarray(im, dtype=np.float64)
        scale = 257.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        grey = np.clip(np.rint(arr / scale), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("1", "L"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode in ("LA", "RGBA", "PA", "La", "RGBa"):
        arr = np.asarray(im.convert("RGBA"), dtype=np.uint8)
        if (arr[..., 3] != 255).any():
            raise ValueError(
                f"{path}: image has transparent pixels (alpha channel); PQ-MIM codes RGB only "
                "- flatten it onto a background first"
            )
        return np.ascontiguousarray(arr[..., :3])
    if mode in ("RGB", "CMYK", "YCbCr"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    raise ValueError(f"{path}: unsupported pixel format {mode!r} (need RGB, grey or RGBA)")


def encode_image(img: np.ndarray, suffix: str) -> bytes:
    """uint8 (H, W, 3) -> the bytes of a lossless image file of the format named by ``suffix``
    (.png, .bmp, .tif, .tiff, .ppm)."""
    import io

    from PIL import Image

    fmt = _WRITE_SUFFIXES.get(suffix.lower())
    if fmt is None:
        raise ValueError(
            f"unsupported image suffix {suffix!r}; use one of " + ", ".join(sorted(_WRITE_SUFFIXES))
        )
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write uint8 (H, W, 3) as a lossless image chosen by the suffix (.png, .bmp, .tif, .ppm)."""
    path = Path(path)
    if path.suffix.lower() not in _WRITE_SUFFIXES:
        raise ValueError(
            f"output {path}: unsupported suffix {path.suffix!r}; use one of "
            + ", ".join(sorted(_WRITE_SUFFIXES))
        )
    path.write_bytes(encode_image(img, path.suffix))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """RGB PSNR in dB of two uint8 (H, W, 3) images (inf when identical)."""
    import numpy as np

    if a.shape != b.shape:
        raise ValueError(f"PSNR: images differ in size, {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def check_output(out: str | os.PathLike, inputs=(), force: bool = False) -> None:
    """Refuse an output path before any work: a folder (or a name ending in a separator), one of
    ``inputs`` (never overwritten, even with ``force``), an existing file without ``force``, a
    missing or unwritable folder. Raises ``ValueError`` with a one-line message naming the
    path."""
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        raise ValueError(
            f"output {out} is a folder; give a file name, e.g. -o {Path(out) / 'name'}"
        )
    out = Path(out)
    for src in inputs:
        if src is None:
            continue
        src = Path(src)
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            same = os.path.samefile(out, src)
        if same:
            raise ValueError(
                f"output {out} is the input file {src}; refusing to overwrite an input "
                "(give another -o)"
            )
    folder = out.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ValueError(f"output folder {folder} {what} (for output {out})")
    if out.exists() and not force:
        raise ValueError(f"output {out} already exists; pass --force to overwrite it")
    try:  # the only reliable writability test (root, read-only mounts, ACLs): create a file
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pqmim-", suffix=".tmp")
    except OSError as exc:
        raise ValueError(f"output folder {folder} is not writable ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def write_output(out: Path, data: bytes, force: bool = False) -> None:
    """Write ``data`` to ``out``: a new file (never one that appeared since
    :func:`check_output`), or with ``force`` an atomic replacement via a temporary file in the
    same folder (the old file stays intact if writing fails)."""
    out = Path(out)
    if not force:
        try:
            with open(out, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise ValueError(f"output {out} already exists; pass --force to overwrite it") from None
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        return
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _rate_lambda(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def _latent_steps(text: str) -> int:
    from pqmim_kernels.models.latent_opt import MAX_LATENT_STEPS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if not 0 <= value <= MAX_LATENT_STEPS:
        raise argparse.ArgumentTypeError(
            f"expected an integer in [0, {MAX_LATENT_STEPS}], got {value}"
        )
    return value


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "compress",
        help="compress an image (PNG/JPEG) to a .pqm file",
        description="Compress an image to a .pqm file with a PQ-MIM model. Never overwrites the "
        "input, nor an existing file without --force.",
    )
    c.add_argument("input", help="image file (PNG, JPEG, ...)")
    c.add_argument("-o", "--output", help="output .pqm (default: input with suffix .pqm)")
    c.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    # PSNR is always printed now; --psnr is still accepted so older scripts run
    c.add_argument("--psnr", action="store_true", help=argparse.SUPPRESS)
    c.add_argument(
        "--stages",
        type=_positive_int,
        default=None,
        help="send only the first N coding stages; the decoder fills the rest (default: all)",
    )
    c.add_argument(
        "--quality",
        type=_positive_int,
        default=None,
        help="the bundled model (preset) of this quality level, 1 = smallest files (default: "
        "the default preset)",
    )
    c.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=None,
        help="the best file within this many bytes (whole file): without --model or --quality, "
        "the highest-quality preset whose complete file fits, else the partial file (fewer "
        "coding stages, the decoder fills the rest) that codes the most of the image; with "
        "them, as many stages of that model as fit. A warning says when not all stages fit",
    )
    c.add_argument(
        "--rate-lambda",
        type=_rate_lambda,
        default=0.0,
        metavar="LAMBDA",
        help="rate-aware code assignment: each sub-code minimises squared latent distance + "
        "LAMBDA x its exact bits in context, so files get smaller for a little more distortion "
        "(0 = nearest codewords; with the default model 0.002 saves ~10 %% of the bits for "
        "~0.05 dB, 0.005 ~16 %% for ~0.2 dB). Any decoder reads the files",
    )
    c.add_argument(
        "--latent-steps",
        type=_latent_steps,
        default=0,
        metavar="N",
        help="decoder-aware encoding: N gradient steps (through the decoder) searching for codes "
        "the decoder draws closer to the image, before they are coded (0 = the encoder's own "
        "codes; ~0.3 s per step for a Kodak image on 2 CPU threads). Best with a small "
        "--rate-lambda, which keeps the file size where it was: 30 steps and 0.0005 gave "
        "+0.37 dB with preset high on held-out photos. Any decoder reads the files",
    )
    c.add_argument(
        "--no-downscale",
        action="store_true",
        help="with --max-bytes: only full-resolution files (by default, when no complete file "
        "fits, a complete file of the image shrunk 2, 4 or 8 times competes with the partial "
        "file, and the better PSNR wins)",
    )
    _common(c, "the default preset; see --quality and --max-bytes")
    c.set_defaults(func=run_compress)
    d = subparsers.add_parser(
        "decompress",
        help="decompress a .pqm file to an image (PNG)",
        description="Decompress a .pqm file to a lossless image file (PNG by default). Never "
        "overwrites an input, nor an existing file without --force.",
    )
    d.add_argument("input", help=".pqm file")
    d.add_argument(
        "-o",
        "--output",
        help=f"output image, .png/.bmp/.tif/.ppm (default: input with suffix {DECODED_SUFFIX}, "
        "e.g. photo.pqm -> photo.decoded.png)",
    )
    d.add_argument("-f", "--force", action="store_true", help="overwrite an existing output")
    d.add_argument("--original", help="original image: print the PSNR against it")
    d.add_argument(
        "--fill",
        choices=("greedy", "sample"),
        default="greedy",
        help="how the decoder fills the coding stages a partial file does not send: the most "
        "likely codes, or MaskGIT-style sampling (a plausible image; another --seed gives "
        "another one)",
    )
    d.add_argument(
        "--decoder",
        choices=("mse", "perceptual"),
        default="mse",
        help="the synthesis transform: trained for PSNR, or the adversarially fine-tuned one "
        "(sharper; needs a model with a perceptual decoder, see `pqmim finetune-perceptual`)",
    )
    d.add_argument("--seed", type=int, default=0, help="--fill sample: random seed (>= 0)")
    d.add_argument(
        "--iterations", type=_positive_int, default=8, help="--fill sample: sampling rounds"
    )
    d.add_argument(
        "--temperature", type=float, default=1.0, help="--fill sample: temperature (0.05..20)"
    )
    _common(d, "the bundled preset that made the file, found by the model id in its header")
    d.set_defaults(func=run_decompress)


def _common(p, default: str) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"a preset name (e.g. default) or a model file (default: {default})",
    )
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (decode on the same kind)")


def _model_inputs(args) -> list[Path]:
    if args.model is None:
        return []
    from pqmim_kernels.models import presets

    return [] if presets.find(args.model) is not None else [Path(args.model)]


def _check_device(args) -> None:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: CUDA is not available here")


def _load(args):
    from pqmim_kernels.models import load_model

    _check_device(args)
    return load_model(args.model, device=args.device)


def _min_file_bytes(height: int, width: int, first_stage_tokens: int = 0) -> int:
    """Fewest bytes any one-stage ``.pqm`` file of this size can have: its header (the payload's
    compact rANS framing can be empty; ``first_stage_tokens`` is kept for callers)."""
    from pqmim_kernels.coding import pqm_format

    header = pqm_format.PqmHeader(b"\0\0", height, width, 1, check=0)
    return len(pqm_format.pack(header, b""))


def _existing_input(name: str, what: str) -> Path:
    path = Path(name)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not {'an' if what[0] in 'aeiou' else 'a'} {what}")
    if not path.is_file():
        raise FileNotFoundError(f"no such {what}: {path}")
    return path


def run_compress(args) -> int:
    if args.stages is not None and args.max_bytes is not None:
        raise ValueError("give --stages or --max-bytes, not both")
    if args.model is not None and args.quality is not None:
        raise ValueError("give --model or --quality, not both")
    src = _existing_input(args.input, "image file")
    out = args.output or src.with_suffix(".pqm")
    check_output(out, [src, *_model_inputs(args)], args.force)
    out = Path(out)
    img = read_image(src)
    h, w = img.shape[:2]
    from pqmim_kernels.models import (
        compress_image,
        compress_to_fit,
        decompress_image,
        preset_model,
        presets,
    )

    if args.max_bytes is not None:
        least = _min_file_bytes(h, w)
        if args.max_bytes < least:
            raise ValueError(
                f"--max-bytes {args.max_bytes} is below the smallest possible .pqm file of a "
                f"{w}x{h} image ({least} bytes: header and one coding stage)"
            )
    _check_device(args)
    if args.model is not None:
        model, preset = _load(args), None
    else:
        if args.quality is not None:
            candidates = [presets.by_quality(args.quality)]
        elif args.max_bytes is not None:
            candidates = list(presets.registry())  # search them all
        else:
            candidates = [presets.default()]
        models = [preset_model(p, args.device) for p in candidates]  # loaded before the clock
        model, preset = models[-1], candidates[-1]  # a --max-bytes search picks its own
    if args.stages is not None and args.stages > model.config.stages:
        raise ValueError(f"--stages {args.stages}: the model codes {model.config.stages} stages")
    t0 = time.perf_counter()
    lam, steps = args.rate_lambda, args.latent_steps
    bar = steps > 0 and sys.stderr.isatty()
    if args.max_bytes is not None:
        fit = compress_to_fit(
            img, args.max_bytes, None if preset is None else candidates, device=args.device,
            downscale=not args.no_downscale, rate_lambda=lam,
            model=model if preset is None else None, latent_steps=steps, progress=bar,
        )  # fmt: skip
        data, model, preset, lam = fit.data, fit.model, fit.preset, fit.rate_lambda
    else:
        data = compress_image(
            img, model, stages=args.stages, rate_lambda=lam, latent_steps=steps, progress=bar
        )
    dt = time.perf_counter() - t0
    total = model.config.stages
    write_output(out, data, args.force)
    sent, shrunk = _stages_sent(data), _downscale(data)
    if sent == total and not shrunk and lam == 0 and steps == 0:
        # Decoding is bit-exact in the codes, so the decoder's image is the conv decoder applied
        # to the encoder's codes: no entropy decoding needed for the PSNR.
        recon = _reconstruct(img, model)
    else:  # the receiver fills the unsent stages: decode the file as it would
        recon = decompress_image(data, model)
    quality = psnr(img, recon)
    print(
        f"{src} ({w}x{h}) -> {out}: {len(data)} bytes, "
        f"{8 * len(data) / (h * w):.4f} bpp, encode {dt:.3f} s, PSNR {quality:.2f} dB"
        + ("" if sent == total else f" ({sent} of {total} stages)")
        + ("" if not shrunk else f" (image shrunk {1 << shrunk}x)")
        + ("" if preset is None else f", quality {preset.quality} (preset {preset.name})")
        + ("" if lam == 0 else f", rate lambda {lam:g}")
        + ("" if steps == 0 else f", {steps} latent steps")
    )
    if args.max_bytes is not None and sent < total:
        print(
            f"pqmim compress: warning: --max-bytes {args.max_bytes} holds only {sent} of {total} "
            f"coding stages; the decoder predicts the rest (PSNR {quality:.2f} dB)",
            file=sys.stderr,
        )
    elif args.max_bytes is not None and shrunk:
        print(
            f"pqmim compress: warning: --max-bytes {args.max_bytes} holds the image only shrunk "
            f"{1 << shrunk}x; the decoder enlarges it (PSNR {quality:.2f} dB)",
            file=sys.stderr,
        )
    return 0


def _stages_sent(data: bytes) -> int:
    """Number of coding stages a ``.pqm`` file holds (from its header)."""
    from pqmim_kernels.coding import pqm_format

    return pqm_format.unpack(data)[0].stages_sent


def _downscale(data: bytes) -> int:
    """The downscale exponent of a ``.pqm`` file (0: full resolution)."""
    from pqmim_kernels.coding import pqm_format

    return pqm_format.unpack(data)[0].downscale


def _reconstruct(img: np.ndarray, model) -> np.ndarray:
    """uint8 (H, W, 3) -> what ``pqmim decompress`` returns for its full-stage file (uint8)."""
    import torch

    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div(255.0)
    y = model.decode_codes(model.encode_codes(x.to(model._device())), img.shape[:2])
    return (y[0].permute(1, 2, 0).cpu() * 255.0).round().to(torch.uint8).numpy()


def _no_perceptual(model, preset) -> str:
    """Why ``--decoder perceptual`` cannot decode with ``model``, and which presets can."""
    from pqmim_kernels.models import preset_model, presets

    which = f"preset {preset.name}" if preset is not None else "the model given"
    have = [p.name for p in presets.every() if preset_model(p).perceptual_decoder is not None]
    can = f" (presets with one, each for its own files: {', '.join(have)})" if have else ""
    return (
        f"--decoder perceptual: {which} (model {model.model_id().hex()}) has no perceptual "
        f"decoder{can}. Use --decoder mse, or train one with `pqmim finetune-perceptual`"
    )


def run_decompress(args) -> int:
    from pqmim_kernels.coding import pqm_format

    src = _existing_input(args.input, ".pqm file")
    original = _existing_input(args.original, "image file") if args.original else None
    out = args.output or src.with_suffix(DECODED_SUFFIX)
    check_output(out, [src, original, *_model_inputs(args)], args.force)
    out = Path(out)
    if out.suffix.lower() not in _WRITE_SUFFIXES:
        raise ValueError(
            f"output {out}: unsupported suffix {out.suffix!r}; use one of "
            + ", ".join(sorted(_WRITE_SUFFIXES))
        )
    data = src.read_bytes()
    header, _ = pqm_format.unpack(data)  # a foreign or truncated file fails here, cheaply
    ref = read_image(original) if original is not None else None
    if ref is not None and ref.shape[:2] != (header.height, header.width):
        raise ValueError(
            f"--original {original} is {ref.shape[1]}x{ref.shape[0]} but {src} holds a "
            f"{header.width}x{header.height} image"
        )
    from pqmim_kernels.models import decompress_image, model_for_file

    if args.model is not None:
        model, preset = _load(args), None
    else:
        _check_device(args)
        model, preset = model_for_file(data, device=args.device)
    if args.decoder == "perceptual" and model.perceptual_decoder is None:
        raise ValueError(_no_perceptual(model, preset))
    t0 = time.perf_counter()
    img = decompress_image(
        data, model, fill=args.fill, seed=args.seed, iterations=args.iterations,
        temperature=args.temperature, decoder=args.decoder,
    )  # fmt: skip
    dt = time.perf_counter() - t0
    write_output(out, encode_image(img, out.suffix), args.force)
    h, w = img.shape[:2]
    msg = (
        f"{src} -> {out} ({w}x{h}): {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp, "
        f"decode {dt:.3f} s"
    )
    if ref is not None:
        msg += f", PSNR {psnr(ref, img):.2f} dB"
    print(msg)
    return 0

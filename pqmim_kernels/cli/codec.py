"""``pqmim compress`` and ``pqmim decompress``: image files <-> ``.pqm`` files.

Input images: PNG or JPEG (anything Pillow opens), 8-bit RGB; grey is expanded to RGB; 16-bit
grey is rounded to 8 bits and 16-bit RGB is reduced to 8 bits by Pillow (high byte); palette
images are expanded; the EXIF orientation of a photo is applied; an alpha channel is dropped
when fully opaque and refused otherwise (PQ-MIM codes RGB only). Any size: the codec pads to
multiples of 16 by edge replication and crops after decoding.

Both commands print the file size, bits per pixel of the whole file, the time, and the PSNR
whenever the original is known (always for ``compress``; ``decompress --original FILE``).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

__all__ = ["psnr", "read_image", "register", "write_image"]

_WRITE_SUFFIXES = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF", ".ppm": "PPM"}


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unreadable file,
    a transparent alpha channel or an unsupported pixel format.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such image file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return _to_rgb8(ImageOps.exif_transpose(im), path)
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path}: not an image Pillow can read") from exc
    except OSError as exc:
        raise ValueError(f"{path}: cannot decode image ({exc})") from exc


def _to_rgb8(im, path) -> np.ndarray:
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


def write_image(path: str | os.PathLike, img: np.ndarray) -> None:
    """Write uint8 (H, W, 3) as a lossless image chosen by the suffix (.png, .bmp, .tif, .ppm)."""
    from PIL import Image

    path = Path(path)
    fmt = _WRITE_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"output {path}: unsupported suffix {path.suffix!r}; use one of "
            + ", ".join(sorted(_WRITE_SUFFIXES))
        )
    Image.fromarray(img, "RGB").save(path, format=fmt)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """RGB PSNR in dB of two uint8 (H, W, 3) images (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR: images differ in size, {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def register(subparsers) -> None:
    c = subparsers.add_parser(
        "compress",
        help="compress an image (PNG/JPEG) to a .pqm file",
        description="Compress an image to a .pqm file with a PQ-MIM model.",
    )
    c.add_argument("input", help="image file (PNG, JPEG, ...)")
    c.add_argument("-o", "--output", help="output .pqm (default: input with suffix .pqm)")
    # PSNR is always printed now; --psnr is still accepted so older scripts run
    c.add_argument("--psnr", action="store_true", help=argparse.SUPPRESS)
    c.add_argument(
        "--stages",
        type=int,
        default=None,
        help="send only the first N coding stages; the decoder fills the rest (default: all)",
    )
    c.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="send as many coding stages as fit in this many bytes (whole file; the decoder "
        "fills the rest)",
    )
    _common(c)
    c.set_defaults(func=run_compress)
    d = subparsers.add_parser(
        "decompress",
        help="decompress a .pqm file to an image (PNG)",
        description="Decompress a .pqm file to a lossless image file (PNG by default).",
    )
    d.add_argument("input", help=".pqm file")
    d.add_argument("-o", "--output", help="output image (default: input with suffix .png)")
    d.add_argument("--original", help="original image: print the PSNR against it")
    _common(d)
    d.set_defaults(func=run_decompress)


def _common(p) -> None:
    p.add_argument("--model", default="default", help="'default' (bundled) or a model file")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (decode on the same kind)")


def _load(args):
    from pqmim_kernels.models import load_model

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: CUDA is not available here")
    return load_model(args.model, device=args.device)


def run_compress(args) -> int:
    from pqmim_kernels.models import compress_image, decompress_image

    img = read_image(args.input)
    out = Path(args.output) if args.output else Path(args.input).with_suffix(".pqm")
    model = _load(args)
    t0 = time.perf_counter()
    if args.stages is not None and args.max_bytes is not None:
        raise ValueError("give --stages or --max-bytes, not both")
    data = compress_image(img, model, stages=args.stages, max_bytes=args.max_bytes)
    dt = time.perf_counter() - t0
    out.write_bytes(data)
    h, w = img.shape[:2]
    sent = _stages_sent(data)
    if sent == model.config.stages:
        # Decoding is bit-exact in the codes, so the decoder's image is the conv decoder applied
        # to the encoder's codes: no entropy decoding needed for the PSNR.
        recon = _reconstruct(img, model)
    else:  # the receiver fills the unsent stages: decode the file as it would
        recon = decompress_image(data, model)
    print(
        f"{args.input} ({w}x{h}) -> {out}: {len(data)} bytes, "
        f"{8 * len(data) / (h * w):.4f} bpp, encode {dt:.3f} s, PSNR {psnr(img, recon):.2f} dB"
        + ("" if sent == model.config.stages else f" ({sent} of {model.config.stages} stages)")
    )
    return 0


def _stages_sent(data: bytes) -> int:
    """Number of coding stages a ``.pqm`` file holds (from its header)."""
    from pqmim_kernels.coding import pqm_format

    return pqm_format.unpack(data)[0].stages_sent


def _reconstruct(img: np.ndarray, model) -> np.ndarray:
    """uint8 (H, W, 3) -> what ``pqmim decompress`` returns for its full-stage file (uint8)."""
    import torch

    x = torch.from_numpy(img.copy()).permute(2, 0, 1)[None].float().div(255.0)
    y = model.decode_codes(model.encode_codes(x.to(model._device())), img.shape[:2])
    return (y[0].permute(1, 2, 0).cpu() * 255.0).round().to(torch.uint8).numpy()


def run_decompress(args) -> int:
    from pqmim_kernels.models import decompress_image

    src = Path(args.input)
    if not src.is_file():
        raise FileNotFoundError(f"no such .pqm file: {src}")
    data = src.read_bytes()
    out = Path(args.output) if args.output else src.with_suffix(".png")
    if out.suffix.lower() not in _WRITE_SUFFIXES:
        raise ValueError(
            f"output {out}: unsupported suffix {out.suffix!r}; use one of "
            + ", ".join(sorted(_WRITE_SUFFIXES))
        )
    original = read_image(args.original) if args.original else None
    model = _load(args)
    t0 = time.perf_counter()
    img = decompress_image(data, model)
    dt = time.perf_counter() - t0
    write_image(out, img)
    h, w = img.shape[:2]
    msg = (
        f"{src} -> {out} ({w}x{h}): {len(data)} bytes, {8 * len(data) / (h * w):.4f} bpp, "
        f"decode {dt:.3f} s"
    )
    if original is not None:
        msg += f", PSNR {psnr(original, img):.2f} dB"
    print(msg)
    return 0

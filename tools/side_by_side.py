"""Side-by-side crops: PQ-MIM against JPEG and WebP at (at most) the same file size.

    python tools/side_by_side.py ../shared/data/kodak --images kodim04,kodim19,kodim23 \\
        --perceptual --out results/kodak/side_by_side

For every image and every bundled preset (``--presets``), the image is compressed with the
preset (all stages); then JPEG 4:2:0 and WebP (Pillow) are encoded at every quality 1-100 and the
one with the best PSNR among those whose file is no larger than PQ-MIM's is kept. When even
quality 1 is larger, quality 1 is shown and its label says so (its real size is printed). Each
row of the picture is one (image, preset): original | PQ-MIM | JPEG | WebP, a ``--crop``-pixel
square at ``--at`` (default the centre), at native resolution, labelled with the whole file's
size in bytes and the whole image's RGB PSNR. ``--perceptual`` adds the same file decoded with
the preset's perceptual decoder after PQ-MIM's (every preset chosen must have one). Writes
``OUT.png`` and ``OUT.json`` (every figure) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def best_under(codec, img: np.ndarray, max_bytes: int) -> dict:
    """The quality (1-100) of ``codec`` with the best PSNR among files of at most ``max_bytes``
    bytes; quality 1 with ``"fits": False`` when none is that small."""
    from pqmim_kernels.evaluation.metrics import psnr

    best = None
    for q in range(1, 101):
        data = codec.encode(img, q)
        if len(data) > max_bytes and q > 1:
            continue
        rec = codec.decode(data, q)
        row = {"quality": q, "bytes": len(data), "psnr": psnr(img, rec), "rec": rec,
               "fits": len(data) <= max_bytes}  # fmt: skip
        if q == 1 and not row["fits"]:
            return row
        if best is None or row["psnr"] > best["psnr"]:
            best = row
    return best


def crop_box(shape, side: int, at: tuple[int, int] | None) -> tuple[int, int]:
    """Top-left corner of a ``side``-pixel square: ``at`` (clamped into the image) or centred."""
    h, w = shape[:2]
    y, x = at if at is not None else ((h - side) // 2, (w - side) // 2)
    return min(max(0, y), max(0, h - side)), min(max(0, x), max(0, w - side))


def _tile(img: np.ndarray, y: int, x: int, side: int, lines: list[str]):
    from PIL import Image, ImageDraw

    tile = Image.fromarray(np.ascontiguousarray(img[y : y + side, x : x + side]))
    canvas = Image.new("RGB", (tile.width, tile.height + 14 * len(lines) + 4), "white")
    canvas.paste(tile, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((3, tile.height + 2 + 14 * i), line, fill="black")
    return canvas


def main(argv=None) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.evaluation.codecs import PillowJPEG, PillowWebP
    from pqmim_kernels.evaluation.metrics import psnr
    from pqmim_kernels.models import compress_image, decompress_image, preset_model, presets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="a folder of PNG images (e.g. ../shared/data/kodak)")
    p.add_argument("--images", dest="names", default="kodim04,kodim19,kodim23",
                   help="image file stems, comma-separated")  # fmt: skip
    p.add_argument("--presets", default="all", help="preset names, comma-separated, or 'all'")
    p.add_argument("--crop", type=int, default=192, help="side of the square crop (pixels)")
    p.add_argument("--at", default="", help="top-left corner 'y,x' of the crop (default centre)")
    p.add_argument("--out", required=True, help="output path without suffix (.png and .json)")
    p.add_argument(
        "--perceptual", action="store_true",
        help="add a column: the same file decoded with the preset's perceptual decoder",
    )  # fmt: skip
    args = p.parse_args(argv)

    folder = Path(args.images)
    names = [n.strip() for n in args.names.split(",") if n.strip()]
    paths = [folder / f"{n}.png" for n in names]
    missing = [str(q) for q in paths if not q.is_file()]
    if missing:
        p.error(f"no such image: {', '.join(missing)}")
    chosen = presets.names() if args.presets == "all" else tuple(args.presets.split(","))
    for name in chosen:
        preset = presets.get(name)  # ValueError listing the presets when unknown
        if args.perceptual and preset_model(preset).perceptual_decoder is None:
            p.error(f"--perceptual: preset {name} has no perceptual decoder")
    if args.crop < 16:
        p.error(f"--crop must be at least 16, got {args.crop}")
    at = None
    if args.at:
        try:
            y, x = (int(v) for v in args.at.split(","))
        except ValueError:
            p.error(f"--at must be 'y,x' (two ints), got {args.at!r}")
        at = (y, x)
    jpeg, webp = PillowJPEG("4:2:0"), PillowWebP()
    webp.check_available()

    rows, tiles = [], []
    work = [(path, name) for path in paths for name in chosen]
    for path, name in tqdm(work, desc="side by side", unit="row"):
        img = read_image(str(path))
        model = preset_model(presets.get(name))  # loaded once per preset
        data = compress_image(img, model)
        ours = decompress_image(data, model)
        row = {"image": path.stem, "preset": name, "pqmim_bytes": len(data),
               "pqmim_psnr": psnr(img, ours)}  # fmt: skip
        others = {
            "jpeg": best_under(jpeg, img, len(data)),
            "webp": best_under(webp, img, len(data)),
        }
        for key, r in others.items():
            row.update({f"{key}_{k}": r[k] for k in ("quality", "bytes", "psnr", "fits")})
        if args.perceptual:
            sharp = decompress_image(data, model, decoder="perceptual")
            row["pqmim_perceptual_psnr"] = psnr(img, sharp)
        rows.append(row)
        y, x = crop_box(img.shape, args.crop, at)

        def label(codec: str, r: dict) -> list[str]:
            head = f"{codec} q{r['quality']}" + ("" if r["fits"] else " (smallest)")
            return [head, f"{r['bytes']:,} B, {r['psnr']:.2f} dB"]

        row_tiles = [
            _tile(img, y, x, args.crop, [path.stem, f"{img.shape[1]}x{img.shape[0]}"]),
            _tile(ours, y, x, args.crop, [f"PQ-MIM {name}", f"{len(data):,} B, "
                                          f"{row['pqmim_psnr']:.2f} dB"]),
        ]  # fmt: skip
        if args.perceptual:
            row_tiles.append(_tile(sharp, y, x, args.crop, [
                f"PQ-MIM {name} perceptual",
                f"same file, {row['pqmim_perceptual_psnr']:.2f} dB"]))  # fmt: skip
        tiles.append([
            *row_tiles,
            _tile(others["jpeg"]["rec"], y, x, args.crop, label("JPEG 4:2:0", others["jpeg"])),
            _tile(others["webp"]["rec"], y, x, args.crop, label("WebP", others["webp"])),
        ])  # fmt: skip

    gap = 4
    tw, th = tiles[0][0].width, tiles[0][0].height
    cols = len(tiles[0])
    sheet = Image.new(
        "RGB", (cols * tw + (cols - 1) * gap, len(tiles) * th + (len(tiles) - 1) * gap), "white"
    )
    for i, row_tiles in enumerate(tiles):
        for j, t in enumerate(row_tiles):
            sheet.paste(t, (j * (tw + gap), i * (th + gap)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out.with_suffix(".png"), optimize=True)
    meta = {"crop": args.crop, "at": args.at or "centre", "jpeg": jpeg.describe(),
            "webp": webp.describe(), "rows": rows}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    extra = " perceptual dB |" if args.perceptual else ""
    print(f"| image | preset | PQ-MIM B / dB |{extra} JPEG q, B / dB | WebP q, B / dB |")
    print("|---|---|---:|" + ("---:|" if args.perceptual else "") + "---:|---:|")
    for r in rows:
        cells = [f"{r['pqmim_bytes']:,} / {r['pqmim_psnr']:.2f}"]
        if args.perceptual:
            cells.append(f"{r['pqmim_perceptual_psnr']:.2f}")
        for key in ("jpeg", "webp"):
            mark = "" if r[f"{key}_fits"] else " (over)"
            cells.append(f"q{r[f'{key}_quality']}, {r[f'{key}_bytes']:,} / "
                         f"{r[f'{key}_psnr']:.2f}{mark}")  # fmt: skip
        print(f"| {r['image']} | {r['preset']} | " + " | ".join(cells) + " |")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

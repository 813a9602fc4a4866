"""The extreme regime end to end (issue 13): every image in at most ``--max-bytes`` bytes.

    python tools/tiny_files.py ../shared/data/kodak --max-bytes 200 --out results/tiny

For each image: ``pqmim compress --max-bytes B`` (the budget search of
:func:`pqmim_kernels.models.compress_to_fit`: fewer stages and/or a shrunk image), decoded three
ways (greedy fill + MSE decoder; MaskGIT-style sampled fill + the perceptual decoder when the
model has one; the same sampled fill + MSE decoder), and JPEG at its smallest possible size
(Pillow, quality 1, 4:2:0) for comparison. Writes ``results.json`` (bytes, stages sent,
downscale, PSNR, high-frequency energy ratio of each decode), ``contact_sheet.jpg`` (a row
per image: original | B-byte greedy | B-byte sampled (+ perceptual) | the hybrid file | smallest
JPEG, each labelled with its size; the first ``--excerpt`` rows also in
``contact_sheet_excerpt.jpg``), and prints a summary. The hybrid file (``--hybrid-downscale
k``, default 2) codes the image shrunk 2^k with as many stages as fit and samples the rest: the
budget search prefers whatever has the highest PSNR, which at 200 bytes is usually a complete
file of the image shrunk 8x, so this column shows what sampling adds at a larger coded size.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    from pqmim_kernels.evaluation.metrics import psnr

    return psnr(a, b)


def _sharp(a: np.ndarray, ref: np.ndarray) -> float:
    import torch

    from pqmim_kernels.models.perceptual import sharpness

    def t(x):
        return torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 255

    return sharpness(t(a), t(ref))


def _smallest_jpeg(img: np.ndarray) -> tuple[bytes, np.ndarray]:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=1, subsampling=2)
    data = buf.getvalue()
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _thumb(img: np.ndarray, width: int, label: str):
    from PIL import Image, ImageDraw

    im = Image.fromarray(img)
    im = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
    draw = ImageDraw.Draw(im)
    draw.rectangle([0, 0, 7 * len(label) + 6, 14], fill=(0, 0, 0))
    draw.text((3, 1), label, fill=(255, 255, 255))
    return im


def _hybrid(model, img: np.ndarray, args, perceptual: bool):
    """The hybrid regime at the budget: the image shrunk ``2**args.hybrid_downscale``, the most
    stages that fit, the rest sampled, decoded with the perceptual decoder when there is one.
    Returns (row fields, decoded image, label), or None when not even one stage fits."""
    from pqmim_kernels.coding import pqm_format
    from pqmim_kernels.models import _as_tensor, _Encodings, _fit_stages, decompress_image

    enc, k = _Encodings(_as_tensor(img)), args.hybrid_downscale
    data = enc.compress(model, k)
    if len(data) > args.max_bytes:
        data = _fit_stages(model, enc, args.max_bytes, len(data), k)[0]
    if data is None:
        return None
    sent = pqm_format.unpack(data)[0].stages_sent
    dec = "perceptual" if perceptual else "mse"
    rec = decompress_image(data, model, fill="sample", seed=args.seed, decoder=dec)
    fields = {
        "hybrid_bytes": len(data),
        "hybrid_stages_sent": sent,
        "hybrid_downscale": k,
        "psnr_hybrid": _psnr(img, rec),
        "sharpness_hybrid": _sharp(rec, img),
    }
    label = f"{len(data)} B 1/{2**k} size {sent} st. sampled" + (" perc." if perceptual else "")
    return fields, rec, label


def main(argv=None) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.coding import pqm_format
    from pqmim_kernels.models import compress_image, decompress_image, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="a folder of images (e.g. ../shared/data/kodak)")
    p.add_argument("--max-bytes", type=int, default=200)
    p.add_argument("--model", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--thumb", type=int, default=256, help="contact-sheet cell width (pixels)")
    p.add_argument("--excerpt", type=int, default=4, help="rows in contact_sheet_excerpt.jpg")
    p.add_argument(
        "--hybrid-downscale", type=int, default=2,
        help="also the hybrid file: the image shrunk 2^k, as many stages as fit, the rest "
        "sampled (0 = leave that column out)",
    )  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    perceptual = model.perceptual_decoder is not None
    files = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() == ".png")
    rows, cells = [], []
    for path in tqdm(files, desc=f"{args.max_bytes}-byte files"):
        img = read_image(path)
        data = compress_image(img, model, max_bytes=args.max_bytes)
        hdr, _ = pqm_format.unpack(data)
        greedy = decompress_image(data, model)
        sampled = decompress_image(data, model, fill="sample", seed=args.seed)
        best = (
            decompress_image(data, model, fill="sample", seed=args.seed, decoder="perceptual")
            if perceptual
            else sampled
        )
        jpeg, jpeg_img = _smallest_jpeg(img)
        hybrid = _hybrid(model, img, args, perceptual) if args.hybrid_downscale else None
        rows.append(
            {
                "image": path.name,
                "bytes": len(data),
                "stages_sent": hdr.stages_sent,
                "downscale": hdr.downscale,
                "psnr_greedy": _psnr(img, greedy),
                "psnr_sampled": _psnr(img, sampled),
                "psnr_sampled_perceptual": _psnr(img, best) if perceptual else None,
                "sharpness_greedy": _sharp(greedy, img),
                "sharpness_sampled": _sharp(sampled, img),
                "sharpness_sampled_perceptual": _sharp(best, img) if perceptual else None,
                "jpeg_q1_bytes": len(jpeg),
                "psnr_jpeg_q1": _psnr(img, jpeg_img),
                **({} if hybrid is None else hybrid[0]),
            }
        )
        tag = f"{len(data)} B"
        what = f"{tag} sampled" + (" + perceptual" if perceptual else "")
        cells.append(
            [
                _thumb(img, args.thumb, path.stem),
                _thumb(greedy, args.thumb, f"{tag} greedy"),
                _thumb(best, args.thumb, what),
                *([] if hybrid is None else [_thumb(hybrid[1], args.thumb, hybrid[2])]),
                _thumb(jpeg_img, args.thumb, f"JPEG q1 {len(jpeg)} B"),
            ]
        )
    heights = [max(c.height for c in row) for row in cells]  # portrait rows are taller
    sheet = Image.new("RGB", (len(cells[0]) * args.thumb, sum(heights)), (255, 255, 255))
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            sheet.paste(cell, (c * args.thumb, sum(heights[:r])))
    # JPEG at quality 92 without chroma subsampling keeps the sheet small; the measurements
    # above are of the decodes themselves, not of the sheet
    sheet.save(out / "contact_sheet.jpg", quality=92, subsampling=0)
    if 0 < args.excerpt < len(cells):
        sheet.crop((0, 0, sheet.width, sum(heights[: args.excerpt]))).save(
            out / "contact_sheet_excerpt.jpg", quality=92, subsampling=0
        )

    def mean(key):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    summary = {
        "max_bytes": args.max_bytes,
        "model": args.model,
        "images": len(rows),
        "perceptual_decoder": perceptual,
        "mean": {k: mean(k) for k in dict.fromkeys(k for r in rows for k in r) if k != "image"},
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary["mean"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

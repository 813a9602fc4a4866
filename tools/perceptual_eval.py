"""The perceptual decoder against the MSE decoder on the same files (issue 13).

    python tools/perceptual_eval.py ../shared/data/kodak --model runs/perceptual/model.pt \\
        --stages 10,6,4 --out results/perceptual

Every image is compressed once per number of stages sent; each file is decoded with the MSE
decoder and with the perceptual one (greedy fill for both, so the codes are identical and only
g_s differs; for partial files also sampled fill + perceptual, the hybrid mode). Measured per
decode: RGB PSNR, MS-SSIM and :func:`~pqmim_kernels.models.perceptual.sharpness` (high-frequency
energy relative to the original: 1.0 = as much fine detail, blur < 1). Writes ``results.json``
(every row and the means), ``crops.png`` (256² crops: original | MSE | perceptual, per stage
count) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _measures(img: np.ndarray, rec: np.ndarray) -> dict:
    import torch

    from pqmim_kernels.evaluation.metrics import ms_ssim, psnr
    from pqmim_kernels.models.perceptual import sharpness

    def t(x):
        return torch.from_numpy(x.copy()).permute(2, 0, 1)[None].float() / 255

    return {
        "psnr": psnr(img, rec),
        "ms_ssim": ms_ssim(img, rec),
        "sharpness": sharpness(t(rec), t(img)),
    }


def _crop(img: np.ndarray, side: int) -> np.ndarray:
    h, w = img.shape[:2]
    y, x = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return img[y : y + side, x : x + side]


def main(argv=None) -> int:
    from PIL import Image, ImageDraw
    from tqdm.auto import tqdm

    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.models import compress_image, decompress_image, load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="a folder of PNG images (e.g. ../shared/data/kodak)")
    p.add_argument("--model", required=True, help="a model file with a perceptual decoder")
    p.add_argument("--stages", default="10,6,4", help="stage counts to send, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled fill")
    p.add_argument("--crops", type=int, default=3, help="images shown in crops.png")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    if model.perceptual_decoder is None:
        raise SystemExit(f"{args.model} has no perceptual decoder (pqmim finetune-perceptual)")
    stage_counts = [int(s) for s in args.stages.split(",")]
    files = sorted(q for q in Path(args.images).iterdir() if q.suffix.lower() == ".png")
    if not files:
        raise SystemExit(f"no PNG images in {args.images}")
    rows, sheet = [], []
    for i, path in enumerate(tqdm(files, desc="perceptual vs MSE")):
        img = read_image(path)
        for s in stage_counts:
            data = compress_image(img, model, stages=s)
            decodes = {
                "mse": decompress_image(data, model),
                "perceptual": decompress_image(data, model, decoder="perceptual"),
            }
            if s < model.config.stages:
                decodes["sampled_perceptual"] = decompress_image(
                    data, model, fill="sample", seed=args.seed, decoder="perceptual"
                )
            row = {"image": path.name, "stages": s, "bpp": 8 * len(data) / img[..., 0].size}
            for name, rec in decodes.items():
                row.update({f"{k}_{name}": v for k, v in _measures(img, rec).items()})
            rows.append(row)
            if i < args.crops:
                sheet.append((path.stem, s, [img, decodes["mse"], decodes["perceptual"]]))
    means = {}
    for s in stage_counts:
        sel = [r for r in rows if r["stages"] == s]
        keys = [k for k in sel[0] if k not in ("image", "stages")]
        means[str(s)] = {k: float(np.mean([r[k] for r in sel])) for k in keys}
    (out / "results.json").write_text(json.dumps({"model": args.model, "means": means,
                                                  "rows": rows}, indent=1))  # fmt: skip
    side = 256
    cells = []
    for stem, s, imgs in sheet:
        row = []
        for label, im in zip(("original", f"MSE, {s} st.", f"perceptual, {s} st."), imgs):
            c = Image.fromarray(_crop(im, side))
            d = ImageDraw.Draw(c)
            d.rectangle([0, 0, 7 * len(f"{stem} {label}") + 6, 14], fill=(0, 0, 0))
            d.text((3, 1), f"{stem} {label}", fill=(255, 255, 255))
            row.append(c)
        cells.append(row)
    if cells:
        grid = Image.new("RGB", (3 * side, len(cells) * side), (255, 255, 255))
        for r, row in enumerate(cells):
            for c, im in enumerate(row):
                grid.paste(im, (c * side, r * side))
        grid.save(out / "crops.png")
    print("stages  bpp     PSNR mse/perc (dB)  MS-SSIM mse/perc  sharpness mse/perc  sampled+perc")
    for s, m in means.items():
        extra = (
            f"{m['psnr_sampled_perceptual']:.2f} dB, sharp {m['sharpness_sampled_perceptual']:.2f}"
            if "psnr_sampled_perceptual" in m
            else "-"
        )
        print(
            f"{s:>6}  {m['bpp']:.4f}  {m['psnr_mse']:6.2f} / {m['psnr_perceptual']:6.2f}"
            f"      {m['ms_ssim_mse']:.3f} / {m['ms_ssim_perceptual']:.3f}"
            f"     {m['sharpness_mse']:.2f} / {m['sharpness_perceptual']:.2f}         {extra}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

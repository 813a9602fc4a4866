"""Token-border seams: how visible the 16-px grid of PQ-MIM's tokens is in its decoded images.

    python tools/grid_seams.py ../shared/data/kodak --presets low,medium,high \\
        --out results/kodak/grid_seams.json

For every image and preset (all stages, nearest codewords), ``grid_blockiness`` of the decode
(:mod:`pqmim_kernels.evaluation.metrics`: mean luma step across the 16-px grid lines relative to
the other steps, divided by the same ratio of the original; 1.0 = no seam). For scale, JPEG 4:2:0
(whose 16-px macroblocks lie on the same grid) at the best quality whose file is no larger is
measured too. ``--perceptual``: the same file decoded with the preset's perceptual decoder
too (presets without one are refused). Each decode also gets ``periodic_excess`` at periods 2,
4, 8 and 16 px (how much more a pattern of that period stands out of the spectrum around it
than in the original: the token grid and its 8-px half, a transposed convolution's
checkerboard); the summary gives their geometric means. Prints a table (mean and worst image
per preset) and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PERIODS = (2, 4, 8, 16)
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from tqdm import tqdm

    from pqmim_kernels.cli.codec import read_image
    from pqmim_kernels.evaluation.codecs import PillowJPEG
    from pqmim_kernels.evaluation.metrics import grid_blockiness, periodic_excess, psnr

    def periodic(img, rec) -> dict:
        return {str(k): periodic_excess(img, rec, k) for k in PERIODS}
    from pqmim_kernels.models import compress_image, decompress_image, preset_model, presets

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("images", help="folder of PNG images")
    p.add_argument("--presets", default=",".join(presets.names()), help="comma-separated presets")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--no-jpeg", action="store_true", help="skip the JPEG reference")
    p.add_argument(
        "--perceptual", action="store_true",
        help="also decode each file with the preset's perceptual decoder",
    )  # fmt: skip
    args = p.parse_args(argv)
    files = sorted(Path(args.images).glob("*.png"))
    if not files:
        raise SystemExit(f"grid_seams: no .png images in {args.images}")
    names = [n for n in args.presets.split(",") if n]
    models = {n: preset_model(presets.get(n)) for n in names}
    lacking = [n for n, m in models.items() if m.perceptual_decoder is None]
    if args.perceptual and lacking:
        raise SystemExit(f"grid_seams: --perceptual: no perceptual decoder in {', '.join(lacking)}")
    jpeg = None if args.no_jpeg else PillowJPEG()
    rows = []
    for path in tqdm(files, desc="grid seams", unit="image", file=sys.stderr):
        img = read_image(path)
        for name, model in models.items():
            data = compress_image(img, model)
            rec = decompress_image(data, model)
            row = {"image": path.name, "preset": name, "bytes": len(data),
                   "psnr": psnr(img, rec), "seams": grid_blockiness(img, rec),
                   "periodic": periodic(img, rec)}  # fmt: skip
            if args.perceptual:
                sharp = decompress_image(data, model, decoder="perceptual")
                row.update(perceptual_psnr=psnr(img, sharp),
                           perceptual_seams=grid_blockiness(img, sharp),
                           perceptual_periodic=periodic(img, sharp))  # fmt: skip
            if jpeg is not None:
                best = None
                for q in range(1, 101):
                    enc = jpeg.encode(img, q)
                    if len(enc) > len(data) and q > 1:
                        break
                    best = (q, len(enc), jpeg.decode(enc, q))
                q, size, jrec = best
                row.update(jpeg_quality=q, jpeg_bytes=size, jpeg_seams=grid_blockiness(img, jrec))
            rows.append(row)
    summary = {}
    for name in names:
        mine = [r for r in rows if r["preset"] == name]
        s = [r["seams"] for r in mine]
        worst = max(mine, key=lambda r: r["seams"])
        summary[name] = {
            "model_id": models[name].model_id().hex(),
            "mean_seams": float(np.mean(s)),
            "worst_seams": worst["seams"],
            "worst_image": worst["image"],
            "mean_psnr": float(np.mean([r["psnr"] for r in mine])),
        }
        if jpeg is not None:
            summary[name]["jpeg_mean_seams"] = float(np.mean([r["jpeg_seams"] for r in mine]))
        for key in ("periodic", "perceptual_periodic") if args.perceptual else ("periodic",):
            summary[name][f"geomean_{key}"] = {
                str(k): float(np.exp(np.mean([np.log(r[key][str(k)]) for r in mine])))
                for k in PERIODS
            }
        if args.perceptual:
            for k in ("perceptual_seams", "perceptual_psnr"):
                summary[name][f"mean_{k}"] = float(np.mean([r[k] for r in mine]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"images_dir": args.images, "summary": summary, "rows": rows},
                              indent=1) + "\n")  # fmt: skip
    print(f"{'preset':>12} {'model':>6} {'PSNR':>6} {'seams':>6} {'worst':>14}"
          + ("  JPEG<=size seams" if jpeg is not None else "")
          + ("  perceptual PSNR / seams" if args.perceptual else ""))  # fmt: skip
    for name, s in summary.items():
        line = (f"{name:>12} {s['model_id']:>6} {s['mean_psnr']:6.2f} {s['mean_seams']:6.3f} "
                f"{s['worst_seams']:6.3f} {s['worst_image']:>7}")  # fmt: skip
        if jpeg is not None:
            line += f"  {s['jpeg_mean_seams']:6.3f}"
        if args.perceptual:
            line += f"  {s['mean_perceptual_psnr']:6.2f} / {s['mean_perceptual_seams']:6.3f}"
        print(line)
    print(f"periodic excess (geometric mean; periods {', '.join(map(str, PERIODS))} px)")
    for name, s in summary.items():
        for key in ("periodic", "perceptual_periodic"):
            if f"geomean_{key}" in s:
                vals = " ".join(f"{v:7.2f}" for v in s[f"geomean_{key}"].values())
                print(f"{name:>12} {'MSE' if key == 'periodic' else 'perceptual':>10} {vals}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

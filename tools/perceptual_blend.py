"""Choose how much of a perceptual fine-tuning to keep, on held-out training photos (never Kodak).

    python tools/perceptual_blend.py --model medium --tuned runs/perc_medium/model.pt \\
        --from-variant medium-v1 --images 12 --alphas 1,0.9,0.85,0.75,0.6,0.5 --int8

``--tuned``: a model file whose perceptual decoder is the fine-tuned one (``pqmim
finetune-perceptual --blend 1``); ``--from-variant``: the variant of ``--model``'s file whose
decoder the fine-tuning started from (the line of the blend runs from it), else the model's own.
Every held-out photo (every 10th of ``--data``, the split training uses) is coded once with
``--model``; each blend is then measured against the originals, as stored (``--int8``: int8
rows, as ``save_model(perceptual_int8=True)`` stores it): mean RGB PSNR and sharpness
(high-frequency energy over the original's), next to the MSE decoder's. Prints one JSON line per
blend and, with ``--out``, writes them as a JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from pqmim_kernels.evaluation.metrics import psnr
    from pqmim_kernels.models import (
        _from_int8_rows,
        _int8_rows,
        compress_image,
        decompress_image,
        load_model,
        load_variants,
    )
    from pqmim_kernels.models.perceptual import blend_decoders, sharpness
    from pqmim_kernels.models.train import load_images, split_holdout

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="the preset or model file to code with")
    p.add_argument("--tuned", required=True, help="a model file holding the tuned decoder")
    p.add_argument("--from-variant", default=None, help="the variant the tuning started from")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train"))
    p.add_argument("--images", type=int, default=12, help="the first N held-out photos")
    p.add_argument("--alphas", default="1,0.9,0.85,0.75,0.6,0.5", help="blends to measure")
    p.add_argument("--int8", action="store_true", help="measure each blend stored as int8 rows")
    p.add_argument("--out", default=None, help="a JSON file for the rows")
    args = p.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if args.images < 1 or any(not 0 <= a <= 1 for a in alphas):
        raise SystemExit("perceptual_blend: --images must be >= 1 and every alpha in [0, 1]")

    torch.set_num_threads(1)
    model = load_model(args.model)
    start = load_variants(args.model)[args.from_variant] if args.from_variant else model
    tuned = load_model(args.tuned).perceptual_decoder
    if tuned is None:
        raise SystemExit(f"perceptual_blend: {args.tuned} holds no perceptual decoder")
    _, held = split_holdout(load_images(args.data, 0), 10)
    held = held[: args.images]

    def t(a):
        return torch.from_numpy(a.copy()).permute(2, 0, 1)[None].float() / 255

    coded = []
    for x in tqdm(held, desc="code", leave=False):
        img = x.permute(1, 2, 0).numpy()
        coded.append((img, compress_image(img, model)))
    rows = []
    mse = [decompress_image(d, model) for _, d in coded]
    rows.append({
        "blend": "mse",
        "psnr": float(np.mean([psnr(i, r) for (i, _), r in zip(coded, mse)])),
        "sharpness": float(np.mean([sharpness(t(r), t(i)) for (i, _), r in zip(coded, mse)])),
    })  # fmt: skip
    print(json.dumps(rows[-1]), flush=True)
    for a in alphas:
        dec = blend_decoders(start.decoder, tuned, a)
        if args.int8:
            dec.load_state_dict(_from_int8_rows(_int8_rows(dec.state_dict())))
        model.perceptual_decoder = dec
        rec = [decompress_image(d, model, decoder="perceptual") for _, d in coded]
        rows.append({
            "blend": a,
            "int8": args.int8,
            "psnr": float(np.mean([psnr(i, r) for (i, _), r in zip(coded, rec)])),
            "sharpness": float(np.mean([sharpness(t(r), t(i)) for (i, _), r in zip(coded, rec)])),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"model": args.model, "images": len(held), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``pqmim finetune-perceptual``: add a perceptual decoder to a model file (issue 13).

Fine-tunes a copy of the model's g_s with an adversarial loss on random crops of a folder of
photos (:mod:`pqmim_kernels.models.perceptual`) and writes the model with it to ``--out``. The
codes do not change, so the new file has the same model id and decodes every ``.pqm`` file the
old one wrote, with ``pqmim decompress --decoder perceptual`` or the MSE decoder; the variants
the file holds are kept, and read with the new perceptual decoder too. ``--from-variant NAME``
starts from the decoder of a variant stored in the file instead of the model's own (e.g. the
smaller one a refined decoder grew from: a perceptual decoder of that size costs less).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune-perceptual",
        help="add a perceptual (adversarially fine-tuned) decoder to a model file",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="a preset name or a model file (default: the default preset)"
    )
    p.add_argument("--data", default="../shared/data/train", help="folder of training photos")
    p.add_argument("--out", required=True, help="the model file to write (with the decoder)")
    p.add_argument("--steps", type=int, default=2000, help="fine-tuning steps")
    p.add_argument("--minutes", type=float, default=0.0, help="CPU-minutes budget (0 = none)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=192, help="crop side (multiple of 16)")
    p.add_argument("--adv-weight", type=float, default=0.01, help="weight of the GAN loss")
    p.add_argument(
        "--lf-weight", type=float, default=10.0,
        help="extra weight of the MSE of 8x8 block means (keeps colours; 0 = off)",
    )  # fmt: skip
    p.add_argument(
        "--blend", type=float, default=1.0,
        help="keep this fraction of the fine-tuning (weights interpolated towards the MSE "
        "decoder's: less sharp, higher PSNR)",
    )  # fmt: skip
    p.add_argument(
        "--from-variant", default=None, metavar="NAME",
        help="start from the decoder of this variant of the model file (its size) instead of "
        "the model's own",
    )  # fmt: skip
    p.add_argument(
        "--int8", action="store_true",
        help="store the perceptual decoder's weights as int8 rows with a scale each (half the "
        "size of float16, decodes within ~54 dB PSNR of its float16 ones)",
    )  # fmt: skip
    p.add_argument("--max-images", type=int, default=0, help="use the first N photos (0 = all)")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from pqmim_kernels.cli.codec import check_output
    from pqmim_kernels.cli.refine import source_variants, stored_variants
    from pqmim_kernels.models import load_model, save_model
    from pqmim_kernels.models.perceptual import (
        PerceptualConfig,
        blend_decoders,
        train_perceptual,
    )
    from pqmim_kernels.models.train import load_images, split_holdout

    if args.crop < 16 or args.crop % 16:
        raise ValueError(f"--crop must be a positive multiple of 16, got {args.crop}")
    if not 0 <= args.blend <= 1:
        raise ValueError(f"--blend must be in [0, 1], got {args.blend}")
    check_output(args.out, [], args.force)
    model = load_model(args.model)
    variants = source_variants(args.model)
    if args.from_variant is not None and args.from_variant not in variants:
        raise ValueError(
            f"--from-variant {args.from_variant}: the model file holds no such variant (it "
            f"holds: {', '.join(variants) or 'none'})"
        )
    start = variants[args.from_variant] if args.from_variant else model  # same codes
    images, _ = split_holdout(load_images(args.data, args.max_images), 10)
    cfg = PerceptualConfig(
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        crop=args.crop,
        adv_weight=args.adv_weight,
        lf_weight=args.lf_weight,
    )
    tuned = train_perceptual(start, images, cfg)
    model.perceptual_decoder = blend_decoders(start.decoder, tuned, args.blend)
    options = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool))}
    save_model(
        model,
        Path(args.out),
        extra={**model.training_info, "perceptual": options},
        variants=stored_variants(variants, model, "perceptual"),
        perceptual_int8=args.int8,
    )
    print(f"pqmim finetune-perceptual: wrote {args.out} (model id {model.model_id().hex()})")
    return 0

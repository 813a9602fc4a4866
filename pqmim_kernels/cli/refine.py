"""``pqmim refine-decoder`` / ``pqmim refine-encoder``: train one half of a trained model further.

Codes every training photo once with the model's encoder and quantizer, grows the decoder by
``--extra-blocks`` residual blocks (each starting as the identity) and trains it with MSE on
those codes (:mod:`pqmim_kernels.models.refine`); held-out photos (every 10th) are measured
along the way. The encoder, quantizer and entropy model are unchanged, so files cost the same
bits; the refined model has a new model id. ``--keep-variant NAME`` stores the source model's
decoder in the new file too, so the files the source model wrote still decode from it
(``load_model(FILE, variant=NAME)``; how the bundled presets retire a model). Variants the
source file holds already are carried into the new file.

Fine-tunes only the model's encoder against its frozen quantizer and decoder, so that the
nearest codewords of its latents decode better: the decoder-aware search of ``pqmim compress
--latent-steps``, learned once (:func:`pqmim_kernels.models.refine.refine_encoder`); held-out
photos (every 10th) are measured along the way. No decoder runs the encoder, so the new model
decodes exactly like the old one and reads its files too (it lists the old model id as an
alias): nothing needs retiring. Variants the source file holds are carried into the new file,
each with the new encoder and its own old id as an alias.
"""

from __future__ import annotations

import argparse

from pqmim_kernels.cli.train import int_list

# Peak learning rate of refine-encoder (chosen on held-out photos: see results/training/README.md).
ENCODER_LR = 1e-4
ENCODER_RATE_WEIGHT = 0.004


def _common(p) -> None:
    """The options both subcommands take."""
    p.add_argument(
        "--model", default=None, help="a preset name or a model file (default: the default preset)"
    )
    p.add_argument("--data", default="../shared/data/train", help="folder of training photos")
    p.add_argument("--out", required=True, help="the model file to write")
    p.add_argument(
        "--run-dir", required=True,
        help="folder for checkpoint.pt and log.jsonl (an existing checkpoint is resumed)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=5000, help="training steps (without --minutes)")
    p.add_argument(
        "--minutes", type=float, default=0.0,
        help="CPU-minutes budget; sets the schedule instead of --steps (0 = none)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop", type=int, default=256, help="loss window side (multiple of 16)")
    p.add_argument("--max-images", type=int, default=0, help="use the first N photos (0 = all)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("-f", "--force", action="store_true", help="overwrite an existing --out")


def register(subparsers) -> None:
    parts = __doc__.split("\n\n")
    p = subparsers.add_parser(
        "refine-decoder",
        help="train a model's decoder (grown by residual blocks) on its fixed codes",
        description=parts[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(p)
    p.add_argument(
        "--extra-blocks", type=int_list(3, "--extra-blocks (strides 16, 8, 4)", 0),
        default=(2, 2, 1),
        help="residual blocks to add at strides 16,8,4",
    )  # fmt: skip
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument(
        "--keep-variant", default=None, metavar="NAME",
        help="also store the source model as variant NAME of the new file",
    )  # fmt: skip
    p.set_defaults(func=run)
    e = subparsers.add_parser(
        "refine-encoder",
        help="fine-tune a model's encoder for its frozen decoder (same decoder, reads old files)",
        description=parts[2],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _common(e)
    e.add_argument("--lr", type=float, default=ENCODER_LR, help="peak learning rate")
    e.add_argument(
        "--rate-weight", type=float, default=ENCODER_RATE_WEIGHT,
        help="weight of the soft bits-per-pixel term in the loss (0 = MSE only)",
    )  # fmt: skip
    e.set_defaults(func=run_encoder)


def source_variants(name_or_path, keep: str | None = None) -> dict:
    """The variants stored in the file of the model ``--model`` names, to be carried into the
    file written from it (``{}`` when ``--model`` names a variant itself: the new file is then
    that variant's descendant, not its file's); see :func:`~pqmim_kernels.models.load_variants`.
    ``keep``: the ``--keep-variant`` name, refused if the file holds a variant of that name."""
    from pqmim_kernels.models import load_variants, presets

    preset = presets.find(str(name_or_path)) if name_or_path is not None else None
    held = {} if preset is not None and preset.variant else load_variants(name_or_path)
    if keep is not None and keep in held:
        raise ValueError(f"--keep-variant {keep}: the source file already holds a variant {keep}")
    return held


def stored_variants(variants: dict, refined, part: str, keep=None, source=None) -> dict | None:
    """What ``save_model(refined, variants=...)`` stores: the source file's ``variants`` carried
    (:func:`~pqmim_kernels.models.refine.carried_variants`) and, with ``keep``, the ``source``
    model under that name; None when there are none."""
    from pqmim_kernels.models.refine import carried_variants

    out = carried_variants(variants, refined, part)
    if keep:
        out[keep] = source
    return out or None


def _refine(args, part: str):
    """Run ``refine_decoder`` or ``refine_encoder`` (``part``) as the arguments say and write
    ``--out``; returns ``(the model as stored, the source model, its variant name or None)``."""
    from pathlib import Path

    from pqmim_kernels.cli.codec import check_output
    from pqmim_kernels.models import load_model, save_model
    from pqmim_kernels.models.refine import RefineConfig, refine_decoder, refine_encoder
    from pqmim_kernels.models.train import load_images, split_holdout

    cfg = RefineConfig(
        extra_blocks=getattr(args, "extra_blocks", (0, 0, 0)),
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        crop=args.crop,
        lr=args.lr,
        rate_weight=getattr(args, "rate_weight", 0.0),
        progress=True,
    )
    check_output(args.out, [], args.force)
    model = load_model(args.model, device=args.device)
    train, held = split_holdout(load_images(args.data, args.max_images), 10)
    refine = refine_decoder if part == "decoder" else refine_encoder
    keep = getattr(args, "keep_variant", None)
    variants = source_variants(args.model, keep)
    refined = refine(model, train, held, cfg, args.run_dir, log=print)
    variants = stored_variants(variants, refined, part, keep, model)
    save_model(refined, Path(args.out), extra=refined.training_info, variants=variants)
    # the id of what was stored (fp16), not of the fp32 copy
    return load_model(Path(args.out)), model, keep


def run(args) -> int:
    written, model, keep = _refine(args, "decoder")
    print(
        f"pqmim refine-decoder: wrote {args.out} (model id {written.model_id().hex()}"
        + (f"; variant {keep} = model id {model.model_id().hex()}" if keep else "")
        + ")"
    )
    return 0


def run_encoder(args) -> int:
    written, _, _ = _refine(args, "encoder")
    print(
        f"pqmim refine-encoder: wrote {args.out} (model id {written.model_id().hex()}; also "
        f"reads {', '.join(a.hex() for a in written.aliases)})"
    )
    return 0

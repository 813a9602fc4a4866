"""``pqmim train``: two-stage training of a PQ-MIM model (see :mod:`pqmim_kernels.models.train`).

Runs as is on one CPU or GPU, and under ``torchrun --nproc_per_node N -m pqmim_kernels.cli.main
train ...`` with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import os


def _channels(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"channels must be 4 comma-separated ints, got {text!r}"
        ) from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"channels must be 4 comma-separated ints, got {text!r}")
    return vals


def register(subparsers) -> None:
    from pqmim_kernels.models.config import PQMIMConfig
    from pqmim_kernels.models.train import TrainConfig

    tc, mc = TrainConfig(), PQMIMConfig()
    p = subparsers.add_parser(
        "train",
        help="train a PQ-MIM model (stage 1 PQ-VAE, stage 2 MIM entropy model)",
        description="Train a PQ-MIM model on random crops of a folder of images. Resumes from "
        "OUT/checkpoint.pt; writes OUT/model.pt (usable with --model) and OUT/log.jsonl.",
    )
    p.add_argument("--data", default=tc.data, help="folder of training images (PNG/JPEG)")
    p.add_argument("--out", default=tc.out, help="output folder (checkpoint, log, model.pt)")
    p.add_argument("--crop", type=int, default=tc.crop, help="square crop size (multiple of 16)")
    p.add_argument("--batch-size", type=int, default=tc.batch_size)
    p.add_argument("--stage2-batch-size", type=int, default=0, help="0 = same as --batch-size")
    p.add_argument("--stage1-steps", type=int, default=tc.stage1_steps)
    p.add_argument("--stage1-minutes", type=float, default=0.0, help="time budget (0 = none)")
    p.add_argument("--stage2-steps", type=int, default=tc.stage2_steps)
    p.add_argument("--stage2-minutes", type=float, default=0.0, help="time budget (0 = none)")
    p.add_argument("--lr1", type=float, default=tc.lr1)
    p.add_argument("--lr2", type=float, default=tc.lr2)
    p.add_argument("--seed", type=int, default=tc.seed)
    p.add_argument("--log-every", type=int, default=tc.log_every)
    p.add_argument("--ckpt-every", type=int, default=tc.ckpt_every)
    p.add_argument("--max-images", type=int, default=0, help="use the first N images (0 = all)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    g = p.add_argument_group("model shape (ignored when resuming)")
    g.add_argument("--channels", type=_channels, default=mc.channels, help="e.g. 64,96,128,192")
    g.add_argument("--latent-dim", type=int, default=mc.latent_dim)
    g.add_argument("--subspaces", type=int, default=mc.num_subspaces, help="M")
    g.add_argument("--codebook-size", type=int, default=mc.codebook_size, help="K")
    g.add_argument("--res-blocks", type=int, default=mc.res_blocks)
    g.add_argument("--mim-width", type=int, default=mc.mim_width)
    g.add_argument("--mim-depth", type=int, default=mc.mim_depth)
    g.add_argument("--mim-heads", type=int, default=mc.mim_heads)
    g.add_argument("--stages", type=int, default=mc.stages)
    p.set_defaults(func=run)


def run(args) -> int:
    from pqmim_kernels.models.config import PQMIMConfig
    from pqmim_kernels.models.train import TrainConfig, train

    model_config = PQMIMConfig(
        channels=args.channels,
        latent_dim=args.latent_dim,
        num_subspaces=args.subspaces,
        codebook_size=args.codebook_size,
        res_blocks=args.res_blocks,
        mim_width=args.mim_width,
        mim_depth=args.mim_depth,
        mim_heads=args.mim_heads,
        stages=args.stages,
    )
    cfg = TrainConfig(
        data=args.data,
        out=args.out,
        crop=args.crop,
        batch_size=args.batch_size,
        stage2_batch_size=args.stage2_batch_size,
        stage1_steps=args.stage1_steps,
        stage1_minutes=args.stage1_minutes,
        stage2_steps=args.stage2_steps,
        stage2_minutes=args.stage2_minutes,
        lr1=args.lr1,
        lr2=args.lr2,
        seed=args.seed,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        device=args.device,
        max_images=args.max_images,
        progress=not args.no_progress,
    )
    model = train(cfg, model_config)
    if os.environ.get("RANK", "0") == "0":
        print(f"pqmim train: wrote {cfg.out}/model.pt (model id {model.model_id().hex()})")
    return 0

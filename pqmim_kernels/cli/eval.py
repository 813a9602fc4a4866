"""``pqmim eval``: rate-distortion curves of PQ-MIM and classical codecs on a folder of images.

Example::

    pqmim eval ../shared/data/kodak --codecs jpeg,jpeg444,webp,avif,jxl,heic,ref:vtm --out out/

After the base install it runs PQ-MIM, WebP and JPEG 4:4:4 with ``--bd-method cubic
--no-plot`` (``jpeg`` brings its consistency check, which interpolates with scipy); whatever
needs the ``eval`` extra (scipy, matplotlib) is named before any work, and codecs whose library
is missing are skipped with the package to install.
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CODECS = "pqmim,jpeg,jpeg444,webp,avif,jxl,heic"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="rate-distortion evaluation against classical codecs",
        description=(
            "Encode every image with every codec at a sweep of settings; report mean bpp (whole "
            "files), RGB PSNR, MS-SSIM, timings and BD-rate/BD-PSNR against an anchor. Writes "
            "results.json, results.md and rd.png to --out. Codecs whose library is missing are "
            "skipped with a message. 'pqmim' sweeps every bundled PQ-MIM preset (one rate "
            "point each), 'pqmim@NAME' only the named ones. 'ref:NAME' entries add published "
            "Kodak curves (dashed; not runs): ref:jpeg-published, ref:balle2018, ref:minnen2018, "
            "ref:bpg, ref:vtm. Needs scipy (BD with pchip, the JPEG check) and matplotlib (the "
            "plot) from pip install 'pqmim-kernels[eval]'; says so before any work."
        ),
    )
    p.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of images (png, jpg, ...)")
    p.add_argument(
        "--codecs",
        default=DEFAULT_CODECS,
        help="comma-separated codecs, pqmim@PRESET entries and ref:NAME curves "
        f"(default: {DEFAULT_CODECS})",
    )
    p.add_argument("--out", required=True, help="output folder (created if needed)")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="parallel worker processes (default: CPU count)",
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N images (by name)")
    p.add_argument("--anchor", default="jpeg", help="BD anchor codec (default: jpeg, i.e. 4:2:0)")
    p.add_argument(
        "--bd-method",
        choices=("pchip", "cubic"),
        default="pchip",
        help="BD interpolation: pchip (default) or the VCEG-M33 cubic polynomial",
    )
    p.add_argument(
        "--qualities",
        action="append",
        metavar="CODEC=V1,V2,...",
        help="override a codec's sweep, e.g. jpeg=10,30,50 or jxl=1.5,3 (repeatable)",
    )
    p.add_argument(
        "--pqmim-models",
        default=None,
        metavar="A.pt,B.pt",
        help="PQ-MIM model files (or preset names) to evaluate, one rate point each "
        "(default: every bundled preset)",
    )
    p.add_argument(
        "--pqmim-stages",
        default=None,
        metavar="N1,N2,...",
        help="also sweep each PQ-MIM model over the number of coding stages sent (the decoder "
        "fills the rest, PQMIM.md §7): setting MODEL@N; include the model's total S for the "
        "full-quality point",
    )
    p.add_argument(
        "--pqmim-lambdas",
        default=None,
        metavar="L1,L2,...",
        help="also sweep each PQ-MIM model over rate-aware assignment lambdas (pqmim compress "
        "--rate-lambda): setting MODEL~L; include 0 for the nearest-codeword point. Curves "
        "and BD metrics use the Pareto front of all PQ-MIM points",
    )
    p.add_argument(
        "--pqmim-latent-steps",
        type=int,
        default=0,
        metavar="N",
        help="encode every PQ-MIM file with N steps of decoder-aware latent search (pqmim "
        "compress --latent-steps): setting MODEL+N; N decoder passes per image and setting",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="device for PQ-MIM: cpu | cuda | cuda:N (with cuda, use --workers 1)",
    )
    p.add_argument(
        "--merge",
        default=None,
        metavar="RESULTS.json",
        help="add the curves of an earlier run on the same images (codecs not re-run now), "
        "e.g. to add pqmim to results/kodak/results.json",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run)


def _check_out_folder(out: str) -> None:
    """--out must be a folder that exists or can be created, and writable (the result files in
    it are replaced)."""
    import tempfile
    from pathlib import Path

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".pqmim-", suffix=".tmp")
    except OSError as exc:
        raise ValueError(f"--out {folder}: cannot write there ({exc.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def _pqmim_models(names: list, models: list | None, flag: str) -> tuple[list, list]:
    """For a flag that rewrites every PQ-MIM setting: ``names`` with the ``pqmim@NAME``
    entries folded into ``pqmim``, and the settings to rewrite (``models``, else the picked
    presets, else every preset). ``ValueError`` naming ``flag`` without any PQ-MIM entry."""
    from pqmim_kernels.evaluation.codecs import preset_names
    from pqmim_kernels.evaluation.selection import group_pqmim

    names, picked = group_pqmim(names)
    if "pqmim" not in names:
        raise ValueError(f"{flag}: add pqmim (or pqmim@NAME) to --codecs")
    if models is None:
        return names, list(picked or preset_names())
    if picked:
        raise ValueError("give pqmim@NAME entries in --codecs or --pqmim-models, not both")
    return names, models


def _number_list(text: str, kind, flag: str, what: str) -> list:
    """``"1,2,3"`` -> ``[kind(v), ...]``; ``ValueError`` naming ``flag`` for anything else."""
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated {what}, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from pqmim_kernels.evaluation import runner

    names = runner.parse_codec_list(args.codecs)
    qualities = runner.parse_qualities(args.qualities)
    models = None
    if args.pqmim_models:
        models = [m.strip() for m in args.pqmim_models.split(",")]
        if any(not m for m in models):
            raise ValueError(f"--pqmim-models: empty entry in {args.pqmim_models!r}")
    stages = None
    if args.pqmim_stages:
        stages = _number_list(args.pqmim_stages, int, "--pqmim-stages", "integers")
    if args.pqmim_lambdas:
        from pqmim_kernels.evaluation.codecs import lambda_settings

        lambdas = _number_list(args.pqmim_lambdas, float, "--pqmim-lambdas", "numbers")
        names, models = _pqmim_models(names, models, "--pqmim-lambdas")
        models = lambda_settings(models, lambdas)
    if args.pqmim_latent_steps:
        from pqmim_kernels.evaluation.codecs import latent_step_settings
        from pqmim_kernels.models.latent_opt import check_latent_steps

        try:
            check_latent_steps(args.pqmim_latent_steps)
        except ValueError as exc:
            raise ValueError(f"--pqmim-latent-steps: {exc}".replace("compress: ", "")) from None
        names, models = _pqmim_models(names, models, "--pqmim-latent-steps")
        models = latent_step_settings(models, args.pqmim_latent_steps)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {args.device}: CUDA is not available here")
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    images = runner.list_images(args.images_dir, args.limit)  # no image: say so now
    merged = runner.load_previous(args.merge, images, []) if args.merge else None
    runner.check_requirements(  # a missing package is named now, not after hours of work
        names,
        qualities=qualities,
        pqmim_models=models,
        pqmim_stages=stages,
        anchor=args.anchor,
        bd_method=args.bd_method,
        plot=not args.no_plot,
        merged=merged,
    )
    _check_out_folder(args.out)  # before the evaluation, which can take hours

    def log(msg: str) -> None:
        print(f"pqmim eval: {msg}", file=sys.stderr)

    result = runner.evaluate(
        args.images_dir,
        names,
        qualities=qualities,
        pqmim_models=models,
        anchor=args.anchor,
        bd_method=args.bd_method,
        workers=args.workers,
        limit=args.limit,
        progress=not args.no_progress,
        log=log,
        merge=args.merge,
        pqmim_stages=stages,
        pqmim_device=args.device,
    )
    paths = runner.write_outputs(result, args.out, plot=not args.no_plot)
    print(runner.format_summary(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0

"""Choose the PQ-VAE by measurement: candidate architectures, their decode cost, their training
throughput, and equal-CPU-time stage-1 runs scored on held-out images (never Kodak).

    python tools/pqvae_arch.py list
    python tools/pqvae_arch.py decode-time [NAMES...]       # g_s on 768x512, 1 and 2 threads
    python tools/pqvae_arch.py throughput [NAMES...]        # stage-1 steps/s, 1 thread
    python tools/pqvae_arch.py compare NAME --minutes 25    # stage 1 on one CPU-thread budget
    python tools/pqvae_arch.py summarize runs/cmp-*          # held-out PSNR curves of runs
    python tools/pqvae_arch.py plot runs/cmp-* --out results/training/curves.png
    python tools/pqvae_arch.py init NAME --out runs/x       # seed a run for `pqmim train`

Every run sets one intra-op thread (``torch.set_num_threads(1)``) unless told otherwise. Results
are printed as JSON lines and appended to ``results/training/<command>.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results" / "training"

# name -> (PQMIMConfig overrides, TrainConfig overrides); all at M=8, K=256 (0.25 bpp raw).
CANDIDATES: dict[str, tuple[dict, dict]] = {
    "base": ({}, {}),
    "base-warm": ({}, {"ae_warmup": 0.1}),
    "wide": (
        {"channels": (32, 64, 128, 192), "res_blocks": 2, "res_blocks_8": 1,
         "attention_blocks": 1},
        {},
    ),
    "wide-warm": (
        {"channels": (32, 64, 128, 192), "res_blocks": 2, "res_blocks_8": 1,
         "attention_blocks": 1},
        {"ae_warmup": 0.1},
    ),
    "wide-warm-c05": (
        {"channels": (32, 64, 128, 192), "res_blocks": 2, "res_blocks_8": 1,
         "attention_blocks": 1, "commitment": 0.05},
        {"ae_warmup": 0.1},
    ),
    "wide-warm-l2": (
        {"channels": (32, 64, 128, 192), "res_blocks": 2, "res_blocks_8": 1,
         "attention_blocks": 1, "latent_norm": "l2"},
        {"ae_warmup": 0.1},
    ),
    "wide-unshuffle": (
        {"channels": (32, 64, 128, 192), "res_blocks": 2, "res_blocks_8": 1,
         "attention_blocks": 1, "stem": "unshuffle"},
        {},
    ),
    "wider": (
        {"channels": (32, 64, 192, 256), "res_blocks": 2, "res_blocks_8": 1,
         "attention_blocks": 1},
        {},
    ),
}  # fmt: skip


def model_config(name: str):
    from pqmim_kernels.models import PQMIMConfig

    if name not in CANDIDATES:
        raise SystemExit(f"unknown candidate {name!r}; known: {', '.join(CANDIDATES)}")
    return PQMIMConfig(**CANDIDATES[name][0])


def _emit(kind: str, row: dict) -> None:
    print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{kind}.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def cmd_list(args) -> None:
    from pqmim_kernels.models import PQMIM

    for name in CANDIDATES:
        m = PQMIM(model_config(name))
        print(
            f"{name:16s} enc {_params(m.encoder) / 1e6:.2f} M  dec {_params(m.decoder) / 1e6:.2f} M"
            f"  train {CANDIDATES[name][1]}"
        )


def cmd_decode_time(args) -> None:
    """g_s on a 768x512 latent (inference mode, after one warm-up call): the fastest of
    ``--reps`` calls in wall time, and the CPU time per call (all threads; on one thread the
    honest figure on a loaded machine, where wall times include waiting for a core), with the
    1-minute load average at the end of the measurement."""
    import torch

    from pqmim_kernels.models import PQMIM

    for name in args.names or list(CANDIDATES):
        cfg = model_config(name)
        dec = PQMIM(cfg).decoder.eval()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for cl in (False, True):
                d = dec.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                y = torch.randn(1, cfg.latent_dim, 32, 48)
                if cl:
                    y = y.contiguous(memory_format=torch.channels_last)
                ts = []
                with torch.inference_mode():
                    d(y)
                    c = time.process_time()
                    for _ in range(args.reps):
                        t = time.perf_counter()
                        d(y)
                        ts.append(time.perf_counter() - t)
                    cpu = (time.process_time() - c) / args.reps
                _emit(
                    "decode_time",
                    {"name": name, "threads": threads, "channels_last": cl,
                     "wall_min_s": round(min(ts), 4), "cpu_s_per_call": round(cpu, 4),
                     "load1": os.getloadavg()[0], "decoder_params": _params(dec)},
                )  # fmt: skip
    torch.set_num_threads(1)


def cmd_throughput(args) -> None:
    """Stage-1 training steps/s (batch 8 of 256 crops, Adam), eager vs channels_last vs
    torch.compile, on one thread; CPU seconds per step over ``--steps`` after 3 warm-up steps
    (torch.compile: after its compilation steps)."""
    import torch
    import torch.nn.functional as F

    from pqmim_kernels.models import PQMIM
    from pqmim_kernels.models.train import _VAE

    torch.set_num_threads(1)
    for name in args.names or list(CANDIDATES):
        for mode in args.modes.split(","):
            torch.manual_seed(0)
            model = PQMIM(model_config(name)).train()
            vae = _VAE(model)
            cl = mode in ("channels_last", "compile_cl")
            if cl:
                vae.to(memory_format=torch.channels_last)
            net = torch.compile(vae) if mode.startswith("compile") else vae
            opt = torch.optim.Adam(vae.parameters(), 1e-4)
            x = torch.rand(args.batch, 3, args.crop, args.crop)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            warm = 3
            t_first = time.perf_counter()
            for i in range(warm + args.steps):
                if i == warm:
                    t, tc = time.perf_counter(), time.process_time()
                    setup = t - t_first
                x_hat, _, vq = net(x)
                loss = F.mse_loss(x_hat, x) + vq
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            cpu = (time.process_time() - tc) / args.steps
            wall = (time.perf_counter() - t) / args.steps
            _emit(
                "throughput",
                {"name": name, "mode": mode, "batch": args.batch, "crop": args.crop,
                 "cpu_s_per_step": round(cpu, 4), "wall_s_per_step": round(wall, 4),
                 "steps_per_s": round(1 / cpu, 3), "warmup_s": round(setup, 1), "threads": 1},
            )  # fmt: skip


def cmd_compare(args) -> None:
    """Stage 1 of one candidate on a CPU-time budget (process CPU seconds, so other jobs on the
    machine do not change the result), scored on the held-out images every --val-every steps
    (stage 1 only: the entropy model is trained later)."""
    import torch

    from pqmim_kernels.models.train import TrainConfig, train

    torch.set_num_threads(1)
    mc = model_config(args.name)
    tc = dict(
        data=args.data,
        out=args.out or str(ROOT / "runs" / f"cmp-{args.name}{args.tag}"),
        crop=args.crop,
        batch_size=args.batch,
        stage1_steps=10**9,
        stage1_minutes=args.minutes,
        stage1_only=True,
        log_every=25,
        ckpt_every=100,
        val_every=args.val_every,
        budget_clock="cpu",
        channels_last=args.channels_last,
        progress=False,
        seed=args.seed,
    )
    tc.update(CANDIDATES[args.name][1])
    cfg = TrainConfig(**tc)
    t = time.time()
    train(cfg, mc)
    row = summarize(Path(cfg.out), args.name + args.tag)
    row.update(
        wall_s=round(time.time() - t),
        minutes_cpu=args.minutes,
        batch=args.batch,
        crop=args.crop,
        train=CANDIDATES[args.name][1],
        model=dataclasses.asdict(mc),
    )
    _emit("compare", row)


def summarize(out: Path, name: str) -> dict:
    """The held-out PSNR curve of a run folder's stage 1: ``val_curve`` = [(CPU s, dB)]."""
    log = [json.loads(x) for x in open(out / "log.jsonl")]
    s1 = [e for e in log if e["stage"] == 1]
    val = [e for e in s1 if "val_psnr" in e]
    return {
        "name": name,
        "steps": max(e["step"] for e in s1),
        "val_psnr": val[-1]["val_psnr"] if val else None,
        "val_psnr_mean": val[-1]["val_psnr_mean"] if val else None,
        "val_curve": [(e["cpu_s"], round(e["val_psnr"], 3)) for e in val],
        "out": str(out),
    }


def _by_step(rows) -> list:
    return sorted({e["step"]: e for e in rows}.values(), key=lambda e: e["step"])


def cmd_plot(args) -> None:
    """Held-out PSNR (solid) and training-crop PSNR (faint) vs stage-1 CPU hours, one line per
    run folder, to ``--out``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if args.rate:
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    else:
        fig, ax = plt.subplots(figsize=(8, 5), constrained_layout=True)
    colors = plt.get_cmap("tab10").colors
    for i, d in enumerate(args.dirs):
        log = [json.loads(x) for x in open(Path(d) / "log.jsonl")]
        # stage 1 of pqmim train, or a pqmim refine-decoder/-encoder run (no stages in its log)
        s1 = [e for e in log if e.get("stage", 1) == 1 and "cpu_s" in e]
        # a resumed run logs again from its checkpoint's step: the later row of a step wins
        tr = _by_step(e for e in s1 if "psnr" in e and e.get("pq", True))
        val = _by_step(e for e in s1 if "val_psnr" in e)
        c = colors[i % len(colors)]
        name = Path(d).name
        ax.plot([e["cpu_s"] / 3600 for e in tr], [e["psnr"] for e in tr], color=c, alpha=0.25)
        ax.plot(
            [e["cpu_s"] / 3600 for e in val],
            [e["val_psnr"] for e in val],
            color=c,
            marker="o",
            markersize=3,
            label=f"{name} (held-out)",
        )
        key = next((k for k in ("val_bpp", "val_bpp_float12") if val and k in val[0]), None)
        if args.rate and key:
            base = val[0][key]
            bx.plot(
                [e["cpu_s"] / 3600 for e in val if key in e],
                [100 * (e[key] / base - 1) for e in val if key in e],
                color=c, marker="o", markersize=3, label=name,
            )  # fmt: skip
    ax.set_xlabel(args.xlabel)
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    if args.rate:
        bx.axhline(0, color="k", lw=0.8)
        bx.set_xlabel(args.xlabel)
        bx.set_ylabel("held-out bits per pixel, change from step 0 (%)")
        bx.set_title("rate of the same photos (float entropy model)")
        bx.grid(alpha=0.3)
        bx.legend()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def cmd_summarize(args) -> None:
    for d in args.dirs:
        print(json.dumps(summarize(Path(d), Path(d).name)))


def cmd_init(args) -> None:
    from pqmim_kernels.models.train import init_run

    path = init_run(args.out, model_config(args.name), seed=args.seed)
    print(f"wrote {path}; now: pqmim train --out {args.out} ...")


def main(argv=None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list").set_defaults(func=cmd_list)
    d = sub.add_parser("decode-time")
    d.add_argument("names", nargs="*")
    d.add_argument("--reps", type=int, default=10)
    d.set_defaults(func=cmd_decode_time)
    t = sub.add_parser("throughput")
    t.add_argument("names", nargs="*")
    t.add_argument("--modes", default="eager,channels_last,compile,compile_cl")
    t.add_argument("--steps", type=int, default=5)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--crop", type=int, default=256)
    t.set_defaults(func=cmd_throughput)
    c = sub.add_parser("compare")
    c.add_argument("name")
    c.add_argument("--minutes", type=float, default=25.0, help="CPU minutes of stage 1")
    c.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train"))
    c.add_argument("--out", default="")
    c.add_argument("--tag", default="", help="suffix of the run name")
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--crop", type=int, default=256)
    c.add_argument("--val-every", type=int, default=250)
    c.add_argument("--channels-last", action="store_true")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=cmd_compare)
    m = sub.add_parser("summarize", help="held-out PSNR curves of run folders")
    m.add_argument("dirs", nargs="+")
    m.set_defaults(func=cmd_summarize)
    q = sub.add_parser("plot", help="PSNR vs CPU hours of run folders")
    q.add_argument("dirs", nargs="+")
    q.add_argument("--out", default=str(RESULTS / "curves.png"))
    q.add_argument(
        "--title",
        default="PQ-VAE, M=8 K=256: held-out photos (solid) and training crops (faint)",
    )
    q.add_argument("--xlabel", default="stage-1 CPU hours (1 thread)")
    q.add_argument(
        "--rate", action="store_true",
        help="a second panel: held-out bpp (val_bpp of refine-encoder logs) vs step 0",
    )  # fmt: skip
    q.set_defaults(func=cmd_plot)
    i = sub.add_parser("init")
    i.add_argument("name")
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=cmd_init)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

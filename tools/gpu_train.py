"""Train a PQ-MIM model on one GPU in a single call of a few minutes (issue 11).

Two steps (stage 1 and 2 training; ``refine`` instead refines a model's decoder on its fixed
codes, :mod:`pqmim_kernels.models.refine`, e.g. ``python tools/gpu_train.py refine --model
medium --out $OUT/refine --minutes 6``, and ``refine-encoder`` its encoder for the frozen
decoder, e.g. ``python tools/gpu_train.py refine-encoder --model high --out $OUT/enc
--minutes 6``):

1. Here, once: pack the training photos into one file small enough to travel with the working
   tree (at most ~50 MiB; ``carry/`` is git-ignored)::

       python tools/gpu_train.py pack --data ../shared/data/train --out carry/train_pack.tar

   JPEG files are stored byte for byte; other images (the PNGs) are re-encoded as JPEG at
   quality ``--quality`` (default 95) to fit. Member names keep the sorted order of
   :func:`pqmim_kernels.models.train.load_images`, so the held-out split is the same images.

2. On the GPU machine, in one call (``run`` with ``carry=["carry"]``)::

       python tools/gpu_train.py train --pack carry/train_pack.tar --out $OUT/run \\
           --arch wide --stage1-minutes 5 --stage2-minutes 1.5

   The photos are decoded onto the GPU (crops are cut there), stage 1 runs under bf16 autocast
   (as :func:`pqmim_kernels.models.train.train` does on CUDA) in channels_last, optionally
   compiled, then stage 2 unless ``--stage1-only``. Everything lands in ``--out``: ``log.jsonl``,
   ``checkpoint.pt`` (full, with optimizer state: may exceed what comes back from the machine),
   ``model.pt`` after stage 2, and ``resume_fp16.pt``: the model in fp16 with the run's state and
   no optimizer, which ``pqmim train --out DIR`` resumes after renaming it ``DIR/checkpoint.pt``
   (a fresh Adam state). Budgets are wall-clock minutes per stage; startup (imports, unpacking,
   compilation) comes on top, so keep their sum about a minute under the call's limit.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

_SUFFIXES = (".png", ".jpg", ".jpeg")


def pack(data: str, out: str, quality: int = 95, max_mib: float = 50.0) -> dict:
    """Write every image under ``data`` (sorted, recursive) into the tar ``out``; returns a
    summary. Raises ``ValueError`` if the pack exceeds ``max_mib``."""
    from PIL import Image

    root = Path(data)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _SUFFIXES)
    if not files:
        raise ValueError(f"pack: {root} holds no .png/.jpg images")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    reencoded = 0
    with tarfile.open(out, "w") as tar:
        for p in files:
            rel = p.relative_to(root)
            if p.suffix.lower() in (".jpg", ".jpeg"):
                blob = p.read_bytes()
            else:
                with Image.open(p) as im:
                    buf = io.BytesIO()
                    im.convert("RGB").save(buf, "JPEG", quality=quality, subsampling=0)
                blob = buf.getvalue()
                rel = rel.with_suffix(".jpg")
                reencoded += 1
            info = tarfile.TarInfo(str(rel))
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    size = os.path.getsize(out)
    if size > max_mib * 2**20:
        raise ValueError(f"pack: {out} is {size / 2**20:.1f} MiB, over {max_mib} MiB")
    return {"images": len(files), "reencoded": reencoded, "mib": round(size / 2**20, 2)}


def unpack(path: str, device, threads: int = 8) -> list:
    """The images of a pack as uint8 (3, H, W) tensors on ``device``, in the pack's order."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import torch
    from PIL import Image

    with tarfile.open(path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
        blobs = [tar.extractfile(m).read() for m in members]

    def decode(blob):
        with Image.open(io.BytesIO(blob)) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()

    with ThreadPoolExecutor(threads) as ex:
        imgs = list(ex.map(decode, blobs))
    return [t.to(device) for t in imgs]


def write_resume(out: Path) -> Path | None:
    """``out/resume_fp16.pt`` from ``out/checkpoint.pt``: fp16 floats, no optimizer state."""
    import torch

    ck_path = out / "checkpoint.pt"
    if not ck_path.is_file():
        return None
    ck = torch.load(str(ck_path), map_location="cpu", weights_only=False)
    model = {
        k: (v.half() if v.is_floating_point() and torch.isfinite(v.half()).all() else v)
        for k, v in ck["model"].items()
    }
    dst = out / "resume_fp16.pt"
    torch.save({"config": ck["config"], "model": model, "opt": None, "state": ck["state"]}, dst)
    return dst


def _device_and_out(args):
    """``(torch.device(args.device), Path(args.out))``: TF32 and cuDNN autotuning on for CUDA,
    the output folder created."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return device, out


def cmd_train(args) -> None:
    import torch
    from pqvae_arch import CANDIDATES, model_config

    from pqmim_kernels.models.train import TrainConfig, train

    t_start = time.time()
    device, out = _device_and_out(args)
    images = unpack(args.pack, device)
    t_data = time.time() - t_start
    tc = dict(
        out=str(out),
        crop=args.crop,
        batch_size=args.batch,
        stage1_steps=10**9,
        stage1_minutes=args.stage1_minutes,
        stage2_steps=10**9,
        stage2_minutes=args.stage2_minutes,
        lr1=args.lr1,
        log_every=args.log_every,
        ckpt_every=args.ckpt_every,
        val_every=args.val_every,
        device=str(device),
        channels_last=True,
        compile=args.compile,
        stage1_only=args.stage1_only,
        progress=False,
        seed=args.seed,
    )
    tc.update(CANDIDATES[args.arch][1])
    cfg = TrainConfig(**tc)
    try:
        train(cfg, model_config(args.arch), images=images)
    finally:
        resume = write_resume(out)
        summary = {
            "arch": args.arch,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "images": len(images),
            "unpack_s": round(t_data, 1),
            "total_s": round(time.time() - t_start, 1),
            "resume": str(resume) if resume else None,
            "torch": torch.__version__,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary), flush=True)


def cmd_refine(args) -> None:
    """Decoder refinement (``refine``: ``pqmim refine-decoder``) or encoder refinement
    (``refine-encoder``: ``pqmim refine-encoder``) of a preset or model file on one GPU, from a
    pack: ``--out`` gets ``model.pt`` (fp16; with ``--keep-variant`` the source model too; a
    refined encoder lists the source model's id as an alias), ``log.jsonl`` and
    ``summary.json`` (``checkpoint.pt`` holds the optimizer state too and is larger than what
    comes back from the machine)."""
    import torch

    from pqmim_kernels.cli.refine import source_variants, stored_variants
    from pqmim_kernels.models import load_model, save_model
    from pqmim_kernels.models.refine import RefineConfig, refine_decoder, refine_encoder
    from pqmim_kernels.models.train import split_holdout

    t_start = time.time()
    device, out = _device_and_out(args)
    model = load_model(args.model, device=str(device))
    train, held = split_holdout(unpack(args.pack, device), 10)
    encoder = args.cmd == "refine-encoder"
    cfg = RefineConfig(
        extra_blocks=(0, 0, 0) if encoder else args.extra_blocks,
        steps=10**9,
        minutes=args.minutes,
        budget_clock="wall",
        batch_size=args.batch,
        crop=args.crop,
        lr=args.lr,
        rate_weight=args.rate_weight if encoder else 0.0,
        val_every=args.val_every,
        save_every=args.ckpt_every,
    )
    keep = getattr(args, "keep_variant", None)
    variants = source_variants(args.model, keep)
    refine = refine_encoder if encoder else refine_decoder
    refined = refine(model, train, held, cfg, out, log=lambda s: print(s, flush=True)).cpu()
    part = "encoder" if encoder else "decoder"
    variants = stored_variants(variants, refined, part, keep, model.cpu())
    save_model(refined, out / "model.pt", extra=refined.training_info, variants=variants)
    stored = load_model(out / "model.pt")
    summary = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model_id": stored.model_id().hex(),
        "reads": [a.hex() for a in stored.aliases],
        "total_s": round(time.time() - t_start, 1),
        "torch": torch.__version__,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


def main(argv=None) -> int:
    from pqmim_kernels.cli.train import int_list  # no torch: --help stays fast

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("pack", help="pack the training photos into one tar")
    k.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "train"))
    k.add_argument("--out", default=str(ROOT / "carry" / "train_pack.tar"))
    k.add_argument("--quality", type=int, default=95)
    k.add_argument("--max-mib", type=float, default=50.0)
    k.set_defaults(func=lambda a: print(json.dumps(pack(a.data, a.out, a.quality, a.max_mib))))
    t = sub.add_parser("train", help="train from a pack (on a GPU)")
    t.add_argument("--pack", default=str(ROOT / "carry" / "train_pack.tar"))
    t.add_argument("--out", required=True)
    t.add_argument("--arch", default="base", help="a candidate of tools/pqvae_arch.py")
    t.add_argument("--device", default="cuda")
    t.add_argument("--stage1-minutes", type=float, default=5.0)
    t.add_argument("--stage2-minutes", type=float, default=1.5)
    t.add_argument("--stage1-only", action="store_true")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--crop", type=int, default=256)
    t.add_argument("--lr1", type=float, default=1e-3)
    t.add_argument("--log-every", type=int, default=50)
    t.add_argument("--ckpt-every", type=int, default=1000)
    t.add_argument("--val-every", type=int, default=1000)
    t.add_argument("--compile", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)
    def refine_parser(name: str, help: str, model: str, lr: float):
        """The options ``refine`` and ``refine-encoder`` share."""
        q = sub.add_parser(name, help=help)
        q.add_argument("--pack", default=str(ROOT / "carry" / "train_pack.tar"))
        q.add_argument("--model", default=model, help="a preset name or a model file")
        q.add_argument("--out", required=True)
        q.add_argument("--device", default="cuda")
        q.add_argument("--minutes", type=float, default=5.0, help="wall-clock budget")
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--crop", type=int, default=256)
        q.add_argument("--lr", type=float, default=lr)
        q.add_argument("--val-every", type=int, default=1000)
        q.add_argument("--ckpt-every", type=int, default=1000)
        q.set_defaults(func=cmd_refine)
        return q

    r = refine_parser(
        "refine", "refine a model's decoder on its fixed codes (on a GPU)", "medium", 2e-4
    )
    r.add_argument(
        "--extra-blocks",
        type=int_list(3, "--extra-blocks (strides 16, 8, 4)", 0),
        default="2,2,1",
        help="blocks to add at strides 16,8,4",
    )
    r.add_argument("--keep-variant", default=None, help="store the source model as this variant")
    e = refine_parser(
        "refine-encoder", "fine-tune a model's encoder for its frozen decoder (on a GPU)", "high",
        1e-4,
    )  # fmt: skip
    e.add_argument("--rate-weight", type=float, default=0.004)
    args = p.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two-stage training of a PQ-MIM model (library face of ``pqmim train``).

Stage 1 trains the PQ-VAE (MSE + the quantizer's commitment/codebook loss; EMA codebooks, k-means
init and dead-code restart live in :class:`pqmim_kernels.nn.ProductQuantizer`). Stage 2 freezes
encoder and quantizer and trains the MIM entropy model v2 on the codes of the training images: one
teacher-forced pass per window gives the rate of every token under the real coding schedule of
the window's grid (:func:`pqmim_kernels.models.mim.mim_bits`), so the loss is the coding rate.
The last ``qat_fraction`` of stage 2 calibrates the activation ranges and trains with fake
quantisation (QAT); the model is then exported to the integer entropy model that codes, and the
integer model's rate is compared with the float model's on held-out images (``int_overhead``).
``init_from`` takes the PQ-VAE of an existing model file and trains stage 2 only.

Data: random crops (default 256×256) with horizontal flips from a folder of PNG/JPEG images, held
in memory as uint8. Stage 2 encodes every image (and its mirror) once with the frozen encoder and
draws random token windows of ``t × t`` tokens (``t`` in ``[stage2_window_min,
stage2_window_max]``) from those code grids, which is the same distribution as encoding
16-aligned crops and costs no conv work per step.

Held-out data (stage 1): every ``holdout_every``-th image of the sorted list is left out of
training (both stages) and the PQ-VAE's PSNR on those whole images is logged (``val_psnr``) every
``val_every`` steps and at the end of stage 1, outside the time budget; architectures are chosen
on it, never on Kodak. Optional autoencoder warm-up: the first ``ae_warmup`` fraction of stage 1
trains without the quantizer, then the codebooks are k-means-initialised from the latents.

Runs on one CPU/GPU, or under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on CUDA);
bf16 autocast on CUDA. Budgets are steps and/or minutes per stage; the learning rate follows a
cosine decay over whichever runs out first. Checkpoints (``<out>/checkpoint.pt``) resume.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pqmim_kernels.models.codec import PQMIM, pad_to_multiple
from pqmim_kernels.models.config import PQMIMConfig
from pqmim_kernels.models.mim import mim_bits

__all__ = ["TrainConfig", "load_images", "pqvae_from_file", "train"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclasses.dataclass
class TrainConfig:
    """Options of :func:`train` (``pqmim train --help`` lists the same)."""

    data: str = "../shared/data/train"
    out: str = "runs/train"
    crop: int = 256
    batch_size: int = 8
    stage2_batch_size: int = 0  # 0 = batch_size
    stage1_steps: int = 2000
    stage1_minutes: float = 0.0  # 0 = no time limit
    stage2_steps: int = 2000
    stage2_minutes: float = 0.0
    lr1: float = 5e-4
    lr2: float = 1e-3
    warmup: int = 100
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 200
    device: str = "auto"
    max_images: int = 0  # 0 = all
    progress: bool = True
    # -- stage 1 (PQ-VAE) --
    holdout_every: int = 10  # every Nth image in sorted order is held out (0 = none)
    val_every: int = 500  # held-out PSNR every N stage-1 steps and at the end (0 = end only)
    ae_warmup: float = 0.0  # stage-1 budget fraction trained without the PQ (then k-means init)
    kmeans_batches: int = 8  # batches of latents for that k-means init
    channels_last: bool = False  # stage-1 convs in channels_last memory format
    budget_clock: str = "wall"  # "wall" | "cpu": what --stage1-minutes counts (cpu = process)
    stage1_only: bool = False  # stop after stage 1 (checkpoint at stage 2, step 0; no model.pt)
    compile: bool = False  # torch.compile the stage-1 network
    warm_start: str = ""  # model file whose encoder/decoder start stage 1 (new PQ: any M, K)
    # -- stage 2 (entropy model) --
    init_from: str = ""  # a model file whose PQ-VAE is reused: stage 1 is skipped
    stage2_window_min: int = 12  # training windows are t x t tokens, t drawn from [min, max]
    stage2_window_max: int = 24
    qat_fraction: float = 0.2  # last part of stage 2 with fake quantisation (QAT)
    calib_batches: int = 8  # batches that calibrate the activation ranges before QAT
    stage2_val_every: int = 500  # held-out bits/token every N stage-2 steps and at the end


def load_images(folder: str | os.PathLike, max_images: int = 0) -> list[torch.Tensor]:
    """Every PNG/JPEG under ``folder`` (recursive, sorted) as uint8 (3, H, W) RGB tensors.

    Raises ``FileNotFoundError`` for a missing folder and ``ValueError`` when it has no image.
    """
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"training data folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if max_images:
        files = files[:max_images]
    if not files:
        raise ValueError(f"training data folder {root} holds no .png/.jpg images")
    out = []
    for p in files:
        with Image.open(p) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous())
    return out


def _random_crops(images, crop: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, 3, crop, crop) float32 in [0, 1]: random images, positions and h-flips.
    Images smaller than the crop are edge-replicated first. The crops are made on the images'
    device (training data held on a GPU is cropped there)."""
    out = torch.empty(batch, 3, crop, crop, device=images[0].device)
    for i in range(batch):
        img = images[int(torch.randint(len(images), (1,), generator=gen))]
        _, h, w = img.shape
        if h < crop or w < crop:
            img = F.pad(img[None].float(), (0, max(0, crop - w), 0, max(0, crop - h)), "replicate")
            img = img[0].to(torch.uint8)
            _, h, w = img.shape
        y = int(torch.randint(h - crop + 1, (1,), generator=gen))
        x = int(torch.randint(w - crop + 1, (1,), generator=gen))
        patch = img[:, y : y + crop, x : x + crop]
        if bool(torch.randint(2, (1,), generator=gen)):
            patch = patch.flip(-1)
        out[i] = patch.float() / 255.0
    return out


class _VAE(nn.Module):
    """Stage-1 view of a :class:`PQMIM` (so DDP sees only the trained parameters)."""

    def __init__(self, model: PQMIM) -> None:
        super().__init__()
        self.encoder, self.quantizer, self.decoder = model.encoder, model.quantizer, model.decoder
        self._model = [model]  # not a sub-module

    def forward(self, x, quantize: bool = True):
        """x (B, 3, H, W) -> ``(x_hat, codes (B, h, w, M) or None, vq_loss)``; with
        ``quantize=False`` the latent goes to the decoder as is (autoencoder warm-up)."""
        y = self.encoder(x)
        if not quantize:
            return self.decoder(y), None, y.new_zeros(())
        q, codes, vq_loss = self._model[0].quantize(y.permute(0, 2, 3, 1))
        x_hat = self.decoder(q.permute(0, 3, 1, 2))
        return x_hat, codes, vq_loss


def _dist_setup(device: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        torch.distributed.init_process_group(backend)
    return torch.device(device), rank, world


def _lr_factor(progress: float, step: int, warmup: int) -> float:
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def split_holdout(images: list, every: int) -> tuple[list, list]:
    """Deterministic held-out split: ``(train, held_out)`` where image ``i`` (in the sorted order
    of :func:`load_images`) is held out when ``i % every == every - 1`` (every ``every``-th
    image: 54 of the 549 photos of ``shared/data/train`` at ``every=10``). ``every=0``, or too
    few images for one of each, holds nothing out."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 0 or every == 1:
        raise ValueError(f"train: holdout_every must be 0 or an int >= 2, got {every!r}")
    if every == 0 or len(images) < every:
        return list(images), []
    held = [img for i, img in enumerate(images) if i % every == every - 1]
    kept = [img for i, img in enumerate(images) if i % every != every - 1]
    return kept, held


@torch.no_grad()
def validation_psnr(model: PQMIM, images: list, quantize: bool = True) -> dict:
    """Reconstruction quality of ``model`` (eval mode) on whole uint8 (3, H, W) images.

    Each image is edge-padded to a multiple of 16, coded (``quantize=False``: the unquantized
    latent goes to the decoder) and cropped back; the output is clamped to [0, 1] as the codec
    does. Returns ``{"psnr": PSNR of the mean MSE over all pixels of all images, "psnr_mean":
    mean of per-image PSNRs, "images": count}`` (dB; MSE on a [0, 1] scale). The model's
    training mode is restored afterwards.
    """
    if not images:
        raise ValueError("validation_psnr: no images")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sq, px, per = 0.0, 0, []
    try:
        for img in images:
            x = img[None].float().div(255.0).to(device)
            y = model.encoder(pad_to_multiple(x))
            if quantize:
                y = model.quantize(y.permute(0, 2, 3, 1))[0].permute(0, 3, 1, 2)
            x_hat = model.decoder(y)[..., : x.shape[2], : x.shape[3]].clamp(0.0, 1.0)
            err = float(((x_hat.float() - x) ** 2).sum())
            n = x.numel()
            sq, px = sq + err, px + n
            per.append(-10 * math.log10(max(err / n, 1e-10)))
    finally:
        model.train(was_training)
    return {
        "psnr": -10 * math.log10(max(sq / px, 1e-10)),
        "psnr_mean": sum(per) / len(per),
        "images": len(images),
    }


def init_run(out: str | os.PathLike, model_config: PQMIMConfig, seed: int = 0) -> Path:
    """Create ``<out>/checkpoint.pt`` for a fresh model of ``model_config`` at step 0 of stage 1
    (no optimizer state), so that ``pqmim train --out <out>`` trains a model whose config the
    command line cannot express (a resumed run takes the stored config). Raises
    ``FileExistsError`` when the checkpoint exists."""
    path = Path(out) / "checkpoint.pt"
    if path.exists():
        raise FileExistsError(f"init_run: {path} exists; resume it or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = PQMIM(model_config)
    cfgd = model_config.to_dict()
    state = {"stage": 1, "step": 0, "elapsed": 0.0}
    torch.save({"config": cfgd, "model": model.state_dict(), "opt": None, "state": state}, path)
    return path


def _code_usage(counts: torch.Tensor) -> dict:
    """Usage of the code histogram (M, K) summed over a logging interval."""
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    ppl = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum(-1))
    return {
        "interval_ppl_mean": float(ppl.mean()),
        "unused_frac": float((counts == 0).float().mean()),
    }


def _kmeans_switch_on(model: PQMIM, vae, cfg: TrainConfig, images, gen, device) -> None:
    """Switch the PQ on after the autoencoder warm-up: k-means init of the codebooks from the
    latents of ``cfg.kmeans_batches`` fresh batches (one training-mode call of the quantizer on
    all of them: k-means++ and Lloyd, then the first EMA update). The EMA counts and sums are
    then divided by the number of batches, back to the scale of one batch: at n batches' scale
    an unused code would need ~100·ln(n) more steps to fall under the dead-code threshold (with
    8 batches, 60 % of the codes sat unused for hundreds of steps after the switch)."""
    lat = []
    n = max(1, cfg.kmeans_batches)
    with torch.no_grad():
        for _ in range(n):
            x = _random_crops(images, cfg.crop, cfg.batch_size, gen).to(device)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            lat.append(vae.encoder(x).permute(0, 2, 3, 1).reshape(-1, model.config.latent_dim))
        q = model.quantizer
        q(torch.cat(lat).float().contiguous())
        q.cluster_size.div_(n)
        q.embed_avg.div_(n)


def _stage1(cfg, model, vae, net, opt, state, images, val_images, gen, device, record, save,
            is_main) -> None:  # fmt: skip
    """The stage-1 loop (PQ-VAE): MSE + the quantizer's loss, optional autoencoder warm-up,
    held-out validation (excluded from the time budget), checkpoints."""
    from tqdm.auto import tqdm

    if cfg.budget_clock not in ("wall", "cpu"):
        raise ValueError(f"train: budget_clock must be 'wall' or 'cpu', got {cfg.budget_clock!r}")
    if not 0.0 <= cfg.ae_warmup < 1.0:
        raise ValueError(f"train: ae_warmup must lie in [0, 1), got {cfg.ae_warmup}")
    clock = time.process_time if cfg.budget_clock == "cpu" else time.time
    autocast = device.type == "cuda"
    model.train()
    t0 = clock() - state["elapsed"]
    c0 = time.process_time() - state.get("cpu_s", 0.0)
    bar = tqdm(
        total=cfg.stage1_steps,
        initial=state["step"],
        desc="stage 1 (PQ-VAE)",
        disable=not (is_main and cfg.progress),
    )
    m, k = model.config.num_subspaces, model.config.codebook_size
    acc = {"mse": 0.0, "n": 0, "counts": torch.zeros(m, k)}

    last_val = [-1]

    def validate(quantized: bool) -> None:
        nonlocal t0, c0
        if not (is_main and val_images) or last_val[0] == state["step"]:
            return
        last_val[0] = state["step"]
        w, c = clock(), time.process_time()
        v = validation_psnr(model, val_images, quantize=quantized)
        key = "val_psnr" if quantized else "val_psnr_ae"
        record({"stage": 1, "step": state["step"], "time_s": round(state["elapsed"], 1),
                "cpu_s": round(state["cpu_s"], 1), key: v["psnr"], key + "_mean": v["psnr_mean"],
                "val_images": v["images"]})  # fmt: skip
        t0, c0 = t0 + (clock() - w), c0 + (time.process_time() - c)  # not in the budget

    state.setdefault("cpu_s", 0.0)
    # the PQ switches on by k-means over many batches (not the first one) after the autoencoder
    # warm-up or on a warm-started autoencoder
    refit = cfg.ae_warmup > 0 or bool(cfg.warm_start)
    while True:
        elapsed = clock() - t0
        progress = max(
            state["step"] / max(1, cfg.stage1_steps),
            elapsed / (60 * cfg.stage1_minutes) if cfg.stage1_minutes else 0.0,
        )
        if progress >= 1.0:
            break
        quantize = bool(model.quantizer.initted) or progress >= cfg.ae_warmup
        if quantize and refit and not bool(model.quantizer.initted):
            validate(False)
            _kmeans_switch_on(model, vae, cfg, images, gen, device)
        for g in opt.param_groups:
            g["lr"] = cfg.lr1 * _lr_factor(progress, state["step"], cfg.warmup)
        x = _random_crops(images, cfg.crop, cfg.batch_size, gen).to(device)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            x_hat, codes, vq_loss = net(x, quantize)
            mse = F.mse_loss(x_hat.float(), x)
            loss = mse + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        state["elapsed"] = clock() - t0
        state["cpu_s"] = time.process_time() - c0
        acc["mse"] += float(mse.detach())
        acc["n"] += 1
        if codes is not None:
            acc["counts"] += model.quantizer._counts(codes.detach()).cpu()
        bar.update(1)
        if state["step"] % cfg.log_every == 0:
            mse_avg = acc["mse"] / acc["n"]
            stats = model.quantizer.codebook_stats()
            ppl = stats["perplexity"].tolist()
            entry = {
                "stage": 1,
                "step": state["step"],
                "time_s": round(state["elapsed"], 1),
                "cpu_s": round(state["cpu_s"], 1),
                "mse": mse_avg,
                "psnr": -10 * math.log10(max(mse_avg, 1e-10)),
                "pq": quantize,
                "vq_loss": float(vq_loss.detach()),
                "ppl_min": min(ppl),
                "ppl_mean": sum(ppl) / len(ppl),
                "dead_frac": float(stats["dead_fraction"].mean()),
                **_code_usage(acc["counts"]),
                "lr": opt.param_groups[0]["lr"],
            }
            bar.set_postfix(psnr=f"{entry['psnr']:.2f}", ppl=f"{entry['ppl_mean']:.0f}")
            record(entry)
            acc = {"mse": 0.0, "n": 0, "counts": torch.zeros(m, k)}
        if cfg.val_every and state["step"] % cfg.val_every == 0:
            validate(quantize)
        if state["step"] % cfg.ckpt_every == 0:
            save()
    bar.close()
    validate(bool(model.quantizer.initted))


def train(
    cfg: TrainConfig, model_config: PQMIMConfig | None = None, images=None, log=print
) -> PQMIM:
    """Train (or resume) a PQ-MIM model; writes ``<out>/model.pt`` and returns it reloaded from
    that file (eval mode).

    ``images``: optional list of uint8 (3, H, W) tensors instead of ``cfg.data``. ``log``: a
    callable for one-line progress summaries (rank 0 only). Resumes from ``<out>/checkpoint.pt``
    when it exists (the stored model config then wins over ``model_config``). A
    ``KeyboardInterrupt`` (Ctrl-C) during a stage saves the checkpoint first, then propagates.
    With ``cfg.stage1_only`` it returns the in-memory model (eval mode) after stage 1 and
    writes no ``model.pt``.
    """
    hooks: dict = {}
    try:
        return _train(cfg, model_config, images, log, hooks)
    except KeyboardInterrupt:
        if "save" in hooks:
            where = hooks["save"]()
            if where:
                log(f"interrupted: saved {where}; run the same command again to resume")
        raise


def _train(cfg: TrainConfig, model_config, images, log, hooks: dict) -> PQMIM:
    """Body of :func:`train`; sets ``hooks["save"]`` once a stage's optimizer exists."""
    from pqmim_kernels.models import load_model, save_model

    if cfg.crop < 16 or cfg.crop % 16:
        raise ValueError(f"train: crop must be a positive multiple of 16, got {cfg.crop}")
    if cfg.batch_size < 1:
        raise ValueError(f"train: batch_size must be >= 1, got {cfg.batch_size}")
    device, rank, world = _dist_setup(cfg.device)
    is_main = rank == 0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if ckpt_path.is_file():
        ckpt = torch.load(str(ckpt_path), map_location="cpu", weights_only=False)
        model_config = PQMIMConfig.from_dict(
            {**ckpt["config"], "channels": tuple(ckpt["config"]["channels"])}
        )
    model_config = model_config or PQMIMConfig()
    vae_state = warm_state = None
    if ckpt is None and cfg.init_from and cfg.warm_start:
        raise ValueError("train: give init_from (skip stage 1) or warm_start (fine-tune), not both")
    if ckpt is None and cfg.init_from:
        model_config, vae_state = pqvae_from_file(cfg.init_from, model_config)
    if ckpt is None and cfg.warm_start:
        model_config, warm_state = autoencoder_from_file(cfg.warm_start, model_config)
    torch.manual_seed(cfg.seed)
    model = PQMIM(model_config).to(device)
    state = {"stage": 1, "step": 0, "elapsed": 0.0}
    if warm_state is not None:
        model.load_state_dict(warm_state, strict=False)
        if is_main:
            log(
                f"encoder and decoder taken from {cfg.warm_start}: stage 1 re-fits the PQ "
                f"(M={model_config.num_subspaces}, K={model_config.codebook_size}) by k-means "
                "on their latents and fine-tunes"
            )
    if vae_state is not None:
        model.load_state_dict(vae_state, strict=False)
        state = {"stage": 2, "step": 0, "elapsed": 0.0}
        if is_main:
            log(f"PQ-VAE taken from {cfg.init_from}: training the entropy model (stage 2)")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        state = ckpt["state"]
        if is_main:
            log(f"resuming from {ckpt_path}: step {state['step']} of stage {state['stage']}")
    if images is None:
        images = load_images(cfg.data, cfg.max_images)
    images, val_images = split_holdout(images, cfg.holdout_every)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 7919 * state["step"])
    logfile = out / "log.jsonl"

    def record(entry: dict) -> None:
        if is_main:
            with open(logfile, "a") as f:
                f.write(json.dumps(entry) + "\n")
            log(
                " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
                )
            )

    def save_ckpt(opt) -> None:
        if is_main:
            cfgd = model.config.to_dict()
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save(
                {
                    "config": cfgd,
                    "model": model.state_dict(),
                    "opt": None if opt is None else opt.state_dict(),
                    "state": dict(state),
                },
                str(tmp),
            )
            os.replace(tmp, ckpt_path)
            return f"{ckpt_path} at step {state['step']} of stage {state['stage']}"
        return None

    def wrap(module):
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return module

    # ---- stage 1: PQ-VAE ----
    if state["stage"] == 1:
        vae = _VAE(model)
        if cfg.channels_last:
            vae.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr1)
        hooks["save"] = lambda: save_ckpt(opt)
        if ckpt is not None and ckpt["state"]["stage"] == 1 and ckpt.get("opt"):
            opt.load_state_dict(ckpt["opt"])
        net = torch.compile(wrap(vae)) if cfg.compile else wrap(vae)
        _stage1(cfg, model, vae, net, opt, state, images, val_images, gen, device,
                record, lambda: save_ckpt(opt), is_main)  # fmt: skip
        state.update(stage=2, step=0, elapsed=0.0)
        save_ckpt(None)  # stage 2 starts its own optimizer: keep stage 1's out of its resume
        ckpt = None
    if cfg.stage1_only:  # the PQ-VAE alone; a later run without the flag resumes at stage 2
        return model.eval()

    # ---- stage 2: MIM entropy model on frozen codes ----
    model.eval()
    for p in [
        *model.encoder.parameters(),
        *model.quantizer.parameters(),
        *model.decoder.parameters(),
    ]:
        p.requires_grad_(False)
    em = model.entropy_model
    opt = torch.optim.AdamW(em.parameters(), lr=cfg.lr2, weight_decay=0.01)
    hooks["save"] = lambda: save_ckpt(opt)
    if ckpt is not None and ckpt["state"]["stage"] >= 2 and ckpt.get("opt"):
        opt.load_state_dict(ckpt["opt"])
    # stage 3 = stage 2 done; a larger stage-2 budget on a later run extends it
    if state["stage"] in (2, 3) and _stage2_progress(cfg, state) < 1.0:
        state["stage"] = 2
        grids = _code_grids(model, images, device, is_main and cfg.progress)
        val_grids = _code_grids(model, val_images, device, False, mirror=False)
        _stage2(cfg, model, wrap(em), opt, state, grids, val_grids, gen, device, record,
                lambda: save_ckpt(opt), is_main)  # fmt: skip
        state["stage"] = 3
        save_ckpt(opt)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    if not bool((em.qat_scales > 0).all()):  # qat_fraction = 0: calibrate before the export
        em.calibrate(_calibration_batches(cfg, model, _code_grids(model, images[:32], device,
                                                                   False), gen))  # fmt: skip
    model.export_entropy_model()
    if is_main:
        summary = _int_overhead(model, val_images or images[:8], device)
        record({"stage": 3, "step": state["step"], **summary})
        save_model(model, out / "model.pt", extra={"train": dataclasses.asdict(cfg), **summary})
    if world > 1:
        torch.distributed.barrier()
    # Reload what was written: the file stores fp16 weights, and the returned model must have
    # the same weights (and model id) as every later load of the file.
    return load_model(str(out / "model.pt"), device=str(device))


_PQVAE_PREFIXES = ("encoder.", "quantizer.", "decoder.")


def pqvae_from_file(
    path, model_config: PQMIMConfig, what: str = "init_from"
) -> tuple[PQMIMConfig, dict]:
    """The PQ-VAE of a model file (written by :func:`pqmim_kernels.models.save_model`, any
    version, also one whose entropy model this release cannot code with): returns the config
    (the file's PQ-VAE fields, ``model_config``'s entropy-model fields) and the encoder,
    quantizer and decoder tensors (fp32). Raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"train: {what} file {path} does not exist")
    try:
        blob = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"train: {path} is not a PQ-MIM model file ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("kind") != "pqmim-model":
        raise ValueError(f"train: {path} is not a PQ-MIM model file")
    known = {f.name for f in dataclasses.fields(PQMIMConfig)}
    mine = dataclasses.asdict(model_config)
    theirs = {k: v for k, v in blob["config"].items() if k in known}
    merged = {
        k: (mine[k] if k.startswith("mim_") or k == "stages" else theirs.get(k, mine[k]))
        for k in known
    }
    merged["channels"] = tuple(merged["channels"])
    state = {
        k: (v.float() if v.is_floating_point() else v)
        for k, v in blob["state_dict"].items()
        if k.startswith(_PQVAE_PREFIXES)
    }
    if not state:
        raise ValueError(f"train: {path} holds no PQ-VAE weights")
    return PQMIMConfig.from_dict(merged), state


_QUANTIZER_FIELDS = ("num_subspaces", "codebook_size", "commitment", "latent_norm")


def autoencoder_from_file(path, model_config: PQMIMConfig) -> tuple[PQMIMConfig, dict]:
    """The encoder and decoder of a model file, to warm-start stage 1 with another product
    quantizer (``TrainConfig.warm_start``): returns the config (the file's autoencoder fields;
    ``model_config``'s quantizer fields M, K, commitment, latent norm and its entropy-model
    fields) and the encoder and decoder tensors (fp32; no quantizer: stage 1 fits a new one by
    k-means on the latents before its first step). Raises FileNotFoundError / ValueError, also
    when ``model_config``'s M does not divide the file's latent dimension."""
    theirs, state = pqvae_from_file(path, model_config, what="warm_start")
    mine = dataclasses.asdict(model_config)
    merged = {**dataclasses.asdict(theirs), **{k: mine[k] for k in _QUANTIZER_FIELDS}}
    if merged["latent_dim"] % merged["num_subspaces"]:
        raise ValueError(
            f"train: warm_start {path} has latent_dim {merged['latent_dim']}, which "
            f"num_subspaces {merged['num_subspaces']} does not divide"
        )
    state = {k: v for k, v in state.items() if not k.startswith("quantizer.")}
    return PQMIMConfig.from_dict(merged), state


def _stage2_progress(cfg: TrainConfig, state: dict) -> float:
    """Fraction of the stage-2 budget spent (steps, or minutes of the budget clock)."""
    return max(
        state["step"] / max(1, cfg.stage2_steps),
        state["elapsed"] / (60 * cfg.stage2_minutes) if cfg.stage2_minutes else 0.0,
    )


def _window_size(cfg: TrainConfig, grids, gen: torch.Generator) -> int:
    lo, hi = cfg.stage2_window_min, max(cfg.stage2_window_min, cfg.stage2_window_max)
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def _calibration_batches(cfg: TrainConfig, model: PQMIM, grids, gen) -> list:
    from pqmim_kernels.models.mim import stage_grid

    out = []
    for _ in range(max(1, cfg.calib_batches)):
        t = _window_size(cfg, grids, gen)
        codes = _random_windows(grids, t, cfg.stage2_batch_size or cfg.batch_size, gen)
        h, w = codes.shape[1:3]
        out.append((codes.to(model._device()), stage_grid(h, w, model.config.stages)))
    return out


@torch.no_grad()
def _val_bits(model: PQMIM, val_grids) -> float | None:
    """Float-model bits per token on the held-out code grids (whole grids, coding schedule)."""
    if not val_grids:
        return None
    was = model.entropy_model.training
    model.entropy_model.eval()
    bits, tokens = 0.0, 0
    try:
        for g in val_grids:
            codes = g[None].long().to(model._device())
            bits += float(model.mim_bits(codes)[0])
            tokens += g.shape[0] * g.shape[1]
    finally:
        model.entropy_model.train(was)
    return bits / tokens


@torch.no_grad()
def _int_overhead(model: PQMIM, images, device) -> dict:
    """Integer vs float entropy model on the same codes of whole held-out images: total ideal
    bits of the integer model's frequencies, the float (QAT) model's cross-entropy, their
    ratio - 1 (``int_overhead``) and both per token."""
    int_bits, float_bits, tokens = 0.0, 0.0, 0
    for img in images:
        x = pad_to_multiple(img[None].float().div(255.0)).to(device)
        codes = model.encode_codes(x)
        int_bits += model.code_bits(codes[0])
        float_bits += float(model.mim_bits(codes)[0])
        tokens += codes.shape[1] * codes.shape[2]
    return {
        "int_bits_per_token": int_bits / tokens,
        "float_bits_per_token": float_bits / tokens,
        "int_overhead": int_bits / float_bits - 1.0,
        "raw_bits_per_token": model.config.num_subspaces * math.log2(model.config.codebook_size),
        "overhead_images": len(images),
    }


def _stage2(cfg, model, net, opt, state, grids, val_grids, gen, device, record, save,
            is_main) -> None:  # fmt: skip
    """The stage-2 loop (entropy model): teacher-forced rate of random code windows under the
    coding schedule; calibration + QAT for the last ``qat_fraction``; held-out bits/token."""
    from tqdm.auto import tqdm

    em = model.entropy_model
    em.train()
    # the budget counts wall time, or this process's CPU time (budget_clock="cpu": what a run
    # sharing a busy machine can rely on); elapsed is stored in the clock's seconds
    clock = time.process_time if cfg.budget_clock == "cpu" else time.time
    t0 = clock() - state["elapsed"]
    bar = tqdm(
        total=cfg.stage2_steps,
        initial=state["step"],
        desc="stage 2 (MIM)",
        disable=not (is_main and cfg.progress),
    )
    acc = {"bits": 0.0, "n": 0}

    def validate() -> None:
        v = _val_bits(model, val_grids)
        if v is not None:
            record({"stage": 2, "step": state["step"], "val_bits_per_token": v,
                    "qat": bool(em.qat_enabled)})  # fmt: skip

    while True:
        state["elapsed"] = clock() - t0
        progress = _stage2_progress(cfg, state)
        if progress >= 1.0:
            break
        if cfg.qat_fraction > 0 and not bool(em.qat_enabled) and progress >= 1 - cfg.qat_fraction:
            validate()
            em.calibrate(_calibration_batches(cfg, model, grids, gen))
            em.set_qat(True)
            record({"stage": 2, "step": state["step"], "event": "qat_on"})
        for g in opt.param_groups:
            g["lr"] = cfg.lr2 * _lr_factor(progress, state["step"], cfg.warmup)
        t = _window_size(cfg, grids, gen)
        codes = _random_windows(grids, t, cfg.stage2_batch_size or cfg.batch_size, gen)
        codes = codes.to(device)
        # bf16 autocast on CUDA, but not under QAT: the rounding points need fp32
        autocast = device.type == "cuda" and not bool(em.qat_enabled)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            bits = mim_bits(net, codes, model.config.stages)
        # mean bits per token: the loss is the coding rate the schedule will pay
        loss = bits.float().mean() / (codes.shape[1] * codes.shape[2])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(em.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        state["elapsed"] = clock() - t0
        acc["bits"] += float(loss.detach())
        acc["n"] += 1
        bar.update(1)
        if state["step"] % cfg.log_every == 0:
            bpt = acc["bits"] / acc["n"]
            entry = {
                "stage": 2,
                "step": state["step"],
                "time_s": round(state["elapsed"], 1),
                "bits_per_token": bpt,
                "bpp": bpt / 256.0,
                "raw_bpp": model.config.raw_bpp,
                "lr": opt.param_groups[0]["lr"],
            }
            bar.set_postfix(bpt=f"{bpt:.2f}")
            record(entry)
            acc = {"bits": 0.0, "n": 0}
        if cfg.stage2_val_every and state["step"] % cfg.stage2_val_every == 0:
            t_val = clock()
            validate()
            t0 += clock() - t_val  # validation is outside the time budget
        if state["step"] % cfg.ckpt_every == 0:
            save()
    bar.close()
    validate()


@torch.no_grad()
def _code_grids(
    model: PQMIM, images, device, progress: bool, mirror: bool = True
) -> list[torch.Tensor]:
    """Codes (h, w, M) int16 of every image (and of its mirror), on the CPU."""
    from tqdm.auto import tqdm

    grids = []
    for img in tqdm(images, desc="encoding codes", disable=not progress):
        for flip in (False, True) if mirror else (False,):
            x = img.flip(-1) if flip else img
            x = pad_to_multiple(x[None].float().div(255.0)).to(device)
            grids.append(model.encode_codes(x)[0].to("cpu", torch.int16))
    return grids


def _random_windows(grids, tokens: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    """(batch, t, t, M) int64 token windows, t = min(tokens, smallest side of the drawn grids)."""
    picks = [grids[int(torch.randint(len(grids), (1,), generator=gen))] for _ in range(batch)]
    t = min(tokens, *(min(g.shape[0], g.shape[1]) for g in picks))
    out = []
    for g in picks:
        y = int(torch.randint(g.shape[0] - t + 1, (1,), generator=gen))
        x = int(torch.randint(g.shape[1] - t + 1, (1,), generator=gen))
        out.append(g[y : y + t, x : x + t].long())
    return torch.stack(out)

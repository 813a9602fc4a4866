"""Decoder refinement: train g_s (optionally grown) on a trained model's fixed codes.

The encoder, product quantizer and entropy model stay exactly as they are, so the codes of an
image and their cost in bits do not change; only the picture the decoder draws from them does.
This is the cheap half of a longer stage 1 (PQMIM.md §7): with the codes fixed there is no
encoder to run or back-propagate through, and no entropy model to retrain.

:func:`refine_decoder`

1. codes every training photo **whole** (edge-padded to 16, as the codec does) once, nearest
   codewords, and keeps the codes;
2. grows the decoder with ``extra_blocks`` residual blocks at strides 16, 8, 4
   (:func:`pqmim_kernels.models.pqvae.grow_decoder`: each starts as the identity, so step 0
   decodes exactly like the source model);
3. trains it with MSE (bf16 autocast on a GPU) on random token-aligned windows of those code
   grids (no flips: codes are not flip-equivariant). A window is ``crop/16 + 2`` tokens wide;
   the loss leaves out the 16-px margin along window edges that are not image edges, where the
   decoder's zero padding sees no neighbours that the whole-image decode would see;
4. measures the PSNR of the held-out photos (whole, clamped, as the codec decodes) every
   ``val_every`` steps, checkpoints every ``save_every`` steps (resumable) and logs JSON lines.

The refined model has a new config (``decoder_extra_blocks``) and decoder, hence a new model id:
files written with the source model still need the source model (retire it, do not replace it;
:mod:`pqmim_kernels.models.presets`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pqmim_kernels.models.codec import PQMIM, pad_to_multiple
from pqmim_kernels.models.config import check_block_counts
from pqmim_kernels.models.pqvae import DOWNSAMPLING, grow_decoder
from pqmim_kernels.models.train import _lr_factor  # the cosine schedule of pqmim train

__all__ = [
    "RefineConfig",
    "code_images",
    "refine_decoder",
    "refine_encoder",
    "refined_encoder_model",
    "refined_model",
]


@dataclasses.dataclass
class RefineConfig:
    """Options of :func:`refine_decoder`.

    ``extra_blocks``: residual blocks to add at strides 16, 8, 4 (on top of what the source
    decoder has). ``steps``: schedule length; ``minutes`` > 0: a time budget in minutes that
    sets the schedule instead (cosine over the budget; ``budget_clock="cpu"``: process CPU
    time, which other jobs on the machine do not change; ``"wall"`` on a GPU). ``crop``: the
    loss window side in pixels (multiple of 16). ``lr``: peak Adam learning rate (warm-up
    ``warmup`` steps, cosine to 10 %).
    """

    extra_blocks: tuple[int, int, int] = (0, 0, 0)
    steps: int = 5000
    minutes: float = 0.0
    batch_size: int = 8
    crop: int = 256
    lr: float = 2e-4
    warmup: int = 100
    seed: int = 0
    log_every: int = 50
    val_every: int = 500
    save_every: int = 250
    rate_weight: float = 0.0  # refine_encoder only: weight of the soft rate term (per bpp)
    progress: bool = False  # a tqdm bar (steps, or seconds of the budget)
    budget_clock: str = "cpu"  # what ``minutes`` counts: "cpu" (process CPU time) | "wall"

    def __post_init__(self) -> None:
        self.extra_blocks = check_block_counts(self.extra_blocks, "RefineConfig: extra_blocks")
        if self.crop < DOWNSAMPLING or self.crop % DOWNSAMPLING:
            raise ValueError(
                f"RefineConfig: crop must be a positive multiple of 16, got {self.crop}"
            )
        for name in ("steps", "batch_size", "log_every", "val_every", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RefineConfig: {name} must be a positive int, got {v!r}")
        if not (math.isfinite(self.minutes) and self.minutes >= 0):
            raise ValueError(f"RefineConfig: minutes must be >= 0, got {self.minutes!r}")
        if self.budget_clock not in ("cpu", "wall"):
            raise ValueError(
                f"RefineConfig: budget_clock must be 'cpu' or 'wall', got {self.budget_clock!r}"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"RefineConfig: lr must be > 0, got {self.lr!r}")
        if not (math.isfinite(self.rate_weight) and self.rate_weight >= 0):
            raise ValueError(f"RefineConfig: rate_weight must be >= 0, got {self.rate_weight!r}")


@torch.no_grad()
def code_images(model: PQMIM, images: list) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(codes (h, w, M) int64, padded image (3, 16h, 16w) uint8), ...]`` for uint8 (3, H, W)
    images, coded whole with nearest codewords (``model.encode_codes`` on the edge-padded
    image, exactly what the codec codes)."""
    device = next(model.parameters()).device
    out = []
    for img in images:
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(
                f"code_images: expected uint8 (3, H, W) images, got {img.dtype} {tuple(img.shape)}"
            )
        x = pad_to_multiple(img[None].float().div(255.0))
        codes = model.encode_codes(x.to(device))[0].cpu()
        out.append((codes, (x[0] * 255.0).round().to(torch.uint8)))
    return out


def refined_model(model: PQMIM, extra_blocks: tuple[int, int, int]) -> PQMIM:
    """A copy of ``model`` whose decoder has ``extra_blocks`` more residual blocks at strides 16,
    8, 4 (each the identity until trained); everything else (encoder, quantizer, entropy model
    and its integer export, and the perceptual decoder if any: the codes do not change, so it
    reads the new model's files too) is the same. Eval mode, on ``model``'s device."""
    have = model.config.decoder_extra_blocks
    total = tuple(a + b for a, b in zip(have, extra_blocks))
    config = dataclasses.replace(model.config, decoder_extra_blocks=total)
    new = PQMIM(config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("decoder.") for k in missing):
        raise ValueError(f"refined_model: state mismatch ({missing}, {unexpected})")
    grow_decoder(model.decoder, new.decoder)
    int_state = model.int_state()
    if int_state is not None:
        new.set_int_entropy_model(*int_state)
    new.training_info = dict(getattr(model, "training_info", {}) or {})
    if model.perceptual_decoder is not None:
        new.perceptual_decoder = copy.deepcopy(model.perceptual_decoder)
    device = next(model.parameters()).device
    return new.to(device).eval()


def _windows(coded, tokens: int, batch: int, gen: torch.Generator, dequantize, device):
    """A batch of code windows ``tokens`` wide: ``(y (B, D, t, t), x (B, 3, 16t, 16t) float,
    mask (B, 1, 16t, 16t) bool)``; the mask drops the 16-px margin along window edges that are
    not image edges (windows of images smaller than ``tokens`` are edge-replicated there).
    ``dequantize``: codes (B, t, t, M) -> latent (B, D, t, t) (:meth:`PQMIM.dequantize`)."""
    f = DOWNSAMPLING
    ys, xs, ms = [], [], []
    for _ in range(batch):
        codes, img = coded[int(torch.randint(len(coded), (1,), generator=gen))]
        h, w, m = codes.shape
        th, tw = min(tokens, h), min(tokens, w)
        r = int(torch.randint(h - th + 1, (1,), generator=gen))
        c = int(torch.randint(w - tw + 1, (1,), generator=gen))
        cw = codes[r : r + th, c : c + tw]
        px = img[:, r * f : (r + th) * f, c * f : (c + tw) * f]
        mask = torch.ones(1, th * f, tw * f, dtype=torch.bool)
        if r > 0:
            mask[:, :f] = False
        if c > 0:
            mask[:, :, :f] = False
        if r + th < h:
            mask[:, -f:] = False
        if c + tw < w:
            mask[:, :, -f:] = False
        if th < tokens or tw < tokens:  # pad to the batch's window size, outside the loss
            pt, pw = tokens - th, tokens - tw
            cw = F.pad(cw.permute(2, 0, 1)[None].float(), (0, pw, 0, pt), "replicate")
            cw = cw[0].permute(1, 2, 0).long()
            px = F.pad(px[None].float(), (0, pw * f, 0, pt * f), "replicate")[0]
            mask = F.pad(mask, (0, pw * f, 0, pt * f), value=False)
        ys.append(cw)
        xs.append(px)
        ms.append(mask)
    y = dequantize(torch.stack(ys).to(device))
    x = torch.stack(xs).to(device).float() / 255.0
    return y, x, torch.stack(ms).to(device)


def _val_psnr(model: PQMIM, coded, sizes) -> float:
    """PSNR of the mean MSE over all pixels of the held-out photos, decoded from their codes as
    the codec decodes (``model.decode_codes``: tiled, cropped, clamped)."""
    was = model.decoder.training
    model.decoder.eval()
    sq, px = 0.0, 0
    try:
        for (codes, img), size in zip(coded, sizes):
            x_hat = model.decode_codes(codes[None].to(model._device()), size)
            x = img[None, :, : size[0], : size[1]].float().to(x_hat.device) / 255.0
            sq += float(((x_hat - x) ** 2).sum())
            px += x.numel()
    finally:
        model.decoder.train(was)
    return -10 * math.log10(max(sq / px, 1e-10))


def refine_decoder(
    model: PQMIM,
    train_images: list,
    val_images: list,
    cfg: RefineConfig,
    out: str | Path,
    log=print,
) -> PQMIM:
    """Train a grown copy of ``model``'s decoder on its fixed codes (module docstring) and
    return the refined model (eval mode); ``model`` is not changed.

    ``train_images`` / ``val_images``: uint8 (3, H, W) photos (``val_images`` may be empty: no
    validation). ``out``: run folder: ``checkpoint.pt`` (decoder, optimizer, step, seconds on the
    budget clock; an existing one is resumed, and must have the same ``extra_blocks``) and
    ``log.jsonl``. ``KeyboardInterrupt`` (Ctrl-C) saves the checkpoint first, then propagates.
    """
    if not train_images:
        raise ValueError("refine_decoder: no training images")
    device = next(model.parameters()).device
    new = refined_model(model, cfg.extra_blocks)
    t0 = time.process_time()
    coded = code_images(model, train_images)
    val = code_images(model, val_images) if val_images else []
    sizes = [tuple(img.shape[1:]) for img in val_images]
    tokens = cfg.crop // DOWNSAMPLING + 2

    def batch_loss(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        y, x, mask = _windows(coded, tokens, cfg.batch_size, gen, new.dequantize, device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            x_hat = new.decoder(y)
        err = ((x_hat.float() - x) ** 2) * mask
        mse = err.sum() / (mask.sum() * 3).clamp_min(1)
        return mse, mse

    def validate() -> dict:
        return {"val_psnr": _val_psnr(new, val, sizes)}

    def started() -> str:
        return (
            f"refine: coded {len(coded)} training and {len(val)} held-out photos in "
            f"{time.process_time() - t0:.0f} CPU s"
        )

    def resumable(ck: dict, path: Path) -> None:
        if tuple(ck.get("extra_blocks") or ()) != cfg.extra_blocks:
            raise ValueError(
                f"refine_decoder: {path} grew the decoder by {tuple(ck.get('extra_blocks') or ())}"
                f", not {cfg.extra_blocks}; use another --out or the same blocks"
            )

    steps_done, used = _train_part(
        new.decoder, "decoder", cfg, out, batch_loss, validate if val else None, log, started,
        {"extra_blocks": list(cfg.extra_blocks)}, resumable,
    )  # fmt: skip
    new.training_info = {**new.training_info, "refine": _run_info(cfg, steps_done, used)}
    return new.eval()


def refined_encoder_model(model: PQMIM) -> PQMIM:
    """A copy of ``model`` (eval mode, on its device) that reads ``model``'s files: the same
    weights, integer entropy model and perceptual decoder (if any), with ``model``'s id among
    its :attr:`~PQMIM.aliases`."""
    new = refined_model(model, (0, 0, 0))  # no blocks grown: the same decoders, copied
    new.add_alias(model)
    return new


def carried_variants(variants: dict, new: PQMIM, part: str, half: bool = True) -> dict:
    """The variants of the file a model came from (``{name: PQMIM}``, :func:`load_variants`),
    made fit to be stored beside ``new``, the model that ``part`` of it was trained into, so that
    every file a variant wrote keeps decoding from the new file: ``"decoder"``
    (:func:`refine_decoder`: the same codes) as they are; ``"perceptual"`` (a new perceptual
    decoder) without the old one (the file's new one reads their codes); ``"encoder"``
    (:func:`refine_encoder`) each given ``new``'s encoder and its own id as an alias, as
    :func:`refined_encoder_model` does; ``new``'s encoder is first rounded in place to what
    ``save_model(half=half)`` stores, so that each variant's model id is that of the stored
    weights. The given models may be changed; returns a new dict."""
    from pqmim_kernels.models import _stored

    if part not in ("decoder", "encoder", "perceptual"):
        raise ValueError(f"carried_variants: part must be decoder, encoder or perceptual: {part!r}")
    out = {}
    if part == "encoder" and variants:
        with torch.no_grad():
            new.encoder.load_state_dict(
                {k: _stored(t, half).to(t) for k, t in new.encoder.state_dict().items()}
            )
    for name, v in variants.items():
        if part == "encoder":
            v = refined_encoder_model(v)
            v.encoder.load_state_dict(new.encoder.state_dict())
        elif part == "perceptual":
            v.perceptual_decoder = None
        v.training_info = {k: x for k, x in v.training_info.items() if k != "variant"}
        out[name] = v
    return out


def refine_encoder(
    model: PQMIM,
    train_images: list,
    val_images: list,
    cfg: RefineConfig,
    out: str | Path,
    log=print,
) -> PQMIM:
    """Fine-tune a copy of ``model``'s encoder against its frozen quantizer and decoder; return
    the refined model (eval mode); ``model`` is not changed.

    The decoder-aware search of :mod:`~pqmim_kernels.models.latent_opt`, learned once instead
    of run per image: the encoder is trained to give latents whose *nearest* codewords the
    frozen decoder draws best, loss = MSE of ``g_s(Q(g_a(x)))`` (straight-through ``Q``) on
    random ``crop + 32``-px crops, leaving out their 16-px margin, plus the quantizer's
    commitment term, plus ``cfg.rate_weight`` times a soft estimate of the bits per pixel
    (:func:`soft_bits`, on a quarter of each batch) so that the new codes need not cost more.

    Only the encoder changes, and no decoder runs the encoder, so the refined model decodes
    exactly like ``model``: it lists ``model``'s id among its :attr:`~PQMIM.aliases`, every
    file ``model`` wrote decodes with it, and replacing a bundled model this way retires
    nothing and costs no weights. Its own files get a new id (their codes are the new
    encoder's; their bits are whatever the frozen entropy model gives them).

    ``train_images`` / ``val_images``: uint8 (3, H, W) photos; held-out PSNR and bpp (nearest
    codes, whole photos, as the codec codes; bits of the float entropy model, within ~1 % of
    the file) are measured every ``cfg.val_every`` steps.
    ``cfg.extra_blocks`` must be (0, 0, 0). ``out``: run folder as for :func:`refine_decoder`
    (``checkpoint.pt`` resumed, ``log.jsonl``).
    """
    if not train_images:
        raise ValueError("refine_encoder: no training images")
    if cfg.extra_blocks != (0, 0, 0):
        raise ValueError(
            f"refine_encoder: the encoder is not grown; extra_blocks must be (0, 0, 0), got "
            f"{cfg.extra_blocks}"
        )
    from pqmim_kernels.models.latent_opt import soft_bits
    from pqmim_kernels.models.train import _random_crops

    device = next(model.parameters()).device
    new = refined_encoder_model(model)
    for p in new.parameters():
        p.requires_grad_(False)
    for p in new.encoder.parameters():
        p.requires_grad_(True)
    images = [img.to(device) for img in train_images]
    f = DOWNSAMPLING

    def batch_loss(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = _random_crops(images, cfg.crop + 2 * f, cfg.batch_size, gen)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            y = new.encoder(x).float().permute(0, 2, 3, 1)
            q, codes, commit = new.quantize(y)
            x_hat = new.decoder(q.permute(0, 3, 1, 2))
        mse = ((x_hat.float() - x)[..., f:-f, f:-f] ** 2).mean()
        loss = mse + commit
        if cfg.rate_weight:  # on a quarter of the batch: the entropy model costs a decoder pass
            r = max(1, x.shape[0] // 4)
            pixels = r * x.shape[2] * x.shape[3]
            loss = loss + cfg.rate_weight * soft_bits(new, y[:r], codes[:r]) / pixels
        return loss, mse

    sizes = [tuple(img.shape[1:]) for img in val_images]

    @torch.no_grad()
    def validate() -> dict:
        coded = code_images(new, val_images)  # the new encoder's codes, once per validation
        bits = sum(float(new.mim_bits(c[None].to(device)).sum()) for c, _ in coded)
        pixels = sum(h * w for h, w in sizes)
        return {"val_psnr": _val_psnr(new, coded, sizes), "val_bpp": bits / pixels}

    new.eval()  # the quantizer and decoder stay in eval mode (no EMA updates, no dropout)
    steps_done, used = _train_part(
        new.encoder, "encoder", cfg, out, batch_loss, validate if val_images else None, log,
        lambda: f"refine: encoder of model {model.model_id().hex()} on {len(images)} photos",
        {},
    )  # fmt: skip
    for p in new.parameters():
        p.requires_grad_(True)
    new.training_info = {**new.training_info, "refine_encoder": _run_info(cfg, steps_done, used)}
    return new.eval()


def _run_info(cfg: RefineConfig, steps_done: int, used: float) -> dict:
    """What a refined model's ``training_info`` records of its run."""
    return {
        **dataclasses.asdict(cfg),
        "extra_blocks": list(cfg.extra_blocks),
        "steps_done": steps_done,
        f"{cfg.budget_clock}_s": round(used, 1),
    }


def _train_part(
    net: torch.nn.Module,
    part: str,
    cfg: RefineConfig,
    out: str | Path,
    batch_loss,
    validate,
    log,
    started,
    ckpt_extra: dict,
    resumable=None,
) -> tuple[int, float]:
    """Train ``net`` (the decoder or the encoder of a model) with Adam on the loss of
    ``batch_loss(gen) -> (loss, mse)`` under ``cfg``'s schedule (the log's ``mse`` and ``psnr``
    are the batches' MSE); returns ``(steps done, seconds on the budget clock)``.

    ``validate()``: a dict of held-out figures (or None: no validation), logged at step 0, every
    ``val_every`` steps and at the end. ``started()``: the line logged once the data is ready.
    ``out``: ``checkpoint.pt`` (``net``, optimizer, step, seconds and ``ckpt_extra``; an
    existing one of the same ``part`` is resumed once ``resumable(checkpoint, path)``, if given,
    has not raised) and ``log.jsonl``. Ctrl-C saves the checkpoint, then propagates.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    device = next(net.parameters()).device
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.lr)
    clock = time.process_time if cfg.budget_clock == "cpu" else time.perf_counter
    key = f"{cfg.budget_clock}_s"  # the log's time field: cpu_s or wall_s
    step, used = 0, 0.0
    if ckpt_path.exists():
        ck = torch.load(str(ckpt_path), map_location=device, weights_only=True)
        if part not in ck:
            raise ValueError(
                f"refine: {ckpt_path} is not a checkpoint of a {part} refinement; use another "
                "run folder"
            )
        if resumable is not None:
            resumable(ck, ckpt_path)
        net.load_state_dict(ck[part])
        opt.load_state_dict(ck["opt"])
        step, used = int(ck["step"]), float(ck.get("used_s", ck.get("cpu_s", 0.0)))
        log(f"refine: resumed {ckpt_path} at step {step} ({used:.0f} {cfg.budget_clock} s)")

    def record(entry: dict) -> None:
        with log_path.open("a") as fh:
            fh.write(json.dumps(entry) + "\n")
        log(
            "refine "
            + " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry.items()
            )
        )

    def save() -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save(
            {part: net.state_dict(), "opt": opt.state_dict(), "step": step, "used_s": used,
             **ckpt_extra},
            str(tmp),
        )  # fmt: skip
        tmp.replace(ckpt_path)

    log(started())
    if step == 0 and validate is not None:
        record({"step": 0, key: 0.0, **validate()})
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(cfg.seed + step)
    net.train()
    acc, n_acc = 0.0, 0
    budget = int(60 * cfg.minutes) if cfg.minutes else cfg.steps
    bar = tqdm(
        total=budget,
        initial=min(budget, int(used) if cfg.minutes else step),
        desc=f"refine {part}",
        unit=f"{cfg.budget_clock} s" if cfg.minutes else "step",
        disable=not cfg.progress,
    )

    def progress() -> float:
        if cfg.minutes:
            return used / (60.0 * cfg.minutes)
        return step / cfg.steps

    try:
        while progress() < 1.0:
            c0 = clock()
            for g in opt.param_groups:
                g["lr"] = cfg.lr * _lr_factor(progress(), step, cfg.warmup)
            loss, mse = batch_loss(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            spent = clock() - c0
            used += spent
            bar.update(spent if cfg.minutes else 1)
            acc, n_acc = acc + float(mse.detach()), n_acc + 1
            if step % cfg.log_every == 0:
                mse = acc / n_acc
                record(
                    {
                        "step": step,
                        key: round(used, 1),
                        "mse": mse,
                        "psnr": -10 * math.log10(max(mse, 1e-10)),
                        "lr": opt.param_groups[0]["lr"],
                    }
                )
                acc, n_acc = 0.0, 0
            if validate is not None and step % cfg.val_every == 0:
                net.eval()
                record({"step": step, key: round(used, 1), **validate()})
                net.train()
            if step % cfg.save_every == 0:
                save()
    except KeyboardInterrupt:  # Ctrl-C: keep what was trained, then stop
        bar.close()
        save()
        log(f"refine: interrupted at step {step}; {ckpt_path} resumes it")
        raise
    bar.close()
    save()
    net.eval()
    if validate is not None:
        record({"step": step, key: round(used, 1), "event": "end", **validate()})
    return step, used

"""A perceptual decoder: a second synthesis transform g_s fine-tuned with an adversarial loss on
the same codes (PQMIM.md §2 "perceptual variant", issue 13).

The codes, and therefore every ``.pqm`` file, do not change: the perceptual decoder reads the
files the MSE decoder reads (``pqmim decompress --decoder perceptual``). It starts from the MSE
decoder's weights and trains on random crops of training photos with

    loss = MSE + lf_weight * MSE of 8x8 block means
           + adv_weight * (non-saturating GAN loss + fm_weight * feature matching)

against a PatchGAN discriminator trained from scratch (nothing pretrained can be downloaded
here, so there is no LPIPS or VGG term). The encoder, quantizer and entropy model stay frozen.
The block-mean term keeps colour and brightness where the codes put them (without it the
first run drifted to a purple tint and lost 2.1 dB on Kodak). :func:`blend_decoders`
interpolates between the MSE and the tuned decoder's weights to trade sharpness for PSNR.

Measures that need no pretrained network (:func:`sharpness`): the high-frequency energy of the
decoded image relative to the original's (1.0 = as much fine detail as the original; an MSE
decoder's blur gives well below 1), next to PSNR and MS-SSIM.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchDiscriminator",
    "PerceptualConfig",
    "blend_decoders",
    "generator_loss",
    "sharpness",
    "train_perceptual",
]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: (B, 3, H, W) in [0, 1] -> (B, 1, H/16, W/16) real/fake logits of
    overlapping patches (receptive field ~94 px). Spectral norm on every conv keeps it smooth,
    which stabilises training from scratch on few images."""

    def __init__(self, width: int = 32, layers: int = 4) -> None:
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        mods, c = [], 3
        for i in range(layers):
            out = width * 2 ** min(i, 3)
            mods += [sn(nn.Conv2d(c, out, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
            c = out
        mods.append(sn(nn.Conv2d(c, 1, 3, padding=1)))
        self.net = nn.Sequential(*mods)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Activations after every LeakyReLU (for the feature-matching loss) and the logits."""
        feats, h = [], x - 0.5
        for mod in self.net:
            h = mod(h)
            if isinstance(mod, nn.LeakyReLU):
                feats.append(h)
        return [*feats, h]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x - 0.5)


@dataclasses.dataclass
class PerceptualConfig:
    """Options of :func:`train_perceptual`."""

    steps: int = 2000
    minutes: float = 0.0  # CPU-minutes budget (0 = none); the first budget spent ends it
    batch_size: int = 4
    crop: int = 192
    lr: float = 1e-4
    lr_d: float = 2e-4
    adv_weight: float = 0.01
    fm_weight: float = 1.0
    # extra MSE weight on lf_pool x lf_pool block means: colour and brightness belong to the codes,
    # so the adversarial term may change texture, not tint (0 = off)
    lf_weight: float = 10.0
    lf_pool: int = 8
    warmup: int = 100  # discriminator-only steps before the decoder sees the GAN loss
    seed: int = 0
    log_every: int = 50


def sharpness(x_hat: torch.Tensor, x: torch.Tensor) -> float:
    """High-frequency energy of ``x_hat`` relative to ``x`` (both (B, 3, H, W) in [0, 1]):
    ``sum(lap(x_hat)^2) / sum(lap(x)^2)`` with the 3x3 Laplacian on the luma. 1.0 = the
    original's amount of fine detail; blur gives < 1, noise or ringing > 1."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])[None, None]
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)

    def energy(img):
        luma = (img.float().cpu() * w).sum(1, keepdim=True)
        return float(F.conv2d(luma, k).pow(2).sum())

    return energy(x_hat) / max(energy(x), 1e-12)


def generator_loss(x_hat, x, cfg: PerceptualConfig, d: PatchDiscriminator | None = None):
    """The decoder's loss on decoded crops ``x_hat`` of ``x`` (both (B, 3, H, W)):
    ``MSE + lf_weight * MSE of lf_pool-pixel block means`` and, when a discriminator ``d`` is
    given, ``+ adv_weight * (non-saturating GAN loss + fm_weight * feature matching)``.
    Returns ``(loss, mse, adv)`` (``adv`` = 0 without ``d``)."""
    mse = F.mse_loss(x_hat, x)
    loss = mse
    if cfg.lf_weight:
        lo_hat, lo = F.avg_pool2d(x_hat, cfg.lf_pool), F.avg_pool2d(x, cfg.lf_pool)
        loss = loss + cfg.lf_weight * F.mse_loss(lo_hat, lo)
    adv = torch.zeros(())
    if d is not None:
        fake_feats = d.features(x_hat)
        with torch.no_grad():
            real_feats = d.features(x)
        adv = F.softplus(-fake_feats[-1]).mean()
        fm = sum(F.l1_loss(a, r) for a, r in zip(fake_feats[:-1], real_feats[:-1]))
        loss = loss + cfg.adv_weight * adv + cfg.adv_weight * cfg.fm_weight * fm
    return loss, mse, adv


def train_perceptual(model, images, cfg: PerceptualConfig, log=print) -> nn.Module:
    """Fine-tune a copy of ``model.decoder`` adversarially on random crops of ``images``
    (uint8 (3, H, W) tensors); returns the new decoder (eval mode) and leaves ``model``
    unchanged. ``log`` gets one-line summaries (also of held-in PSNR and sharpness)."""
    from pqmim_kernels.models.train import _random_crops

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    model.eval()
    g = copy.deepcopy(model.decoder).train()
    for p in g.parameters():
        p.requires_grad_(True)
    d = PatchDiscriminator().to(device).train()
    opt_g = torch.optim.Adam(g.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(d.parameters(), lr=cfg.lr_d, betas=(0.5, 0.9))
    c0 = time.process_time()
    acc = {"mse": 0.0, "adv": 0.0, "d": 0.0, "sharp": 0.0, "n": 0}
    for step in range(1, cfg.steps + 1):
        if cfg.minutes and time.process_time() - c0 > 60 * cfg.minutes:
            break
        x = _random_crops(images, cfg.crop, cfg.batch_size, gen).to(device)
        with torch.no_grad():
            y = model.dequantize(model.encode_codes(x))
        x_hat = g(y)
        # discriminator: real crops vs decoded ones
        d_real, d_fake = d(x), d(x_hat.detach().clamp(0, 1))
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # decoder: MSE + block means + (after the warm-up) GAN loss + feature matching
        loss, mse, adv = generator_loss(x_hat, x, cfg, d if step > cfg.warmup else None)
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        acc["mse"] += float(mse.detach())
        acc["adv"] += float(adv.detach())
        acc["d"] += float(loss_d.detach())
        acc["sharp"] += sharpness(x_hat.detach().clamp(0, 1), x)
        acc["n"] += 1
        if step % cfg.log_every == 0:
            n = acc["n"]
            log(
                f"perceptual step={step} cpu_s={time.process_time() - c0:.0f} "
                f"psnr={-10 * math.log10(max(acc['mse'] / n, 1e-10)):.2f} "
                f"adv={acc['adv'] / n:.3f} d_loss={acc['d'] / n:.3f} "
                f"sharpness={acc['sharp'] / n:.3f}"
            )
            acc = {"mse": 0.0, "adv": 0.0, "d": 0.0, "sharp": 0.0, "n": 0}
    for p in g.parameters():
        p.requires_grad_(False)
    return g.eval()


def blend_decoders(mse: nn.Module, tuned: nn.Module, alpha: float) -> nn.Module:
    """Network interpolation: a copy of ``tuned`` whose every parameter and buffer is
    ``mse + alpha * (tuned - mse)`` (``alpha`` in [0, 1]: 0 = the MSE decoder, 1 = the
    adversarially tuned one). Both must have the same architecture, and ``tuned`` must have
    been fine-tuned from ``mse`` (as :func:`train_perceptual` does), so that the straight line
    between them stays a good decoder: it trades sharpness for PSNR with no training."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise ValueError(f"blend_decoders: alpha must be a number in [0, 1], got {alpha!r}")
    a, b = mse.state_dict(), tuned.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError("blend_decoders: the two decoders have different architectures")
    out = copy.deepcopy(tuned)
    out.load_state_dict(
        {k: a[k] + alpha * (b[k] - a[k]) if a[k].is_floating_point() else b[k] for k in a}
    )
    return out.eval()

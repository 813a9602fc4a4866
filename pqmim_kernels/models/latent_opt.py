"""Decoder-aware latent optimisation: the encoder searches for codes the decoder draws better.

The analysis transform g_a is trained to give latents whose *nearest* codewords decode well on
average; for one given image, other codewords often decode it better. :func:`optimize_latent`
looks for them by gradient descent on the latent ``y`` itself (Adam, ``steps`` steps):

    loss(y) = mean over the image's pixels of (clamp(g_s(Q(y))) - x)^2

with ``Q`` the product quantizer's nearest-codeword assignment and a straight-through gradient
(the decoder sees exact codewords; the gradient reaches ``y`` as if ``Q`` were the identity).
Every step's codes are decoded exactly, and for each tile the latent of the step whose codes
decoded best is kept (step 0 is the encoder's own latent, so the search never does worse on
the loss it measures). Only the encoder changes: the file format, the decoder and the model are
the same, and every file written this way decodes with any version that reads the model.

Cost: ``steps`` forward + backward passes of g_s over the image (a Kodak image on 2 CPU
threads: ~0.3 s per step with the bundled models). The rate is not in the loss; combine with
``rate_lambda`` (rate-aware assignment of the optimised latent, :meth:`PQMIM.compress`) to keep
the bits where they were: on the 54 held-out photos with ``high``, 30 steps and ``rate_lambda``
0.0005 gave +0.37 dB at the same bpp (``results/heldout_search``).

Large images are optimised tile by tile (:data:`OPT_TILE` tokens plus :data:`OPT_HALO` tokens of
context on each side) so that memory stays bounded; a tile's halo takes the already optimised
latent of the tiles before it, and only the tile's own tokens are kept. The loss leaves out the
16-px margin along window edges that are not image edges (the decoder's zero padding there sees
no neighbours) and the edge-replicated padding beyond the image.

The optimisation runs in float on whatever kernels the machine has, so the codes (hence the
file) may differ between machines; decoding is exact everywhere, as for every file.
"""

from __future__ import annotations

import math

import torch

from pqmim_kernels import functional as F_pq
from pqmim_kernels.models.pqvae import DOWNSAMPLING
from pqmim_kernels.reference.pq import pq_lookup

__all__ = [
    "LATENT_LR",
    "OPT_HALO",
    "OPT_TILE",
    "check_latent_steps",
    "code_lengths",
    "expected_bits",
    "optimize_latent",
    "soft_bits",
]

# Adam's step size on the latent (latent norm ~1 per dimension; neighbouring codewords of the
# bundled models are ~0.03 apart). Chosen on held-out photos (never Kodak) with ``high``:
# 30 steps at 0.003 / 0.006 / 0.01 / 0.05 / 0.2 gave +0.44 / +0.46 / +0.45 / +0.30 / +0.00 dB.
LATENT_LR = 0.006
OPT_TILE = 32  # tokens (512 px) per side of a tile of the search
OPT_HALO = 4  # tokens of context around a tile (64 px: more than g_s's receptive field needs)
MAX_LATENT_STEPS = 10_000


def check_latent_steps(latent_steps) -> int:
    """``latent_steps`` as an int; ``ValueError`` unless it is an int in [0, 10000]."""
    if (
        isinstance(latent_steps, bool)
        or not isinstance(latent_steps, int)
        or not 0 <= latent_steps <= MAX_LATENT_STEPS
    ):
        raise ValueError(
            f"compress: latent_steps must be an int in [0, {MAX_LATENT_STEPS}], "
            f"got {latent_steps!r}"
        )
    return latent_steps


@torch.no_grad()
def code_lengths(model, codes: torch.Tensor) -> torch.Tensor:
    """Code length in bits of every candidate sub-code: (B, h, w, M, K) float32, under the float
    entropy model of ``model`` with ``codes`` (B, h, w, M) int64 as the context (the coding
    schedule; sub-codes conditioned on the earlier ones of ``codes``)."""
    from pqmim_kernels.models.mim import stage_grid

    b, h, w, m = codes.shape
    logits = model.entropy_model(codes, stage_grid(h, w, model.config.stages, codes.device))
    length = -torch.log_softmax(logits.float(), -1) * (1.0 / math.log(2.0))
    return length.reshape(b, h, w, m, -1)


def expected_bits(model, latent: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Differentiable stand-in for the bits of ``latent`` (B, h, w, D) float: 0-d float32.

    Each sub-vector is softly assigned to the codewords, ``softmax(-||y_m - c_mk||^2 / t)``
    with ``t`` the mean squared distance to the nearest codeword of that sub-space, and the
    result is the sum of the expected code lengths ``length`` (:func:`code_lengths`). Its
    gradient moves latents towards codewords that cost fewer bits; at the codewords it is the
    rate of their codes.
    """
    b, h, w, m, _ = length.shape
    cb = model.quantizer.codebooks.detach().float()  # (M, K, d)
    ys = latent.float().reshape(b, h, w, m, -1)
    d2 = (
        (ys * ys).sum(-1, keepdim=True)
        - 2.0 * torch.einsum("bhwmd,mkd->bhwmk", ys, cb)
        + (cb * cb).sum(-1)
    ).clamp_min(0.0)
    with torch.no_grad():
        t = d2.amin(-1).mean((0, 1, 2)).clamp_min(1e-8)[:, None]  # (M, 1)
    return (torch.softmax(-d2 / t, -1) * length).sum()


def soft_bits(model, latent: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """:func:`expected_bits` of ``latent`` with ``codes`` (its nearest codes) as the context."""
    return expected_bits(model, latent, code_lengths(model, codes))


def _margin_mask(rows: int, cols: int, inner: tuple[bool, bool, bool, bool], device):
    """(1, 1, rows, cols) float: 1, except 0 on the 16-px margin along the window edges
    flagged in ``inner`` = (top, bottom, left, right) as not being image edges."""
    f = DOWNSAMPLING
    mask = torch.ones(1, 1, rows, cols, device=device)
    top, bottom, left, right = inner
    if top:
        mask[..., :f, :] = 0
    if bottom:
        mask[..., -f:, :] = 0
    if left:
        mask[..., :, :f] = 0
    if right:
        mask[..., :, -f:] = 0
    return mask


def optimize_latent(
    model,
    x: torch.Tensor,
    steps: int,
    lr: float | None = None,
    latent: torch.Tensor | None = None,
    progress: bool = False,
    rate_weight: float = 0.0,
) -> torch.Tensor:
    """The latent whose nearest codes ``model`` decodes closest to ``x`` (see the module).

    ``model``: a :class:`~pqmim_kernels.models.codec.PQMIM` (its MSE decoder is the one
    optimised for). ``x``: (1, 3, H, W) float in [0, 1] on the model's device. ``steps``: Adam
    steps per tile (0 returns the encoder's latent); ``lr``: their step size (default
    :data:`LATENT_LR`). ``latent``: the start, (1, h, w, D) float
    (default: ``model.encode_latent(x)``). ``progress``: a tqdm bar over the steps of all tiles.
    ``rate_weight`` > 0 adds that times the window's :func:`expected_bits` per pixel to the loss,
    with code lengths from the entropy model given the window's starting codes (computed once
    per tile), so that the search also looks for cheaper codes. Measured on 6 held-out photos
    with ``high``, 30 steps: 0.001 saved 2.7 / 1.8 / 1.1 % of the bits at ``rate_lambda`` 0 /
    0.0005 / 0.002 for 0.001-0.008 dB, at 1.5x the time (0.002 did no better), so it is off by
    default and has no CLI flag.
    Returns the latent (1, h, w, D) float32, ``h = ceil(H / 16)``, ``w = ceil(W / 16)``; no
    gradient, the model's parameters untouched.
    """
    from pqmim_kernels.models.codec import _check_image, pad_to_multiple

    _check_image(x)
    if x.shape[0] != 1:
        raise ValueError(
            f"optimize_latent: x must hold one image (1, 3, H, W), got {tuple(x.shape)}"
        )
    steps = check_latent_steps(steps)
    lr = LATENT_LR if lr is None else float(lr)
    if not lr > 0:
        raise ValueError(f"optimize_latent: lr must be > 0, got {lr}")
    rate_weight = float(rate_weight)
    if not (math.isfinite(rate_weight) and rate_weight >= 0):
        raise ValueError(f"optimize_latent: rate_weight must be >= 0, got {rate_weight}")
    if latent is None:
        with torch.no_grad():
            latent = model.encode_latent(x)
    height, width = int(x.shape[2]), int(x.shape[3])
    _, h, w, dim = latent.shape
    if (h, w) != (-(-height // DOWNSAMPLING), -(-width // DOWNSAMPLING)):
        raise ValueError(
            f"optimize_latent: latent grid {h}x{w} does not match a {width}x{height} image"
        )
    out = latent.detach().float().clone()
    if steps == 0:
        return out
    f = DOWNSAMPLING
    target = pad_to_multiple(x.float())
    embed = model.quantizer.embed.detach()
    tiles = [
        (t0, min(h, t0 + OPT_TILE), u0, min(w, u0 + OPT_TILE))
        for t0 in range(0, h, OPT_TILE)
        for u0 in range(0, w, OPT_TILE)
    ]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps * len(tiles), desc="latent search", unit="step", leave=False)
    try:
        for t0, t1, u0, u1 in tiles:
            a0, a1 = max(0, t0 - OPT_HALO), min(h, t1 + OPT_HALO)
            b0, b1 = max(0, u0 - OPT_HALO), min(w, u1 + OPT_HALO)
            px = target[:, :, a0 * f : a1 * f, b0 * f : b1 * f]
            inner = (a0 > 0, a1 < h, b0 > 0, b1 < w)
            weight = _margin_mask(px.shape[2], px.shape[3], inner, x.device)
            weight[..., max(0, height - a0 * f) :, :] = 0  # the padding beyond the image
            weight[..., :, max(0, width - b0 * f) :] = 0
            weight = weight / (3.0 * weight.sum().clamp_min(1.0))  # the mean over RGB pixels
            start = out[:, a0:a1, b0:b1]
            rate = None
            if rate_weight:
                codes = F_pq.pq_assign(start.reshape(1, -1, dim), embed, pinned=True)
                length = code_lengths(model, codes.view(1, a1 - a0, b1 - b0, -1).long())
                rate = (length, rate_weight / float(start.shape[1] * start.shape[2] * f * f))
            best = _search(model, embed, start, px, weight, steps, lr, bar, rate)
            out[:, t0:t1, u0:u1] = best[:, t0 - a0 : t1 - a0, u0 - b0 : u1 - b0]
    finally:
        if bar is not None:
            bar.close()
    return out


def _search(model, embed, start, px, weight, steps, lr, bar, rate=None) -> torch.Tensor:
    """Adam on the window's latent ``start`` (1, th, tw, D); returns the latent of the step
    whose nearest codes decoded with the smallest weighted squared error (plus, with ``rate`` =
    ``(code lengths, weight per bit)``, their weighted code lengths; the gradient takes the
    rate from :func:`expected_bits`)."""
    _, th, tw, dim = start.shape
    y = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([y], lr=lr)
    best_loss, best = float("inf"), start
    for step in range(steps + 1):
        with torch.enable_grad():
            tokens = y.reshape(1, th * tw, dim)
            codes = F_pq.pq_assign(tokens.detach(), embed, pinned=True)
            codewords = pq_lookup(codes, embed).to(tokens.dtype)
            q = codewords + (tokens - tokens.detach())  # exact codewords, identity gradient
            img = model.decoder(q.view(1, th, tw, dim).permute(0, 3, 1, 2))
            loss = (((img.clamp(0.0, 1.0) - px) ** 2) * weight).sum()
            value = float(loss.detach())
            if rate is not None:  # the gradient from the soft rate, the choice by the exact one
                length, per_bit = rate
                loss = loss + per_bit * expected_bits(model, y, length)
                chosen = codes.view(length.shape[:-1]).long().unsqueeze(-1)
                value += per_bit * float(torch.gather(length, -1, chosen).sum())
            if value < best_loss:
                best_loss, best = value, y.detach().clone()
            if step == steps:
                break
            (grad,) = torch.autograd.grad(loss, [y])
        y.grad = grad
        opt.step()
        if bar is not None:
            bar.update(1)
    return best

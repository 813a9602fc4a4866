"""The PQ-VAE analysis / synthesis transforms (conv, downsampling f = 16).

The product quantizer between them is :class:`pqmim_kernels.nn.ProductQuantizer`; this file
holds only the convolutional parts so the codec can run each half on its own.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DOWNSAMPLING", "Decoder", "Encoder", "ResBlock"]

DOWNSAMPLING = 16


class ResBlock(nn.Module):
    """``x + conv(GELU(conv(GELU(x))))`` with 3×3 convs; (B, C, h, w) -> same."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Encoder(nn.Module):
    """g_a: image (B, 3, H, W) float in [0, 1], H and W multiples of 16 -> latent
    (B, D, H/16, W/16) float.

    Four stride-2 convs (5×5 at full resolution, 3×3 after), GELU, residual blocks at stride 16,
    a 1×1 projection to D and a LayerNorm over D.
    """

    def __init__(self, channels: tuple[int, ...], latent_dim: int, res_blocks: int = 1) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, 5, stride=2, padding=2),
            nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c3, c4, 3, stride=2, padding=1),
            *[ResBlock(c4) for _ in range(res_blocks)],
            nn.GELU(),
            nn.Conv2d(c4, latent_dim, 1),
        )
        # Per-token LayerNorm of the latent: keeps its scale ~1 whatever the conv weights do,
        # so the EMA codebooks track a stable cloud (an unnormalised latent shrinks early in
        # training and the codes collapse onto a handful of codewords).
        self.norm = nn.LayerNorm(latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x - 0.5)
        return self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _up(c_in: int, c_out: int) -> nn.Module:
    # 4×4 transposed conv with stride 2: every output pixel sees the same number of taps, so no
    # checkerboard from uneven kernel overlap.
    return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)


class Decoder(nn.Module):
    """g_s: latent (B, D, h, w) -> image (B, 3, 16h, 16w) float (unclamped, ~[0, 1])."""

    def __init__(self, channels: tuple[int, ...], latent_dim: int, res_blocks: int = 1) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.net = nn.Sequential(
            nn.Conv2d(latent_dim, c4, 1),
            *[ResBlock(c4) for _ in range(res_blocks)],
            nn.GELU(),
            _up(c4, c3),
            nn.GELU(),
            nn.Conv2d(c3, c3, 3, padding=1),
            nn.GELU(),
            _up(c3, c2),
            nn.GELU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.GELU(),
            _up(c2, c1),
            nn.GELU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.GELU(),
            _up(c1, 3),
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) + 0.5

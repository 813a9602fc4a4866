"""The PQ-VAE analysis / synthesis transforms (conv, downsampling f = 16).

The product quantizer between them is :class:`pqmim_kernels.nn.ProductQuantizer`; this file
holds only the convolutional parts so the codec can run each half on its own.

Layout of g_a (g_s mirrors it; stride = downsampling relative to the image)::

    stem (stride 2)  ->  conv s2 (stride 4)  ->  conv s2 (stride 8)  [+ res_blocks_8 ResBlocks]
      ->  conv s2 (stride 16)  [+ res_blocks ResBlocks]  [+ attention_blocks AttentionBlocks]
      ->  1x1 to D  ->  latent norm

Every architecture knob lives in :class:`pqmim_kernels.models.config.PQMIMConfig` (the "PQ-VAE
architecture" group); the defaults give the original small design layer for layer, so old
weight files keep their state-dict names. Capacity is added where it is cheap: at stride 16 a
conv costs 1/64 of the same conv at stride 2, so wide residual and attention blocks there (and
at stride 8) add little decoding time, while the full- and half-resolution layers stay narrow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pqmim_kernels.models.config import check_block_counts

__all__ = [
    "DOWNSAMPLING",
    "LATENT_NORMS",
    "STEMS",
    "AttentionBlock",
    "Decoder",
    "Encoder",
    "ResBlock",
    "SubspaceL2Norm",
    "grow_decoder",
]

DOWNSAMPLING = 16
STEMS = ("conv", "unshuffle")
LATENT_NORMS = ("layer", "l2")


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


class AttentionBlock(nn.Module):
    """Pre-norm transformer block over the pixels of a feature map: (B, C, h, w) -> same.

    ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))`` (MLP ratio 2, GELU), every position attending
    to every other of the same image (no position embedding: the surrounding convs carry
    position). Heads of 64 dims (``C`` must be a multiple of 64, or one head when ``C < 64``).
    At stride 16 a 768×512 image has 1,536 positions, so full attention is cheap there; its cost
    grows as (h·w)², like the MIM entropy model's own attention on the same token grid.
    The output projections start at zero, so a new block is the identity at initialisation.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels >= 64 and channels % 64:
            raise ValueError(
                f"AttentionBlock: channels must be < 64 or a multiple of 64, got {channels}"
            )
        self.heads = max(1, channels // 64)
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.mlp = nn.Sequential(
            nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
        )
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)  # (B, h·w, C)
        q, k, v = (
            self.qkv(self.norm1(t))
            .view(b, h * w, 3, self.heads, c // self.heads)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )  # each (B, heads, h·w, C / heads)
        a = F.scaled_dot_product_attention(q, k, v)
        t = t + self.proj(a.transpose(1, 2).reshape(b, h * w, c))
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class SubspaceL2Norm(nn.Module):
    """Scale each of the M sub-vectors of a (B, h, w, D) latent to l2 norm ``sqrt(D / M)``.

    With every sub-vector on a sphere, the product quantizer's squared-L2 assignment becomes a
    cosine-similarity lookup up to the codewords' norms (the l2-normalised codes of ViT-VQGAN,
    per sub-space); the ``sqrt(d)`` radius keeps the per-coordinate scale of the LayerNorm
    variant (about 1), so the commitment weight means the same in both.
    """

    def __init__(self, latent_dim: int, num_subspaces: int) -> None:
        super().__init__()
        self.m, self.d = num_subspaces, latent_dim // num_subspaces

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        s = y.unflatten(-1, (self.m, self.d))
        s = F.normalize(s, dim=-1, eps=1e-6) * math.sqrt(self.d)
        return s.flatten(-2)


def _arch(config) -> dict:
    return {
        "channels": config.channels,
        "latent_dim": config.latent_dim,
        "res_blocks": config.res_blocks,
        "res_blocks_8": config.res_blocks_8,
        "attention_blocks": config.attention_blocks,
        "stem": config.stem,
    }


def _check_arch(stem: str, res_blocks: int, res_blocks_8: int, attention_blocks: int) -> None:
    if stem not in STEMS:
        raise ValueError(f"PQ-VAE: stem must be one of {STEMS}, got {stem!r}")
    for name, v in (
        ("res_blocks", res_blocks),
        ("res_blocks_8", res_blocks_8),
        ("attention_blocks", attention_blocks),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"PQ-VAE: {name} must be an int >= 0, got {v!r}")


class Encoder(nn.Module):
    """g_a: image (B, 3, H, W) float in [0, 1], H and W multiples of 16 -> latent
    (B, D, H/16, W/16) float.

    Stem to stride 2 (``"conv"``: a 5×5 stride-2 conv; ``"unshuffle"``: PixelUnshuffle(2), the
    2×2 pixels as 12 channels, then a 3×3 conv), three 3×3 stride-2 convs, GELU, ``res_blocks_8``
    residual blocks at stride 8, ``res_blocks`` residual blocks and ``attention_blocks``
    attention blocks at stride 16, a 1×1 projection to D and a per-token normalisation of the
    latent (``latent_norm``, see :meth:`from_config`).
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        latent_dim: int,
        res_blocks: int = 1,
        *,
        res_blocks_8: int = 0,
        attention_blocks: int = 0,
        stem: str = "conv",
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        _check_arch(stem, res_blocks, res_blocks_8, attention_blocks)
        c1, c2, c3, c4 = channels
        if stem == "conv":
            head = [nn.Conv2d(3, c1, 5, stride=2, padding=2)]
        else:
            head = [nn.PixelUnshuffle(2), nn.Conv2d(12, c1, 3, padding=1)]
        self.net = nn.Sequential(
            *head,
            nn.GELU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(c2, c3, 3, stride=2, padding=1),
            *[ResBlock(c3) for _ in range(res_blocks_8)],
            *([nn.GELU()] if res_blocks_8 == 0 else []),
            nn.Conv2d(c3, c4, 3, stride=2, padding=1),
            *[ResBlock(c4) for _ in range(res_blocks)],
            *[AttentionBlock(c4) for _ in range(attention_blocks)],
            nn.GELU(),
            nn.Conv2d(c4, latent_dim, 1),
        )
        # Per-token LayerNorm of the latent: keeps its scale ~1 whatever the conv weights do,
        # so the EMA codebooks track a stable cloud (an unnormalised latent shrinks early in
        # training and the codes collapse onto a handful of codewords).
        self.norm = norm if norm is not None else nn.LayerNorm(latent_dim)

    @classmethod
    def from_config(cls, config) -> Encoder:
        """g_a of a :class:`PQMIMConfig` (``latent_norm="layer"``: LayerNorm over D;
        ``"l2"``: :class:`SubspaceL2Norm` over each of the M sub-vectors)."""
        norm = None
        if config.latent_norm == "l2":
            norm = SubspaceL2Norm(config.latent_dim, config.num_subspaces)
        a = _arch(config)
        return cls(a.pop("channels"), a.pop("latent_dim"), a.pop("res_blocks"), norm=norm, **a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x - 0.5)
        return self.norm(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _up(c_in: int, c_out: int) -> nn.Module:
    # 4×4 transposed conv with stride 2: every output pixel sees the same number of taps, so no
    # checkerboard from uneven kernel overlap.
    return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)


class Decoder(nn.Module):
    """g_s: latent (B, D, h, w) -> image (B, 3, 16h, 16w) float (unclamped, ~[0, 1]).

    Mirror of :class:`Encoder`: 1×1 from D, attention then residual blocks at stride 16, three
    4×4 stride-2 transposed convs each followed by a 3×3 conv (``res_blocks_8`` residual blocks
    after the one at stride 8), and the stem's inverse (``"conv"``: a 4×4 stride-2 transposed
    conv to RGB; ``"unshuffle"``: a 3×3 conv to 12 channels and PixelShuffle(2)).

    ``extra_blocks = (n16, n8, n4)``: residual blocks of g_s only (the encoder has none), after
    the other layers at strides 16, 8 and 4. Their last conv starts at zero, so a decoder grown
    with them (:func:`grow_decoder`) first computes exactly what it computed before.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        latent_dim: int,
        res_blocks: int = 1,
        *,
        res_blocks_8: int = 0,
        attention_blocks: int = 0,
        stem: str = "conv",
        extra_blocks: tuple[int, int, int] = (0, 0, 0),
    ) -> None:
        super().__init__()
        _check_arch(stem, res_blocks, res_blocks_8, attention_blocks)
        c1, c2, c3, c4 = channels
        e16, e8, e4 = check_block_counts(extra_blocks, "PQ-VAE: extra_blocks")
        self.extra_blocks = (e16, e8, e4)
        if stem == "conv":
            tail = [_up(c1, 3)]
        else:
            tail = [nn.Conv2d(c1, 12, 3, padding=1), nn.PixelShuffle(2)]
        layers = [
            nn.Conv2d(latent_dim, c4, 1),
            *[AttentionBlock(c4) for _ in range(attention_blocks)],
            *[ResBlock(c4) for _ in range(res_blocks)],
            *[_extra(c4, 16, j) for j in range(e16)],
            nn.GELU(),
            _up(c4, c3),
            nn.GELU(),
            nn.Conv2d(c3, c3, 3, padding=1),
            *[ResBlock(c3) for _ in range(res_blocks_8)],
            *[_extra(c3, 8, j) for j in range(e8)],
            nn.GELU(),
            _up(c3, c2),
            nn.GELU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            *[_extra(c2, 4, j) for j in range(e4)],
            nn.GELU(),
            _up(c2, c1),
            nn.GELU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.GELU(),
            *tail,
        ]
        self.net = nn.Sequential(*layers)

    def _tags(self) -> list:
        """One tag per layer of ``net``: ``("extra", stride, j)`` for extra blocks, else
        ``("base", i)`` with ``i`` counting the other layers (the same in every decoder of one
        base architecture, whatever its extra blocks)."""
        tags, i = [], 0
        for mod in self.net:
            tag = getattr(mod, "extra_tag", None)
            if tag is None:
                tag, i = ("base", i), i + 1
            tags.append(tag)
        return tags

    @classmethod
    def from_config(cls, config, extra_blocks: tuple[int, int, int] | None = None) -> Decoder:
        """g_s of a :class:`PQMIMConfig`, with ``extra_blocks`` instead of the config's
        ``decoder_extra_blocks`` when given (a second decoder of other size reading the same
        codes, e.g. a perceptual one)."""
        a = _arch(config)
        return cls(
            a.pop("channels"),
            a.pop("latent_dim"),
            a.pop("res_blocks"),
            extra_blocks=config.decoder_extra_blocks if extra_blocks is None else extra_blocks,
            **a,
        )

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y) + 0.5


def _extra(channels: int, stride: int, j: int) -> ResBlock:
    block = ResBlock(channels)
    nn.init.zeros_(block.body[-1].weight)
    nn.init.zeros_(block.body[-1].bias)
    block.extra_tag = ("extra", stride, j)
    return block


def grow_decoder(old: Decoder, new: Decoder) -> Decoder:
    """Copy ``old``'s weights into ``new`` in place (and return it): ``new`` must be the same
    decoder with at least as many extra blocks at each stride (``Decoder(extra_blocks=...)``).
    Extra blocks ``old`` lacks keep their zero-initialised last conv, so ``new`` computes
    exactly what ``old`` does until it is trained. Raises ``ValueError`` on a mismatch."""
    by_tag = dict(zip(old._tags(), old.net))
    new_tags = new._tags()
    missing = sorted(set(by_tag) - set(new_tags))
    if missing:
        raise ValueError(f"grow_decoder: the new decoder lacks layers {missing} of the old one")
    for tag, mod in zip(new_tags, new.net):
        src = by_tag.get(tag)
        if src is None:
            if tag[0] != "extra":
                raise ValueError(f"grow_decoder: the old decoder has no layer {tag}")
            continue
        try:
            mod.load_state_dict(src.state_dict())
        except RuntimeError as exc:
            raise ValueError(f"grow_decoder: layer {tag} differs in shape ({exc})") from exc
    return new

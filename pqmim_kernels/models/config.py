"""The model configuration saved next to the weights."""

from __future__ import annotations

import dataclasses
import json

__all__ = ["PQMIMConfig", "check_block_counts"]

# Fields added after the first bundled model: left out of ``to_json`` (hence of the model id)
# while they hold their default, so models trained before they existed keep their model id and
# every ``.pqm`` file written with them still decodes.
_OMIT_WHEN_DEFAULT = (
    "res_blocks_8",
    "attention_blocks",
    "stem",
    "latent_norm",
    "decoder_extra_blocks",
)


def check_block_counts(value, what: str) -> tuple[int, int, int]:
    """``value`` as a tuple of 3 ints >= 0 (residual blocks at strides 16, 8, 4: the decoder's
    extra blocks); ``ValueError`` starting with ``what`` otherwise."""
    if not isinstance(value, (tuple, list)) or len(value) != 3 or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value
    ):
        raise ValueError(f"{what} must be 3 ints >= 0 (strides 16, 8, 4), got {value!r}")
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class PQMIMConfig:
    """Shape of a PQ-MIM model (one trained model per rate point ``(M, K)``).

    - ``channels``: conv widths of the PQ-VAE at strides 2, 4, 8, 16 (the decoder mirrors them).
    - ``latent_dim`` D, split into ``num_subspaces`` M sub-vectors of ``D / M`` dims, each snapped
      to one of ``codebook_size`` K codewords: raw rate ``M·log2(K) / 256`` bpp.
    - ``res_blocks``: residual blocks at stride 16 on each side.
    - ``mim_*``: the entropy model v2 (:mod:`pqmim_kernels.models.mim`): transformer width W,
      depth, heads, MLP ratio, attention window radius R (``mim_radius``, window ``(2R+1)^2``
      tokens), and the sub-code head's residual MLP blocks (``mim_head_depth``) and their width
      ratio (``mim_head_mlp_ratio``); ``mim_condition=False`` makes the sub-codes of a token
      independent given the context (an ablation). It codes with integer-exact arithmetic
      (PQMIM.md §5).
    - ``stages`` S: coding stages (PQMIM.md §4).
    - ``commitment``: β of the commitment loss.

    PQ-VAE architecture (:mod:`pqmim_kernels.models.pqvae`; the defaults are the original
    design, layer for layer, so weight files written before these fields existed load as is):

    - ``res_blocks_8``: residual blocks at stride 8 on each side (default 0).
    - ``attention_blocks``: self-attention blocks (64-dim heads, MLP ratio 2) at stride 16 on
      each side, over all h·w tokens of the image (default 0). Needs ``channels[3]`` < 64 or a
      multiple of 64.
    - ``stem``: the full-resolution layer: ``"conv"`` (5×5 stride-2 conv; the decoder ends in a
      4×4 stride-2 transposed conv, default) or ``"unshuffle"`` (PixelUnshuffle(2) then a 3×3
      conv; the decoder ends in a 3×3 conv and PixelShuffle(2)).
    - ``latent_norm``: per-token normalisation of the latent before the quantizer: ``"layer"``
      (LayerNorm over D, default) or ``"l2"`` (each of the M sub-vectors scaled to norm
      ``sqrt(D / M)``: cosine-like lookups per sub-space).
    - ``decoder_extra_blocks``: ``(n16, n8, n4)`` residual blocks in g_s only, at strides 16, 8
      and 4 (default none). :func:`pqmim_kernels.models.refine.refine_decoder` grows a trained
      decoder with them (each starts as the identity) and trains it on the model's fixed codes.
    """

    channels: tuple[int, int, int, int] = (32, 64, 96, 128)
    latent_dim: int = 64
    num_subspaces: int = 8
    codebook_size: int = 256
    res_blocks: int = 1
    mim_width: int = 128
    mim_depth: int = 4
    mim_heads: int = 4
    mim_mlp_ratio: float = 3.0
    mim_radius: int = 7
    mim_head_depth: int = 1
    mim_head_mlp_ratio: float = 2.0
    mim_condition: bool = True  # sub-code m conditioned on sub-codes < m (False: independent)
    stages: int = 10
    commitment: float = 0.25
    # PQ-VAE architecture (defaults = the original design)
    res_blocks_8: int = 0  # residual blocks at stride 8 on each side
    attention_blocks: int = 0  # self-attention blocks at stride 16 on each side
    stem: str = "conv"  # full-resolution layer: "conv" (5x5 stride 2) | "unshuffle"
    latent_norm: str = "layer"  # latent normalisation: "layer" (LayerNorm) | "l2" (sub-space)
    decoder_extra_blocks: tuple[int, int, int] = (0, 0, 0)  # g_s only, at strides 16, 8, 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        extra = check_block_counts(self.decoder_extra_blocks, "PQMIMConfig: decoder_extra_blocks")
        object.__setattr__(self, "decoder_extra_blocks", extra)
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise ValueError(f"PQMIMConfig: channels must be 4 positive ints, got {self.channels}")
        for name in ("latent_dim", "num_subspaces", "mim_width", "mim_depth", "mim_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PQMIMConfig: {name} must be a positive int, got {v!r}")
        for name in ("res_blocks", "res_blocks_8", "attention_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"PQMIMConfig: {name} must be an int >= 0, got {v!r}")
        if self.attention_blocks and self.channels[3] >= 64 and self.channels[3] % 64:
            raise ValueError(
                f"PQMIMConfig: attention blocks need channels[3] < 64 or a multiple of 64 "
                f"(64-dim heads), got {self.channels[3]}"
            )
        if self.stem not in ("conv", "unshuffle"):
            raise ValueError(f"PQMIMConfig: stem must be 'conv' or 'unshuffle', got {self.stem!r}")
        if self.latent_norm not in ("layer", "l2"):
            raise ValueError(
                f"PQMIMConfig: latent_norm must be 'layer' or 'l2', got {self.latent_norm!r}"
            )
        if self.latent_dim % self.num_subspaces:
            raise ValueError(
                f"PQMIMConfig: latent_dim {self.latent_dim} is not a multiple of num_subspaces "
                f"{self.num_subspaces}"
            )
        if not 2 <= self.codebook_size <= 65536:
            raise ValueError(
                f"PQMIMConfig: codebook_size must be in [2, 65536], got {self.codebook_size}"
            )
        if not 1 <= self.stages <= 16:
            raise ValueError(f"PQMIMConfig: stages must be in [1, 16], got {self.stages}")
        if self.mim_width % self.mim_heads or self.mim_width % 4:
            raise ValueError(
                f"PQMIMConfig: mim_width {self.mim_width} must be a multiple of 4 and of "
                f"mim_heads {self.mim_heads}"
            )
        if isinstance(self.mim_radius, bool) or not isinstance(self.mim_radius, int) or not (
            0 <= self.mim_radius <= 8
        ):
            raise ValueError(
                f"PQMIMConfig: mim_radius must be an int in [0, 8], got {self.mim_radius!r}"
            )
        if isinstance(self.mim_head_depth, bool) or not isinstance(self.mim_head_depth, int) or (
            self.mim_head_depth < 0
        ):
            raise ValueError(
                f"PQMIMConfig: mim_head_depth must be an int >= 0, got {self.mim_head_depth!r}"
            )

    @property
    def raw_bpp(self) -> float:
        """Bits per pixel of the codes before entropy coding (``M·log2 K / 256``)."""
        import math

        return self.num_subspaces * math.log2(self.codebook_size) / 256.0

    def to_dict(self) -> dict:
        """Every field, tuples as lists: what a model file or checkpoint stores
        (:meth:`from_dict` reads it back)."""
        d = dataclasses.asdict(self)
        d["channels"] = list(d["channels"])
        d["decoder_extra_blocks"] = list(d["decoder_extra_blocks"])
        return d

    def to_json(self) -> str:
        """Canonical JSON of the config (hashed into the model id); fields of
        ``_OMIT_WHEN_DEFAULT`` at their default are left out."""
        d = dataclasses.asdict(self)
        for f in dataclasses.fields(self):
            if f.name in _OMIT_WHEN_DEFAULT and d[f.name] == f.default:
                del d[f.name]
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> PQMIMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PQMIMConfig: unknown fields {unknown}")
        return cls(**d)

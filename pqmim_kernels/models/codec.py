"""The PQ-MIM codec: PQ-VAE + MIM entropy model + rANS, with the CompressAI-style contract.

``forward(x)`` (training), ``compress(x) -> bytes`` and ``decompress(bytes) -> x̂``. The bitstream
is a ``.pqm`` file (:mod:`pqmim_kernels.coding.pqm_format`, spec in ``docs/PQM_FORMAT.md``).

Determinism (PQMIM.md §5). Every probability the coder sees comes from the *integer* entropy
model (:mod:`pqmim_kernels.reference.int_mim`), whose tensors are stored in the model file: its
CDFs are exact integers computed by integer-exact operations, so a file decodes bit-exactly on any
CPU (any ISA, thread count or BLAS) and on a GPU. Encoder and decoder run the same per-stage
procedure (:meth:`PQMIM._code`): query stream of the stage's tokens, sub-codes in sub-space order,
then the known stream of those tokens into the key cache. A CRC of the codes in the header turns
any remaining mismatch (other model, corrupt payload) into a ``ValueError``.

What is *not* bit-exact across machines is the float part around the codes: the conv encoder and
the product quantizer's argmin (an image may get other codes on another machine, near ties) and
the conv decoder (the decoded image may differ by rounding). The codes in a file, and therefore the
bytes written for given codes, are exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pqmim_kernels.coding import pqm_format
from pqmim_kernels.models.config import PQMIMConfig
from pqmim_kernels.models.mim import MIMEntropyModel, mim_bits
from pqmim_kernels.models.pqvae import DOWNSAMPLING, Decoder, Encoder
from pqmim_kernels.models.schedule import coding_order, stage_bounds

__all__ = ["MAX_DECODE_PIXELS", "PQMIM", "pad_to_multiple"]

# Decompression-bomb guard (as Pillow's MAX_IMAGE_PIXELS): a corrupt or crafted header can claim
# any size up to 2^20 x 2^20, and the entropy model's first stages on such a grid take minutes
# and tens of GB (measured: 16384 x 16384 claimed over a 484-byte payload ran 138 s before the
# rANS stream ran dry; 65536 x 65536 reached 20 GB). 2^25 px (33.5 Mpx) is far beyond what the
# CPU path decodes in memory anyway; pass max_pixels=None to lift it for a trusted file.
MAX_DECODE_PIXELS = 1 << 25
# The rANS framing of the payload (pqmim_kernels.coding.rans): "compact" drops the stream's own
# header and check value (the .pqm header records everything the decoder needs: the symbol
# count follows from the image size and the stages sent, and the code check guards integrity).
PAYLOAD_FRAMING = "compact"


def pad_to_multiple(x: torch.Tensor, multiple: int = DOWNSAMPLING) -> torch.Tensor:
    """Edge-replicate (B, C, H, W) on the bottom/right up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    # replicate padding needs pad < size only for 'reflect'; 'replicate' accepts any size
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


# Large images go through the conv transforms in tiles of TILE_TOKENS x TILE_TOKENS tokens
# (1024 x 1024 px) plus TILE_HALO tokens of context on each side, cropped away afterwards: the
# halo (128 px) covers the receptive field of the convolutions, so tiling changes the output
# only by float rounding (and by the context an attention block of the PQ-VAE no longer sees
# beyond a tile). Peak memory is that of one tile, time linear in the pixels. The tiling is a
# fixed function of the image size, so every decoder tiles alike.
TILE_TOKENS = 64
TILE_HALO = 8


def _tiled(fn, x: torch.Tensor, px_in: int, px_out: int) -> torch.Tensor:
    """``fn`` applied to ``x`` (B, C, H, W) in spatial tiles of a token grid.

    A token covers ``px_in`` x ``px_in`` positions of ``x`` and ``px_out`` x ``px_out`` of the
    output (the encoder: ``px_in=16, px_out=1``; the decoder: ``1, 16``). Grids of at most
    ``TILE_TOKENS^2`` tokens are passed whole; larger ones tile by tile into one output tensor.
    """
    h, w = x.shape[2] // px_in, x.shape[3] // px_in
    if h * w <= TILE_TOKENS * TILE_TOKENS:
        return fn(x)
    out = None
    for t0 in range(0, h, TILE_TOKENS):
        t1 = min(h, t0 + TILE_TOKENS)
        a0, a1 = max(0, t0 - TILE_HALO), min(h, t1 + TILE_HALO)
        for u0 in range(0, w, TILE_TOKENS):
            u1 = min(w, u0 + TILE_TOKENS)
            b0, b1 = max(0, u0 - TILE_HALO), min(w, u1 + TILE_HALO)
            y = fn(x[:, :, a0 * px_in : a1 * px_in, b0 * px_in : b1 * px_in])
            if out is None:
                out = y.new_empty(y.shape[0], y.shape[1], h * px_out, w * px_out)
            dy, dx = (t0 - a0) * px_out, (u0 - b0) * px_out  # the halo to crop away
            ny, nx = (t1 - t0) * px_out, (u1 - u0) * px_out
            out[:, :, t0 * px_out : t1 * px_out, u0 * px_out : u1 * px_out] = y[
                :, :, dy : dy + ny, dx : dx + nx
            ]
            del y
    return out


def shrink(x: torch.Tensor, downscale: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 3, ceil(H / f), ceil(W / f)), ``f = 2**downscale``: the mean of each
    f x f block (edge-replicated to a multiple of f first)."""
    if downscale == 0:
        return x
    f = 1 << downscale
    return F.avg_pool2d(pad_to_multiple(x, f), f)


def enlarge(x: torch.Tensor, downscale: int, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`shrink` for the decoder: bicubic enlargement by ``2**downscale``,
    cropped to ``size`` and clamped to [0, 1]."""
    y = F.interpolate(x, scale_factor=1 << downscale, mode="bicubic", align_corners=False)
    return y[..., : size[0], : size[1]].clamp(0.0, 1.0)


def check_rate_lambda(rate_lambda) -> float:
    """``rate_lambda`` as a float; ``ValueError`` unless it is a finite real number >= 0."""
    if isinstance(rate_lambda, bool) or not isinstance(rate_lambda, (int, float, np.floating)):
        raise ValueError(f"compress: rate_lambda must be a number >= 0, got {rate_lambda!r}")
    lam = float(rate_lambda)
    if not (math.isfinite(lam) and lam >= 0.0):
        raise ValueError(f"compress: rate_lambda must be a finite number >= 0, got {lam}")
    return lam


class _NullCoder:
    """A coder that codes nothing: :meth:`PQMIM._code` run only to choose codes."""

    def encode_cdfs(self, symbols, cdfs) -> None:
        pass


def _check_downscale(downscale) -> None:
    if downscale not in range(pqm_format.MAX_DOWNSCALE + 1) or isinstance(downscale, bool):
        raise ValueError(
            f"compress: downscale must be an int in [0, {pqm_format.MAX_DOWNSCALE}], "
            f"got {downscale!r}"
        )


def _check_image(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor in [0, 1], got {x.dtype}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} must have a positive size, got {tuple(x.shape)}")


class PQMIM(nn.Module):
    """PQ-MIM learned image codec (one model per rate point ``(M, K)``).

    Sub-modules: ``encoder`` (g_a), ``quantizer`` (:class:`pqmim_kernels.nn.ProductQuantizer`),
    ``decoder`` (g_s) and ``entropy_model`` (:class:`MIMEntropyModel`, the float model that is
    trained); coding uses its integer export (:meth:`export_entropy_model`,
    :attr:`int_entropy_model`).
    """

    def __init__(self, config: PQMIMConfig | None = None) -> None:
        super().__init__()
        from pqmim_kernels.nn import ProductQuantizer

        self.config = config = config or PQMIMConfig()
        self.encoder = Encoder.from_config(config)
        self.decoder = Decoder.from_config(config)
        self.quantizer = ProductQuantizer(
            config.latent_dim,
            config.num_subspaces,
            config.codebook_size,
            commitment_weight=config.commitment,
        )
        self.entropy_model = MIMEntropyModel(
            config.num_subspaces,
            config.codebook_size,
            width=config.mim_width,
            depth=config.mim_depth,
            heads=config.mim_heads,
            mlp_ratio=config.mim_mlp_ratio,
            radius=config.mim_radius,
            head_depth=config.mim_head_depth,
            head_mlp_ratio=config.mim_head_mlp_ratio,
            condition=config.mim_condition,
        )
        # The integer entropy model that codes (exported from ``entropy_model``; stored in the
        # model file). None until :meth:`export_entropy_model` or loading a model file.
        self._int_tensors: dict[str, torch.Tensor] | None = None
        self._int_meta: dict | None = None
        self._int_model = None
        # An optional second g_s fine-tuned for perceptual quality on the same codes. Not a
        # registered sub-module: it is not in the state dict, so adding one to a model file
        # keeps its model id (every .pqm file it wrote still decodes, with either decoder).
        self.perceptual_decoder = None
        # Backend of the integer entropy model (functional.int_session): every backend gives
        # the same integers; "auto" = the C++ engine on the CPU when built, the torch spec else.
        self.int_backend = "auto"
        # Model ids of earlier models that decode exactly like this one (they differed only in
        # the encoder, which no decoder runs): their files decode with this model too. Not in
        # the state dict or the model id; set by :meth:`add_alias`, stored by ``save_model``.
        self.aliases: tuple[bytes, ...] = ()

    # ---- the two halves of the PQ-VAE ----

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (any H, W) -> latent (B, h, w, D), h = ceil(H/16).

        Without autograd, an image of more than ``TILE_TOKENS^2`` tokens is encoded in tiles
        (:func:`_tiled`) so that memory stays bounded and time linear in the pixels.
        """
        _check_image(x)
        x = pad_to_multiple(x)
        if not torch.is_grad_enabled():
            return _tiled(self.encoder, x, DOWNSAMPLING, 1).permute(0, 2, 3, 1)
        return self.encoder(x).permute(0, 2, 3, 1)

    def quantize(self, y: torch.Tensor):
        """latent (B, h, w, D) -> ``(quantized (B, h, w, D), codes (B, h, w, M) int64, loss)``."""
        b, h, w, d = y.shape
        q, idx, loss = self.quantizer(y.reshape(b, h * w, d))
        return q.view(b, h, w, d), idx.view(b, h, w, -1).long(), loss

    def encode_codes(
        self, x: torch.Tensor, rate_lambda: float = 0.0, latent_steps: int = 0
    ) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, h, w, M) int64 (no gradient).

        ``rate_lambda`` 0: every sub-vector of the latent snapped to its nearest codeword (the
        assignment launches with pinned Triton configs on a GPU: reproducible codes). lam > 0:
        rate-aware assignment: sub-code by sub-code in coding order (stages, then sub-spaces),
        the codeword minimising ``squared distance + lam * bits``, with ``bits`` its exact code
        length under the integer entropy model given the codes chosen before it (see
        :meth:`compress`). Files of any number of stages of these codes are what
        ``compress(..., rate_lambda=lam)`` writes. ``latent_steps``: decoder-aware latent
        optimisation first (see :meth:`compress`)."""
        lam = check_rate_lambda(rate_lambda)
        return self.assign(self._latent(x, latent_steps), lam)

    @torch.no_grad()
    def assign(self, latent: torch.Tensor, rate_lambda: float = 0.0) -> torch.Tensor:
        """latent (B, h, w, D) float -> codes (B, h, w, M) int64: the nearest codewords
        (pinned launch configs), or with ``rate_lambda`` > 0 the rate-aware choice of
        :meth:`encode_codes`."""
        lam = check_rate_lambda(rate_lambda)
        pinned, self.quantizer.pinned = self.quantizer.pinned, True
        try:
            codes = self.quantize(latent.to(self._device()).float())[1]
        finally:
            self.quantizer.pinned = pinned
        if lam == 0.0:
            return codes
        b, h, w, m = codes.shape
        for i in range(b):
            flat = codes[i].reshape(h * w, m).clone()
            rd = (latent[i].reshape(h * w, -1).to(self._device()).float(), lam)
            self._code((h, w), flat, self.config.stages, _NullCoder(), False, rd=rd)
            codes[i] = flat.view(h, w, m)
        return codes

    def _latent(
        self, x: torch.Tensor, latent_steps: int = 0, progress: bool = False
    ) -> torch.Tensor:
        """(B, 3, H, W) -> the latent the encoder sends, (B, h, w, D) float, no gradient:
        ``encode_latent(x)``, with ``latent_steps`` > 0 each image's optimised first
        (:func:`~pqmim_kernels.models.latent_opt.optimize_latent`)."""
        from pqmim_kernels.models.latent_opt import check_latent_steps, optimize_latent

        steps = check_latent_steps(latent_steps)
        with torch.no_grad():
            latent = self.encode_latent(x)
        for i in range(latent.shape[0] if steps else 0):
            latent[i] = optimize_latent(
                self, x[i : i + 1], steps, latent=latent[i : i + 1], progress=progress
            )[0]
        return latent

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w, M) int -> the decoder's input: the quantized latent (B, D, h, w)
        float32 (each sub-code replaced by its codeword)."""
        b, h, w, m = codes.shape
        y = self.quantizer.get_output_from_indices(codes.reshape(b, h * w, m).long())
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2).float()

    def decode_codes(
        self, codes: torch.Tensor, size: tuple[int, int] | None = None, decoder: str = "mse"
    ) -> torch.Tensor:
        """codes (B, h, w, M) int -> image (B, 3, H, W) float32 clamped to [0, 1].

        ``size`` = (H, W) crops the 16h × 16w output (default: no crop). ``decoder``: ``"mse"``
        (g_s, trained for PSNR) or ``"perceptual"`` (the adversarially fine-tuned g_s of
        :mod:`pqmim_kernels.models.perceptual`, when the model file has one).
        """
        net = self._synthesis(decoder)
        with torch.no_grad():
            x = _tiled(net, self.dequantize(codes), 1, DOWNSAMPLING)
        if size is not None:
            x = x[..., : size[0], : size[1]]
        return x.clamp(0.0, 1.0)

    def __setattr__(self, name: str, value) -> None:
        if name == "perceptual_decoder":  # kept out of _modules, hence out of the state dict
            self.__dict__["_perceptual_decoder"] = value
            return
        super().__setattr__(name, value)

    @property
    def perceptual_decoder(self) -> nn.Module | None:
        """The perceptual g_s (a :class:`~pqmim_kernels.models.pqvae.Decoder`) or None."""
        return self.__dict__.get("_perceptual_decoder")

    def _synthesis(self, decoder: str) -> nn.Module:
        if decoder == "mse":
            return self.decoder
        if decoder != "perceptual":
            raise ValueError(f"decoder must be 'mse' or 'perceptual', got {decoder!r}")
        if self.perceptual_decoder is None:
            raise ValueError(
                "this model has no perceptual decoder (train one with `pqmim finetune-perceptual`"
                " or use decoder='mse')"
            )
        if next(self.perceptual_decoder.parameters()).device != self._device():
            self.perceptual_decoder.to(self._device())
        return self.perceptual_decoder

    # ---- training contract ----

    def forward(self, x: torch.Tensor) -> dict:
        """Training pass on (B, 3, H, W) float in [0, 1] (padded to multiples of 16 if needed).

        Returns a dict: ``x_hat`` (B, 3, H, W) reconstruction (straight-through gradient to the
        encoder), ``codes`` (B, h, w, M) int64, ``vq_loss`` scalar (commitment + codebook
        terms of the quantizer), ``bits`` (B,) float32 rate in bits (the float entropy model's
        cross-entropy of the codes under the coding schedule), ``bpp`` (B,).
        """
        _check_image(x)
        size = x.shape[-2:]
        q, codes, vq_loss = self.quantize(self.encode_latent(x))
        x_hat = self.decoder(q.permute(0, 3, 1, 2))[..., : size[0], : size[1]]
        bits = self.mim_bits(codes)
        return {
            "x_hat": x_hat,
            "codes": codes,
            "vq_loss": vq_loss,
            "bits": bits,
            "bpp": bits / float(size[0] * size[1]),
        }

    def mim_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """Float-model rate of code grids (B, h, w, M): (B,) bits (see :func:`mim_bits`)."""
        return mim_bits(self.entropy_model, codes, self.config.stages)

    # ---- the integer entropy model ----

    def export_entropy_model(self) -> None:
        """Export the (calibrated) float entropy model to the integer model used for coding."""
        tensors, meta = self.entropy_model.export_int()
        self.set_int_entropy_model(tensors, meta)

    def set_int_entropy_model(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Install an integer entropy model (tensors + meta of ``export_int``), validated."""
        from pqmim_kernels.reference.int_mim import IntMIM

        cfg = self.config
        want = {
            "num_subspaces": cfg.num_subspaces,
            "codebook_size": cfg.codebook_size,
            "width": cfg.mim_width,
            "depth": cfg.mim_depth,
            "heads": cfg.mim_heads,
            "radius": cfg.mim_radius,
            "head_depth": cfg.mim_head_depth,
        }
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            raise ValueError(f"integer entropy model does not match the model config: {bad}")
        # stored files may hold narrower integers (int32 tables, see int_state); compute in int64
        tensors = {
            k: v.to(torch.int64) if v.dtype in (torch.int16, torch.int32) else v
            for k, v in tensors.items()
        }
        model = IntMIM(tensors, meta)
        self._int_tensors = {k: v.detach().cpu().clone() for k, v in tensors.items()}
        self._int_meta = dict(meta)
        self._int_model = model

    @property
    def int_entropy_model(self):
        """The :class:`~pqmim_kernels.reference.int_mim.IntMIM` that codes, on the model's
        device. Raises RuntimeError when the model has none (export it first)."""
        if self._int_model is None:
            raise RuntimeError(
                "this PQMIM model has no integer entropy model: calibrate and export it "
                "(model.entropy_model.calibrate(...); model.export_entropy_model()) or load a "
                "trained model file"
            )
        if self._int_model.device != self._device():
            self._int_model.to(self._device())
        return self._int_model

    def int_state(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, meta)`` of the integer entropy model (for saving), or None. int64 tensors
        are given in the narrowest of int16 / int32 that holds their values (the embedding
        tables are most of the model, and their values are small); loading widens them back
        to int64, so the integers, and the model id, are the same."""
        if self._int_tensors is None:
            return None
        small = {}
        for k, v in self._int_tensors.items():
            if v.dtype != torch.int64:
                small[k] = v
                continue
            peak = int(v.abs().max()) if v.numel() else 0
            if peak < (1 << 15) - 1:
                small[k] = v.to(torch.int16)
            elif peak < (1 << 31) - 1:
                small[k] = v.to(torch.int32)
            else:
                small[k] = v
        return small, dict(self._int_meta)

    # ---- coding ----

    def model_id(self) -> bytes:
        """2-byte fingerprint: sha256 of the config, every state-dict tensor (fp32 bytes) and
        every integer entropy-model tensor (int64/int8 little-endian bytes), in name order."""
        hsh = hashlib.sha256(self.config.to_json().encode())
        for name, t in sorted(self.state_dict().items()):
            hsh.update(name.encode())
            hsh.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if self._int_tensors is not None:
            for name, t in sorted(self._int_tensors.items()):
                hsh.update(b"int:" + name.encode())
                arr = t.contiguous().numpy()
                hsh.update(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
        return hsh.digest()[:2]

    def reads(self, model_id: bytes) -> bool:
        """Whether this model decodes the files of ``model_id`` (2 bytes): its own id or one of
        its :attr:`aliases`."""
        return bytes(model_id) == self.model_id() or bytes(model_id) in self.aliases

    def add_alias(self, other: PQMIM) -> None:
        """Let this model decode the files ``other`` wrote (e.g. the model whose encoder was
        fine-tuned into this one, :func:`pqmim_kernels.models.refine.refine_encoder`).

        ``other`` must decode exactly like this model: the same config, quantizer, decoder,
        float and integer entropy model; only encoder weights may differ (no decoder runs the
        encoder). Appends ``other.model_id()`` and ``other``'s own aliases to :attr:`aliases`
        (``save_model`` leaves out any that equal the model's own id when it is saved).
        Raises ``ValueError`` naming what differs.
        """
        if not isinstance(other, PQMIM):
            raise TypeError(f"add_alias: expected a PQMIM, got {type(other).__name__}")
        if other.config.to_dict() != self.config.to_dict():
            raise ValueError("add_alias: the models have different configs")
        a, b = self.state_dict(), other.state_dict()
        if a.keys() != b.keys():
            raise ValueError("add_alias: the models have different parameters")
        differ = sorted(
            k for k in a if not k.startswith("encoder.") and not torch.equal(a[k].cpu(), b[k].cpu())
        )
        if differ:
            raise ValueError(
                f"add_alias: the models differ in {', '.join(differ[:4])}"
                + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
                + "; only the encoder may differ between models that decode alike"
            )
        ia, ib = self._int_tensors, other._int_tensors
        if (ia is None) != (ib is None) or self._int_meta != other._int_meta or (
            ia is not None
            and (ia.keys() != ib.keys() or any(not torch.equal(ia[k], ib[k]) for k in ia))
        ):
            raise ValueError("add_alias: the models have different integer entropy models")
        self.aliases = tuple(dict.fromkeys((*self.aliases, other.model_id(), *other.aliases)))

    def _schedule(self, h: int, w: int):
        """``(order, cum, stage)``: coding order (N,) int64 numpy, stage bounds (S+1,), and the
        stage of every raster position as an int64 tensor on the model's device."""
        n = h * w
        order = coding_order(h, w)
        cum = stage_bounds(n, self.config.stages)
        stage = np.empty(n, dtype=np.int64)
        for s in range(self.config.stages):
            stage[order[cum[s] : cum[s + 1]]] = s
        return order, cum, torch.from_numpy(stage).to(self._device())

    def _code(
        self,
        grid,
        flat: torch.Tensor,
        sent: int,
        coder,
        decoding: bool,
        fill: dict | None = None,
        rd: tuple[torch.Tensor, float] | None = None,
    ) -> None:
        """The per-stage coding procedure shared by encoder and decoder (PQMIM.md §4).

        ``flat``: (h*w, M) int64 codes in raster order (read when encoding; written when
        decoding). ``coder``: a :class:`RansEncoder` or :class:`RansDecoder` for the stages
        ``< sent``. For every non-empty stage ``s`` in order: the query stream of its tokens; for
        each sub-space ``m`` the integer CDFs given sub-codes ``< m``, coded or decoded; then the
        known stream of the stage's tokens fills the key cache. Decoding a partial file then
        fills the stages ``>= sent``: ``fill=None`` with the most likely codes, stage by stage
        (greedy), or with the options of :func:`pqmim_kernels.models.sampling.fill_sampled`
        (``fill={"seed": 0, ...}``) by MaskGIT-style sampling.

        ``rd = (latent, lam)`` (encoding only): rate-aware assignment. ``latent`` (h*w, D) float
        is the encoder's latent in raster order; each sent sub-code is chosen, in coding order,
        as ``argmin_k ||y_m - c_mk||^2 + lam * bits_k`` with ``bits_k`` the exact code length
        of codeword k under the integer CDFs it is coded with (its context: the codes chosen so
        far), and written to ``flat``. The choice of a stage depends only on earlier stages, so
        the codes do not depend on ``sent``. The decoder needs nothing of this.
        """
        from pqmim_kernels.functional import int_session

        h, w = grid
        order, cum, stage = self._schedule(h, w)
        session = int_session(self.int_entropy_model, grid, stage, backend=self.int_backend)
        last = sent if not decoding or fill is not None else self.config.stages
        for s in range(last):
            lo, hi = int(cum[s]), int(cum[s + 1])
            if lo == hi:
                continue
            pos = torch.from_numpy(order[lo:hi].copy()).to(flat.device)
            st = stage[pos]
            xq = session.query(pos, st)
            codes = flat[pos] if not decoding else torch.zeros_like(flat[pos])
            for m in range(self.config.num_subspaces):
                logits = session.head_logits(xq, codes, m)
                if s >= sent:
                    codes[:, m] = logits.argmax(dim=-1).to(codes.device)
                    continue
                cdfs = session.cdfs(logits)
                if rd is not None:
                    codes[:, m] = self._rd_choice(rd, pos, m, cdfs).to(codes.device)
                if decoding:
                    sym = coder.decode_cdfs(cdfs)
                    codes[:, m] = torch.from_numpy(np.asarray(sym, dtype=np.int64)).to(codes.device)
                else:
                    coder.encode_cdfs(codes[:, m].cpu().numpy(), cdfs)
            if decoding or rd is not None:
                flat[pos] = codes
            if s + 1 < last or (fill is not None and hi < h * w):
                session.known(codes, pos, st)
        if decoding and fill is not None and int(cum[sent]) < h * w:
            from pqmim_kernels.models.sampling import fill_sampled

            coder.finish()  # the sent stages end the stream: check it before generating
            fill_sampled(
                session,
                flat,
                order[int(cum[sent]) :],
                sent,
                self.config.num_subspaces,
                **fill,
            )

    def _rd_choice(self, rd, pos: torch.Tensor, m: int, cdfs) -> torch.Tensor:
        """Sub-codes ``m`` of the tokens ``pos`` minimising squared distance + lam * exact bits
        (see :meth:`_code`): (n,) int64."""
        latent, lam = rd
        d = self.config.latent_dim // self.config.num_subspaces
        y = latent[pos.to(latent.device), m * d : (m + 1) * d].float()  # (n, d)
        book = self.quantizer.codebooks[m].float().to(y.device)  # (K, d)
        dist = (y * y).sum(1, keepdim=True) - 2.0 * y @ book.T + (book * book).sum(1)[None]
        c = cdfs if isinstance(cdfs, torch.Tensor) else torch.from_numpy(np.asarray(cdfs))
        c = c.to(device=y.device, dtype=torch.float32)  # integers < 2^24: exact in float32
        bits = torch.log2(c[:, -1:]) - torch.log2(c[:, 1:] - c[:, :-1])  # (n, K) code lengths
        return torch.argmin(dist + lam * bits, dim=1)

    @torch.no_grad()
    def compress(
        self,
        x: torch.Tensor,
        stages: int | None = None,
        downscale: int = 0,
        rate_lambda: float = 0.0,
        latent_steps: int = 0,
        progress: bool = False,
    ) -> bytes:
        """(1, 3, H, W) float in [0, 1] -> bytes of a ``.pqm`` file.

        ``stages``: send only the first ``stages`` coding stages (default: all S). The decoder
        fills the tokens of the missing stages with the entropy model's most likely codes
        (PQMIM.md §7, hybrid compression/generation): fewer bytes, lower fidelity.
        ``downscale`` k in 0..3: code the image shrunk by ``2**k`` (area averaging); the decoder
        enlarges it back (bicubic) to H x W. The way a tiny byte budget fits any image.
        ``rate_lambda`` >= 0: rate-aware assignment. 0 (default) snaps every sub-vector of the
        latent to its nearest codeword; lam > 0 takes, sub-code by sub-code in coding order,
        the codeword minimising ``squared distance + lam * bits`` under the entropy model's
        exact code lengths in context (:meth:`_code`): smaller files for a little more
        distortion (on held-out photos with the default model, 0.002 saves ~10 % of the bits
        for ~0.05 dB). ``latent_steps`` N > 0: the encoder first spends N gradient steps
        looking for a latent whose codes this decoder draws closer to ``x``
        (:func:`~pqmim_kernels.models.latent_opt.optimize_latent`; N forward + backward
        passes of the decoder, ``progress`` shows a bar); best with a small ``rate_lambda``
        (e.g. 30 steps and 0.0005), which keeps the bits where they were. The file format
        and decoder are the same for every lam and N: only the encoder searches.
        """
        _check_image(x)
        if x.shape[0] != 1:
            raise ValueError(f"compress: x must hold one image (1, 3, H, W), got {tuple(x.shape)}")
        height, width = int(x.shape[2]), int(x.shape[3])
        self._check_size(height, width)
        self._check_stages(stages)
        _check_downscale(downscale)
        check_rate_lambda(rate_lambda)
        x = shrink(x, downscale).to(self._device())
        latent = self._latent(x, latent_steps, progress)[0]
        return self.compress_latent(latent, (height, width), stages, downscale, rate_lambda)

    @torch.no_grad()
    def compress_latent(
        self,
        latent: torch.Tensor,
        size: tuple[int, int],
        stages: int | None = None,
        downscale: int = 0,
        rate_lambda: float = 0.0,
    ) -> bytes:
        """A latent (h, w, D) float of an image of ``size = (H, W)`` pixels (as
        :meth:`encode_latent` or :func:`~pqmim_kernels.models.latent_opt.optimize_latent` give
        it, of the image shrunk ``2**downscale``) -> bytes of a ``.pqm`` file: its nearest
        codes, or with ``rate_lambda`` > 0 rate-aware ones, coded as :meth:`compress` codes
        them. The way to code one encoded image several ways (stages, lambdas) without
        encoding it again."""
        stages = self._check_stages(stages)
        _check_downscale(downscale)
        lam = check_rate_lambda(rate_lambda)
        if not isinstance(latent, torch.Tensor) or latent.dim() != 3:
            got = tuple(latent.shape) if isinstance(latent, torch.Tensor) else type(latent).__name__
            raise ValueError(f"compress_latent: latent must have shape (h, w, D), got {got}")
        dim = self.quantizer.embed.shape[0] * self.quantizer.embed.shape[2]
        if latent.shape[2] != dim or not latent.dtype.is_floating_point:
            raise ValueError(
                f"compress_latent: latent must be float (h, w, {dim}), got "
                f"{tuple(latent.shape)} {latent.dtype}"
            )
        f = 1 << downscale
        grid = tuple(math.ceil(math.ceil(int(v) / f) / DOWNSAMPLING) for v in size)
        if tuple(latent.shape[:2]) != grid:
            raise ValueError(
                f"compress_latent: a {size[1]}x{size[0]} image at downscale {downscale} has a "
                f"{grid[0]}x{grid[1]} token grid, the latent {latent.shape[0]}x{latent.shape[1]}"
            )
        latent = latent.to(self._device()).float()
        codes = self.assign(latent[None])[0]
        rd = None if lam == 0.0 else (latent.reshape(-1, latent.shape[-1]), lam)
        return self._write(codes, tuple(size), stages, downscale, rd)  # one coding pass

    def _check_stages(self, stages) -> int:
        total = self.config.stages
        stages = total if stages is None else stages
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= total:
            raise ValueError(f"compress: stages must be an int in [1, {total}], got {stages!r}")
        return stages

    @staticmethod
    def _check_size(height: int, width: int) -> None:
        if max(height, width) > pqm_format.MAX_DIM:
            raise ValueError(f"compress: image side must be <= {pqm_format.MAX_DIM} px")
        if height * width > MAX_DECODE_PIXELS:
            raise ValueError(
                f"compress: a {width}x{height} image is over the decoder's default limit of "
                f"{MAX_DECODE_PIXELS} px (MAX_DECODE_PIXELS); split it into tiles"
            )

    @torch.no_grad()
    def compress_codes(
        self,
        codes: torch.Tensor,
        size: tuple[int, int],
        stages: int | None = None,
        downscale: int = 0,
    ) -> bytes:
        """Codes (h, w, M) int64 in [0, K) of an image of ``size = (H, W)`` pixels -> bytes of a
        ``.pqm`` file (``h = ceil(H' / 16)``, ``w = ceil(W' / 16)`` for the coded size ``(H',
        W') = ceil((H, W) / 2**downscale)``). Exact: the same codes give the same bytes on every
        machine (what the golden tests pin)."""
        return self._write(codes, size, stages, downscale)

    def _write(self, codes, size, stages, downscale, rd=None) -> bytes:
        """:meth:`compress_codes`; with ``rd`` (see :meth:`_code`) the sent codes are chosen
        rate-aware while they are coded (``codes`` then only supplies the unsent stages) and
        the header's code check covers the chosen ones."""
        from pqmim_kernels.coding import RansEncoder

        height, width = (int(v) for v in size)
        self._check_size(height, width)
        stages = self._check_stages(stages)
        header = pqm_format.PqmHeader(self.model_id(), height, width, stages, 0, downscale)
        ch, cw = header.coded_size
        h, w = -(-ch // DOWNSAMPLING), -(-cw // DOWNSAMPLING)
        m, k = self.config.num_subspaces, self.config.codebook_size
        if not isinstance(codes, torch.Tensor) or tuple(codes.shape) != (h, w, m):
            got = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"compress_codes: codes must be a ({h}, {w}, {m}) tensor, got {got}")
        if (
            codes.dtype.is_floating_point
            or codes.numel()
            and not (0 <= int(codes.min()) and int(codes.max()) < k)
        ):
            raise ValueError(f"compress_codes: codes must be integers in [0, {k})")
        flat = codes.reshape(h * w, m).to(self._device(), torch.int64)
        enc = RansEncoder(framing=PAYLOAD_FRAMING)
        self._code((h, w), flat, stages, enc, decoding=False, rd=rd)
        order, cum, _ = self._schedule(h, w)
        check = pqm_format.code_check(
            flat.cpu().numpy()[order[: int(cum[stages])]], pqm_format.check_context(header)
        )
        return pqm_format.pack(dataclasses.replace(header, check=check), enc.finish())

    @torch.no_grad()
    def decompress_codes(
        self,
        data: bytes,
        max_pixels: int | None = MAX_DECODE_PIXELS,
        *,
        fill: str = "greedy",
        seed: int = 0,
        iterations: int = 8,
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Bytes of a ``.pqm`` file -> ``(codes (1, h, w, M) int64, (H, W))``: the codes of the
        coded image (shrunk by ``2**downscale`` when the header says so, see
        :meth:`compress`) and the size of the image the file holds.

        A partial file's missing stages are filled by ``fill``: ``"greedy"`` (the most likely
        codes, stage by stage) or ``"sample"`` (MaskGIT-style sampling in ``iterations`` rounds
        at ``temperature``, seeded by ``seed``; :mod:`pqmim_kernels.models.sampling`). Both are
        deterministic: the same file and options give the same codes on every machine.

        Raises ``ValueError`` for foreign, truncated or corrupt files, files made by another
        model or format version, code-check mismatches, and headers claiming more than
        ``max_pixels`` pixels (``None``: no limit), checked before any work so a corrupt size
        cannot cost minutes and gigabytes; ``MemoryError`` when this machine cannot hold the
        decoder's working set for the claimed size (not a corrupt file).
        """
        from pqmim_kernels.coding import RansDecoder

        header, payload = pqm_format.unpack(data)
        if max_pixels is not None and header.height * header.width > max_pixels:
            raise ValueError(
                f"this .pqm file claims a {header.width}x{header.height} image "
                f"({header.height * header.width} px), over the decoder's limit of {max_pixels} px "
                "(a corrupt header, or pass max_pixels=None for a trusted file)"
            )
        if not self.reads(header.model_id):
            also = ", ".join(a.hex() for a in self.aliases)
            also = f", which also reads {also}" if also else ""
            raise ValueError(
                f"this .pqm file was made by model {header.model_id.hex()}, not by the loaded "
                f"model {self.model_id().hex()}{also} (load the model that wrote it)"
            )
        if header.stages_sent > self.config.stages:
            raise ValueError(
                f"this .pqm file holds {header.stages_sent} stages; the model codes only "
                f"{self.config.stages}"
            )
        from pqmim_kernels.models.sampling import FILLS

        if fill not in FILLS:
            raise ValueError(f"decompress: fill must be one of {FILLS}, got {fill!r}")
        options = None
        if fill == "sample":
            options = {"seed": seed, "iterations": iterations, "temperature": temperature}
            from pqmim_kernels.models import sampling

            sampling.check_options(**options)
        ch, cw = header.coded_size
        h, w = -(-ch // DOWNSAMPLING), -(-cw // DOWNSAMPLING)
        m = self.config.num_subspaces
        _, cum, _ = self._schedule(h, w)
        try:
            flat = torch.zeros(h * w, m, dtype=torch.int64, device=self._device())
            symbols = int(cum[header.stages_sent]) * m
            dec = RansDecoder(payload, framing=PAYLOAD_FRAMING, symbols=symbols)
            self._code((h, w), flat, header.stages_sent, dec, decoding=True, fill=options)
            if options is None or int(cum[header.stages_sent]) == h * w:
                dec.finish()
        except (MemoryError, torch.OutOfMemoryError) as exc:
            raise MemoryError(
                f"decoding this {header.width}x{header.height} .pqm image needs more memory "
                f"than this machine has ({exc})"
            ) from exc
        except (ValueError, RuntimeError, IndexError, OverflowError) as exc:
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc):
                raise MemoryError(
                    f"decoding this {header.width}x{header.height} .pqm image needs more memory "
                    f"than this machine has ({exc})"
                ) from exc
            raise ValueError(
                f"corrupt .pqm payload ({exc}): the file is damaged or truncated, or it was "
                "written by another entropy model whose model id happens to match"
            ) from exc
        order, cum, _ = self._schedule(h, w)
        sent = int(cum[header.stages_sent])
        context = pqm_format.check_context(header)
        if pqm_format.code_check(flat.cpu().numpy()[order[:sent]], context) != header.check:
            raise ValueError(
                "decoded codes fail the .pqm code check: either the file (header or payload) is "
                "corrupt, or it was written by another entropy model whose model id happens to "
                "match (the integer model decodes identically on every machine, so a device or "
                "library difference cannot cause this)"
            )
        return flat.view(1, h, w, m), (header.height, header.width)

    @torch.no_grad()
    def decompress(
        self, data: bytes, max_pixels: int | None = MAX_DECODE_PIXELS, **fill_options
    ) -> torch.Tensor:
        """Bytes of a ``.pqm`` file -> image (1, 3, H, W) float32 in [0, 1] (on the model's
        device). Errors, ``max_pixels`` and the fill options (``fill``, ``seed``, ``iterations``,
        ``temperature``) as in :meth:`decompress_codes`; ``decoder="perceptual"`` as in
        :meth:`decode_codes`."""
        decoder = fill_options.pop("decoder", "mse")
        self._synthesis(decoder)  # a bad or missing decoder fails before the entropy decoding
        codes, size = self.decompress_codes(data, max_pixels, **fill_options)
        header, _ = pqm_format.unpack(data)
        if header.downscale == 0:
            return self.decode_codes(codes, size, decoder)
        coded = self.decode_codes(codes, header.coded_size, decoder)
        return enlarge(coded, header.downscale, size)

    @torch.no_grad()
    def estimate_bits(self, x: torch.Tensor) -> tuple[float, float]:
        """Rate of ``x`` under the coding schedule: ``(ideal_bits, float_bits)``.

        ``ideal_bits``: −Σ log2 of the integer model's frequencies for the codes (what an ideal
        coder spends on the payload); ``float_bits``: the float model's cross-entropy of the same
        codes (their ratio is the cost of integer inference).
        """
        codes = self.encode_codes(x.to(self._device()))
        return self.code_bits(codes[0]), float(self.mim_bits(codes)[0])

    @torch.no_grad()
    def code_bits(self, codes: torch.Tensor) -> float:
        """Ideal payload bits of codes (h, w, M) under the integer model (−Σ log2 f / 2^24)."""

        class _Tally:
            bits = 0.0

            def encode_cdfs(self, sym, cdfs):
                rows = np.arange(sym.size)
                c = cdfs.astype(np.int64)
                freq = c[rows, sym + 1] - c[rows, sym]
                self.bits += float(-np.log2(freq / c[:, -1]).sum())

        h, w, m = codes.shape
        tally = _Tally()
        flat = codes.reshape(h * w, m).to(self._device(), torch.int64)
        self._code((h, w), flat, self.config.stages, tally, decoding=False)
        return tally.bits

    def _device(self) -> torch.device:
        return next(self.parameters()).device

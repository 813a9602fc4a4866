"""The PQ-MIM codec: PQ-VAE + MIM entropy model + rANS, with the CompressAI-style contract.

``forward(x)`` (training), ``compress(x) -> bytes`` and ``decompress(bytes) -> x̂``. The bitstream
is a ``.pqm`` file (:mod:`pqmim_kernels.coding.pqm_format`, spec in ``docs/PQM_FORMAT.md``).

Determinism (PQMIM.md §5). Encoder and decoder compute every stage's probabilities with the
same call: batch of one, the sequence ``[known tokens in coding order] + [this stage's tokens]``
(the other unknown tokens are dropped: unknown tokens are queries only, so they cannot change
anybody's output), the same model and backend. The fp32 logits are rounded to a
``1/logit_grid`` grid and the softmax is taken in float64 before the shared integer
quantisation (:func:`pqmim_kernels.coding.quantize_probs`). A CRC of the codes in the header
turns any remaining mismatch (other model, other device, corrupt payload) into a ``ValueError``.
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


def pad_to_multiple(x: torch.Tensor, multiple: int = DOWNSAMPLING) -> torch.Tensor:
    """Edge-replicate (B, C, H, W) on the bottom/right up to multiples of ``multiple``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    # replicate padding needs pad < size only for 'reflect'; 'replicate' accepts any size
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


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
    ``decoder`` (g_s) and ``entropy_model`` (:class:`MIMEntropyModel`).
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
        )

    # ---- the two halves of the PQ-VAE ----

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (any H, W) -> latent (B, h, w, D), h = ceil(H/16)."""
        _check_image(x)
        return self.encoder(pad_to_multiple(x)).permute(0, 2, 3, 1)

    def quantize(self, y: torch.Tensor):
        """latent (B, h, w, D) -> ``(quantized (B, h, w, D), codes (B, h, w, M) int64, loss)``."""
        b, h, w, d = y.shape
        q, idx, loss = self.quantizer(y.reshape(b, h * w, d))
        return q.view(b, h, w, d), idx.view(b, h, w, -1).long(), loss

    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> codes (B, h, w, M) int64 (no gradient)."""
        with torch.no_grad():
            return self.quantize(self.encode_latent(x))[1]

    def decode_codes(
        self, codes: torch.Tensor, size: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """codes (B, h, w, M) int -> image (B, 3, H, W) float32 clamped to [0, 1].

        ``size`` = (H, W) crops the 16h × 16w output (default: no crop).
        """
        b, h, w, m = codes.shape
        with torch.no_grad():
            y = self.quantizer.get_output_from_indices(codes.reshape(b, h * w, m).long())
            x = self.decoder(y.reshape(b, h, w, -1).permute(0, 3, 1, 2).float())
        if size is not None:
            x = x[..., : size[0], : size[1]]
        return x.clamp(0.0, 1.0)

    # ---- training contract ----

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """Training pass on (B, 3, H, W) float in [0, 1] (padded to multiples of 16 if needed).

        Returns a dict: ``x_hat`` (B, 3, H, W) reconstruction (straight-through gradient to the
        encoder), ``codes`` (B, h, w, M) int64, ``vq_loss`` scalar (commitment + codebook
        terms of the quantizer), ``bits`` (B,) float32 rate estimate in bits (MIM cross-entropy
        at a random stage of the coding schedule, scaled to all h·w tokens), ``bpp`` (B,).
        """
        _check_image(x)
        size = x.shape[-2:]
        q, codes, vq_loss = self.quantize(self.encode_latent(x))
        x_hat = self.decoder(q.permute(0, 3, 1, 2))[..., : size[0], : size[1]]
        bits = self.mim_bits(codes, generator=generator)
        return {
            "x_hat": x_hat,
            "codes": codes,
            "vq_loss": vq_loss,
            "bits": bits,
            "bpp": bits / float(size[0] * size[1]),
        }

    def mim_bits(self, codes: torch.Tensor, generator: torch.Generator | None = None):
        """Rate estimate for training: (B,) bits for the whole grid (see :func:`mim_bits`)."""
        return mim_bits(self.entropy_model, codes, self.config.stages, generator)

    # ---- coding ----

    def model_id(self) -> bytes:
        """2-byte fingerprint: sha256 of the config and every state-dict tensor (fp32 bytes)."""
        hsh = hashlib.sha256(self.config.to_json().encode())
        for name, t in sorted(self.state_dict().items()):
            hsh.update(name.encode())
            hsh.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return hsh.digest()[:2]

    def _stage_cdfs(self, codes_flat: torch.Tensor, order: np.ndarray, lo: int, hi: int, grid):
        """Integer CDFs (T*M, K+1) for the tokens ``order[lo:hi]`` given ``order[:lo]``."""
        from pqmim_kernels.coding import quantize_probs

        idx = torch.from_numpy(order[:hi].copy()).to(codes_flat.device)
        seq = codes_flat[idx][None]  # (1, hi, M); slots >= lo are ignored by the model
        num_known = torch.tensor([lo], device=codes_flat.device)
        logits = self.entropy_model(seq, idx[None], num_known, grid, num_out=hi - lo)
        # fp32 logits -> coarse grid -> float64 softmax: robust against tiny float noise.
        g = float(self.config.logit_grid)
        z = torch.round(logits.detach().float().cpu().double() * g) / g
        probs = torch.softmax(z.reshape(-1, self.config.codebook_size), dim=-1)
        return quantize_probs(probs.float().numpy())

    def _stages(self, n: int):
        cum = stage_bounds(n, self.config.stages)
        return [(s, int(cum[s]), int(cum[s + 1])) for s in range(self.config.stages)]

    @torch.no_grad()
    def compress(self, x: torch.Tensor, stages: int | None = None) -> bytes:
        """(1, 3, H, W) float in [0, 1] -> bytes of a ``.pqm`` file.

        ``stages``: send only the first ``stages`` coding stages (default: all S). The decoder
        fills the tokens of the missing stages with the entropy model's most likely codes
        (PQMIM.md §7, hybrid compression/generation): fewer bytes, lower fidelity.
        """
        from pqmim_kernels.coding import RansEncoder

        _check_image(x)
        if x.shape[0] != 1:
            raise ValueError(f"compress: x must hold one image (1, 3, H, W), got {tuple(x.shape)}")
        total = self.config.stages
        stages = total if stages is None else stages
        if isinstance(stages, bool) or not isinstance(stages, int) or not 1 <= stages <= total:
            raise ValueError(f"compress: stages must be an int in [1, {total}], got {stages!r}")
        height, width = int(x.shape[2]), int(x.shape[3])
        if max(height, width) > pqm_format.MAX_DIM:
            raise ValueError(f"compress: image side must be <= {pqm_format.MAX_DIM} px")
        if height * width > MAX_DECODE_PIXELS:
            raise ValueError(
                f"compress: a {width}x{height} image is over the decoder's default limit of "
                f"{MAX_DECODE_PIXELS} px (MAX_DECODE_PIXELS); split it into tiles"
            )
        codes = self.encode_codes(x.to(self._device()))[0]  # (h, w, M)
        h, w, m = codes.shape
        order = coding_order(h, w)
        flat = codes.reshape(h * w, m)
        enc = RansEncoder()
        sent = 0
        for s, lo, hi in self._stages(h * w):
            if s >= stages:
                break
            sent = hi
            if hi == lo:
                continue
            cdfs = self._stage_cdfs(flat, order, lo, hi, (h, w))
            symbols = flat[torch.from_numpy(order[lo:hi].copy()).to(flat.device)].reshape(-1)
            enc.encode_cdfs(symbols.cpu().numpy().astype(np.int64), cdfs)
        header = pqm_format.PqmHeader(self.model_id(), height, width, stages, check=0)
        check = pqm_format.code_check(
            flat.cpu().numpy()[order[:sent]], pqm_format.check_context(header)
        )
        return pqm_format.pack(dataclasses.replace(header, check=check), enc.finish())

    @torch.no_grad()
    def decompress_codes(
        self, data: bytes, max_pixels: int | None = MAX_DECODE_PIXELS
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Bytes of a ``.pqm`` file -> ``(codes (1, h, w, M) int64, (H, W))``.

        Raises ``ValueError`` for foreign, truncated or corrupt files, files made by another
        model, code-check mismatches (another device/backend whose probabilities differ), and
        headers claiming more than ``max_pixels`` pixels (``None``: no limit), checked before
        any work so a corrupt size cannot cost minutes and gigabytes.
        """
        from pqmim_kernels.coding import RansDecoder

        header, payload = pqm_format.unpack(data)
        if max_pixels is not None and header.height * header.width > max_pixels:
            raise ValueError(
                f"this .pqm file claims a {header.width}x{header.height} image "
                f"({header.height * header.width} px), over the decoder's limit of {max_pixels} px "
                "(a corrupt header, or pass max_pixels=None for a trusted file)"
            )
        mine = self.model_id()
        if header.model_id != mine:
            raise ValueError(
                f"this .pqm file was made by model {header.model_id.hex()}, not by the loaded "
                f"model {mine.hex()} (load the model that wrote it)"
            )
        if header.stages_sent > self.config.stages:
            raise ValueError(
                f"this .pqm file holds {header.stages_sent} stages; the model codes only "
                f"{self.config.stages}"
            )
        h = -(-header.height // DOWNSAMPLING)
        w = -(-header.width // DOWNSAMPLING)
        m = self.config.num_subspaces
        order = coding_order(h, w)
        flat = torch.zeros(h * w, m, dtype=torch.int64, device=self._device())
        stages = self._stages(h * w)
        sent = stages[header.stages_sent - 1][2]
        try:
            dec = RansDecoder(payload)
            for _, lo, hi in stages[: header.stages_sent]:
                if hi == lo:
                    continue
                cdfs = self._stage_cdfs(flat, order, lo, hi, (h, w))
                sym = np.asarray(dec.decode_cdfs(cdfs), dtype=np.int64).reshape(hi - lo, m)
                pos = torch.from_numpy(order[lo:hi].copy()).to(flat.device)
                flat[pos] = torch.from_numpy(sym).to(flat.device)
            dec.finish()
        except (ValueError, RuntimeError, IndexError, OverflowError) as exc:
            raise ValueError(f"corrupt .pqm payload: {exc}") from exc
        context = pqm_format.check_context(header)
        if pqm_format.code_check(flat.cpu().numpy()[order[:sent]], context) != header.check:
            raise ValueError(
                "decoded codes fail the .pqm code check: the file (header or payload) is corrupt, "
                "or it was encoded on a device/backend whose entropy-model probabilities differ "
                "from this one"
            )
        # Stages not sent: fill stage by stage with the most likely codes given everything
        # known so far (greedy, deterministic; same schedule as coding).
        for _, lo, hi in stages[header.stages_sent :]:
            if hi == lo:
                continue
            idx = torch.from_numpy(order[:hi].copy()).to(flat.device)
            logits = self.entropy_model(
                flat[idx][None], idx[None], torch.tensor([lo], device=flat.device), (h, w), hi - lo
            )
            flat[idx[lo:]] = logits[0].argmax(dim=-1)
        return flat.view(1, h, w, m), (header.height, header.width)

    @torch.no_grad()
    def decompress(self, data: bytes, max_pixels: int | None = MAX_DECODE_PIXELS) -> torch.Tensor:
        """Bytes of a ``.pqm`` file -> image (1, 3, H, W) float32 in [0, 1] (on the model's
        device). Errors (and ``max_pixels``) as in :meth:`decompress_codes`."""
        codes, size = self.decompress_codes(data, max_pixels)
        return self.decode_codes(codes, size)

    @torch.no_grad()
    def estimate_bits(self, x: torch.Tensor) -> tuple[float, float]:
        """Rate of ``x`` under the coding schedule: ``(ideal_bits, float_bits)``.

        ``ideal_bits``: −Σ log2 of the quantised integer frequencies the coder uses (what an
        ideal coder spends on the payload); ``float_bits``: the model's float cross-entropy.
        """
        codes = self.encode_codes(x.to(self._device()))[0]
        h, w, m = codes.shape
        order = coding_order(h, w)
        flat = codes.reshape(h * w, m)
        ideal = 0.0
        for _, lo, hi in self._stages(h * w):
            if hi == lo:
                continue
            cdfs = self._stage_cdfs(flat, order, lo, hi, (h, w)).astype(np.int64)
            sym = flat[torch.from_numpy(order[lo:hi].copy()).to(flat.device)].reshape(-1).cpu()
            sym = sym.numpy()
            rows = np.arange(sym.size)
            freq = cdfs[rows, sym + 1] - cdfs[rows, sym]
            ideal += float(-np.log2(freq / cdfs[:, -1]).sum())
        return ideal, self._float_bits(flat, order, (h, w))

    def _float_bits(self, flat, order, grid) -> float:
        total = 0.0
        for _, lo, hi in self._stages(flat.shape[0]):
            if hi == lo:
                continue
            idx = torch.from_numpy(order[:hi].copy()).to(flat.device)
            logits = self.entropy_model(
                flat[idx][None], idx[None], torch.tensor([lo], device=flat.device), grid, hi - lo
            ).float()
            logp = torch.log_softmax(logits[0], dim=-1)  # (T, M, K)
            tgt = flat[idx[lo:]]
            total += float(-logp.gather(-1, tgt[..., None]).sum() / math.log(2.0))
        return total

    def _device(self) -> torch.device:
        return next(self.parameters()).device

"""Drop-in ``torch.nn`` modules for trainers: the product quantizer and the attention block."""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import nn

# ---- product quantization (issue: pq_assign / ProductQuantizer) ----

#: ``return_loss_breakdown=True`` returns this 4th value, with vector-quantize-pytorch's fields:
#: ``commitment`` is the unweighted commitment MSE; the other three are always 0 here.
LossBreakdown = namedtuple(
    "LossBreakdown", ["commitment", "codebook_diversity", "orthogonal_reg", "inplace_optimize"]
)

#: At most this many points per codeword enter the k-means initialisation (a random subsample of
#: the first batch's valid sub-vectors), so the init costs O(64·K²·D·(kmeans_iters + 1)) however
#: large the batch. 64 points per code is plenty to seed codebooks that the EMA then refines.
KMEANS_MAX_POINTS_PER_CODE = 64

# Defaults of the two calling forms (see the class docstring).
_PQ_DEFAULTS = dict(
    decay=0.99, commitment_weight=0.25, kmeans_init=True, threshold_ema_dead_code=2.0
)
_VQ_DEFAULTS = dict(decay=0.8, commitment_weight=1.0, kmeans_init=False, threshold_ema_dead_code=0)

# VectorQuantize options with no product-quantizer counterpart here: name -> (the only value
# accepted, i.e. VectorQuantize's default, which means "off"; why).
_UNSUPPORTED_OPTIONS = {
    "use_cosine_sim": (False, "codebooks are Euclidean"),
    "layernorm_after_project_in": (False, "there is no input projection"),
    "accept_3d_fmap": (False, "reshape (B, C, D, H, W) to (B, C, D·H, W) first"),
    "commitment_use_cross_entropy_loss": (False, "the commitment loss is the MSE"),
    "orthogonal_reg_weight": (0.0, "no orthogonal regularisation"),
    "orthogonal_reg_active_codes_only": (False, "no orthogonal regularisation"),
    "orthogonal_reg_max_codes": (None, "no orthogonal regularisation"),
    "codebook_diversity_loss_weight": (0.0, "no codebook diversity loss"),
    "codebook_diversity_temperature": (100.0, "no codebook diversity loss"),
    "stochastic_sample_codes": (False, "assignment is the deterministic argmin"),
    "sample_codebook_temp": (1.0, "assignment is the deterministic argmin"),
    "straight_through": (False, "no stochastic sampling to pass gradients through"),
    "directional_reparam": (False, "gradients use straight-through or the rotation trick"),
    "directional_reparam_variance": (5e-3, "no directional reparametrisation"),
    "sync_kmeans": (True, "the k-means init is always synchronised (rank 0 broadcasts)"),
    "ema_update": (True, "codebooks are always learned by EMA"),
    "learnable_codebook": (False, "codebooks are buffers learned by EMA, not parameters"),
    "vq_bridge": (None, "codebooks are buffers learned by EMA, not parameters"),
    "manual_ema_update": (False, "the EMA step runs inside forward"),
    "in_place_codebook_optimizer": (None, "codebooks are buffers learned by EMA"),
    "manual_in_place_optimizer_update": (False, "codebooks are buffers learned by EMA"),
    "affine_param": (False, "no affine re-parametrisation of the codebooks"),
    "sync_affine_param": (False, "no affine re-parametrisation of the codebooks"),
    "affine_param_batch_decay": (0.99, "no affine re-parametrisation of the codebooks"),
    "affine_param_codebook_decay": (0.9, "no affine re-parametrisation of the codebooks"),
    "sync_update_v": (0.0, "codebooks are buffers learned by EMA"),
    "route_gradients_to_input": (True, "gradients always reach the input"),
}
# ``forward`` keywords of VectorQuantize with no counterpart: name -> the value meaning "off".
_UNSUPPORTED_CALL_OPTIONS = {
    "indices": None,
    "topk": None,
    "sample_codebook_temp": None,
    "codebook_transform_fn": None,
    "ema_update_weight": None,
    "accum_ema_update": False,
    "ema_update": None,
}


class ProductQuantizer(nn.Module):
    """Product-quantizer bottleneck with EMA codebooks: ``quantized, indices, loss = pq(x)``.

    A drop-in for ``vector_quantize_pytorch.VectorQuantize`` with separate codebooks per head
    (a product quantizer) in a training loop: same constructor keywords, call keywords, return
    values and helper methods, with the assignment done by
    :func:`pqmim_kernels.functional.pq_assign` (Triton on CUDA). Two calling forms:

    - ours: ``ProductQuantizer(dim, num_subspaces, codebook_size, ...)``; indices always end in
      an M axis; defaults ``decay=0.99, commitment_weight=0.25, kmeans_init=True,
      threshold_ema_dead_code=2, rotation_trick=False`` (what the PQ-MIM model trains with).
    - VectorQuantize's: ``ProductQuantizer(dim, codebook_size, heads=M,
      separate_codebook_per_head=True, codebook_dim=dim // M, ...)`` (``codebook_size`` as the
      second positional or a keyword, no ``num_subspaces``); every default is VectorQuantize's
      (``decay=0.8, commitment_weight=1, kmeans_init=False, threshold_ema_dead_code=0,
      rotation_trick=True`` for dim > 1, ``heads=1``) and with ``heads=1`` the indices have no M
      axis, as there. ``codebook_dim`` defaults to ``dim // heads`` and must equal it: this class
      has no learned projections (VectorQuantize adds ``project_in``/``project_out`` when
      ``codebook_dim · heads != dim``; put an ``nn.Linear`` on each side instead). ``heads > 1``
      needs ``separate_codebook_per_head=True`` (a shared codebook is not a product quantizer).

    VectorQuantize options that have no meaning for this quantizer (cosine similarity,
    orthogonal or diversity losses, learnable or affine codebooks, stochastic sampling, top-k,
    ...) raise ``ValueError`` naming the option when set to anything but their "off" default.

    Shapes (D = ``dim``, M = ``num_subspaces`` = ``heads``, K = ``codebook_size``, d = D / M):

    - default: x (..., D), e.g. (B, N, D) or (B, D) -> quantized like x, indices (..., M) int64.
    - ``accept_image_fmap=True``: x (B, D, H, W) -> quantized (B, D, H, W), indices (B, H, W, M).
    - ``channel_last=False``: x (B, D, N) -> quantized (B, D, N), indices (B, N, M).

    ``forward(x, mask=None, lens=None, freeze_codebook=None, return_loss_breakdown=False)``:
    ``mask`` bool (B, N) (any shape of x's token axes) marks the valid tokens, or ``lens`` (B,)
    the valid prefix length of each (B, N, D) sequence. Padding tokens take no part in the
    k-means init, the EMA statistics, dead-code re-seeding or the loss; their ``quantized`` is 0
    (or x itself with ``return_zeros_for_masked_padding=False``) and their indices are -1.
    ``freeze_codebook=True`` (here or in the constructor) skips the EMA and dead-code updates.
    ``return_loss_breakdown=True`` adds a 4th value, :data:`LossBreakdown`.

    ``loss`` is the 0-d commitment loss ``commitment_weight · mean((x − sg(x̂))²)`` over the
    valid tokens (computed in eval mode too, unlike vector-quantize-pytorch which returns 0
    there). ``quantized`` equals the codewords in the forward pass, bit for bit; gradients reach
    ``x`` straight through, or with ``rotation_trick=True`` rotated and scaled per sub-vector by
    the rotation that takes x to its codeword (Fifty et al., 2024), as in VectorQuantize.

    Training (``self.training``): on the first batch the codebooks are initialised by k-means
    (``kmeans_init``; k-means++ seeding, ``kmeans_iters`` Lloyd steps) on at most
    :data:`KMEANS_MAX_POINTS_PER_CODE` · K randomly drawn valid sub-vectors; every step updates
    them by an exponential moving average (``decay``) of the assigned counts and sums, with
    Laplace smoothing (``eps``) of the counts; codes whose EMA count falls below
    ``threshold_ema_dead_code`` are re-seeded from random sub-vectors of the current batch
    (also on demand: :meth:`expire_codes_`). Under an initialised ``torch.distributed`` group
    (world size > 1) the statistics are all-reduced and the k-means init and re-seeded codewords
    are broadcast from rank 0, so replicas keep identical codebooks. In eval mode nothing changes
    (no k-means init either, unlike vector-quantize-pytorch). A training batch without any valid
    token changes nothing (single process).

    Logging: :meth:`codebook_stats` returns per-sub-space perplexity and usage.

    State dict keys: ``embed`` (M, K, d), ``cluster_size`` (M, K), ``embed_avg`` (M, K, d),
    ``initted`` () bool, in both forms.

    Args:
        dim: D, divisible by M.
        num_subspaces: M (ours; VectorQuantize's name is ``heads``).
        codebook_size: K.
        heads, codebook_dim, separate_codebook_per_head: VectorQuantize's spelling of M and d.
        decay: EMA decay in (0, 1).
        eps: Laplace smoothing pseudo-count (> 0).
        commitment_weight: β of the commitment loss (≥ 0).
        kmeans_init: initialise the codebooks by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        threshold_ema_dead_code: EMA count under which a code is re-seeded (0 disables).
        rotation_trick: rotation-trick gradients instead of straight-through.
        freeze_codebook: never update the codebooks after the k-means init.
        accept_image_fmap: take (B, D, H, W) feature maps.
        channel_last: with False, take (B, D, N).
        return_zeros_for_masked_padding: ``quantized`` of padding tokens is 0 (else x).
        sync_distributed: all-reduce statistics; ``None`` = when a process group is initialised
            (VectorQuantize's name ``sync_codebook`` is accepted too).
        backend: ``"auto" | "triton" | "reference"`` for the assignment and statistics.
    """

    def __init__(
        self,
        dim: int,
        *args: int,
        num_subspaces: int | None = None,
        codebook_size: int | None = None,
        heads: int | None = None,
        codebook_dim: int | None = None,
        separate_codebook_per_head: bool | None = None,
        decay: float | None = None,
        eps: float = 1e-5,
        commitment_weight: float | None = None,
        kmeans_init: bool | None = None,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float | None = None,
        rotation_trick: bool | None = None,
        freeze_codebook: bool = False,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        return_zeros_for_masked_padding: bool = True,
        sync_distributed: bool | None = None,
        sync_codebook: bool | None = None,
        backend: str = "auto",
        **vq_options,
    ):
        super().__init__()
        if len(args) > 2:
            raise TypeError(
                "ProductQuantizer takes at most 3 positional arguments (dim, num_subspaces, "
                f"codebook_size), got {1 + len(args)}; pass VectorQuantize's codebook_dim, "
                "heads, ... by keyword"
            )
        if len(args) == 2:  # ours: (dim, num_subspaces, codebook_size)
            _set_once("num_subspaces", num_subspaces, "positional")
            _set_once("codebook_size", codebook_size, "positional")
            num_subspaces, codebook_size = args
        elif len(args) == 1:  # VectorQuantize's: (dim, codebook_size)
            _set_once("codebook_size", codebook_size, "positional")
            codebook_size = args[0]
        for name, value in vq_options.items():
            if name not in _UNSUPPORTED_OPTIONS:
                raise TypeError(f"ProductQuantizer got an unexpected keyword argument {name!r}")
            off, why = _UNSUPPORTED_OPTIONS[name]
            if (
                value is not off
                and value != off
                and not (name == "learnable_codebook" and value is None)
            ):
                raise ValueError(
                    f"ProductQuantizer: VectorQuantize option {name}={value!r} is not supported "
                    f"({why}); leave it at {off!r}"
                )
        vq_form = num_subspaces is None
        if vq_form:
            m_name, m = "heads", 1 if heads is None else heads
        else:
            m_name, m = "num_subspaces", num_subspaces
            if heads is not None and heads != num_subspaces:
                raise ValueError(
                    f"ProductQuantizer: num_subspaces = {num_subspaces} and heads = {heads} "
                    "name the same M; give one of them"
                )
        if codebook_size is None:
            raise TypeError("ProductQuantizer: missing required argument 'codebook_size'")
        for name, value in (("dim", dim), (m_name, m), ("codebook_size", codebook_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ProductQuantizer: {name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"ProductQuantizer: {name} must be ≥ 1, got {value}")
        if dim % m:
            raise ValueError(f"ProductQuantizer: dim = {dim} must be divisible by {m_name} = {m}")
        if (
            m > 1
            and separate_codebook_per_head is not True
            and (vq_form or separate_codebook_per_head is False)
        ):
            raise ValueError(
                f"ProductQuantizer: heads = {m} with one shared codebook "
                "(separate_codebook_per_head=False, VectorQuantize's default) is not a product "
                "quantizer; pass separate_codebook_per_head=True"
            )
        if codebook_dim is not None and codebook_dim * m != dim:
            raise ValueError(
                f"ProductQuantizer: codebook_dim · {m_name} = {codebook_dim} · {m} must equal "
                f"dim = {dim}: there are no learned projections (VectorQuantize adds "
                "project_in/project_out here; put an nn.Linear before and after the quantizer, "
                f"or use codebook_dim = {dim // m})"
            )
        defaults = _VQ_DEFAULTS if vq_form else _PQ_DEFAULTS
        decay = defaults["decay"] if decay is None else decay
        commitment_weight = (
            defaults["commitment_weight"] if commitment_weight is None else commitment_weight
        )
        kmeans_init = defaults["kmeans_init"] if kmeans_init is None else kmeans_init
        if threshold_ema_dead_code is None:
            threshold_ema_dead_code = defaults["threshold_ema_dead_code"]
        if rotation_trick is None:
            rotation_trick = vq_form and dim > 1
        if sync_codebook is not None:
            if sync_distributed is not None and sync_distributed != sync_codebook:
                raise ValueError(
                    "ProductQuantizer: sync_distributed and sync_codebook (its VectorQuantize "
                    "name) disagree; give one of them"
                )
            sync_distributed = sync_codebook
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ProductQuantizer: decay must lie in (0, 1), got {decay}")
        if eps <= 0:
            raise ValueError(f"ProductQuantizer: eps must be > 0, got {eps}")
        if commitment_weight < 0:
            raise ValueError(
                f"ProductQuantizer: commitment_weight must be ≥ 0, got {commitment_weight}"
            )
        if threshold_ema_dead_code < 0:
            raise ValueError(
                "ProductQuantizer: threshold_ema_dead_code must be ≥ 0, got "
                f"{threshold_ema_dead_code}"
            )
        if isinstance(kmeans_iters, bool) or not isinstance(kmeans_iters, int) or kmeans_iters < 0:
            raise ValueError(
                f"ProductQuantizer: kmeans_iters must be an int ≥ 0, got {kmeans_iters!r}"
            )
        if accept_image_fmap and not channel_last:
            raise ValueError(
                "ProductQuantizer: accept_image_fmap already implies channel-first (B, D, H, W); "
                "leave channel_last=True"
            )
        self.dim = dim
        self.num_subspaces = self.heads = m
        self.codebook_size = codebook_size
        self.subspace_dim = self.codebook_dim = dim // m
        self.separate_codebook_per_head = True
        self.has_projections = False
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = int(kmeans_iters)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.rotation_trick = bool(rotation_trick)
        self.freeze_codebook = bool(freeze_codebook)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.channel_last = bool(channel_last)
        self.return_zeros_for_masked_padding = bool(return_zeros_for_masked_padding)
        self.sync_distributed = sync_distributed
        self.backend = backend
        # Pinned (non-autotuned) Triton launches for the assignment: the same codes for the same
        # inputs on a given GPU and Triton, whatever tiling autotuning would pick (the codec's
        # encoder sets it; training keeps the autotuned launches).
        self.pinned = False
        # VectorQuantize with one head returns indices without the head axis.
        self._drop_head_axis = vq_form and m == 1

        k, d = codebook_size, self.subspace_dim
        # Small random codewords (kaiming-uniform over (M, K, d), as VectorQuantize): with no
        # k-means init, codes near the origin are all reachable from the first features.
        embed = nn.init.kaiming_uniform_(torch.empty(m, k, d))
        self.register_buffer("embed", embed)
        # EMA state; embed == embed_avg / smoothed(cluster_size) after every update.
        self.register_buffer("cluster_size", torch.ones(m, k))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        self.register_buffer("last_counts", torch.zeros(m, k), persistent=False)

    # -- public API ----------------------------------------------------------------------------

    @property
    def codebooks(self) -> torch.Tensor:
        """The codebooks (M, K, d) float32 (a buffer: EMA-learned, no gradient)."""
        return self.embed

    @property
    def codebook(self) -> torch.Tensor:
        """Alias of :attr:`codebooks` under vector-quantize-pytorch's name (settable)."""
        return self.embed

    @codebook.setter
    def codebook(self, value: torch.Tensor) -> None:
        """Replace the codebooks (M, K, d); the EMA sums are rescaled so the next update
        continues from the new codewords."""
        if not isinstance(value, torch.Tensor) or value.shape != self.embed.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"ProductQuantizer.codebook: expected a tensor {tuple(self.embed.shape)}, "
                f"got {shape}"
            )
        with torch.no_grad():
            self.embed.copy_(value)
            self.embed_avg.copy_(self.embed * self._smoothed_counts().unsqueeze(-1))

    def forward(
        self,
        x: torch.Tensor,
        indices: None = None,
        mask: torch.Tensor | None = None,
        lens: torch.Tensor | None = None,
        *,
        freeze_codebook: bool | None = None,
        return_loss_breakdown: bool = False,
        **vq_call_options,
    ):
        """Quantize ``x``; returns ``(quantized, indices, loss)`` (see the class docstring),
        plus a :data:`LossBreakdown` with ``return_loss_breakdown=True``."""
        from pqmim_kernels import functional as F_pq

        _check_call_options({"indices": indices, **vq_call_options})
        tokens = self._to_tokens(x)
        valid = self._valid_tokens(tokens, mask, lens)
        freeze = self.freeze_codebook if freeze_codebook is None else bool(freeze_codebook)
        codes = F_pq.pq_assign(tokens, self.embed, backend=self.backend, pinned=self.pinned)
        used = tokens if valid is None else tokens[valid]  # (..., D): the valid tokens
        with torch.no_grad():
            if self.training and (used.shape[0] > 0 or self._distributed()):
                if not bool(self.initted):
                    self._kmeans_init(used)
                    codes = F_pq.pq_assign(
                        tokens, self.embed, backend=self.backend, pinned=self.pinned
                    )
                used_codes = codes if valid is None else codes[valid]
                if freeze:
                    self.last_counts.copy_(self._counts(used_codes))
                else:
                    self._ema_update(used, used_codes)
            elif not self.training:
                self.last_counts.copy_(self._counts(codes if valid is None else codes[valid]))
        codewords = self._lookup(codes, tokens.dtype)
        used_codewords = codewords if valid is None else codewords[valid]
        if used.numel():
            commitment = torch.nn.functional.mse_loss(used.float(), used_codewords.detach().float())
        else:  # no valid token: nothing to commit
            commitment = tokens.float().sum() * 0.0
        loss = self.commitment_weight * commitment
        if self.rotation_trick:
            quantized = _rotate_to(tokens, codewords.detach(), self.num_subspaces)
        else:
            # Exact codewords forward, identity gradient to x (tokens - tokens.detach() == 0).
            quantized = codewords + (tokens - tokens.detach())
        if valid is not None:
            keep = valid.unsqueeze(-1)
            pad = torch.zeros_like(tokens) if self.return_zeros_for_masked_padding else tokens
            quantized = torch.where(keep, quantized, pad)
            codes = codes.masked_fill(~keep, -1)
        if self._drop_head_axis:
            codes = codes.squeeze(-1)
        out = (self._from_tokens(quantized), codes, loss)
        if return_loss_breakdown:
            zero = torch.zeros((), device=loss.device)
            return (*out, LossBreakdown(commitment, zero, zero, zero))
        return out

    def get_codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codewords for ``indices`` in the layout ``forward`` returns for ``quantized``.

        ``indices``: (..., M) int64 as returned by ``forward`` ((B, H, W, M) for image maps;
        without the M axis for the one-head VectorQuantize form). Index -1 (padding, as
        ``forward`` returns for masked tokens) gives zeros.
        """
        from pqmim_kernels.reference.pq import pq_lookup

        if not isinstance(indices, torch.Tensor):
            raise TypeError(
                "ProductQuantizer.get_codes_from_indices: indices must be a tensor, got "
                f"{type(indices).__name__}"
            )
        if self._drop_head_axis:
            indices = indices.unsqueeze(-1)
        pad = indices < 0
        out = pq_lookup(indices.masked_fill(pad, 0), self.embed)
        if bool(pad.any()):
            d = self.subspace_dim
            out = out.masked_fill(pad.repeat_interleave(d, dim=-1), 0.0)
        if self.accept_image_fmap:
            if out.dim() != 4:
                raise ValueError(
                    "ProductQuantizer.get_output_from_indices: image feature maps need indices "
                    f"(B, H, W, M), got {tuple(indices.shape)}"
                )
            return out.permute(0, 3, 1, 2)
        if not self.channel_last and out.dim() == 3:
            return out.transpose(1, 2)
        return out

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`get_codes_from_indices` (there is no output projection)."""
        return self.get_codes_from_indices(indices)

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor) -> None:
        """Re-seed the codes whose EMA count is under ``threshold_ema_dead_code`` from random
        sub-vectors of ``x`` (any layout ``forward`` takes). Training mode only, as in
        vector-quantize-pytorch; a no-op with ``threshold_ema_dead_code=0``."""
        if self.training:
            self._restart_dead_codes(self._to_tokens(x).reshape(-1, self.dim))

    @torch.no_grad()
    def codebook_stats(self) -> dict[str, torch.Tensor]:
        """Usage statistics for logging, each (M,) float32.

        ``perplexity``: exp of the entropy of the last batch's code histogram (K = all codes
        used equally, 1 = collapse); ``usage``: fraction of codes used in the last batch;
        ``ema_perplexity``: the same entropy measure on the EMA counts; ``dead_fraction``:
        fraction of codes whose EMA count is under the dead-code threshold.
        """
        return {
            "perplexity": _perplexity(self.last_counts),
            "usage": (self.last_counts > 0).float().mean(-1),
            "ema_perplexity": _perplexity(self.cluster_size),
            "dead_fraction": (self.cluster_size < self.threshold_ema_dead_code).float().mean(-1),
        }

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_subspaces={self.num_subspaces}, "
            f"codebook_size={self.codebook_size}, decay={self.decay}, "
            f"commitment_weight={self.commitment_weight}"
        )

    # -- layout --------------------------------------------------------------------------------

    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ProductQuantizer: x must be a torch.Tensor, got {type(x).__name__}")
        if self.accept_image_fmap:
            if x.dim() != 4 or x.shape[1] != self.dim:
                raise ValueError(
                    f"ProductQuantizer: expected image feature maps (B, {self.dim}, H, W), got "
                    f"{tuple(x.shape)}"
                )
            return x.permute(0, 2, 3, 1)
        if not self.channel_last:
            if x.dim() != 3 or x.shape[1] != self.dim:
                raise ValueError(
                    f"ProductQuantizer: channel_last=False expects (B, {self.dim}, N), got "
                    f"{tuple(x.shape)}"
                )
            return x.transpose(1, 2)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"ProductQuantizer: expected (..., {self.dim}) input, got {tuple(x.shape)}"
            )
        return x

    def _from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        if self.accept_image_fmap:
            return t.permute(0, 3, 1, 2)
        if not self.channel_last:
            return t.transpose(1, 2)
        return t

    def _valid_tokens(self, tokens, mask, lens) -> torch.Tensor | None:
        """Bool tensor of ``tokens.shape[:-1]`` (True = valid) from ``mask`` or ``lens``."""
        if mask is not None and lens is not None:
            raise ValueError("ProductQuantizer: give mask or lens, not both")
        if lens is not None:
            if tokens.dim() != 3:
                raise ValueError(
                    "ProductQuantizer: lens needs sequences (B, N, D) (or (B, D, N) with "
                    f"channel_last=False), got tokens {tuple(tokens.shape)}"
                )
            if not isinstance(lens, torch.Tensor) or lens.shape != tokens.shape[:1]:
                raise ValueError(
                    f"ProductQuantizer: lens must be a tensor ({tokens.shape[0]},), got "
                    f"{tuple(lens.shape) if isinstance(lens, torch.Tensor) else lens!r}"
                )
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            return positions < lens.to(tokens.device).unsqueeze(-1)
        if mask is None:
            return None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                "ProductQuantizer: mask must be a bool tensor (True = valid token), got "
                f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}"
            )
        if mask.shape != tokens.shape[:-1]:
            raise ValueError(
                f"ProductQuantizer: mask must have the token shape {tuple(tokens.shape[:-1])}, "
                f"got {tuple(mask.shape)}"
            )
        return mask.to(tokens.device)

    def _lookup(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        from pqmim_kernels.reference.pq import pq_lookup

        return pq_lookup(codes, self.embed).to(dtype)

    # -- codebook learning ---------------------------------------------------------------------

    def _distributed(self) -> bool:
        if self.sync_distributed is False:
            return False
        dist = torch.distributed
        on = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.sync_distributed and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "ProductQuantizer: sync_distributed=True but torch.distributed is not initialised"
            )
        return on

    def _counts(self, codes: torch.Tensor) -> torch.Tensor:
        m, k = self.num_subspaces, self.codebook_size
        flat = codes.reshape(-1, m) + torch.arange(m, device=codes.device) * k
        return torch.bincount(flat.reshape(-1), minlength=m * k).reshape(m, k).float()

    def _smoothed_counts(self) -> torch.Tensor:
        # Laplace smoothing keeps the division finite for unused codes while preserving the
        # total count n: (c + eps) / (n + K·eps) · n.
        n = self.cluster_size.sum(-1, keepdim=True)
        return (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n

    def _kmeans_init(self, tokens: torch.Tensor) -> None:
        """k-means codebooks from (..., D) ``tokens`` (a random subsample of at most
        ``KMEANS_MAX_POINTS_PER_CODE · K``); the initial EMA counts are every token's
        assignment to the final centroids (all ranks' tokens under DDP)."""
        from pqmim_kernels import functional as F_pq
        from pqmim_kernels.reference.pq import kmeans

        flat = tokens.detach().reshape(-1, self.dim)
        cap = KMEANS_MAX_POINTS_PER_CODE * self.codebook_size
        sample = flat
        if flat.shape[0] > cap:
            sample = flat[torch.randperm(flat.shape[0], device=flat.device)[:cap]]
        samples = sample.reshape(-1, self.num_subspaces, self.subspace_dim)
        centroids, _ = kmeans(samples, self.codebook_size, self.kmeans_iters)
        if self._distributed():
            # Every replica takes rank 0's centroids; the initial EMA counts are then the
            # assignments of all ranks' samples to *those* centroids (a rank's own k-means
            # counts belong to its own, discarded centroids).
            torch.distributed.broadcast(centroids, src=0)
        counts = self._counts(F_pq.pq_assign(flat, centroids, backend=self.backend))
        if self._distributed():
            torch.distributed.all_reduce(counts)
        self.embed.copy_(centroids)
        self.cluster_size.copy_(counts)
        self.embed_avg.copy_(centroids * counts.unsqueeze(-1))
        self.initted.fill_(True)

    def _ema_update(self, tokens: torch.Tensor, codes: torch.Tensor) -> None:
        from pqmim_kernels import functional as F_pq

        counts, sums = F_pq.pq_ema_statistics(
            tokens, codes, self.codebook_size, backend=self.backend
        )
        self.last_counts.copy_(counts)
        if self._distributed():
            torch.distributed.all_reduce(counts)
            torch.distributed.all_reduce(sums)
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        self.embed_avg.lerp_(sums, 1.0 - self.decay)
        self.embed.copy_(self.embed_avg / self._smoothed_counts().unsqueeze(-1))
        self._restart_dead_codes(tokens)

    def _restart_dead_codes(self, tokens: torch.Tensor) -> None:
        if self.threshold_ema_dead_code <= 0:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code  # identical on every rank
        if not bool(dead.any()):
            return
        m, k, d = self.num_subspaces, self.codebook_size, self.subspace_dim
        samples = tokens.detach().reshape(-1, m, d).float()
        if samples.shape[0]:
            pick = torch.randint(0, samples.shape[0], (m, k), device=samples.device)
            index = pick.unsqueeze(-1).expand(m, k, d)
            candidates = torch.gather(samples.transpose(0, 1), 1, index)
        else:  # no sample on this rank: keep the codewords (rank 0's broadcast still decides)
            candidates = self.embed.clone()
        if self._distributed():
            torch.distributed.broadcast(candidates, src=0)
        mask = dead.unsqueeze(-1)
        self.embed.copy_(torch.where(mask, candidates, self.embed))
        # A re-seeded code starts with the threshold as its pseudo-count, so it is not
        # immediately declared dead again.
        self.cluster_size.masked_fill_(dead, self.threshold_ema_dead_code)
        self.embed_avg.copy_(
            torch.where(mask, candidates * self.threshold_ema_dead_code, self.embed_avg)
        )


def _set_once(name: str, value, how: str) -> None:
    if value is not None:
        raise TypeError(f"ProductQuantizer got multiple values for argument {name!r} ({how} too)")


def _check_call_options(options: dict) -> None:
    for name, value in options.items():
        if name not in _UNSUPPORTED_CALL_OPTIONS:
            raise TypeError(f"ProductQuantizer.forward got an unexpected keyword argument {name!r}")
        off = _UNSUPPORTED_CALL_OPTIONS[name]
        if value is not off and not (name == "ema_update" and value is True):
            raise ValueError(
                f"ProductQuantizer.forward: VectorQuantize option {name}= is not supported "
                f"(leave it at {off!r})"
            )


def _rotate_to(x: torch.Tensor, q: torch.Tensor, m: int) -> torch.Tensor:
    """Rotation-trick output: equals ``q`` (..., D) exactly; the gradient to ``x`` (..., D) is
    the upstream gradient mapped, per sub-vector of D / m dims, by the (detached) rotation and
    scaling that take x to q. Computed in float32."""
    shape, d = x.shape, x.shape[-1] // m
    xs = x.float().reshape(*shape[:-1], m, d)
    qs = q.float().reshape(*shape[:-1], m, d)
    tiny = torch.finfo(torch.float32).tiny
    nx = xs.detach().norm(dim=-1, keepdim=True)
    nq = qs.norm(dim=-1, keepdim=True)
    u = xs.detach() / nx.clamp_min(tiny)
    v = qs / nq.clamp_min(tiny)
    w = u + v
    w = w / w.norm(dim=-1, keepdim=True).clamp_min(tiny)
    # R = I - 2 w wᵀ + 2 v uᵀ maps u to v (a rotation in the plane of u and v).
    rotated = xs - 2 * w * (w * xs).sum(-1, keepdim=True) + 2 * v * (u * xs).sum(-1, keepdim=True)
    rotated = rotated * (nq / nx.clamp_min(tiny))
    return q + (rotated - rotated.detach()).reshape(shape).to(q.dtype)


def _perplexity(counts: torch.Tensor) -> torch.Tensor:
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)
    return entropy.exp()


# ---- masked attention blocks (issue: masked flash attention) ----


class MaskedSelfAttention(nn.Module):
    """Multi-head self-attention over (B, L, W) tokens with hidden keys (fused QKV projection).

    The MIM entropy model orders tokens "known first": with ``key_lengths`` every query (known
    or not) attends only to the known prefix, and the kernel skips the hidden key blocks.

    Args:
        width: model width W (a multiple of ``heads``).
        heads: number of heads H; head dim ``Dh = W / H``.
        qkv_bias: bias in the fused (W -> 3W) projection.
        dropout: dropout on the output projection (attention probabilities are not dropped:
            the fused kernel has no dropout).
        backend: ``"auto" | "triton" | "reference"``, passed to
            :func:`pqmim_kernels.functional.masked_attention`.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        *,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if not isinstance(width, int) or not isinstance(heads, int) or width <= 0 or heads <= 0:
            raise ValueError(
                f"MaskedSelfAttention: width and heads must be positive ints, got {width!r}, "
                f"{heads!r}"
            )
        if width % heads != 0:
            raise ValueError(
                f"MaskedSelfAttention: width {width} is not a multiple of heads {heads}"
            )
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.backend = backend
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_lengths: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, L, W) float -> (B, L, W), same dtype.

        ``key_lengths`` (B,) int, ``key_mask`` (B, L) bool, ``attn_mask`` (B|1, H|1, L, L)
        bool/float: see :func:`pqmim_kernels.functional.masked_attention`.
        """
        from pqmim_kernels.functional import masked_attention

        if x.dim() != 3 or x.shape[-1] != self.width:
            raise ValueError(
                f"MaskedSelfAttention: x must have shape (B, L, {self.width}), got {tuple(x.shape)}"
            )
        b, length, _ = x.shape
        # (B, L, 3, H, Dh) -> three (B, H, L, Dh) strided views: the kernel reads strides, so
        # the fused projection output is never copied.
        qkv = self.qkv(x).view(b, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = masked_attention(
            qkv[0],
            qkv[1],
            qkv[2],
            key_lengths=key_lengths,
            key_mask=key_mask,
            attn_mask=attn_mask,
            backend=self.backend,
        )
        out = out.transpose(1, 2).reshape(b, length, self.width)
        return self.drop(self.proj(out))


class MaskedTransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU MLP).

    Args:
        width: model width W; heads: number of heads (W % heads == 0).
        mlp_ratio: hidden width of the MLP as a multiple of W.
        dropout: dropout after the attention projection and after the MLP.
        qkv_bias: bias in the fused QKV projection.
        norm_eps: LayerNorm epsilon.
        backend: attention backend, see :class:`MaskedSelfAttention`.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        *,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if mlp_ratio <= 0:
            raise ValueError(f"MaskedTransformerBlock: mlp_ratio must be > 0, got {mlp_ratio}")
        hidden = max(1, round(width * mlp_ratio))
        self.norm1 = nn.LayerNorm(width, eps=norm_eps)
        self.attn = MaskedSelfAttention(
            width, heads, qkv_bias=qkv_bias, dropout=dropout, backend=backend
        )
        self.norm2 = nn.LayerNorm(width, eps=norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden),
            nn.GELU(),
            nn.Linear(hidden, width),
            nn.Dropout(dropout),
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_lengths: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, L, W) float -> (B, L, W), same dtype; masks as in :class:`MaskedSelfAttention`.

        Hidden tokens still get an output (they are queries); they only never serve as keys.
        """
        if x.dim() != 3 or x.shape[-1] != self.attn.width:
            raise ValueError(
                f"MaskedTransformerBlock: x must have shape (B, L, {self.attn.width}), got "
                f"{tuple(x.shape)}"
            )
        x = x + self.attn(
            self.norm1(x), key_lengths=key_lengths, key_mask=key_mask, attn_mask=attn_mask
        )
        return x + self.mlp(self.norm2(x))

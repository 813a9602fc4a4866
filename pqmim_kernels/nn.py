"""Drop-in ``torch.nn`` modules for trainers: the product quantizer and the attention block."""

from __future__ import annotations

import torch
from torch import nn

# ---- product quantization (issue: pq_assign / ProductQuantizer) ----


class ProductQuantizer(nn.Module):
    """Product-quantizer bottleneck with EMA codebooks: ``quantized, indices, loss = pq(x)``.

    A drop-in for ``vector_quantize_pytorch.VectorQuantize(dim, codebook_size, heads=M,
    separate_codebook_per_head=True, codebook_dim=dim // M)`` in a training loop (same call and
    return convention, same ``get_output_from_indices``), with the assignment done by
    :func:`pqmim_kernels.functional.pq_assign` (Triton on CUDA).

    Shapes (D = ``dim``, M = ``num_subspaces``, K = ``codebook_size``, d = D / M):

    - default: x (..., D), e.g. (B, N, D) or (B, D) -> quantized like x, indices (..., M) int64.
    - ``accept_image_fmap=True``: x (B, D, H, W) -> quantized (B, D, H, W), indices (B, H, W, M).
    - ``channel_last=False``: x (B, D, N) -> quantized (B, D, N), indices (B, N, M).

    ``loss`` is the 0-d commitment loss ``commitment_weight · mean((x − sg(x̂))²)`` (computed in
    eval mode too, unlike vector-quantize-pytorch which returns 0 there). ``quantized`` equals
    the codewords in the forward pass and passes gradients straight through to ``x``.

    Training (``self.training``): on the first batch the codebooks are initialised by k-means
    (``kmeans_init``); every step updates them by an exponential moving average (``decay``) of
    the assigned counts and sums, with Laplace smoothing (``eps``) of the counts; codes whose EMA
    count falls below ``threshold_ema_dead_code`` are re-seeded from random sub-vectors of the
    current batch. Under an initialised ``torch.distributed`` group (world size > 1) the
    statistics are all-reduced and the k-means init and re-seeded codewords are broadcast from
    rank 0, so replicas keep identical codebooks. In eval mode nothing changes.

    Logging: :meth:`codebook_stats` returns per-sub-space perplexity and usage.

    Args:
        dim: D, divisible by ``num_subspaces``.
        num_subspaces: M.
        codebook_size: K.
        decay: EMA decay in (0, 1).
        eps: Laplace smoothing pseudo-count (> 0).
        commitment_weight: β of the commitment loss (≥ 0).
        kmeans_init: initialise the codebooks by k-means on the first training batch.
        kmeans_iters: Lloyd iterations of that initialisation.
        threshold_ema_dead_code: EMA count under which a code is re-seeded (0 disables).
        accept_image_fmap: take (B, D, H, W) feature maps.
        channel_last: with False, take (B, D, N).
        sync_distributed: all-reduce statistics; ``None`` = when a process group is initialised.
        backend: ``"auto" | "triton" | "reference"`` for the assignment and statistics.
    """

    def __init__(
        self,
        dim: int,
        num_subspaces: int,
        codebook_size: int,
        *,
        decay: float = 0.99,
        eps: float = 1e-5,
        commitment_weight: float = 0.25,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_ema_dead_code: float = 2.0,
        accept_image_fmap: bool = False,
        channel_last: bool = True,
        sync_distributed: bool | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        for name, value in (
            ("dim", dim),
            ("num_subspaces", num_subspaces),
            ("codebook_size", codebook_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"ProductQuantizer: {name} must be an int, got {value!r}")
            if value < 1:
                raise ValueError(f"ProductQuantizer: {name} must be ≥ 1, got {value}")
        if dim % num_subspaces:
            raise ValueError(
                f"ProductQuantizer: dim = {dim} must be divisible by num_subspaces = "
                f"{num_subspaces}"
            )
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
        if accept_image_fmap and not channel_last:
            raise ValueError(
                "ProductQuantizer: accept_image_fmap already implies channel-first (B, D, H, W); "
                "leave channel_last=True"
            )
        self.dim = dim
        self.num_subspaces = num_subspaces
        self.codebook_size = codebook_size
        self.subspace_dim = dim // num_subspaces
        self.decay = float(decay)
        self.eps = float(eps)
        self.commitment_weight = float(commitment_weight)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = int(kmeans_iters)
        self.threshold_ema_dead_code = float(threshold_ema_dead_code)
        self.accept_image_fmap = bool(accept_image_fmap)
        self.channel_last = bool(channel_last)
        self.sync_distributed = sync_distributed
        self.backend = backend

        m, k, d = num_subspaces, codebook_size, self.subspace_dim
        embed = torch.randn(m, k, d)
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
        """Alias of :attr:`codebooks` under vector-quantize-pytorch's name."""
        return self.embed

    def forward(self, x: torch.Tensor):
        """Quantize ``x``; returns ``(quantized, indices, loss)`` (see the class docstring)."""
        from pqmim_kernels import functional as F_pq

        tokens = self._to_tokens(x)
        codes = F_pq.pq_assign(tokens, self.embed, backend=self.backend)
        if self.training:
            with torch.no_grad():
                if not bool(self.initted):
                    self._kmeans_init(tokens)
                    codes = F_pq.pq_assign(tokens, self.embed, backend=self.backend)
                self._ema_update(tokens, codes)
        else:
            with torch.no_grad():
                self.last_counts.copy_(self._counts(codes))
        codewords = self._lookup(codes, tokens.dtype)
        loss = self.commitment_weight * torch.nn.functional.mse_loss(
            tokens.float(), codewords.detach().float()
        )
        # Exact codewords forward, identity gradient to x (tokens - tokens.detach() == 0).
        quantized = codewords + (tokens - tokens.detach())
        return self._from_tokens(quantized), codes, loss

    def get_output_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Codewords for ``indices`` in the layout ``forward`` returns for ``quantized``.

        ``indices``: (..., M) int64 as returned by ``forward`` ((B, H, W, M) for image maps).
        """
        from pqmim_kernels.reference.pq import pq_lookup

        out = pq_lookup(indices, self.embed)
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

    def _kmeans_init(self, tokens: torch.Tensor) -> None:
        from pqmim_kernels.reference.pq import kmeans

        samples = tokens.detach().reshape(-1, self.num_subspaces, self.subspace_dim)
        centroids, counts = kmeans(samples, self.codebook_size, self.kmeans_iters)
        if self._distributed():
            # Every replica takes rank 0's centroids; the initial EMA counts are then the
            # assignments of all ranks' samples to *those* centroids (a rank's own k-means
            # counts belong to its own, discarded centroids).
            from pqmim_kernels import functional as F_pq

            torch.distributed.broadcast(centroids, src=0)
            local = F_pq.pq_assign(tokens.detach(), centroids, backend=self.backend)
            counts = self._counts(local)
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
        # Laplace smoothing keeps the division finite for unused codes while preserving the
        # total count n: (c + eps) / (n + K·eps) · n.
        n = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_avg / smoothed.unsqueeze(-1))
        self._restart_dead_codes(tokens)

    def _restart_dead_codes(self, tokens: torch.Tensor) -> None:
        if self.threshold_ema_dead_code <= 0:
            return
        dead = self.cluster_size < self.threshold_ema_dead_code  # identical on every rank
        if not bool(dead.any()):
            return
        m, k, d = self.num_subspaces, self.codebook_size, self.subspace_dim
        samples = tokens.detach().reshape(-1, m, d).float()
        pick = torch.randint(0, samples.shape[0], (m, k), device=samples.device)
        candidates = torch.gather(samples.transpose(0, 1), 1, pick.unsqueeze(-1).expand(m, k, d))
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

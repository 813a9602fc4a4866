"""Drop-in ``torch.nn`` modules for trainers: the product quantizer and the attention block."""

from __future__ import annotations

import torch
from torch import nn

# ---- product quantization (issue: pq_assign / ProductQuantizer) ----

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

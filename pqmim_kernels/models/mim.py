"""The masked-image-modeling conditional entropy model of PQMIM.md §3.

Tokens are the ``h × w`` PQ codes (M sub-codes each). A token's embedding is the sum of M learned
code embeddings (one K × W table per sub-space) plus a fixed 2-D sine-cosine position embedding
(defined for any grid size); a learned [MASK] embedding replaces unknown tokens. Tokens are
ordered *known first* and every transformer block attends with ``key_lengths`` = number of
known tokens, so unknown tokens are queries only (MAE-style) and the attention kernel skips the
hidden key blocks. Output: M heads of K logits per token (sub-codes independent given context).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MIMEntropyModel", "mim_bits", "position_embedding"]


def position_embedding(h: int, w: int, width: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine embedding: float32 (h*w, width), raster order.

    The first half of the channels encodes the row, the second the column, each with
    ``width / 4`` frequencies spaced geometrically from 1 to 1/1000 radians per token.
    """
    quarter = width // 4
    freq = torch.exp(
        -math.log(1000.0) * torch.arange(quarter, dtype=torch.float32, device=device) / quarter
    )
    ys = torch.arange(h, dtype=torch.float32, device=device)[:, None] * freq  # (h, W/4)
    xs = torch.arange(w, dtype=torch.float32, device=device)[:, None] * freq  # (w, W/4)
    ey = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(h, w, 2 * quarter)
    ex = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(h, w, 2 * quarter)
    return torch.cat([ey, ex], dim=2).reshape(h * w, 4 * quarter)


class MIMEntropyModel(nn.Module):
    """Bidirectional transformer predicting the codes of unknown tokens.

    Args:
        num_subspaces: M; codebook_size: K; width: W; depth: L blocks; heads; mlp_ratio.
    """

    def __init__(
        self,
        num_subspaces: int,
        codebook_size: int,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 3.0,
    ) -> None:
        super().__init__()
        from pqmim_kernels.nn import MaskedTransformerBlock

        self.num_subspaces, self.codebook_size, self.width = num_subspaces, codebook_size, width
        self.code_embedding = nn.Embedding(num_subspaces * codebook_size, width)
        self.mask_embedding = nn.Parameter(torch.zeros(width))
        self.pos_proj = nn.Linear(width, width)
        self.blocks = nn.ModuleList(
            MaskedTransformerBlock(width, heads, mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_subspaces * codebook_size)
        nn.init.normal_(self.code_embedding.weight, std=0.02)
        nn.init.normal_(self.mask_embedding, std=0.02)
        nn.init.zeros_(self.head.bias)
        nn.init.normal_(self.head.weight, std=0.02)
        self.register_buffer(
            "_offsets", torch.arange(num_subspaces) * codebook_size, persistent=False
        )

    def forward(
        self,
        codes: torch.Tensor,
        positions: torch.Tensor,
        num_known: torch.Tensor,
        grid: tuple[int, int],
        num_out: int | None = None,
    ) -> torch.Tensor:
        """Logits for the tokens of a known-first sequence.

        Args:
            codes: (B, L, M) int64 codes in sequence order; entries at unknown slots are ignored.
            positions: (B, L) int64 raster positions ``y*w + x`` of the sequence slots.
            num_known: (B,) int64: slots ``[0, num_known[b])`` are known, the rest unknown.
            grid: ``(h, w)`` of the token grid (for the position embedding).
            num_out: return logits of the last ``num_out`` slots only (default: all slots).

        Returns:
            (B, num_out or L, M, K) logits in the compute dtype (float32 on CPU).
        """
        b, length, m = codes.shape
        if m != self.num_subspaces:
            raise ValueError(
                f"MIMEntropyModel: codes must have M={self.num_subspaces} sub-codes, got {m}"
            )
        slot = torch.arange(length, device=codes.device)
        known = slot[None, :] < num_known[:, None]  # (B, L)
        tok = self.code_embedding(codes + self._offsets).sum(dim=2)  # (B, L, W)
        x = torch.where(known[..., None], tok, self.mask_embedding.to(tok.dtype))
        pos = position_embedding(*grid, self.width, device=codes.device)
        x = x + self.pos_proj(pos)[positions]
        for block in self.blocks:
            x = block(x, key_lengths=num_known)
        if num_out is not None:
            x = x[:, length - num_out :]
        logits = self.head(self.norm(x))
        return logits.view(b, logits.shape[1], self.num_subspaces, self.codebook_size)


def mim_bits(
    entropy_model: nn.Module,
    codes: torch.Tensor,
    stages: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Training rate estimate: (B,) float32 bits for each whole ``h × w`` grid.

    ``entropy_model``: a :class:`MIMEntropyModel` (or its DDP wrapper); ``codes``: (B, h, w, M)
    int64. Per image, a stage ``s`` is drawn uniformly from the ``stages`` coding stages and the
    known set is a random subset of ``cum[s]`` tokens (``cum`` from the coding schedule), so the
    mask ratios are exactly those met while coding. The cross-entropy (bits) of all unknown tokens
    is averaged per token and multiplied by ``h·w``. Random draws use ``generator`` on the CPU.
    """
    from pqmim_kernels.models.schedule import stage_bounds

    b, h, w, m = codes.shape
    n = h * w
    dev = codes.device
    cum = torch.as_tensor(stage_bounds(n, stages), device=dev)
    stage = torch.randint(0, stages, (b,), generator=generator)
    num_known = cum[stage.to(dev)]
    perm = torch.rand(b, n, generator=generator).to(dev).argsort(dim=1)  # known = first slots
    flat = codes.reshape(b, n, m)
    seq = torch.gather(flat, 1, perm[..., None].expand(b, n, m))
    logits = entropy_model(seq, perm, num_known, (h, w))
    k = logits.shape[-1]
    ce = F.cross_entropy(logits.float().reshape(-1, k), seq.reshape(-1), reduction="none")
    ce = ce.view(b, n, m).sum(dim=2) / math.log(2.0)
    unknown = torch.arange(n, device=dev)[None, :] >= num_known[:, None]
    per_token = (ce * unknown).sum(dim=1) / unknown.sum(dim=1).clamp_min(1)
    return per_token * n

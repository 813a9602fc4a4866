"""Shared inputs and the argmin criterion of the pq_assign tests (not a test module).

Used by ``test_pq_assign.py`` (CPU, interpreter) and ``test_pq_assign_cuda.py`` (GPU).
"""

from __future__ import annotations

import torch


def make_inputs(lead, m, k, d, dtype, seed=0, device="cpu"):
    """z (*lead, M·d) and codebooks (M, K, d), standard normal, in ``dtype`` on ``device``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*lead, m * d, generator=g).to(device=device, dtype=dtype)
    cb = torch.randn(m, k, d, generator=g).to(device=device, dtype=dtype)
    return z, cb


def clustered_inputs(n, m, k, d, spread=0.3, seed=13, device="cpu"):
    """z and codewords scattered by ``spread`` around one centre of norm ~10·sqrt(d) per
    sub-space (trained codebooks cluster like this): distance gaps ~1e-4 of ‖z‖² + ‖c‖², above
    the criterion's eps but below the error of a plain TF32 dot (2⁻¹¹ relative per product),
    which picks a wrong codeword in most rows here; fp32 and tf32x3 meet the criterion."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.randn(m, 1, d, generator=g) * 10
    z = centre.reshape(1, m * d) + spread * torch.randn(n, m * d, generator=g)
    cb = centre + spread * torch.randn(m, k, d, generator=g)
    return z.to(device), cb.to(device)


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest TF32 value (ties away from zero), as the kernel's split rounds."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def assert_argmin_criterion(z, cb, codes, dists, rel=1e-5):
    """ARCHITECTURE.md's rule: the chosen codeword's distance equals the reference minimum
    within eps, and codes equal the reference wherever its margin exceeds eps.

    eps bounds the fp32 error of the expanded score: rel · (‖z_m‖² + max‖c‖²) per (row, m).
    Computed in fp64 on the inputs' device (the inputs as given, i.e. already rounded).
    """
    m, k, d = cb.shape
    z64 = z.reshape(-1, m, d).double()
    full = ((z64.unsqueeze(2) - cb.double().unsqueeze(0)) ** 2).sum(-1)  # (N, M, K)
    codes = codes.reshape(-1, m).to(z64.device)
    assert codes.dtype == torch.int64
    assert torch.all((codes >= 0) & (codes < k))
    scale = (z64**2).sum(-1) + (cb.double() ** 2).sum(-1).max(-1).values
    eps = rel * scale + 1e-30
    best = full.min(-1).values
    chosen = full.gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen - best <= eps), float((chosen - best - eps).max())
    ref_codes = full.argmin(-1)
    top2 = full.topk(min(2, k), dim=-1, largest=False).values
    margin = top2[..., -1] - top2[..., 0] if k > 1 else torch.full_like(best, float("inf"))
    clear = margin > eps
    assert torch.equal(codes[clear], ref_codes[clear])
    if dists is not None:
        dists = dists.reshape(-1, m).to(z64.device)
        assert dists.dtype == torch.float32
        # The returned distance is computed directly, so it is accurate relative to itself.
        atol = 1e-6 * float(scale.max()) if scale.numel() else 0.0
        torch.testing.assert_close(dists.double(), chosen, rtol=1e-5, atol=atol)

"""MaskGIT-style filling of the stages a ``.pqm`` file does not send (PQMIM.md §7).

A partial file holds the first ``s*`` coding stages; the decoder fills the other tokens. Greedy
filling (the default, :meth:`PQMIM._code`) takes each token's most likely codes stage by stage;
it collapses to flat, washed-out regions when most tokens are missing. Sampling instead fills
them in ``iterations`` rounds, MaskGIT style:

1. every still-unknown token is predicted from everything known so far (the query stream with
   the tokens fixed in earlier rounds as keys);
2. each token's M sub-codes are *sampled* in sub-space order, each from the integer model's
   distribution given the sub-codes sampled before it (joint sampling of a token's sub-codes,
   since the entropy model conditions them on each other), at ``temperature``;
3. the most confident tokens (log2-probability of the sampled codes, plus a random
   perturbation that shrinks over the rounds) are kept; the rest are predicted again in the
   next round. After round ``t`` the number still unknown is ``floor(U (T - t - 1)^2 / T^2)``
   (few tokens fixed first, like the coding schedule), so the last round fixes all.

Everything is integer arithmetic on the integer model's logits and a seeded PCG64 stream of
integers: a given file, seed and options decode to the same image on every machine. The seed is
a decoding option, not part of the file: one file can be decoded into several plausible images.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["FILLS", "check_options", "fill_sampled", "ilog2_256", "sample_cdfs"]

FILLS = ("greedy", "sample")
_UNFILLED = 1 << 30  # key stage of positions no round has fixed yet (above every query limit)
_NOISE = 8 * 256  # initial confidence perturbation: up to 8 bits, shrinking to 0


def _exp_table_desc() -> np.ndarray:
    from pqmim_kernels.reference.int_mim import exp2_table

    return exp2_table(30).numpy()  # floor(2^30 * 2^(-j/256)), decreasing


def ilog2_256(f: np.ndarray) -> np.ndarray:
    """Integer ``~256 * log2(f)`` of int64 ``1 <= f < 2^52``: monotone non-decreasing, exact
    integer arithmetic (the exponent from ``frexp``, exact on integers below 2^53, and the
    fraction from the exact exp2 table)."""
    f = np.asarray(f, dtype=np.int64)
    _, e = np.frexp(f.astype(np.float64))  # f in [2^(e-1), 2^e)
    e = e.astype(np.int64) - 1
    r = np.where(e <= 30, f << np.maximum(30 - e, 0), f >> np.maximum(e - 30, 0))  # [2^30, 2^31)
    # 2^(x - 1) = r / 2^31 with x = frac(log2 f): the first j with table[j] <= r / 2
    table = _exp_table_desc()
    j = np.searchsorted(-table, -(r >> 1), side="left")
    return 256 * e + 256 - j


def sample_cdfs(cdfs: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample from integer CDFs (n, K+1) with uniform integers ``u`` (n,) in ``[0, cdf[-1])``:
    returns ``(symbols (n,), their frequencies (n,))``, int64."""
    sym = (cdfs[:, 1:] <= u[:, None]).sum(1).astype(np.int64)
    rows = np.arange(len(sym))
    c = cdfs.astype(np.int64)
    return sym, c[rows, sym + 1] - c[rows, sym]


def _temperature_q10(temperature: float) -> int:
    if not isinstance(temperature, (int, float)) or not 0.05 <= float(temperature) <= 20.0:
        raise ValueError(f"temperature must be a number in [0.05, 20], got {temperature!r}")
    return round(1024 / float(temperature))


def check_options(seed: int = 0, iterations: int = 8, temperature: float = 1.0) -> None:
    """ValueError naming a bad sampling option (before any decoding work)."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int, got {iterations!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _temperature_q10(temperature)


def fill_sampled(
    session,
    flat: torch.Tensor,
    unknown: np.ndarray,
    first_stage: int,
    num_subspaces: int,
    *,
    seed: int = 0,
    iterations: int = 8,
    temperature: float = 1.0,
) -> None:
    """Fill the tokens at raster positions ``unknown`` (coding order) of ``flat`` (h*w, M) by
    MaskGIT-style sampling (see the module docstring), in place.

    ``session``: the coding session after the sent stages (its caches hold their keys);
    ``first_stage``: the stage number of the first round (= stages sent); round ``t`` gives the
    tokens it fixes stage ``first_stage + t``.
    """
    check_options(seed, iterations, temperature)
    tq = _temperature_q10(temperature)
    total = len(unknown)
    if total == 0:
        return
    dev = flat.device
    rng = np.random.Generator(np.random.PCG64(seed))
    remaining = np.array(unknown, dtype=np.int64)  # a writable copy
    session.set_key_stage(
        torch.from_numpy(remaining), torch.full((total,), _UNFILLED, dtype=torch.int64)
    )
    for t in range(iterations):
        n = len(remaining)
        if n == 0:
            break
        stage = first_stage + t
        pos = torch.from_numpy(remaining).to(dev)
        st = torch.full((n,), stage, dtype=torch.int64, device=dev)
        xq = session.query(pos, st)
        codes = torch.zeros(n, num_subspaces, dtype=torch.int64, device=dev)
        conf = np.zeros(n, dtype=np.int64)
        for m in range(num_subspaces):
            logits = session.head_logits(xq, codes, m).to(torch.int64)
            cdfs = session.cdfs((logits * tq) >> 10)
            u = rng.integers(0, int(cdfs[0, -1]), size=n, dtype=np.int64)
            sym, freq = sample_cdfs(cdfs, u)
            conf += ilog2_256(freq)
            codes[:, m] = torch.from_numpy(sym).to(dev)
        left = total * (iterations - t - 1) ** 2 // iterations**2
        keep = n - min(left, n - 1) if t + 1 < iterations else n
        noise = _NOISE * (iterations - t - 1) // iterations
        score = conf + rng.integers(0, noise + 1, size=n, dtype=np.int64)
        chosen = np.argsort(-score, kind="stable")[:keep]
        kept = np.sort(chosen)
        kpos = pos[torch.from_numpy(kept).to(dev)]
        kcodes = codes[torch.from_numpy(kept).to(dev)]
        flat[kpos] = kcodes
        kst = torch.full((keep,), stage, dtype=torch.int64, device=dev)
        session.set_key_stage(kpos.cpu(), kst.cpu())
        if keep < n:
            session.known(kcodes, kpos, kst)
        mask = np.ones(n, dtype=bool)
        mask[kept] = False
        remaining = remaining[mask]

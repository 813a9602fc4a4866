"""Masked attention benchmarks: ours vs eager, masked SDPA, FlexAttention and gathered SDPA.

Run: ``python -m pytest bench/bench_masked_attention.py --benchmark-only``
(``--benchmark-json bench/results/masked_attention_<machine>.json`` to keep the numbers).

The mask is the MIM entropy model's: tokens ordered "known first", a fraction ``known`` of the
keys visible in every batch row (``key_lengths``), all queries computed. Providers, one
``benchmark.group`` per (pass, dtype, Dh, L, known):

- ``pqmim_triton``: ``masked_attention(..., key_lengths=...)``, Triton (CUDA only).
- ``reference``: the eager spec in the input precision (``upcast=False``); skipped when its
  (B, H, L, L) score matrix would exceed ``REF_MAX_SCORES`` elements.
- ``sdpa_masked``: ``scaled_dot_product_attention`` with the equivalent bool key mask
  (which cannot use SDPA's flash backend).
- ``flex``: ``flex_attention`` compiled, with a ``create_block_mask`` block mask (block mask
  built outside the timed region).
- ``sdpa_gathered``: SDPA with no mask on the keys gathered to the known ones (gather timed).

Grid: on CUDA the issue's grid (fp16, Dh in {64, 128}, L in {256, 1024, 4096, 16384},
B * L = 16384 tokens, H = 2048 / Dh, known in {1.0, 0.5, 0.1}, forward and forward+backward).
Without CUDA a reduced CPU grid (fp32, B=1, H=4, Dh=64, L in {256, 1024}) of the CPU-capable
providers; ``PQMIM_BENCH_ATTN_GRID=cpu|gpu`` overrides the choice. ``extra_info`` records the
device, versions, shape and TFLOP/s counting only visible keys (forward 4·B·H·L·L_known·Dh,
forward+backward 3.5x that).
"""

from __future__ import annotations

import functools
import os
import platform

import pytest
import torch
import torch.nn.functional as F

from pqmim_kernels.functional import masked_attention
from pqmim_kernels.reference.attention import masked_attention_reference

CUDA = torch.cuda.is_available()
GRID = os.environ.get("PQMIM_BENCH_ATTN_GRID", "gpu" if CUDA else "cpu")
DEVICE = "cuda" if CUDA and GRID == "gpu" else "cpu"
REF_MAX_SCORES = 1 << 28

if GRID == "gpu":
    DTYPE = torch.float16
    SHAPES = [
        (16384 // seqlen, 2048 // dh, seqlen, dh)
        for dh in (64, 128)
        for seqlen in (256, 1024, 4096, 16384)
    ]
    ROUNDS, WARMUP = 20, 5
else:
    DTYPE = torch.float32
    SHAPES = [(1, 4, seqlen, 64) for seqlen in (256, 1024)]
    ROUNDS, WARMUP = 5, 1
KNOWN = (1.0, 0.5, 0.1)
PASSES = ("fwd", "fwd_bwd")
PROVIDERS = ("pqmim_triton", "reference", "sdpa_masked", "flex", "sdpa_gathered")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    return torch.compile(flex_attention, dynamic=False), create_block_mask


def _machine() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared)"


def _inputs(b, h, seqlen, dh, known, requires_grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (
        torch.randn(b, h, seqlen, dh, generator=g)
        .to(device=DEVICE, dtype=DTYPE)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )
    n_known = max(1, round(known * seqlen))
    lengths = torch.full((b,), n_known, device=DEVICE, dtype=torch.int32)
    return q, k, v, lengths, n_known


def _forward_fn(provider, q, k, v, lengths, n_known):
    b, _, seqlen, _ = q.shape
    if provider == "pqmim_triton":
        return lambda: masked_attention(q, k, v, key_lengths=lengths, backend="triton")
    if provider == "reference":
        return lambda: masked_attention_reference(q, k, v, key_lengths=lengths, upcast=False)
    if provider == "sdpa_masked":
        mask = (torch.arange(seqlen, device=DEVICE)[None, :] < lengths[:, None])[:, None, None]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if provider == "sdpa_gathered":
        idx = torch.arange(n_known, device=DEVICE)  # known-first: the known keys' positions
        return lambda: F.scaled_dot_product_attention(
            q, k.index_select(2, idx), v.index_select(2, idx)
        )
    if provider == "flex":
        flex_attention, create_block_mask = _flex()
        lens = lengths.clone()

        def mask_mod(bi, hi, qi, ki):
            return ki < lens[bi]

        block_mask = create_block_mask(mask_mod, b, None, seqlen, seqlen, device=DEVICE)
        return lambda: flex_attention(q, k, v, block_mask=block_mask)
    raise ValueError(provider)


def _skip_reason(provider, pass_, b, h, seqlen):
    if provider == "pqmim_triton" and DEVICE != "cuda":
        return "Triton kernel needs CUDA (CPU runs it only in the slow interpreter)"
    if provider == "reference" and b * h * seqlen * seqlen > REF_MAX_SCORES:
        return "eager score matrix too large"
    if provider == "flex" and DEVICE == "cpu":
        if pass_ == "fwd_bwd":
            return "FlexAttention has no CPU backward (torch 2.13)"
        if os.environ.get("PQMIM_BENCH_FLEX_CPU") != "1":
            # Measured here: 0.5-24 s per forward call at L=256 (compiled CPU path, with
            # recompilations), so it is opt-in.
            return "FlexAttention CPU forward is opt-in: PQMIM_BENCH_FLEX_CPU=1"
    return None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("known", KNOWN)
@pytest.mark.parametrize(("b", "h", "seqlen", "dh"), SHAPES)
@pytest.mark.parametrize("pass_", PASSES)
def bench_masked_attention(benchmark, pass_, b, h, seqlen, dh, known, provider):
    reason = _skip_reason(provider, pass_, b, h, seqlen)
    if reason:
        pytest.skip(reason)
    backward = pass_ == "fwd_bwd"
    q, k, v, lengths, n_known = _inputs(b, h, seqlen, dh, known, backward)
    fwd = _forward_fn(provider, q, k, v, lengths, n_known)
    if backward:
        grad = torch.randn_like(q)

        def run():
            out = fwd()
            torch.autograd.grad(out, (q, k, v), grad)
            _sync()
    else:

        def run():
            with torch.no_grad():
                fwd()
            _sync()

    benchmark.group = (
        f"{pass_} {str(DTYPE).removeprefix('torch.')} Dh={dh} L={seqlen} known={known}"
    )
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    flops = 4.0 * b * h * seqlen * n_known * dh * (3.5 if backward else 1.0)
    mean = benchmark.stats.stats.mean
    benchmark.extra_info.update(
        device=_machine(),
        torch=torch.__version__,
        triton=_triton_version(),
        shape={"B": b, "H": h, "L": seqlen, "Dh": dh, "known_keys": n_known},
        dtype=str(DTYPE),
        pass_=pass_,
        provider=provider,
        tflops_visible=flops / mean / 1e12,
        ms=mean * 1e3,
    )


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover
        return "not installed"

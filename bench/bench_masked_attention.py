"""Masked attention benchmarks: ours vs eager, masked SDPA, FlexAttention and gathered SDPA.

Run: ``python -m pytest bench/bench_masked_attention.py --benchmark-only``
(``--benchmark-json bench/results/masked_attention_<device>-<machine>.json`` to keep the numbers).

The mask is the MIM entropy model's: tokens ordered "known first", a fraction ``known`` of the
keys visible in every batch row (``key_lengths``), all L queries computed. q, k, v are
(B, H, L, Dh). Providers, one ``benchmark.group`` per (pass, dtype, Dh, L, known):

- ``pqmim``: ``masked_attention(..., key_lengths=...)`` with ``backend="auto"``: the Triton
  flash kernels on CUDA; on the CPU the eager fallback (the fp32 reference forward with the
  reference backward behind the same custom op), which is *not* a kernel and materialises the
  (B, H, L, L) scores.
- ``reference``: the eager spec in the input precision (``upcast=False``) differentiated by
  autograd; skipped when its (B, H, L, L) score matrix would exceed ``REF_MAX_SCORES``
  elements.
- ``sdpa_masked``: ``scaled_dot_product_attention`` with the equivalent bool key mask
  (B, 1, 1, L) (a mask rules out SDPA's flash backend).
- ``flex``: ``flex_attention`` under ``torch.compile`` with a ``create_block_mask`` block mask
  (built outside the timed region). CPU: forward only and opt-in (``PQMIM_BENCH_FLEX_CPU=1``):
  each shape compiles for tens of seconds and torch 2.13 has no CPU backward for it.
- ``sdpa_gathered``: SDPA with no mask on the keys gathered to the known ones (gather timed);
  the lower bound any masked kernel is aiming at.

Grids (``PQMIM_BENCH_ATTN_GRID=gpu|gpu-full|cpu|tiny`` overrides the default, ``gpu`` when
CUDA is present); known in {1.0, 0.5, 0.1} and both passes (``fwd``, ``fwd_bwd``) everywhere,
B·L = 16,384 tokens and H = 2048 / Dh on the GPU grids (so B·H·L·Dh is constant):

- ``gpu``: sized for ``bench/gpu_suite.py`` (about two minutes on an H100, most of it
  compiling FlexAttention and autotuning): fp16, (Dh, L) in {(64, 1024), (64, 4096),
  (128, 4096)}, 10 rounds after 3 warm-ups.
- ``gpu-full``: the issue's grid, fp16, Dh in {64, 128}, L in {256, 1024, 4096, 16384}, 20
  rounds after 5 warm-ups.
- ``cpu``: fp32, B = 1, H = 4, Dh = 64, L in {256, 1024}, 5 rounds after 1 warm-up.
- ``tiny``: fp32, B = 1, H = 2, Dh = 16, L = 64, 1 round (a smoke run of every code path).

``extra_info``: device, versions, threads, shape, ``ms``, TFLOP/s counting only visible keys
(forward 4·B·H·L·L_known·Dh, forward+backward 3.5x that), the nominal dense fp16 peak of the
GPU when known, and the peak extra memory of one call in MiB (see ``bench/conftest.py``).
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

from pqmim_kernels.functional import masked_attention
from pqmim_kernels.reference.attention import masked_attention_reference

CUDA = torch.cuda.is_available()
GRID = os.environ.get("PQMIM_BENCH_ATTN_GRID", "gpu" if CUDA else "cpu")
if GRID not in ("gpu", "gpu-full", "cpu", "tiny"):
    raise ValueError(f"PQMIM_BENCH_ATTN_GRID must be gpu, gpu-full, cpu or tiny, got {GRID!r}")
DEVICE = "cuda" if CUDA and GRID.startswith("gpu") else "cpu"
REF_MAX_SCORES = 1 << 30 if DEVICE == "cuda" else 1 << 26

if GRID == "gpu":
    DTYPE = torch.float16
    SHAPES = [(16384 // seqlen, 2048 // dh, seqlen, dh) for dh, seqlen in ((64, 1024), (64, 4096))]
    SHAPES.append((16384 // 4096, 2048 // 128, 4096, 128))
    ROUNDS, WARMUP = 10, 3
elif GRID == "gpu-full":
    DTYPE = torch.float16
    SHAPES = [
        (16384 // seqlen, 2048 // dh, seqlen, dh)
        for dh in (64, 128)
        for seqlen in (256, 1024, 4096, 16384)
    ]
    ROUNDS, WARMUP = 20, 5
elif GRID == "cpu":
    DTYPE = torch.float32
    SHAPES = [(1, 4, seqlen, 64) for seqlen in (256, 1024)]
    ROUNDS, WARMUP = 5, 1
else:
    DTYPE = torch.float32
    SHAPES = [(1, 2, 64, 16)]
    ROUNDS, WARMUP = 1, 1
KNOWN = (1.0, 0.5, 0.1)
PASSES = ("fwd", "fwd_bwd")
PROVIDERS = ("pqmim", "reference", "sdpa_masked", "flex", "sdpa_gathered")

# Nominal dense fp16/bf16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, by name.
_PEAKS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compiled graph per (shape, grad mode): the grid needs 32, more than dynamo's
    # default recompile limit (8), past which it would silently fall back to eager flex.
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(flex_attention, dynamic=False), create_block_mask


@functools.cache
def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def _inputs(b, h, seqlen, dh, known, requires_grad):
    # Drawn on the device: a CPU draw and copy of 3 x 2^25 values per case would dominate.
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v = (
        torch.randn(b, h, seqlen, dh, generator=g, device=DEVICE)
        .to(DTYPE)
        .requires_grad_(requires_grad)
        for _ in range(3)
    )
    n_known = max(1, round(known * seqlen))
    lengths = torch.full((b,), n_known, device=DEVICE, dtype=torch.int32)
    return q, k, v, lengths, n_known


def _forward_fn(provider, q, k, v, lengths, n_known):
    b, _, seqlen, _ = q.shape
    if provider == "pqmim":
        return lambda: masked_attention(q, k, v, key_lengths=lengths)
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
    raise ValueError(f"unknown provider {provider!r}")


def _skip_reason(provider, pass_, b, h, seqlen):
    if provider == "reference" and b * h * seqlen * seqlen > REF_MAX_SCORES:
        return f"eager score matrix of {b * h * seqlen * seqlen:,} elements is over the budget"
    if provider == "flex" and DEVICE == "cpu":
        if pass_ == "fwd_bwd":
            return "FlexAttention has no CPU backward (torch 2.13)"
        if os.environ.get("PQMIM_BENCH_FLEX_CPU") != "1":
            # Seen here: 0.5-24 s per forward call at L = 256 (compiled CPU path, with
            # recompilations), so it is opt-in.
            return "FlexAttention CPU forward is opt-in: PQMIM_BENCH_FLEX_CPU=1"
    return None


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("known", KNOWN)
@pytest.mark.parametrize(("b", "h", "seqlen", "dh"), SHAPES)
@pytest.mark.parametrize("pass_", PASSES)
def bench_masked_attention(
    benchmark, peak_extra_bytes, machine_name, pass_, b, h, seqlen, dh, known, provider
):
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

    for _ in range(WARMUP):  # compilation, autotuning, caches
        run()
    peak = peak_extra_bytes(run, DEVICE)
    benchmark.group = (
        f"{pass_} {str(DTYPE).removeprefix('torch.')} Dh={dh} L={seqlen} known={known}"
    )
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    flops = 4.0 * b * h * seqlen * n_known * dh * (3.5 if backward else 1.0)
    mean = benchmark.stats.stats.mean
    name = machine_name(DEVICE)
    nominal = next((p for key, p in _PEAKS if key in name), None) if DEVICE == "cuda" else None
    benchmark.extra_info.update(
        device=name,
        versions=_versions(),
        torch_threads=torch.get_num_threads(),
        shape={"B": b, "H": h, "L": seqlen, "Dh": dh, "known_keys": n_known},
        dtype=str(DTYPE),
        pass_=pass_,
        provider=provider,
        known=known,
        ms=round(mean * 1e3, 4),
        tflops_visible=flops / mean / 1e12,
        nominal_peak_tflops=nominal,
        peak_extra_MiB=round(peak / 2**20, 1) if peak >= 0 else None,
    )

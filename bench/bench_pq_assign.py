"""Product-quantization assignment benchmarks: ours vs eager baselines, faiss and vqtorch.

Run: ``python -m pytest bench/bench_pq_assign.py --benchmark-only``
(``--benchmark-json bench/results/pq_assign_<device>-<machine>.json`` to keep the numbers).

Providers, one ``benchmark.group`` per (device, dtype, N, M, K), D = 256, codes (N, M) int64:

- ``pqmim``: :func:`pqmim_kernels.pq_assign` with ``backend="auto"``: the Triton kernel on CUDA;
  on the CPU the chunked eager path (``pq_assign_chunked``: fp32 ``baddbmm`` + ``argmin`` over
  row chunks with a bounded score block), not a kernel.
- ``eager_chunked`` (CUDA only): the same chunked eager path on the GPU
  (``backend="reference"``), the best eager path at shapes where the naive ones do not fit.
  On the CPU it is ``pqmim`` itself and is skipped.
- ``eager_cdist``: ``torch.cdist`` + ``argmin`` per sub-space in fp32 (one (N, K) matrix per
  sub-space).
- ``eager_matmul``: ``‖c‖² − 2 z·c`` for all sub-spaces in one ``baddbmm`` + ``argmin`` in the
  input dtype (the naive (M, N, K) score tensor: 16 GiB at N = 262,144, M = 16, K = 1024).
- ``faiss``: ``faiss.ProductQuantizer.compute_codes`` with the same codebooks (faiss-cpu:
  CPU runs, fp32, K a power of two; its own OpenMP threads).
- ``vqtorch``: ``vector_quantize_pytorch.VectorQuantize(D, K, heads=M,
  separate_codebook_per_head=True, codebook_dim=D/M)`` in eval mode with the same codebooks.

Optional peers that are not installed are skipped with the pip command in the reason. Eager
providers whose score tensors would exceed ``EAGER_MAX_BYTES`` (8 GiB CUDA, 4 GiB CPU) are
skipped: they do not fit, which is the point of the fused kernel.

Grids (``PQMIM_BENCH_PQ_GRID=gpu|gpu-full|cpu|tiny`` overrides the default, ``gpu`` when CUDA
is present):

- ``gpu``: sized for ``bench/gpu_suite.py`` (about a minute on an H100): the goal shape
  N = 1,048,576, M = 16, K = 1024 (d = 16) first, then N in {262,144, 65,536} at that M, K
  and N in {1,048,576, 65,536} at M = 8, K = 256 (d = 32); fp32 (tf32x3) and bf16; 10 timed
  rounds after 3 warm-ups.
- ``gpu-full``: the issue's grid, N in {65,536, 262,144, 1,048,576} x M in {4, 8, 16} x K in
  {256, 1024, 4096}, fp32 and bf16 (each K and d is a compile of its own: ~10 minutes).
- ``cpu``: N = 65,536, M in {4, 8, 16}, K in {256, 1024}, fp32 only (bf16 matmuls have no fast
  path on this CPU), 3 rounds after 1 warm-up; plus ``bench_pq_assign_cpu_memory_bound``: ours
  alone at the issue's CPU shape N = 262,144, M = 16, K = 1024 (1 round).
- ``tiny``: N = 512, M = 4, K in {256, 300}, fp32, 1 round (a smoke run of every code path).

``extra_info`` per result: device, versions, threads, shape, GFLOP/s for the 2·N·K·D
multiply-adds, the device's nominal dense tensor-core peak for the kernel's arithmetic when
known (GPU; for fp32 that of tf32x3, a third of the TF32 peak, since it does three TF32
products per multiply-add), the fp32 precision of the kernel, peak extra
memory of one call in MiB (see ``bench/conftest.py``), the inputs + outputs size for the
"memory no more than inputs + outputs" goal, and the fraction of codes equal to ours.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os

import pytest
import torch

import pqmim_kernels
from pqmim_kernels.functional import pq_assign

CUDA = torch.cuda.is_available()
GRID = os.environ.get("PQMIM_BENCH_PQ_GRID", "gpu" if CUDA else "cpu")
if GRID not in ("gpu", "gpu-full", "cpu", "tiny"):
    raise ValueError(f"PQMIM_BENCH_PQ_GRID must be gpu, gpu-full, cpu or tiny, got {GRID!r}")
DEVICE = "cuda" if CUDA and GRID.startswith("gpu") else "cpu"
D = 256
FP32_PRECISION = "tf32x3"  # pq_assign's default; the IEEE path is timed in the autotune probe

if GRID == "gpu":
    SHAPES = [
        (1 << 20, 16, 1024),  # the goal shape first
        (262_144, 16, 1024),
        (65_536, 16, 1024),
        (1 << 20, 8, 256),
        (65_536, 8, 256),
    ]
    DTYPES = (torch.float32, torch.bfloat16)
    ROUNDS, WARMUP = 10, 3
elif GRID == "gpu-full":
    SHAPES = [
        (n, m, k)
        for n in (65_536, 262_144, 1_048_576)
        for m in (4, 8, 16)
        for k in (256, 1024, 4096)
    ]
    DTYPES = (torch.float32, torch.bfloat16)
    ROUNDS, WARMUP = 10, 3
elif GRID == "cpu":
    SHAPES = [(65_536, m, k) for m in (4, 8, 16) for k in (256, 1024)]
    DTYPES = (torch.float32,)
    ROUNDS, WARMUP = 3, 1
else:
    SHAPES = [(512, 4, 256), (512, 4, 300)]
    DTYPES = (torch.float32,)
    ROUNDS, WARMUP = 1, 1
PROVIDERS = ("pqmim", "eager_chunked", "eager_cdist", "eager_matmul", "faiss", "vqtorch")
EAGER_MAX_BYTES = 8 * 2**30 if DEVICE == "cuda" else 4 * 2**30

# Nominal dense tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched on the name:
# 16-bit inputs at the bf16/fp16 rate; fp32 at a third of the TF32 rate (tf32x3 issues three
# TF32 products per multiply-add).
_PEAKS = (
    ("H100 PCIe", {torch.bfloat16: 756.0, torch.float16: 756.0, torch.float32: 378.0 / 3}),
    ("H100", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 494.7 / 3}),
    ("H200", {torch.bfloat16: 989.4, torch.float16: 989.4, torch.float32: 494.7 / 3}),
    ("A100", {torch.bfloat16: 312.0, torch.float16: 312.0, torch.float32: 156.0 / 3}),
)


def nominal_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    for key, peaks in _PEAKS:
        if key in device_name:
            return peaks.get(dtype)
    return None


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@functools.cache
def _versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "pqmim_kernels": pqmim_kernels.__version__}
    for name in ("triton", "faiss", "vector_quantize_pytorch"):
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", None) or importlib.metadata.version(
                name.replace("_", "-")
            )
        except ImportError:
            out[name] = "not installed"
    return out


@functools.cache
def _inputs(n, m, k, dtype):
    # Drawn on the device (a CPU draw of 2^28 values and its copy would dominate a GPU run).
    g = torch.Generator(device=DEVICE).manual_seed(0)
    z = torch.randn(n, D, generator=g, device=DEVICE).to(dtype)
    cb = torch.randn(m, k, D // m, generator=g, device=DEVICE).to(dtype)
    return z, cb


@functools.cache
def _our_codes(n, m, k, dtype):
    z, cb = _inputs(n, m, k, dtype)
    return pq_assign(z, cb).cpu()


def _eager_cdist(z, cb):
    m, _, d = cb.shape
    zs = z.float().reshape(-1, m, d)
    cbf = cb.float()
    return torch.stack([torch.cdist(zs[:, i], cbf[i]).argmin(-1) for i in range(m)], -1)


def _eager_matmul(z, cb):
    m, _, d = cb.shape
    zs = z.reshape(-1, m, d).transpose(0, 1)  # (M, N, d)
    cnorm = (cb * cb).sum(-1).unsqueeze(1)  # (M, 1, K)
    return torch.baddbmm(cnorm, zs, cb.transpose(1, 2), alpha=-2.0).argmin(-1).t()


def _faiss_fn(faiss, z, cb):
    m, k, d = cb.shape
    nbits = int(math.log2(k))
    if DEVICE != "cpu":
        pytest.skip("faiss-cpu runs on the CPU; GPU runs compare GPU providers only")
    if z.dtype != torch.float32 or 2**nbits != k:
        pytest.skip("faiss ProductQuantizer takes fp32 and K a power of two only")
    pq = faiss.ProductQuantizer(m * d, m, nbits)
    faiss.copy_array_to_vector(cb.contiguous().numpy().reshape(-1), pq.centroids)
    pq.sync_transposed_centroids()
    x = z.contiguous().numpy()

    def run():
        return pq.compute_codes(x)

    def decode(packed):
        if nbits == 8:
            return torch.from_numpy(packed.astype("int64"))
        bits = torch.from_numpy(packed).to(torch.int64)  # little-endian bit packing
        bitstream = ((bits.unsqueeze(-1) >> torch.arange(8)) & 1).reshape(len(x), -1)
        weights = 2 ** torch.arange(nbits)
        return (bitstream[:, : m * nbits].reshape(len(x), m, nbits) * weights).sum(-1)

    return run, decode


def _vqtorch_fn(vqp, z, cb):
    m, k, d = cb.shape
    vq = vqp.VectorQuantize(m * d, k, heads=m, separate_codebook_per_head=True, codebook_dim=d)
    vq.to(DEVICE).eval()
    with torch.no_grad():
        vq.codebook = cb.float()

    def run():
        with torch.no_grad():
            return vq(z.float()[None])[1][0]

    return run


def _scores_bytes(name, n, m, k, dtype):
    """Bytes of the score tensors a naive provider holds at once (None: bounded)."""
    if name == "eager_cdist":
        return n * k * 4
    if name == "eager_matmul":
        return m * n * k * torch.empty(0, dtype=dtype).element_size()
    if name == "vqtorch":
        return 4 * m * n * k * 4  # its cdist holds ~4 fp32 (M, N, K) tensors (8.1 GiB measured
        # at N = 65,536, M = 8, K = 1024)
    return None


def _provider(name, z, cb, peer):
    """(callable, codes-of-its-result) for a provider, or pytest.skip."""
    n, m, k = z.shape[0], cb.shape[0], cb.shape[1]
    need = _scores_bytes(name, n, m, k, z.dtype)
    if need is not None and need > EAGER_MAX_BYTES:
        pytest.skip(f"{name}: score tensors of {need / 2**30:.1f} GiB do not fit the budget")
    same = lambda r: r  # noqa: E731
    if name == "pqmim":
        return (lambda: pq_assign(z, cb, fp32_precision=FP32_PRECISION)), same
    if name == "eager_chunked":
        if DEVICE == "cpu":
            pytest.skip("eager_chunked is what pqmim runs on the CPU")
        return (lambda: pq_assign(z, cb, backend="reference")), same
    if name == "eager_cdist":
        return (lambda: _eager_cdist(z, cb)), same
    if name == "eager_matmul":
        return (lambda: _eager_matmul(z, cb)), same
    if name == "faiss":
        return _faiss_fn(peer("faiss", "faiss-cpu"), z, cb)
    if name == "vqtorch":
        return _vqtorch_fn(peer("vector_quantize_pytorch", "vector-quantize-pytorch"), z, cb), same
    raise ValueError(f"unknown provider {name!r}")


def _ids(shape):
    n, m, k = shape
    return f"N{n}-M{m}-K{k}"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).removeprefix("torch."))
def bench_pq_assign(benchmark, peak_extra_bytes, machine_name, peer, dtype, shape, provider):
    n, m, k = shape
    z, cb = _inputs(n, m, k, dtype)
    fn, decode = _provider(provider, z, cb, peer)

    def timed():
        out = fn()
        _sync()
        return out

    for _ in range(WARMUP):  # autotune / caches
        timed()
    peak = peak_extra_bytes(timed, DEVICE)
    benchmark.group = f"pq_assign {DEVICE} {str(dtype).removeprefix('torch.')} N={n} M={m} K={k}"
    result = benchmark.pedantic(timed, rounds=ROUNDS, iterations=1)
    codes = decode(result).to(torch.int64).cpu().reshape(n, m)
    ours = _our_codes(n, m, k, dtype)
    flops = 2.0 * n * k * D
    name = machine_name(DEVICE)
    io_bytes = (z.numel() + cb.numel()) * z.element_size() + n * m * 8
    benchmark.extra_info.update(
        device=name,
        versions=_versions(),
        torch_threads=torch.get_num_threads(),
        provider=provider,
        N=n,
        M=m,
        K=k,
        D=D,
        dtype=str(dtype),
        fp32_precision=FP32_PRECISION if provider == "pqmim" and DEVICE == "cuda" else None,
        ms=round(benchmark.stats.stats.mean * 1e3, 3),
        peak_extra_MiB=round(peak / 2**20, 1) if peak >= 0 else None,
        inputs_outputs_MiB=round(io_bytes / 2**20, 1),
        gflops_per_s=round(flops / benchmark.stats.stats.mean / 1e9, 2),
        nominal_peak_tflops=nominal_peak_tflops(name, dtype) if DEVICE == "cuda" else None,
        agreement_with_pqmim=round(float((codes == ours).float().mean()), 6),
    )
    # A provider that returns different codes is not doing the same work: fp32 near-ties may
    # differ in a few rows, a wrong decode or codebook layout would disagree almost everywhere.
    # (16-bit eager scores are rounded to 8 or 11 bits, so there only the number is recorded.)
    if dtype == torch.float32:
        assert benchmark.extra_info["agreement_with_pqmim"] > 0.9


@pytest.mark.skipif(
    DEVICE != "cpu" or GRID != "cpu", reason="the CPU memory-bound check runs with the cpu grid"
)
def bench_pq_assign_cpu_memory_bound(benchmark, peak_extra_bytes, machine_name):
    """Ours at N = 262,144, M = 16, K = 1024 (naive eager: a 16 GiB score tensor); ≤ ~1 GiB."""
    n, m, k = 262_144, 16, 1024
    z, cb = _inputs(n, m, k, torch.float32)
    peak = peak_extra_bytes(lambda: pq_assign(z, cb), DEVICE)
    benchmark.group = f"pq_assign cpu memory N={n} M={m} K={k}"
    benchmark.pedantic(lambda: pq_assign(z, cb), rounds=1, iterations=1)
    benchmark.extra_info.update(
        device=machine_name(DEVICE),
        versions=_versions(),
        torch_threads=torch.get_num_threads(),
        provider="pqmim",
        N=n,
        M=m,
        K=k,
        D=D,
        dtype=str(torch.float32),
        ms=round(benchmark.stats.stats.mean * 1e3, 3),
        peak_extra_MiB=round(peak / 2**20, 1) if peak >= 0 else None,
        naive_scores_MiB=n * m * k * 4 / 2**20,
        gflops_per_s=round(2.0 * n * k * D / benchmark.stats.stats.mean / 1e9, 2),
    )
    if peak >= 0:
        assert peak <= 2**30, f"chunked CPU path used {peak / 2**20:.0f} MiB (bound: ~1 GiB)"


@pytest.mark.parametrize("provider", ("pqmim", "vqtorch"))
def bench_product_quantizer_train_step(benchmark, machine_name, peer, provider):
    """One training step of the quantizer module alone: forward, EMA update, backward.

    (B, N, D) = (16, 256, 256), M = 8, K = 256, same settings for both modules.
    """
    from pqmim_kernels.nn import ProductQuantizer

    b, n, m, k = 16, 256, 8, 256
    if GRID == "tiny":
        b = 1
    common = dict(decay=0.99, commitment_weight=0.25, kmeans_init=True, threshold_ema_dead_code=2)
    if provider == "pqmim":
        module = ProductQuantizer(D, m, k, **common)
    else:
        vqp = peer("vector_quantize_pytorch", "vector-quantize-pytorch")
        module = vqp.VectorQuantize(
            D, k, heads=m, separate_codebook_per_head=True, codebook_dim=D // m, **common
        )
    module.to(DEVICE).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, n, D, generator=g).to(DEVICE).requires_grad_(True)

    def step():
        quantized, _, loss = module(x)
        (quantized.sum() + loss).backward()
        _sync()

    for _ in range(WARMUP + 1):  # the first call runs k-means
        step()
    benchmark.group = f"ProductQuantizer train step {DEVICE} B={b} N={n} D={D} M={m} K={k}"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(
        device=machine_name(DEVICE),
        versions=_versions(),
        torch_threads=torch.get_num_threads(),
        provider=provider,
        ms=round(benchmark.stats.stats.mean * 1e3, 3),
    )

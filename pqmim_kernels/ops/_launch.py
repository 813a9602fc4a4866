"""Launch plumbing shared by the Triton ops: interpreter switch, kernel limits, device limits,
and the choice of launch configs that fit the device.

Triton-free at import time (:mod:`pqmim_kernels.functional` reads the kernel limits and the
interpreter switch from here without importing Triton). Configs are duck-typed: anything with
``kwargs``, ``num_warps`` and ``num_stages`` (a ``triton.Config``).

How a config is judged (:func:`fits`): each kernel estimates, per program, the bytes of shared
memory its pipelined operand tiles take and the 32-bit registers per thread its register-resident
tiles take (accumulators, dot operands, score tiles, spread over ``32 * num_warps`` threads, plus
a fixed allowance for indices and pointers). A config fits a device when

- shared memory: estimate + ``SMEM_RESERVE`` (Triton's own scratch for layout conversions and
  reductions) <= the device's opt-in maximum per block; and
- registers: estimate <= ``MAX_REGS_PER_THREAD`` (255, the PTX limit; more spills to local
  memory) and <= the register file per block divided by the threads.

The estimates were calibrated by compiling the kernels ahead of time for sm_80/86/89/90 (the
tests do that for the largest config each prune keeps): they are conservative, not exact.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "ATTN_MAX_GRID_BH",
    "ATTN_MAX_HEAD_DIM",
    "DEVICE_CLASSES",
    "MAX_REGS_PER_THREAD",
    "PQ_MAX_SUBSPACE_DIM",
    "SMEM_RESERVE",
    "DeviceLimits",
    "device_limits",
    "fits",
    "fitting_configs",
    "interpreting",
    "pinned_config",
    "pow2_bucket",
]

# Largest sub-vector length d the pq_assign kernel holds in registers (BLOCK_D = next pow2 >= 16).
PQ_MAX_SUBSPACE_DIM = 256
# Largest head dim of the attention kernels (one (BLOCK, D_PAD) tile per operand).
ATTN_MAX_HEAD_DIM = 256
# B * H programs sit on the attention grid's second axis, which CUDA caps at 65535.
ATTN_MAX_GRID_BH = 65535

MAX_REGS_PER_THREAD = 255
# Shared memory Triton allocates beyond the operand tiles (layout-conversion and reduction
# scratch, barriers); measured at most ~4 KiB on the kept configs, doubled for margin.
SMEM_RESERVE = 8 * 1024


def interpreting() -> bool:
    """True when this process runs Triton kernels in the CPU interpreter (``TRITON_INTERPRET=1``,
    which Triton itself reads when it is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    """What a launch config must fit on one GPU.

    ``smem_per_block``: bytes of shared memory one program may use (the opt-in maximum, what
    Triton checks before launch); ``regs_per_block``: 32-bit registers one program may use
    (shared by its ``32 * num_warps`` threads); ``num_sms``: multiprocessors (information only).
    """

    name: str
    capability: tuple[int, int]
    smem_per_block: int
    regs_per_block: int = 65536
    num_sms: int = 0


# The device classes the kernels are sized for (opt-in shared memory per block from NVIDIA's
# CUDA programming guide: 163 KiB on sm_80, 99 KiB on sm_86/sm_89, 227 KiB on sm_90).
DEVICE_CLASSES = {
    "sm_80": DeviceLimits("A100 (sm_80)", (8, 0), 166_912, 65536, 108),
    "sm_86": DeviceLimits("A10 / RTX 3090 (sm_86)", (8, 6), 101_376, 65536, 72),
    "sm_89": DeviceLimits("L4 / RTX 4090 (sm_89)", (8, 9), 101_376, 65536, 58),
    "sm_90": DeviceLimits("H100 / H200 (sm_90)", (9, 0), 232_448, 65536, 132),
}
# Unknown devices without a usable query get the smallest budget of the classes above.
_SMALLEST = DEVICE_CLASSES["sm_86"]

_LIMITS: dict[int, DeviceLimits] = {}  # memo of device_limits, by CUDA device index


def _query_limits(index: int) -> DeviceLimits:
    import torch

    props = torch.cuda.get_device_properties(index)
    name = str(getattr(props, "name", f"cuda:{index}"))
    cap = (int(getattr(props, "major", 0)), int(getattr(props, "minor", 0)))
    smem = getattr(props, "shared_memory_per_block_optin", None)
    regs = getattr(props, "regs_per_multiprocessor", None)
    sms = int(getattr(props, "multi_processor_count", 0) or 0)
    if not smem or not regs:
        # Older torch builds lack these fields; Triton's driver reads the same CUDA attributes.
        try:
            from triton.runtime import driver

            tprops = driver.active.utils.get_device_properties(index)
            smem = smem or tprops.get("max_shared_mem")
            regs = regs or tprops.get("max_num_regs")
            sms = sms or int(tprops.get("multiprocessor_count", 0))
        except Exception:  # pragma: no cover - depends on the driver
            pass
    if not smem or not regs:
        known = next((c for c in DEVICE_CLASSES.values() if c.capability == cap), _SMALLEST)
        smem, regs = smem or known.smem_per_block, regs or known.regs_per_block
    # Per block, sm_80..sm_90 allow the whole 64 Ki register file; never assume more.
    return DeviceLimits(name, cap, int(smem), min(int(regs), 65536), sms)


def device_limits(device) -> DeviceLimits:
    """:class:`DeviceLimits` of a CUDA device (a ``torch.device``, index or tensor), queried once
    per device from ``torch.cuda.get_device_properties`` (Triton's driver as a fallback)."""
    import torch

    if isinstance(device, torch.Tensor):
        device = device.device
    if isinstance(device, torch.device):
        index = device.index if device.index is not None else torch.cuda.current_device()
    else:
        index = int(device)
    if index not in _LIMITS:
        _LIMITS[index] = _query_limits(index)
    return _LIMITS[index]


def pow2_bucket(n: int, lo: int = 16, hi: int | None = None) -> int:
    """The power of two >= ``n``, clamped to ``[lo, hi]``: autotune keys that follow a size
    without re-tuning for every distinct value."""
    b = 1 << max(0, (max(int(n), 1) - 1).bit_length())
    b = max(b, lo)
    return min(b, hi) if hi is not None else b


def fits(smem_bytes: int, regs_per_thread: float, num_warps: int, limits: DeviceLimits) -> bool:
    """Whether a program with these estimates fits ``limits`` (see the module docstring)."""
    threads = 32 * num_warps
    reg_cap = min(MAX_REGS_PER_THREAD, limits.regs_per_block // threads)
    return smem_bytes + SMEM_RESERVE <= limits.smem_per_block and regs_per_thread <= reg_cap


def fitting_configs(
    configs: Iterable,
    cost: Callable[[object], tuple[int, float]],
    limits: DeviceLimits,
    fallbacks: Sequence,
) -> list:
    """The configs that fit ``limits``; when none does, the first of ``fallbacks`` that fits.

    ``cost(config) -> (smem bytes, registers per thread)``. Shared memory is a hard limit (a
    launch over it fails), registers a soft one (ptxas spills the excess to local memory: slow,
    still correct): when no fallback fits both, the smallest (last) one whose shared memory
    fits is returned. The last fallback of every kernel fits the shared memory of every
    supported device (the tests check it for every class); if even that does not fit,
    ``RuntimeError`` says so instead of launching something that cannot run.
    """
    kept = [c for c in configs if fits(*cost(c), c.num_warps, limits)]
    if kept:
        return kept
    for c in fallbacks:
        if fits(*cost(c), c.num_warps, limits):
            return [c]
    for c in reversed(fallbacks):
        if cost(c)[0] + SMEM_RESERVE <= limits.smem_per_block:
            return [c]
    smem, regs = cost(fallbacks[-1])
    raise RuntimeError(
        f"no launch config fits {limits.name}: even the smallest needs ~{smem + SMEM_RESERVE} B "
        f"of shared memory (device: {limits.smem_per_block} B); use backend='reference'"
    )


def pinned_config(
    make: Callable[[int], object],
    cost: Callable[[object], tuple[int, float]],
    limits: DeviceLimits,
    fallbacks: Sequence,
    stages: Sequence[int] = (3, 2, 1),
):
    """The pinned config ``make(num_stages)`` with the deepest pipeline in ``stages`` that fits.

    Block sizes and warps (which decide the arithmetic: MMA shapes, reduction trees) stay fixed;
    only the pipeline depth (which does not change any result) adapts to the device. Registers
    being a soft limit (see :func:`fitting_configs`), the pinned blocks are kept, spilling,
    while their shared memory fits at some depth; only then does it fall back like
    :func:`fitting_configs`.
    """
    made = [make(s) for s in stages]
    for c in made:
        if fits(*cost(c), c.num_warps, limits):
            return c
    for c in made:
        if cost(c)[0] + SMEM_RESERVE <= limits.smem_per_block:
            return c
    return fitting_configs([], cost, limits, fallbacks)[0]

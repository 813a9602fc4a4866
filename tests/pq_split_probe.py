"""A one-program Triton kernel that applies the pq_assign kernel's TF32 split (test helper,
imported only by the interpreter worker of ``test_pq_assign.py``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pqmim_kernels.ops.pq_assign import _split_tf32


@triton.jit
def _split_kernel(x_ptr, hi_ptr, lo_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    hi, lo = _split_tf32(tl.load(x_ptr + offs, mask=ok, other=0.0))
    tl.store(hi_ptr + offs, hi, mask=ok)
    tl.store(lo_ptr + offs, lo, mask=ok)


def split_tf32(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """hi, lo of a 1-d fp32 tensor x, computed by the kernel's own split."""
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _split_kernel[(1,)](x, hi, lo, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    return hi, lo

"""The attention kernels compile ahead of time for each GPU class (sm_80, sm_86, sm_89, sm_90)
with no GPU present, and what the prunes keep fits there.

Each kernel goes through Triton's full CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas
cubin) with the specialisation a launch on contiguous tensors gets (16-byte aligned pointers,
strides divisible by 16, unit head-dim strides). This catches what the interpreter cannot:
layout/type errors in ``tl.dot``, shared memory over the class's limit, and register spills of
the 16-bit configs the prune keeps (fp32 inputs use IEEE FMA dots, which spill at large head
dims whatever the tiling: only their shared memory is checked). Skipped under
``TRITON_INTERPRET=1`` and where Triton ships no ``ptxas``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parent))

import aot  # noqa: E402

from pqmim_kernels.ops import _launch  # noqa: E402
from pqmim_kernels.ops import masked_attention as ma  # noqa: E402

_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
_KERNELS = {
    "fwd": (ma._masked_attn_fwd, ma._fwd_tuned),
    "dq": (ma._masked_attn_bwd_dq, ma._bwd_dq_tuned),
    "dkdv": (ma._masked_attn_bwd_dkdv, ma._bwd_dkdv_tuned),
}
_SIZE_ARGS = ("H", "LQ", "LK", "LQ_BUCKET", "LK_BUCKET")
_TENSOR_ARGS = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")


def _compile(kernel, dtype, head_dim, mask_mode, has_bound, has_key_mask, config, arch):
    fn = _KERNELS[kernel][0]
    dt = _DTYPES[dtype]
    pointer = {"LSE": "*fp32", "DELTA": "*fp32", "BOUND": "*i32", "KMASK": "*u8"}
    pointer["AMASK"] = "*u8" if mask_mode == 1 else f"*{dt}"
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointer or name in _TENSOR_ARGS:
            signature[name] = pointer.get(name, f"*{dt}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name], constexprs[name] = "constexpr", 1
        elif name.isupper() and name not in _SIZE_ARGS:
            signature[name] = "constexpr"
        else:
            signature[name] = "i32"
            if name.startswith("stride_") and not name.startswith(("stride_am", "stride_km")):
                attrs[(i,)] = [["tt.divisibility", 16]]
    constexprs.update(
        HEAD_DIM=head_dim,
        D_PAD=max(16, triton.next_power_of_2(head_dim)),
        HAS_BOUND=has_bound,
        HAS_KEY_MASK=has_key_mask,
        MASK_MODE=mask_mode,
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        INTERPRETER=False,
        **config.kwargs,
    )
    return aot.compile_kernel(fn, signature, constexprs, attrs, config, arch)


def _arch(cls: str) -> int:
    cap = _launch.DEVICE_CLASSES[cls].capability
    return 10 * cap[0] + cap[1]


def _kept(kernel, dtype, head_dim, mask_mode, has_key_mask, cls, monkeypatch):
    limits = _launch.DEVICE_CLASSES[cls]
    monkeypatch.setattr(ma, "device_limits", lambda _: limits)
    tuned = _KERNELS[kernel][1]
    named = {"Q": torch.empty(0, dtype=dtype), "MASK_MODE": mask_mode}
    named["HAS_KEY_MASK"] = has_key_mask
    d_pad = max(16, triton.next_power_of_2(head_dim))
    return tuned.early_config_prune(tuned.configs, named, D_PAD=d_pad), d_pad


# (dtype, head dim, mask mode, has bound, has key mask): the common case and the heaviest.
CASES = {
    "fp16-d128-lengths": (torch.float16, 128, 0, True, False),
    "bf16-d64-keymask-bias": (torch.bfloat16, 64, 2, True, True),
    "fp16-d256-lengths": (torch.float16, 256, 0, True, False),
    "fp32-d48-boolmask": (torch.float32, 48, 1, False, False),
}
GRID = [
    *((cls, case) for cls in ("sm_80", "sm_90") for case in CASES),
    ("sm_86", "fp16-d128-lengths"),
    ("sm_89", "fp16-d256-lengths"),
]


@pytest.mark.parametrize("kernel", sorted(_KERNELS))
@pytest.mark.parametrize(("cls", "case"), GRID)
def test_kept_configs_compile_and_fit(monkeypatch, kernel, cls, case):
    """The configs the prune keeps for that class with the most shared memory and with the most
    registers compile there, within the class's shared memory and the estimate, and the 16-bit
    ones that the register estimate let through do not spill."""
    arch = _arch(cls)
    aot.require_toolchain(arch)
    dtype, head_dim, mode, bound, key_mask = CASES[case]
    kept, d_pad = _kept(kernel, dtype, head_dim, mode, key_mask, cls, monkeypatch)
    limits = _launch.DEVICE_CLASSES[cls]

    def cost(c):
        wgmma = limits.capability >= (9, 0)
        return ma.config_cost(kernel, c, d_pad, dtype.itemsize, mode, key_mask, wgmma)

    # Registers are a soft limit: a fallback kept because no candidate fits may spill.
    fitted = any(_launch.fits(*cost(c), c.num_warps, limits) for c in kept)
    for config in {max(kept, key=lambda c: cost(c)[0]), max(kept, key=lambda c: cost(c)[1])}:
        used = aot.resources(_compile(kernel, dtype, head_dim, mode, bound, key_mask, config, arch))
        assert 0 < used["shared"] <= limits.smem_per_block, (config, used)
        assert used["shared"] <= cost(config)[0], (config, used, cost(config))
        if fitted and dtype != torch.float32 and used["stack"] is not None:
            assert used["stack"] <= 128, (config, used)  # a few words, not a spill loop


@pytest.mark.parametrize("kernel", sorted(_KERNELS))
@pytest.mark.parametrize(("cls", "dtype"), [("sm_86", torch.float32), ("sm_90", torch.bfloat16)])
def test_pinned_configs_compile_and_fit_at_head_dim_256(kernel, cls, dtype):
    """The pinned config of the worst case (Dh = 256) fits the class and compiles for it."""
    arch = _arch(cls)
    aot.require_toolchain(arch)
    limits = _launch.DEVICE_CLASSES[cls]
    config = ma.pinned_attention_config(kernel, 256, dtype.itemsize, limits)
    used = aot.resources(_compile(kernel, dtype, 256, 0, True, False, config, arch))
    assert 0 < used["shared"] <= limits.smem_per_block, (config, used)

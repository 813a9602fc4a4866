"""The Triton kernels compile ahead of time for real GPUs (sm_80, sm_90), with no GPU present.

Each kernel goes through Triton's full CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas
cubin) with the specialisation a launch on contiguous tensors gets (16-byte aligned pointers,
strides divisible by 16, unit head-dim strides). This catches what the interpreter cannot:
layout/type errors in ``tl.dot`` and shared-memory overflow of the largest autotune configs
on an H100 (227 KiB per block). Skipped under ``TRITON_INTERPRET=1`` (kernels are interpreted
objects then) and where Triton ships no ``ptxas``.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas

    if not os.path.exists(get_ptxas(90).path):
        raise FileNotFoundError(get_ptxas(90).path)
except Exception as exc:  # pragma: no cover - depends on the Triton build
    pytest.skip(f"no CUDA compiler toolchain in this Triton: {exc}", allow_module_level=True)

from pqmim_kernels.ops import masked_attention as ma  # noqa: E402

H100_SMEM_PER_BLOCK = 227 * 1024
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
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _largest_kept_config(kernel, dtype, head_dim):
    tuned = _KERNELS[kernel][1]
    named = {"D_PAD": max(16, triton.next_power_of_2(head_dim)), "Q": torch.empty(0, dtype=dtype)}
    kept = tuned.early_config_prune(tuned.configs, named)
    return max(kept, key=lambda c: c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]))


@pytest.mark.parametrize("kernel", sorted(_KERNELS))
@pytest.mark.parametrize(
    ("dtype", "head_dim", "mask_mode", "has_bound", "has_key_mask", "arch"),
    [
        (torch.float16, 128, 0, True, False, 90),
        (torch.bfloat16, 64, 2, True, True, 90),
        (torch.float32, 48, 1, False, False, 80),
    ],
    ids=["fp16-d128-lengths-sm90", "bf16-d64-keymask-bias-sm90", "fp32-d48-boolmask-sm80"],
)
def test_largest_autotune_config_compiles_and_fits(
    kernel, dtype, head_dim, mask_mode, has_bound, has_key_mask, arch
):
    config = _largest_kept_config(kernel, dtype, head_dim)
    compiled = _compile(kernel, dtype, head_dim, mask_mode, has_bound, has_key_mask, config, arch)
    shared = compiled.metadata.shared
    assert 0 < shared <= H100_SMEM_PER_BLOCK, (kernel, config, shared)
    assert compiled.asm["cubin"], "ptxas produced no cubin"


@pytest.mark.parametrize("kernel", sorted(_KERNELS))
def test_pinned_configs_compile_and_fit_at_head_dim_256(kernel):
    # pinned_launch_configs() drops to two stages above Dh = 128; the worst case must fit.
    meta_q = torch.empty(0, device="meta")
    assert ma._launch_params(meta_q, kernel, 256) == ({"INTERPRETER": False}, True)
    with ma.pinned_launch_configs():
        fixed, tuned = ma._launch_params(meta_q, kernel, 256)
    assert not tuned and fixed["num_stages"] == 2 and fixed["INTERPRETER"] is False
    assert ma._launch_params(meta_q, kernel, 256)[1], "the context must restore autotuning"
    config = triton.Config(
        {"BLOCK_M": fixed["BLOCK_M"], "BLOCK_N": fixed["BLOCK_N"]},
        num_warps=fixed["num_warps"],
        num_stages=fixed["num_stages"],
    )
    compiled = _compile(kernel, torch.float16, 256, 0, True, False, config, 90)
    assert 0 < compiled.metadata.shared <= H100_SMEM_PER_BLOCK

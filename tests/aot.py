"""Ahead-of-time compiles of the Triton kernels for real GPUs, without a GPU (test helper).

Each kernel goes through Triton's full CUDA pipeline (TTIR -> TTGIR -> LLVM -> PTX -> ptxas
cubin) for a chosen ``sm_XX`` with the specialisation a launch on contiguous tensors gets
(16-byte aligned pointers, unit inner strides). :func:`resources` reads back what the hardware
would be asked for: shared memory (Triton's metadata) and registers and stack bytes per thread
(``cuobjdump --dump-resource-usage`` on the cubin; a stack means ptxas spilled registers).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest

triton = pytest.importorskip("triton")


def require_toolchain(arch: int) -> None:
    """Skip unless this Triton build ships a ptxas for ``arch``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("kernels are interpreted in this process")
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        if not os.path.exists(get_ptxas(arch).path):
            raise FileNotFoundError(get_ptxas(arch).path)
    except Exception as exc:  # pragma: no cover - depends on the Triton build
        pytest.skip(f"no CUDA compiler toolchain in this Triton: {exc}")


def plain_signature(fn, pointers: dict, constexprs: dict) -> tuple[dict, dict]:
    """``(signature, attrs)`` of a kernel whose arguments are the ``pointers`` (name -> element
    type, 16-byte aligned), the ``constexprs`` and otherwise i32 scalars."""
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in pointers:
            signature[name] = "*" + pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "constexpr" if name in constexprs else "i32"
    return signature, attrs


def compile_kernel(fn, signature: dict, constexprs: dict, attrs: dict, config, arch: int):
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def resources(compiled) -> dict:
    """{"shared": bytes, "regs": per thread or None, "stack": bytes or None}."""
    out = {"shared": compiled.metadata.shared, "regs": None, "stack": None}
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):  # pragma: no cover - depends on the Triton build
        return out
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60
        ).stdout
    finally:
        os.remove(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if m:
        out["regs"], out["stack"] = int(m[1]), int(m[2])
    return out

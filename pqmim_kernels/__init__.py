"""pqmim-kernels: fast, trustworthy PQ-MIM learned image compression.

Public API (imported lazily, so ``import pqmim_kernels`` needs neither CUDA, Triton nor the
compiled rANS extension):

- :func:`pq_assign`, :func:`pq_quantize`: product-quantization assignment (Triton on CUDA).
- :func:`masked_attention`: masked flash attention (Triton on CUDA).
- :mod:`pqmim_kernels.coding`: the rANS entropy coder (C++ via pybind11).
- :mod:`pqmim_kernels.nn`: drop-in modules for trainers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_FUNCTIONS = {
    "pq_assign": "pqmim_kernels.functional",
    "pq_quantize": "pqmim_kernels.functional",
    "masked_attention": "pqmim_kernels.functional",
}
_LAZY_MODULES = ("coding", "functional", "nn", "reference", "models", "evaluation")

__all__ = ["__version__", *_LAZY_FUNCTIONS, *_LAZY_MODULES]


def __getattr__(name: str):
    if name in _LAZY_FUNCTIONS:
        return getattr(importlib.import_module(_LAZY_FUNCTIONS[name]), name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"pqmim_kernels.{name}")
    raise AttributeError(f"module 'pqmim_kernels' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

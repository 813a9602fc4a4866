"""Loads the compiled coder and refuses a missing or stale build with a rebuild hint."""

from __future__ import annotations

import importlib
from types import ModuleType

# The ABI this Python code was written for; must equal pqmim::rans::kAbiVersion (rans.hpp).
EXPECTED_ABI_VERSION = 1

_REBUILD = (
    "rebuild it from the repository root with `pip install -e .` "
    "(needs a C++17 compiler and CMake >= 3.18)"
)


def load_extension() -> ModuleType:
    """Import ``pqmim_kernels._rans`` or raise ImportError explaining how to rebuild."""
    try:
        ext = importlib.import_module("pqmim_kernels._rans")
    except ImportError as exc:
        raise ImportError(
            f"the compiled rANS coder pqmim_kernels._rans is missing or broken ({exc}); " + _REBUILD
        ) from exc
    found = getattr(ext, "ABI_VERSION", None)
    if found != EXPECTED_ABI_VERSION:
        raise ImportError(
            f"the compiled rANS coder pqmim_kernels._rans is stale (ABI version {found}, "
            f"this Python code needs {EXPECTED_ABI_VERSION}); " + _REBUILD
        )
    return ext

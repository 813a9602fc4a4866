"""Loads the compiled coder and refuses a missing or stale build with a rebuild hint."""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType

# The ABI this Python code was written for; must equal pqmim::rans::kAbiVersion (rans.hpp).
EXPECTED_ABI_VERSION = 3

# The files the extension is built from, relative to the repository root, in the order the
# build fingerprints them (CMakeLists.txt computes the same value at configure time).
FINGERPRINTED_SOURCES = ("csrc/rans.cpp", "csrc/rans.hpp", "python/rans_binding.cpp")

_REBUILD = (
    "rebuild it from the repository root with `pip install --no-build-isolation -e .` "
    "(or plain `pip install -e .`; needs a C++17 compiler and CMake >= 3.18)"
)


def source_fingerprint(root: Path) -> str | None:
    """sha256 of the concatenated sha256 hex digests of :data:`FINGERPRINTED_SOURCES` under
    ``root``, or None when the sources are not there (an installed wheel, not a checkout)."""
    files = [root / name for name in FINGERPRINTED_SOURCES]
    if not all(f.is_file() for f in files):
        return None
    digests = "".join(hashlib.sha256(f.read_bytes()).hexdigest() for f in files)
    return hashlib.sha256(digests.encode()).hexdigest()


def load_extension(root: Path | None = None) -> ModuleType:
    """Import ``pqmim_kernels._rans`` or raise ImportError explaining how to rebuild.

    Refused: an extension that cannot be imported, one built for another ABI version, and,
    in a source checkout (``root``, default: the repository holding this package), one built
    from C++ sources that differ from the checkout's (edited since the last build).
    """
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
    expected = source_fingerprint(root or Path(__file__).resolve().parents[2])
    built = getattr(ext, "SOURCE_FINGERPRINT", None)
    if expected is not None and built != expected:
        raise ImportError(
            "the compiled rANS coder pqmim_kernels._rans is stale: it was built from other "
            f"versions of {', '.join(FINGERPRINTED_SOURCES)} than the ones in this checkout "
            f"(fingerprint {str(built)[:12]!r}, sources {expected[:12]!r}); " + _REBUILD
        )
    return ext

"""Shared helpers of the kernel benchmarks (PQ assignment, masked attention).

Fixtures:

- ``peak_extra_bytes``: ``measure(fn, device) -> int``, the peak memory one call of ``fn`` adds
  on top of what is allocated before it. CUDA: ``torch.cuda.max_memory_allocated`` above the
  current allocation. CPU: growth of the process's peak resident set (``VmHWM``) after freed
  heap pages are returned to the OS (``malloc_trim``) and the peak is reset through
  ``/proc/self/clear_refs``; this counts everything the call touches (library workspaces
  included) but is page-granular and Linux-only (``-1`` elsewhere).
- ``machine_name``: ``name(device) -> str``, the GPU name or ``"<CPU model> (<n> cores)"`` read
  from ``/proc/cpuinfo``, recorded in every result's ``extra_info``.
- ``peer``: ``peer(module, pip_name)`` imports an optional peer or skips the test with a reason
  that says how to install it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib
import os
import platform

import pytest
import torch


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - non-glibc systems
        return None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_peak_extra_bytes(fn, device: str) -> int:
    """Peak bytes one call of ``fn`` (which must synchronise itself) adds; ``-1`` if unknown."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not os.path.exists("/proc/self/clear_refs"):
        return -1
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # freed heap pages would otherwise be reused without raising VmHWM
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return -1
    base = _status_bytes("VmHWM")
    fn()
    return _status_bytes("VmHWM") - base


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - non-Linux
        pass
    return platform.processor() or platform.machine()


def describe_machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


@pytest.fixture
def peak_extra_bytes():
    return measure_peak_extra_bytes


@pytest.fixture
def machine_name():
    return describe_machine


@pytest.fixture
def peer():
    def load(module: str, pip_name: str):
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.skip(f"optional peer {module} not installed ({exc}); pip install {pip_name}")

    return load

"""Launch configs without a GPU: device limits, the prunes of every kernel for each device class
(fake device properties), fallbacks, pinned configs, and the N·M bucket of the pq autotune key.

The ahead-of-time compiles that check these estimates against ptxas live beside each kernel's
tests (``test_masked_attention_compile.py``, ``test_pq_assign.py``).
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted in this process", allow_module_level=True)

from pqmim_kernels.ops import _launch  # noqa: E402
from pqmim_kernels.ops import masked_attention as ma  # noqa: E402
from pqmim_kernels.ops import pq_assign as pa  # noqa: E402

CLASSES = sorted(_launch.DEVICE_CLASSES)
PQ_OPERANDS = {  # name: (z dtype, codebook dtype, fp32_precision) -> (elem, DOT)
    "fp16": (torch.float16, torch.float16, "tf32x3"),
    "bf16": (torch.bfloat16, torch.bfloat16, "tf32x3"),
    "fp32-tf32x3": (torch.float32, torch.float32, "tf32x3"),
    "fp32-ieee": (torch.float32, torch.float32, "ieee"),
    "mixed-tf32x3": (torch.bfloat16, torch.float32, "tf32x3"),
}


def _fake_props(limits: _launch.DeviceLimits, **overrides):
    props = dict(
        name=limits.name,
        major=limits.capability[0],
        minor=limits.capability[1],
        shared_memory_per_block_optin=limits.smem_per_block,
        regs_per_multiprocessor=limits.regs_per_block,
        multi_processor_count=limits.num_sms,
    )
    props.update(overrides)
    return SimpleNamespace(**{k: v for k, v in props.items() if v is not None})


@pytest.fixture
def fresh_limits(monkeypatch):
    monkeypatch.setattr(_launch, "_LIMITS", {})


# ---- device limits ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_device_limits_read_from_torch_properties(monkeypatch, fresh_limits, cls):
    want = _launch.DEVICE_CLASSES[cls]
    calls = []

    def props(index):
        calls.append(index)
        return _fake_props(want)

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    got = _launch.device_limits(torch.device("cuda", 1))
    assert got == want
    assert _launch.device_limits(1) is got and calls == [1]  # queried once per device


def test_device_limits_fall_back_to_triton_driver_then_capability(monkeypatch, fresh_limits):
    a100 = _launch.DEVICE_CLASSES["sm_80"]
    # An old torch without the two fields: Triton's driver answers.
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: _fake_props(
            a100, shared_memory_per_block_optin=None, regs_per_multiprocessor=None
        ),
    )
    utils = SimpleNamespace(
        get_device_properties=lambda i: {
            "max_shared_mem": 166_912,
            "max_num_regs": 65536,
            "multiprocessor_count": 108,
        }
    )
    fake_driver = SimpleNamespace(active=SimpleNamespace(utils=utils))
    monkeypatch.setattr(triton.runtime, "driver", fake_driver)
    assert _launch.device_limits(0).smem_per_block == 166_912
    # No driver either: the known class of that compute capability, else the smallest budget.

    def broken(i):
        raise RuntimeError("no driver")

    monkeypatch.setattr(utils, "get_device_properties", broken)
    monkeypatch.setattr(_launch, "_LIMITS", {})
    assert _launch.device_limits(0).smem_per_block == a100.smem_per_block
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: _fake_props(
            a100, major=7, minor=5, shared_memory_per_block_optin=None, regs_per_multiprocessor=None
        ),
    )
    monkeypatch.setattr(_launch, "_LIMITS", {})
    assert _launch.device_limits(0).smem_per_block == 101_376


def test_fits_checks_shared_memory_and_registers():
    h100 = _launch.DEVICE_CLASSES["sm_90"]
    budget = h100.smem_per_block - _launch.SMEM_RESERVE
    assert _launch.fits(budget, 255, 4, h100)
    assert not _launch.fits(budget + 1, 100, 4, h100)
    assert not _launch.fits(1024, 256, 4, h100)  # over the PTX limit of 255 per thread
    assert not _launch.fits(1024, 129, 16, h100)  # 512 threads share 64 Ki registers


def test_fitting_configs_falls_back_and_refuses_what_cannot_fit():
    tiny = _launch.DeviceLimits("tiny", (8, 0), 16 * 1024)

    def cfg(size):
        return SimpleNamespace(kwargs={"size": size}, num_warps=4, num_stages=1)

    def cost(c):
        return c.kwargs["size"] * 1024, 32

    big, small, smaller = cfg(64), cfg(6), cfg(4)
    assert _launch.fitting_configs([big, small], cost, tiny, [smaller]) == [small]
    assert _launch.fitting_configs([big], cost, tiny, [cfg(32), smaller]) == [smaller]
    # Registers are a soft limit: with none fitting, the smallest fallback whose shared memory
    # fits runs (spilling), never one over the shared memory.
    heavy = SimpleNamespace(kwargs={"size": 2}, num_warps=4, num_stages=1)

    def cost_heavy(c):
        return c.kwargs["size"] * 1024, 300

    assert _launch.fitting_configs([big], cost_heavy, tiny, [small, heavy]) == [heavy]
    with pytest.raises(RuntimeError, match=r"no launch config fits tiny: .* backend='reference'"):
        _launch.fitting_configs([big], cost, tiny, [cfg(32)])
    # pinned: the deepest pipeline that fits, same blocks
    c = _launch.pinned_config(lambda s: cfg(3 * s), cost, tiny, [smaller], stages=(3, 2, 1))
    assert c.kwargs == {"size": 6}


def test_pow2_bucket():
    assert [_launch.pow2_bucket(n) for n in (0, 1, 16, 17, 1000)] == [16, 16, 16, 32, 1024]
    assert _launch.pow2_bucket(5, 4096, 1 << 24) == 4096
    assert _launch.pow2_bucket(1 << 30, 4096, 1 << 24) == 1 << 24


# ---- pq_assign -----------------------------------------------------------------------------------


def _pq_args(operands: str, d: int):
    z_dtype, cb_dtype, precision = PQ_OPERANDS[operands]
    upcast = z_dtype != cb_dtype
    dot = precision if upcast or z_dtype == torch.float32 else "f16"
    block_d = max(16, triton.next_power_of_2(d))
    args = {"z_ptr": torch.empty(0, dtype=z_dtype), "UPCAST": upcast, "DOT": dot}
    return args | {"BLOCK_D": block_d}, pa._operand_bytes(upcast, dot, z_dtype), dot


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("operands", sorted(PQ_OPERANDS))
@pytest.mark.parametrize("d", [1, 12, 32, 64, 128, 256])
def test_pq_prune_keeps_what_fits_each_device(monkeypatch, cls, operands, d):
    limits = _launch.DEVICE_CLASSES[cls]
    monkeypatch.setattr(pa, "device_limits", lambda _: limits)
    args, elem, dot = _pq_args(operands, d)
    configs = pa._configs()
    kept = pa._prune_configs(configs, args)

    def fit(c):
        return _launch.fits(*pa.config_cost(c, args["BLOCK_D"], elem, dot), c.num_warps, limits)

    assert kept and all(fit(c) for c in kept)
    fitting = [c for c in configs if fit(c)]
    assert kept == (fitting or kept[:1])  # every fitting candidate, or one fallback
    if not fitting:
        assert kept[0] in pa._FALLBACKS
    if d <= 32 and elem == 2:
        assert len(kept) >= 4, "small d at 16 bits should leave the autotuner a real choice"


@pytest.mark.parametrize("cls", CLASSES)
def test_pq_last_fallback_fits_every_device_at_d_256(cls):
    limits = _launch.DEVICE_CLASSES[cls]
    last = pa._FALLBACKS[-1]
    for dot, elem in (("tf32x3", 4), ("ieee", 4), ("f16", 2)):
        smem, regs = pa.config_cost(last, 256, elem, dot)
        assert smem + _launch.SMEM_RESERVE <= limits.smem_per_block, (dot, smem)


@pytest.mark.parametrize("block_d", [16, 32, 64, 128, 256])
@pytest.mark.parametrize(("elem", "dot"), [(2, "f16"), (4, "tf32x3"), (4, "ieee")])
def test_pq_pinned_tiling_is_the_same_on_every_device(block_d, elem, dot):
    """Pinned: same blocks and warps on every class (only the pipeline depth may differ), and
    they fit without falling back."""
    seen = set()
    for cls in CLASSES:
        limits = _launch.DEVICE_CLASSES[cls]
        c = pa.pinned_pq_config(block_d, elem, dot, limits)
        bn, bk, warps = pa._PINNED[elem][block_d]
        assert (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps) == (bn, bk, warps), cls
        smem, _ = pa.config_cost(c, block_d, elem, dot)
        assert smem + _launch.SMEM_RESERVE <= limits.smem_per_block
        seen.add((bn, bk, warps))
    assert len(seen) == 1


def _stub_autotuner(monkeypatch, tuned, launched):
    monkeypatch.setattr(tuned, "cache", {})
    monkeypatch.setattr(tuned, "_bench", lambda *a, config, **k: [float(config.num_stages)])
    monkeypatch.setattr(tuned.fn, "run", lambda *a, **k: launched.append(k))


def test_pq_launcher_autotunes_per_nm_bucket_and_pins_on_request(monkeypatch):
    """The GPU launcher through the real Triton autotuner (benchmark and launch stubbed out):
    one tuning per power-of-two bucket of N·M, and ``pinned=True`` bypasses the autotuner."""
    limits = _launch.DEVICE_CLASSES["sm_80"]
    monkeypatch.setattr(pa, "device_limits", lambda _: limits)
    monkeypatch.setattr(pa, "interpreting", lambda: False)
    tuned = pa._pq_assign_tuned
    launched = []  # tuned.fn is the kernel itself: autotuned and pinned launches both land here
    _stub_autotuner(monkeypatch, tuned, launched)
    cb = torch.randn(2, 7, 12)
    for n in (5, 1000, 5000, 9000):  # N·M = 10, 2000, 10000, 18000
        pa.pq_assign_triton(torch.randn(n, 24), cb)
    assert sorted(key[0] for key in tuned.cache) == [4096, 16384, 32768]
    assert len(launched) == 4
    pa.pq_assign_triton(torch.randn(100, 24), cb, pinned=True, fp32_precision="ieee")
    assert len(tuned.cache) == 3 and len(launched) == 5  # no tuning for the pinned launch
    run = launched[-1]
    c = pa.pinned_pq_config(16, 4, "ieee", limits)
    assert run["DOT"] == "ieee" and run["BLOCK_N"] == c.kwargs["BLOCK_N"]
    assert run["num_warps"] == c.num_warps and run["num_stages"] == c.num_stages


# ---- masked attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dh", [16, 64, 128, 256])
@pytest.mark.parametrize(("mode", "key_mask"), [(0, False), (2, True)])
def test_attention_prune_keeps_what_fits_each_device(
    monkeypatch, cls, kernel, dtype, dh, mode, key_mask
):
    limits = _launch.DEVICE_CLASSES[cls]
    monkeypatch.setattr(ma, "device_limits", lambda _: limits)
    tuned = {"fwd": ma._fwd_tuned, "dq": ma._bwd_dq_tuned, "dkdv": ma._bwd_dkdv_tuned}[kernel]
    d_pad = max(16, triton.next_power_of_2(dh))
    named = {"Q": torch.empty(0, dtype=dtype)}
    kept = tuned.early_config_prune(
        tuned.configs, named, D_PAD=d_pad, MASK_MODE=mode, HAS_KEY_MASK=key_mask
    )

    def cost(c):
        wgmma = limits.capability >= (9, 0)
        return ma.config_cost(kernel, c, d_pad, dtype.itemsize, mode, key_mask, wgmma)

    def fit(c):
        return _launch.fits(*cost(c), c.num_warps, limits)

    assert kept and all(cost(c)[0] + _launch.SMEM_RESERVE <= limits.smem_per_block for c in kept)
    fitting = [c for c in tuned.configs if fit(c)]
    assert kept == (fitting or kept[:1])
    if not fitting:
        assert kept[0] in ma._FALLBACKS
    if dh <= 64 and dtype == torch.float16 and mode == 0:
        assert len(kept) >= 2, "a real choice at the tuned head dims"


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_attention_last_fallback_fits_every_device_at_head_dim_256(cls, kernel):
    limits = _launch.DEVICE_CLASSES[cls]
    for elem in (2, 4):
        for mode in (0, 1, 2):
            smem, _ = ma.config_cost(kernel, ma._FALLBACKS[-1], 256, elem, mode, True)
            assert smem + _launch.SMEM_RESERVE <= limits.smem_per_block, (elem, mode, smem)


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
@pytest.mark.parametrize("dh", [16, 64, 128, 256])
@pytest.mark.parametrize("elem", [2, 4])
def test_attention_pinned_config_is_the_same_on_every_device(kernel, dh, elem):
    d_pad = max(16, triton.next_power_of_2(dh))
    blocks = set()
    for cls in CLASSES:
        limits = _launch.DEVICE_CLASSES[cls]
        wgmma = limits.capability >= (9, 0)
        c = ma.pinned_attention_config(kernel, d_pad, elem, limits)
        smem, regs = ma.config_cost(kernel, c, d_pad, elem, wgmma=wgmma)
        assert smem + _launch.SMEM_RESERVE <= limits.smem_per_block, (cls, c)
        # Registers: the pinned blocks fit wherever some autotune candidate does.
        candidates = [ma._config(*x) for x in ma._CANDIDATES[kernel]]
        if any(
            _launch.fits(*ma.config_cost(kernel, x, d_pad, elem, wgmma=wgmma), x.num_warps, limits)
            for x in candidates
        ):
            assert _launch.fits(smem, regs, c.num_warps, limits), (cls, c, regs)
        blocks.add((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps))
    assert len(blocks) == 1, blocks


def test_attention_launch_params(monkeypatch):
    limits = _launch.DEVICE_CLASSES["sm_86"]
    monkeypatch.setattr(ma, "device_limits", lambda _: limits)
    q = torch.empty(0, dtype=torch.float32)
    assert ma._launch_params(q, "fwd", 256, False) == ({"INTERPRETER": False}, True)
    fixed, tuned = ma._launch_params(q, "fwd", 256, True)
    c = ma.pinned_attention_config("fwd", 256, 4, limits)
    assert not tuned and fixed == {
        **c.kwargs,
        "num_warps": c.num_warps,
        "num_stages": c.num_stages,
        "INTERPRETER": False,
    }
    monkeypatch.setattr(ma, "interpreting", lambda: True)
    fixed, tuned = ma._launch_params(q, "dq", 64, True)
    assert not tuned and fixed["INTERPRETER"] and fixed["BLOCK_M"] == 16

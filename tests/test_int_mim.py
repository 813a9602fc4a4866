"""The integer entropy model (pqmim_kernels/reference/int_mim.py) and its C++ engine.

What makes files decode on every machine: exact tables and primitives, matrix products whose
partial sums provably stay below 2^24, the C++ engine equal to the torch spec integer for
integer (any thread count), and an integer model that costs at most ~1 % more bits than the
float (QAT) model it was exported from.
"""

import math

import numpy as np
import pytest
import torch

from pqmim_kernels import functional as F_pq
from pqmim_kernels.coding import int_kernels
from pqmim_kernels.models import PQMIM, PQMIMConfig
from pqmim_kernels.models.mim import MIMEntropyModel, mim_bits, stage_grid
from pqmim_kernels.reference import int_mim as im

needs_cpp = pytest.mark.skipif(not int_kernels.available(), reason=int_kernels.why())


# ---- exact primitives ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [im.ATT_EXP_BITS, im.PROB_EXP_BITS])
def test_exp2_table_is_the_exact_floor(bits):
    t = im.exp2_table(bits).tolist()
    assert t[0] == 1 << bits and len(t) == 256
    assert all(a > b for a, b in zip(t, t[1:]))
    for j in (1, 37, 128, 255):
        v, target = t[j], 1 << (256 * bits - j)
        assert v**256 <= target < (v + 1) ** 256


def test_isqrt_is_exact():
    g = torch.Generator().manual_seed(0)
    n = torch.cat(
        [
            torch.arange(0, 2000),
            torch.randint(0, 1 << 52, (20000,), generator=g),
            torch.tensor([(1 << 26) ** 2 - 1, (1 << 52) - 1]),
            (torch.arange(1, 5000) * 7919) ** 2 + torch.tensor([-1, 0, 1]).repeat(1667)[:4999],
        ]
    )
    r = im.isqrt(n)
    assert bool(((r * r <= n) & ((r + 1) * (r + 1) > n)).all())


def test_round_shift_is_round_half_up():
    v = torch.arange(-40, 41)
    for s in range(4):
        want = torch.floor(v.double() / 2**s + 0.5).long()
        assert torch.equal(im.round_shift(v, s), want)
        assert torch.equal(im.round_shift(v, torch.full_like(v, s)), want)


def test_int_matmul_is_exact_at_the_worst_case():
    """1024 * 127^2 < 2^24: float32 holds every partial sum, whatever the summation order."""
    a = torch.full((3, im.MAX_INNER), 127, dtype=torch.int64)
    a[1] = -127
    w = torch.full((5, im.MAX_INNER), 127, dtype=torch.int64)
    w[2, ::2] = -127
    assert torch.equal(im.int_matmul(a, w), a @ w.T)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-127, 128, (64, 700), generator=g)
    w = torch.randint(-127, 128, (33, 700), generator=g)
    assert torch.equal(im.int_matmul(a, w), a @ w.T)
    with pytest.raises(ValueError, match="inner dimension 1025 > MAX_INNER"):
        im.int_matmul(torch.zeros(1, 1025, dtype=torch.int64), torch.zeros(1, 1025))


def test_rms_norm_int_matches_its_definition():
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-im.RES_LIMIT, im.RES_LIMIT + 1, (50, 128), generator=g)
    x[0] = 0
    x[1] = 3
    for e in (0, 3, 7):
        y = im.rms_norm_int(x, e)
        xs = [[int(v) for v in row] for row in x]
        for row, got in zip(xs, y.tolist()):
            r = max(1, math.isqrt(sum(v * v for v in row) // 128))
            want = [min(127, max(-127, (v * 2 ** (e + 1) + r) // (2 * r))) for v in row]
            assert got == want


def test_logits_to_cdfs_properties():
    g = torch.Generator().manual_seed(3)
    for k in (1, 2, 300):
        logits = torch.randint(-(1 << 22), 1 << 22, (40, k), generator=g)
        logits[0] = 5  # all equal: uniform, remainder to index 0
        cdf = im.logits_to_cdfs(logits).long()
        f = cdf[:, 1:] - cdf[:, :-1]
        assert bool((cdf[:, 0] == 0).all()) and bool((cdf[:, -1] == 1 << 24).all())
        assert bool((f >= 1).all())
        # a strictly larger logit never gets a smaller frequency (the table is monotone)
        order = logits.argsort(dim=1)
        rising = logits.gather(1, order).diff(dim=1) > 0
        assert bool((f.gather(1, order).diff(dim=1)[rising] >= 0).all())


# ---- the C++ engine equals the spec ------------------------------------------------------------


def _random_attention_case(g, nq, heads, dh, h, w, radius, stages=5):
    n = h * w
    q = torch.randint(-127, 128, (nq, heads, dh), generator=g)
    pos = torch.randint(0, n, (nq,), generator=g)
    limit = torch.randint(0, stages + 1, (nq,), generator=g)
    k = torch.randint(-127, 128, (n, heads, dh), generator=g).to(torch.int8)
    v = torch.randint(-127, 128, (n, heads, dh), generator=g).to(torch.int8)
    key_stage = torch.randint(0, stages, (n,), generator=g)
    side = 2 * radius + 1
    bias = torch.randint(-(1 << 20), 1 << 20, (heads, side, side), generator=g)
    mult = int(torch.randint(1, 1 << 11, (1,), generator=g))
    shift = int(torch.randint(0, 12, (1,), generator=g))
    return (q, pos, limit, k, v, key_stage, (h, w), radius, mult, shift, bias)


@needs_cpp
@pytest.mark.parametrize(
    "nq,heads,dh,h,w,radius", [(1, 1, 1, 1, 1, 0), (37, 2, 12, 7, 9, 2), (200, 4, 32, 13, 11, 7)]
)
def test_cpp_window_attention_equals_spec(nq, heads, dh, h, w, radius):
    g = torch.Generator().manual_seed(nq)
    args = _random_attention_case(g, nq, heads, dh, h, w, radius)
    want = im.window_attention_int(*args, chunk=16)
    assert torch.equal(im.window_attention_int(*args), want)  # chunking changes nothing
    got = F_pq.int_window_attention(*args, backend="cpp")
    assert torch.equal(got, want)
    # a query whose limit hides every key gets zeros
    args[2][:] = 0
    assert not bool(F_pq.int_window_attention(*args, backend="cpp").any())


@needs_cpp
def test_cpp_logits_to_cdfs_equals_spec():
    g = torch.Generator().manual_seed(4)
    for k in (1, 2, 17, 256, 1024):
        logits = torch.randint(-(1 << 30), 1 << 30, (64, k), generator=g)
        logits[1] = logits[1] // (1 << 10)
        logits[2] = 7
        want = im.logits_to_cdfs(logits).numpy()
        assert np.array_equal(int_kernels.logits_to_cdfs(logits.int()), want)


def _calibrated_model(cfg: PQMIMConfig, seed=0) -> PQMIM:
    torch.manual_seed(seed)
    model = PQMIM(cfg).eval()
    codes = torch.randint(0, cfg.codebook_size, (3, 10, 12, cfg.num_subspaces))
    model.entropy_model.calibrate([(codes, stage_grid(10, 12, cfg.stages))])
    model.entropy_model.set_qat(True)
    model.export_entropy_model()
    return model


SMALL = PQMIMConfig(
    channels=(8, 8, 8, 8),
    latent_dim=12,
    num_subspaces=3,
    codebook_size=20,
    mim_width=24,
    mim_depth=2,
    mim_heads=2,
    mim_radius=3,
    mim_head_depth=2,
    stages=5,
)


@needs_cpp
@pytest.mark.parametrize("threads", [1, 3])
def test_cpp_session_equals_spec_through_a_whole_image(threads):
    model = _calibrated_model(SMALL)
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(5)
        codes = torch.randint(0, 20, (9, 13, 3), generator=g)
        outs = {}
        for backend in ("reference", "cpp"):
            model.int_backend = backend
            outs[backend] = model.compress_codes(codes, (9 * 16, 13 * 16 - 7))
        assert outs["reference"] == outs["cpp"]
        model.int_backend = "cpp"
        got, _ = model.decompress_codes(outs["cpp"])
        assert torch.equal(got[0], codes)
    finally:
        torch.set_num_threads(2)


@needs_cpp
def test_cpp_session_streams_equal_spec_row_for_row():
    from pqmim_kernels.coding.int_kernels import CppSession

    model = _calibrated_model(SMALL, seed=1)
    imod = model.int_entropy_model
    h, w = 8, 6
    stage = stage_grid(h, w, 5)
    ref, cpp = im.IntSession(imod, (h, w), stage), CppSession(imod, (h, w), stage)
    g = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 20, (h * w, 3), generator=g)
    for s in range(5):
        pos = (stage == s).nonzero()[:, 0]
        st = stage[pos]
        xr, xc = ref.query(pos, st), cpp.query(pos, st)
        assert torch.equal(xr, xc.long())
        for m in range(3):
            want = ref.head_logits(xr, codes[pos], m)
            assert torch.equal(want, cpp.head_logits(xc, codes[pos], m).long())
        ref.known(codes[pos], pos, st)
        cpp.known(codes[pos], pos, st)


# ---- quantisation-aware training and export --------------------------------------------------


def test_integer_model_rate_is_within_one_percent_of_the_qat_float_model():
    model = _calibrated_model(SMALL, seed=2)
    g = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 20, (12, 10, 3), generator=g)
    with torch.no_grad():
        float_bits = float(mim_bits(model.entropy_model, codes[None], 5)[0])
    int_bits = model.code_bits(codes)
    assert abs(int_bits / float_bits - 1) < 0.01


def test_qat_changes_the_float_model_only_slightly():
    torch.manual_seed(0)
    em = MIMEntropyModel(3, 20, width=24, depth=2, heads=2, radius=3)
    codes = torch.randint(0, 20, (2, 7, 9, 3))
    st = stage_grid(7, 9, 5)
    with torch.no_grad():
        ref = em(codes, st)
        em.calibrate([(codes, st)])
        em.set_qat(True)
        fq = em(codes, st)
    assert (fq - ref).abs().max() < 0.05 * ref.abs().max()
    em.set_qat(False)
    with torch.no_grad():
        assert torch.equal(em(codes, st), ref)


def test_qat_needs_calibration_and_export_needs_scales():
    em = MIMEntropyModel(2, 8, width=16, depth=1, heads=2, radius=1)
    with pytest.raises(RuntimeError, match="calibrate"):
        em.set_qat(True)
    with pytest.raises(RuntimeError, match="calibrate"):
        em.export_int()


def test_export_is_deterministic_and_validated():
    model = _calibrated_model(SMALL, seed=3)
    t1, meta = model.entropy_model.export_int()
    t2, _ = model.entropy_model.export_int()
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)
    bad = dict(t1)
    bad["blocks.0.qkv.shift"] = bad["blocks.0.qkv.shift"].clone()
    bad["blocks.0.qkv.shift"][0] = 63
    with pytest.raises(ValueError, match=r"blocks.0.qkv.shift out of range \[1, 62\]"):
        im.IntMIM(bad, meta)
    bad = dict(t1)
    bad["blocks.1.act"] = torch.zeros(254, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"blocks.1.act must be int64 \(255,\)"):
        im.IntMIM(bad, meta)
    with pytest.raises(ValueError, match="does not match the model config"):
        model.set_int_entropy_model(t1, {**meta, "radius": 2})


def test_coding_without_an_integer_model_is_refused():
    model = PQMIM(SMALL).eval()
    with pytest.raises(RuntimeError, match="no integer entropy model"):
        model.compress_codes(torch.zeros(2, 2, 3, dtype=torch.int64), (32, 32))


def test_config_bounds_that_keep_the_gemms_exact():
    with pytest.raises(ValueError, match="MLP width 1040 > 1024"):
        MIMEntropyModel(2, 8, width=16, depth=1, heads=2, mlp_ratio=65.0)
    with pytest.raises(ValueError, match=r"radius must be in \[0, 8\]"):
        MIMEntropyModel(2, 8, width=16, depth=1, heads=2, radius=9)

"""MaskGIT-style filling of unsent stages (pqmim_kernels/models/sampling.py, issue 13)."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from _tiny import TINY, make_coding_ready

from pqmim_kernels.coding import int_kernels
from pqmim_kernels.models import PQMIM
from pqmim_kernels.models.sampling import ilog2_256, sample_cdfs
from pqmim_kernels.models.schedule import coding_order, stage_bounds

CFG = dataclasses.replace(TINY, mim_radius=2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_coding_ready(PQMIM(CFG).eval())


def _image(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g)


def test_ilog2_256_is_a_monotone_integer_log():
    f = np.array([1, 2, 3, 4, 5, 255, 256, 257, 1000, 65535, 1 << 24, (1 << 40) + 7])
    got = ilog2_256(f)
    want = np.array([256 * math.log2(v) for v in f])
    assert np.all(np.abs(got - want) <= 1.5)
    dense = ilog2_256(np.arange(1, 70000))
    assert np.all(np.diff(dense) >= 0)


def test_sample_cdfs_inverts_the_cdf():
    cdfs = np.array([[0, 1, 5, 16], [0, 10, 11, 16]], dtype=np.int32)
    cases = ((0, [0, 0]), (1, [1, 0]), (5, [2, 0]), (10, [2, 1]), (11, [2, 2]), (15, [2, 2]))
    for u, want in cases:
        sym, freq = sample_cdfs(cdfs, np.array([u, u]))
        assert sym.tolist() == want
        assert freq.tolist() == [cdfs[i, s + 1] - cdfs[i, s] for i, s in enumerate(want)]


def test_sampled_fill_is_deterministic_seeded_and_keeps_the_sent_codes(model):
    x = _image(100, 130, seed=1)
    data = model.compress(x, stages=2)
    full, _ = model.decompress_codes(model.compress(x))
    a, _ = model.decompress_codes(data, fill="sample", seed=3)
    assert torch.equal(a, model.decompress_codes(data, fill="sample", seed=3)[0])
    assert not torch.equal(a, model.decompress_codes(data, fill="sample", seed=4)[0])
    greedy, _ = model.decompress_codes(data)
    assert not torch.equal(a, greedy)
    h, w = a.shape[1:3]
    sent = torch.from_numpy(coding_order(h, w)[: stage_bounds(h * w, CFG.stages)[2]].copy())
    assert torch.equal(a.view(-1, 2)[sent], full.view(-1, 2)[sent])
    assert int(a.min()) >= 0 and int(a.max()) < CFG.codebook_size
    img = model.decompress(data, fill="sample", seed=3, iterations=3, temperature=0.7)
    assert img.shape == (1, 3, 100, 130)


@pytest.mark.skipif(not int_kernels.available(), reason=int_kernels.why())
def test_sampled_fill_is_the_same_in_the_cpp_engine_and_the_spec(model):
    data = model.compress(_image(64, 80, seed=2), stages=1)
    got = {}
    for backend in ("cpp", "reference"):
        model.int_backend = backend
        try:
            got[backend] = model.decompress_codes(data, fill="sample", seed=5, iterations=4)[0]
        finally:
            model.int_backend = "auto"
    assert torch.equal(got["cpp"], got["reference"])


def test_a_complete_file_ignores_the_fill(model):
    data = model.compress(_image(48, 64, seed=4))
    a = model.decompress_codes(data)[0]
    assert torch.equal(a, model.decompress_codes(data, fill="sample", seed=9)[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"fill": "maskgit"}, r"fill must be one of \('greedy', 'sample'\)"),
        ({"fill": "sample", "iterations": 0}, "iterations must be a positive int, got 0"),
        ({"fill": "sample", "seed": -1}, "seed must be a non-negative int, got -1"),
        ({"fill": "sample", "temperature": 0.0}, r"temperature must be a number in \[0.05, 20\]"),
    ],
)
def test_bad_fill_options(model, kwargs, match):
    data = model.compress(_image(32, 32), stages=1)
    with pytest.raises(ValueError, match=match):
        model.decompress_codes(data, **kwargs)

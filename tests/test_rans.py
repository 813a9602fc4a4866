"""rANS coder (pqmim_kernels.coding): round trips, byte identity with the pure-Python
reference, quantiser spec, overhead vs. ideal, error messages and corrupted streams."""

from __future__ import annotations

import contextlib
import importlib
import re
import sys
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pqmim_kernels import coding
from pqmim_kernels.coding import (
    RansDecoder,
    RansEncoder,
    decode_probs,
    encode_probs,
    quantize_probs,
)
from pqmim_kernels.reference import rans as ref

# ----------------------------------------------------------------------------- helpers


def make_probs(rng: np.random.Generator, n: int, k: int, kind: str) -> np.ndarray:
    """(n, k) float32 rows of a named shape (not necessarily normalised)."""
    if kind == "uniform":
        return np.full((n, k), 1.0 / k, np.float32)
    if kind == "onehot":
        p = np.zeros((n, k), np.float32)
        p[np.arange(n), rng.integers(0, k, n)] = 1.0
        return p
    if kind == "nearzero":  # tiny magnitudes down to the subnormal range
        return (rng.random((n, k)) * 1e-38).astype(np.float32)
    if kind == "skewed":  # softmax of large logits: one or two symbols hold nearly all mass
        lg = rng.normal(size=(n, k)) * 12.0
        return softmax(lg)
    if kind == "softmax":
        return softmax(rng.normal(size=(n, k)) * 2.0)
    if kind == "peaked":
        lg = rng.normal(size=(n, k)) * 8.0
        lg[:, 0] += 10.0
        return softmax(lg)
    raise AssertionError(kind)


def softmax(lg: np.ndarray) -> np.ndarray:
    e = np.exp(lg - lg.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def sample(rng: np.random.Generator, p: np.ndarray) -> np.ndarray:
    """One symbol per row drawn from p (rows renormalised in float64)."""
    if p.shape[0] == 0:
        return np.zeros(0, np.int64)
    q = p.astype(np.float64)
    c = np.cumsum(q / q.sum(axis=1, keepdims=True), axis=1)
    return np.minimum((rng.random(len(p))[:, None] > c).sum(axis=1), p.shape[1] - 1)


KINDS = ["uniform", "onehot", "nearzero", "skewed", "softmax", "peaked"]

# ----------------------------------------------------------------------------- quantiser


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 2, 3, 256, 1000])
def test_quantize_matches_reference_and_is_a_cdf(kind, k):
    rng = np.random.default_rng(k)
    p = make_probs(rng, 64, k, kind)
    for precision in (k.bit_length() if k > 1 else 1, 12, 16, 24):
        if k > 1 << precision:
            continue
        c = quantize_probs(p, precision)
        assert c.dtype == np.int32 and c.shape == (64, k + 1)
        np.testing.assert_array_equal(c, ref.quantize_probs(p, precision))
        assert (c[:, 0] == 0).all() and (c[:, -1] == 1 << precision).all()
        assert (np.diff(c, axis=1) >= 1).all()


def test_quantize_edge_values_match_reference():
    # Subnormal maxima (scale 2^(24-e) beyond float range), huge values, exact zeros, -0.0,
    # and rows where K^2 > 2^P so the reserve fallback and the excess removal run.
    tiny = np.float32(1e-45)
    rows = [
        [tiny, 0, tiny * 3, 0],
        [3e38, 1e38, 0, 1],
        [-0.0, 1, 0, 0],
        [1, 1, 1, 1],
    ]
    p = np.asarray(rows, np.float32)
    np.testing.assert_array_equal(quantize_probs(p, 8), ref.quantize_probs(p, 8))
    rng = np.random.default_rng(1)
    for k, precision in [(65536, 16), (65536, 17), (4000, 12), (300, 9), (4096, 12)]:
        p = make_probs(rng, 3, k, "skewed")
        p[1] = make_probs(rng, 1, k, "softmax")[0]
        c = quantize_probs(p, precision)
        np.testing.assert_array_equal(c, ref.quantize_probs(p, precision))
        assert (np.diff(c, axis=1) >= 1).all() and (c[:, -1] == 1 << precision).all()


def test_quantize_dtypes_torch_and_threads():
    rng = np.random.default_rng(2)
    p = make_probs(rng, 300, 77, "softmax")
    c = quantize_probs(p)
    np.testing.assert_array_equal(
        quantize_probs(p.astype(np.float16)),
        quantize_probs(p.astype(np.float16).astype(np.float32)),
    )
    np.testing.assert_array_equal(quantize_probs(torch.from_numpy(p)), c)
    np.testing.assert_array_equal(
        quantize_probs(torch.from_numpy(p).half()), quantize_probs(p.astype(np.float16))
    )
    np.testing.assert_array_equal(quantize_probs(p, num_threads=2), c)
    bf = torch.from_numpy(p).bfloat16()
    np.testing.assert_array_equal(quantize_probs(bf), quantize_probs(bf.float().numpy()))
    # Not normalised: scaling a row by a power of two changes nothing.
    np.testing.assert_array_equal(quantize_probs(p * 64), c)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 600),
    n=st.integers(0, 20),
    precision=st.integers(10, 24),
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(KINDS),
)
def test_quantize_property(k, n, precision, seed, kind):
    if k > 1 << precision:
        precision = k.bit_length()
    p = make_probs(np.random.default_rng(seed), n, k, kind)
    np.testing.assert_array_equal(quantize_probs(p, precision), ref.quantize_probs(p, precision))


# ----------------------------------------------------------------------------- round trips


def roundtrip_all_forms(rng, symbols, probs, precision=None, lanes=None):
    """Codes the same symbols in all three forms; checks decode and that the bytes agree."""
    n, k = probs.shape
    cdfs = quantize_probs(probs, precision)
    data = encode_probs(symbols, probs, precision)
    np.testing.assert_array_equal(decode_probs(data, probs, precision), symbols)

    enc = RansEncoder(precision, lanes=lanes)
    enc.encode_cdfs(symbols, cdfs)
    data_c = enc.finish()
    dec = RansDecoder(data_c, precision)
    np.testing.assert_array_equal(dec.decode_cdfs(cdfs), symbols)
    dec.finish()
    if lanes is None:
        assert data_c == data

    # indexed form: the distinct rows form the table
    table, indexes = np.unique(cdfs, axis=0, return_inverse=True) if n else (cdfs[:1], cdfs[:0, 0])
    if n == 0:
        table = quantize_probs(np.ones((1, k), np.float32), precision)
    enc = RansEncoder(precision, lanes=lanes)
    enc.encode_indexed(symbols, indexes.reshape(-1), table)
    data_i = enc.finish()
    assert data_i == data_c
    dec = RansDecoder(data_i, precision)
    np.testing.assert_array_equal(dec.decode_indexed(indexes.reshape(-1), table), symbols)
    dec.finish()
    return data


def _chunks(n: int, cuts: list[float]) -> list[tuple[int, int]]:
    """Splits [0, n) at the given fractions; empty chunks are kept (an empty call is legal)."""
    b = sorted([0, n, *(int(c * n) for c in cuts)])
    return list(zip(b[:-1], b[1:]))


def _encode_chunk(enc, form: int, s, p, cdfs) -> None:
    if form == 0:
        enc.encode_probs(s, p)
    elif form == 1:
        enc.encode_cdfs(s, cdfs)
    else:  # indexed: the chunk's rows as a table, addressed in reverse order
        enc.encode_indexed(s, np.arange(len(s))[::-1].copy(), cdfs[::-1].copy())


def _decode_chunk(dec, form: int, p, cdfs) -> np.ndarray:
    if form == 0:
        return dec.decode_probs(p)
    if form == 1:
        return dec.decode_cdfs(cdfs)
    return dec.decode_indexed(np.arange(len(p))[::-1].copy(), cdfs[::-1].copy())


def multi_call_roundtrip(symbols, probs, precision, enc_cuts, dec_cuts, forms):
    """Encodes in several calls of mixed forms, decodes with a different split and forms,
    and checks the stream equals the one-call stream (the split is invisible in the bytes)."""
    n = len(symbols)
    cdfs = quantize_probs(probs, precision)
    enc = RansEncoder(precision)
    for i, (lo, hi) in enumerate(_chunks(n, enc_cuts)):
        _encode_chunk(enc, forms[i % len(forms)], symbols[lo:hi], probs[lo:hi], cdfs[lo:hi])
    assert enc.pending == n
    data = enc.finish()
    assert data == encode_probs(symbols, probs, precision)
    dec = RansDecoder(data, precision)
    out = [
        _decode_chunk(dec, forms[(i + 1) % len(forms)], probs[lo:hi], cdfs[lo:hi])
        for i, (lo, hi) in enumerate(_chunks(n, dec_cuts))
    ]
    dec.finish()
    np.testing.assert_array_equal(np.concatenate(out), symbols)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    logk=st.floats(1.0, 16.0),
    logn=st.floats(0.0, np.log10(100_001)),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32 - 1),
    precision=st.sampled_from([None, 16, 20, 24]),
    enc_cuts=st.lists(st.floats(0.0, 1.0), max_size=8),
    dec_cuts=st.lists(st.floats(0.0, 1.0), max_size=8),
    forms=st.lists(st.integers(0, 2), min_size=1, max_size=6),
)
def test_roundtrip_property(logk, logn, kind, seed, precision, enc_cuts, dec_cuts, forms):
    # K from 2 to 65,536 and N from 0 to 100,000, with N * K capped so the float input stays
    # under ~4M values (the large-N cases use small K and vice versa). Each example codes the
    # symbols in all three forms in one call each, then in many calls of mixed forms.
    k = max(2, min(65536, round(2**logk)))
    n = round(10**logn) - 1
    n = min(n, max(1, 4_000_000 // k))
    if precision is not None and k > 1 << precision:
        precision = 24
    rng = np.random.default_rng(seed)
    p = make_probs(rng, n, k, kind)
    s = sample(rng, p)
    if kind == "onehot" and n:  # also code symbols whose probability is exactly 0
        s[::3] = rng.integers(0, k, len(s[::3]))
    roundtrip_all_forms(rng, s, p, precision)
    multi_call_roundtrip(s, p, precision, enc_cuts, dec_cuts, forms)


@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [0, 1, 5, 9, 33])
def test_lanes_and_ragged_counts(lanes, n):
    rng = np.random.default_rng(n * 10 + lanes)
    p = make_probs(rng, n, 13, "softmax")
    s = sample(rng, p)
    roundtrip_all_forms(rng, s, p, lanes=lanes)


def test_many_calls_one_stream_fifo_order():
    # A multi-stage model: stages of different sizes, forms and K, decoded stage by stage in
    # the order they were encoded (the coder reverses internally).
    rng = np.random.default_rng(3)
    stages = []
    enc = RansEncoder()
    for i in range(40):
        n, k = int(rng.integers(0, 50)), int(rng.integers(2, 300))
        p = make_probs(rng, n, k, KINDS[i % len(KINDS)])
        s = sample(rng, p)
        form = i % 3
        if form == 0:
            enc.encode_probs(s, p)
        elif form == 1:
            enc.encode_cdfs(s, quantize_probs(p))
        else:
            enc.encode_indexed(
                s, np.arange(n), quantize_probs(p) if n else np.array([[0, 1 << 24]])
            )
        stages.append((form, s, p))
    assert enc.pending == sum(len(s) for _, s, _ in stages)
    data = enc.finish()
    assert enc.pending == 0
    dec = RansDecoder(data)
    for form, s, p in stages:
        if form == 0:
            out = dec.decode_probs(p)
        elif form == 1:
            out = dec.decode_cdfs(quantize_probs(p))
        else:
            out = dec.decode_indexed(
                np.arange(len(s)), quantize_probs(p) if len(s) else np.array([[0, 1 << 24]])
            )
        np.testing.assert_array_equal(out, s)
    dec.finish()
    assert dec.decoded == len(np.concatenate([s for _, s, _ in stages]))


def test_split_differently_when_decoding():
    # Batches may be re-split on decode as long as the order and distributions match.
    rng = np.random.default_rng(4)
    p = make_probs(rng, 1000, 50, "softmax")
    s = sample(rng, p)
    enc = RansEncoder()
    for lo in range(0, 1000, 100):
        enc.encode_probs(s[lo : lo + 100], p[lo : lo + 100])
    dec = RansDecoder(enc.finish())
    out = np.concatenate([dec.decode_probs(p[lo:hi]) for lo, hi in [(0, 7), (7, 640), (640, 1000)]])
    np.testing.assert_array_equal(out, s)
    dec.finish()


def test_large_stream_interleaved_threads_and_torch():
    rng = np.random.default_rng(5)
    n, k = 100_000, 64
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    data = encode_probs(torch.from_numpy(s), torch.from_numpy(p), num_threads=2)
    assert data[0] & 3 == 2  # 4 interleaved lanes from 65,536 symbols on
    assert data == encode_probs(s, p)
    np.testing.assert_array_equal(decode_probs(data, torch.from_numpy(p), num_threads=2), s)
    np.testing.assert_array_equal(decode_probs(data, p.astype(np.float64)), s)


@pytest.mark.parametrize("threads", [2, 3, 8])
def test_threaded_decode_matches_serial(threads):
    """The threaded float decoder (helpers quantise row blocks ahead of the decoding thread)
    returns the same symbols as the serial one, over many blocks, split calls included."""
    rng = np.random.default_rng(50 + threads)
    n, k = 9_000, 300  # 54 rows per block: 167 blocks, more than the ring holds
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    data = encode_probs(s, p)
    np.testing.assert_array_equal(decode_probs(data, p, num_threads=threads), s)
    dec = RansDecoder(data, num_threads=threads)
    out = [dec.decode_probs(p[lo:hi]) for lo, hi in [(0, 1), (1, 4_000), (4_000, n)]]
    np.testing.assert_array_equal(np.concatenate(out), s)
    dec.finish()


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_threaded_decode_errors(threads):
    """A bad row far into the stream is reported by its own index whichever thread quantised
    it, and running out of bytes while helpers are busy raises instead of hanging."""
    rng = np.random.default_rng(60)
    n, k = 6_000, 100
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    data = encode_probs(s, p)
    bad = p.copy()
    bad[4_321, 7] = np.nan
    bad[5_000, 7] = -1.0
    with pytest.raises(ValueError, match="probs row 4321 contains NaN, infinite or negative"):
        RansDecoder(data, num_threads=threads).decode_probs(bad)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        RansDecoder(data[: len(data) // 2], num_threads=threads).decode_probs(p)


def test_float16_probs_roundtrip():
    rng = np.random.default_rng(6)
    p = make_probs(rng, 500, 300, "softmax").astype(np.float16)
    s = sample(rng, p.astype(np.float32))
    data = encode_probs(s, p)
    assert data == encode_probs(s, p.astype(np.float32))
    np.testing.assert_array_equal(decode_probs(data, p), s)


def test_torch_cpu_tensors_are_used_without_copies():
    """Contiguous CPU tensors of the native dtypes reach the extension as views of the
    tensor's memory, and the extension refuses (instead of silently converting) anything
    else, so the whole path is zero-copy; other layouts and dtypes are converted first."""
    from pqmim_kernels.coding import rans as api

    p = torch.rand(50, 30)
    s = torch.randint(0, 30, (50,))
    c = torch.from_numpy(quantize_probs(p))
    assert np.shares_memory(api._probs(p), p.numpy())
    assert np.shares_memory(api._int_vector(s, "symbols"), s.numpy())
    assert np.shares_memory(api._cdfs(c, "cdfs", 24), c.numpy())
    with pytest.raises(TypeError):  # noconvert: float64 is not copied behind our back ...
        api._ext.quantize_probs(p.double().numpy(), 24, 1)
    with pytest.raises(TypeError):  # ... and neither is a non-contiguous view
        api._ext.quantize_probs(p.t().numpy(), 24, 1)
    pt = torch.rand(30, 50).t()  # non-contiguous: converted, same result as a copy
    assert not np.shares_memory(api._probs(pt), pt.numpy())
    assert encode_probs(s.int(), pt) == encode_probs(s.numpy(), pt.contiguous().numpy())


def _runs_without_the_gil(fn, calls: int = 40) -> bool:
    """True if another Python thread gets to run while ``fn`` is executing.

    With a huge switch interval the interpreter never takes the GIL from a running thread, so
    the main thread (waiting in ``Thread.start``) can first run only when the worker releases
    the GIL itself: inside ``fn`` (the flag is set then), or when the worker thread ends (flag
    clear). The worker calls ``fn`` up to ``calls`` times so that the main thread, which the OS
    may schedule late on a busy machine, has many chances to land inside a release."""
    import threading

    flag = {"in_fn": False, "seen": False, "error": None}

    def work():
        try:
            for _ in range(calls):
                flag["in_fn"] = True
                fn()
                flag["in_fn"] = False
                if flag["seen"]:
                    break
        except BaseException as exc:  # re-raised in the calling thread
            flag["in_fn"] = False
            flag["error"] = exc

    old = sys.getswitchinterval()
    sys.setswitchinterval(1000.0)
    try:
        t = threading.Thread(target=work)
        t.start()
        flag["seen"] = flag["in_fn"]
        t.join()
    finally:
        sys.setswitchinterval(old)
    if flag["error"] is not None:
        raise flag["error"]
    return flag["seen"]


def test_coding_releases_the_gil():
    import time

    from pqmim_kernels.coding import rans as api

    # the probe itself: a GIL-holding busy loop is not seen, a sleeping call is
    assert not _runs_without_the_gil(lambda: sum(range(100_000)))
    assert _runs_without_the_gil(lambda: time.sleep(0.01))
    # ... and neither is a C++ call that holds the GIL (the decoder copies its input first)
    valid = b"\x00" + (1 << 31).to_bytes(8, "little") + bytes(4 * 10_000_000)
    assert not _runs_without_the_gil(lambda: api._ext.Decoder(valid, 1, 1), calls=10)

    rng = np.random.default_rng(12)
    p = make_probs(rng, 20_000, 256, "softmax")
    s = sample(rng, p)
    cdfs = quantize_probs(p)
    data = encode_probs(s, p)

    def push():
        api._ext.Encoder(24, 0, 1).push_probs(s, p)

    table, ix = cdfs[:64], np.arange(len(s)) % 64
    s_ix = np.minimum(s, 200)  # valid symbols for the table rows (every row covers K = 256)
    big_s, big_ix = np.tile(s_ix, 25), np.tile(ix, 25)  # finish() of 500,000 symbols: ~ms
    encoders = []
    for _ in range(12):  # one full encoder per finish() call of the probe
        encoders.append(api._ext.Encoder(24, 0, 1))
        encoders[-1].push_indexed(big_s, big_ix, table)
    enc_ix = RansEncoder()
    enc_ix.encode_indexed(s_ix, ix, table)
    data_ix = enc_ix.finish()
    assert _runs_without_the_gil(lambda: api._ext.quantize_probs(p, 24, 1))
    assert _runs_without_the_gil(push)
    assert _runs_without_the_gil(lambda: encoders.pop().finish(), calls=len(encoders))
    assert _runs_without_the_gil(lambda: api._ext.Decoder(data, 24, 1).pop_probs(p))
    assert _runs_without_the_gil(lambda: api._ext.Decoder(data, 24, 1).pop_cdfs(cdfs))
    assert _runs_without_the_gil(lambda: api._ext.Decoder(data_ix, 24, 1).pop_indexed(ix, table))


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("lanes", [None, 1, 2, 4, 8])
@pytest.mark.parametrize("precision", [None, 9, 16])
def test_byte_identical_with_reference(lanes, precision):
    rng = np.random.default_rng(7 + (lanes or 0))
    parts = []
    enc, renc = RansEncoder(precision, lanes=lanes), ref.RansEncoder(precision, lanes=lanes)
    for i, kind in enumerate(KINDS):
        k = [2, 5, 77, 256, 3, 40][i]
        p = make_probs(rng, int(rng.integers(0, 60)), k, kind)
        s = sample(rng, p)
        cdfs = quantize_probs(p, precision)
        for e in (enc, renc):
            e.encode_probs(s, p)
            e.encode_cdfs(s, cdfs)
            e.encode_indexed(s, np.arange(len(s)), cdfs if len(s) else cdfs.reshape(0, k + 1))
        parts.append((s, p, cdfs))
    data = enc.finish()
    assert data == renc.finish()
    dec, rdec = RansDecoder(data, precision), ref.RansDecoder(data, precision)
    for s, p, cdfs in parts:
        for d in (dec, rdec):
            np.testing.assert_array_equal(d.decode_probs(p), s)
            np.testing.assert_array_equal(d.decode_cdfs(cdfs), s)
            np.testing.assert_array_equal(d.decode_indexed(np.arange(len(s)), cdfs), s)
    dec.finish()
    rdec.finish()


def test_empty_stream_is_empty_bytes():
    assert encode_probs(np.zeros(0, np.int64), np.zeros((0, 4), np.float32)) == b""
    assert ref.RansEncoder().finish() == b""
    dec = RansDecoder(b"")
    assert dec.decode_probs(np.zeros((0, 4), np.float32)).shape == (0,)
    dec.finish()


# ----------------------------------------------------------------------------- overhead


def _overhead_case(kind: str, n: int, k: int = 1024, rows: int = 64, seed: int = 8):
    """`rows` distinct (K,) float32 distributions of a kind, n symbols each drawn from the row
    named by a random index; returns rows, indexes, symbols and their float64 probabilities
    (the ideal code length is -sum log2 q)."""
    rng = np.random.default_rng(seed)
    p = make_probs(rng, rows, k, kind)
    q = p.astype(np.float64)
    q /= q.sum(axis=1, keepdims=True)
    ix = rng.integers(0, rows, n)
    u = rng.random(n)
    s = np.empty(n, np.int64)
    for r in range(rows):  # inverse-CDF sampling, row by row
        sel = ix == r
        s[sel] = np.minimum(np.searchsorted(np.cumsum(q[r]), u[sel], side="right"), k - 1)
    return p, q, ix, s


def _kl_over_entropy(q: np.ndarray, cdfs: np.ndarray, precision: int) -> float:
    """Expected quantisation overhead KL(q || f / 2^P) / H(q), averaged over the rows."""
    f = np.diff(cdfs.astype(np.int64), axis=1) / 2.0**precision
    logq = np.log2(q, where=q > 0, out=np.full_like(q, -np.inf))
    kl = (q * (logq - np.log2(f)))[q > 0].sum()
    entropy = -(q * logq)[q > 0].sum()
    return kl / entropy


@pytest.mark.parametrize("kind", ["softmax", "peaked"])
def test_overhead_vs_ideal_k1024(kind):
    """Issue goal: at K = 1024 and the default precision the size overhead vs. the ideal
    -sum log2 p is at most 0.01%. Checked on 2^20 symbols (four interleaved lanes): the
    quantisation part in expectation (KL) and on the sampled symbols, and the stream with
    only its constant framing (header + four final states, 264 bits) set aside; for the
    softmax rows (~7.3 bits/symbol) the whole stream, framing included, meets it too. The
    peaked rows (~1.4 bits/symbol) show why the framing is set aside: it is a per-stream
    constant, 0.018% of this stream's ideal size, not a rate."""
    n = 1 << 20
    p, q, ix, s = _overhead_case(kind, n)
    ideal = -np.log2(q[ix, s]).sum()
    table = quantize_probs(p)
    assert _kl_over_entropy(q, table, coding.DEFAULT_PRECISION) <= 1e-4
    enc = RansEncoder()
    enc.encode_indexed(s, ix, table)  # the same bytes as encode_probs(s, p[ix])
    data = enc.finish()
    assert data[0] & 3 == 2  # 4 lanes
    freq = np.diff(table.astype(np.int64), axis=1)[ix, s]
    quantised = -np.log2(freq / 2.0**coding.DEFAULT_PRECISION).sum()
    assert (quantised - ideal) / ideal <= 1e-4
    framing_bits = 8 * (1 + 4 * 8)
    assert 8 * len(data) <= quantised + framing_bits  # the coder itself loses nothing more
    overhead = (8 * len(data) - framing_bits - ideal) / ideal
    assert overhead <= 1e-4, f"stream overhead {100 * overhead:.5f}% vs ideal"
    if kind == "softmax":
        total = (8 * len(data) - ideal) / ideal
        assert total <= 1e-4, f"stream overhead with framing {100 * total:.5f}% vs ideal"


def test_overhead_check_is_sensitive_to_precision():
    """The 0.01% goal needs the high default precision: at P = 16 the same K = 1024 rows
    cost more than 0.01% in quantisation alone (so the check above can fail)."""
    p, q, _, _ = _overhead_case("softmax", 0)
    assert _kl_over_entropy(q, quantize_probs(p, 16), 16) > 1e-4
    assert _kl_over_entropy(q, quantize_probs(p), coding.DEFAULT_PRECISION) < 1e-6


# ----------------------------------------------------------------------------- errors


def test_input_errors():
    p = np.full((3, 4), 0.25, np.float32)
    s = np.array([0, 1, 2])
    enc = RansEncoder()
    with pytest.raises(ValueError, match=r"symbols\[1\] = 7 is out of range \[0, 4\)"):
        enc.encode_probs(np.array([0, 7, 1]), p)
    with pytest.raises(ValueError, match=r"symbols\[0\] = -1 is out of range"):
        enc.encode_cdfs(np.array([-1, 0, 0]), quantize_probs(p))
    with pytest.raises(ValueError, match="probs has 3 rows but symbols has 2 entries"):
        enc.encode_probs(s[:2], p)
    with pytest.raises(ValueError, match=r"probs must be 2-D \(N, K\)"):
        enc.encode_probs(s, p[0])
    with pytest.raises(ValueError, match=r"symbols must be 1-D"):
        enc.encode_probs(s[:, None], p)
    with pytest.raises(TypeError, match="symbols must hold integers"):
        enc.encode_probs(s.astype(np.float32), p)
    with pytest.raises(TypeError, match="probs must be float32, float16 or float64"):
        enc.encode_probs(s, p.astype(np.int32))
    bad = p.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="probs row 2 contains NaN, infinite or negative"):
        enc.encode_probs(s, bad)
    bad[2, 1] = -0.1
    with pytest.raises(ValueError, match="probs row 2 contains NaN, infinite or negative"):
        quantize_probs(bad)
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="probs row 2 contains NaN, infinite or negative"):
        RansDecoder(encode_probs(s, p)).decode_probs(bad)
    bad[1] = 0
    bad[2] = 0.25
    with pytest.raises(ValueError, match="probs row 1 sums to zero"):
        enc.encode_probs(s, bad)
    assert enc.pending == 0  # failed calls buffer nothing
    with pytest.raises(ValueError, match=r"precision must be in \[1, 24\], got 25"):
        RansEncoder(25)
    with pytest.raises(ValueError, match=r"precision must be in \[1, 24\], got 0"):
        quantize_probs(p, 0)
    with pytest.raises(TypeError, match="precision must be an int"):
        RansDecoder(b"", 16.0)
    with pytest.raises(ValueError, match=r"alphabet size K = 5 exceeds 2\^precision = 4"):
        quantize_probs(np.ones((1, 5), np.float32), 2)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        RansEncoder(num_threads=0)
    with pytest.raises(ValueError, match="lanes must be None, 1, 2, 4 or 8"):
        RansEncoder(lanes=3)
    with pytest.raises(TypeError, match="data must be bytes-like"):
        RansDecoder("abc")
    with pytest.raises(ValueError, match="must be a CPU tensor"):
        quantize_probs(torch.empty((1, 2), device="meta"))


def test_cdf_and_table_errors():
    enc = RansEncoder(8)
    good = quantize_probs(np.ones((2, 4), np.float32), 8)
    s = np.array([1, 2])
    wrong_total = good.copy()
    wrong_total[:, -1] = 255
    with pytest.raises(ValueError, match="cdfs row 0 is not a valid CDF for symbol 1"):
        enc.encode_cdfs(s, wrong_total)
    flat = good.copy()
    flat[1, 3] = flat[1, 2]
    with pytest.raises(ValueError, match="cdfs row 1 is not a valid CDF for symbol 2"):
        enc.encode_cdfs(s, flat)
    with pytest.raises(ValueError, match=r"cdfs values must lie in \[0, 2\^precision = 256\]"):
        enc.encode_cdfs(s, good.astype(np.int64) * 2)
    with pytest.raises(TypeError, match="cdfs must hold integers"):
        enc.encode_cdfs(s, good.astype(np.float32))
    with pytest.raises(ValueError, match=r"cdfs must have K \+ 1 >= 2 columns, got 1"):
        enc.encode_cdfs(s, good[:, :1])
    with pytest.raises(ValueError, match="cdfs has 2 rows but symbols has 1 entries"):
        enc.encode_cdfs(s[:1], good)
    with pytest.raises(ValueError, match="cdf_table row 1 is not strictly increasing at entry 3"):
        enc.encode_indexed(s, np.array([0, 1]), flat)
    with pytest.raises(ValueError, match="cdf_table row 0 must start at 0 and end at 2"):
        enc.encode_indexed(s, np.array([0, 1]), wrong_total)
    with pytest.raises(ValueError, match=r"indexes\[1\] = 2 is out of range \[0, 2\)"):
        enc.encode_indexed(s, np.array([0, 2]), good)
    with pytest.raises(ValueError, match="indexes has 1 rows but symbols has 2 entries"):
        enc.encode_indexed(s, np.array([0]), good)
    assert enc.pending == 0
    enc.encode_cdfs(s, good)
    data = enc.finish()
    with pytest.raises(ValueError, match=r"indexes\[0\] = -1 is out of range"):
        RansDecoder(data, 8).decode_indexed(np.array([-1, 0]), good)
    with pytest.raises(ValueError, match="cdfs row 0 is not a valid CDF"):
        RansDecoder(data, 8).decode_cdfs(wrong_total)


def test_decoder_errors():
    rng = np.random.default_rng(9)
    p = make_probs(rng, 200, 16, "softmax")
    s = sample(rng, p)
    data = encode_probs(s, p)
    with pytest.raises(ValueError, match="precision 24 but the decoder uses precision 16"):
        RansDecoder(data, 16)
    with pytest.raises(ValueError, match="cannot decode 3 symbols from an empty rANS stream"):
        RansDecoder(b"").decode_probs(p[:3])
    dec = RansDecoder(data)
    dec.decode_probs(p[:150])
    with pytest.raises(ValueError, match=r"not fully consumed: \d+ bytes left after 150"):
        dec.finish()
    with pytest.raises(ValueError, match="ran out of bytes after decoding"):
        dec.decode_probs(np.concatenate([p[150:], p, p]))
    with pytest.raises(ValueError, match="final-state check"):
        # same length, different distributions: detected by the final-state check
        decode_probs(data, make_probs(rng, 200, 16, "softmax"))
    with pytest.raises(ValueError):  # header bit 2 (a trailing count) set on a stream without
        decode_probs(bytes([data[0] | 4]) + data[1:], p)
    with pytest.raises(ValueError, match="shorter than its header and states"):
        RansDecoder(data[:4])


# ----------------------------------------------------------------------------- misuse

IN_USE = r"RansEncoder is in use by another thread: use one RansEncoder per thread"
DEC_IN_USE = r"RansDecoder is in use by another thread: use one RansDecoder per thread"


def _overlap_raises(slow, probe, attempts: int = 30) -> BaseException | None:
    """Runs ``slow()`` (a GIL-free call of ~10 ms) in a thread and calls ``probe()`` from this
    one while it runs; returns the first exception ``probe`` raised, or None if no attempt
    overlapped. ``slow`` may itself be refused as in use when a probe entered first (either
    side of a collision can be the one refused); any other error of ``slow`` is raised."""
    import threading

    for _ in range(attempts):
        started, errors = threading.Event(), []

        def work(started=started, errors=errors):
            started.set()
            try:
                slow()
            except RuntimeError as exc:
                if "in use by another thread" not in str(exc):
                    errors.append(exc)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        t = threading.Thread(target=work)
        t.start()
        started.wait()
        caught = None
        while t.is_alive() and caught is None:
            try:
                probe()
            except RuntimeError as exc:
                caught = exc
        t.join()
        if errors:
            raise errors[0]
        if caught is not None:
            return caught
    return None


def test_one_encoder_or_decoder_per_thread():
    """A second thread entering an encoder or decoder that is busy gets RuntimeError naming the
    problem (it was a double free, or a SIGFPE when finish() raced an encode); separate
    objects never conflict. test_many_threads_one_encoder_never_crash checks that the
    running call is unaffected."""
    rng = np.random.default_rng(70)
    n, k = 200_000, 16
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    enc = RansEncoder()
    for probe in (lambda: enc.pending, enc.finish, lambda: enc.encode_probs(s[:3], p[:3])):
        exc = _overlap_raises(lambda: enc.encode_probs(s, p), probe)
        assert exc is not None and re.match(IN_USE, str(exc)), exc
    enc.finish()
    exc = _overlap_raises(lambda: enc.encode_probs(s, p), lambda: RansEncoder().pending, 3)
    assert exc is None  # another encoder: no conflict
    data = encode_probs(s, p)
    decoders = []

    def fresh_decode():
        decoders.append(RansDecoder(data))
        decoders[-1].decode_probs(p)

    exc = _overlap_raises(fresh_decode, lambda: decoders and decoders[-1].decoded)
    assert exc is not None and re.match(DEC_IN_USE, str(exc)), exc
    def finish_early():  # ValueError (not consumed) unless it collides with the decode
        with contextlib.suppress(ValueError):
            decoders and decoders[-1].finish()

    exc = _overlap_raises(fresh_decode, finish_early)
    assert exc is not None and re.match(DEC_IN_USE, str(exc)), exc
    exc = _overlap_raises(lambda: RansDecoder(data).decode_probs(p), lambda: decoders[0].decoded, 3)
    assert exc is None


def test_many_threads_one_encoder_never_crash():
    """Four threads hammering one encoder (pushes of the same batch, finish, pending): every
    call either works or raises the in-use RuntimeError, and each returned stream decodes to
    a whole number of batches."""
    import threading

    rng = np.random.default_rng(71)
    n, k = 20_000, 64
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    enc = RansEncoder()
    streams, other, pushes, lock = [], [], [0], threading.Lock()

    def worker(role):
        for _ in range(15):
            try:
                if role == "finish":
                    streams.append(enc.finish())
                elif role == "pending":
                    assert enc.pending >= 0
                else:
                    enc.encode_probs(s, p)
                    with lock:
                        pushes[0] += 1
            except RuntimeError as exc:
                if not re.match(IN_USE, str(exc)):
                    other.append(exc)
            except BaseException as exc:
                other.append(exc)

    roles = ("push", "push", "finish", "pending")
    threads = [threading.Thread(target=worker, args=(r,)) for r in roles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert other == []
    streams.append(enc.finish())
    batches = 0
    for data in streams:
        dec = RansDecoder(data)
        while data:  # b"" holds no batch
            np.testing.assert_array_equal(dec.decode_probs(p), s)
            batches += 1
            with contextlib.suppress(ValueError):
                dec.finish()
                break
        dec.finish()
    assert batches == pushes[0]


_THREAD_LIMIT_SCRIPT = r"""
import resource, sys
import numpy as np
from pqmim_kernels.coding import RansEncoder, decode_probs, encode_probs, quantize_probs

rng = np.random.default_rng(0)
n, k = 1 << 14, 256
p = rng.random((n, k), dtype=np.float32)
s = rng.integers(0, k, n)
cdfs, data = quantize_probs(p), encode_probs(s, p)
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
vm = int(status["VmSize"].split()[0]) * 1024
# room for the coder's buffers (~50 MB here), not for hundreds of 8 MiB thread stacks
resource.setrlimit(resource.RLIMIT_AS, (vm + (96 << 20),) * 2)
assert (quantize_probs(p, num_threads=1000) == cdfs).all()
assert encode_probs(s, p, num_threads=1000) == data
enc = RansEncoder(num_threads=1000)
enc.encode_cdfs(s, cdfs)
assert enc.finish() == data
assert (decode_probs(data, p, num_threads=1000) == s).all()
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc are Linux")
def test_thread_start_failure_falls_back_to_fewer_threads():
    """num_threads=1000 under an address-space limit, in a child process: the threads that
    cannot start are done by the calling thread (same results); it was std::terminate."""
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", _THREAD_LIMIT_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_cdf_rows_checked_in_full():
    """encode_cdfs refuses rows that are valid around their symbol but not elsewhere: such rows
    gave overlapping intervals, streams that decoded to other symbols and still passed
    finish() (issue 14: 609 of 2,000)."""
    rng = np.random.default_rng(72)
    P, M = 10, 1 << 10
    refused = 0
    for _ in range(2000):
        k = int(rng.integers(3, 30))
        c = np.sort(rng.choice(np.arange(1, M), k - 1, replace=False))
        c = np.concatenate([[0], c, [M]]).astype(np.int32)
        sym = int(rng.integers(0, k))
        others = [j for j in range(1, k) if j not in (sym, sym + 1)]
        if others:  # one entry away from the symbol's interval moved anywhere
            c[rng.choice(others)] = rng.integers(0, M + 1)
        valid = (np.diff(c) > 0).all()
        enc = RansEncoder(P)
        try:
            enc.encode_cdfs(np.array([sym]), c[None])
        except ValueError as exc:
            assert not valid and re.match(r"cdfs row 0 (is not|must start)", str(exc)), exc
            refused += 1
            continue
        assert valid
        assert RansDecoder(enc.finish(), P).decode_cdfs(c[None])[0] == sym
    assert refused > 1000


@pytest.mark.parametrize("threads", [1, 2])
def test_cdf_row_errors_name_the_first_bad_row(threads):
    P, M = 8, 256
    n, k = 50_000, 4
    good = np.tile(np.arange(k + 1, dtype=np.int32) * (M // k), (n, 1))
    s = np.zeros(n, np.int64)
    enc = RansEncoder(P, num_threads=threads)
    bad = good.copy()
    bad[31_000, 3] = bad[31_000, 2]  # symbol 0's interval is fine, entry 3 is not
    bad[40_000, 2] = 0
    with pytest.raises(
        ValueError, match=r"^cdfs row 31000 is not strictly increasing at entry 3 \(128 then 128\)$"
    ):
        enc.encode_cdfs(s, bad)
    s1 = s.copy()
    s1[7] = 1
    bad2 = good.copy()
    bad2[7, 4] = 255
    with pytest.raises(ValueError, match=r"^cdfs row 7 is not a valid CDF for symbol 1"):
        enc.encode_cdfs(s1, bad2)
    bad2 = good.copy()
    bad2[7, 0] = 1  # symbol 1's interval is fine, the row does not start at 0
    msg = r"^cdfs row 7 must start at 0 and end at 2\^precision = 256, got 1 \.\. 256$"
    with pytest.raises(ValueError, match=msg):
        enc.encode_cdfs(s1, bad2)
    with pytest.raises(ValueError, match=r"^cdf_table row 1 is not strictly increasing at entry 3"):
        enc.encode_indexed(s[:2], np.array([0, 1]), bad[30_999:31_001])
    assert enc.pending == 0
    enc.encode_cdfs(s, good)
    assert enc.pending == n


def test_concurrent_writes_to_inputs_never_crash():
    """Another thread writing to the input arrays during calls (a caller's bug): results are
    unspecified, but every call returns or raises ValueError, never crashes."""
    import threading

    rng = np.random.default_rng(73)
    n, k = 30_000, 32
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    cdfs = quantize_probs(p)
    table, ix = cdfs[:64].copy(), rng.integers(0, 64, n)
    data = encode_probs(s, p)
    stop = threading.Event()

    def scribble():
        r = np.random.default_rng(74)
        while not stop.is_set():
            rows = r.integers(0, n, 50)
            p[rows] = r.random((50, k), dtype=np.float32) * r.choice([0, 1, 1e30], (50, 1))
            cdfs[rows, r.integers(1, k, 50)] = r.integers(-5, 1 << 25, 50)
            table[r.integers(0, 64, 4), r.integers(1, k, 4)] = r.integers(-5, 1 << 25, 4)
            ix[rows] = r.integers(-3, 70, 50)

    t = threading.Thread(target=scribble)
    t.start()
    outcomes = set()
    try:
        for i in range(30):
            try:
                if i % 5 == 0:
                    RansEncoder(num_threads=2).encode_probs(s, p)
                elif i % 5 == 1:
                    enc = RansEncoder()
                    enc.encode_cdfs(s, cdfs)
                    enc.finish()
                elif i % 5 == 2:
                    enc = RansEncoder()
                    enc.encode_indexed(np.minimum(s, k - 1), np.clip(ix, 0, 63), table)
                    enc.finish()
                elif i % 5 == 3:
                    RansDecoder(data, num_threads=2).decode_probs(p)
                else:
                    RansDecoder(data).decode_indexed(np.clip(ix, 0, 63), table)
                outcomes.add("returned")
            except ValueError:
                outcomes.add("ValueError")
    finally:
        stop.set()
        t.join()
    assert outcomes <= {"returned", "ValueError"}


# ----------------------------------------------------------------------------- framings


def _k1(n: int) -> np.ndarray:
    return np.ones((n, 1), np.float32)


def test_k1_past_the_end_raises():
    """K = 1 symbols change no state and cost nothing, so a standard stream ending with them
    records how many (header bit 2 + a LEB128 count): decoding one more raises, decoding
    fewer fails finish() (it decoded 1,000 symbols from a stream holding 10)."""
    data = encode_probs(np.zeros(10, np.int64), _k1(10))
    assert data == bytes([0xB8 | 4, 10]) + (1 << 31).to_bytes(5, "little")
    np.testing.assert_array_equal(decode_probs(data, _k1(10)), np.zeros(10))
    dec = RansDecoder(data)
    with pytest.raises(
        ValueError,
        match=r"^decoding past the end of the rANS stream: after 0 symbols it holds 10 more "
        r"\(of alphabet size 1\), 1000 were asked for$",
    ):
        dec.decode_probs(_k1(1000))
    dec.decode_probs(_k1(9))
    with pytest.raises(
        ValueError,
        match=r"^rANS stream not fully consumed: 1 symbols of alphabet size 1 at its end were "
        r"not decoded \(after 9 symbols\)$",
    ):
        dec.finish()
    dec.decode_cdfs(np.array([[0, 1 << 24]]))
    dec.finish()
    with pytest.raises(ValueError, match="decoding past the end"):
        dec.decode_indexed(np.zeros(1, np.int64), np.array([[0, 1 << 24]]))
    # after K >= 2 symbols, and a count of two LEB128 bytes
    rng = np.random.default_rng(80)
    p = make_probs(rng, 30, 5, "softmax")
    s = sample(rng, p)
    for lanes in (1, 2, 4, 8):
        enc, renc = RansEncoder(lanes=lanes), ref.RansEncoder(lanes=lanes)
        for e in (enc, renc):
            e.encode_probs(s, p)
            e.encode_probs(np.zeros(200, np.int64), _k1(200))
        data = enc.finish()
        assert data == renc.finish()
        assert data[0] & 4 and data[1:3] == bytes([200 - 128 + 128, 1])
        for d in (RansDecoder(data), ref.RansDecoder(data)):
            np.testing.assert_array_equal(d.decode_probs(p), s)
            d.decode_probs(_k1(200))
            d.finish()
            with pytest.raises(ValueError, match="decoding past the end"):
                d.decode_probs(_k1(1))
        with pytest.raises(ValueError, match="ran out of bytes"):  # K >= 2 past the end
            d = RansDecoder(data)
            d.decode_probs(p)
            d.decode_probs(_k1(200))
            d.decode_probs(p[:1])


def test_k1_elsewhere_changes_no_bytes():
    """K = 1 symbols that are not at the end leave the stream as it was (lanes = 1): no count,
    header bit 2 clear, byte-identical to the stream without them."""
    rng = np.random.default_rng(81)
    p = make_probs(rng, 40, 7, "softmax")
    s = sample(rng, p)
    enc = RansEncoder()
    enc.encode_probs(np.zeros(5, np.int64), _k1(5))
    enc.encode_probs(s, p)
    data = enc.finish()
    assert data == encode_probs(s, p) and not data[0] & 4
    dec = RansDecoder(data)
    dec.decode_probs(_k1(5))
    np.testing.assert_array_equal(dec.decode_probs(p), s)
    dec.finish()


def test_trailing_count_errors():
    base = encode_probs(np.zeros(3, np.int64), _k1(3))  # header | 4, count 3, state
    state = base[2:]
    for count, msg in [
        (b"\x80\x00", "trailing-symbol count is not canonical"),
        (b"\x00", "trailing-symbol count is not canonical"),
        (b"\xff" * 9 + b"\x01", "trailing-symbol count is truncated or too long"),
    ]:
        with pytest.raises(ValueError, match=msg):
            RansDecoder(base[:1] + count + state)
    with pytest.raises(ValueError, match="trailing-symbol count is truncated or too long"):
        RansDecoder(base[:1] + b"\x83")
    with pytest.raises(ValueError, match=r"ends with more symbols of alphabet size 1 \(3\)"):
        RansDecoder(base, symbols=2)


@pytest.mark.parametrize("precision", [None, 1, 8, 16])
def test_compact_framing_roundtrip_and_reference(precision):
    """Compact framing: every form, split calls, any size below 65,536 symbols; byte-identical
    with the reference coder, and never longer than the standard stream."""
    rng = np.random.default_rng(82 + (precision or 0))
    P = precision or 24
    for n in [0, 1, 2, 3, 5, 10, 31, 100, 1000]:
        k = 2 if P == 1 else int(rng.choice([2, 3, 40, 256]))
        p = make_probs(rng, n, k, str(rng.choice(KINDS)))
        s = sample(rng, p)
        cdfs = quantize_probs(p, P)
        enc, renc = RansEncoder(P, framing="compact"), ref.RansEncoder(P, framing="compact")
        cut = n // 3
        for e in (enc, renc):
            e.encode_probs(s[:cut], p[:cut])
            e.encode_cdfs(s[cut:], cdfs[cut:])
        assert enc.pending == renc.pending == n
        data = enc.finish()
        assert data == renc.finish()
        std = RansEncoder(P)
        std.encode_cdfs(s, cdfs)
        assert len(data) <= len(std.finish())
        for d in (
            RansDecoder(data, P, framing="compact", symbols=n),
            ref.RansDecoder(data, P, framing="compact", symbols=n),
        ):
            out = [d.decode_cdfs(cdfs[: n // 2]), d.decode_probs(p[n // 2 :])]
            np.testing.assert_array_equal(np.concatenate(out), s)
            d.finish()
        np.testing.assert_array_equal(decode_probs(data, p, P, framing="compact"), s)


def test_compact_framing_bytes():
    """The layout in the module docstring: head of (len - 1) % 4 + 1 bytes without a leading
    zero byte, then words; b"" when the final state is 0 (only symbol 0s here)."""
    p = np.array([[0.5, 0.5]] * 6, np.float32)
    assert encode_probs(np.zeros(6, np.int64), p, framing="compact") == b""
    np.testing.assert_array_equal(decode_probs(b"", p, framing="compact"), np.zeros(6))
    # symbols are coded last first from state 0: symbol 1 (interval [2^23, 2^24)) gives the
    # state 2^23; symbol 0s after it in the stream cost nothing, before it 1 bit each
    one = encode_probs(np.array([1]), p[:1], framing="compact")
    assert one == (1 << 23).to_bytes(3, "little")
    assert encode_probs(np.array([1, 0, 0]), p[:3], framing="compact") == one
    data = encode_probs(np.array([0, 0, 1]), p[:3], framing="compact")
    assert data == (1 << 25).to_bytes(4, "little")
    rng = np.random.default_rng(83)
    for n in range(1, 300, 7):
        q = make_probs(rng, n, 256, "softmax")
        data = encode_probs(sample(rng, q), q, framing="compact")
        head = (len(data) - 1) % 4 + 1
        assert data[head - 1] != 0


def test_compact_framing_from_65536_symbols_is_the_standard_stream():
    rng = np.random.default_rng(84)
    n = 1 << 16
    table = quantize_probs(make_probs(rng, 8, 32, "softmax"))
    ix, s = rng.integers(0, 8, n), rng.integers(0, 32, n)
    for lanes, count in [(None, n), (2, 100), (8, 100)]:
        std, cmp_ = RansEncoder(lanes=lanes), RansEncoder(lanes=lanes, framing="compact")
        for e in (std, cmp_):
            e.encode_indexed(s[:count], ix[:count], table)
        data = cmp_.finish()
        assert data == std.finish()
        dec = RansDecoder(data, framing="compact", symbols=count, lanes=lanes)
        np.testing.assert_array_equal(dec.decode_indexed(ix[:count], table), s[:count])
        dec.finish()
    one = RansEncoder(lanes=1, framing="compact")  # lanes=1: compact at any size
    one.encode_indexed(s, ix, table)
    data = one.finish()
    dec = RansDecoder(data, framing="compact", symbols=n, lanes=1)
    np.testing.assert_array_equal(dec.decode_indexed(ix, table), s)
    dec.finish()


def test_symbol_counts_and_framing_errors():
    rng = np.random.default_rng(85)
    p = make_probs(rng, 50, 9, "softmax")
    s = sample(rng, p)
    data = encode_probs(s, p, framing="compact")
    with pytest.raises(ValueError, match=r"framing='compact' needs symbols=, the number of"):
        RansDecoder(data, framing="compact")
    with pytest.raises(ValueError, match=r"framing must be 'standard' or 'compact', got 'tiny'"):
        RansEncoder(framing="tiny")
    with pytest.raises(ValueError, match=r"framing must be 'standard' or 'compact', got 'tiny'"):
        RansDecoder(data, framing="tiny", symbols=50)
    with pytest.raises(TypeError, match="symbols must be an int, got float"):
        RansDecoder(data, framing="compact", symbols=50.0)
    with pytest.raises(ValueError, match="symbols must be >= 0, got -1"):
        RansDecoder(data, symbols=-1)
    with pytest.raises(ValueError, match=r"lanes must be None, 1, 2, 4 or 8, got 3"):
        RansDecoder(data, framing="compact", symbols=50, lanes=3)
    dec = RansDecoder(data, framing="compact", symbols=50)
    dec.decode_probs(p[:40])
    with pytest.raises(
        ValueError,
        match=r"^decoding past the end of the rANS stream: it holds 50 symbols, 40 are "
        r"decoded and 20 more were asked for$",
    ):
        dec.decode_probs(p[:20])
    with pytest.raises(ValueError, match=r"^rANS stream holds 50 symbols but 40 were decoded$"):
        dec.finish()
    with pytest.raises(ValueError, match="its head has a leading zero byte"):
        RansDecoder(b"\x01\x00", framing="compact", symbols=1)
    # the standard framing takes a count too, and checks lanes against the header
    std = encode_probs(s, p)
    with pytest.raises(ValueError, match="it holds 50 symbols, 0 are decoded and 51 more"):
        RansDecoder(std, symbols=50).decode_probs(np.concatenate([p, p[:1]]))
    dec = RansDecoder(std, symbols=51)
    np.testing.assert_array_equal(dec.decode_probs(p), s)
    with pytest.raises(ValueError, match=r"^rANS stream holds 51 symbols but 50 were decoded$"):
        dec.finish()
    with pytest.raises(ValueError, match="stream has 1 lanes but the decoder was told 4"):
        RansDecoder(std, lanes=4)
    with pytest.raises(ValueError, match="decoding past the end"):  # K = 1, compact
        RansDecoder(b"", framing="compact", symbols=3).decode_probs(_k1(4))


def test_compact_corruption_never_crashes():
    """The compact framing has no check value of its own (the container checks integrity):
    damaged streams raise ValueError or decode to something, never crash; truncations and
    most other damage are still caught by the count / final-state / consumed checks."""
    rng = np.random.default_rng(86)
    n, k = 60, 40
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    data = encode_probs(s, p, framing="compact")
    outcomes = {"caught": 0, "silent": 0}

    def outcome(bad: bytes) -> None:
        try:
            decode_probs(bad, p, framing="compact")
            outcomes["silent"] += 1
        except ValueError:
            outcomes["caught"] += 1

    for cut in range(len(data)):
        outcome(data[:cut])
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        outcome(bytes(flipped))
    for _ in range(100):
        outcome(rng.integers(0, 256, int(rng.integers(0, 80))).astype(np.uint8).tobytes())
    total = outcomes["caught"] + outcomes["silent"]
    assert outcomes["caught"] >= 0.9 * total, outcomes


# ----------------------------------------------------------------------------- corruption


def _decode_outcome(data: bytes, probs: np.ndarray, n: int) -> str:
    """'caught' if any step raises ValueError, else 'silent' (never crashes)."""
    try:
        dec = RansDecoder(data)
        dec.decode_probs(probs[:n])
        dec.finish()
    except ValueError:
        return "caught"
    return "silent"


@pytest.mark.parametrize("lanes", [1, 2, 8])
def test_corruption_is_caught(lanes):
    """Which corruptions are caught, on streams of softmax rows: every truncation, every
    single-bit flip (the final-state check is ~31 bits per lane), random foreign bytes, a
    byte appended or prepended, two words swapped, decoding too few or too many symbols, and
    another message's stream coded with other distributions. What cannot be caught is in
    test_undetectable_flip_on_uniform_rows_is_documented."""
    rng = np.random.default_rng(10 + lanes)
    n, k = 120, 40
    p = make_probs(rng, n, k, "softmax")
    s = sample(rng, p)
    enc = RansEncoder(lanes=lanes)
    enc.encode_probs(s, p)
    data = enc.finish()
    assert _decode_outcome(data, p, n) == "silent"
    for cut in range(len(data)):
        assert _decode_outcome(data[:cut], p, n) == "caught", cut
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert _decode_outcome(bytes(flipped), p, n) == "caught", bit
    for trial in range(200):
        foreign = rng.integers(0, 256, int(rng.integers(0, 2 * len(data)))).astype(np.uint8)
        assert _decode_outcome(foreign.tobytes(), p, n) == "caught", trial
    # an appended byte shifts the lane-0 state length: caught as well
    assert _decode_outcome(data + b"\0", p, n) == "caught"
    assert _decode_outcome(b"\0" + data, p, n) == "caught"
    fixed = 1 + 8 * (lanes - 1)  # header + lanes 1.. states; lane 0's state is 5..8 bytes
    head = fixed + (8, 5, 6, 7)[(len(data) - fixed) % 4]
    words = [data[i : i + 4] for i in range(head, len(data), 4)]
    assert len(words) >= 2 and words[0] != words[1]
    swapped = data[:head] + words[1] + words[0] + b"".join(words[2:])  # two words swapped
    assert _decode_outcome(swapped, p, n) == "caught"
    # the wrong number of symbols, and another message's stream (other distributions)
    assert _decode_outcome(data, p, n - 1) == "caught"
    assert _decode_outcome(data, np.concatenate([p, p[:1]]), n + 1) == "caught"
    other = make_probs(rng, n, k, "softmax")
    assert _decode_outcome(encode_probs(sample(rng, other), other), p, n) == "caught"


# ----------------------------------------------------------------------------- import


def test_stale_or_missing_extension_says_how_to_rebuild(monkeypatch, tmp_path):
    from pqmim_kernels.coding import _ext

    real = importlib.import_module("pqmim_kernels._rans")
    monkeypatch.setitem(sys.modules, "pqmim_kernels._rans", types.ModuleType("stale"))
    with pytest.raises(ImportError, match=r"is stale \(ABI version None.*pip install .*-e \."):
        _ext.load_extension()
    monkeypatch.setitem(sys.modules, "pqmim_kernels._rans", None)
    with pytest.raises(ImportError, match=r"missing or broken.*pip install .*-e \."):
        _ext.load_extension()

    # Built from other sources than the checkout's (C++ edited, not rebuilt): refused.
    monkeypatch.setitem(sys.modules, "pqmim_kernels._rans", real)
    for name in _ext.FINGERPRINTED_SOURCES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((_ext.Path(_ext.__file__).parents[2] / name).read_bytes())
    assert _ext.load_extension(tmp_path) is real  # same sources: accepted
    (tmp_path / "csrc/rans.cpp").write_bytes(
        b"// edited\n" + (tmp_path / "csrc/rans.cpp").read_bytes()
    )
    with pytest.raises(ImportError, match=r"is stale: it was built from other versions of csrc"):
        _ext.load_extension(tmp_path)
    (tmp_path / "csrc/rans.cpp").unlink()  # no sources (an installed wheel): not checked
    assert _ext.load_extension(tmp_path) is real


def test_public_names():
    assert coding.DEFAULT_PRECISION == 24 and coding.MAX_PRECISION == 24
    for name in coding.__all__:
        assert getattr(coding, name).__doc__ or isinstance(getattr(coding, name), int)


def test_undetectable_flip_on_uniform_rows_is_documented():
    """The limit of the final-state check: with uniform rows every bit pattern is a valid
    message, so a flipped low bit of the first word read decodes a neighbouring symbol of the
    same frequency and offset, the state is unchanged, and nothing is detected. Callers that
    need integrity (the .pqm format) add their own checksum of the decoded codes."""
    n, k = 40, 256
    p = np.full((n, k), 1.0 / k, np.float32)
    s = np.arange(n) % k
    data = encode_probs(s, p, 8)
    flipped = bytearray(data)
    flipped[1] ^= 1  # lowest bit of the state: slot + 1 -> next symbol, same frequency
    out = decode_probs(bytes(flipped), p, 8)  # no error ...
    assert (out != s).sum() == 1  # ... but one symbol is wrong


def test_golden_stream_bytes():
    """Catches silent format or quantiser drift: fixed integer-derived inputs must keep giving
    these exact bytes (update deliberately, with a format version bump, if the format
    changes)."""
    import hashlib

    i = np.arange(300)[:, None]
    j = np.arange(40)[None, :]
    p = (((i * 7 + j * 13) % 17) ** 3 + 1).astype(np.float32) * np.float32(1e-3)
    s = (i[:, 0] * 5) % 40
    golden = ["1d20df325380d37e", "0e7d6d89dd562ef1"]
    digests = []
    for precision, lanes in [(24, None), (12, 4)]:
        enc = RansEncoder(precision, lanes=lanes)
        enc.encode_probs(s, p)
        digests.append(hashlib.sha256(enc.finish()).hexdigest()[:16])
    assert digests == golden

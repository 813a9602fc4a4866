"""Stateful property test of pqmim_kernels.coding (issue 14): hypothesis drives one encoder
(either framing) through random sequences of valid and damaged calls of the three forms
(K = 1 included), finishes, decodes in other splits, decodes one symbol too many, and shares
the encoder and decoders with a second thread, comparing every outcome with a model: which
calls must be accepted, what the stream holds, which errors name what. The C++ side has the
same harness as a libFuzzer target (csrc/fuzz/); running this file against an extension
built with -DPQMIM_SANITIZE=ON or -DPQMIM_TSAN=ON (see csrc/fuzz/README.md) checks the
Python boundary under the sanitizers too."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from pqmim_kernels.coding import RansDecoder, RansEncoder, quantize_probs

IN_USE = "is in use by another thread"


def _batch(seed: int, form: str, n: int, k: int, precision: int, damage: str):
    """Arrays for one encode call and whether a correct coder must accept them."""
    rng = np.random.default_rng(seed)
    symbols = rng.integers(0, k, n)
    probs = rng.random((n, k), dtype=np.float32) + np.float32(1e-3)
    args: dict = {"symbols": symbols}
    valid = True
    if damage == "symbol" and n:
        symbols[rng.integers(0, n)] = k if rng.random() < 0.5 else -1
        valid = False
    if form == "probs":
        if damage == "probs" and n:
            probs[rng.integers(0, n), rng.integers(0, k)] = rng.choice([np.nan, -1.0, np.inf])
            valid = False
        if damage == "zero_row" and n:
            probs[rng.integers(0, n)] = 0
            valid = False
        args["probs"] = probs
    elif form == "cdfs":
        cdfs = quantize_probs(probs, precision)
        if damage == "cdf" and n:
            r, i = rng.integers(0, n), rng.integers(0, k + 1)
            cdfs[r, i] = rng.integers(-1, (1 << precision) + 2)
            valid = valid and bool((np.diff(cdfs[r].astype(np.int64)) > 0).all())
            valid = valid and cdfs[r, 0] == 0 and cdfs[r, -1] == 1 << precision
        args["cdfs"] = cdfs
    else:
        tables = int(rng.integers(1, 5))
        table = quantize_probs(rng.random((tables, k), dtype=np.float32) + 1e-3, precision)
        indexes = rng.integers(0, tables, n)
        if damage == "index" and n:
            indexes[rng.integers(0, n)] = tables
            valid = False
        args["indexes"], args["cdf_table"] = indexes, table
    return args, valid


def _encode(enc, form: str, args: dict) -> None:
    getattr(enc, f"encode_{form}")(**args)


def _decode(dec, form: str, args: dict, lo: int, hi: int) -> np.ndarray:
    if form == "probs":
        return dec.decode_probs(args["probs"][lo:hi])
    if form == "cdfs":
        return dec.decode_cdfs(args["cdfs"][lo:hi])
    return dec.decode_indexed(args["indexes"][lo:hi], args["cdf_table"])


class CoderMachine(RuleBasedStateMachine):
    @initialize(
        precision=st.integers(9, 24),
        lanes=st.sampled_from([None, 1, 2, 4, 8]),
        framing=st.sampled_from(["standard", "compact"]),
    )
    def start(self, precision, lanes, framing):
        self.precision, self.lanes, self.framing = precision, lanes, framing
        self.enc = RansEncoder(precision, lanes=lanes, num_threads=2, framing=framing)
        self.batches: list[tuple[str, dict]] = []

    def _pending_model(self) -> int:
        return sum(len(a["symbols"]) for _, a in self.batches)

    @rule(
        seed=st.integers(0, 2**32 - 1),
        form=st.sampled_from(["probs", "cdfs", "indexed"]),
        n=st.integers(0, 300),
        k=st.sampled_from([1, 2, 3, 17, 256, 300]),
        damage=st.sampled_from(["none", "none", "symbol", "probs", "zero_row", "cdf", "index"]),
    )
    def encode(self, seed, form, n, k, damage):
        args, valid = _batch(seed, form, n, k, self.precision, damage)
        try:
            _encode(self.enc, form, args)
        except ValueError as exc:
            assert not valid, exc
            assert any(w in str(exc) for w in ("row", "symbols[", "indexes[")), exc
        else:
            assert valid
            self.batches.append((form, args))

    @rule(
        seed=st.integers(0, 2**32 - 1),
        form=st.sampled_from(["probs", "cdfs", "indexed"]),
        n=st.integers(1, 3000),
    )
    def encode_from_two_threads(self, seed, form, n):
        """The same valid batch pushed by two threads at once: each push lands whole or is
        refused as in use."""
        args, _ = _batch(seed, form, n, 64, self.precision, "none")
        results = []

        def push():
            try:
                _encode(self.enc, form, args)
                results.append("ok")
            except RuntimeError as exc:
                assert IN_USE in str(exc)
                results.append("busy")

        threads = [threading.Thread(target=push) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert "ok" in results  # the guard is exclusive: one of them got in
        self.batches += [(form, args)] * results.count("ok")

    @rule(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 3000))
    def finish_racing_an_encode(self, seed, n):
        """finish() while another thread encodes: the outcome is one of the serial orders,
        told apart afterwards by what is left pending."""
        args, _ = _batch(seed, "probs", n, 32, self.precision, "none")
        pushed = []

        def push():
            try:
                _encode(self.enc, "probs", args)
                pushed.append(True)
            except RuntimeError as exc:
                assert IN_USE in str(exc)

        t = threading.Thread(target=push)
        t.start()
        try:
            data = self.enc.finish()
        except RuntimeError as exc:
            assert IN_USE in str(exc)
            data = None
        t.join()
        if data is None:  # finish refused: everything is still pending
            self.batches += [("probs", args)] * len(pushed)
            return
        left = self.enc.pending
        included = self.batches + ([("probs", args)] if pushed and left == 0 else [])
        self._check_stream(data, included, cut=0.5)
        self.batches = [("probs", args)] if pushed and left else []

    def _decoder(self, data: bytes, batches, **kw) -> RansDecoder:
        count = sum(len(a["symbols"]) for _, a in batches)
        known = self.framing == "compact" or count % 2  # the standard framing: either way
        return RansDecoder(
            data,
            self.precision,
            framing=self.framing,
            symbols=count if known else None,
            lanes=self.lanes,
            **kw,
        )

    def _check_stream(self, data: bytes, batches, cut: float) -> None:
        dec = self._decoder(data, batches, num_threads=2)
        for form, args in batches:
            n = len(args["symbols"])
            mid = int(n * cut)
            out = np.concatenate(
                [_decode(dec, form, args, 0, mid), _decode(dec, form, args, mid, n)]
            )
            np.testing.assert_array_equal(out, args["symbols"])
        dec.finish()
        # one symbol more than the stream holds, K = 2 or K = 1
        top = 1 << self.precision
        for extra in ([[0, top >> 1, top]], [[0, top]]):
            with pytest.raises(ValueError, match="ran out of bytes|past the end|empty rANS"):
                dec.decode_cdfs(np.array(extra, np.int32))

    @rule(cut=st.floats(0, 1))
    def finish_and_decode(self, cut):
        data = self.enc.finish()
        if self.framing == "standard":  # compact: also b"" for a final state 0
            assert (data == b"") == (self._pending_model() == 0)
        self._check_stream(data, self.batches, cut)
        self.batches = []

    @rule()
    def decoder_shared_with_a_querying_thread(self):
        """A second thread polling ``decoded`` on a decoder in use is refused; the decode is
        not disturbed. (No precondition on the model: it depends on thread timing, which
        hypothesis must not see in its choices.)"""
        batches = list(self.batches)
        data = self.enc.finish()
        self.batches = []
        dec = self._decoder(data, batches)
        stop, errors = threading.Event(), []

        def poll():
            while not stop.is_set():
                try:
                    _ = dec.decoded
                except RuntimeError as exc:
                    if IN_USE not in str(exc):
                        errors.append(exc)

        t = threading.Thread(target=poll)
        t.start()
        try:
            for form, args in batches:
                n = len(args["symbols"])
                while True:
                    try:
                        out = _decode(dec, form, args, 0, n)
                        break
                    except RuntimeError as exc:  # the poller held it for an instant
                        assert IN_USE in str(exc)
                np.testing.assert_array_equal(out, args["symbols"])
        finally:
            stop.set()
            t.join()
        assert errors == []
        dec.finish()

    @invariant()
    def pending_matches_model(self):
        if hasattr(self, "enc"):
            assert self.enc.pending == self._pending_model()


CoderMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_coder_state_machine = CoderMachine.TestCase

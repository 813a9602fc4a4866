"""Tiny pure-Python rANS coder: the spec of ``pqmim_kernels.coding`` (C++), byte for byte.

Slow on purpose (a Python loop per symbol, Python integers): it exists so that the compiled
coder can be checked against something short enough to read. Same parameters, stream layout
and API names as :mod:`pqmim_kernels.coding.rans` (see that module and ``csrc/rans.hpp``):

- state in ``[L, L * 2**32)``, ``L = 2**31``, renormalised by 32-bit words;
- precision ``P``: frequencies sum to ``2**P``;
- ``lanes`` interleaved states, symbol ``j`` (counted across calls) uses lane ``j % lanes``;
- standard framing: header byte ``log2(lanes) | 4 * (t > 0) | (P - 1) << 3``, then ``t``
  (the number of trailing symbols of frequency ``2**P``, i.e. K = 1) as a LEB128 varint when
  ``t > 0``, lane 0's final state in 5..8 bytes (length implied by the stream length modulo
  4), the other lanes' states in 8 bytes, then the words in decoding order; ``b""`` for zero
  symbols;
- compact framing (one lane; decoder told the symbol count, the precision and the lanes
  argument): the lane starts at state 0; a final state of more than 32 bits emits its low
  word; the rest is the head, in as few bytes as it needs (``(len - 1) % 4 + 1``), followed by
  the words in decoding order; ``b""`` when the final state is 0. With more lanes the
  compact framing writes the standard stream.
"""

from __future__ import annotations

import numpy as np

DEFAULT_PRECISION = 24
MAX_PRECISION = 24
INTERLEAVE_MIN_SYMBOLS = 1 << 16
INTERLEAVED_LANES = 4
_LOW = 1 << 31


def quantize_probs(probs: np.ndarray, precision: int = DEFAULT_PRECISION) -> np.ndarray:
    """(N, K) float probabilities -> (N, K + 1) int32 CDFs summing to ``2**precision``.

    Vectorised numpy transcription of the spec in
    :func:`pqmim_kernels.coding.quantize_probs`; every step is the same float32 operation.
    """
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {p.shape}")
    n, k = p.shape
    M = 1 << precision
    if not 1 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {precision}")
    if k < 1 or k > M:
        raise ValueError(f"alphabet size K = {k} must be in [1, 2^precision = {M}]")
    bad = ~(p >= 0) | (p > np.finfo(np.float32).max)
    if bad.any():
        raise ValueError(
            f"probs row {int(np.argmax(bad.any(1)))} contains NaN, infinite or negative values"
        )
    m = p.max(axis=1) if n else np.zeros(0, np.float32)
    if (m == 0).any():
        raise ValueError(f"probs row {int(np.argmax(m == 0))} sums to zero")
    a = np.argmax(p == m[:, None], axis=1)
    _, e = np.frexp(m)
    sh = 24 - e.astype(np.int64)
    c1 = np.ldexp(np.float32(1), np.minimum(sh, 127)).astype(np.float32)
    c2 = np.ldexp(np.float32(1), np.maximum(sh - 127, 0)).astype(np.float32)
    t = np.floor((p * c1[:, None]) * c2[:, None])  # exact integers < 2**24 in float32
    total = t.astype(np.int64).sum(axis=1).astype(np.float32)
    rows = np.arange(n)
    s = np.float32(M) / total
    f = np.maximum(np.floor(t * s[:, None]), np.float32(1)).astype(np.int64)
    d = M - f.sum(axis=1)
    ok = f[rows, a] + d >= 1
    f[rows[ok], a[ok]] += d[ok]
    for r in np.flatnonzero(~ok):  # the reserve-one-per-symbol fallback, rare
        s2 = np.float32(M - k) / total[r]
        fr = 1 + np.floor(t[r] * s2).astype(np.int64)
        dr = M - int(fr.sum())
        if dr >= 0:
            fr[a[r]] += dr
        else:
            for i in range(k):
                take = min(int(fr[i]) - 1, -dr)
                fr[i] -= take
                dr += take
                if dr == 0:
                    break
        f[r] = fr
    cdf = np.zeros((n, k + 1), dtype=np.int64)
    np.cumsum(f, axis=1, out=cdf[:, 1:])
    return cdf.astype(np.int32)


FRAMINGS = ("standard", "compact")


def _lanes(lanes: int | None, n: int) -> int:
    return lanes or (INTERLEAVED_LANES if n >= INTERLEAVE_MIN_SYMBOLS else 1)


def _symbol_intervals(symbols, cdfs) -> list[tuple[int, int]]:
    out = []
    for i, (s, c) in enumerate(zip(np.asarray(symbols).tolist(), np.asarray(cdfs).tolist())):
        if not 0 <= s < len(c) - 1:
            raise ValueError(f"symbols[{i}] = {s} is out of range [0, {len(c) - 1})")
        out.append((c[s], c[s + 1] - c[s]))
    return out


class RansEncoder:
    """Pure-Python twin of :class:`pqmim_kernels.coding.RansEncoder` (FIFO over calls)."""

    def __init__(
        self,
        precision: int | None = None,
        *,
        lanes: int | None = None,
        framing: str = "standard",
    ):
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be 'standard' or 'compact', got {framing!r}")
        self.precision = DEFAULT_PRECISION if precision is None else precision
        self.lanes = lanes
        self.framing = framing
        self._pairs: list[tuple[int, int]] = []

    @property
    def pending(self) -> int:
        return len(self._pairs)

    def encode_probs(self, symbols, probs) -> None:
        self.encode_cdfs(symbols, quantize_probs(probs, self.precision))

    def encode_cdfs(self, symbols, cdfs) -> None:
        self._pairs += _symbol_intervals(symbols, cdfs)

    def encode_indexed(self, symbols, indexes, cdf_table) -> None:
        self.encode_cdfs(symbols, np.asarray(cdf_table)[np.asarray(indexes)])

    def finish(self) -> bytes:
        n, P = len(self._pairs), self.precision
        if n == 0:
            return b""
        lanes = _lanes(self.lanes, n)
        compact = self.framing == "compact" and lanes == 1
        state = [0 if compact else _LOW] * lanes
        words = []
        for j in range(n - 1, -1, -1):  # last symbol first: the decoder reads first to last
            start, freq = self._pairs[j]
            x = state[j % lanes]
            if x >= ((_LOW >> P) << 32) * freq:
                words.append(x & 0xFFFFFFFF)
                x >>= 32
            state[j % lanes] = (x // freq << P) + x % freq + start
        self._pairs, pairs = [], self._pairs
        if compact:
            x = state[0]
            if x >> 32:
                words.append(x & 0xFFFFFFFF)
                x >>= 32
            out = bytearray(x.to_bytes((x.bit_length() + 7) // 8, "little"))
        else:
            t = 0
            while t < n and pairs[n - 1 - t][1] == 1 << P:
                t += 1
            out = bytearray([lanes.bit_length() - 1 | (4 if t else 0) | (P - 1) << 3])
            while t:
                out.append((t & 127) | (128 if t > 127 else 0))
                t >>= 7
            len0 = next(b for b in (5, 6, 7, 8) if state[0] < 1 << (8 * b))
            out += state[0].to_bytes(len0, "little")
            for x in state[1:]:
                out += x.to_bytes(8, "little")
        for w in reversed(words):
            out += w.to_bytes(4, "little")
        return bytes(out)


class RansDecoder:
    """Pure-Python twin of :class:`pqmim_kernels.coding.RansDecoder`."""

    def __init__(
        self,
        data: bytes,
        precision: int | None = None,
        *,
        framing: str = "standard",
        symbols: int | None = None,
        lanes: int | None = None,
    ):
        if framing not in FRAMINGS:
            raise ValueError(f"framing must be 'standard' or 'compact', got {framing!r}")
        self.precision = DEFAULT_PRECISION if precision is None else precision
        self._data = bytes(data)
        self._count = 0
        self._expected = symbols
        self._trailing = self._trailing_used = 0
        self._pos = 0
        self.lanes = 1
        if framing == "compact":
            if symbols is None:
                raise ValueError("the compact framing needs the number of symbols")
            if _lanes(lanes, symbols) == 1:
                self._compact, self._initial = True, 0
                self._state = [0]
                if data:
                    head = (len(data) - 1) % 4 + 1
                    if data[head - 1] == 0:
                        raise ValueError("corrupt compact rANS stream: leading zero byte")
                    x, self._pos = int.from_bytes(data[:head], "little"), head
                    if x < _LOW and self._pos + 4 <= len(data):
                        x = x << 32 | int.from_bytes(data[head : head + 4], "little")
                        self._pos += 4
                    self._state = [x]
                return
        self._compact, self._initial = False, _LOW
        self._state = [_LOW]
        if not data:
            return
        h = data[0]
        self.lanes = 1 << (h & 3)
        if (h >> 3) + 1 != self.precision or (lanes and lanes != self.lanes):
            raise ValueError("not a rANS stream of this precision and lane count")
        pos = 1
        if h & 4:  # LEB128 trailing count
            shift = 0
            while True:
                if pos >= len(data) or shift > 56:
                    raise ValueError("corrupt rANS stream: trailing count")
                b = data[pos]
                pos += 1
                self._trailing |= (b & 127) << shift
                if not b & 128:
                    if b == 0:
                        raise ValueError("corrupt rANS stream: trailing count not canonical")
                    break
                shift += 7
        fixed = pos + 8 * (self.lanes - 1)
        if len(data) < fixed + 5:
            raise ValueError("rANS stream is truncated")
        len0 = (8, 5, 6, 7)[(len(data) - fixed) % 4]
        self._state = [int.from_bytes(data[pos : pos + len0], "little")]
        self._pos = pos + len0
        for _ in range(self.lanes - 1):
            self._state.append(int.from_bytes(data[self._pos : self._pos + 8], "little"))
            self._pos += 8
        if any(not _LOW <= x < _LOW << 32 for x in self._state):
            raise ValueError("corrupt rANS stream: initial state out of range")

    def decode_probs(self, probs) -> np.ndarray:
        return self.decode_cdfs(quantize_probs(probs, self.precision))

    def decode_indexed(self, indexes, cdf_table) -> np.ndarray:
        return self.decode_cdfs(np.asarray(cdf_table)[np.asarray(indexes)])

    def decode_cdfs(self, cdfs) -> np.ndarray:
        P = self.precision
        rows = np.asarray(cdfs).tolist()
        n = len(rows)
        if n and self._expected is not None and n > self._expected - self._count:
            raise ValueError("decoding past the end of the rANS stream")
        if n and not self._data and not self._compact:
            raise ValueError("cannot decode symbols from an empty rANS stream")
        at_end = self._pos == len(self._data) and all(x == self._initial for x in self._state)
        if n and len(rows[0]) == 2 and not self._compact and at_end:  # K = 1 at the end
            if n > self._trailing - self._trailing_used:
                raise ValueError("decoding past the end of the rANS stream")
            self._trailing_used += n
        out = []
        for c in rows:
            lane = self._count % self.lanes
            x = self._state[lane]
            slot = x & ((1 << P) - 1)
            s = int(np.searchsorted(c, slot, side="right")) - 1
            x = (c[s + 1] - c[s]) * (x >> P) + slot - c[s]
            if x < _LOW:
                if self._pos + 4 <= len(self._data):
                    x = x << 32 | int.from_bytes(self._data[self._pos : self._pos + 4], "little")
                    self._pos += 4
                elif not self._compact:
                    raise ValueError("rANS stream is truncated or corrupt")
            self._state[lane] = x
            self._count += 1
            out.append(s)
        return np.asarray(out, dtype=np.int64)

    def finish(self) -> None:
        if self._expected is not None and self._count != self._expected:
            raise ValueError("rANS stream holds another number of symbols")
        if self._pos != len(self._data) or any(x != self._initial for x in self._state):
            raise ValueError("rANS stream failed its final-state check")
        if self._trailing_used != self._trailing:
            raise ValueError("rANS stream not fully consumed")

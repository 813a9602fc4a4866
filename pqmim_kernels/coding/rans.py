"""Python face of the C++ rANS coder (``pqmim_kernels._rans``).

Coder: 64-bit states in ``[L, L * 2**32)``, ``L = 2**31``, 32-bit renormalisation words,
probability precision ``P`` (frequencies sum to ``2**P``; default 24, at most 24), one state
("lane") for streams under 65,536 symbols and 4 interleaved lanes above (symbol ``j`` uses lane
``j % lanes``). Encoding step for a symbol with interval ``[c, c + f)``: if ``x >= (L >> P <<
32) * f`` emit the low word of ``x`` and shift it out, then ``x = (x // f << P) + x % f + c``;
decoding inverts it and reads a word whenever the state falls below ``L``.

**Framings** (``framing=`` of :class:`RansEncoder` and :class:`RansDecoder`; the decoder
must be given the encoder's). All integers little endian; zero symbols give ``b""``.

- ``"standard"`` (default; self-describing, ~31 bits of integrity check per lane):

  ======================  ==================================================================
  header, 1 byte          bits 0-1 ``log2(lanes)``, bit 2 set iff a trailing count follows,
                          bits 3-7 ``P - 1``
  trailing count          only with bit 2: unsigned LEB128 ``t >= 1`` (one byte below 128),
                          the number of symbols with alphabet size K = 1 at the end of the
                          stream (they change no state, so without it decoding past the end
                          could not fail); absent for streams that end otherwise
  lane 0 final state      5..8 bytes, as few as it needs; the count follows from the stream
                          length: ``(8, 5, 6, 7)[(len - fixed) % 4]``, ``fixed`` = header +
                          count + 8 bytes per other lane
  lanes 1.. final states  8 bytes each
  words                   4 bytes each, in the order the decoder reads them
  ======================  ==================================================================

  Every lane starts at ``L``; :meth:`RansDecoder.finish` checks that every lane is back
  there and every byte was read. Fixed cost with one lane: 1 + 5..8 bytes (5.3-5.4 bytes
  above the ideal code length on average, bench/bench_rans.py scenario (d)).

- ``"compact"`` (for small streams inside a container that records the symbol count and the
  precision and checks integrity itself, as ``.pqm`` does): no header, and the decoder must be
  told ``symbols`` (the exact count the encoder coded, :attr:`RansEncoder.pending` before
  :meth:`~RansEncoder.finish`), the precision and the encoder's ``lanes`` argument. When they
  give one lane (``lanes`` 1, or ``None`` with fewer than 65,536 symbols) the stream is

  ======================  ==================================================================
  head, 1..4 bytes        ``(len - 1) % 4 + 1`` bytes, no leading zero byte
  words                   4 bytes each, in the order the decoder reads them
  ======================  ==================================================================

  or ``b""`` when the final state is 0. The lane starts at state 0, not ``L`` (no check
  value to carry), with the same flush rule, so the encoder emits nothing while its state is
  below ``L`` and the decoder, past the last word, reads nothing. Final flush: a final state
  ``x >= 2**32`` emits its low word (read first) and the head is ``x >> 32``; otherwise the
  head is ``x``. The decoder takes the head and, if it is below ``L`` and words follow, one
  word: ``x = head << 32 | word``. It must decode exactly ``symbols`` symbols and end at state
  0 having read every byte. That is no check value, but damage rarely survives it (in tests
  every single-bit flip and ~97% of truncations were caught); rely on the container's check.
  Fixed cost: the final state's bytes, i.e. about ``P`` bits for the first symbol coded from
  the empty state (its interval start, ``log2 c``) plus < 1 byte of rounding: 2.3-2.6 bytes
  above the ideal on average at ``P = 24`` (bench (d)), about 1 byte less per 8 bits less
  of precision. With more than one lane (``lanes``
  2/4/8, or ``None`` from 65,536 symbols) ``"compact"`` writes exactly the standard stream,
  so large streams keep their interleaved decoding and their overhead.

**Ordering.** rANS is last-in-first-out, but this API is first-in-first-out: a
:class:`RansEncoder` only buffers ``(start, frequency)`` pairs in its ``encode_*`` calls and
codes everything, last symbol first, in :meth:`RansEncoder.finish`. A :class:`RansDecoder`
therefore returns symbols in the order they were given to the encoder: decode batches in the
same order (and with the same sizes or any split of them) as they were encoded. A multi-stage
entropy model can encode stage 1, 2, ... and decode stage 1, 2, ..., with stage ``s``'s
distributions computed from the decoded stages ``< s``.

**Integrity.** In the standard framing every state starts at ``2**31``;
:meth:`RansDecoder.finish` checks that every state is back there and every byte was read
(~31 bits of check per state), which catches truncated or corrupted data and decoding with
distributions different from the encoder's. Decoding more symbols than the stream holds
raises ``ValueError`` in either framing, for every K (K = 1 included: the compact framing
through the count it is told, the standard one through its trailing count); a decoder given
``symbols=`` also refuses to decode more and checks the count in :meth:`RansDecoder.finish`.

**Threads.** Every coding call releases the GIL. The contract: one :class:`RansEncoder` or
:class:`RansDecoder` per thread; different objects code in parallel, GIL-free. An object
entered by a second thread while a call on it is running (``encode_*``, ``decode_*``,
``finish``, ``pending``, ``decoded``) raises :class:`RuntimeError` ("RansEncoder is in use by
another thread ...") in that second thread and the running call is unaffected; nothing is
serialised behind a lock (the order of two threads' symbols in one stream would be
arbitrary). Input arrays must not be written by another thread during a call: the result is
then unspecified (a ``ValueError`` or wrong symbols), but never a crash. ``num_threads``
asks for worker threads; when the system refuses to start some (thread or address-space
limits), the calling thread does their share: same result, less parallelism.

Inputs are numpy arrays or CPU torch tensors (taken zero-copy when already contiguous with
the native dtype). Bad input raises :class:`ValueError` (wrong values or shapes) or
:class:`TypeError` (wrong dtypes); running out of memory raises :class:`MemoryError`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pqmim_kernels.coding._ext import load_extension

_ext = load_extension()

DEFAULT_PRECISION: int = int(_ext.DEFAULT_PRECISION)
MAX_PRECISION: int = int(_ext.MAX_PRECISION)

__all__ = [
    "DEFAULT_PRECISION",
    "MAX_PRECISION",
    "RansDecoder",
    "RansEncoder",
    "decode_probs",
    "encode_probs",
    "quantize_probs",
]


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy array view of ``x`` (numpy array, CPU torch tensor or array-like), no copy."""
    if type(x).__module__.split(".")[0] == "torch":
        if x.device.type != "cpu":
            raise ValueError(f"{name} must be a CPU tensor, got one on {x.device}; call .cpu()")
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            x = x.float()
        return x.resolve_conj().resolve_neg().numpy()
    return np.asarray(x)


def _precision(precision: int | None) -> int:
    if precision is None:
        return DEFAULT_PRECISION
    if isinstance(precision, bool) or not isinstance(precision, (int, np.integer)):
        raise TypeError(f"precision must be an int, got {type(precision).__name__}")
    if not 1 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in [1, {MAX_PRECISION}], got {precision}")
    return int(precision)


def _threads(num_threads: int) -> int:
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return int(num_threads)


def _int_vector(x: Any, name: str) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {a.shape}")
    too_big = a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max
    if too_big:
        raise ValueError(f"{name} has values beyond the int64 range")
    return np.ascontiguousarray(a, dtype=np.int64)


def _probs(x: Any, name: str = "probs") -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype not in (np.float32, np.float16, np.float64):
        raise TypeError(f"{name} must be float32, float16 or float64, got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, K), got shape {a.shape}")
    # float16 -> float32 is exact; float64 is rounded to float32 (the quantiser's input type).
    return np.ascontiguousarray(a, dtype=np.float32)


def _cdfs(x: Any, name: str, precision: int) -> np.ndarray:
    a = _to_numpy(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers (int32 preferred), got dtype {a.dtype}")
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, K + 1), got shape {a.shape}")
    if a.dtype != np.int32 and a.size:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > (1 << precision):
            raise ValueError(
                f"{name} values must lie in [0, 2^precision = {1 << precision}], got [{lo}, {hi}]"
            )
    return np.ascontiguousarray(a, dtype=np.int32)


FRAMINGS = ("standard", "compact")


def _framing(framing: str) -> bool:
    """True for the compact framing; ValueError for an unknown name."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing must be 'standard' or 'compact', got {framing!r}")
    return framing == "compact"


def _lanes(lanes: int | None) -> int:
    if lanes is not None and (isinstance(lanes, bool) or lanes not in (1, 2, 4, 8)):
        raise ValueError(f"lanes must be None, 1, 2, 4 or 8, got {lanes!r}")
    return int(lanes or 0)


def _same_rows(a: np.ndarray, n: int, name: str, other: str = "symbols") -> None:
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows but {other} has {n} entries")


def quantize_probs(probs: Any, precision: int | None = None, *, num_threads: int = 1) -> np.ndarray:
    """Deterministic integer CDFs of float distributions, exactly as the coder uses them.

    Args:
        probs: (N, K) float32 / float16 / float64 (rounded to float32 first), numpy or CPU
            torch. Rows need not be normalised; entries must be finite and >= 0 and every row
            must have a positive entry. ``K <= 2**precision``.
        precision: P in [1, 24] (default :data:`DEFAULT_PRECISION` = 24).
        num_threads: rows are split across this many threads.

    Returns:
        (N, K + 1) int32 CDFs: ``cdf[:, 0] = 0``, strictly increasing, ``cdf[:, K] = 2**P``.

    The spec, in IEEE float32 operations (no FMA), reproduced byte for byte by
    :func:`pqmim_kernels.reference.rans.quantize_probs`:

    1. ``m = max(p)``, ``a`` = first index of ``m``, ``e`` = frexp exponent of ``m``.
    2. ``t_i = floor(p_i * 2**(24 - e))`` (exact power-of-two scaling, integers < 2**24),
       ``T = sum(t_i)`` as an exact integer (independent of summation order).
    3. ``s = float32(2**P) / float32(T)``; ``f_i = max(1, floor(float32(t_i) * s))``;
       ``d = 2**P - sum(f_i)``; if ``f_a + d >= 1`` then ``f_a += d`` and stop.
    4. Else (only when ``K**2`` is comparable to ``2**P``): ``s = float32(2**P - K) /
       float32(T)``, ``f_i = 1 + floor(float32(t_i) * s)``, ``d = 2**P - sum(f_i)``; if
       ``d >= 0`` then ``f_a += d``, else take the excess from symbols in index order, leaving
       each at least 1.
    5. ``cdf = [0, cumsum(f)]``.

    Raises:
        TypeError: non-float dtype. ValueError: not 2-D, NaN/inf/negative entries, an all-zero
        row, K > 2**precision, precision out of range.
    """
    p = _probs(probs)
    return _ext.quantize_probs(p, _precision(precision), _threads(num_threads))


class RansEncoder:
    """Buffers symbols with their distributions over any number of calls; :meth:`finish`
    writes one stream.

    Symbols are decoded first-in-first-out: a :class:`RansDecoder` returns them in the order
    of the ``encode_*`` calls (see the module docstring). Each ``encode_*`` call validates
    its input completely before buffering anything, so a call that raises leaves the encoder
    unchanged.

    Args:
        precision: P in [1, 24], frequencies sum to ``2**P`` (default 24). The decoder must
            use the same value (it is recorded in the stream header and checked).
        num_threads: threads used to quantise float distributions in :meth:`encode_probs`
            and to check CDF rows in :meth:`encode_cdfs`.
        lanes: interleaved states, 1, 2, 4 or 8; ``None`` chooses 1 below 65,536 symbols and
            4 above (the reference coder takes the same parameter).
        framing: ``"standard"`` (self-describing) or ``"compact"`` (a few bytes less per
            stream; the decoder must be told the symbol count, see the module docstring).
    """

    def __init__(
        self,
        precision: int | None = None,
        *,
        num_threads: int = 1,
        lanes: int | None = None,
        framing: str = "standard",
    ):
        self.precision = _precision(precision)
        self.framing = framing
        self._enc = _ext.Encoder(
            self.precision, _lanes(lanes), _threads(num_threads), _framing(framing)
        )

    @property
    def pending(self) -> int:
        """Number of symbols buffered since the last :meth:`finish`."""
        return self._enc.pending

    def encode_probs(self, symbols: Any, probs: Any) -> None:
        """Buffer ``symbols`` (N,) integers in [0, K) with float distributions ``probs``
        (N, K) float32/float16/float64, quantised by :func:`quantize_probs`."""
        s = _int_vector(symbols, "symbols")
        p = _probs(probs)
        _same_rows(p, s.shape[0], "probs")
        self._enc.push_probs(s, p)

    def encode_cdfs(self, symbols: Any, cdfs: Any) -> None:
        """Buffer ``symbols`` (N,) with integer CDFs ``cdfs`` (N, K + 1) (int32 preferred).

        Every row is checked in full, once: 0, strictly increasing, ``2**precision``; a bad
        row raises ValueError naming it (``cdfs row 7 is not strictly increasing at entry 3
        ...``). The check is one sequential read of the array (memory bound: it costs about
        as much as quantize_probs writing it), split over ``num_threads``. The decoder only
        checks the entries its search uses: decoding with other CDFs than the encoder's is
        caught by :meth:`RansDecoder.finish`."""
        s = _int_vector(symbols, "symbols")
        c = _cdfs(cdfs, "cdfs", self.precision)
        _same_rows(c, s.shape[0], "cdfs")
        self._enc.push_cdfs(s, c)

    def encode_indexed(self, symbols: Any, indexes: Any, cdf_table: Any) -> None:
        """Buffer ``symbols`` (N,) coded with the static CDF ``cdf_table[indexes[i]]``.

        Args:
            symbols: (N,) integers in [0, K).
            indexes: (N,) integers in [0, T).
            cdf_table: (T, K + 1) integer CDFs, every row checked in full.
        """
        s = _int_vector(symbols, "symbols")
        ix = _int_vector(indexes, "indexes")
        _same_rows(ix, s.shape[0], "indexes")
        t = _cdfs(cdf_table, "cdf_table", self.precision)
        self._enc.push_indexed(s, ix, t)

    def finish(self) -> bytes:
        """Code all buffered symbols and return the stream; the encoder is then empty. With
        ``framing="compact"`` read :attr:`pending` first: the decoder needs that count."""
        return self._enc.finish()


class RansDecoder:
    """Reads a :class:`RansEncoder` stream back, batch by batch, in encoding order.

    Args:
        data: the stream (bytes-like).
        precision: must equal the encoder's (default 24).
        num_threads: threads used to quantise float distributions in :meth:`decode_probs`.
        framing: the encoder's, ``"standard"`` or ``"compact"``.
        symbols: the number of symbols the stream holds (the encoder's :attr:`pending` before
            ``finish()``). Required with ``framing="compact"``; optional with the standard
            framing. When given, decoding more raises ValueError and :meth:`finish` checks
            that exactly this many were decoded.
        lanes: the encoder's ``lanes`` argument (compact framing: it and ``symbols`` decide
            the layout; standard framing: checked against the stream when given).

    A decoder that raised ValueError while decoding is left in an undefined state; start a
    new one (an "in use by another thread" RuntimeError changes nothing).
    """

    def __init__(
        self,
        data: Any,
        precision: int | None = None,
        *,
        num_threads: int = 1,
        framing: str = "standard",
        symbols: int | None = None,
        lanes: int | None = None,
    ):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes-like, got {type(data).__name__}")
        self.precision = _precision(precision)
        compact = _framing(framing)
        if symbols is None:
            if compact:
                raise ValueError(
                    "framing='compact' needs symbols=, the number of symbols the stream holds "
                    "(RansEncoder.pending before finish()): the stream does not record it"
                )
            count = -1
        elif isinstance(symbols, bool) or not isinstance(symbols, (int, np.integer)):
            raise TypeError(f"symbols must be an int, got {type(symbols).__name__}")
        elif symbols < 0:
            raise ValueError(f"symbols must be >= 0, got {symbols}")
        else:
            count = int(symbols)
        self.framing = framing
        self._dec = _ext.Decoder(
            bytes(data), self.precision, _threads(num_threads), compact, count, _lanes(lanes)
        )

    @property
    def decoded(self) -> int:
        """Number of symbols decoded so far."""
        return self._dec.decoded

    def decode_probs(self, probs: Any) -> np.ndarray:
        """Decode N symbols given their distributions ``probs`` (N, K) float; returns (N,)
        int64. ``probs`` must be bit-identical to what the encoder was given."""
        return self._dec.pop_probs(_probs(probs))

    def decode_cdfs(self, cdfs: Any) -> np.ndarray:
        """Decode N symbols given integer CDFs ``cdfs`` (N, K + 1); returns (N,) int64."""
        return self._dec.pop_cdfs(_cdfs(cdfs, "cdfs", self.precision))

    def decode_indexed(self, indexes: Any, cdf_table: Any) -> np.ndarray:
        """Decode N symbols with ``cdf_table[indexes[i]]``: ``indexes`` (N,) integers,
        ``cdf_table`` (T, K + 1) integers; returns (N,) int64."""
        ix = _int_vector(indexes, "indexes")
        return self._dec.pop_indexed(ix, _cdfs(cdf_table, "cdf_table", self.precision))

    def finish(self) -> None:
        """Raise ValueError unless the stream was consumed exactly: every byte read, every
        state back at its initial value, and (when known) every symbol decoded."""
        self._dec.finish()


def encode_probs(
    symbols: Any,
    probs: Any,
    precision: int | None = None,
    *,
    num_threads: int = 1,
    framing: str = "standard",
) -> bytes:
    """One-shot: ``symbols`` (N,) ints with ``probs`` (N, K) floats -> stream bytes."""
    enc = RansEncoder(precision, num_threads=num_threads, framing=framing)
    enc.encode_probs(symbols, probs)
    return enc.finish()


def decode_probs(
    data: Any,
    probs: Any,
    precision: int | None = None,
    *,
    num_threads: int = 1,
    framing: str = "standard",
) -> np.ndarray:
    """One-shot inverse of :func:`encode_probs`: returns (N,) int64 and checks that the
    stream held exactly these N symbols (ValueError otherwise)."""
    p = _probs(probs)
    dec = RansDecoder(data, precision, num_threads=num_threads, framing=framing, symbols=len(p))
    out = dec.decode_probs(p)
    dec.finish()
    return out

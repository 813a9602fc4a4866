"""The ``.pqm`` container: a header of a handful of bytes and one rANS payload.

Layout (all multi-byte integers little-endian; varints are unsigned LEB128, at most 5 bytes);
the written spec is ``docs/PQM_FORMAT.md``::

    offset  size  field
    0       2     magic b"\\xb5Q"  (0xB5 is not ASCII/UTF-8-initial, so text files never match)
    2       1     version (high 4 bits) | stages_sent - 1 (low 4 bits)
    3       2     model id: first 2 bytes of the model's sha256 fingerprint
    5       1-5   varint height  (pixels, >= 1)
    .       1-5   varint 4 * width + downscale  (width in pixels >= 1; downscale 0..3)
    .       3     check: CRC-32 of the header bytes before it + the coded token codes, low 24 bits
    .       ...   rANS payload (rest of the file)

The check covers the header fields too (format version 2): a flipped bit in the image size that
leaves the token grid unchanged would otherwise decode to a silently wrong-sized image.

A 768×512 image has an 11-byte header. Every parse error is a ``ValueError`` whose message says
what is wrong; nothing here can crash the process on hostile input.
"""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np

__all__ = [
    "CHECK_BYTES",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DIM",
    "MAX_DOWNSCALE",
    "PqmHeader",
    "check_context",
    "code_check",
    "pack",
    "read_varint",
    "unpack",
    "write_varint",
]

MAGIC = b"\xb5Q"
FORMAT_VERSION = 3  # 2: the check also covers the header fields; 3: integer entropy model v2
# What each format version was written by, for the message that refuses it.
_WRITTEN_BY = {
    1: "pqmim-kernels 0.1 before the header check (entropy model v1)",
    2: "pqmim-kernels 0.1 (entropy model v1, float probabilities)",
}
MAX_DIM = 1 << 20  # 1 Mpx per side: far beyond any real use, keeps allocations bounded
# The code check: 24 bits since format 3 (16 before). The payload's compact rANS framing carries
# no check value of its own, so this check is what catches a damaged payload: at 24 bits a
# corrupt file that decodes at all passes it with probability 2^-24.
CHECK_BYTES = 3
MAX_DOWNSCALE = 3  # the payload may code the image shrunk by 2, 4 or 8 (field: 4 * width + k)
CHECK_MASK = (1 << (8 * CHECK_BYTES)) - 1
_MAX_VARINT_BYTES = 5


@dataclasses.dataclass(frozen=True)
class PqmHeader:
    """Decoded header fields.

    ``model_id``: 2 bytes; ``height``/``width``: image size in pixels; ``stages_sent``: number of
    coding stages in the payload (1..16); ``check``: 24-bit check over the coded codes;
    ``downscale``: the payload codes the image shrunk by ``2**downscale`` (0..3; the decoder
    enlarges it back to ``height x width``), the way very small files fit any image.
    """

    model_id: bytes
    height: int
    width: int
    stages_sent: int
    check: int
    downscale: int = 0

    @property
    def coded_size(self) -> tuple[int, int]:
        """``(H, W)`` of the image the payload codes: ``ceil(size / 2**downscale)``."""
        f = 1 << self.downscale
        return -(-self.height // f), -(-self.width // f)


def write_varint(value: int) -> bytes:
    """Unsigned LEB128 encoding of ``0 <= value < 2**35``."""
    if not isinstance(value, (int, np.integer)) or value < 0 or value >= 1 << 35:
        raise ValueError(f"varint: value must be an int in [0, 2**35), got {value!r}")
    value = int(value)
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """Read a varint at ``pos``; returns ``(value, new_pos)``. ValueError when truncated."""
    value = 0
    for i in range(_MAX_VARINT_BYTES):
        if pos + i >= len(data):
            raise ValueError("corrupt .pqm file: truncated header (varint runs past the end)")
        byte = data[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if i > 0 and byte == 0:
                raise ValueError("corrupt .pqm file: non-canonical varint in header")
            return value, pos + i + 1
    raise ValueError("corrupt .pqm file: varint longer than 5 bytes in header")


def code_check(codes, context: bytes = b"") -> int:
    """24-bit check: low 24 bits of the CRC-32 of ``context`` followed by the codes as
    little-endian uint16 in the given order.

    ``codes``: integer array (any shape, values < 65536). ``context``: the header bytes the check
    also covers (:func:`check_context`; empty for a check over the codes alone).
    """
    arr = np.ascontiguousarray(np.asarray(codes), dtype="<u2")
    return zlib.crc32(arr.tobytes(), zlib.crc32(bytes(context))) & CHECK_MASK


def check_context(header: PqmHeader) -> bytes:
    """The header bytes the check covers: everything before the check field (magic, version and
    stages, model id, height, width), as :func:`pack` writes them. ``header.check`` is ignored."""
    _check_fields(header)
    return b"".join(
        (
            MAGIC,
            bytes([(FORMAT_VERSION << 4) | (header.stages_sent - 1)]),
            bytes(header.model_id),
            write_varint(header.height),
            write_varint(4 * header.width + header.downscale),
        )
    )


def _check_fields(header: PqmHeader) -> None:
    if not isinstance(header.model_id, (bytes, bytearray)) or len(header.model_id) != 2:
        raise ValueError(f"pqm header: model_id must be 2 bytes, got {header.model_id!r}")
    if not 1 <= header.stages_sent <= 16:
        raise ValueError(f"pqm header: stages_sent must be in [1, 16], got {header.stages_sent}")
    for name in ("height", "width"):
        v = getattr(header, name)
        if not 1 <= v <= MAX_DIM:
            raise ValueError(f"pqm header: {name} must be in [1, {MAX_DIM}], got {v}")
    if header.downscale not in range(MAX_DOWNSCALE + 1):
        raise ValueError(
            f"pqm header: downscale must be in [0, {MAX_DOWNSCALE}], got {header.downscale}"
        )


def pack(header: PqmHeader, payload: bytes) -> bytes:
    """Serialise ``header`` and the rANS ``payload`` into the bytes of a ``.pqm`` file."""
    _check_fields(header)
    if not 0 <= header.check <= CHECK_MASK:
        raise ValueError(f"pqm header: check must fit {8 * CHECK_BYTES} bits, got {header.check}")
    if not isinstance(payload, (bytes, bytearray)):
        raise TypeError(f"pqm payload must be bytes, got {type(payload).__name__}")
    check = header.check.to_bytes(CHECK_BYTES, "little")
    return b"".join((check_context(header), check, bytes(payload)))


def unpack(data: bytes) -> tuple[PqmHeader, bytes]:
    """Parse a ``.pqm`` file; returns ``(header, payload)``.

    Raises ``TypeError`` for non-bytes input and ``ValueError`` naming the problem for a foreign
    file (bad magic), an unsupported version, a truncated header or impossible sizes.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"a .pqm file must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(MAGIC) or data[: len(MAGIC)] != MAGIC:
        raise ValueError("not a .pqm file (bad magic bytes)")
    if len(data) < 5:
        raise ValueError("corrupt .pqm file: truncated header")
    version, stages_sent = data[2] >> 4, (data[2] & 0x0F) + 1
    if version != FORMAT_VERSION:
        origin = _WRITTEN_BY.get(version, "a newer or unknown pqmim-kernels")
        raise ValueError(
            f"unsupported .pqm format version {version} (written by {origin}); this build reads "
            f"version {FORMAT_VERSION} only"
        )
    model_id = data[3:5]
    height, pos = read_varint(data, 5)
    field, pos = read_varint(data, pos)
    width, downscale = field >> 2, field & MAX_DOWNSCALE
    for name, v in (("height", height), ("width", width)):
        if not 1 <= v <= MAX_DIM:
            raise ValueError(f"corrupt .pqm file: image {name} {v} out of range [1, {MAX_DIM}]")
    if pos + CHECK_BYTES > len(data):
        raise ValueError("corrupt .pqm file: truncated header (no code check)")
    check = int.from_bytes(data[pos : pos + CHECK_BYTES], "little")
    header = PqmHeader(model_id, height, width, stages_sent, check, downscale)
    return header, data[pos + CHECK_BYTES :]

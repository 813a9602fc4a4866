"""The .pqm container: header fields, varints, code check, and every parse error."""

import numpy as np
import pytest

from pqmim_kernels.coding import pqm_format as fmt


def _header(**kw):
    base = dict(model_id=b"\x12\x34", height=512, width=768, stages_sent=10, check=0xBEEF)
    base.update(kw)
    return fmt.PqmHeader(**base)


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 16383, 16384, 2**21, 2**35 - 1])
def test_varint_round_trip(value):
    data = fmt.write_varint(value)
    assert fmt.read_varint(b"x" + data, 1) == (value, 1 + len(data))
    assert len(data) == max(1, (value.bit_length() + 6) // 7)


def test_varint_errors():
    with pytest.raises(ValueError, match=r"varint: value must be an int in \[0, 2\*\*35\)"):
        fmt.write_varint(-1)
    with pytest.raises(ValueError, match="truncated header"):
        fmt.read_varint(b"\x80", 0)
    with pytest.raises(ValueError, match="varint longer than 5 bytes"):
        fmt.read_varint(b"\xff" * 6, 0)
    with pytest.raises(ValueError, match="non-canonical varint"):
        fmt.read_varint(b"\x81\x00", 0)


def test_pack_unpack_round_trip_and_size():
    h = _header()
    data = fmt.pack(h, b"payload")
    assert data[:2] == fmt.MAGIC
    assert len(data) == 2 + 1 + 2 + 2 + 2 + 3 + len(b"payload")  # 12-byte header for Kodak
    got, payload = fmt.unpack(data)
    assert got == h and payload == b"payload"
    tiny = fmt.pack(_header(height=1, width=16, stages_sent=1, check=0), b"")
    assert len(tiny) == 10
    assert fmt.unpack(tiny) == (_header(height=1, width=16, stages_sent=1, check=0), b"")


def test_downscale_field_shares_the_width_varint():
    for k in range(4):
        h = _header(height=500, width=700, downscale=k)
        data = fmt.pack(h, b"")
        got, _ = fmt.unpack(data)
        assert got == h and got.downscale == k
        assert got.coded_size == (-(-500 // 2**k), -(-700 // 2**k))
    # width 768 -> field 3072 still takes two bytes: no cost for Kodak-sized images
    assert len(fmt.pack(_header(width=768, downscale=3), b"")) == 12
    with pytest.raises(ValueError, match=r"downscale must be in \[0, 3\], got 4"):
        fmt.pack(_header(downscale=4), b"")


def test_pack_rejects_bad_fields():
    with pytest.raises(ValueError, match="model_id must be 2 bytes"):
        fmt.pack(_header(model_id=b"abc"), b"")
    with pytest.raises(ValueError, match=r"stages_sent must be in \[1, 16\]"):
        fmt.pack(_header(stages_sent=17), b"")
    with pytest.raises(ValueError, match="height must be in"):
        fmt.pack(_header(height=0), b"")
    with pytest.raises(ValueError, match="check must fit 24 bits"):
        fmt.pack(_header(check=1 << 24), b"")
    with pytest.raises(TypeError, match="pqm payload must be bytes"):
        fmt.pack(_header(), "text")


def test_unpack_errors():
    good = fmt.pack(_header(), b"xyz")
    with pytest.raises(TypeError, match="a .pqm file must be bytes, got str"):
        fmt.unpack("PQ")
    with pytest.raises(ValueError, match=r"not a .pqm file \(bad magic bytes\)"):
        fmt.unpack(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    with pytest.raises(ValueError, match="bad magic"):
        fmt.unpack(b"")
    with pytest.raises(ValueError, match="truncated header"):
        fmt.unpack(good[:4])
    for cut in range(5, 10):  # every cut inside the varints / check is a clear error
        with pytest.raises(ValueError, match="truncated header"):
            fmt.unpack(good[:cut])
    bad_version = bytearray(good)
    bad_version[2] = (7 << 4) | (bad_version[2] & 0xF)
    with pytest.raises(ValueError, match="unsupported .pqm format version 7"):
        fmt.unpack(bytes(bad_version))
    # a file of the previous format says what wrote it and what this build reads
    old = bytearray(good)
    old[2] = (2 << 4) | (old[2] & 0xF)
    with pytest.raises(
        ValueError,
        match=r"format version 2 \(written by pqmim-kernels 0.1 \(entropy model v1.*reads "
        r"version 3 only",
    ):
        fmt.unpack(bytes(old))
    zero_h = fmt.MAGIC + bytes([0x39]) + b"\x12\x34" + b"\x00\x05" + b"\0\0"
    with pytest.raises(ValueError, match=r"image height 0 out of range"):
        fmt.unpack(zero_h)


def test_code_check_sensitivity():
    codes = np.arange(600, dtype=np.int64).reshape(100, 6) % 256
    c = fmt.code_check(codes)
    assert 0 <= c < 1 << 24
    assert fmt.code_check(codes.copy()) == c
    flipped = codes.copy()
    flipped[37, 2] ^= 1
    assert fmt.code_check(flipped) != c
    # known value: CRC-32 of the little-endian uint16 bytes, low 24 bits
    import zlib

    assert c == zlib.crc32(codes.astype("<u2").tobytes()) & 0xFFFFFF


def test_check_covers_the_header_bytes():
    import zlib

    h = _header(check=0)
    ctx = fmt.check_context(h)
    packed = fmt.pack(h, b"payload")
    assert packed.startswith(ctx) and len(ctx) == len(packed) - 3 - len(b"payload")
    assert ctx[2] >> 4 == fmt.FORMAT_VERSION == 3
    codes = np.arange(24, dtype=np.int64).reshape(4, 6)
    want = zlib.crc32(ctx + codes.astype("<u2").tobytes()) & 0xFFFFFF
    assert fmt.code_check(codes, ctx) == want
    # every header field changes the check, for the same codes
    for kw in ({"width": 767}, {"height": 511}, {"stages_sent": 9}, {"model_id": b"\x12\x35"}):
        assert fmt.code_check(codes, fmt.check_context(_header(**kw))) != want, kw
    with pytest.raises(ValueError, match="model_id must be 2 bytes"):
        fmt.check_context(_header(model_id=b"x"))

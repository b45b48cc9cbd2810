"""RtpPacket: the aiortc vectors (fields and byte-exact re-serialization), errors, RFC 8285, batch."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.errors import FastSIPError
from fastsip.rtp import RtpError, RtpPacket, parse_batch, parse_batch_buffer

DATA = Path(__file__).parent / "data" / "rtp" / "aiortc"


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


# Expected fields from conformance/rtp/README.md (read from aiortc's own tests).
VECTORS = [
    ("rtp.bin", 172, 0, 0, 15743, 3937035252, (), 160, 0),
    ("rtp_dtmf.bin", 16, 1, 101, 24152, 4021352124, (), 4, 0),
    ("rtp_with_csrc.bin", 180, 0, 0, 16082, 144, (2882400001, 3735928559), 160, 0),
    ("rtp_only_padding.bin", 236, 0, 120, 27759, 4044047131, (), 0, 224),
    ("rtp_only_padding_with_header_extensions.bin", 244, 0, 98, 22138, 3171065731, (), 0, 224),
    ("rtp_with_sdes_mid.bin", 74, 1, 111, 14156, 1327210925, (), 54, 0),
]


@pytest.mark.parametrize("name,size,marker,pt,seq,ts,csrc,plen,padding", VECTORS)
def test_aiortc_vectors(name, size, marker, pt, seq, ts, csrc, plen, padding):
    data = load(name)
    assert len(data) == size
    p = RtpPacket.parse(data)
    assert p.version == 2
    assert p.marker == bool(marker)
    assert p.payload_type == pt
    assert p.sequence_number == seq
    assert p.timestamp == ts
    assert p.csrc == csrc
    assert len(p.payload) == p.payload_length == plen
    assert p.padding == padding
    assert bytes(p) == data


def test_payload_is_a_view_of_the_datagram():
    data = bytearray(load("rtp.bin"))
    p = RtpPacket.parse(data)
    assert isinstance(p.payload, memoryview)
    data[12] ^= 0xFF
    assert p.payload[0] == data[12]     # no copy was made


def test_header_extensions_one_byte_abs_send_time_and_mid():
    p = RtpPacket.parse(load("rtp_only_padding_with_header_extensions.bin"))
    assert p.extension and p.extension_profile == 0xBEDE
    assert int.from_bytes(p.extensions[2], "big") == 15846540
    p = RtpPacket.parse(load("rtp_with_sdes_mid.bin"))
    assert p.extensions == {9: b"0"}


def test_truncation_and_bad_version_errors():
    rtp = load("rtp.bin")
    with pytest.raises(RtpError, match="length < 12"):
        RtpPacket.parse(rtp[:11])
    with pytest.raises(RtpError, match="bad version"):
        RtpPacket.parse(b"\xc0" + rtp[1:])
    csrc = load("rtp_with_csrc.bin")
    for n in range(12, 20):
        with pytest.raises(RtpError, match="truncated CSRC"):
            RtpPacket.parse(csrc[:n])
    mid = load("rtp_with_sdes_mid.bin")
    for n in range(12, 20):
        with pytest.raises(RtpError, match="truncated header extension"):
            RtpPacket.parse(mid[:n])
    pad = load("rtp_only_padding.bin")
    for tail in (b"\x00", b"\x02"):
        with pytest.raises(RtpError, match="padding"):
            RtpPacket.parse(pad[:12] + tail)


def test_errors_are_value_errors_and_fastsip_errors():
    with pytest.raises(ValueError):
        RtpPacket.parse(b"")
    with pytest.raises(FastSIPError):
        RtpPacket.parse(b"")


def test_build_round_trip_with_csrc_extensions_padding():
    p = RtpPacket(payload_type=96, sequence_number=65535, timestamp=0xFFFFFFFF, ssrc=0xDEADBEEF,
                  payload=b"\x01\x02\x03", marker=True, csrc=(1, 2, 3),
                  extensions={1: b"\xaa", 14: b"x" * 16}, padding=5)
    data = bytes(p)
    assert data[0] == 0x80 | 0x20 | 0x10 | 3
    assert data[1] == 0x80 | 96
    q = RtpPacket.parse(data)
    assert (q.payload_type, q.sequence_number, q.timestamp, q.ssrc, q.marker) == (
        96, 65535, 0xFFFFFFFF, 0xDEADBEEF, True)
    assert q.csrc == (1, 2, 3)
    assert q.extensions == {1: b"\xaa", 14: b"x" * 16}
    assert bytes(q.payload) == b"\x01\x02\x03"
    assert q.padding == 5 and data[-1] == 5
    assert bytes(q) == data and q == p
    with pytest.raises(TypeError):
        hash(q)                     # mutable header fields: not hashable


def test_two_byte_extensions_when_one_byte_cannot_carry_them():
    p = RtpPacket(payload=b"z", extensions={1: b"", 200: b"y" * 40})
    q = RtpPacket.parse(bytes(p))
    assert q.extension_profile == 0x1000
    assert q.extensions == {1: b"", 200: b"y" * 40}


def test_raw_extension_profile_round_trips():
    p = RtpPacket(payload=b"", extension_profile=0x1234, extension_data=b"abcdefgh")
    q = RtpPacket.parse(bytes(p))
    assert q.extension_profile == 0x1234 and q.extension_data == b"abcdefgh"
    assert q.extensions == {}


def test_header_fields_are_writable_for_a_relay():
    data = load("rtp.bin")
    p = RtpPacket.parse(data)
    p.ssrc = 0x01020304
    p.sequence_number = 7
    p.timestamp = 8
    p.payload_type = 8
    p.marker = True
    out = bytes(p)
    assert struct.unpack("!BBHII", out[:12]) == (0x80, 0x88, 7, 8, 0x01020304)
    assert out[12:] == data[12:]
    with pytest.raises(ValueError):
        p.payload_type = 128
    with pytest.raises(OverflowError):
        p.sequence_number = 65536


def test_parse_accepts_any_buffer():
    data = load("rtp_with_csrc.bin")
    for obj in (bytearray(data), memoryview(data), np.frombuffer(data, dtype=np.uint8)):
        p = RtpPacket.parse(obj)
        assert p.csrc == (2882400001, 3735928559)
        assert bytes(p) == data


def test_parse_batch_matches_single_parse_and_flags_bad_rows():
    names = [v[0] for v in VECTORS]
    datagrams = [load(n) for n in names] + [b"\x80", b"\x40" + b"\x00" * 11]
    b = parse_batch(datagrams)
    assert len(b) == len(datagrams)
    for i, d in enumerate(datagrams[:-2]):
        p = RtpPacket.parse(d)
        assert b.valid[i]
        assert (b.payload_type[i], b.marker[i], b.sequence_number[i], b.timestamp[i], b.ssrc[i]) == (
            p.payload_type, p.marker, p.sequence_number, p.timestamp, p.ssrc)
        assert bytes(d[b.payload_offset[i]:b.payload_offset[i] + b.payload_length[i]]) == bytes(p.payload)
    assert list(b.valid[-2:]) == [False, False]
    assert list(b.error[-2:]) == [1, 2]


def test_parse_batch_buffer():
    datagrams = [load(v[0]) for v in VECTORS]
    buf = b"".join(datagrams)
    lengths = np.array([len(d) for d in datagrams], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    b = parse_batch_buffer(buf, offsets, lengths)
    ref = parse_batch(datagrams)
    for col in ("valid", "sequence_number", "timestamp", "ssrc", "payload_offset", "payload_length"):
        assert np.array_equal(getattr(b, col), getattr(ref, col))
    with pytest.raises(ValueError):
        parse_batch_buffer(buf, np.array([len(buf)], dtype=np.int64), np.array([1], dtype=np.int64))


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=80))
def test_fuzz_parse_never_crashes(data):
    try:
        p = RtpPacket.parse(data)
    except RtpError:
        return
    assert bytes(p) == data
    p.extensions  # noqa: B018 - must not raise on any well-framed extension block
    b = parse_batch([data])
    assert b.valid[0]


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=12, max_size=80))
def test_fuzz_version_2_headers(data):
    data = bytes([0x80 | (data[0] & 0x3F)]) + data[1:]
    try:
        p = RtpPacket.parse(data)
    except RtpError as e:
        assert not parse_batch([data]).valid[0]
        assert isinstance(e, ValueError)
        return
    assert bytes(p) == data

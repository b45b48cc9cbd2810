"""RTP benchmarks: fastsip against aiortc, rtpsynth and the struct.unpack_from floor.

Each round handles a batch of packets so per-round overhead does not dominate; the guard
compares minimum round times measured in the same run.
"""

from __future__ import annotations

import struct

import pytest

from fastsip.rtp import RtpPacket, parse_batch

N = 1000


def _stream(n: int = N) -> list[bytes]:
    return [bytes(RtpPacket(payload_type=0, sequence_number=(1000 + i) & 0xFFFF,
                            timestamp=160 * i, ssrc=0x1234, payload=bytes(160)))
            for i in range(n)]


PACKETS = _stream()
_HEADER = struct.Struct("!BBHII")


def test_parse_fastsip(benchmark):
    parse = RtpPacket.parse

    def run():
        for d in PACKETS:
            parse(d)

    benchmark(run)


def test_parse_unpack_from_floor(benchmark):
    """The floor: unpack the fixed header into a tuple, no validation, no object."""
    unpack = _HEADER.unpack_from

    def run():
        for d in PACKETS:
            unpack(d)

    benchmark(run)


def test_parse_aiortc(benchmark):
    rtp = pytest.importorskip("aiortc.rtp")
    parse = rtp.RtpPacket.parse

    def run():
        for d in PACKETS:
            parse(d)

    benchmark(run)


def test_parse_batch_fastsip(benchmark):
    benchmark(parse_batch, PACKETS)


GUARDS = [
    ("test_parse_fastsip", "test_parse_aiortc", 10.0, "RtpPacket.parse vs aiortc (>= 10x)"),
    ("test_parse_fastsip", "test_parse_unpack_from_floor", 1 / 3,
     "RtpPacket.parse vs struct.unpack_from (within 3x)"),
]

"""RTP benchmarks: fastsip against aiortc, rtpsynth and the struct.unpack_from floor.

Each round handles a batch of packets so per-round overhead does not dominate; the guard
compares minimum round times measured in the same run.
"""

from __future__ import annotations

import struct

import pytest

import numpy as np

from fastsip.rtp import RtpPacket, alaw_decode, parse_batch, ulaw_decode, ulaw_encode

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


# G.711: one second of 8 kHz audio is 16 kB of PCM; a batch of 64 kB keeps the loop hot.
PCM = (np.sin(np.arange(32768) / 7.0) * 12000).astype(np.int16)
CODES = ulaw_encode(PCM)
_ULAW_TABLE = ulaw_encode(np.arange(-32768, 32768, dtype=np.int16).astype(np.int16))
_ULAW_TABLE = np.roll(_ULAW_TABLE, -32768)        # index by the sample's uint16 bit pattern
_ULAW_DECODE_TABLE = ulaw_decode(np.arange(256, dtype=np.uint8))


def test_g711_ulaw_encode_fastsip(benchmark):
    out = np.empty(len(PCM), np.uint8)
    benchmark(ulaw_encode, PCM, out)


def test_g711_ulaw_encode_numpy_lookup(benchmark):
    """Reference: the same 64k table, looked up by NumPy fancy indexing."""
    idx = PCM.view(np.uint16)
    out = np.empty(len(PCM), np.uint8)
    benchmark(lambda: np.take(_ULAW_TABLE, idx, out=out))


def test_g711_ulaw_decode_fastsip(benchmark):
    out = np.empty(len(CODES), np.int16)
    benchmark(ulaw_decode, CODES, out)


def test_g711_alaw_decode_fastsip(benchmark):
    out = np.empty(len(CODES), np.int16)
    benchmark(alaw_decode, CODES, out)


def test_g711_ulaw_decode_numpy_lookup(benchmark):
    out = np.empty(len(CODES), np.int16)
    benchmark(lambda: np.take(_ULAW_DECODE_TABLE, CODES, out=out))


GUARDS = [
    ("test_parse_fastsip", "test_parse_aiortc", 10.0, "RtpPacket.parse vs aiortc (>= 10x)"),
    ("test_parse_fastsip", "test_parse_unpack_from_floor", 1 / 3,
     "RtpPacket.parse vs struct.unpack_from (within 3x)"),
    ("test_g711_ulaw_encode_fastsip", "test_g711_ulaw_encode_numpy_lookup", 1.0,
     "G.711 u-law encode vs NumPy table lookup"),
    ("test_g711_ulaw_decode_fastsip", "test_g711_ulaw_decode_numpy_lookup", 1.0,
     "G.711 u-law decode vs NumPy table lookup"),
]

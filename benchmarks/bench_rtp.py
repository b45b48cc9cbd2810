"""RTP benchmarks: fastsip against aiortc, rtpsynth and the struct.unpack_from floor.

Each round handles a batch of packets so per-round overhead does not dominate; the guard
compares minimum round times measured in the same run.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from fastsip.rtp import (
    JitterBuffer,
    RtpPacket,
    alaw_decode,
    parse_batch,
    ulaw_decode,
    ulaw_encode,
)

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


# Jitter buffer: the single-packet path is datagram in (parse + put) and a frame out (get),
# which is what rtpsynth's RtpJBuf.udp_in does in C.
TIMES = [i * 0.02 for i in range(N)]


def test_jitter_fastsip_per_packet(benchmark):
    parse = RtpPacket.parse

    def run():
        jb = JitterBuffer(8000, 0.02)
        put, get = jb.put, jb.get
        for d, t in zip(PACKETS, TIMES):
            put(parse(d), t)
            get(t)

    benchmark(run)


def test_jitter_rtpsynth_per_packet(benchmark):
    jbuf = pytest.importorskip("rtpsynth.RtpJBuf")

    def run():
        jb = jbuf.RtpJBuf(10)
        udp_in = jb.udp_in
        for d in PACKETS:
            udp_in(d)

    benchmark(run)


def test_jitter_aiortc_per_packet(benchmark):
    jb_mod = pytest.importorskip("aiortc.jitterbuffer")
    rtp = pytest.importorskip("aiortc.rtp")
    parse = rtp.RtpPacket.parse

    def run():
        jb = jb_mod.JitterBuffer(capacity=16)
        add = jb.add
        for d in PACKETS:
            packet = parse(d)
            packet._data = packet.payload     # what aiortc's receiver sets after depayloading
            add(packet)

    benchmark(run)


# The batch path: 10 000 packets of a jittery, lossy stream per round, puts and gets in C.
_NB = 10_000
_rng = np.random.default_rng(5)
B_SEQ = (np.arange(_NB) & 0xFFFF).astype(np.uint16)
B_TS = (np.arange(_NB) * 160).astype(np.uint32)
B_ARR = np.arange(_NB) * 0.02 + _rng.exponential(0.01, _NB)
_order = np.argsort(B_ARR)
B_SEQ, B_TS, B_ARR = B_SEQ[_order], B_TS[_order], B_ARR[_order]


def test_jitter_fastsip_batch_10k(benchmark):
    benchmark(lambda: JitterBuffer(8000, 0.02, adaptive=True).playout(B_SEQ, B_TS, B_ARR))


def test_jitter_rtpsynth_10k(benchmark):
    jbuf = pytest.importorskip("rtpsynth.RtpJBuf")
    datagrams = [bytes(RtpPacket(sequence_number=int(s), timestamp=int(t), payload=bytes(160)))
                 for s, t in zip(B_SEQ, B_TS)]

    def run():
        udp_in = jbuf.RtpJBuf(10).udp_in
        for d in datagrams:
            udp_in(d)

    benchmark(run)


GUARDS = [
    ("test_parse_fastsip", "test_parse_aiortc", 10.0, "RtpPacket.parse vs aiortc (>= 10x)"),
    ("test_parse_fastsip", "test_parse_unpack_from_floor", 1 / 3,
     "RtpPacket.parse vs struct.unpack_from (within 3x)"),
    ("test_g711_ulaw_encode_fastsip", "test_g711_ulaw_encode_numpy_lookup", 1.0,
     "G.711 u-law encode vs NumPy table lookup"),
    ("test_g711_ulaw_decode_fastsip", "test_g711_ulaw_decode_numpy_lookup", 1.0,
     "G.711 u-law decode vs NumPy table lookup"),
    ("test_jitter_fastsip_per_packet", "test_jitter_rtpsynth_per_packet", 1.0,
     "jitter buffer parse+put+get vs rtpsynth udp_in (>= 1x)"),
    ("test_jitter_fastsip_per_packet", "test_jitter_aiortc_per_packet", 5.0,
     "jitter buffer parse+put+get vs aiortc parse+add"),
    # rtpsynth runs ~0.13-0.3 us/packet; 10 M packets/s is 0.1 us, so 3x guards it with margin
    ("test_jitter_fastsip_batch_10k", "test_jitter_rtpsynth_10k", 3.0,
     "jitter buffer batch playout vs rtpsynth per packet"),
]

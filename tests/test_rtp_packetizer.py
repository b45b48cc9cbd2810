"""Packetizer / Depacketizer: framing, sequence and timestamp arithmetic, marker, round trip."""

from __future__ import annotations

import numpy as np
import pytest

from fastsip.rtp import (
    Depacketizer,
    FrameKind,
    JitterBuffer,
    Packetizer,
    RtpPacket,
    TelephoneEvent,
    depacketize,
    ulaw_decode,
    ulaw_encode,
)


def test_frames_numbers_and_marks():
    p = Packetizer(0, 8000, 0.02, ssrc=7, sequence_number=65534, timestamp=0xFFFFFF00)
    packets = p.packetize(bytes(range(256)) * 2)          # 512 bytes: 3 frames + 32 left
    assert [len(x.payload) for x in packets] == [160, 160, 160]
    assert [x.sequence_number for x in packets] == [65534, 65535, 0]
    assert [x.timestamp for x in packets] == [0xFFFFFF00, 0xFFFFFFA0, 0x40]
    assert [x.marker for x in packets] == [True, False, False]
    assert all(x.ssrc == 7 and x.payload_type == 0 for x in packets)
    more = p.packetize(bytes(128))                          # 32 pending + 128 = one frame
    assert len(more) == 1 and bytes(more[0].payload) == (bytes(range(256)) * 2)[480:] + bytes(128)
    assert p.packets_sent == 4 and p.octets_sent == 640


def test_random_initial_values_differ():
    a, b = Packetizer(0), Packetizer(0)
    assert (a.ssrc, a.sequence_number, a.timestamp) != (b.ssrc, b.sequence_number, b.timestamp)


def test_silence_advances_timestamp_and_marks_the_next_talkspurt():
    p = Packetizer(8, ssrc=1, sequence_number=10, timestamp=1000)
    first = p.packetize(bytes(160))[0]
    p.silence(0.5)
    nxt = p.packetize(bytes(160))[0]
    assert nxt.sequence_number == first.sequence_number + 1
    assert nxt.timestamp == 1000 + 160 + 4000
    assert nxt.marker
    assert p.packetize(bytes(160), talkspurt_start=True)[0].marker


def test_numpy_input_and_l16_network_order():
    pcm = (np.sin(np.arange(800) / 5) * 8000).astype(np.int16)
    p = Packetizer(0, ssrc=1, sequence_number=0, timestamp=0)
    packets = p.packetize(ulaw_encode(pcm))
    assert len(packets) == 5
    l16 = Packetizer(96, 8000, 0.01, sample_width=2, ssrc=1, sequence_number=0, timestamp=0)
    pk = l16.packetize(pcm[:80])
    assert bytes(pk[0].payload) == pcm[:80].astype(">i2").tobytes()
    assert pk[0].timestamp == 0 and l16.timestamp == 80
    with pytest.raises(TypeError):
        l16.packetize(pcm.astype(np.int32))


def test_round_trip_through_the_wire_and_jitter_buffer():
    pcm = (np.sin(np.arange(1600) / 9) * 10000).astype(np.int16)
    codes = ulaw_encode(pcm)
    p = Packetizer(0, ssrc=99)
    wire = [bytes(x) for x in p.packetize(codes)] + [bytes(x) for x in p.flush()]
    assert depacketize(RtpPacket.parse(d) for d in wire) == codes.tobytes()
    jb = JitterBuffer(8000, 0.02, delay=0.04)
    dp = Depacketizer(160)
    out = bytearray()
    kinds = []
    for i, d in enumerate(wire):
        if i != 4:                         # lose one packet
            jb.put(RtpPacket.parse(d), i * 0.02)
        frame = jb.get(i * 0.02 + 0.001)
        kinds.append(frame.kind)
        out += dp.frame(frame)
    out += dp.frames(jb.flush())
    assert kinds[0] == FrameKind.EMPTY     # prefetching the second frame
    assert out[:160] == b"\xff" * 160
    out = out[160:]
    assert len(out) == len(codes)
    assert out[:4 * 160] == codes.tobytes()[:4 * 160]
    assert out[4 * 160:5 * 160] == codes.tobytes()[3 * 160:4 * 160]    # concealed by repetition
    assert out[5 * 160:] == codes.tobytes()[5 * 160:]
    assert np.abs(ulaw_decode(np.frombuffer(bytes(out), np.uint8))[:640] - pcm[:640]).max() < 400


def test_telephone_event_packets_follow_rfc_4733():
    p = Packetizer(0, ssrc=5, sequence_number=100, timestamp=8000)
    audio = p.packetize(bytes(160))
    events = p.telephone_event("5", 0.1, payload_type=101)
    assert [e.sequence_number for e in events] == list(range(101, 101 + len(events)))
    assert all(e.timestamp == 8160 and e.payload_type == 101 and e.ssrc == 5 for e in events)
    assert [e.marker for e in events] == [True] + [False] * (len(events) - 1)
    parsed = [TelephoneEvent.parse(e.payload) for e in events]
    assert [x.duration for x in parsed] == [160, 320, 480, 640, 800, 800, 800]
    assert [x.end for x in parsed] == [False] * 4 + [True] * 3
    assert {x.digit for x in parsed} == {"5"}
    after = p.packetize(bytes(160))[0]
    assert after.timestamp == 8160 + 800 and after.marker
    assert after.sequence_number == events[-1].sequence_number + 1
    assert audio[0].sequence_number == 100
    with pytest.raises(ValueError):
        TelephoneEvent.for_digit("1", 10.0)


def test_depacketize_fills_gaps_with_silence():
    a = RtpPacket(timestamp=100, payload=b"ab")
    b = RtpPacket(timestamp=105, payload=b"cd")
    assert depacketize([a, b], silence=b"\x00") == b"ab\x00\x00\x00cd"


def test_flush_and_empty_frames():
    p = Packetizer(0, ssrc=1, sequence_number=0, timestamp=0)
    assert p.packetize(b"x" * 100) == []
    last = p.flush()
    assert len(last) == 1 and len(last[0].payload) == 100 and p.timestamp == 100
    assert p.flush() == []
    dp = Depacketizer(4, silence=b"\xff")
    jb = JitterBuffer(8000, 0.02)
    f = jb.get(0.0)
    assert f.kind == FrameKind.EMPTY and dp.frame(f) == b"\xff" * 4

"""MediaSession (sans-IO): pacing on the frame grid, bursts, hold, echo, latching, RTCP SR/RR/BYE
and round-trip time, DTMF out and in (end redundancy counted once), recording, bad input; and
the WAV helpers.  Time is simulated: every ``now`` is chosen by the test."""

from __future__ import annotations

import itertools
import random
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
from procutil import fastsip_env

from fastsip.rtp import (
    Bye,
    ReceiverReport,
    ReceptionReport,
    RtpPacket,
    SenderReport,
    SourceDescription,
    TelephoneEvent,
    build_compound,
    ntp_timestamp,
    parse_rtcp,
    ulaw_decode,
    ulaw_encode,
)
from fastsip.rtp.session import MediaSession
from fastsip.rtp.wav import WavError, read_wav, recording_path, write_wav
from fastsip.sdp import SessionDescription, create_offer, hold, negotiate, resume

PEER = ("127.0.0.1", 40000)


def tone(seconds: float, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def parsed(out: list[tuple[bytes, tuple[str, int]]]) -> list[RtpPacket]:
    return [RtpPacket.parse(d) for d, _ in out]


def session(**kw: object) -> MediaSession:
    kw.setdefault("remote", PEER)
    kw.setdefault("rng", lambda: 0.5)
    return MediaSession(**kw)  # type: ignore[arg-type]


class Meter:
    def __init__(self) -> None:
        self.packets: list[tuple[int, int, float]] = []
        self.rtt: list[float] = []

    def on_packet(self, sequence_number: int, timestamp: int, arrival_time: float) -> None:
        self.packets.append((sequence_number, timestamp, arrival_time))

    def set_round_trip(self, seconds: float) -> None:
        self.rtt.append(seconds)


# -- pacing --------------------------------------------------------------------------------


def test_ten_minutes_of_late_irregular_ticks_keep_the_frame_grid() -> None:
    """600 s of ticks that come 0-15 ms late (and some 60 ms late): every frame is sent once,
    frame k carries ts0 + 160 k and left no later than the lateness of the tick that sent it;
    the count at the end is exactly what 600 s of 20 ms frames make (no drift)."""
    rng = random.Random(7)
    s = session(source=tone(1.0), loop=True)
    epoch = 1000.0
    s.start(epoch)
    packets: list[RtpPacket] = []
    now = t = epoch
    while now < epoch + 600.0:
        late = 0.06 if rng.random() < 0.01 else rng.uniform(0, 0.015)
        now += 0.01
        t = max(t, now + late)                      # (the clock never goes back)
        packets += parsed(s.tick(t))
        # at every tick exactly the frames due so far are out: a sender that re-armed from
        # its own (late) wake-up time would fall behind here, a little more each time
        assert len(packets) == int((t - epoch) / 0.02 + 1e-6) + 1
    packets += parsed(s.tick(max(t, epoch + 600.0)))
    assert len(packets) == 30001                    # frames 0..30000, due at epoch + k*20 ms
    ts0 = packets[0].timestamp
    for k, p in enumerate(packets):
        assert p.timestamp == (ts0 + 160 * k) & 0xFFFFFFFF
        assert p.sequence_number == (packets[0].sequence_number + k) & 0xFFFF
    assert s.tx.skipped_frames == 0
    assert s.tx.max_lateness < 0.08
    assert s.frame_time(30000) == pytest.approx(epoch + 600.0)
    # the looped source: frame k plays source frame k mod 50
    source = ulaw_encode(tone(1.0)).tobytes()
    assert bytes(packets[50 * 11 + 3].payload) == source[3 * 160:4 * 160]


def test_a_stalled_loop_sends_a_bounded_burst_and_skips_the_rest() -> None:
    s = session(source=tone(5.0), max_burst=4)
    s.start(0.0)
    assert s.tick(-0.015) == []                    # nothing before the epoch
    first = parsed(s.tick(0.0))
    assert len(first) == 1 and first[0].marker
    burst = parsed(s.tick(1.0))                     # 50 frames due, the loop slept a second
    assert len(burst) == 4
    assert s.tx.skipped_frames == 50 - 4
    # the frames sent are the newest ones, on the grid, with no gap in sequence numbers
    assert [(p.timestamp - first[0].timestamp) // 160 for p in burst] == [47, 48, 49, 50]
    assert burst[0].sequence_number == (first[0].sequence_number + 1) & 0xFFFF
    assert burst[0].marker
    assert parsed(s.tick(1.005)) == []
    assert s.next_due() == pytest.approx(1.02)


def test_a_source_is_played_once_then_nothing_but_rtcp() -> None:
    s = session(source=tone(0.1), max_burst=200)   # 5 frames
    s.start(0.0)
    sent = parsed(s.tick(2.0))
    assert len(sent) == 5 and s.tx.audio_packets == 5
    assert s.tick(4.0) == []
    assert s.poll_rtcp(10.0)                       # RTCP goes on
    looped = session(source=tone(0.1), loop=True, max_burst=200)
    looped.start(0.0)
    assert len(looped.tick(2.0)) == 101


# -- hold ------------------------------------------------------------------------------------


def test_a_reinvite_to_sendonly_stops_sending_and_resume_starts_a_talkspurt() -> None:
    ours = create_offer("127.0.0.1", 30000)
    theirs = create_offer("127.0.0.1", PEER[1])
    agreed = negotiate(ours, theirs)[0]
    assert agreed is not None
    s = MediaSession.from_negotiated(agreed, source=tone(5.0), rng=lambda: 0.5)
    assert s.remote == PEER and s.payload_type == 0 and s.telephone_event == 101
    s.start(0.0)
    assert len(s.tick(0.1)) == 5
    held = negotiate(ours, SessionDescription.parse(bytes(hold(theirs))))[0]
    assert held is not None and held.direction == "recvonly"
    s.update(held)
    assert s.tick(0.5) == [] and s.tick(1.0) == []
    back = negotiate(ours, SessionDescription.parse(bytes(resume(theirs))))[0]
    assert back is not None
    s.update(back)
    out = parsed(s.tick(1.02))
    assert len(out) == 1 and out[0].marker
    s.set_direction("inactive")
    assert s.tick(2.0) == []
    # a latched stream stays latched through a re-INVITE that keeps the address...
    s.set_direction("sendrecv")
    s.receive(rtp(1, 0, b"\xff" * 160), ("127.0.0.1", 9999), 2.0)
    s.update(back)
    assert {a for _, a in s.tick(2.1)} == {("127.0.0.1", 9999)}
    # ...and follows one that moves it (then latches again)
    moved = create_offer("127.0.0.1", 42000)
    agreed2 = negotiate(ours, moved)[0]
    assert agreed2 is not None
    s.update(agreed2)
    assert {a for _, a in s.tick(2.2)} == {("127.0.0.1", 42000)}
    assert s.remote_rtcp == ("127.0.0.1", 42001)


# -- receiving: latching, echo, meter ----------------------------------------------------------


def rtp(seq: int, ts: int, payload: bytes, *, pt: int = 0, ssrc: int = 0x1234,
        marker: bool = False) -> bytes:
    return bytes(RtpPacket(payload_type=pt, sequence_number=seq, timestamp=ts, ssrc=ssrc,
                           payload=payload, marker=marker))


def test_echo_returns_what_arrives_with_our_ssrc_sequence_and_timestamps_to_the_latched_source(
) -> None:
    meter = Meter()
    s = session(echo=True, source=tone(1.0), ssrc=0xABCDEF01)
    s.meter = meter
    s.start(0.0)
    assert s.tick(0.0) == []                        # echo mode sends nothing of its own
    nat = ("127.0.0.1", 41234)
    replies = []
    for i in range(3):
        payload = bytes([i]) * 160
        replies += s.receive(rtp(100 + i, 5000 + 160 * i, payload, marker=i == 0), nat, 0.02 * i)
    assert [addr for _, addr in replies] == [nat] * 3
    out = parsed(replies)
    assert {p.ssrc for p in out} == {0xABCDEF01}
    assert [p.sequence_number - out[0].sequence_number for p in out] == [0, 1, 2]
    assert [p.timestamp - out[0].timestamp for p in out] == [0, 160, 320]
    assert [bytes(p.payload)[0] for p in out] == [0, 1, 2] and out[0].marker
    assert s.remote == nat and s.latched
    assert [m[:2] for m in meter.packets] == [(100, 5000), (101, 5160), (102, 5320)]
    assert s.rx.received >= 1 and s.tx.echo_packets == 3


def test_symmetric_rtp_sends_to_where_the_peer_sends_from() -> None:
    s = session(source=tone(1.0))
    s.start(0.0)
    assert {a for _, a in s.tick(0.0)} == {PEER}
    s.receive(rtp(1, 0, b"\xff" * 160), ("127.0.0.9", 5555), 0.01)
    assert {a for _, a in s.tick(0.02)} == {("127.0.0.9", 5555)}
    assert s.remote_rtcp == ("127.0.0.9", 5556)
    # latched once: a packet from elsewhere does not steer the stream
    s.receive(rtp(2, 160, b"\xff" * 160), ("127.0.0.66", 1), 0.03)
    assert {a for _, a in s.tick(0.04)} == {("127.0.0.9", 5555)}


def test_only_a_negotiated_payload_type_latches_the_stream() -> None:
    """A stray datagram that parses as RTP must not steer the call's audio: an RTCP report
    sent to the RTP port (a neighbour's, or the peer's own without rtcp-mux) reads as payload
    type 72-76, and an unknown payload type is no proof of the peer either."""
    s = session(source=tone(1.0))
    s.start(0.0)
    rtcp_rr = struct.pack("!BBHI", 0x80, 201, 1, 0xDEAD)      # an empty receiver report
    s.receive(rtcp_rr, ("127.0.0.7", 7001), 0.005)
    s.receive(rtp(1, 0, b"\xff" * 160, pt=99), ("127.0.0.8", 8000), 0.006)
    assert not s.latched
    assert {a for _, a in s.tick(0.0)} == {PEER}
    s.receive(rtp(1, 0, b"\xff" * 160), ("127.0.0.9", 5555), 0.01)
    assert s.latched
    assert {a for _, a in s.tick(0.02)} == {("127.0.0.9", 5555)}


def test_a_new_peer_ssrc_gets_fresh_statistics_recording_and_echo_timestamps() -> None:
    s = session(record=True, echo=True)
    s.start(0.0)
    out = []
    a = bytes(range(160))
    b = bytes(range(50, 210))
    for i in range(10):
        out += s.receive(rtp(100 + i, 1000 + 160 * i, a, ssrc=0xA), PEER, 0.02 * i)
        s.tick(0.02 * i)
    for i in range(10):                             # unrelated numbering, as a new source has
        now = 0.2 + 0.02 * i
        out += s.receive(rtp(40000 + i, 9_000_000 + 160 * i, b, ssrc=0xB), PEER, now)
        s.tick(now)
    s.close(1.0)
    assert s.rx.ssrc == 0xB and s.rx.received == 10
    assert [r.ssrc for r in s.rx_history] == [0xA] and s.rx_history[0].received == 10
    rec = s.recorded()
    assert len(rec) == 20 * 160
    assert np.array_equal(rec[:160], ulaw_decode(a)) and np.array_equal(rec[-160:], ulaw_decode(b))
    echoed = parsed(out)
    steps = [(y.timestamp - x.timestamp) & 0xFFFFFFFF for x, y in itertools.pairwise(echoed)]
    assert steps == [160] * 19                      # our echo keeps one timeline
    assert echoed[10].marker


@pytest.mark.parametrize("data", [
    b"", b"\x80", b"\x00" * 12, b"\x80\x00\x00\x01" + b"\x00" * 7,   # short / version 0
    b"\x8f" + b"\x00" * 20,                                       # CSRC count past the end
    b"\xa0\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09",  # bad padding
    bytes(range(256)) * 4,
])
def test_malformed_rtp_and_rtcp_are_dropped_and_counted(data: bytes) -> None:
    s = session(record=True, echo=True)
    s.start(0.0)
    assert s.receive(data, PEER, 0.0) == []
    assert s.malformed == 1 and s.rx.received == 0
    s.receive_rtcp(data, PEER, 0.0)
    assert s.malformed == 2
    s.receive_rtcp(b"\x81\xc9\x00\x03" + b"\x00" * 12, PEER, 0.0)  # RR: 1 block, 8 octets
    assert s.malformed == 3
    # a telephone-event payload shorter than 4 octets
    s.receive(rtp(9, 0, b"\x01", pt=101), PEER, 0.0)
    s.tick(1.0)
    s.close(2.0)


def test_random_and_mutated_datagrams_never_raise() -> None:
    """20 000 datagrams: mutated and truncated compounds, random RTCP-looking and RTP-looking
    bytes (audio, events, other types; any length) into a recording, echoing session."""
    rng = random.Random(14)
    s = session(record=True, echo=True)
    s.start(0.0)
    seeds = [build_compound([SenderReport(1, 2, 3, 4, 5, [ReceptionReport(s.ssrc, lsr=9)])]),
             build_compound([ReceiverReport(1, [ReceptionReport(7)]), Bye([1], b"bye")])]
    for i in range(20000):
        kind = rng.random()
        if kind < 0.4:
            d = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                d[rng.randrange(len(d))] = rng.randrange(256)
            data = bytes(d[:rng.randrange(len(d) + 1)] if rng.random() < 0.3 else d)
        elif kind < 0.7:
            data = bytes([0x80 | rng.randrange(32), rng.randrange(200, 207)]) + \
                rng.randbytes(rng.randrange(40))
        else:
            data = bytes([0x80 | rng.choice([0, 0x10, 0x20, 0x0F]),
                          rng.choice([0, 8, 101, 0x80 | 101, 13])]) + rng.randbytes(
                rng.randrange(2, 30)) + rng.randbytes(rng.choice([0, 3, 4, 160]))
        now = 0.001 * i
        s.receive_rtcp(data, PEER, now)
        s.receive(data, PEER, now)
        if i % 20 == 0:
            s.tick(now)
            s.poll_rtcp(now)
    s.close(30.0)
    assert s.malformed > 1000


JITTER_OVERFLOW = """
import random
from fastsip.rtp import JitterBuffer, RtpPacket
for ptime, adaptive, seed in [(0.001, False, 3), (0.001, True, 4), (0.02, True, 5),
                              (0.06, False, 6)]:
    rng = random.Random(seed)
    jb = JitterBuffer(8000, ptime, adaptive=adaptive, delay=0.06, max_delay=0.5,
                      shrink_after=1000)
    t, seq = 0.0, 0
    for i in range(3000):
        t += ptime / 3
        r = rng.random()
        if r < 0.02:
            seq = rng.randrange(65536)
        elif r < 0.5:
            seq = (seq + 1) & 0xFFFF
        else:
            seq = (seq + rng.randrange(-5, 50)) & 0xFFFF
        if rng.random() < 0.4:
            jb.put(RtpPacket(sequence_number=seq, timestamp=rng.randrange(1 << 32),
                             payload=b"\\0"), t)
        if rng.random() < 0.33:
            jb.get(t)
print("survived")
"""


def test_jitter_buffer_delay_histogram_overflow(tmp_path: Path) -> None:
    """Random timestamps into a 1 ms jitter buffer crashed the process within 25 packets
    (_jitter.pyx cast a huge delay to int before bounding it); in a subprocess, so a
    regression is a failure, not a crashed test run."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", JITTER_OVERFLOW], capture_output=True,
                            text=True, timeout=60, check=False, cwd=tmp_path,
                            env=fastsip_env())
    assert result.returncode == 0 and "survived" in result.stdout, result.returncode


# -- RTCP ------------------------------------------------------------------------------------


def test_sender_report_counts_what_was_sent_and_reports_on_the_peer() -> None:
    s = session(source=tone(10.0), ssrc=0x11111111, cname="caller@test", wallclock_offset=1.7e9)
    s.start(100.0)
    sent = 0
    for i in range(1, 200):
        sent += len(s.tick(100.0 + 0.01 * i))
    for i in range(50):                             # the peer's stream, 2 of 52 lost
        if i not in (10, 11):
            s.receive(rtp(1000 + i, 160 * i, b"\xff" * 160, ssrc=0x22222222), PEER,
                      100.0 + 0.02 * i)
    due = s.next_due()
    assert s._next_rtcp is not None and 100.0 + 1.0 <= s._next_rtcp <= 100.0 + 3.1
    when = s._next_rtcp
    assert due is not None and due <= when
    sent += len(s.tick(when))
    out = s.poll_rtcp(when)
    assert len(out) == 1 and out[0][1] == (PEER[0], PEER[1] + 1)
    sr, sdes = parse_rtcp(out[0][0])
    assert isinstance(sr, SenderReport) and isinstance(sdes, SourceDescription)
    assert sr.ssrc == 0x11111111
    assert sr.packet_count == sent and sr.octet_count == 160 * sent
    assert sr.ntp_timestamp == ntp_timestamp(when + 1.7e9)
    assert (sr.rtp_timestamp - s._ts0) & 0xFFFFFFFF == round((when - 100.0) * 8000)
    assert sdes.chunks[0].ssrc == 0x11111111 and sdes.chunks[0].cname == b"caller@test"
    (block,) = sr.reports
    assert block.ssrc == 0x22222222 and block.cumulative_lost == 2
    assert block.highest_sequence == 1049
    assert s.poll_rtcp(when + 0.1) == []
    # close: RR/SR + SDES + BYE
    final = s.close(when + 1)
    kinds = [type(p) for p in parse_rtcp(final[0][0])]
    assert kinds[-1] is Bye and kinds[1] is SourceDescription
    assert s.tick(when + 5) == [] and s.close(when + 6) == []


def test_round_trip_time_from_the_peers_receiver_report() -> None:
    meter = Meter()
    s = session(source=tone(10.0), ssrc=0x11111111, wallclock_offset=1.7e9)
    s.meter = meter
    s.start(0.0)
    s.tick(1.0)
    when = s._next_rtcp
    assert when is not None
    (data, _), = s.poll_rtcp(when)
    sr = parse_rtcp(data)[0]
    assert isinstance(sr, SenderReport)
    lsr = (sr.ntp_timestamp >> 16) & 0xFFFFFFFF
    # the peer held our SR 0.25 s, and its RR arrives 0.33 s after we sent the SR: RTT 80 ms
    rr = ReceiverReport(0x22222222, [ReceptionReport(0x11111111, lsr=lsr, dlsr=int(0.25 * 65536))])
    s.receive_rtcp(build_compound([rr]), ("127.0.0.1", 40001), when + 0.33)
    assert s.round_trip == pytest.approx(0.08, abs=0.001)
    assert meter.rtt == [s.round_trip]
    # a block about someone else, or without LSR, changes nothing
    s.receive_rtcp(build_compound([ReceiverReport(2, [ReceptionReport(3, lsr=lsr)])]),
                   PEER, when + 1)
    assert len(meter.rtt) == 1
    # a peer SR gives our next report LSR/DLSR
    peer_sr = SenderReport(0x22222222, ntp_timestamp(1.7e9 + when + 2), 0, 0, 0)
    for i in range(3):                              # past RFC 3550 A.1 probation
        s.receive(rtp(1 + i, 160 * i, b"\xff" * 160, ssrc=0x22222222), PEER, when + 1.9)
    s.receive_rtcp(build_compound([peer_sr]), PEER, when + 2)
    report = s.rtcp_report(when + 2.5)[0]
    block = report.reports[0]  # type: ignore[union-attr]
    assert block.lsr == (peer_sr.ntp_timestamp >> 16) & 0xFFFFFFFF
    assert block.dlsr == int(0.5 * 65536)
    s.receive_rtcp(build_compound([Bye([0x22222222])]), PEER, when + 3)
    assert s.remote_bye


# -- DTMF ------------------------------------------------------------------------------------


def test_send_dtmf_paces_rfc4733_events_and_a_receiver_counts_each_once() -> None:
    s = session(source=tone(5.0), ssrc=7)
    s.start(0.0)
    s.tick(0.0)
    end = s.send_dtmf("1#", 0.05, duration=0.1, gap=0.1)
    out = []
    now = 0.0
    while now < end + 0.2:
        now += 0.02
        out += parsed(s.tick(now))
    events = [p for p in out if p.payload_type == 101]
    assert len(events) == 14                        # 4 updates + 3 ends, per digit
    for digit, group in (("1", events[:7]), ("#", events[7:])):
        assert [p.marker for p in group] == [True] + [False] * 6
        assert len({p.timestamp for p in group}) == 1
        evs = [TelephoneEvent.parse(p.payload) for p in group]
        assert {e.digit for e in evs} == {digit}
        assert [e.duration for e in evs] == [160, 320, 480, 640, 800, 800, 800]
        assert [e.end for e in evs] == [False] * 4 + [True] * 3
    seqs = [p.sequence_number for p in out]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    # audio stops during the events, and the audio after one starts a talkspurt
    i = out.index(events[6])
    assert out[i + 1].payload_type == 0 and out[i + 1].marker
    # the receiver: each end packet sent twice more (and once duplicated as sipp's pcaps do)
    r = session()
    r.start(0.0)
    got: list[tuple[str, int]] = []
    r.on_dtmf = lambda d, ms: got.append((d, ms))
    for p in out:
        for _ in range(2 if p.payload_type == 101 else 1):
            r.receive(bytes(p), PEER, 1.0)
    assert r.dtmf_received == [("1", 100), ("#", 100)] == got
    assert r.event_packets == 28


def test_an_event_whose_end_packets_are_all_lost_is_reported_once_at_the_next_or_at_close() -> None:
    r = session()
    r.start(0.0)
    for i, d in enumerate((160, 320, 480)):
        r.receive(rtp(i, 8000, bytes(TelephoneEvent(5, duration=d)), pt=101), PEER, 0.0)
    assert r.dtmf_received == []
    r.receive(rtp(10, 16000, bytes(TelephoneEvent(11, end=True, duration=400)), pt=101), PEER, 1)
    assert r.dtmf_received == [("5", 60), ("#", 50)]
    r.receive(rtp(11, 16000, bytes(TelephoneEvent(11, end=True, duration=400)), pt=101), PEER, 1)
    r.receive(rtp(3, 8000, bytes(TelephoneEvent(5, end=True, duration=480)), pt=101), PEER, 1)
    r.receive(rtp(12, 24000, bytes(TelephoneEvent(0, duration=160)), pt=101), PEER, 2)
    r.close(3.0)
    assert r.dtmf_received == [("5", 60), ("#", 50), ("0", 20)]


def test_send_dtmf_needs_an_agreed_event_type_and_real_digits() -> None:
    s = session(telephone_event=None)
    s.start(0.0)
    with pytest.raises(ValueError):
        s.send_dtmf("1", 0.0)
    s2 = session()
    s2.start(0.0)
    with pytest.raises(ValueError):
        s2.send_dtmf("1x", 0.0)


# -- recording -------------------------------------------------------------------------------


def test_recording_plays_through_the_jitter_buffer_and_conceals_a_lost_frame() -> None:
    s = session(record=True)
    s.start(0.0)
    pcm = tone(1.0, 300)
    codes = ulaw_encode(pcm).tobytes()
    lost = 20
    for i in range(50):
        now = 0.02 * i
        if i != lost:
            # reordered pairs on the way
            s.receive(rtp(500 + i, 160 * i, codes[160 * i:160 * (i + 1)]), PEER, now)
        s.tick(now)
    s.close(1.2)
    rec = s.recorded()
    expected = ulaw_decode(ulaw_encode(pcm))
    assert len(rec) == len(expected)
    assert np.array_equal(rec[:160 * lost], expected[:160 * lost])
    # MISSING: the previous frame repeated once
    assert np.array_equal(rec[160 * lost:160 * (lost + 1)], expected[160 * (lost - 1):160 * lost])
    assert np.array_equal(rec[160 * (lost + 1):], expected[160 * (lost + 1):])
    assert s.discarded == 0 and s.stats()["received"]["discarded"] == 0


def test_recording_follows_the_peers_packet_size_and_skips_the_fill_and_the_tail() -> None:
    s = session(record=True, codec="PCMA", ptime=0.02)
    s.start(0.0)
    data = bytes(range(256)) * 30
    for i in range(20):                             # 30 ms packets against our 20 ms
        s.receive(rtp(i, 240 * i, data[240 * i:240 * (i + 1)], pt=8), PEER, 0.03 * i)
        s.tick(0.03 * i)
    s.tick(5.0)                                     # long after: the buffer ran dry
    s.close(6.0)
    from fastsip.rtp import alaw_decode
    assert np.array_equal(s.recorded(), alaw_decode(data[:240 * 20]))


# -- WAV -------------------------------------------------------------------------------------


def test_wav_round_trip_mixdown_resampling_and_refusals(tmp_path: Path) -> None:
    pcm = tone(0.5)
    assert np.array_equal(read_wav(write_wav(tmp_path / "a.wav", pcm)), pcm)
    stereo = tmp_path / "s.wav"
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        frames = np.stack([np.full(1600, 1000, np.int16), np.full(1600, 3000, np.int16)], 1)
        w.writeframes(frames.astype("<i2").tobytes())
    mono = read_wav(stereo)
    assert len(mono) == 800 and set(mono.tolist()) == {2000}
    for width in (1, 3):
        bad = tmp_path / f"w{width}.wav"
        with wave.open(str(bad), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(width)
            w.setframerate(8000)
            w.writeframes(b"\x00" * width * 10)
        with pytest.raises(WavError, match=rf"w{width}\.wav: {8 * width}-bit"):
            read_wav(bad)
    (tmp_path / "junk.wav").write_bytes(b"RIFFnope")
    with pytest.raises(WavError, match="junk.wav"):
        read_wav(tmp_path / "junk.wav")
    with pytest.raises(WavError, match="missing.wav"):
        read_wav(tmp_path / "missing.wav")
    p = recording_path(tmp_path, "../../etc/pass wd@host")
    assert p.parent == tmp_path and "/" not in p.name and p.name.endswith(".wav")
    assert struct.calcsize("h") == 2

"""The compiled send path (fastsip.rtp._sender) against the session's own Python path.

Twin sessions -- same SSRC, first sequence number and timestamp -- are driven through the same
ticks: one with its SendState attached to a Sender (plain audio frames granted and sent from C),
one without (every frame built in Python).  Both send from real sockets to real sockets on
127.0.0.1, and what arrives must be the same bytes, through RFC 4733 events, a late loop's
burst, hold and resume, a new source and a looped source's wrap; and each datagram must be
right on its own: header fields from the frame grid, payload the source's G.711 octets."""

from __future__ import annotations

import itertools
import socket
import struct
import sys
import time

import numpy as np
import pytest

from fastsip.rtp import RtpPacket, TelephoneEvent, ulaw_encode
from fastsip.rtp._sender import Sender, SendState
from fastsip.rtp.session import MediaSession

HOST = "127.0.0.1"


def tone(seconds: float, freq: float) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (8000 * np.sin(2 * np.pi * freq * t) + 50 * np.cos(7 * t)).astype(np.int16)


def udp(family: int = socket.AF_INET, host: str = HOST) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket, into: list[bytes]) -> None:
    while True:
        try:
            into.append(sock.recv(4096))
        except BlockingIOError:
            return


def twins(remote_a: tuple[str, int], remote_b: tuple[str, int], source: np.ndarray,
          **kw: object) -> tuple[MediaSession, MediaSession]:
    a = MediaSession(remote=remote_a, source=source, ssrc=0x5EED1234, rng=lambda: 0.5,
                     **kw)  # type: ignore[arg-type]
    b = MediaSession(remote=remote_b, source=source, ssrc=0x5EED1234, rng=lambda: 0.5,
                     **kw)  # type: ignore[arg-type]
    # the random starting points (RFC 3550 5.1), made the same; ts0 near the 32-bit wrap and
    # the sequence near the 16-bit one, so both wrap during the call
    for s in (a, b):
        s._ts0 = s._st.ts0 = s._echo_ts = s._echo_next = 0xFFFFFFFF - 160 * 40
        s._sequence = 0xFFFF - 30
    return a, b


@pytest.mark.parametrize("ticks", ["every", "when_due"])
def test_compiled_and_python_paths_put_the_same_bytes_on_the_wire(ticks: str) -> None:
    """``every``: the compiled twin's session is ticked as often as the Python one (it grants
    and returns nothing); ``when_due``: only when its send state asks (``wake``), as the
    engine does -- between, the Sender paces the frames alone, a late loop's burst included."""
    rx_a, rx_b, tx_a, tx_b = udp(), udp(), udp(), udp()
    sender = Sender()
    first, second = tone(0.5, 440), tone(0.3, 1000)
    a, b = twins(rx_a.getsockname(), rx_b.getsockname(), first, loop=True)
    got_a: list[bytes] = []
    got_b: list[bytes] = []
    granted = a_ticks = 0
    polled: list[MediaSession] = []
    rtcp: dict[bool, list[tuple[bytes, tuple[str, int]]]] = {True: [], False: []}
    second_from = -1

    def new_source(s: MediaSession) -> None:
        nonlocal second_from
        s.set_source(second, loop=False)
        second_from = s._source_frame0

    schedule = [(0.5, lambda s: s.send_dtmf("15#", 0.5)),
                (1.6, lambda s: s.set_direction("inactive")),      # hold: nothing but RTCP
                (1.9, lambda s: s.set_direction("sendrecv")),
                (2.5, new_source),
                (3.0, lambda s: s.send_dtmf("9", 3.0))]
    # a 10 ms grid with late ticks, and one stall longer than max_burst frames
    times = [round(i * 0.01 + (0.004 if i % 7 == 3 else 0.0), 6) for i in range(400)]
    times[130:150] = []                       # 200 ms asleep: frames skipped
    try:
        a.start(0.0)
        b.start(0.0)
        sender.attach(a.send_state, tx_a.fileno())
        assert a.send_state.attached and not b.send_state.attached
        for now in times:
            while schedule and schedule[0][0] <= now:
                action = schedule.pop(0)[1]
                action(a)
                action(b)
            for s, sock in ((a, tx_a), (b, tx_b)):
                if s is a and ticks == "when_due" and a.send_state.wake > now:
                    continue
                if s is a:
                    a_ticks += 1
                for data, addr in s.tick(now):
                    sock.sendto(data, addr)
                polled.append(s)
            granted += sender.flush(now)
            # RTCP after the flush, as the engine does: an SR counts this tick's frames
            for s in polled:
                rtcp[s is a] += s.poll_rtcp(now)
            polled.clear()
            drain(rx_a, got_a)
            drain(rx_b, got_b)
        for _ in range(20):
            drain(rx_a, got_a)
            drain(rx_b, got_b)
            if len(got_a) >= a.tx.packets and len(got_b) >= b.tx.packets:
                break
            select_wait(rx_a, rx_b)
    finally:
        for sock in (rx_a, rx_b, tx_a, tx_b):
            sock.close()

    assert sender.errors == 0
    if ticks == "when_due":                    # the session's own ticks: events, hold, edges
        assert a_ticks < len(times) / 4, a_ticks
    assert len(got_b) == b.tx.packets > 120
    assert got_a == got_b                        # the same datagrams, byte for byte
    assert [d for d, _ in rtcp[True]] == [d for d, _ in rtcp[False]] != []
    # the compiled path really sent the audio, and the session counted it
    assert granted == sender.sent == a.tx.audio_packets == b.tx.audio_packets
    ta, tb = a.tx, b.tx
    assert (ta.packets, ta.octets, ta.event_packets, ta.skipped_frames) == \
        (tb.packets, tb.octets, tb.event_packets, tb.skipped_frames)
    assert ta.skipped_frames >= 1
    assert 0 <= ta.max_lateness < 0.11
    # the RTCP sender reports count the same
    assert a.rtcp_report(4.0)[0] == b.rtcp_report(4.0)[0]

    # each datagram on its own: version, SSRC, consecutive sequence numbers across the
    # 16-bit wrap, timestamps from the frame grid across the 32-bit wrap, the payload the
    # source's octets, markers where a talkspurt starts
    packets = [RtpPacket.parse(d) for d in got_a]
    assert all(p.version == 2 and p.ssrc == 0x5EED1234 for p in packets)
    assert all((q.sequence_number - p.sequence_number) & 0xFFFF == 1
               for p, q in itertools.pairwise(packets))
    assert packets[0].sequence_number == 0xFFFF - 30
    ts0 = 0xFFFFFFFF - 160 * 40
    enc_first, enc_second = bytes(ulaw_encode(first)), bytes(ulaw_encode(second))
    audio = [p for p in packets if p.payload_type == 0]
    events = [p for p in packets if p.payload_type == 101]
    assert len(events) == 4 * 7 and len({p.timestamp for p in events}) == 4
    assert [TelephoneEvent.parse(events[7 * i].payload).digit for i in range(4)] == \
        ["1", "5", "#", "9"]
    assert second_from > 100
    for p in audio:
        k = ((p.timestamp - ts0) & 0xFFFFFFFF) // 160
        assert (p.timestamp - ts0) & 0xFFFFFFFF == 160 * k
        if k < second_from:
            off = (k * 160) % len(enc_first)
            assert bytes(p.payload) == enc_first[off:off + 160], k
        else:
            off = (k - second_from) * 160
            assert bytes(p.payload) == enc_second[off:off + 160], k
    assert sum(1 for p in audio if p.timestamp - ts0 & 0xFFFFFFFF >= 160 * second_from) == 15
    markers = [p for p in packets if p.marker]
    # the first packet; each event's first; the audio after the first three events (the
    # fourth comes after the last source ran out); after the stall; resuming after hold; the
    # new source
    assert len(markers) == 1 + 4 + 3 + 1 + 1 + 1, [(p.payload_type, p.timestamp) for p in markers]
    assert struct.unpack_from("!H", got_a[0], 2)[0] == 0xFFFF - 30


def select_wait(*socks: socket.socket) -> None:
    import select

    select.select(list(socks), [], [], 0.05)


def test_a_session_without_an_ip_destination_sends_by_its_python_path() -> None:
    """A name (not an IP literal) is the Python path's to resolve: nothing is granted."""
    rx, tx = udp(), udp()
    sender = Sender()
    s = MediaSession(remote=("localhost", rx.getsockname()[1]), source=tone(0.2, 440))
    try:
        s.start(0.0)
        sender.attach(s.send_state, tx.fileno())
        out = s.tick(0.0) + s.tick(0.02)
        assert sender.flush(0.02) == 0 and len(out) == 2
        assert not s.send_state.has_remote
    finally:
        rx.close()
        tx.close()


def test_detach_withdraws_a_grant_so_the_python_path_sends_it() -> None:
    s = MediaSession(remote=(HOST, 9), source=tone(0.2, 440))
    sender = Sender()
    s.start(0.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sender.attach(s.send_state, sock.fileno())
        with pytest.raises(ValueError):
            sender.attach(s.send_state, sock.fileno())
        assert s.tick(0.02) == [] and s.send_state.grant > 2      # no end: no event queued
        assert s.send_state.wake > 0.5                # the first RTCP report: a second or so away
        sender.detach(s.send_state)
        assert len(sender) == 0 and not s.send_state.attached
        out = [RtpPacket.parse(d) for d, _ in s.tick(0.02)]
    assert [p.timestamp - s._ts0 & 0xFFFFFFFF for p in out] == [0, 160]
    assert out[0].marker and s.tx.packets == 2


def test_an_echo_session_needs_no_tick_per_frame_and_the_sender_sends_no_source() -> None:
    """Echo mode sends what arrives (from receive()), never its source: the grant keeps the
    frame grid, nothing goes out of the Sender, and an RFC 4733 event still does (Python)."""
    s = MediaSession(remote=(HOST, 9), source=tone(0.2, 440), loop=True, echo=True,
                     rng=lambda: 0.5)
    sender = Sender()
    s.start(0.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sender.attach(s.send_state, sock.fileno())
        assert s.tick(0.0) == [] and s.send_state.grant > 1 and s.send_state.wake > 0.5
        assert sender.flush(0.5) == 0 and s.send_state.next_frame == 26
        echoed = s.receive(struct.pack("!BBHII", 0x80, 0, 1, 1000, 5) + b"\x01" * 160,
                           (HOST, 9), 0.5)
        assert len(echoed) == 1 and echoed[0][0][12:] == b"\x01" * 160
        s.send_dtmf("7", 0.5)
        assert s.send_state.wake < 0                       # taken back: a tick decides
        events = [RtpPacket.parse(d) for t in (0.6, 0.7) for d, _ in s.tick(t)]
        assert [p.payload_type for p in events] == [101] * 7 and events[0].marker
        assert sender.flush(0.7) == 0
        s.echo = False                                     # the source again, from C
        s.tick(0.8)
        assert sender.flush(0.8) == 5 and s.tx.audio_packets == 5


@pytest.mark.skipif(not socket.has_ipv6, reason="no IPv6")
def test_the_compiled_path_sends_to_ipv6() -> None:
    try:
        rx, tx = udp(socket.AF_INET6, "::1"), udp(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("::1 is not configured")
    sender = Sender()
    s = MediaSession(remote=rx.getsockname()[:2], source=tone(0.2, 440), ssrc=77)
    got: list[bytes] = []
    try:
        s.start(0.0)
        sender.attach(s.send_state, tx.fileno())
        assert s.tick(0.04) == []
        assert sender.flush(0.04) == 3 and sender.errors == 0
        for _ in range(20):
            drain(rx, got)
            if len(got) == 3:
                break
            select_wait(rx)
    finally:
        rx.close()
        tx.close()
    assert [RtpPacket.parse(d).ssrc for d in got] == [77] * 3
    assert s.tx.packets == 3 and s.tx.octets == 480


def test_send_state_refuses_what_it_cannot_address() -> None:
    st = SendState()
    assert not st.set_remote("example.invalid", 5000)
    assert not st.set_remote(HOST, 0) and not st.set_remote(HOST, 70000)
    assert st.set_remote(HOST, 5000) and st.has_remote
    assert not st.set_remote("fe80::1%eth0", 5000) and not st.has_remote


# -- the receive batch (fastsip.rtp._receiver) ---------------------------------------------------


def test_receiver_reads_a_batch_with_sources_and_kernel_stamps() -> None:
    from fastsip.rtp._receiver import Receiver

    rx, a, b = udp(), udp(), udp()
    stamped = sys.platform.startswith("linux")
    if stamped:
        rx.setsockopt(socket.SOL_SOCKET, 35, 1)          # SO_TIMESTAMPNS
    reader = Receiver()
    addr_a, addr_b = a.getsockname(), b.getsockname()
    try:
        assert reader.read(rx.fileno()) == []             # nothing queued: no error, no wait
        before = time.time()
        for i in range(70):
            (a if i != 5 else b).sendto(bytes([i]) * (i + 1), rx.getsockname())
        a.sendto(b"x" * 3000, rx.getsockname())           # longer than a slot
        select_wait(rx)
        got = reader.read(rx.fileno(), 100, 1000.0, 7.0)
        rest = reader.read(rx.fileno(), 100, 1000.0, 7.0)
        after = time.time()
    finally:
        for sock in (rx, a, b):
            sock.close()
    assert len(got) == 64 and len(rest) == 7                     # at most 64 per read
    everything = got + rest
    assert [d for d, _, _ in everything[:70]] == [bytes([i]) * (i + 1) for i in range(70)]
    assert everything[70][0] in (b"", b"x" * 2048)               # never more than a slot
    sources = [s for _, s, _ in everything[:70]]
    assert sources[5] == addr_b and sources[0] == addr_a
    assert sources[0] is sources[4] and sources[6] is sources[7]  # shared while unchanged
    for _, _, t in everything:
        if stamped:
            assert before - 1000.0 - 0.01 <= t <= after - 1000.0 + 0.01
        else:
            assert t == 7.0

"""The relay's compiled packet path (fastsip.rtp.Relay) over real UDP sockets on loopback.

A "caller" and a "callee" socket stand for the two user agents; the relay has one socket per
leg.  Every test runs on both packet paths (the ``backend`` fixture): recvmmsg/sendmmsg, driven
by ``drain()`` per leg, and io_uring (where the kernel allows it), driven by ``poll()`` once
the ring is watched -- both waiting for readability with a bounded ``select``.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import needs_ipv6

from fastsip.rtp import Relay as _Relay
from fastsip.rtp import RtpPacket
from fastsip.rtp._relay import BACKEND_ENV, LATCH_FIRST, LATCH_OFF, LATCH_STRICT, batched

TIMEOUT = 2.0       # seconds any single wait may take


Addr = tuple[str, int]

BACKEND = "mmsg"    # the backend fixture's choice: what Relay() below makes


def _uring_works() -> bool:
    try:
        return _Relay(backend="io_uring").backend == "io_uring"
    except OSError:
        return False


Uring = pytest.mark.skipif(not _uring_works(), reason="io_uring unavailable here")


# io_uring_coop: the ring Linux 6.0 gets (no DEFER_TASKRUN), forced where 6.1 would defer.
@pytest.fixture(autouse=True, params=["mmsg", pytest.param("io_uring", marks=Uring),
                                      pytest.param("io_uring_coop", marks=Uring)])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    global BACKEND
    BACKEND = request.param
    yield BACKEND
    BACKEND = "mmsg"


def Relay(batch: int = 64, *, max_batches: int = 8) -> _Relay:
    """The backend fixture's Relay: a stand-in for the class in every test below."""
    return _Relay(batch, max_batches=max_batches, backend=BACKEND)


def rtp(seq: int, ts: int = 0, ssrc: int = 0x1234, payload: bytes = b"") -> bytes:
    return bytes(RtpPacket(payload_type=0, sequence_number=seq & 0xFFFF,
                           timestamp=ts & 0xFFFFFFFF, ssrc=ssrc,
                           payload=payload or seq.to_bytes(4, "big") * 40))


class Net:
    """UDP sockets made by a test, all closed at its end."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def udp(self, host: str = "127.0.0.1", rcvbuf: int | None = None) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        self.socks.append(s)
        if rcvbuf:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((host, 0))
        s.setblocking(False)
        return s

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def net() -> Iterator[Net]:
    n = Net()
    yield n
    n.close()


def addr(s: socket.socket) -> Addr:
    a = s.getsockname()
    return (a[0], a[1])


def wait_readable(s: socket.socket, timeout: float = TIMEOUT) -> bool:
    return bool(select.select([s], [], [], timeout)[0])


def pump(relay: Relay, leg: int, sock: socket.socket, now: float, expect: int) -> int:
    """Drain ``leg`` until ``expect`` datagrams were read (bounded in time).  With io_uring:
    poll the ring (every leg) until as many were read."""
    got = 0
    deadline = time.monotonic() + TIMEOUT
    if relay.backend == "io_uring":
        ring = relay.fileno()
        while got < expect and time.monotonic() < deadline:
            if select.select([ring], [], [], max(0.0, deadline - time.monotonic()))[0]:
                got += relay.poll(now)
        return got
    while got < expect and time.monotonic() < deadline:
        if wait_readable(sock, max(0.0, deadline - time.monotonic())):
            got += relay.drain(leg, now)
    return got


def receive(s: socket.socket, n: int, timeout: float = TIMEOUT) -> list[tuple[bytes, Addr]]:
    """Up to ``n`` datagrams from ``s`` (fewer if none comes for ``timeout``)."""
    out: list[tuple[bytes, Addr]] = []
    while len(out) < n and wait_readable(s, timeout):
        data, source = s.recvfrom(65536)
        out.append((data, (source[0], source[1])))
    return out


def quiet(s: socket.socket, timeout: float = 0.2) -> bool:
    """Nothing arrives on ``s`` for ``timeout``."""
    return not wait_readable(s, timeout)


class Call:
    """Two relay legs bridged: caller <-> leg 1 | relay | leg 2 <-> callee."""

    def __init__(self, net: Net, relay: Relay, caller_host: str = "127.0.0.1",
                 callee_host: str = "127.0.0.1", leg_a_host: str = "127.0.0.1",
                 leg_b_host: str = "127.0.0.1", rtcp: bool = False,
                 rcvbuf: int | None = None) -> None:
        self.relay = relay
        self.caller = net.udp(caller_host, rcvbuf)
        self.callee = net.udp(callee_host, rcvbuf)
        self.leg_a = net.udp(leg_a_host, rcvbuf)
        self.leg_b = net.udp(leg_b_host, rcvbuf)
        relay.add_leg(1, self.leg_a.fileno(), rtcp=rtcp)
        relay.add_leg(2, self.leg_b.fileno(), rtcp=rtcp)
        relay.bridge(1, 2)
        relay.set_peer(1, *addr(self.caller))
        relay.set_peer(2, *addr(self.callee))

    def send_a(self, packets: list[bytes], now: float = 1.0,
               source: socket.socket | None = None) -> None:
        """``packets`` from the caller (or ``source``) to leg 1, drained."""
        for p in packets:
            (source or self.caller).sendto(p, addr(self.leg_a))
        assert pump(self.relay, 1, self.leg_a, now, len(packets)) == len(packets)

    def send_b(self, packets: list[bytes], now: float = 1.0) -> None:
        for p in packets:
            self.callee.sendto(p, addr(self.leg_b))
        assert pump(self.relay, 2, self.leg_b, now, len(packets)) == len(packets)

    def a_to_b(self, packets: list[bytes], now: float = 1.0) -> list[tuple[bytes, Addr]]:
        self.send_a(packets, now)
        return receive(self.callee, len(packets))

    def b_to_a(self, packets: list[bytes], now: float = 1.0) -> list[tuple[bytes, Addr]]:
        self.send_b(packets, now)
        return receive(self.caller, len(packets))


def test_module_flags():
    assert batched is (sys.platform == "linux")
    assert len({LATCH_OFF, LATCH_FIRST, LATCH_STRICT}) == 3


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_bridge_relays_from_the_leg_port_in_order(net, host):
    call = Call(net, Relay(), host, host, host, host)
    packets = [rtp(i) for i in range(50)]
    got = call.a_to_b(packets)
    assert [d for d, _ in got] == packets
    assert {source for _, source in got} == {addr(call.leg_b)}
    back = [rtp(i, ssrc=0x9999) for i in range(20)]
    got = call.b_to_a(back)
    assert [d for d, _ in got] == back
    assert {source for _, source in got} == {addr(call.leg_a)}
    stats = call.relay.stats(1)
    assert stats["packets"] == 50
    assert stats["bytes"] == sum(map(len, packets))
    assert stats["errors"] == 0
    assert call.relay.stats(2)["sent"] == 50
    assert call.relay.legs == 2


@needs_ipv6
def test_ipv4_caller_to_ipv6_callee(net):
    call = Call(net, Relay(), caller_host="127.0.0.1", leg_a_host="127.0.0.1",
                callee_host="::1", leg_b_host="::1")
    packets = [rtp(i) for i in range(10)]
    got = call.a_to_b(packets)
    assert [d for d, _ in got] == packets
    assert got[0][1] == addr(call.leg_b)
    got = call.b_to_a(packets)
    assert [d for d, _ in got] == packets
    assert got[0][1] == addr(call.leg_a)


@needs_ipv6
def test_peer_family_unlike_the_fd_counts_an_error(net):
    relay = Relay()
    call = Call(net, relay, leg_b_host="::1")
    relay.set_peer(2, *addr(call.callee))     # an IPv4 remote for an IPv6 leg
    call.send_a([rtp(1)])
    assert quiet(call.callee)
    assert relay.stats(1)["errors"] == 1


def test_latching_learns_the_callers_real_source(net):
    relay = Relay()
    call = Call(net, relay)
    # The caller's SDP names 127.0.0.2:X, where nothing listens; it sends from 127.0.0.1:Y.
    sdp = ("127.0.0.2", 9)
    relay.set_peer(1, *sdp)
    # Before the caller's first packet, the callee's go to the SDP address (lost there).
    call.send_b([rtp(1)])
    assert relay.stats(1)["peer"] == sdp and not relay.stats(1)["latched"]
    assert relay.stats(1)["sent"] == 1
    call.a_to_b([rtp(1)])
    assert relay.stats(1)["latched"]
    assert relay.stats(1)["peer"] == addr(call.caller)
    assert relay.stats(1)["sdp_peer"] == sdp
    got = call.b_to_a([rtp(i, ssrc=7) for i in range(5)])
    assert len(got) == 5 and got[0][1] == addr(call.leg_a)
    # A new SDP address (re-INVITE) forgets the learned source until the next packet.
    relay.set_peer(1, *sdp)
    assert not relay.stats(1)["latched"]


def test_latch_first_keeps_the_first_source_until_it_falls_silent(net):
    relay = Relay()
    call = Call(net, relay)
    other = net.udp()
    call.send_a([rtp(1)], now=10.0)
    # Another source is relayed, but the return path stays with the first...
    call.send_a([rtp(2)], now=11.0, source=other)
    assert len(receive(call.callee, 2)) == 2
    assert relay.stats(1)["peer"] == addr(call.caller)
    call.send_a([rtp(3)], now=12.0)
    call.send_a([rtp(4)], now=14.9, source=other)    # the latched source spoke 2.9 s ago
    assert relay.stats(1)["peer"] == addr(call.caller)
    # ...until the latched source has sent nothing for 3 s.
    call.send_a([rtp(5)], now=15.0, source=other)
    assert relay.stats(1)["peer"] == addr(other)
    assert relay.stats(1)["errors"] == 0
    call.send_b([rtp(1, ssrc=5)])
    assert receive(other, 1)[0][0] == rtp(1, ssrc=5)
    assert quiet(call.caller)


def test_latch_strict_drops_a_third_party_and_counts_it(net):
    relay = Relay()
    call = Call(net, relay)
    relay.set_latching(1, LATCH_STRICT)
    intruder = net.udp()
    call.a_to_b([rtp(1)])
    # strict: no re-latch, however long the latched source was silent
    call.send_a([b"\x80\x00\x00\x05" + bytes(40)], now=100.0, source=intruder)
    assert quiet(call.callee)
    stats = relay.stats(1)
    assert stats["errors"] == 1
    assert stats["peer"] == addr(call.caller)
    assert stats["packets"] == 2              # counted as received, as rtpengine does
    assert [d for d, _ in call.a_to_b([rtp(2)], now=100.0)] == [rtp(2)]


def test_latch_off_keeps_sending_to_the_sdp_address(net):
    relay = Relay()
    call = Call(net, relay)
    sdp_socket = net.udp()
    relay.set_peer(1, *addr(sdp_socket))
    relay.set_latching(1, LATCH_OFF)
    call.a_to_b([rtp(1)])                    # the caller sends from elsewhere
    assert not relay.stats(1)["latched"]
    call.send_b([rtp(1, ssrc=2)])
    assert receive(sdp_socket, 1)[0][0] == rtp(1, ssrc=2)
    assert quiet(call.caller)


def test_a_leg_with_no_bridge_counts_drops_and_still_latches(net):
    relay = Relay()
    leg = net.udp()
    caller = net.udp()
    relay.add_leg(5, leg.fileno())
    caller.sendto(rtp(1), addr(leg))
    assert pump(relay, 5, leg, 1.0, 1) == 1
    stats = relay.stats(5)
    assert stats["errors"] == 1 and stats["packets"] == 1
    assert stats["latched"] and stats["peer"] == addr(caller)


def test_stray_rtcp_on_an_rtp_leg_does_not_latch(net):
    # rtpengine GH #697: Asterisk sends RTCP to the RTP port; that must not become the
    # return address.
    relay = Relay()
    call = Call(net, relay)
    stray = net.udp()
    rr = struct.pack("!BBHI", 0x80, 201, 1, 0x1234)
    call.send_a([rr], source=stray)
    assert not relay.stats(1)["latched"]
    assert receive(call.callee, 1)[0][0] == rr        # relayed all the same
    assert relay.stats(1)["ssrc"] is None             # and not RTP to the statistics
    call.a_to_b([rtp(1)])
    assert relay.stats(1)["peer"] == addr(call.caller)


def test_stats_loss_jitter_and_ssrc_change(net):
    relay = Relay()
    call = Call(net, relay)
    assert relay.stats(1)["last_packet"] == 0.0
    seqs = [*range(10), *range(15, 30)]            # 15..29 after a gap of five
    for seq in seqs:
        # one packet per drain, arriving exactly on its timestamp's schedule (20 ms @ 8 kHz)
        call.a_to_b([rtp(seq, ts=160 * seq)], now=100.0 + 0.02 * seq)
    stats = relay.stats(1)
    assert stats["ssrc"] == 0x1234
    assert stats["expected"] == 30
    assert stats["received"] == 25
    assert stats["lost"] == 5
    assert stats["jitter"] == pytest.approx(0.0, abs=1e-6)
    assert stats["last_packet"] == pytest.approx(100.0 + 0.02 * 29)
    # A late packet: jitter in milliseconds (RFC 3550 A.8, J += (|D| - J) / 16).
    call.a_to_b([rtp(30, ts=160 * 30)], now=100.0 + 0.02 * 30 + 0.016)
    assert relay.stats(1)["jitter"] == pytest.approx(1.0, rel=1e-6)
    # A new SSRC is a new source: the figures start over.
    for seq in range(3):
        call.a_to_b([rtp(500 + seq, ts=0, ssrc=0xBEEF)], now=200.0 + 0.02 * seq)
    stats = relay.stats(1)
    assert stats["ssrc"] == 0xBEEF
    assert stats["expected"] == 3 and stats["lost"] == 0
    assert stats["jitter"] > 0          # ts stayed 0 while time moved: not the old estimate
    assert stats["packets"] == 25 + 1 + 3


def test_clock_rate_scales_jitter(net):
    relay = Relay()
    call = Call(net, relay)
    relay.set_clock_rate(1, 48000)
    for seq in range(3):
        call.a_to_b([rtp(seq, ts=960 * seq)], now=1.0 + 0.02 * seq)
    assert relay.stats(1)["jitter"] == pytest.approx(0.0, abs=1e-6)
    call.a_to_b([rtp(3, ts=960 * 3)], now=1.0 + 0.06 + 0.016)
    assert relay.stats(1)["jitter"] == pytest.approx(1.0, rel=1e-6)


def test_rtcp_legs_are_relayed_and_only_counted(net):
    relay = Relay()
    call = Call(net, relay, rtcp=True)
    sr = struct.pack("!BBHIIIIII", 0x80, 200, 6, 0x1234, 1, 2, 3, 4, 5)
    got = call.a_to_b([sr])
    assert got == [(sr, addr(call.leg_b))]
    got = call.b_to_a([sr])
    assert got == [(sr, addr(call.leg_a))]
    stats = relay.stats(1)
    assert stats["packets"] == 1 and stats["bytes"] == len(sr)
    assert "ssrc" not in stats and "jitter" not in stats


def test_a_datagram_longer_than_a_slot_is_dropped_not_cut(net):
    relay = Relay()
    call = Call(net, relay)
    fits = bytes([0x80]) + bytes(2047)            # exactly one 2048-byte slot
    for d in (b"\x80" + bytes(2999), fits, b"\x80" + bytes(2048)):
        call.caller.sendto(d, addr(call.leg_a))
    assert pump(relay, 1, call.leg_a, 1.0, 3) == 3
    got = receive(call.callee, 3, timeout=0.3)
    assert [d for d, _ in got] == [fits]
    stats = relay.stats(1)
    assert stats["errors"] == 2
    assert stats["packets"] == 1 and stats["bytes"] == 2048


def test_garbage_and_short_datagrams_are_relayed_and_counted(net):
    relay = Relay()
    call = Call(net, relay)
    junk = [b"", b"\x00", b"garbage", rtp(1)[:11], b"\x00\x01\x00\x00\x21\x12\xa4\x42" + bytes(12),
            b"\x40" + bytes(30)]               # version 1: not RTP
    got = call.a_to_b(junk)
    assert [d for d, _ in got] == junk       # relayed unchanged (the relay is not a filter)
    stats = relay.stats(1)
    assert stats["packets"] == len(junk) and stats["errors"] == 0
    assert stats["ssrc"] is None and stats["expected"] == 0


def test_a_burst_over_many_batches_honours_the_budget(net, backend):
    if backend != "mmsg":
        pytest.skip("the drain budget is the recvmmsg path's (see the io_uring burst test)")
    relay = Relay(batch=64, max_batches=8)
    call = Call(net, relay, rcvbuf=4 << 20)
    granted = call.leg_a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < 2 << 20:
        pytest.skip(f"SO_RCVBUF capped at {granted}: 1000 queued datagrams may not fit")
    packets = [rtp(i, payload=i.to_bytes(4, "big")) for i in range(1000)]
    for p in packets:
        call.caller.sendto(p, addr(call.leg_a))
    first = relay.drain(1, 1.0)
    assert first == 512                          # the budget: 8 batches of 64
    reads = [first]
    deadline = time.monotonic() + TIMEOUT
    while sum(reads) < 1000 and time.monotonic() < deadline:
        if wait_readable(call.leg_a, 0.5):
            reads.append(relay.drain(1, 1.0))
    assert sum(reads) == 1000 and max(reads) <= 512
    got = receive(call.callee, 1000)
    assert [d for d, _ in got] == packets
    assert relay.stats(1)["lost"] == 0 and relay.stats(1)["expected"] == 1000


def test_removing_a_leg_mid_stream(net, backend):
    if backend != "mmsg":
        pytest.skip("drain() per leg is the recvmmsg path's (poll() removal is tested below)")
    relay = Relay(batch=16, max_batches=1)
    call = Call(net, relay)
    for i in range(100):
        call.caller.sendto(rtp(i), addr(call.leg_a))
    assert wait_readable(call.leg_a)
    assert relay.drain(1, 1.0) == 16
    relay.remove_leg(2)
    assert relay.legs == 1
    left = pump(relay, 1, call.leg_a, 1.0, 84)
    assert left == 84
    assert relay.stats(1)["errors"] == 84        # nowhere to send them now
    assert len(receive(call.callee, 100, timeout=0.3)) == 16
    relay.remove_leg(1)
    assert relay.drain(1, 1.0) == 0              # a removed leg reads nothing
    with pytest.raises(KeyError):
        relay.stats(1)


def _connected_udp(local: Addr, remote: Addr) -> bool:
    """Whether the kernel's table (/proc/net/udp) has an IPv4 socket on ``local`` connected
    to ``remote``: ports only, both ends are 127.0.0.1 here."""
    rows = Path("/proc/net/udp").read_text().splitlines()[1:]
    ends = {(int(r.split()[1].split(":")[1], 16), int(r.split()[2].split(":")[1], 16))
            for r in rows}
    return (local[1], remote[1]) in ends


@pytest.mark.skipif(sys.platform != "linux", reason="reads the kernel's UDP table (Linux procfs)")
def test_sends_to_a_latched_source_leave_a_socket_connected_to_it(net, backend):
    """io_uring: the relay sends to a latched source from a twin of the leg's socket -- the
    same port, connected to the source, so the kernel keeps the route instead of looking
    it up per datagram.  Nothing else about the leg changes: the source sees one port,
    its datagrams (now taken by the twin) are relayed in order, strays still reach the leg
    and a silent source is still replaced.  recvmmsg/sendmmsg send with the address."""
    relay = Relay()
    call = Call(net, relay)
    call.a_to_b([rtp(0)])
    got = call.b_to_a([rtp(i, ssrc=7) for i in range(3)])
    assert [source for _, source in got] == [addr(call.leg_a)] * 3
    uring = backend != "mmsg"
    assert relay.stats(1)["connected"] is uring
    assert _connected_udp(addr(call.leg_a), addr(call.caller)) is uring
    # A burst on the twin arrives whole and in order.
    got = call.a_to_b([rtp(i) for i in range(1, 60)])
    assert [d for d, _ in got] == [rtp(i) for i in range(1, 60)]
    # Another source still reaches the leg's own socket: relayed, the return path kept.
    other = net.udp()
    call.send_a([rtp(99)], now=2.0, source=other)
    assert receive(call.callee, 1)[0][0] == rtp(99)
    assert relay.stats(1)["peer"] == addr(call.caller)
    # The caller falls silent for 3 s: the other source takes over, and the twin follows it.
    call.send_a([rtp(100)], now=5.0, source=other)
    assert relay.stats(1)["peer"] == addr(other)
    got = call.b_to_a([rtp(i, ssrc=7) for i in range(3, 6)])
    assert got == [] and quiet(call.caller)
    assert [d for d, _ in receive(other, 3)] == [rtp(i, ssrc=7) for i in range(3, 6)]
    assert relay.stats(1)["connected"] is uring
    assert _connected_udp(addr(call.leg_a), addr(other)) is uring
    assert relay.stats(1)["errors"] == 0 and relay.stats(2)["errors"] == 0


def test_a_source_that_went_away_and_came_back_gets_media_again(net, backend):
    """A latched source closes its socket: every datagram the relay sends it draws an ICMP
    port unreachable, which a connected socket reports (as errors, counted).  The relay
    neither spins nor stops reading that leg, and when a socket comes back on the same
    address it gets the media again."""
    relay = Relay()
    call = Call(net, relay)
    caller = addr(call.caller)
    call.a_to_b([rtp(0)])
    assert len(call.b_to_a([rtp(0, ssrc=7)])) == 1
    call.caller.close()
    for i in range(1, 41):
        call.send_b([rtp(i, ssrc=7)])
    back = net.udp()
    back.close()
    back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    net.socks.append(back)
    back.bind(caller)
    back.setblocking(False)
    call.caller = back
    call.send_a([rtp(1)], now=1.5)
    got = call.b_to_a([rtp(i, ssrc=7) for i in range(50, 55)])
    assert [d for d, _ in got] == [rtp(i, ssrc=7) for i in range(50, 55)]
    assert {source for _, source in got} == {addr(call.leg_a)}


def test_removing_a_leg_frees_its_port_at_once(net, backend):
    """Once remove_leg returns and the shell closes its socket, the port can be bound again
    (a new call's allocation): neither the ring nor a twin still holds it."""
    relay = Relay()
    call = Call(net, relay)
    call.a_to_b([rtp(0)])
    call.b_to_a([rtp(0, ssrc=7)])
    port = addr(call.leg_a)
    relay.remove_leg(1)
    call.leg_a.close()
    again = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    net.socks.append(again)
    again.bind(port)


def test_bridging_again_leaves_the_old_partner_alone(net):
    relay = Relay()
    call = Call(net, relay)
    third = net.udp()
    relay.add_leg(3, third.fileno())
    relay.bridge(1, 3)
    call.send_a([rtp(1)])
    assert quiet(call.callee)                    # leg 3 has no remote yet: dropped
    assert relay.stats(1)["errors"] == 1
    call.send_b([rtp(1)])
    assert relay.stats(2)["errors"] == 1         # leg 2 lost its partner


def test_a_burst_longer_than_the_buffer_ring_is_relayed_whole(net, backend):
    """io_uring: more datagrams than the ring has buffers (4096) end the multishot receive
    (ENOBUFS); the relay arms it again and nothing is lost or reordered."""
    if backend == "mmsg":
        pytest.skip("io_uring's provided buffers")
    relay = Relay()
    call = Call(net, relay, rcvbuf=4 << 20)
    granted = call.leg_a.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if granted < 6 << 20:
        pytest.skip(f"SO_RCVBUF capped at {granted}: 6000 queued datagrams may not fit")
    ring = relay.fileno()
    packets = [rtp(i, payload=i.to_bytes(4, "big")) for i in range(6000)]
    for p in packets:
        call.caller.sendto(p, addr(call.leg_a))
    got: list[tuple[bytes, Addr]] = []
    relayed = 0
    deadline = time.monotonic() + 3 * TIMEOUT
    while len(got) < 6000 and time.monotonic() < deadline:
        if select.select([ring], [], [], 0.05)[0]:
            relayed += relay.poll(1.0)
        while len(got) < 6000:        # the callee reads as it goes: its buffer is smaller
            try:
                data, source = call.callee.recvfrom(65536)
            except BlockingIOError:
                break
            got.append((data, (source[0], source[1])))
    assert relayed == 6000
    assert [d for d, _ in got] == packets
    stats = relay.stats(1)
    assert stats["errors"] == 0 and stats["lost"] == 0 and relay.stats(2)["sent"] == 6000


def test_backend_choice(monkeypatch):
    with pytest.raises(ValueError):
        _Relay(backend="epoll")
    assert _Relay(backend="mmsg").backend == "mmsg"
    monkeypatch.setenv(BACKEND_ENV, "mmsg")
    assert _Relay().backend == "mmsg"                # the fallback, forced
    monkeypatch.delenv(BACKEND_ENV)
    assert _Relay().backend == ("io_uring" if _uring_works() else "mmsg")
    if _uring_works():
        assert not _Relay(backend="io_uring_coop").deferred
        assert not _Relay(backend="mmsg").deferred


def test_api_errors(net):
    relay = Relay()
    s = net.udp()
    relay.add_leg(1, s.fileno())
    with pytest.raises(ValueError):
        relay.add_leg(1, s.fileno())
    with pytest.raises(KeyError):
        relay.set_peer(2, "127.0.0.1", 4000)
    with pytest.raises(ValueError):
        relay.set_peer(1, "not-an-ip", 4000)
    with pytest.raises(ValueError):
        relay.set_peer(1, "127.0.0.1", 0)
    with pytest.raises(ValueError):
        relay.set_latching(1, 7)
    with pytest.raises(ValueError):
        relay.bridge(1, 1)
    with pytest.raises(ValueError):
        relay.set_clock_rate(1, 0)
    with pytest.raises(ValueError):
        Relay(batch=0)
    closed = net.udp()
    fd = closed.fileno()
    closed.close()
    with pytest.raises(ValueError):
        relay.add_leg(9, fd)
    with pytest.raises(KeyError):
        relay.remove_leg(9)


@pytest.mark.skipif(sys.platform != "linux", reason="the poll set is epoll (Linux)")
def test_poll_drains_every_ready_leg_in_one_call(net):
    """The loop watches the Relay's one epoll descriptor; one poll() relays what waits on
    every leg (three calls here), and a removed leg is no longer in the set."""
    relay = Relay()
    pollset = relay.fileno()
    assert pollset >= 0
    calls = []
    for n in range(3):
        c = Call.__new__(Call)
        c.relay = relay
        c.caller, c.callee, c.leg_a, c.leg_b = (net.udp() for _ in range(4))
        relay.add_leg(10 * n + 1, c.leg_a.fileno())
        relay.add_leg(10 * n + 2, c.leg_b.fileno())
        relay.bridge(10 * n + 1, 10 * n + 2)
        relay.set_peer(10 * n + 1, *addr(c.caller))
        relay.set_peer(10 * n + 2, *addr(c.callee))
        calls.append(c)
    assert relay.poll(1.0) == 0                      # nothing waits: nothing read
    for n, c in enumerate(calls):
        for i in range(5):
            c.caller.sendto(rtp(i, ssrc=n), addr(c.leg_a))
            c.callee.sendto(rtp(i, ssrc=100 + n), addr(c.leg_b))
    # Both directions of all three calls: 30 datagrams, once the set says they are in.
    deadline = time.monotonic() + TIMEOUT
    got = 0
    while got < 30 and time.monotonic() < deadline:
        if select.select([pollset], [], [], TIMEOUT)[0]:
            got += relay.poll(1.0)
    assert got == 30
    for n, c in enumerate(calls):
        assert [d for d, _ in receive(c.callee, 5)] == [rtp(i, ssrc=n) for i in range(5)]
        assert [d for d, _ in receive(c.caller, 5)] == [rtp(i, ssrc=100 + n) for i in range(5)]
    # A removed leg leaves the set: what its socket gets is not read by poll() any more.
    relay.remove_leg(1)
    calls[0].caller.sendto(rtp(9), addr(calls[0].leg_a))
    assert wait_readable(calls[0].leg_a)
    assert relay.poll(2.0) == 0
    assert not select.select([pollset], [], [], 0.1)[0]

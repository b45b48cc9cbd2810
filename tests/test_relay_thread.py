"""The relay's packet loop in a thread of its own (``Relay(threaded=True)``, io_uring).

Control (add_leg, bridge, remove_leg, stats) runs in the caller's thread while the packet
thread relays: real UDP sockets on 127.0.0.1, traffic flowing while legs come and go.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from procutil import wait_until

from fastsip.rtp._relay import THREAD_ENV, Relay

TIMEOUT = 2.0


def _threaded() -> bool:
    try:
        relay = Relay(threaded=True)
    except OSError:
        return False
    return relay.threaded


pytestmark = pytest.mark.skipif(not _threaded(), reason="io_uring unavailable here")


def rtp(seq: int, ssrc: int = 0x1234) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, seq * 160, ssrc) + b"\xff" * 160


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []

    yield made
    for s in made:
        s.close()


def udp(made: list[socket.socket]) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.setblocking(False)
    made.append(s)
    return s


def receive(sock: socket.socket, count: int, timeout: float = TIMEOUT) -> list[bytes]:
    got: list[bytes] = []
    sock.settimeout(timeout)
    try:
        while len(got) < count:
            got.append(sock.recv(4096))
    except TimeoutError:
        pass
    finally:
        sock.setblocking(False)
    return got


def bridged_pair(relay: Relay, sockets: list[socket.socket]) -> tuple[socket.socket, ...]:
    """caller <-> leg 1 | relay | leg 2 <-> callee, the SDP addresses set."""
    caller, callee, leg_a, leg_b = (udp(sockets) for _ in range(4))
    relay.add_leg(1, leg_a.fileno())
    relay.add_leg(2, leg_b.fileno())
    relay.bridge(1, 2)
    relay.set_peer(1, "127.0.0.1", caller.getsockname()[1])
    relay.set_peer(2, "127.0.0.1", callee.getsockname()[1])
    return caller, callee, leg_a, leg_b


def test_a_threaded_relay_forwards_without_the_loop(sockets):
    relay = Relay(threaded=True)
    caller, callee, leg_a, leg_b = bridged_pair(relay, sockets)
    relay.start()
    try:
        assert relay.fileno() == -1 and relay.poll(0.0) == 0    # nothing for a loop to do
        for i in range(50):
            caller.sendto(rtp(i), leg_a.getsockname())
        got = receive(callee, 50)
        assert got == [rtp(i) for i in range(50)]
        wait_until(lambda: relay.stats(1)["packets"] == 50, TIMEOUT, "50 packets", 0.005)
        stats = relay.stats(1)
        assert stats["bytes"] == 50 * 172 and stats["errors"] == 0
        assert stats["received"] == 50 and stats["ssrc"] == 0x1234
        assert relay.stats(2)["sent"] == 50
        # and back, to the latched source
        callee.sendto(rtp(1, ssrc=7), leg_b.getsockname())
        assert receive(caller, 1) == [rtp(1, ssrc=7)]
    finally:
        relay.stop()


def test_legs_added_and_removed_while_packets_flow(sockets):
    """A sender hammers leg 1 while its partner is removed (fd closed), a new partner added
    and bridged, over and over: no crash, nothing sent out of a closed leg's socket, every
    datagram counted on leg 1, and the newest partner relays."""
    relay = Relay(threaded=True)
    caller, leg_a, callee = udp(sockets), udp(sockets), udp(sockets)
    # room for what queues while the test's threads hold the GIL the packet thread needs:
    # a datagram the kernel drops at a full buffer is never seen, and could not be counted
    leg_a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    relay.add_leg(1, leg_a.fileno())
    relay.set_peer(1, "127.0.0.1", caller.getsockname()[1])
    relay.start()
    stop = threading.Event()
    sent = 0

    def hammer() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                caller.sendto(rtp(sent), leg_a.getsockname())
                sent += 1
            except BlockingIOError:
                time.sleep(0.0005)
            if sent % 20 == 0:
                time.sleep(0.001)             # about 20,000 a second at most

    sender = threading.Thread(target=hammer)
    sender.start()
    try:
        leg_id = 2
        for _ in range(60):
            partner = udp(sockets)
            relay.add_leg(leg_id, partner.fileno())
            relay.set_peer(leg_id, "127.0.0.1", callee.getsockname()[1])
            relay.bridge(1, leg_id)
            time.sleep(0.002)
            relay.remove_leg(leg_id)
            sockets.remove(partner)
            partner.close()                     # the shell closes the fd right after
            leg_id += 1
        last = udp(sockets)
        relay.add_leg(leg_id, last.fileno())
        relay.set_peer(leg_id, "127.0.0.1", callee.getsockname()[1])
        relay.bridge(1, leg_id)
        wait_until(lambda: relay.stats(leg_id)["sent"] > 0, TIMEOUT, "a packet sent", 0.005)
    finally:
        stop.set()
        sender.join()
    # every datagram the sender got out is counted on leg 1 (relayed or an error)
    wait_until(lambda: relay.stats(1)["packets"] == sent, TIMEOUT, "every packet", 0.005)
    stats = relay.stats(1)
    assert stats["packets"] == sent and stats["bytes"] == sent * 172
    assert relay.legs == 2
    relay.stop()
    assert relay.stats(1)["packets"] == sent    # stopped: nothing moves


def test_a_removed_legs_port_is_freed(sockets):
    """remove_leg cancels the ring's receive (in the thread): the port can be bound again."""
    relay = Relay(threaded=True)
    relay.start()
    try:
        leg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        leg.bind(("127.0.0.1", 0))
        port = leg.getsockname()[1]
        relay.add_leg(1, leg.fileno())
        time.sleep(0.01)
        relay.remove_leg(1)
        leg.close()

        def rebinds() -> bool:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
            finally:
                s.close()
            return True

        wait_until(rebinds, TIMEOUT, "the port to be free again", 0.005)
    finally:
        relay.stop()


def test_a_removed_legs_port_is_freed_with_its_connected_twin(sockets):
    """A leg that sent to its latched source has a connected twin on the same port (the
    packet thread opened it); removing the leg closes the twin too, so once the shell has
    closed its socket the port can be bound again -- and a burst on the twin was relayed
    whole and in order before."""
    relay = Relay(threaded=True)
    caller, callee, leg_a, leg_b = bridged_pair(relay, sockets)
    relay.start()
    try:
        caller.sendto(rtp(0), leg_a.getsockname())
        assert receive(callee, 1) == [rtp(0)]
        callee.sendto(rtp(0, ssrc=7), leg_b.getsockname())
        assert receive(caller, 1) == [rtp(0, ssrc=7)]
        assert relay.stats(1)["connected"]        # the caller's datagrams: now on the twin
        for i in range(1, 200):
            caller.sendto(rtp(i), leg_a.getsockname())
        assert receive(callee, 199) == [rtp(i) for i in range(1, 200)]
        assert relay.stats(2)["connected"]        # the callee's latched: sent to from a twin
        ports = [leg_a.getsockname()[1], leg_b.getsockname()[1]]
        relay.remove_leg(1)
        relay.remove_leg(2)
        sockets.remove(leg_a)
        sockets.remove(leg_b)
        leg_a.close()
        leg_b.close()

        def rebinds() -> bool:
            made = []
            try:
                for port in ports:
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    made.append(s)
                    s.bind(("127.0.0.1", port))
            except OSError:
                return False
            finally:
                for s in made:
                    s.close()
            return True

        wait_until(rebinds, TIMEOUT, "the port to be free again", 0.005)
    finally:
        relay.stop()


def test_the_environment_keeps_the_relay_on_the_loop(monkeypatch):
    monkeypatch.setenv(THREAD_ENV, "0")
    relay = Relay(threaded=True)
    assert not relay.threaded and relay.backend == "io_uring"
    with pytest.raises(RuntimeError):
        relay.start()

"""``fastsip media`` driven over its ng socket, with RTP peers on loopback (issue 13).

Each test starts the relay as the README's install runs it and plays both phones itself:
the offer (from the caller's tag) and the answer (from the callee's) set up a call; the
caller then sends to the port the rewritten *answer* names, the callee to the one the
rewritten *offer* names, and each must receive the other's packets from the relay's port
facing it -- RTP and RTCP, byte for byte.  Also: latching (the SDP names an address where
nobody listens), the ng protocol's answers to bad input, the reply cache for a retransmitted
command, the commands Kamailio's module sent in a real call (``tests/data/ng``), the media
timeout, and delete.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mediautil import (
    HOST,
    MediaRelay,
    Peer,
    ng,
    ng_raw,
    rtcp_rr,
    rtp,
    sdp,
    sdp_address,
)
from netutil import needs_ipv6

from fastsip.relay.bencode import decode
from fastsip.rtp._relay import BACKEND_ENV, THREAD_ENV, Relay


def _relay_threads() -> bool:
    try:
        return Relay(threaded=True).threaded
    except OSError:
        return False

DATA = Path(__file__).parent / "data" / "ng"


@pytest.fixture(params=["auto", "loop", "mmsg"])
def relay(tmp_path: Path, request: pytest.FixtureRequest,
          monkeypatch: pytest.MonkeyPatch) -> MediaRelay:
    """The relay on its default packet path (io_uring in a thread of its own where the kernel
    allows it), on io_uring driven by the asyncio loop, and on the recvmmsg fallback, forced
    by the environment variables."""
    monkeypatch.setenv(BACKEND_ENV, "mmsg" if request.param == "mmsg" else "auto")
    monkeypatch.setenv(THREAD_ENV, "0" if request.param == "loop" else "1")
    r = MediaRelay(tmp_path)
    if request.param == "mmsg" and sys.platform == "linux":
        assert "batched (recvmmsg/sendmmsg) packet path" in r.log(), r.log()
    if request.param == "auto" and _relay_threads():
        assert "io_uring, own thread packet path" in r.log(), r.log()
    if request.param == "loop":
        assert "own thread" not in r.log(), r.log()
    yield r
    r.close()
    assert "Traceback" not in r.log(), r.log()


def call(relay: MediaRelay, caller: Peer, callee: Peer, call_id: str = "c1@test", *,
         offer_host: str | None = None, **options: object) -> tuple[tuple[str, int],
                                                                  tuple[str, int]]:
    """Offer from tag ``a`` with the caller's SDP, answer from tag ``b`` with the callee's;
    returns (where the caller sends: the answer's address, where the callee sends: the
    offer's address)."""
    offer = ng(relay.ng, {"command": "offer", "call-id": call_id, "from-tag": "a",
                          "sdp": sdp(caller.port, offer_host or caller.host), **options})
    assert offer["result"] == "ok", offer
    answer = ng(relay.ng, {"command": "answer", "call-id": call_id, "from-tag": "a",
                           "to-tag": "b", "sdp": sdp(callee.port, callee.host), **options})
    assert answer["result"] == "ok", answer
    to_callee = sdp_address(offer["sdp"])
    to_caller = sdp_address(answer["sdp"])
    return (to_caller[0], to_caller[1]), (to_callee[0], to_callee[1])


def test_rtp_and_rtcp_go_through_the_relay_both_ways(relay: MediaRelay) -> None:
    caller, callee = Peer(), Peer()
    try:
        a_sends_to, b_sends_to = call(relay, caller, callee)
        for address in (a_sends_to, b_sends_to):
            assert address[0] == HOST and relay.port_min <= address[1] <= relay.port_max
        assert a_sends_to != b_sends_to
        a_packets = [rtp(i, i * 160, 0xA, bytes([i]) * 160) for i in range(50)]
        b_packets = [rtp(i, i * 160, 0xB, bytes([255 - i]) * 160) for i in range(50)]
        for pa, pb in zip(a_packets, b_packets):
            caller.send(pa, a_sends_to)
            callee.send(pb, b_sends_to)
        caller.send_rtcp(rtcp_rr(0xA), (a_sends_to[0], a_sends_to[1] + 1))
        callee.send_rtcp(rtcp_rr(0xB), (b_sends_to[0], b_sends_to[1] + 1))
        callee.collect(3, until=50)
        caller.collect(3, until=50)
        callee.collect(0.3)
        caller.collect(0.3)
        # Each side hears the other from the relay's port facing it (symmetric RTP), in order.
        assert [d for d, _ in callee.got] == a_packets
        assert {src for _, src in callee.got} == {b_sends_to}
        assert [d for d, _ in caller.got] == b_packets
        assert {src for _, src in caller.got} == {a_sends_to}
        assert callee.got_rtcp == [(rtcp_rr(0xA), (HOST, b_sends_to[1] + 1))]
        assert caller.got_rtcp == [(rtcp_rr(0xB), (HOST, a_sends_to[1] + 1))]
        # query: both directions counted (packets received on each leg).
        reply = ng(relay.ng, {"command": "query", "call-id": "c1@test"})
        assert reply["result"] == "ok", reply
        assert reply["totals"]["RTP"]["packets"] == 100, reply["totals"]
        assert reply["totals"]["RTCP"]["packets"] == 2, reply["totals"]
        deleted = ng(relay.ng, {"command": "delete", "call-id": "c1@test", "from-tag": "a"})
        assert deleted["result"] == "ok", deleted
        # The ports are closed: nothing is relayed any more.
        caller.got.clear()
        callee.got.clear()
        caller.send(a_packets[0], a_sends_to)
        callee.collect(0.5)
        assert callee.got == []
    finally:
        caller.close()
        callee.close()


def test_latching_sends_to_where_the_packets_come_from(relay: MediaRelay) -> None:
    """The caller's SDP names 127.0.0.2 (where nothing listens: a phone behind NAT writes
    its private address); its packets come from 127.0.0.1:Y; the callee's reach Y."""
    caller, callee = Peer(), Peer()
    try:
        a_sends_to, b_sends_to = call(relay, caller, callee, "latch@test",
                                      offer_host="127.0.0.2", flags=["trust-address"])
        for i in range(5):
            caller.send(rtp(i, i * 160, 0xA, b"a" * 160), a_sends_to)
        callee.collect(2, until=5)
        assert len(callee.got) == 5
        for i in range(5):
            callee.send(rtp(i, i * 160, 0xB, b"b" * 160), b_sends_to)
        caller.collect(2, until=5)
        assert [d[12:] for d, _ in caller.got] == [b"b" * 160] * 5
        reply = ng(relay.ng, {"command": "query", "call-id": "latch@test"})
        endpoints = {(s["endpoint"]["address"], s["endpoint"]["port"])
                     for tag in reply["tags"].values() for m in tag["medias"]
                     for s in m["streams"] if s["local port"] % 2 == 0}
        assert (HOST, caller.port) in endpoints, reply
    finally:
        caller.close()
        callee.close()


def test_bad_commands_get_error_replies_and_the_relay_keeps_answering(
        relay: MediaRelay) -> None:
    def raw(data: bytes) -> dict[str, object]:
        cookie, _, body = ng_raw(relay.ng, data).partition(b" ")
        assert cookie == data.split(b" ", 1)[0]
        return {k.decode(): v for k, v in decode(body).items()}

    assert raw(b"c1 d7:command4:pinge")["result"] == b"pong"
    for bad in (b"c2 d7:command4:ping", b"c3 garbage", b"c4 i42e", b"c5 d7:command5:fancye",
                b"c6 d7:command6:answer7:call-id4:nope8:from-tag1:a6:to-tag1:b3:sdp3:v=0e",
                b"c7 d7:command5:query7:call-id7:unknowne", b"c8 d7:command5:offere",
                b"c9 d7:commandi5ee"):
        reply = raw(bad)
        assert reply["result"] == b"error" and reply.get("error-reason"), (bad, reply)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(b"no-space-no-cookie", relay.ng)      # no cookie to answer with: dropped
        with pytest.raises(TimeoutError):
            s.recv(100)
    assert raw(b"c10 d7:command4:pinge")["result"] == b"pong"


def test_what_the_relay_cannot_do_gets_a_clear_error(relay: MediaRelay) -> None:
    """SRTP passes through opaque (rtpengine does the same when both ends speak it), but
    turning RTP into SRTP needs crypto this relay has not got: an error that says so, as
    does a flag asking for processing it does not do (recording)."""
    srtp = sdp(4000).replace("RTP/AVP", "RTP/SAVP") + "a=crypto:1 AES_CM_128_HMAC_SHA1_80 " \
        "inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVzcyAoc2VuZGFsbAx==\r\n"
    passed = ng(relay.ng, {"command": "offer", "call-id": "srtp@test", "from-tag": "a",
                           "sdp": srtp})
    assert passed["result"] == "ok" and "a=crypto:1 AES_CM_128" in passed["sdp"], passed
    assert " RTP/SAVP " in passed["sdp"]
    convert = ng(relay.ng, {"command": "offer", "call-id": "to-srtp@test", "from-tag": "a",
                            "sdp": sdp(4002), "transport-protocol": "RTP/SAVP"})
    assert convert["result"] == "error" and "RTP/SAVP" in convert["error-reason"], convert
    record = ng(relay.ng, {"command": "offer", "call-id": "rec@test", "from-tag": "a",
                           "sdp": sdp(4004), "flags": ["record-call"]})
    assert record["result"] == "error" and "record" in record["error-reason"].lower(), record


def test_a_retransmitted_command_gets_the_same_reply(relay: MediaRelay) -> None:
    """Kamailio sends a command again, same cookie, when the reply is late: the relay answers
    from its cache instead of allocating a second set of ports."""
    command = {"command": "offer", "call-id": "retr@test", "from-tag": "a", "sdp": sdp(4000)}
    first = ng(relay.ng, command, cookie="same-cookie")
    again = ng(relay.ng, command, cookie="same-cookie")
    assert first == again and first["result"] == "ok"
    other = ng(relay.ng, command, cookie="another-cookie")   # a re-offer: same ports kept
    assert sdp_address(other["sdp"]) == sdp_address(first["sdp"])


def test_kamailio_commands_as_captured(relay: MediaRelay) -> None:
    """The ping, offer, answer and delete Kamailio 5.6's module sent in a real call (see
    tests/data/ng/README.md) get the replies that module reads: pong, ok with the rewritten
    SDP naming the relay, ok."""
    replies = {}
    for name in ("ping", "offer", "answer", "delete"):
        data = (DATA / f"kamailio-5.6-{name}.bin").read_bytes()
        cookie, _, body = ng_raw(relay.ng, data).partition(b" ")
        assert cookie == data.split(b" ", 1)[0]
        replies[name] = decode(body)
    assert replies["ping"] == {b"result": b"pong"}
    for name in ("offer", "answer"):
        reply = replies[name]
        assert reply[b"result"] == b"ok", reply
        host, port, rtcp = sdp_address(reply[b"sdp"].decode())
        assert host == HOST and relay.port_min <= port <= relay.port_max
        assert rtcp == port + 1
        # replace-origin: the o= line names the relay too.
        assert f"IN IP4 {HOST}" in reply[b"sdp"].decode().split("\n")[1]
    assert replies["delete"][b"result"] == b"ok", replies["delete"]


def test_a_call_without_media_times_out(tmp_path: Path) -> None:
    with MediaRelay(tmp_path, "--timeout", "1") as relay:
        caller, callee = Peer(), Peer()
        try:
            call(relay, caller, callee, "quiet@test")
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                reply = ng(relay.ng, {"command": "query", "call-id": "quiet@test"})
                if reply["result"] == "error":
                    break
                time.sleep(0.25)
            assert reply["result"] == "error", reply
        finally:
            caller.close()
            callee.close()
        assert "quiet@test" in relay.log()


@needs_ipv6
def test_ipv4_caller_to_ipv6_callee(tmp_path: Path) -> None:
    """Two interfaces, one per family; rtpengine's ``direction`` picks them per side: the
    callee gets an IPv6 offer, the caller an IPv4 answer, and media crosses the families."""
    with MediaRelay(tmp_path, interfaces=(f"v4/{HOST}", "v6/::1")) as relay:
        caller, callee = Peer(), Peer("::1")
        try:
            a_sends_to, b_sends_to = call(relay, caller, callee, "v4v6@test",
                                          direction=["v4", "v6"])
            assert ":" not in a_sends_to[0] and b_sends_to[0] == "::1"
            caller.send(rtp(1, 160, 0xA, b"4" * 160), a_sends_to)
            callee.collect(2, until=1)
            callee.send(rtp(1, 160, 0xB, b"6" * 160), b_sends_to)
            caller.collect(2, until=1)
            assert [d[12:] for d, _ in callee.got] == [b"4" * 160]
            assert [d[12:] for d, _ in caller.got] == [b"6" * 160]
        finally:
            caller.close()
            callee.close()


def test_strict_source_drops_a_third_party(relay: MediaRelay) -> None:
    """With rtpengine's strict-source flag, once the caller's source is latched nothing from
    another address reaches the callee (a media injection attempt); without it, it would."""
    caller, callee, intruder = Peer(), Peer(), Peer()
    try:
        a_sends_to, _ = call(relay, caller, callee, "strict@test", flags=["strict-source"])
        caller.send(rtp(1, 160, 0xA, b"a" * 160), a_sends_to)
        callee.collect(2, until=1)
        intruder.send(rtp(2, 320, 0xE, b"e" * 160), a_sends_to)
        caller.send(rtp(3, 480, 0xA, b"a" * 160), a_sends_to)
        callee.collect(2, until=2)
        callee.collect(0.3)
        assert [d[12:] for d, _ in callee.got] == [b"a" * 160, b"a" * 160]
    finally:
        for p in (caller, callee, intruder):
            p.close()


def test_a_flooded_stream_does_not_starve_the_others(relay: MediaRelay) -> None:
    """Graceful overload: one call's caller floods its relay port as fast as a socket sends
    (2 s, at most 400,000 datagrams) while another call sends at 50 packets/s.  The quiet
    call keeps flowing, and once the flood stops the flooded stream is relayed again (each
    leg's read budget per wake-up keeps one socket from taking the loop; rtpengine stops
    reading a socket whose queue overflowed five times)."""
    flood_a, flood_b, quiet_a, quiet_b = Peer(), Peer(), Peer(), Peer()
    try:
        flood_to, _ = call(relay, flood_a, flood_b, "flood@test")
        quiet_to, _ = call(relay, quiet_a, quiet_b, "quiet-call@test")
        packet = rtp(1, 160, 0xF, b"f" * 160)
        stop = time.monotonic() + 2.0

        def flood() -> None:
            sock = flood_a.rtp_sock
            for _ in range(400_000):
                if time.monotonic() > stop:
                    return
                try:
                    sock.sendto(packet, flood_to)
                except OSError:
                    pass

        flooder = threading.Thread(target=flood)
        flooder.start()
        sent = 0
        while time.monotonic() < stop:
            quiet_a.send(rtp(sent, sent * 160, 0xA, b"q" * 160), quiet_to)
            sent += 1
            quiet_b.collect(0.02)
        flooder.join(10)
        quiet_b.collect(1.0)
        arrived = sum(1 for d, _ in quiet_b.got if d[12:] == b"q" * 160)
        assert sent >= 50 and arrived >= 0.9 * sent, (arrived, sent)
        # After the flood, the flooded stream still works.
        flood_b.rtp_sock.setblocking(False)
        while True:
            try:
                flood_b.rtp_sock.recv(65535)
            except BlockingIOError:
                break
        flood_b.got.clear()
        time.sleep(0.2)
        for i in range(5):
            flood_a.send(rtp(100 + i, 0, 0xF, b"after" * 32), flood_to)
        flood_b.rtp_sock.setblocking(True)
        flood_b.collect(3, until=5)
        assert sum(1 for d, _ in flood_b.got if d[12:] == b"after" * 32) == 5
    finally:
        for p in (flood_a, flood_b, quiet_a, quiet_b):
            p.close()

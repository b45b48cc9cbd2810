"""``fastsip serve --media ng:HOST:PORT``: serve anchors each call's media in a relay
(issue 13), with ``fastsip media`` and with Debian's rtpengine as the relay.

Two phones registered with serve (raw SIP over UDP, every header in view) call each other
with SDP naming their own RTP sockets.  Through serve, each must see the *relay* in the
other's SDP, and their packets must cross the relay both ways (each hears the other from
the relay's port facing it).  The BYE frees the call in the relay.  A routes handler can
keep a call out of it (``req.media = False``); a relay that does not answer costs the call
a 503, not a call without media.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mediautil import (
    HOST,
    RTPENGINE,
    MediaRelay,
    Phone,
    RtpEngine,
    ng,
    rtp,
    sdp,
    sdp_address,
)
from procutil import free_port
from serveutil import Serve


def _call(serve_port: int, relay: MediaRelay | RtpEngine | None, call_id: str
          ) -> tuple[Phone, Phone, bytes, bytes]:
    """alice calls bob through serve; returns the phones and the SDP each received."""
    alice = Phone("alice", (HOST, serve_port))
    bob = Phone("bob", (HOST, serve_port))
    alice.register()
    bob.register()
    alice.sock.sendto(alice.invite("bob", call_id, sdp(alice.media.port)), alice.proxy)
    invite, via = bob.next_request()
    assert invite.method == "INVITE", bytes(invite)
    bob.answer(invite, via, sdp(bob.media.port))
    reply = alice.final_response()
    assert reply.status_code == 200, bytes(reply)
    return alice, bob, bytes(invite.body), bytes(reply.body)


def _bye(alice: Phone, bob: Phone, ok: bytes, call_id: str) -> None:
    """alice hangs up through serve (the Route serve recorded); bob answers."""
    bye = (f"BYE sip:bob@{HOST}:{bob.port} SIP/2.0\r\n"
           f"Via: SIP/2.0/UDP {HOST}:{alice.port};rport;branch=z9hG4bK-bye-{call_id}\r\n"
           f"Route: <sip:{HOST}:{alice.proxy[1]};lr>\r\nMax-Forwards: 70\r\n"
           f"From: <sip:alice@example.com>;tag=caller-tag\r\n"
           f"To: <sip:bob@example.com>;tag=bob-tag\r\nCall-ID: {call_id}\r\n"
           "CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n").encode()
    alice.sock.sendto(bye, alice.proxy)
    request, via = bob.next_request()
    assert request.method == "BYE", bytes(request)
    bob.sock.sendto(bytes(request.reply(200)), via)
    alice.sock.settimeout(5)
    assert b"SIP/2.0 200" in alice.sock.recv(65535)


def _media_flows(alice: Phone, bob: Phone, offer: bytes, answer: bytes,
                 relay: MediaRelay | RtpEngine) -> None:
    to_bob_side = sdp_address(offer.decode())      # where bob sends: the relay
    to_alice_side = sdp_address(answer.decode())   # where alice sends: the relay
    for host, port, _ in (to_bob_side, to_alice_side):
        assert host == HOST and relay.port_min <= port <= relay.port_max, (offer, answer)
    a = [rtp(i, i * 160, 0xA, bytes([i]) * 160) for i in range(20)]
    b = [rtp(i, i * 160, 0xB, bytes([100 + i]) * 160) for i in range(20)]
    for i in range(20):
        alice.media.send(a[i], to_alice_side[:2])
        bob.media.send(b[i], to_bob_side[:2])
        time.sleep(0.005)
    bob.media.collect(3, until=20)
    alice.media.collect(3, until=20)
    assert [d for d, _ in bob.media.got] == a
    assert {src for _, src in bob.media.got} == {to_bob_side[:2]}
    assert [d for d, _ in alice.media.got] == b
    assert {src for _, src in alice.media.got} == {to_alice_side[:2]}


def _anchored_call(tmp_path: Path, relay: MediaRelay | RtpEngine) -> str:
    port = free_port()
    serve = Serve(tmp_path, port, "--media", f"ng:{relay.ng[0]}:{relay.ng[1]}")
    call_id = f"media-{port}@test"
    try:
        alice, bob, offer, answer = _call(port, relay, call_id)
        try:
            _media_flows(alice, bob, offer, answer, relay)
            assert ng(relay.ng, {"command": "query", "call-id": call_id})["result"] == "ok"
            _bye(alice, bob, answer, call_id)
            # The BYE's delete reached the relay: the call is gone there.
            deadline = time.monotonic() + 3
            while ng(relay.ng, {"command": "query", "call-id": call_id})["result"] == "ok":
                assert time.monotonic() < deadline, "the relay still has the call"
                time.sleep(0.1)
        finally:
            alice.close()
            bob.close()
    finally:
        serve.close()
    log = serve.log()
    assert "Traceback" not in log, log
    return log


def test_serve_anchors_a_call_in_fastsip_media(tmp_path: Path) -> None:
    with MediaRelay(tmp_path) as relay:
        log = _anchored_call(tmp_path, relay)
        assert "Traceback" not in relay.log()
    assert "media offer=1 answer=1 delete=1 failed=0" in log, log[-2000:]


@pytest.mark.skipif(RTPENGINE is None, reason="rtpengine (rtpengine-daemon) is not installed")
def test_serve_anchors_a_call_in_rtpengine(tmp_path: Path) -> None:
    with RtpEngine(tmp_path) as relay:
        log = _anchored_call(tmp_path, relay)
    assert "media offer=1 answer=1 delete=1 failed=0" in log, log[-2000:]


def test_a_handler_keeps_a_call_out_of_the_relay(tmp_path: Path) -> None:
    routes = tmp_path / "routes.py"
    routes.write_text("from fastsip.app import route\n\n\n"
                      "@route\n"
                      "def direct(req):\n"
                      "    if req.method == 'INVITE':\n"
                      "        req.media = False\n"
                      "    return None\n")
    with MediaRelay(tmp_path) as relay:
        port = free_port()
        serve = Serve(tmp_path, port, "--media", f"ng:{relay.ng[0]}:{relay.ng[1]}",
                      "--routes", str(routes))
        try:
            alice, bob, offer, answer = _call(port, relay, "direct@test")
            try:
                assert sdp_address(offer.decode())[1] == alice.media.port
                assert sdp_address(answer.decode())[1] == bob.media.port
            finally:
                alice.close()
                bob.close()
        finally:
            serve.close()
        reply = ng(relay.ng, {"command": "query", "call-id": "direct@test"})
        assert reply["result"] == "error", reply


def test_a_relay_that_does_not_answer_gets_the_call_a_503(tmp_path: Path) -> None:
    port = free_port()
    nobody = free_port()
    serve = Serve(tmp_path, port, "--media", f"ng:{HOST}:{nobody}")
    alice = Phone("alice", (HOST, port))
    bob = Phone("bob", (HOST, port))
    try:
        alice.register()
        bob.register()
        started = time.monotonic()
        final = alice.transact(alice.invite("bob", "norelay@test", sdp(alice.media.port)),
                               timeout=10)
        assert final.status_code == 503 and "Media Relay" in (final.reason or ""), bytes(final)
        assert time.monotonic() - started < 8
        bob.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):     # nothing reached the callee
            bob.sock.recv(65535)
    finally:
        alice.close()
        bob.close()
        serve.close()
    log = serve.log()
    assert "media relay 1: offer for call norelay@test failed" in log, log
    assert "media relay: no relay took call norelay@test: 503" in log, log


def _crc_index(call_id: str, n: int) -> int:
    import zlib

    return zlib.crc32(call_id.encode()) % n


def test_a_relay_set_fails_over_and_keeps_each_call_on_its_relay(tmp_path: Path) -> None:
    """Two relays, the first of them dead: a call whose Call-ID picks the dead one is offered
    to the live one after it, which then gets the answer and the BYE's delete too."""
    nobody = free_port()
    with MediaRelay(tmp_path) as relay:
        port = free_port()
        serve = Serve(tmp_path, port, "--media", f"ng:{HOST}:{nobody}",
                      "--media", f"ng:{relay.ng[0]}:{relay.ng[1]}")
        # A Call-ID that hashes to the dead relay (index 0 of 2).
        call_id = next(f"set-{i}@test" for i in range(100) if _crc_index(f"set-{i}@test", 2) == 0)
        try:
            alice, bob, offer, answer = _call(port, relay, call_id)
            try:
                _media_flows(alice, bob, offer, answer, relay)
                _bye(alice, bob, answer, call_id)
            finally:
                alice.close()
                bob.close()
            deadline = time.monotonic() + 3
            while ng(relay.ng, {"command": "query", "call-id": call_id})["result"] == "ok":
                assert time.monotonic() < deadline, "the live relay still has the call"
                time.sleep(0.1)
        finally:
            serve.close()
    log = serve.log()
    assert f"media relay 1: offer for call {call_id} failed" in log, log
    assert "media offer=1 answer=1 delete=1 failed=1" in log, log[-2000:]


def test_a_restarted_serve_keeps_anchoring_a_call_its_relay_has(tmp_path: Path) -> None:
    """serve restarts mid-call: the re-INVITE of a call it no longer remembers is anchored
    all the same (its relay, named by the Call-ID, says it has the call)."""
    with MediaRelay(tmp_path) as relay:
        port = free_port()
        args = ("--media", f"ng:{relay.ng[0]}:{relay.ng[1]}")
        serve = Serve(tmp_path, port, *args)
        call_id = f"restart-{port}@test"
        try:
            alice, bob, offer, _ = _call(port, relay, call_id)
        finally:
            serve.close()
        serve = Serve(tmp_path, port, *args)
        try:
            alice.register()
            bob.register()
            # alice puts bob on hold: a re-INVITE with a new SDP, through serve.
            body = sdp(alice.media.port).replace("a=sendrecv", "a=sendonly")
            reinvite = (f"INVITE sip:bob@{HOST}:{bob.port} SIP/2.0\r\n"
                        f"Via: SIP/2.0/UDP {HOST}:{alice.port};rport;branch=z9hG4bK-re\r\n"
                        f"Route: <sip:{HOST}:{port};lr>\r\nMax-Forwards: 70\r\n"
                        "From: <sip:alice@example.com>;tag=caller-tag\r\n"
                        f"To: <sip:bob@example.com>;tag=bob-tag\r\nCall-ID: {call_id}\r\n"
                        f"CSeq: 2 INVITE\r\nContact: <sip:alice@{HOST}:{alice.port}>\r\n"
                        f"Content-Type: application/sdp\r\nContent-Length: {len(body)}\r\n"
                        f"\r\n{body}").encode()
            alice.sock.sendto(reinvite, alice.proxy)
            request, _ = bob.next_request()
            assert request.method == "INVITE", bytes(request)
            # bob sees the relay's port (the same as before: a re-offer keeps its ports).
            assert sdp_address(bytes(request.body).decode()) == sdp_address(offer.decode())
            assert "a=sendonly" in bytes(request.body).decode()
        finally:
            alice.close()
            bob.close()
            serve.close()


def test_a_late_offer_is_anchored_through_the_200_and_the_ack(tmp_path: Path) -> None:
    """An INVITE without SDP: bob's 200 carries the offer, alice's ACK the answer (RFC 3261
    §13.2.1).  Both reach the other side rewritten by the relay, and media crosses it."""
    with MediaRelay(tmp_path) as relay:
        port = free_port()
        serve = Serve(tmp_path, port, "--media", f"ng:{relay.ng[0]}:{relay.ng[1]}")
        alice = Phone("alice", (HOST, port))
        bob = Phone("bob", (HOST, port))
        call_id = f"late-{port}@test"
        try:
            alice.register()
            bob.register()
            invite = alice.invite("bob", call_id, "").replace(
                b"Content-Type: application/sdp\r\n", b"")
            alice.sock.sendto(invite, alice.proxy)
            request, via = bob.next_request()
            assert request.method == "INVITE" and request.content_length == 0
            bob.answer(request, via, sdp(bob.media.port))
            ok = alice.final_response()
            offer = bytes(ok.body)
            assert ok.status_code == 200 and sdp_address(offer.decode())[1] != bob.media.port
            body = sdp(alice.media.port)
            ack = (f"ACK sip:bob@{HOST}:{bob.port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {HOST}:{alice.port};rport;branch=z9hG4bK-ack-late\r\n"
                   f"Route: <sip:{HOST}:{port};lr>\r\nMax-Forwards: 70\r\n"
                   "From: <sip:alice@example.com>;tag=caller-tag\r\n"
                   f"To: <sip:bob@example.com>;tag=bob-tag\r\nCall-ID: {call_id}\r\n"
                   "CSeq: 1 ACK\r\nContent-Type: application/sdp\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
            alice.sock.sendto(ack, alice.proxy)
            got, _ = bob.next_request()
            assert got.method == "ACK", bytes(got)
            answer = bytes(got.body)
            assert sdp_address(answer.decode())[1] != alice.media.port, answer
            # answer: what bob got (where bob sends); offer: what alice got (where she sends).
            _media_flows(alice, bob, answer, offer, relay)
        finally:
            alice.close()
            bob.close()
            serve.close()
    log = serve.log()
    assert "media offer=1 answer=1" in log, log[-1500:]

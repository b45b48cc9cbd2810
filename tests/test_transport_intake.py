"""The receiving rules every I/O shell shares (:mod:`fastsip.transport.intake`), sans-IO: what a
datagram becomes (ignored keep-alive, STUN answer, RFC 400/505 answer, a message delivered with
received/rport, a response dropped for a foreign Via), each answer addressed to the socket the
datagram came in on; the same rules for a message framed on a stream; the module imports no I/O.
And the asyncio shell over them: a UDP request's ``;alias`` never touches the TCP connection
table (it once aliased whichever connection had the socket's id)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastsip.asyncio import TransportLayer
from fastsip.errors import ParseError
from fastsip.sip import Limits, Request, Response, parse
from fastsip.transport import Address
from fastsip.transport.intake import answer_malformed, deliver_message, receive_datagram
from fastsip.transport.stun import MAGIC_COOKIE, binding_response

sys.path.insert(0, str(Path(__file__).parent))
from netutil import LOOPS, Inbox, options, run
from procutil import fastsip_env

LIMITS = Limits()
OURS = [("192.0.2.1", 5060)]
PEER = ("198.51.100.7", 40000)


class Wire:
    """A :class:`~fastsip.transport.Transport` that keeps what is sent (the intake's answers)."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Address]] = []

    def send(self, data: bytes, dest: Address) -> None:
        self.sent.append((data, dest))

    def sent_by(self, transport: str) -> tuple[str, int]:
        return OURS[0]


class Up:
    """The transaction layer's ``receive``: keeps what was delivered."""

    def __init__(self) -> None:
        self.got: list[tuple[Request | Response, Address]] = []

    def __call__(self, msg: Request | Response, source: Address) -> None:
        self.got.append((msg, source))


def intake(data: bytes, local: list[tuple[str, int]] | None = OURS, connection: int = 3
           ) -> tuple[bool, Wire, Up]:
    wire, up = Wire(), Up()
    delivered = receive_datagram(data, PEER[0], PEER[1], connection, LIMITS, wire, up, local)
    return delivered, wire, up


REQUEST = bytes(options("sip:bob@192.0.2.1", "10.0.0.9:5062"))   # Via ...;rport, a private sent-by


@pytest.mark.parametrize("data", [b"\r\n", b"\r\n\r\n", b"\n", b" \r\n"])
def test_keepalive_is_ignored(data: bytes) -> None:
    delivered, wire, up = intake(data)
    assert (delivered, wire.sent, up.got) == (False, [], [])


def test_stun_binding_request_is_answered_from_its_socket() -> None:
    txid = bytes(range(12))
    data = struct.pack("!HHI12s", 0x0001, 0, MAGIC_COOKIE, txid)
    delivered, wire, up = intake(data)
    assert not delivered and up.got == []
    assert wire.sent == [(binding_response(data, *PEER), Address("UDP", *PEER, 3))]
    # A Binding *response* (class bits set) is STUN too, never SIP: dropped unanswered.
    delivered, wire, up = intake(struct.pack("!HHI12s", 0x0101, 0, MAGIC_COOKIE, txid))
    assert (delivered, wire.sent, up.got) == (False, [], [])


def test_malformed_request_gets_the_rfc_answer_back_to_its_socket() -> None:
    bad = REQUEST.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards 70\r\n")
    delivered, wire, up = intake(bad)
    assert not delivered and up.got == []
    [(answer, dest)] = wire.sent
    assert dest == Address("UDP", *PEER, 3)
    resp = parse(answer)
    assert isinstance(resp, Response) and resp.status_code == 400
    assert "header line without ':'" in resp.reason and resp.call_id == "call-1@test"

    version = REQUEST.replace(b"SIP/2.0\r\n", b"SIP/3.0\r\n", 1)
    _, wire, _ = intake(version)
    assert [parse(a).status_code for a, _ in wire.sent] == [505]  # type: ignore[union-attr]

    # A malformed response, or a request with nothing to answer with, gets nothing.
    for hopeless in (b"SIP/2.0 200 OK\r\nBogus\r\n\r\n", b"OPTIONS sip:x SIP/2.0\r\nX\r\n\r\n"):
        delivered, wire, up = intake(hopeless)
        assert (delivered, wire.sent, up.got) == (False, [], [])


def test_request_is_stamped_and_delivered_with_its_socket() -> None:
    delivered, wire, up = intake(REQUEST, connection=2)
    assert delivered and wire.sent == []
    [(msg, source)] = up.got
    assert source == Address("UDP", *PEER, 2)
    via = msg.top_via
    assert via is not None
    assert (via.host, via.received, via.rport) == ("10.0.0.9", PEER[0], PEER[1])


@pytest.mark.parametrize("body", [b"", b"v=0\r\n"])
def test_a_datagram_without_content_length_gets_one(body: bytes) -> None:
    """§18.3: a datagram's body is the rest of it; what we pass on may leave over TCP, where
    only Content-Length frames it.  A request or a response; the body is kept as it came."""
    head, _, _ = REQUEST.partition(b"Content-Length: 0\r\n")
    assert head != REQUEST and b"Content-Length" not in head + b"\r\n" + body
    delivered, _, up = intake(head + b"\r\n" + body)
    [(msg, _)] = up.got
    assert delivered and msg.headers.get("Content-Length") == str(len(body))
    assert bytes(msg).endswith(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    # One already there is left alone (an unedited length, byte for byte).
    _, _, up = intake(REQUEST)
    [(msg, _)] = up.got
    assert msg.headers.getall("Content-Length") == ["0"]


def test_request_without_via_is_dropped() -> None:
    no_via = b"\r\n".join(line for line in REQUEST.split(b"\r\n")
                          if not line.startswith(b"Via:"))
    assert isinstance(parse(no_via), Request)   # the parser takes it; the transport must not
    delivered, wire, up = intake(no_via)
    assert (delivered, wire.sent, up.got) == (False, [], [])


def test_response_top_via_must_name_us() -> None:
    ours = bytes(options("sip:x@192.0.2.1", "192.0.2.1:5060", branch="z9hG4bKo").reply(200))
    theirs = bytes(options("sip:x@192.0.2.1", "192.0.2.77:5060", branch="z9hG4bKt").reply(200))
    assert intake(ours)[0] is True
    delivered, wire, up = intake(theirs)
    assert (delivered, wire.sent, up.got) == (False, [], [])
    assert intake(theirs, local=None)[0] is True    # the shell turned the check off


def test_an_exception_from_deliver_is_logged_not_raised(caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    def broken(msg: Request | Response, source: Address) -> None:
        raise RuntimeError("a bug above the transport")

    with caplog.at_level(logging.ERROR, logger="fastsip.transport"):
        assert receive_datagram(REQUEST, *PEER, 0, LIMITS, Wire(), broken, OURS) is True
        assert deliver_message(parse(REQUEST), Address("TCP", *PEER, 7), broken) is True
    assert caplog.text.count("error handling a message from") == 2
    assert receive_datagram(REQUEST, *PEER, 0, LIMITS, Wire(), None, OURS) is False


def test_stream_messages_meet_the_same_rules() -> None:
    source = Address("TCP", *PEER, 7)
    up = Up()
    msg = parse(REQUEST)
    assert deliver_message(msg, source, up, OURS)
    assert up.got == [(msg, source)] and msg.top_via is not None
    assert msg.top_via.received == PEER[0]
    theirs = options("sip:x@192.0.2.1", "192.0.2.77:5060").reply(200)
    assert not deliver_message(parse(bytes(theirs)), source, up, OURS)
    assert len(up.got) == 1
    wire = Wire()
    bad = REQUEST.replace(b"Max-Forwards: 70\r\n", b"Max-Forwards 70\r\n")
    try:
        parse(bad)
    except ParseError as exc:
        assert answer_malformed(bad, exc, source, wire)
    assert [dest for _, dest in wire.sent] == [source]


def test_the_intake_imports_no_io() -> None:
    """Sans-IO: an embedder's loop may be anything, so neither asyncio nor sockets come in."""
    code = ("import sys, fastsip.transport.intake; "
            "print(sorted(m for m in ('asyncio', 'socket', 'selectors', 'ssl') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], env=fastsip_env(), cwd="/",
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("factory", LOOPS)
def test_udp_alias_does_not_touch_the_connection_table(factory: Any) -> None:
    """RFC 5923 aliases are for connections: a UDP request's ``;alias`` is no reason to
    alias the TCP connection whose id happens to equal the UDP socket's."""
    async def main() -> None:
        server = TransportLayer()
        inbox = Inbox()
        server.on_message = inbox
        try:
            udp = await server.listen("udp:127.0.0.1:0")
            tcp = await server.listen("tcp:127.0.0.1:0")
            _, writer = await asyncio.open_connection("127.0.0.1", tcp.address.port)
            writer.write(bytes(options("sip:x@127.0.0.1", "127.0.0.1:1", "TCP")))
            [(_, over_tcp)] = await inbox.wait(1)
            assert over_tcp.connection == udp.id           # the ids collide, as in the field
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for i in range(3):
                raw.sendto(bytes(options("sip:x@127.0.0.1", f"203.0.113.{i}:5099",
                                         call_id=f"u{i}", extra=";alias")),
                           ("127.0.0.1", udp.address.port))
            await inbox.wait(4)
            raw.close()
            assert [key for key in server._by_peer if key[0] == "UDP"] == []
            writer.close()
        finally:
            await server.close()

    run(factory, main())

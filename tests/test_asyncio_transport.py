"""The asyncio transports over real sockets (127.0.0.1 and ::1), on the default loop and uvloop:
UDP, TCP framing, keep-alives, bad input, connection reuse, TLS, and the Endpoint end to end."""

from __future__ import annotations

import asyncio
import itertools
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fastsip import FastSIPError, Limits, Message, Request, Response, parse
from fastsip.asyncio import Endpoint, TransportLayer, parse_listen
from fastsip.transaction import ClientTransaction, ServerTransaction, TimerConfig, new_branch
from fastsip.transport import Address
from fastsip.transport.rules import response_destination

sys.path.insert(0, str(Path(__file__).parent))
from netutil import (
    HAS_IPV6,
    LOOPS,
    Inbox,
    answer_with,
    free_port,
    hostport,
    needs_ipv6,
    options,
    run,
    tls_contexts,
)

HOSTS = [pytest.param("127.0.0.1", id="v4"),
         pytest.param("::1", id="v6", marks=needs_ipv6)]


# -- listen specs ------------------------------------------------------------------------------

def test_parse_listen() -> None:
    assert parse_listen("udp:127.0.0.1:5060") == ("UDP", "127.0.0.1", 5060)
    assert parse_listen("TCP:[::1]:5070") == ("TCP", "::1", 5070)
    assert parse_listen("tls:0.0.0.0") == ("TLS", "0.0.0.0", 5061)
    assert parse_listen("udp:[::]:0") == ("UDP", "::", 0)
    for bad in ["127.0.0.1:5060", "sctp:127.0.0.1:5060", "udp:", "udp:::1:5060",
                "tcp:[::1", "udp:127.0.0.1:99999", "udp:127.0.0.1:x", "udp:example.com:5060",
                "udp:[::1]5060"]:
        with pytest.raises(ValueError, match="listen spec"):
            parse_listen(bad)


@pytest.mark.parametrize("factory", LOOPS)
def test_sent_by_advertised_and_wildcard(factory: Any) -> None:
    async def main() -> None:
        t = TransportLayer()
        inbox = Inbox()
        t.on_message = inbox
        try:
            with pytest.raises(FastSIPError):
                t.sent_by("UDP")
            u = await t.listen("udp:0.0.0.0:0")
            host, port = t.sent_by("UDP")
            assert port == u.address.port and host not in ("0.0.0.0", "")
            await t.listen("tcp:127.0.0.1:0", advertise="203.0.113.9:5099")
            assert t.sent_by("TCP") == ("203.0.113.9", 5099)
            assert t.sent_by("TLS") == t.sent_by("UDP")      # no TLS listener: the first one
            # Responses naming the advertised address, or any host on the wildcard's port,
            # are ours.
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            for sent_by in ("203.0.113.9:5099", f"10.9.9.9:{u.address.port}"):
                raw.sendto(bytes(options("sip:x@y", sent_by).reply(200)),
                           ("127.0.0.1", u.address.port))
            await inbox.wait(2)
            raw.close()
        finally:
            await t.close()

    run(factory, main())


def test_the_socket_choice_follows_listeners_added_after_it_was_made() -> None:
    # The listener a destination's messages use is chosen once per kind of destination
    # (transport, family, side of loopback) and kept: a listener added later must still be
    # found, for sending and for our end in Via and Record-Route.
    async def main() -> None:
        t = TransportLayer()
        try:
            tcp = await t.listen("tcp:127.0.0.1:0")
            peer = Address("UDP", "127.0.0.1", 5999)
            assert t.local_for(peer) == Address("UDP", *tcp.sent_by)   # no UDP: a stand-in
            assert t._udp_listener(socket.AF_INET, "127.0.0.1") is None
            udp = await t.listen("udp:127.0.0.1:0")
            assert t.local_for(peer) == Address("UDP", *udp.sent_by, udp.id)
            assert t._udp_listener(socket.AF_INET, "127.0.0.1") is udp
            assert t.local_for(Address("TCP", "127.0.0.1", 5999)).connection == tcp.id
        finally:
            await t.close()
        assert t._udp_listener(socket.AF_INET, "127.0.0.1") is None

    asyncio.run(main())


# -- UDP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_round_trip(factory: Any, host: str) -> None:
    async def main() -> None:
        server, client = TransportLayer(), TransportLayer()
        got_request = answer_with(server)
        got_response = Inbox()
        client.on_message = got_response
        try:
            s = await server.listen(f"udp:{hostport(host, 0)}")
            c = await client.listen(f"udp:{hostport(host, 0)}")
            assert s.address.port != 0 and c.address.port != 0
            assert server.sent_by("UDP") == (host, s.address.port)
            # The Via names a host that is not the source, so received= must be stamped.
            req = options(f"sip:bob@{hostport(host, s.address.port)}",
                          hostport(host, c.address.port))
            client.send(bytes(req), s.address)
            [(msg, source)] = await got_request.wait()
            assert isinstance(msg, Request) and msg.method == "OPTIONS"
            # The source names the socket it arrived on (its listener's id): answers leave
            # from it.
            assert source == Address("UDP", host, c.address.port, s.id)
            assert msg.top_via is not None and msg.top_via.rport == c.address.port
            [(resp, rsource)] = await got_response.wait()
            assert isinstance(resp, Response) and resp.status_code == 200
            assert rsource == Address("UDP", host, s.address.port, c.id)
            assert resp.top_via is not None and resp.top_via.rport == c.address.port
        finally:
            await server.close()
            await client.close()

    run(factory, main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers: Linux SO_REUSEPORT")
@pytest.mark.parametrize("factory", LOOPS)
def test_a_workers_requests_leave_from_its_own_socket_and_their_answers_reach_it(
        factory: Any) -> None:
    """Two workers on one shared UDP address: each has a socket of its own beside it, which
    requests to a peer leave from and their Via names (so the peer's responses reach that
    worker, not whichever one the kernel picks for the shared address); Record-Route's
    local_for, answers to a source and sends on a flow stay on the shared socket."""
    async def main() -> None:
        port = free_port()
        workers = [TransportLayer(reuse_port=True), TransportLayer(reuse_port=True),
                   TransportLayer(reuse_port=True, own_sockets=False)]
        inboxes = [Inbox(), Inbox(), Inbox()]
        for index, (w, inbox) in enumerate(zip(workers, inboxes)):
            w.be_worker(index)
            w.on_message = inbox
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.settimeout(5)
        peer_address = Address("UDP", "127.0.0.1", peer.getsockname()[1])
        try:
            shared = [await w.listen(f"udp:127.0.0.1:{port}") for w in workers]
            assert shared[0].own is not None and shared[1].own is not None
            assert shared[2].own is None                 # own_sockets=False: the shared one
            own_ports = [shared[0].own.address.port, shared[1].own.address.port]
            assert len({port, *own_ports}) == 3
            for index, w in enumerate(workers[:2]):
                own = own_ports[index]
                # Via names the own socket; Record-Route (local_for) the shared address.
                via = w.via_for(peer_address)
                assert (via.host, via.port) == ("127.0.0.1", own)
                assert w.local_for(peer_address).port == port
                assert own in w.local_addresses()[1] and port in w.local_addresses()[1]
                # A request leaves from the own socket ...
                req = options(f"sip:bob@{peer_address.host}:{peer_address.port}",
                              f"127.0.0.1:{own}", branch=f"z9hG4bKown{index}",
                              call_id=f"own-{index}@test")
                w.send(bytes(req), peer_address)
                data, source = peer.recvfrom(65536)
                assert source == ("127.0.0.1", own)
                # ... and its response, sent back there, reaches this worker alone (its top
                # Via, naming the own port, is accepted as ours: §18.1.2).
                peer.sendto(bytes(parse(data).reply(200)), source)
                [(resp, rsource)] = await inboxes[index].wait()
                assert isinstance(resp, Response) and resp.status_code == 200
                assert rsource.port == peer_address.port
                # An answer to what came from a named socket (the shared one) leaves from it.
                w.send(b"\r\n\r\n", Address("UDP", peer_address.host, peer_address.port,
                                             shared[index].id))
                assert peer.recvfrom(100)[1] == ("127.0.0.1", port)
                # A request whose Via names the shared address (a trunk's REGISTER, built
                # with local_for) leaves from there.
                req = options(f"sip:bob@{peer_address.host}:{peer_address.port}",
                              f"127.0.0.1:{port}", branch=f"z9hG4bKshared{index}")
                w.send(bytes(req), peer_address)
                assert peer.recvfrom(65536)[1] == ("127.0.0.1", port)
                # A flow (a source naming the shared socket) gets the shared Via too.
                flow = Address("UDP", peer_address.host, peer_address.port, shared[index].id)
                assert w.via_for(flow).port == port
            assert [len(i.items) for i in inboxes] == [1, 1, 0]
            # own_sockets off: the shared port throughout.
            assert workers[2].via_for(peer_address).port == port
            workers[2].send(bytes(options(f"sip:bob@127.0.0.1:{peer_address.port}",
                                          f"127.0.0.1:{port}")), peer_address)
            assert peer.recvfrom(65536)[1] == ("127.0.0.1", port)
        finally:
            peer.close()
            for w in workers:
                await w.close()
        assert all(not w._own for w in workers)

    run(factory, main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers: Linux SO_REUSEPORT")
def test_no_own_socket_beside_an_advertised_address_or_for_a_single_process() -> None:
    async def main() -> None:
        advertised, single = TransportLayer(reuse_port=True), TransportLayer()
        advertised.be_worker(0)
        try:
            s = await advertised.listen("udp:127.0.0.1:0", advertise="203.0.113.5")
            # Behind NAT the mapping of an ephemeral port is unknown: the shared port.
            assert s.own is None
            assert advertised.via_for(Address("UDP", "127.0.0.1", 5060)) == \
                Address("UDP", "203.0.113.5", s.address.port, s.id)
            t = await single.listen("udp:127.0.0.1:0")
            assert t.own is None
            assert single.via_for(Address("UDP", "127.0.0.1", 5060)).port == t.address.port
        finally:
            await advertised.close()
            await single.close()

    run(asyncio.new_event_loop, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_udp_stamps_received_when_via_lies(factory: Any) -> None:
    async def main() -> None:
        server = TransportLayer()
        inbox = Inbox()
        server.on_message = inbox
        try:
            s = await server.listen("udp:127.0.0.1:0")
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.bind(("127.0.0.1", 0))
            port = raw.getsockname()[1]
            req = options("sip:bob@127.0.0.1", "client.invalid:5999")
            raw.sendto(bytes(req), ("127.0.0.1", s.address.port))
            [(msg, _)] = await inbox.wait()
            via = msg.top_via
            assert via is not None
            assert via.received == "127.0.0.1" and via.rport == port
            assert response_destination(via) == Address("UDP", "127.0.0.1", port)
            raw.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_malformed_datagrams_do_not_stall_the_listener(factory: Any) -> None:
    async def main() -> None:
        server = TransportLayer()
        inbox = Inbox()
        calls = 0

        def on_message(msg: Message, source: Address) -> None:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise RuntimeError("a bug above the transport")  # must not kill the listener
            inbox(msg, source)

        server.on_message = on_message
        try:
            s = await server.listen("udp:127.0.0.1:0")
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            dest = ("127.0.0.1", s.address.port)
            good = bytes(options("sip:bob@127.0.0.1", "127.0.0.1:1"))
            for junk in [b"\x00\xff" * 100, b"GARBAGE\r\n\r\n", b"INVITE sip:x SIP/9.9\r\n\r\n",
                         b"OPTIONS sip:x SIP/2.0\r\nContent-Length: 99\r\n\r\n", b"\r\n",
                         good[:40], b"SIP/2.0 200 OK\r\n\r\n", b"y" * 9000]:
                raw.sendto(junk, dest)
            raw.sendto(good.replace(b"call-1", b"first"), dest)    # raises in the callback
            raw.sendto(good, dest)
            [(msg, _)] = await inbox.wait()
            assert isinstance(msg, Request) and msg.call_id == "call-1@test"
            await asyncio.sleep(0.05)
            assert calls == 2      # nothing from the junk reached the callback
            raw.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_malformed_request_gets_400_and_the_server_keeps_serving(factory: Any,
                                                                transport: str) -> None:
    async def main() -> None:
        server = TransportLayer()
        inbox = Inbox()
        server.on_message = inbox
        try:
            s = await server.listen(f"{transport}:127.0.0.1:0")
            good = bytes(options("sip:bob@127.0.0.1", "127.0.0.1:1"))
            bad = good.replace(b"Max-Forwards: 70", b"Max-Forwards: 9999")
            assert bad != good
            if transport == "udp":
                raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                raw.settimeout(2.0)
                raw.sendto(bad, ("127.0.0.1", s.address.port))
                answer = await asyncio.get_running_loop().run_in_executor(None, raw.recv, 4096)
                raw.sendto(good, ("127.0.0.1", s.address.port))
            else:
                reader, writer = await asyncio.open_connection("127.0.0.1", s.address.port)
                writer.write(bad)
                answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
                writer.write(good)                         # the connection stays usable
            resp = parse(answer)
            assert isinstance(resp, Response) and resp.status_code == 400
            assert "Max-Forwards" in resp.reason and resp.call_id == "call-1@test"
            [(msg, _)] = await inbox.wait()
            assert isinstance(msg, Request) and msg.call_id == "call-1@test"
            if transport == "udp":
                raw.close()
            else:
                writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_response_with_foreign_via_is_dropped(factory: Any) -> None:
    async def main() -> None:
        client = TransportLayer()
        inbox = Inbox()
        client.on_message = inbox
        try:
            c = await client.listen("udp:127.0.0.1:0")
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            ours = options("sip:x@127.0.0.1", f"127.0.0.1:{c.address.port}", branch="z9hG4bKours")
            theirs = options("sip:x@127.0.0.1", "192.0.2.7:5060", branch="z9hG4bKtheirs")
            raw.sendto(bytes(theirs.reply(200)), ("127.0.0.1", c.address.port))
            raw.sendto(bytes(ours.reply(200)), ("127.0.0.1", c.address.port))
            [(msg, _)] = await inbox.wait()
            await asyncio.sleep(0.05)
            assert len(inbox.items) == 1
            assert msg.top_via is not None and msg.top_via.branch == "z9hG4bKours"
            client.check_via = False
            raw.sendto(bytes(theirs.reply(200)), ("127.0.0.1", c.address.port))
            await inbox.wait(2)
            raw.close()
        finally:
            await client.close()

    run(factory, main())


# -- TCP framing -------------------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("factory", LOOPS)
def test_tcp_split_and_coalesced_messages(factory: Any, host: str) -> None:
    async def main() -> None:
        server = TransportLayer()
        inbox = Inbox()
        server.on_message = inbox
        try:
            s = await server.listen(f"tcp:{hostport(host, 0)}")
            _, writer = await asyncio.open_connection(host, s.address.port)
            local_port = writer.get_extra_info("sockname")[1]
            one = options("sip:a@x", "h.invalid:1", "TCP", call_id="one")
            one.set_body(b"v=0\r\n", "application/sdp")
            data = bytes(one)
            cuts = [0, 10, len(data) - 3, len(data)]            # a message in three writes
            for start, end in itertools.pairwise(cuts):
                assert inbox.items == []
                writer.write(data[start:end])
                await writer.drain()
                await asyncio.sleep(0.02)
            [(first, source)] = await inbox.wait()
            assert first.call_id == "one" and bytes(first.body) == b"v=0\r\n"
            assert source.transport == "TCP" and source.port == local_port
            assert source.connection > 0
            # Two messages in one write, plus the start of a third.
            two = bytes(options("sip:a@x", "h.invalid:1", "TCP", call_id="two"))
            three = bytes(options("sip:a@x", "h.invalid:1", "TCP", call_id="three"))
            writer.write(two + three + b"OPTIONS sip:a@x SIP/2.0\r\n")
            items = await inbox.wait(3)
            assert [m.call_id for m, _ in items] == ["one", "two", "three"]
            assert {src.connection for _, src in items} == {source.connection}
            writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_tcp_keepalive_ping_gets_pong(factory: Any) -> None:
    async def main() -> None:
        server = TransportLayer()
        inbox = Inbox()
        server.on_message = inbox
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await asyncio.open_connection("127.0.0.1", s.address.port)
            writer.write(b"\r\n\r\n")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
            writer.write(b"\r\n\r")                              # a ping split in two
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(b"\n" + bytes(options("sip:a@x", "h.invalid:1", "TCP")))
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
            await inbox.wait()                                  # and the stream is in sync
            writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("garbage", [
    pytest.param(b"NOT SIP AT ALL " * 300, id="no-header-end"),
    pytest.param(b"OPTIONS sip:a@x SIP/2.0\r\nContent-Length: banana\r\n\r\n", id="bad-length"),
    pytest.param(b"OPTIONS sip:a@x SIP/2.0\r\nContent-Length: 999999\r\n\r\n", id="too-long"),
])
@pytest.mark.parametrize("factory", LOOPS)
def test_garbage_stream_closes_the_connection(factory: Any, garbage: bytes) -> None:
    async def main() -> None:
        server = TransportLayer(limits=Limits(max_message_size=4000))
        inbox = Inbox()
        server.on_message = inbox
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await asyncio.open_connection("127.0.0.1", s.address.port)
            writer.write(garbage)
            assert await asyncio.wait_for(reader.read(), 5) == b""       # EOF: closed
            await asyncio.sleep(0.02)
            assert list(server.connections()) == []
            assert inbox.items == []
            writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_idle_connections_are_closed(factory: Any) -> None:
    async def main() -> None:
        server = TransportLayer(idle_timeout=0.2)
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await asyncio.open_connection("127.0.0.1", s.address.port)
            await asyncio.sleep(0.05)
            assert len(list(server.connections())) == 1
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert loop.time() - start >= 0.1
            assert list(server.connections()) == []
            writer.close()
        finally:
            await server.close()

    run(factory, main())


# -- connections: reuse, on demand, failure ----------------------------------------------------

@pytest.mark.parametrize("factory", LOOPS)
def test_response_and_new_requests_reuse_the_incoming_connection(factory: Any) -> None:
    async def main() -> None:
        server = TransportLayer()
        inbox = answer_with(server)
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await asyncio.open_connection("127.0.0.1", s.address.port)
            writer.write(bytes(options("sip:a@x", "h.invalid:5060", "TCP")))
            [(_, source)] = await inbox.wait()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            resp = parse(head)
            assert isinstance(resp, Response) and resp.status_code == 200
            # A request to the peer (no connection id) goes over the same connection.
            peer = Address("TCP", source.host, source.port)
            server.send(bytes(options("sip:c@x", "127.0.0.1:1", "TCP", call_id="back")), peer)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            back = parse(head)
            assert isinstance(back, Request) and back.call_id == "back"
            assert len(list(server.connections())) == 1
            writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_outgoing_connection_on_demand_and_alias(factory: Any) -> None:
    async def main() -> None:
        server, client = TransportLayer(), TransportLayer()
        got = answer_with(server)
        responses = Inbox()
        client.on_message = responses
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            c = await client.listen("tcp:127.0.0.1:0")
            sent_by = hostport(*client.sent_by("TCP"))
            assert sent_by == f"127.0.0.1:{c.address.port}"
            # Two sends before the connection is up: both are queued and arrive in order.
            for n in range(2):
                req = options("sip:b@x", sent_by, "TCP", branch=f"z9hG4bK{n}", call_id=f"q{n}",
                              extra=";alias")
                client.send(bytes(req), s.address)
            items = await got.wait(2)
            assert [m.call_id for m, _ in items] == ["q0", "q1"]
            await responses.wait(2)
            assert len(list(client.connections())) == 1
            # RFC 5923 alias: the server reaches the client's listening address over the same
            # connection instead of opening a new one.
            server.send(bytes(options("sip:c@x", "127.0.0.1:1", "TCP", call_id="via-alias")),
                        Address("TCP", "127.0.0.1", c.address.port))
            [*_, (msg, src)] = await responses.wait(3)
            assert msg.call_id == "via-alias"
            assert src.port == s.address.port          # it came from the server's listener
            assert len(list(server.connections())) == 1
        finally:
            await server.close()
            await client.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_oversized_datagram_and_unknown_transport_report_errors(factory: Any) -> None:
    async def main() -> None:
        errors: list[Address] = []
        client = TransportLayer(on_error=errors.append)
        try:
            c = await client.listen("udp:127.0.0.1:0")
            big = Address("UDP", "127.0.0.1", c.address.port)
            sctp = Address("SCTP", "127.0.0.1", 5060)
            client.send(b"x" * 70000, big)
            client.send(b"x", sctp)
            await asyncio.sleep(0.05)
            assert errors == [big, sctp]
        finally:
            await client.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_udp_resolves_host_names(factory: Any) -> None:
    async def main() -> None:
        server, client = TransportLayer(), TransportLayer()
        inbox = Inbox()
        server.on_message = inbox
        try:
            s = await server.listen("udp:127.0.0.1:0")
            await client.listen("udp:127.0.0.1:0")
            client.send(bytes(options("sip:b@localhost", "127.0.0.1:1")),
                        Address("UDP", "localhost", s.address.port))
            [(msg, _)] = await inbox.wait()
            assert msg.call_id == "call-1@test"
        finally:
            await server.close()
            await client.close()

    run(factory, main())


@pytest.mark.parametrize("transport", ["TCP", "UDP"])
@pytest.mark.parametrize("factory", LOOPS)
def test_unreachable_peer_reports_a_transport_error(factory: Any, transport: str) -> None:
    async def main() -> None:
        errors: list[Address] = []
        client = TransportLayer(on_error=errors.append)
        try:
            await client.listen("tcp:127.0.0.1:0")     # no UDP listener for UDP: an error too
            dest = Address(transport, "127.0.0.1", free_port())
            client.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n", dest)
            assert errors == []                         # never from inside send()
            for _ in range(200):
                if errors:
                    break
                await asyncio.sleep(0.01)
            assert errors == [dest]
            assert list(client.connections()) == []
        finally:
            await client.close()

    run(factory, main())


# -- TLS ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("factory", LOOPS)
def test_tls_round_trip(factory: Any, host: str, tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)

    async def main() -> None:
        server = TransportLayer(tls_context=server_ctx)
        client = TransportLayer(tls_context=server_ctx, tls_client_context=client_ctx)
        got = answer_with(server)
        responses = Inbox()
        client.on_message = responses
        try:
            s = await server.listen(f"tls:{hostport(host, 0)}")
            await client.listen(f"tls:{hostport(host, 0)}")
            req = options(f"sips:b@{hostport(host, s.address.port)}",
                          hostport(*client.sent_by("TLS")), "TLS")
            client.send(bytes(req), s.address)
            [(msg, source)] = await got.wait()
            assert msg.call_id == "call-1@test" and source.transport == "TLS"
            [(resp, _)] = await responses.wait()
            assert isinstance(resp, Response) and resp.status_code == 200
        finally:
            await server.close()
            await client.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_tls_untrusted_certificate_is_a_transport_error(factory: Any, tmp_path: Path) -> None:
    server_ctx, _ = tls_contexts(tmp_path)

    async def main() -> None:
        errors: list[Address] = []
        server = TransportLayer(tls_context=server_ctx)
        client = TransportLayer(on_error=errors.append)   # system trust store: not ours
        try:
            s = await server.listen("tls:127.0.0.1:0")
            await client.listen("udp:127.0.0.1:0")
            client.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n", s.address)
            for _ in range(300):
                if errors:
                    break
                await asyncio.sleep(0.01)
            assert errors == [s.address]
        finally:
            await server.close()
            await client.close()

    run(factory, main())


# -- Endpoint: transport + timers + transactions -----------------------------------------------

class Answerer:
    """A transaction user that answers every request with 200."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        self.requests.append(request)
        txn.reply(200, to_tag="srv")

    def on_ack(self, request: Request, source: Address) -> None: ...
    def on_stray_response(self, response: Response, source: Address) -> None: ...
    def on_server_timeout(self, txn: ServerTransaction) -> None: ...


class Waiter:
    """A client handler recording what happens to one transaction."""

    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        if response.status_code >= 200 and not self.done.done():
            self.done.set_result(response.status_code)

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.done.set_result("timeout")

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self.done.set_result("transport error")


@pytest.mark.parametrize("factory", LOOPS)
def test_endpoint_transactions_over_udp_and_tcp(factory: Any) -> None:
    listen = ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"] + (["udp:[::1]:0"] if HAS_IPV6 else [])

    async def main() -> None:
        uas = Answerer()
        async with Endpoint(uas, listen) as server, \
                Endpoint(Answerer(), ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"],
                         timers=TimerConfig(t1=0.05)) as client:
            assert "not started" not in repr(server)
            for transport in ("UDP", "TCP"):
                dest = server.address(transport)
                req = options(f"sip:b@{hostport(dest.host, dest.port)}",
                              hostport(*client.transport.sent_by(transport)), transport,
                              branch=new_branch(), call_id=f"ep-{transport}")
                waiter = Waiter()
                client.transactions.request(req, dest, waiter)
                assert await asyncio.wait_for(waiter.done, 5) == 200
            assert [r.call_id for r in uas.requests] == ["ep-UDP", "ep-TCP"]
            # A dead peer: the transaction ends with a transport error, not a timeout.
            waiter = Waiter()
            req = options("sip:b@127.0.0.1", hostport(*client.transport.sent_by("TCP")), "TCP",
                          branch=new_branch())
            client.transactions.request(req, Address("TCP", "127.0.0.1", free_port()), waiter)
            assert await asyncio.wait_for(waiter.done, 5) == "transport error"
        assert server.listeners == [] and client.listeners == []

    run(factory, main())


def test_a_udp_wakeup_reads_the_clock_once_for_its_timers() -> None:
    # The plain asyncio loop's clock moves on every read: while a UDP wakeup's datagram is
    # handled, the transactions' clock stays at the wakeup's one reading (uvloop's does
    # anyway: libuv caches it per iteration), and it moves again once the wakeup is over.
    readings: list[tuple[float, float]] = []

    class Slow(Answerer):
        def on_request(self, txn: ServerTransaction, request: Request) -> None:
            before = server.transactions.clock.time()
            time.sleep(0.02)                         # (a slow handler: the clock would move)
            readings.append((before, server.transactions.clock.time()))
            super().on_request(txn, request)

    async def main() -> None:
        nonlocal server
        async with Endpoint(Slow(), ["udp:127.0.0.1:0"]) as server, \
                Endpoint(Answerer(), ["udp:127.0.0.1:0"]) as client:
            dest = server.address("UDP")
            req = options(f"sip:b@{hostport(dest.host, dest.port)}",
                          hostport(*client.transport.sent_by("UDP")), "UDP",
                          branch=new_branch(), call_id="held-clock")
            waiter = Waiter()
            client.transactions.request(req, dest, waiter)
            assert await asyncio.wait_for(waiter.done, 5) == 200
            outside = server.transactions.clock.time()
            await asyncio.sleep(0.02)
            assert server.transactions.clock.time() >= outside + 0.019

    server: Endpoint
    asyncio.run(main())
    [(before, after)] = readings
    assert after == before


def test_endpoint_before_start_and_bad_spec() -> None:
    ep = Endpoint(Answerer.__new__(Answerer), ["udp:127.0.0.1:0", "bogus"])
    with pytest.raises(FastSIPError):
        ep.transactions  # noqa: B018
    with pytest.raises(ValueError, match="listen spec"):
        asyncio.run(ep.start())
    assert ep.listeners == []        # the UDP listener bound first was closed again


def test_transport_stats_are_plain_counters() -> None:
    """TransportStats (compiled, so a UDP wakeup counts in C) reads, sets, compares and
    prints as the dataclass it replaced did, and refuses a counter it does not have."""
    from fastsip.asyncio import TransportStats
    stats = TransportStats()
    assert stats.datagrams == 0 and stats.malformed == 0
    stats.datagrams += 5
    stats.sends_dropped = 2
    assert stats == TransportStats(datagrams=5, sends_dropped=2)
    assert stats != TransportStats(datagrams=5)
    assert stats.as_dict()["datagrams"] == 5 and len(stats.as_dict()) == 13
    assert repr(stats).startswith("TransportStats(datagrams=5, datagrams_denied=0,")
    with pytest.raises(TypeError):
        TransportStats(packets=1)  # type: ignore[call-arg]
    with pytest.raises(AttributeError):
        stats.packets = 1  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        hash(stats)

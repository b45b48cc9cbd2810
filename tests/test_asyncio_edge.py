"""The transport at the edge, over real sockets on 127.0.0.0/8 (and ::1), on asyncio and uvloop:
connection limits, idle/read/TLS-handshake timeouts, the ``admit`` hook, responses on the
connection a request came in on (§18.2.2), the lean UDP path, and our own addresses."""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastsip import Request, Response, parse
from fastsip.asyncio import Endpoint, TransportLayer, _udp, interface_addresses, netif
from fastsip.asyncio.timers import WheelDriver
from fastsip.asyncio.transport import _UdpSocket
from fastsip.proxy.edge import SourceGuard
from fastsip.transaction import ServerTransaction, TransactionLayer
from fastsip.transport import Address

sys.path.insert(0, str(Path(__file__).parent))
from netutil import (
    HAS_IPV6,
    LOOPS,
    Inbox,
    answer_with,
    has_add_reader,
    hostport,
    needs_ipv6,
    needs_loopback_aliases,
    options,
    run,
    tls_contexts,
)
from procutil import posix_only

#: Both ways of reading sockets: our own (add_reader) and the loop's endpoints and servers
#: (uvloop's UDP transport by default; all of them where the loop has no add_reader).
IO = [pytest.param(True, id="lean"), pytest.param(False, id="stand-in")]

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


def make_layer(lean: bool | None = None, **kwargs: Any) -> TransportLayer:
    """A TransportLayer reading its sockets the ``lean`` way or not (None: the default)."""
    layer = TransportLayer(**kwargs)
    if lean is not None:
        layer._lean_io = lean
        layer._lean_udp = lean
    return layer


async def connect(port: int, host: str = "127.0.0.1", local: str | None = None
                  ) -> tuple[Reader, Writer]:
    return await asyncio.open_connection(
        host, port, local_addr=(local, 0) if local else None)


async def closed_by_server(reader: Reader, timeout: float = 2.0) -> bool:
    """True when the server closes the connection (EOF or reset) within ``timeout``."""
    try:
        return await asyncio.wait_for(reader.read(65536), timeout) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


async def ping(reader: Reader, writer: Writer, call_id: str) -> Response:
    """One OPTIONS over an open TCP connection, and its response."""
    writer.write(bytes(options("sip:a@x", "h.invalid:5060", "TCP", call_id=call_id)))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    resp = parse(head)
    assert isinstance(resp, Response) and resp.call_id == call_id
    return resp


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- connection limits -------------------------------------------------------------------------

@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_over_max_connections_is_refused_at_once(factory: Any, lean: bool) -> None:
    async def main() -> None:
        server = make_layer(lean, max_connections=3)
        answer_with(server)
        clients: list[tuple[Reader, Writer]] = []
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            for n in range(3):
                clients.append(await connect(s.address.port))
                await ping(*clients[-1], f"c{n}")
            extra = await connect(s.address.port)
            assert await closed_by_server(extra[0], 1.0)
            extra[1].close()
            assert server.stats.connections_refused == 1
            # The ones already open keep working...
            for n, client in enumerate(clients):
                await ping(*client, f"again{n}")
            # ...and once one closes, a new connection is accepted and served.
            clients.pop()[1].close()
            await until(lambda: len(list(server.connections())) == 2)
            clients.append(await connect(s.address.port))
            await ping(*clients[-1], "new")
            assert server.stats.connections_refused == 1
        finally:
            for _, writer in clients:
                writer.close()
            await server.close()

    run(factory, main())


@needs_loopback_aliases
@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_per_source_cap(factory: Any, lean: bool) -> None:
    async def main() -> None:
        server = make_layer(lean, max_connections_per_source=2)
        answer_with(server)
        clients: list[tuple[Reader, Writer]] = []
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            for n in range(2):
                clients.append(await connect(s.address.port, local="127.0.0.1"))
                await ping(*clients[-1], f"one{n}")
            third = await connect(s.address.port, local="127.0.0.1")
            assert await closed_by_server(third[0], 1.0)
            third[1].close()
            assert server.stats.connections_refused_per_source == 1
            # Another source (127.0.0.2 is loopback too) has its own count.
            clients.append(await connect(s.address.port, local="127.0.0.2"))
            resp = await ping(*clients[-1], "two")
            assert resp.status_code == 200
            assert sorted(a.host for a in server.connections()) == ["127.0.0.1", "127.0.0.1",
                                                                    "127.0.0.2"]
        finally:
            for _, writer in clients:
                writer.close()
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_outgoing_connect_over_the_cap_is_a_transport_error(factory: Any) -> None:
    async def main() -> None:
        errors: list[Address] = []
        a, b = make_layer(), make_layer()
        client = make_layer(max_connections=1, on_error=errors.append)
        inbox = Inbox()
        a.on_message = b.on_message = inbox
        try:
            sa = await a.listen("tcp:127.0.0.1:0")
            sb = await b.listen("tcp:127.0.0.1:0")
            await client.listen("udp:127.0.0.1:0")
            client.send(bytes(options("sip:a@x", "127.0.0.1:1", "TCP")), sa.address)
            client.send(bytes(options("sip:b@x", "127.0.0.1:1", "TCP")), sb.address)
            await inbox.wait(1)
            await until(lambda: bool(errors))
            assert errors == [sb.address]
            assert client.stats.connects_refused == 1
            assert [x.port for x in client.connections()] == [sa.address.port]
        finally:
            for layer in (a, b, client):
                await layer.close()

    run(factory, main())


# -- timeouts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", LOOPS)
def test_idle_connection_is_closed_after_idle_timeout(factory: Any) -> None:
    async def main() -> None:
        server = make_layer(idle_timeout=0.3)
        answer_with(server)
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await connect(s.address.port)
            await ping(reader, writer, "before")           # traffic resets the idle clock
            loop = asyncio.get_running_loop()
            start = loop.time()
            assert await closed_by_server(reader)
            assert 0.25 <= loop.time() - start < 1.5
            assert server.stats.closed_idle == 1 and server.stats.closed_read_timeout == 0
            assert list(server.connections()) == []
            writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_slowloris_is_closed_after_read_timeout(factory: Any, lean: bool) -> None:
    async def main() -> None:
        server = make_layer(lean, read_timeout=0.5, idle_timeout=10)
        inbox = answer_with(server)
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            slow_reader, slow = await connect(s.address.port)
            normal = await connect(s.address.port)
            loop = asyncio.get_running_loop()
            slow.write(b"OPTIONS sip:a@x SIP/2.0\r\n")     # a message that never ends
            start = loop.time()
            closed_after = None
            for n in range(15):                           # a header line every 0.2 s...
                await asyncio.sleep(0.2)
                await ping(*normal, f"normal{n}")         # ...while a normal client is served
                if slow_reader.at_eof() or slow.is_closing():
                    break
                try:
                    slow.write(f"X-Slow-{n}: still typing\r\n".encode())
                    await slow.drain()
                except (ConnectionResetError, BrokenPipeError):
                    break
                if closed_after is None and server.stats.closed_read_timeout:
                    closed_after = loop.time() - start
            assert await closed_by_server(slow_reader, 1.0)
            if closed_after is None:
                closed_after = loop.time() - start
            assert 0.45 <= closed_after < 1.5, closed_after
            assert server.stats.closed_read_timeout == 1 and server.stats.closed_idle == 0
            await ping(*normal, "after")
            assert [a.port for a in server.connections()] == \
                [normal[1].get_extra_info("sockname")[1]]
            assert all(m.call_id != "call-1@test" for m, _ in inbox.items)
            slow.close()
            normal[1].close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_messages_completed_slowly_are_kept(factory: Any) -> None:
    """Each message arriving over less than read_timeout is fine however long the stream
    lasts: the clock restarts at the first byte of each message, also when that byte comes in
    the same read as the end of the message before."""
    async def main() -> None:
        server = make_layer(read_timeout=0.4, idle_timeout=10)
        inbox = answer_with(server)
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await connect(s.address.port)
            stream = b"".join(bytes(options("sip:a@x", "h.invalid:5060", "TCP",
                                            call_id=f"m{n}")) for n in range(4))
            step = len(stream) * 3 // 20          # 0.6 of a message: reads straddle messages
            for start in range(0, len(stream), step):      # ~0.7 s in all, 0.2 s per message
                writer.write(stream[start:start + step])
                await asyncio.sleep(0.1)
            items = await inbox.wait(4)
            assert [m.call_id for m, _ in items] == ["m0", "m1", "m2", "m3"]
            assert server.stats.closed_read_timeout == 0
            assert len(list(server.connections())) == 1
            for _ in range(4):
                await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            writer.close()
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_tls_client_that_never_handshakes_is_closed(factory: Any, lean: bool,
                                                    tmp_path: Path) -> None:
    server_ctx, client_ctx = tls_contexts(tmp_path)

    async def main() -> None:
        server = make_layer(lean, tls_context=server_ctx, tls_handshake_timeout=0.4)
        answer_with(server)
        try:
            s = await server.listen("tls:127.0.0.1:0")
            loop = asyncio.get_running_loop()
            mute_reader, mute = await connect(s.address.port)   # plain TCP: no ClientHello
            start = loop.time()
            if lean:   # counted from accept, so a handshake cannot dodge the limits
                await until(lambda: len(list(server.connections())) == 1)
            assert await closed_by_server(mute_reader, 3.0)
            assert 0.35 <= loop.time() - start < 2.0
            mute.close()
            if lean:
                assert server.stats.tls_handshakes_failed == 1
            await until(lambda: list(server.connections()) == [])
            # A client that does handshake is served.
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", s.address.port, ssl=client_ctx, server_hostname="127.0.0.1")
            resp = await ping(reader, writer, "tls")
            assert resp.status_code == 200
            writer.close()
        finally:
            await server.close()

    run(factory, main())


# -- admit -------------------------------------------------------------------------------------

class Gate:
    """An admit hook with a switch, recording what it was asked."""

    def __init__(self) -> None:
        self.open = False
        self.asked: list[tuple[str, float]] = []

    def __call__(self, host: str, now: float) -> bool:
        self.asked.append((host, now))
        return self.open


@pytest.mark.parametrize("host", [pytest.param("127.0.0.1", id="v4"),
                                  pytest.param("::1", id="v6", marks=needs_ipv6)])
@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_admit_drops_datagrams_silently(factory: Any, lean: bool, host: str) -> None:
    async def main() -> None:
        gate = Gate()
        server = make_layer(lean, admit=gate)
        inbox = answer_with(server)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        raw = socket.socket(family, socket.SOCK_DGRAM)
        raw.bind((host, 0))
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            s = await server.listen(f"udp:{hostport(host, 0)}")
            dest = (host, s.address.port)
            good = bytes(options("sip:a@x", hostport(host, raw.getsockname()[1])))
            for data in (good, b"garbage that would get no answer anyway", b"\r\n\r\n"):
                raw.sendto(data, dest)
            await until(lambda: len(gate.asked) == 3)
            await asyncio.sleep(0.1)
            assert inbox.items == []
            with pytest.raises(BlockingIOError):
                raw.recv(65535)                       # nothing came back
            assert server.stats.datagrams_denied == 3
            assert {h for h, _ in gate.asked} == {host}
            assert all(isinstance(now, float) and abs(now - loop.time()) < 5
                       for _, now in gate.asked)
            gate.open = True
            raw.sendto(good, dest)
            await inbox.wait(1)
            answer = await asyncio.wait_for(loop.sock_recv(raw, 65535), 2)
            assert parse(answer).status_code == 200   # type: ignore[union-attr]
            assert server.stats.datagrams == 4 and server.stats.datagrams_denied == 3
        finally:
            raw.close()
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_admit_closes_connections(factory: Any, lean: bool) -> None:
    async def main() -> None:
        gate = Gate()
        server = make_layer(lean, admit=gate)
        inbox = answer_with(server)
        try:
            s = await server.listen("tcp:127.0.0.1:0")
            reader, writer = await connect(s.address.port)
            assert await closed_by_server(reader, 1.0)      # refused when accepted
            writer.close()
            assert server.stats.connections_denied == 1 and inbox.items == []
            gate.open = True
            reader, writer = await connect(s.address.port)
            await ping(reader, writer, "let-in")
            # Banned while connected: the next message closes the connection, unanswered.
            gate.open = False
            writer.write(bytes(options("sip:a@x", "h.invalid:5060", "TCP", call_id="late")))
            assert await closed_by_server(reader, 1.0)
            writer.close()
            assert server.stats.messages_denied == 1
            assert [m.call_id for m, _ in inbox.items] == ["let-in"]
            assert {h for h, _ in gate.asked} == {"127.0.0.1"}
            await until(lambda: list(server.connections()) == [])
        finally:
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_admit_that_raises_denies_and_the_listener_survives(factory: Any) -> None:
    async def main() -> None:
        broken = True

        def admit(host: str, now: float) -> bool:
            if broken:
                raise RuntimeError("a bug in the policy")
            return True

        server = make_layer(admit=admit)
        inbox = answer_with(server)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s = await server.listen("udp:127.0.0.1:0")
            raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1")), ("127.0.0.1", s.address.port))
            await until(lambda: server.stats.datagrams == 1)
            broken = False
            raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1")), ("127.0.0.1", s.address.port))
            await inbox.wait(1)
        finally:
            raw.close()
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("factory", LOOPS)
def test_admit_that_raises_loses_no_other_datagram_of_the_wakeup(factory: Any) -> None:
    """Three datagrams read in one wakeup (one recvmmsg on Linux), the admit hook raising for
    the second: that one is denied and logged, the two others are handled."""
    async def main() -> None:
        asked: list[str] = []

        def admit(host: str, now: float) -> bool:
            asked.append(host)
            if len(asked) == 2:
                raise RuntimeError("a bug in the policy")
            return True

        server = make_layer(admit=admit)
        inbox = Inbox()
        server.on_message = inbox
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s = await server.listen("udp:127.0.0.1:0")
            for n in range(3):
                raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id=f"q{n}")),
                           ("127.0.0.1", s.address.port))
            await inbox.wait(2)
            await asyncio.sleep(0.05)
            assert [m.call_id for m, _ in inbox.items] == ["q0", "q2"]
            assert len(asked) == 3
        finally:
            raw.close()
            await server.close()

    run(factory, main())


# -- §18.2.2: a request that came over a connection is answered over it --------------------------

class Answerer:
    """A transaction user that answers every request with 200."""

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        txn.reply(200, to_tag="srv")

    def on_ack(self, request: Request, source: Address) -> None: ...
    def on_stray_response(self, response: Response, source: Address) -> None: ...
    def on_server_timeout(self, txn: ServerTransaction) -> None: ...


@pytest.mark.parametrize("factory", LOOPS)
def test_response_goes_back_over_the_connection_whatever_the_via_says(factory: Any) -> None:
    async def main() -> None:
        decoy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # the Via's UDP address
        decoy.bind(("127.0.0.1", 0))
        decoy.setblocking(False)
        decoy_port = decoy.getsockname()[1]
        try:
            async with Endpoint(Answerer(), ["udp:127.0.0.1:0", "tcp:127.0.0.1:0"]) as ep:
                reader, writer = await connect(ep.address("TCP").port)
                req = options("sip:a@127.0.0.1", f"127.0.0.1:{decoy_port}", "UDP",
                              call_id="via-says-udp")
                writer.write(bytes(req))
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
                resp = parse(head)
                assert isinstance(resp, Response) and resp.status_code == 200
                assert resp.call_id == "via-says-udp"
                await asyncio.sleep(0.2)
                with pytest.raises(BlockingIOError):
                    decoy.recv(65535)
                writer.close()
        finally:
            decoy.close()

    run(factory, main())


# -- the lean UDP path -------------------------------------------------------------------------

@pytest.mark.parametrize("factory", LOOPS)
def test_udp_path_by_loop(factory: Any) -> None:
    """The compiled socket on add_reader, on asyncio and on uvloop alike."""
    async def main() -> None:
        layer = make_layer()
        try:
            s = await layer.listen("udp:127.0.0.1:0")
            loop = asyncio.get_running_loop()
            # (Windows' proactor loop has no add_reader: the datagram endpoint there.)
            lean = has_add_reader(loop)
            assert type(s._udp).__name__ == ("UdpSocket" if lean else "_Datagram")
            assert s.receive_buffer > 0
        finally:
            await layer.close()

    run(factory, main())


@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_burst_is_drained(factory: Any, lean: bool) -> None:
    async def main() -> None:
        server = make_layer(lean)
        inbox = Inbox()
        server.on_message = inbox
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s = await server.listen("udp:127.0.0.1:0")
            # (Windows' proactor loop has no add_reader: the datagram endpoint stands in.)
            own = lean and has_add_reader(asyncio.get_running_loop())
            assert type(s._udp).__name__ == ("UdpSocket" if own else "_Datagram")
            for n in range(600):                           # more than one batch
                raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id=f"b{n}")),
                           ("127.0.0.1", s.address.port))
            items = await inbox.wait(600)
            assert [m.call_id for m, _ in items] == [f"b{n}" for n in range(600)]
            assert server.stats.datagrams == 600
        finally:
            raw.close()
            await server.close()

    run(factory, main())


@needs_loopback_aliases
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_sources_are_named_right_past_the_name_cache(factory: Any) -> None:
    """The compiled socket names a datagram's source from a cache of recent ones: twelve
    sources (more than it keeps), interleaved, each named and numbered as the kernel gave it
    (host and port), IPv6 too."""
    async def main() -> None:
        server = make_layer()
        inbox = Inbox()
        server.on_message = inbox
        senders: list[socket.socket] = []
        try:
            s = await server.listen("udp:127.0.0.1:0")
            for n in range(12):
                raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                raw.bind((f"127.0.0.{n + 2}", 0))
                senders.append(raw)
            expected = []
            for round_ in range(3):
                for n, raw in enumerate(senders):
                    call_id = f"s{round_}-{n}"
                    raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id=call_id)),
                               ("127.0.0.1", s.address.port))
                    expected.append((call_id, raw.getsockname()))
                    await asyncio.sleep(0)
            items = await inbox.wait(len(expected))
            got = {m.call_id: (source.host, source.port) for m, source in items}
            assert got == dict(expected)
            assert all(source.connection == s.id for _, source in items)
            if HAS_IPV6:
                s6 = await server.listen("udp:[::1]:0")
                raw6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                senders.append(raw6)
                raw6.bind(("::1", 0))
                raw6.sendto(bytes(options("sip:a@x", "[::1]:1", call_id="v6")),
                            ("::1", s6.address.port))
                m, source = (await inbox.wait(len(expected) + 1))[-1]
                assert (m.call_id, source.host, source.port) == ("v6", "::1",
                                                                 raw6.getsockname()[1])
        finally:
            for raw in senders:
                raw.close()
            await server.close()

    run(factory, main())


@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_path_follows_hooks_set_while_listening(factory: Any, lean: bool) -> None:
    """The UDP path reads the layer's hooks from a snapshot in C fields: setting one while a
    socket listens (a new receiver, an admit hook, none again) takes effect at once."""
    async def main() -> None:
        server = make_layer(lean)
        first, second = Inbox(), Inbox()
        server.on_message = first
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s = await server.listen("udp:127.0.0.1:0")

            def send(call_id: str) -> None:
                raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id=call_id)),
                           ("127.0.0.1", s.address.port))

            send("one")
            await first.wait(1)
            server.on_message = second
            server.admit = lambda host, now: False
            send("denied")
            await until(lambda: server.stats.datagrams_denied == 1)
            server.admit = None
            send("two")
            items = await second.wait(1)
            assert [m.call_id for m, _ in items] == ["two"]
            assert [m.call_id for m, _ in first.items] == ["one"]
            assert server.stats.datagrams == 3
        finally:
            raw.close()
            await server.close()

    run(factory, main())


class CountingGuard(SourceGuard):
    """A source guard whose ``admit`` a user overrode in Python (here: a switch, then the
    guard's own rate limit)."""

    def __init__(self) -> None:
        super().__init__(rate=1000.0, burst=1000.0)
        self.deny = False
        self.asked: list[str] = []

    def admit(self, host: str, now: float) -> bool:
        self.asked.append(host)
        return not self.deny and super().admit(host, now)


@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_path_calls_the_layer_and_the_guard_as_c_objects(factory: Any, lean: bool) -> None:
    """Wired as the Endpoint and serve wire them (the transaction layer's bound ``receive`` as
    ``on_message``, a guard's bound ``admit`` as the hook), the compiled UDP path keeps the
    two objects and calls their C methods; a Python override of ``admit`` still decides, and
    every request still reaches the transaction user and is answered."""
    async def main() -> None:
        guard = CountingGuard()
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            ep = Endpoint(Answerer(), ["udp:127.0.0.1:0"], admit=guard.admit)
            layer = ep.transport
            layer._lean_io = layer._lean_udp = lean
            async with ep:
                intake = layer._intake
                assert intake is not None
                assert intake.on_message is ep.transactions     # the layer, not its method
                assert intake.admit is guard
                dest = ("127.0.0.1", ep.address("UDP").port)
                sent_by = f"127.0.0.1:{raw.getsockname()[1]}"

                async def ask(call_id: str) -> Response | None:
                    raw.sendto(bytes(options("sip:a@x", sent_by, call_id=call_id,
                                             branch=f"z9hG4bK{call_id}")), dest)
                    try:
                        data = await asyncio.wait_for(loop.sock_recv(raw, 65535), 1)
                    except asyncio.TimeoutError:
                        return None
                    answer = parse(data)
                    assert isinstance(answer, Response)
                    return answer

                first = await ask("c-one")
                assert first is not None and first.status_code == 200
                assert first.call_id == "c-one"
                guard.deny = True                    # the override says no: nothing comes back
                assert await ask("c-two") is None
                assert layer.stats.datagrams_denied == 1
                guard.deny = False
                third = await ask("c-three")
                assert third is not None and third.call_id == "c-three"
                assert guard.asked == ["127.0.0.1"] * 3
        finally:
            raw.close()

    run(factory, main())


class RecordingTransport(TransportLayer):
    """A transport whose ``send`` a user replaced (here: to see every message go)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Address] = []

    def send(self, data: bytes, dest: Address) -> None:
        self.sent.append(dest)
        super().send(data, dest)


@pytest.mark.parametrize("replaced", ["by-subclass", "on-instance"])
@pytest.mark.parametrize("factory", LOOPS)
def test_transactions_send_through_the_compiled_transport_unless_send_is_replaced(
        factory: Any, replaced: str) -> None:
    """A TransportLayer gives the layers above a compiled stand-in for its send, local_for
    and via_for (called without a Python call).  A subclass that replaces one of them has
    none; a ``send`` set on the instance after the layers above were built (as serve's
    metrics wrap it) is called by the stand-in.  Either way the transaction layer's
    messages go through the replaced send."""
    async def main() -> None:
        plain = TransportLayer()
        assert isinstance(plain.compiled, _udp.LayerTransport) and plain.compiled.layer is plain
        server: TransportLayer
        sent: list[Address] = []
        if replaced == "by-subclass":
            server = RecordingTransport()
            sent = server.sent
            assert server.compiled is None
        else:
            server = TransportLayer()
            assert server.compiled is not None
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.bind(("127.0.0.1", 0))
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        driver = WheelDriver()
        try:
            s = await server.listen("udp:127.0.0.1:0")
            transactions = TransactionLayer(server, driver, Answerer())
            server.on_message = transactions.receive
            if replaced == "on-instance":
                send = server.send

                def counting(data: bytes, dest: Address) -> None:
                    sent.append(dest)
                    send(data, dest)

                server.send = counting  # type: ignore[method-assign]
            raw.sendto(bytes(options("sip:a@x", f"127.0.0.1:{raw.getsockname()[1]}",
                                     call_id="through-send")), ("127.0.0.1", s.address.port))
            answer = parse(await asyncio.wait_for(loop.sock_recv(raw, 65535), 2))
            assert isinstance(answer, Response) and answer.status_code == 200
            assert answer.call_id == "through-send"
            assert [d.port for d in sent] == [raw.getsockname()[1]]
        finally:
            raw.close()
            driver.close()
            await server.close()
            await plain.close()

    run(factory, main())


@posix_only("needs POSIX descriptor reuse (the lowest free number) and loop.add_reader")
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_socket_closed_by_a_hook_reads_no_further(factory: Any) -> None:
    """A receive hook that closes the socket mid-wakeup: the reader stops at once, even when
    the descriptor's number already names another socket (POSIX hands out the lowest free
    one) that has a datagram waiting -- that datagram is not ours to read."""
    async def main() -> None:
        server = make_layer(True)
        got: list[str] = []
        other: list[socket.socket] = []
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s = await server.listen("udp:127.0.0.1:0")
            udp = s._udp
            assert isinstance(udp, _UdpSocket)

            def on_message(msg: Any, source: Address) -> None:
                got.append(msg.call_id)
                if len(got) == 1:
                    udp.close()
                    # Most likely the same descriptor number, with a datagram queued on it.
                    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    stranger.bind(("127.0.0.1", 0))
                    other.append(stranger)
                    raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id="stranger")),
                               stranger.getsockname())

            server.on_message = on_message
            for n in range(3):
                raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id=f"q{n}")),
                           ("127.0.0.1", s.address.port))
            await until(lambda: bool(got))
            await asyncio.sleep(0.05)
            assert got == ["q0"]
            other[0].setblocking(False)
            assert b"stranger" in other[0].recv(65536)    # still there for its owner
        finally:
            raw.close()
            for sock in other:
                sock.close()
            await server.close()

    run(factory, main())


@posix_only("drives fastsip's own UDP socket (read with loop.add_reader, which Windows' "
            "proactor loop lacks) and Linux errno numbers")
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_send_full_buffer_drops_other_errors_report(factory: Any) -> None:
    async def main() -> None:
        errors: list[Address] = []
        layer = make_layer(True, on_error=errors.append)
        try:
            listener = await layer.listen("udp:127.0.0.1:0")
            udp = listener._udp
            assert isinstance(udp, _UdpSocket)
            # A real refusal by the kernel: Linux takes no datagram to port 0 (EINVAL).
            # Nothing leaves; the failure reaches on_error, and is not counted as dropped.
            nowhere = Address("UDP", "127.0.0.1", 0)
            layer.send(b"x", nowhere)
            assert errors == []                       # never inside send()
            await until(lambda: errors == [nowhere])
            assert layer.stats.sends_dropped == 0
            # A full buffer cannot be provoked on loopback: the same path, given the number.
            dest = Address("UDP", "127.0.0.1", 9)
            udp.send_failed(dest, errno.EAGAIN)
            udp.send_failed(dest, errno.ENOBUFS)
            await asyncio.sleep(0.02)
            assert errors == [nowhere] and layer.stats.sends_dropped == 2
            udp.send_failed(dest, errno.ENETUNREACH)
            await until(lambda: errors == [nowhere, dest])
            assert layer.stats.sends_dropped == 2
        finally:
            await layer.close()

    run(factory, main())


@posix_only("drives fastsip's own UDP socket (read with loop.add_reader, which Windows' "
            "proactor loop lacks) and Linux's refusal of port 0")
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_sends_held_by_a_wakeup_all_leave_after_it_in_order(factory: Any) -> None:
    """What the handlers send while a wakeup drains the socket waits for the drain to end,
    then leaves in order, in batches of at most 64 (sendmmsg): here two datagrams read in
    one wakeup make 66 sends each (past one batch), with a send the kernel refuses among
    them -- it reaches on_error, and every other datagram still arrives, once, in order."""
    async def main() -> None:
        errors: list[Address] = []
        server = make_layer(True, on_error=errors.append)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        held_while_handling: list[bool] = []
        try:
            s = await server.listen("udp:127.0.0.1:0")
            assert isinstance(s._udp, _UdpSocket)
            dest = Address("UDP", "127.0.0.1", peer.getsockname()[1])
            nowhere = Address("UDP", "127.0.0.1", 0)

            def on_message(msg: Any, source: Address) -> None:
                for n in range(66):
                    if n == 33:
                        server.send(b"refused", nowhere)
                    server.send(f"{msg.call_id}-{n}".encode(), dest)
                    if n == 0 and msg.call_id == "a":   # (b's: a's first batch has gone)
                        try:
                            peer.recv(65536)
                            held_while_handling.append(False)
                        except BlockingIOError:
                            held_while_handling.append(True)

            server.on_message = on_message
            for call_id in ("a", "b"):             # queued before the loop reads: one wakeup
                raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id=call_id)),
                           ("127.0.0.1", s.address.port))
            await until(lambda: server.stats.datagrams == 2)
            await until(lambda: len(errors) == 2)
            assert errors == [nowhere, nowhere]
            assert held_while_handling == [True]
            got = []
            while True:
                try:
                    got.append(peer.recv(65536).decode())
                except BlockingIOError:
                    break
            assert got == [f"{c}-{n}" for c in ("a", "b") for n in range(66)]
            assert server.stats.sends_dropped == 0
        finally:
            raw.close()
            peer.close()
            await server.close()

    run(factory, main())


@posix_only("needs loop.add_reader (fastsip's own UDP socket)")
@pytest.mark.parametrize("factory", LOOPS)
def test_udp_sends_held_by_a_wakeup_go_nowhere_once_a_hook_closed_the_socket(
        factory: Any) -> None:
    """A hook that closes the socket mid-wakeup: what the wakeup held is not sent, even when
    the descriptor's number already names another socket (POSIX hands out the lowest free
    one) -- it would leave from that socket -- and nothing raises into the loop."""
    async def main() -> None:
        server = make_layer(True)
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        try:
            s = await server.listen("udp:127.0.0.1:0")
            udp = s._udp
            assert isinstance(udp, _UdpSocket)
            dest = Address("UDP", "127.0.0.1", peer.getsockname()[1])
            handled: list[str] = []
            strangers: list[socket.socket] = []

            def on_message(msg: Any, source: Address) -> None:
                handled.append(msg.call_id)
                udp.send(b"held", dest)
                udp.close()
                # Most likely the same descriptor number, now another socket's.
                stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                stranger.bind(("127.0.0.1", 0))
                strangers.append(stranger)

            server.on_message = on_message
            raw.sendto(bytes(options("sip:a@x", "127.0.0.1:1", call_id="c")),
                       ("127.0.0.1", s.address.port))
            await until(lambda: handled == ["c"])
            await asyncio.sleep(0.05)
            with pytest.raises(BlockingIOError):
                peer.recv(65536)
        finally:
            raw.close()
            peer.close()
            for sock in strangers:
                sock.close()
            await server.close()

    run(factory, main())


class _FullTransport:
    """Stands in for a datagram transport whose send queue is full."""

    def get_write_buffer_size(self) -> int:
        return 1 << 30

    def is_closing(self) -> bool:
        return False

    def sendto(self, data: bytes, addr: Any) -> None:
        raise AssertionError("must not queue more")


@pytest.mark.parametrize("factory", LOOPS)
def test_udp_send_queue_full_drops(factory: Any) -> None:
    async def main() -> None:
        errors: list[Address] = []
        layer = make_layer(False, on_error=errors.append)
        try:
            listener = await layer.listen("udp:127.0.0.1:0")
            udp = listener._udp
            real = udp.transport  # type: ignore[union-attr]
            udp.transport = _FullTransport()  # type: ignore[union-attr]
            layer.send(b"x", Address("UDP", "127.0.0.1", 9))
            udp.transport = real  # type: ignore[union-attr]
            await asyncio.sleep(0.02)
            assert errors == [] and layer.stats.sends_dropped == 1
        finally:
            await layer.close()

    run(factory, main())


# -- our own addresses -------------------------------------------------------------------------

def test_interface_addresses() -> None:
    found = interface_addresses()
    assert "127.0.0.1" in found
    if HAS_IPV6:
        assert "::1" in found
    assert len(found) == len(set(found))
    for addr in found:
        assert "%" not in addr and "[" not in addr
        socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)
        assert not addr.lower().startswith("fe80:")
    fallback = netif._fallback()
    assert "127.0.0.1" in fallback


@pytest.mark.parametrize("factory", LOOPS)
def test_local_addresses(factory: Any) -> None:
    async def main() -> None:
        layer = make_layer()
        try:
            t = await layer.listen("tcp:127.0.0.1:0", advertise="Proxy.Example.COM:5099")
            u = await layer.listen("udp:0.0.0.0:0")
            hosts, ports = layer.local_addresses()
            v4 = {a for a in interface_addresses() if ":" not in a}
            assert {"127.0.0.1", "proxy.example.com"} | v4 <= hosts
            assert layer.sent_by("UDP")[0] in hosts
            assert "0.0.0.0" not in hosts
            assert not any(":" in h for h in hosts)         # no v6 listener, no v6 host
            assert ports == {t.address.port, 5099, u.address.port}
            if HAS_IPV6:
                v6 = await layer.listen("udp:[::]:0", advertise="[2001:DB8::5]")
                hosts, ports = layer.local_addresses()
                assert "::1" in hosts and "2001:db8::5" in hosts
                assert v6.address.port in ports
        finally:
            await layer.close()

    run(factory, main())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="socket filters: Linux")
@pytest.mark.parametrize("lean", IO)
@pytest.mark.parametrize("factory", LOOPS)
def test_banned_sources_are_dropped_by_the_kernel(factory: Any, lean: bool) -> None:
    async def main() -> None:
        layer = make_layer(lean)
        inbox = answer_with(layer)
        listener = await layer.listen("udp:127.0.0.1:0")
        port = listener.address.port
        banned = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        banned.bind(("127.0.0.2", 0))
        other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        other.bind(("127.0.0.3", 0))
        try:
            assert layer.drop_sources(["127.0.0.2", "2001:db8::1"]) == 2
            for n in range(50):
                banned.sendto(bytes(options("sip:a@x", "127.0.0.2:9", call_id=f"b{n}")),
                              ("127.0.0.1", port))
            other.sendto(bytes(options("sip:a@x", "127.0.0.3:9", call_id="ok")),
                         ("127.0.0.1", port))
            await inbox.wait(1)
            await asyncio.sleep(0.2)
            # Nothing of the banned source was even read: the kernel dropped it.
            assert [m.call_id for m, _ in inbox.items] == ["ok"]
            assert layer.stats.datagrams == 1
            # Lifting the ban lets it in again.
            assert layer.drop_sources([]) == 0
            banned.sendto(bytes(options("sip:a@x", "127.0.0.2:9", call_id="again")),
                          ("127.0.0.1", port))
            await inbox.wait(2)
            assert inbox.items[-1][0].call_id == "again"
        finally:
            banned.close()
            other.close()
            await layer.close()

    run(factory, main())


def test_kernel_ban_program_is_a_search_tree() -> None:
    from fastsip.asyncio import kernelban

    assert kernelban.program([]) is None and kernelban.program(["2001:db8::1"]) is None
    many = [f"10.{i >> 8 & 255}.{i & 255}.1" for i in range(5000)]
    code = kernelban.program(many)
    assert code is not None and len(code) <= kernelban.BPF_MAXINSNS
    # The tree holds the most recent MAX_ADDRESSES, in ~1.5 instructions each.
    assert len(code) < 1.6 * kernelban.MAX_ADDRESSES


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
@pytest.mark.parametrize("factory", LOOPS)
def test_a_name_that_cannot_be_resolved_is_a_transport_error(factory: Any,
                                                             transport: str) -> None:
    # A Request-URI host like "a..b" (an empty label: IDNA refuses to even encode it) must
    # end as a transport error (the proxy's 503), not as an exception in a task.
    async def main() -> None:
        failed: list[Address] = []
        layer = make_layer(on_error=failed.append)
        await layer.listen(f"{transport.lower()}:127.0.0.1:0")
        try:
            layer.send(b"OPTIONS sip:x SIP/2.0\r\n\r\n", Address(transport, "a..b", 5060))
            await until(lambda: bool(failed), 5.0)
            assert failed[0].host == "a..b"
        finally:
            await layer.close()

    run(factory, main())


class LateAnswerer(Answerer):
    """Answers every request 200 after ``delay`` seconds (a forwarded request's answer)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        asyncio.get_running_loop().call_later(self.delay, txn.reply, 200)


@pytest.mark.parametrize("factory", LOOPS)
def test_late_answer_after_the_connection_closed_goes_to_the_via_sent_by(factory: Any) -> None:
    # §18.2.2: the connection the request came on closed before the answer: a new one is
    # opened to the received IP and the Via's sent-by port -- where the client listens --
    # not to the ephemeral port its closed connection came from.
    async def main() -> None:
        got: asyncio.Queue[bytes] = asyncio.Queue()

        async def client_listener(reader: Reader, writer: Writer) -> None:
            got.put_nowait(await reader.readuntil(b"\r\n\r\n"))
            writer.close()

        listener = await asyncio.start_server(client_listener, "127.0.0.1", 0)
        sent_by = listener.sockets[0].getsockname()[1]
        try:
            async with Endpoint(LateAnswerer(0.3), ["tcp:127.0.0.1:0"]) as ep:
                _reader, writer = await connect(ep.address("TCP").port)
                writer.write(bytes(options("sip:a@127.0.0.1", f"127.0.0.1:{sent_by}", "TCP",
                                           call_id="late", rport=False)))
                await writer.drain()
                writer.close()                     # gone before the answer
                head = await asyncio.wait_for(got.get(), 5)
                resp = parse(head)
                assert isinstance(resp, Response) and resp.status_code == 200
                assert resp.call_id == "late"
        finally:
            listener.close()
            await listener.wait_closed()

    run(factory, main())

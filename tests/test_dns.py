"""RFC 3263 next-hop resolution.

- The policy, sans-IO (:mod:`fastsip.transport.rfc3263`): NAPTR filtering and order, the SRV
  plan, RFC 2782's priority and weighted choice (a seeded RNG over many draws, weight 0 rules),
  the TTL cache on a fake clock (negative answers, the bound), the Retry-After blacklist and
  the failover decision.
- The shell (:mod:`fastsip.asyncio.dns`) against a real DNS server on loopback (dnsmasq, see
  tests/dnsutil.py): NAPTR → SRV → A, SRV without NAPTR, an explicit port or transport, the
  hosts file, the TTL cache counted in the server's query log, and a DNS server that never
  answers.

The calls through ``fastsip serve`` are in tests/test_serve_dns.py.
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dnsutil import DNSMASQ, Dnsmasq, free_udp_port

from fastsip.asyncio.dns import DnsFailure, Rfc3263Resolver
from fastsip.sip import URI, parse
from fastsip.transport import Address
from fastsip.transport.rfc3263 import (
    Blacklist,
    NaptrRecord,
    NextHop,
    SrvRecord,
    TtlCache,
    fail_over,
    naptr_transports,
    order_srv,
    retry_after,
    srv_plan,
)

ALL = ("UDP", "TCP", "TLS")

# -- NextHop -----------------------------------------------------------------------------------


def test_next_hop_from_uri() -> None:
    assert NextHop.from_uri(URI("sip:bob@Example.TEST")) == NextHop("example.test")
    assert NextHop.from_uri(URI("sip:bob@example.test:5070")) == NextHop("example.test", 5070)
    assert NextHop.from_uri(URI("sip:bob@example.test;transport=tcp")) == \
        NextHop("example.test", None, "TCP")
    assert NextHop.from_uri(URI("sips:bob@example.test;transport=tcp")) == \
        NextHop("example.test", None, "TLS", True)
    assert NextHop.from_uri(URI("sip:bob@example.test;maddr=gw.test")).host == "gw.test"
    assert not NextHop.from_uri(URI("sip:bob@[::1]:5060")).needs_dns
    assert NextHop.from_uri(URI("sips:example.test")).default_transport == "TLS"


# -- NAPTR -------------------------------------------------------------------------------------

def test_naptr_order_then_preference_and_only_our_transports() -> None:
    records = [
        NaptrRecord(20, 10, "s", "SIP+D2U", "_sip._udp.example.test."),
        NaptrRecord(10, 50, "S", "SIP+D2T", "_sip._tcp.example.test."),
        NaptrRecord(10, 10, "s", "SIPS+D2T", "_sips._tcp.example.test."),
        NaptrRecord(5, 10, "s", "SIP+D2S", "_sip._sctp.example.test."),     # no SCTP here
        NaptrRecord(5, 10, "u", "E2U+sip", "!^.*$!sip:x@y!"),                # not for us
        NaptrRecord(1, 1, "s", "SIP+D2U", "."),                              # points nowhere
    ]
    assert naptr_transports(records, ALL) == [
        ("TLS", "_sips._tcp.example.test"), ("TCP", "_sip._tcp.example.test"),
        ("UDP", "_sip._udp.example.test")]
    # Without a TCP listener the TCP record is skipped (and so is TLS without TLS).
    assert naptr_transports(records, {"UDP"}) == [("UDP", "_sip._udp.example.test")]
    # A sips URI takes SIPS+D2T only.
    assert naptr_transports(records, ALL, secure=True) == [("TLS", "_sips._tcp.example.test")]


def test_srv_plan_without_naptr() -> None:
    assert srv_plan(NextHop("example.test"), ALL) == [
        ("UDP", "_sip._udp.example.test"), ("TCP", "_sip._tcp.example.test"),
        ("TLS", "_sips._tcp.example.test")]
    assert srv_plan(NextHop("example.test"), {"UDP"}) == [("UDP", "_sip._udp.example.test")]
    assert srv_plan(NextHop("example.test", transport="TCP"), ALL) == [
        ("TCP", "_sip._tcp.example.test")]
    assert srv_plan(NextHop("example.test", secure=True), ALL) == [
        ("TLS", "_sips._tcp.example.test")]


# -- SRV: RFC 2782 -----------------------------------------------------------------------------

def _srv(priority: int, weight: int, target: str) -> SrvRecord:
    return SrvRecord(priority, weight, 5060, target)


def test_srv_priority_comes_first_whatever_the_weights() -> None:
    records = [_srv(20, 100, "c"), _srv(10, 0, "a"), _srv(30, 1000, "d"), _srv(10, 0, "b")]
    rng = random.Random(7).random
    for _ in range(200):
        order = [r.target for r in order_srv(records, rng)]
        assert set(order[:2]) == {"a", "b"} and order[2:] == ["c", "d"]


def test_srv_weights_share_the_first_pick_in_proportion() -> None:
    records = [_srv(10, 60, "a"), _srv(10, 30, "b"), _srv(10, 10, "c")]
    rng = random.Random(1234).random
    draws = 20_000
    first = Counter(order_srv(records, rng)[0].target for _ in range(draws))
    # RFC 2782 draws from 0..sum inclusive: the first record also gets the 0, so its share is
    # (60 + 1) / 101; each of the others weight / 101.
    for target, share in (("a", 61 / 101), ("b", 30 / 101), ("c", 10 / 101)):
        assert abs(first[target] / draws - share) < 0.015, (target, first)
    # Every pick is a permutation of the group.
    assert sorted(r.target for r in order_srv(records, rng)) == ["a", "b", "c"]


def test_srv_weight_zero_rules() -> None:
    rng = random.Random(99).random
    draws = 20_000
    # A zero beside weighted records is put first before the draw and chosen only on a draw
    # of 0: a small chance (1 / (sum + 1)), never none.
    records = [_srv(10, 9, "w"), _srv(10, 0, "z")]
    first = Counter(order_srv(records, rng)[0].target for _ in range(draws))
    assert abs(first["z"] / draws - 1 / 10) < 0.01, first
    # Once the weighted ones are placed, the zeros follow.
    records = [_srv(10, 50, "w1"), _srv(10, 50, "w2"), _srv(10, 0, "z")]
    lasts = Counter(order_srv(records, rng)[-1].target for _ in range(draws))
    assert lasts["z"] / draws > 0.97, lasts
    # All zeros: every draw is 0, the listed order stays.
    records = [_srv(10, 0, "a"), _srv(10, 0, "b"), _srv(10, 0, "c")]
    assert all([r.target for r in order_srv(records, rng)] == ["a", "b", "c"]
               for _ in range(100))
    # "." alone: the service is decidedly not available here.
    assert order_srv([_srv(0, 0, ".")], rng) == []


# -- the cache, the blacklist, failover --------------------------------------------------------

def test_ttl_cache_on_a_fake_clock() -> None:
    cache: TtlCache[tuple[str, ...]] = TtlCache(3, min_ttl=1.0, max_ttl=100.0)
    cache.put(("a.test", "A"), ("192.0.2.1",), 10, now=1000.0)
    cache.put(("b.test", "NAPTR"), (), 5, now=1000.0)          # negative answers are kept
    assert cache.get(("a.test", "A"), 1009.9) == ("192.0.2.1",)
    assert cache.get(("b.test", "NAPTR"), 1004.9) == ()
    assert cache.get(("b.test", "NAPTR"), 1005.0) is None       # expired at its TTL
    assert cache.get(("a.test", "A"), 1010.0) is None
    cache.put(("z.test", "A"), ("192.0.2.9",), 0, now=0.0)     # TTL 0 is held min_ttl
    assert cache.get(("z.test", "A"), 0.5) == ("192.0.2.9",)
    cache.put(("y.test", "A"), (), 10**9, now=0.0)             # clamped to max_ttl
    assert cache.get(("y.test", "A"), 100.0) is None
    for i in range(10):                                        # bounded: oldest go first
        cache.put((f"n{i}.test", "A"), (), 50, now=0.0)
    assert len(cache) == 3
    assert cache.get(("n9.test", "A"), 1.0) == () and cache.get(("n0.test", "A"), 1.0) is None


def test_blacklist_and_failover_rules() -> None:
    black = Blacklist(max_entries=2)
    a, b = Address("UDP", "192.0.2.1", 5060), Address("UDP", "192.0.2.2", 5060)
    black.add(a, 30, now=100.0)
    assert black.filter([a, b], 129.0) == [b]
    assert black.filter([a, b], 130.0) == [a, b]
    assert fail_over(503) and fail_over(503, local=True)
    assert fail_over(408, local=True)                   # Timer B/F: nobody answered
    assert not fail_over(408, local=True, provisional=True)  # it rang: an unanswered call
    assert not fail_over(408)                           # a 408 from the callee is its answer
    assert not fail_over(486) and not fail_over(500) and not fail_over(404)
    resp = parse(b"SIP/2.0 503 Busy\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                 b"Retry-After: 120 (maintenance);duration=60\r\nContent-Length: 0\r\n\r\n")
    assert retry_after(resp) == 120.0  # type: ignore[arg-type]


# -- the shell against a real DNS server -------------------------------------------------------

needs_dnsmasq = pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed")

ZONE = [
    # example.test: no NAPTR; SRV for UDP, priority 10 then 20.
    "--srv-host=_sip._udp.example.test,uas1.example.test,5071,10,0",
    "--srv-host=_sip._udp.example.test,uas2.example.test,5072,20,0",
    "--host-record=uas1.example.test,127.0.0.2",
    "--host-record=uas2.example.test,127.0.0.3",
    # tcp.test: NAPTR prefers TCP (order 10) to UDP (order 20).
    "--naptr-record=tcp.test,20,10,S,SIP+D2U,,_sip._udp.tcp.test",
    "--naptr-record=tcp.test,10,10,S,SIP+D2T,,_sip._tcp.tcp.test",
    "--srv-host=_sip._tcp.tcp.test,uas1.example.test,5073,10,0",
    "--srv-host=_sip._udp.tcp.test,uas2.example.test,5074,10,0",
    # plain.test: an address only.
    "--host-record=plain.test,127.0.0.4",
    # secure.test: TLS by NAPTR (and a UDP NAPTR a sips URI must not take).
    "--naptr-record=secure.test,10,10,S,SIP+D2U,,_sip._udp.secure.test",
    "--naptr-record=secure.test,20,10,S,SIPS+D2T,,_sips._tcp.secure.test",
    "--srv-host=_sips._tcp.secure.test,edge.secure.test,5061,10,0",
    "--srv-host=_sip._udp.secure.test,uas2.example.test,5075,10,0",
]


def _run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


@pytest.fixture
def dnsmasq(tmp_path: Path) -> object:
    server = Dnsmasq(tmp_path, ZONE, ttl=60)
    yield server
    server.close()


def _resolver(server: Dnsmasq, **kwargs: Any) -> Rfc3263Resolver:
    """A resolver asking ``server`` only: a name it has no address for stays without one (no
    getaddrinfo fallback, whose system DNS is not on loopback)."""
    return Rfc3263Resolver([("127.0.0.1", server.port)], timeout=2, system_fallback=False,
                           **kwargs)


def _udp(host: str, port: int) -> Address:
    return Address("UDP", host, port)


@needs_dnsmasq
def test_srv_without_naptr_in_priority_order(dnsmasq: Dnsmasq) -> None:
    async def main() -> list[Address]:
        resolver = _resolver(dnsmasq, listening=lambda: {("UDP", socket.AF_INET)})
        return await resolver.targets(NextHop("example.test"))
    assert _run(main()) == [_udp("127.0.0.2", 5071), _udp("127.0.0.3", 5072)]
    assert dnsmasq.queries("NAPTR", "example.test") == 1
    assert dnsmasq.queries("SRV", "_sip._udp.example.test") == 1
    # No TCP or TLS listener: their SRV names are not even asked.
    assert dnsmasq.queries("SRV", "_sip._tcp.example.test") == 0


@needs_dnsmasq
def test_naptr_chooses_tcp_when_we_listen_on_tcp(dnsmasq: Dnsmasq) -> None:
    async def main(listening: set[tuple[str, int]]) -> list[Address]:
        resolver = _resolver(dnsmasq, listening=lambda: listening)
        return await resolver.targets(NextHop("tcp.test"))
    both = {("UDP", socket.AF_INET), ("TCP", socket.AF_INET)}
    assert _run(main(both)) == [Address("TCP", "127.0.0.2", 5073),
                                _udp("127.0.0.3", 5074)]
    assert _run(main({("UDP", socket.AF_INET)})) == [_udp("127.0.0.3", 5074)]


@needs_dnsmasq
def test_sips_takes_tls_only_and_keeps_the_name_for_the_certificate(dnsmasq: Dnsmasq) -> None:
    async def main() -> tuple[list[Address], list[Address]]:
        resolver = _resolver(dnsmasq)
        return (await resolver.targets(NextHop("secure.test", secure=True)),
                await resolver.targets(NextHop("secure.test")))
    secure, plain = _run(main())  # type: ignore[misc]
    # The TLS target stays a name: the connection resolves it and checks the certificate.
    assert secure == [Address("TLS", "edge.secure.test", 5061)]
    # A sip: URI follows the NAPTR order: UDP (order 10) first, then TLS.
    assert plain == [_udp("127.0.0.3", 5075), Address("TLS", "edge.secure.test", 5061)]


@needs_dnsmasq
def test_explicit_port_or_transport_skips_naptr(dnsmasq: Dnsmasq) -> None:
    async def main() -> tuple[list[Address], list[Address], list[Address]]:
        resolver = _resolver(dnsmasq)
        port = await resolver.targets(NextHop("tcp.test", 5080))
        transport = await resolver.targets(NextHop("tcp.test", None, "UDP"))
        plain = await resolver.targets(NextHop("plain.test"))
        return port, transport, plain
    port, transport, plain = _run(main())  # type: ignore[misc]
    # §4.2: a port means A/AAAA only -- and tcp.test has no address: none.
    assert port == []
    assert dnsmasq.queries("NAPTR", "tcp.test") == 0
    # §4.1: transport=udp: the UDP SRV straight away.
    assert transport == [_udp("127.0.0.3", 5074)]
    assert dnsmasq.queries("SRV", "_sip._udp.tcp.test") == 1
    # No NAPTR, no SRV: the A record on the default port.
    assert plain == [_udp("127.0.0.4", 5060)]


@needs_dnsmasq
def test_answers_are_cached_for_their_ttl(dnsmasq: Dnsmasq) -> None:
    clock = [1000.0]

    async def main() -> None:
        resolver = _resolver(dnsmasq, listening=lambda: {("UDP", socket.AF_INET)},
                             now=lambda: clock[0])
        first = await resolver.targets(NextHop("example.test"))
        # Several calls at once while the cache is warm, then later but within the TTL.
        again = await asyncio.gather(*(resolver.targets(NextHop("example.test"))
                                       for _ in range(5)))
        assert all(t == first for t in again)
        clock[0] += 59            # dnsmasq's local TTL is 60 s; negative answers 30 s
        assert await resolver.targets(NextHop("example.test")) == first
        clock[0] += 2             # past both: asked again
        assert await resolver.targets(NextHop("example.test")) == first
    _run(main())
    assert dnsmasq.queries("SRV", "_sip._udp.example.test") == 2
    assert dnsmasq.queries("A", "uas1.example.test") == 2
    # The NAPTR answer was negative (30 s): asked at 1000, again at 1059 (expired), not at 1061.
    assert dnsmasq.queries("NAPTR", "example.test") == 2


@needs_dnsmasq
def test_concurrent_questions_share_one_query(dnsmasq: Dnsmasq) -> None:
    async def main() -> None:
        resolver = _resolver(dnsmasq)
        results = await asyncio.gather(*(resolver.addresses("plain.test") for _ in range(10)))
        assert all(r == ["127.0.0.4"] for r in results)
    _run(main())
    assert dnsmasq.queries("A", "plain.test") == 1


def test_hosts_file_and_ip_literals_never_ask_dns(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.9 pbx.internal pbx\n::1 localhost\n")

    async def main() -> None:
        # A DNS server that would fail every query: nothing may reach it.
        resolver = Rfc3263Resolver([("127.0.0.1", free_udp_port())], timeout=0.5,
                                   hosts_file=str(hosts))
        assert await resolver.targets(NextHop("pbx.internal")) == [_udp("127.0.0.9", 5060)]
        assert await resolver.targets(NextHop("PBX", 5070)) == [_udp("127.0.0.9", 5070)]
        assert await resolver.targets(NextHop("127.0.0.5", 5062, "TCP")) == [
            Address("TCP", "127.0.0.5", 5062)]
        assert await resolver.addresses("localhost") == ["::1"]
        assert resolver.queries == 0
    _run(main())


def test_a_dns_server_that_never_answers_fails_in_its_timeout() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))                 # takes queries, answers none

        async def main() -> None:
            resolver = Rfc3263Resolver([hole.getsockname()], timeout=0.5)
            outcome: list[tuple[list[Address], str | None]] = []
            started = time.monotonic()
            resolver.resolve(NextHop("example.test"), lambda a, r: outcome.append((a, r)))
            assert outcome == []                    # never called back from inside resolve
            ticks = 0
            while not outcome and time.monotonic() - started < 5:
                await asyncio.sleep(0.01)           # the loop keeps running meanwhile
                ticks += 1
            assert outcome and outcome[0][0] == []
            reason = outcome[0][1]
            assert reason is not None and "DNS failure for example.test" in reason, reason
            assert 0.4 < time.monotonic() - started < 2.5
            assert ticks > 20
            with pytest.raises(DnsFailure):
                await resolver.addresses("uas1.example.test")
        _run(main())


@needs_dnsmasq
def test_the_transport_resolves_a_name_through_the_resolver(dnsmasq: Dnsmasq) -> None:
    """A datagram sent to a name outside the proxy's RFC 3263 path (an ACK for a 2xx, a
    stateless forward) goes to the name's A record, asked of our DNS server (the system's
    resolver does not know ``*.test``); a name nobody knows fails through ``on_error``."""
    from fastsip.asyncio import TransportLayer

    async def main() -> None:
        resolver = _resolver(dnsmasq)
        sender = TransportLayer()
        sender.dns = resolver
        failed: list[Address] = []
        sender.on_error = failed.append
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.4", 0))             # plain.test's address
            peer.setblocking(False)
            port = peer.getsockname()[1]
            try:
                await sender.listen("udp:127.0.0.1:0")
                sender.send(b"OPTIONS sip:x@plain.test SIP/2.0\r\n\r\n",
                            Address("UDP", "plain.test", port))
                loop = asyncio.get_running_loop()
                data = await asyncio.wait_for(loop.sock_recv(peer, 2048), 5)
                assert data.startswith(b"OPTIONS sip:x@plain.test")
                sender.send(b"x", Address("UDP", "nowhere.test", port))
                for _ in range(250):
                    if failed:
                        break
                    await asyncio.sleep(0.02)
                assert failed == [Address("UDP", "nowhere.test", port)]
            finally:
                await sender.close()
    _run(main())
    assert dnsmasq.queries("A", "plain.test") == 1


@needs_dnsmasq
def test_a_dead_first_server_leaves_time_for_the_next(dnsmasq: Dnsmasq) -> None:
    """Two --dns-server: the first never answers; the timeout is shared between them, so the
    second one's answer comes within it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind(("127.0.0.1", 0))

        async def main() -> None:
            resolver = Rfc3263Resolver([hole.getsockname(), ("127.0.0.1", dnsmasq.port)],
                                       timeout=2, system_fallback=False)
            assert await resolver.addresses("plain.test") == ["127.0.0.4"]
        started = time.monotonic()
        _run(main())
        assert time.monotonic() - started < 2.5
    assert dnsmasq.queries("A", "plain.test") == 1

"""RFC 3263 next-hop resolution on the event loop: the DNS queries (NAPTR, SRV, A/AAAA) with
dnspython's asyncio resolver, behind the policy of :mod:`fastsip.transport.rfc3263`.

Nothing here blocks the loop: queries are asyncio datagrams (dnspython), each bounded by
``timeout``; the same question asked by several calls at once goes out once; answers, negative
ones too, are kept for their TTL in a bounded cache.  Names in the hosts file (``/etc/hosts``,
read once at start) and ``localhost`` (RFC 6761) never reach DNS, as with the system's
``files dns`` order.  When DNS has no address for a name (NXDOMAIN, no A/AAAA), the system
resolver (``getaddrinfo``, in a thread) gets the last word; when the DNS server itself fails
(timeout, refused), the resolution fails with a reason the proxy puts in its 503.

TLS targets keep their name (the SRV target, or the URI host): the TLS connection resolves it
and checks the certificate against it (RFC 5922 would check the URI's domain; see docs/dns.md).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import socket
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.message
import dns.nameserver
import dns.rdatatype
import dns.resolver

from fastsip.transport import Address
from fastsip.transport.rfc3263 import (
    Blacklist,
    NaptrRecord,
    NextHop,
    SrvRecord,
    TtlCache,
    address_for,
    is_ip_literal,
    naptr_transports,
    order_srv,
    srv_plan,
)
from fastsip.transport.rules import parse_hostport

__all__ = ["DnsFailure", "Rfc3263Resolver", "add_options", "from_args"]

log = logging.getLogger("fastsip.asyncio.dns")

#: A negative answer without an SOA to say how long it holds is kept this long (RFC 2308 §5).
_DEFAULT_NEGATIVE_TTL = 30.0
#: Families each transport can use when the caller does not say (both).
_ALL_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6})

Records = tuple[Any, ...]
#: ``listening()``: the (transport, address family) pairs we have listeners for.
Listening = Callable[[], Collection[tuple[str, int]]]


class DnsFailure(Exception):
    """The DNS server did not answer (timeout, refused, server failure): not a negative answer,
    so nothing is cached and nothing falls back."""


def _negative_ttl(response: dns.message.Message | None) -> float:
    """RFC 2308 §5: a negative answer holds for min(SOA TTL, SOA MINIMUM)."""
    if response is not None:
        for rrset in response.authority:
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return _DEFAULT_NEGATIVE_TTL


def _read_hosts(path: str) -> dict[str, list[str]]:
    hosts: dict[str, list[str]] = {}
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return hosts
    for line in text.splitlines():
        fields = line.partition("#")[0].split()
        if len(fields) < 2 or not is_ip_literal(fields[0]):
            continue
        for name in fields[1:]:
            hosts.setdefault(name.lower().rstrip("."), []).append(fields[0])
    return hosts


class Rfc3263Resolver:
    """Resolves next hops for the proxy core (:class:`~fastsip.transport.rfc3263.
    NextHopResolver`) and host names for the transport (:meth:`addresses`).

    - ``nameservers``: ``(host, port)`` pairs to ask; empty: the system's, from
      /etc/resolv.conf.  ``timeout``: seconds for one question, all servers included.
    - ``listening()``: the (transport, family) pairs we have listeners for (NAPTR services and
      SRV transports we cannot use are skipped, and addresses of a family we cannot send from).
    - ``system_fallback``: a name DNS has no address for is given to getaddrinfo (False: it
      has none).
    - ``rng``, ``now``: the random source of RFC 2782's weighted choice, and the clock of the
      cache (default: the loop's); injectable for tests.
    """

    def __init__(
        self,
        nameservers: Sequence[tuple[str, int]] = (),
        *,
        timeout: float = 5.0,
        listening: Listening | None = None,
        cache_size: int = 4096,
        rng: Callable[[], float] = random.random,
        now: Callable[[], float] | None = None,
        hosts_file: str = "/etc/hosts",
        system_fallback: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                                    for host, port in nameservers]
        else:
            try:
                resolver = dns.asyncresolver.Resolver()     # reads /etc/resolv.conf
            except (OSError, dns.exception.DNSException) as exc:
                log.warning("no system DNS resolver (%s): next hops resolve by getaddrinfo only",
                            exc)
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = []
        # One question, every server included, is bounded by the timeout, shared between the
        # servers so that a dead first one leaves time to ask the next.  Our cache (below) is
        # the only cache (dnspython's would hide the TTL logic we test).
        resolver.timeout = max(0.2, timeout / max(1, len(resolver.nameservers)))
        resolver.lifetime = timeout
        resolver.cache = None
        self._resolver = resolver
        self.timeout = timeout
        self.listening = listening
        self.rng = rng
        self._now = now
        self._loop = loop
        self.cache: TtlCache[Records] = TtlCache(cache_size)
        self.blacklist = Blacklist()
        self._hosts = _read_hosts(hosts_file)
        self.system_fallback = system_fallback
        self._inflight: dict[tuple[str, str], asyncio.Future[Records]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: DNS questions actually sent (cache misses), for logs and tests.
        self.queries = 0

    # -- clock and capabilities --------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self._now() if self._now is not None else self.loop.time()

    def _supported(self) -> tuple[set[str], dict[str, set[int]]]:
        if self.listening is None:
            transports = {"UDP", "TCP", "TLS"}
            return transports, {t: set(_ALL_FAMILIES) for t in transports}
        families: dict[str, set[int]] = {}
        for transport, family in self.listening():
            families.setdefault(transport, set()).add(family)
        return set(families), families

    # -- the proxy's interface ---------------------------------------------------------------

    def resolve(self, hop: NextHop, done: Callable[[list[Address], str | None], None]) -> None:
        """Resolve ``hop`` in a task; ``done(addresses, reason)`` is called from it (never
        from inside this call)."""
        task = self.loop.create_task(self._resolve_and_report(hop, done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def unavailable(self, dest: Address, seconds: float) -> None:
        """A 503 with Retry-After from ``dest``: skip it for that long (§4.3)."""
        log.info("next hop %s unavailable for %.0f s (503 with Retry-After)", dest, seconds)
        self.blacklist.add(dest, seconds, self.now())

    async def _resolve_and_report(
        self, hop: NextHop, done: Callable[[list[Address], str | None], None]
    ) -> None:
        reason: str | None = None
        try:
            targets = await self.targets(hop)
        except DnsFailure as exc:
            targets, reason = [], f"DNS failure for {hop.host}: {exc}"
        except Exception as exc:  # a resolver bug must still answer the call
            log.exception("resolving %s failed", hop.host)
            targets, reason = [], f"cannot resolve {hop.host}: {type(exc).__name__}"
        else:
            if not targets:
                reason = f"no address for {hop.host}"
        if reason is not None:
            log.info("next hop %s: %s", hop.host, reason)
        try:
            done(targets, reason)
        except Exception:
            log.exception("error in the resolution callback for %s", hop.host)

    async def targets(self, hop: NextHop) -> list[Address]:
        """The addresses to try for ``hop``, in order (RFC 3263 §4.1, §4.2), minus those
        blacklisted by a 503 with Retry-After."""
        supported, families = self._supported()
        if not hop.needs_dns:
            return [address_for(hop.default_transport, hop.host, hop.port)]
        targets: list[Address] = []
        if hop.port is not None or self._hosts_entry(hop.host) is not None:
            # §4.2: a port in the URI means A/AAAA only (so does a name the hosts file knows:
            # it has no NAPTR or SRV, and asking DNS for them would only delay it).
            targets = await self._addresses_for(hop.default_transport, hop.host, hop.port,
                                                families)
        else:
            plan: list[tuple[str, str]] = []
            if hop.transport is None:
                naptr = await self.lookup(hop.host, "NAPTR")
                plan = naptr_transports(naptr, supported, hop.secure)
            if not plan:
                plan = srv_plan(hop, supported)
            found_srv = False
            failure: DnsFailure | None = None
            for transport, name in plan:
                srvs = await self.lookup(name, "SRV")
                for rec in order_srv(srvs, self.rng):
                    found_srv = True
                    try:
                        targets += await self._addresses_for(transport, rec.target, rec.port,
                                                             families)
                    except DnsFailure as exc:
                        failure = exc   # this target is unknown for now; the others may do
            if failure is not None and not targets:
                raise failure
            if not found_srv:
                # §4.2: no SRV records: the host's A/AAAA with the default port.
                targets = await self._addresses_for(hop.default_transport, hop.host, None,
                                                    families)
        unique = list(dict.fromkeys(targets))
        return self.blacklist.filter(unique, self.now())

    # -- addresses ---------------------------------------------------------------------------

    def _hosts_entry(self, name: str) -> list[str] | None:
        name = name.lower().rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return self._hosts.get(name) or ["127.0.0.1", "::1"]       # RFC 6761 §6.3
        return self._hosts.get(name)

    async def _addresses_for(self, transport: str, host: str, port: int | None,
                             families: dict[str, set[int]]) -> list[Address]:
        # A transport we have no listener for is only here because the URI named it
        # (NAPTR and SRV skip such transports): an outgoing connection may still serve.
        usable = families.get(transport) or _ALL_FAMILIES
        if transport == "TLS":
            # The TLS connection resolves the name itself and verifies the certificate
            # against it; an IP here would lose the name (SNI, the identity check).
            return [address_for(transport, host, port)]
        result = []
        for ip in await self.addresses(host):
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            if family in usable:
                result.append(address_for(transport, ip, port))
        return result

    async def addresses(self, host: str) -> list[str]:
        """The IP addresses of ``host``, IPv4 first: the hosts file, else A and AAAA from DNS,
        else (DNS has none) the system's getaddrinfo.  Raises :class:`DnsFailure` when the DNS
        server does not answer."""
        if is_ip_literal(host):
            return [host.strip("[]")]
        known = self._hosts_entry(host)
        if known is not None:
            return sorted(known, key=lambda ip: ":" in ip)
        key = host.lower().rstrip(".")
        now = self.now()
        a: Records | BaseException | None = self.cache.get((key, "A"), now)
        aaaa: Records | BaseException | None = self.cache.get((key, "AAAA"), now)
        if a is None or aaaa is None:
            # (Both cached is the common case: no tasks for it, gather makes two.)
            a, aaaa = await asyncio.gather(self.lookup(host, "A"), self.lookup(host, "AAAA"),
                                           return_exceptions=True)
        if isinstance(a, DnsFailure) and isinstance(aaaa, DnsFailure):
            raise a
        ips = [str(x) for x in (a if isinstance(a, tuple) else ())]
        ips += [str(x) for x in (aaaa if isinstance(aaaa, tuple) else ())]
        if ips:
            return ips
        for result in (a, aaaa):
            if isinstance(result, BaseException) and not isinstance(result, DnsFailure):
                raise result
        return await self._system_addresses(host) if self.system_fallback else []

    async def _system_addresses(self, host: str) -> list[str]:
        try:
            infos = await self.loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
        except (OSError, ValueError):           # ValueError: a name IDNA cannot encode
            return []
        ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
        return sorted(ips, key=lambda ip: ":" in ip)

    # -- DNS with the cache ------------------------------------------------------------------

    async def lookup(self, name: str, rdtype: str) -> Records:
        """The records of ``name``/``rdtype`` (NaptrRecord, SrvRecord, or address strings):
        from the cache while their TTL lasts, else one query shared by everyone asking now.
        An empty tuple is a negative answer (cached too)."""
        key = (name.lower().rstrip("."), rdtype)
        cached = self.cache.get(key, self.now())
        if cached is not None:
            return cached
        pending = self._inflight.get(key)
        if pending is None:
            pending = self.loop.create_future()
            self._inflight[key] = pending
            try:
                records, ttl = await self._query(key[0], rdtype)
            except BaseException as exc:
                del self._inflight[key]
                if isinstance(exc, asyncio.CancelledError):
                    pending.cancel()
                else:
                    pending.set_exception(exc)
                    pending.exception()    # marked retrieved: there may be no other waiter
                raise
            del self._inflight[key]
            self.cache.put(key, records, ttl, self.now())
            pending.set_result(records)
            return records
        return await asyncio.shield(pending)

    async def _query(self, name: str, rdtype: str) -> tuple[Records, float]:
        self.queries += 1
        if not self._resolver.nameservers:
            return (), _DEFAULT_NEGATIVE_TTL
        try:
            answer = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False,
                                                  search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[Any, dns.message.Message] = exc.kwargs.get("responses") or {}
            response = next(iter(responses.values()), None)
            return (), _negative_ttl(response)
        except dns.exception.Timeout:
            raise DnsFailure(f"no answer from the DNS server within {self.timeout:g} s") from None
        except dns.resolver.NoNameservers:
            raise DnsFailure("the DNS server refused or failed the query") from None
        except dns.exception.DNSException as exc:
            raise DnsFailure(str(exc) or type(exc).__name__) from None
        rrset = answer.rrset
        if rrset is None:
            return (), _negative_ttl(answer.response)
        records: list[Any] = []
        for rd in rrset:
            if rdtype == "NAPTR":
                records.append(NaptrRecord(rd.order, rd.preference, rd.flags.decode(),
                                           rd.service.decode(), rd.replacement.to_text()))
            elif rdtype == "SRV":
                records.append(SrvRecord(rd.priority, rd.weight, rd.port,
                                         rd.target.to_text().rstrip(".")))
            else:
                records.append(rd.address)
        return tuple(records), float(rrset.ttl)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


# -- serve's options -------------------------------------------------------------------------

def _dns_server(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text, 53)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not is_ip_literal(host):
        raise argparse.ArgumentTypeError(f"{text!r}: an IP address (and port) is needed")
    return host, port


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def add_options(parser: argparse.ArgumentParser) -> None:
    """``--dns-server`` and ``--dns-timeout``, in a group of their own."""
    g = parser.add_argument_group(
        "next-hop DNS (RFC 3263)",
        "Next hops named by a host name are located with NAPTR, SRV and A/AAAA records and "
        "tried in order: a 503, a timeout or a transport error moves on to the next one.")
    g.add_argument("--dns-server", action="append", type=_dns_server, metavar="HOST[:PORT]",
                   help="DNS server to ask (repeat for more; default: the system's, from "
                        "/etc/resolv.conf)")
    g.add_argument("--dns-timeout", type=_timeout, default=5.0, metavar="S",
                   help="seconds to wait for one DNS answer (default: %(default)s)")


def from_args(args: argparse.Namespace, listening: Listening) -> Rfc3263Resolver:
    """The resolver serve's options ask for."""
    return Rfc3263Resolver(getattr(args, "dns_server", None) or (),
                           timeout=getattr(args, "dns_timeout", 5.0), listening=listening)

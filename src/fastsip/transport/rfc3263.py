"""RFC 3263 (Locating SIP Servers) as policy without I/O: which DNS questions to ask for a next
hop, how NAPTR and SRV answers become an ordered list of transport addresses, the TTL cache of
the answers, and when a failed attempt moves on to the next address (§4.3).

Sans-IO: nothing here sends a query, sleeps or reads a clock.  The shell
(:mod:`fastsip.asyncio.dns`) asks DNS and passes the records, the current time and a random
source in; tests drive every rule with fixed records, a fake clock and a seeded RNG.

The steps (§4.1 transport, §4.2 port and address):

- the host is an IP literal: no DNS; transport from the URI (``transport=``, sips → TLS, else
  UDP), port from the URI or the transport's default;
- the URI has a port: A/AAAA of the host only, transport as above;
- the URI has ``transport=`` (no port): SRV for that transport, then A/AAAA of the targets;
  no SRV: A/AAAA of the host on the default port;
- otherwise NAPTR of the host, keeping the services we have listeners for (SIP+D2U, SIP+D2T,
  SIPS+D2T; only SIPS+D2T for a sips URI), by order then preference; no usable NAPTR: SRV for
  each transport we have (``_sips._tcp`` only for sips); no SRV either: A/AAAA of the host with
  the default transport (UDP, TLS for sips) and port.
"""

from __future__ import annotations

import ipaddress
import random
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Generic, Protocol, TypeVar

from fastsip.sip import URI, Response
from fastsip.transport import DEFAULT_PORTS, Address

__all__ = [
    "FAILOVER_STATUSES",
    "NAPTR_SERVICES",
    "SRV_PREFIXES",
    "Blacklist",
    "NaptrRecord",
    "NextHop",
    "NextHopResolver",
    "SrvRecord",
    "TtlCache",
    "address_for",
    "fail_over",
    "is_ip_literal",
    "naptr_transports",
    "order_srv",
    "retry_after",
    "srv_name",
    "srv_plan",
]

#: NAPTR services (RFC 3263 §4.1, RFC 3261 §26.2.2 for SIPS) to the Via transport they mean.
NAPTR_SERVICES = {"SIP+D2U": "UDP", "SIP+D2T": "TCP", "SIPS+D2T": "TLS"}
#: SRV owner prefixes per transport (§4.1: "_sip._udp", "_sip._tcp", "_sips._tcp").
SRV_PREFIXES = {"UDP": "_sip._udp", "TCP": "_sip._tcp", "TLS": "_sips._tcp"}
#: Our preference when no NAPTR orders the transports (§4.1 leaves it to the client): UDP
#: first, as every SIP element must support it, then TCP, then TLS.
_SRV_ORDER = ("UDP", "TCP", "TLS")
_URI_TRANSPORTS = {"udp": "UDP", "tcp": "TCP", "tls": "TLS"}
#: §4.3: the outcomes of an attempt after which the next address is tried: a 503 from the
#: server, a transaction timeout (our 408: Timer B/F or Timer C without a provisional) or a
#: transport error (our 503).
FAILOVER_STATUSES = frozenset({503, 408})


@lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    """Is ``host`` an IPv4 or IPv6 address (brackets and a zone allowed), so no DNS at all?
    (Asked for every branch the proxy forwards: cached, as the transport's family test is.)"""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class NextHop:
    """What RFC 3263 needs to know about the URI of a next hop: its ``host`` (``maddr`` when
    present), the ``port`` and ``transport`` it names explicitly (None when absent), and
    whether it is a sips URI (TLS only)."""

    host: str
    port: int | None = None
    transport: str | None = None
    secure: bool = False

    @classmethod
    def from_uri(cls, uri: URI) -> NextHop:
        host = uri.maddr or uri.host
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        param = uri.transport
        transport = _URI_TRANSPORTS.get(param.lower(), param.upper()) if param else None
        secure = uri.scheme == "sips"
        if secure and transport == "TCP":
            transport = "TLS"            # RFC 3261 §26.2.2: sips with transport=tcp is TLS
        return cls(host.lower() if not is_ip_literal(host) else host, uri.port or None,
                   transport, secure)

    @property
    def default_transport(self) -> str:
        """The transport when DNS chooses none: the URI's, else TLS for sips, else UDP."""
        if self.transport is not None:
            return self.transport
        return "TLS" if self.secure else "UDP"

    @property
    def needs_dns(self) -> bool:
        return not is_ip_literal(self.host)


@dataclass(frozen=True)
class NaptrRecord:
    """One NAPTR record (RFC 3403), as far as RFC 3263 uses it."""

    order: int
    preference: int
    flags: str
    service: str
    replacement: str


@dataclass(frozen=True)
class SrvRecord:
    """One SRV record (RFC 2782)."""

    priority: int
    weight: int
    port: int
    target: str


def naptr_transports(records: Iterable[NaptrRecord], supported: Collection[str],
                     secure: bool = False) -> list[tuple[str, str]]:
    """§4.1: the usable NAPTR records as ``(transport, SRV owner name)``, best first.

    Kept: flag "s" (the replacement is an SRV name; RFC 3263 uses no other), a SIP service we
    know whose transport is in ``supported`` (we have a listener for it), and for a sips URI
    only SIPS+D2T.  Sorted by order, then preference (RFC 3403 §4.1: lower first); a record
    whose replacement is the root ("." or empty) points nowhere and is dropped."""
    usable: list[tuple[int, int, int, str, str]] = []
    for i, rec in enumerate(records):
        if rec.flags.lower() != "s":
            continue
        transport = NAPTR_SERVICES.get(rec.service.upper())
        if transport is None or transport not in supported:
            continue
        if secure and transport != "TLS":
            continue
        name = rec.replacement.rstrip(".")
        if not name:
            continue
        usable.append((rec.order, rec.preference, i, transport, name))
    usable.sort()
    return [(transport, name) for *_, transport, name in usable]


def srv_name(transport: str, domain: str) -> str:
    """The SRV owner name for ``transport`` at ``domain``: ``_sip._udp.example.com``."""
    return f"{SRV_PREFIXES[transport]}.{domain.rstrip('.')}"


def srv_plan(hop: NextHop, supported: Collection[str]) -> list[tuple[str, str]]:
    """§4.1 without (usable) NAPTR records: the SRV names to ask, as ``(transport, name)``, in
    our order of preference: the URI's transport alone when it names one (listener or not:
    the URI asks for it), else each transport we have a listener for (only TLS for a sips
    URI)."""
    if hop.transport is not None:
        t = hop.transport
        return [(t, srv_name(t, hop.host))] if t in SRV_PREFIXES else []
    if hop.secure:
        wanted: Sequence[str] = ("TLS",)
    else:
        wanted = _SRV_ORDER
    return [(t, srv_name(t, hop.host)) for t in wanted
            if t in SRV_PREFIXES and t in supported]


def order_srv(records: Iterable[SrvRecord],
              rng: Callable[[], float] = random.random) -> list[SrvRecord]:
    """RFC 2782's selection, applied until every record is placed: lowest priority first;
    within a priority, each next record is drawn at random with probability proportional to
    its weight.  Weight 0 records are put first in the list before the draws (RFC 2782: "arrange
    all SRV RRs ... in any order, except that all those with weight 0 are placed at the
    beginning"), so they are picked only when the running sum lands on them: a weight 0 record
    has a small chance while others with weight remain, and is certain once they are gone.
    A single record "." (the service is decidedly not available) gives an empty list.

    ``rng`` returns a float in [0, 1): inject a seeded one for tests."""
    recs = [r for r in records if r.target.rstrip(".")]
    by_priority: dict[int, list[SrvRecord]] = {}
    for rec in recs:
        by_priority.setdefault(rec.priority, []).append(rec)
    ordered: list[SrvRecord] = []
    for priority in sorted(by_priority):
        group = sorted(by_priority[priority], key=lambda r: r.weight != 0)  # zeros first
        while group:
            total = sum(r.weight for r in group)
            # RFC 2782: a random number between 0 and the sum, inclusive; pick the first
            # record whose running sum is >= it.  With total 0 every draw is 0 and the first
            # record (a zero) is chosen, so all-zero groups keep the listed order.
            draw = int(rng() * (total + 1))
            running = 0
            chosen = len(group) - 1
            for i, rec in enumerate(group):
                running += rec.weight
                if running >= draw:
                    chosen = i
                    break
            ordered.append(group.pop(chosen))
    return ordered


_V = TypeVar("_V")


@dataclass
class _Entry(Generic[_V]):
    value: _V
    expires: float


class TtlCache(Generic[_V]):
    """Answers kept until their TTL runs out, at most ``max_entries`` of them (the least
    recently used goes first).  Negative answers (no records: an empty value) are kept like
    the rest, for their SOA-derived TTL (RFC 2308), so a name without NAPTR is not asked again
    on every call.  ``min_ttl``/``max_ttl`` clamp what a server says (a TTL of 0 would mean a
    query per call; a week-long TTL would pin a stale address).  The clock is the caller's:
    every method takes ``now``."""

    def __init__(self, max_entries: int = 4096, *, min_ttl: float = 1.0,
                 max_ttl: float = 86400.0) -> None:
        self.max_entries = max_entries
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self._entries: OrderedDict[Any, _Entry[_V]] = OrderedDict()
        #: Look-ups answered from the cache, and ones that were not (missing or expired).
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, now: float) -> _V | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires <= now:
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.value

    def put(self, key: Any, value: _V, ttl: float, now: float) -> None:
        ttl = min(max(ttl, self.min_ttl), self.max_ttl)
        self._entries[key] = _Entry(value, now + ttl)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class Blacklist:
    """Targets that answered 503 with Retry-After (§4.3: "the client SHOULD NOT send to that
    server for the time given"), until then; bounded like the cache."""

    max_entries: int = 1024
    _until: OrderedDict[tuple[str, str, int], float] = field(default_factory=OrderedDict)

    def add(self, dest: Address, seconds: float, now: float) -> None:
        self._until[dest.peer] = now + seconds
        self._until.move_to_end(dest.peer)
        while len(self._until) > self.max_entries:
            self._until.popitem(last=False)

    def blocked(self, dest: Address, now: float) -> bool:
        until = self._until.get(dest.peer)
        if until is None:
            return False
        if until <= now:
            del self._until[dest.peer]
            return False
        return True

    def filter(self, targets: Iterable[Address], now: float) -> list[Address]:
        return [t for t in targets if not self.blocked(t, now)]


def fail_over(status: int, *, provisional: bool = False, local: bool = False) -> bool:
    """§4.3: may a branch that ended with ``status`` move on to the next address?

    Yes for a 503 from the server, and for our own 408 (the transaction timed out) or 503 (a
    transport error) -- but a timeout after a provisional response (Timer C) means the server
    was there and rang: that is an unanswered call, not a dead server.  ``local``: the status
    is ours, not received."""
    if status not in FAILOVER_STATUSES:
        return False
    if status == 408:
        return local and not provisional
    return True


def retry_after(response: Response) -> float | None:
    """The seconds of a Retry-After header (RFC 3261 §20.33: delta-seconds, then optional
    comment and parameters), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    digits = value.strip().split(";", 1)[0].split("(", 1)[0].strip()
    return float(digits) if digits.isdigit() else None


class NextHopResolver(Protocol):
    """What the proxy core asks to turn a next hop into addresses (implemented by the shell,
    :class:`fastsip.asyncio.dns.Rfc3263Resolver`).

    ``resolve(hop, done)`` calls ``done(addresses, reason)`` later, from the event loop, never
    from inside ``resolve``: ``addresses`` in the order to try (IP literals, except for TLS,
    where the name is kept for the certificate check), or an empty list and a ``reason`` for the
    caller.  ``unavailable(dest, seconds)`` records a 503 with Retry-After."""

    def resolve(self, hop: NextHop,
                done: Callable[[list[Address], str | None], None]) -> None: ...

    def unavailable(self, dest: Address, seconds: float) -> None: ...


def address_for(transport: str, host: str, port: int | None) -> Address:
    """An :class:`Address` with the transport's default port when none is given."""
    return Address(transport, host, port if port else DEFAULT_PORTS.get(transport, 5060))

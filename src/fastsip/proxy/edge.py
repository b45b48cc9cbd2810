"""Defence at the edge, sans-IO: trusted networks, per-source rate limiting with bans, and
failed-authentication accounting (Kamailio's ``permissions``, ``pike`` and ``htable`` ban
patterns, as policy objects that take the time and never read a clock).

:class:`SourceGuard` is asked once for every message a source sends (:meth:`SourceGuard.admit`,
before the message is even parsed: it must stay cheap under a flood) and told about every
failed digest attempt (:meth:`SourceGuard.auth_failed`):

- **Rate**: each untrusted source IP has a token bucket (``rate`` messages per second,
  ``burst`` at once).  A source that empties it is banned for ``ban_time`` seconds: its
  datagrams are dropped unanswered and its connections closed, because answering a flood only
  amplifies it.  Trusted sources are never limited or banned.
- **Guessing**: a digest attempt whose password was actually checked and found wrong (or whose
  user does not exist) counts against the (source, user) pair and against the source.  After
  ``user_failures`` failures within ``failure_window`` seconds that user's further attempts from
  that source get 403 without being checked; after ``source_failures`` the source is banned.
  The real user, from another address, is not affected.
- Every failure and every ban is logged at WARNING on ``fastsip.proxy.edge`` (user, source,
  reason), so fail2ban-style tooling and people can see an attack.

State is bounded: at most ``max_sources`` sources are tracked (idle and expired entries are
swept first; beyond that, new sources go untracked rather than costing memory).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from functools import lru_cache

from fastsip.proxy import _edge

__all__ = ["SourceGuard", "TrustedNetworks"]

log = logging.getLogger("fastsip.proxy.edge")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _field(value: str | None) -> str:
    """A log field from untrusted text (a user name off the wire): printable ASCII only, and
    quoted when it holds spaces, so it can neither forge a log line nor break key=value."""
    if value is None:
        return "-"
    text = "".join(c if " " <= c <= "~" and c != '"' else "?" for c in value[:200])
    return f'"{text}"' if (not text or " " in text or "=" in text) else text


class TrustedNetworks:
    """A set of CIDR networks whose sources are trusted (gateways, SBCs, peer proxies): they
    may relay without authentication and are exempt from rate limits and bans.

    ``TrustedNetworks(["192.0.2.0/24", "2001:db8::1"])``; a bare address is a /32 (/128).
    ``host in trusted`` takes an IP literal (brackets and an IPv6 zone are ignored); a name or
    garbage is simply not trusted.
    """

    __slots__ = ("host_trusted", "networks")

    def __init__(self, networks: Iterable[str] = ()) -> None:
        nets: list[_Network] = []
        for text in networks:
            try:
                nets.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                raise ValueError(f"not an IP network: {text!r} (expected e.g. 192.0.2.0/24)") \
                    from None
        self.networks = tuple(nets)
        # The same few sources send almost everything: cache the answer per host string.
        #: ``host_trusted(host)`` for a host string: ``host in self``, without the Python
        #: frame of ``__contains__`` (the cache is C; the per-datagram admission calls this).
        self.host_trusted: Callable[[str], bool] = lru_cache(maxsize=8192)(self._lookup)

    def _lookup(self, host: str) -> bool:
        if not self.networks:
            return False
        text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(text.partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.networks)

    def __contains__(self, host: object) -> bool:
        return isinstance(host, str) and self.host_trusted(host)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __repr__(self) -> str:
        return f"TrustedNetworks({[str(n) for n in self.networks]!r})"


class _Source:
    """What we know of one source IP: its token bucket and its failed logins."""

    __slots__ = ("failures", "first_failure", "seen", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.seen = now
        self.failures = 0
        self.first_failure = 0.0


class SourceGuard(_edge.GuardState):
    """Per-source rate limiting, bans and failed-login accounting (see the module docstring).

    ``rate`` 0 turns rate limiting off (bans for failed logins still apply).  All times are in
    the caller's clock (the event loop's monotonic time in the server).
    """

    def __init__(
        self,
        *,
        rate: float = 100.0,
        burst: float = 400.0,
        ban_time: float = 300.0,
        user_failures: int = 5,
        source_failures: int = 10,
        failure_window: float = 600.0,
        trusted: TrustedNetworks | Iterable[str] = (),
        max_sources: int = 100_000,
    ) -> None:
        if rate < 0 or burst < 0 or ban_time < 0:
            raise ValueError("rate, burst and ban_time must be >= 0")
        if rate and burst < 1:
            raise ValueError("burst must be >= 1 when rate limiting is on")
        self.rate = float(rate)
        self.burst = float(burst)
        self.ban_time = float(ban_time)
        self.user_failures = user_failures
        self.source_failures = source_failures
        self.failure_window = failure_window
        self.trusted = trusted if isinstance(trusted, TrustedNetworks) \
            else TrustedNetworks(trusted)
        self.max_sources = max_sources
        self._sources: dict[str, _Source] = {}
        #: host -> the time its ban ends
        self.bans: dict[str, float] = {}
        #: (host, user) -> (failures, first failure time)
        self._user_failures: dict[tuple[str, str], tuple[int, float]] = {}
        self._next_sweep = float("-inf")
        #: Called (no arguments) whenever a ban starts or ends, for whoever mirrors the bans
        #: elsewhere (the shell drops banned sources in the kernel).
        self.on_bans_changed: Callable[[], object] | None = None
        #: Counters for logs and metrics.
        self.dropped = 0
        self.banned_total = 0
        self.failed_logins = 0

    # -- every message ---------------------------------------------------------------------

    # ``admit(host, now)``, called for every message (or new connection) from ``host`` before
    # any work is done on it (False: drop it silently, banned or just over its rate), is
    # GuardState's, compiled (fastsip.proxy._edge): it runs for every packet of a flood.

    def banned(self, host: str, now: float) -> bool:
        """Is ``host`` banned at ``now``?  (Does not count anything.)"""
        until = self.bans.get(host)
        return until is not None and now < until

    def is_trusted(self, host: str) -> bool:
        return host in self.trusted

    # -- failed logins ---------------------------------------------------------------------

    def auth_blocked(self, host: str, user: str | None, now: float) -> bool:
        """Has ``user`` failed too often from ``host`` lately?  Then answer 403 without
        checking the credentials: no more guesses from there."""
        if user is None:
            return False
        entry = self._user_failures.get((host, user))
        if entry is None:
            return False
        count, first = entry
        if now - first > self.failure_window:
            del self._user_failures[(host, user)]
            return False
        return count >= self.user_failures

    def auth_failed(self, host: str, user: str | None, reason: str, now: float,
                    *, method: str = "", guess: bool = True) -> None:
        """A digest attempt from ``host`` for ``user`` failed for ``reason``: log it, and when
        it was a ``guess`` (the password was checked and wrong, or the user does not exist,
        or the user is already blocked) count it, banning a source that keeps guessing."""
        log.warning("authentication failed: user=%s source=%s reason=%s%s",
                    _field(user), host, _field(reason), f" method={_field(method)}" if method
                    else "")
        if not guess:
            return
        self.failed_logins += 1
        if host in self.trusted:
            return
        if user is not None:
            key = (host, user)
            failures = self._user_failures
            count, first = failures.get(key, (0, now))
            if now - first > self.failure_window:
                count, first = 0, now
            if key not in failures and len(failures) >= self.max_sources:
                self._sweep_soon(now)
            if key in failures or len(failures) < self.max_sources:
                failures[key] = (count + 1, first)
        src = self._sources.get(host) or self._track(host, now)
        if src is None:
            return
        if src.failures and now - src.first_failure > self.failure_window:
            src.failures = 0
        if not src.failures:
            src.first_failure = now
        src.failures += 1
        if src.failures >= self.source_failures:
            src.failures = 0
            self._ban(host, now, f"{self.source_failures} failed logins")

    # -- housekeeping ----------------------------------------------------------------------

    def _ban(self, host: str, now: float, why: str) -> None:
        if not self.ban_time or host in self.trusted:
            return
        bans = self.bans
        if host not in bans and len(bans) >= self.max_sources:
            self._sweep_soon(now)
            if len(bans) >= self.max_sources:
                return      # the source stays rate-limited by its empty bucket meanwhile
        bans[host] = now + self.ban_time
        self.banned_total += 1
        log.warning("banned %s for %gs: %s", host, self.ban_time, why)
        self._changed()

    def expire_bans(self, now: float) -> int:
        """End the bans that are over (``admit`` does it lazily for a source that sends
        again; call this when nothing reaches ``admit`` from banned sources, e.g. because
        the kernel drops them).  Returns how many ended."""
        over = [h for h, t in self.bans.items() if t <= now]
        for host in over:
            del self.bans[host]
            log.info("ban on %s expired", host)
        if over:
            self._changed()
        return len(over)

    def _changed(self) -> None:
        hook = self.on_bans_changed
        if hook is not None:
            try:
                hook()
            except Exception:  # the guard's own state is right whatever the mirror does
                log.exception("on_bans_changed failed")

    def _track(self, host: str, now: float) -> _Source | None:
        sources = self._sources
        if len(sources) >= self.max_sources:
            self._sweep_soon(now)
            if len(sources) >= self.max_sources:
                return None
        src = sources[host] = _Source(self.burst, now)
        return src

    def _sweep_soon(self, now: float) -> None:
        # A full table under a flood of new (spoofed) sources must not cost a full scan per
        # message: sweep at most once a second.
        if now >= self._next_sweep:
            self._next_sweep = now + 1.0
            self.sweep(now)

    def sweep(self, now: float) -> int:
        """Forget what no longer matters: sources whose bucket has refilled and who have no
        recent failures, expired bans and failure counts.  Returns how many entries went.
        Called when a table fills up, and periodically by the server."""
        before = len(self)
        refill = (self.burst / self.rate) if self.rate else 0.0
        window = self.failure_window
        sources = self._sources
        for h in [h for h, s in sources.items()
                  if now - s.seen >= refill and not (s.failures and now - s.first_failure <= window)]:
            del sources[h]
        self.expire_bans(now)
        self._sweep_failures(now)
        return before - len(self)

    def _sweep_failures(self, now: float) -> None:
        window = self.failure_window
        failures = self._user_failures
        for k in [k for k, v in failures.items() if now - v[1] > window]:
            del failures[k]

    def __len__(self) -> int:
        """Entries held (sources, bans, failure counts): what the memory bound is about."""
        return len(self._sources) + len(self.bans) + len(self._user_failures)

"""The location service (RFC 3261 §10): bindings from an address-of-record to contacts.

A registrar writes bindings here and a proxy reads them to route a request for an AOR.  The
stores are sans-IO in the protocol sense: every expiry is an absolute time in the caller's clock,
and every query that depends on the time takes ``now``; nothing here reads a clock.  Callers
should use wall-clock seconds (``time.time()``) so a SQLite store's expiries still mean the same
thing after a restart or a reboot (a monotonic clock restarts from an arbitrary point).

The stores sit behind one small asynchronous interface, :class:`LocationStore`.  This module
holds the interface and the default :class:`MemoryLocationStore`; the stores that wait for a disk
or a network (SQLite, Redis, PostgreSQL) belong to the shell, :mod:`fastsip.asyncio.stores`,
whose ``open_store`` builds any of them from a ``--db`` URL.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastsip.errors import FastSIPError
from fastsip.sip import URI

__all__ = [
    "Binding",
    "LocationStore",
    "LocationStoreError",
    "MemoryLocationStore",
    "StoreWouldWait",
    "aor_of",
    "contact_key",
    "run_immediately",
]


class LocationStoreError(FastSIPError, ValueError):
    """A location store cannot be opened as asked (a bad ``--db`` URL or setting)."""


# URI parameters that §19.1.4 says must match whenever either URI carries them; other parameters
# are ignored in a comparison unless both carry them, so they cannot be part of a simple key.
_SIGNIFICANT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def aor_of(uri: URI | str) -> str:
    """The canonical address-of-record for ``uri``: ``scheme:user@host`` with the scheme and host
    lowercased, the user kept as is (user parts compare case-sensitively, §19.1.4), and no port,
    parameters or headers.  A URI without a user part gives ``scheme:host``."""
    return (URI(uri) if isinstance(uri, str) else uri).aor()    # (the message core's rule)


def contact_key(contact: URI | str) -> str:
    """A normalized key under which two Contact URIs that are equal per RFC 3261 §19.1.4 collide.

    Scheme and host are lowercased; user, password and port are kept; of the parameters, only
    the ones that §19.1.4 makes significant whenever present (user, ttl, method, maddr,
    transport) are part of the key, lowercased; URI headers are kept, sorted.  Two contacts that
    differ only in another parameter (``;ob``, ``;line=...``) therefore name the same binding,
    which is what a UA refreshing its registration expects.
    """
    if isinstance(contact, str):
        contact = URI(contact)
    if not contact.is_sip:
        return f"{contact.scheme.lower()}:{contact.host}"
    parts = [contact.scheme.lower(), ":"]
    if contact.user is not None:
        parts.append(contact.user)
        if contact.password is not None:
            parts.append(":" + contact.password)
        parts.append("@")
    parts.append(contact.host.lower())
    if contact.port is not None:
        parts.append(f":{contact.port}")
    lowered = {k.lower(): v for k, v in contact.params.items()}
    for name in _SIGNIFICANT_PARAMS:
        if name in lowered:
            value = lowered[name]
            parts.append(f";{name}" if value is None else f";{name}={value.lower()}")
    if contact.headers:
        parts.append("?" + "&".join(f"{k}={v}" for k, v in sorted(contact.headers.items())))
    return "".join(parts)


@dataclass(slots=True)
class Binding:
    """One binding of an address-of-record to a contact (RFC 3261 §10).

    ``expires`` is absolute, in the caller's clock (seconds).  ``call_id`` and ``cseq`` are those
    of the REGISTER that last touched the binding (§10.3 step 7 orders updates by them).
    ``path`` is the Path header of that REGISTER (RFC 3327), in order; ``source`` is the transport
    address the REGISTER came from (``"udp:198.51.100.7:40000"``), which is how a proxy reaches a
    contact behind a NAT whose Contact URI carries an unreachable private address.  ``flow``:
    reach it there (a client behind NAT, or an RFC 5626 outbound one), from our socket number
    ``socket`` (the UDP listener the REGISTER arrived on; ids follow the --listen order);
    ``instance`` / ``reg_id``: RFC 5626's ``+sip.instance`` and ``reg-id``.
    """

    aor: str
    contact: str
    expires: float
    q: float = 1.0
    call_id: str = ""
    cseq: int = 0
    path: tuple[str, ...] = ()
    source: str | None = None
    instance: str | None = None
    user_agent: str | None = None
    registered_at: float = 0.0
    flow: bool = False
    socket: int = 0
    reg_id: int | None = None

    @property
    def key(self) -> str:
        """The normalized contact key this binding is stored under (:func:`contact_key`)."""
        return contact_key(self.contact)

    def expires_in(self, now: float) -> int:
        """Whole seconds left at ``now`` (never negative): the ``expires`` param of a 200."""
        return max(0, int(self.expires - now + 0.5))


_NO_BINDINGS: dict[str, Binding] = {}   # (never written: the look-up of an unknown AOR)


def lookup_order(binding: Binding) -> tuple[float, float]:
    """The sort key of a lookup's answer (every store sorts by it)."""
    # Highest q first; among equal q, the most recently registered first (RFC 3261 §16.6 leaves
    # the order within a q-value to the proxy; the newest registration is the likeliest to work).
    return (-binding.q, -binding.registered_at)


class LocationStore(Protocol):
    """What a registrar writes and a proxy reads.  All times are absolute, in the caller's clock.

    Bindings are keyed by (AOR, :func:`contact_key` of the contact).  ``aor`` arguments are
    canonical AORs (:func:`aor_of`).

    The operations are coroutines: a store on a disk or across the network waits for it
    without stalling the event loop, and an ``update`` returns once the change is durable in
    that store (a registrar's 200 OK may then promise the binding survives).  A store whose
    answers come from this process's memory says so with ``immediate_reads`` (lookups) and
    ``immediate_writes`` (updates): its coroutines then finish without ever suspending, so a
    caller may run them in place with :func:`run_immediately` -- no task, no loop needed.
    """

    #: lookup / bindings / aors answer from memory and never suspend.
    immediate_reads: bool
    #: update / remove / remove_all / purge never suspend.
    immediate_writes: bool

    async def open(self) -> None:
        """Connect (a networked store) and check the store is usable: called once, before
        any other operation, so a server refuses to start on a store it cannot reach."""
        ...

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        """Unexpired bindings of ``aor``: q descending, then most recently registered first."""
        ...

    async def bindings(self, aor: str) -> list[Binding]:
        """Every stored binding of ``aor``, expired ones included (not yet purged)."""
        ...

    async def update(self, aor: str, put: Iterable[Binding] = (),
                     remove: Iterable[str] = ()) -> None:
        """Apply one REGISTER's changes to ``aor`` at once: all of them or none (§10.3 step 7
        commits binding updates "if and only if all binding updates and additions succeed").
        ``put`` inserts or replaces bindings (by contact key); ``remove`` names contacts."""
        ...

    async def remove_all(self, aor: str) -> None:
        """Remove every binding of ``aor``."""
        ...

    async def purge(self, now: float) -> int:
        """Drop every binding expired at ``now``; return how many were dropped.  A store whose
        server expires bindings by itself (Redis) has nothing to do and returns 0."""
        ...

    async def aors(self) -> list[str]:
        """Every AOR with at least one stored binding, sorted."""
        ...

    async def close(self) -> None:
        """Release the store's resources (after the writes in flight are durable)."""
        ...


class StoreWouldWait(FastSIPError, RuntimeError):
    """:func:`run_immediately` was given a coroutine that suspended: the store waits for I/O
    and needs an event loop (a task) to run it."""


_R = TypeVar("_R")


def run_immediately(coro: Coroutine[Any, Any, _R]) -> _R:
    """Run ``coro`` to its result in place, without a loop.  For the operations of a store
    whose ``immediate_reads`` / ``immediate_writes`` says they never suspend (the in-memory
    store), from code that has no event loop (an embedding on ``selectors``) or should not pay
    for a task per call (the lookup on every INVITE).  Raises :class:`StoreWouldWait` (and
    closes the coroutine) when it suspends after all."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise StoreWouldWait(f"{getattr(coro, '__qualname__', coro)!s} waited for I/O: "
                         "this store needs an event loop")


class MemoryLocationStore:
    """The default store: a dict per AOR.  Lost when the process ends, and private to it.

    The coroutine methods never suspend (``immediate_reads`` / ``immediate_writes``); the
    plain ``*_now`` methods are the same operations for code that holds the store itself
    (a store built over this one, tests)."""

    immediate_reads = True
    immediate_writes = True

    def __init__(self) -> None:
        self._bindings: dict[str, dict[str, Binding]] = {}

    def lookup_now(self, aor: str, now: float) -> list[Binding]:
        # (It runs for every INVITE to a user: a loop and no sort for one binding, the common
        # case, so no comprehension frame nor a key call.)
        found = []
        for b in self._bindings.get(aor, _NO_BINDINGS).values():
            if b.expires > now:
                found.append(b)
        if len(found) > 1:
            found.sort(key=lookup_order)
        return found

    def bindings_now(self, aor: str) -> list[Binding]:
        found = list(self._bindings.get(aor, {}).values())
        found.sort(key=lookup_order)
        return found

    def update_now(self, aor: str, put: Iterable[Binding] = (),
                   remove: Iterable[str] = ()) -> None:
        # Compute every key first: a bad contact raises before anything changes.
        puts = [(b.key, b) for b in put]
        removes = [contact_key(c) for c in remove]
        by_key = self._bindings.setdefault(aor, {})
        for key in removes:
            by_key.pop(key, None)
        for key, binding in puts:
            by_key[key] = binding
        if not by_key:
            del self._bindings[aor]

    def replace_now(self, aor: str, bindings: Iterable[Binding]) -> None:
        """Make ``bindings`` the whole of ``aor``'s (none: forget the AOR)."""
        by_key = {b.key: b for b in bindings}
        if by_key:
            self._bindings[aor] = by_key
        else:
            self._bindings.pop(aor, None)

    def purge_now(self, now: float) -> int:
        dropped = 0
        for aor in list(self._bindings):
            by_key = self._bindings[aor]
            for key in [k for k, b in by_key.items() if b.expires <= now]:
                del by_key[key]
                dropped += 1
            if not by_key:
                del self._bindings[aor]
        return dropped

    def aors_now(self) -> list[str]:
        return sorted(self._bindings)

    def __len__(self) -> int:
        """How many AORs have a stored binding."""
        return len(self._bindings)

    async def open(self) -> None:
        pass

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        return self.lookup_now(aor, now)

    async def bindings(self, aor: str) -> list[Binding]:
        return self.bindings_now(aor)

    async def update(self, aor: str, put: Iterable[Binding] = (),
                     remove: Iterable[str] = ()) -> None:
        self.update_now(aor, put, remove)

    async def remove_all(self, aor: str) -> None:
        self._bindings.pop(aor, None)

    async def purge(self, now: float) -> int:
        return self.purge_now(now)

    async def aors(self) -> list[str]:
        return self.aors_now()

    async def close(self) -> None:
        self._bindings.clear()

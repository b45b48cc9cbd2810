"""The location service (RFC 3261 §10): bindings from an address-of-record to contacts.

A registrar writes bindings here and a proxy reads them to route a request for an AOR.  The
stores are sans-IO in the protocol sense: every expiry is an absolute time in the caller's clock,
and every query that depends on the time takes ``now``; nothing here reads a clock.  Callers
should use wall-clock seconds (``time.time()``) so a SQLite store's expiries still mean the same
thing after a restart or a reboot (a monotonic clock restarts from an arbitrary point).

Two stores sit behind one small interface, :class:`LocationStore`: :class:`MemoryLocationStore`
(the default) and :class:`SqliteLocationStore` (bindings survive a restart).  :func:`open_store`
builds one from a ``--db`` URL.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from fastsip.errors import FastSIPError
from fastsip.sip import URI

__all__ = [
    "Binding",
    "LocationStore",
    "LocationStoreError",
    "MemoryLocationStore",
    "SqliteLocationStore",
    "aor_of",
    "contact_key",
    "open_store",
]

logger = logging.getLogger("fastsip.proxy")


class LocationStoreError(FastSIPError, ValueError):
    """A location store cannot be opened as asked (a bad ``--db`` URL or setting)."""


# URI parameters that §19.1.4 says must match whenever either URI carries them; other parameters
# are ignored in a comparison unless both carry them, so they cannot be part of a simple key.
_SIGNIFICANT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def aor_of(uri: URI | str) -> str:
    """The canonical address-of-record for ``uri``: ``scheme:user@host`` with the scheme and host
    lowercased, the user kept as is (user parts compare case-sensitively, §19.1.4), and no port,
    parameters or headers.  A URI without a user part gives ``scheme:host``."""
    if isinstance(uri, str):
        uri = URI(uri)
    scheme = uri.scheme.lower()
    if not uri.is_sip:
        # tel: and other schemes: the host field holds the whole opaque part, kept as is.
        return f"{scheme}:{uri.host}"
    host = uri.host.lower()
    return f"{scheme}:{host}" if uri.user is None else f"{scheme}:{uri.user}@{host}"


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


def _lookup_order(binding: Binding) -> tuple[float, float]:
    # Highest q first; among equal q, the most recently registered first (RFC 3261 §16.6 leaves
    # the order within a q-value to the proxy; the newest registration is the likeliest to work).
    return (-binding.q, -binding.registered_at)


class LocationStore(Protocol):
    """What a registrar writes and a proxy reads.  All times are absolute, in the caller's clock.

    Bindings are keyed by (AOR, :func:`contact_key` of the contact).  ``aor`` arguments are
    canonical AORs (:func:`aor_of`).
    """

    def lookup(self, aor: str, now: float) -> list[Binding]:
        """Unexpired bindings of ``aor``: q descending, then most recently registered first."""
        ...

    def bindings(self, aor: str) -> list[Binding]:
        """Every stored binding of ``aor``, expired ones included (not yet purged)."""
        ...

    def put(self, binding: Binding) -> None:
        """Insert ``binding`` or replace the one with the same AOR and contact key."""
        ...

    def remove(self, aor: str, contact: str) -> None:
        """Remove the binding of ``aor`` whose contact has the same key as ``contact``."""
        ...

    def remove_all(self, aor: str) -> None:
        """Remove every binding of ``aor``."""
        ...

    def update(self, aor: str, put: Iterable[Binding] = (), remove: Iterable[str] = ()) -> None:
        """Apply one REGISTER's changes to ``aor`` at once: all of them or none (§10.3 step 7
        commits binding updates "if and only if all binding updates and additions succeed")."""
        ...

    def purge(self, now: float) -> int:
        """Drop every binding expired at ``now``; return how many were dropped."""
        ...

    def aors(self) -> list[str]:
        """Every AOR with at least one stored binding, sorted."""
        ...

    def close(self) -> None:
        """Release the store's resources."""
        ...


class MemoryLocationStore:
    """The default store: a dict per AOR.  Lost when the process ends."""

    def __init__(self) -> None:
        self._bindings: dict[str, dict[str, Binding]] = {}

    def lookup(self, aor: str, now: float) -> list[Binding]:
        found = [b for b in self._bindings.get(aor, {}).values() if b.expires > now]
        found.sort(key=_lookup_order)
        return found

    def bindings(self, aor: str) -> list[Binding]:
        found = list(self._bindings.get(aor, {}).values())
        found.sort(key=_lookup_order)
        return found

    def put(self, binding: Binding) -> None:
        self._bindings.setdefault(binding.aor, {})[binding.key] = binding

    def remove(self, aor: str, contact: str) -> None:
        by_key = self._bindings.get(aor)
        if by_key is None:
            return
        by_key.pop(contact_key(contact), None)
        if not by_key:
            del self._bindings[aor]

    def remove_all(self, aor: str) -> None:
        self._bindings.pop(aor, None)

    def update(self, aor: str, put: Iterable[Binding] = (), remove: Iterable[str] = ()) -> None:
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

    def purge(self, now: float) -> int:
        dropped = 0
        for aor in list(self._bindings):
            by_key = self._bindings[aor]
            for key in [k for k, b in by_key.items() if b.expires <= now]:
                del by_key[key]
                dropped += 1
            if not by_key:
                del self._bindings[aor]
        return dropped

    def aors(self) -> list[str]:
        return sorted(self._bindings)

    def close(self) -> None:
        self._bindings.clear()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    aor TEXT NOT NULL,
    contact_key TEXT NOT NULL,
    contact TEXT NOT NULL,
    expires REAL NOT NULL,
    q REAL NOT NULL,
    call_id TEXT NOT NULL,
    cseq INTEGER NOT NULL,
    path TEXT NOT NULL,
    source TEXT,
    instance TEXT,
    user_agent TEXT,
    registered_at REAL NOT NULL,
    flow INTEGER NOT NULL DEFAULT 0,
    socket INTEGER NOT NULL DEFAULT 0,
    reg_id INTEGER,
    PRIMARY KEY (aor, contact_key)
);
CREATE INDEX IF NOT EXISTS bindings_expires ON bindings (expires);
"""

_COLUMNS = (
    "aor, contact_key, contact, expires, q, call_id, cseq, path, source, instance, user_agent,"
    " registered_at, flow, socket, reg_id"
)
_PLACEHOLDERS = ", ".join("?" for _ in _COLUMNS.split(","))
# Columns added since the first schema, for files written by an older fastsip.
_ADDED_COLUMNS = (("flow", "INTEGER NOT NULL DEFAULT 0"), ("socket", "INTEGER NOT NULL DEFAULT 0"),
                  ("reg_id", "INTEGER"))

_Row = tuple[str, str, str, float, float, str, int, str, str | None, str | None, str | None, float,
             int, int, int | None]


def _to_row(binding: Binding) -> _Row:
    return (
        binding.aor,
        binding.key,
        binding.contact,
        binding.expires,
        binding.q,
        binding.call_id,
        binding.cseq,
        json.dumps(list(binding.path)),
        binding.source,
        binding.instance,
        binding.user_agent,
        binding.registered_at,
        int(binding.flow),
        binding.socket,
        binding.reg_id,
    )


def _from_row(row: _Row) -> Binding:
    aor, _key, contact, expires, q, call_id, cseq, path, source, instance, ua, at, flow, sock, \
        reg_id = row
    return Binding(
        aor=aor,
        contact=contact,
        expires=expires,
        q=q,
        call_id=call_id,
        cseq=cseq,
        path=tuple(json.loads(path)),
        source=source,
        instance=instance,
        user_agent=ua,
        registered_at=at,
        flow=bool(flow),
        socket=sock,
        reg_id=reg_id,
    )


class SqliteLocationStore:
    """Bindings in a SQLite file, so a restart loses none of them.

    Every write is its own committed transaction before the call returns: once the registrar has
    answered 200 to a REGISTER, the binding is on disk.  The journal is WAL (readers never block
    the writer, and a commit is one append to the log).  ``synchronous`` defaults to ``FULL``: in
    WAL mode ``NORMAL`` already survives a killed process, but only ``FULL`` also survives a power
    loss or an OS crash, and REGISTER rates are low enough (one per UA per refresh interval) that
    the fsync per commit is affordable.  Pass ``synchronous="NORMAL"`` to trade that for speed.

    The connection may be used from several threads (a lock serializes it), but the calls block
    on disk I/O: an asyncio server should expect a write to cost an fsync.
    """

    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise LocationStoreError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}"
            )
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing stays
            # uncommitted.
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            have = {row[1] for row in self._db.execute("PRAGMA table_info(bindings)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    self._db.execute(f"ALTER TABLE bindings ADD COLUMN {name} {decl}")
        except sqlite3.Error as exc:
            # sqlite3 says "unable to open database file" without saying which file.
            raise LocationStoreError(
                f"cannot open SQLite database {self.path!r}: {exc}"
            ) from None

    def _select(self, sql: str, args: tuple[object, ...]) -> list[Binding]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM bindings WHERE {sql}", args).fetchall()
        found = [_from_row(row) for row in rows]
        found.sort(key=_lookup_order)
        return found

    def lookup(self, aor: str, now: float) -> list[Binding]:
        return self._select("aor = ? AND expires > ?", (aor, now))

    def bindings(self, aor: str) -> list[Binding]:
        return self._select("aor = ?", (aor,))

    def put(self, binding: Binding) -> None:
        self.update(binding.aor, put=(binding,))

    def remove(self, aor: str, contact: str) -> None:
        self.update(aor, remove=(contact,))

    def remove_all(self, aor: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM bindings WHERE aor = ?", (aor,))

    def update(self, aor: str, put: Iterable[Binding] = (), remove: Iterable[str] = ()) -> None:
        rows = [_to_row(b) for b in put]
        keys = [(aor, contact_key(c)) for c in remove]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("DELETE FROM bindings WHERE aor = ? AND contact_key = ?", keys)
                self._db.executemany(
                    f"INSERT OR REPLACE INTO bindings ({_COLUMNS})"
                    f" VALUES ({_PLACEHOLDERS})",
                    rows,
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def purge(self, now: float) -> int:
        with self._lock:
            cursor = self._db.execute("DELETE FROM bindings WHERE expires <= ?", (now,))
            dropped = cursor.rowcount
        if dropped:
            logger.debug("location store %s: purged %d expired bindings", self.path, dropped)
        return dropped

    def aors(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT aor FROM bindings ORDER BY aor").fetchall()
        return [str(row[0]) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(url: str) -> MemoryLocationStore | SqliteLocationStore:
    """Open a location store from a ``--db`` URL: ``memory:`` (or ``memory``) for the in-memory
    store, ``sqlite:PATH`` for a SQLite file (``sqlite:///abs/path`` is accepted too)."""
    if url in ("memory", "memory:"):
        return MemoryLocationStore()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:") :]
        if path.startswith("///"):
            path = path[2:]
        elif path.startswith("//"):
            raise LocationStoreError(
                f"location store URL {url!r}: use sqlite:PATH or sqlite:///ABS/PATH"
            )
        if not path:
            raise LocationStoreError(
                f"location store URL {url!r} has no file path (use sqlite:PATH)"
            )
        return SqliteLocationStore(path)
    raise LocationStoreError(
        f"unknown location store URL {url!r}: expected 'memory:' or 'sqlite:PATH'"
    )

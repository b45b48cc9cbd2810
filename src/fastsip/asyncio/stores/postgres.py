"""Bindings in PostgreSQL (``--db postgresql://...``): :class:`PostgresLocationStore`.

**Layout.**  One table, ``bindings``, with one row per binding (the SQLite store's columns),
keyed by ``PRIMARY KEY (aor, contact_key)``::

    aor, contact_key | contact, expires, q, call_id, cseq, path (text[]), source, instance,
                     | user_agent, registered_at, flow, socket, reg_id, seq

Every operation on one AOR -- the lookup on every INVITE, a REGISTER's update -- is a search
on a prefix of that primary key, so it touches one short index range and needs no other
index; the lookup is one statement, sorted by the server, hence one round trip on a pooled
connection.  ``seq`` (an identity) records when a contact was first bound: among bindings of
equal q and registration time it keeps the order the in-memory store gives (a refresh keeps a
binding's place).  The key columns use the ``"C"`` collation: byte order, which is code-point
order (Python's) and cheaper to compare than a linguistic one.  An index on ``expires`` serves
the periodic purge.  The schema is created on first start (``CREATE TABLE IF NOT EXISTS``,
under an advisory lock so workers starting together do not race) and reused afterwards.

**Durability.**  ``update`` applies one REGISTER's changes in one transaction and returns once
PostgreSQL has committed it.  With PostgreSQL's default ``synchronous_commit = on`` (which this
store relies on and does not change) a commit returns after its WAL record is flushed to disk,
so a registrar's 200 OK promises a binding that survives a crash of fastsip or of the database
server.  A database configured with ``synchronous_commit = off`` may lose the last fraction of
a second of REGISTERs in a database crash.

**Sharing.**  Every read goes to the database (``immediate_reads`` is false: nothing is cached
in this process), so any number of fastsip workers and nodes may share one database: a contact
registered through one node is found by a lookup on any other at once.  Two REGISTERs for the
same contact racing through two nodes both commit; the later commit's binding stands.

Connections: a small pool (1 to 4 by default) created by :meth:`PostgresLocationStore.open`;
asyncpg prepares each statement once per connection.  libpq's environment (``PGPASSWORD``,
``PGUSER``, ``PGHOST``, ``PGPORT``, ``PGDATABASE``, ``~/.pgpass``) fills in what the URL leaves
out.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from fastsip.asyncio.stores import _driver, redact
from fastsip.proxy.location import Binding, LocationStoreError, contact_key

__all__ = ["PostgresLocationStore"]

logger = logging.getLogger("fastsip.proxy")

#: Any constant: the advisory lock that serializes schema creation between starting workers
#: (two concurrent ``CREATE TABLE IF NOT EXISTS`` can both decide to create, and one fails).
_SCHEMA_LOCK = 0x46534950  # "FSIP"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS bindings (
    aor TEXT COLLATE "C" NOT NULL,
    contact_key TEXT COLLATE "C" NOT NULL,
    contact TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    q DOUBLE PRECISION NOT NULL,
    call_id TEXT NOT NULL,
    cseq BIGINT NOT NULL,
    path TEXT[] NOT NULL,
    source TEXT,
    instance TEXT,
    user_agent TEXT,
    registered_at DOUBLE PRECISION NOT NULL,
    flow BOOLEAN NOT NULL DEFAULT FALSE,
    socket INTEGER NOT NULL DEFAULT 0,
    reg_id BIGINT,
    seq BIGINT GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (aor, contact_key)
);
CREATE INDEX IF NOT EXISTS bindings_expires ON bindings (expires);
"""

# What a Binding is made of, in _from_row's order (the key and seq stay in the database).
_SELECT = ("SELECT aor, contact, expires, q, call_id, cseq, path, source, instance, user_agent,"
           " registered_at, flow, socket, reg_id FROM bindings")
# q descending, then the newest registration: lookup_order, with seq for what it leaves tied.
_ORDER = " ORDER BY q DESC, registered_at DESC, seq"
_LOOKUP = f"{_SELECT} WHERE aor = $1 AND expires > $2{_ORDER}"
_BINDINGS = f"{_SELECT} WHERE aor = $1{_ORDER}"

_WRITTEN = ("contact", "expires", "q", "call_id", "cseq", "path", "source", "instance",
            "user_agent", "registered_at", "flow", "socket", "reg_id")
# A refresh updates the row in place: seq (the binding's place among equals) is kept.
_UPSERT = (
    f"INSERT INTO bindings (aor, contact_key, {', '.join(_WRITTEN)})"
    f" VALUES ({', '.join(f'${n}' for n in range(1, len(_WRITTEN) + 3))})"
    " ON CONFLICT (aor, contact_key) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _WRITTEN)
)
_REMOVE = "DELETE FROM bindings WHERE aor = $1 AND contact_key = ANY($2::text[])"
_REMOVE_ALL = "DELETE FROM bindings WHERE aor = $1"
_PURGE = "DELETE FROM bindings WHERE expires <= $1"
_AORS = "SELECT DISTINCT aor FROM bindings"

_Row = tuple[str, str, str, float, float, str, int, list[str], str | None, str | None,
             str | None, float, bool, int, int | None]


def _to_row(aor: str, key: str, b: Binding) -> _Row:
    return (aor, key, b.contact, b.expires, b.q, b.call_id, b.cseq, list(b.path), b.source,
            b.instance, b.user_agent, b.registered_at, b.flow, b.socket, b.reg_id)


def _from_row(r: Sequence[Any]) -> Binding:
    return Binding(aor=r[0], contact=r[1], expires=r[2], q=r[3], call_id=r[4], cseq=r[5],
                   path=tuple(r[6]), source=r[7], instance=r[8], user_agent=r[9],
                   registered_at=r[10], flow=r[11], socket=r[12], reg_id=r[13])


async def _keep_session(connection: Any) -> None:
    """The pool's reset on release: nothing.  The store never changes session state (no SET,
    LISTEN or session lock), and asyncpg's default reset would cost a round trip per release,
    doubling the lookup on every INVITE.  (asyncpg still rolls back an unfinished
    transaction itself.)"""


class PostgresLocationStore:
    """Bindings in a PostgreSQL database, shared by every worker and node that opens it.

    ``url`` is ``postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DBNAME`` (or ``postgres://``).
    Nothing connects until :meth:`open`.  ``timeout`` bounds connecting and each statement
    (seconds); ``min_size`` / ``max_size`` bound the pool.
    """

    immediate_reads = False
    immediate_writes = False

    def __init__(self, url: str, *, timeout: float = 10.0, min_size: int = 1,
                 max_size: int = 4) -> None:
        scheme = url.partition(":")[0].lower()
        if scheme not in ("postgresql", "postgres") or not url[len(scheme):].startswith("://"):
            raise LocationStoreError(
                f"location store URL {redact(url)!r}: expected postgresql://HOST/DBNAME")
        self.url = url
        self.timeout = timeout
        self.min_size = min_size
        self.max_size = max_size
        self._pool: Any = None
        self._closed = False

    def __repr__(self) -> str:
        return f"PostgresLocationStore({redact(self.url)!r})"

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect the pool and create the schema if the database has none yet.  Raises
        :class:`LocationStoreError` naming the server (never the password) when it cannot."""
        if self._closed:
            raise self._closed_error()
        if self._pool is not None:
            return
        asyncpg = _driver("asyncpg", "postgresql", self.url)
        options: dict[str, Any] = {}
        if "reset" in inspect.signature(asyncpg.create_pool).parameters:  # asyncpg >= 0.30
            options["reset"] = _keep_session
        try:
            pool = await asyncpg.create_pool(
                self.url, min_size=self.min_size, max_size=self.max_size,
                timeout=self.timeout, command_timeout=self.timeout, **options)
        except Exception as exc:  # noqa: BLE001 - refused, DNS, auth, no such database, ...
            raise LocationStoreError(
                f"cannot connect to PostgreSQL at {self._server()} ({redact(self.url)}): "
                f"{self._scrub(exc)}") from None
        try:
            async with pool.acquire() as connection, connection.transaction():
                await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                await connection.execute(_SCHEMA)
        except Exception as exc:  # noqa: BLE001 - e.g. no CREATE privilege
            pool.terminate()
            raise LocationStoreError(
                f"cannot create the location store's schema in {redact(self.url)}: "
                f"{self._scrub(exc)}") from None
        self._pool = pool
        logger.debug("location store %s: pool of %d-%d connections", redact(self.url),
                     self.min_size, self.max_size)

    async def close(self) -> None:
        """Wait for the operations in flight (up to ``timeout``), then close the pool.  Later
        operations raise :class:`LocationStoreError`; closing again does nothing."""
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.timeout)
        except Exception:  # noqa: BLE001 - too slow, or the server went away: just drop it
            pool.terminate()

    # -- reads -------------------------------------------------------------------------------

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        rows = await self._use().fetch(_LOOKUP, aor, now)
        return [_from_row(r) for r in rows]

    async def bindings(self, aor: str) -> list[Binding]:
        rows = await self._use().fetch(_BINDINGS, aor)
        return [_from_row(r) for r in rows]

    async def aors(self) -> list[str]:
        # Sorted here, not by the server: the same order as Python's whatever the collation.
        return sorted(r[0] for r in await self._use().fetch(_AORS))

    # -- writes ------------------------------------------------------------------------------

    async def update(self, aor: str, put: Iterable[Binding] = (),
                     remove: Iterable[str] = ()) -> None:
        """One REGISTER's changes in one transaction (§10.3 step 7: all or none), returning
        once PostgreSQL has committed them (durable, with ``synchronous_commit = on``)."""
        # Every key first, before any I/O: a bad contact raises ValueError and changes nothing.
        # One row per key: the last put wins and keeps the first one's place (a dict's rule,
        # as in the memory store; one statement may not upsert a row twice anyway).
        rows = list({key: _to_row(aor, key, b) for b, key in ((b, b.key) for b in put)}
                    .values())
        keys = [contact_key(c) for c in remove]
        pool = self._use()
        if not rows and not keys:
            return
        async with pool.acquire() as connection:
            if rows and keys:
                async with connection.transaction():
                    await connection.execute(_REMOVE, aor, keys)
                    await self._put(connection, rows)
            elif keys:
                await connection.execute(_REMOVE, aor, keys)   # one statement: atomic
            else:
                await self._put(connection, rows)

    @staticmethod
    async def _put(connection: Any, rows: list[_Row]) -> None:
        if len(rows) == 1:
            # The usual REGISTER (one Contact): a plain statement costs the loop a third less
            # CPU than executemany's pipeline machinery.
            await connection.execute(_UPSERT, *rows[0])
        else:
            # asyncpg sends every row, then one Sync: one round trip, and one implicit
            # transaction (executemany is atomic since asyncpg 0.22).
            await connection.executemany(_UPSERT, rows)

    async def remove_all(self, aor: str) -> None:
        await self._use().execute(_REMOVE_ALL, aor)

    async def purge(self, now: float) -> int:
        status = await self._use().execute(_PURGE, now)   # "DELETE <count>"
        dropped = int(status.rsplit(" ", 1)[-1])
        if dropped:
            logger.debug("location store %s: purged %d expired bindings", redact(self.url),
                         dropped)
        return dropped

    # -- helpers -----------------------------------------------------------------------------

    def _use(self) -> Any:
        if self._pool is None:
            if self._closed:
                raise self._closed_error()
            raise LocationStoreError(f"location store {redact(self.url)!r} is not open "
                                     "(await open() first)")
        return self._pool

    def _closed_error(self) -> LocationStoreError:
        return LocationStoreError(f"location store {redact(self.url)!r} is closed")

    def _server(self) -> str:
        """host:port the URL names (libpq's environment and defaults where it is silent)."""
        hosts = urlsplit(self.url).netloc.rpartition("@")[2]
        if not hosts:
            hosts = os.environ.get("PGHOST", "localhost")
        if "," in hosts or hosts.startswith("/"):   # several hosts, or a socket directory
            return hosts
        if hosts.endswith("]") or ":" not in hosts:
            hosts += f":{os.environ.get('PGPORT', '5432')}"
        return hosts

    def _scrub(self, exc: BaseException) -> str:
        """The error's text, with the URL's password masked should a driver ever quote it."""
        text = str(exc) or type(exc).__name__
        try:
            password = urlsplit(self.url).password
        except ValueError:
            password = None
        if password:
            for secret in (password, unquote(password)):
                text = text.replace(secret, "***")
        return text

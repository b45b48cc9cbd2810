"""Bindings in a SQLite file (``--db sqlite:PATH``): :class:`SqliteLocationStore`.

It keeps its connection on a writer thread, so the event loop never waits for a disk: REGISTERs queue their changes, and the thread commits whatever has queued
while the previous commit was syncing as one transaction (group commit: one fsync for many
REGISTERs under load, and still one per REGISTER when they come one at a time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastsip.proxy.location import (
    Binding,
    LocationStoreError,
    MemoryLocationStore,
    contact_key,
)

__all__ = ["SqliteLocationStore"]

logger = logging.getLogger("fastsip.proxy")

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
    return (binding.aor, binding.key, binding.contact, binding.expires, binding.q,
            binding.call_id, binding.cseq, json.dumps(list(binding.path)), binding.source,
            binding.instance, binding.user_agent, binding.registered_at, int(binding.flow),
            binding.socket, binding.reg_id)


def _from_row(row: _Row) -> Binding:
    aor, _key, contact, expires, q, call_id, cseq, path, source, instance, ua, at, flow, sock, \
        reg_id = row
    return Binding(aor=aor, contact=contact, expires=expires, q=q, call_id=call_id, cseq=cseq,
                   path=tuple(json.loads(path)), source=source, instance=instance,
                   user_agent=ua, registered_at=at, flow=bool(flow), socket=sock, reg_id=reg_id)


class _Write:
    """One queued change: what it does to the database (on the writer thread) and to the
    mirror (on the loop, once committed), and the future its caller awaits."""

    __slots__ = ("apply", "future", "loop", "mirror")

    def __init__(self, apply: Callable[[sqlite3.Connection], Any],
                 mirror: Callable[[Any], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.apply = apply
        self.mirror = mirror
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()


def _settle(outcomes: list[tuple[_Write, Any, BaseException | None]]) -> None:
    """On the loop thread, in commit order, a batch at a time (one wake-up of the loop per
    commit, not per change): the mirror follows the database exactly."""
    for write, result, error in outcomes:
        if error is None:
            result = write.mirror(result)
        if write.future.done():  # the caller was cancelled; the change stands all the same
            continue
        if error is None:
            write.future.set_result(result)
        else:
            write.future.set_exception(error)


class SqliteLocationStore:
    """Bindings in a SQLite file, so a restart loses none of them.

    - **Durable before it answers.**  ``update`` returns once its transaction is committed;
      ``synchronous`` defaults to ``FULL`` (in WAL mode ``NORMAL`` already survives a killed
      process, but only ``FULL`` survives a power loss or an OS crash).
    - **Off the loop.**  One writer thread owns the connection.  Changes queue up; the thread
      commits every change queued so far as one transaction, each change in a savepoint of its
      own (one REGISTER's failure rolls back only its own changes).  At a high REGISTER rate one
      fsync serves many REGISTERs; at a low one each still gets its own.
    - **Reads from memory.**  The file is read once when the store opens; afterwards a mirror
      in memory follows every commit, so a lookup on every INVITE costs no I/O and no thread
      hop (``immediate_reads``).  The file must therefore have one writer process: two servers
      on one file would not see each other's REGISTERs (use Redis or PostgreSQL to share).
    """

    immediate_reads = True
    immediate_writes = False

    def __init__(self, path: str | Path, *, synchronous: str = "FULL",
                 busy_timeout: float = 5.0, max_batch: int = 512) -> None:
        synchronous = synchronous.upper()
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise LocationStoreError(
                f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = str(path)
        self.max_batch = max_batch
        #: Transactions committed, and the changes they carried (the group commit's effect).
        self.commits = 0
        self.writes = 0
        self._mirror = MemoryLocationStore()
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so nothing stays
            # uncommitted.  check_same_thread=False: opened here, used by the writer thread.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={synchronous}")
            # Another process holding the file's write lock: wait this long, then fail the
            # batch (its REGISTERs get 500 + Retry-After instead of hanging).
            db.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(bindings)")}
            for name, decl in _ADDED_COLUMNS:
                if name not in have:
                    db.execute(f"ALTER TABLE bindings ADD COLUMN {name} {decl}")
            by_aor: dict[str, list[Binding]] = {}
            for row in db.execute(f"SELECT {_COLUMNS} FROM bindings"):
                binding = _from_row(row)
                by_aor.setdefault(binding.aor, []).append(binding)
        except sqlite3.Error as exc:
            # sqlite3 says "unable to open database file" without saying which file.
            raise LocationStoreError(f"cannot open SQLite database {self.path!r}: {exc}") \
                from None
        for aor, bindings in by_aor.items():
            self._mirror.replace_now(aor, bindings)
        self._db = db
        self._queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._writer, name="fastsip-sqlite-writer",
                                        daemon=True)
        self._thread.start()

    async def open(self) -> None:
        pass  # (opened, and read into the mirror, by the constructor)

    # -- reads: the mirror -------------------------------------------------------------------

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        return self._mirror.lookup_now(aor, now)

    async def bindings(self, aor: str) -> list[Binding]:
        return self._mirror.bindings_now(aor)

    async def aors(self) -> list[str]:
        return self._mirror.aors_now()

    # -- writes: the writer thread -----------------------------------------------------------

    async def update(self, aor: str, put: Iterable[Binding] = (),
                     remove: Iterable[str] = ()) -> None:
        puts = list(put)
        rows = [_to_row(b) for b in puts]          # a bad contact raises here, before anything
        removes = list(remove)
        keys = [(aor, contact_key(c)) for c in removes]

        def apply(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM bindings WHERE aor = ? AND contact_key = ?", keys)
            db.executemany(f"INSERT OR REPLACE INTO bindings ({_COLUMNS})"
                           f" VALUES ({_PLACEHOLDERS})", rows)

        await self._write(apply, lambda _: self._mirror.update_now(aor, puts, removes))

    async def remove_all(self, aor: str) -> None:
        await self._write(lambda db: db.execute("DELETE FROM bindings WHERE aor = ?", (aor,)),
                          lambda _: self._mirror.replace_now(aor, ()))

    async def purge(self, now: float) -> int:
        def apply(db: sqlite3.Connection) -> int:
            return int(db.execute("DELETE FROM bindings WHERE expires <= ?", (now,)).rowcount)

        def mirror(n: int) -> int:
            self._mirror.purge_now(now)
            return n

        dropped: int = await self._write(apply, mirror)
        if dropped:
            logger.debug("location store %s: purged %d expired bindings", self.path, dropped)
        return dropped

    async def close(self) -> None:
        """Commit what is queued, then close the file (the writer thread ends)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _write(self, apply: Callable[[sqlite3.Connection], Any],
               mirror: Callable[[Any], Any]) -> asyncio.Future[Any]:
        if self._closed:
            raise LocationStoreError(f"location store {self.path!r} is closed")
        write = _Write(apply, mirror, asyncio.get_running_loop())
        self._queue.put(write)
        return write.future

    def _writer(self) -> None:
        """The writer thread: take every queued change, commit them as one transaction, hand
        each its outcome back on its loop.  Ends at the ``None`` that close() queues."""
        db = self._db
        closing = False
        while not closing:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    closing = True
                    break
                batch.append(more)
            by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
            for write, (result, error) in zip(batch, self._commit(db, batch)):
                by_loop.setdefault(write.loop, []).append((write, result, error))
            for loop, outcomes in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, outcomes)
                except RuntimeError:  # that loop is closed: nobody is waiting any more
                    pass
        db.close()

    def _commit(self, db: sqlite3.Connection, batch: list[_Write]
                ) -> list[tuple[Any, BaseException | None]]:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            db.execute("BEGIN IMMEDIATE")
            for write in batch:
                db.execute("SAVEPOINT change")
                try:
                    result = write.apply(db)
                except Exception as exc:  # noqa: BLE001 - only this change fails
                    db.execute("ROLLBACK TO change")
                    outcomes.append((None, exc))
                else:
                    outcomes.append((result, None))
                db.execute("RELEASE change")
            db.execute("COMMIT")
        except Exception as exc:  # noqa: BLE001 - the writer thread must outlive any error
            # The commit itself failed (disk full, I/O error, locked past busy_timeout):
            # nothing of the batch is durable, so every change in it fails.
            logger.error("location store %s: commit of %d change(s) failed: %s", self.path,
                         len(batch), exc)
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return [(None, exc)] * len(batch)
        self.commits += 1
        self.writes += len(batch)
        return outcomes

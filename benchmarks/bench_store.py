"""REGISTERs per second through the registrar over each location store, against SQLite's old
one-commit-per-REGISTER on the event loop, measured in the same run.

Every store gets the same work: ``REGISTERS`` REGISTERs for distinct users, parsed beforehand,
handed to :meth:`fastsip.proxy.Registrar.handle` by ``CONCURRENCY`` tasks at once (a burst:
every phone re-registering after an outage).  We time the burst (wall clock) and this process's
CPU (user and system apart; a server's own CPU, Redis's or PostgreSQL's, is not counted).

- ``memory`` -- the in-memory default: the registrar's own cost, the ceiling.
- ``sqlite`` -- the SQLite store (writer thread, group commit, ``synchronous=FULL``).
- ``sqlite-1commit`` -- the reference: what ``--db sqlite:`` did before, one ``BEGIN IMMEDIATE
  ... COMMIT`` with its fsync per REGISTER, blocking the loop (same schema, same PRAGMAs): every
  call in progress waits for each REGISTER's fsync.
- ``redis`` -- a redis-server started here with ``appendfsync always`` (fsync per write).
- ``postgresql`` -- a PostgreSQL server started here (``synchronous_commit=on``), when the test
  helpers can start one.

Run by ``benchmarks/guard.py`` as a plain test (a ratio under ``FLOOR`` fails it); standalone:

    PYTHONPATH=tests python benchmarks/bench_store.py [--registers 3000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from fastsip import Request, parse
from fastsip.asyncio.stores.sqlite import _COLUMNS, _PLACEHOLDERS, _SCHEMA, _to_row
from fastsip.proxy import Binding, MemoryLocationStore, Registrar, contact_key
from fastsip.transport import Address

REGISTERS = int(os.environ.get("FASTSIP_BENCH_REGISTERS", "3000"))
CONCURRENCY = 64
#: The group-committing SQLite store must handle at least FLOOR times the REGISTERs per second
#: of one commit per REGISTER.  The gain is the fsyncs saved, so it is as large as a commit is
#: slow: 2.3x on this project's CI VM, whose virtual disk syncs in ~0.3 ms; a disk that takes
#: 5 ms per fsync makes it ~10x.  The floor only catches group commit falling back to serial.
FLOOR = 1.5

GUARDS: list[tuple[str, str, float, str]] = []   # a plain test: see the docstring
SOURCE = Address("UDP", "127.0.0.1", 5062)


def registers(n: int) -> list[Request]:
    out = []
    for i in range(n):
        msg = parse((
            "REGISTER sip:example.com SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK-{i}\r\nMax-Forwards: 70\r\n"
            f"From: <sip:u{i}@example.com>;tag=t{i}\r\nTo: <sip:u{i}@example.com>\r\n"
            f"Call-ID: reg-{i}@bench\r\nCSeq: 1 REGISTER\r\n"
            f"Contact: <sip:u{i}@127.0.0.1:5062>\r\nExpires: 3600\r\nContent-Length: 0\r\n\r\n"
        ).encode())
        assert isinstance(msg, Request)
        out.append(msg)
    return out


class OneCommitSqlite(MemoryLocationStore):
    """The reference: SQLite as fastsip used it before the writer thread -- each update one
    committed transaction, synchronously, on the caller's (the loop's) thread."""

    immediate_writes = False

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    async def update(self, aor: str, put: Iterable[Binding] = (),
                     remove: Iterable[str] = ()) -> None:
        puts, removes = list(put), list(remove)
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        db.executemany("DELETE FROM bindings WHERE aor = ? AND contact_key = ?",
                       [(aor, contact_key(c)) for c in removes])
        db.executemany(f"INSERT OR REPLACE INTO bindings ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
                       [_to_row(b) for b in puts])
        db.execute("COMMIT")
        self.update_now(aor, puts, removes)

    async def close(self) -> None:
        self._db.close()


async def burst(store: Any, requests: list[Request], concurrency: int) -> int:
    """How many of ``requests`` were answered 200."""
    await store.open()
    registrar = Registrar(store, domains=["example.com"])
    now = time.time()
    ok = 0

    async def worker(k: int) -> None:
        nonlocal ok
        for request in requests[k::concurrency]:
            response = await registrar.handle(request, SOURCE, now)
            ok += response.status_code == 200
            await asyncio.sleep(0)  # REGISTERs arrive as datagrams: the loop runs between
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    await store.close()
    return ok


def measure(name: str, make: Callable[[], Any], n: int, concurrency: int
            ) -> dict[str, float]:
    requests = registers(n)
    store = make()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    ok = asyncio.run(burst(store, requests, concurrency))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    assert ok == n, f"{name}: {ok} of {n} REGISTERs answered 200"
    row = {"per_second": n / wall, "wall": wall,
           "user_us": (after.ru_utime - before.ru_utime) / n * 1e6,
           "sys_us": (after.ru_stime - before.ru_stime) / n * 1e6}
    print(f"{name:16} {row['per_second']:9,.0f} REGISTER/s   CPU per REGISTER: user "
          f"{row['user_us']:6.0f} us  sys {row['sys_us']:5.0f} us   ({n} in {wall:.2f} s)",
          flush=True)
    return row


@contextmanager
def servers(workdir: Path) -> Iterator[dict[str, str]]:
    """URLs of the networked stores this machine can run (started here, stopped after)."""
    urls: dict[str, str] = {}
    with ExitStack() as stack:
        try:
            from redisutil import RedisServer
            redis = RedisServer(workdir / "redis")
            stack.callback(redis.stop)
            urls["redis"] = redis.url
        except Exception as exc:  # noqa: BLE001 - a skipped store is reported, not fatal
            print(f"redis: not measured ({exc})")
        try:
            from pgutil import postgres_server  # type: ignore[import-not-found]
            urls["postgresql"] = stack.enter_context(postgres_server(workdir / "pg"))
        except Exception as exc:  # noqa: BLE001
            print(f"postgresql: not measured ({exc})")
        yield urls


def run(n: int = REGISTERS, concurrency: int = CONCURRENCY) -> dict[str, dict[str, float]]:
    from fastsip.asyncio.stores import open_store

    with tempfile.TemporaryDirectory(dir=os.environ.get("FASTSIP_BENCH_DIR")) as tmp:
        work = Path(tmp)
        print(f"\n{n} REGISTERs, {concurrency} at once, files in {work}")
        rows = {"memory": measure("memory", MemoryLocationStore, n, concurrency)}
        rows["sqlite-1commit"] = measure(
            "sqlite-1commit", lambda: OneCommitSqlite(work / "one.db"), n, concurrency)
        rows["sqlite"] = measure("sqlite", lambda: open_store(f"sqlite:{work / 'group.db'}"),
                                 n, concurrency)
        with servers(work) as urls:
            for name, url in urls.items():
                rows[name] = measure(name, lambda url=url: open_store(url), n, concurrency)
    ratio = rows["sqlite"]["per_second"] / rows["sqlite-1commit"]["per_second"]
    print(f"sqlite group commit / one commit per REGISTER: {ratio:.1f}x (floor {FLOOR:g}x)")
    return rows


def test_group_commit_beats_one_commit_per_register() -> None:
    rows = run()
    ratio = rows["sqlite"]["per_second"] / rows["sqlite-1commit"]["per_second"]
    assert ratio >= FLOOR, f"sqlite group commit only {ratio:.1f}x one commit per REGISTER"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registers", type=int, default=REGISTERS)
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = ap.parse_args()
    run(args.registers, args.concurrency)

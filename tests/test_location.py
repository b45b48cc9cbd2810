"""Location stores: the in-memory, SQLite, Redis and PostgreSQL stores behave the same; SQLite
survives restarts, commits off the event loop and groups concurrent REGISTERs' writes into one
commit.  (test_store_redis.py and test_store_postgres.py test the networked stores' own ways.)"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pgutil import PgServer, postgres_cluster
from procutil import fastsip_env, posix_only
from redisutil import RedisServer

from fastsip.asyncio.stores import SqliteLocationStore, open_store, redact
from fastsip.asyncio.stores.postgres import PostgresLocationStore
from fastsip.asyncio.stores.redis import RedisLocationStore
from fastsip.proxy.location import (
    Binding,
    LocationStore,
    LocationStoreError,
    MemoryLocationStore,
    StoreWouldWait,
    aor_of,
    contact_key,
    run_immediately,
)
from fastsip.sip import URI

AOR = "sip:bob@example.com"

Body = Callable[[LocationStore], Awaitable[None]]


#: The tests' clock: absolute wall-clock seconds in the future (Redis expires keys by its own
#: clock, so bindings stamped in 1970 would vanish on arrival).
T = 4_000_000_000.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    with postgres_cluster(tmp_path_factory.mktemp("pg")) as server:
        yield server


@pytest.fixture(params=["memory", "sqlite", "redis", "postgresql"])
def on_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[Body], None]]:
    """Runs an async test body against each store, on a fresh loop."""
    s: LocationStore
    if request.param == "memory":
        s = MemoryLocationStore()
    elif request.param == "sqlite":
        s = SqliteLocationStore(tmp_path / "loc.db")
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        # A prefix of its own per test: the module's tests share one server.
        s = RedisLocationStore(server.url, prefix=f"t{tmp_path.name}:")
    else:
        # A new database per test: the module's tests share one server.
        pg: PgServer = request.getfixturevalue("pg_server")
        s = PostgresLocationStore(pg.create_database())

    def run(body: Body) -> None:
        async def main() -> None:
            await s.open()
            try:
                await body(s)
            finally:
                await s.close()
        asyncio.run(main())

    yield run


async def put(store: LocationStore, binding: Binding) -> None:
    await store.update(binding.aor, put=[binding])


def test_aor_of_canonical() -> None:
    assert aor_of("sip:Bob@EXAMPLE.com:5070;transport=udp?x=y") == "sip:Bob@example.com"
    assert aor_of("SIPS:alice@Example.COM") == "sips:alice@example.com"
    assert aor_of("sip:example.com") == "sip:example.com"
    # The message core's URI.aor() is the one rule: aor_of and the router's look-up use it.
    assert URI("sip:Bob@EXAMPLE.com;user=phone").aor() == aor_of("sip:Bob@example.com")
    assert aor_of(URI("TEL:+1-201-555-0123;phone-context=x")) == "tel:+1-201-555-0123"


def test_contact_key_follows_uri_equality() -> None:
    assert contact_key("sip:bob@HOST.example:5060") == contact_key("SIP:bob@host.example:5060")
    # A parameter only one side has and that 19.1.4 does not make significant is ignored...
    assert contact_key("sip:bob@h;ob") == contact_key("sip:bob@h")
    # ... but transport, and an explicit port, are part of the identity.
    assert contact_key("sip:bob@h;transport=tcp") != contact_key("sip:bob@h")
    assert contact_key("sip:bob@h:5060") != contact_key("sip:bob@h")
    assert contact_key("sip:Bob@h") != contact_key("sip:bob@h")


def test_put_lookup_order_and_expiry(on_store: Callable[[Body], None]) -> None:
    async def body(store: LocationStore) -> None:
        await put(store, Binding(AOR, "sip:bob@10.0.0.1", expires=T + 200, q=0.5,
                                 registered_at=T + 100))
        await put(store, Binding(AOR, "sip:bob@10.0.0.2", expires=T + 200, q=1.0,
                                 registered_at=T + 90))
        await put(store, Binding(AOR, "sip:bob@10.0.0.3", expires=T + 200, q=0.5,
                                 registered_at=T + 110))
        await put(store, Binding(AOR, "sip:bob@10.0.0.4", expires=T + 150, q=0.9,
                                 registered_at=T + 120))
        order = [b.contact for b in await store.lookup(AOR, T + 120)]
        assert order == ["sip:bob@10.0.0.2", "sip:bob@10.0.0.4", "sip:bob@10.0.0.3",
                         "sip:bob@10.0.0.1"]
        # At 150 the fourth binding has expired: lookup hides it, bindings() still has it.
        assert "sip:bob@10.0.0.4" not in [b.contact for b in await store.lookup(AOR, T + 150)]
        assert len(await store.bindings(AOR)) == 4
        if isinstance(store, RedisLocationStore):
            # Redis expires by itself: purge sweeps nothing, and the next write of the AOR
            # drops what expired before it.
            assert await store.purge(T + 150) == 0
            await put(store, Binding(AOR, "sip:bob@10.0.0.2", expires=T + 200, q=1.0,
                                     registered_at=T + 150))
        else:
            assert await store.purge(T + 150) == 1
        assert len(await store.bindings(AOR)) == 3
        if not isinstance(store, RedisLocationStore):
            assert await store.purge(T + 1000) == 3
            assert await store.aors() == []
        assert await store.lookup(AOR, T + 1000) == []
    on_store(body)


def test_put_replaces_equal_contact(on_store: Callable[[Body], None]) -> None:
    async def body(store: LocationStore) -> None:
        await put(store, Binding(AOR, "sip:bob@Host.example", expires=T + 100, cseq=1))
        await put(store, Binding(AOR, "sip:bob@host.example;ob", expires=T + 300, cseq=2))
        (b,) = await store.bindings(AOR)
        assert b.cseq == 2 and b.expires == T + 300 and b.contact == "sip:bob@host.example;ob"
    on_store(body)


def test_update_remove_all_and_aors(on_store: Callable[[Body], None]) -> None:
    async def body(store: LocationStore) -> None:
        other = "sip:alice@example.com"
        await put(store, Binding(AOR, "sip:bob@a", expires=T + 100))
        await put(store, Binding(AOR, "sip:bob@b", expires=T + 100))
        await put(store, Binding(other, "sip:alice@c", expires=T + 100))
        assert await store.aors() == [other, AOR]
        await store.update(AOR, remove=["sip:bob@A"])
        assert [b.contact for b in await store.bindings(AOR)] == ["sip:bob@b"]
        await store.update(AOR, remove=["sip:nobody@x"])  # removing what is not there: no error
        await store.update(AOR, put=[Binding(AOR, "sip:bob@d", expires=T + 100)],
                           remove=["sip:bob@b"])
        assert [b.contact for b in await store.bindings(AOR)] == ["sip:bob@d"]
        await store.remove_all(AOR)
        assert await store.aors() == [other]
        await store.update(other, remove=["sip:alice@c"])   # the last binding: the AOR goes
        assert await store.aors() == []
    on_store(body)


def test_a_bad_contact_changes_nothing(on_store: Callable[[Body], None]) -> None:
    async def body(store: LocationStore) -> None:
        await put(store, Binding(AOR, "sip:bob@a", expires=T + 100))
        with pytest.raises(ValueError):
            await store.update(AOR, put=[Binding(AOR, "sip:bob@b", expires=T + 100)],
                               remove=["sip:bob@a", "<not a uri"])
        assert [b.contact for b in await store.bindings(AOR)] == ["sip:bob@a"]
    on_store(body)


def test_binding_fields_round_trip(on_store: Callable[[Body], None]) -> None:
    b = Binding(
        AOR,
        "sip:bob@192.168.1.2:5060;transport=udp",
        expires=T + 3700.5,
        q=0.7,
        call_id="abc@host",
        cseq=42,
        path=("<sip:edge1.example.com;lr>", "<sip:edge2.example.com;lr>"),
        source="udp:198.51.100.7:40000",
        instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>",
        user_agent="softphone/1.0",
        registered_at=T + 100.25,
        flow=True,
        socket=2,
        reg_id=1,
    )

    async def body(store: LocationStore) -> None:
        await put(store, b)
        assert await store.lookup(AOR, T) == [b]
        assert b.expires_in(T + 3600.0) == 101
    on_store(body)


def test_run_immediately_runs_a_memory_store_without_a_loop() -> None:
    store = MemoryLocationStore()
    run_immediately(store.update(AOR, put=[Binding(AOR, "sip:bob@a", expires=100.0)]))
    assert [b.contact for b in run_immediately(store.lookup(AOR, 0.0))] == ["sip:bob@a"]

    async def waits() -> None:
        await asyncio.sleep(0)

    with pytest.raises(StoreWouldWait):
        run_immediately(waits())


def _reopen(path: Path) -> list[Binding]:
    s = SqliteLocationStore(path)
    try:
        return run_immediately(s.bindings(AOR))   # reads come from memory: no loop needed
    finally:
        asyncio.run(s.close())


def test_sqlite_survives_reopen_and_purges(tmp_path: Path) -> None:
    path = tmp_path / "loc.db"

    async def first() -> None:
        s = SqliteLocationStore(path)
        await put(s, Binding(AOR, "sip:bob@a", expires=1000.0, path=("<sip:p;lr>",),
                             source="tcp:1.2.3.4:5"))
        await put(s, Binding(AOR, "sip:bob@b", expires=50.0))
        await s.close()
        again = open_store(f"sqlite:{path}")
        assert [b.contact for b in await again.bindings(AOR)] == ["sip:bob@a", "sip:bob@b"]
        (live,) = await again.lookup(AOR, 100.0)
        assert live.path == ("<sip:p;lr>",) and live.source == "tcp:1.2.3.4:5"
        assert await again.purge(100.0) == 1
        await again.close()

    asyncio.run(first())
    assert [b.contact for b in _reopen(path)] == ["sip:bob@a"]


def test_sqlite_groups_concurrent_writes_into_few_commits(tmp_path: Path) -> None:
    """200 REGISTERs' writes at once: every one durable, in far fewer commits than writes."""
    path = tmp_path / "loc.db"

    async def main() -> tuple[int, int]:
        s = SqliteLocationStore(path)
        await asyncio.gather(*(
            s.update(f"sip:u{n}@example.com",
                     put=[Binding(f"sip:u{n}@example.com", f"sip:u{n}@10.0.0.1", expires=1e12)])
            for n in range(200)))
        assert len(await s.aors()) == 200
        await s.close()
        return s.commits, s.writes

    commits, writes = asyncio.run(main())
    assert writes == 200 and commits < 50, (commits, writes)
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM bindings").fetchone() == (200,)
    db.close()


def test_sqlite_commits_off_the_loop_and_a_failed_commit_changes_nothing(tmp_path: Path) -> None:
    """Another process holds the file's write lock: the update waits (the loop keeps
    running meanwhile), then fails; neither the file nor the lookups show the binding."""
    path = tmp_path / "loc.db"
    s = SqliteLocationStore(path, busy_timeout=0.5)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")   # the write lock, as a second writer would hold it

    async def main() -> int:
        ticks = 0
        update = asyncio.ensure_future(put(s, Binding(AOR, "sip:bob@a", expires=1e12)))
        while not update.done():
            ticks += 1
            await asyncio.sleep(0.01)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await update
        assert await s.lookup(AOR, 0.0) == []
        return ticks

    started = time.monotonic()
    ticks = asyncio.run(main())
    assert time.monotonic() - started >= 0.4
    assert ticks >= 10          # the loop ran while SQLite waited for the lock
    blocker.execute("ROLLBACK")
    blocker.close()

    async def after() -> None:
        await put(s, Binding(AOR, "sip:bob@b", expires=1e12))   # the writer thread survived
        await s.close()

    asyncio.run(after())
    assert [b.contact for b in _reopen(path)] == ["sip:bob@b"]


def test_sqlite_close_commits_what_is_queued(tmp_path: Path) -> None:
    path = tmp_path / "loc.db"

    async def main() -> None:
        s = SqliteLocationStore(path)
        pending = [asyncio.ensure_future(put(s, Binding(AOR, f"sip:bob@h{n}", expires=1e12)))
                   for n in range(20)]
        await asyncio.sleep(0)          # queued, not yet awaited to the end
        await s.close()
        await asyncio.gather(*pending)
        with pytest.raises(LocationStoreError, match="closed"):
            await put(s, Binding(AOR, "sip:bob@late", expires=1e12))

    asyncio.run(main())
    assert len(_reopen(path)) == 20


@posix_only("SIGKILL does not exist on Windows (the child kills itself with it)")
def test_sqlite_binding_survives_sigkill(tmp_path: Path) -> None:
    """A write whose update() returned is on disk even when the process dies at once."""
    db = tmp_path / "loc.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os, signal
        from fastsip.asyncio.stores import SqliteLocationStore
        from fastsip.proxy.location import Binding
        s = SqliteLocationStore({str(db)!r})
        asyncio.run(s.update({AOR!r}, put=[Binding({AOR!r}, "sip:bob@198.51.100.7:40000",
                                                   expires=1e12, cseq=7)]))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    # The child imports the same fastsip this test run does.
    env = fastsip_env()
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    (b,) = _reopen(db)
    assert b.contact == "sip:bob@198.51.100.7:40000" and b.cseq == 7


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store("memory:"), MemoryLocationStore)
    assert isinstance(open_store("memory"), MemoryLocationStore)
    s = open_store(f"sqlite:///{tmp_path}/a.db".replace("////", "///"))
    assert isinstance(s, SqliteLocationStore) and Path(s.path) == tmp_path / "a.db"
    asyncio.run(s.close())
    for bad in ("redis-x", "sqlite:", "sqlite://host/x", "mysql://x/db", ""):
        with pytest.raises(LocationStoreError, match="sqlite"):
            open_store(bad)
    # A password in the URL never reaches a message (nor, through redact(), serve's log).
    with pytest.raises(LocationStoreError) as info:
        open_store("mysql://fastsip:s3cret@db.example/loc")
    assert "s3cret" not in str(info.value) and "fastsip:***@db.example" in str(info.value)
    assert redact("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("postgresql://u:pa/ss@word@h:5432/db") == "postgresql://u:***@h:5432/db"
    with pytest.raises(ValueError):
        SqliteLocationStore(tmp_path / "b.db", synchronous="SOMETIMES")


"""The PostgreSQL location store against a real server (tests/pgutil.py starts one on loopback):
the schema is made once and reused, bindings outlive a store and a server restart, two
"nodes" see each other's writes, an update is all or nothing, a server that is not there is
named quickly and without the password -- and two ``fastsip serve`` nodes share registrations
and keep every answered one when killed mid-load.  (tests/test_location.py runs the behaviour
tests every store must pass against it too.)"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastsip.asyncio.stores import open_store
from fastsip.asyncio.stores.postgres import PostgresLocationStore
from fastsip.proxy.location import Binding, LocationStore, LocationStoreError, MemoryLocationStore

sys.path.insert(0, str(Path(__file__).parent))
from pgutil import PASSWORD, PgServer, postgres_cluster
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    fetch_contacts,
    final_status,
    header_values,
    register_load_killed,
    register_request,
    request,
    sip_exchange,
)

AOR = "sip:bob@example.com"


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
    with postgres_cluster(tmp_path_factory.mktemp("pg")) as server:
        yield server


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def opened(url: str) -> PostgresLocationStore:
    store = PostgresLocationStore(url)
    await store.open()
    return store


def table_exists(pg: PgServer, db: str) -> bool:
    return pg.psql(db, "SELECT to_regclass('bindings') IS NOT NULL").strip() == "t"


def test_schema_made_once_and_bindings_outlive_the_store_and_a_server_restart(
        pg_server: PgServer) -> None:
    url = pg_server.create_database("restart")
    assert not table_exists(pg_server, "restart")

    async def first() -> None:
        a = await opened(url)
        await a.update(AOR, put=[Binding(AOR, "sip:bob@10.0.0.1", expires=1e12, cseq=3,
                                         path=("<sip:edge;lr>",), registered_at=5.0)])
        await a.close()

    run(first)
    assert table_exists(pg_server, "restart")
    indexes = pg_server.psql("restart", "SELECT indexname FROM pg_indexes "
                             "WHERE tablename = 'bindings' ORDER BY indexname").split()
    assert indexes == ["bindings_expires", "bindings_pkey"]

    async def second() -> None:
        # A second start finds the schema (and the binding) and creates nothing.
        b = await opened(url)
        (binding,) = await b.lookup(AOR, 0.0)
        assert binding.cseq == 3 and binding.path == ("<sip:edge;lr>",)
        # A node that stays up while the database restarts: its pool reconnects.
        pg_server.restart()
        await asyncio.sleep(0.2)
        assert [x.contact for x in await b.lookup(AOR, 0.0)] == ["sip:bob@10.0.0.1"]
        await b.close()
        c = await opened(url)
        assert [x.contact for x in await c.bindings(AOR)] == ["sip:bob@10.0.0.1"]
        await c.close()

    run(second)
    assert pg_server.psql("restart", "SELECT count(*) FROM bindings").strip() == "1"


def test_two_nodes_see_each_others_writes(pg_server: PgServer) -> None:
    url = pg_server.create_database()

    async def main() -> None:
        a, b = await opened(url), await opened(url)
        await a.update(AOR, put=[Binding(AOR, "sip:bob@10.0.0.1", expires=1e12)])
        assert [x.contact for x in await b.lookup(AOR, 0.0)] == ["sip:bob@10.0.0.1"]
        await b.update(AOR, put=[Binding(AOR, "sip:bob@10.0.0.2", expires=1e12, q=0.5)],
                       remove=["sip:bob@10.0.0.1"])
        assert [x.contact for x in await a.lookup(AOR, 0.0)] == ["sip:bob@10.0.0.2"]
        # Many REGISTERs through both nodes at once: every one lands, both see them all.
        users = [f"sip:u{n}@example.com" for n in range(100)]
        await asyncio.gather(*(
            (a if n % 2 else b).update(u, put=[Binding(u, f"sip:u{n}@10.0.1.1", expires=50.0)])
            for n, u in enumerate(users)))
        assert await a.aors() == await b.aors() == sorted([*users, AOR])
        assert await b.purge(60.0) == 100
        assert await a.aors() == [AOR]
        await a.close()
        await b.close()

    run(main)


def test_an_update_the_server_rejects_changes_nothing(pg_server: PgServer) -> None:
    """PostgreSQL refuses a NUL in text: the second put of a REGISTER fails on the server, after
    the remove and the first put ran; the transaction leaves the bindings as they were."""
    url = pg_server.create_database()
    bad = Binding(AOR, "sip:bob@c", expires=1e12, user_agent="nul\x00here")

    async def main() -> None:
        store = await opened(url)
        await store.update(AOR, put=[Binding(AOR, "sip:bob@a", expires=1e12, cseq=1)])
        before = await store.bindings(AOR)
        for remove in (["sip:bob@a"], []):      # a transaction; one pipelined statement
            with pytest.raises(Exception, match="0x00"):
                await store.update(AOR, put=[Binding(AOR, "sip:bob@b", expires=1e12), bad],
                                   remove=remove)
            assert await store.bindings(AOR) == before
        # The pool is still good: the next REGISTER goes through.
        await store.update(AOR, put=[Binding(AOR, "sip:bob@b", expires=1e12)],
                           remove=["sip:bob@a"])
        assert [x.contact for x in await store.bindings(AOR)] == ["sip:bob@b"]
        await store.close()

    run(main)
    assert pg_server.psql(url.rsplit("/", 1)[1], "SELECT contact FROM bindings") == "sip:bob@b\n"


def test_same_answers_as_the_memory_store_over_random_registers(pg_server: PgServer) -> None:
    """Random puts (refreshes, equal q and registration times), removes and purges on both
    stores: PostgreSQL answers every lookup with the memory store's bindings, in its order."""
    url = pg_server.create_database()
    rng = random.Random(3261)
    aors = [f"sip:u{n}@example.com" for n in range(3)]

    def binding(aor: str, now: float) -> Binding:
        host = rng.randrange(6)
        return Binding(aor, f"sip:x@10.0.0.{host}", expires=now + rng.choice((5, 50)),
                       q=rng.choice((0.5, 1.0)), cseq=rng.randrange(100),
                       registered_at=float(rng.choice((now, now - 1))))

    async def main() -> None:
        store = await opened(url)
        mirror = MemoryLocationStore()
        for step in range(250):
            now = float(step)
            aor = rng.choice(aors)
            op = rng.random()
            if op < 0.6:
                put = [binding(aor, now) for _ in range(rng.randrange(1, 4))]
                remove = [f"sip:x@10.0.0.{rng.randrange(6)}" for _ in range(rng.randrange(2))]
                for s in (store, mirror):
                    await s.update(aor, put=put, remove=remove)
            elif op < 0.7:
                for s in (store, mirror):
                    await s.remove_all(aor)
            elif op < 0.8:
                assert await store.purge(now) == await mirror.purge(now)
            for a in aors:
                assert await store.lookup(a, now) == await mirror.lookup(a, now), (step, a)
                assert await store.bindings(a) == await mirror.bindings(a), (step, a)
            assert await store.aors() == await mirror.aors()
        await store.close()

    run(main)


def test_open_names_the_server_quickly_and_never_the_password(pg_server: PgServer) -> None:
    async def refused(url: str, timeout: float = 10.0) -> str:
        started = time.monotonic()
        store = PostgresLocationStore(url, timeout=timeout)
        with pytest.raises(LocationStoreError) as info:
            await store.open()
        assert time.monotonic() - started < timeout + 2
        await store.close()
        return str(info.value)

    async def main() -> None:
        nobody = free_port()
        message = await refused(f"postgresql://fastsip:{PASSWORD}@{HOST}:{nobody}/loc")
        assert f"{HOST}:{nobody}" in message and PASSWORD not in message, message
        assert "fastsip:***@" in message
        # Something listens but never speaks: the connect timeout bounds the wait.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
            silent.bind((HOST, 0))
            silent.listen()
            port = silent.getsockname()[1]
            message = await refused(f"postgres://fastsip:{PASSWORD}@{HOST}:{port}/loc", 1.0)
            assert f"{HOST}:{port}" in message and PASSWORD not in message, message
        wrong = "not-the-password"
        message = await refused(pg_server.url("postgres", password=wrong))
        assert "password authentication failed" in message and wrong not in message, message
        message = await refused(pg_server.url("no_such_db"))
        assert "no_such_db" in message and PASSWORD not in message, message

    run(main)


def test_libpq_environment_fills_in_the_user_and_password(
        pg_server: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    url = pg_server.create_database()
    db = url.rsplit("/", 1)[1]
    monkeypatch.setenv("PGUSER", pg_server.user)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)

    async def main() -> None:
        store = await opened(f"postgresql://{HOST}:{pg_server.port}/{db}")
        await store.update(AOR, put=[Binding(AOR, "sip:bob@a", expires=1e12)])
        assert len(await store.lookup(AOR, 0.0)) == 1
        await store.close()

    run(main)


def test_open_store_urls_and_the_lifecycle(pg_server: PgServer) -> None:
    # Building a store does no I/O: a host that does not resolve is fine until open().
    for url in ("postgresql://u:pw@db.invalid/loc", "postgres://db.invalid:5433/loc",
                "POSTGRESQL://db.invalid/loc"):
        assert isinstance(open_store(url), PostgresLocationStore)
    with pytest.raises(LocationStoreError):
        PostgresLocationStore("redis://127.0.0.1/0")
    assert "pw" not in repr(open_store("postgresql://u:pw@db.invalid/loc"))
    url = pg_server.create_database()

    async def main() -> None:
        store: LocationStore = open_store(url)
        assert not store.immediate_reads and not store.immediate_writes
        with pytest.raises(LocationStoreError, match="not open"):
            await store.lookup(AOR, 0.0)
        await store.open()
        await store.open()                       # again: nothing more
        await store.update(AOR, put=[Binding(AOR, "sip:bob@a", expires=1e12)])
        await store.close()
        await store.close()                      # again: nothing more
        for operation in (store.lookup(AOR, 0.0), store.aors(), store.purge(0.0),
                          store.update(AOR, remove=["sip:bob@a"]), store.open()):
            with pytest.raises(LocationStoreError, match="closed"):
                await operation
        await PostgresLocationStore(url).close()  # closing a store never opened: fine

    run(main)


# -- two fastsip serve nodes on one database ---------------------------------------------------

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed")


def test_two_serve_nodes_share_registrations(pg_server: PgServer, tmp_path: Path) -> None:
    url = pg_server.create_database()
    port_a, port_b = free_port(), free_port()
    node_a = Serve(tmp_path, port_a, "--db", url)
    node_b = Serve(tmp_path, port_b, "--db", url)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller:
            phone.bind((HOST, 0))
            phone.settimeout(5)
            contact = f"sip:bob@{HOST}:{phone.getsockname()[1]}"
            # bob registers through node A ...
            lines = sip_exchange(port_a, register_request(
                "bob", "reg", f"Contact: <{contact}>", "Expires: 600"))
            assert final_status(lines) == 200, lines
            # ... node B lists the binding ...
            (listed,) = header_values(fetch_contacts(port_b, "bob"), "Contact")
            assert listed.startswith(f"<{contact}>;expires="), listed
            # ... and relays a MESSAGE for bob to the phone.
            caller.bind((HOST, 0))
            caller.settimeout(5)
            message = request("MESSAGE", f"sip:bob@{DOMAIN}", call_id="msg")
            caller.sendto(message.replace("{me}", str(caller.getsockname()[1])).encode(),
                          (HOST, port_b))
            relayed, via_b = phone.recvfrom(65535)
            assert relayed.startswith(f"MESSAGE {contact} SIP/2.0\r\n".encode()), relayed
            assert via_b == (HOST, port_b)
            # The phone answers; the 200 goes back through B to the caller.
            text = relayed.decode()
            head = [f"{name}: {value}" for name in ("Via", "From", "To", "Call-ID", "CSeq")
                    for value in header_values(text, name)]
            head[-3] += ";tag=phone"            # the To header: the phone's tag
            phone.sendto(("SIP/2.0 200 OK\r\n" + "\r\n".join(head)
                          + "\r\nContent-Length: 0\r\n\r\n").encode(), via_b)
            assert caller.recv(65535).startswith(b"SIP/2.0 200 OK\r\n")
    finally:
        assert node_a.close() == 0
        assert node_b.close() == 0
    for node in (node_a, node_b):
        assert PASSWORD not in node.log(), node.log()


@needs_sipp
def test_sigkill_mid_register_load_keeps_every_answered_binding(
        pg_server: PgServer, tmp_path: Path) -> None:
    """As tests/test_serve_durability.py does for SQLite: a node is SIGKILLed in the middle of
    a REGISTER load; every user sipp saw a 200 for is in the table, and another node serves
    it."""
    url = pg_server.create_database()
    answered = register_load_killed(tmp_path, free_port(), "--db", url)
    stored = set(pg_server.psql(url.rsplit("/", 1)[1], "SELECT aor FROM bindings").split())
    missing = {u for u in answered if f"sip:{u}@{DOMAIN}" not in stored}
    assert not missing, f"{len(missing)} answered REGISTERs lost, e.g. {sorted(missing)[:5]}"

    other = Serve(tmp_path, free_port(), "--db", url)
    try:
        user = sorted(answered)[len(answered) // 2]
        assert f"<sip:{user}@{HOST}:" in fetch_contacts(other.port, user)
    finally:
        assert other.close() == 0

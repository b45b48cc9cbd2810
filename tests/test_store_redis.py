"""The Redis location store against a real redis-server (started here, on loopback, in a
temporary directory): Redis expires what expires, two nodes share one database, a password
never shows, a REGISTER answered 200 survives serve's and Redis's SIGKILL, and a phone that
registered through one ``fastsip serve`` is called through another.  (The behaviour every store
shares is in test_location.py, over Redis too.)"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procutil import free_port
from redisutil import RedisServer
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    fetch_contacts,
    finish,
    register,
    register_load_killed,
    run_uac,
    start_uas,
    successful,
)

from fastsip.asyncio.stores import open_store
from fastsip.asyncio.stores.redis import RedisLocationStore
from fastsip.proxy.location import Binding, LocationStoreError

AOR = "sip:bob@example.com"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path / "redis")
    yield s
    s.stop()


def binding(contact: str, expires: float, now: float | None = None) -> Binding:
    now = time.time() if now is None else now
    return Binding(AOR, contact, expires=expires, registered_at=now)


def test_an_aor_expires_in_redis_with_its_last_binding(server: RedisServer) -> None:
    async def main() -> None:
        store = open_store(server.url)
        assert isinstance(store, RedisLocationStore)
        await store.open()
        now = time.time()
        await store.update(AOR, put=[binding("sip:bob@a", now + 100, now),
                                     binding("sip:bob@b", now + 300, now)])
        ttl = await store._client.call("TTL", store.prefix + AOR)
        assert 295 <= ttl <= 300                     # the last binding's expiry
        await store.update(AOR, remove=["sip:bob@b"])
        assert 95 <= await store._client.call("TTL", store.prefix + AOR) <= 100
        # A binding that has expired by the next write is dropped by it.
        await store.update(AOR, put=[binding("sip:bob@c", now + 200, now + 150)])
        assert [b.contact for b in await store.bindings(AOR)] == ["sip:bob@c"]
        # One that expires for real: Redis deletes the AOR without anyone purging.
        await store.update(AOR, put=[binding("sip:bob@c", time.time() + 0.3)])
        await asyncio.sleep(0.6)
        assert await store._client.call("EXISTS", store.prefix + AOR) == 0
        assert await store.aors() == []
        await store.close()

    asyncio.run(main())


def test_two_nodes_share_one_database(server: RedisServer) -> None:
    async def main() -> None:
        a, b = RedisLocationStore(server.url), RedisLocationStore(server.url)
        await a.open()
        await b.open()
        now = time.time()
        await a.update(AOR, put=[binding("sip:bob@10.0.0.1", now + 600, now)])
        assert [x.contact for x in await b.lookup(AOR, now)] == ["sip:bob@10.0.0.1"]
        await b.remove_all(AOR)
        assert await a.lookup(AOR, now) == []
        await a.close()
        await b.close()
        with pytest.raises(LocationStoreError, match="closed"):
            await a.lookup(AOR, now)

    asyncio.run(main())


def test_password_from_url_or_environment_never_in_messages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = RedisServer(tmp_path / "redis", password="s3cret-pw")
    try:
        async def main() -> None:
            good = RedisLocationStore(server.url)
            await good.open()
            await good.close()
            bare = f"redis://127.0.0.1:{server.port}/0"
            monkeypatch.setenv("FASTSIP_REDIS_PASSWORD", "s3cret-pw")
            from_env = RedisLocationStore(bare)
            await from_env.open()
            await from_env.close()
            monkeypatch.delenv("FASTSIP_REDIS_PASSWORD")
            wrong = RedisLocationStore(f"redis://:wr0ng-pw@127.0.0.1:{server.port}/0")
            with pytest.raises(LocationStoreError) as info:
                await wrong.open()
            assert "wr0ng-pw" not in str(info.value) and "***" in str(info.value)
            await wrong.close()

        asyncio.run(main())
    finally:
        server.stop()


def test_nothing_listening_is_a_quick_clear_error() -> None:
    async def main() -> None:
        store = RedisLocationStore(f"redis://127.0.0.1:{free_port()}/0", timeout=2.0)
        started = time.monotonic()
        with pytest.raises(LocationStoreError, match="cannot reach Redis at redis://127.0.0.1"):
            await store.open()
        assert time.monotonic() - started < 5
        await store.close()

    asyncio.run(main())


def test_a_redis_without_an_append_only_file_is_warned_about(
        server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        store = RedisLocationStore(server.url)
        await store._client.call("CONFIG", "SET", "appendonly", "no")
        with caplog.at_level(logging.WARNING, logger="fastsip.proxy"):
            await store.open()
        await store.close()

    asyncio.run(main())
    assert any("append-only" in r.getMessage() for r in caplog.records)


def test_serve_refuses_to_start_when_redis_is_unreachable(tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="cannot use the location store") as info:
        Serve(tmp_path, free_port(), "--db",
              f"redis://:hidden-pw@127.0.0.1:{free_port()}/0")
    assert "hidden-pw" not in str(info.value)


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
def test_answered_registers_survive_serve_and_redis_sigkill(tmp_path: Path,
                                                            server: RedisServer) -> None:
    """serve is SIGKILLed mid-load, then Redis is too; Redis restarts from its append-only
    file, and every binding sipp got a 200 for is there."""
    port = free_port()
    answered = register_load_killed(tmp_path, port, "--db", server.url)
    server.restart()                                  # SIGKILL, then start on the same files

    async def stored() -> set[str]:
        store = RedisLocationStore(server.url)
        await store.open()
        aors = set(await store.aors())
        await store.close()
        return aors

    aors = asyncio.run(stored())
    missing = {u for u in answered if f"sip:{u}@{DOMAIN}" not in aors}
    assert not missing, f"{len(missing)} answered REGISTERs lost, e.g. {sorted(missing)[:5]}"
    again = Serve(tmp_path, port, "--db", server.url)
    try:
        user = max(answered)                          # among the last answered
        assert f"<sip:{user}@{HOST}:" in fetch_contacts(port, user)
    finally:
        assert again.close() == 0


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
def test_registered_through_one_node_called_through_another(tmp_path: Path,
                                                            server: RedisServer) -> None:
    """Node A takes the REGISTER, node B (another process, another port) routes the calls:
    sipp's calls through B all complete at the UAS that registered through A."""
    port_a, port_b, uas_port = free_port(), free_port(), free_port()
    node_a = Serve(tmp_path, port_a, "--db", server.url)
    node_b = Serve(tmp_path, port_b, "--db", server.url)
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", uas_port, 5)
        assert register(tmp_path, "register", port_a, "service", uas_port).returncode == 0
        uac = run_uac(tmp_path, "uac", port_b, "service", 5)
        finish(uas, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 5, node_b.log()[-3000:]
        assert successful(tmp_path, "uas") == 5
        assert "INVITE" in node_b.log() and "INVITE" not in node_a.log()
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert node_a.close() == 0
        assert node_b.close() == 0

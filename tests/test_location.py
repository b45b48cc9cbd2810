"""Location stores: the in-memory and SQLite stores behave the same; SQLite survives restarts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastsip
from fastsip.proxy.location import (
    Binding,
    LocationStore,
    LocationStoreError,
    MemoryLocationStore,
    SqliteLocationStore,
    aor_of,
    contact_key,
    open_store,
)

AOR = "sip:bob@example.com"


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LocationStore]:
    s: LocationStore
    if request.param == "memory":
        s = MemoryLocationStore()
    else:
        s = SqliteLocationStore(tmp_path / "loc.db")
    yield s
    s.close()


def test_aor_of_canonical() -> None:
    assert aor_of("sip:Bob@EXAMPLE.com:5070;transport=udp?x=y") == "sip:Bob@example.com"
    assert aor_of("SIPS:alice@Example.COM") == "sips:alice@example.com"
    assert aor_of("sip:example.com") == "sip:example.com"


def test_contact_key_follows_uri_equality() -> None:
    assert contact_key("sip:bob@HOST.example:5060") == contact_key("SIP:bob@host.example:5060")
    # A parameter only one side has and that 19.1.4 does not make significant is ignored...
    assert contact_key("sip:bob@h;ob") == contact_key("sip:bob@h")
    # ... but transport, and an explicit port, are part of the identity.
    assert contact_key("sip:bob@h;transport=tcp") != contact_key("sip:bob@h")
    assert contact_key("sip:bob@h:5060") != contact_key("sip:bob@h")
    assert contact_key("sip:Bob@h") != contact_key("sip:bob@h")


def test_put_lookup_order_and_expiry(store: LocationStore) -> None:
    store.put(Binding(AOR, "sip:bob@10.0.0.1", expires=200.0, q=0.5, registered_at=100.0))
    store.put(Binding(AOR, "sip:bob@10.0.0.2", expires=200.0, q=1.0, registered_at=90.0))
    store.put(Binding(AOR, "sip:bob@10.0.0.3", expires=200.0, q=0.5, registered_at=110.0))
    store.put(Binding(AOR, "sip:bob@10.0.0.4", expires=150.0, q=0.9, registered_at=120.0))
    order = [b.contact for b in store.lookup(AOR, 120.0)]
    assert order == ["sip:bob@10.0.0.2", "sip:bob@10.0.0.4", "sip:bob@10.0.0.3", "sip:bob@10.0.0.1"]
    # At 150 the fourth binding has expired: lookup hides it, bindings() still has it.
    assert "sip:bob@10.0.0.4" not in [b.contact for b in store.lookup(AOR, 150.0)]
    assert len(store.bindings(AOR)) == 4
    assert store.purge(150.0) == 1
    assert len(store.bindings(AOR)) == 3
    assert store.purge(1000.0) == 3
    assert store.aors() == []
    assert store.lookup(AOR, 0.0) == []


def test_put_replaces_equal_contact(store: LocationStore) -> None:
    store.put(Binding(AOR, "sip:bob@Host.example", expires=100.0, cseq=1))
    store.put(Binding(AOR, "sip:bob@host.example;ob", expires=300.0, cseq=2))
    (b,) = store.bindings(AOR)
    assert b.cseq == 2 and b.expires == 300.0 and b.contact == "sip:bob@host.example;ob"


def test_remove_remove_all_update_and_aors(store: LocationStore) -> None:
    other = "sip:alice@example.com"
    store.put(Binding(AOR, "sip:bob@a", expires=100.0))
    store.put(Binding(AOR, "sip:bob@b", expires=100.0))
    store.put(Binding(other, "sip:alice@c", expires=100.0))
    assert store.aors() == [other, AOR]
    store.remove(AOR, "sip:bob@A")
    assert [b.contact for b in store.bindings(AOR)] == ["sip:bob@b"]
    store.remove(AOR, "sip:nobody@x")  # removing what is not there is no error
    store.update(AOR, put=[Binding(AOR, "sip:bob@d", expires=100.0)], remove=["sip:bob@b"])
    assert [b.contact for b in store.bindings(AOR)] == ["sip:bob@d"]
    store.remove_all(AOR)
    assert store.aors() == [other]


def test_binding_fields_round_trip(store: LocationStore) -> None:
    b = Binding(
        AOR,
        "sip:bob@192.168.1.2:5060;transport=udp",
        expires=3700.5,
        q=0.7,
        call_id="abc@host",
        cseq=42,
        path=("<sip:edge1.example.com;lr>", "<sip:edge2.example.com;lr>"),
        source="udp:198.51.100.7:40000",
        instance="<urn:uuid:00000000-0000-1000-8000-000A95A0E128>",
        user_agent="softphone/1.0",
        registered_at=100.25,
    )
    store.put(b)
    assert store.lookup(AOR, 0.0) == [b]
    assert b.expires_in(3600.0) == 101


def test_sqlite_survives_reopen_and_purges(tmp_path: Path) -> None:
    path = tmp_path / "loc.db"
    s = SqliteLocationStore(path)
    s.put(Binding(AOR, "sip:bob@a", expires=1000.0, path=("<sip:p;lr>",), source="tcp:1.2.3.4:5"))
    s.put(Binding(AOR, "sip:bob@b", expires=50.0))
    s.close()
    again = open_store(f"sqlite:{path}")
    assert [b.contact for b in again.bindings(AOR)] == ["sip:bob@a", "sip:bob@b"]
    (live,) = again.lookup(AOR, 100.0)
    assert live.path == ("<sip:p;lr>",) and live.source == "tcp:1.2.3.4:5"
    assert again.purge(100.0) == 1
    again.close()
    third = SqliteLocationStore(path)
    assert [b.contact for b in third.bindings(AOR)] == ["sip:bob@a"]
    third.close()


def test_sqlite_binding_survives_sigkill(tmp_path: Path) -> None:
    """A committed write is on disk even when the process dies without closing the store."""
    db = tmp_path / "loc.db"
    script = textwrap.dedent(
        f"""
        import os, signal
        from fastsip.proxy.location import Binding, SqliteLocationStore
        s = SqliteLocationStore({str(db)!r})
        s.put(Binding({AOR!r}, "sip:bob@198.51.100.7:40000", expires=1e12, cseq=7))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    # cwd=tmp_path: `python -c` puts the cwd on sys.path, and the checkout's uncompiled
    # fastsip/ must not shadow the installed package.
    # The child imports the same fastsip this test run does (installed or built in place).
    env = dict(os.environ, PYTHONPATH=str(Path(fastsip.__file__).parent.parent))
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL
    s = SqliteLocationStore(db)
    (b,) = s.lookup(AOR, 0.0)
    assert b.contact == "sip:bob@198.51.100.7:40000" and b.cseq == 7
    s.close()


def test_open_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store("memory:"), MemoryLocationStore)
    assert isinstance(open_store("memory"), MemoryLocationStore)
    s = open_store(f"sqlite:///{tmp_path}/a.db".replace("////", "///"))
    assert isinstance(s, SqliteLocationStore) and Path(s.path) == tmp_path / "a.db"
    s.close()
    for bad in ("redis://x", "sqlite:", "postgres:x", ""):
        with pytest.raises(LocationStoreError, match="sqlite"):
            open_store(bad)
    with pytest.raises(ValueError):
        SqliteLocationStore(tmp_path / "b.db", synchronous="SOMETIMES")

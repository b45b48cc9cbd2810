"""Location stores that wait for a disk or a network, and :func:`open_store` for ``--db`` URLs.

The interface, :class:`~fastsip.proxy.location.LocationStore`, and the in-memory default live in
the sans-IO layer; the stores here own a file or a connection, so they belong to the shell.
Each one's ``update`` returns only when the change is durable where it was configured to be:
the registrar's 200 OK to a REGISTER is a promise that the binding survives a crash.

- ``memory:`` -- :class:`~fastsip.proxy.location.MemoryLocationStore` (the default; one process)
- ``sqlite:PATH`` -- :class:`~fastsip.asyncio.stores.sqlite.SqliteLocationStore` (one process;
  survives restarts)
- ``redis://[:PASSWORD@]HOST[:PORT][/DB]`` (``rediss://`` over TLS) -- shared by workers and
  nodes (fastsip's own client, no extra needed); the password may come from
  ``FASTSIP_REDIS_PASSWORD`` instead
- ``postgresql://[USER[:PASSWORD]@]HOST[:PORT]/DBNAME`` -- shared by workers and nodes (``pip
  install 'fastsip[postgresql]'``); libpq's ``PGPASSWORD``/``PGUSER``/... fill what the URL
  leaves out

A URL's password is never logged: :func:`redact` is what a log line shows.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastsip.asyncio.stores.sqlite import SqliteLocationStore
from fastsip.proxy.location import LocationStore, LocationStoreError, MemoryLocationStore

__all__ = ["SqliteLocationStore", "open_store", "redact"]

_SCHEMES = "'memory:', 'sqlite:PATH', 'redis://HOST[:PORT][/DB]' or 'postgresql://HOST/DBNAME'"


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and error messages).  The
    user information ends at the *last* ``@``: a password with an unencoded ``/`` or ``@``
    is hidden whole (at worst more than the password is)."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0 or ":" not in rest[:at]:
        return url
    return f"{scheme}://{rest[:at].split(':', 1)[0]}:***@{rest[at + 1:]}"


def _driver(module: str, extra: str, url: str) -> Any:
    """The store's client library, or a message that says which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise LocationStoreError(
            f"location store {redact(url)!r} needs the {module} package: "
            f"pip install 'fastsip[{extra}]'") from None


def open_store(url: str) -> LocationStore:
    """Open a location store from a ``--db`` URL (the module docstring lists them).  Networked
    stores connect on their first use, so this never waits; ``await store.open()`` connects
    and checks the store at start-up."""
    if url in ("memory", "memory:"):
        return MemoryLocationStore()
    if url.startswith("sqlite:"):
        path = url[len("sqlite:"):]
        if path.startswith("///"):
            path = path[2:]
        elif path.startswith("//"):
            raise LocationStoreError(
                f"location store URL {url!r}: use sqlite:PATH or sqlite:///ABS/PATH")
        if not path:
            raise LocationStoreError(
                f"location store URL {url!r} has no file path (use sqlite:PATH)")
        return SqliteLocationStore(path)
    scheme = url.split(":", 1)[0].lower()
    store: LocationStore
    if scheme in ("redis", "rediss"):
        from fastsip.asyncio.stores.redis import RedisLocationStore
        store = RedisLocationStore(url)
        return store
    if scheme in ("postgresql", "postgres"):
        _driver("asyncpg", "postgresql", url)
        from fastsip.asyncio.stores.postgres import PostgresLocationStore
        store = PostgresLocationStore(url)
        return store
    raise LocationStoreError(f"unknown location store URL {redact(url)!r}: expected {_SCHEMES}")

"""Fixtures shared by several test modules (helpers that are not fixtures live in the *util.py
modules beside this one)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from redisutil import RedisServer


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own on loopback, in its temporary directory: the shared
    store ``serve --workers`` needs."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()

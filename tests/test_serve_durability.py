"""A 200 OK to a REGISTER means the binding is durable (issue 12): ``fastsip serve`` over SQLite
is SIGKILLed in the middle of a sipp REGISTER load over thousands of distinct users, and every
binding sipp received its 200 for is in the file -- and served again after a restart.  (The
same run over Redis is in test_store_redis.py.)"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import DOMAIN, HOST, SIPP, Serve, fetch_contacts, register_load_killed

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed")


def test_sigkill_mid_register_load_keeps_every_answered_binding(tmp_path: Path) -> None:
    db = tmp_path / "loc.db"
    port = free_port()
    answered = register_load_killed(tmp_path, port, "--db", f"sqlite:{db}")
    con = sqlite3.connect(db)
    stored = {row[0] for row in con.execute("SELECT aor FROM bindings")}
    con.close()
    missing = {u for u in answered if f"sip:{u}@{DOMAIN}" not in stored}
    assert not missing, f"{len(missing)} answered REGISTERs lost, e.g. {sorted(missing)[:5]}"

    # Restarted on the same file, serve answers a fetch with the binding it had promised.
    again = Serve(tmp_path, port, "--db", f"sqlite:{db}")
    try:
        user = sorted(answered)[len(answered) // 2]
        assert f"<sip:{user}@{HOST}:" in fetch_contacts(port, user)
    finally:
        assert again.close() == 0

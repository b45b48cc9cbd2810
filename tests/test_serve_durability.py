"""A 200 OK to a REGISTER means the binding is durable (issue 12): ``fastsip serve`` over SQLite
is SIGKILLed in the middle of a sipp REGISTER load over thousands of distinct users, and every
binding sipp received its 200 for is in the file -- and served again after a restart."""

from __future__ import annotations

import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import DOMAIN, HOST, SIPP, Serve, finish, sip_exchange, sipp

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed")

USERS = 6000


def answered_users(message_file: Path) -> set[str]:
    """The users whose REGISTER got a 200, from a sipp -trace_msg file."""
    users = set()
    for block in message_file.read_text().split("----------------------------------------------- ")[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if "message received" in head and body.startswith("SIP/2.0 200"):
            to = re.search(r"^To:\s*<sip:([^@>]+)@", body, re.MULTILINE)
            assert to is not None, body
            users.add(to.group(1))
    return users


def test_sigkill_mid_register_load_keeps_every_answered_binding(tmp_path: Path) -> None:
    users = tmp_path / "users.csv"
    users.write_text("SEQUENTIAL\n" + "".join(f"u{n:05d}\n" for n in range(USERS)))
    db = tmp_path / "loc.db"
    port = free_port()
    # --rate-limit 0: one source sending a thousand REGISTERs a second is the point here.
    serve = Serve(tmp_path, port, "--db", f"sqlite:{db}", "--rate-limit", "0")
    load = sipp("register_users.xml", tmp_path, "load", f"{HOST}:{port}", "-inf", str(users),
                "-key", "domain", DOMAIN, "-r", "1000", "-m", str(USERS),
                "-p", str(free_port()), background=True, timeout=30)
    try:
        time.sleep(2.5)                               # in the middle of the load
        assert serve.proc.poll() is None, serve.log()
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(10)
        time.sleep(0.5)                               # answers already on the wire arrive
    finally:
        load.send_signal(signal.SIGTERM)              # sipp writes its message file and ends
        finish(load, 20)
        serve.close()
    answered = answered_users(tmp_path / "load.msg")
    # The kill landed mid-load: many were answered, and not all (else the test proves little).
    assert 300 <= len(answered) < USERS, len(answered)
    con = sqlite3.connect(db)
    stored = {row[0] for row in con.execute("SELECT aor FROM bindings")}
    con.close()
    missing = {u for u in answered if f"sip:{u}@{DOMAIN}" not in stored}
    assert not missing, f"{len(missing)} answered REGISTERs lost, e.g. {sorted(missing)[:5]}"

    # Restarted on the same file, serve answers a fetch with the binding it had promised.
    again = Serve(tmp_path, port, "--db", f"sqlite:{db}")
    try:
        user = sorted(answered)[len(answered) // 2]
        (reply,) = sip_exchange(port, (
            f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{{me}};branch=z9hG4bK-fetch\r\n"
            f"From: <sip:{user}@{DOMAIN}>;tag=f\r\nTo: <sip:{user}@{DOMAIN}>\r\n"
            "Call-ID: fetch-1\r\nCSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n"),
            full=True)
        assert reply.startswith("SIP/2.0 200"), reply
        assert f"<sip:{user}@{HOST}:" in reply, reply
    finally:
        assert again.close() == 0

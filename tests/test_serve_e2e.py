"""``fastsip serve`` with real peers on 127.0.0.1, each a separate process.

- sipp REGISTERs ``service@example.com`` (``tests/data/sipp/register.xml``) with a sipp UAS as
  its contact; sipp's UAC then calls ``service@example.com`` through serve and every call
  completes.  The UAS copies Record-Route and the UAC follows the route set
  (``uac_rr.xml``/``uas_rr.xml``), so the ACK and BYE come back through serve: the UAS sees
  serve's Via on top of the BYE, and the UAC's BYE carries serve's Route.
- a caller on TCP reaches a callee registered on UDP: two Record-Routes (RFC 5658), both in
  the caller's BYE.
- an unknown user gets 404; a request without Call-ID gets 400.
- ``--db sqlite:PATH``: after a SIGTERM and a restart, the binding is still there and the call
  still routes.
- ``--auth-users``: a REGISTER without credentials gets 401; sipp's ``[authentication]``
  (``register_auth.xml``) gets 200.
- a flood of malformed datagrams from one source does not stop serve answering a valid
  OPTIONS from another.

Skipped without sipp (Debian: ``apt-get install sip-tester``).  Loads stay small (a few calls
at 10 cps): CI machines are shared.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import needs_loopback_aliases
from procutil import free_port
from serveutil import (
    CALLS,
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    bye_messages,
    final_status,
    finish,
    register,
    request,
    run_uac,
    sip_exchange,
    start_uas,
    successful,
)

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Every process runs here: ``python -m`` puts its cwd on sys.path, and a checkout's
    uncompiled fastsip/ must not shadow the installed one."""
    return tmp_path


# -- the tests ---------------------------------------------------------------------------------


def test_register_then_calls_follow_the_route_set(workdir: Path) -> None:
    port, uas_port = free_port(), free_port()
    serve = Serve(workdir, port)
    uas = None
    try:
        uas = start_uas(workdir, "uas", uas_port, CALLS)
        reg = register(workdir, "register", port, "service", uas_port)
        assert reg.returncode == 0, serve.log()
        uac = run_uac(workdir, "uac", port, "service")
        uas_out = finish(uas, 30)
        assert uac.returncode == 0, (successful(workdir, "uac"), serve.log())
        assert successful(workdir, "uac") == CALLS
        assert uas.returncode == 0, uas_out[-2000:]
        assert successful(workdir, "uas") == CALLS
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    # The route set was honoured: the UAC sent its BYEs to the UAS's Contact with serve's
    # Route, and each reached the UAS with serve's Via on top -- the BYE went through serve.
    sent = bye_messages(workdir / "uac.msg", received=False)
    assert len(sent) >= CALLS
    assert all(f"Route: <sip:{HOST}:{port};lr" in b for b in sent), sent[0]
    assert all(b.startswith(f"BYE sip:{HOST}:{uas_port}") for b in sent), sent[0]
    got = bye_messages(workdir / "uas.msg", received=True)
    assert len(got) >= CALLS
    for bye in got:
        vias = [line for line in bye.splitlines() if line.lower().startswith(("via:", "v:"))]
        assert f"{HOST}:{port};branch=" in vias[0], bye
    log = serve.log()
    assert "method=REGISTER status=200 outcome=registered" in log
    assert log.count("method=INVITE status=200 outcome=answered") == CALLS
    assert "stopped" in log


def test_tcp_caller_to_udp_callee_double_record_route(workdir: Path) -> None:
    """The caller on TCP, the callee registered on UDP: serve records two routes (RFC 5658),
    one per side, and the caller's BYE carries both back through it."""
    port, uas_port = free_port(), free_port()
    serve = Serve(workdir, port, tcp=True)
    uas = None
    try:
        uas = start_uas(workdir, "uas", uas_port, 3)
        assert register(workdir, "register", port, "service", uas_port).returncode == 0
        uac = run_uac(workdir, "uac", port, "service", 3, "-t", "t1")
        finish(uas, 30)
        assert uac.returncode == 0 and successful(workdir, "uac") == 3, serve.log()
        assert uas.returncode == 0 and successful(workdir, "uas") == 3
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    sent = bye_messages(workdir / "uac.msg", received=False)
    assert sent and all(
        f"Route: <sip:{HOST}:{port};transport=tcp;lr>, <sip:{HOST}:{port};lr>" in b
        for b in sent), sent[0]


def test_unknown_user_404_and_malformed_400(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port)
    try:
        lines = sip_exchange(port, request("INVITE", f"sip:nobody@{DOMAIN}", call_id="u1"))
        assert final_status(lines) == 404, lines
        lines = sip_exchange(port, request("OPTIONS", f"sip:nobody@{DOMAIN}", call_id="m1",
                                           omit=["Call-ID"]))
        assert final_status(lines) == 400, lines
        lines = sip_exchange(port, request("OPTIONS", f"sip:{HOST}:{port}", call_id="o1"))
        assert final_status(lines) == 200, lines
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert "method=INVITE status=404 outcome=rejected" in log
    assert "to=sip:nobody@example.com" in log


def test_sqlite_binding_survives_restart(workdir: Path) -> None:
    port, uas_port = free_port(), free_port()
    db = f"sqlite:{workdir / 'location.db'}"
    serve = Serve(workdir, port, "--db", db)
    try:
        reg = register(workdir, "register", port, "service", uas_port)
        assert reg.returncode == 0, serve.log()
    finally:
        assert serve.close() == 0
    serve = Serve(workdir, port, "--db", db)
    uas = None
    try:
        uas = start_uas(workdir, "uas", uas_port, 2)
        uac = run_uac(workdir, "uac", port, "service", calls=2)
        finish(uas, 30)
        assert uac.returncode == 0 and successful(workdir, "uac") == 2, serve.log()
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0


def test_digest_authentication_with_sipp(workdir: Path) -> None:
    port = free_port()
    users = workdir / "users.txt"
    users.write_text("# user:password\nalice:s3cret\n")
    # sipp 3.6 answers only the first challenge and knows MD5 only: serve's default (MD5
    # first, SHA-256 offered too) must work with it as it is.
    serve = Serve(workdir, port, "--auth-users", str(users))
    try:
        # Without credentials: challenged.
        lines = sip_exchange(port, request(
            "REGISTER", f"sip:{DOMAIN}", call_id="r1",
            headers=[f"Contact: <sip:alice@{HOST}:5999>", "Expires: 60"]))
        assert final_status(lines) == 401, lines
        # sipp answers the challenge ([authentication]) and is accepted.
        reg = register(workdir, "register_auth", port, "alice", 5999, "-au", "alice",
                       "-ap", "s3cret", "-auth_uri", DOMAIN, scenario="register_auth.xml")
        assert reg.returncode == 0, serve.log()
        # A wrong password is not.
        bad = register(workdir, "register_bad", port, "alice", 5999, "-au", "alice",
                       "-ap", "wrong", "-auth_uri", DOMAIN, scenario="register_auth.xml")
        assert bad.returncode != 0
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert "method=REGISTER status=401 outcome=challenged" in log
    assert "method=REGISTER status=200 outcome=registered" in log


@needs_loopback_aliases
def test_malformed_flood_does_not_stop_service(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port)
    garbage = [
        b"\x00\xff" * 200,
        b"INVITE sip:x SIP/2.0\r\nVia: nonsense\r\n\r\n",
        b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060\r\n\r\n",
        b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: 99999\r\n\r\n",
        b"REGISTER sip:example.com SIP/2.0\r\n" + b"X: y\r\n" * 2000 + b"\r\n",
        b"\r\n\r\n",
    ]
    try:
        # From another loopback address: past its rate (100/s, burst 400) the flooding
        # address is banned and dropped, which must not touch the prober on 127.0.0.1.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
            flood.bind(("127.0.0.2", 0))
            for i in range(3000):
                try:
                    flood.sendto(garbage[i % len(garbage)], (HOST, port))
                except OSError:
                    pass  # loopback buffer full: the flood only has to be a flood
        started = time.monotonic()
        lines = sip_exchange(port, request("OPTIONS", f"sip:{HOST}:{port}", call_id="after"),
                             timeout=10)
        assert final_status(lines) == 200, lines
        # The flood is bounded by the socket buffer and dropped as it is read: a retransmission
        # or two at most, not a backlog of seconds.
        assert time.monotonic() - started < 3.0
        assert serve.proc.poll() is None
    finally:
        assert serve.close() == 0

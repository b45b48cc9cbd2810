"""``fastsip serve`` as a process, without sipp: refusing to start on bad input (exit 2), and
the stop on SIGTERM or SIGINT -- new initial requests get 503 while a transaction in flight is
given ``--grace`` seconds, then the server exits 0 and says what it abandoned -- on uvloop and
on plain asyncio (``--loop asyncio``)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procutil import fastsip_env, free_port
from serveutil import DOMAIN, HOST, Serve, final_status, register_request, request, sip_exchange


def serve_exit(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsip.cli", "serve", *args], cwd=workdir, env=fastsip_env(),
        capture_output=True, text=True, timeout=30, check=False)


def test_refuses_to_start_on_bad_input(tmp_path: Path) -> None:
    port = free_port()
    listen = ["--listen", f"udp:{HOST}:{port}"]
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    r = serve_exit(tmp_path, *listen, "--routes", str(broken))
    assert r.returncode == 2 and "cannot load routes" in r.stderr, r.stderr
    r = serve_exit(tmp_path, *listen, "--db", "mysql://nope")
    assert r.returncode == 2 and "--db" in r.stderr, r.stderr
    r = serve_exit(tmp_path, *listen, "--auth-users", str(tmp_path / "missing.txt"))
    assert r.returncode == 2 and "--auth-users" in r.stderr, r.stderr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind((HOST, 0))
        taken = busy.getsockname()[1]
        r = serve_exit(tmp_path, "--listen", f"udp:{HOST}:{taken}")
    # The system refused a good command line: 1, not a usage error (test_serve_operator.py).
    assert r.returncode == 1 and f"cannot listen on udp:{HOST}:{taken}:" in r.stderr, r.stderr
    r = serve_exit(tmp_path, "--listen", "carrier-pigeon:1.2.3.4:5")
    assert r.returncode == 2 and "'carrier-pigeon:1.2.3.4:5'" in r.stderr, r.stderr


try:
    import uvloop  # noqa: F401
    DEFAULT_LOOP = "uvloop"
except ImportError:  # pragma: no cover - a dependency wherever it builds
    DEFAULT_LOOP = "asyncio"


@pytest.mark.parametrize(("stop_signal", "loop", "loop_logged"), [
    (signal.SIGTERM, "auto", DEFAULT_LOOP),
    (signal.SIGINT, "asyncio", "asyncio"),
], ids=["SIGTERM", "SIGINT-asyncio"])
def test_signal_drains_then_stops(tmp_path: Path, stop_signal: signal.Signals, loop: str,
                                  loop_logged: str) -> None:
    port = free_port()
    serve = Serve(tmp_path, port, "--loop", loop)  # --grace 2
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as callee:
            # bob's phone: takes the INVITE and never answers (serve keeps the transaction).
            callee.bind((HOST, 0))
            callee.settimeout(5)
            contact = f"sip:bob@{HOST}:{callee.getsockname()[1]}"
            lines = sip_exchange(port, register_request(
                "bob", "reg", f"Contact: <{contact}>", "Expires: 600"))
            assert final_status(lines) == 200, lines
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as caller:
                caller.bind((HOST, 0))
                invite = request("INVITE", f"sip:bob@{DOMAIN}", call_id="inflight")
                caller.sendto(invite.replace("{me}", str(caller.getsockname()[1])).encode(),
                              (HOST, port))
                assert callee.recv(65535).startswith(b"INVITE sip:bob@")
                started = time.monotonic()
                serve.proc.send_signal(stop_signal)
                time.sleep(0.3)
                lines = sip_exchange(port, request("INVITE", f"sip:bob@{DOMAIN}",
                                                   call_id="late"))
                assert final_status(lines) == 503, lines
                serve.proc.wait(15)
                assert serve.proc.returncode == 0
                # It waited for the transaction in flight, but no longer than --grace.
                assert 1.5 < time.monotonic() - started < 6
    finally:
        serve.close()
    log = serve.log()
    assert f"event loop {loop_logged} (" in log, log
    assert "stopping: draining 1 transaction(s)" in log, log
    assert "method=INVITE status=- outcome=abandoned" in log and "call_id=inflight" in log
    assert "method=INVITE status=503 outcome=unavailable" in log and "call_id=late" in log
    assert "stopped " in log

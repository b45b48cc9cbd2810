"""The operator's surface of ``fastsip serve``, on real processes: ``--version`` and ``--help``,
errors at start that name the address or file (a port taken by a socket of ours), the
``cancelled`` and ``unanswered`` outcome words with sipp callers and callees (the caller's
CANCEL; ``--ring-timeout`` running out: 408 upstream, CANCEL downstream), and the registrar's
``--min-expires`` / ``--max-expires`` / ``--default-expires``."""

from __future__ import annotations

import platform
import re
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procutil import fastsip_env, free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    final_status,
    finish,
    register,
    register_request,
    sip_exchange,
    sipp,
    successful,
)

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")


def fastsip(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsip", *args], cwd=workdir, env=fastsip_env(),
        capture_output=True, text=True, timeout=30, check=False)


# -- --version, --help ---------------------------------------------------------------------


def test_version(tmp_path: Path) -> None:
    r = fastsip(tmp_path, "--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"fastsip {version('fastsip')} (Python {platform.python_version()})\n"


def test_help_leads_with_serve(tmp_path: Path) -> None:
    r = fastsip(tmp_path, "--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "registrar" in out.split("positional arguments")[0]  # the description says what
    # The command list: serve first, each with its one-line description.
    commands = re.findall(r"^    (\w+) +(\S.*)$", out, re.MULTILINE)
    assert [name for name, _ in commands] == ["serve", "media", "answer", "call"], out
    assert all(text for _, text in commands)
    assert "  fastsip serve --domain example.com\n" in out.split("examples:")[1]
    serve_help = fastsip(tmp_path, "serve", "--help").stdout
    for option in ("--ring-timeout", "--min-expires", "--max-expires", "--default-expires"):
        assert option in serve_help
    assert "exit status:" in serve_help


# -- errors at start name what is wrong ----------------------------------------------------


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    """serve's complaint: a single stderr line (besides INFO log lines), never a traceback."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_port_in_use_names_the_address(tmp_path: Path, proto: str) -> None:
    kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as busy:
        busy.bind((HOST, 0))
        if proto == "tcp":
            busy.listen()
        port = busy.getsockname()[1]
        # The taken address is the second listener: the message must say which one failed.
        r = fastsip(tmp_path, "serve", "--listen", f"udp:{HOST}:{free_port()}",
                    "--listen", f"{proto}:{HOST}:{port}", "--domain", DOMAIN)
    assert r.returncode == 1, r.stderr
    line = one_line(r)
    assert line.startswith(f"fastsip serve: cannot listen on {proto}:{HOST}:{port}: "), line
    assert "in use" in line.lower(), line


def test_other_start_errors_name_the_thing(tmp_path: Path) -> None:
    listen = ["--listen", f"udp:{HOST}:{free_port()}"]
    r = fastsip(tmp_path, "serve", "--listen", "udp:127.0.0.1:99999")
    assert r.returncode == 2
    assert "'udp:127.0.0.1:99999'" in one_line(r) and "port" in one_line(r)
    r = fastsip(tmp_path, "serve", *listen, "--db", f"sqlite:{tmp_path}")  # a directory
    assert r.returncode == 2
    assert f"--db sqlite:{tmp_path}" in one_line(r)
    routes = tmp_path / "routes.py"
    routes.write_text("x = 1\nundefined_name\n")
    r = fastsip(tmp_path, "serve", *listen, "--routes", str(routes))
    assert r.returncode == 2
    assert one_line(r) == (f"fastsip serve: cannot load routes from {routes}: NameError: "
                           "name 'undefined_name' is not defined (line 2)")
    r = fastsip(tmp_path, "serve", *listen, "--routes", str(tmp_path / "missing.py"))
    assert r.returncode == 2 and "missing.py: no such file" in one_line(r)
    users = tmp_path / "users.txt"
    users.write_text("alice\n")
    r = fastsip(tmp_path, "serve", *listen, "--auth-users", str(users))
    assert r.returncode == 2 and f"{users}:1:" in one_line(r)
    r = fastsip(tmp_path, "serve", *listen, "--min-expires", "600", "--max-expires", "300")
    assert r.returncode == 2
    assert "--min-expires 600" in one_line(r) and "--max-expires 300" in one_line(r)
    r = fastsip(tmp_path, "serve", *listen, "--ring-timeout", "0")
    assert r.returncode == 2 and "--ring-timeout" in r.stderr


# -- outcome words: cancelled, unanswered ----------------------------------------------------


def ringing_call(tmp_path: Path, serve: Serve, caller: str) -> tuple[int, int]:
    """bob's phone rings until cancelled (sipp uas_ring_cancel.xml) and is registered; alice
    calls bob with ``caller`` (a sipp UAC scenario).  Returns (caller's, callee's) number of
    successful calls."""
    uas_port = free_port()
    uas = sipp("uas_ring_cancel.xml", tmp_path, "bob", "-p", str(uas_port), "-m", "1",
               background=True, timeout=40)
    try:
        reg = register(tmp_path, "reg", serve.port, "bob", uas_port)
        assert reg.returncode == 0, reg.stdout
        sipp(caller, tmp_path, "alice", f"{HOST}:{serve.port}", "-p", str(free_port()),
             "-m", "1", "-s", "bob", "-key", "domain", DOMAIN, "-key", "caller", "alice",
             timeout=30)
    finally:
        finish(uas, 40)
    return successful(tmp_path, "alice"), successful(tmp_path, "bob")


@needs_sipp
def test_caller_cancel_is_logged_cancelled(tmp_path: Path) -> None:
    serve = Serve(tmp_path, free_port())
    try:
        caller_ok, callee_ok = ringing_call(tmp_path, serve, "uac_cancel.xml")
    finally:
        assert serve.close() == 0
    log = serve.log()
    # alice got 200 for her CANCEL and 487 for the INVITE; bob's phone got the CANCEL.
    assert (caller_ok, callee_ok) == (1, 1), log
    (line,) = [x for x in log.splitlines() if "request method=INVITE" in x]
    assert "status=487 outcome=cancelled" in line, line
    stopped = next(x for x in log.splitlines() if " stopped " in x)
    assert "cancelled=1" in stopped and "rejected" not in stopped, stopped


@needs_sipp
def test_ring_timeout_cancels_callee_and_gives_caller_408(tmp_path: Path) -> None:
    serve = Serve(tmp_path, free_port(), "--ring-timeout", "2")
    try:
        caller_ok, callee_ok = ringing_call(tmp_path, serve, "uac_unanswered.xml")
    finally:
        assert serve.close() == 0
    log = serve.log()
    # alice got 408 (uac_unanswered.xml fails on anything else, a 487 included); bob's phone
    # got the proxy's CANCEL and answered it.
    assert (caller_ok, callee_ok) == (1, 1), log
    (line,) = [x for x in log.splitlines() if "request method=INVITE" in x]
    assert "status=408 outcome=unanswered" in line, line
    # Not before the ring timeout (an upper bound would only measure the machine's load).
    assert float(re.search(r"duration_ms=([\d.]+)", line)[1]) >= 2000  # type: ignore[index]
    assert "ring_timeout=2s" in log
    stopped = next(x for x in log.splitlines() if " stopped " in x)
    assert "unanswered=1" in stopped and "cancelled" not in stopped, stopped


# -- registration intervals ------------------------------------------------------------------


def register_once(port: int, call_id: str, *headers: str) -> str:
    """A REGISTER for bob over UDP; returns the final response (whole text)."""
    message = register_request("bob", call_id, f"Contact: <sip:bob@{HOST}:5999>", *headers)
    responses = sip_exchange(port, message, full=True)
    assert final_status(responses) is not None, responses
    return responses[-1]


def contact_expires(response: str) -> int:
    match = re.search(r"^Contact: <sip:bob@127\.0\.0\.1:5999>;expires=(\d+)", response,
                      re.MULTILINE)
    assert match is not None, response
    return int(match[1])


def test_registration_intervals(tmp_path: Path) -> None:
    serve = Serve(tmp_path, free_port(), "--min-expires", "120", "--max-expires", "600",
                  "--default-expires", "300")
    try:
        # Shorter than --min-expires: 423 with the minimum we accept.
        brief = register_once(serve.port, "brief", "Expires: 30")
        assert brief.startswith("SIP/2.0 423 "), brief
        assert re.search(r"^Min-Expires: 120\r$", brief, re.MULTILINE), brief
        # Longer than --max-expires: granted, shortened to the maximum in the 200.
        long = register_once(serve.port, "long", "Expires: 7200")
        assert long.startswith("SIP/2.0 200 "), long
        assert 595 <= contact_expires(long) <= 600
        # No interval asked: --default-expires.
        default = register_once(serve.port, "default")
        assert default.startswith("SIP/2.0 200 "), default
        assert 295 <= contact_expires(default) <= 300
        # 0 is a removal, never "too brief".
        removal = register_once(serve.port, "removal", "Expires: 0")
        assert removal.startswith("SIP/2.0 200 ") and "Contact:" not in removal, removal
    finally:
        assert serve.close() == 0
    assert "expires=120..600s (default 300s)" in serve.log()

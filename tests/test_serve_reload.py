"""``fastsip serve`` reloads on SIGHUP (``docs/config.md``), with real processes on 127.0.0.1.

- Under load: sipp places calls at a steady rate through serve, whose routes module relays
  every INVITE to sipp UAS A; mid-run the module is replaced by one relaying to UAS B and
  serve gets SIGHUP.  Every call completes (sipp: successful == placed, 0 failed), the calls
  before the reload reached A and every call after it B.
- A call in flight keeps the routes it started with: its failure hook is the old module's,
  though the new one is in place when the failure comes.
- A reload that fails changes nothing and says why in one line: a routes module with a syntax
  error, a TOML syntax error, a missing credentials file.  A changed ``listen`` is logged as
  needing a restart and serving goes on; ``log_level`` changes at once.
- A changed credentials file: the new password works, the old one no longer.
- ``trusted`` and ``alias`` change at once (the relay policy, "is this host us").
- ``--workers 2``: SIGHUP to the supervisor reloads every worker.

Skipped without sipp where sipp is used (Debian: ``apt-get install sip-tester``).
"""

from __future__ import annotations

import csv
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import needs_loopback_aliases
from procutil import free_port, posix_only
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    final_status,
    finish,
    register,
    request,
    run_uac,
    sip_exchange,
    sipp,
    start_uas,
)

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Every process runs here (``python -m`` puts its cwd on sys.path: a checkout's
    uncompiled fastsip/ must not shadow the installed one)."""
    return tmp_path


def relay_routes(port: int) -> str:
    """A routes module relaying every INVITE to the UAS on ``port`` (vouched for: the
    relay policy would otherwise refuse a destination that is not a registered contact)."""
    return (
        "from fastsip.app import route\n\n\n"
        "@route\n"
        "def initial(req):\n"
        "    if req.method == 'INVITE':\n"
        "        req.trusted = True\n"
        f"        return req.relay(to=f'sip:{{req.uri.user}}@{HOST}:{port}')\n"
        "    return None\n")


def reply_routes(status: int, reason: str) -> str:
    """A routes module answering every INVITE itself."""
    return (
        "from fastsip.app import route\n\n\n"
        "@route\n"
        "def initial(req):\n"
        "    if req.method == 'INVITE':\n"
        f"        return req.reply({status}, {reason!r})\n"
        "    return None\n")


def write(path: Path, text: str) -> None:
    """Replace ``path`` at once (a reload must never see half a file): write beside, rename."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    tmp.replace(path)


def reload(serve: Serve, expect: str, timeout: float = 10.0) -> str:
    """SIGHUP serve and wait until its log has one more line containing ``expect`` (the
    reload's result); returns that line."""
    before = serve.log().count(expect)
    serve.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = serve.log()
        if log.count(expect) > before:
            return [line for line in log.splitlines() if expect in line][-1]
        assert serve.proc.poll() is None, log[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"no {expect!r} after SIGHUP:\n{serve.log()[-3000:]}")


def invite(port: int, user: str, call_id: str) -> int | None:
    return final_status(sip_exchange(port, request("INVITE", f"sip:{user}@{DOMAIN}",
                                                   call_id=call_id)))


def stats(workdir: Path, name: str) -> dict[str, str]:
    rows = list(csv.reader((workdir / f"{name}.csv").read_text().splitlines(), delimiter=";"))
    return dict(zip(rows[0], rows[-1])) if len(rows) > 1 else {}


def invites_received(message_file: Path) -> set[int]:
    """The call numbers (sipp's Call-ID is ``NUMBER-PID@HOST``) of the INVITEs in a sipp
    -trace_msg file that were received."""
    numbers = set()
    separator = "----------------------------------------------- "
    for block in message_file.read_text().split(separator)[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if "message received" in head and body.startswith("INVITE "):
            found = re.search(r"^(?:Call-ID|i):\s*(\d+)-", body, re.MULTILINE | re.IGNORECASE)
            assert found is not None, body
            numbers.add(int(found.group(1)))
    return numbers


def stop_sipp(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)   # sipp writes its files and ends
    finish(proc, 20)


# -- the tests ---------------------------------------------------------------------------------


@needs_sipp
def test_reload_routes_under_load_drops_no_call(workdir: Path) -> None:
    calls, rate = 50, 10
    port, uas_a, uas_b = free_port(), free_port(), free_port()
    routes = workdir / "routes.py"
    routes.write_text(relay_routes(uas_a))
    # --rate-limit 0: one sipp sends everything; the load is the point, not the edge.
    serve = Serve(workdir, port, "--routes", str(routes), "--rate-limit", "0")
    a = start_uas(workdir, "uas_a", uas_a, 1000, timeout=60)
    b = start_uas(workdir, "uas_b", uas_b, 1000, timeout=60)
    try:
        # Each call holds 1 s (sipp's <pause/>): ~10 calls are mid-dialog at any time, and
        # their ACKs and BYEs must still find their way while the routes change.
        uac = run_uac(workdir, "uac", port, "service", calls, "-d", "1000", rate=rate,
                      timeout=60, background=True)
        time.sleep(2.0)
        assert uac.poll() is None, "the load ended before the reload"
        write(routes, relay_routes(uas_b))
        line = reload(serve, "reloaded")
        assert "routes=" in line
        finish(uac, 60)
        assert uac.returncode == 0, (stats(workdir, "uac"), serve.log()[-3000:])
    finally:
        for proc in (a, b):
            stop_sipp(proc)
        assert serve.close() == 0
    result = stats(workdir, "uac")
    assert int(result["SuccessfulCall(C)"]) == calls, result
    assert int(result["FailedCall(C)"]) == 0, result
    at_a = invites_received(workdir / "uas_a.msg")
    at_b = invites_received(workdir / "uas_b.msg")
    assert at_a and at_b, (at_a, at_b)
    assert len(at_a) + len(at_b) == calls and not at_a & at_b
    # The swap is one step: every call placed before it went to A, every one after it to B.
    assert max(at_a) < min(at_b), (sorted(at_a), sorted(at_b))
    assert "reload failed" not in serve.log()


_SLOW_FAILURE = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="rings, then busy">
  <recv request="INVITE"/>
  <send><![CDATA[

      SIP/2.0 180 Ringing
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

  ]]></send>
  <pause milliseconds="2000"/>
  <send><![CDATA[

      SIP/2.0 486 Busy Here
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

  ]]></send>
  <recv request="ACK"/>
</scenario>
"""


def failure_routes(port: int, status: int) -> str:
    """Relays INVITEs to ``port``; its failure hook answers ``status`` instead of the failure."""
    return relay_routes(port) + (
        "\n\nfrom fastsip.app import on_failure\n\n\n"
        "@on_failure\n"
        "def failed(req, best):\n"
        f"    return req.reply({status}, 'Failure Hook {status}')\n")


@needs_sipp
def test_call_in_flight_keeps_the_routes_it_started_with(workdir: Path) -> None:
    port, uas_port = free_port(), free_port()
    scenario = workdir / "slow_busy.xml"
    scenario.write_text(_SLOW_FAILURE)
    routes = workdir / "routes.py"
    routes.write_text(failure_routes(uas_port, 603))
    serve = Serve(workdir, port, "--routes", str(routes))
    uas = sipp(str(scenario), workdir, "uas", "-p", str(uas_port), "-m", "2",
               background=True, timeout=30)
    try:
        result: list[int | None] = []
        caller = threading.Thread(target=lambda: result.append(invite(port, "bob", "flight")))
        caller.start()
        time.sleep(0.8)                        # ringing: the INVITE is in flight
        write(routes, failure_routes(uas_port, 600))
        reload(serve, "reloaded")
        caller.join(15)
        # The old module's failure hook answered: the request kept its routes.
        assert result == [603], (result, serve.log()[-3000:])
        # A new request takes the new module.
        assert invite(port, "bob", "after") == 600
    finally:
        stop_sipp(uas)
        assert serve.close() == 0


def test_bad_reloads_keep_the_running_config(workdir: Path) -> None:
    port = free_port()
    conf_dir = workdir / "conf"
    conf_dir.mkdir()
    routes = conf_dir / "routes.py"
    routes.write_text(reply_routes(480, "Old Routes"))
    config = conf_dir / "fastsip.toml"
    good = (f'[serve]\nlisten = ["udp:{HOST}:{port}"]\ndomain = ["{DOMAIN}"]\n'
            'routes = "routes.py"\nlog_level = "warning"\n')
    config.write_text(good)
    # Everything from the file (a --listen on the command line would win over its listen).
    serve = Serve(workdir, port, command=[sys.executable, "-m", "fastsip.cli", "serve",
                                          "--config", str(config)])
    try:
        assert invite(port, "bob", "c1") == 480
        # A routes module with a syntax error: the old one stays, and the log says why.
        write(routes, "from fastsip.app import route\n\ndef broken(:\n")
        line = reload(serve, "reload failed")
        assert "routes.py" in line and "SyntaxError" in line and "line 3" in line, line
        assert invite(port, "bob", "c2") == 480
        write(routes, reply_routes(480, "Old Routes"))
        # A TOML syntax error: the file and its line.
        write(config, good + "grace = \n")
        line = reload(serve, "reload failed")
        assert f"{config}:6: TOML syntax error" in line, line
        # A bad value: the key and its line.
        write(config, good.replace('log_level = "warning"', 'log_level = "loud"'))
        line = reload(serve, "reload failed")
        assert f"{config}:5: log_level: 'loud' is not one of" in line, line
        # A missing credentials file.
        write(config, good + 'auth_users = "nowhere.txt"\n')
        line = reload(serve, "reload failed")
        assert "nowhere.txt" in line and "auth_users" in line, line
        assert invite(port, "bob", "c3") == 480
        log = serve.log()
        assert "Traceback" not in log
        # (at log_level warning no request line is written)
        assert "method=INVITE" not in log
        # listen changed: needs a restart (and serving goes on); log_level and the routes
        # change at once.
        write(routes, reply_routes(486, "New Routes"))
        write(config, good.replace(str(port), str(free_port()))
              .replace('log_level = "warning"', 'log_level = "info"'))
        line = reload(serve, "takes a restart")
        assert "listen changed" in line, line
        assert invite(port, "bob", "c4") == 486
        serve.wait_log("method=INVITE status=486")
    finally:
        assert serve.close() == 0
    assert serve.log().count("reload failed") == 4


@needs_sipp
def test_reload_credentials(workdir: Path) -> None:
    port = free_port()
    users = workdir / "users.txt"
    users.write_text("alice:old-secret\n")
    serve = Serve(workdir, port, "--auth-users", str(users))

    def register_with(password: str, name: str) -> int:
        proc = register(workdir, name, port, "alice", 5999, "-au", "alice", "-ap", password,
                        "-auth_uri", DOMAIN, scenario="register_auth.xml")
        return proc.returncode

    try:
        assert register_with("old-secret", "reg1") == 0, serve.log()[-2000:]
        write(users, "alice:new-secret\n")
        assert "auth=1 users" in reload(serve, "reloaded")
        assert register_with("new-secret", "reg2") == 0, serve.log()[-2000:]
        assert register_with("old-secret", "reg3") != 0
        # The credentials file gone: the reload fails and the running credentials stay.
        users.unlink()
        line = reload(serve, "reload failed")
        assert "users.txt" in line, line
        assert register_with("new-secret", "reg4") == 0, serve.log()[-2000:]
    finally:
        assert serve.close() == 0


@pytest.mark.skipif(not shutil.which("redis-server"), reason="no redis-server (workers share "
                    "a Redis location store)")
def test_workers_reload_on_the_supervisors_sighup(workdir: Path) -> None:
    from redisutil import RedisServer

    from fastsip.asyncio.workers import reuse_port_supported
    from fastsip.transport.rules import call_id_shard

    if not reuse_port_supported():
        pytest.skip("needs Linux SO_REUSEPORT")
    redis = RedisServer(workdir / "redis")
    port = free_port()
    routes = workdir / "routes.py"
    routes.write_text(reply_routes(480, "Old Routes"))
    # Call-IDs owned by each worker (crc32(Call-ID) % 2), so both must have reloaded.
    ids = [f"w{n}" for n in range(40)]
    by_worker = {w: [i for i in ids if call_id_shard(f"{i}@{HOST}", 2) == w][:2] for w in (0, 1)}
    assert all(len(v) == 2 for v in by_worker.values())
    serve = Serve(workdir, port, "--workers", "2", "--db", redis.url, "--routes", str(routes))
    try:
        for call_ids in by_worker.values():
            assert [invite(port, "bob", i + "a") for i in call_ids] == [480, 480]
        write(routes, reply_routes(486, "New Routes"))
        serve.proc.send_signal(signal.SIGHUP)     # to the supervisor only
        deadline = time.monotonic() + 10
        while serve.log().count("reloaded") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serve.log().count("reloaded") == 2, serve.log()[-3000:]
        for call_ids in by_worker.values():
            assert [invite(port, "bob", i) for i in call_ids] == [486, 486]
    finally:
        assert serve.close() == 0
        redis.stop()


@posix_only("SIGHUP (the reload signal) does not exist on Windows")
def test_sighup_while_starting_and_a_slow_reload(workdir: Path) -> None:
    """A SIGHUP while serve starts does not kill it (SIGHUP's default action): it reloads
    once serving.  The reload imports the routes module off the event loop: while a slow
    module loads, requests are still answered."""
    from procutil import fastsip_env

    port = free_port()
    marker = workdir / "importing"
    routes = workdir / "routes.py"
    routes.write_text(f"import pathlib, time\npathlib.Path({str(marker)!r}).touch()\n"
                      "time.sleep(1.5)\n" + reply_routes(480, "Slow Routes"))
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{port}",
             "--domain", DOMAIN, "--routes", str(routes), "--grace", "1"],
            cwd=workdir, env=fastsip_env(), stdout=subprocess.PIPE, stderr=log_file,
            stdin=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists()
        marker.unlink()
        proc.send_signal(signal.SIGHUP)          # serve is importing the routes: starting
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening on")
        # The reload runs now, importing the module again (1.5 s): serve answers meanwhile.
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), log_path.read_text()
        started = time.monotonic()
        assert invite(port, "bob", "during") == 480
        assert time.monotonic() - started < 1.0
        while "reloaded" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reloaded" in log_path.read_text()
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        if proc.stdout is not None:
            proc.stdout.close()


@needs_loopback_aliases
def test_reload_trusted_and_alias(workdir: Path) -> None:
    """``trusted`` and ``alias`` change at once: a foreign destination refused to an untrusted
    source is relayed once the source is trusted; a host that was foreign is ours once it is
    an alias."""
    port = free_port()
    config = workdir / "fastsip.toml"
    base = f'[serve]\nlisten = ["udp:{HOST}:{port}"]\ndomain = ["{DOMAIN}"]\ngrace = 1\n'
    config.write_text(base)
    serve = Serve(workdir, port, command=[sys.executable, "-m", "fastsip.cli", "serve",
                                          "--config", str(config)])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.2", 0))
        peer.settimeout(5)
        foreign = f"sip:bob@127.0.0.2:{peer.getsockname()[1]}"
        try:
            # Not ours, from an untrusted source: no relay.
            assert final_status(sip_exchange(port, request("INVITE", foreign,
                                                           call_id="t1"))) == 403
            # pbx.example.net is another domain: also refused.
            alias_uri = "sip:bob@pbx.example.net"
            assert final_status(sip_exchange(port, request("INVITE", alias_uri,
                                                           call_id="a1"))) == 403
            config.write_text(base + f'trusted = ["{HOST}/32"]\nalias = ["pbx.example.net"]\n')
            line = reload(serve, "reloaded")
            assert f"trusted={HOST}/32" in line and "aliases=pbx.example.net" in line, line
            # Trusted now: relayed to the foreign destination.
            sip_exchange(port, request("INVITE", foreign, call_id="t2"), want_final=False,
                         timeout=1)
            relayed = peer.recv(65535).decode()
            assert relayed.startswith(f"INVITE {foreign} SIP/2.0"), relayed
            # An alias now: ours, and nobody is registered there.
            assert final_status(sip_exchange(port, request("INVITE", alias_uri,
                                                           call_id="a2"))) == 404
        finally:
            assert serve.close() == 0

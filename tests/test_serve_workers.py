"""``fastsip serve --workers 2`` with sipp: every call of a load sent from one socket completes,
under 5% loss too (CANCEL, ACK, responses and retransmissions reach the worker that holds the
call), the calls spread over both workers; a worker SIGKILLed mid-load is started again and
the only calls that fail are those it held.  And the combinations that cannot work are refused
with the reason.  (A Redis server, started here, is the shared location store.)"""

from __future__ import annotations

import csv
import os
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procutil import free_port
from redisutil import RedisServer
from serveutil import SIPP, Serve, finish, register, run_uac, start_uas, successful

from fastsip.asyncio.workers import reuse_port_supported
from fastsip.transport.rules import call_id_shard

pytestmark = [
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed"),
    pytest.mark.skipif(not reuse_port_supported(), reason="needs Linux SO_REUSEPORT"),
]


def workers_serve(tmp_path: Path, port: int, redis: RedisServer, *extra: str,
                  listen: Sequence[str] = ()) -> Serve:
    """``serve --workers 2`` on a shared Redis store (UDP on ``port`` unless ``listen``)."""
    # --rate-limit 0: sipp's load comes from one address at hundreds of messages a second.
    return Serve(tmp_path, port, "--workers", "2", "--db", redis.url, "--rate-limit", "0",
                 *extra, listen=listen)


def worker_pids(log: str) -> dict[int, int]:
    """The live pid of each worker (the last one logged: a restarted worker logs again)."""
    return {int(i): int(pid) for i, pid in re.findall(r"worker (\d+) of 2 \(pid (\d+)\)", log)}


def stopped_counts(log: str) -> list[int]:
    """Calls answered by each worker, from their "stopped" lines (in stop order)."""
    return [int(n) for n in re.findall(r"stopped .*?answered=(\d+)", log)]


def uac_counts(tmp_path: Path, name: str) -> dict[str, int]:
    rows = list(csv.reader((tmp_path / f"{name}.csv").read_text().splitlines(), delimiter=";"))
    last = dict(zip(rows[0], rows[-1]))
    return {k: int(last[k]) for k in ("SuccessfulCall(C)", "FailedCall(C)")}


@pytest.mark.parametrize(("lost", "ports"), [(0, "own"), (0, "shared"),
                                              pytest.param(5, "own", marks=pytest.mark.slow)])
def test_calls_from_one_socket_spread_over_workers_and_all_complete(
        tmp_path: Path, redis: RedisServer, lost: int, ports: str) -> None:
    calls = 600
    port, uas_port = free_port(), free_port()
    serve = workers_serve(tmp_path, port, redis, "--worker-ports", ports)
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", uas_port, calls, timeout=90)
        assert register(tmp_path, "register", port, "service", uas_port).returncode == 0
        uac = run_uac(tmp_path, "uac", port, "service", calls, "-lost", str(lost), rate=150,
                      timeout=90)
        uas_out = finish(uas, 30)
        # On failure: how serve judged the calls (outcome=...), what the callee said, and
        # the log's end -- the three places a failed run's cause has been found.
        assert uac.returncode == 0, (uac_counts(tmp_path, "uac"),
                                     Counter(re.findall(r"outcome=(\w+)", serve.log())),
                                     uas.returncode, uas_out[-1500:], serve.log()[-2000:])
        assert successful(tmp_path, "uac") == calls
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    log = serve.log()
    answered = stopped_counts(log)
    # One sipp socket, yet each worker handled a fair share of the calls.
    assert len(answered) == 2 and sum(answered) == calls, answered
    assert min(answered) > calls * 0.35, answered
    handed = [int(n) for n in re.findall(r"handed_off=(\d+)", log)]
    assert len(handed) == 2 and sum(handed) > 0, handed
    if lost == 0:
        # The caller's INVITE, ACK and BYE arrive on the worker its socket hashes to, and
        # cross for the other's calls.  The callee's 180, 200 and 200 (BYE) cross too when
        # the requests left from the shared port (they come back to it), never when they
        # left from the owner's own port: ~1.5 hand-offs a call instead of ~3.
        if ports == "own":
            assert sum(handed) < 2 * calls, handed
            assert re.search(r"worker \d sends its requests from udp:127\.0\.0\.1:\d+", log)
        else:
            assert sum(handed) >= 2 * calls, handed
            assert "sends its requests from" not in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_only_its_calls_fail(tmp_path: Path,
                                                               redis: RedisServer) -> None:
    calls, rate = 1500, 100
    port, uas_port = free_port(), free_port()
    serve = workers_serve(tmp_path, port, redis)
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", uas_port, calls, timeout=120)
        assert register(tmp_path, "register", port, "service", uas_port).returncode == 0
        errors = tmp_path / "uac_errors.log"
        # -timeout 45: a call whose INVITE the killed worker had answered 100 (so the caller
        # retransmits nothing) waits for a final answer no one will send; sipp ends it then.
        uac = run_uac(tmp_path, "uac", port, "service", calls, "-trace_err", "-error_file",
                      str(errors), rate=rate, timeout=45, background=True)
        time.sleep(5)
        victim = worker_pids(serve.log())[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "worker 1 running again" not in serve.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "worker 1 running again" in serve.log(), serve.log()[-3000:]
        assert worker_pids(serve.log())[1] != victim
        finish(uac, 120)        # (the UAS is not waited for: a call lost early never reached it)
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    counts = uac_counts(tmp_path, "uac")
    lost = calls - counts["SuccessfulCall(C)"]     # failed, or still waiting at sipp's end
    # What was lost: calls worker 1 held when it died (sipp names each failed call) -- and,
    # like any UDP loss, a datagram of another worker's call that was waiting in the dead
    # worker's socket queue (the kernel had picked that socket for it).  Peers retransmit;
    # sipp's UAS does not resend its 200 for a retransmitted INVITE, so such a call can fail.
    failed_ids = set(re.findall(r"Call-I[Dd]:? '?([^'\s,]+)",
                                errors.read_text() if errors.exists() else ""))
    assert lost <= rate, counts                              # at most a second of calls
    others = {cid for cid in failed_ids if call_id_shard(cid, 2) != 1}
    assert len(others) <= 3, (others, failed_ids)
    # The restarted worker took calls again.
    answered = stopped_counts(serve.log())
    assert len(answered) == 2 and min(answered) > 0, answered


@pytest.mark.parametrize(("args", "why"), [
    (["--db", "memory:"], "needs a location store every worker shares"),
    (["--db", "sqlite:x.db"], "needs a location store every worker shares"),
    # (TCP/TLS listeners are served: tests/test_serve_workers_tcp.py; but not on any port)
    (["--db", "redis://127.0.0.1:1/0", "--listen", "tcp:127.0.0.1:0"], "fixed port"),
    (["--db", "redis://127.0.0.1:1/0", "--listen", "udp:127.0.0.1:0"], "fixed port"),
])
def test_combinations_workers_cannot_serve_are_refused(tmp_path: Path, args: list[str],
                                                        why: str) -> None:
    import subprocess

    from procutil import fastsip_env

    port = free_port()
    argv = [sys.executable, "-m", "fastsip.cli", "serve", "--workers", "2",
            "--listen", f"udp:127.0.0.1:{port}", *(a.format(port=port) for a in args)]
    proc = subprocess.run(argv, cwd=tmp_path, env=fastsip_env(), capture_output=True,
                          text=True, timeout=30, check=False)
    assert proc.returncode == 2, proc.stderr
    assert why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr

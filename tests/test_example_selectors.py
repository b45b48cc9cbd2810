"""``examples/selectors_proxy.py``: fastsip's stateful proxy and registrar embedded in a plain
``selectors`` loop over one UDP socket, as a host program would embed the sans-IO core -- no
asyncio, no ``fastsip.asyncio``.  Run as a real process with real sipp peers on 127.0.0.1:

- a malformed request gets the shared intake's 400 (naming the problem), and the process goes
  on serving: a sipp UAS registers, and a batch of sipp calls through the example all
  succeed, their ACKs and BYEs following the Record-Route back through it (the UAS sees its
  Via on top of every BYE);
- an unknown user gets 404;
- at SIGTERM it exits 0 with its one-line summary, which says how many datagrams it took and
  that ``asyncio`` was never in ``sys.modules`` -- read after the traffic, so a lazy import
  anywhere on the paths the calls took would show;
- a listen address in use is one line naming it (exit 1); a bad --listen is a usage error.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import WINDOWS, fastsip_env, free_port
from serveutil import (
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
    stop,
    successful,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "selectors_proxy.py"
CALLS = 24

pytestmark = pytest.mark.skipif(not EXAMPLE.is_file(), reason="no examples/ beside the tests")


def example(port: int, *extra: str) -> list[str]:
    return [sys.executable, str(EXAMPLE), "--listen", f"{HOST}:{port}", "--domain", DOMAIN,
            *extra]


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")
def test_selectors_proxy_relays_sipp_calls_without_asyncio(tmp_path: Path) -> None:
    port, uas_port = free_port(), free_port()
    proxy = Serve(tmp_path, port, command=example(port))
    uas = None
    summary = ""
    try:
        bad = request("OPTIONS", f"sip:service@{DOMAIN}", call_id="bad1",
                      headers=["This line has no colon"])
        lines = sip_exchange(port, bad)
        assert final_status(lines) == 400, (lines, proxy.log())
        assert "header line without ':'" in lines[-1]

        uas = start_uas(tmp_path, "uas", uas_port, CALLS, timeout=90)
        assert register(tmp_path, "register", port, "service", uas_port).returncode == 0, \
            proxy.log()
        uac = run_uac(tmp_path, "uac", port, "service", CALLS, timeout=90)
        uas_out = finish(uas, 60)
        assert uac.returncode == 0, (successful(tmp_path, "uac"), proxy.log())
        assert successful(tmp_path, "uac") == CALLS
        assert uas.returncode == 0, uas_out[-2000:]
        assert successful(tmp_path, "uas") == CALLS

        lines = sip_exchange(port, request("INVITE", f"sip:nobody@{DOMAIN}", call_id="n1"))
        assert final_status(lines) == 404, lines
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        rc = stop(proxy.proc)
        if proxy.proc.stdout is not None:
            summary = proxy.proc.stdout.read()
        proxy.close()
    assert rc == 0, proxy.log()
    assert "stopped on SIGTERM:" in summary, (summary, proxy.log())
    assert summary.rstrip().endswith("asyncio imported: False"), summary
    found = re.search(r"datagrams=(\d+) delivered=(\d+)", summary)
    assert found is not None, summary
    # Every call is the caller's INVITE, ACK and BYE and the callee's 180, 200 and 200 (to
    # the BYE), each one in through this one socket and delivered to the transactions.
    assert int(found.group(2)) >= 6 * CALLS, summary
    assert "Traceback" not in proxy.log()
    # In-dialog requests came back through the proxy (its Record-Route): its Via on each BYE.
    got = bye_messages(tmp_path / "uas.msg", received=True)
    assert len(got) >= CALLS
    for bye in got:
        vias = [line for line in bye.splitlines() if line.lower().startswith(("via:", "v:"))]
        assert f"{HOST}:{port};branch=" in vias[0], bye


def test_selectors_proxy_start_up_errors_are_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        done = subprocess.run(example(port), cwd=tmp_path, env=fastsip_env(), text=True,
                              capture_output=True, timeout=60, check=False)
    assert done.returncode == 1, done
    said = done.stderr.strip()
    assert said.startswith(f"selectors_proxy: cannot listen on udp:{HOST}:{port}: "), said
    assert "\n" not in said and "Traceback" not in said, said
    if not WINDOWS:     # Windows words EADDRINUSE (WSAEADDRINUSE) its own way
        assert said.endswith(f"{HOST}:{port}: Address already in use"), said
    done = subprocess.run([sys.executable, str(EXAMPLE), "--listen", "localhost:5060"],
                          cwd=tmp_path, env=fastsip_env(), text=True, capture_output=True,
                          timeout=60, check=False)
    assert done.returncode == 2 and "--listen" in done.stderr, done
    assert "Traceback" not in done.stderr

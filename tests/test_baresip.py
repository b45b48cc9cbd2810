"""``fastsip serve`` with baresip, a SIP user agent nobody here wrote (Debian ``baresip``;
``.ci/system-deps`` installs it), and sipp as the other side:

- sipp's UAC calls ``carol``, a baresip registered through serve that answers by itself; the
  call is established on both sides and sipp's BYE (along the route set, through serve) ends
  it: baresip reports the call closed by the peer, sipp counts one successful call, serve logs
  ``outcome=answered``;
- baresip calls a sipp UAS registered through serve and hangs up: baresip's BYE reaches the
  UAS through serve (serve's Via on top) and is answered.

baresip runs with a config directory of its own, no audio driver (calls without sound), and is
driven over its ``ctrl_tcp`` socket (see ``clientutil.Baresip``).  Skipped without baresip or
sipp.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from clientutil import BARESIP, BARESIP_MODULES, Baresip
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    bye_messages,
    finish,
    register,
    run_uac,
    start_uas,
    successful,
)

pytestmark = [
    pytest.mark.skipif(BARESIP is None or BARESIP_MODULES is None,
                       reason="baresip is not installed (Debian: apt-get install baresip)"),
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)"),
]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def wait_registered(serve: Serve, user: str, timeout: float = 15.0) -> None:
    """Until serve has logged the user's REGISTER answered 200 (baresip registers at start,
    before its control socket could report it)."""
    needle = "outcome=registered duration_ms="
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in line and f"from=sip:{user}@{DOMAIN}" in line
               for line in serve.log().splitlines()):
            return
        time.sleep(0.1)
    raise AssertionError(f"{user} did not register within {timeout:g} s:\n{serve.log()}")


def test_sipp_calls_baresip_which_answers(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port)
    carol = None
    try:
        carol = Baresip(workdir, "carol", "carol", DOMAIN, f"sip:{HOST}:{port};lr",
                        auto_answer=True)
        wait_registered(serve, "carol")
        uac = run_uac(workdir, "uac", port, "carol", 1, timeout=20)
        # Auto-answered: no CALL_INCOMING event, the call is established at once.
        established = carol.expect(r"^CALL_ESTABLISHED ").string
        assert '"direction": "incoming"' in established, established
        assert f'"peeruri": "sip:caller@{DOMAIN}"' in established, established
        # libre reports a BYE from the peer as ECONNRESET.
        closed = carol.expect(r"^CALL_CLOSED ").string
        assert "Connection reset by peer" in closed, closed
    finally:
        if carol is not None:
            carol.close()
        assert serve.close() == 0
    assert uac.returncode == 0 and successful(workdir, "uac") == 1, (
        carol.lines, carol.output()[-2000:], serve.log())
    log = serve.log()
    assert "method=INVITE status=200 outcome=answered" in log, log
    assert f"to=sip:carol@{DOMAIN}" in log


def test_baresip_calls_and_hangs_up(workdir: Path) -> None:
    port, uas_port = free_port(), free_port()
    serve = Serve(workdir, port)
    uas = start_uas(workdir, "uas", uas_port, 1, timeout=20)
    carol = None
    try:
        assert register(workdir, "register", port, "service", uas_port).returncode == 0
        carol = Baresip(workdir, "carol", "carol", DOMAIN, f"sip:{HOST}:{port};lr")
        wait_registered(serve, "carol")
        carol.command("dial", f"sip:service@{DOMAIN}")
        carol.expect(r"^CALL_ESTABLISHED ")
        carol.command("hangup")
        closed = carol.expect(r"^CALL_CLOSED ").string
        assert "Connection reset by user" in closed, closed
        # The UAS waits 4 s after the BYE (its timewait) before it ends and writes its trace.
        finish(uas, 30)
    finally:
        if carol is not None:
            carol.close()
        if uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    log = serve.log()
    assert "method=INVITE status=200 outcome=answered" in log, log
    assert f"from=sip:carol@{DOMAIN} to=sip:service@{DOMAIN}" in log
    # baresip's BYE went through serve: the UAS got it with serve's Via on top, baresip's below.
    byes = bye_messages(workdir / "uas.msg", received=True)
    assert len(byes) == 1, (workdir / "uas.msg").read_text()[-3000:]
    vias = [line for line in byes[0].splitlines() if line.lower().startswith("via:")]
    assert len(vias) == 2 and f"{HOST}:{port};branch=" in vias[0], byes[0]
    assert "User-Agent: baresip" in byes[0]

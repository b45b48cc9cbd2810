"""``fastsip serve --trunk``: outbound registration with digest and calls relayed through a
trunk that challenges them, against sipp playing the provider and a PBX, on loopback.

- The provider's registrar (tests/data/sipp/provider_register.xml) challenges each REGISTER
  and grants 4 s: serve must register and refresh twice within the test (sipp ends its one
  "call" successfully after three verified registrations).
- The provider's proxy (provider_calls.xml) answers each INVITE with 407, then checks the
  re-sent INVITE's credentials and CSeq (+1), the ACK's CSeq for the 2xx and the BYE's shifted
  CSeq: any mismatch fails the call there.  The PBX (uac_rr.xml, on 127.0.0.2) must complete
  every call and never see a 401/407 (its scenario has no place for one: it would fail).
- A wrong password: serve backs off (the REGISTERs in a fixed window are counted), and the
  password is never in serve's log.
- A call from the provider for our registered Contact reaches the user a routes module names
  (``req.trunk``).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import fastsip_env, free_port
from serveutil import HOST, SIPP, Serve, finish, sipp, successful
from test_serve_metrics import scrape, value

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed")

PBX_HOST = "127.0.0.2"
PASSWORD = "trunk-s3cret"
CALLS = 4


def _credentials(tmp_path: Path, password: str = PASSWORD) -> Path:
    path = tmp_path / "trunks.txt"
    path.write_text(f"# provider account\nprov:trunkuser:{password}\n")
    path.chmod(0o600)
    return path


def _routes(tmp_path: Path, provider_calls: int, pbx_port: int = 0) -> Path:
    path = tmp_path / "routes.py"
    path.write_text(f'''
from fastsip.app import route

@route
def initial(req):
    if req.trunk == "prov":
        # A call from the provider for the number we registered: to the PBX.
        req.trusted = True
        return req.relay(to="sip:pbx@{PBX_HOST}:{pbx_port}")
    if req.method == "INVITE" and req.source.host == "{PBX_HOST}":
        # The PBX's outbound calls leave through the provider.
        req.trusted = True
        return req.relay(to="sip:{HOST}:{provider_calls}", trunk="prov")
    return None
''')
    return path


def _received(message_file: Path, start: str) -> list[str]:
    """The messages sipp received (from a -trace_msg file) whose first line starts so."""
    out = []
    text = message_file.read_text() if message_file.exists() else ""
    for block in text.split("----------------------------------------------- ")[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if "message received" in head and body.startswith(start):
            out.append(body)
    return out


def _check_digest(message: str, method: str, header: str) -> None:
    """Recompute the MD5 qop=auth digest (RFC 7616 §3.4.1) of ``header`` in ``message``."""
    line = re.search(rf"^{header}:\s*Digest (.*)$", message, re.MULTILINE)
    assert line is not None, message
    p = dict(re.findall(r'(\w+)="?([^",]*)"?', line.group(1)))

    def h(text: str) -> str:
        return hashlib.md5(text.encode()).hexdigest()

    ha1 = h(f"{p['username']}:{p['realm']}:{PASSWORD}")
    ha2 = h(f"{method}:{p['uri']}")
    assert p["qop"] == "auth" and p["nc"] == "00000001" and p["cnonce"]
    assert p["response"] == h(f"{ha1}:{p['nonce']}:{p['nc']}:{p['cnonce']}:auth:{ha2}")


def test_register_refresh_and_calls_through_a_challenging_trunk(tmp_path: Path) -> None:
    serve_port = free_port()
    registrar_port = free_port()
    calls_port = free_port()
    registrar = sipp("provider_register.xml", tmp_path, "registrar", "-p", str(registrar_port),
                     "-m", "1", "-key", "expires", "4", background=True, timeout=40)
    provider = sipp("provider_calls.xml", tmp_path, "provider", "-p", str(calls_port),
                    "-m", str(CALLS), background=True, timeout=60)
    serve = Serve(tmp_path, serve_port,
                  "--trunk", f"prov=sip:trunkuser@{HOST}:{registrar_port}",
                  "--trunk-credentials", str(_credentials(tmp_path)),
                  "--routes", str(_routes(tmp_path, calls_port)),
                  "--trusted", f"{PBX_HOST}/32", "--log-level", "debug")
    try:
        # Three verified registrations (4 s granted, refreshed at 2 s): sipp's one "call"
        # succeeds within ~5 s.
        out = finish(registrar, 30)
        assert registrar.returncode == 0, out + serve.log()[-3000:]
        registers = _received(tmp_path / "registrar.msg", "REGISTER ")
        assert len(registers) >= 6, len(registers)
        cseqs = [int(m.group(1)) for r in registers
                 if (m := re.search(r"^CSeq:\s*(\d+)", r, re.MULTILINE))]
        assert cseqs == sorted(cseqs) and len(set(cseqs)) == len(cseqs), cseqs
        call_ids = {re.search(r"^Call-ID:\s*(\S+)", r, re.MULTILINE).group(1)  # type: ignore[union-attr]
                    for r in registers}
        assert len(call_ids) == 1   # §10.2.4: one Call-ID for a registration
        assert sum("Authorization:" in r for r in registers) >= 3

        # The PBX's calls through the trunk: every one completes, none sees a challenge.
        pbx = sipp("uac_rr.xml", tmp_path, "pbx", f"{HOST}:{serve_port}",
                   "-p", str(free_port(PBX_HOST)), "-m", str(CALLS), "-r", "4",
                   "-s", "+15550100", "-key", "domain", "example.com", "-key", "caller", "pbx",
                   timeout=30, host=PBX_HOST)
        assert pbx.returncode == 0, \
            serve.log()[-4000:]
        assert successful(tmp_path, "pbx") == CALLS
        assert _received(tmp_path / "pbx.msg", "SIP/2.0 401") == []
        assert _received(tmp_path / "pbx.msg", "SIP/2.0 407") == []
        # The caller sees its own CSeq numbers in every response.
        for response in _received(tmp_path / "pbx.msg", "SIP/2.0 "):
            assert re.search(r"^CSeq:\s*[12] ", response, re.MULTILINE), response
        out = finish(provider, 30)
        assert provider.returncode == 0, out
        assert successful(tmp_path, "provider") == CALLS
        # Every re-sent INVITE's credentials are right (computed here, independently).
        answered = [r for r in _received(tmp_path / "provider.msg", "INVITE ")
                    if "Proxy-Authorization:" in r]
        assert len(answered) == CALLS
        for invite in answered:
            _check_digest(invite, "INVITE", "Proxy-Authorization")
    finally:
        for proc in (registrar, provider):
            if proc.poll() is None:
                proc.kill()
                finish(proc, 5)
        serve.close()
    log = serve.log()
    assert "trunk prov registered" in log
    assert PASSWORD not in log


def test_wrong_password_backs_off(tmp_path: Path) -> None:
    serve_port = free_port()
    registrar_port = free_port()
    registrar = sipp("provider_register.xml", tmp_path, "registrar", "-p", str(registrar_port),
                     "-m", "1", "-key", "expires", "4", background=True, timeout=20)
    metrics_port = free_port()
    serve = Serve(tmp_path, serve_port,
                  "--trunk", f"prov=sip:trunkuser@{HOST}:{registrar_port}",
                  "--trunk-credentials", str(_credentials(tmp_path, "wrong-pass")),
                  "--trunk-retry", "2:4", "--log-level", "debug",
                  "--metrics", f"{HOST}:{metrics_port}")
    window = 9.0
    try:
        time.sleep(window)
        # The state an operator's dashboard shows: not registered, failing again and again.
        samples = scrape(metrics_port)
        assert value(samples, "fastsip_trunk_registration", trunk="prov",
                     state="registered") == 0
        assert value(samples, "fastsip_trunk_registration_failures", trunk="prov") >= 2
    finally:
        serve.close()
        registrar.terminate()      # sipp writes its trace and stops
        finish(registrar, 10)
    registers = _received(tmp_path / "registrar.msg", "REGISTER ")
    # Each attempt: one REGISTER, one answer to the challenge (refused: never a second).
    # Back-off 2 s, 4 s, 4 s (75-100 % jitter): at most 5 attempts in 9 s; without back-off a
    # client would send hundreds.
    assert 4 <= len(registers) <= 10, len(registers)
    log = serve.log()
    assert "registration failed" in log
    assert "next attempt in" in log
    assert "wrong-pass" not in log


def test_call_from_the_trunk_reaches_the_user_routes_name(tmp_path: Path) -> None:
    serve_port = free_port()
    registrar_port = free_port()
    pbx_port = free_port(PBX_HOST)
    registrar = sipp("provider_register.xml", tmp_path, "registrar", "-p", str(registrar_port),
                     "-m", "1", "-key", "expires", "60", background=True, timeout=20)
    pbx = sipp("uas_rr.xml", tmp_path, "pbx", "-p", str(pbx_port), "-m", "1",
               background=True, timeout=30, host=PBX_HOST)
    metrics_port = free_port()
    serve = Serve(tmp_path, serve_port,
                  "--trunk", f"prov=sip:trunkuser@{HOST}:{registrar_port}",
                  "--trunk-credentials", str(_credentials(tmp_path)),
                  "--routes", str(_routes(tmp_path, 0, pbx_port)), "--log-level", "debug",
                  "--metrics", f"{HOST}:{metrics_port}")
    try:
        deadline = time.monotonic() + 10
        while "trunk prov registered" not in serve.log() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "trunk prov registered" in serve.log(), serve.log()
        samples = scrape(metrics_port)
        assert value(samples, "fastsip_trunk_registration", trunk="prov",
                     state="registered") == 1
        assert value(samples, "fastsip_trunk_registration", trunk="prov",
                     state="backing-off") == 0
        # The provider calls the number it registered for us, from its own address.
        caller = sipp("uac_rr.xml", tmp_path, "incoming", f"{HOST}:{serve_port}",
                      "-p", str(free_port()), "-m", "1", "-s", "trunkuser",
                      "-key", "domain", f"{HOST}:{serve_port}", "-key", "caller", "provider",
                      timeout=20)
        assert caller.returncode == 0, serve.log()[-3000:]
        out = finish(pbx, 20)
        assert pbx.returncode == 0, out
        invite = _received(tmp_path / "pbx.msg", "INVITE ")
        assert invite and invite[0].startswith(f"INVITE sip:pbx@{PBX_HOST}:{pbx_port}")
    finally:
        for proc in (registrar, pbx):
            if proc.poll() is None:
                proc.kill()
                finish(proc, 5)
        serve.close()


def test_bad_trunk_options_refuse_to_start(tmp_path: Path) -> None:
    creds = _credentials(tmp_path)
    cases = [
        (["--trunk", f"prov=sip:trunkuser:{PASSWORD}@{HOST}:5999"], "password in the URI"),
        (["--trunk", "prov"], "expected NAME=sip:USER@HOST"),
        (["--trunk-credentials", str(creds)], "without --trunk"),
        (["--trunk", f"prov=sip:u@{HOST}", "--trunk-credentials", str(tmp_path / "nope")],
         "cannot read trunk credentials"),
    ]
    for extra, message in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:0", *extra],
            check=False, capture_output=True, text=True, timeout=30, env=fastsip_env(),
            cwd=tmp_path)
        assert proc.returncode == 2, (extra, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert PASSWORD not in proc.stderr + proc.stdout

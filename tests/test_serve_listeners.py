"""``fastsip serve`` with several listeners, a wildcard listener, and a call that changes address
family (issue 10, "Listeners"): real processes on loopback.

- A request to the second UDP listener (another port; another address, 127.0.0.2) is answered
  from that listener's socket -- a client (and its NAT) matches the answer by the address it
  sent to -- and both listeners are "us": OPTIONS to either gets 200 (with Allow, Accept and
  Supported), not 403.
- ``--listen udp:0.0.0.0:P``: a request addressed to 127.0.0.1:P is for us.
- An IPv6 caller calls an IPv4 callee: the INVITE leaves from the IPv4 socket with an IPv4 Via
  and two Record-Routes (RFC 5658; one per family), and a BYE from either end crosses serve.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import needs_ipv6, needs_loopback_aliases
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    finish,
    header_values,
    register,
    sipp,
    successful,
)

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def ask(to: tuple[str, int], uri: str, *, method: str = "OPTIONS", timeout: float = 5.0,
        family: int = socket.AF_INET, bind: str = HOST, aor: str | None = None,
        headers: tuple[str, ...] = ()) -> tuple[str, tuple[str, int]]:
    """Send one request to ``to`` (retransmitted every 0.5 s), return the first final response
    and the address it came from.  ``aor``: the To URI (default: the Request-URI)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((bind, 0))
        me = s.getsockname()[1]
        host = f"[{bind}]" if ":" in bind else bind
        text = (f"{method} {uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {host}:{me};rport;branch=z9hG4bK-l{me}\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:tester@{DOMAIN}>;tag=l{me}\r\n"
                f"To: <{aor or uri}>\r\n"
                f"Call-ID: l{me}@{HOST}\r\n"
                f"CSeq: 1 {method}\r\n"
                + "".join(f"{h}\r\n" for h in headers)
                + "Content-Length: 0\r\n\r\n").encode()
        s.settimeout(0.5)
        s.sendto(text, to)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, sender = s.recvfrom(65535)
            except OSError:
                s.sendto(text, to)
                continue
            reply = data.decode()
            if int(reply.split()[1]) >= 200:
                return reply, (sender[0], sender[1])
    raise AssertionError(f"no final response from {to}")


def header(reply: str, name: str) -> str | None:
    values = header_values(reply, name)
    return values[0] if values else None


def test_each_listener_answers_from_its_own_socket(workdir: Path) -> None:
    p1, p2 = free_port(), free_port()
    serve = Serve(workdir, p1, listen=[f"udp:{HOST}:{p1}", f"udp:{HOST}:{p2}"])
    try:
        for port in (p1, p2):
            reply, sender = ask((HOST, port), f"sip:{HOST}:{port}")
            # From the socket the request reached, not the first listener.
            assert sender == (HOST, port), (port, reply)
            assert reply.startswith("SIP/2.0 200 "), reply
            allow = header(reply, "Allow") or ""
            assert {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER"} <= {
                m.strip() for m in allow.split(",")}, reply
            assert header(reply, "Accept") is not None, reply
            assert header(reply, "Supported") is not None, reply
        # Our domain without a user part is us too; so is a URI with no port.
        reply, sender = ask((HOST, p2), f"sip:{DOMAIN}")
        assert reply.startswith("SIP/2.0 200 ") and sender == (HOST, p2), reply
        reply, _ = ask((HOST, p2), f"sip:{HOST}")
        assert reply.startswith("SIP/2.0 200 "), reply
    finally:
        assert serve.close() == 0


@needs_loopback_aliases
def test_second_address_answers_from_it(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port, listen=[f"udp:{HOST}:{port}", f"udp:127.0.0.2:{port}"])
    try:
        reply, sender = ask(("127.0.0.2", port), f"sip:127.0.0.2:{port}")
        assert sender == ("127.0.0.2", port), reply
        assert reply.startswith("SIP/2.0 200 "), reply
    finally:
        assert serve.close() == 0


def test_wildcard_listener_knows_its_interface_addresses(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port, listen=[f"udp:0.0.0.0:{port}"])
    try:
        reply, sender = ask((HOST, port), f"sip:{HOST}:{port}")
        assert reply.startswith("SIP/2.0 200 "), reply
        assert sender == (HOST, port)
        # Relaying elsewhere still needs trust: a foreign host is not us.
        reply, _ = ask((HOST, port), "sip:someone@192.0.2.1:5060", method="MESSAGE")
        assert reply.startswith("SIP/2.0 403 "), reply
    finally:
        assert serve.close() == 0


def _vias_and_record_routes(message_file: Path, method: str) -> list[tuple[list[str], list[str]]]:
    """(Via values, Record-Route values) of each ``method`` request sipp received."""
    found = []
    for block in message_file.read_text(errors="replace").split("----------------------------"
                                                                 "-------------------"):
        if "message received" not in block:
            continue
        lines = block.splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(f"{method} ")), None)
        if start is None:
            continue
        vias, rrs = [], []
        for line in lines[start + 1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() in ("via", "v"):
                vias.extend(v.strip() for v in value.split(","))
            elif name.strip().lower() == "record-route":
                rrs.extend(v.strip() for v in value.split(","))
        found.append((vias, rrs))
    return found


@needs_ipv6
@pytest.mark.parametrize("hangs_up", ["caller", "callee"])
def test_ipv6_caller_to_ipv4_callee(workdir: Path, hangs_up: str) -> None:
    """Before: serve sent from its IPv4 socket a Via naming [::1] and one Record-Route with
    [::1]; the callee's BYE was lost and the caller's got 481."""
    p4, p6, uas_port = free_port(), free_port("::1"), free_port()
    serve = Serve(workdir, p4, listen=[f"udp:[::1]:{p6}", f"udp:{HOST}:{p4}"])
    uas = None
    try:
        uas_scenario = "uas_rr.xml" if hangs_up == "caller" else "uas_sends_bye.xml"
        uas = sipp(uas_scenario, workdir, "uas", "-p", str(uas_port), "-m", "1",
                   "-key", "domain", DOMAIN, "-key", "caller", "caller",
                   background=True, timeout=30)
        # The callee registers over IPv4 (to the IPv4 listener).
        assert register(workdir, "register", p4, "service", uas_port).returncode == 0
        uac_scenario = "uac_rr.xml" if hangs_up == "caller" else "uac_callee_bye.xml"
        uac = sipp(uac_scenario, workdir, "uac", f"[::1]:{p6}", "-p", str(free_port("::1")),
                   "-m", "1", "-s", "service", "-key", "domain", DOMAIN, "-key", "caller",
                   "caller", timeout=30, host="::1")
        finish(uas, 40)
        assert uac.returncode == 0 and successful(workdir, "uac") == 1, serve.log()
        assert uas.returncode == 0 and successful(workdir, "uas") == 1, serve.log()
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    [(vias, rrs)] = _vias_and_record_routes(workdir / "uas.msg", "INVITE")
    # Our Via on the IPv4 side names the IPv4 socket it left from.
    assert vias[0].startswith(f"SIP/2.0/UDP {HOST}:{p4};"), vias
    # RFC 5658: one Record-Route per family, the callee's side on top.
    assert rrs == [f"<sip:{HOST}:{p4};lr>", f"<sip:[::1]:{p6};lr>"], rrs
    assert "method=INVITE status=200 outcome=answered" in serve.log()


def test_register_addressed_to_the_server_by_ip(workdir: Path) -> None:
    """pjsua's default registrar setting is the server's address, not the domain: the AOR in
    To decides (it must be in our domain), on any of our listeners."""
    p1, p2 = free_port(), free_port()
    serve = Serve(workdir, p1, listen=[f"udp:{HOST}:{p1}", f"udp:{HOST}:{p2}"])
    contact = ("Contact: <sip:alice@127.0.0.1:5999>", "Expires: 60")
    try:
        for uri in (f"sip:{HOST}", f"sip:{HOST}:{p2}"):
            reply, _ = ask((HOST, p2), uri, method="REGISTER", aor=f"sip:alice@{DOMAIN}",
                           headers=contact)
            assert reply.startswith("SIP/2.0 200 "), reply
        # Another domain's AOR is still refused: 404, as §10.3 step 5 says.
        reply, _ = ask((HOST, p1), f"sip:{HOST}", method="REGISTER",
                       aor="sip:alice@other.example.net", headers=contact)
        assert reply.startswith("SIP/2.0 404 "), reply
        # A Request-URI in a domain we do not serve: one reason phrase, whichever layer says it.
        reply, _ = ask((HOST, p1), "sip:other.example.net", method="REGISTER",
                       aor="sip:alice@other.example.net", headers=contact)
        assert reply.startswith("SIP/2.0 403 Forbidden (domain not served here)"), reply
    finally:
        assert serve.close() == 0


def test_advertised_address_per_listener(workdir: Path) -> None:
    """A server behind 1:1 NAT: ``--listen udp:PRIVATE:P/PUBLIC`` writes the public address in
    its Via and Record-Route, and a request addressed to the public address is for us."""
    port, uas_port = free_port(), free_port()
    serve = Serve(workdir, port, listen=[f"udp:{HOST}:{port}/203.0.113.5"])
    uas = None
    try:
        reply, _ = ask((HOST, port), f"sip:203.0.113.5:{port}")
        assert reply.startswith("SIP/2.0 200 "), reply
        uas = sipp("uas_rr.xml", workdir, "uas", "-p", str(uas_port), "-m", "1",
                   background=True, timeout=20)
        assert register(workdir, "register", port, "service", uas_port).returncode == 0
        # The caller sends its ACK and BYE to the advertised address (unreachable here), so
        # look only at what reached the callee.
        sipp("uac_rr.xml", workdir, "uac", f"{HOST}:{port}", "-p", str(free_port()), "-m", "1",
             "-s", "service", "-key", "domain", DOMAIN, "-key", "caller", "caller", timeout=5)
    finally:
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    [(vias, rrs)] = _vias_and_record_routes(workdir / "uas.msg", "INVITE")[:1]
    assert vias[0].startswith(f"SIP/2.0/UDP 203.0.113.5:{port};"), vias
    assert rrs == [f"<sip:203.0.113.5:{port};lr>"], rrs

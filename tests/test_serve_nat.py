"""NAT traversal through ``fastsip serve`` on loopback (issue 10).

The phone behind the "NAT" is a UDP socket on 127.0.0.1:Y (the NAT's public side) that writes
``127.0.0.2:X`` -- its private address, where nothing listens -- in its Via and Contact, as a
phone behind a NAT does.  Its peer is sipp.

- It registers, is called: the INVITE, the ACK and the caller's BYE all reach it at Y (the
  INVITE over the flow its REGISTER came from; the ACK and BYE by the alias serve put in its
  Contact), and the call completes.
- It calls out: the callee (sipp) hangs up, and that BYE reaches it at Y.
- Keep-alives: serve pings the flow (OPTIONS at Y); while it answers, the binding stays; once Y
  goes silent the binding is removed after --nat-ping-failures pings, and a call to it gets
  404 instead of ringing nowhere.
- RFC 5626 outbound: a REGISTER with reg-id, +sip.instance and ``Supported: outbound`` gets
  ``Require: outbound`` and ``Flow-Timer``; a re-REGISTER from a new flow with the same
  instance and reg-id replaces the binding.
"""

from __future__ import annotations

import socket
import sys
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    final_status,
    finish,
    header_values,
    register,
    request,
    run_uac,
    sip_exchange,
    sipp,
    successful,
)

pytestmark = pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")

PRIVATE = "127.0.0.2"     # what the phone believes its address is; nothing listens there


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def fetch_bindings(port: int, user: str) -> str:
    """A REGISTER without Contact (§10.2.3) from another socket: the 200 lists the bindings."""
    [reply] = sip_exchange(port, request("REGISTER", f"sip:{user}@{DOMAIN}",
                                         call_id=uuid.uuid4().hex), full=True)
    assert reply.startswith("SIP/2.0 200 "), reply
    return " ".join(header_values(reply, "Contact"))


class NatPhone:
    """A SIP phone behind a NAT: sends from 127.0.0.1:Y, says it is at 127.0.0.2:X."""

    def __init__(self, serve_port: int, user: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.public = self.sock.getsockname()[1]          # Y
        self.private_port = 5999                          # X, on 127.0.0.2
        self.serve = (HOST, serve_port)
        self.user = user
        self.tag = uuid.uuid4().hex[:8]
        self.seen: list[str] = []                         # every request received, in order
        self.pings = 0

    @property
    def contact(self) -> str:
        return f"<sip:{self.user}@{PRIVATE}:{self.private_port}>"

    def via(self, branch: str) -> str:
        return f"SIP/2.0/UDP {PRIVATE}:{self.private_port};rport;branch=z9hG4bK{branch}"

    def send(self, text: str) -> None:
        self.sock.sendto(text.encode(), self.serve)

    def receive(self, timeout: float) -> tuple[str, tuple[str, int]] | None:
        self.sock.settimeout(timeout)
        try:
            data, addr = self.sock.recvfrom(65535)
        except OSError:
            return None
        return data.decode(), addr

    def register(self, *extra: str, expires: int = 300, contact: str | None = None) -> str:
        call_id = uuid.uuid4().hex
        text = (f"REGISTER sip:{DOMAIN} SIP/2.0\r\n"
                f"Via: {self.via(uuid.uuid4().hex[:10])}\r\n"
                "Max-Forwards: 70\r\n"
                f"From: <sip:{self.user}@{DOMAIN}>;tag={self.tag}\r\n"
                f"To: <sip:{self.user}@{DOMAIN}>\r\n"
                f"Call-ID: {call_id}\r\n"
                "CSeq: 1 REGISTER\r\n"
                f"Contact: {contact or self.contact}\r\n"
                + "".join(f"{h}\r\n" for h in extra) +
                f"Expires: {expires}\r\n"
                "Content-Length: 0\r\n\r\n")
        for _ in range(10):
            self.send(text)
            got = self.receive(1.0)
            if got is not None and got[0].startswith("SIP/2.0 "):
                return got[0]
        raise AssertionError("no answer to REGISTER")

    def reply(self, req: str, status: int, reason: str, *, body: str = "") -> None:
        """Answer ``req`` (to its source: serve), copying Via/From/To/Call-ID/CSeq and
        Record-Route, with our tag and Contact."""
        lines = [f"SIP/2.0 {status} {reason}"]
        for name in ("Via", "Record-Route", "From"):
            lines += [f"{name}: {v}" for v in header_values(req, name)]
        to = header_values(req, "To")[0]
        if ";tag=" not in to and status > 100:
            to += f";tag={self.tag}"
        lines += [f"To: {to}", f"Call-ID: {header_values(req, 'Call-ID')[0]}",
                  f"CSeq: {header_values(req, 'CSeq')[0]}", f"Contact: {self.contact}"]
        if body:
            lines += ["Content-Type: application/sdp"]
        lines += [f"Content-Length: {len(body)}", "", body]
        self.send("\r\n".join(lines))

    def serve_requests(self, until: float, *, answer_pings: bool = True,
                       stop_on: str | None = None) -> None:
        """Answer what arrives until ``until`` (monotonic) or a ``stop_on`` request."""
        while time.monotonic() < until:
            got = self.receive(0.2)
            if got is None:
                continue
            text, _ = got
            if text.startswith("SIP/2.0"):
                continue
            method = text.split(" ", 1)[0]
            self.seen.append(text)
            if method == "OPTIONS":
                self.pings += 1
                if answer_pings:
                    self.reply(text, 200, "OK")
            elif method == "INVITE":
                self.reply(text, 180, "Ringing")
                self.reply(text, 200, "OK", body=SDP)
            elif method in ("BYE", "CANCEL"):
                self.reply(text, 200, "OK")
            if stop_on is not None and method == stop_on:
                return

    def close(self) -> None:
        self.sock.close()


SDP = ("v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\ns=-\r\nc=IN IP4 127.0.0.2\r\nt=0 0\r\n"
       "m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def test_phone_behind_nat_is_called_over_its_flow(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port, "--nat-ping-interval", "0")
    phone = NatPhone(port, "natted")
    try:
        assert phone.register().startswith("SIP/2.0 200 ")
        uac = run_uac(workdir, "uac", port, "natted", 1, background=True, timeout=20)
        phone.serve_requests(time.monotonic() + 15, stop_on="BYE")
        finish(uac, 30)
        assert uac.returncode == 0 and successful(workdir, "uac") == 1, serve.log()
    finally:
        phone.close()
        assert serve.close() == 0
    methods = [t.split(" ", 1)[0] for t in phone.seen]
    # INVITE, ACK and BYE all reached the phone at its public address (nothing listens at
    # its Contact); the in-dialog ones by the alias, which serve removed again.
    assert methods[:1] == ["INVITE"] and "ACK" in methods and methods[-1] == "BYE", methods
    invite = phone.seen[0]
    assert invite.startswith(f"INVITE sip:natted@{PRIVATE}:5999 SIP/2.0"), invite
    bye = phone.seen[-1]
    assert bye.startswith(f"BYE sip:natted@{PRIVATE}:5999 SIP/2.0"), bye
    # The caller learned a Contact that names the flow.
    sent_by_uac = (workdir / "uac.msg").read_text()
    assert f"alias={HOST}~{phone.public}~1" in sent_by_uac


def test_phone_behind_nat_calls_out_and_callee_hangs_up(workdir: Path) -> None:
    port, uas_port = free_port(), free_port()
    serve = Serve(workdir, port, "--nat-ping-interval", "0", "--trusted", "127.0.0.1/32")
    phone = NatPhone(port, "natcaller")
    uas = None
    try:
        uas = sipp("uas_sends_bye.xml", workdir, "uas", "-p", str(uas_port), "-m", "1",
                   "-key", "domain", DOMAIN, "-key", "caller", "natcaller",
                   background=True, timeout=20)
        assert register(workdir, "register", port, "service", uas_port).returncode == 0
        call_id = uuid.uuid4().hex
        invite = (f"INVITE sip:service@{DOMAIN} SIP/2.0\r\n"
                  f"Via: {phone.via('inv' + call_id[:8])}\r\n"
                  "Max-Forwards: 70\r\n"
                  f"From: <sip:natcaller@{DOMAIN}>;tag={phone.tag}\r\n"
                  f"To: <sip:service@{DOMAIN}>\r\n"
                  f"Call-ID: {call_id}\r\n"
                  "CSeq: 1 INVITE\r\n"
                  f"Contact: {phone.contact}\r\n"
                  "Content-Type: application/sdp\r\n"
                  f"Content-Length: {len(SDP)}\r\n\r\n{SDP}")
        phone.send(invite)
        ok = None
        deadline = time.monotonic() + 10
        while ok is None and time.monotonic() < deadline:
            got = phone.receive(0.5)
            if got is None:
                phone.send(invite)
            elif got[0].startswith("SIP/2.0 200"):
                ok = got[0]
        assert ok is not None, serve.log()
        # ACK along the route set to the callee's Contact.
        routes = [r for v in reversed(header_values(ok, "Record-Route")) for r in v.split(",")]
        target = header_values(ok, "Contact")[0].strip("<>").split(">")[0]
        to = header_values(ok, "To")[0]
        phone.send(f"ACK {target} SIP/2.0\r\n"
                   f"Via: {phone.via('ack' + call_id[:8])}\r\n"
                   + "".join(f"Route: {r.strip()}\r\n" for r in routes) +
                   "Max-Forwards: 70\r\n"
                   f"From: <sip:natcaller@{DOMAIN}>;tag={phone.tag}\r\n"
                   f"To: {to}\r\nCall-ID: {call_id}\r\nCSeq: 1 ACK\r\n"
                   "Content-Length: 0\r\n\r\n")
        phone.serve_requests(time.monotonic() + 10, stop_on="BYE")
        finish(uas, 20)
        assert uas.returncode == 0 and successful(workdir, "uas") == 1, serve.log()
    finally:
        phone.close()
        if uas is not None and uas.poll() is None:
            uas.kill()
            uas.communicate()
        assert serve.close() == 0
    assert [t.split(" ", 1)[0] for t in phone.seen] == ["BYE"]
    got = (workdir / "uas.msg").read_text()
    assert f"alias={HOST}~{phone.public}~1" in got


def test_keep_alives_then_a_silent_flow_is_removed(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port, "--nat-ping-interval", "1", "--nat-ping-failures", "2")
    phone = NatPhone(port, "pinged")
    try:
        assert phone.register().startswith("SIP/2.0 200 ")
        phone.serve_requests(time.monotonic() + 3.5)
        assert phone.pings >= 2, serve.log()
        ping = next(t for t in phone.seen if t.startswith("OPTIONS"))
        assert ping.startswith(f"OPTIONS sip:pinged@{PRIVATE}:5999 SIP/2.0"), ping
        # Answered: still registered.
        assert f"<sip:pinged@{PRIVATE}:5999>" in fetch_bindings(port, "pinged"), serve.log()
        # The phone goes away: pings go unanswered, and the binding is removed.
        phone.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "removed binding" not in serve.log():
            time.sleep(0.2)
        assert "removed binding sip:pinged@127.0.0.2:5999" in serve.log(), serve.log()
        lines = sip_exchange(port, request("OPTIONS", f"sip:pinged@{DOMAIN}", call_id="q2"))
        assert final_status(lines) == 404, lines
    finally:
        phone.close()
        assert serve.close() == 0
    assert "nat keep_alives=" in serve.log()


def test_outbound_registration(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port, "--nat-ping-interval", "25")
    first, second = NatPhone(port, "ob"), NatPhone(port, "ob")
    first.private_port, second.private_port = 5998, 5997
    instance = f"<urn:uuid:{uuid.uuid4()}>"
    try:
        answers = []
        for phone in (first, second):    # the same device, over a new flow
            answers.append(phone.register(
                "Supported: path, outbound",
                contact=f"<sip:ob@{PRIVATE}:{phone.private_port};ob>"
                        f';reg-id=1;+sip.instance="{instance}"'))
        for answer in answers:
            assert answer.startswith("SIP/2.0 200 "), answer
            assert "outbound" in " ".join(header_values(answer, "Require")), answer
            assert header_values(answer, "Flow-Timer") == ["25"], answer
        # The second flow replaced the first (same instance, same reg-id).
        contacts = [c for v in header_values(answers[1], "Contact") for c in v.split(",")]
        assert len(contacts) == 1 and ":5997;ob>" in contacts[0], contacts
        assert "reg-id=1" in contacts[0] and instance in contacts[0], contacts
        # A call reaches the device over the second flow, not the first.
        uac = run_uac(workdir, "uac", port, "ob", 1, background=True, timeout=20)
        second.serve_requests(time.monotonic() + 15, stop_on="BYE")
        finish(uac, 30)
        assert uac.returncode == 0 and successful(workdir, "uac") == 1, serve.log()
        assert first.receive(0.1) is None
    finally:
        first.close()
        second.close()
        assert serve.close() == 0

"""``fastsip serve`` over TLS, with a throwaway CA (``tlsutil.TestCA``) made in each test.

- Phones over TLS and over UDP (fastsip ``UserAgent``s on real sockets, each with its own
  certificate) register through serve and call each other in both directions, and each call is
  ended once by the caller and once by the callee: every INVITE carries serve's two
  Record-Routes (RFC 5658: one per transport, ``;transport=tls`` on the TLS side), the BYE
  reaches the other end through serve and over the right transport, and the BYE to a TLS phone
  is a new TLS connection from serve that serve verified with ``--tls-ca``.
- sipp (UDP; Debian's sipp has no TLS) calls a TLS phone through serve: its BYE carries both
  Routes and reaches the TLS phone.
- ``sips:`` (RFC 3261 §26.2.2, RFC 5630): a sips INVITE reaches a phone registered over TLS with
  a sips: Contact, with a single ``sips:`` Record-Route; one for a phone registered over UDP
  with a sip: Contact gets 480 and the phone receives nothing; without a tls: listener a sips
  request gets 416.
- ``--tls-verify-client``: a TLS client without a certificate gets no answer and its connection
  is closed; one with a certificate from the CA registers.
- Outgoing TLS verifies the next hop: a certificate from an unknown CA, or one that names
  another host (an IP literal is checked against the IP SANs, a name against the DNS SANs),
  fails with 503 and nothing reaches that server; the right ``--tls-ca`` makes it work; SNI is
  the next hop's host name and absent for an IP literal; ``--tls-no-verify-server`` connects
  anyway and warns at start.
- Bad TLS options or files: exit status 2 and one line naming the option, the file and the
  problem; never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import answer_with, run
from procutil import fastsip_env, free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    final_status,
    request,
    run_uac,
    sip_exchange,
    successful,
)
from tlsutil import Issued, TestCA

from fastsip import Request, Response
from fastsip.asyncio import Endpoint, TransportLayer
from fastsip.transaction import ClientTransaction, new_branch
from fastsip.transport import Address
from fastsip.ua import Call, UserAgent
from fastsip.ua.core import AutoAnswer

#: Seconds any one wait may take on a loaded machine.
WAIT = 20.0


# -- phones: fastsip UAs on real sockets ---------------------------------------------------------


class _Final:
    """A client handler: the final status of one request (408/503 made up on timeout/error)."""

    def __init__(self) -> None:
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        if response.status_code >= 200 and not self.done.done():
            self.done.set_result(response.status_code)

    def on_timeout(self, txn: ClientTransaction) -> None:
        if not self.done.done():
            self.done.set_result(408)

    def on_transport_error(self, txn: ClientTransaction) -> None:
        if not self.done.done():
            self.done.set_result(503)


class Phone:
    """A SIP phone on one transport (``"UDP"`` or ``"TLS"``): a :class:`UserAgent` over an
    :class:`Endpoint` on 127.0.0.1.  A TLS phone listens with its own certificate (serve opens
    connections to it for in-dialog requests) and trusts only the test CA.  It answers every
    INVITE at once; ``received`` keeps every message it got, with its source."""

    def __init__(self, user: str, transport: str, ca: TestCA,
                 cert: Issued | None = None) -> None:
        self.user = user
        self.transport = transport
        self.ca = ca
        self.cert = cert
        self.calls: list[Call] = []          # calls it received
        self.received: list[tuple[Request | Response, Address]] = []
        self.ua = UserAgent(user=user, from_host=DOMAIN, on_incoming=self._incoming)
        server_ctx = client_ctx = None
        if transport == "TLS":
            client_ctx = ssl.create_default_context(cadata=ca.ca_pem.decode())
            if cert is not None:
                server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                server_ctx.load_cert_chain(cert.cert, cert.key)
                client_ctx.load_cert_chain(cert.cert, cert.key)
        listen = "tls" if server_ctx is not None else "udp"
        self.endpoint = Endpoint(self.ua, [f"{listen}:{HOST}:0"], tls_context=server_ctx,
                                 tls_client_context=client_ctx)

    async def __aenter__(self) -> Phone:  # noqa: PYI034 - typing.Self is 3.11+
        await self.endpoint.start()
        self.ua.attach(self.endpoint.transactions)
        transport = self.endpoint.transport
        deliver = transport.on_message
        assert deliver is not None

        def record(msg: Any, source: Address) -> None:
            self.received.append((msg, source))
            deliver(msg, source)

        transport.on_message = record
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.endpoint.close()

    def _incoming(self, call: Call) -> None:
        self.calls.append(call)
        AutoAnswer()(call)

    @property
    def port(self) -> int:
        return self.endpoint.listeners[0].address.port

    def contact(self, scheme: str = "sip") -> str:
        """Our Contact: sips: when asked for and we are on TLS, else sip: (a UDP phone can
        register a sips: address-of-record with a sip: Contact: RFC 5630 §3.3)."""
        if scheme == "sips" and self.transport == "TLS":
            return f"<sips:{self.user}@{HOST}:{self.port}>"
        return self.ua.contact(self.transport)

    def requests(self, method: str) -> list[tuple[Request, Address]]:
        return [(m, s) for m, s in self.received
                if isinstance(m, Request) and m.method == method]

    async def send(self, method: str, ruri: str, to: str, dest: Address,
                   headers: list[tuple[str, str]]) -> int:
        """Send one request out of any dialog; returns its final status."""
        host, port = self.endpoint.transport.sent_by(dest.transport)
        req = Request.create(method, ruri, [
            ("Via", f"SIP/2.0/{dest.transport} {host}:{port};branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.user}@{DOMAIN}>;tag={os.urandom(4).hex()}"),
            ("To", f"<{to}>"),
            ("Call-ID", f"{os.urandom(8).hex()}@{HOST}"),
            ("CSeq", f"1 {method}"),
            *headers,
        ])
        handler = _Final()
        self.endpoint.transactions.request(req, dest, handler)
        return await asyncio.wait_for(handler.done, WAIT)

    async def register(self, serve: Address, scheme: str = "sip") -> int:
        """REGISTER ``scheme:USER@example.com`` with our Contact at serve's ``serve``."""
        aor = f"{scheme}:{self.user}@{DOMAIN}"
        return await self.send("REGISTER", f"{scheme}:{DOMAIN}", aor, serve,
                               [("Contact", self.contact(scheme)), ("Expires", "3600")])

    def call(self, uri: str, serve: Address) -> Call:
        """INVITE ``uri`` through serve (a preloaded Route to ``serve``)."""
        param = "" if serve.transport == "UDP" else f";transport={serve.transport.lower()}"
        return self.ua.invite(uri, proxy=f"sip:{serve.host}:{serve.port}{param}",
                              transport=serve.transport, body=SDP)


SDP = (b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
       b"m=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


async def until(condition: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def tls_serve(workdir: Path, ca: TestCA, *extra: str, verify_ca: bool = True
              ) -> tuple[Serve, Address, Address]:
    """serve on UDP and TLS (distinct ports) with a certificate from ``ca`` for 127.0.0.1;
    ``verify_ca``: next hops verified against ``ca`` (--tls-ca).  Returns serve and its UDP
    and TLS addresses."""
    server = ca.issue("serve")
    udp, tls = free_port(), free_port()
    args = ["--listen", f"tls:{HOST}:{tls}", "--tls-cert", str(server.cert),
            "--tls-key", str(server.key)]
    if verify_ca:
        args += ["--tls-ca", str(ca.ca)]
    serve = Serve(workdir, udp, *args, *extra)
    return serve, Address("UDP", HOST, udp), Address("TLS", HOST, tls)


def header_values(msg: Request, name: str) -> list[str]:
    return [v.strip() for line in msg.headers.getall(name) for v in line.split(",")]


# -- calls between TLS and UDP phones ------------------------------------------------------------


async def call_and_hang_up(caller: Phone, callee: Phone, serve: Address, hangs_up: str,
                           record_route: list[str], serve_port: dict[str, int]) -> None:
    """``caller`` calls ``callee`` through ``serve``; the call must be answered with
    ``record_route`` on the callee's INVITE; then ``hangs_up`` ("caller" or "callee") sends
    BYE, which must reach the other end through serve (``serve_port``: by transport)."""
    what = f"{caller.user}->{callee.user}, {hangs_up} hangs up"
    received = len(callee.calls) + 1
    call = caller.call(f"sip:{callee.user}@{DOMAIN}", serve)
    await until(lambda: len(callee.calls) == received and call.state == "confirmed"
                and callee.calls[-1].state == "confirmed", f"{what}: confirmed")
    answered = callee.calls[-1]
    assert header_values(answered.invite, "Record-Route") == record_route, what
    assert call.dialog is not None
    assert call.dialog.route_set == record_route[::-1], what      # §12.1.2: reversed
    ending, other = (call, callee) if hangs_up == "caller" else (answered, caller)
    still_up = answered if ending is call else call
    byes_before = len(other.requests("BYE"))
    ending.bye()
    await until(lambda: ending.ended and ending.bye_status is not None, f"{what}: BYE answered")
    assert ending.bye_status == 200, what
    await until(lambda: still_up.ended, f"{what}: the other end saw the BYE")
    # The BYE went through serve and reached the other end over its own transport.
    bye, source = other.requests("BYE")[byes_before]
    assert source.transport == other.transport, what
    top = bye.via[0]
    assert (top.transport, top.host, top.port) == (
        other.transport, HOST, serve_port[other.transport]), (what, bye)
    assert len(bye.via) == 2, (what, bye)        # serve's and the sender's: nothing else


def test_tls_and_udp_phones_call_each_other_bye_from_either_end(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    serve, udp, tls = tls_serve(tmp_path, ca)
    # RFC 5658: one Record-Route per side, the callee's transport on top.
    rr_udp = f"<sip:{HOST}:{udp.port};lr>"
    rr_tls = f"<sip:{HOST}:{tls.port};transport=tls;lr>"
    ports = {"UDP": udp.port, "TLS": tls.port}

    async def main() -> None:
        async with Phone("alice", "TLS", ca, ca.issue("alice")) as alice, \
                Phone("bob", "UDP", ca) as bob:
            assert await alice.register(tls) == 200
            assert await bob.register(udp) == 200
            for hangs_up in ("caller", "callee"):
                await call_and_hang_up(alice, bob, tls, hangs_up, [rr_udp, rr_tls], ports)
                await call_and_hang_up(bob, alice, udp, hangs_up, [rr_tls, rr_udp], ports)

    try:
        run(asyncio.new_event_loop, main(), timeout=120)
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert log.count("method=INVITE status=200 outcome=answered") == 4, log
    assert "Traceback" not in log


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)")
def test_sipp_over_udp_calls_a_tls_phone(tmp_path: Path) -> None:
    """A real peer on the UDP side: sipp's BYE carries both of serve's Routes and reaches the
    TLS phone over a TLS connection serve opened to its Contact."""
    ca = TestCA(tmp_path)
    serve, udp, tls = tls_serve(tmp_path, ca)

    async def main() -> None:
        async with Phone("carol", "TLS", ca, ca.issue("carol")) as carol:
            assert await carol.register(tls) == 200
            loop = asyncio.get_running_loop()
            uac = await loop.run_in_executor(
                None, lambda: run_uac(tmp_path, "uac", udp.port, "carol", 2, rate=2,
                                      timeout=40))
            assert uac.returncode == 0 and successful(tmp_path, "uac") == 2, serve.log()
            await until(lambda: len(carol.requests("BYE")) == 2, "both BYEs at carol")
            for bye, source in carol.requests("BYE"):
                assert source.transport == "TLS"
                assert bye.headers.get("X-Leg") == "bye-via-route"
                assert bye.via[0].host == HOST and bye.via[0].port == tls.port

    try:
        run(asyncio.new_event_loop, main(), timeout=120)
    finally:
        assert serve.close() == 0
    text = (tmp_path / "uac.msg").read_text()
    both = f"Route: <sip:{HOST}:{udp.port};lr>, <sip:{HOST}:{tls.port};transport=tls;lr>"
    assert text.count(both) >= 4, text[-3000:]         # two ACKs and two BYEs


# -- sips ----------------------------------------------------------------------------------------


def test_sips_goes_only_over_tls(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    serve, udp, tls = tls_serve(tmp_path, ca)

    async def main() -> None:
        async with Phone("alice", "TLS", ca, ca.issue("alice")) as alice, \
                Phone("carol", "TLS", ca, ca.issue("carol")) as carol, \
                Phone("dave", "UDP", ca) as dave:
            assert await carol.register(tls, "sips") == 200
            assert await dave.register(udp, "sips") == 200
            # dave's binding is a sip: Contact over UDP: no sips request goes there (480).
            call = alice.call(f"sips:dave@{DOMAIN}", tls)
            await until(lambda: call.ended, "the sips call to a UDP phone refused")
            assert call.status == 480
            assert dave.requests("INVITE") == []
            # With a tls: listener sips is served: no 416, even for a request over UDP.
            lines = await asyncio.get_running_loop().run_in_executor(None, lambda: sip_exchange(
                udp.port, request("OPTIONS", f"sips:nobody@{DOMAIN}", call_id="s0")))
            assert final_status(lines) == 404, lines
            # carol registered over TLS: the sips call goes through, recorded with sips:.
            call = alice.call(f"sips:carol@{DOMAIN}", tls)
            await until(lambda: call.state == "confirmed" and len(carol.calls) == 1
                        and carol.calls[0].state == "confirmed", "the sips call answered")
            invite = carol.calls[0].invite
            assert header_values(invite, "Record-Route") == [f"<sips:{HOST}:{tls.port};lr>"]
            assert str(invite.uri).startswith("sips:carol@")
            answered = carol.calls[0]
            answered.bye()
            await until(lambda: answered.ended and call.ended, "the sips call ended by carol")
            assert answered.bye_status == 200
            [(_, source)] = alice.requests("BYE")
            assert source.transport == "TLS"

    try:
        run(asyncio.new_event_loop, main(), timeout=90)
    finally:
        assert serve.close() == 0
    assert "method=INVITE status=480" in serve.log()


@pytest.mark.parametrize("with_cert", [False, True], ids=["no-tls", "cert-but-no-tls-listener"])
def test_sips_without_a_tls_listener_is_416(tmp_path: Path, with_cert: bool) -> None:
    """No tls: listener, no sips path (our Record-Route could not name a TLS port) -- with a
    certificate given too (it is then only our client certificate)."""
    extra: list[str] = []
    if with_cert:
        cert = TestCA(tmp_path).issue("serve")
        extra = ["--tls-cert", str(cert.cert), "--tls-key", str(cert.key)]
    port = free_port()
    serve = Serve(tmp_path, port, *extra)
    try:
        lines = sip_exchange(port, request("OPTIONS", f"sips:bob@{DOMAIN}", call_id="s1"))
        assert final_status(lines) == 416, lines
        lines = sip_exchange(port, request("OPTIONS", f"sip:bob@{DOMAIN}", call_id="s2"))
        assert final_status(lines) == 404, lines
    finally:
        assert serve.close() == 0


# -- client certificates -------------------------------------------------------------------------


def _tls_exchange(port: int, ctx: ssl.SSLContext, message: str) -> str:
    """Send one request over a fresh TLS connection; what came back before the connection
    closed or WAIT seconds passed ("" for nothing), or the TLS error's name."""
    with socket.create_connection((HOST, port), timeout=WAIT) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=HOST) as s:
                me = s.getsockname()[1]
                s.sendall(message.replace("{me}", str(me)).encode())
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = s.recv(65535)
                    if not chunk:
                        break
                    data += chunk
                return data.decode(errors="replace")
        except ssl.SSLError as exc:
            return f"ssl error: {exc.reason}"
        except (ConnectionResetError, BrokenPipeError) as exc:
            return f"closed: {exc}"
        except TimeoutError:
            return "no answer"


def test_verify_client_refuses_a_client_without_certificate(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    serve, _, tls = tls_serve(tmp_path, ca, "--tls-verify-client")
    register = (request("REGISTER", f"sip:{DOMAIN}", call_id="vc1",
                        headers=[f"Contact: <sip:eve@{HOST}:{{me}};transport=tls>"])
                .replace("SIP/2.0/UDP", "SIP/2.0/TLS")
                .replace("From: <sip:tester@", "From: <sip:eve@")
                .replace(f"To: <sip:{DOMAIN}>", f"To: <sip:eve@{DOMAIN}>"))
    try:
        anonymous = ssl.create_default_context(cadata=ca.ca_pem.decode())
        got = _tls_exchange(tls.port, anonymous, register)
        assert not got.startswith("SIP/2.0"), got
        holder = ca.issue("eve", client=True)
        known = ssl.create_default_context(cadata=ca.ca_pem.decode())
        known.load_cert_chain(holder.cert, holder.key)
        got = _tls_exchange(tls.port, known, register.replace("vc1", "vc2"))
        assert got.startswith("SIP/2.0 200"), got
        # A certificate from another CA is no better than none.
        stranger = TestCA(tmp_path, "other-ca").issue("mallory", client=True)
        other = ssl.create_default_context(cadata=ca.ca_pem.decode())
        other.load_cert_chain(stranger.cert, stranger.key)
        got = _tls_exchange(tls.port, other, register.replace("vc1", "vc3"))
        assert not got.startswith("SIP/2.0"), got
    finally:
        assert serve.close() == 0
    assert serve.log().count("method=REGISTER status=200") == 1


# -- outgoing TLS: the next hop is verified ------------------------------------------------------


class TlsPeer:
    """A TLS server on 127.0.0.1 that answers 200 to every request: a next hop serve relays
    to.  ``received`` are the requests it got, ``sni`` the server names clients sent."""

    def __init__(self, cert: Issued) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert.cert, cert.key)
        self.sni: list[str | None] = []
        ctx.sni_callback = lambda sock, name, c: self.sni.append(name)
        self.transport = TransportLayer(tls_context=ctx)
        self.inbox = answer_with(self.transport)
        self.port = 0

    async def __aenter__(self) -> TlsPeer:  # noqa: PYI034 - typing.Self is 3.11+
        self.port = (await self.transport.listen(f"tls:{HOST}:0")).address.port
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.transport.close()

    @property
    def received(self) -> int:
        return len(self.inbox.items)


async def relay_options(serve: Address, target: str, call_id: str) -> int | None:
    """OPTIONS ``target`` sent to serve over UDP (from a trusted source: serve relays it);
    serve's final status."""
    loop = asyncio.get_running_loop()
    lines = await loop.run_in_executor(None, lambda: sip_exchange(
        serve.port, request("OPTIONS", target, call_id=call_id), timeout=WAIT))
    return final_status(lines)


def test_outgoing_tls_verifies_the_next_hop(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    peers_ca = TestCA(tmp_path, "peers-ca")
    unknown_ca = TestCA(tmp_path, "unknown-ca")
    trusted = ["--trusted", f"{HOST}/32"]
    serve, udp, _ = tls_serve(tmp_path, ca, *trusted, "--tls-ca", str(peers_ca.ca),
                              verify_ca=False)

    async def main() -> None:
        by_ip = peers_ca.issue("by-ip", ips=["127.0.0.1"], dns=())
        by_name = peers_ca.issue("by-name", ips=(), dns=["localhost"])
        rogue = unknown_ca.issue("rogue", ips=["127.0.0.1"], dns=["localhost"])
        async with TlsPeer(by_ip) as peer:
            # An IP literal: checked against the IP SANs; no SNI (RFC 6066 §3).
            assert await relay_options(udp, f"sip:svc@{HOST}:{peer.port};transport=tls",
                                       "ip") == 200
            assert peer.received == 1 and peer.sni == [None]
            # A name: SNI carries it, and the certificate must name it (this one does not).
            assert await relay_options(udp, f"sip:svc@localhost:{peer.port};transport=tls",
                                       "ip-by-name") == 503
            assert peer.received == 1 and peer.sni[-1] == "localhost"
        async with TlsPeer(by_name) as peer:
            assert await relay_options(udp, f"sip:svc@localhost:{peer.port};transport=tls",
                                       "name") == 200
            assert peer.received == 1 and peer.sni[-1] == "localhost"
            # The same server by IP: its certificate has no IP SAN for 127.0.0.1.
            assert await relay_options(udp, f"sip:svc@{HOST}:{peer.port};transport=tls",
                                       "name-by-ip") == 503
            assert peer.received == 1
        async with TlsPeer(rogue) as peer:
            # A CA serve was not told to trust: the handshake fails, nothing is delivered.
            assert await relay_options(udp, f"sip:svc@{HOST}:{peer.port};transport=tls",
                                       "rogue") == 503
            assert peer.received == 0

    try:
        run(asyncio.new_event_loop, main(), timeout=120)
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert "certificate does not verify" in log, log
    assert "tls next hops verified against" in log and str(peers_ca.ca) in log


def test_outgoing_tls_system_store_and_no_verify(tmp_path: Path) -> None:
    ca = TestCA(tmp_path)
    peer_cert = TestCA(tmp_path, "private-ca").issue("peer", ips=["127.0.0.1"])
    trusted = ["--trusted", f"{HOST}/32"]

    async def relay(serve: Address) -> tuple[int | None, int]:
        async with TlsPeer(peer_cert) as peer:
            status = await relay_options(
                serve, f"sip:svc@{HOST}:{peer.port};transport=tls", os.urandom(4).hex())
            return status, peer.received

    # Without --tls-ca: the system trust store, which does not know a private CA.
    serve, udp, _ = tls_serve(tmp_path, ca, *trusted, verify_ca=False)
    try:
        result: list[tuple[int | None, int]] = []

        async def main() -> None:
            result.append(await relay(udp))

        run(asyncio.new_event_loop, main(), timeout=60)
        assert result == [(503, 0)]
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert "certificate does not verify" in log and "--tls-no-verify-server" not in log, log
    # --tls-no-verify-server: connected anyway, and the operator was warned at start.
    serve, udp, _ = tls_serve(tmp_path, ca, *trusted, "--tls-no-verify-server",
                              verify_ca=False)
    try:
        result.clear()
        run(asyncio.new_event_loop, main(), timeout=60)
        assert result == [(200, 1)]
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert "WARNING" in log and "--tls-no-verify-server" in log, log


# -- bad options and files -----------------------------------------------------------------------


def serve_exit(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{free_port()}",
         *args], cwd=workdir, env=fastsip_env(), capture_output=True, text=True, timeout=60,
        check=False)


def test_bad_tls_options_and_files_exit_2_with_one_clear_line(tmp_path: Path) -> None:
    pytest.importorskip("cryptography")
    from cryptography.hazmat.primitives import serialization

    ca = TestCA(tmp_path)
    good = ca.issue("good")
    other = ca.issue("other")
    tls = f"tls:{HOST}:{free_port()}"
    combined = tmp_path / "combined.pem"
    combined.write_bytes(good.cert_pem + good.key_pem)
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all!\n"
                       "-----END CERTIFICATE-----\n")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(good.key_pem, None)
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    missing = tmp_path / "missing.pem"
    cert, key_file = str(good.cert), str(good.key)
    cases: list[tuple[list[str], str]] = [
        (["--listen", tls], f"--listen {tls}: needs --tls-cert"),
        (["--listen", tls, "--tls-cert", str(missing)],
         f"--tls-cert {missing}: cannot read it: No such file or directory"),
        (["--listen", tls, "--tls-cert", str(tmp_path)], f"--tls-cert {tmp_path}: cannot read it"),
        (["--listen", tls, "--tls-cert", str(text)], f"--tls-cert {text}: no PEM certificate"),
        (["--listen", tls, "--tls-cert", str(garbled), "--tls-key", key_file],
         f"--tls-cert {garbled}: the certificate is not valid PEM/X.509"),
        (["--listen", tls, "--tls-cert", cert],
         f"--tls-cert {cert}: no PEM private key in it"),
        (["--listen", tls, "--tls-cert", cert, "--tls-key", str(other.key)],
         f"--tls-key {other.key}: the private key does not match the certificate in {cert}"),
        (["--listen", tls, "--tls-cert", cert, "--tls-key", str(text)],
         f"--tls-key {text}: no PEM private key in it"),
        (["--listen", tls, "--tls-cert", cert, "--tls-key", str(encrypted)],
         f"--tls-key {encrypted}: the private key is encrypted"),
        (["--listen", tls, "--tls-cert", cert, "--tls-key", key_file, "--tls-ca", str(text)],
         f"--tls-ca {text}: no PEM CA certificate"),
        (["--listen", tls, "--tls-cert", cert, "--tls-key", key_file, "--tls-ca",
          str(missing)], f"--tls-ca {missing}: cannot read it"),
        (["--listen", tls, "--tls-cert", cert, "--tls-key", key_file, "--tls-verify-client"],
         "--tls-verify-client needs --tls-ca"),
        (["--tls-key", key_file], "--tls-key needs --tls-cert"),
        # Outgoing TLS only (no tls: listener): the CA is still checked at start.
        (["--tls-ca", str(garbled)], f"--tls-ca {garbled}: the certificate is not valid"),
    ]
    for args, message in cases:
        r = serve_exit(tmp_path, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"fastsip serve: {message}"), (args,
                                                                                      r.stderr)
        assert "Traceback" not in r.stderr
    # The key in the certificate file (no --tls-key) is fine: serve starts.
    port = free_port()
    serve = Serve(tmp_path, port, "--listen", f"tls:{HOST}:{free_port()}",
                  "--tls-cert", str(combined))
    assert serve.close() == 0

"""``fastsip serve`` with PJSIP, a SIP stack nobody here wrote, through its Python binding
(``pjsua2``; PyPI ``pjsua2-python``).

Each user agent is a ``tests/pjsua_peer.py`` process (a crash or hang in the C library cannot
take pytest down; every wait is bounded).  Two accounts, ``alice`` and ``bob`` of
``example.com``, register through serve as their outbound proxy and call each other:

- over UDP, TCP and IPv6 (UDP and TCP on ``[::1]``; RTP stays on IPv4 loopback, the wheel's
  PJSIP has no IPv6 media), the BYE from the caller in some cases and from the callee in
  others: both register (200), both calls reach CONFIRMED, both end DISCONNECTED, the BYE
  reaches the other side through serve (its Via on top) and is answered 200, and serve logs
  ``outcome=answered``;
- the caller hangs up while the callee rings: CANCEL, the callee's call ends with 487, serve
  logs ``outcome=cancelled``;
- the callee answers 486 Busy Here: the caller's call ends with 486;
- over TLS with a throwaway CA, the clients verifying serve's certificate (and, in a second
  case, serve verifying the clients'), with the controls that show the verification is real;
- caller and callee on different transports or address families (IPv6 to IPv4, TLS to UDP,
  IPv4 UDP to IPv6 TCP) through serve listening on both;
- a client behind a NAT it does not know of (its Contact says 127.0.0.2, it sends from
  127.0.0.1), called and calling: reached at its source, the in-dialog BYE too;
- registered the way PJSIP is most often set up, with the server's own address as the
  registrar URI.

Skipped where ``pjsua2-python`` has no wheel (it is in the ``test`` extra where it has one).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

pytest.importorskip(
    "pjsua2", reason="pjsua2-python (PJSIP's Python binding) is not installed: it has wheels "
    "only for CPython 3.8-3.12 on Linux x86_64 (glibc), macOS and Windows")

sys.path.insert(0, str(Path(__file__).parent))
from clientutil import PjsuaPeer, pjsip_messages
from netutil import hostport, needs_ipv6
from procutil import free_port
from serveutil import DOMAIN, Serve
from tlsutil import TestCA

#: PJSIP's transport names in its log, by ours.
PJSIP_TRANSPORT = {"udp": "UDP", "tcp": "TCP", "tls": "TLS"}


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """Every process runs here: ``python -m`` puts its cwd on sys.path, and a checkout's
    uncompiled fastsip/ must not shadow the installed one."""
    return tmp_path


class Leg(NamedTuple):
    """How one account reaches serve: the transport, and the address both sides use."""

    transport: str = "udp"
    host: str = "127.0.0.1"


class Setup:
    """Where serve listens and how alice (the caller) and bob (the callee) reach it: over the
    same transport and address, or each over its own (``callee``)."""

    def __init__(self, transport: str = "udp", host: str = "127.0.0.1", *,
                 callee: Leg | None = None, serve_args: tuple[str, ...] = (),
                 peer_args: tuple[str, ...] = ()) -> None:
        self.caller = Leg(transport, host)
        self.callee = callee or self.caller
        self.port = free_port(host)
        self.serve_args, self.peer_args = serve_args, peer_args

    def address(self, leg: Leg) -> str:
        """serve's address on the leg, as PJSIP logs it."""
        return hostport(leg.host, self.port)

    def serve(self, workdir: Path) -> Serve:
        listen = dict.fromkeys(f"{leg.transport}:{self.address(leg)}"
                               for leg in (self.caller, self.callee))
        return Serve(workdir, self.port, *self.serve_args, listen=list(listen))

    def peer(self, workdir: Path, user: str, leg: Leg, *extra: str) -> PjsuaPeer:
        proxy = f"sip:{self.address(leg)};lr"
        if leg.transport != "udp":
            proxy += f";transport={leg.transport}"
        # PJSIP rewrites its Contact when the registrar's Via says it was received from
        # another port (always over TCP and TLS: the connection's port is not the listener's);
        # over IPv6 that rewrite fails an assertion inside the wheel's PJSIP, which dies.
        if leg.transport != "udp" and ":" in leg.host:
            extra += ("--no-nat-rewrite",)
        return PjsuaPeer(workdir, user, "--user", user, "--domain", DOMAIN,
                         "--transport", leg.transport, "--bind", leg.host,
                         "--proxy", proxy, "--registrar", f"sip:{DOMAIN}",
                         *self.peer_args, *extra)


def tls_args(workdir: Path, verify_client: bool = False
             ) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """serve's and the clients' arguments for TLS with a CA made for the test: serve presents
    a certificate for 127.0.0.1 and ::1; the clients trust only that CA and verify it.  With
    ``verify_client``, serve asks for the clients' certificates (issued by the same CA)."""
    ca = TestCA(workdir)
    server = ca.issue("serve")
    serve_args = ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
                  "--tls-ca", str(ca.ca)]
    peer_args = ["--ca", str(ca.ca), "--verify-server"]
    if verify_client:
        client = ca.issue("client", client=True)
        serve_args.append("--tls-verify-client")
        peer_args += ["--cert", str(client.cert), "--key", str(client.key)]
    return tuple(serve_args), tuple(peer_args)


@contextmanager
def registered_pair(workdir: Path, setup: Setup, bob_answers: str = "180,200"
                    ) -> Iterator[tuple[Serve, PjsuaPeer, PjsuaPeer]]:
    """serve, and alice and bob registered through it (bob answers incoming calls with
    ``bob_answers``); everything is stopped on the way out, serve last."""
    serve = setup.serve(workdir)
    peers: list[PjsuaPeer] = []
    try:
        alice = setup.peer(workdir, "alice", setup.caller)
        peers.append(alice)
        bob = setup.peer(workdir, "bob", setup.callee, "--answer", bob_answers)
        peers.append(bob)
        for peer in peers:
            peer.expect(r"^READY ")
        for peer in peers:
            reg = peer.expect(r"^REG code=(\d+)")
            assert reg[1] == "200", (peer.lines, serve.log())
        yield serve, alice, bob
    finally:
        PjsuaPeer.close_all(peers)
        assert serve.close() == 0, serve.log()


# -- calls answered and ended with BYE -----------------------------------------------------------


@pytest.mark.parametrize(("transport", "host", "bye_from"), [
    ("udp", "127.0.0.1", "caller"),
    ("udp", "127.0.0.1", "callee"),
    ("tcp", "127.0.0.1", "callee"),
    pytest.param("udp", "::1", "callee", marks=needs_ipv6),
    pytest.param("tcp", "::1", "caller", marks=needs_ipv6),
], ids=["udp-bye-caller", "udp-bye-callee", "tcp-bye-callee", "udp6-bye-callee",
        "tcp6-bye-caller"])
def test_call_answered_and_ended(workdir: Path, transport: str, host: str,
                                 bye_from: str) -> None:
    call_answered_and_ended(workdir, Setup(transport, host), bye_from)


@pytest.mark.parametrize(("caller", "callee", "bye_from"), [
    pytest.param(Leg("udp", "::1"), Leg("udp", "127.0.0.1"), "callee", marks=needs_ipv6),
    (Leg("tls", "127.0.0.1"), Leg("udp", "127.0.0.1"), "caller"),
    pytest.param(Leg("udp", "127.0.0.1"), Leg("tcp", "::1"), "callee", marks=needs_ipv6),
], ids=["udp6-to-udp4-bye-callee", "tls-to-udp-bye-caller", "udp4-to-tcp6-bye-callee"])
def test_call_across_transports_and_families(workdir: Path, caller: Leg, callee: Leg,
                                             bye_from: str) -> None:
    """Caller and callee reach serve over different transports or address families; serve
    listens on both.  (From IPv6 to IPv4 serve recorded one route before issue 10, with its
    IPv4 address: the caller could not send its ACK and the callee's call never confirmed.)"""
    tls = "tls" in (caller.transport, callee.transport)
    serve_args, peer_args = tls_args(workdir) if tls else ((), ())
    setup = Setup(*caller, callee=callee, serve_args=serve_args, peer_args=peer_args)
    call_answered_and_ended(workdir, setup, bye_from)


def call_answered_and_ended(workdir: Path, setup: Setup, bye_from: str) -> None:
    with registered_pair(workdir, setup) as (serve, alice, bob):
        alice.send(f"call sip:bob@{DOMAIN}")
        bob.expect(r"^INCOMING from=.*sip:alice@example\.com")
        for peer in (alice, bob):
            peer.expect(r"^CALL state=CONFIRMED code=200")
        (alice if bye_from == "caller" else bob).send("hangup")
        for peer in (alice, bob):
            peer.expect(r"^CALL state=DISCONNECTED")
    hanger, other = (alice, bob) if bye_from == "caller" else (bob, alice)
    other_leg = setup.callee if other is bob else setup.caller
    log = serve.log()
    assert "method=REGISTER status=200 outcome=registered" in log
    assert "method=INVITE status=200 outcome=answered" in log, log
    # Everything came from serve, on each side over that side's transport and address: the
    # INVITE to bob, and the BYE to the side that did not hang up, with serve's Via on top
    # and the hanger's below.
    invites = pjsip_messages(bob.log(), "RX", "INVITE")
    assert invites, bob.log()[-3000:]
    assert all(m.transport == PJSIP_TRANSPORT[setup.callee.transport]
               and m.peer == setup.address(setup.callee) for m in invites), invites
    byes = pjsip_messages(other.log(), "RX", "BYE")
    assert len(byes) == 1, (byes, other.log()[-3000:])
    assert byes[0].transport == PJSIP_TRANSPORT[other_leg.transport], byes[0]
    assert byes[0].peer == setup.address(other_leg), byes[0]
    vias = byes[0].headers("Via")
    assert len(vias) == 2 and setup.address(other_leg) in vias[0], byes[0]
    # ... and the hanger had its 200 for the BYE back through serve.
    assert pjsip_messages(hanger.log(), "RX", "200/BYE"), hanger.log()[-3000:]


@pytest.mark.parametrize("nated", ["callee", "caller"])
def test_client_behind_nat_is_reached_at_its_source(workdir: Path, nated: str) -> None:
    """alice behaves as a phone behind a NAT that does not know it: her Via, Contact and SDP
    say 127.0.0.2 (where nothing of hers listens) while she sends from 127.0.0.1, and she does
    not correct them from the registrar's received/rport.  serve must reach her where her
    requests come from: the INVITE when she is called, and bob's in-dialog BYE either way.
    (Before issue 10 a UDP binding was reached at its Contact: she was unreachable.)"""
    setup = Setup()
    serve = setup.serve(workdir)
    peers: list[PjsuaPeer] = []
    try:
        alice = setup.peer(workdir, "alice", setup.caller, "--public-address", "127.0.0.2",
                           "--no-nat-rewrite", "--answer", "180,200")
        bob = setup.peer(workdir, "bob", setup.callee, "--answer", "180,200")
        peers += [alice, bob]
        for peer in peers:
            assert peer.expect(r"^REG code=(\d+)")[1] == "200", (peer.lines, serve.log())
        caller, callee = (bob, "alice") if nated == "callee" else (alice, "bob")
        caller.send(f"call sip:{callee}@{DOMAIN}")
        for peer in peers:
            peer.expect(r"^CALL state=CONFIRMED code=200")
        bob.send("hangup")
        for peer in peers:
            peer.expect(r"^CALL state=DISCONNECTED")
    finally:
        PjsuaPeer.close_all(peers)
        assert serve.close() == 0, serve.log()
    # She kept saying 127.0.0.2 ...
    registers = pjsip_messages(alice.log(), "TX", "REGISTER")
    assert registers and all("@127.0.0.2:" in m.headers("Contact")[0] for m in registers), (
        registers)
    # ... and got every request from serve all the same: the INVITE (when called) and the BYE.
    wanted = ["INVITE", "BYE"] if nated == "callee" else ["BYE"]
    for method in wanted:
        got = pjsip_messages(alice.log(), "RX", method)
        assert len(got) == 1 and got[0].peer == setup.address(setup.caller), (method, got)
    assert pjsip_messages(bob.log(), "RX", "200/BYE"), bob.log()[-3000:]
    assert "method=INVITE status=200 outcome=answered" in serve.log()


# -- a call cancelled while ringing, a call refused ------------------------------------------------


def test_cancel_while_ringing(workdir: Path) -> None:
    """alice calls bob, who only rings; alice hangs up: CANCEL."""
    with registered_pair(workdir, Setup(), bob_answers="180") as (serve, alice, bob):
        alice.send(f"call sip:bob@{DOMAIN}")
        bob.expect(r"^INCOMING ")
        alice.expect(r"^CALL state=EARLY code=180")
        alice.send("hangup")
        alice.expect(r"^CALL state=DISCONNECTED")
        bob.expect(r"^CALL state=DISCONNECTED")
    # The CANCEL went through serve to bob, whose INVITE then ended with 487; alice had her
    # 200 for the CANCEL and the 487 for the INVITE.
    cancels = pjsip_messages(bob.log(), "RX", "CANCEL")
    assert len(cancels) == 1, bob.log()[-3000:]
    assert pjsip_messages(bob.log(), "TX", "487/INVITE"), bob.log()[-3000:]
    assert pjsip_messages(alice.log(), "RX", "200/CANCEL"), alice.log()[-3000:]
    assert pjsip_messages(alice.log(), "RX", "487/INVITE"), alice.log()[-3000:]
    assert [line for line in alice.lines if line.startswith("CALL state=DISCONNECTED")] == [
        "CALL state=DISCONNECTED code=487 reason=Request Terminated"], alice.lines
    log = serve.log()
    assert "method=INVITE status=487 outcome=cancelled" in log, log


def test_busy_callee_486(workdir: Path) -> None:
    with registered_pair(workdir, Setup(), bob_answers="486") as (serve, alice, bob):
        alice.send(f"call sip:bob@{DOMAIN}")
        assert alice.expect(r"^CALL state=DISCONNECTED code=(\d+)")[1] == "486", alice.lines
        bob.expect(r"^CALL state=DISCONNECTED")
    assert not any("CONFIRMED" in line for line in alice.lines + bob.lines)
    # The 486 was relayed (not made up by serve): bob sent it, alice received it from serve.
    assert pjsip_messages(bob.log(), "TX", "486/INVITE")
    assert pjsip_messages(alice.log(), "RX", "486/INVITE")
    assert "method=INVITE status=486 outcome=rejected" in serve.log()


# -- TLS with a throwaway CA ---------------------------------------------------------------------


@pytest.mark.parametrize("verify_client", [False, True], ids=["server-cert", "mutual"])
def test_tls_call_with_verified_certificates(workdir: Path, verify_client: bool) -> None:
    """serve presents a certificate from a CA made for the test; both clients trust only that
    CA and verify serve's certificate.  With ``--tls-verify-client`` serve also verifies the
    clients' certificates (issued by the same CA)."""
    serve_args, peer_args = tls_args(workdir, verify_client)
    setup = Setup("tls", serve_args=serve_args, peer_args=peer_args)
    call_answered_and_ended(workdir, setup, "caller")


@pytest.mark.parametrize("case", ["client-trusts-another-ca", "certificate-for-another-address",
                                  "client-without-certificate"])
def test_tls_refused_without_the_right_certificates(workdir: Path, case: str) -> None:
    """The controls for the test above, so that it cannot pass without verification: a
    client trusting another CA does not register through serve, nor one that trusts the CA
    but is shown a certificate for another address; with ``--tls-verify-client`` a client
    without a certificate does not either."""
    ca = TestCA(workdir)
    server = (ca.issue("serve", ips=["192.0.2.1"], dns=["sip.example.net"])
              if case == "certificate-for-another-address" else ca.issue("serve"))
    serve_args = ["--tls-cert", str(server.cert), "--tls-key", str(server.key),
                  "--tls-ca", str(ca.ca)]
    if case == "client-trusts-another-ca":
        peer_args = ["--ca", str(TestCA(workdir, "other-ca").ca), "--verify-server"]
    else:
        if case == "client-without-certificate":
            serve_args.append("--tls-verify-client")
        peer_args = ["--ca", str(ca.ca), "--verify-server"]
    setup = Setup("tls", serve_args=tuple(serve_args), peer_args=tuple(peer_args))
    serve = setup.serve(workdir)
    alice = setup.peer(workdir, "alice", setup.caller)
    try:
        code = alice.expect(r"^REG code=(\d+)")[1]
    finally:
        alice.close()
        serve.close()
    assert code != "200", alice.lines
    assert "outcome=registered" not in serve.log()


# -- the server addressed by IP ------------------------------------------------------------------


def test_register_with_the_server_address_as_registrar(workdir: Path) -> None:
    """No outbound proxy: the REGISTER goes to ``sip:127.0.0.1:PORT`` (the server's address,
    how PJSIP's registrar field is usually filled in) for ``alice@example.com``.  (It got
    403 "domain not served here" before issue 10.)"""
    port = free_port()
    serve = Serve(workdir, port)
    alice = PjsuaPeer(workdir, "alice", "--user", "alice", "--domain", DOMAIN,
                      "--registrar", f"sip:127.0.0.1:{port}")
    try:
        code = alice.expect(r"^REG code=(\d+)")[1]
    finally:
        alice.close()
        serve.close()
    assert code == "200", (alice.lines, serve.log())
    assert "method=REGISTER status=200 outcome=registered" in serve.log()

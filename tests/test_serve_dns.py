"""``fastsip serve`` locating next hops by RFC 3263 against a real DNS server (dnsmasq on
127.0.0.1, tests/dnsutil.py), with sipp callers and callees on loopback.

A routes module relays every call to ``sip:USER@<zone name>``; the zone's SRV/NAPTR records
point at sipp UASes on 127.0.0.1 (different ports):

- a Route to a name (the routes module pushes one): SRV locates the Route's host;
- SRV priority 10 then 20: every call reaches the priority 10 UAS; the answers are cached (one
  SRV query for all the calls, counted in dnsmasq's query log);
- the priority 10 target is down (nothing listens there): the branch times out (Timer B, short
  with ``--t1``) and the call completes at the priority 20 one;
- the priority 10 target answers 503 with Retry-After: the call completes at the next one, and
  the next call skips the first (blacklisted for Retry-After seconds);
- ``transport=tcp`` and the first SRV target refuses the connection: the call goes to the next
  at once (a transport error needs no timer);
- NAPTR prefers TCP: serve sends the INVITE over TCP to a sipp UAS on TCP;
- a CANCEL while the look-up is pending gets its 487 at once (nothing was sent downstream);
- a DNS server that never answers: the caller gets 503 naming the DNS failure after
  ``--dns-timeout``, and meanwhile serve answers other requests at once.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from dnsutil import DNSMASQ, Dnsmasq
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    finish,
    register_request,
    request,
    run_uac,
    sip_exchange,
    sipp,
    start_uas,
    successful,
)

pytestmark = [
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)"),
    pytest.mark.skipif(DNSMASQ is None, reason="dnsmasq is not installed"),
]

ROUTES = '''
from fastsip.app import route

@route
def initial(req):
    if req.method in ("INVITE", "OPTIONS") and req.uri.user != "local":
        return req.relay(to=f"sip:{{req.uri.user}}@{zone}", route={route!r})
    return None
'''


def _serve(workdir: Path, dns: Dnsmasq | str, zone: str, *extra: str,
           tcp: bool = False, route: Sequence[str] = ()) -> Serve:
    routes = workdir / "dns_routes.py"
    routes.write_text(ROUTES.format(zone=zone, route=list(route)))
    server = dns.server if isinstance(dns, Dnsmasq) else dns
    # --trusted: the sipp caller may relay to a foreign domain (the relay policy).
    return Serve(workdir, free_port(), "--routes", str(routes), "--trusted", "127.0.0.0/8",
                 "--dns-server", server, *extra, tcp=tcp)


def _srv_zone(first: int, second: int) -> list[str]:
    return [f"--srv-host=_sip._udp.example.test,uas1.example.test,{first},10,0",
            f"--srv-host=_sip._udp.example.test,uas2.example.test,{second},20,0",
            "--host-record=uas1.example.test,127.0.0.1",
            "--host-record=uas2.example.test,127.0.0.1"]


def _stop(*procs: object) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:  # type: ignore[attr-defined]
            proc.kill()  # type: ignore[attr-defined]
            proc.communicate()  # type: ignore[attr-defined]


def test_calls_reach_the_srv_targets_in_priority_order(tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    dns = Dnsmasq(tmp_path, _srv_zone(p1, p2))
    serve = _serve(tmp_path, dns, "example.test")
    uas1 = uas2 = None
    try:
        uas1 = start_uas(tmp_path, "uas1", p1, 3)
        uas2 = start_uas(tmp_path, "uas2", p2, 3)
        uac = run_uac(tmp_path, "uac", serve.port, "bob", 3, rate=5)
        finish(uas1, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 3, serve.log()
        assert successful(tmp_path, "uas1") == 3
        uas2_msg = tmp_path / "uas2.msg"
        assert not uas2_msg.exists() or "INVITE sip:" not in uas2_msg.read_text()
    finally:
        _stop(uas1, uas2)
        assert serve.close() == 0
        dns.close()
    # Cached for the records' TTL (60 s): one question of each kind for the three calls.
    assert dns.queries("SRV", "_sip._udp.example.test") == 1
    assert dns.queries("NAPTR", "example.test") == 1
    assert dns.queries("A", "uas1.example.test") == 1


def test_a_route_to_a_name_is_located_by_srv(tmp_path: Path) -> None:
    """The next hop is the first Route (loose routing), not the Request-URI: its name is
    what SRV locates."""
    p_uas, p_elsewhere = free_port(), free_port()
    dns = Dnsmasq(tmp_path, _srv_zone(p_uas, free_port()))
    serve = _serve(tmp_path, dns, f"127.0.0.1:{p_elsewhere}",
                   route=["<sip:example.test;lr>"])
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", p_uas, 1)
        uac = run_uac(tmp_path, "uac", serve.port, "bob", 1)
        finish(uas, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 1, serve.log()
        assert successful(tmp_path, "uas") == 1
        invite = (tmp_path / "uas.msg").read_text()
        assert f"INVITE sip:bob@127.0.0.1:{p_elsewhere} SIP/2.0" in invite
        assert "Route: <sip:example.test;lr>" in invite
    finally:
        _stop(uas)
        assert serve.close() == 0
        dns.close()
    assert dns.queries("SRV", "_sip._udp.example.test") == 1


def test_first_target_down_fails_over_to_the_second(tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()           # nothing will listen on p1
    dns = Dnsmasq(tmp_path, _srv_zone(p1, p2))
    # --t1 0.05: Timer B (64*T1) ends the dead branch after 3.2 s instead of 32 s.
    serve = _serve(tmp_path, dns, "example.test", "--t1", "0.05")
    uas2 = None
    try:
        uas2 = start_uas(tmp_path, "uas2", p2, 1)
        started = time.monotonic()
        uac = run_uac(tmp_path, "uac", serve.port, "bob", 1)
        took = time.monotonic() - started
        finish(uas2, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 1, serve.log()
        assert successful(tmp_path, "uas2") == 1
        assert took > 3.0           # it did wait for the first target's Timer B
        log = serve.wait_log("method=INVITE status=200 outcome=answered")
        assert f"127.0.0.1:{p1} failed (408): trying udp:127.0.0.1:{p2}" in log, log
    finally:
        _stop(uas2)
        assert serve.close() == 0
        dns.close()


def test_503_with_retry_after_fails_over_and_blacklists(tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    dns = Dnsmasq(tmp_path, _srv_zone(p1, p2))
    serve = _serve(tmp_path, dns, "example.test")
    busy = uas2 = None
    try:
        # The priority 10 server answers 503 Retry-After: 60 to one INVITE (then would stop).
        busy = sipp("uas_503_retry_after.xml", tmp_path, "busy", "-p", str(p1), "-m", "1",
                    background=True, timeout=30)
        uas2 = start_uas(tmp_path, "uas2", p2, 2)
        uac = run_uac(tmp_path, "uac", serve.port, "bob", 1)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 1, serve.log()
        finish(busy, 10)
        assert busy.returncode == 0 and successful(tmp_path, "busy") == 1
        # The next call goes straight to the second target: the first is blacklisted.
        uac = run_uac(tmp_path, "uac2", serve.port, "bob", 1)
        assert uac.returncode == 0 and successful(tmp_path, "uac2") == 1, serve.log()
        finish(uas2, 30)
        assert successful(tmp_path, "uas2") == 2
        log = serve.wait_log("method=INVITE status=200 outcome=answered", times=2)
        assert f"failed (503): trying udp:127.0.0.1:{p2}" in log
        assert "unavailable for 60 s" in log
        assert log.count("method=INVITE status=200 outcome=answered") == 2
    finally:
        _stop(busy, uas2)
        assert serve.close() == 0
        dns.close()


def test_transport_error_fails_over_at_once(tmp_path: Path) -> None:
    """``transport=tcp`` in the URI: SRV for TCP only (no NAPTR).  The first target refuses the
    connection: the next one gets the call without waiting for any timer."""
    p1, p2 = free_port(), free_port()           # nothing will listen on p1
    dns = Dnsmasq(tmp_path, [
        f"--srv-host=_sip._tcp.down.test,uas.down.test,{p1},10,0",
        f"--srv-host=_sip._tcp.down.test,uas.down.test,{p2},20,0",
        "--host-record=uas.down.test,127.0.0.1"])
    serve = _serve(tmp_path, dns, "down.test;transport=tcp", tcp=True)
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", p2, 1, "-t", "t1")
        started = time.monotonic()
        uac = run_uac(tmp_path, "uac", serve.port, "bob", 1)
        took = time.monotonic() - started
        finish(uas, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 1, serve.log()
        assert successful(tmp_path, "uas") == 1
        assert took < 10.0, took     # no Timer B (32 s) was waited for
        serve.wait_log(f"127.0.0.1:{p1} failed (503): trying tcp:127.0.0.1:{p2}")
    finally:
        _stop(uas)
        assert serve.close() == 0
        dns.close()
    assert dns.queries("NAPTR", "down.test") == 0
    assert dns.queries("SRV", "_sip._tcp.down.test") == 1


def test_naptr_for_tcp_makes_serve_use_tcp(tmp_path: Path) -> None:
    p_tcp, p_udp = free_port(), free_port()
    dns = Dnsmasq(tmp_path, [
        "--naptr-record=tcp.test,20,10,S,SIP+D2U,,_sip._udp.tcp.test",
        "--naptr-record=tcp.test,10,10,S,SIP+D2T,,_sip._tcp.tcp.test",
        f"--srv-host=_sip._tcp.tcp.test,uas.tcp.test,{p_tcp},10,0",
        f"--srv-host=_sip._udp.tcp.test,uas.tcp.test,{p_udp},10,0",
        "--host-record=uas.tcp.test,127.0.0.1"])
    serve = _serve(tmp_path, dns, "tcp.test", tcp=True)
    uas = None
    try:
        uas = start_uas(tmp_path, "uas", p_tcp, 1, "-t", "t1")
        uac = run_uac(tmp_path, "uac", serve.port, "bob", 1)
        finish(uas, 30)
        assert uac.returncode == 0 and successful(tmp_path, "uac") == 1, serve.log()
        assert successful(tmp_path, "uas") == 1
        invite = (tmp_path / "uas.msg").read_text()
        assert f"SIP/2.0/TCP {HOST}:{serve.port};branch=" in invite
    finally:
        _stop(uas)
        assert serve.close() == 0
        dns.close()
    assert dns.queries("NAPTR", "tcp.test") == 1
    assert dns.queries("SRV", "_sip._tcp.tcp.test") == 1


def test_dns_server_that_never_answers_gives_a_clear_503_without_stalling(
        tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole:
        hole.bind((HOST, 0))                          # takes queries, answers none
        serve = _serve(tmp_path, f"{HOST}:{hole.getsockname()[1]}", "example.test",
                       "--dns-timeout", "2")
        try:
            result: list[list[str]] = []
            call = threading.Thread(target=lambda: result.append(sip_exchange(
                serve.port, request("OPTIONS", f"sip:far@{DOMAIN}", call_id="dns-1"),
                timeout=10, full=True)))
            started = time.monotonic()
            call.start()
            time.sleep(0.3)
            # While that request waits for DNS, serve answers others at once.
            for i in range(3):
                t0 = time.monotonic()
                lines = sip_exchange(serve.port, register_request(f"u{i}", f"reg-{i}"))
                assert lines and lines[-1].startswith("SIP/2.0 200"), lines
                assert time.monotonic() - t0 < 1.0
            call.join(15)
            took = time.monotonic() - started
            (reply,) = [r for r in result[0] if int(r.split()[1]) >= 200]
            status_line = reply.split("\r\n", 1)[0]
            assert status_line.startswith("SIP/2.0 503 Service Unavailable (DNS failure for "
                                          "example.test: no answer from the DNS server"), reply
            assert 1.5 < took < 6, took
        finally:
            assert serve.close() == 0


def test_cancel_while_dns_is_pending_gets_487_at_once(tmp_path: Path) -> None:
    """A CANCEL for an INVITE whose next hop is still being looked up (the DNS server never
    answers): nothing was sent downstream, so the 487 comes at once, not after the DNS
    timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as hole, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        hole.bind((HOST, 0))
        phone.bind((HOST, 0))
        phone.settimeout(0.2)
        me = phone.getsockname()[1]
        serve = _serve(tmp_path, f"{HOST}:{hole.getsockname()[1]}", "example.test",
                       "--dns-timeout", "8")
        try:
            uri = f"sip:far@{DOMAIN}"
            invite = request("INVITE", uri, call_id="cancel-dns").replace("{me}", str(me))
            cancel = request("CANCEL", uri, call_id="cancel-dns").replace("{me}", str(me))
            phone.sendto(invite.encode(), (HOST, serve.port))
            got: list[str] = []
            deadline = time.monotonic() + 5

            def until(status: str) -> bool:
                while time.monotonic() < deadline:
                    try:
                        data = phone.recv(65535).decode(errors="replace")
                    except OSError:
                        continue
                    got.append(data.split("\r\n", 1)[0] + " / " +
                               next((h for h in data.split("\r\n") if h.startswith("CSeq")), ""))
                    if data.startswith(status):
                        return True
                return False
            assert until("SIP/2.0 100"), got
            time.sleep(0.5)                         # the DNS query is on its way, unanswered
            started = time.monotonic()
            phone.sendto(cancel.encode(), (HOST, serve.port))
            assert until("SIP/2.0 487"), got
            assert time.monotonic() - started < 2.0, got
            assert any(g.startswith("SIP/2.0 200") and "CANCEL" in g for g in got), got
        finally:
            assert serve.close() == 0

"""``fastsip serve --workers 2`` with TCP listeners, with sipp: a phone registered over its own
TCP connection is called over it by a caller on another TCP connection, and every call
completes whichever worker owns it (Call-ID) and whichever holds each connection (the kernel
chose): messages on a connection are handed to the owner, and the owner's bytes go back to
the connection's holder.  A worker SIGKILLed mid-load loses only its own calls and its own
connections; a phone whose connection it held is a closed flow (its calls fail at once, as
RFC 3261 §18.4 wants, instead of waiting out Timer B).  (Redis, started here, is the shared
location store.)"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from procutil import HOST, free_port, wait_until
from redisutil import RedisServer
from serveutil import DOMAIN, SCENARIOS, SIPP, Serve, finish, run_uac, sipp, successful
from test_serve_workers import stopped_counts, worker_pids, workers_serve

from fastsip.asyncio.workers import reuse_port_supported
from fastsip.transport.rules import call_id_shard

pytestmark = [
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed"),
    pytest.mark.skipif(not reuse_port_supported(), reason="needs Linux SO_REUSEPORT"),
]


def tcp_workers_serve(tmp_path: Path, port: int, redis: RedisServer, *extra: str,
                      placement: str = "hashed") -> Serve:
    """Hashed placement unless asked (``--spread-above 0``): which worker owns a call then
    follows from its Call-ID, and half the calls cross from their connection's holder --
    what these tests are about."""
    spread = ("--spread-above", "0") if placement == "hashed" else ()
    return workers_serve(tmp_path, port, redis, *spread, *extra,
                         listen=[f"tcp:{HOST}:{port}"])


def counters(log: str, name: str) -> list[int]:
    """One hand-off counter from each worker's last line (in stop order)."""
    return [int(n) for n in re.findall(rf"\b{name}=(\d+)", log)]


def holder(serve_port: int, client_port: int, pids: Sequence[int]) -> int | None:
    """Which of ``pids`` holds our end of the TCP connection from ``client_port`` (the
    kernel's choice among the workers' SO_REUSEPORT listeners): its inode in /proc/net/tcp,
    then the process with that socket open."""
    inode = None
    want_local, want_remote = f"{serve_port:04X}", f"{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if (fields[1].endswith(":" + want_local) and fields[2].endswith(":" + want_remote)
                and fields[3] == "01"):                     # ESTABLISHED
            inode = fields[9]
    if inode is None:
        return None
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                        return pid
    return None


def established_from(port: int) -> int:
    """How many established TCP connections have local port ``port``."""
    want = f":{port:04X}"
    return sum(1 for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
               if line.split()[1].endswith(want) and line.split()[3] == "01")


def port_held_by(serve_port: int, pid: int, pids: Sequence[int]) -> int:
    """A local port from which a connection to ``serve_port`` lands in worker ``pid``: the
    kernel picks a SO_REUSEPORT listener by a hash of the addresses, so the same port lands
    there again.  (Probes end with a RST: no TIME_WAIT keeps the port from sipp.)"""
    for _ in range(40):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            probe.bind((HOST, port))
            probe.connect((HOST, serve_port))
            found = None
            deadline = time.monotonic() + 2
            while found is None and time.monotonic() < deadline:
                found = holder(serve_port, port, pids)
                if found is None:
                    time.sleep(0.02)
        if found == pid:
            time.sleep(0.1)
            return port
    raise AssertionError(f"no port lands in worker pid {pid}")


def start_phone(tmp_path: Path, name: str, serve_port: int, user: str, port: int,
                hold_ms: int) -> subprocess.Popen[str]:
    """sipp as a phone that registers ``user`` over its own TCP connection (from ``port``)
    and answers, on that connection, the calls that come for it for ``hold_ms``."""
    return sipp("register_tcp_phone.xml", tmp_path, name, f"{HOST}:{serve_port}",
                "-p", str(port), "-t", "t1", "-m", "1", "-d", str(hold_ms), "-s", user,
                "-key", "domain", DOMAIN, "-key", "expires", "3600",
                "-oocsf", str(SCENARIOS / "uas_rr.xml"),
                background=True, timeout=hold_ms / 1000 + 30)


def registered(serve: Serve, user: str) -> bool:
    return "status=200 outcome=registered" in serve.log() and \
        f"from=sip:{user}@{DOMAIN}" in serve.log()


def uac_counts(tmp_path: Path, name: str) -> dict[str, int]:
    rows = list(csv.reader((tmp_path / f"{name}.csv").read_text().splitlines(), delimiter=";"))
    last = dict(zip(rows[0], rows[-1]))
    return {k: int(last[k]) for k in ("SuccessfulCall(C)", "FailedCall(C)")}


def stop_quietly(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.mark.parametrize("placement", ["hashed", "packed"])
def test_tcp_calls_through_two_workers_all_complete(tmp_path: Path, redis: RedisServer,
                                                    placement: str) -> None:
    calls = 200
    port = free_port()
    serve = tcp_workers_serve(tmp_path, port, redis, placement=placement)
    phone = None
    try:
        phone = start_phone(tmp_path, "phone", port, "service", free_port(), 60_000)
        wait_until(lambda: registered(serve, "service"), 10, "the phone's REGISTER")
        pids = list(worker_pids(serve.log()).values())
        uac = run_uac(tmp_path, "uac", port, "service", calls, "-t", "t1",
                      "-recv_timeout", "10000", rate=50, timeout=60)
        assert uac.returncode == 0, (uac_counts(tmp_path, "uac"), serve.log()[-3000:])
        assert successful(tmp_path, "uac") == calls
        # The phone answered every call on the one connection it registered over.
        phone_msgs = (tmp_path / "phone.msg").read_text()
        assert len(re.findall(r"^INVITE sip:", phone_msgs, re.MULTILINE)) >= calls
        # One connection: the owners of its calls reached it through the worker holding it
        # (none opened another to the phone's address; sipp t1 would have accepted it).
        match = re.search(r"REGISTER .*source=tcp:127\.0\.0\.1:(\d+)", serve.log())
        assert match is not None
        phone_port = int(match[1])
        assert holder(port, phone_port, pids) in pids
        assert established_from(phone_port) == 1
    finally:
        stop_quietly(phone)
        assert serve.close() == 0
    log = serve.log()
    assert "Traceback" not in log
    if placement == "packed":
        # 50 calls/s: the worker holding the caller's connection keeps every call; when
        # the kernel gave the phone's connection to the other, the phone's responses and
        # the INVITEs to it crossed through the table and the links, and none was lost.
        answered = stopped_counts(log)
        assert sorted(answered) == [0, calls], answered
        assert sum(counters(log, "stream_taken")) == sum(counters(log, "stream_handed"))
        assert sum(counters(log, "sends_written")) == sum(counters(log, "sends_handed"))
        assert sum(counters(log, "stream_lost")) == 0
        return
    # Both workers owned calls (distinct Call-IDs spread by CRC-32)...
    answered = [int(n) for n in re.findall(r"stopped .*?answered=(\d+)", log)]
    assert len(answered) == 2 and sum(answered) == calls and min(answered) > calls * 0.3, \
        answered
    # ...and messages went to their owner with the connection named, and the owner's bytes
    # back to the connection's holder: both directions of the hand-off, nothing lost.
    assert sum(counters(log, "stream_handed")) > 0, log[-2000:]
    assert sum(counters(log, "stream_taken")) == sum(counters(log, "stream_handed"))
    assert sum(counters(log, "sends_handed")) > 0
    assert sum(counters(log, "sends_written")) == sum(counters(log, "sends_handed"))
    assert sum(counters(log, "stream_lost")) == 0 and sum(counters(log, "gone_reported")) == 0


class TcpClient:
    """A raw SIP client on its own TCP connection from ``port`` (requests built by
    :func:`serveutil.request`), reading final responses with a bounded wait."""

    def __init__(self, serve_port: int, port: int) -> None:
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, port))
        self.sock.connect((HOST, serve_port))
        self.buffer = b""

    def send(self, text: str) -> None:
        self.sock.sendall(text.replace("SIP/2.0/UDP", "SIP/2.0/TCP")
                          .replace("{me}", str(self.port)).encode())

    def final(self, timeout: float) -> int | None:
        """The status of the next final response (None: none within ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for status in re.findall(rb"^SIP/2\.0 (\d{3}) ", self.buffer, re.MULTILINE):
                self.buffer = self.buffer.split(b"SIP/2.0 " + status, 1)[1]
                if int(status) >= 200:
                    return int(status)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            self.buffer += data
        return None

    def dropped(self, timeout: float) -> bool:
        """Whether the server's end closed (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


def test_a_killed_workers_connections_drop_and_the_other_workers_calls_complete(
        tmp_path: Path, redis: RedisServer) -> None:
    from serveutil import register_request, request

    calls, rate = 400, 40
    port = free_port()
    serve = tcp_workers_serve(tmp_path, port, redis)
    phone = uac = None
    stranded: TcpClient | None = None
    try:
        pids = worker_pids(serve.log())
        survivor, victim = pids[0], pids[1]
        # The phone and the caller on connections worker 0 holds; another phone ("stranded")
        # registered over a connection worker 1 holds.
        phone = start_phone(tmp_path, "phone", port, "service",
                            port_held_by(port, survivor, list(pids.values())), 60_000)
        wait_until(lambda: registered(serve, "service"), 10, "the phone's REGISTER")
        stranded = TcpClient(port, port_held_by(port, victim, list(pids.values())))
        stranded.send(register_request(
            "stranded", "reg-stranded",
            f"Contact: <sip:stranded@{HOST}:{stranded.port};transport=tcp>", "Expires: 3600"))
        assert stranded.final(5) == 200
        errors = tmp_path / "uac_errors.log"
        uac = run_uac(tmp_path, "uac", port, "service", calls, "-t", "t1",
                      "-p", str(port_held_by(port, survivor, list(pids.values()))),
                      "-recv_timeout", "6000", "-trace_err", "-error_file", str(errors),
                      rate=rate, timeout=90, background=True)
        caller = TcpClient(port, port_held_by(port, survivor, list(pids.values())))
        wait_until(lambda: holder(port, caller.port, list(pids.values())) is not None, 5,
                 "the caller's connection")
        assert holder(port, caller.port, list(pids.values())) == survivor
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        # Its connections went with it.
        assert stranded.dropped(5)
        # While it is down (the supervisor waits 0.5 s before starting it again), a request
        # for one of its calls gets 503 at once from the worker holding the connection (over
        # TCP nobody retransmits it: it would wait out Timer B).  (Once the supervisor has
        # seen it exit: until the dying process has closed every socket, what is handed to
        # it is lost in its queue, as a datagram would be.)
        wait_until(lambda: f"(pid {victim}) exited" in serve.log(), 5, "worker 1's exit")
        owned_by_victim = next(f"down-{n}" for n in range(100)
                               if call_id_shard(f"down-{n}@{HOST}", 2) == 1)
        caller.send(request("INVITE", f"sip:nobody@{DOMAIN}", call_id=owned_by_victim))
        assert caller.final(2) == 503                # (404 once it is back)
        wait_until(lambda: "worker 1 running again" in serve.log(), 20, "worker 1's restart")
        # A call to the phone whose connection worker 1 held: a closed flow -- an error answer
        # at once (RFC 3261 §18.4), from whichever worker owns the call, not Timer B's 408.
        started = time.monotonic()
        for n in range(4):                           # Call-IDs owned by each worker
            caller.send(request("INVITE", f"sip:stranded@{DOMAIN}", call_id=f"lost-{n}"))
            status = caller.final(10)
            assert status is not None and status >= 400, status
        assert time.monotonic() - started < 8
        assert {call_id_shard(f"lost-{n}@{HOST}", 2) for n in range(4)} == {0, 1}
        caller.close()
        finish(uac, 120)
    finally:
        stop_quietly(uac)
        stop_quietly(phone)
        if stranded is not None:
            stranded.close()
        assert serve.close() == 0
    counts = uac_counts(tmp_path, "uac")
    failed_ids = set(re.findall(r"Call-I[Dd]:? '?([^'\s,]+)",
                                errors.read_text() if errors.exists() else ""))
    # Only worker 1's calls failed: those it held when it died, and those that came while it
    # was down (nobody else may take them: the owner is the Call-ID's).  Every call of worker
    # 0 completed: its connections never moved.
    assert not {cid for cid in failed_ids if call_id_shard(cid, 2) == 0}, failed_ids
    lost = calls - counts["SuccessfulCall(C)"]
    assert 0 < lost <= calls // 2, counts
    log = serve.log()
    answered = [int(n) for n in re.findall(r"stopped .*?answered=(\d+)", log)]
    assert len(answered) == 2 and min(answered) > 0, answered     # worker 1 works again
    # The restarted worker 1 told worker 0 its predecessor's connection was gone.
    assert sum(counters(log, "gone_reported")) > 0 and sum(counters(log, "gone_heard")) > 0
    assert sum(counters(log, "stream_lost")) > 0


def test_a_worker_connection_id_names_its_worker_and_flows_keep_it() -> None:
    """Sans-IO: the id layout, and the stored flow / alias that carry it (one process's own
    small ids stay out of both, as before)."""
    from fastsip.proxy.location import Binding
    from fastsip.proxy.nat import add_alias, binding_flow, pop_alias
    from fastsip.sip import Request, parse
    from fastsip.transport import Address
    from fastsip.transport.rules import connection_holder, held_connection_id

    for worker in (0, 1, 7, 254):
        for counter in (1, 2, (1 << 22) - 1, 1 << 22):
            cid = held_connection_id(counter, worker)
            assert 0 < cid < 1 << 31 and connection_holder(cid) == worker
    assert held_connection_id(1 << 22, 0) == held_connection_id(0, 0)     # the count wraps
    assert {connection_holder(n) for n in (0, 1, 3, 255, 256, 1 << 29)} == {None}

    cid = held_connection_id(12345, 1)
    flow = Binding("sip:a@example.com", "sip:a@192.0.2.9:5060;transport=tcp", 1e12,
                   source="tcp:198.51.100.7:40001", socket=cid)
    assert binding_flow(flow) == Address("TCP", "198.51.100.7", 40001, cid)
    flow.socket = 4                                  # one process: found by the peer address
    assert binding_flow(flow) == Address("TCP", "198.51.100.7", 40001)

    def invite(uri: str) -> Request:
        msg = parse((f"INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/TCP 192.0.2.9;branch=z9hG4bK1\r\n"
                      "From: <sip:b@example.com>;tag=1\r\nTo: <sip:a@example.com>\r\n"
                      "Call-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:a@192.168.1.9:5060>\r\n"
                      "Content-Length: 0\r\n\r\n").encode())
        assert isinstance(msg, Request)
        return msg

    request = invite("sip:a@example.com")
    assert add_alias(request, Address("TLS", "198.51.100.7", 40001, cid))
    contact = str(request.contact[0].uri)
    assert f"alias=198.51.100.7~40001~3~{cid}" in contact
    assert pop_alias(invite(contact)) == Address("TLS", "198.51.100.7", 40001, cid)
    request = invite("sip:a@example.com")
    assert add_alias(request, Address("TCP", "198.51.100.7", 40001, 9))
    contact = str(request.contact[0].uri)
    assert contact.endswith("alias=198.51.100.7~40001~2")                   # Kamailio's form
    # A fourth field that is no worker's id is ignored, not trusted.
    assert pop_alias(invite("sip:a@192.168.1.9;alias=198.51.100.7~40001~2~77")) == \
        Address("TCP", "198.51.100.7", 40001)


def test_messages_as_large_as_tcp_framing_allows_cross_between_workers(
        tmp_path: Path, redis: RedisServer) -> None:
    """A message on a connection is handed over whole, up to the message size limit (64 KiB
    here): 60 KB OPTIONS from one connection, half of them owned by the other worker, all
    answered over that connection."""
    from serveutil import request

    port = free_port()
    serve = tcp_workers_serve(tmp_path, port, redis)
    client = None
    try:
        client = TcpClient(port, free_port())
        body = "x" * 60_000
        for n in range(10):
            text = request("OPTIONS", f"sip:nobody@{DOMAIN}", call_id=f"big-{n}",
                           headers=["Content-Type: text/plain"])
            client.send(text.replace("Content-Length: 0\r\n\r\n",
                                     f"Content-Length: {len(body)}\r\n\r\n{body}"))
            status = client.final(10)
            assert status is not None and status >= 400, (n, status, serve.log()[-2000:])
        assert {call_id_shard(f"big-{n}@{HOST}", 2) for n in range(10)} == {0, 1}
    finally:
        if client is not None:
            client.close()
        assert serve.close() == 0
    log = serve.log()
    assert sum(counters(log, "stream_handed")) >= 3 and sum(counters(log, "stream_lost")) == 0
    assert sum(counters(log, "sends_written")) == sum(counters(log, "stream_handed"))


def test_tls_calls_through_two_workers_reach_the_phone_over_its_connection(
        tmp_path: Path, redis: RedisServer) -> None:
    """The same over TLS, with fastsip's own UAs as phones (sipp here has no TLS): a callee
    registered over its TLS connection, 30 calls from a caller on another, each answered and
    hung up; every INVITE reached the callee over the connection it registered on (its TLS
    state is in one worker; the owners of the calls sent through it)."""
    import asyncio

    from test_serve_tls import Phone, until
    from tlsutil import TestCA

    from fastsip.sip import Request
    from fastsip.transport import Address

    ca = TestCA(tmp_path)
    cert = ca.issue("serve")
    port = free_port()
    serve = Serve(tmp_path, port, "--workers", "2", "--db", redis.url, "--rate-limit", "0",
                  "--spread-above", "0", "--tls-cert", str(cert.cert), "--tls-key", str(cert.key),
                  "--tls-ca", str(ca.ca), listen=[f"tls:{HOST}:{port}"])
    target = Address("TLS", HOST, port)
    calls = 30

    async def main() -> set[int]:
        # (The callee listens too, with a certificate: in-dialog requests go to its Contact,
        # over a connection the owner of the call opens.)
        async with Phone("bob", "TLS", ca, ca.issue("bob", client=True)) as callee, \
                Phone("alice", "TLS", ca) as caller:
            assert await callee.register(target) == 200
            [registered_on] = [source.connection for _, source in callee.received]
            for n in range(calls):
                call = caller.call(f"sip:bob@{DOMAIN}", target)
                await until(lambda c=call: c.state == "confirmed", f"call {n} answered")
                call.bye()
                await until(lambda c=call: c.ended and c.bye_status is not None, f"BYE {n}")
                assert call.bye_status == 200, n
            invites = [s for m, s in callee.received
                       if isinstance(m, Request) and m.method == "INVITE"]
            assert len(invites) == calls
            return {s.connection for s in invites} | {registered_on}

    try:
        connections = asyncio.run(main())
    finally:
        assert serve.close() == 0
    assert len(connections) == 1, connections        # all over the REGISTER's connection
    log = serve.log()
    assert "Traceback" not in log
    answered = [int(n) for n in re.findall(r"stopped .*?answered=(\d+)", log)]
    assert sum(answered) == calls and min(answered) > 0, answered
    assert sum(counters(log, "stream_handed")) > 0 and sum(counters(log, "sends_handed")) > 0
    assert sum(counters(log, "stream_lost")) == 0


def test_keep_alives_reach_a_tcp_flow_another_worker_holds(tmp_path: Path,
                                                           redis: RedisServer) -> None:
    """Worker 0 pings every flow binding (NatKeeper); a phone registered over a connection
    worker 1 holds gets its OPTIONS over that connection (through worker 1), and its answers
    come back to worker 0 (the pings' Call-IDs are worker 0's): none is counted unanswered."""
    from serveutil import register_request

    port = free_port()
    serve = tcp_workers_serve(tmp_path, port, redis, "--nat-ping-interval", "1")
    phone = None
    pings: list[str] = []
    try:
        pids = worker_pids(serve.log())
        phone = TcpClient(port, port_held_by(port, pids[1], list(pids.values())))
        phone.send(register_request(
            "kept", "reg-kept", f"Contact: <sip:kept@{HOST}:{phone.port};transport=tcp>",
            "Expires: 3600"))
        assert phone.final(5) == 200
        # Four pings, so the first three answers have had a ping interval to reach worker 0
        # (through worker 1) before serve stops: the last answer may still be in flight.
        deadline = time.monotonic() + 15
        while len(pings) < 4 and time.monotonic() < deadline:
            phone.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = phone.sock.recv(65536)
            except TimeoutError:
                break
            assert data, "the connection closed"
            for text in data.decode().split("\r\n\r\n"):
                if not text.startswith("OPTIONS "):
                    continue
                pings.append(text)
                head = [line for line in text.split("\r\n")[1:]
                        if line.split(":", 1)[0].lower() in ("via", "from", "to", "call-id",
                                                              "cseq")]
                answer = "SIP/2.0 200 OK\r\n" + "\r\n".join(
                    line + ";tag=kept" if line.lower().startswith("to:") else line
                    for line in head) + "\r\nContent-Length: 0\r\n\r\n"
                phone.sock.sendall(answer.encode())
    finally:
        if phone is not None:
            phone.close()
        assert serve.close() == 0
    assert len(pings) >= 4, serve.log()[-2000:]
    assert all(call_id_shard(re.search(r"Call-ID: (\S+)", p)[1], 2) == 0  # type: ignore[index]
               for p in pings)
    log = serve.log()
    sent, answered = (int(n) for n in re.search(
        r"nat keep_alives=(\d+) answered=(\d+)", log).groups())  # type: ignore[union-attr]
    assert answered >= 3 and answered >= sent - 1, (sent, answered)     # (one in flight)
    assert sum(counters(log, "sends_handed")) >= 3 and sum(counters(log, "stream_handed")) >= 3

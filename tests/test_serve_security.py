"""``fastsip serve`` on a public address, attacked as a scanner would, all on loopback: relay
attempts (a UDP socket stands in for the victim and must receive nothing), a forged Via (one
datagram back, not eleven), password guessing (banned within about ten tries while the real
user still registers from elsewhere), and TCP connection abuse (over-cap, idle and slowloris
connections closed while the server keeps serving).  Every test asserts what did *not* happen
as well as what did."""

from __future__ import annotations

import hashlib
import re
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from netutil import needs_loopback_aliases
from procutil import free_port
from serveutil import DOMAIN, HOST, Serve

pytestmark = needs_loopback_aliases

ATTACKER = "127.0.0.1"
ELSEWHERE = "127.0.0.2"          # loopback too: another source address


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


class Peer:
    """A UDP socket on a loopback address: sends requests, collects whatever arrives."""

    def __init__(self, host: str = ATTACKER) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.received: list[bytes] = []

    def send(self, text: str, port: int) -> None:
        data = text.replace("{me}", f"{self.host}:{self.port}").replace("\n", "\r\n")
        self.sock.sendto(data.encode(), (HOST, port))

    def collect(self, seconds: float) -> list[bytes]:
        """Everything that arrives within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.received.append(self.sock.recv(65535))
            except OSError:
                break
        return self.received

    def statuses(self) -> list[int]:
        return [int(d.split(b" ", 2)[1]) for d in self.received if d.startswith(b"SIP/2.0 ")]

    def exchange(self, text: str, port: int, timeout: float = 2.0) -> int | None:
        """Send and wait for a final response; its status (None: no answer)."""
        self.received.clear()
        self.send(text, port)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65535)
            except OSError:
                break
            self.received.append(data)
            status = int(data.split(b" ", 2)[1]) if data.startswith(b"SIP/2.0 ") else 0
            if status >= 200:
                return status
        return None

    def close(self) -> None:
        self.sock.close()


def sip(method: str, uri: str, *, n: int, frm: str = "<sip:mallory@evil.example>",
        to_tag: str = "", extra: str = "", via: str = "{me};rport") -> str:
    tag = f";tag={to_tag}" if to_tag else ""
    return (f"{method} {uri} SIP/2.0\n"
            f"Via: SIP/2.0/UDP {via};branch=z9hG4bK-sec{n}-{time.monotonic_ns()}\n"
            "Max-Forwards: 70\n"
            f"From: {frm};tag=m{n}\n"
            f"To: <{uri}>{tag}\n"
            f"Call-ID: sec{n}-{time.monotonic_ns()}@evil.example\n"
            f"CSeq: 1 {method}\n"
            "Contact: <sip:mallory@{me}>\n"
            f"{extra}"
            "Content-Length: 0\n\n")


@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
def test_no_open_relay(workdir: Path, auth: bool) -> None:
    port = free_port()
    extra = []
    if auth:
        (workdir / "users.txt").write_text("alice:secret\n")
        extra = ["--auth-users", str(workdir / "users.txt")]
    serve = Serve(workdir, port, *extra)
    victim, attacker = Peer(ELSEWHERE), Peer()
    try:
        v = f"127.0.0.2:{victim.port}"
        mpart01 = (Path(__file__).parent / "data" / "rfc4475" / "mpart01.dat").read_bytes()
        mpart01 = mpart01.replace(b"Route: <sip:127.0.0.1:5080>", f"Route: <sip:{v};lr>".encode())
        mpart01 = mpart01.replace(b"127.0.0.1:5070;branch=", f"{HOST}:{attacker.port};branch="
                                  .encode())
        initial = [
            sip("INVITE", f"sip:x@{v}", n=1),                          # a foreign Request-URI
            sip("INVITE", f"sip:bob@{DOMAIN}", n=2,                   # a preloaded Route
                extra=f"Route: <sip:{v};lr>\n"),
            sip("INVITE", f"sip:bob@{DOMAIN}", n=3,                   # ours, then the victim
                extra=f"Route: <sip:{HOST}:{port};lr>, <sip:{v};lr>\n"),
            sip("MESSAGE", f"sip:x@{v}", n=4, frm=f"<sip:alice@{DOMAIN}>"),  # claims our domain
            sip("OPTIONS", f"sip:x@{v}", n=5),
        ]
        in_dialog = [
            sip("BYE", f"sip:x@{v}", n=6, to_tag="t6"),                # a forged dialog
            sip("INFO", f"sip:bob@{DOMAIN}", n=7, to_tag="t7", extra=f"Route: <sip:{v};lr>\n"),
        ]
        statuses = [attacker.exchange(m, port) for m in initial]
        assert statuses == ([407] * 5 if auth else [403] * 5), serve.log()
        assert [attacker.exchange(m, port) for m in in_dialog] == [403, 403]
        # RFC 4475 mpart01 with its preloaded Route pointing at the victim.
        attacker.received.clear()
        attacker.sock.sendto(mpart01, (HOST, port))
        assert attacker.collect(1.0) and attacker.statuses() == [407 if auth else 403]
        # An ACK "for a 2xx" along a Route to the victim: never answered, never forwarded.
        attacker.send(sip("ACK", f"sip:x@{v}", n=8, to_tag="t8",
                          extra=f"Route: <sip:{v};lr>\n"), port)
        time.sleep(1.0)
        assert victim.collect(0.5) == [], victim.received[:1]
    finally:
        victim.close()
        attacker.close()
        serve.close()
    assert "Traceback" not in serve.log() and "ERROR" not in serve.log()


def test_a_forged_via_draws_one_datagram(workdir: Path) -> None:
    port = free_port()
    (workdir / "users.txt").write_text("alice:secret\n")
    # A short T1: were the answers stateful, Timer G would resend them 6 times in 3 s.
    serve = Serve(workdir, port, "--auth-users", str(workdir / "users.txt"), "--t1", "0.05")
    # The reflector shares the attacker's address (a response goes to the source IP, §18.2.2
    # `received`), at the port the forged Via names.
    reflector, attacker = Peer(), Peer()
    try:
        forged = f"{ATTACKER}:{reflector.port}"
        # 407 (our users must authenticate; a foreign target too) and 404 (nobody): each goes
        # once to the address the forged Via names, however long one waits.
        attacker.send(sip("INVITE", f"sip:bob@{DOMAIN}", n=1, frm=f"<sip:alice@{DOMAIN}>",
                          via=forged), port)
        attacker.send(sip("INVITE", f"sip:nobody@{DOMAIN}", n=2, via=forged), port)
        attacker.send(sip("INVITE", "sip:x@192.0.2.1", n=3, via=forged), port)
        reflector.collect(3.0)
        assert sorted(reflector.statuses()) == [404, 407, 407]
        assert len(reflector.received) == 3
        assert attacker.collect(0.1) == []
        assert all(len(d) < 1200 for d in reflector.received)
    finally:
        reflector.close()
        attacker.close()
        serve.close()


def _digest(challenge: bytes, user: str, password: str, uri: str) -> str:
    head = challenge.split(b"\r\n\r\n", 1)[0].decode()
    value = next(line for line in head.split("\r\n")
                 if line.lower().startswith("www-authenticate:") and "MD5" in line)
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', value.split(":", 1)[1]))
    ha1 = hashlib.md5(f"{user}:{params['realm']}:{password}".encode()).hexdigest()
    ha2 = hashlib.md5(f"REGISTER:{uri}".encode()).hexdigest()
    response = hashlib.md5(
        f"{ha1}:{params['nonce']}:00000001:abcdef:auth:{ha2}".encode()).hexdigest()
    return (f'Authorization: Digest username="{user}", realm="{params["realm"]}", '
            f'nonce="{params["nonce"]}", uri="{uri}", response="{response}", algorithm=MD5, '
            f'qop=auth, nc=00000001, cnonce="abcdef", opaque="{params["opaque"]}"\n')


def _register(peer: Peer, port: int, n: int, auth: str = "") -> str:
    return (f"REGISTER sip:{DOMAIN} SIP/2.0\n"
            f"Via: SIP/2.0/UDP {{me}};branch=z9hG4bK-reg{n}-{time.monotonic_ns()};rport\n"
            "Max-Forwards: 70\n"
            f"From: <sip:alice@{DOMAIN}>;tag=r{n}\n"
            f"To: <sip:alice@{DOMAIN}>\n"
            f"Call-ID: reg-{peer.host}-{n}@test\n"
            f"CSeq: {n} REGISTER\n"
            "Contact: <sip:alice@{me}>\n"
            f"{auth}"
            "Content-Length: 0\n\n")


def _login(peer: Peer, port: int, n: int, password: str) -> int | None:
    """One login: REGISTER, then the answer to its challenge with ``password``."""
    status = peer.exchange(_register(peer, port, n), port)
    if status != 401:
        return status
    challenge = peer.received[-1]
    return peer.exchange(_register(peer, port, n + 1,
                                   _digest(challenge, "alice", password, f"sip:{DOMAIN}")), port)


def test_password_guessing_is_banned_and_the_real_user_still_registers(workdir: Path) -> None:
    port = free_port()
    (workdir / "users.txt").write_text("alice:secret\n")
    serve = Serve(workdir, port, "--auth-users", str(workdir / "users.txt"), "--ban-time", "4")
    attacker, phone = Peer(), Peer(ELSEWHERE)
    try:
        answers: list[int | None] = []
        for guess in range(30):
            answers.append(_login(attacker, port, 10 * guess + 1, f"guess{guess}"))
            if answers[-1] is None:
                break
        # A wrong password gets a new challenge a few times, then 403, then nothing at all:
        # the source is banned and what it sends is dropped.
        tries = len(answers)
        assert answers[-1] is None and tries <= 11, answers
        assert 401 in answers and 403 in answers and 200 not in answers
        # The real alice, from her own address, is not locked out.
        assert _login(phone, port, 1, "secret") == 200
        # The attacker's address is served again once the ban has expired.
        time.sleep(4.5)
        assert attacker.exchange(_register(attacker, port, 999), port) == 401
    finally:
        attacker.close()
        phone.close()
        serve.close()
    log = serve.log()
    assert log.count("authentication failed: user=alice source=127.0.0.1") >= 5
    assert "banned 127.0.0.1" in log and "ban on 127.0.0.1 expired" in log
    assert "source=127.0.0.2" not in log and "Traceback" not in log


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Does the server close ``sock`` within ``seconds``?"""
    sock.settimeout(seconds)
    try:
        while sock.recv(65535):
            pass
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def _tcp_options(port: int, host: str = ELSEWHERE) -> int | None:
    with socket.create_connection((HOST, port), timeout=3, source_address=(host, 0)) as s:
        me = f"{host}:{s.getsockname()[1]}"
        s.sendall(sip("OPTIONS", f"sip:{DOMAIN}", n=99, via=me).replace("SIP/2.0/UDP",
                  "SIP/2.0/TCP").replace("{me}", me).replace("\n", "\r\n").encode())
        data = s.recv(65535)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"SIP/2.0 ") else None


def test_connection_limits_and_timeouts(workdir: Path) -> None:
    port = free_port()
    serve = Serve(workdir, port, "--max-connections-per-source", "4", "--tcp-idle-timeout",
                  "3", "--tcp-read-timeout", "1.5", tcp=True)
    held: list[socket.socket] = []
    try:
        for _ in range(4):
            held.append(socket.create_connection((HOST, port), timeout=3,
                                                 source_address=(ATTACKER, 0)))
        time.sleep(0.2)
        # Over the per-source cap: refused at once; another source is served meanwhile.
        extra = socket.create_connection((HOST, port), timeout=3, source_address=(ATTACKER, 0))
        assert _closed_within(extra, 1.0)
        extra.close()
        assert _tcp_options(port) == 200
        # Slowloris: a header line every 0.4 s, never finished, is closed by the read timeout
        # although it is never idle.
        slow = held[0]
        slow.sendall(b"OPTIONS sip:example.com SIP/2.0\r\n")
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 4.0:
            try:
                slow.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            if _closed_within(slow, 0.4):
                closed = True
                break
        assert closed and time.monotonic() - started < 3.5
        # The idle ones go after the idle timeout.
        assert all(_closed_within(s, 4.0) for s in held[1:])
        assert _tcp_options(port) == 200
    finally:
        for s in held:
            s.close()
        serve.close()
    assert "Traceback" not in serve.log()

"""Media relay test helpers: ``fastsip media`` and Kamailio (with its ``rtpengine`` module) as
processes on loopback, an ng client, and RTP peers that record what reaches them and from where.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import WINDOWS, fastsip_env, free_port
from serveutil import stop

from fastsip import parse
from fastsip.relay.bencode import as_text, decode, encode
from fastsip.sip import Request, Response

HOST = "127.0.0.1"
DATA = Path(__file__).parent / "data"
KAMAILIO = shutil.which("kamailio") or next(
    (p for p in ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio") if os.access(p, os.X_OK)),
    None)
RTPENGINE = shutil.which("rtpengine") or next(
    (p for p in ("/usr/bin/rtpengine", "/usr/sbin/rtpengine") if os.access(p, os.X_OK)), None)
KAMAILIO_RTPENGINE_MODULE = next(
    (p for p in Path("/usr/lib").glob("*/kamailio/modules/rtpengine.so")), None)

_cookies = itertools.count(1)


class _Daemon:
    """A server process of a test: its output in ``log_path``, stopped by ``close()`` (SIGTERM,
    then SIGKILL) or at the end of a ``with`` block."""

    proc: subprocess.Popen[Any]
    log_path: Path
    _log: Any

    def _start(self, argv: list[str], workdir: Path, log_name: str, *,
               stdout_pipe: bool = False, env: dict[str, str] | None = None) -> None:
        self.log_path = workdir / log_name
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, cwd=workdir, env=env, text=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log if stdout_pipe else subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> int:
        rc = stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return rc

    def __enter__(self: _D) -> _D:  # noqa: PYI019 - typing.Self is 3.11+
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_D = TypeVar("_D", bound=_Daemon)


class MediaRelay(_Daemon):
    """A ``fastsip media`` process with its ng socket on a free loopback port and media ports
    in ``[port_min, port_min + ports)``; its log goes to ``media-N.log``.

    On Windows the test using it skips: fastsip media watches each leg's socket with
    ``loop.add_reader``, which Windows' default event loop (proactor) does not have."""

    count = 0

    def __init__(self, workdir: Path, *extra: str, interfaces: Sequence[str] = (HOST,),
                 ports: int = 200) -> None:
        if WINDOWS:
            pytest.skip("POSIX only (for now): fastsip media reads its RTP legs with "
                        "loop.add_reader, which Windows' proactor event loop lacks")
        MediaRelay.count += 1
        self.port_min = 20000 + (os.getpid() * 997 + MediaRelay.count * 401) % 20000 // 2 * 2
        self.port_max = self.port_min + ports - 1
        ng = free_port()
        self._start(
            [sys.executable, "-m", "fastsip.cli", "media",
             *(a for i in interfaces for a in ("--interface", i)),
             "--ng", f"{HOST}:{ng}", "--port-min", str(self.port_min),
             "--port-max", str(self.port_max), *extra],
            workdir, f"media-{MediaRelay.count}.log", stdout_pipe=True, env=fastsip_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            self.close()
            raise AssertionError(f"fastsip media did not start: {line!r}\n{self.log()}")
        self.ng = (HOST, ng)


def ng_raw(address: tuple[str, int], data: bytes, timeout: float = 3.0) -> bytes:
    """One datagram to an ng socket, its reply (retransmitted twice on silence, as
    Kamailio's module does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout / 3)
        for _ in range(3):
            s.sendto(data, address)
            try:
                return s.recv(65535)
            except TimeoutError:
                continue
    raise AssertionError(f"no ng reply from {address} to {data[:80]!r}")


def ng(address: tuple[str, int], command: dict[str, Any], cookie: str | None = None
       ) -> dict[str, Any]:
    """One ng command (``{"command": "offer", ...}``) and its decoded reply dictionary (keys
    and byte strings decoded as text where they are UTF-8)."""
    cookie = cookie or f"t{next(_cookies)}_{os.getpid()}"
    reply = ng_raw(address, cookie.encode() + b" " + encode(command))
    got_cookie, _, body = reply.partition(b" ")
    assert got_cookie == cookie.encode(), reply[:80]
    return dict(as_text(decode(body)))


def sdp(port: int, host: str = HOST, *, rtcp: int | None = None, extra: str = "") -> str:
    """An audio offer/answer (PCMU, PCMA, telephone-event) naming ``host``:``port``."""
    family = "IP6" if ":" in host else "IP4"
    lines = ["v=0", f"o=- 1 1 IN {family} {host}", "s=-", f"c=IN {family} {host}", "t=0 0",
             f"m=audio {port} RTP/AVP 0 8 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
             "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15", "a=sendrecv"]
    if rtcp is not None:
        lines.append(f"a=rtcp:{rtcp}")
    return "\r\n".join(lines) + "\r\n" + extra


def sdp_address(text: str) -> tuple[str, int, int | None]:
    """(connection address, RTP port, a=rtcp port or None) of the first audio stream."""
    host = port = None
    rtcp = None
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith("c=") and host is None or line.startswith("c=") and port is not None:
            host = line.split()[-1]
        elif line.startswith("m=audio"):
            port = int(line.split()[1])
        elif line.startswith("a=rtcp:") and port is not None:
            rtcp = int(line[7:].split()[0])
    assert host is not None and port is not None, text
    return host, port, rtcp


def rtp(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 0, marker: bool = False
        ) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def rtcp_rr(ssrc: int) -> bytes:
    """An empty RTCP receiver report (RFC 3550 §6.4.2)."""
    return struct.pack("!BBHI", 0x80, 201, 1, ssrc)


@dataclass
class Peer:
    """A phone's media: an RTP socket and the RTCP one above it, recording what arrives."""

    host: str = HOST
    rtp_sock: socket.socket = field(init=False)
    rtcp_sock: socket.socket = field(init=False)
    got: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)
    got_rtcp: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        for _ in range(50):
            a = socket.socket(family, socket.SOCK_DGRAM)
            b = socket.socket(family, socket.SOCK_DGRAM)
            try:
                a.bind((self.host, 0))           # (RTCP on the next port, RFC 3550 §11)
                b.bind((self.host, a.getsockname()[1] + 1))
            except OSError:
                a.close()
                b.close()
                continue
            self.rtp_sock, self.rtcp_sock = a, b
            return
        raise RuntimeError("no RTP port pair")

    @property
    def port(self) -> int:
        return int(self.rtp_sock.getsockname()[1])

    def send(self, data: bytes, to: tuple[str, int]) -> None:
        self.rtp_sock.sendto(data, to)

    def send_rtcp(self, data: bytes, to: tuple[str, int]) -> None:
        self.rtcp_sock.sendto(data, to)

    def collect(self, seconds: float, until: int | None = None) -> None:
        """Read both sockets for ``seconds`` (or until ``until`` RTP packets are in)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if until is not None and len(self.got) >= until:
                return
            ready, _, _ = select.select([self.rtp_sock, self.rtcp_sock], [], [], min(left, 0.2))
            for s in ready:
                data, addr = s.recvfrom(65535)
                (self.got if s is self.rtp_sock else self.got_rtcp).append((data, addr[:2]))

    def close(self) -> None:
        self.rtp_sock.close()
        self.rtcp_sock.close()


class Kamailio(_Daemon):
    """Kamailio 5.6 with ``tests/data/kamailio/rtpengine.cfg`` pointed at the ng socket
    ``ng``, on a free loopback UDP port, in the foreground (its log: ``kamailio.log``)."""

    def __init__(self, workdir: Path, ng: tuple[str, int]) -> None:
        assert KAMAILIO is not None
        cfg = workdir / "kamailio.cfg"
        cfg.write_text((DATA / "kamailio" / "rtpengine.cfg").read_text().replace(
            "@NG@", f"{ng[0]}:{ng[1]}"))
        run = workdir / "kamailio-run"
        run.mkdir(exist_ok=True)
        self.port = free_port()
        self._start([KAMAILIO, "-f", str(cfg), "-DD", "-E", "-Y", str(run), "-l",
                     f"udp:{HOST}:{self.port}", "-m", "32", "-M", "8"], workdir, "kamailio.log")
        self._wait_ready()

    def _wait_ready(self) -> None:
        # Ready when it answers an OPTIONS (404: nobody registered under that name).
        deadline = time.monotonic() + 15
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((HOST, 0))
            s.settimeout(0.3)
            me = s.getsockname()[1]
            msg = (f"OPTIONS sip:nobody@{HOST}:{self.port} SIP/2.0\r\n"
                   f"Via: SIP/2.0/UDP {HOST}:{me};branch=z9hG4bK-ready\r\nMax-Forwards: 70\r\n"
                   f"From: <sip:t@{HOST}>;tag=r\r\nTo: <sip:nobody@{HOST}>\r\n"
                   "Call-ID: ready@test\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, f"kamailio exited:\n{self.log()}"
                s.sendto(msg, (HOST, self.port))
                try:
                    if s.recv(65535).startswith(b"SIP/2.0 "):
                        return
                except TimeoutError:
                    continue
        raise AssertionError(f"kamailio did not answer:\n{self.log()}")


class Phone:
    """A phone on UDP written out by hand (every header visible in the test): REGISTER,
    place or answer one call with an SDP naming its own :class:`Peer`, BYE.  ``proxy`` is
    where its requests go (an outbound proxy: the first hop for everything)."""

    def __init__(self, user: str, proxy: tuple[str, int], domain: str = "example.com") -> None:
        self.user = user
        self.proxy = proxy
        self.domain = domain
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.port = self.sock.getsockname()[1]
        self.media = Peer()
        self.inbox: list[Request] = []
        self._n = itertools.count(1)

    def _headers(self, method: str, uri: str, call_id: str, to: str, from_tag: str,
                 cseq: int, extra: str = "") -> str:
        return (f"{method} {uri} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP {HOST}:{self.port};rport;branch=z9hG4bK-{self.user}"
                f"{next(self._n)}-{call_id}\r\nMax-Forwards: 70\r\n"
                f"From: <sip:{self.user}@{self.domain}>;tag={from_tag}\r\nTo: {to}\r\n"
                f"Call-ID: {call_id}\r\nCSeq: {cseq} {method}\r\n"
                f"Contact: <sip:{self.user}@{HOST}:{self.port}>\r\n{extra}")

    def transact(self, data: bytes, to: tuple[str, int] | None = None, timeout: float = 5.0
                 ) -> Response:
        """Send a request (again every 0.5 s while nothing comes); its final response
        (provisionals skipped; requests that arrive meanwhile are kept in ``inbox``)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        heard = False
        while time.monotonic() < deadline:
            if not heard:
                self.sock.sendto(data, to or self.proxy)
            try:
                msg = parse(self.sock.recv(65535))
            except TimeoutError:
                continue
            if isinstance(msg, Response):
                heard = True
                if msg.status_code >= 200:
                    return msg
            else:
                self.inbox.append(msg)
        raise AssertionError(f"no final response to {data[:60]!r}")

    def final_response(self, timeout: float = 5.0) -> Response:
        """The next final response that reaches this phone (provisionals skipped)."""
        self.sock.settimeout(timeout)
        while True:
            msg = parse(self.sock.recv(65535))
            if isinstance(msg, Response) and msg.status_code >= 200:
                return msg

    def register(self) -> None:
        ok = self.transact((self._headers(
            "REGISTER", f"sip:{self.domain}", f"reg-{self.user}@test",
            f"<sip:{self.user}@{self.domain}>", "r", 1,
            "Expires: 300\r\nContent-Length: 0\r\n") + "\r\n").encode())
        assert ok.status_code == 200, bytes(ok)

    def invite(self, callee: str, call_id: str, body: str) -> bytes:
        return (self._headers("INVITE", f"sip:{callee}@{self.domain}", call_id,
                              f"<sip:{callee}@{self.domain}>", "caller-tag", 1,
                              "Content-Type: application/sdp\r\n"
                              f"Content-Length: {len(body)}\r\n") + "\r\n" + body).encode()

    def next_request(self, timeout: float = 5.0) -> tuple[Request, tuple[str, int]]:
        if self.inbox:
            return self.inbox.pop(0), self.proxy
        self.sock.settimeout(timeout)
        while True:
            data, addr = self.sock.recvfrom(65535)
            msg = parse(data)
            if isinstance(msg, Request):
                return msg, addr[:2]

    def answer(self, invite: Request, to: tuple[str, int], body: str | None,
               status: int = 200) -> Response:
        """Answer ``invite`` (Record-Route copied, our Contact, ``body`` as SDP)."""
        response = invite.reply(status, to_tag=f"{self.user}-tag")
        for rr in invite.headers.getall("Record-Route"):
            response.add_header("Record-Route", rr)
        response.add_header("Contact", f"<sip:{self.user}@{HOST}:{self.port}>")
        if body is not None:
            response.set_body(body.encode(), "application/sdp")
        self.sock.sendto(bytes(response), to)
        return response

    def close(self) -> None:
        self.sock.close()
        self.media.close()


class RtpEngine(_Daemon):
    """Debian's rtpengine (``rtpengine-daemon``) in the foreground, userspace forwarding only
    (``--table=-1``: no kernel module), no config file, its ng socket on a free loopback
    port; the same interface as :class:`MediaRelay` for the tests."""

    def __init__(self, workdir: Path, ports: int = 200) -> None:
        assert RTPENGINE is not None
        self.port_min = 42000 + (os.getpid() * 613) % 10000 // 2 * 2
        self.port_max = self.port_min + ports - 1
        ng_port = free_port()
        self._start(
            [RTPENGINE, "--foreground", "--log-stderr", "--config-file=none", "--table=-1",
             f"--interface={HOST}", f"--listen-ng={HOST}:{ng_port}",
             f"--port-min={self.port_min}", f"--port-max={self.port_max}",
             f"--pidfile={workdir / 'rtpengine.pid'}", "--num-threads=2",
             # A deleted call goes at once (rtpengine keeps it 30 s by default), so a test
             # can see that the delete came.
             "--delete-delay=0"], workdir, "rtpengine.log")
        self.ng = (HOST, ng_port)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"rtpengine exited:\n{self.log()}"
            try:
                if ng(self.ng, {"command": "ping"}).get("result") == "pong":
                    return
            except AssertionError:
                continue
        self.close()
        raise AssertionError(f"rtpengine did not answer ping:\n{self.log()}")

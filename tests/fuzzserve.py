"""Network fuzzing of ``fastsip serve``: mutated SIP over UDP and TCP, an RFC oracle for every
message, a probe that must keep getting 200, serve's RSS, and its log scanned for tracebacks.

Run it as a script (long runs, the findings report)::

    python tests/fuzzserve.py --datagrams 50000 --tcp-streams 500 --seed 1 --keep-going \\
        [--serve-arg=--rate-limit --serve-arg=0] [--json out.json] [--triage]
    python tests/fuzzserve.py --torture --json torture.json      # RFC 4475/5118 through serve

or import it (``tests/test_serve_fuzz.py``): :func:`run_isolated` runs the whole thing and
returns the JSON result as a dict.

**Isolation.**  Mutated Request-URIs, Routes and registered Contacts make a proxy resolve and
reach arbitrary hosts, so the run (serve, the fuzzer, the sink) happens in a private network
namespace (``unshare --user --map-root-user --net --mount``): its only interface is loopback,
nothing can leave the machine, and every port is free.  A private ``/etc/hosts`` maps the
"foreign" names of the templates and torture messages to the *sink* (127.0.0.9), a UDP/TCP
socket on port 5060 that records what serve forwards (and answers some of it); any other name
fails to resolve at once.  Where such namespaces are unavailable the run refuses to start.

**Addresses.**  Each fuzzing client socket is bound to port 5060 of its own loopback address
(127.0.1.x), so a response routed by a Via without port or with ``rport`` (RFC 3261 §18.2.2,
RFC 3581) comes back to it whether serve parsed the request or answered it statelessly; the
same addresses listen on TCP 5060 for responses serve sends over TCP to a Via.

**Oracle** (:func:`expectation`): a request must be answered when it has a request line
(method token, SP, something), is not an ACK, and carries header lines Via (``SIP/2.0/<t>
host``), From, To, Call-ID (non-empty) and CSeq (``<digits> <token>``) -- what a server needs
to route and match a response, and what ``fastsip.transport.rules.error_response`` can answer
from even when the message does not parse -- and the response would reach us (over UDP a Via
with ``maddr``, another port without ``rport`` or a transport other than UDP/TCP sends it
elsewhere: then either outcome is fine).  ACKs and responses must get nothing.  Anything else
may be answered or dropped.  Over TCP the stream is framed as RFC 3261 §18.3 says; after a
message whose framing is broken or incomplete nothing more is expected on that connection.

Every request carries a per-case token (in Call-ID, branch and tags) that responses copy, so a
response is attributed to its case even when mutations damaged some of those fields.
Requests that are forwarded wait on a downstream transaction: with a short ``--t1`` (64*T1 is a
transaction's lifetime) they are answered 408/500 within the drain window.  Sending is paced
(datagrams and bytes per second) and unanswered requests are retransmitted three times, a
second apart (as a UAC's Timers A/E would), so a datagram the kernel dropped at serve's full
socket buffer is not reported as serve's silence (those drops are counted, from
/proc/net/udp).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
from procutil import fastsip_env, free_port

DATA = HERE / "data"
SERVE_HOST = "127.0.0.1"
#: Every foreign name (and the literal) of the templates reaches this address: the sink.
SINK_HOST = "127.0.0.9"
SIP_PORT = 5060
UDP_CLIENTS = ("127.0.1.1", "127.0.1.2")
TCP_CLIENT = "127.0.1.3"
PROBE_HOST = "127.0.2.1"
CLIENT_HOSTS = frozenset((*UDP_CLIENTS, TCP_CLIENT))
SETUP_HOST = "127.0.2.2"
DOMAIN = "example.com"
USERS = {"alice": "s3cret", "bob": "hunter2"}
#: Names that resolve to the sink inside the namespace: the templates' foreign domains and the
#: hosts the torture messages route to.  example.com (our domain) is deliberately absent.
WORLD = (
    "atlanta.example.net", "biloxi.example.net", "example.net", "example.org", "company.com",
    "services.example.com", "registrar.example.com", "chair-dnrc.example.com",
    "host.example.net", "gw1.example.net", "host5.example.net", "hungry.example.net",
    "jasomi.com", "ss1.example.net", "east.example.com", "example.edu",
)
NETNS_ENV = "FASTSIP_FUZZ_NETNS"
MAX_DATAGRAM = 65507
#: Bytes per second the fuzzer sends at most (a few 60 kB datagrams fill a socket buffer).
BYTE_RATE = 4_000_000

ANSWER, NONE, EITHER = "answer", "none", "either"

# -- isolation -------------------------------------------------------------------------------

_UNSHARE = ["unshare", "--user", "--map-root-user", "--net", "--mount"]


def netns_unavailable() -> str | None:
    """Why a private network namespace cannot be made here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    try:
        r = subprocess.run([*_UNSHARE, "true"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare failed: {exc}"
    if r.returncode != 0:
        return ("unprivileged user and network namespaces are disabled: "
                + r.stderr.decode(errors="replace").strip())
    return None


def _loopback_up() -> None:
    # A new network namespace has lo down; SIOCSIFFLAGS as the namespace's root brings it up
    # (no dependency on iproute2).
    import fcntl  # here, not at the top: the module is imported (and skips) on Windows too

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s, siocgifflags, req))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH14x", b"lo", flags | iff_up))


def _private_hosts(workdir: Path) -> None:
    """Bind-mount a hosts file over /etc/hosts (in our private mount namespace only)."""
    hosts = workdir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{SINK_HOST} {' '.join(WORLD)}\n")
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    ms_bind = 4096
    if libc.mount(str(hosts).encode(), b"/etc/hosts", None, ms_bind, None) != 0:
        raise OSError(ctypes.get_errno(), "bind-mounting the private /etc/hosts failed")


def enter_private_network(workdir: Path) -> None:
    """Called inside the namespace: loopback up, foreign names to the sink, and a check that
    the world is really out of reach (a run that could leak must not start)."""
    if os.environ.get(NETNS_ENV) != "1":
        raise RuntimeError("not inside the fuzzing namespace")
    _loopback_up()
    _private_hosts(workdir)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(b"", ("192.0.2.1", 9))
        except OSError:
            return
    raise RuntimeError("a non-loopback address is reachable: refusing to fuzz")


def run_isolated(args: Sequence[str], workdir: Path, timeout: float = 900.0) -> dict[str, Any]:
    """Run this script with ``args`` in a private network namespace; returns its JSON result.
    Raises RuntimeError with the script's output when it fails to produce one."""
    out = workdir / "result.json"
    env = fastsip_env()
    env[NETNS_ENV] = "1"
    cmd = [*_UNSHARE, sys.executable, str(Path(__file__).resolve()), *args,
           "--workdir", str(workdir), "--json", str(out)]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    if not out.exists():
        raise RuntimeError(f"fuzzserve exited {proc.returncode} without a result:\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["stdout"] = proc.stdout
    return result


# -- message drafts --------------------------------------------------------------------------

CRLF = b"\r\n"
_TOKEN = rb"[A-Za-z0-9.!%*_+`'~-]+"
#: Compact forms (RFC 3261 §7.3.3 and later RFCs) to canonical lower-case names.
COMPACT = {
    b"v": b"via", b"f": b"from", b"t": b"to", b"i": b"call-id", b"m": b"contact",
    b"l": b"content-length", b"c": b"content-type", b"e": b"content-encoding",
    b"k": b"supported", b"s": b"subject", b"o": b"event", b"r": b"refer-to",
    b"u": b"allow-events", b"x": b"session-expires", b"b": b"referred-by",
}
LONG_TO_COMPACT = {v: k for k, v in COMPACT.items()}


def canonical(name: bytes) -> bytes:
    n = name.strip().lower()
    return COMPACT.get(n, n)


@dataclass
class Draft:
    """A message as start line, header lines (a folded header keeps its CRLF SP inside its
    line) and body: the unit SIP-aware mutations work on."""

    start: bytes
    headers: list[bytes]
    body: bytes
    terminated: bool = True
    eol: bytes = CRLF             # a mutation may render the header lines with LF or CR

    @classmethod
    def parse(cls, data: bytes) -> Draft:
        head, sep, body = data.partition(b"\r\n\r\n")
        lines = head.split(CRLF)
        out: list[bytes] = []
        for line in lines[1:]:
            if out and line[:1] in (b" ", b"\t"):
                out[-1] += CRLF + line
            else:
                out.append(line)
        return cls(lines[0], out, body, bool(sep))

    def render(self, fix_length: bool = False) -> bytes:
        headers = self.headers
        if fix_length:
            headers = [h for h in headers if self.name(h) != b"content-length"]
            headers.append(b"Content-Length: %d" % len(self.body))
        eol = self.eol
        head = eol.join([self.start, *headers])
        return head + (eol + eol + self.body if self.terminated else b"")

    @staticmethod
    def name(line: bytes) -> bytes:
        name, sep, _ = line.partition(b":")
        return canonical(name) if sep else b""

    def find(self, name: bytes) -> list[int]:
        return [i for i, h in enumerate(self.headers) if self.name(h) == name]

    def value(self, i: int) -> bytes:
        return self.headers[i].partition(b":")[2]

    def set_value(self, i: int, value: bytes) -> None:
        name = self.headers[i].partition(b":")[0]
        self.headers[i] = name + b": " + value


# -- the oracle ------------------------------------------------------------------------------

_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") +\S")
_CSEQ = re.compile(rb"\s*(\d+)\s+(" + _TOKEN + rb")\s*\Z")
_VIA = re.compile(
    rb"\s*SIP\s*/\s*2\.0\s*/\s*(" + _TOKEN + rb")\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)"
    rb"\s*(?::\s*(\d+))?\s*((?:;[^,]*)?)")
REQUIRED = (b"via", b"from", b"to", b"call-id", b"cseq")
#: A CR or LF that is not part of a folding CRLF SP/HT.
_BARE_EOL = re.compile(rb"\r(?!\n[ \t])|(?<!\r)\n")


@dataclass
class ViaInfo:
    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]


def loose_via(value: bytes) -> ViaInfo | None:
    """The first Via value read liberally (LWS anywhere, as RFC 3261 §7.3.1 allows), or None."""
    m = _VIA.match(value.replace(b"\r\n", b" "))
    if m is None:
        return None
    params: dict[str, str | None] = {}
    for p in m.group(4).split(b";")[1:]:
        k, eq, v = p.partition(b"=")
        params[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1") if eq else None
    port = int(m.group(3)) if m.group(3) else None
    return ViaInfo(m.group(1).decode("latin-1").upper(), m.group(2).decode("latin-1"), port,
                   params)


def response_reaches_us(via: ViaInfo) -> tuple[bool, str]:
    """Would §18.2.2 (with RFC 3581) send the response to a request received over UDP from one
    of our clients (bound to port 5060, listening on UDP and TCP there) back to us?"""
    if "maddr" in via.params:
        return False, "Via maddr sends the response elsewhere"
    received = via.params.get("received")
    if received is not None and "rport" not in via.params and via.host in CLIENT_HOSTS \
            and received not in CLIENT_HOSTS:
        # The sent-by is the source address, so serve has no reason to restamp the Via
        # (§18.2.1) and the response goes where the client's own received points (§18.2.2).
        return False, "Via received names another address"
    if via.transport not in ("UDP", "TCP"):
        return False, f"Via transport {via.transport} (response not sent over UDP/TCP 5060)"
    if "rport" in via.params:
        rport = via.params["rport"]
        if rport and rport.strip() != str(SIP_PORT):
            return False, "Via rport names another port"
        return True, ""
    if via.port is not None and via.port != SIP_PORT:
        return False, f"Via port {via.port} is not ours"
    return True, ""


def expectation(data: bytes, transport: str = "udp") -> tuple[str, str]:
    """(ANSWER | NONE | EITHER, why) for one request as sent (see the module docstring)."""
    if data.startswith(b"SIP/"):
        return NONE, "a response"
    first = data.split(CRLF, 1)[0]
    m = _REQUEST_LINE.match(first)
    if m is None:
        return EITHER, "no request line"
    if m.group(1) == b"ACK":
        return NONE, "ACK"
    head = data.split(b"\r\n\r\n", 1)[0]
    if _BARE_EOL.search(head.replace(b"\r\n ", b"").replace(b"\r\n\t", b"")
                        .replace(b"\r\n", b"")):
        # A lone LF or CR: a parser that takes LF as a line end (serve's does) and one that
        # does not disagree on where the header section ends, so no answer can be required.
        return EITHER, "bare CR or LF in the header section"
    draft = Draft.parse(data)
    found: dict[bytes, bytes] = {}
    for line in draft.headers:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = canonical(name)
        if key in REQUIRED and key not in found:
            v = value.strip()
            if v:
                found[key] = v
    missing = [k.decode() for k in REQUIRED if k not in found]
    if missing:
        return EITHER, "missing " + ", ".join(missing)
    if any(_BARE_EOL.search(v) for v in found.values()):
        return EITHER, "bare CR/LF in a required header"
    if not _CSEQ.match(found[b"cseq"].replace(b"\r\n", b" ")):
        return EITHER, "CSeq unusable"
    via = loose_via(found[b"via"])
    if via is None:
        return EITHER, "Via unusable"
    if transport == "udp":
        ok, why = response_reaches_us(via)
        if not ok:
            return EITHER, why
    return ANSWER, ""


def wire_method(data: bytes) -> str:
    """The method of the Request-Line as sent ('' when there is none)."""
    m = _REQUEST_LINE.match(data.split(CRLF, 1)[0])
    return m.group(1).decode("latin-1") if m else ""


def transaction_key(data: bytes) -> tuple[str, ...]:
    """§17.2.3's server transaction key, read liberally: the top Via's branch (with the magic
    cookie), sent-by and the method (ACK as INVITE); without the cookie (RFC 2543) the
    Request-URI, From tag, Call-ID, CSeq number and top Via.  Two requests with one key are
    one transaction: the second is a retransmission."""
    parts = data.split(CRLF, 1)[0].split(b" ")
    method = parts[0].decode("latin-1")
    method = "INVITE" if method == "ACK" else method
    first: dict[bytes, bytes] = {}
    for line in Draft.parse(data).headers:
        name, sep, value = line.partition(b":")
        key = canonical(name)
        if sep and key in REQUIRED and key not in first:
            first[key] = value
    via = loose_via(first.get(b"via", b""))
    branch = via.params.get("branch") if via else None
    if via is not None and branch and branch.startswith("z9hG4bK") and len(branch) > 7:
        return (branch, via.host.lower(), str(via.port), method)
    tag = re.search(rb";\s*tag\s*=\s*([^;,\s]+)", first.get(b"from", b""))
    cseq = first.get(b"cseq", b"").split()
    return ("2543", (parts[1] if len(parts) > 1 else b"").decode("latin-1"),
            (tag.group(1) if tag else b"").decode("latin-1"),
            _norm(first.get(b"call-id", b"")).decode("latin-1"),
            (cseq[0] if cseq else b"").decode("latin-1"),
            _norm(first.get(b"via", b"")).decode("latin-1"), method)


def _norm(value: bytes) -> bytes:
    return b" ".join(value.split())


def frame_stream(data: bytes) -> tuple[list[bytes], str]:
    """RFC 3261 §18.3 framing of a TCP stream as a client would expect it: the complete
    messages, and why framing stopped ('' when the stream ended cleanly)."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        while data.startswith(CRLF, pos):
            pos += 2                      # keep-alives and CRLFs before a start line (§7.5)
        if pos >= len(data):
            break
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            return out, "incomplete header section"
        head = data[pos:end]
        lengths = []
        for line in head.split(CRLF)[1:]:
            name, sep, value = line.partition(b":")
            if sep and canonical(name) == b"content-length":
                lengths.append(value.strip())
        if len(lengths) != 1 or not lengths[0].isdigit():
            return out, "Content-Length missing, repeated or invalid"
        n = int(lengths[0])
        stop = end + 4 + n
        if stop > len(data):
            return out, "body shorter than Content-Length"
        out.append(data[pos:stop])
        pos = stop
    return out, ""


# -- tokens: attributing responses to cases --------------------------------------------------

_TOK = re.compile(rb"Fz(\d{7})([0-9a-f]{2})")


def token(seed: int, idx: int) -> str:
    check = zlib.crc32(f"{seed}:{idx}".encode()) & 0xFF
    return f"Fz{idx:07d}{check:02x}"


def tokens_in(data: bytes, seed: int) -> set[int]:
    found = set()
    for m in _TOK.finditer(data):
        idx = int(m.group(1))
        if token(seed, idx).encode() == m.group(0):
            found.add(idx)
    return found


# -- templates -------------------------------------------------------------------------------

SDP = ("v=0\r\no=- 2890844526 2890844526 IN IP4 {me}\r\ns=-\r\nc=IN IP4 {me}\r\nt=0 0\r\n"
       "m=audio 49170 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\n"
       "a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-15\r\n")
AUTH_PLACEHOLDER = "@@AUTH@@"


@dataclass
class Template:
    name: str
    method: str
    uri: str
    headers: list[str]
    body: str = ""
    auth: str | None = None     # "Authorization" (REGISTER) or "Proxy-Authorization"
    kind: str = "plain"         # cancel / ack variants are built from earlier INVITEs


_FROM_FOREIGN = '"Carol" <sip:carol@atlanta.example.net>;tag=t{tok}'
_FROM_ALICE = '"Alice" <sip:alice@example.com>;tag=t{tok}'

TEMPLATES: list[Template] = [
    Template("invite-local", "INVITE", "sip:bob@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:bob@example.com>",
              "Contact: <sip:carol@{me}>", "Content-Type: application/sdp"], SDP),
    Template("invite-foreign", "INVITE", "sip:dave@biloxi.example.net",
             ["From: " + _FROM_FOREIGN, "To: \"Dave\" <sip:dave@biloxi.example.net>",
              "Contact: <sip:carol@{me}>", "Content-Type: application/sdp"], SDP),
    Template("invite-auth", "INVITE", "sip:dave@biloxi.example.net",
             ["From: " + _FROM_ALICE, "To: <sip:dave@biloxi.example.net>",
              "Contact: <sip:alice@{me}>", "Content-Type: application/sdp"], SDP,
             auth="Proxy-Authorization"),
    Template("invite-registered", "INVITE", "sip:alice@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:alice@example.com>",
              "Contact: <sip:carol@{me}>", "Content-Type: application/sdp"], SDP),
    Template("invite-preloaded-route", "INVITE", "sip:dave@biloxi.example.net",
             ["Route: <sip:biloxi.example.net;lr>", "From: " + _FROM_FOREIGN,
              "To: <sip:dave@biloxi.example.net>", "Contact: <sip:carol@{me}>",
              "Content-Type: application/sdp"], SDP),
    Template("invite-2543", "INVITE", "sip:bob@example.com",
             ['From: "Carol {tok}" <sip:carol@atlanta.example.net>', "To: sip:bob@example.com",
              "Content-Type: application/sdp"], SDP),
    Template("register-auth", "REGISTER", "sip:example.com",
             ["From: <sip:alice@example.com>;tag=t{tok}", "To: <sip:alice@example.com>",
              "Contact: <sip:alice@{contact}>{cparams}", "Expires: {expires}",
              "User-Agent: fuzzserve"], auth="Authorization"),
    Template("register-fetch", "REGISTER", "sip:example.com",
             ["From: <sip:alice@example.com>;tag=t{tok}", "To: <sip:alice@example.com>"],
             auth="Authorization"),
    Template("register-noauth", "REGISTER", "sip:example.com",
             ["From: <sip:bob@example.com>;tag=t{tok}", "To: <sip:bob@example.com>",
              "Contact: <sip:bob@{me}>;expires=3600"]),
    Template("register-foreign", "REGISTER", "sip:biloxi.example.net",
             ["From: <sip:carol@biloxi.example.net>;tag=t{tok}",
              "To: <sip:carol@biloxi.example.net>", "Contact: <sip:carol@{me}>"]),
    Template("options-server", "OPTIONS", "sip:{serve}",
             ["From: " + _FROM_FOREIGN, "To: <sip:{serve}>", "Accept: application/sdp"]),
    Template("options-user", "OPTIONS", "sip:bob@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:bob@example.com>"]),
    Template("options-foreign", "OPTIONS", "sip:dave@biloxi.example.net",
             ["From: " + _FROM_FOREIGN, "To: <sip:dave@biloxi.example.net>"]),
    Template("options-zero-mf", "OPTIONS", "sip:dave@biloxi.example.net",
             ["From: " + _FROM_FOREIGN, "To: <sip:dave@biloxi.example.net>"]),
    Template("options-2543", "OPTIONS", "sip:{serve}",
             ['From: "{tok}" <sip:carol@atlanta.example.net>', "To: sip:{serve}"]),
    Template("cancel-stray", "CANCEL", "sip:bob@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:bob@example.com>"]),
    Template("cancel-pending", "CANCEL", "", [], kind="cancel"),
    Template("ack-stray", "ACK", "sip:bob@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:bob@example.com>;tag=x{tok}"]),
    Template("ack-pending", "ACK", "", [], kind="ack"),
    Template("ack-dialog", "ACK", "sip:dave@" + SINK_HOST,
             ["Route: <sip:{serve};lr>", "From: " + _FROM_FOREIGN,
              "To: <sip:dave@biloxi.example.net>;tag=x{tok}"]),
    Template("bye-dialog", "BYE", "sip:dave@" + SINK_HOST,
             ["Route: <sip:{serve};lr>", "From: " + _FROM_FOREIGN,
              "To: <sip:dave@biloxi.example.net>;tag=x{tok}"]),
    Template("info-dialog", "INFO", "sip:dave@biloxi.example.net",
             ["From: " + _FROM_FOREIGN, "To: <sip:dave@biloxi.example.net>;tag=x{tok}",
              "Content-Type: application/dtmf-relay"], "Signal=5\r\nDuration=160\r\n"),
    Template("subscribe", "SUBSCRIBE", "sip:bob@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:bob@example.com>", "Event: presence",
              "Expires: 600", "Accept: application/pidf+xml", "Contact: <sip:carol@{me}>"]),
    Template("message-local", "MESSAGE", "sip:alice@example.com",
             ["From: " + _FROM_FOREIGN, "To: <sip:alice@example.com>",
              "Content-Type: text/plain"], "Watson, come here.\r\n"),
    Template("message-auth", "MESSAGE", "sip:dave@biloxi.example.net",
             ["From: " + _FROM_ALICE, "To: <sip:dave@biloxi.example.net>",
              "Content-Type: text/plain;charset=UTF-8"], "caf\u00e9 \u2615\r\n",
             auth="Proxy-Authorization"),
]
TEMPLATE_BY_NAME = {t.name: t for t in TEMPLATES}
_WEIGHTS = {"cancel-pending": 2, "ack-pending": 2, "register-auth": 3, "options-server": 2,
            "invite-auth": 2}

CONTACTS = (SINK_HOST, "biloxi.example.net;transport=tcp", f"{SINK_HOST}:5060;ob")


@dataclass
class Ctx:
    """The values a template was rendered with (kept so a CANCEL/ACK can match the INVITE)."""

    me: str
    tok: str
    cseq: int
    via: str
    serve: str
    transport: str = "UDP"


def _via(rng: random.Random, me: str, tok: str, transport: str, rfc2543: bool) -> str:
    if rfc2543:
        # No branch (RFC 2543): the case token goes in a Via parameter, which every
        # response copies, so an answer is attributed even when a mutation hits Call-ID.
        return f"SIP/2.0/{transport} {me};fz={tok}"
    form = rng.randrange(4)
    if form == 0:
        return f"SIP/2.0/{transport} {me};branch=z9hG4bK{tok};rport"
    if form == 1:
        return f"SIP/2.0/{transport} {me}:5060;branch=z9hG4bK{tok}"
    if form == 2:
        # As if a proxy upstream had forwarded it: two Vias.
        return (f"SIP/2.0/{transport} {me};branch=z9hG4bK{tok}\r\n"
                f"Via: SIP/2.0/UDP 192.0.2.77:5060;branch=z9hG4bKup{tok};received=192.0.2.77")
    return f"SIP/2.0/{transport} {me};branch=z9hG4bK{tok}"


def render_template(t: Template, rng: random.Random, ctx: Ctx) -> str:
    fields = {"me": ctx.me, "tok": ctx.tok, "serve": ctx.serve,
              "contact": rng.choice(CONTACTS),
              "cparams": rng.choice(["", ";expires=120", ";q=0.5", ";+sip.instance=\"<urn:x>\""]),
              "expires": rng.choice(["60", "120", "3600", "30", "0"])}
    lines = [f"{t.method} {t.uri.format(**fields)} SIP/2.0", f"Via: {ctx.via}",
             f"Max-Forwards: {0 if t.name == 'options-zero-mf' else 70}"]
    lines += [h.format(**fields) for h in t.headers]
    lines += [f"Call-ID: {ctx.tok}@{ctx.me}", f"CSeq: {ctx.cseq} {t.method}"]
    if t.auth:
        lines.append(f"{t.auth}: {AUTH_PLACEHOLDER}")
    body = t.body.format(**fields)
    raw = body.encode()
    lines.append(f"Content-Length: {len(raw)}")
    return "\r\n".join(lines) + "\r\n\r\n" + body


def derived_request(method: str, invite: bytes, ctx: Ctx) -> str:
    """The CANCEL (§9.1) or the ACK for a non-2xx (§17.1.1.3) of an INVITE we sent: same
    Request-URI, top Via, From, To, Call-ID and CSeq number."""
    d = Draft.parse(invite)
    uri = d.start.split(b" ")[1].decode("latin-1") if d.start.count(b" ") >= 2 else "sip:x"
    keep = {b"from", b"to", b"call-id", b"route"}
    lines = [f"{method} {uri} SIP/2.0", f"Via: {ctx.via.split(chr(13))[0]}", "Max-Forwards: 70"]
    lines += [h.decode("latin-1") for h in d.headers if d.name(h) in keep]
    lines += [f"CSeq: {ctx.cseq} {method}", "Content-Length: 0"]
    return "\r\n".join(lines) + "\r\n\r\n"


# -- torture seeds ---------------------------------------------------------------------------


def rfc5118_wire(path: Path) -> bytes:
    """The archive's LF-only bytes as wire bytes (LF -> CRLF, header block terminated), as the
    manifest says."""
    data = path.read_bytes().replace(b"\n", b"\r\n")
    if b"\r\n\r\n" not in data:
        data += b"\r\n"
    return data


def torture_messages() -> dict[str, bytes]:
    """RFC 4475 (``tests/data/rfc4475``) and RFC 5118 (``tests/data/rfc5118``) messages."""
    out: dict[str, bytes] = {}
    for p in sorted((DATA / "rfc4475").glob("*.dat")):
        out[p.stem] = p.read_bytes()
    for line in (DATA / "rfc5118" / "MANIFEST.tsv").read_text().splitlines():
        if line and not line.startswith("#"):
            name = line.split("\t")[0]
            out["5118-" + name] = rfc5118_wire(DATA / "rfc5118" / name)
    return out


def tokenize(data: bytes, tok: str) -> bytes:
    """Put ``tok`` into a torture message's Call-ID, first branch (or, without one, a Via
    parameter after the sent-by) and From tag so responses can be attributed; nothing else
    changes."""
    d = Draft.parse(data)
    t = tok.encode()
    for key in (b"call-id",):
        for i in d.find(key)[:1]:
            d.set_value(i, d.value(i).strip() + b"." + t)
    for i in d.find(b"via")[:1]:
        line = d.headers[i]
        if re.search(rb"branch\s*=", line):
            d.headers[i] = re.sub(rb"(branch\s*=\s*[^;,\s]*)", rb"\1." + t, line, count=1)
        else:
            name, _, value = line.partition(b":")
            m = _VIA.match(value.replace(b"\r\n", b"  "))
            if m is not None:
                end = m.end(3) if m.group(3) else m.end(2)
                d.headers[i] = name + b":" + value[:end] + b";fz=" + t + value[end:]
    for i in d.find(b"from")[:1]:
        d.headers[i] = re.sub(rb"(;\s*tag\s*=\s*[^;,\s]*)", rb"\1" + t, d.headers[i], count=1)
    return d.render()


# -- mutations -------------------------------------------------------------------------------

SINGLE = [b"from", b"to", b"call-id", b"cseq", b"max-forwards", b"content-length", b"expires",
          b"content-type"]
NAMES = {b"from": b"From", b"to": b"To", b"call-id": b"Call-ID", b"cseq": b"CSeq",
         b"max-forwards": b"Max-Forwards", b"content-length": b"Content-Length",
         b"expires": b"Expires", b"content-type": b"Content-Type", b"via": b"Via",
         b"contact": b"Contact", b"route": b"Route", b"record-route": b"Record-Route"}
BAD_URIS = [
    b"sip:bob@exa mple.com", b"sip:bob@example.com:99999", b"sip:bob@example.com:abc",
    b"sip:@example.com", b"sip:bob@", b"sip:bob@[::1", b"sip:bob@[2001:db8::10:5070",
    b"sip:bob@example.com;;;", b"sip:bob@example.com;transport=", b"sip:bob@example.com?",
    b"sip:bob@ex%ZZample.com", b"sip:b%ob@example.com", b"sip:bob@example.com;lr=\"",
    b"sips:bob@example.com;transport=udp", b"tel:+1-201-555-0123", b"sip:bob@-example-.com",
    b"sip:bob@example.com:0", b"sip:bob@127.0.0.1:65536", b"sip:bob@" + b"h" * 300 + b".com",
    b"sip:bob@1.2.3.4.5", b"sip:bob@[2001:db8::1]:5060:1", b"sip:bob:pa:ss@example.com",
    b"sip:b\x00b@example.com", b"sip:bob@example.com;maddr=", b"sip:bob@exa\tmple.com",
    b"sip:bob@example.com;user=phone;user=ip", b"sip:", b"sip:bob@example.com:",
    b"sip:bob@example..com", b"sip:bob@.", b"SIP:BOB@EXAMPLE.COM:5060",
    b"sip:bob@example.com;transport=tcp;transport=udp", b"sip:%@example.com",
    b"http://www.example.com/", b"sip:bob@example.com?Route=%3Csip:evil.example%3E",
    b"sip:bob@256.256.256.256", b"sip:bob@example.com;lr;lr=1;lr=2", b"<sip:bob@example.com>",
    b"sip:bob@[::ffff:192.0.2.1]", b"sip:bob@[fe80::1%25eth0]",
]
BAD_VALUES: dict[bytes, list[bytes]] = {
    b"cseq": [b"", b"abc INVITE", b"4294967296 INVITE", b"-1 INVITE", b"1", b"1 INVITE extra",
              b"99999999999999999999 INVITE", b"1 OPTIONS", b" 1  INVITE ", b"0 INVITE",
              b"2147483648 INVITE", b"1 INV ITE", b"1\tINVITE", b"0x10 INVITE", b"1 invite"],
    b"max-forwards": [b"", b"-1", b"256", b"abc", b"99999999999", b"0", b"1.5", b" 70 ",
                      b"70, 69", b"+70"],
    b"expires": [b"-1", b"abc", b"4294967296", b"1" * 80, b"", b"0", b"60.5",
                 b"Thu, 01 Dec 1994 16:00:00 GMT"],
    b"content-length": [b"", b"-5", b"abc", b"99999", b"99999999999999999999", b"0", b"1",
                        b"5 5", b"+3", b"0x10"],
    b"via": [b"SIP/2.0/UDP", b"SIP/2.0/UDP 127.0.1.1:99999;branch=z9hG4bKx",
             b"SIP/3.0/UDP 127.0.1.1;branch=z9hG4bKx", b"SIP/2.0/UDP 127.0.1.1;branch",
             b"SIP/2.0/UDP 127.0.1.1;branch=", b"SIP/2.0/UDP 127.0.1.1;rport=abc",
             b"SIP/2.0/UDP 127.0.1.1;received=", b"SIP/2.0/UDP [::1;branch=z9hG4bKx",
             b"garbage", b"SIP/2.0/UDP 127.0.1.1;ttl=300", b"SIP/2.0/ 127.0.1.1",
             b"SIP/2.0/UDP 127.0.1.1;branch=z9hG4bK;branch=z9hG4bK2", b"SIP/2.0/UDP ;branch=x",
             b"SIP/2.0/UDP 127.0.1.1:0;branch=z9hG4bKx", b"SIP/2.0/UDP exa mple.com"],
    b"call-id": [b"", b"a b", b"@", b"\x00", b"x" * 3000, b"<call>"],
    b"content-type": [b"", b"application", b"application/sdp;charset", b"/", b"a/b/c"],
}
BAD_PARAMS = [b";tag", b";tag=", b";;", b";=x", b";tag=a;tag=b", b";lr=;lr", b";expires=abc",
              b";q=2.0", b";q=abc", b";transport=", b";received=", b";rport=99999", b";maddr",
              b";" + b"p" * 500 + b"=v", b";tag=\"quoted\"", b";a=\xff\xfe"]
HAVOC_BYTES = [b"\x00", b"\xff", b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b";", b",", b"<",
               b">", b"\"", b"\\", b"%", b"@", b"[", b"]", b"=", b"/", b"\xc3\x28", b"\x80"]


class Mutation:
    """A mutation: a label (what it did) and whether it makes the request one a proxy must
    refuse (``refuse``), recorded against what reaches the sink."""

    def __init__(self, label: str, refuse: bool = False) -> None:
        self.label = label
        self.refuse = refuse


def _pick_line(rng: random.Random, d: Draft, names: Sequence[bytes]) -> int | None:
    idx = [i for i, h in enumerate(d.headers) if d.name(h) in names]
    return rng.choice(idx) if idx else None


def m_dup(rng: random.Random, d: Draft) -> Mutation:
    name = rng.choice(SINGLE)
    i = _pick_line(rng, d, [name])
    if i is None:
        return Mutation("dup:none")
    line = d.headers[i]
    if rng.random() < 0.5:
        if name in (b"to", b"from"):
            line = NAMES[name] + b": <sip:other@example.net>;tag=dup"
        elif name in (b"cseq",):
            line = b"CSeq: 59 INVITE"
        elif name == b"call-id":
            line = b"Call-ID: other@192.0.2.2"
        elif name in BAD_VALUES:
            line = NAMES[name] + b": " + rng.choice(BAD_VALUES[name])
    d.headers.insert(rng.randrange(len(d.headers) + 1), line)
    return Mutation("dup:" + name.decode(), refuse=name in (b"from", b"to", b"call-id", b"cseq"))


def m_delete(rng: random.Random, d: Draft) -> Mutation:
    if not d.headers:
        return Mutation("del:none")
    if rng.random() < 0.6:
        i = _pick_line(rng, d, [*REQUIRED, b"max-forwards", b"content-length"])
    else:
        i = rng.randrange(len(d.headers))
    if i is None:
        return Mutation("del:none")
    name = d.name(d.headers.pop(i))
    # Without its only Via (or From, To, Call-ID, CSeq) a request must be refused; a second
    # Via deleted leaves a valid one.
    refuse = name in REQUIRED and not d.find(name)
    return Mutation("del:" + (name.decode("latin-1") or "?"), refuse=refuse)


def m_reorder(rng: random.Random, d: Draft) -> Mutation:
    vias = [h for h in d.headers if d.name(h) == b"via"]
    rest = [h for h in d.headers if d.name(h) != b"via"]
    rng.shuffle(rest)
    # Via order is meaningful; the rest may be shuffled (§7.3.1), Vias anywhere among them.
    out = list(rest)
    pos = rng.randrange(len(out) + 1)
    out[pos:pos] = vias
    d.headers = out
    return Mutation("reorder")


def _replace_uri(value: bytes, new: bytes) -> bytes:
    lt, gt = value.find(b"<"), value.find(b">")
    if 0 <= lt < gt:
        return value[:lt + 1] + new + value[gt:]
    _, sep, params = value.strip().partition(b";")
    return new + (sep + params if b"tag" in params else b"")


def m_bad_uri(rng: random.Random, d: Draft) -> Mutation:
    bad = rng.choice(BAD_URIS)
    where = rng.choice(["ruri", "to", "from", "contact", "route", "record-route"])
    if where == "ruri":
        parts = d.start.split(b" ")
        if len(parts) >= 3:
            d.start = b" ".join([parts[0], bad, *parts[2:]]) if b" " not in bad else \
                parts[0] + b" " + bad + b" " + parts[-1]
        return Mutation("uri:ruri", refuse=True)
    name = where.encode()
    i = _pick_line(rng, d, [name])
    if i is None:
        d.headers.insert(rng.randrange(len(d.headers) + 1), NAMES[name] + b": <" + bad + b">")
    else:
        d.set_value(i, _replace_uri(d.value(i), bad))
    return Mutation("uri:" + where, refuse=where in ("to", "from"))


def m_bad_value(rng: random.Random, d: Draft) -> Mutation:
    name = rng.choice(list(BAD_VALUES))
    i = _pick_line(rng, d, [name])
    v = rng.choice(BAD_VALUES[name])
    if i is None:
        d.headers.insert(rng.randrange(len(d.headers) + 1), NAMES[name] + b": " + v)
    else:
        d.set_value(i, v)
    return Mutation("value:" + name.decode(), refuse=name in (b"cseq", b"call-id", b"via"))


def m_huge(rng: random.Random, d: Draft) -> Mutation:
    kind = rng.randrange(4)
    if kind == 0:
        n = rng.choice([1000, 8200, 20000, 60000])
        d.headers.insert(rng.randrange(len(d.headers) + 1), b"X-Huge: " + b"a" * n)
        return Mutation(f"huge:header{n}")
    if kind == 1:
        n = rng.choice([100, 255, 257, 400])
        d.headers[1:1] = [b"X-Many-%d: %d" % (k, k) for k in range(n)]
        return Mutation(f"huge:count{n}")
    if kind == 2:
        i = _pick_line(rng, d, [b"to", b"from", b"contact"])
        if i is not None:
            d.set_value(i, b'"' + b"N" * rng.choice([300, 9000]) + b'" ' + d.value(i).strip())
        return Mutation("huge:display-name")
    d.body = d.body + b"x" * rng.choice([1000, 30000])
    return Mutation("huge:body")


def m_compact(rng: random.Random, d: Draft) -> Mutation:
    for k, h in enumerate(d.headers):
        name, sep, value = h.partition(b":")
        c = canonical(name)
        if sep and rng.random() < 0.6:
            if c in LONG_TO_COMPACT and rng.random() < 0.7:
                d.headers[k] = LONG_TO_COMPACT[c] + b":" + value
            else:
                odd = b"".join(rng.choice([b.upper(), b.lower()])
                               for b in (name[j:j + 1] for j in range(len(name))))
                d.headers[k] = odd + b":" + value
    return Mutation("compact")


def m_whitespace(rng: random.Random, d: Draft) -> Mutation:
    kind = rng.randrange(9)
    if kind == 0 and d.headers:                          # LWS around the colon (legal)
        k = rng.randrange(len(d.headers))
        name, sep, value = d.headers[k].partition(b":")
        if sep:
            d.headers[k] = name + b" \t : " + value.strip()
        return Mutation("ws:colon")
    if kind == 1 and d.headers:                          # folding (legal)
        k = rng.randrange(len(d.headers))
        name, sep, value = d.headers[k].partition(b":")
        if sep and b" " in value.strip():
            v = value.strip()
            cut = v.index(b" ")
            d.headers[k] = name + b": " + v[:cut] + b"\r\n   " + v[cut + 1:]
        return Mutation("ws:fold")
    if kind == 2:                                        # lwsstart
        d.start = d.start.replace(b" ", b"  ")
        return Mutation("ws:request-line-spaces", refuse=True)
    if kind == 3:                                        # trws
        d.start += b"  "
        return Mutation("ws:request-line-trailing", refuse=True)
    if kind == 4:
        d.start = b"\r\n" + d.start
        return Mutation("ws:leading-crlf")
    if kind == 5 and d.headers:
        k = rng.randrange(len(d.headers))
        d.headers[k] += b" \t "
        return Mutation("ws:trailing")
    if kind == 6 and d.headers:
        k = rng.randrange(len(d.headers))
        d.headers[k] = b" " + d.headers[k]               # a continuation of the previous line
        return Mutation("ws:leading")
    if kind == 7:
        d.headers = [h.replace(b"/", b" / ") if d.name(h) == b"via" else h for h in d.headers]
        return Mutation("ws:via-slashes")
    d.headers = [h.replace(b": ", b":\t") for h in d.headers]
    return Mutation("ws:tabs")


def m_line_endings(rng: random.Random, d: Draft) -> Mutation:
    d.eol = rng.choice([b"\n", b"\r", b"\n\r"])
    return Mutation("line-endings:" + repr(d.eol)[2:-1], refuse=True)


def m_non_utf8(rng: random.Random, d: Draft) -> Mutation:
    junk = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                       b"\x00", b"\x1b[31m", b"\xe2\x80\xae"])
    if d.headers and rng.random() < 0.8:
        k = rng.randrange(len(d.headers))
        h = d.headers[k]
        pos = rng.randrange(len(h) + 1)
        d.headers[k] = h[:pos] + junk + h[pos:]
        return Mutation("bytes:" + d.name(h).decode("latin-1"),
                        refuse=d.name(h) in (b"to", b"from", b"call-id", b"cseq", b"via"))
    pos = rng.randrange(len(d.start) + 1)
    d.start = d.start[:pos] + junk + d.start[pos:]
    return Mutation("bytes:request-line", refuse=True)


def m_branch(rng: random.Random, d: Draft) -> Mutation:
    i = _pick_line(rng, d, [b"via"])
    if i is None:
        return Mutation("branch:none")
    kind = rng.randrange(3)
    line = d.headers[i]
    if kind == 0:                                        # RFC 2543: no branch at all
        d.headers[i] = re.sub(rb";\s*branch\s*=\s*[^;,]*", b"", line, count=1)
        return Mutation("branch:removed")
    if kind == 1:
        d.headers[i] = re.sub(rb"branch=z9hG4bK", b"branch=z9hG4bK;x=", line, count=1)
        return Mutation("branch:cookie-only")
    d.headers[i] = re.sub(rb"branch=", b"branch=\"\\\"z9hG4bK", line, count=1)
    return Mutation("branch:odd")


def m_colonless(rng: random.Random, d: Draft) -> Mutation:
    d.headers.insert(rng.randrange(len(d.headers) + 1),
                     rng.choice([b"Foobar roobar", b"NoColonHere", b"Via SIP/2.0/UDP x", b":",
                                 b": value-without-name"]))
    return Mutation("colonless", refuse=True)


def m_request_line(rng: random.Random, d: Draft) -> Mutation:
    parts = d.start.split(b" ")
    kind = rng.randrange(8)
    if len(parts) < 3:
        return Mutation("rl:short")
    if kind == 0:
        parts[0] = parts[0].lower()
    elif kind == 1:
        parts[0] = rng.choice([b"NEWMETHOD", b"INV", b"INVITE!", b"REGISTERX", b"A" * 300])
    elif kind == 2:
        parts[-1] = rng.choice([b"SIP/2.1", b"SIP/7.0", b"sip/2.0", b"SIP/2", b"HTTP/1.1", b""])
    elif kind == 3:
        parts[1] = b"<" + parts[1] + b">"
    elif kind == 4:
        parts = parts[:2]
    elif kind == 5:
        parts[0] = rng.choice([b"OPTIONS", b"INVITE", b"BYE", b"ACK", b"CANCEL", b"REGISTER"])
    elif kind == 6:
        parts.insert(2, b"extra")
    else:
        parts[1] = parts[1] + b";" + rng.choice(BAD_PARAMS).lstrip(b";")
    d.start = b" ".join(parts)
    return Mutation(f"rl:{kind}", refuse=kind != 5)


def m_quotes(rng: random.Random, d: Draft) -> Mutation:
    i = _pick_line(rng, d, [b"to", b"from", b"contact", b"route"])
    if i is None:
        return Mutation("quotes:none")
    v = d.value(i).strip()
    kind = rng.randrange(6)
    if kind == 0:
        v = b'"Unbalanced ' + v
    elif kind == 1:
        v = v.replace(b">", b"", 1)
    elif kind == 2:
        v = v.replace(b"<", b"", 1)
    elif kind == 3:
        v = b'"a\\' + b'" ' + v
    elif kind == 4:
        v = b"<<" + v + b">>"
    else:
        v = b'Bell, Alexander ' + v
    d.set_value(i, v)
    return Mutation("quotes:" + d.name(d.headers[i]).decode(),
                    refuse=d.name(d.headers[i]) in (b"to", b"from"))


def m_params(rng: random.Random, d: Draft) -> Mutation:
    i = _pick_line(rng, d, [b"to", b"from", b"contact", b"via", b"route"])
    if i is None:
        return Mutation("params:none")
    d.headers[i] += rng.choice(BAD_PARAMS)
    return Mutation("params:" + d.name(d.headers[i]).decode(),
                    refuse=d.name(d.headers[i]) in (b"to", b"from"))


def m_via_extra(rng: random.Random, d: Draft) -> Mutation:
    kind = rng.randrange(5)
    # Each extra Via gets its own branch: on top, a shared one would make two cases one
    # transaction (§17.2.3), and the second would rightly be absorbed as a retransmission.
    b1, b2 = (b"z9hG4bKx%010x" % rng.getrandbits(40) for _ in range(2))
    extra = [b"Via: SIP/2.0/UDP [2001:db8::9:1]:6050;branch=" + b1,
             b"Via: SIP/2.0/TCP 192.0.2.9;branch=" + b1 + b";received=[2001:db8::9]",
             b"Via: SIP/2.0/UDP 255.255.255.255;branch=" + b1,
             b"Via: SIP/2.0/UDP 192.0.2.1;branch=" + b1 + b", SIP/2.0/UDP 192.0.2.2;branch=" + b2,
             ][kind] if kind < 4 else None
    i = _pick_line(rng, d, [b"via"])
    if extra is None:
        if i is not None:
            d.headers[i] += rng.choice([b";maddr=" + SINK_HOST.encode(), b";maddr=example.net",
                                        b";received=1.2.3.4", b";rport=5061", b";alias"])
        return Mutation("via:param")
    pos = (i + 1) if i is not None and rng.random() < 0.8 else 0
    d.headers.insert(pos, extra)
    return Mutation("via:extra" + ("-top" if pos == 0 else ""))


def m_body(rng: random.Random, d: Draft) -> Mutation:
    kind = rng.randrange(4)
    if kind == 0:
        d.body = b"v=0\r\no=\r\nc=IN IP6 ::ffff:zz\r\nm=audio -1 RTP/AVP\r\n\x00\xff"
    elif kind == 1:
        d.body = d.body[: rng.randrange(len(d.body) + 1)]
    elif kind == 2:
        d.headers.append(b"Content-Type: multipart/mixed;boundary=")
    else:
        d.body = b"\r\n\r\n" + d.body
    return Mutation(f"body:{kind}")


SIP_MUTATIONS: list[tuple[Callable[[random.Random, Draft], Mutation], int]] = [
    (m_dup, 8), (m_delete, 6), (m_reorder, 3), (m_bad_uri, 10), (m_bad_value, 10),
    (m_huge, 2), (m_compact, 4), (m_whitespace, 6), (m_line_endings, 1), (m_non_utf8, 4),
    (m_branch, 3), (m_colonless, 2), (m_request_line, 4), (m_quotes, 4), (m_params, 3),
    (m_via_extra, 2), (m_body, 2),
]
#: Over TCP the stream's framing is kept (Content-Length recomputed): these leave it alone.
TCP_SAFE = {m_dup, m_reorder, m_bad_uri, m_compact, m_non_utf8, m_branch, m_colonless,
            m_request_line, m_quotes, m_params, m_via_extra}


def _render(d: Draft, fix_length: bool) -> bytes:
    return d.render(fix_length)


def m_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """Plain byte-level mutations: flips, insertions, deletions, truncation, havoc."""
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "insert", "delete", "truncate", "truncate", "havoc"])
    if not b:
        return bytes(b), "bytes:empty"
    if kind == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    elif kind == "insert":
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.choice(HAVOC_BYTES)
    elif kind == "delete":
        for _ in range(rng.randint(1, 3)):
            if len(b) > 1:
                pos = rng.randrange(len(b))
                del b[pos:pos + rng.randint(1, 8)]
    elif kind == "truncate":
        b = b[: rng.randrange(1, len(b))]
    else:
        for _ in range(rng.randint(5, 30)):
            pos = rng.randrange(len(b))
            b[pos:pos + rng.randint(0, 3)] = rng.choice(HAVOC_BYTES) + bytes(
                rng.randrange(256) for _ in range(rng.randint(0, 3)))
    return bytes(b), "bytes:" + kind


def random_datagram(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 1500)))
    if kind == 1:
        return b"\r\n" * rng.randint(1, 8)
    if kind == 2:
        return rng.choice([b"INVITE", b"SIP/2.0 200 OK", b"OPTIONS sip:", b"\x00\x00\x00\x00",
                           b"jaK", b"\r\n\r\nOPTIONS sip:a SIP/2.0\r\n\r\n"])
    return bytes(rng.choice(b"SIP/2.0 INVITE:;<>@\r\n\t\"\\ 0123456789abcz")
                 for _ in range(rng.randint(10, 400)))


# -- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    idx: int
    seed: str
    method: str
    data: bytes
    transport: str
    mutations: list[str]
    refuse: bool
    expect: str
    why: str
    me: str = ""
    stream: int = -1
    auth: str | None = None
    template: bytes = b""         # the bytes before digest credentials were filled in
    refusing: list[str] = field(default_factory=list)   # the mutations that make it refusable
    sent_at: float = 0.0
    sends: int = 0
    statuses: list[int] = field(default_factory=list)
    final_at: float = 0.0
    #: Seconds from sending to the harness closing the TCP stream (0: not closed, or UDP):
    #: an answer missing from a stream closed early is the harness's doing, not serve's.
    closed_after: float = 0.0
    sink: int = 0

    @property
    def final(self) -> int | None:
        finals = [s for s in self.statuses if s >= 200]
        return finals[0] if finals else None

    def summary(self) -> dict[str, Any]:
        out = {"idx": self.idx, "seed": self.seed, "method": self.method,
               "transport": self.transport, "mutations": self.mutations,
               "expect": self.expect, "why": self.why, "statuses": self.statuses[:8],
               "sink": self.sink, "sends": self.sends, "stream": self.stream,
               "closed_after": round(self.closed_after, 2),
               "data": base64.b64encode(self.data).decode()}
        if self.template and self.template != self.data:
            out["template"] = base64.b64encode(self.template).decode()
        return out


class Generator:
    """Deterministic cases from ``seed``: the i-th case depends only on the seed, i and the
    INVITEs generated before it (which a CANCEL/ACK refers to)."""

    def __init__(self, seed: int, serve: str) -> None:
        self.seed = seed
        self.serve = serve
        self.torture = torture_messages()
        self.torture_names = sorted(self.torture)
        self.recent_invites: deque[tuple[bytes, Ctx]] = deque(maxlen=64)
        # An INVITE gets at most one CANCEL and one ACK: a second would be a retransmission.
        self.derived: set[tuple[str, str]] = set()
        # Transaction keys sent so far: a request with one of them is, by §17.2.3, a
        # retransmission of the earlier one (whose answer it gets), so its own is optional.
        self.keys: set[tuple[str, ...]] = set()
        names = [t.name for t in TEMPLATES]
        self.choices = names
        self.weights = [_WEIGHTS.get(n, 1) for n in names]

    def _template_case(self, rng: random.Random, idx: int, transport: str,
                       me: str) -> tuple[str, str, Draft, Ctx, str | None]:
        tok = token(self.seed, idx)
        name = rng.choices(self.choices, self.weights)[0]
        t = TEMPLATE_BY_NAME[name]
        method = "CANCEL" if t.kind == "cancel" else "ACK"
        fresh_invites = [(inv, c) for inv, c in self.recent_invites
                         if (c.tok, method) not in self.derived]
        if t.kind in ("cancel", "ack") and fresh_invites:
            invite, ictx = rng.choice(fresh_invites)
            self.derived.add((ictx.tok, method))
            text = derived_request(method, invite, ictx)
            return name, method, Draft.parse(text.encode()), ictx, None
        if t.kind != "plain":
            t = TEMPLATE_BY_NAME["options-server"]
            name = t.name
        via = _via(rng, me, tok, transport, rfc2543=name.endswith("2543"))
        ctx = Ctx(me, tok, rng.randint(1, 99999), via, self.serve, transport)
        text = render_template(t, rng, ctx)
        if t.method == "INVITE" and "2543" not in name:
            self.recent_invites.append((text.encode(), ctx))
        return name, t.method, Draft.parse(text.encode()), ctx, t.auth

    def udp_case(self, idx: int) -> Case:
        rng = random.Random(f"{self.seed}:udp:{idx}")
        me = UDP_CLIENTS[idx % len(UDP_CLIENTS)]
        roll = rng.random()
        labels: list[str] = []
        refusing: list[str] = []
        refuse = False
        auth = None
        if roll < 0.03:
            data = random_datagram(rng)
            name, method = "random", "?"
        else:
            if roll < 0.75:
                name, method, d, ctx, auth = self._template_case(rng, idx, "UDP", me)
                if ctx.tok != token(self.seed, idx):
                    me = ctx.me                          # a CANCEL/ACK goes where its INVITE went
            else:
                name = rng.choice(self.torture_names)
                d = Draft.parse(tokenize(self.torture[name], token(self.seed, idx)))
                method = d.start.split(b" ", 1)[0].decode("latin-1")
            n = rng.choices([0, 1, 2, 3], [12, 50, 25, 13])[0]
            fns = [f for f, _ in SIP_MUTATIONS]
            ws = [w for _, w in SIP_MUTATIONS]
            for fn in rng.choices(fns, ws, k=n):
                m = fn(rng, d)
                labels.append(m.label)
                refuse |= m.refuse
                if m.refuse:
                    refusing.append(m.label)
            data = _render(d, fix_length=False)
            # A few stay pristine (the harness's own check of its templates); the others
            # without SIP-aware mutations get byte-level ones.
            if (n == 0 and rng.random() < 0.6) or (n > 0 and rng.random() < 0.15):
                data, label = m_bytes(rng, data)
                labels.append(label)
                if label == "bytes:truncate":
                    refuse = True
                    refusing.append(label)
        data = data[:MAX_DATAGRAM]
        method = wire_method(data) or method
        expect, why = self._judge(_with_auth_shape(data), "udp")
        return Case(idx, name, method, data, "udp", labels, refuse, expect, why, me=me,
                    refusing=refusing,
                    auth=auth)

    def _judge(self, data: bytes, transport: str) -> tuple[str, str]:
        expect, why = expectation(data, transport)
        if expect == ANSWER and not tokens_in(data, self.seed):
            # Mutations damaged every copy of the case token: an answer would arrive but
            # could not be told from another case's, so the harness cannot require it.
            return EITHER, "no intact case token"
        key = transaction_key(data)
        if key in self.keys and expect == ANSWER:
            expect, why = EITHER, "same transaction key as an earlier request"
        self.keys.add(key)
        return expect, why

    def tcp_stream(self, s: int, first_idx: int) -> Stream:
        """One TCP stream: 1-5 requests with framing-safe mutations (Content-Length kept
        right), some pipelined with CRLFCRLF keep-alives, some cut mid-message, some followed
        by garbage, some with a broken Content-Length, some written in small pieces."""
        rng = random.Random(f"{self.seed}:tcp:{s}")
        kind = rng.choices(["clean", "keepalive", "cut", "garbage", "chunked", "broken-length"],
                           [40, 10, 15, 10, 15, 10])[0]
        st = Stream(s, kind)
        safe = [(f, w) for f, w in SIP_MUTATIONS if f in TCP_SAFE]
        for k in range(rng.randint(1, 5)):
            idx = first_idx + k
            name, method, d, _, auth = self._template_case(rng, idx, "TCP", TCP_CLIENT)
            labels: list[str] = []
            refusing: list[str] = []
            refuse = False
            for fn in rng.choices([f for f, _ in safe], [w for _, w in safe],
                                  k=rng.choices([0, 1, 2], [30, 50, 20])[0]):
                m = fn(rng, d)
                labels.append(m.label)
                refuse |= m.refuse
                if m.refuse:
                    refusing.append(m.label)
            data = _render(d, fix_length=True)
            c = Case(idx, name, wire_method(data) or method, data, "tcp", labels, refuse,
                     EITHER, "", me=TCP_CLIENT, stream=s, auth=auth, refusing=refusing)
            st.add(c.data, c)
            if kind == "keepalive":
                st.add(b"\r\n\r\n")
        last = st.cases[-1]
        if kind == "cut":
            last.data = last.data[: rng.randrange(1, len(last.data))]
            last.mutations.append("stream:cut")
            st.tail_from = len(st.pieces) - 1
        elif kind == "garbage":
            st.tail_from = len(st.pieces)
            st.add(random_datagram(rng))
        elif kind == "broken-length":
            j = rng.randrange(len(st.cases))
            c = st.cases[j]
            bad = rng.choice([b"-1", b"abc", b"99999", b"5, 6", b""])
            c.data = re.sub(rb"Content-Length: \d+", b"Content-Length: " + bad, c.data)
            c.mutations.append("stream:content-length=" + bad.decode())
            st.tail_from = next(k for k, (_, pc) in enumerate(st.pieces) if pc is c)
        elif kind == "chunked":
            st.cuts = sorted(rng.random() for _ in range(5))
        st.judge(self._judge)
        return st


@dataclass
class Stream:
    """A TCP stream: its pieces in order (a case's request, or keep-alives and garbage), and
    where the writer pauses (fractions of the length) for the chunked kind."""

    number: int
    kind: str
    pieces: list[tuple[bytes, Case | None]] = field(default_factory=list)
    cuts: list[float] = field(default_factory=list)
    #: The piece where the stream breaks (cut message, garbage, broken Content-Length): the
    #: writer sends it only once the requests before it are answered, because serve may
    #: then close the connection, and a late answer's new connection would go where the
    #: Via says (§18.2.2), which is not always a port of ours.
    tail_from: int | None = None

    @property
    def cases(self) -> list[Case]:
        return [c for _, c in self.pieces if c is not None]

    def add(self, data: bytes, case: Case | None = None) -> None:
        self.pieces.append((data, case))

    def data(self, start: int = 0, stop: int | None = None) -> bytes:
        return b"".join(c.data if c is not None else d for d, c in self.pieces[start:stop])

    def judge(self, judge: Callable[[bytes, str], tuple[str, str]]) -> None:
        """The oracle for each case: answerable only when §18.3 framing (as a client sees it)
        yields exactly its bytes at its place in the stream."""
        spans: dict[tuple[int, int], Case] = {}
        pos = 0
        for d, c in self.pieces:
            piece = _with_auth_shape(c.data if c is not None else d)
            if c is not None:
                spans[(pos, pos + len(piece))] = c
            pos += len(piece)
        stream = b"".join(_with_auth_shape(c.data if c is not None else d)
                          for d, c in self.pieces)
        framed, why = frame_stream(stream)
        off = 0
        seen: set[int] = set()
        for msg in framed:
            start = stream.index(msg, off)
            off = start + len(msg)
            c = spans.get((start, off))
            if c is not None:
                c.expect, c.why = judge(msg, "tcp")
                seen.add(c.idx)
        for c in self.cases:
            if c.idx not in seen:
                c.expect, c.why = EITHER, f"not framed in its stream ({why or 'misaligned'})"


def _with_auth_shape(data: bytes) -> bytes:
    """The oracle judges a request with the credentials it will carry (a fixed-length stand-in
    for the placeholder is enough: the shape, not the digest, matters)."""
    return data.replace(AUTH_PLACEHOLDER.encode(), b'Digest username="alice"')


# -- digest credentials (computed at send time from the live nonce) --------------------------


class Credentials:
    """RFC 7616/2617 digest credentials for the placeholders in auth templates: the nonce is
    fetched from serve once, the nonce-count increases per request."""

    def __init__(self, realm: str, nonce: str, opaque: str | None, algorithm: str) -> None:
        self.realm = realm
        self.nonce = nonce
        self.opaque = opaque
        self.algorithm = algorithm
        self.nc = 0

    def fill(self, data: bytes) -> bytes:
        placeholder = AUTH_PLACEHOLDER.encode()
        if placeholder not in data:
            return data
        first = data.split(CRLF, 1)[0].split(b" ")
        method = first[0].decode("latin-1")
        uri = first[1].decode("latin-1") if len(first) > 1 else "sip:example.com"
        user = "alice"
        self.nc += 1
        nc = f"{self.nc:08x}"
        cnonce = hashlib.md5(data).hexdigest()[:16]
        h = hashlib.sha256 if self.algorithm == "SHA-256" else hashlib.md5
        ha1 = h(f"{user}:{self.realm}:{USERS[user]}".encode()).hexdigest()
        ha2 = h(f"{method}:{uri}".encode()).hexdigest()
        resp = h(f"{ha1}:{self.nonce}:{nc}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        value = (f'Digest username="{user}", realm="{self.realm}", nonce="{self.nonce}", '
                 f'uri="{uri}", response="{resp}", algorithm={self.algorithm}, qop=auth, '
                 f'nc={nc}, cnonce="{cnonce}"')
        if self.opaque is not None:
            value += f', opaque="{self.opaque}"'
        return data.replace(placeholder, value.encode(), 1)


def parse_challenge(value: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r'(\w+)=(?:"([^"]*)"|([^,\s]+))', value):
        out[m.group(1).lower()] = m.group(2) if m.group(2) is not None else m.group(3)
    return out


# -- serve, its log and its memory -----------------------------------------------------------


class Serve:
    """``fastsip serve`` as a subprocess on 127.0.0.1 (UDP and TCP on one free port); its
    stderr goes to ``serve-N.log`` in ``workdir``."""

    count = 0

    def __init__(self, workdir: Path, extra: Sequence[str] = (), *, auth: bool = True,
                 t1: float = 0.05) -> None:
        Serve.count += 1
        self.port = free_port(SERVE_HOST)
        self.log_path = workdir / f"serve-{Serve.count}.log"
        args = ["--listen", f"udp:{SERVE_HOST}:{self.port}", "--listen",
                f"tcp:{SERVE_HOST}:{self.port}", "--domain", DOMAIN, "--t1", str(t1),
                "--grace", "1", "--log-level", "info"]
        if auth:
            users = workdir / "users.txt"
            users.write_text("".join(f"{u}:{p}\n" for u, p in USERS.items()))
            args += ["--auth-users", str(users)]
        self.args = [*args, *extra]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsip.cli", "serve", *self.args], cwd=workdir,
            env=fastsip_env(), stdout=subprocess.PIPE, stderr=self._log,
            stdin=subprocess.DEVNULL, text=True,
            preexec_fn=_die_with_parent)  # noqa: PLW1509 - the harness starts no threads
        assert self.proc.stdout is not None
        for _ in range(2):
            line = self.proc.stdout.readline()
            if not line.startswith("listening on"):
                self.stop()
                raise RuntimeError(f"serve did not start: {line!r}\n{self.log()[-3000:]}")

    @property
    def address(self) -> tuple[str, int]:
        return (SERVE_HOST, self.port)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def udp_drops(self) -> int | None:
        """Datagrams the kernel dropped at serve's UDP socket (its receive buffer was full)."""
        try:
            lines = Path("/proc/net/udp").read_text().splitlines()[1:]
        except OSError:
            return None
        want = f"0100007F:{self.port:04X}"
        for line in lines:
            cols = line.split()
            if len(cols) > 12 and cols[1] == want:
                return int(cols[-1])
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return self.proc.returncode


def _die_with_parent() -> None:
    # A harness that dies must not leave serve running in its namespace (PR_SET_PDEATHSIG).
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ([\w.]+): ", re.MULTILINE)
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def scan_log(text: str) -> dict[str, Any]:
    """ERROR/CRITICAL records and tracebacks in serve's log, grouped by the innermost frame in
    fastsip and the exception type; WARNING records counted by message."""
    starts = [m.start() for m in _RECORD.finditer(text)]
    records = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]
    stray = text[: starts[0]] if starts else text
    errors: list[dict[str, Any]] = []
    warnings: Counter[str] = Counter()
    for rec in [*records, *([stray] if stray.strip() else [])]:
        m = _RECORD.match(rec)
        level = m.group(1) if m else "?"
        tb = "Traceback (most recent call last)" in rec
        bad_word = "Exception" in rec and level not in ("INFO", "DEBUG")
        if level in ("ERROR", "CRITICAL") or tb or bad_word or (m is None and rec.strip()):
            frames = _FRAME.findall(rec)
            inner = [f for f in frames if "/fastsip/" in f[0]]
            where = ""
            if inner:
                path, line, func = inner[-1]
                where = f"{path[path.rindex('/fastsip/') + 1:]}:{line} in {func}"
            lines = [x for x in rec.strip().splitlines() if x.strip()]
            exc = lines[-1].strip() if tb and lines else ""
            exc_type = exc.split(":", 1)[0] if exc else ""
            errors.append({"level": level, "where": where, "exception": exc_type,
                           "message": lines[0][:300] if lines else "",
                           "last": exc[:300], "text": rec[:4000]})
        elif level == "WARNING":
            msg = rec.split(": ", 1)[-1].strip().splitlines()[0]
            warnings[re.sub(r"\d+", "N", msg)[:100]] += 1
    groups: Counter[str] = Counter(f"{e['exception'] or e['level']} at {e['where'] or '?'}"
                                   for e in errors)
    return {"errors": errors, "groups": dict(groups), "warnings": dict(warnings)}


# -- the network side ------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_data: Callable[[bytes, tuple[str, int], _Udp], None]) -> None:
        self.on_data = on_data
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_data(data, addr, self)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable for an earlier send: nothing to do

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)


def _udp_socket(host: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((host, port))
    s.setblocking(False)
    return s


def split_messages(buf: bytearray) -> list[bytes]:
    """Complete messages at the front of a stream buffer (removed from it)."""
    out: list[bytes] = []
    while True:
        while buf.startswith(CRLF):
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return out
        m = re.search(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", bytes(buf[:end + 2]), re.IGNORECASE)
        n = int(m.group(1)) if m else 0
        if len(buf) < end + 4 + n:
            return out
        out.append(bytes(buf[:end + 4 + n]))
        del buf[:end + 4 + n]


#: A whole Request-Line, as a framed request's first line must be.
_FRAMED_REQUEST = re.compile(rb"(" + _TOKEN + rb") \S+ SIP/2\.0")


def first_line(data: bytes) -> str:
    return data.split(CRLF, 1)[0][:120].decode("latin-1")


def status_of(data: bytes) -> int | None:
    m = re.match(rb"SIP/2\.0 (\d{3}) ", data)
    return int(m.group(1)) if m else None


def header_lines(data: bytes, name: bytes) -> list[bytes]:
    """The header lines named ``name`` (any line ending: serve copies a request's lines as
    they came, so a response to an LF-only request has LF-only lines)."""
    head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0]
    lines: list[bytes] = []
    for line in re.split(rb"\r?\n|\r", head)[1:]:
        # A continuation line (RFC 3261 §7.3.1) is part of the header before it: a folded
        # value and its unfolded copy in a response are the same value.
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b" " + line.strip()
        else:
            lines.append(line)
    out = []
    for line in lines:
        n, sep, _ = line.partition(b":")
        if sep and canonical(n) == name:
            out.append(line)
    return out


def _matching_fields(data: bytes) -> tuple[bytes | None, ...]:
    """The top Via's branch, CSeq, Call-ID and From of a message, normalized: what a response
    copies from its request (serve rewrites the Via when it stamps ``received``, so only the
    branch is compared)."""
    out: list[bytes | None] = []
    vias = header_lines(data, b"via")
    m = re.search(rb"branch\s*=\s*([^;,\s]+)", vias[0]) if vias else None
    out.append(m.group(1) if m else None)
    for name in (b"cseq", b"call-id", b"from"):
        lines = header_lines(data, name)
        out.append(_norm(lines[0].partition(b":")[2]) if lines else None)
    return tuple(out)


def response_to(request: bytes, status: int, reason: str) -> bytes | None:
    """A UAS's answer (the sink's): Via, From, To (a tag added), Call-ID, CSeq copied."""
    lines = [f"SIP/2.0 {status} {reason}".encode()]
    for name in (b"via", b"from", b"to", b"call-id", b"cseq"):
        found = header_lines(request, name)
        if not found:
            return None
        if name == b"to" and b"tag=" not in found[0] and status > 100:
            found = [found[0] + b";tag=sink"]
        lines += found if name == b"via" else found[:1]
    lines.append(b"Content-Length: 0")
    return CRLF.join(lines) + b"\r\n\r\n"


@dataclass
class FuzzConfig:
    datagrams: int = 20000
    tcp_streams: int = 300
    seed: int = 1
    rate: float = 1000.0          # datagrams per second, at most
    probe_every: int = 400
    t1: float = 0.05
    keep_going: bool = True
    serve_args: list[str] = field(default_factory=list)
    auth: bool = True
    settle: float = 0.0           # 0: 2*64*T1 + T4 + 2 s
    triage: bool = False
    minimize: bool = False
    sink_answers: bool = True


class FuzzRun:
    """One fuzzing run against one serve process (inside the namespace)."""

    def __init__(self, config: FuzzConfig, workdir: Path) -> None:
        self.cfg = config
        self.workdir = workdir
        self.serve = Serve(workdir, config.serve_args, auth=config.auth, t1=config.t1)
        try:
            # One generator per transport: the TCP streams are made while the UDP traffic
            # runs, in an order that depends on timing, so sharing state (recent INVITEs,
            # transaction keys seen) would make the cases depend on it too.
            self.gen = Generator(config.seed, f"{SERVE_HOST}:{self.serve.port}")
            self.tcp_gen = Generator(config.seed, f"{SERVE_HOST}:{self.serve.port}")
        except BaseException:
            self.serve.stop()
            raise
        self.cases: dict[int, Case] = {}
        self.by_token: dict[int, list[int]] = {}
        self.clients: dict[str, _Udp] = {}
        self.sink_log: list[dict[str, Any]] = []
        self.sink_count = 0
        self.stray: Counter[str] = Counter()
        self.probes: list[dict[str, Any]] = []
        self._probe_waiters: dict[str, asyncio.Future[int]] = {}
        self.rss: list[tuple[float, int, str]] = []
        self.phase = "idle"
        self.t0 = time.monotonic()
        self.creds: dict[str, Credentials] = {}
        self.stopped_early = ""
        self.tcp_kinds: Counter[str] = Counter()
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._udp: list[asyncio.BaseTransport] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self.our_acks: set[tuple[bytes | None, ...]] = set()
        self.our_acks_forwarded = 0
        self.drops_before: int | None = None
        self.drops_after_traffic: int | None = None
        self.drops_after: int | None = None
        self.traffic_seconds = 0.0

    # -- bookkeeping ---------------------------------------------------------------------

    def _add(self, case: Case) -> None:
        self.cases[case.idx] = case
        found = tokens_in(case.data, self.cfg.seed)
        for tok_idx in found or {case.idx}:
            self.by_token.setdefault(tok_idx, []).append(case.idx)

    def _attribute(self, data: bytes) -> Case | None:
        found = tokens_in(data, self.cfg.seed)
        cands = [self.cases[i] for t in sorted(found) for i in self.by_token.get(t, [])
                 if i in self.cases]
        if len(cands) <= 1:
            return cands[0] if cands else None
        # A CANCEL or ACK shares its INVITE's token: the fields a response copies (top Via
        # branch, CSeq, Call-ID, From) tell them apart; on a tie, the token's owner (an ACK
        # is never answered, so it must not take the blame for its INVITE's answers).
        fields = _matching_fields(data)
        return max(reversed(cands), key=lambda c: (
            sum(a == b for a, b in zip(fields, _matching_fields(c.data))),
            c.idx in found, c.method != "ACK"))

    def on_response(self, data: bytes, where: str) -> None:
        status = status_of(data)
        if status is None:
            # A request serve forwards to a user registered over our TCP stream, or, when its
            # first line is no request line, bytes the stream's framing lost track of.
            line = data.split(CRLF, 1)[0]
            kind = "request-to-client:" if _FRAMED_REQUEST.fullmatch(line) else "unframed:"
            self.stray[kind + first_line(data).split(" ")[0][:20]] += 1
            return
        cid = header_lines(data, b"call-id")
        if cid and b"probe-" in cid[0]:
            key = cid[0].split(b"probe-", 1)[1].split(b"@")[0].decode("latin-1")
            fut = self._probe_waiters.get(key)
            if fut is not None and not fut.done() and status >= 200:
                fut.set_result(status)
            return
        case = self._attribute(data)
        if case is None:
            self.stray[f"unattributed:{status}"] += 1
            return
        case.statuses.append(status)
        if status >= 200 and not case.final_at:
            case.final_at = time.monotonic()
        if status >= 300 and case.method == "INVITE" and case.transport == "udp":
            self._ack(case, data)

    def _ack(self, case: Case, response: bytes) -> None:
        # §17.1.1.3: the ACK for a non-2xx final stops serve's Timer G retransmissions.
        vias = header_lines(response, b"via")
        parts = case.data.split(CRLF, 1)[0].split(b" ")
        if not vias or len(parts) < 2:
            return
        lines = [b"ACK " + parts[1] + b" SIP/2.0", vias[0], b"Max-Forwards: 70"]
        for name in (b"from", b"to", b"call-id"):
            lines += header_lines(response, name)[:1]
        cseq = header_lines(response, b"cseq")
        if not cseq:
            return
        num = cseq[0].partition(b":")[2].split()
        if not num:
            return
        lines += [b"CSeq: " + num[0] + b" ACK", b"Content-Length: 0"]
        ack = CRLF.join(lines) + b"\r\n\r\n"
        self.our_acks.add(_matching_fields(ack)[1:3])
        client = self.clients.get(case.me)
        if client is not None:
            client.send(ack, self.serve.address)

    # -- the sink ------------------------------------------------------------------------

    def on_sink(self, data: bytes, how: str, reply: Callable[[bytes], None] | None) -> None:
        if data.startswith(b"ACK ") and _matching_fields(data)[1:3] in self.our_acks:
            # Our own ACK for a non-2xx final that serve answered itself: it must stay
            # there (the answer's transaction, or for a stateless one serve, absorbs it).
            self.our_acks_forwarded += 1
            return
        self.sink_count += 1
        case = self._attribute(data)
        status = status_of(data)
        if case is not None and status is None:
            case.sink += 1
        if len(self.sink_log) < 20000:
            self.sink_log.append({"how": how, "case": case.idx if case else None,
                                  "first": first_line(data),
                                  "refuse": case.refuse if case else None,
                                  "seed": case.seed if case else None,
                                  "mutations": case.mutations if case else None})
        if status is not None or data.startswith(b"ACK ") or reply is None \
                or not self.cfg.sink_answers:
            return
        # Answer some forwarded requests so serve's response path runs too.  Never a
        # provisional to an INVITE (Timer C would keep it 3 minutes) and never a final
        # (Timer D: 32 s): INVITEs end with Timer B (64*T1), the rest with a 200 or 486.
        if data.startswith(b"INVITE "):
            return
        pick = zlib.crc32(data.split(CRLF, 1)[0]) % 3
        if pick == 0:
            return
        answer = response_to(data, 200 if pick == 1 else 486,
                             "OK" if pick == 1 else "Busy Here")
        if answer is not None:
            reply(answer)

    # -- sockets -------------------------------------------------------------------------

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        for host in (*UDP_CLIENTS, TCP_CLIENT, PROBE_HOST, SETUP_HOST):
            transport, proto = await loop.create_datagram_endpoint(
                lambda: _Udp(lambda d, a, p: self.on_response(d, "udp")),
                sock=_udp_socket(host, SIP_PORT))
            self._udp.append(transport)
            self.clients[host] = proto
            # Responses sent over TCP to a Via (sent-by host, port 5060).
            self._servers.append(await asyncio.start_server(
                self._client_tcp, host, SIP_PORT, reuse_address=True))

        def sink_udp(data: bytes, addr: tuple[str, int], proto: _Udp) -> None:
            self.on_sink(data, "udp", lambda r: proto.send(r, addr))

        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Udp(sink_udp), sock=_udp_socket(SINK_HOST, SIP_PORT))
        self._udp.append(transport)
        for port in (SIP_PORT, SIP_PORT + 1):
            self._servers.append(await asyncio.start_server(
                self._sink_tcp, SINK_HOST, port, reuse_address=True))

    async def _client_tcp(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        buf = bytearray()
        self._writers.add(writer)
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                for msg in split_messages(buf):
                    self.on_response(msg, "tcp-in")
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _sink_tcp(self, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        port = writer.get_extra_info("sockname")[1]
        buf = bytearray()
        self._writers.add(writer)
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if port != SIP_PORT:                     # TLS: a ClientHello we cannot read
                    self.on_sink(chunk, "tls", None)
                    break
                buf += chunk
                for msg in split_messages(buf):
                    self.on_sink(msg, "tcp", writer.write)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    # -- setup: credentials --------------------------------------------------------------

    async def _challenge(self) -> Credentials | None:
        if not self.cfg.auth:
            return None
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        setup = self.clients[SETUP_HOST]
        old = setup.on_data

        def grab(data: bytes, addr: tuple[str, int], proto: _Udp) -> None:
            if not fut.done() and status_of(data) == 401:
                fut.set_result(data)

        setup.on_data = grab
        tag = os.urandom(4).hex()
        req = (f"REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {SETUP_HOST};branch=z9hG4bK"
               f"setup{tag};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag={tag}\r\n"
               f"To: <sip:alice@{DOMAIN}>\r\nCall-ID: setup-{tag}\r\nCSeq: 1 REGISTER\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        try:
            for _ in range(6):
                setup.send(req, self.serve.address)
                with contextlib.suppress(asyncio.TimeoutError):
                    data = await asyncio.wait_for(asyncio.shield(fut), 0.5)
                    break
            else:
                raise RuntimeError("serve did not challenge a REGISTER")
        finally:
            setup.on_data = old
        for line in header_lines(data, b"www-authenticate"):
            p = parse_challenge(line.partition(b":")[2].decode("latin-1"))
            algorithm = p.get("algorithm", "MD5").upper()
            if algorithm in ("MD5", "SHA-256") and "nonce" in p:
                return Credentials(p.get("realm", DOMAIN), p["nonce"], p.get("opaque"),
                                   algorithm)
        raise RuntimeError("no usable digest challenge from serve")

    # -- probes and memory ---------------------------------------------------------------

    async def probe(self, k: int) -> None:
        key = f"{k}"
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._probe_waiters[key] = fut
        req = (f"OPTIONS sip:{SERVE_HOST}:{self.serve.port} SIP/2.0\r\n"
               f"Via: SIP/2.0/UDP {PROBE_HOST};branch=z9hG4bKprobe{k};rport\r\n"
               "Max-Forwards: 70\r\nFrom: <sip:probe@probe.invalid>;tag=p" + key + "\r\n"
               f"To: <sip:{SERVE_HOST}:{self.serve.port}>\r\n"
               f"Call-ID: probe-{key}@{PROBE_HOST}\r\nCSeq: 1 OPTIONS\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        started = time.monotonic()
        probe = self.clients[PROBE_HOST]
        status = None
        # Retransmitted at 0.5 s intervals (Timer E with T1 = 0.5 s): a loss is not a failure.
        for _ in range(4):
            probe.send(req, self.serve.address)
            try:
                status = await asyncio.wait_for(asyncio.shield(fut), 0.5)
                break
            except asyncio.TimeoutError:
                continue
        self._probe_waiters.pop(key, None)
        self.probes.append({"k": k, "status": status, "phase": self.phase,
                            "latency": round(time.monotonic() - started, 3)})

    async def _sample_rss(self) -> None:
        while True:
            kb = self.serve.rss_kb()
            if kb is not None:
                self.rss.append((round(time.monotonic() - self.t0, 2), kb, self.phase))
            await asyncio.sleep(0.5)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sending -------------------------------------------------------------------------

    def _send_udp(self, case: Case) -> None:
        client = self.clients[case.me]
        creds = self.creds.get("udp")
        if case.sends == 0:
            case.template = case.data
            if creds is not None:
                case.data = creds.fill(case.data)
        case.sends += 1
        case.sent_at = case.sent_at or time.monotonic()
        client.send(case.data, self.serve.address)

    async def _paced(self, cases: Iterator[Case], on_each: Callable[[int], None]) -> None:
        """Send ``cases`` at no more than ``rate`` datagrams and ``BYTE_RATE`` bytes a
        second: serve's socket buffer (~200 kB) must not overflow, or the kernel's drops
        would look like serve's silence (drops are counted anyway: ``udp_drops``)."""
        due = time.monotonic()
        for i, case in enumerate(cases):
            self._send_udp(case)
            on_each(i)
            due += max(1.0 / self.cfg.rate, len(case.data) / BYTE_RATE)
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif i % 50 == 0:
                await asyncio.sleep(0)
            if i % 500 == 0 and not self._healthy():
                break

    async def _udp_traffic(self) -> None:
        probes = iter(range(1, self.cfg.datagrams))

        def generate() -> Iterator[Case]:
            for i in range(self.cfg.datagrams):
                case = self.gen.udp_case(i)
                self._add(case)
                yield case

        def after(i: int) -> None:
            if (i + 1) % self.cfg.probe_every == 0:
                self._spawn(self.probe(next(probes)))

        await self._paced(generate(), after)
        self.drops_after_traffic = self.serve.udp_drops()

    def _healthy(self) -> bool:
        if not self.serve.alive():
            self.stopped_early = f"serve exited with {self.serve.proc.returncode}"
            return False
        if self.cfg.keep_going:
            return True
        failed = [p for p in self.probes if p["status"] != 200]
        if failed:
            self.stopped_early = f"probe {failed[0]['k']} got {failed[0]['status']}"
            return False
        if re.search(r"^\S+ \S+ (ERROR|CRITICAL) |Traceback", self.serve.log(), re.MULTILINE):
            self.stopped_early = "an ERROR in serve's log"
            return False
        return True

    async def _tcp_traffic(self) -> None:
        if self.cfg.tcp_streams <= 0:
            return
        # Spread over the UDP run, a few connections at a time.
        gap = max(self.cfg.datagrams / self.cfg.rate, 1.0) / self.cfg.tcp_streams
        sem = asyncio.Semaphore(32)
        next_idx = self.cfg.datagrams
        tasks = []
        for s in range(self.cfg.tcp_streams):
            st = self.tcp_gen.tcp_stream(s, next_idx)
            next_idx += len(st.cases)
            self.tcp_kinds[st.kind] += 1
            for c in st.cases:
                self._add(c)
            tasks.append(asyncio.ensure_future(self._one_stream(sem, st)))
            await asyncio.sleep(gap)
            if not self.serve.alive() or self.stopped_early:
                break
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one_stream(self, sem: asyncio.Semaphore, st: Stream) -> None:
        async with sem:
            creds = self.creds.get("tcp")
            for c in st.cases:
                c.template = c.data
                if creds is not None:
                    c.data = creds.fill(c.data)
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    SERVE_HOST, self.serve.port, local_addr=(TCP_CLIENT, 0)), 5)
            except (OSError, asyncio.TimeoutError):
                for c in st.cases:
                    c.expect, c.why = EITHER, "could not connect"
                return
            buf = bytearray()

            async def read() -> None:
                with contextlib.suppress(OSError):
                    while chunk := await reader.read(65536):
                        buf.extend(chunk)
                        for msg in split_messages(buf):
                            self.on_response(msg, "tcp")

            reading = asyncio.ensure_future(read())
            now = time.monotonic()
            for c in st.cases:
                c.sends, c.sent_at = 1, now
            head = st.data(0, st.tail_from)
            tail = st.data(st.tail_from) if st.tail_from is not None else b""
            pos = 0
            try:
                for cut in [*(int(f * len(head)) for f in st.cuts), len(head)]:
                    if cut <= pos:
                        continue
                    writer.write(head[pos:cut])
                    await writer.drain()
                    pos = cut
                    if cut != len(head):
                        await asyncio.sleep(0.02)
                deadline = time.monotonic() + 64 * self.cfg.t1 + 4.0
                while time.monotonic() < deadline and not reading.done():
                    if all(c.final is not None for c in st.cases if c.expect == ANSWER):
                        break
                    await asyncio.sleep(0.05)
                if tail and not reading.done():
                    writer.write(tail)
                    await writer.drain()
                    await asyncio.sleep(0.5)
            except OSError:
                pass
            finally:
                closed = time.monotonic()
                for c in st.cases:
                    c.closed_after = closed - c.sent_at
                reading.cancel()
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _drain(self) -> None:
        """Retransmit what is still unanswered (three times, a second apart, paced like the
        traffic: as Timers A/E would), then wait for the answers of forwarded requests
        (64*T1)."""
        for _ in range(3):
            await asyncio.sleep(1.0)
            if not self.serve.alive():
                return
            await self._paced((c for c in list(self.cases.values())
                               if c.transport == "udp" and c.expect == ANSWER
                               and c.final is None), lambda i: None)
        deadline = time.monotonic() + 64 * self.cfg.t1 + 1.0
        while time.monotonic() < deadline:
            if all(c.final is not None for c in self.cases.values() if c.expect == ANSWER):
                break
            await asyncio.sleep(0.1)

    async def main(self) -> None:
        await self._open()
        self.creds = {}
        udp_creds = await self._challenge()
        if udp_creds is not None:
            self.creds["udp"] = udp_creds
            tcp_creds = await self._challenge()
            assert tcp_creds is not None
            self.creds["tcp"] = tcp_creds
        self._spawn(self._sample_rss())
        await asyncio.sleep(1.0)
        self.phase = "traffic"
        self.drops_before = self.serve.udp_drops()
        self.traffic_started = time.monotonic()
        await asyncio.gather(self._udp_traffic(), self._tcp_traffic())
        self.traffic_seconds = time.monotonic() - self.traffic_started
        self.phase = "drain"
        await self._drain()
        await self.probe(10**6)
        self.phase = "settle"
        settle = self.cfg.settle or (2 * 64 * self.cfg.t1 + 5.0 + 2.0)
        await asyncio.sleep(settle)
        await self.probe(10**6 + 1)
        self.drops_after = self.serve.udp_drops()
        await self.close()

    async def close(self) -> None:
        """Close every socket of ours (a triage after the run binds the same addresses)."""
        for t in list(self._tasks):
            t.cancel()
        for srv in self._servers:
            srv.close()
        for w in list(self._writers):
            w.close()
        for u in self._udp:
            u.close()
        await asyncio.sleep(0.1)      # let the connection handlers see their EOF and end
        for srv in self._servers:
            await srv.wait_closed()

    # -- result --------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        outcomes: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        unanswered: list[Case] = []
        provisional_only: list[Case] = []
        answered_none: list[Case] = []
        retransmitted = 0
        by_seed: dict[str, Counter[str]] = {}
        for c in self.cases.values():
            final = c.final
            got = "final" if final is not None else ("provisional" if c.statuses else "none")
            key = f"{c.transport}:{c.expect}:{got}"
            outcomes[key] += 1
            if c.sink:
                outcomes[f"{c.transport}:forwarded-to-sink"] += 1
            if final is not None:
                statuses[str(final)] += 1
            by_seed.setdefault(c.seed, Counter())[got if c.expect != NONE else "none-" + got] += 1
            if c.expect == ANSWER:
                if final is None:
                    (provisional_only if c.statuses else unanswered).append(c)
                elif c.sends > 1 and c.final_at and c.final_at - c.sent_at > 0.9:
                    retransmitted += 1
            elif c.expect == NONE and c.statuses:
                answered_none.append(c)
        forwarded_refused = [e for e in self.sink_log if e["refuse"]]
        forwarded_cases = [c for c in self.cases.values() if c.sink]
        refusable_cases = [c for c in forwarded_cases if c.refusing]
        refusing_labels = Counter(label for c in refusable_cases for label in set(c.refusing))
        rss = self.rss
        return {
            "config": dataclass_dict(self.cfg), "serve_args": self.serve.args,
            "port": self.serve.port, "cases": len(self.cases),
            "traffic_seconds": round(self.traffic_seconds, 1),
            "stopped_early": self.stopped_early,
            "outcomes": dict(sorted(outcomes.items())), "statuses": dict(statuses),
            "tcp_kinds": dict(self.tcp_kinds),
            "by_seed": {k: dict(v) for k, v in sorted(by_seed.items())},
            "unanswered": [c.summary() for c in unanswered],
            "provisional_only": [c.summary() for c in provisional_only],
            "answered_but_must_not": [c.summary() for c in answered_none],
            "answered_after_retransmission": retransmitted,
            "probes": self.probes,
            "rss": rss,
            # Kernel drops at serve's UDP socket: before, after the traffic, at the end.
            "udp_drops": [self.drops_before, self.drops_after_traffic, self.drops_after],
            "sink": {"received": self.sink_count, "log": self.sink_log[:2000],
                     "cases_forwarded": len(forwarded_cases),
                     "our_acks_forwarded": self.our_acks_forwarded,
                     "refusable_cases_forwarded": len(refusable_cases),
                     "refusing_mutations": dict(refusing_labels.most_common()),
                     "from_refusable": len(forwarded_refused),
                     "from_refusable_examples": forwarded_refused[:50]},
            "stray": dict(self.stray),
            "pristine": pristine_table(self.cases.values()),
        }


def pristine_table(cases: Any) -> dict[str, dict[str, int]]:
    """Final statuses of unmutated template cases the oracle judged (not a request cut off or
    misframed in its TCP stream), per template: the harness's own check that the templates
    mean what their names say."""
    out: dict[str, Counter[str]] = {}
    for c in cases:
        if not c.mutations and c.seed in TEMPLATE_BY_NAME and c.expect != EITHER:
            got = str(c.final) if c.final is not None else ("1xx" if c.statuses else "none")
            out.setdefault(f"{c.transport}:{c.seed}", Counter())[got] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return {k: getattr(obj, k) for k in obj.__dataclass_fields__}


def run_fuzz(config: FuzzConfig, workdir: Path) -> dict[str, Any]:
    """A fuzzing run in the current network namespace (the caller isolated it)."""
    run = FuzzRun(config, workdir)
    try:
        asyncio.run(run.main())
    finally:
        rc = run.serve.stop()
    result = run.result()
    result["exit_status"] = rc
    result["log"] = scan_log(run.serve.log())
    result["log_path"] = str(run.serve.log_path)
    if config.triage:
        suspects = sorted((c for c in run.cases.values() if _worth_triage(c)),
                          key=lambda c: (_worth_triage(c), c.idx))
        result["triage"] = triage(workdir, suspects, config)
        # Each unanswered case with what its replay alone showed: the traceback signature,
        # "silent" (no answer again), or the status it got (then it was the load or a
        # collision with another case, not the message itself).
        verdicts = result["triage"].pop("cases")
        for key in ("unanswered", "provisional_only", "answered_but_must_not"):
            for entry in result[key]:
                entry["replay"] = verdicts.get(str(entry["idx"]), "not replayed")
    return result


def _worth_triage(c: Case) -> int:
    """0: not worth a replay; else a priority (1 first): unanswered, answered though it must
    not be, 500, then (a sample of) 408 -- a branch that failed without telling anyone."""
    if c.expect == ANSWER and c.final is None:
        return 1
    if c.expect == NONE and c.statuses:
        return 2
    if c.final == 500:
        return 3
    if c.final == 408:
        return 4
    return 0


# -- triage: one suspicious case at a time, against a fresh serve ----------------------------


def _replay(serve: Serve, client: socket.socket, data: bytes, transport: str,
            wait: float = 0.4, listener: socket.socket | None = None) -> tuple[list[int], str]:
    """Send ``data`` alone; the statuses that came back (over UDP to ``client``, over TCP on
    the connection, or on a connection serve opened to ``listener``: a Via naming TCP) and
    the log records it caused.  Only answers that carry one of ``data``'s replay tokens
    count (a late answer to an earlier replay is not this one's)."""
    mine = set(_REPLAY_TOK.findall(data))

    def ours(response: bytes) -> bool:
        return not mine or bool(mine & set(_REPLAY_TOK.findall(response)))

    before = len(serve.log())
    statuses: list[int] = []
    conns: list[socket.socket] = []
    buffers: dict[socket.socket, bytearray] = {}
    if transport == "udp":
        client.sendto(data, serve.address)
    else:
        conn = socket.create_connection(serve.address, timeout=wait,
                                        source_address=(TCP_CLIENT, 0))
        conn.sendall(data)
        conns.append(conn)
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline and not any(s >= 200 for s in statuses):
            watch = [client, *conns, *([listener] if listener is not None else [])]
            ready, _, _ = select.select(watch, [], [], max(0.0, deadline - time.monotonic()))
            for sock in ready:
                if sock is listener:
                    accepted, _ = sock.accept()
                    conns.append(accepted)
                    continue
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    chunk = b""
                if sock is client:
                    if ours(chunk):
                        statuses += [x for x in [status_of(chunk)] if x is not None]
                    continue
                if not chunk:
                    conns.remove(sock)
                    sock.close()
                    continue
                buf = buffers.setdefault(sock, bytearray())
                buf += chunk
                statuses += [x for x in map(status_of, filter(ours, split_messages(buf)))
                             if x is not None]
    finally:
        for sock in conns:
            sock.close()
    time.sleep(0.05)
    return statuses, serve.log()[before:]


_replays = iter(range(1, 10**7))
_REPLAY_TOK = re.compile(rb"Rp\d{7}00")


def fresh(data: bytes) -> bytes:
    """``data`` with every case token replaced by a new one of the same length, so a replay
    is a new transaction (same branch and sent-by would be absorbed as a retransmission)."""
    return _TOK.sub(lambda m: f"Rp{next(_replays):07d}00".encode(), data)


def _challenge_sync(serve: Serve) -> Credentials | None:
    """A digest challenge from ``serve`` (blocking), for filling in fresh credentials."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((SETUP_HOST, 0))
        s.settimeout(0.5)
        tag = os.urandom(4).hex()
        req = (f"REGISTER sip:{DOMAIN} SIP/2.0\r\nVia: SIP/2.0/UDP {SETUP_HOST};branch=z9hG4bK"
               f"t{tag};rport\r\nMax-Forwards: 70\r\nFrom: <sip:alice@{DOMAIN}>;tag={tag}\r\n"
               f"To: <sip:alice@{DOMAIN}>\r\nCall-ID: t-{tag}\r\nCSeq: 1 REGISTER\r\n"
               "Content-Length: 0\r\n\r\n").encode()
        for _ in range(6):
            s.sendto(req, serve.address)
            try:
                data = s.recv(65535)
            except OSError:
                continue
            for line in header_lines(data, b"www-authenticate"):
                p = parse_challenge(line.partition(b":")[2].decode("latin-1"))
                if "nonce" in p and p.get("algorithm", "MD5").upper() in ("MD5", "SHA-256"):
                    return Credentials(p.get("realm", DOMAIN), p["nonce"], p.get("opaque"),
                                       p.get("algorithm", "MD5").upper())
    return None


def _signature(log_delta: str) -> str:
    scan = scan_log(log_delta)
    return " | ".join(sorted(scan["groups"])) if scan["groups"] else ""


def minimize(serve: Serve, client: socket.socket, data: bytes, transport: str,
             want: str, prepare: Callable[[bytes], bytes], budget: int = 150) -> bytes:
    """Drop header lines (and the body) while the same traceback signature reproduces.
    ``data`` is a template (credentials not filled in): ``prepare`` makes each trial's
    bytes."""
    d = Draft.parse(data)
    tries = 0
    changed = True
    while changed and tries < budget:
        changed = False
        for k in range(len(d.headers) - 1, -1, -1):
            trial = Draft(d.start, d.headers[:k] + d.headers[k + 1:], d.body, d.terminated,
                          d.eol)
            tries += 1
            _, delta = _replay(serve, client, prepare(trial.render()), transport, wait=0.15)
            if _signature(delta) == want:
                d = trial
                changed = True
            if tries >= budget:
                break
        if d.body:
            trial = Draft(d.start, d.headers, b"", d.terminated, d.eol)
            _, delta = _replay(serve, client, prepare(trial.render()), transport, wait=0.15)
            if _signature(delta) == want:
                d = trial
    return d.render()


def triage(workdir: Path, cases: list[Case], config: FuzzConfig) -> dict[str, Any]:
    """Replay each suspicious case alone against a fresh serve (same options; new tokens and,
    for authenticated templates, credentials for the new serve's nonce) and record its answer
    and the log records it caused; group by traceback signature, keep the shortest example of
    each group (minimized when asked)."""
    me = UDP_CLIENTS[0]
    client = _udp_socket(me, SIP_PORT)
    listener = socket.create_server((me, SIP_PORT))
    try:
        serve = Serve(workdir, config.serve_args, auth=config.auth, t1=config.t1)
    except BaseException:
        client.close()
        listener.close()
        raise
    creds = _challenge_sync(serve) if config.auth else None

    def prepare(template: bytes) -> bytes:
        # Every client address becomes the one socket replaying (same length: no
        # Content-Length changes), tokens are new, credentials fit the new serve.
        data = fresh(template)
        for other in (*UDP_CLIENTS[1:], TCP_CLIENT):
            data = data.replace(other.encode(), me.encode())
        return creds.fill(data) if creds is not None else data

    groups: dict[str, dict[str, Any]] = {}
    silent: dict[str, dict[str, Any]] = {}
    verdicts: dict[str, str] = {}
    replayed = 0
    per_class: Counter[int] = Counter()
    caps = {1: 2000, 2: 200, 3: 500, 4: 300}   # 408s are many and mostly fine: a sample
    try:
        for c in cases:
            if not serve.alive():
                break
            priority = _worth_triage(c)
            if per_class[priority] >= caps[priority]:
                continue
            per_class[priority] += 1
            replayed += 1
            template = c.template or c.data
            statuses, delta = _replay(serve, client, prepare(template), c.transport,
                                      listener=listener)
            sig = _signature(delta)
            example = (len(template), c.idx, template, c.transport, c.seed, c.mutations,
                       statuses)
            finals = [x for x in statuses if x >= 200]
            verdicts[str(c.idx)] = sig or (f"answered {finals[0]}" if finals else "silent")
            if sig:
                g = groups.setdefault(sig, {"count": 0, "examples": [], "statuses": Counter()})
                g["count"] += 1
                g["statuses"][str(statuses[-1] if statuses else None)] += 1
                g["examples"].append(example)
            elif c.expect == ANSWER and not any(s >= 200 for s in statuses):
                why = f"{c.seed}:{'+'.join(sorted({m.split(':')[0] for m in c.mutations}))}"
                g = silent.setdefault(why, {"count": 0, "examples": []})
                g["count"] += 1
                g["examples"].append(example)
        out: dict[str, Any] = {"replayed": replayed, "groups": {}, "silent": {},
                               "cases": verdicts}
        for sig, g in sorted(groups.items(), key=lambda kv: -kv[1]["count"]):
            g["examples"].sort(key=lambda e: e[0])
            _, idx, data, transport, seed, muts, statuses = g["examples"][0]
            small = minimize(serve, client, data, transport, sig, prepare) \
                if config.minimize else data
            statuses, delta = _replay(serve, client, prepare(small), transport,
                                      listener=listener)
            out["groups"][sig] = {
                "count": g["count"], "statuses": dict(g["statuses"]), "case": idx,
                "seed": seed, "mutations": muts, "transport": transport,
                "datagram": base64.b64encode(small).decode(),
                "original": base64.b64encode(data).decode(),
                "replay_statuses": statuses, "reproduces": _signature(delta) == sig,
                "traceback": delta[-3000:]}
        for why, g in sorted(silent.items(), key=lambda kv: -kv[1]["count"]):
            g["examples"].sort(key=lambda e: e[0])
            _, idx, data, transport, seed, muts, statuses = g["examples"][0]
            out["silent"][why] = {"count": g["count"], "case": idx, "transport": transport,
                                  "mutations": muts, "statuses": statuses,
                                  "datagram": base64.b64encode(data).decode()}
        return out
    finally:
        client.close()
        listener.close()
        serve.stop()


# -- RFC 4475 / 5118 through serve -----------------------------------------------------------

#: Messages issue 9 names, beside the RFC's.  Their Vias carry ``rport``, as real clients'
#: do: serve then rewrites the top Via (RFC 3581), and it is on such an edited message that
#: the lazily parsed To/From raise (an unedited one reads them leniently).
SYNTHETIC = {
    "x-to-space-in-host": (
        "OPTIONS sip:{serve} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKsyn1;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:carol@atlanta.example.net>;tag=1\r\n"
        "To: <sip:bob@exa mple.com>\r\nCall-ID: syn1@{me}\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"),
    "x-colonless-line": (
        "OPTIONS sip:{serve} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKsyn2;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:carol@atlanta.example.net>;tag=2\r\n"
        "To: <sip:{serve}>\r\nFoobar roobar\r\nCall-ID: syn2@{me}\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"),
    "x-2543-bad-from": (
        "OPTIONS sip:{serve} SIP/2.0\r\nVia: SIP/2.0/UDP {me};rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:carol@atl anta.example.net>\r\n"
        "To: <sip:{serve}>\r\nCall-ID: syn3@{me}\r\nCSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"),
    "x-cancel-bad-to": (
        "CANCEL sip:bob@example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKsyn4;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:carol@atlanta.example.net>;tag=4\r\n"
        "To: <sip:bob@exa mple.com>\r\nCall-ID: syn4@{me}\r\nCSeq: 1 CANCEL\r\n"
        "Content-Length: 0\r\n\r\n"),
    "x-register-bad-contact": (
        "REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bKsyn5;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:carol@example.com>;tag=5\r\n"
        "To: <sip:carol@example.com>\r\nCall-ID: syn5@{me}\r\nCSeq: 1 REGISTER\r\n"
        "Contact: <sip:carol@exa mple.com>\r\nContent-Length: 0\r\n\r\n"),
}


def _recorder(on: Callable[[bytes], None]) -> Callable[[], _Udp]:
    return lambda: _Udp(lambda data, addr, proto: on(data))


def _key(data: bytes) -> tuple[str, ...]:
    return transaction_key(data)


def _via_ports(data: bytes) -> set[int]:
    ports = {SIP_PORT}
    for line in header_lines(data, b"via")[:1]:
        via = loose_via(line.partition(b":")[2])
        if via is not None and via.port:
            ports.add(via.port)
    return ports


class TortureRun:
    """Each torture message once over UDP and once over TCP, every message from its own
    loopback address (so answers are attributed by where they arrive, and what serve forwards
    by the ``received`` it stamped), in rounds that never hold two messages with the same
    transaction key (one would be taken for a retransmission of the other), REGISTERs last; a
    fresh serve without authentication (the registrar must see the messages) for each
    transport, so a binding made over UDP does not make the same REGISTER over TCP stale."""

    def __init__(self, workdir: Path, t1: float = 0.01, extra: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.t1 = t1
        self.extra = list(extra)
        self.messages = torture_messages()
        self.results: dict[str, dict[str, Any]] = {}
        self.sink: list[tuple[str, bytes]] = []

    def message(self, name: str, me: str, serve: str) -> bytes:
        if name in SYNTHETIC:
            return SYNTHETIC[name].format(me=me, serve=serve).encode()
        return self.messages[name]

    def names(self) -> list[str]:
        return [*sorted(self.messages), *SYNTHETIC]

    def rounds(self, serve: str) -> list[list[str]]:
        # Greedy colouring by transaction key; REGISTERs after everything else, so no lookup
        # in the other rounds finds a binding a torture REGISTER made.
        plain: list[tuple[list[str], set[tuple[str, ...]]]] = []
        registers: list[tuple[list[str], set[tuple[str, ...]]]] = []
        for name in self.names():
            data = self.message(name, "127.0.4.1", serve)
            key = _key(data)
            groups = registers if data.startswith(b"REGISTER ") else plain
            for names, keys in groups:
                if key not in keys:
                    names.append(name)
                    keys.add(key)
                    break
            else:
                groups.append(([name], {key}))
        return [r[0] for r in plain] + [r[0] for r in registers]

    async def _round(self, serve: Serve, names: list[str], transport: str, base: int) -> None:
        loop = asyncio.get_running_loop()
        srv = f"{SERVE_HOST}:{serve.port}"
        got: dict[str, list[tuple[float, bytes, str]]] = {n: [] for n in names}
        closed: dict[str, bool | None] = {}
        who: dict[str, str] = {}
        udp: list[asyncio.BaseTransport] = []
        servers: list[asyncio.AbstractServer] = []
        started = time.monotonic()

        def record(name: str, how: str) -> Callable[[bytes], None]:
            def on(data: bytes) -> None:
                got[name].append((time.monotonic() - started, data, how))
            return on

        def tcp_in(name: str) -> Any:
            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                buf = bytearray()
                with contextlib.suppress(OSError):
                    while chunk := await reader.read(65536):
                        buf += chunk
                        for msg in split_messages(buf):
                            record(name, "tcp-in")(msg)
                writer.close()
            return accept

        conns = []
        log_mark = len(serve.log())
        sink_mark = len(self.sink)
        for k, name in enumerate(names):
            me = f"127.0.{4 if transport == 'udp' else 5}.{base + k + 1}"
            who[name] = me
            data = self.message(name, me, srv)
            senders: dict[int, _Udp] = {}
            for port in sorted(_via_ports(data)):
                transport_, proto = await loop.create_datagram_endpoint(
                    _recorder(record(name, "udp")), sock=_udp_socket(me, port))
                udp.append(transport_)
                senders[port] = proto
                servers.append(await asyncio.start_server(tcp_in(name), me, port,
                                                          reuse_address=True))
            if transport == "udp":
                senders[SIP_PORT].send(data, serve.address)
            else:
                if name == "baddn":   # the archive copy lacks the empty line (see its README)
                    data = (DATA / "rfc4475" / "errata" / "baddn.crlf-fixed.dat").read_bytes()
                conns.append(asyncio.ensure_future(
                    self._tcp_send(serve, me, name, data, record(name, "tcp"), closed)))
        # Local answers come at once; forwarded requests end with Timer B/F (64*T1).
        await asyncio.sleep(64 * self.t1 + 0.6)
        for c in conns:
            c.cancel()
        await asyncio.gather(*conns, return_exceptions=True)
        for u in udp:
            u.close()
        for server in servers:
            server.close()
        errors = scan_log(serve.log()[log_mark:])["errors"]
        for name in names:
            me = who[name]
            mine = re.compile(re.escape(me) + r"(?!\d)")
            self.results.setdefault(name, {})[transport] = {
                "me": me,
                "responses": [{"t": round(t, 3), "status": status_of(d), "how": how,
                               "first": first_line(d),
                               "data": base64.b64encode(d[:4000]).decode()}
                              for t, d, how in got[name]],
                "closed": closed.get(name),
                "sink": [{"how": how, "first": first_line(d),
                          "data": base64.b64encode(d[:4000]).decode()}
                         for how, d in self.sink[sink_mark:]
                         if mine.search(d.decode("latin-1"))],
                "errors": [e for e in errors if mine.search(e["text"])],
                "round_errors": len(errors),
            }
        # Let every transaction of this round end (64*T1) before one with the same key.
        await asyncio.sleep(64 * self.t1 + 0.2)

    async def _tcp_send(self, serve: Serve, me: str, name: str, data: bytes,
                        on: Callable[[bytes], None], closed: dict[str, bool | None]) -> None:
        closed[name] = None
        try:
            reader, writer = await asyncio.open_connection(SERVE_HOST, serve.port,
                                                           local_addr=(me, 0))
        except OSError:
            return
        closed[name] = False
        writer.write(data)
        buf = bytearray()
        try:
            while chunk := await reader.read(65536):
                buf += chunk
                for msg in split_messages(buf):
                    on(msg)
            closed[name] = True                          # serve closed the connection
        except OSError:
            closed[name] = True
        finally:
            writer.close()

    async def _sinks(self) -> list[Any]:
        loop = asyncio.get_running_loop()

        def on(data: bytes, addr: tuple[str, int], proto: _Udp) -> None:
            self.sink.append(("udp", data))

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while chunk := await reader.read(65536):
                    self.sink.append(("tcp", chunk))
            writer.close()

        out: list[Any] = []
        # The sink for every foreign name, and 127.0.0.1:5080 (mpart01's preloaded Route).
        for host, port in ((SINK_HOST, SIP_PORT), (SERVE_HOST, 5080)):
            t, _ = await loop.create_datagram_endpoint(lambda: _Udp(on),
                                                       sock=_udp_socket(host, port))
            out.append(t)
        for host, port in ((SINK_HOST, SIP_PORT), (SINK_HOST, SIP_PORT + 1), (SERVE_HOST, 5080)):
            out.append(await asyncio.start_server(tcp, host, port, reuse_address=True))
        return out

    async def main(self) -> dict[str, Any]:
        sinks = await self._sinks()
        logs = {}
        rounds = {}
        for transport in ("udp", "tcp"):
            serve = Serve(self.workdir, self.extra, auth=False, t1=self.t1)
            try:
                base = 0
                rounds[transport] = self.rounds(f"{SERVE_HOST}:{serve.port}")
                for names in rounds[transport]:
                    await self._round(serve, names, transport, base)
                    base += len(names)
            finally:
                serve.stop()
                logs[transport] = scan_log(serve.log())
        for s in sinks:
            s.close()
        return {"results": self.results, "log": logs, "rounds": rounds}


# -- command line ----------------------------------------------------------------------------


def _print_summary(result: dict[str, Any]) -> None:
    if "results" in result:
        for name, entry in sorted(result["results"].items()):
            line = []
            for t in ("udp", "tcp"):
                e = entry.get(t, {})
                st = [r["status"] for r in e.get("responses", []) if r["status"]]
                line.append(f"{t}={st[:4]}{' sink' if e.get('sink') else ''}"
                            f"{' closed' if e.get('closed') else ''}")
            print(f"{name:32s} {'  '.join(line)}")
        for t, scan in result["log"].items():
            print(f"log {t}: {scan['groups']}")
        return
    print(f"cases {result['cases']} in {result['traffic_seconds']} s"
          f"{' (stopped early: ' + result['stopped_early'] + ')' if result['stopped_early'] else ''}")
    for k, v in result["outcomes"].items():
        print(f"  {k:34s} {v}")
    print(f"  final statuses: {dict(sorted(result['statuses'].items()))}")
    print(f"  unanswered (must answer): {len(result['unanswered'])}, provisional only: "
          f"{len(result['provisional_only'])}, answered ACK/response: "
          f"{len(result['answered_but_must_not'])}")
    bad = [p for p in result["probes"] if p["status"] != 200]
    print(f"  probes: {len(result['probes'])}, failed: {len(bad)}")
    rss = result["rss"]
    if rss:
        print(f"  RSS kB: start {rss[0][1]}, peak {max(r[1] for r in rss)}, end {rss[-1][1]}")
    print(f"  sink received {result['sink']['received']} datagrams/messages from "
          f"{result['sink']['cases_forwarded']} cases, {result['sink']['refusable_cases_forwarded']}"
          f" of them refusable; udp drops at serve {result['udp_drops']}")
    print(f"  log error groups: {json.dumps(result['log']['groups'], indent=1)}")


def _strip_options(argv: list[str], names: Sequence[str]) -> list[str]:
    out = []
    skip = False
    for x in argv:
        if skip:
            skip = False
            continue
        if x in names:
            skip = True
            continue
        if x.startswith(tuple(n + "=" for n in names)):
            continue
        out.append(x)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datagrams", type=int, default=20000)
    p.add_argument("--tcp-streams", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=1000.0, help="UDP datagrams per second")
    p.add_argument("--t1", type=float, default=0.05, help="serve's --t1 (64*T1: lifetime)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                   help="an extra argument for serve (repeat: --serve-arg=--rate-limit "
                        "--serve-arg=0)")
    p.add_argument("--no-auth", action="store_true", help="serve without --auth-users")
    p.add_argument("--keep-going", action="store_true",
                   help="send everything even after a failed probe or an ERROR in the log "
                        "(default: stop sending at the first; a crash always stops)")
    p.add_argument("--settle", type=float, default=0.0, help="seconds of quiet before the "
                   "last RSS sample (default 2*64*T1 + T4 + 2)")
    p.add_argument("--triage", action="store_true",
                   help="replay suspicious cases one by one to tie tracebacks to datagrams")
    p.add_argument("--minimize", action="store_true", help="with --triage: shrink examples")
    p.add_argument("--torture", action="store_true",
                   help="instead of fuzzing: every RFC 4475/5118 message over UDP and TCP")
    p.add_argument("--json", type=Path, help="write the full result here")
    p.add_argument("--workdir", type=Path, help="for logs (default: a temporary directory)")
    a = p.parse_args(argv)
    if os.environ.get(NETNS_ENV) != "1":
        reason = netns_unavailable()
        if reason is not None:
            print(f"fuzzserve: cannot isolate the run: {reason}", file=sys.stderr)
            return 2
        workdir = a.workdir or Path(tempfile.mkdtemp(prefix="fuzzserve-"))
        workdir.mkdir(parents=True, exist_ok=True)
        args = _strip_options(list(argv if argv is not None else sys.argv[1:]),
                              ("--workdir", "--json"))
        result = run_isolated(args, workdir, timeout=24 * 3600)
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        sys.stdout.write(result.pop("stdout", ""))
        print(f"(logs and result in {workdir})")
        return 0
    workdir = a.workdir or Path(tempfile.mkdtemp(prefix="fuzzserve-"))
    enter_private_network(workdir)
    if a.torture:
        result = asyncio.run(TortureRun(workdir, extra=a.serve_arg).main())
    else:
        cfg = FuzzConfig(datagrams=a.datagrams, tcp_streams=a.tcp_streams, seed=a.seed,
                         rate=a.rate, t1=a.t1, keep_going=a.keep_going,
                         serve_args=list(a.serve_arg), auth=not a.no_auth, settle=a.settle,
                         triage=a.triage, minimize=a.minimize)
        result = run_fuzz(cfg, workdir)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    _print_summary(result)
    return 0


def iter_cases(result: dict[str, Any], key: str) -> Iterator[tuple[dict[str, Any], bytes]]:
    """The cases listed under ``key`` in a result, with their bytes."""
    for c in result[key]:
        yield c, base64.b64decode(c["data"])


if __name__ == "__main__":
    sys.exit(main())

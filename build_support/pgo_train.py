"""The training run of the profile-guided build (setup.py): calls through ``fastsip serve``.

GCC's profile-guided optimisation lays a module's hot paths out together and moves the cold
ones away, so a message's path through the compiled modules touches fewer instruction cache
lines (docs/performance.md: -8 % L1i misses, -4 % instructions a call).  It needs a run of
the instrumented build that does what serve does under load.  This is that run: serve as
the README starts it, on 127.0.0.1 with an ephemeral port, relays calls between a caller and
a registered callee that this script plays over plain UDP sockets (INVITE, 100, 180, 200,
ACK and BYE through the proxy's Record-Route, as ``benchmarks/bench_proxy.py``'s sipp
scenarios do), then stops with SIGTERM so the counters are written at a clean exit.

setup.py runs it with the instrumented modules on PYTHONPATH; any failure (a missing
dependency, no loopback, a timeout) makes the build fall back to the plain one.

    python build_support/pgo_train.py [--calls 1500]
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "127.0.0.1"
DOMAIN = "example.com"
TIMEOUT = 5.0                     # a step that takes longer: serve did not come up or hangs
#: The routes module serve runs: real Python on every initial request (a header look, a dict
#: lookup, the location service), as a small deployment's routing would be.  It is also
#: benchmarks/bench_proxy.py's (and so bench_relay's, bench_metrics'): the build trains on
#: the routing the benchmarks measure.
ROUTES = '''\
"""Benchmark routing: a per-call Python decision, then the location service."""
from fastsip.app import route

BLOCKED = {"mallory", "eve"}


@route
def initial(req):
    if req.method == "REGISTER":
        return None                       # the default: digest (if on), then the registrar
    frm = req.from_
    if frm is not None and frm.uri is not None and frm.uri.user in BLOCKED:
        return req.reply(403, "Blocked")
    return req.relay()                    # our domain: the registered contacts, else 404
'''


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    sock.settimeout(TIMEOUT)
    return sock


def _free_port() -> int:
    with _socket() as sock:
        port: int = sock.getsockname()[1]
        return port


def _request(method: str, uri: str, port: int, branch: str, headers: list[str],
             body: str = "") -> bytes:
    lines = [f"{method} {uri} SIP/2.0", f"Via: SIP/2.0/UDP {HOST}:{port};branch={branch}",
             *headers, "Max-Forwards: 70", f"Content-Length: {len(body)}", "", body]
    return "\r\n".join(lines).encode()


def _headers(msg: bytes, name: str) -> list[str]:
    """The values of every ``name`` header line (the messages here use full names)."""
    return [v.decode() for v in re.findall(rb"^" + name.encode() + rb": *(.*?)\r$", msg,
                                           re.MULTILINE | re.IGNORECASE)]


def _reply(request: bytes, status: str, to_tag: str, contact: str) -> bytes:
    """The callee's answer: Via, Record-Route, From, Call-ID and CSeq copied (RFC 3261 8.2.6)."""
    to = _headers(request, "To")[0]
    if ";tag=" not in to:
        to += f";tag={to_tag}"
    lines = [f"SIP/2.0 {status}"]
    lines += [f"Via: {v}" for v in _headers(request, "Via")]
    lines += [f"Record-Route: {v}" for v in _headers(request, "Record-Route")]
    lines += [f"From: {_headers(request, 'From')[0]}", f"To: {to}",
              f"Call-ID: {_headers(request, 'Call-ID')[0]}",
              f"CSeq: {_headers(request, 'CSeq')[0]}", f"Contact: {contact}",
              "Content-Length: 0", "", ""]
    return "\r\n".join(lines).encode()


def _recv(sock: socket.socket, start: bytes) -> bytes:
    """The next datagram that starts with ``start`` (retransmissions and 100s are skipped)."""
    while True:
        data = sock.recv(65535)
        if data.startswith(start):
            return data


SDP = ("v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
       "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")


def train(calls: int) -> None:
    proxy_port = _free_port()
    proxy = (HOST, proxy_port)
    with tempfile.TemporaryDirectory(prefix="fastsip-pgo-train-") as tmp, \
            _socket() as caller, _socket() as callee:
        routes = Path(tmp) / "routes.py"
        routes.write_text(ROUTES)
        serve = subprocess.Popen(
            [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{proxy_port}",
             "--routes", str(routes), "--domain", DOMAIN, "--db", "memory:",
             # trusted, as bench_proxy's sipp: else a caller this fast is a flood and banned
             "--trusted", HOST],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            cport, eport = caller.getsockname()[1], callee.getsockname()[1]
            contact = f"<sip:service@{HOST}:{eport}>"
            register = _request("REGISTER", f"sip:{DOMAIN}", eport, "z9hG4bK-pgo-reg", [
                f"From: <sip:service@{DOMAIN}>;tag=pgo", f"To: <sip:service@{DOMAIN}>",
                f"Call-ID: pgo-reg@{HOST}", "CSeq: 1 REGISTER", f"Contact: {contact}",
                "Expires: 3600"])
            deadline = time.monotonic() + 20    # serve's start-up: imports, binding
            callee.settimeout(0.2)
            while True:
                callee.sendto(register, proxy)
                try:
                    if _recv(callee, b"SIP/2.0 ").startswith(b"SIP/2.0 200"):
                        break
                except TimeoutError:
                    pass
                if serve.poll() is not None or time.monotonic() > deadline:
                    serve.kill()
                    raise RuntimeError("serve did not answer REGISTER: "
                                       + serve.communicate()[1].decode()[-2000:])
            callee.settimeout(TIMEOUT)
            for n in range(calls):
                _call(n, caller, cport, callee, contact, proxy)
        except BaseException:
            serve.send_signal(signal.SIGTERM)
            _, err = serve.communicate(timeout=30)
            print(err.decode()[-3000:], file=sys.stderr)
            raise
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=30)
        if serve.returncode != 0:
            raise RuntimeError(f"serve exited {serve.returncode}: {err.decode()[-2000:]}")


def _call(n: int, caller: socket.socket, cport: int, callee: socket.socket, contact: str,
          proxy: tuple[str, int]) -> None:
    dialog = [f"From: sipp <sip:caller@{DOMAIN}>;tag=pgo{n}", f"Call-ID: pgo-{n}@{HOST}"]
    me = f"Contact: <sip:caller@{HOST}:{cport}>"
    caller.sendto(_request("INVITE", f"sip:service@{DOMAIN}", cport, f"z9hG4bK-pgo-i{n}", [
        *dialog, f"To: <sip:service@{DOMAIN}>", "CSeq: 1 INVITE", me,
        "Content-Type: application/sdp"], SDP), proxy)
    invite = _recv(callee, b"INVITE ")
    callee.sendto(_reply(invite, "180 Ringing", f"e{n}", contact), proxy)
    callee.sendto(_reply(invite, "200 OK", f"e{n}", contact), proxy)
    ok = _recv(caller, b"SIP/2.0 200")
    # The route set is the 200's Record-Route, reversed (RFC 3261 12.1.2); the target its Contact.
    routes = [f"Route: {r}" for r in reversed(_headers(ok, "Record-Route"))]
    target = re.search(r"<([^>]*)>", _headers(ok, "Contact")[0])
    to = f"To: {_headers(ok, 'To')[0]}"
    uri = target.group(1) if target else f"sip:service@{HOST}"
    caller.sendto(_request("ACK", uri, cport, f"z9hG4bK-pgo-a{n}",
                           [*routes, *dialog, to, "CSeq: 1 ACK", me]), proxy)
    _recv(callee, b"ACK ")
    caller.sendto(_request("BYE", uri, cport, f"z9hG4bK-pgo-b{n}",
                           [*routes, *dialog, to, "CSeq: 2 BYE", me]), proxy)
    bye = _recv(callee, b"BYE ")
    callee.sendto(_reply(bye, "200 OK", f"e{n}", contact), proxy)
    _recv(caller, b"SIP/2.0 200")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=1500)
    args = ap.parse_args()
    started = time.monotonic()
    train(args.calls)
    print(f"pgo training: {args.calls} calls through serve in {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()

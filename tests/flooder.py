"""A SIP flood from one source, for the flood tests: as many datagrams per second as one Python
process on this machine can send, to a target on loopback only, for a bounded time.

    python tests/flooder.py --target 127.0.0.1:5060 --method OPTIONS --seconds 10 \\
        [--bind 127.0.0.1] [--domain example.com]

It cycles through a few thousand pre-built requests (distinct branches and Call-IDs, so each
is a new transaction to a server that lets it in), counts what it sent and what came back,
and prints one JSON line: ``{"method", "sent", "seconds", "rate", "answers"}``.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import sys
import time

VARIANTS = 4096


def requests(method: str, domain: str, host: str, port: int, n: int = VARIANTS) -> list[bytes]:
    """``n`` distinct requests of ``method`` from ``host:port`` (for ``domain``'s users)."""
    out = []
    salt = os.urandom(4).hex()
    for i in range(n):
        branch = f"z9hG4bKflood{salt}{i}"
        if method == "REGISTER":
            uri, to, extra = f"sip:{domain}", f"<sip:user{i}@{domain}>", (
                f"Contact: <sip:user{i}@{host}:{port}>\r\nExpires: 3600\r\n")
        elif method == "INVITE":
            uri, to, extra = f"sip:nobody{i}@{domain}", f"<sip:nobody{i}@{domain}>", (
                f"Contact: <sip:flood@{host}:{port}>\r\n")
        else:
            uri, to, extra = f"sip:{domain}", f"<sip:{domain}>", ""
        out.append((
            f"{method} {uri} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {host}:{port};branch={branch};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:flood@{domain}>;tag=f{salt}{i}\r\n"
            f"To: {to}\r\n"
            f"Call-ID: flood-{salt}-{i}\r\n"
            f"CSeq: 1 {method}\r\n"
            f"{extra}"
            "Content-Length: 0\r\n\r\n").encode())
    return out


def flood(target: tuple[str, int], method: str, seconds: float, bind: str,
          domain: str) -> dict[str, object]:
    if not ipaddress.ip_address(target[0]).is_loopback or \
            not ipaddress.ip_address(bind).is_loopback:
        raise SystemExit("flooder: loopback addresses only")
    seconds = min(seconds, 120.0)            # bounded, whatever the caller asks
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, 0))
    sock.setblocking(False)
    host, port = sock.getsockname()
    batch = requests(method, domain, host, port)
    sent = answers = 0
    send = sock.sendto
    deadline = time.monotonic() + seconds
    started = time.monotonic()
    while True:
        for data in batch:
            try:
                send(data, target)
                sent += 1
            except (BlockingIOError, InterruptedError):
                pass                         # the socket buffer is full: that is a flood
        try:
            while True:                      # drain what came back, so it is counted
                sock.recv(65535)
                answers += 1
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass                             # an ICMP error from an earlier send
        if time.monotonic() >= deadline:
            break
    elapsed = time.monotonic() - started
    sock.close()
    return {"method": method, "sent": sent, "seconds": round(elapsed, 3),
            "rate": round(sent / elapsed), "answers": answers}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="HOST:PORT on loopback")
    p.add_argument("--method", default="OPTIONS", choices=["OPTIONS", "REGISTER", "INVITE"])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--domain", default="example.com")
    args = p.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    result = flood((host, int(port)), args.method, args.seconds, args.bind, args.domain)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

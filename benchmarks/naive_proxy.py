"""The naive floor: a stateless SIP relay in plain Python, the least any Python proxy does per
message, in process (``bench_relay.py``) or on a real UDP socket (``bench_proxy.py --floor``).

Per message it splits the header lines, pushes its Via and a Record-Route on a request (or
pops its Route, for one that follows the recorded route set) and pops the top Via of a
response; a dict stands for the location service.  No transactions, no timers, no
validation, no routing hook, no log line: it relays a well-formed sipp call and nothing more
(a malformed message would raise).  A proxy must do far more per call, so this is a floor to
measure against, not a proxy to run.

On a socket it runs on the loop ``fastsip serve`` runs (uvloop where it is installed, as the
README's install has it) through the loop's datagram endpoint, so that ``bench_proxy.py
--floor`` shows what the shell and the kernel cost per call before any of fastsip's work:

    python benchmarks/naive_proxy.py PORT [HOST]
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import Callable

Send = Callable[[bytes, tuple[str, int]], None]


def _hostport(text: bytes) -> tuple[str, int]:
    """``host:port`` (with ``;params`` or ``>`` after it) -> (host, port)."""
    host, _, port = text.partition(b":")
    return host.decode(), int(port.split(b";", 1)[0].split(b">", 1)[0] or b"5060")


class NaiveRelay:
    """``receive(data, source)`` relays one datagram through ``send(data, (host, port))``."""

    def __init__(self, local: tuple[str, int], send: Send) -> None:
        self.send = send
        self.location: dict[bytes, tuple[str, int]] = {}
        self._counter = itertools.count()
        self._via = f"Via: SIP/2.0/UDP {local[0]}:{local[1]};branch=z9hG4bK-naive".encode()
        self._record_route = f"Record-Route: <sip:{local[0]}:{local[1]};lr>".encode()

    def receive(self, data: bytes, source: tuple[str, int]) -> None:
        send = self.send
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        start = lines[0]
        headers = [(line.split(b":", 1)[0].strip().lower(), line) for line in lines[1:]]
        if start.startswith(b"SIP/2.0 "):
            vias = [i for i, (name, _) in enumerate(headers) if name == b"via"]
            top = lines[vias[0] + 1]
            if b"," in top:                  # sipp's [last_Via:] joins the values in one line
                rest = top.split(b",", 1)[1].strip()
                lines[vias[0] + 1] = b"Via: " + rest
            else:
                del lines[vias[0] + 1]
                rest = headers[vias[1]][1]
            send(b"\r\n".join(lines) + b"\r\n\r\n" + body, _hostport(rest.split(b" ")[-1]))
            return
        method, uri, _ = start.split(b" ")
        user, at, hostport = uri.split(b":", 1)[1].rpartition(b"@")
        if method == b"REGISTER":           # the AOR is the To URI's
            to = next(line for name, line in headers if name == b"to")
            contact = next(line for name, line in headers if name == b"contact")
            aor_user = to.split(b"sip:", 1)[1].split(b"@", 1)[0]
            self.location[aor_user] = _hostport(contact.split(b"@", 1)[1])
            send(self._answer(b"200 OK", headers, contact), source)
            return
        if method == b"OPTIONS" and not at:  # to the relay itself: a ping (are you up?)
            send(self._answer(b"200 OK", headers), source)
            return
        routes = [i for i, (name, _) in enumerate(headers) if name == b"route"]
        if routes:
            del lines[routes[0] + 1]
            dest = _hostport(hostport)
        else:
            dest = self.location[user]
            lines.insert(1, self._record_route)
            if method == b"INVITE":
                send(self._answer(b"100 Trying", headers), source)
        lines.insert(1, self._via + str(next(self._counter)).encode())
        send(b"\r\n".join(lines) + b"\r\n\r\n" + body, dest)

    @staticmethod
    def _answer(status: bytes, headers: list[tuple[bytes, bytes]], *extra: bytes) -> bytes:
        keep = [line for name, line in headers
                if name in (b"via", b"from", b"to", b"call-id", b"cseq")]
        return b"\r\n".join([b"SIP/2.0 " + status, *keep, *extra, b"Content-Length: 0", b"",
                             b""])


class _Endpoint(asyncio.DatagramProtocol):
    def __init__(self, local: tuple[str, int]) -> None:
        self.local = local

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sendto = transport.sendto  # type: ignore[attr-defined]
        self.datagram_received = NaiveRelay(self.local, sendto).receive  # type: ignore[method-assign]


async def _serve(local: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(lambda: _Endpoint(local), local_addr=local)
    await asyncio.Event().wait()


def main(argv: list[str]) -> None:
    local = (argv[1] if len(argv) > 1 else "127.0.0.1", int(argv[0]))
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(local))
    else:
        uvloop.run(_serve(local))


if __name__ == "__main__":
    main(sys.argv[1:])

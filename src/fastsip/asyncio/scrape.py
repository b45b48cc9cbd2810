"""A minimal HTTP/1.x server on the event loop for Prometheus scrapes: ``GET /metrics``.

It runs on the serving loop, not in a thread (``prometheus_client.start_http_server``'s way):
the counters it reads are plain ints and dicts the loop's thread changes, and read on that
same thread they are never read half-changed (a thread iterating a dict while the loop adds a
key gets ``RuntimeError``); some values are awaited (the location store's count); and no
second thread contends for the GIL while the loop serves SIP.  A scrape costs the loop the
rendering of the text (well under a millisecond for serve's few dozen series) every 15 s or
so.  One request per connection, ``Connection: close``; heads over 8 KiB or slower than
:data:`READ_TIMEOUT` seconds end the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["READ_TIMEOUT", "start_scrape_server"]

log = logging.getLogger("fastsip.asyncio.scrape")

#: Seconds a client has to send its request head.
READ_TIMEOUT = 5.0
#: Bytes of request head at most.
MAX_HEAD = 8192


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8",
              head_only: bool = False) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


async def start_scrape_server(host: str, port: int, render: Callable[[], Awaitable[bytes]],
                              content_type: str) -> asyncio.Server:
    """Listen on ``host``:``port`` (TCP); ``GET /metrics`` answers ``await render()`` as
    ``content_type``.  Close the returned server to stop (OSError when the address cannot be
    bound)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                    asyncio.TimeoutError, ConnectionError):
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                data = _response("405 Method Not Allowed", b"GET /metrics\n")
            elif path == "/metrics":
                try:
                    body = await render()
                except Exception:
                    log.exception("rendering the metrics failed")
                    data = _response("500 Internal Server Error", b"metrics failed\n")
                else:
                    data = _response("200 OK", body, content_type, head_only=method == "HEAD")
            else:
                data = _response("404 Not Found", b"see /metrics\n")
            writer.write(data)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, limit=MAX_HEAD)

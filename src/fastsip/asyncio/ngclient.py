"""An ng protocol client: how ``fastsip serve`` drives a media relay (``fastsip media`` or
rtpengine) over UDP, as Kamailio's ``rtpengine`` module does.

One UDP socket; each command gets a fresh cookie and is sent again, same cookie, when no
reply came within ``timeout`` (the relay answers a retransmission from its reply cache, so
nothing is done twice); after ``retries`` the command fails with :class:`NgError`.  Replies
are matched to commands by cookie, so any number may be in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Mapping
from typing import Any, cast

from fastsip.errors import FastSIPError
from fastsip.relay.bencode import BencodeError, Encodable, as_text, decode, encode

__all__ = ["NgClient", "NgError"]

log = logging.getLogger("fastsip.asyncio.ngclient")


class NgError(FastSIPError):
    """A command failed: no reply, or ``result: error`` (the relay's ``error-reason``)."""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, client: NgClient) -> None:
        self.client = client

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.client._reply(data)

    def error_received(self, exc: Exception) -> None:
        # An ICMP port unreachable: the relay is not there (yet); the retransmission timer
        # and its timeout report it.
        log.debug("ng socket: %s", exc)


class NgClient:
    """``await client.command({"command": "offer", ...})`` → the reply dictionary (keys and
    string values as ``str``; byte strings that are not UTF-8 stay ``bytes``)."""

    def __init__(self, host: str, port: int, *, timeout: float = 1.0, retries: int = 2) -> None:
        self.address = (host, port)
        self.timeout = timeout
        self.retries = retries
        self._transport: asyncio.DatagramTransport | None = None
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._cookies = itertools.count(1)
        self._prefix = os.urandom(4).hex()

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self), remote_addr=self.address)
        self._transport = transport

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(NgError("the ng client closed"))
        self._waiting.clear()

    async def command(self, command: Mapping[str, Any]) -> dict[str, Any]:
        """Send ``command``; the relay's reply (``result`` ok/pong), or NgError."""
        if self._transport is None:
            raise NgError("the ng client is not open")
        cookie = f"{self._prefix}_{next(self._cookies)}".encode()
        # (An ng dictionary's keys are text; bencode's type allows bytes or text keys.)
        data = cookie + b" " + encode(cast(Encodable, command))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cookie] = fut
        try:
            for _ in range(self.retries + 1):
                self._transport.sendto(data)
                try:
                    reply = await asyncio.wait_for(asyncio.shield(fut), self.timeout)
                except asyncio.TimeoutError:
                    continue
                if reply.get("result") == "error":
                    raise NgError(f"{command.get('command')}: "
                                  f"{reply.get('error-reason', 'error')}")
                return reply
        finally:
            self._waiting.pop(cookie, None)
        raise NgError(f"{command.get('command')}: no reply from the relay at "
                      f"{self.address[0]}:{self.address[1]} after {self.retries + 1} tries")

    def _reply(self, data: bytes) -> None:
        cookie, _, body = data.partition(b" ")
        fut = self._waiting.get(cookie)
        if fut is None or fut.done():
            return  # a late reply to a retransmitted command: already answered
        try:
            reply = decode(body)
        except BencodeError as exc:
            fut.set_exception(NgError(f"malformed reply from the relay: {exc}"))
            return
        if not isinstance(reply, dict):
            fut.set_exception(NgError("the relay's reply is not a dictionary"))
            return
        fut.set_result(as_text(reply))


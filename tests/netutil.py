"""Helpers for tests over real sockets: the loops to run on, a message inbox, SIP requests to send,
and TLS contexts with a certificate from a throwaway CA (``tlsutil``)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from fastsip import Message, Request
from fastsip.asyncio import TransportLayer
from fastsip.transport import Address
from fastsip.transport.rules import response_destination

LOOPS: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
try:
    import uvloop

    LOOPS.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
except ImportError:     # pragma: no cover - uvloop is a bench extra, not a test dependency
    LOOPS.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip(
        "uvloop is not installed" + (" (it has no Windows build)" if sys.platform == "win32"
                                     else ""))))


def has_add_reader(loop: asyncio.AbstractEventLoop) -> bool:
    """Can ``loop`` watch a socket with ``add_reader``?  Not Windows' proactor loop (asyncio's
    default there): fastsip's own socket readers fall back to the loop's datagram endpoints
    and servers on it."""
    proactor = getattr(asyncio, "ProactorEventLoop", None)    # (Windows only)
    return proactor is None or not isinstance(loop, proactor)


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _has_ipv6()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")


def _has_loopback_aliases() -> bool:
    """Can we bind 127.0.0.2 and 127.0.0.3?  All of 127/8 is loopback on Linux; macOS has only
    127.0.0.1 unless aliases were added (``ifconfig lo0 alias 127.0.0.2``)."""
    try:
        for host in ("127.0.0.2", "127.0.0.3"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((host, 0))
        return True
    except OSError:
        return False


#: Tests that need a second and third source address on loopback (one source banned or
#: capped while another is served).
needs_loopback_aliases = pytest.mark.skipif(
    not _has_loopback_aliases(), reason="127.0.0.2/127.0.0.3 are not configured on loopback")


def run(factory: Callable[[], asyncio.AbstractEventLoop], coro: Coroutine[Any, Any, None],
        timeout: float = 20.0) -> None:
    """Run ``coro`` on a fresh loop from ``factory``, failing (not hanging) after ``timeout``."""
    loop = factory()
    try:
        loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.close()


class Inbox:
    """Collects (message, source) pairs from a transport's receive callback."""

    def __init__(self) -> None:
        self.items: list[tuple[Message, Address]] = []
        self._event = asyncio.Event()

    def __call__(self, msg: Message, source: Address) -> None:
        self.items.append((msg, source))
        self._event.set()

    async def wait(self, count: int = 1, timeout: float = 5.0) -> list[tuple[Message, Address]]:
        """Wait until ``count`` messages have arrived; fails after ``timeout``."""
        async def until() -> None:
            while len(self.items) < count:
                self._event.clear()
                await self._event.wait()
        await asyncio.wait_for(until(), timeout)
        return self.items


def answer_with(server: TransportLayer, status: int = 200) -> Inbox:
    """An inbox that also answers each request through ``server`` (§18.2.2 destination)."""
    inbox = Inbox()

    def on_message(msg: Message, source: Address) -> None:
        inbox(msg, source)
        if isinstance(msg, Request):
            via = msg.top_via
            assert via is not None
            server.send(bytes(msg.reply(status)), response_destination(via, source))

    server.on_message = on_message
    return inbox


def options(target: str, sent_by: str, transport: str = "UDP", *, branch: str = "z9hG4bKtest1",
            call_id: str = "call-1@test", rport: bool = True, extra: str = "") -> Request:
    """An OPTIONS request with one Via (``sent_by`` is "host:port")."""
    via = f"SIP/2.0/{transport} {sent_by};branch={branch}" + (";rport" if rport else "") + extra
    return Request.create("OPTIONS", target, [
        ("Via", via),
        ("Max-Forwards", "70"),
        ("From", "<sip:alice@test>;tag=a1"),
        ("To", "<sip:bob@test>"),
        ("Call-ID", call_id),
        ("CSeq", "1 OPTIONS"),
    ])


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(family, kind) as s:
        s.bind(("127.0.0.1" if family == socket.AF_INET else "::1", 0))
        return int(s.getsockname()[1])


def tls_contexts(tmp: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a fresh certificate for 127.0.0.1, ::1 and localhost from a
    throwaway CA (:class:`tlsutil.TestCA`), and a client context that trusts exactly that CA."""
    from tlsutil import TestCA

    ca = TestCA(tmp)
    leaf = ca.issue("server")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(leaf.cert, leaf.key)
    client = ssl.create_default_context(cadata=ca.ca_pem.decode())
    return server, client

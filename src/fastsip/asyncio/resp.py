"""A lean Redis client: RESP2 over one pipelined connection, for the location store's hot path.

Why not redis-py: the lookup on every INVITE is one ``HGETALL``, and through redis-py's
asyncio client it cost ~850 us of CPU per call in ``fastsip serve`` at 150 calls/s (its
connection pool, retry, timeout and parser layers run cold between calls; ~180 us warm).  This
client is one :class:`asyncio.Protocol`: a command is one ``write`` and one future, replies are
parsed as they arrive and resolve the futures in order, and any number of commands may be in
flight on the one connection (Redis answers in order).

Replies come from the network, so the parser (:class:`ReplyParser`) checks every length
against explicit limits and rejects what is not RESP; a connection that sends something it
cannot parse is closed, and every command waiting on it fails.  The connection is opened on
first use and again after it is lost; a command that gets no answer within ``timeout`` fails
(and the connection, whose answers can no longer be matched to commands, is closed).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["RedisClient", "RedisError", "ReplyError", "ReplyParser", "encode_command"]

#: Limits on what a reply may claim (Redis's own proto-max-bulk-len is 512 MB; a location
#: store's values are a few hundred bytes).
MAX_BULK = 64 * 1024 * 1024
MAX_ITEMS = 1024 * 1024
MAX_DEPTH = 8
MAX_LINE = 64 * 1024


class RedisError(ConnectionError):
    """The connection failed, timed out, or sent something that is not RESP."""


class ReplyError(Exception):
    """Redis answered the command with an error (``-ERR ...``, ``-NOSCRIPT ...``)."""


_Reply = bytes | int | None | list[Any] | ReplyError


def encode_command(args: tuple[bytes | str | float, ...]) -> bytes:
    """A command as RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, float):
            data = repr(arg).encode()
        else:
            data = str(int(arg)).encode()
        out.append(b"$%d\r\n" % len(data))
        out.append(data)
        out.append(b"\r\n")
    return b"".join(out)


class ReplyParser:
    """Incremental RESP2 reply parser: :meth:`feed` bytes, then :meth:`replies` yields every
    complete reply.  Raises :class:`RedisError` for anything that is not RESP or breaks a
    limit (the connection must then be dropped)."""

    __slots__ = ("_buffer", "_pos")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[:self._pos]
            self._pos = 0
        self._buffer += data

    def replies(self) -> list[_Reply]:
        out: list[_Reply] = []
        while True:
            parsed = self._parse(self._pos, 0)
            if parsed is None:
                if len(self._buffer) - self._pos > MAX_BULK + MAX_LINE:
                    raise RedisError("reply too large")
                return out
            value, self._pos = parsed
            out.append(value)

    def _line(self, pos: int) -> tuple[bytes, int] | None:
        end = self._buffer.find(b"\r\n", pos, pos + MAX_LINE)
        if end < 0:
            if len(self._buffer) - pos >= MAX_LINE:
                raise RedisError("reply line too long")
            return None
        return bytes(self._buffer[pos:end]), end + 2

    @staticmethod
    def _int(text: bytes, low: int, high: int) -> int:
        body = text[1:] if text[:1] == b"-" else text
        if not body or not body.isdigit() or len(body) > 19:
            raise RedisError(f"bad length or integer in reply: {text[:32]!r}")
        value = int(text)
        if not low <= value <= high:
            raise RedisError(f"reply length {value} out of bounds")
        return value

    def _parse(self, pos: int, depth: int) -> tuple[_Reply, int] | None:
        if depth > MAX_DEPTH:
            raise RedisError("reply nested too deep")
        line = self._line(pos)
        if line is None:
            return None
        head, pos = line
        if not head:
            raise RedisError("empty reply line")
        kind, rest = head[:1], head[1:]
        if kind == b"+":
            return rest, pos
        if kind == b"-":
            return ReplyError(rest.decode(errors="replace")), pos
        if kind == b":":
            return self._int(rest, -(2**63), 2**63 - 1), pos
        if kind == b"$":
            size = self._int(rest, -1, MAX_BULK)
            if size == -1:
                return _NIL, pos
            end = pos + size
            if len(self._buffer) < end + 2:
                return None
            if self._buffer[end:end + 2] != b"\r\n":
                raise RedisError("bulk string not followed by CRLF")
            return bytes(self._buffer[pos:end]), end + 2
        if kind == b"*":
            count = self._int(rest, -1, MAX_ITEMS)
            if count == -1:
                return _NIL, pos
            items: list[Any] = []
            for _ in range(count):
                parsed = self._parse(pos, depth + 1)
                if parsed is None:
                    return None
                value, pos = parsed
                items.append(None if value is _NIL else value)
            return items, pos
        raise RedisError(f"unknown reply type {kind!r}")


class _Nil:
    """A nil reply (``$-1``, ``*-1``) while parsing; ``None`` to callers."""


_NIL: Any = _Nil()


class _Connection(asyncio.Protocol):
    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.parser = ReplyParser()
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
            replies = self.parser.replies()
        except RedisError as exc:
            self.fail(exc)
            return
        waiting = self.waiting
        for reply in replies:
            if not waiting:
                self.fail(RedisError("a reply nobody asked for"))
                return
            future = waiting.popleft()
            if future.done():
                continue
            if reply is _NIL:
                future.set_result(None)
            elif isinstance(reply, ReplyError):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisError(f"connection to Redis lost{f': {exc}' if exc else ''}"))

    def fail(self, error: Exception) -> None:
        """Drop the connection: every command waiting on it fails with ``error``."""
        if self.client._connection is self:
            self.client._connection = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)


class RedisClient:
    """One pipelined connection to the Redis at ``url`` (``redis://[[user]:password@]host
    [:port][/db]``, ``rediss://`` for TLS).  ``password`` (from the environment) is used when
    the URL has none.  :meth:`call` sends a command and returns its reply: bytes, int, None,
    or a list of those; an error reply raises :class:`ReplyError`, a connection failure or
    timeout :class:`RedisError`."""

    def __init__(self, url: str, *, password: str | None = None, timeout: float = 5.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("expected redis:// or rediss://")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError("bad port") from None
        self.host = parts.hostname or "127.0.0.1"
        self.port = port
        self.tls = parts.scheme == "rediss"
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else password
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database must be a number, not {path!r}")
        self.db = int(path) if path else 0
        self.timeout = timeout
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._closed = False

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self.tls else None
        _, connection = await asyncio.wait_for(loop.create_connection(
            lambda: _Connection(self), self.host, self.port, ssl=context), self.timeout)
        # Handshake commands go first on the new connection, pipelined with nothing else.
        if self.password is not None:
            auth: tuple[bytes | str, ...] = (b"AUTH", self.password) if self.username is None \
                else (b"AUTH", self.username, self.password)
            await self._send(connection, auth)
        if self.db:
            await self._send(connection, (b"SELECT", self.db))
        return connection

    async def _connection_ready(self) -> _Connection:
        connection = self._connection
        if connection is not None:
            return connection
        if self._closed:
            raise RedisError("the Redis client is closed")
        if self._connecting is None:
            loop = asyncio.get_running_loop()
            self._connecting = loop.create_future()
            try:
                connection = await self._connect()
            except Exception as exc:  # noqa: BLE001 - every failure is the waiters' too
                waiting, self._connecting = self._connecting, None
                error = exc if isinstance(exc, (RedisError, ReplyError)) else RedisError(
                    f"cannot connect to Redis at {self.host}:{self.port}: "
                    f"{exc or type(exc).__name__}")
                if not waiting.done():
                    waiting.set_exception(error)
                    waiting.exception()  # (retrieved: nobody else may be waiting)
                raise error from None
            except BaseException:  # cancelled: whoever waits with us tries again
                waiting, self._connecting = self._connecting, None
                waiting.cancel()
                raise
            self._connection = connection
            waiting, self._connecting = self._connecting, None
            waiting.set_result(connection)
            return connection
        return await asyncio.shield(self._connecting)

    def _send(self, connection: _Connection, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        transport = connection.transport
        if transport is None:
            raise RedisError("connection to Redis lost")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        connection.waiting.append(future)
        transport.write(encode_command(args))
        # No answer in time: the connection's answers can no longer be paired with commands.
        timer = loop.call_later(self.timeout, _expire, connection, future, self.timeout)
        future.add_done_callback(lambda _: timer.cancel())
        return future

    async def call(self, *args: bytes | str | float) -> Any:
        connection = await self._connection_ready()
        return await self._send(connection, args)

    async def close(self) -> None:
        self._closed = True
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.fail(RedisError("the Redis client is closed"))


def _expire(connection: _Connection, future: asyncio.Future[Any], timeout: float) -> None:
    if not future.done():
        connection.fail(RedisError(f"Redis did not answer within {timeout:g} s"))

"""fastsip's RESP client (src/fastsip/asyncio/resp.py): the reply parser against every split of
valid replies and against arbitrary bytes (it parses network input: every length checked, only
RedisError ever raised), and the client against a real redis-server started here: pipelining,
error replies, AUTH and SELECT, a server that stops answering (timeout, then a reconnect) and
one that restarts."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))

from procutil import posix_only
from redisutil import RedisServer

from fastsip.asyncio.resp import (
    MAX_DEPTH,
    RedisClient,
    RedisError,
    ReplyError,
    ReplyParser,
    encode_command,
)


def encode_reply(value: Any) -> bytes:
    """A reply as Redis would send it (the test's own encoder, independent of the parser)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, bool):
        raise TypeError
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, ReplyError):
        return b"-" + str(value).encode() + b"\r\n"
    return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)


replies = st.recursive(
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.binary(max_size=64),
    lambda children: st.lists(children, max_size=5), max_leaves=20)


@given(st.lists(replies, min_size=1, max_size=5), st.data())
@settings(max_examples=300, deadline=None)
def test_replies_parse_back_whatever_the_split(values: list[Any], data: st.DataObject) -> None:
    wire = b"".join(encode_reply(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    parser = ReplyParser()
    got: list[Any] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        parser.feed(wire[last:cut])
        last = cut
        got.extend(parser.replies())
    assert [None if type(g).__name__ == "_Nil" else g for g in got] == values


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_arbitrary_bytes_only_ever_raise_redis_error(data: bytes) -> None:
    parser = ReplyParser()
    try:
        parser.feed(data)
        parser.replies()
    except RedisError:
        pass


@pytest.mark.parametrize("wire", [
    b"$99999999999\r\n",                    # a bulk past the limit
    b"*99999999\r\n",                       # an array past the limit
    b"$-2\r\n", b"$12a\r\n", b":\r\n", b"*-5\r\n",   # lengths that are not lengths
    b"?what\r\n", b"\r\n",                  # not a reply type
    b"$3\r\nabcXY",                         # a bulk not followed by CRLF
    b"*1\r\n" * (MAX_DEPTH + 2) + b":1\r\n",   # nested too deep
    b"+" + b"x" * (70 * 1024),              # a line that never ends
])
def test_what_is_not_resp_is_refused(wire: bytes) -> None:
    parser = ReplyParser()
    with pytest.raises(RedisError):
        parser.feed(wire)
        parser.replies()


def test_commands_encode_as_arrays_of_bulk_strings() -> None:
    assert encode_command(("SET", b"k\r\n", 5, 1.5)) == \
        b"*4\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n5\r\n$3\r\n1.5\r\n"


@pytest.fixture
def server(tmp_path: Path) -> Any:
    s = RedisServer(tmp_path / "redis", password="pw-1")
    yield s
    s.stop()


def test_pipelined_calls_errors_auth_and_select(server: RedisServer) -> None:
    async def main() -> None:
        client = RedisClient(f"redis://:pw-1@127.0.0.1:{server.port}/3", timeout=2.0)
        # 200 commands in flight on the one connection: each gets its own answer, in order.
        await asyncio.gather(*(client.call("SET", f"k{n}", n) for n in range(200)))
        got = await asyncio.gather(*(client.call("GET", f"k{n}") for n in range(200)))
        assert got == [str(n).encode() for n in range(200)]
        assert await client.call("HGETALL", "nothing") == []
        assert await client.call("GET", "nothing") is None
        with pytest.raises(ReplyError, match="WRONGTYPE|ERR"):
            await client.call("HGETALL", "k1")
        assert await client.call("INCR", "k1") == 2      # the connection survived the error
        await client.close()
        # SELECT 3 took: database 0 has none of it.
        zero = RedisClient(f"redis://:pw-1@127.0.0.1:{server.port}/0")
        assert await zero.call("GET", "k1") is None
        await zero.close()
        wrong = RedisClient(f"redis://:nope@127.0.0.1:{server.port}/0")
        with pytest.raises(ReplyError, match="WRONGPASS|invalid"):
            await wrong.call("PING")
        await wrong.close()

    asyncio.run(main())


@posix_only("freezes redis-server with SIGSTOP/SIGCONT, which Windows does not have")
def test_a_server_that_stops_answering_times_out_then_recovers(server: RedisServer) -> None:
    async def main() -> None:
        client = RedisClient(f"redis://:pw-1@127.0.0.1:{server.port}/0", timeout=0.5)
        assert await client.call("PING") == b"PONG"
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)      # (our own redis-server)
        try:
            started = time.monotonic()
            with pytest.raises(RedisError, match="did not answer"):
                await client.call("PING")
            assert time.monotonic() - started < 2
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert await client.call("PING") == b"PONG"    # a new connection
        server.restart()                                # the server goes away and comes back
        with pytest.raises(RedisError):
            await client.call("PING")                   # the old connection is gone ...
        assert await client.call("PING") == b"PONG"    # ... and the next call reconnects
        await client.close()
        with pytest.raises(RedisError, match="closed"):
            await client.call("PING")

    asyncio.run(main())

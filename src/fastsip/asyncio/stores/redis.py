"""Bindings in Redis (``--db redis://HOST:PORT/N``): :class:`RedisLocationStore`, shared by every
worker and node that points at the same database.  It talks to Redis through
:class:`fastsip.asyncio.resp.RedisClient`, one pipelined connection (that module says why not
redis-py: the per-call lookup's cost).

**Layout: one hash per address-of-record**, ``<prefix><aor>`` (``fastsip:loc:sip:bob@example.com``),
whose fields are the contact keys (:func:`~fastsip.proxy.location.contact_key`) and whose values
are the bindings as JSON.  Why:

- the lookup on every INVITE is one ``HGETALL``: one round trip whatever the number of contacts
  (a key per binding would need a second round trip, or a script, to find them);
- one REGISTER's changes are one Lua script on one key: atomic, all of them or none (RFC 3261
  §10.3 step 7), and in one round trip;
- Redis expires what expires: the script sets the hash's expiry to its last binding's, so an AOR
  whose phones all stopped refreshing disappears by itself.  A binding that expired inside a hash
  that lives on is skipped by lookups and dropped by that AOR's next write; ``purge`` has nothing
  to do.  (Redis 7.4's per-field expiry, ``HPEXPIREAT``, would let Redis drop those too; Debian
  12 ships 7.0.)

Expiry times are absolute wall-clock seconds, as everywhere in the location service, so the
nodes' clocks and Redis's must agree (NTP) to within the precision that matters for expiry.

**Durability**: ``update`` returns when Redis has answered.  For that to mean "on disk", run
Redis with ``appendonly yes`` and ``appendfsync always`` (then Redis fsyncs its log before it
answers); with ``everysec`` a crash of the Redis host can lose the last second of REGISTERs.
``open()`` warns when the server says it keeps no append-only file.

The password comes from the URL (``redis://:PASSWORD@host``) or ``FASTSIP_REDIS_PASSWORD``;
neither is ever logged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from fastsip.asyncio.resp import RedisClient, RedisError, ReplyError
from fastsip.asyncio.stores import redact
from fastsip.proxy.location import (
    Binding,
    LocationStoreError,
    contact_key,
    lookup_order,
)

__all__ = ["RedisLocationStore"]

logger = logging.getLogger("fastsip.proxy")

#: Apply one REGISTER's changes to an AOR's hash, atomically: KEYS[1] the hash; ARGV[1] now
#: (seconds), ARGV[2] how many contact keys to remove, then those keys, then (key, JSON) pairs
#: to set.  Bindings expired at ``now`` are dropped on the way, and the hash expires with its
#: last binding (or is deleted when none is left).
_UPDATE = """
local now = tonumber(ARGV[1])
local removes = tonumber(ARGV[2])
for i = 3, 2 + removes do
    redis.call('HDEL', KEYS[1], ARGV[i])
end
for i = 3 + removes, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local last = nil
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
    local expires = cjson.decode(all[i + 1])['expires']
    if expires <= now then
        redis.call('HDEL', KEYS[1], all[i])
    elseif last == nil or expires > last then
        last = expires
    end
end
if last == nil then
    redis.call('DEL', KEYS[1])
else
    redis.call('PEXPIREAT', KEYS[1], math.ceil(last * 1000))
end
return 0
"""


def _to_json(binding: Binding) -> str:
    return json.dumps({
        "contact": binding.contact, "expires": binding.expires, "q": binding.q,
        "call_id": binding.call_id, "cseq": binding.cseq, "path": list(binding.path),
        "source": binding.source, "instance": binding.instance,
        "user_agent": binding.user_agent, "registered_at": binding.registered_at,
        "flow": binding.flow, "socket": binding.socket, "reg_id": binding.reg_id,
    }, separators=(",", ":"))


def _from_json(aor: str, text: bytes | str) -> Binding:
    d = json.loads(text)
    return Binding(aor=aor, contact=d["contact"], expires=d["expires"], q=d["q"],
                   call_id=d["call_id"], cseq=d["cseq"], path=tuple(d["path"]),
                   source=d["source"], instance=d["instance"], user_agent=d["user_agent"],
                   registered_at=d["registered_at"], flow=d["flow"], socket=d["socket"],
                   reg_id=d["reg_id"])


class RedisLocationStore:
    """The location service in Redis (module docstring: layout, expiry, durability).

    ``prefix`` namespaces the keys, so several fastsip deployments can share one Redis
    database.  No I/O happens before :meth:`open`.
    """

    immediate_reads = False
    immediate_writes = False

    def __init__(self, url: str, *, prefix: str = "fastsip:loc:",
                 timeout: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        password = os.environ.get("FASTSIP_REDIS_PASSWORD") or None
        try:
            # The URL's own password, when it has one, wins over the environment's.
            self._client = RedisClient(url, password=password, timeout=timeout)
        except ValueError as exc:
            raise LocationStoreError(f"location store URL {redact(url)!r}: {exc}") from None
        self._update_sha = hashlib.sha1(_UPDATE.encode()).hexdigest()
        self._closed = False

    async def open(self) -> None:
        """Check that Redis answers (and says whether it keeps a log it fsyncs)."""
        try:
            await self._client.call("PING")
        except (RedisError, ReplyError, OSError) as exc:
            raise LocationStoreError(
                f"cannot reach Redis at {redact(self.url)}: {exc}") from None
        try:
            flat = await self._client.call("CONFIG", "GET", "appendonly")
        except ReplyError:  # CONFIG may be disabled (managed Redis, ACLs): nothing to say
            return
        config = dict(zip(flat[::2], flat[1::2]))
        if config.get(b"appendonly") == b"no":
            logger.warning("Redis at %s keeps no append-only file: a Redis crash loses "
                           "registrations (appendonly yes, appendfsync always makes each 200 "
                           "durable)", redact(self.url))

    def _key(self, aor: str) -> str:
        if self._closed:
            raise LocationStoreError(f"location store {redact(self.url)!r} is closed")
        return self.prefix + aor

    async def bindings(self, aor: str) -> list[Binding]:
        flat = await self._client.call("HGETALL", self._key(aor))
        found = [_from_json(aor, v) for v in flat[1::2]]
        found.sort(key=lookup_order)
        return found

    async def lookup(self, aor: str, now: float) -> list[Binding]:
        return [b for b in await self.bindings(aor) if b.expires > now]

    async def update(self, aor: str, put: Iterable[Binding] = (),
                     remove: Iterable[str] = ()) -> None:
        # Every key first: a bad contact raises before anything is sent.
        puts = list(put)
        removes = [contact_key(c) for c in remove]
        args: list[Any] = [_now_of(puts), len(removes), *removes]
        for binding in puts:
            args += (binding.key, _to_json(binding))
        key = self._key(aor)
        try:
            await self._client.call("EVALSHA", self._update_sha, 1, key, *args)
        except ReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            # First use on this server (or after SCRIPT FLUSH): send the script itself.
            await self._client.call("EVAL", _UPDATE, 1, key, *args)

    async def remove_all(self, aor: str) -> None:
        await self._client.call("DEL", self._key(aor))

    async def purge(self, now: float) -> int:
        # Redis expires each AOR with its last binding; a binding expired inside a live AOR is
        # skipped by lookups and dropped by its AOR's next write.  Nothing to sweep (a SCAN of
        # every AOR each minute would cost Redis more than the memory it frees).
        return 0

    async def aors(self) -> list[str]:
        prefix = self._key("")
        pattern = _glob_escape(prefix) + "*"
        found: set[str] = set()
        cursor = b"0"
        while True:    # SCAN may return a key twice: a set
            cursor, keys = await self._client.call("SCAN", cursor, "MATCH", pattern,
                                                   "COUNT", 1000)
            found.update(k.decode()[len(prefix):] for k in keys)
            if cursor == b"0":
                return sorted(found)

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._client.close()


def _now_of(puts: list[Binding]) -> float:
    """The time to prune at, in the caller's clock (the store reads none): a REGISTER stamps
    its bindings ``registered_at = now``.  A change with only removals prunes nothing (0)."""
    return min((b.registered_at for b in puts), default=0.0)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)

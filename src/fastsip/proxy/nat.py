"""NAT traversal for the proxy and registrar: flows, Contact aliases and keep-alives.

A phone behind a NAT writes its private address (``192.168.1.20:5060``) in its Via and
Contact, but its packets reach us from the NAT's public address and port.  Only that address --
the *flow* the phone's packets come over (RFC 5626: our socket, the NAT's address and port,
the transport) -- reaches it: a datagram to the Contact goes nowhere, and the NAT's pinhole
closes after some idle seconds (30 s on many home routers).  Kamailio's ``nathelper`` and RFC
5626 (SIP outbound) are the models; here is what fastsip does:

- **Detection** (:func:`request_behind_nat`, :func:`contact_behind_nat`): a request whose top
  Via names another address than where it came from (the sent-by host, or over UDP the port;
  nathelper's ``nat_uac_test`` 2 and 16), or whose Contact is a private address
  (RFC 1918/6598, ULA, link-local) seen from a public one (test 1); a response whose Contact is
  not where it came from.  Third-party registrations (a Contact that is not the sender, with a
  Via that is) are left alone.
- **Registrations**: the binding of a client behind NAT, of an RFC 5626 outbound client
  (``reg-id`` + ``+sip.instance``) and of any TCP/TLS client is a *flow* binding: requests for
  it go to the address and socket its REGISTER came from, with the Contact as Request-URI.
- **Dialogs**: the Contact of a dialog-creating or target-refreshing request or response from
  behind NAT gets an ``alias`` parameter naming its flow (``;alias=203.0.113.7~40312~1``:
  address, port, transport as Kamailio's ``add_contact_alias`` writes it, so a Kamailio in the
  path understands it too).  The other side's in-dialog requests carry it in their
  Request-URI; since we record-route, they come through us, and we send them to the alias
  address, with the parameter removed (Kamailio's ``handle_ruri_alias``).  The address is
  reached from the socket of that address family :meth:`local_for` picks (with one listener
  per family, the one the flow came in on).
- **Keep-alives** (:class:`NatKeeper`): every flow binding is sent an OPTIONS (or a CRLF) every
  ``interval`` seconds, statelessly (as nathelper does): it keeps the NAT's pinhole and a
  TCP connection open, and a binding whose flow leaves ``max_failures`` pings in a row
  unanswered is removed, so calls stop going to a phone that is gone.

The rules every forwarded message meets (detection, adding and popping an alias) are compiled
(:mod:`fastsip.proxy._nat`, which the compiled proxy core calls in C); they are imported from
here.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from fastsip.proxy._nat import (
    ALIAS,
    add_alias,
    binding_flow,
    contact_behind_nat,
    is_private,
    parse_address,
    pop_alias,
    request_behind_nat,
)
from fastsip.sip import Response
from fastsip.transport import Address
from fastsip.transport.rules import call_id_shard

if TYPE_CHECKING:
    from fastsip.proxy.location import Binding, LocationStore

from fastsip.proxy.location import run_immediately

__all__ = [
    "ALIAS",
    "NatKeeper",
    "add_alias",
    "binding_flow",
    "contact_behind_nat",
    "is_private",
    "parse_address",
    "pop_alias",
    "request_behind_nat",
]

log = logging.getLogger("fastsip.proxy.nat")

#: The branch prefix of our keep-alive OPTIONS: their answers are recognized by it.
PING_BRANCH = "z9hG4bK-nat."


# -- keep-alives ------------------------------------------------------------------------------


class NatKeeper:
    """Pings every flow binding every ``interval`` seconds and removes the ones whose flow
    stops answering.

    ``method``: ``"OPTIONS"`` (answered by any SIP UA; the answer proves the flow alive) or
    ``"CRLF"`` (RFC 5626's keep-alive over UDP and TCP: keeps the pinhole and the connection
    open, but nothing comes back, so no binding is ever removed for silence).  Pings are sent
    statelessly, one datagram each; a binding is removed after ``max_failures`` unanswered
    pings in a row (OPTIONS only).  ``now``: wall-clock seconds (the store's clock).

    Wire it to a :class:`~fastsip.proxy.Proxy` with :meth:`attach` (the proxy hands answers
    to our pings to :meth:`on_response`); the pings run on the proxy's timer wheel.  The store
    is read (and dead flows removed) in place when it answers from memory; a store that waits
    for I/O needs ``spawn`` (``loop.create_task``), which runs each slice of a round as a task.
    ``shard``: (this worker, workers) when several share the address and route each message
    by its Call-ID (``serve --workers``): the pings' Call-IDs are picked so the answers come
    back here.
    """

    def __init__(self, store: LocationStore, now: Callable[[], float], *,
                 interval: float = 30.0, max_failures: int = 3, method: str = "OPTIONS",
                 spawn: Callable[[Coroutine[Any, Any, None]], object] | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        method = method.upper()
        if method not in ("OPTIONS", "CRLF"):
            raise ValueError(f"keep-alive method must be OPTIONS or CRLF, not {method!r}")
        self.store = store
        self.interval = interval
        self.max_failures = max_failures
        self.method = method
        self._now = now
        self._spawn = spawn
        self._shard = shard
        self._stopped = False
        self._proxy: Any = None
        self._timer: Any = None
        self._queue: list[str] = []                       # AORs left in this round
        self._live: set[tuple[str, str]] = set()          # bindings pinged this round
        self._chunk = 0
        self._round_started = 0.0
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)
        #: Unanswered pings in a row, by (aor, contact key).
        self.missed: dict[tuple[str, str], int] = {}
        #: The ping in flight (branch) per binding.
        self._pending: dict[str, tuple[str, str]] = {}
        #: Pings sent, answers received, bindings removed (logs, metrics).
        self.sent = 0
        self.answered = 0
        self.removed = 0

    def attach(self, proxy: Any) -> None:
        """Start pinging through ``proxy`` (its transport, local addresses and wheel)."""
        self._proxy = proxy
        self._stopped = False
        proxy.nat_keeper = self
        if self.interval > 0 and self._timer is None:
            self._round_started = proxy.clock.time()
            self._timer = proxy.clock.call_later(self.interval, self._tick)

    def stop(self) -> None:
        self._stopped = True  # (a slice running as a task arms no next one)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        """A round is spread over the interval in up to 30 slices (one a second at the
        default): each slice looks up and pings its share of the AORs, so 10,000 flows cost
        ~330 datagrams and a few milliseconds a second, not one burst that stalls the loop
        and the network every 30 s."""
        self._timer = None
        if self._proxy is None or self.interval <= 0:
            return
        work = self._slice()
        store = self.store
        if store.immediate_reads and store.immediate_writes:
            run_immediately(work)
        elif self._spawn is not None:
            self._spawn(work)
        else:
            work.close()
            log.error("NAT keep-alives stopped: this location store waits for I/O, and the "
                      "NatKeeper was given no spawn to run it")

    async def _slice(self) -> None:
        """One slice of a round; arms the timer of the next."""
        proxy = self._proxy
        clock = proxy.clock
        slices = max(1, min(int(self.interval), 30))
        try:
            if not self._queue:
                self._round_started = clock.time()
                self._queue = await self._start_round()
                self._chunk = -(-len(self._queue) // slices)
            batch = self._queue[-self._chunk:] if self._chunk else []
            del self._queue[len(self._queue) - len(batch):]
            await self._visit(batch)
        except Exception:  # a store error must not stop the keep-alives for good
            log.exception("NAT keep-alive round failed")
            self._queue = []
        if self._stopped:
            return
        if self._queue:
            delay = self.interval / slices
        else:
            delay = max(0.01, self._round_started + self.interval - clock.time())
        self._timer = clock.call_later(delay, self._tick)

    async def _start_round(self) -> list[str]:
        """Count the last round's unanswered pings, forget the counters of bindings no longer
        pinged, and return this round's AORs (popped from the end)."""
        for key in self._pending.values():
            self.missed[key] = self.missed.get(key, 0) + 1
        self._pending.clear()
        live, self._live = self._live, set()
        for key in [k for k in self.missed if k not in live]:
            del self.missed[key]
        aors = await self.store.aors()
        aors.reverse()
        return aors

    async def _visit(self, aors: list[str]) -> None:
        """Ping the flow bindings of ``aors``; remove those whose flow is dead."""
        now = self._now()
        for aor in aors:
            for binding in await self.store.lookup(aor, now):
                flow = binding_flow(binding)
                if flow is None:
                    continue
                key = (binding.aor, binding.key)
                if self.method == "OPTIONS" and self.missed.get(key, 0) >= self.max_failures:
                    await self._remove(binding, flow)
                    continue
                self._live.add(key)
                self._ping(binding, flow, key)

    async def _remove(self, binding: Binding, flow: Address) -> None:
        key = (binding.aor, binding.key)
        self.missed.pop(key, None)
        try:
            await self.store.update(binding.aor, remove=(binding.contact,))
        except Exception:
            log.exception("%s: cannot remove the binding of a dead flow", binding.aor)
            return
        self.removed += 1
        log.info("%s: removed binding %s: its flow %s left %d keep-alives unanswered",
                 binding.aor, binding.contact, flow, self.max_failures)

    def _ping(self, binding: Binding, flow: Address, key: tuple[str, str]) -> None:
        proxy = self._proxy
        if self.method == "CRLF":
            proxy.transport.send(b"\r\n\r\n", flow)
            self.sent += 1
            return
        local = proxy.local_for(flow)
        host = f"[{local.host}]" if ":" in local.host else local.host
        index, count = self._shard
        while True:
            # The answer finds the worker that pings by its Call-ID: take one that is ours.
            branch = f"{PING_BRANCH}{self._prefix}{next(self._counter):x}"
            if call_id_shard(f"{branch}@{host}", count) == index:
                break
        text = (f"OPTIONS {binding.contact} SIP/2.0\r\n"
                f"Via: SIP/2.0/{flow.transport} {host}:{local.port};branch={branch}\r\n"
                "Max-Forwards: 1\r\n"
                f"From: <sip:keepalive@{host}>;tag={branch[len(PING_BRANCH):]}\r\n"
                f"To: <{binding.contact}>\r\n"
                f"Call-ID: {branch}@{host}\r\n"
                "CSeq: 1 OPTIONS\r\n"
                "Content-Length: 0\r\n\r\n")
        self._pending[branch] = key
        proxy.transport.send(text.encode(), flow)
        self.sent += 1

    def on_response(self, response: Response) -> bool:
        """An answer with one of our ping branches: the flow is alive.  Returns True when the
        response was ours (the proxy then drops it)."""
        via = response.top_via
        branch = via.branch if via is not None else None
        if not branch or not branch.startswith(PING_BRANCH):
            return False
        key = self._pending.pop(branch, None)
        if key is not None:
            self.answered += 1
            self.missed.pop(key, None)
        return True

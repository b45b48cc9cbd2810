"""The shell of gateway-set probing: runs a probe state machine (the shape of
:class:`fastsip.app.gateways.Prober`, which is sans-IO; this layer does not import it) on the event
loop and sends its OPTIONS as client transactions of the proxy's transaction layer (so they
are retransmitted over UDP like any request, and their answers are matched by branch).

The state machine decides; this only passes it the loop's time, sends what it says is due,
hands each outcome back (the final status; 0 for a transaction timeout or a transport
error) and sleeps until :meth:`Prober.next_deadline`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fastsip.sip import Request, Response
from fastsip.transaction import ClientTransaction
from fastsip.transaction.layer import MAGIC_COOKIE
from fastsip.transport.rules import call_id_shard, next_hop

__all__ = ["GatewayProber"]

log = logging.getLogger("fastsip.asyncio.gateways")


class _Gateway(Protocol):
    @property
    def uri(self) -> Any: ...


class _Probe(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def gateway(self) -> _Gateway: ...


class ProbeMachine(Protocol):
    """What the shell needs of :class:`fastsip.app.gateways.Prober`."""

    @property
    def interval(self) -> float: ...
    def add(self, gateway_set: Any) -> None: ...
    def probes_due(self, now: float) -> Iterable[_Probe]: ...
    def probe_result(self, probe_id: int, status: int, now: float) -> None: ...
    def next_deadline(self) -> float | None: ...


class _Outcome:
    """Client handler of one probe: its final status goes back to the state machine."""

    __slots__ = ("owner", "probe_id")

    def __init__(self, owner: GatewayProber, probe_id: int) -> None:
        self.owner = owner
        self.probe_id = probe_id

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        if response.status_code >= 200:
            self.owner.result(self.probe_id, response.status_code)

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.owner.result(self.probe_id, 0)

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self.owner.result(self.probe_id, 0)


class GatewayProber:
    """Probes gateway sets with OPTIONS through ``proxy`` (attached to its transaction layer).

    ``sets``: called at every wake-up for the sets to probe (the Router's ``gateway_sets``
    values: a set a routes module uses is probed from its first use).  ``shard``: (this
    worker, workers) under ``serve --workers``, so the answers (routed by Call-ID) come back
    to the worker that probes."""

    def __init__(self, prober: ProbeMachine, proxy: Any,
                 sets: Callable[[], Iterable[Any]] | None = None, *,
                 loop: asyncio.AbstractEventLoop | None = None,
                 shard: tuple[int, int] = (0, 1)) -> None:
        self.prober = prober
        self.proxy = proxy
        self._sets = sets
        self._loop = loop or asyncio.get_running_loop()
        self._shard = shard
        self._handle: asyncio.TimerHandle | None = None
        self._prefix = os.urandom(4).hex()
        self._counter = itertools.count(1)
        self._stopped = False
        #: OPTIONS that could not be sent at all (no route, transaction cap): counted as
        #: failures too.
        self.send_errors = 0

    def start(self) -> None:
        self._stopped = False
        self._wake()

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def result(self, probe_id: int, status: int) -> None:
        self.prober.probe_result(probe_id, status, self._loop.time())

    def _wake(self) -> None:
        self._handle = None
        if self._stopped:
            return
        if self._sets is not None:
            for gs in self._sets():
                self.prober.add(gs)
        now = self._loop.time()
        for probe in self.prober.probes_due(now):
            self._send(probe)
        deadline = self.prober.next_deadline()
        if deadline is None:
            deadline = now + self.prober.interval
        self._handle = self._loop.call_at(max(deadline, now + 0.001), self._wake)

    def _send(self, probe: _Probe) -> None:
        proxy = self.proxy
        uri = probe.gateway.uri
        try:
            dest = next_hop(uri)
            local = proxy.local_for(dest)
            host = f"[{local.host}]" if ":" in local.host else local.host
            index, count = self._shard
            while True:
                tag = f"{self._prefix}{next(self._counter):x}"
                call_id = f"gwprobe-{tag}@{host}"
                if count <= 1 or call_id_shard(call_id, count) == index:
                    break
            via = f"SIP/2.0/{dest.transport} {host}:{local.port};branch={MAGIC_COOKIE}-gw{tag}"
            request = Request.create("OPTIONS", str(uri), [
                ("Via", via),
                ("Max-Forwards", "70"),
                ("From", f"<sip:gateway-probe@{host}>;tag={tag}"),
                ("To", f"<{uri}>"),
                ("Call-ID", call_id),
                ("CSeq", "1 OPTIONS"),
                ("Accept", "application/sdp"),
            ])
            proxy.layer.request(request, dest, _Outcome(self, probe.id))
        except ValueError as exc:
            self.send_errors += 1
            log.debug("cannot probe %s: %s", uri, exc)
            self.result(probe.id, 0)


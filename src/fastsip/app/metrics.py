"""Prometheus metrics of ``fastsip serve`` (``--metrics HOST:PORT``) and its log options.

Nothing here runs per message under a lock: what the server counts anyway stays where it is
counted (the outcome counts of :class:`~fastsip.app.serve.ServeRouter`, the guard's bans and
failed logins, the transport's drops, the refusals of the proxy, the transaction layer and
the router), the few counts only metrics need are plain ``int`` increments in dicts of
:class:`MessageCounts`, and :class:`ServeCollector` reads all of them when Prometheus scrapes
(``prometheus_client``'s ``Counter.inc()`` takes a lock per call: too dear per datagram).
Gauges -- transactions, calls, registered contacts, bans, event-loop lag -- are read at
scrape time too.  The HTTP endpoint is :mod:`fastsip.asyncio.scrape`, on the serving loop.

The metrics (their meaning is in ``docs/operations.md``)::

    fastsip_requests_total{method}           requests received (retransmissions included)
    fastsip_responses_total{code,class}      responses sent by us, local and relayed
    fastsip_outcomes_total{outcome}          initial requests by outcome (the log's word)
    fastsip_transactions_active{side}        server / client transactions
    fastsip_calls_active                     answered calls whose BYE has not passed yet
    fastsip_registered_contacts              live bindings in the location store
    fastsip_auth_failures_total              failed digest logins
    fastsip_bans_total, fastsip_banned_sources
    fastsip_dropped_total{reason}            malformed, rate_limited, overload
    fastsip_handler_duration_seconds         the routes module's request handler (histogram)
    fastsip_event_loop_lag_seconds           how late a periodic loop timer fired
    fastsip_log_lines_dropped_total          log lines the writer could not keep up with
    fastsip_transactions_ended_early_total   lingering transactions ended for a full table
    fastsip_worker_calls_total{placement}    new calls kept, passed or claimed (--workers)
    fastsip_worker_handoffs_total{direction} messages handed to / taken from other workers
    fastsip_worker_load                      this worker's CPU load as the others read it
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastsip.sip import Request

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily, Metric
    from prometheus_client.registry import CollectorRegistry

    from fastsip.app.routes import Routes

# prometheus_client is imported where it is used, when --metrics is given: importing it takes
# ~50 ms, which every other ``fastsip`` command (and serve without metrics) would pay.

__all__ = ["CALL_MAX_AGE", "HANDLER_BUCKETS", "HandlerTimer", "LoopLag", "MessageCounts",
           "ServeCollector", "StoreCount", "add_arguments", "is_loopback", "parse_metrics"]

log = logging.getLogger("fastsip.app.metrics")

#: Upper bounds (seconds) of the handler latency histogram: a plain handler takes microseconds,
#: one that awaits a database or an HTTP service milliseconds to seconds.
HANDLER_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Seconds between two samples of the event-loop lag.
LAG_INTERVAL = 0.5
#: An answered call whose BYE never passed us (a phone lost power, a BYE not record-routed)
#: stops counting as active after this long.
CALL_MAX_AGE = 12 * 3600.0
#: Seconds a count of the registered contacts is reused (it reads the whole store).
CONTACTS_TTL = 10.0


# -- command line ------------------------------------------------------------------------------


def parse_metrics(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) for ``--metrics``; ValueError says what is wrong."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9090")
    return host, int(port)


def _metrics_option(text: str) -> str:
    try:
        parse_metrics(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def is_loopback(host: str) -> bool:
    """Is ``host`` a loopback address (or ``localhost``)?  Anything else exposes the metrics
    to the network."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--metrics`` and ``--log-format``, in their own group of ``fastsip serve``'s options."""
    g = p.add_argument_group("observability", "Prometheus metrics and the log's format "
                                              "(see docs/operations.md).")
    g.add_argument("--metrics", type=_metrics_option, default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: off; "
                        "an address that is not loopback is warned about: the metrics tell "
                        "anyone who can reach them how busy the server is)")
    g.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="text: 'time LEVEL logger: message' lines (default); json: one JSON "
                        "object a line, the request line's fields as keys")


# -- counts only the metrics need ------------------------------------------------------------


class MessageCounts:
    """Requests received by method, responses sent by status code, and the answered calls
    still up: plain dicts of ints, bumped by the wrappers :meth:`receiving` and
    :meth:`sending` put around the transport's delivery and send (a dict look-up and an
    add per message; no lock: only the loop's thread writes, and reads them)."""

    __slots__ = ("calls", "requests", "responses")

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        #: Keyed by the status code's three bytes (b"200"): see :meth:`responses_by_code`.
        self.responses: dict[bytes, int] = {}
        #: Call-ID -> when its INVITE was answered, oldest first (a dict keeps insertion
        #: order: expiring is a walk from the front).
        self.calls: dict[str, float] = {}

    def receiving(self, deliver: Callable[[Any, Any], object]
                  ) -> Callable[[Any, Any], object]:
        """``deliver(msg, source)`` that counts each request first (and ends its call at a
        BYE)."""
        requests = self.requests
        get = requests.get
        calls = self.calls

        def counted(msg: Any, source: Any) -> object:
            if type(msg) is Request:
                method = msg.method
                requests[method] = get(method, 0) + 1
                if method == "BYE" and calls:
                    calls.pop(msg.call_id or "", None)
            return deliver(msg, source)
        return counted

    def sending(self, send: Callable[[bytes, Any], None]) -> Callable[[bytes, Any], None]:
        """``send(data, dest)`` that counts each response by its status code (read from the
        status line: ``SIP/2.0 200 OK``)."""
        responses = self.responses
        get = responses.get

        def counted(data: bytes, dest: Any) -> None:
            if data[:8] == b"SIP/2.0 ":
                # The code's three bytes are the key: int() of them waits for the scrape
                # (it costs more than the rest of this function).
                code = data[8:11]
                responses[code] = get(code, 0) + 1
            send(data, dest)
        return counted

    def responses_by_code(self) -> dict[int, int]:
        """Responses sent by status code (0: a status line without three digits)."""
        out: dict[int, int] = {}
        for code, n in list(self.responses.items()):
            number = int(code) if code.isdigit() else 0
            out[number] = out.get(number, 0) + n
        return out

    def answered(self, call_id: str, now: float) -> None:
        """An initial INVITE got its 2xx: the call is up until its BYE."""
        if call_id:
            self.calls[call_id] = now

    def active_calls(self, now: float) -> int:
        """Calls up, after forgetting those older than :data:`CALL_MAX_AGE`."""
        calls = self.calls
        cutoff = now - CALL_MAX_AGE
        old = []
        for call_id, since in calls.items():
            if since > cutoff:
                break
            old.append(call_id)
        for call_id in old:
            del calls[call_id]
        return len(calls)


class HandlerTimer:
    """A latency histogram of the routes module's request handler, in plain ints (bucket
    counts, a sum): :meth:`wrap_routes` times each call, an async handler until it ends."""

    def __init__(self, buckets: Iterable[float] = HANDLER_BUCKETS,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)    # the last: above every bound (+Inf)
        self.sum = 0.0
        self.clock = clock

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def wrap_routes(self, routes: Routes) -> Routes:
        """``routes`` with its request handler timed (before the Router is built: it looks
        at whether the handler is async once)."""
        fn = routes.request
        if fn is not None:
            routes.request = self.wrap(fn)
        return routes

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        from fastsip.app.router import Decision

        clock, observe = self.clock, self.observe
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def timed_async(*args: Any) -> Any:
                started = clock()
                try:
                    return await fn(*args)
                finally:
                    observe(clock() - started)
            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any) -> Any:
            started = clock()
            result = fn(*args)
            # (isawaitable's ABC check only for what is not a plain Decision: as the Router)
            if result is not None and result.__class__ is not Decision \
                    and inspect.isawaitable(result):
                async def until_done() -> Any:   # a plain def that returns a coroutine
                    try:
                        return await result
                    finally:
                        observe(clock() - started)
                return until_done()
            observe(clock() - started)
            return result
        return timed

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        from prometheus_client.core import HistogramMetricFamily

        cumulative = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return HistogramMetricFamily(name, documentation, buckets=cumulative,
                                     sum_value=self.sum)


class LoopLag:
    """How late the event loop runs a timer: one is armed every :data:`LAG_INTERVAL` seconds,
    and each time it fires, how much later than asked is the lag (the loop was busy: every
    datagram waiting behind it waited that long too).  ``last`` is the latest sample, ``max``
    the largest since the previous scrape."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = LAG_INTERVAL) -> None:
        self.loop = loop
        self.interval = interval
        self.last = 0.0
        self.max = 0.0
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._due = self.loop.time() + self.interval
        self._handle = self.loop.call_at(self._due, self._sample)

    def _sample(self) -> None:
        now = self.loop.time()
        lag = max(0.0, now - self._due)
        self.last = lag
        self.max = max(self.max, lag)
        self._due = now + self.interval
        self._handle = self.loop.call_at(self._due, self._sample)

    def take_max(self) -> float:
        """The largest lag since the previous call (then starts over)."""
        peak, self.max = max(self.max, self.last), 0.0
        return peak

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class StoreCount:
    """The live bindings in the location store: counted at every scrape in a store that
    answers from memory (``immediate_reads``), else at most every :data:`CONTACTS_TTL`
    seconds (an AOR list and a lookup per AOR: a shared store is not read per scrape)."""

    def __init__(self, store: Any, wallclock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.wallclock = wallclock
        self.monotonic = monotonic
        self.value: int | None = None
        self._when = float("-inf")

    async def refresh(self) -> None:
        if self.monotonic() - self._when < CONTACTS_TTL \
                and not getattr(self.store, "immediate_reads", False):
            return
        now = self.wallclock()
        try:
            total = 0
            for aor in await self.store.aors():
                total += len(await self.store.lookup(aor, now))
        except Exception:
            log.warning("metrics: cannot count the registered contacts", exc_info=True)
            return
        self.value = total
        self._when = self.monotonic()


# -- the collector ---------------------------------------------------------------------------


def _class(code: int) -> str:
    return f"{code // 100}xx" if 100 <= code < 700 else "other"


class ServeCollector:
    """Reads serve's counters when Prometheus scrapes (on the loop's thread: no counter is
    read while it changes).  ``sources`` are serve's objects: ``router`` (the ServeRouter: its
    ``inner`` is the Router of the moment, a new one after a reload), ``proxy``,
    ``transactions``, ``transport``, ``guard``;
    ``worker``: a label naming the worker process (``--workers N``), None for one process."""

    def __init__(self, counts: MessageCounts, *, router: Any, proxy: Any,
                 transactions: Any, transport: Any, guard: Any, timer: HandlerTimer,
                 lag: LoopLag, contacts: StoreCount, dropped_lines: Callable[[], int],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.counts = counts
        self.router = router
        self.proxy = proxy
        self.transactions = transactions
        self.transport = transport
        self.guard = guard
        self.timer = timer
        self.lag = lag
        self.contacts = contacts
        self.dropped_lines = dropped_lines
        self.monotonic = monotonic
        #: The worker's :class:`~fastsip.asyncio.workers.HandOff` (``--workers``), once made.
        self.handoff: Any = None

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = self.counts
        requests = CounterMetricFamily("fastsip_requests", "SIP requests received, by method "
                                       "(retransmissions included)", labels=["method"])
        for method, n in sorted(c.requests.items()):
            requests.add_metric([method], n)
        yield requests
        responses = CounterMetricFamily("fastsip_responses", "SIP responses sent by us, local "
                                        "and relayed, by status code", labels=["code", "class"])
        for code, n in sorted(c.responses_by_code().items()):
            responses.add_metric([str(code), _class(code)], n)
        yield responses
        outcomes = CounterMetricFamily("fastsip_outcomes", "initial requests by outcome, when "
                                       "their final response went upstream", labels=["outcome"])
        for outcome, n in sorted(self.router.outcomes.items()):
            outcomes.add_metric([outcome], n)
        yield outcomes
        txns = GaugeMetricFamily("fastsip_transactions_active", "transactions in progress",
                                 labels=["side"])
        txns.add_metric(["server"], self.transactions.server_transactions)
        txns.add_metric(["client"], self.transactions.client_transactions)
        yield txns
        yield GaugeMetricFamily("fastsip_calls_active", "answered calls whose BYE has not "
                                "passed through us yet",
                                value=c.active_calls(self.monotonic()))
        if self.contacts.value is not None:
            yield GaugeMetricFamily("fastsip_registered_contacts", "live bindings in the "
                                    "location store", value=self.contacts.value)
        guard = self.guard
        yield CounterMetricFamily("fastsip_auth_failures", "failed digest logins",
                                  value=guard.failed_logins)
        yield CounterMetricFamily("fastsip_bans", "sources banned (rate limit or failed "
                                  "logins)", value=guard.banned_total)
        yield GaugeMetricFamily("fastsip_banned_sources", "sources banned now",
                                value=len(guard.bans))
        stats = self.transport.stats
        dropped = CounterMetricFamily("fastsip_dropped", "messages not served, by reason",
                                      labels=["reason"])
        dropped.add_metric(["malformed"], getattr(stats, "malformed", 0))
        dropped.add_metric(["rate_limited"], stats.datagrams_denied + stats.messages_denied
                           + stats.connections_denied)
        dropped.add_metric(["overload"], self.proxy.refusals.count
                           + self.transactions.refusals.count
                           + self.router.inner.refusals.count)
        yield dropped
        yield from self._trunks_and_gateways()
        yield self.timer.family("fastsip_handler_duration_seconds",
                                "run time of the routes module's request handler")
        yield GaugeMetricFamily("fastsip_event_loop_lag_seconds", "how late the event loop "
                                "ran a timer, the largest since the previous scrape",
                                value=self.lag.take_max())
        yield CounterMetricFamily("fastsip_log_lines_dropped", "log lines dropped because "
                                  "the log writer could not keep up",
                                  value=self.dropped_lines())
        yield CounterMetricFamily("fastsip_transactions_ended_early", "lingering "
                                  "transactions ended early because their table was full",
                                  value=self.transactions.reclaimed)
        yield from self._worker()

    def _worker(self) -> Iterator[Metric]:
        """What a worker of ``--workers N`` did with its calls (nothing for one process)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        handoff = self.handoff
        if handoff is None:
            return
        moved = CounterMetricFamily("fastsip_worker_handoffs", "messages handed to the "
                                    "worker holding their call, taken from another worker, "
                                    "or lost on the way", labels=["direction"])
        moved.add_metric(["out"], handoff.handed + handoff.stream_handed)
        moved.add_metric(["in"], handoff.received + handoff.stream_received)
        moved.add_metric(["lost"], handoff.lost + handoff.stream_lost)
        yield moved
        placement = handoff.placement
        if placement is None:
            return
        calls = CounterMetricFamily("fastsip_worker_calls", "new calls this worker kept, "
                                    "passed to another (it was busy), or claimed (the one "
                                    "chosen could not take it)", labels=["placement"])
        calls.add_metric(["kept"], placement.kept)
        calls.add_metric(["passed"], placement.passed)
        calls.add_metric(["claimed"], handoff.claimed)
        yield calls
        yield GaugeMetricFamily("fastsip_worker_load", "this worker's CPU load (a fraction "
                                "of one core) as last published to the others",
                                value=placement.load)


    def _trunks_and_gateways(self) -> Iterator[Metric]:
        """The trunks' registrations and the gateway sets' health (the Router of the moment
        holds both; they outlive a reload)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from fastsip.proxy.trunk import STATES

        inner = self.router.inner
        trunks = getattr(inner, "trunks", None)
        if trunks is not None:
            state = GaugeMetricFamily("fastsip_trunk_registration", "outbound registration "
                                      "of each trunk: 1 for the state it is in",
                                      labels=["trunk", "state"])
            failures = GaugeMetricFamily("fastsip_trunk_registration_failures", "failed "
                                         "registration attempts in a row", labels=["trunk"])
            for name, entry in sorted(trunks.status().items()):
                if "state" not in entry:        # ;register=no: relayed through only
                    continue
                for st in STATES:
                    state.add_metric([name, st], 1 if entry["state"] == st else 0)
                failures.add_metric([name], entry["failures"])
            yield state
            yield failures
        sets = getattr(inner, "gateway_sets", None) or {}
        if sets:
            active = GaugeMetricFamily("fastsip_gateway_active", "1 while the gateway answers "
                                       "its OPTIONS probes (it is in its set)",
                                       labels=["set", "gateway"])
            unavailable = CounterMetricFamily("fastsip_gateway_set_unavailable", "calls "
                                              "answered 503: no gateway of the set active",
                                              labels=["set"])
            for name, gs in sorted(sets.items()):
                for g in gs.gateways:
                    active.add_metric([name, str(g.uri)], 1 if g.active else 0)
                unavailable.add_metric([name], gs.unavailable)
            yield active
            yield unavailable


def registry_of(collector: Any) -> CollectorRegistry:
    """A registry holding ``collector`` (an object with ``collect()``) alone: not the
    process-wide default, with prometheus_client's process and GC collectors, whose cost and
    names are not ours."""
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


def renderer(registry: CollectorRegistry, before: Callable[[], Awaitable[None]]
             ) -> Callable[[], Awaitable[bytes]]:
    """The scrape: refresh what must be awaited (the store's count), then the text format."""
    from prometheus_client import generate_latest

    async def render() -> bytes:
        await before()
        return bytes(generate_latest(registry))
    return render


# -- running it --------------------------------------------------------------------------------


class Exporter:
    """The running metrics of one serve process: the scrape server, the lag timer, and the
    wrappers on the transport (which stay: they count for the process's life)."""

    def __init__(self, server: asyncio.Server, lag: LoopLag | None, collector: Any) -> None:
        self.server = server
        self.lag = lag
        self.collector = collector

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.lag is not None:
            self.lag.stop()
        self.server.close()
        await self.server.wait_closed()


def _warn_exposed(host: str, spec: str) -> None:
    if not is_loopback(host):
        log.warning("--metrics %s is not a loopback address: anyone who can reach it reads "
                    "the server's traffic counts (restrict it with a firewall)", spec)


def worker_port_file(directory: str, index: int) -> Path:
    """Where worker ``index`` writes the port of its own metrics endpoint (``--workers``)."""
    return Path(directory) / f"metrics-{index}.port"


async def start_exporter(spec: str, timer: HandlerTimer, *, serve_router: Any, proxy: Any,
                         transactions: Any, transport: Any, guard: Any, store: Any,
                         loop: asyncio.AbstractEventLoop, worker: int | None = None,
                         worker_dir: str | None = None) -> Exporter:
    """Count what only the metrics need (wrappers on the transport's delivery and sends),
    start the lag timer and serve ``/metrics`` on ``spec`` (HOST:PORT).  A worker of
    ``--workers N`` serves on a loopback port of its own instead, written to its
    :func:`worker_port_file`, and the supervisor serves ``spec`` for all (:func:`aggregate`).
    OSError when the address cannot be bound."""
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

    from fastsip.app.logqueue import dropped_lines
    from fastsip.asyncio.scrape import start_scrape_server

    counts = MessageCounts()
    transport.on_message = counts.receiving(transport.on_message)
    # (an instance attribute: the transport's compiled stand-in, which the transaction layer
    # and the proxy call, is told and calls it: TransportLayer.__setattr__)
    transport.send = counts.sending(transport.send)
    serve_router.on_answered = counts.answered
    lag = LoopLag(loop)
    lag.start()
    contacts = StoreCount(store)
    collector = ServeCollector(counts, router=serve_router, proxy=proxy,
                               transactions=transactions, transport=transport, guard=guard,
                               timer=timer, lag=lag, contacts=contacts,
                               dropped_lines=dropped_lines, monotonic=serve_router.clock)
    render = renderer(registry_of(collector), contacts.refresh)
    if worker is not None and worker_dir is not None:
        server = await start_scrape_server("127.0.0.1", 0, render, CONTENT_TYPE)
        exporter = Exporter(server, lag, collector)
        path = worker_port_file(worker_dir, worker)
        path.with_suffix(".tmp").write_text(str(exporter.port))
        path.with_suffix(".tmp").replace(path)        # never read half-written
        return exporter
    host, port = parse_metrics(spec)
    _warn_exposed(host, spec)
    server = await start_scrape_server(host, port, render, CONTENT_TYPE)
    log.info("metrics at http://%s:%d/metrics", host if ":" not in host else f"[{host}]",
             server.sockets[0].getsockname()[1])
    return Exporter(server, lag, collector)


# -- --workers N: one endpoint for all -------------------------------------------------------

#: Seconds the supervisor waits for one worker's metrics.
WORKER_SCRAPE_TIMEOUT = 2.0


async def _fetch(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await reader.read()
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise OSError(f"worker metrics answered {head[:40]!r}")
    return body.decode()


class WorkersCollector:
    """The families of every worker's last scrape, each sample with a ``worker`` label."""

    def __init__(self) -> None:
        self.texts: dict[int, str] = {}

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        merged: dict[str, Metric] = {}
        for index, text in sorted(self.texts.items()):
            for family in text_string_to_metric_families(text):
                into = merged.get(family.name)
                if into is None:
                    into = merged[family.name] = Metric(family.name, family.documentation,
                                                        family.type)
                for sample in family.samples:
                    into.add_sample(sample.name, {**sample.labels, "worker": str(index)},
                                    sample.value)
        yield from merged.values()


async def aggregate(spec: str, count: int, directory: Callable[[], str]) -> asyncio.Server:
    """The supervisor of ``--workers N``: serve ``spec``'s ``/metrics`` with every worker's
    metrics, labelled ``worker="I"`` (each worker counts the messages it handled, so the sum
    over workers is the server's).  A worker that does not answer (starting, restarting) is
    left out of that scrape; its counters start over when it is started again."""
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
    from prometheus_client import generate_latest

    from fastsip.asyncio.scrape import start_scrape_server

    collector = WorkersCollector()
    registry = registry_of(collector)

    async def one(index: int) -> None:
        try:
            port = int(worker_port_file(directory(), index).read_text())
            collector.texts[index] = await asyncio.wait_for(_fetch(port),
                                                            WORKER_SCRAPE_TIMEOUT)
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            collector.texts.pop(index, None)
            log.debug("metrics of worker %d: %s", index, exc)

    async def render() -> bytes:
        await asyncio.gather(*(one(i) for i in range(count)))
        return bytes(generate_latest(registry))

    host, port = parse_metrics(spec)
    _warn_exposed(host, spec)
    server = await start_scrape_server(host, port, render, CONTENT_TYPE)
    log.info("metrics of %d workers at http://%s:%d/metrics", count,
             host if ":" not in host else f"[{host}]", server.sockets[0].getsockname()[1])
    return server

"""``fastsip serve``: the registrar and stateful proxy as a server process.

    fastsip serve --domain example.com [--listen udp:0.0.0.0:5060 ...] [--routes routes.py]
                  [--db memory:|sqlite:PATH] [--auth-users users.txt] [--log-level info]
                  [--trusted CIDR ...] [--rate-limit N] [--max-connections N] ...
                  [--listen tls:0.0.0.0:5061 --tls-cert chain.pem [--tls-key key.pem]]

It assembles the layers -- :class:`~fastsip.asyncio.Endpoint` (sockets, timers, transactions),
:class:`~fastsip.proxy.Proxy` (RFC 3261 §16), :class:`~fastsip.app.Router` running the user's
routes module or the default routing, :class:`~fastsip.proxy.Registrar` over a location store,
and optionally a :class:`~fastsip.proxy.auth.DigestAuthenticator` -- and runs them until SIGTERM
or Ctrl-C.  Then it drains: new initial requests get ``503`` with ``Retry-After`` while the
transactions in flight finish (``--grace`` seconds at most), and the store is closed, so a
SQLite store keeps every binding for the next start.

``--config fastsip.toml`` takes the options from a TOML file (the command line wins), and
SIGHUP reloads the routes module, the credentials, the trusted networks, the aliases and the
log level without touching requests in flight (:mod:`fastsip.app.config`, ``docs/config.md``).

Every initial request gets one log line on ``fastsip.app.serve`` at INFO when its final
response has gone upstream, as ``key=value`` fields a log shipper can split::

    request method=INVITE status=200 outcome=answered duration_ms=12.4 call_id=... \
        from=sip:alice@example.com to=sip:bob@example.com source=udp:127.0.0.1:5071

``outcome`` is one of ``registered``, ``answered``, ``accepted`` (2xx), ``redirected`` (3xx),
``challenged`` (401/407), ``cancelled`` (the caller's CANCEL ended it), ``unanswered`` (408/480:
nobody answered, ``--ring-timeout`` ran out), ``unavailable`` (503), ``rejected`` (any other
failure) and, at stop, ``abandoned`` (no final response yet).  The stop summary counts them,
and so does ``--metrics HOST:PORT`` (Prometheus, :mod:`fastsip.app.metrics`; the same dict).
Below INFO and without ``--metrics`` nothing is tracked per request, so a quiet server pays
nothing for it.  (The drain's 503 and the line are :class:`ServeRouter`'s, compiled in
:mod:`fastsip.app._serve_router`: it runs twice for every initial request.)  ``--log-format json`` writes every line as a JSON object instead, the request
line's fields as keys (``docs/operations.md``).  At INFO
the line costs the event loop a tuple put on a queue (~0.7 µs): a writer thread
(:mod:`fastsip.app.logqueue`) formats and writes, in batches while lines come fast.  Every
queued line is written before the process exits after SIGTERM; if stderr stalls, lines past
``--log-queue`` (100000) are dropped, counted in a WARNING and in the ``stopped`` line
(``log_lines_dropped=N``), and serving goes on.  ``benchmarks/bench_logging.py`` measures it.

Exit status: 0 after a clean stop; 1 when a listen address cannot be bound (in use, not an
address of this host: the command line is right, the system refused); 2 for bad options, a
bad ``--listen`` spec, or a routes, credentials or database file that cannot be used.  Every
error is one line naming the address, option or file, never a traceback.

Its defaults are meant for a public address (see ``docs/security.md``): no open relay (the
routing API's relay policy), local negative answers sent statelessly, per-source rate limits
with bans (``--rate-limit``, ``--ban-time``; ``--trusted`` networks are exempt), failed-login
bans, caps on transactions and TCP/TLS connections, and idle, slow-read and TLS handshake
timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastsip.app import logqueue
from fastsip.app._serve_router import ServeRouter
from fastsip.app.logqueue import DEFAULT_MAX_QUEUED, dropped_lines
from fastsip.asyncio.runner import LOOPS, ReloadSignals, StopSignals, loop_name
from fastsip.asyncio.workers import DEFAULT_SPREAD_ABOVE, MAX_WORKERS

if TYPE_CHECKING:
    import ssl

    from fastsip.app.config import ServeSettings

__all__ = ["add_parser", "run"]

log = logging.getLogger("fastsip.app.serve")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

DEFAULT_LISTEN = ("udp:127.0.0.1:5060", "tcp:127.0.0.1:5060")
#: How often expired bindings are removed from the store (they are ignored by lookups before
#: that; the purge only bounds the store's size).
PURGE_INTERVAL = 60.0


# -- the server --------------------------------------------------------------------------------


def _fail(message: str) -> None:
    """The one line saying why we cannot start, through logging like every other line (in
    order with them; a JSON object under ``--log-format json``).  Its text form stays
    ``fastsip serve: MESSAGE`` alone (scripts match it): the record is ``bare``."""
    log.error("fastsip serve: %s", message, extra={"bare": True})
    logqueue.flush()


def _default_realm(args: argparse.Namespace) -> str:
    if args.realm:
        return str(args.realm)
    if args.domain:
        return str(args.domain[0])
    from fastsip.asyncio import parse_listen

    return parse_listen(args.listen[0])[1].strip("[]")


async def run(args: argparse.Namespace, settings: ServeSettings | None = None) -> int:
    """Run the server until SIGTERM/SIGINT; returns the exit status.  ``settings``: the
    config file and command line, for reloads (default: the command line's ``args``)."""
    # Every line from here on in the format asked for (the supervisor's and workers' too).
    if getattr(args, "log_format", "text") == "json":
        logqueue.set_format("json")
    # The shell turns the stop signals into an event, from the start: a service manager's
    # SIGTERM while we start up is a clean stop too.
    # SIGHUP too: one during start-up must not kill us (its default action); it reloads as
    # soon as we serve.
    hook = _ReloadHook()
    with StopSignals() as stop, ReloadSignals(hook):
        return await _serve(args, stop, settings, hook)


class _ReloadHook:
    """What a reload signal does: nothing yet while serve starts (it is remembered and done
    once serving), then ``handler`` (the reload, or the supervisor's forwarding)."""

    def __init__(self) -> None:
        self.handler: Callable[[int], None] | None = None
        self.pending: int | None = None

    def __call__(self, signum: int) -> None:
        if self.handler is None:
            self.pending = signum
        else:
            self.handler(signum)

    def serve(self, handler: Callable[[int], None]) -> None:
        self.handler = handler
        if self.pending is not None:
            signum, self.pending = self.pending, None
            handler(signum)


async def _exit(status: int) -> int:
    return status


def _starter(parser: argparse.ArgumentParser
             ) -> Callable[[argparse.Namespace], Coroutine[Any, Any, int]]:
    """serve's ``func``: applies ``--config`` to the arguments before the CLI reads the ones
    it uses itself (``--loop``: it calls ``func`` first), then gives the coroutine to run."""

    def start(args: argparse.Namespace) -> Coroutine[Any, Any, int]:
        from fastsip.app.config import ConfigError, ServeSettings

        try:
            settings = ServeSettings.from_args(args, parser, getattr(args, "argv", None))
        except ConfigError as exc:
            _fail(str(exc))
            return _exit(EXIT_USAGE)
        if args.config:
            # The CLI set up logging from the command line before the file was read.
            logging.getLogger().setLevel(getattr(logging, args.log_level.upper()))
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logqueue.QueueLogHandler):
                    handler.max_queued = args.log_queue
        return run(args, settings)

    return start


async def _supervise(args: argparse.Namespace, stop: asyncio.Event, hook: _ReloadHook) -> int:
    """``--workers N``: start N serve processes on the same addresses and watch them
    (:mod:`fastsip.asyncio.workers` says how a call finds its worker)."""
    from fastsip.asyncio.workers import Supervisor, addresses_taken

    problem = addresses_taken(args.listen)
    if problem:
        _fail(problem)
        return EXIT_FAILED
    argv = list(getattr(args, "argv", None) or sys.argv[1:])

    def worker_argv(index: int, directory: str) -> list[str]:
        return [sys.executable, "-m", "fastsip.cli", *argv, "--worker-index", str(index),
                "--worker-dir", directory]

    log.info("starting %d workers (%s)", args.workers,
             f"calls kept by the worker receiving them below {args.spread_above:g} of a core"
             if args.spread_above > 0 else "calls shared by Call-ID")
    logqueue.flush()
    supervisor = Supervisor(worker_argv, args.workers, len(args.listen),
                            stop_timeout=args.grace + 10.0)

    def forward(signum: int) -> None:
        """SIGHUP: every worker reads the configuration again (each logs its own result)."""
        for w in supervisor.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(signum)

    hook.serve(forward)
    scrapes = None
    if getattr(args, "metrics", None):
        from fastsip.app.metrics import aggregate

        try:   # every worker's metrics, labelled worker="I", from this one endpoint
            scrapes = await aggregate(args.metrics, args.workers, lambda: supervisor.directory)
        except OSError as exc:
            _fail(f"--metrics {args.metrics}: cannot listen: {exc}")
            return EXIT_FAILED
    try:
        return await supervisor.run(stop)
    finally:
        if scrapes is not None:
            scrapes.close()


def _workers_problem(args: argparse.Namespace) -> str:
    """Why ``--workers N`` (N > 1) cannot run as asked ("" when it can)."""
    from fastsip.asyncio import parse_listen

    # TCP/TLS listeners too: a connection stays in the worker that accepted it, and the
    # workers hand each other its messages and the bytes to send on it (workers.HandOff).
    specs = [(spec, *parse_listen(spec.partition("/")[0])) for spec in args.listen]
    anywhere = [spec for spec, _, _, port in specs if port == 0]
    if anywhere:
        return (f"--workers {args.workers} needs a fixed port ({', '.join(anywhere)} asks for "
                "any free one, which each worker would pick for itself)")
    scheme = args.db.split(":", 1)[0].lower()
    if scheme not in ("redis", "rediss", "postgresql", "postgres"):
        return (f"--workers {args.workers} needs a location store every worker shares: --db "
                "redis://HOST:PORT/N or postgresql://HOST/DBNAME (memory: and sqlite: belong "
                "to one process)")
    return ""


async def _serve(args: argparse.Namespace, stop: asyncio.Event,
                 settings: ServeSettings | None = None, hook: _ReloadHook | None = None) -> int:
    from fastsip.app import Router, load_routes
    from fastsip.asyncio import Endpoint, ListenError, open_store
    from fastsip.asyncio.stores import redact
    from fastsip.errors import FastSIPError
    from fastsip.proxy import Registrar
    from fastsip.proxy.core import Proxy
    from fastsip.proxy.nat import NatKeeper
    from fastsip.transaction import TimerConfig

    hook = hook if hook is not None else _ReloadHook()
    listen = args.listen or list(DEFAULT_LISTEN)
    args.listen = listen
    problem = _check_operator_options(args)
    if problem:
        _fail(problem)
        return EXIT_USAGE
    if args.workers > 1:
        from fastsip.asyncio.workers import reuse_port_supported

        problem = _workers_problem(args)
        if problem:
            _fail(problem)
            return EXIT_USAGE
        if not reuse_port_supported():
            log.warning("--workers %d: this platform cannot share a UDP address between "
                        "processes (SO_REUSEPORT): running one", args.workers)
            args.workers = 1
        elif args.worker_index is None:
            return await _supervise(args, stop, hook)
    worker = args.worker_index if args.workers > 1 else None
    try:
        routes = load_routes(args.routes) if args.routes else None
    except Exception as exc:  # noqa: BLE001 - any error in the user's module: refuse to start
        _fail(_routes_error(args.routes, exc))
        return EXIT_USAGE
    metrics_spec: str = getattr(args, "metrics", None) or ""
    handler_timer = None
    if metrics_spec:
        from fastsip.app.metrics import HandlerTimer

        handler_timer = HandlerTimer()
    from fastsip.proxy.edge import SourceGuard, TrustedNetworks

    try:
        trusted = TrustedNetworks(args.trusted or ())
    except ValueError as exc:
        _fail(f"--trusted: {exc}")
        return EXIT_USAGE
    guard = SourceGuard(
        rate=args.rate_limit,
        burst=args.rate_burst if args.rate_burst is not None else max(1.0, 4 * args.rate_limit),
        ban_time=args.ban_time,
        source_failures=args.max_auth_failures,
        user_failures=max(1, args.max_auth_failures // 2),
        trusted=trusted,
    )
    authenticator = None

    def make_authenticator(credentials: Any) -> Any:
        from fastsip.asyncio.workers import NONCE_SECRET_ENV
        from fastsip.proxy.auth import DigestAuthenticator

        # MD5 first: many deployed clients (sipp 3.6, baresip 1.0) answer only the first
        # challenge and know only MD5; SHA-256 is offered too, for those that prefer it.
        algorithms = args.auth_algorithm or ["MD5", "SHA-256"]
        return DigestAuthenticator(
            _default_realm(args), credentials, algorithms=algorithms,
            # Workers share the supervisor's secret (a nonce from one is good at another).
            secret=os.environ.get(NONCE_SECRET_ENV) if worker is not None else None)

    if args.auth_users:
        from fastsip.proxy.auth import Credentials

        try:
            authenticator = make_authenticator(Credentials.from_file(args.auth_users))
        except (OSError, ValueError) as exc:
            _fail(f"--auth-users {args.auth_users}: {exc}")
            return EXIT_USAGE
    try:
        tls_server, tls_client = _tls_contexts(args, listen)
    except ValueError as exc:
        _fail(str(exc))
        return EXIT_USAGE
    try:
        store = open_store(args.db)
    except (OSError, ValueError) as exc:
        _fail(f"--db {redact(args.db)}: {exc}")
        return EXIT_USAGE
    try:
        await store.open()
    except Exception as exc:  # noqa: BLE001 - any driver's error: say it, and do not start
        _fail(f"--db {redact(args.db)}: cannot use the location store: {exc}")
        await store.close()
        return EXIT_FAILED

    loop = asyncio.get_running_loop()
    try:
        registrar = Registrar(store, domains=args.domain or (), **_registrar_limits(args),
                              flow_timer=int(args.nat_ping_interval) or None)
        try:
            trunks = _trunks(args)
        except ValueError as exc:
            _fail(str(exc))
            return EXIT_USAGE

        # What outlives a reload (SIGHUP makes a new Router): the trunks' registrations and
        # the gateway sets with their probe state, one of each for every Router.
        gateway_sets: dict[str, Any] = {}

        def make_router(routes: Any, authenticator: Any) -> Router:
            if handler_timer is not None and routes is not None:
                # --metrics: the handler timed (before the Router looks at it), after a
                # reload too
                routes = handler_timer.wrap_routes(routes)
            made = Router(routes, registrar=registrar, authenticator=authenticator,
                          spawn=loop.create_task, max_concurrency=args.max_concurrency,
                          guard=guard, monotonic=loop.time)
            made.trunks = trunks
            made.gateway_sets = gateway_sets
            return made

        router = make_router(routes, authenticator)
        serve_router = ServeRouter(router, track=handler_timer is not None)
        proxy = Proxy(serve_router, aliases=[*(args.domain or ()), *(args.alias or ())],
                      trusted=trusted, max_pending=args.max_transactions,
                      timer_c=args.ring_timeout,
                      # Without a TLS listener we cannot be on a sips path: 416 (RFC 3261
                      # §26.2.2: a sips request is never passed on over a hop without TLS).
                      schemes=("sip", "sips") if tls_server is not None else ("sip",))
        endpoint = Endpoint(
            proxy, listen=listen, advertise=args.advertise, timers=TimerConfig(t1=args.t1),
            tls_context=tls_server, tls_client_context=tls_client,
            # The transport asks the guard before it parses anything from a source: a banned
            # or flooding source costs a dictionary look-up per datagram, and no answer.
            admit=guard.admit,
            max_connections=args.max_connections,
            max_connections_per_source=args.max_connections_per_source,
            idle_timeout=args.tcp_idle_timeout, read_timeout=args.tcp_read_timeout,
            tls_handshake_timeout=args.tls_handshake_timeout, reuse_port=worker is not None)
        if worker is not None:
            # Connection ids name this worker from the first connection accepted.
            endpoint.transport.be_worker(worker)
            endpoint.transport.own_sockets = args.worker_ports == "own"
        try:
            await endpoint.start()
        except ListenError as exc:  # "cannot listen on udp:127.0.0.1:5060: Address in use"
            _fail(str(exc))
            return EXIT_FAILED
        except (OSError, ValueError, FastSIPError) as exc:
            _fail(f"cannot listen: {exc}")
            return EXIT_USAGE
        transactions = endpoint.transactions
        transactions.max_server_transactions = args.max_transactions
        transactions.max_client_transactions = args.max_transactions
        proxy.attach(transactions)
        if trunks is not None:
            trunks.attach(proxy)
        # RFC 3263: next hops named by a host name (NAPTR, SRV, A/AAAA, failover).
        from fastsip.asyncio import dns as next_hop_dns

        resolver = next_hop_dns.from_args(
            args, lambda: {(x.address.transport, x.family) for x in endpoint.listeners})
        proxy.resolver = endpoint.transport.dns = resolver
        exporter = None
        if handler_timer is not None:
            from fastsip.app.metrics import start_exporter

            try:
                exporter = await start_exporter(
                    metrics_spec, handler_timer, serve_router=serve_router,
                    proxy=proxy, transactions=transactions, transport=endpoint.transport,
                    guard=guard, store=store, loop=loop, worker=worker,
                    worker_dir=args.worker_dir)
            except OSError as exc:
                _fail(f"--metrics {metrics_spec}: cannot listen: {exc}")
                await endpoint.close()
                return EXIT_FAILED
        ng_clients = []
        anchor = None
        if args.media:
            from fastsip.app.anchor import MediaAnchor
            from fastsip.asyncio.ngclient import NgClient

            for spec in args.media:
                ng_clients.append(NgClient(*_media_address(spec)))
                await ng_clients[-1].open()
            anchor = MediaAnchor(ng_clients, loop.create_task)
            proxy.media = anchor
            log.info("media anchored in the relay%s at %s", "s" if len(ng_clients) > 1 else "",
                     ", ".join(args.media))
        handoff = None
        if worker is not None:
            from fastsip.asyncio.workers import HandOff, map_call_table

            handoff = HandOff(endpoint.transport, worker, args.workers, args.worker_dir,
                              map_call_table(worker, args.workers, args.spread_above))
            handoff.start()
            if exporter is not None:
                exporter.collector.handoff = handoff
            log.info("worker %d of %d (pid %d)", worker, args.workers, os.getpid())
        keeper = NatKeeper(store, time.time, interval=args.nat_ping_interval,
                           max_failures=args.nat_ping_failures, method=args.nat_ping_method,
                           spawn=loop.create_task,
                           shard=(worker, args.workers) if worker is not None else (0, 1))
        # Every worker reads the same shared store: one of them pings the flows.
        if args.nat_ping_interval > 0 and not worker:
            keeper.attach(proxy)
        from fastsip.app.gateways import start_gateway_sets

        try:
            gateway_prober = start_gateway_sets(
                args, router, proxy, (worker, args.workers) if worker is not None else (0, 1))
        except ValueError as exc:
            _fail(str(exc))
            await endpoint.close()
            return EXIT_USAGE
        # Live transactions linger 32 s (Timers J/L/M), so the young generation fills with
        # objects that are not garbage; CPython's default thresholds then run collections that
        # scan them on most calls.  The proxy holds no reference cycles per call, so collecting
        # rarely is safe; what was built at startup is frozen out of every collection.
        gc.freeze()
        gc.set_threshold(10_000, 50, 100)

        async def purge() -> None:
            try:
                n = await store.purge(time.time())
            except Exception:  # a store error must not stop the server
                log.exception("purging expired bindings failed")
            else:
                if n:
                    log.info("purged %d expired binding(s)", n)

        def sweep() -> None:
            guard.sweep(loop.time())
            purging.add(task := loop.create_task(purge()))
            task.add_done_callback(purging.discard)
            purger[0] = loop.call_later(PURGE_INTERVAL, sweep)

        purging: set[asyncio.Task[None]] = set()
        purger = [loop.call_later(PURGE_INTERVAL, sweep)]
        _mirror_bans_in_kernel(guard, endpoint.transport, loop)
        # Which loop runs us matters to throughput (uvloop is a dependency wherever it
        # builds; --loop asyncio, or a platform without it, gets plain asyncio).
        log.info("event loop %s (%s)", loop_name(loop), type(loop).__name__)
        log.info("serving domains=%s db=%s routes=%s auth=%s",
                 ",".join(args.domain or []) or "-", redact(args.db), args.routes or "default",
                 f"realm:{authenticator.realm}" if authenticator is not None else "off")
        log.info("edge trusted=%s rate_limit=%s ban_time=%gs max_auth_failures=%d "
                 "max_transactions=%d max_connections=%d/%d per source",
                 ",".join(str(n) for n in trusted.networks) or "-",
                 f"{args.rate_limit:g}/s,burst={guard.burst:g}" if args.rate_limit else "off",
                 args.ban_time, args.max_auth_failures, args.max_transactions,
                 args.max_connections, args.max_connections_per_source)
        log.info("timers ring_timeout=%gs expires=%d..%ds (default %ds)", args.ring_timeout,
                 args.min_expires, args.max_expires, args.default_expires)
        log.info("nat keep_alive=%s", f"{args.nat_ping_method}/{args.nat_ping_interval:g}s,"
                 f"failures={args.nat_ping_failures}" if args.nat_ping_interval > 0 else "off")
        reload = _reloader(args, settings, proxy=proxy, router=router, guard=guard,
                           layer=transactions, make_router=make_router,
                           make_authenticator=make_authenticator, use_router=serve_router.use)
        logqueue.flush()  # the start-up lines are out before we say we are up
        for listener in endpoint.listeners:
            print(f"listening on {listener.address}", flush=True)
        try:
            hook.serve(reload)
            await stop.wait()
            # Drain: refuse new initial requests, let the ones in flight (and the dialogs'
            # BYEs and ACKs) finish, for --grace seconds at most.
            serve_router.draining = True
            log.info("stopping: draining %d transaction(s) for up to %.1f s",
                     proxy.pending, args.grace)
            deadline = loop.time() + args.grace
            while proxy.pending and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if proxy.pending:
                log.warning("stopping with %d transaction(s) unfinished", proxy.pending)
        finally:
            purger[0].cancel()
            keeper.stop()
            gateway_prober.stop()
            if trunks is not None:
                trunks.stop()
            if exporter is not None:
                await exporter.close()
            serve_router.flush()
            if handoff is not None:
                handoff.close()
            await endpoint.close()
            await resolver.close()
            if anchor is not None and anchor.in_flight:
                # The last BYEs' deletes (and any offer in flight) finish, or give up (the
                # ng client's retries end within ~3 s; the relay's timeout frees the rest).
                await asyncio.wait(anchor.in_flight, timeout=3.5)  # type: ignore[type-var]
            for ng_client in ng_clients:
                ng_client.close()
        summary = " ".join(f"{k}={v}" for k, v in sorted(serve_router.outcomes.items()))
        if dropped_lines():  # (the writer's own WARNING at exit has the final count)
            summary += f" log_lines_dropped={dropped_lines()}"
        log.info("stopped %s", summary.strip() or "(no requests)")
        stats = endpoint.transport.stats
        log.info("edge banned=%d dropped=%d failed_logins=%d overload_503=%d "
                 "lingering_ended_early=%d connections_refused=%d closed_idle=%d "
                 "closed_slow=%d",
                 guard.banned_total, guard.dropped,
                 guard.failed_logins,
                 proxy.refusals.count + transactions.refusals.count + router.refusals.count,
                 transactions.reclaimed,
                 stats.connections_refused + stats.connections_refused_per_source
                 + stats.connections_denied, stats.closed_idle, stats.closed_read_timeout)
        if anchor is not None:
            log.info("media %s", " ".join(f"{k}={v}" for k, v in anchor.counts.items()))
        if keeper.sent:
            log.info("nat keep_alives=%d answered=%d flows_removed=%d",
                     keeper.sent, keeper.answered, keeper.removed)
        if handoff is not None:
            log.info("worker %d %s", worker, handoff.summary())
        return EXIT_OK
    finally:
        # The writes in flight commit before the file closes: a REGISTER answered 200 stays.
        await store.close()


def _reloader(args: argparse.Namespace, settings: ServeSettings | None,
              **live: Any) -> Callable[[int], None]:
    """SIGHUP reads the config file (and the routes and credentials files) again and swaps in
    what changed (:class:`fastsip.app.config.LiveReload`).  The files are read off the loop;
    a reload that fails changes nothing and says why in one line; signals that arrive during
    a reload run one more reload after it."""
    from fastsip.app.config import ConfigError, LiveReload, ServeSettings

    if settings is None:  # run() without a command line: no file, the same paths again
        parser = add_parser(argparse.ArgumentParser().add_subparsers())
        settings = ServeSettings(parser, None, (), args)
    reload = LiveReload(settings, routes_error=_routes_error, **live)
    loop = asyncio.get_running_loop()
    state = {"running": False, "again": False}
    tasks: set[asyncio.Task[None]] = set()

    async def reload_once() -> None:
        state["running"] = True
        try:
            while True:
                state["again"] = False
                try:
                    prepared = await loop.run_in_executor(None, reload.prepare)
                except ConfigError as exc:
                    reload.failed += 1
                    log.error("reload failed, keeping the running configuration: %s", exc)
                else:
                    reload.apply(prepared)
                if not state["again"]:
                    break
        except Exception:  # a bug here must not stop the server: say it, keep serving
            log.exception("reload failed, keeping the running configuration")
        finally:
            state["running"] = False

    def on_signal(signum: int) -> None:
        if state["running"]:
            state["again"] = True
            return
        tasks.add(task := loop.create_task(reload_once()))
        task.add_done_callback(tasks.discard)

    return on_signal


def _trunks(args: argparse.Namespace) -> Any:
    """``--trunk``/``--trunk-credentials`` (fastsip.app.trunks); None without trunks."""
    from fastsip.app.trunks import trunks_from_args

    return trunks_from_args(args)


def _tls_contexts(args: argparse.Namespace, listen: list[str]
                  ) -> tuple[ssl.SSLContext | None, ssl.SSLContext]:
    """The server context for ``tls:`` listeners (None without one) and the client context
    for the TLS connections we open.  Raises ValueError with the message for the operator:
    the option, the file and what is wrong with it."""
    from fastsip.asyncio import parse_listen
    from fastsip.asyncio.tls import TLSConfigError, client_context, server_context

    listening = False
    for spec in listen:
        try:
            transport = parse_listen(spec)[0]
        except ValueError:
            continue                          # the endpoint reports a bad spec when it binds
        listening = listening or transport == "TLS"
        if transport == "TLS" and not args.tls_cert:
            raise ValueError(f"--listen {spec}: needs --tls-cert (our certificate chain; and "
                             "--tls-key unless the key is in that file)")
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert (the certificate for that key)")
    if args.tls_verify_client and not args.tls_ca:
        raise ValueError("--tls-verify-client needs --tls-ca (the CA bundle that client "
                         "certificates must chain to)")
    option = {"cert": "--tls-cert", "key": "--tls-key", "ca": "--tls-ca"}
    try:
        # (Without a tls: listener the files are still checked: the chain is our client
        # certificate below.)
        server = (server_context(args.tls_cert, args.tls_key, args.tls_ca,
                                 verify_client=args.tls_verify_client)
                  if args.tls_cert else None)
        # Our chain goes to servers that ask for a client certificate (mutual TLS between
        # proxies); verification of theirs: --tls-ca, else the system's trust store.
        client = client_context(args.tls_ca, verify=not args.tls_no_verify_server,
                                cert=args.tls_cert, key=args.tls_key)
    except TLSConfigError as exc:
        raise ValueError(f"{option[exc.role]} {exc}") from None
    if not listening:
        server = None
    if server is not None:
        log.info("tls cert=%s key=%s clients=%s", args.tls_cert, args.tls_key or "(in cert)",
                 f"verified:{args.tls_ca}" if args.tls_verify_client else "not verified")
    if args.tls_no_verify_server:
        log.warning("--tls-no-verify-server: TLS connections we open do not verify the next "
                    "hop's certificate; anyone on the path can read and change the signalling "
                    "(for labs only)")
    elif server is not None or args.tls_ca:
        log.info("tls next hops verified against %s", args.tls_ca or "the system trust store")
    return server, client


def _mirror_bans_in_kernel(guard: Any, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Keep the kernel's filter of banned sources (``TransportLayer.drop_sources``) equal to
    the guard's bans: rebuilt at once when a ban starts or ends (a flood arrives at 10^5
    datagrams/s: every millisecond without the filter queues hundreds more of them ahead of
    legitimate traffic), and each ban expired on time (a source the kernel drops never reaches
    ``admit``, which would expire it lazily)."""
    expiry: list[asyncio.TimerHandle | None] = [None]

    def sync() -> None:
        transport.drop_sources(list(guard.bans))
        if expiry[0] is not None:
            expiry[0].cancel()
            expiry[0] = None
        if guard.bans:
            # (a ban ends at its time; expire_bans calls back here through on_bans_changed)
            expiry[0] = loop.call_at(min(guard.bans.values()), expire)

    def expire() -> None:
        expiry[0] = None
        if not guard.expire_bans(loop.time()) and guard.bans:
            expiry[0] = loop.call_at(min(guard.bans.values()) + 0.001, expire)

    guard.on_bans_changed = sync


# -- operator options: ring timeout, registration intervals, start-up checks -----------------


def _check_operator_options(args: argparse.Namespace) -> str:
    """What is wrong with the command line that argparse cannot see ("" when nothing): a
    malformed --listen spec (named), and registration intervals out of order."""
    from fastsip.asyncio import parse_listen

    for spec in args.listen:
        try:
            parse_listen(spec)
        except ValueError as exc:
            return f"--listen: {exc}"
    for spec in args.media or ():
        try:
            _media_address(spec)
        except ValueError as exc:
            return f"--media: {exc}"
    if not args.min_expires <= args.default_expires <= args.max_expires:
        return (f"registration intervals out of order: --min-expires {args.min_expires}, "
                f"--default-expires {args.default_expires}, --max-expires {args.max_expires} "
                "(need min <= default <= max)")
    return ""


def _media_address(spec: str) -> tuple[str, int]:
    """``ng:HOST:PORT`` (``ng:[V6]:PORT``) → (host, port); ValueError says what is wrong."""
    from fastsip.transport.rules import parse_hostport

    scheme, sep, rest = spec.partition(":")
    if not sep or scheme.lower() != "ng":
        raise ValueError(f"{spec!r}: expected ng:HOST:PORT (rtpengine's ng control protocol)")
    return parse_hostport(rest)


def _registrar_limits(args: argparse.Namespace) -> dict[str, int]:
    """§10.3 step 6: the intervals a REGISTER may ask for (423 below the minimum, shortened
    above the maximum, the default where it asks for none)."""
    return {"min_expires": args.min_expires, "max_expires": args.max_expires,
            "default_expires": args.default_expires}


def _routes_error(path: str, exc: BaseException) -> str:
    """One line for a routes module that cannot be loaded: the file, the error, and the line
    of the file it came from when the traceback has one (a NameError at import time)."""
    if isinstance(exc, FileNotFoundError):
        return f"cannot load routes from {path}: no such file"
    if isinstance(exc, ImportError) and not isinstance(exc, ModuleNotFoundError) \
            and str(exc).startswith("cannot load routes"):
        return f"cannot load routes from {path}: not a Python module (a .py file)"
    if isinstance(exc, SyntaxError):  # its message names the file and line already
        return f"cannot load routes from {path}: SyntaxError: {exc}"
    where = ""
    module = Path(path).resolve()
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == module:
            where = f" (line {frame.lineno})"
            break
    return f"cannot load routes from {path}: {type(exc).__name__}: {exc}{where}"


class _RawEpilogFormatter(argparse.HelpFormatter):
    """Wraps the description as usual but keeps the epilog's lines (an example command must
    stay on one line to be copied)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text is SERVE_EPILOG:  # as RawDescriptionHelpFormatter does, for this text only
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


SERVE_EPILOG = """\
example:
  fastsip serve --domain example.com --listen udp:0.0.0.0:5060 --listen tcp:0.0.0.0:5060

exit status: 0 after a clean stop; 1 when a listen address cannot be bound (in use, not an
address of this host); 2 for bad options or a routes, credentials or database file that
cannot be used.  Errors are one line naming the address, option or file."""


def _add_operator_options(p: argparse.ArgumentParser) -> None:
    """The ring timeout (Timer C) and the registration intervals, in their own group."""
    g = p.add_argument_group(
        "ringing and registrations",
        "How long a call may ring, and the registration intervals the registrar grants.")
    g.add_argument("--ring-timeout", type=_positive_float, default=180.0, metavar="S",
                   help="seconds a forwarded INVITE may ring without an answer (Timer C, RFC "
                        "3261 §16.8; each provisional response restarts it): then the branch "
                        "is CANCELled and the caller gets 408 (default 180; as a ring "
                        "timeout 30-120 is usual)")
    g.add_argument("--min-expires", type=_positive_int, default=60, metavar="S",
                   help="shortest registration granted: a REGISTER asking less (but not 0) "
                        "gets 423 Interval Too Brief with Min-Expires (default 60)")
    g.add_argument("--max-expires", type=_positive_int, default=3600, metavar="S",
                   help="longest registration granted: a longer one is shortened in the 200 "
                        "(default 3600)")
    g.add_argument("--default-expires", type=_positive_int, default=3600, metavar="S",
                   help="registration interval for a Contact with no expires parameter and no "
                        "Expires header (default 3600)")


# -- command line -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0: {text}")
    return value


def _load_fraction(text: str) -> float:
    """A CPU load as a fraction of one core, 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:                  # (NaN too)
        raise argparse.ArgumentTypeError(f"{text}: a load from 0 to 1 (of one core)")
    return value


def _workers(text: str) -> int:
    if text == "auto":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        return max(1, min(cores, MAX_WORKERS))
    count = _positive_int(text)
    if count > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text}: at most {MAX_WORKERS} workers")
    return count


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text}")
    return value


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``fastsip`` command's subparsers."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="run the registrar and proxy (routing in Python) until stopped",
        description="A SIP registrar and stateful proxy.  REGISTERs for --domain are stored "
                    "in the location store; requests for our users go to their registered "
                    "contacts (404 when none); a --routes module decides otherwise.  "
                    "SIGTERM or Ctrl-C drains and stops.  Every initial request is logged "
                    "with its outcome at --log-level info.",
        epilog=SERVE_EPILOG, formatter_class=_RawEpilogFormatter)
    p.add_argument("--listen", action="append", metavar="PROTO:HOST:PORT",
                   help="where to listen, e.g. udp:0.0.0.0:5060 or tcp:[::]:5060; repeat for "
                        "more (default: udp and tcp on 127.0.0.1:5060).  Behind 1:1 NAT, add "
                        "the public address to advertise: udp:10.0.0.5:5060/203.0.113.5")
    p.add_argument("--routes", metavar="FILE.py",
                   help="a routes module (@route, @on_failure ...; see examples/); default: "
                        "registrar + location lookup for our domains")
    p.add_argument("--db", default="memory:", metavar="URL",
                   help="location store (default memory:; sqlite:PATH survives restarts; "
                        "redis://HOST:PORT/N and postgresql://HOST/DBNAME are shared by nodes)")
    p.add_argument("--auth-users", metavar="FILE",
                   help="digest credentials, one 'user:password' a line: REGISTERs and our "
                        "users' requests are challenged (401/407)")
    p.add_argument("--domain", action="append", metavar="NAME",
                   help="a domain we are registrar and proxy for (repeatable; default: the "
                        "addresses we listen on)")
    p.add_argument("--realm", help="digest realm (default: the first --domain)")
    p.add_argument("--auth-algorithm", action="append", choices=["SHA-256", "MD5"],
                   metavar="SHA-256|MD5",
                   help="digest algorithms to offer, in order (repeatable; default MD5 then "
                        "SHA-256: clients that take only the first challenge and know only MD5, "
                        "such as sipp 3.6 and baresip 1.0, must get MD5 first)")
    p.add_argument("--advertise", metavar="HOST[:PORT]",
                   help="address for our Via and Record-Route instead of the bound one")
    p.add_argument("--max-concurrency", type=_positive_int, default=1000, metavar="N",
                   help="async route handlers running at once; beyond it 503 (default 1000)")
    p.add_argument("--grace", type=_non_negative, default=5.0, metavar="S",
                   help="on stop, seconds to let transactions in flight finish (default 5)")
    p.add_argument("--workers", type=_workers, default=1, metavar="N|auto",
                   help="worker processes sharing the listeners (Linux SO_REUSEPORT); each "
                        "call is handled by one, however the load arrives (see "
                        "--spread-above; a TCP/TLS connection stays in the worker that "
                        "accepted it); "
                        "auto: one per CPU (default 1).  Needs a shared --db (redis:// "
                        "or postgresql://)")
    p.add_argument("--worker-ports", choices=("own", "shared"), default="own",
                   help="with --workers: where the requests a worker forwards leave from.  "
                        "own (default): a UDP port of that worker's (ephemeral, on the "
                        "listener's host; named in the Via), so their responses reach it "
                        "straight instead of through a hand-off from whichever worker the "
                        "kernel picks.  shared: the listener's port, as one process would, "
                        "for peers that accept no other source port (their responses then "
                        "cross between workers half the time).  Listeners with an advertised "
                        "address (NAT) always use the shared port")
    p.add_argument("--spread-above", type=_load_fraction, default=DEFAULT_SPREAD_ABOVE,
                   metavar="LOAD",
                   help="with --workers: a worker keeps the new calls it receives while its "
                        "CPU load is below LOAD (a fraction of one core), and past it passes "
                        "them to the busiest worker still under LOAD, else the least busy: "
                        "a light load stays in one warm process, a heavy one (from a single "
                        "peer too) spreads over every core.  0: every call goes to the "
                        "worker its Call-ID hashes to, at any load (default "
                        f"{DEFAULT_SPREAD_ABOVE:g})")
    # Set by the supervisor for the workers it starts (not for operators).
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    nat = p.add_argument_group(
        "NAT traversal",
        "Phones behind NAT are reached over the flow they registered from (and those of RFC "
        "5626 outbound and TCP/TLS clients); their Contacts in dialogs get an alias naming "
        "it.  Flow bindings are pinged to keep NAT pinholes and connections open.")
    nat.add_argument("--nat-ping-interval", type=_non_negative, default=30.0, metavar="S",
                     help="seconds between keep-alives to each flow binding (default 30; 0: "
                          "none); also the Flow-Timer told to outbound clients")
    nat.add_argument("--nat-ping-failures", type=_positive_int, default=3, metavar="N",
                     help="remove a binding whose flow leaves N OPTIONS keep-alives in a row "
                          "unanswered (default 3)")
    nat.add_argument("--nat-ping-method", choices=["options", "crlf"], default="options",
                     help="OPTIONS (answered: dead flows are noticed) or a CRLF keep-alive "
                          "(RFC 5626; nothing comes back) (default options)")
    p.add_argument("--media", action="append", metavar="ng:HOST:PORT",
                   help="anchor every call's media in a relay driven over rtpengine's ng "
                        "protocol ('fastsip media', or rtpengine): SDP in INVITE/UPDATE and "
                        "their answers is rewritten by it, BYE and failures free it; a routes "
                        "handler may set req.media = False for a call.  Repeat for a relay "
                        "set: a call goes to the relay its Call-ID hashes to, and to the next "
                        "if that one fails (default: media goes end to end)")
    edge = p.add_argument_group(
        "safety at the edge",
        "Defaults suit a public address; see docs/security.md for the policy.")
    edge.add_argument("--trusted", action="append", metavar="CIDR",
                      help="a trusted source network (gateway, SBC, peer proxy), e.g. "
                           "192.0.2.0/24 (repeatable): it may relay without authentication "
                           "and is exempt from rate limits and bans")
    edge.add_argument("--alias", action="append", metavar="HOST",
                      help="another name or address meaning this server (a public address "
                           "behind 1:1 NAT, a DNS name); repeatable")
    edge.add_argument("--rate-limit", type=_non_negative, default=100.0, metavar="N",
                      help="messages per second one untrusted source may send; over it the "
                           "source is banned (default 100; 0 turns it off)")
    edge.add_argument("--rate-burst", type=_non_negative, default=None, metavar="N",
                      help="messages a source may send at once (default 4 x --rate-limit)")
    edge.add_argument("--ban-time", type=_non_negative, default=300.0, metavar="S",
                      help="seconds a banned source's packets are dropped (default 300)")
    edge.add_argument("--max-auth-failures", type=_positive_int, default=10, metavar="N",
                      help="failed logins that get a source banned; a user who fails half as "
                           "often from one source gets 403 from there (default 10)")
    edge.add_argument("--max-transactions", type=_positive_int, default=50_000, metavar="N",
                      help="server (and client) transactions at once; beyond it a stateless "
                           "503 with Retry-After (default 50000)")
    edge.add_argument("--max-connections", type=_positive_int, default=2048, metavar="N",
                      help="TCP/TLS connections in all; beyond it new ones are refused "
                           "(default 2048)")
    edge.add_argument("--max-connections-per-source", type=_positive_int, default=64,
                      metavar="N", help="TCP/TLS connections from one address (default 64)")
    edge.add_argument("--tcp-idle-timeout", type=_non_negative, default=120.0, metavar="S",
                      help="close a TCP/TLS connection idle this long (default 120)")
    edge.add_argument("--tcp-read-timeout", type=_non_negative, default=10.0, metavar="S",
                      help="close a connection that holds an unfinished message this long "
                           "(slowloris; default 10)")
    edge.add_argument("--tls-handshake-timeout", type=_non_negative, default=10.0, metavar="S",
                      help="close a TLS connection whose handshake takes longer (default 10)")
    tls = p.add_argument_group(
        "TLS",
        "SIP over TLS (RFC 3261 §26.2): --listen tls:HOST:PORT needs --tls-cert.  A sips: "
        "request only ever leaves over TLS for a sips: target (else 480; 416 with no tls: "
        "listener).  See docs/security.md.")
    tls.add_argument("--tls-cert", metavar="FILE",
                     help="our certificate chain, PEM, leaf first (the private key may follow "
                          "in the same file)")
    tls.add_argument("--tls-key", metavar="FILE",
                     help="our private key, PEM, unencrypted (default: in the --tls-cert file)")
    tls.add_argument("--tls-ca", metavar="FILE",
                     help="CA bundle, PEM: verifies client certificates (--tls-verify-client) "
                          "and the servers we connect to over TLS (default for those: the "
                          "system trust store)")
    tls.add_argument("--tls-verify-client", action="store_true",
                     help="require a client certificate that chains to --tls-ca on tls: "
                          "listeners (the handshake fails without one)")
    tls.add_argument("--tls-no-verify-server", action="store_true",
                     help="do not verify the next hop's certificate on TLS connections we "
                          "open: INSECURE, for labs with self-signed certificates")
    _add_operator_options(p)
    from fastsip.app.gateways import add_gateway_options
    from fastsip.app.trunks import add_trunk_options

    add_gateway_options(p)
    add_trunk_options(p)
    p.add_argument("--t1", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log detail on stderr (default info: one line per initial request)")
    p.add_argument("--log-queue", type=_positive_int, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help="log lines waiting for the writer thread at most; more are dropped and "
                        "counted (a stalled stderr must not stall serving; default 100000)")
    p.add_argument("--loop", choices=LOOPS, default="auto",
                   help="event loop: uvloop when installed (auto), or plain asyncio")
    from fastsip.app.config import add_option
    from fastsip.app.metrics import add_arguments as add_observability_options
    from fastsip.asyncio.dns import add_options as add_dns_options

    add_dns_options(p)
    add_observability_options(p)
    add_option(p)
    p.set_defaults(func=_starter(p))
    return p

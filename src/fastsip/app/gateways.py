"""Gateway sets (Kamailio's ``dispatcher`` is the behavioural model): named groups of gateways
that calls are shared across by priority and weight, with OPTIONS health probing.  Sans-IO:
nothing here sends, sleeps or reads a clock.

- :class:`GatewaySet` holds :class:`Gateway` objects and orders the *active* ones for a call
  (:meth:`GatewaySet.select`): the highest ``priority`` first (dispatcher's ordering by its
  priority column, algorithm 8), and within one priority weighted by ``weight`` using a hash
  of the Call-ID (weighted rendezvous hashing).  The whole order is the failover order.
- :class:`Prober` is the probe state machine: :meth:`Prober.probes_due` says which gateways
  to send an OPTIONS to now (and counts the probes that went unanswered past the timeout as
  failures), :meth:`Prober.probe_result` takes an answer; a gateway that fails ``threshold``
  probes in a row becomes ``inactive`` (a WARNING), one that is inactive comes back after
  ``recover`` answered probes in a row.  ``fastsip.asyncio.gateways`` is its shell.

Why a hash of the Call-ID and not a random pick: the same call always gets the same order
(an INVITE retransmitted before the proxy kept state, or the same call seen by another worker
or node, goes to the same gateway), the distribution is reproducible in tests, and rendezvous
hashing keeps every other call on its gateway when one gateway leaves or comes back (only
that gateway's share moves).  Over many calls each gateway of a priority gets
``weight / sum(weights)`` of them.

The state is plain attributes (``Gateway.state``, ``failures``, ``probes_sent`` ...) so a
metrics exporter can read them without asking this module for anything.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections.abc import Callable, Container, Iterable, Iterator
from typing import Any

from fastsip.errors import FastSIPError
from fastsip.sip import URI

__all__ = [
    "ACTIVE",
    "INACTIVE",
    "Gateway",
    "GatewaySet",
    "GatewaySetError",
    "Probe",
    "Prober",
    "add_gateway_options",
    "gateway_failed",
    "gateway_sets_from_args",
    "parse_gateway_set",
    "parse_gateways",
    "start_gateway_sets",
]

log = logging.getLogger("fastsip.app.gateways")

ACTIVE = "active"
INACTIVE = "inactive"

#: dispatcher's ``ds_probing_threshold``-like default: failed probes in a row before a
#: gateway leaves its set.
DEFAULT_THRESHOLD = 3
#: dispatcher's ``ds_inactive_threshold`` default: answered probes in a row to come back.
DEFAULT_RECOVER = 1
DEFAULT_INTERVAL = 10.0


class GatewaySetError(FastSIPError, ValueError):
    """A gateway set definition that cannot be used (the message says what is wrong)."""


class Gateway:
    """One gateway of a set: ``uri`` (where calls go; a URI without a user part keeps the
    dialled number), its ``weight`` (share among gateways of equal priority) and ``priority``
    (higher is tried first).  ``state`` is ``"active"`` or ``"inactive"``; ``failures`` and
    ``successes`` are the probes failed / answered in a row; ``probes_sent``,
    ``probes_answered``, ``last_status`` (the last probe's status, 0 = no answer) are
    counters for metrics."""

    __slots__ = ("_key", "failures", "last_status", "priority", "probes_answered",
                 "probes_sent", "state", "successes", "uri", "weight")

    def __init__(self, uri: str | URI, *, weight: int = 1, priority: int = 0) -> None:
        if weight < 0:
            raise GatewaySetError(f"{uri}: weight must be >= 0, not {weight}")
        self.uri = uri if isinstance(uri, URI) else URI(uri)
        if not self.uri.is_sip:
            raise GatewaySetError(f"{uri}: a gateway needs a sip: or sips: URI")
        self.weight = weight
        self.priority = priority
        self.state = ACTIVE          # dispatcher starts destinations active too
        self.failures = 0
        self.successes = 0
        self.probes_sent = 0
        self.probes_answered = 0
        self.last_status = 0
        # The gateway's own hash key (blake2b keys are at most 64 bytes: a digest of the URI,
        # so two long URIs with a common beginning still score independently).
        self._key = hashlib.blake2b(str(self.uri).encode(), digest_size=32).digest()

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def score(self, call_id: str) -> float:
        """This gateway's weighted rendezvous score for a call: the gateway with the highest
        score wins, each with probability weight / sum of weights."""
        if self.weight <= 0:
            return -math.inf
        digest = hashlib.blake2b(call_id.encode(), key=self._key, digest_size=8).digest()
        u = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)   # in (0, 1)
        return -self.weight / math.log(u)

    def __repr__(self) -> str:
        return f"<Gateway {self.uri} weight={self.weight} priority={self.priority} {self.state}>"


class GatewaySet:
    """A named set of gateways (``serve --gateway-set``, or built by a routes module)::

        PSTN = GatewaySet("pstn", ["sip:gw1.example.net;weight=2", "sip:gw2.example.net"])
        ...
        return req.relay_to_set(PSTN)
    """

    def __init__(self, name: str, gateways: Iterable[Gateway | str | URI]) -> None:
        if not name:
            raise GatewaySetError("a gateway set needs a name")
        self.name = name
        self.gateways: list[Gateway] = []
        for g in gateways:
            self.gateways.append(g if isinstance(g, Gateway) else parse_gateway(str(g)))
        if not self.gateways:
            raise GatewaySetError(f"gateway set {name!r} has no gateways")
        #: Calls that found no active gateway (answered 503), for metrics.
        self.unavailable = 0

    @property
    def active(self) -> list[Gateway]:
        return [g for g in self.gateways if g.active]

    def select(self, call_id: str) -> list[Gateway]:
        """The active gateways in the order a call tries them: by priority (highest first),
        then by weighted rendezvous hash of ``call_id`` within a priority.  Empty when none
        is active (the caller then gets 503)."""
        active = [g for g in self.gateways if g.active]
        return sorted(active, key=lambda g: (-g.priority, -g.score(call_id)))

    def __iter__(self) -> Iterator[Gateway]:
        return iter(self.gateways)

    def __repr__(self) -> str:
        return f"<GatewaySet {self.name} {self.gateways}>"


def parse_gateway(text: str) -> Gateway:
    """``URI[;weight=W][;priority=P]``: the two parameters are ours and are taken off the
    URI (the gateway never sees them); other URI parameters (``transport=tcp``) stay."""
    text = text.strip()
    if not text:
        raise GatewaySetError("empty gateway URI")
    weight, priority = 1, 0
    kept: list[str] = []
    head, *params = text.split(";")
    for param in params:
        name, _, value = param.partition("=")
        key = name.strip().lower()
        try:
            if key == "weight":
                weight = int(value)
                continue
            if key == "priority":
                priority = int(value)
                continue
        except ValueError:
            raise GatewaySetError(f"{text}: {key} must be an integer, not {value!r}") from None
        kept.append(param)
    uri = ";".join([head, *kept])
    try:
        return Gateway(uri, weight=weight, priority=priority)
    except ValueError as exc:
        if isinstance(exc, GatewaySetError):
            raise
        raise GatewaySetError(f"{uri}: not a SIP URI ({exc})") from None


def parse_gateways(text: str) -> list[Gateway]:
    """A comma-separated list of gateways (``URI[;weight=W][;priority=P],URI...``)."""
    return [parse_gateway(part) for part in text.split(",") if part.strip()]


def parse_gateway_set(spec: str) -> GatewaySet:
    """``NAME=URI[;weight=W][;priority=P],URI...`` (``serve --gateway-set``)."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest.strip():
        raise GatewaySetError(f"{spec!r}: expected NAME=URI[;weight=W][;priority=P],URI...")
    return GatewaySet(name, parse_gateways(rest))


class Probe:
    """One OPTIONS the shell is to send: to ``gateway`` (of ``gateway_set``); ``id`` ties the
    answer to it (:meth:`Prober.probe_result`)."""

    __slots__ = ("deadline", "gateway", "gateway_set", "id")

    def __init__(self, id: int, gateway_set: GatewaySet, gateway: Gateway,
                 deadline: float) -> None:
        self.id = id
        self.gateway_set = gateway_set
        self.gateway = gateway
        self.deadline = deadline

    def __repr__(self) -> str:
        return f"<Probe {self.id} {self.gateway.uri}>"


class Prober:
    """The probe state machine for gateway sets (sans-IO: the shell passes the time in).

    Every ``interval`` seconds each gateway of every set is due a probe (dispatcher's probing
    mode 1: active ones too, so a failure is seen before calls hit it).  A probe answered with
    a status in ``alive_codes`` (default: any response, as dispatcher treats any reply unless
    ``ds_ping_reply_codes`` says otherwise) is a success; any other status, a timeout (no
    answer after ``timeout`` seconds, default the interval) or a transport error
    (:meth:`probe_result` with status 0) is a failure.  ``threshold`` failures in a row make
    a gateway inactive; ``recover`` successes in a row make an inactive one active again."""

    def __init__(self, sets: Iterable[GatewaySet] = (), *, interval: float = DEFAULT_INTERVAL,
                 threshold: int = DEFAULT_THRESHOLD, recover: int = DEFAULT_RECOVER,
                 timeout: float | None = None,
                 alive_codes: Container[int] | None = None) -> None:
        if interval <= 0:
            raise ValueError("the probe interval must be > 0")
        if threshold < 1 or recover < 1:
            raise ValueError("threshold and recover must be >= 1")
        self.sets: list[GatewaySet] = list(sets)
        self.interval = interval
        self.threshold = threshold
        self.recover = recover
        self.timeout = timeout if timeout is not None else interval
        self.alive_codes = alive_codes
        self._next_round: float | None = None
        self._in_flight: dict[int, Probe] = {}
        self._counter = 0

    def add(self, gateway_set: GatewaySet) -> None:
        """Probe ``gateway_set`` too (from the next round)."""
        if gateway_set not in self.sets:
            self.sets.append(gateway_set)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def next_deadline(self) -> float | None:
        """When :meth:`probes_due` has something to do next (a round, or a probe's timeout);
        None before the first call."""
        times = [p.deadline for p in self._in_flight.values()]
        if self._next_round is not None:
            times.append(self._next_round)
        return min(times) if times else None

    def probes_due(self, now: float) -> list[Probe]:
        """Expire the probes unanswered past their deadline (failures), and return the probes
        to send now (one per gateway, a round every ``interval``; a gateway whose last probe
        is still in flight is not probed twice)."""
        for probe in [p for p in self._in_flight.values() if p.deadline <= now]:
            del self._in_flight[probe.id]
            self._failed(probe, 0)
        if self._next_round is not None and now < self._next_round:
            return []
        self._next_round = now + self.interval
        busy = {id(p.gateway) for p in self._in_flight.values()}
        due = []
        for gs in self.sets:
            for gw in gs.gateways:
                if id(gw) in busy:
                    continue
                self._counter += 1
                probe = Probe(self._counter, gs, gw, now + self.timeout)
                self._in_flight[probe.id] = probe
                gw.probes_sent += 1
                due.append(probe)
        return due

    def probe_result(self, probe_id: int, status: int, now: float) -> None:
        """The outcome of a probe: the final status of the OPTIONS, or 0 for a transport
        error or the transaction's own timeout.  A result for a probe already expired (or
        unknown) is ignored: it was counted as a failure when its deadline passed."""
        probe = self._in_flight.pop(probe_id, None)
        if probe is None:
            return
        gw = probe.gateway
        gw.last_status = status
        if status and (self.alive_codes is None or status in self.alive_codes):
            gw.probes_answered += 1
            gw.failures = 0
            gw.successes += 1
            if gw.state == INACTIVE and gw.successes >= self.recover:
                gw.state = ACTIVE
                log.warning("gateway %s of set %s is active again (answered %d probe(s), "
                            "last %d)", gw.uri, probe.gateway_set.name, gw.successes, status)
            return
        self._failed(probe, status)

    def _failed(self, probe: Probe, status: int) -> None:
        gw = probe.gateway
        gw.last_status = status
        gw.successes = 0
        gw.failures += 1
        if gw.state == ACTIVE and gw.failures >= self.threshold:
            gw.state = INACTIVE
            log.warning("gateway %s of set %s is inactive: %d probe(s) in a row %s",
                        gw.uri, probe.gateway_set.name, gw.failures,
                        f"answered {status}" if status else "unanswered or unreachable")


def gateway_failed(status: int) -> bool:
    """Does a final response mean "try the set's next gateway"?  5xx (the gateway's own
    trouble, or our 503 for a transport error) and 408 (no final response in time); a busy
    callee (486), a rejected number (404) or a 6xx is the callee's answer."""
    return 500 <= status < 600 or status == 408



# -- serve's options ----------------------------------------------------------------------------


def _gateway_set_arg(text: str) -> GatewaySet:
    try:
        return parse_gateway_set(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value
    return convert


def _codes_arg(text: str) -> frozenset[int]:
    try:
        codes = frozenset(int(c) for c in text.split(",") if c.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected status codes like 200,404: {text}") from None
    if not codes or not all(100 <= c <= 699 for c in codes):
        raise argparse.ArgumentTypeError(f"expected status codes 100-699: {text}")
    return codes


def add_gateway_options(p: argparse.ArgumentParser) -> None:
    """``serve``'s gateway-set options, in their own group."""
    g = p.add_argument_group(
        "gateway sets",
        "Named sets of gateways for req.relay_to_set(NAME) in a routes module: by priority, "
        "then shared by weight (a hash of the Call-ID), failing over on 5xx, 408 and "
        "transport errors; each gateway is probed with OPTIONS and leaves its set while it "
        "does not answer.  See docs/routing-recipes.md.")
    g.add_argument("--gateway-set", action="append", type=_gateway_set_arg,
                   metavar="NAME=URI[;weight=W][;priority=P],URI...",
                   help="a gateway set (repeatable), e.g. pstn=sip:gw1.example.net;weight=2,"
                        "sip:gw2.example.net; higher priority is tried first (default 0), "
                        "weight shares calls among equal priorities (default 1)")
    g.add_argument("--gateway-probe-interval", type=_positive(float),
                   default=DEFAULT_INTERVAL, metavar="S",
                   help="seconds between OPTIONS probes of each gateway; one unanswered this "
                        "long has failed (default 10)")
    g.add_argument("--gateway-probe-failures", type=_positive(int),
                   default=DEFAULT_THRESHOLD, metavar="N",
                   help="failed probes in a row that make a gateway inactive (default 3)")
    g.add_argument("--gateway-probe-recover", type=_positive(int), default=DEFAULT_RECOVER,
                   metavar="M",
                   help="answered probes in a row that make an inactive gateway active again "
                        "(default 1)")
    g.add_argument("--gateway-probe-codes", type=_codes_arg, default=None, metavar="CODES",
                   help="the probe answers that mean alive, e.g. 200,404 (default: any "
                        "response; dispatcher's ds_ping_reply_codes)")


def gateway_sets_from_args(args: argparse.Namespace) -> dict[str, GatewaySet]:
    """The ``--gateway-set`` sets by name; GatewaySetError for a name given twice or bad
    probe settings."""
    sets: dict[str, GatewaySet] = {}
    for gs in getattr(args, "gateway_set", None) or ():
        if gs.name in sets:
            raise GatewaySetError(f"--gateway-set: {gs.name!r} is given twice")
        sets[gs.name] = gs
    if not args.gateway_probe_interval > 0:
        raise GatewaySetError("--gateway-probe-interval must be > 0")
    if args.gateway_probe_failures < 1 or args.gateway_probe_recover < 1:
        raise GatewaySetError("--gateway-probe-failures and --gateway-probe-recover must be "
                              ">= 1")
    return sets


def start_gateway_sets(args: argparse.Namespace, router: Any, proxy: object,
                       shard: tuple[int, int] = (0, 1)) -> Any:
    """``serve``: give ``router`` the ``--gateway-set`` sets and start probing them (and any
    set the routes use later) on the running loop; returns the shell
    (:class:`fastsip.asyncio.gateways.GatewayProber`: ``stop()`` at the end).
    GatewaySetError (a ValueError) for bad options."""
    from fastsip.asyncio.gateways import GatewayProber

    router.gateway_sets.update(gateway_sets_from_args(args))
    prober = Prober(interval=args.gateway_probe_interval,
                    threshold=args.gateway_probe_failures,
                    recover=args.gateway_probe_recover, alive_codes=args.gateway_probe_codes)
    shell = GatewayProber(prober, proxy, lambda: list(router.gateway_sets.values()),
                          shard=shard)
    shell.start()
    for gs in router.gateway_sets.values():
        log.info("gateway set %s: %s", gs.name, ", ".join(
            f"{g.uri} (weight {g.weight}, priority {g.priority})" for g in gs.gateways))
    if router.gateway_sets:
        log.info("gateway probes interval=%gs failures=%d recover=%d alive=%s",
                 prober.interval, prober.threshold, prober.recover,
                 ",".join(map(str, sorted(args.gateway_probe_codes)))
                 if args.gateway_probe_codes else "any")
    return _Running(shell, router)


class _Running:
    """The probing as ``serve`` holds it: ``stop()`` ends it and logs each gateway's state
    and counters (the stop summary, like the other subsystems')."""

    def __init__(self, shell: Any, router: Any) -> None:
        self.shell = shell
        self.router = router

    def stop(self) -> None:
        self.shell.stop()
        for gs in self.router.gateway_sets.values():
            log.info("gateway set %s unavailable=%d %s", gs.name, gs.unavailable, " ".join(
                f"{g.uri}={g.state},probes={g.probes_sent},answered={g.probes_answered}"
                for g in gs.gateways))

"""Trunks for ``fastsip serve``: ``--trunk NAME=sip:USER@HOST[:PORT]`` and
``--trunk-credentials FILE`` (see docs/trunking.md).

:class:`Trunks` assembles the sans-IO parts of :mod:`fastsip.proxy.trunk` over a running
:class:`~fastsip.proxy.Proxy`: it drives each outbound :class:`Registration` with the proxy's
transaction layer and clock (REGISTERs are client transactions like any branch; their
responses come back through the same layer), gives the core the trunks' credentials
(``proxy.trunks``: 401/407 on a branch to a trunk are answered there) and tells the routing
API which trunk a request came from (``req.trunk``).

State for metrics: :meth:`Trunks.status` (a plain dict per trunk), or the attributes of each
:class:`Registration` in ``Trunks.registrations``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from fastsip.proxy.auth import DigestClient
from fastsip.proxy.trunk import (
    Registration,
    TrunkAuth,
    TrunkError,
    TrunkSpec,
    load_trunk_credentials,
    parse_trunk,
)
from fastsip.sip import URI, Request, Response
from fastsip.transaction import ClientTransaction, new_branch
from fastsip.transport import Address
from fastsip.transport.rules import next_hop, strip_brackets

__all__ = ["Trunks", "add_trunk_options", "trunks_from_args"]

log = logging.getLogger("fastsip.app.trunks")


def add_trunk_options(p: argparse.ArgumentParser) -> None:
    """``serve``'s trunk options, in their own group."""
    g = p.add_argument_group(
        "trunks",
        "SIP providers we register to and relay calls through (docs/trunking.md).  Routes "
        "send a call out with req.relay(to=..., trunk=NAME); the provider's 401/407 are "
        "answered with the trunk's credentials.")
    g.add_argument("--trunk", action="append", metavar="NAME=sip:USER@HOST[:PORT]",
                   help="a trunk: registers to HOST as USER (;register=no: only relay "
                        "through it); repeatable")
    g.add_argument("--trunk-credentials", metavar="FILE",
                   help="NAME:USER:PASSWORD lines for the trunks (keep it mode 600)")
    g.add_argument("--trunk-expires", type=int, default=3600, metavar="S",
                   help="registration interval asked of providers (default 3600)")
    g.add_argument("--trunk-retry", default="30:3600", metavar="MIN:MAX",
                   help="back-off after a failed registration: from MIN seconds, doubling, "
                        "to MAX (default 30:3600)")


def trunks_from_args(args: argparse.Namespace) -> Trunks | None:
    """The trunks the command line asks for (None: none).  Raises TrunkError (the message
    names the option or file, never a password)."""
    specs = [parse_trunk(s) for s in getattr(args, "trunk", None) or ()]
    path = getattr(args, "trunk_credentials", None)
    if not specs:
        if path:
            raise TrunkError("--trunk-credentials without --trunk")
        return None
    clients = load_trunk_credentials(path) if path else {}
    lo, sep, hi = str(getattr(args, "trunk_retry", "30:3600")).partition(":")
    try:
        retry_min, retry_max = float(lo), float(hi if sep else lo)
    except ValueError:
        raise TrunkError("--trunk-retry: expected MIN:MAX seconds") from None
    if not 0 < retry_min <= retry_max:
        raise TrunkError("--trunk-retry: need 0 < MIN <= MAX")
    if int(getattr(args, "workers", 1) or 1) > 1:
        log.warning("--trunk with --workers %s: every worker registers on its own; run "
                    "trunks with one worker", args.workers)
    expires = int(getattr(args, "trunk_expires", 3600))
    if expires <= 0:
        raise TrunkError("--trunk-expires must be > 0")
    return Trunks(specs, clients, expires=expires, retry_min=retry_min, retry_max=retry_max)


class _Handler:
    """The client-transaction handler of one registration's REGISTERs."""

    __slots__ = ("reg", "trunks")

    def __init__(self, trunks: Trunks, reg: Registration) -> None:
        self.trunks = trunks
        self.reg = reg

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        now = self.trunks.now()
        self.trunks._drive(self.reg, self.reg.receive_response(response, now))

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.trunks._drive(self.reg, self.reg.transaction_failed(self.trunks.now(), "timeout"))

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self.trunks._drive(self.reg, self.reg.transaction_failed(self.trunks.now(),
                                                                 "transport error"))


class Trunks:
    """The server's trunks (see the module docstring)."""

    def __init__(self, specs: Iterable[TrunkSpec], clients: Mapping[str, DigestClient], *,
                 expires: int = 3600, retry_min: float = 30.0, retry_max: float = 3600.0
                 ) -> None:
        self.specs: dict[str, TrunkSpec] = {}
        for spec in specs:
            if spec.name in self.specs:
                raise TrunkError(f"--trunk {spec.name}: defined twice")
            self.specs[spec.name] = spec
        for name in clients:
            if name not in self.specs:
                log.warning("trunk credentials for %s, which is no --trunk", name)
        self.auth = TrunkAuth(clients)
        self.expires = expires
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.registrations: dict[str, Registration] = {}
        self._dest: dict[str, Address] = {}
        self._timers: dict[str, Any] = {}
        self._proxy: Any = None
        # (host, port) of each trunk's next hop -> its name: req.trunk by source address.
        self._sources: dict[tuple[str, int], str] = {}
        self._hosts: dict[str, str] = {}

    # -- wiring --------------------------------------------------------------------------

    def attach(self, proxy: Any) -> None:
        """Give the core the credentials and start registering (the proxy has its
        transaction layer)."""
        self._proxy = proxy
        proxy.trunks = self.auth
        for name, spec in self.specs.items():
            try:
                dest = next_hop(URI(spec.registrar_uri()))
            except ValueError as exc:
                log.warning("trunk %s: no next hop for %s: %s", name, spec.registrar_uri(), exc)
                continue
            self._dest[name] = dest
            host = strip_brackets(dest.host)
            self._sources.setdefault((host, dest.port), name)
            self._hosts.setdefault(host, name)
            client = self.auth.clients.get(name)
            log.info("trunk %s: %s as %s%s", name, spec.registrar_uri(), spec.user or "-",
                     "" if spec.register else " (no registration)")
            if not spec.register:
                continue
            if client is None:
                log.warning("trunk %s: no credentials (--trunk-credentials): a challenge "
                            "will fail", name)
            reg = Registration(spec, self._contact(spec, dest), client, expires=self.expires,
                               retry_min=self.retry_min, retry_max=self.retry_max)
            self.registrations[name] = reg
            self._drive(reg, reg.start(self.now()))

    def stop(self) -> None:
        for reg in self.registrations.values():
            reg.stop()
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def now(self) -> float:
        return float(self._proxy.clock.time())

    def _contact(self, spec: TrunkSpec, dest: Address) -> str:
        """Our Contact at the provider: the trunk user at the listener that reaches it (its
        advertised address)."""
        local = self._proxy.local_for(dest)
        host = local.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        tail = "" if local.transport == "UDP" else f";transport={local.transport.lower()}"
        return f"sip:{spec.user}@{host}:{local.port}{tail}"

    # -- driving a registration ------------------------------------------------------------

    def _drive(self, reg: Registration, requests: list[Request]) -> None:
        proxy = self._proxy
        name = reg.trunk.name
        dest = self._dest[name]
        for request in requests:
            local = proxy.local_for(dest)
            host = local.host
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            request.add_via(f"SIP/2.0/{dest.transport} {host}:{local.port};branch="
                            f"{new_branch()}")
            try:
                proxy.layer.request(request, dest, _Handler(self, reg))
            except ValueError as exc:
                log.warning("trunk %s: cannot send REGISTER: %s", name, exc)
                reg.transaction_failed(self.now(), str(exc))
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        due = reg.get_timer()
        if due is not None:
            delay = max(0.0, due - self.now())
            self._timers[name] = proxy.clock.call_later(delay, self._fire, reg)

    def _fire(self, reg: Registration) -> None:
        self._timers.pop(reg.trunk.name, None)
        self._drive(reg, reg.handle_timer(self.now()))

    # -- for routing and metrics -------------------------------------------------------------

    def uri(self, name: str) -> str:
        """Where ``relay(trunk=name)`` sends a request without ``to``: the provider's host."""
        spec = self.specs.get(name)
        if spec is None:
            raise TrunkError(f"no trunk named {name!r}")
        return spec.registrar_uri()

    def match(self, source: Address, request: Request) -> str | None:
        """The trunk a request came from: its source is a trunk's address (host and port,
        else host), else its Request-URI user is the user we registered as at a trunk and it
        names us (a provider that sends from other addresses)."""
        host = strip_brackets(source.host)
        name = self._sources.get((host, source.port)) or self._hosts.get(host)
        if name is not None:
            return name
        user = request.uri.user
        if user is None:
            return None
        for reg in self.registrations.values():
            if reg.trunk.user == user and reg.contact_matches(request.uri):
                return reg.trunk.name
        return None

    def status(self) -> dict[str, dict[str, Any]]:
        """Per trunk: registration state, next attempt, failures in a row, expiry (times on
        the server's monotonic clock), last status; and the core's counters."""
        out: dict[str, dict[str, Any]] = {}
        for name, spec in self.specs.items():
            reg = self.registrations.get(name)
            entry: dict[str, Any] = {"register": spec.register}
            if reg is not None:
                entry.update(state=reg.state, next_attempt=reg.next_attempt,
                             failures=reg.failures, expires_at=reg.expires_at,
                             last_status=reg.last_status, registered=reg.registered_count)
            out[name] = entry
        return out

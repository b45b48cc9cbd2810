"""An :class:`Endpoint`: listeners, the timer wheel's loop driver and a transaction layer,
assembled and started together.  It is what a UA (``fastsip answer``/``fastsip call``), a proxy
or a test builds on::

    endpoint = Endpoint(my_tu, listen=["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"])
    await endpoint.start()
    endpoint.transactions.request(invite, next_hop(invite.uri), handler)
    ...
    await endpoint.close()
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from types import TracebackType
from typing import TypeVar

from fastsip.asyncio.timers import WheelDriver
from fastsip.asyncio.transport import AdmitCallback, Listener, TransportLayer, parse_listen
from fastsip.errors import FastSIPError
from fastsip.sip import Limits
from fastsip.transaction import TimerConfig, TransactionLayer, TransactionUser
from fastsip.transport import Address

__all__ = ["Endpoint", "ListenError"]

log = logging.getLogger("fastsip.asyncio.endpoint")

_E = TypeVar("_E", bound="Endpoint")


class ListenError(OSError):
    """A listener could not be bound; its message names the address:
    ``cannot listen on udp:127.0.0.1:5060: Address already in use``.  ``address`` is the
    spec as ``proto:host:port`` (an IPv6 host in brackets); errno is the bind's."""

    def __init__(self, spec: str, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))
        self.address = _spec_address(spec)

    def __str__(self) -> str:
        return f"cannot listen on {self.address}: {self.strerror}"


def _spec_address(spec: str) -> str:
    try:
        transport, host, port = parse_listen(spec)
    except ValueError:
        return spec
    return f"{transport.lower()}:{f'[{host}]' if ':' in host else host}:{port}"


class Endpoint:
    """A SIP endpoint on the running event loop: a :class:`TransportLayer` with the given
    listeners, a :class:`WheelDriver` as the clock, and a :class:`TransactionLayer` whose
    transaction user is ``tu``.

    - ``listen``: listener specs, ``"udp:127.0.0.1:5060"``, ``"tcp:[::1]:5060"``,
      ``"tls:0.0.0.0:5061"`` (port 0: any free port; read the real one from
      :attr:`listeners`); ``SPEC/HOST[:PORT]`` advertises HOST[:PORT] for that listener (a
      server behind 1:1 NAT: ``udp:10.0.0.5:5060/203.0.113.5``).
    - ``advertise``: "host" or "host:port" to put in our Via instead of the bound address
      (behind NAT, or when listening on 0.0.0.0); applies to every listener without its own.
    - ``tls_context``: server context (certificate chain loaded) for ``tls:`` listeners;
      ``tls_client_context``: verifies servers we connect to (default: system trust store).
    - ``timers``: T1/T2/T4; ``check_via``: drop responses whose top Via is not ours (§18.1.2).
    - Edge limits, passed to the :class:`TransportLayer` (see there): ``max_connections``,
      ``max_connections_per_source``, ``idle_timeout``, ``read_timeout``,
      ``tls_handshake_timeout``, ``udp_receive_buffer``, and ``admit(host, now)``, the hook of
      a ban/rate-limit policy (False: the datagram is dropped, the connection closed);
      ``reuse_port``: UDP listeners shared with other worker processes (SO_REUSEPORT).

    Received requests reach ``tu.on_request(txn, request)`` with ``received``/``rport`` already
    stamped; see :class:`~fastsip.transaction.TransactionUser`.  Messages sent outside a
    transaction (the ACK for a 2xx, a 2xx retransmission) go through :attr:`transport`
    (``endpoint.transport.send(bytes(msg), dest)``).  Use ``async with`` or start/close.
    """

    def __init__(
        self,
        tu: TransactionUser,
        listen: Sequence[str] = ("udp:127.0.0.1:5060",),
        *,
        advertise: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        tls_client_context: ssl.SSLContext | None = None,
        timers: TimerConfig | None = None,
        limits: Limits | None = None,
        idle_timeout: float = 120.0,
        read_timeout: float = 10.0,
        tls_handshake_timeout: float = 10.0,
        max_connections: int | None = 2048,
        max_connections_per_source: int | None = 64,
        admit: AdmitCallback | None = None,
        udp_receive_buffer: int = 4 * 1024 * 1024,
        check_via: bool = True,
        reuse_port: bool = False,
    ) -> None:
        if isinstance(listen, str):
            listen = (listen,)
        self.tu = tu
        self.listen_specs = list(listen)
        self.advertise = advertise
        self.timers = timers if timers is not None else TimerConfig()
        #: The transport (send through it; its ``sent_by(transport)`` gives our Via host/port).
        self.transport = TransportLayer(
            tls_context=tls_context, tls_client_context=tls_client_context, limits=limits,
            idle_timeout=idle_timeout, read_timeout=read_timeout,
            tls_handshake_timeout=tls_handshake_timeout, max_connections=max_connections,
            max_connections_per_source=max_connections_per_source, admit=admit,
            udp_receive_buffer=udp_receive_buffer, check_via=check_via, reuse_port=reuse_port)
        self._driver: WheelDriver | None = None
        self._transactions: TransactionLayer | None = None

    @property
    def transactions(self) -> TransactionLayer:
        """The transaction layer (after :meth:`start`)."""
        if self._transactions is None:
            raise FastSIPError("the endpoint is not started")
        return self._transactions

    @property
    def clock(self) -> WheelDriver:
        """The timer wheel's loop driver (after :meth:`start`): ``call_later(delay, cb, *args)``
        and ``time()`` on the loop's clock, for the TU's own timers (2xx retransmission...)."""
        if self._driver is None:
            raise FastSIPError("the endpoint is not started")
        return self._driver

    @property
    def listeners(self) -> list[Listener]:
        """The bound listeners, with their real ports."""
        return self.transport.listeners

    def address(self, transport: str = "UDP") -> Address:
        """The bound address of the first listener for ``transport`` (after :meth:`start`)."""
        for listener in self.transport.listeners:
            if listener.address.transport == transport:
                return listener.address
        raise FastSIPError(f"no {transport} listener")

    async def start(self) -> None:
        """Bind every listener and start the timers; on a bind failure, close what was
        opened and raise :class:`ListenError` (an OSError naming the address), or ValueError
        for a bad spec."""
        if self._transactions is not None:
            return
        try:
            for spec in self.listen_specs:
                spec, _, own = spec.partition("/")
                try:
                    await self.transport.listen(spec, advertise=own or self.advertise)
                except OSError as exc:
                    # The kernel's "Address already in use" names no address; with several
                    # listeners the operator must know which one failed.
                    raise ListenError(spec, exc) from exc
        except BaseException:
            await self.transport.close()
            raise
        self._driver = WheelDriver()
        self.transport.wheel = self._driver.wheel
        self._transactions = TransactionLayer(self.transport, self._driver, self.tu, self.timers)
        self.transport.on_message = self._transactions.receive
        self.transport.on_error = self._transactions.transport_error

    async def close(self) -> None:
        """Close listeners and connections and stop the timers (transactions are abandoned)."""
        await self.transport.close()
        if self._driver is not None:
            self._driver.close()

    async def __aenter__(self: _E) -> _E:  # noqa: PYI019 - typing.Self is 3.11+
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def __repr__(self) -> str:
        where = ", ".join(str(x.address) for x in self.listeners) or "not started"
        return f"<Endpoint {where}>"

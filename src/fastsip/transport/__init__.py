"""Transport-layer vocabulary shared by the sans-IO layers (RFC 3261 §18).

Nothing here touches a socket: :class:`Address` names where a message came from or goes to, and
:class:`Transport` is what the transaction layer and the UA core send through.  The asyncio layer
(:mod:`fastsip.asyncio`) implements it over real sockets; the §18 rules (received/rport, response
routing, the next hop of a request) live in :mod:`fastsip.transport.rules`, and what every shell
does with a datagram that arrives (keep-alive, STUN, malformed, the §18 checks) in
:mod:`fastsip.transport.intake`.
"""

from __future__ import annotations

from typing import Final, Protocol

__all__ = ["DEFAULT_PORTS", "RELIABLE", "Address", "Transport"]

#: Transports whose delivery is reliable (no retransmission of requests, §17.1.1.2 Timer A off).
RELIABLE = frozenset({"TCP", "TLS", "SCTP", "WS", "WSS"})
DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "SCTP": 5060, "TLS": 5061, "WS": 80, "WSS": 443}


class Address:
    """A transport address: ``transport`` ("UDP", "TCP", "TLS", upper case as in Via), ``host``
    (an IP literal without brackets), ``port``, and ``connection``: for stream transports the
    id of the connection a message arrived on, for datagrams the id of the local socket it
    arrived on (0: "any connection", "the usual socket").

    Two addresses that differ only in ``connection`` name the same peer (``peer``).  What is
    sent to an address with a ``connection`` goes over that connection while it is open
    (§18.2.2), otherwise over a new one to the peer; a datagram leaves from that socket, so
    the peer and any NAT in front of it see the address they sent to (a flow, RFC 5626).

    A value: equal and hashed by its four fields, never changed after it is made (``Final``:
    the type checker refuses an assignment).  A plain slotted class rather than a frozen
    dataclass because several are made per message on the relay path, and a frozen
    dataclass's ``__init__`` (``object.__setattr__`` per field) costs five times as much.
    """

    __slots__ = ("connection", "host", "port", "transport")

    def __init__(self, transport: str, host: str, port: int, connection: int = 0) -> None:
        self.transport: Final = transport
        self.host: Final = host
        self.port: Final = port
        self.connection: Final = connection

    @property
    def reliable(self) -> bool:
        return self.transport in RELIABLE

    @property
    def peer(self) -> tuple[str, str, int]:
        """(transport, host, port): the key of a connection table."""
        return (self.transport, self.host, self.port)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Address:
            return NotImplemented
        return (self.port == other.port and self.host == other.host
                and self.transport == other.transport
                and self.connection == other.connection)

    def __hash__(self) -> int:
        return hash((self.transport, self.host, self.port, self.connection))

    def __repr__(self) -> str:
        return (f"Address(transport={self.transport!r}, host={self.host!r}, "
                f"port={self.port!r}, connection={self.connection!r})")

    def __reduce__(self) -> tuple[type[Address], tuple[str, str, int, int]]:
        return (Address, (self.transport, self.host, self.port, self.connection))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.lower()}:{host}:{self.port}"


class Transport(Protocol):
    """What the sans-IO layers send through.  Implementations never block."""

    def send(self, data: bytes, dest: Address) -> None:
        """Send one message to ``dest``.  For stream transports, ``dest.connection`` (when
        nonzero and still open) is used, else an open connection to ``dest.peer``, else a new
        one.  A failure is reported later through the transaction layer's
        ``transport_error(dest)``, never raised here."""
        ...

    def sent_by(self, transport: str) -> tuple[str, int]:
        """The host and port to put in our own Via (and Record-Route/Contact) for
        ``transport``: where responses and requests for us arrive."""
        ...

    # Optional (a transport with one listener per transport need not have it):
    #
    # def local_for(self, dest: Address) -> Address:
    #     """Our end of a message to ``dest`` -- or of one that came from it, when ``dest``
    #     names a socket or connection: the advertised host and port of that listener (what
    #     our Via and Record-Route must carry), with its id as ``connection``."""

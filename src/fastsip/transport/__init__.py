"""Transport-layer vocabulary shared by the sans-IO layers (RFC 3261 §18).

Nothing here touches a socket: :class:`Address` names where a message came from or goes to
(compiled in :mod:`fastsip.transport._address`), and :class:`Transport` is what the
transaction layer and the UA core send through.  The asyncio layer (:mod:`fastsip.asyncio`)
implements it over real sockets; the §18 rules (received/rport, response
routing, the next hop of a request) live in :mod:`fastsip.transport.rules`, and what every shell
does with a datagram that arrives (keep-alive, STUN, malformed, the §18 checks) in
:mod:`fastsip.transport.intake`.
"""

from __future__ import annotations

from typing import Protocol

from fastsip.transport._address import RELIABLE, Address

__all__ = ["DEFAULT_PORTS", "RELIABLE", "Address", "Transport"]

DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "SCTP": 5060, "TLS": 5061, "WS": 80, "WSS": 443}


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

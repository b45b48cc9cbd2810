"""RFC 3261 §18 (with RFC 3581 rport) as plain functions over messages and addresses.

Sans-IO: these decide *where* a message goes and what the receiving side records in the top Via;
:mod:`fastsip.asyncio` does the sending.
"""

from __future__ import annotations

from fastsip.sip import Message, Via
from fastsip.transport import DEFAULT_PORTS, Address

__all__ = ["response_destination", "stamp_received", "strip_brackets"]


def strip_brackets(host: str) -> str:
    """An IPv6 reference ("[2001:db8::1]") as the bare address a socket wants."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def stamp_received(request: Message, source: Address) -> bool:
    """§18.2.1 and RFC 3581 §4: a server records in the top Via where the request really came
    from: ``received`` when the sent-by host differs from the source IP, and the source port in
    ``rport`` when the client asked for it.  Returns True when the Via was rewritten."""
    via = request.top_via
    if via is None:
        return False
    host = strip_brackets(via.host)
    add_received = host != source.host
    fill_rport = via.has_rport and via.rport == 0
    if not add_received and not fill_rport:
        return False
    params = []
    for name, value in via.params.items():
        if name == "received":
            continue
        if name == "rport":
            params.append(f"rport={source.port}" if fill_rport else f"rport={value}" if value else "rport")
            continue
        params.append(name if value is None else f"{name}={value}")
    if add_received or fill_rport:
        params.append(f"received={source.host}")
    sent_by = via.host if via.port is None else f"{via.host}:{via.port}"
    text = f"{via.protocol}/{via.transport} {sent_by}" + "".join(";" + p for p in params)
    request.pop_via()
    request.add_via(text)
    return True


def response_destination(via: Via, source: Address | None = None) -> Address:
    """Where a response to a request whose top Via is ``via`` goes (§18.2.2, RFC 3581 §4).

    Reliable transport with the connection still known: back over it (``source.connection``).
    Otherwise ``received`` (or the sent-by host) with the ``rport`` value, else the sent-by port,
    else the transport's default port.  (maddr, for multicast, is honoured as the host.)
    """
    transport = via.transport
    if source is not None and source.reliable and source.connection:
        return source
    host = via.maddr or via.received or via.host
    port: int | None
    if via.maddr:
        port = via.port
    else:
        port = via.rport if via.rport else via.port
    if port is None:
        port = DEFAULT_PORTS.get(transport, 5060)
    return Address(transport, strip_brackets(host), port)

"""RFC 3261 §18 (with RFC 3581 rport) as plain functions over messages and addresses.

Sans-IO: these decide *where* a message goes and what the receiving side records in the top Via;
:mod:`fastsip.asyncio` does the sending.  The ones every message meets (:func:`next_hop`,
:func:`request_next_hop`, :func:`response_destination`, :func:`check_sent_by`,
:func:`strip_brackets`), and our local To tags (:data:`LOCAL_TAG_PREFIX`, :func:`local_tag`,
:func:`is_local_tag`, asked by every in-dialog request), are compiled in
:mod:`fastsip.transport._rules`, where their docstrings give each one's contract; they are
imported from here.
"""

from __future__ import annotations

import ipaddress
import re
import zlib

from fastsip.errors import ParseError
from fastsip.sip import REASON_PHRASES, Message
from fastsip.transport import DEFAULT_PORTS, Address
from fastsip.transport._rules import (
    LOCAL_TAG_PREFIX,
    check_sent_by,
    is_local_tag,
    local_tag,
    next_hop,
    request_next_hop,
    response_destination,
    strip_brackets,
)

__all__ = [
    "LOCAL_TAG_PREFIX",
    "UDP_SIZE_LIMIT",
    "call_id_shard",
    "check_sent_by",
    "connection_holder",
    "error_response",
    "held_connection_id",
    "is_local_tag",
    "local_tag",
    "next_hop",
    "request_next_hop",
    "response_destination",
    "select_transport",
    "stamp_received",
    "strip_brackets",
]

#: §18.1.1: a request larger than this (path MTU unknown) goes over a congestion-controlled
#: transport (TCP) instead of UDP.
UDP_SIZE_LIMIT = 1300

def stamp_received(request: Message, source: Address) -> bool:
    """§18.2.1 and RFC 3581 §4: a server records in the top Via where the request really came
    from: ``received`` when the sent-by host differs from the source IP, and the source port in
    ``rport`` when the client asked for it.  Returns True when the Via was rewritten.

    The message core does it as one edit of the Via value
    (:meth:`~fastsip.sip.Message.stamp_received`): every phone behind NAT asks for ``rport``,
    so this runs on most requests."""
    return request.stamp_received(source.host, source.port)


def select_transport(transport: str, size: int, *, tcp: bool = True,
                     udp_size_limit: int = UDP_SIZE_LIMIT) -> str:
    """§18.1.1: a request over ``udp_size_limit`` bytes that would go over UDP goes over TCP
    instead, when TCP is available (``tcp``).  Call it *before* adding the top Via, whose
    transport must name the one actually used (build the request, measure, then stamp)."""
    if transport == "UDP" and tcp and size > udp_size_limit:
        return "TCP"
    return transport


# Header lines a stateless error response copies (§8.2.6.2), compact forms included.
_ECHO = {b"via": b"Via", b"v": b"Via", b"from": b"From", b"f": b"From", b"to": b"To",
         b"t": b"To", b"call-id": b"Call-ID", b"i": b"Call-ID", b"cseq": b"CSeq"}
_REQUEST_LINE = re.compile(rb"[A-Za-z0-9.!%*_+`'~-]+ +\S")  # lwsstart: several SP too
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_END_OF_HEADERS = re.compile(rb"\r?\n\r?\n")
_TO_TAG = re.compile(rb";\s*tag\s*=", re.IGNORECASE)


def error_response(data: bytes, error: ParseError, max_scan: int = 65535) -> bytes | None:
    """The stateless answer to a request that failed to parse (§8.2.6, §21.4.1: 400 with the
    problem in the reason phrase; 505 for an unsupported version; 513 for a message too large),
    or None when no answer is possible or allowed: not a request, an ACK (never answered), or
    the Via, From, To, Call-ID and CSeq needed to route and match a response are missing.

    Those header lines are copied as they came; nothing else of the request is trusted.
    """
    if not _REQUEST_LINE.match(data):
        return None                                   # responses and noise are dropped (§18.1.2)
    if data[:4] == b"ACK " or data[:4].upper() == b"SIP/":
        return None
    head = data[:max_scan]
    end = _END_OF_HEADERS.search(head)
    if end is not None:
        head = head[:end.start()]
    # Unfold continuation lines (RFC 3261 §7.3.1: a header value may go on over lines that
    # start with whitespace; RFC 4475 wsinv folds its To and Via), bare LF or CRLF alike.  A
    # "continuation" right after the request line continues nothing: it stands alone.
    lines: list[bytes] = []
    for line in head.replace(b"\r\n", b"\n").split(b"\n")[1:]:
        if line[:1] in (b" ", b"\t") and lines:
            lines[-1] += b" " + line.strip()
        else:
            lines.append(line)
    copied: list[bytes] = []
    seen: set[bytes] = set()
    to_line = b""
    for line in lines:
        name, sep, value = line.partition(b":")
        canonical = _ECHO.get(name.strip().lower())
        if not sep or canonical is None or (canonical != b"Via" and canonical in seen):
            continue
        value = value.strip()
        if not value or b"\r" in value or b"\n" in value:
            continue
        seen.add(canonical)
        if canonical == b"To":
            to_line = canonical + b": " + value
            continue
        copied.append(canonical + b": " + value)
    if seen != {b"Via", b"From", b"To", b"Call-ID", b"CSeq"}:
        return None
    if not _TO_TAG.search(to_line):
        to_line += b";tag=" + local_tag().encode()  # §8.2.6.2: a To tag on a final response
    status = error.status if error.status in (400, 414, 505, 513) else 400
    reason = REASON_PHRASES.get(status, "Bad Request")
    if status == 400:
        reason += " (" + _UNSAFE.sub("?", error.reason)[:120] + ")"
    vias = [c for c in copied if c.startswith(b"Via:")]
    rest = [c for c in copied if not c.startswith(b"Via:")]
    out = [f"SIP/2.0 {status} {reason}".encode()] + vias + rest[:1] + [to_line] + rest[1:]
    out.append(b"Content-Length: 0")
    return b"\r\n".join(out) + b"\r\n\r\n"


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[V6]`` or ``[V6]:PORT`` -> (host without brackets, port);
    without a port, ``default_port`` (None: a port is required).  ValueError with the reason
    for anything else (an IPv6 address outside brackets, an empty host, a bad port)."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [::1]:5060")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r}: missing port")
        return host, default_port
    if not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"{text!r}: bad port {port_text!r}")
    return host, int(port_text)


def parse_listen(spec: str) -> tuple[str, str, int]:
    """``"udp:127.0.0.1:5060"``, ``"tcp:[::1]:5060"``, ``"tls:0.0.0.0:5061"`` ->
    ``("UDP", "127.0.0.1", 5060)``.  The port may be omitted (the transport's default) or 0
    (any free port).  A ``/HOST[:PORT]`` suffix (the address to advertise for it) is checked
    and left out of the answer.  Raises ValueError with the reason for anything else."""
    spec, slash, advertise = spec.partition("/")
    if slash and (not advertise or any(c.isspace() for c in advertise)):
        raise ValueError(f"listen spec {spec}/{advertise!r}: expected /HOST[:PORT] to advertise")
    transport, sep, rest = spec.partition(":")
    transport = transport.upper()
    if not sep or transport not in ("UDP", "TCP", "TLS"):
        raise ValueError(f"listen spec {spec!r}: expected udp:, tcp: or tls: then host[:port]")
    try:
        host, port = parse_hostport(rest, DEFAULT_PORTS[transport])
    except ValueError as exc:
        raise ValueError(f"listen spec {spec!r}: {exc}") from None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen spec {spec!r}: host must be an IP address, not {host!r}") \
            from None
    return transport, host, port


def call_id_shard(call_id: str | None, shards: int) -> int:
    """Which of ``shards`` workers owns the messages of Call-ID ``call_id``: every message of
    a call -- the INVITE, its retransmissions, CANCEL, the ACK, the responses, the BYE -- has
    the same Call-ID, so they all meet the transactions of the same worker.  CRC-32, not
    ``hash()``: every process must compute the same answer (``hash`` of a str is salted per
    process).  A message without a Call-ID is worker 0's."""
    if shards <= 1 or not call_id:
        return 0
    return zlib.crc32(call_id.encode("utf-8", "surrogateescape")) % shards


# A connection id under ``serve --workers`` (what a flow stored in the shared location store,
# or an alias, names): a marker bit, a counter, and a byte for the worker holding it (its
# index + 1).  31 bits in all (a PostgreSQL INTEGER column stores it).  A server of one
# process numbers its connections 1, 2, 3, ... and never reaches the marker.
_HELD = 1 << 30
_COUNTER_BITS = 22


def held_connection_id(counter: int, worker: int) -> int:
    """The id of connection number ``counter`` (taken modulo 2**22) held by ``worker``."""
    return _HELD | (counter & ((1 << _COUNTER_BITS) - 1)) << 8 | (worker + 1) & 0xFF


def connection_holder(connection: int) -> int | None:
    """The worker holding connection ``connection`` (an id from
    :func:`held_connection_id`); None for any other id (one process's own numbering, a UDP
    socket's id)."""
    if connection & _HELD and connection & 0xFF and connection < _HELD << 1:
        return (connection & 0xFF) - 1
    return None

"""SIP messages: the zero-copy parser, typed header views, URIs, edits and serialization."""

from fastsip.sip._message import (
    CSeq,
    Headers,
    Limits,
    Message,
    NameAddr,
    Request,
    Response,
    URI,
    Via,
    message_length,
    parse,
    parse_uri,
)

__all__ = [
    "CSeq",
    "Headers",
    "Limits",
    "Message",
    "NameAddr",
    "Request",
    "Response",
    "URI",
    "Via",
    "message_length",
    "parse",
    "parse_uri",
]

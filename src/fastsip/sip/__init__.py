"""SIP messages: the zero-copy parser, typed header views, URIs, edits and serialization."""

from fastsip.sip._message import (
    REASON_PHRASES,
    URI,
    CSeq,
    Headers,
    Limits,
    Message,
    NameAddr,
    Request,
    Response,
    Via,
    canonical_name,
    message_length,
    parse,
    parse_uri,
)

__all__ = [
    "REASON_PHRASES",
    "URI",
    "CSeq",
    "Headers",
    "Limits",
    "Message",
    "NameAddr",
    "Request",
    "Response",
    "Via",
    "canonical_name",
    "message_length",
    "parse",
    "parse_uri",
]

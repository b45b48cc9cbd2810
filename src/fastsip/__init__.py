"""fastsip: a Cython-accelerated SIP/RTP engine with routing in plain Python.

The hot paths (SIP parsing and serialization, the timer wheel, RTP) are compiled; everything a
user writes is plain Python.  The names below are the stable public surface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastsip.errors import FastSIPError, ParseError
from fastsip.sip import (
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

__version__ = "0.1.0.dev0"

__all__ = [
    "REASON_PHRASES",
    "URI",
    "CSeq",
    "FastSIPError",
    "Headers",
    "Limits",
    "Message",
    "NameAddr",
    "ParseError",
    "Request",
    "Response",
    "TimerWheel",
    "Via",
    "canonical_name",
    "message_length",
    "parse",
    "parse_uri",
]

if TYPE_CHECKING:
    from fastsip.timers import TimerWheel


def __getattr__(name: str) -> Any:
    # Cores other than the message core load on first use, so `import fastsip` stays cheap.
    if name == "TimerWheel":
        from fastsip.timers import TimerWheel

        return TimerWheel
    raise AttributeError(f"module 'fastsip' has no attribute {name!r}")

"""Errors that fastsip raises; every public error derives from :class:`FastSIPError`."""

from __future__ import annotations


class FastSIPError(Exception):
    """Base of every error fastsip raises on purpose."""


class ParseError(FastSIPError, ValueError):
    """Bad input on the wire: a message (or part of one) that cannot be parsed.

    ``offset`` is the byte offset into the input where parsing stopped (``-1`` when the error is
    not tied to one position), ``reason`` a short human-readable cause.  ``status`` is the response
    code RFC 3261 prescribes for a request that fails this way (400 unless said otherwise: 505 for an
    unsupported SIP version, 513 for a message over the size limit).
    """

    def __init__(self, reason: str, offset: int = -1, status: int = 400) -> None:
        self.reason = reason
        self.offset = offset
        self.status = status
        where = f" at byte {offset}" if offset >= 0 else ""
        super().__init__(f"{reason}{where}")

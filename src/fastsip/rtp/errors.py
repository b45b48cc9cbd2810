"""Errors of the RTP/RTCP layer: malformed packets are bad input, so they are ValueErrors too."""

from __future__ import annotations

from fastsip.errors import FastSIPError


class RtpError(FastSIPError, ValueError):
    """A malformed RTP packet (too short, bad version, truncated CSRC list or extension, bad padding)."""


class RtcpError(RtpError):
    """A malformed RTCP packet or compound packet."""

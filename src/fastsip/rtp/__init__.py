"""RTP media: packets, RFC 3550 statistics, RTCP, jitter buffer, packetizer, G.711, RFC 4733,
and the relay's compiled packet path.

Everything here is sans-IO: callers pass datagrams and arrival times in, and get packets,
frames and reports out.  The one exception is :class:`Relay`, which reads and writes fds the
shell owns (it never opens one), so that packets never become Python objects.
"""

from __future__ import annotations

from fastsip.rtp._g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from fastsip.rtp._jitter import Frame, FrameKind, JitterBuffer
from fastsip.rtp._packet import (
    ONE_BYTE_EXTENSION_PROFILE,
    TWO_BYTE_EXTENSION_PROFILE,
    RtpBatch,
    RtpPacket,
    parse_batch,
    parse_batch_buffer,
)
from fastsip.rtp._relay import Relay
from fastsip.rtp._stats import RtpStats
from fastsip.rtp.errors import RtcpError, RtpError
from fastsip.rtp.events import DTMF_EVENTS, TelephoneEvent
from fastsip.rtp.packetizer import Depacketizer, Packetizer, depacketize
from fastsip.rtp.rtcp import (
    App,
    Bye,
    Feedback,
    ReceiverReport,
    ReceptionReport,
    RtcpPacket,
    SdesChunk,
    SenderReport,
    SourceDescription,
    build_compound,
    ntp_timestamp,
    parse_rtcp,
    receiver_report,
    report_block,
    rtcp_interval,
)

__all__ = [
    "DTMF_EVENTS",
    "ONE_BYTE_EXTENSION_PROFILE",
    "TWO_BYTE_EXTENSION_PROFILE",
    "App",
    "Bye",
    "Depacketizer",
    "Feedback",
    "Frame",
    "FrameKind",
    "JitterBuffer",
    "Packetizer",
    "ReceiverReport",
    "ReceptionReport",
    "Relay",
    "RtcpError",
    "RtcpPacket",
    "RtpBatch",
    "RtpError",
    "RtpPacket",
    "RtpStats",
    "SdesChunk",
    "SenderReport",
    "SourceDescription",
    "TelephoneEvent",
    "alaw_decode",
    "alaw_encode",
    "build_compound",
    "depacketize",
    "ntp_timestamp",
    "parse_batch",
    "parse_batch_buffer",
    "parse_rtcp",
    "receiver_report",
    "report_block",
    "rtcp_interval",
    "ulaw_decode",
    "ulaw_encode",
]

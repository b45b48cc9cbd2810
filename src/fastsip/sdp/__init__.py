"""SDP (RFC 8866) and the RFC 3264 offer/answer model for audio over RTP."""

from __future__ import annotations

from fastsip.sdp.offer_answer import (
    G722,
    PCMA,
    PCMU,
    TELEPHONE_EVENT,
    Codec,
    NegotiatedMedia,
    answer_direction,
    create_answer,
    create_offer,
    hold,
    is_on_hold,
    negotiate,
    resume,
)
from fastsip.sdp.session import (
    DIRECTIONS,
    STATIC_PAYLOAD_TYPES,
    Connection,
    Media,
    Origin,
    RtpMap,
    SdpError,
    SessionDescription,
)

__all__ = [
    "DIRECTIONS",
    "G722",
    "PCMA",
    "PCMU",
    "STATIC_PAYLOAD_TYPES",
    "TELEPHONE_EVENT",
    "Codec",
    "Connection",
    "Media",
    "NegotiatedMedia",
    "Origin",
    "RtpMap",
    "SdpError",
    "SessionDescription",
    "answer_direction",
    "create_answer",
    "create_offer",
    "hold",
    "is_on_hold",
    "negotiate",
    "resume",
]

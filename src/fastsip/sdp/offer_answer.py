"""RFC 3264 offer/answer for audio over RTP: codec intersection, ptime, telephone-event,
direction attributes and hold.

``create_offer`` and ``create_answer`` build descriptions; ``negotiate`` reads an offer and its
answer and says what to send and expect on each stream (payload type, codec, ptime, the
telephone-event payload type, the remote address, and the direction from our side).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from fastsip.sdp.session import (
    DIRECTIONS,
    Connection,
    Media,
    Origin,
    RtpMap,
    SdpError,
    SessionDescription,
)

RTP_PROFILES = ("RTP/AVP", "RTP/AVPF", "RTP/SAVP", "RTP/SAVPF")


@dataclass(frozen=True)
class Codec:
    """An encoding we can use; ``payload_type`` is its static number or a preferred dynamic one."""

    name: str
    clock_rate: int = 8000
    channels: int | None = None
    fmtp: str | None = None
    payload_type: int | None = None

    def matches(self, rtpmap: RtpMap) -> bool:
        return (rtpmap.encoding.lower() == self.name.lower()
                and rtpmap.clock_rate == self.clock_rate
                and (rtpmap.channels or 1) == (self.channels or 1))


PCMU = Codec("PCMU", 8000, payload_type=0)
PCMA = Codec("PCMA", 8000, payload_type=8)
G722 = Codec("G722", 8000, payload_type=9)
TELEPHONE_EVENT = Codec("telephone-event", 8000, fmtp="0-16", payload_type=101)


def _is_event(rtpmap: RtpMap) -> bool:
    return rtpmap.encoding.lower() == "telephone-event"


def _connection(address: str) -> Connection:
    return Connection(address, "IN", "IP6" if ":" in address else "IP4")


def _media_lines(media: Media, codecs: list[tuple[int, Codec | RtpMap, str | None]],
                 ptime: int | None, direction: str) -> None:
    media.formats = [str(pt) for pt, _, _ in codecs]
    for pt, c, fmtp in codecs:
        if isinstance(c, Codec):
            rtpmap = RtpMap(pt, c.name, c.clock_rate, c.channels)
        else:
            rtpmap = RtpMap(pt, c.encoding, c.clock_rate, c.channels)
        media.attributes.append(("rtpmap", str(rtpmap)))
        if fmtp:
            media.attributes.append(("fmtp", f"{pt} {fmtp}"))
    if ptime:
        media.attributes.append(("ptime", str(ptime)))
    media.attributes.append((direction, None))


def create_offer(address: str, port: int, codecs: Sequence[Codec] = (PCMU, PCMA), *,
                 ptime: int | None = 20, telephone_event: bool = True,
                 direction: str = "sendrecv", username: str = "-",
                 session_id: int | None = None, session_name: str = "-") -> SessionDescription:
    """An offer with one audio stream on ``address:port`` listing ``codecs`` in preference order."""
    if direction not in DIRECTIONS:
        raise ValueError(f"not a direction: {direction}")
    wanted = list(codecs) + ([TELEPHONE_EVENT] if telephone_event else [])
    used = {c.payload_type for c in wanted if c.payload_type is not None and c.payload_type < 96}
    entries: list[tuple[int, Codec | RtpMap, str | None]] = []
    next_dynamic = 96
    for c in wanted:
        pt = c.payload_type
        if pt is None or pt in {e[0] for e in entries}:
            while next_dynamic in used or next_dynamic in {e[0] for e in entries}:
                next_dynamic += 1
            pt = next_dynamic
        entries.append((pt, c, c.fmtp))
    sid = secrets.randbits(62) if session_id is None else session_id
    sd = SessionDescription(Origin(username, sid, sid, "IN", _connection(address).addrtype, address),
                            session_name, connection=_connection(address))
    media = Media("audio", port, "RTP/AVP", [])
    _media_lines(media, entries, ptime, direction)
    sd.media.append(media)
    return sd


def answer_direction(offered: str | None, wanted: str = "sendrecv") -> str:
    """RFC 3264 §6.1: the answer's direction given the offer's and what we want."""
    offered = offered or "sendrecv"
    send = wanted in ("sendrecv", "sendonly") and offered in ("sendrecv", "recvonly")
    recv = wanted in ("sendrecv", "recvonly") and offered in ("sendrecv", "sendonly")
    return {(True, True): "sendrecv", (True, False): "sendonly",
            (False, True): "recvonly", (False, False): "inactive"}[(send, recv)]


def create_answer(offer: SessionDescription, address: str, port: int,
                  codecs: Sequence[Codec] = (PCMU, PCMA), *, ptime: int | None = None,
                  telephone_event: bool = True, direction: str = "sendrecv",
                  single_codec: bool = False, username: str = "-",
                  session_id: int | None = None) -> SessionDescription:
    """The answer to ``offer``: for each offered stream, the common codecs in the offer's order
    (with the offer's payload type numbers), or the stream rejected with port 0 (§6)."""
    sid = secrets.randbits(62) if session_id is None else session_id
    answer = SessionDescription(
        Origin(username, sid, sid, "IN", _connection(address).addrtype, address),
        offer.session_name if offer.session_name else "-", connection=_connection(address),
        times=list(offer.times))
    session_dir = offer.direction
    for m in offer.media:
        accepted: list[tuple[int, Codec | RtpMap, str | None]] = []
        if m.media == "audio" and m.port != 0 and m.proto in RTP_PROFILES:
            maps, fmtps = m.rtpmaps, m.fmtp
            for pt in m.payload_types:
                rtpmap = maps.get(pt)
                if rtpmap is None or _is_event(rtpmap):
                    continue
                if any(c.matches(rtpmap) for c in codecs):
                    accepted.append((pt, rtpmap, fmtps.get(pt)))
            if single_codec:
                accepted = accepted[:1]
            if accepted and telephone_event:
                rate = accepted[0][1].clock_rate
                for pt in m.payload_types:
                    rtpmap = maps.get(pt)
                    if rtpmap is not None and _is_event(rtpmap) and rtpmap.clock_rate == rate:
                        accepted.append((pt, rtpmap, fmtps.get(pt)))
                        break
        if not accepted:
            # §6: a rejected stream keeps its m= line, with port 0 and the offered formats
            answer.media.append(Media(m.media, 0, m.proto, m.formats[:1] or ["0"]))
            continue
        media = Media("audio", port, m.proto, [])
        offered_dir = m.direction or session_dir
        if _held_by_address(offer, m):
            offered_dir = "sendonly" if offered_dir in (None, "sendrecv") else offered_dir
        _media_lines(media, accepted, ptime or m.ptime, answer_direction(offered_dir, direction))
        answer.media.append(media)
    return answer


def _held_by_address(sd: SessionDescription, m: Media) -> bool:
    # RFC 2543 hold, still sent by old devices: a connection address of 0.0.0.0
    conn = sd.media_connection(m)
    return conn is not None and conn.host in ("0.0.0.0", "::")


@dataclass(frozen=True)
class NegotiatedMedia:
    """What one accepted stream uses, seen from our side."""

    index: int
    payload_type: int
    codec: RtpMap
    fmtp: str | None
    ptime: int                       # milliseconds we packetize with
    telephone_event: int | None      # RFC 4733 payload type, if agreed
    remote_address: str
    remote_port: int
    direction: str                   # sendrecv / sendonly / recvonly / inactive, for us

    @property
    def send(self) -> bool:
        return self.direction in ("sendrecv", "sendonly")

    @property
    def recv(self) -> bool:
        return self.direction in ("sendrecv", "recvonly")


def negotiate(local: SessionDescription, remote: SessionDescription, *,
              default_ptime: int = 20) -> list[NegotiatedMedia | None]:
    """Per m= line of an offer/answer pair (either way round): the agreed stream, or None
    where it was rejected.  The codec is the answer's first; both descriptions must list it."""
    if len(local.media) != len(remote.media):
        raise SdpError("offer and answer have different numbers of m= lines (RFC 3264 §6)")
    out: list[NegotiatedMedia | None] = []
    for i, (lm, rm) in enumerate(zip(local.media, remote.media)):
        if lm.port == 0 or rm.port == 0:
            out.append(None)
            continue
        lmaps, rmaps = lm.rtpmaps, rm.rtpmaps
        chosen = None
        for pt in rm.payload_types:
            if pt in rmaps and pt in lmaps and not _is_event(rmaps[pt]):
                chosen = pt
                break
        if chosen is None:
            out.append(None)
            continue
        te = next((pt for pt in rm.payload_types
                   if pt in rmaps and _is_event(rmaps[pt]) and pt in lmaps), None)
        ldir = lm.direction or local.direction or "sendrecv"
        rdir = rm.direction or remote.direction or "sendrecv"
        if _held_by_address(remote, rm):
            rdir = "sendonly" if rdir == "sendrecv" else ("inactive" if rdir == "recvonly" else rdir)
        send = ldir in ("sendrecv", "sendonly") and rdir in ("sendrecv", "recvonly")
        recv = ldir in ("sendrecv", "recvonly") and rdir in ("sendrecv", "sendonly")
        direction = {(True, True): "sendrecv", (True, False): "sendonly",
                     (False, True): "recvonly", (False, False): "inactive"}[(send, recv)]
        conn = remote.media_connection(rm)
        out.append(NegotiatedMedia(
            index=i, payload_type=chosen, codec=rmaps[chosen], fmtp=rm.fmtp.get(chosen),
            ptime=rm.ptime or lm.ptime or default_ptime, telephone_event=te,
            remote_address=conn.host if conn else "", remote_port=rm.port, direction=direction))
    return out


def _bumped(sd: SessionDescription) -> SessionDescription:
    new = copy.deepcopy(sd)
    new.origin.session_version += 1      # §8: a changed description gets a new version
    return new


def hold(sd: SessionDescription) -> SessionDescription:
    """A re-offer putting every stream on hold (RFC 3264 §8.4): sendrecv becomes sendonly,
    recvonly becomes inactive."""
    new = _bumped(sd)
    for m in new.media:
        if m.port == 0:
            continue
        current = m.direction or sd.direction or "sendrecv"
        m.set_direction("sendonly" if current in ("sendrecv", "sendonly") else "inactive")
    return new


def resume(sd: SessionDescription) -> SessionDescription:
    """A re-offer taking every stream off hold (sendrecv)."""
    new = _bumped(sd)
    for m in new.media:
        if m.port != 0:
            m.set_direction("sendrecv")
    return new


def is_on_hold(sd: SessionDescription) -> bool:
    """True when no active stream asks to receive media (sendonly/inactive, or c=0.0.0.0)."""
    active = [m for m in sd.media if m.port != 0]
    if not active:
        return False
    for m in active:
        direction = m.direction or sd.direction or "sendrecv"
        if direction in ("sendrecv", "recvonly") and not _held_by_address(sd, m):
            return False
    return True

"""Calls, monologues and media of the relay, and the SDP rewrite (sans-IO).

The model is rtpengine's: a *call* (one SIP Call-ID) holds *monologues*, one per SIP tag; a
monologue holds one *media* per ``m=`` line of its SDP, and each relayed media owns a
:class:`LegPair` of the media plane: an RTP and an RTCP socket that face *that monologue's*
endpoint (they receive from it and send to it).  An offer from tag A towards B therefore:

* learns A's endpoint from A's SDP and points A's legs at it (:meth:`MediaPlane.set_peer`);
* opens the pairs for both sides of every new media (A-facing on the first ``direction``
  interface, B-facing on the second) and bridges A's legs to B's, so B's early media already
  reaches A;
* rewrites A's SDP for B with B-facing addresses and ports.

The answer from B learns B's endpoint and rewrites B's SDP for A with A-facing addresses and
ports.  A re-offer (from either side) re-uses the pairs already open, so the ports it advertises
do not change.  Times are seconds since the epoch, passed in (``now``): the same clock the media
plane uses for ``last_packet``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastsip.errors import FastSIPError
from fastsip.sdp.session import Media, SdpError, SessionDescription

log = logging.getLogger("fastsip.relay")


class RelayError(FastSIPError):
    """A signalling request the relay cannot carry out; ``reason`` is the ng ``error-reason``."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class MediaPlaneFull(FastSIPError):
    """The media plane has no free RTP/RTCP port pair (on the interface asked for)."""


@dataclass(frozen=True)
class LegPair:
    """An RTP leg and its RTCP leg, bound on one interface, as the media plane opened them."""

    rtp: int  # leg ids (opaque to this module)
    rtcp: int
    address: str  # the address to advertise in SDP (the interface's advertised address: 1:1 NAT)
    family: str  # "IP4" or "IP6"
    port: int  # the RTP port; RTCP is port + 1


class MediaPlane(Protocol):
    """The sockets and packet path, owned by the asyncio shell; this module only signals to it."""

    def open_pair(self, interface: str | None, family: str | None = None) -> LegPair:
        """Bind RTP (even port) + RTCP (port + 1) on the named interface (``None``, or a name
        the plane does not know, such as rtpengine's legacy "internal"/"external": the first
        interface of ``family``, "IP4"/"IP6"; ``family`` ``None``: any), as rtpengine falls
        back to its default interface.  Raises :class:`MediaPlaneFull` when no pair is free."""
        ...

    def set_peer(self, leg: int, host: str, port: int) -> None:
        """The address the SDP names for the remote end of ``leg`` (latching may override it)."""
        ...

    def bridge(self, leg_a: int, leg_b: int) -> None:
        """Packets arriving on ``leg_a`` leave from ``leg_b``'s socket to its peer, and back.
        Bridging a leg again replaces its previous bridge (a re-INVITE to a new party)."""
        ...

    def set_clock_rate(self, leg: int, rate: int) -> None:
        """The RTP clock rate of what arrives on ``leg``, for RFC 3550 interarrival jitter."""
        ...

    def set_latching(self, leg: int, mode: str) -> None:
        """How ``leg`` learns its remote end: ``"first"`` (symmetric RTP: the first source,
        the default), ``"strict"`` (then drop every other source: rtpengine's strict-source)
        or ``"off"`` (the SDP address only: rtpengine's asymmetric)."""
        ...

    def leg_stats(self, leg: int) -> dict[str, Any]:
        """``packets``, ``bytes``, ``errors``, ``last_packet`` (0: none), ``peer`` ((host, port)
        or None), ``latched``, ``ssrc``, ``lost``, ``jitter`` (ms)."""
        ...

    def close(self, leg: int) -> None:
        """Release the leg's socket."""
        ...


#: Attributes of ICE (RFC 8445/8839) and trickle ICE (RFC 8840) that go when ICE is removed.
ICE_ATTRIBUTES = frozenset({
    "candidate", "ice-ufrag", "ice-pwd", "ice-options", "ice-lite", "ice-mismatch",
    "remote-candidates", "end-of-candidates", "ice-pacing",
})
EXTMAP_ATTRIBUTES = frozenset({"extmap", "extmap-allow-mixed"})
#: The ``a=`` attribute that marks an SDP this relay already rewrote (rtpengine's loop-protect).
LOOP_ATTRIBUTE = "rtpengine"
_UDP_PROTO = re.compile(r"(^|/)(RTP|UDP|udptl)(/|$)", re.IGNORECASE)


def _relayable(proto: str) -> bool:
    """Datagram media this relay can carry: RTP over UDP, UDPTL; not RFC 4571 TCP framing."""
    return bool(_UDP_PROTO.search(proto)) and not proto.upper().startswith("TCP")


@dataclass(frozen=True)
class SignalOptions:
    """What one offer or answer asks of the relay, already read from the ng dictionary."""

    #: Use the SDP addresses (rtpengine's default); ``False``: use ``received_from``'s address
    #: (the SIP source) with the SDP ports; ``None``: the registry's default.
    trust_address: bool | None = None
    received_from: tuple[str, str] | None = None  # ("IP4", "192.0.2.1")
    direction: tuple[str | None, str | None] = (None, None)  # (sender's side, receiver's side)
    address_family: str | None = None  # "IP4"/"IP6" for the rewritten SDP
    media_address: str | None = None  # advertised in the rewritten SDP instead of the interface's
    replace_origin: bool = False
    replace_sdp_version: bool = False
    force_increment_sdp_version: bool = False
    replace_zero_address: bool = False
    rtcp_attribute: str = "short"  # "short" a=rtcp:PORT, "full" with address, "none"
    strip_ice: bool = True
    strip_extmap: bool = False  # rtpengine's "strip extmap": drop a=extmap (RFC 8285) lines
    rtcp_mux_reject: bool = False
    transport_protocol: str | None = None  # "RTP/AVP", "RTP/AVPF", or "accept" in answers
    loop_protect: bool = False
    label: str | None = None
    via_branch: str | None = None
    asymmetric: bool = False
    strict_source: bool = False
    media_handover: bool = False
    codec_strip: frozenset[str] = frozenset()
    single_codec: bool = False


@dataclass
class CallMedia:
    """One ``m=`` line of a monologue: its type, protocol, endpoint and the legs facing it."""

    index: int  # 1-based, as rtpengine reports it
    type: str
    protocol: str
    pair: LegPair | None = None
    #: The endpoint the SDP advertised (RTP and RTCP); None before an SDP named one.
    rtp_endpoint: tuple[str, int] | None = None
    rtcp_endpoint: tuple[str, int] | None = None
    interface: str | None = None
    clock_rate: int = 8000
    rtcp_mux: bool = False
    asymmetric: bool = False
    strict_source: bool = False
    media_handover: bool = False
    bridged_to: int | None = None  # the RTP leg this media's RTP leg is bridged to

    @property
    def legs(self) -> tuple[int, ...]:
        return () if self.pair is None else (self.pair.rtp, self.pair.rtcp)


@dataclass
class Monologue:
    """One participant of a call, named by its SIP tag ("" until its tag is known)."""

    tag: str
    created: float
    partner: Monologue | None = None  # rtpengine's "in dialogue with"
    medias: list[CallMedia] = field(default_factory=list)
    label: str | None = None
    via_branch: str | None = None
    interface: str | None = None
    aliases: list[str] = field(default_factory=list)
    #: The last SDP body sent *to* this monologue (without o=) and its o= version, for
    #: ``replace: SDP version``.
    sent_body: str | None = None
    sent_version: int | None = None

    @property
    def legs(self) -> list[int]:
        return [leg for m in self.medias for leg in m.legs]


@dataclass
class Call:
    """Everything the relay holds for one Call-ID."""

    call_id: str
    created: float
    last_signal: float
    monologues: list[Monologue] = field(default_factory=list)
    by_tag: dict[str, Monologue] = field(default_factory=dict)

    def monologue(self, tag: str) -> Monologue | None:
        return self.by_tag.get(tag) if tag else None

    @property
    def legs(self) -> list[int]:
        return [leg for ml in self.monologues for leg in ml.legs]


def _is_zero(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _family_of(host: str) -> str:
    return "IP6" if ":" in host else "IP4"


def _lines(text: str) -> list[str]:
    """The SDP's lines with their own line ends, so untouched lines come back byte-identical."""
    out = text.split("\n")
    tail = out.pop()
    lines = [line + "\n" for line in out]
    if tail:
        lines.append(tail)
    return lines


def _attr(line: str) -> tuple[str, str | None] | None:
    """(name, value) of an ``a=`` line, None for other lines."""
    if not line.startswith("a="):
        return None
    name, sep, value = line[2:].rstrip("\r\n").partition(":")
    return name, (value if sep else None)


class CallRegistry:
    """All calls of the relay, keyed by Call-ID; signalling in, media plane calls out."""

    def __init__(self, plane: MediaPlane, *, sip_source: bool = False,
                 instance_id: str | None = None, max_calls: int = 100_000,
                 max_monologues: int = 32, max_media: int = 32) -> None:
        self.plane = plane
        #: Bounds on what one control agent can make us hold (each media costs 4 ports).
        self.max_monologues = max_monologues
        self.max_media = max_media
        #: rtpengine's ``--sip-source``: distrust SDP addresses unless "trust address" is given.
        self.sip_source = sip_source
        self.instance_id = instance_id or secrets.token_hex(6)
        self.max_calls = max_calls
        self.calls: dict[str, Call] = {}

    # -- look-ups ------------------------------------------------------------------------------
    def get(self, call_id: str) -> Call | None:
        return self.calls.get(call_id)

    def __len__(self) -> int:
        return len(self.calls)

    def list_calls(self, limit: int = 32) -> list[str]:
        return list(self.calls)[:max(limit, 0)]

    # -- signalling ----------------------------------------------------------------------------
    def offer(self, call_id: str, from_tag: str, to_tag: str | None, sdp: str,
              options: SignalOptions, now: float) -> str:
        """An SDP offer from ``from_tag``: returns the SDP to forward to the other side."""
        if to_tag == from_tag:
            raise RelayError("Invalid dialogue association")
        call = self.calls.get(call_id)
        created = call is None
        if call is None:
            if len(self.calls) >= self.max_calls:
                raise RelayError("Parallel session limit reached")
            call = Call(call_id, now, now)
        source = call.monologue(from_tag)
        if source is None:
            source = self._new_monologue(call, from_tag, now)
        sink: Monologue | None = call.monologue(to_tag) if to_tag else None
        if sink is None:
            partner = source.partner
            if partner is not None and (not to_tag or not partner.tag):
                sink = partner
                if to_tag:
                    self._set_tag(call, sink, to_tag)
            else:
                sink = self._new_monologue(call, to_tag or "", now)
        self._link(source, sink)
        if options.direction[0] is not None:
            source.interface = options.direction[0]
        if options.direction[1] is not None:
            sink.interface = options.direction[1]
        try:
            out = self._signal(call, source, sink, sdp, options, offer=True)
        except RelayError:
            if created:
                self._free(call)
            raise
        if created:
            self.calls[call_id] = call
            log.info("call %s created by offer from tag %r", call_id, from_tag)
        call.last_signal = now
        return out

    def answer(self, call_id: str, from_tag: str, to_tag: str, sdp: str,
               options: SignalOptions, now: float) -> str:
        """The SDP answer from ``to_tag`` to ``from_tag``'s offer: returns the SDP for the
        offerer."""
        call = self.calls.get(call_id)
        if call is None:
            raise RelayError("Unknown call-id")
        offerer = call.monologue(from_tag)
        if offerer is None or offerer.partner is None:
            raise RelayError("Invalid dialogue association")
        answerer = call.monologue(to_tag)
        if answerer is None:
            answerer = offerer.partner
            if not answerer.tag:
                self._set_tag(call, answerer, to_tag)
            else:
                # a second answer (another fork, or a new To tag): an alias of the same side,
                # as rtpengine does unless "new branch" is asked for
                answerer.aliases.append(to_tag)
                call.by_tag[to_tag] = answerer
        elif answerer.partner is not offerer:
            raise RelayError("Invalid dialogue association")
        out = self._signal(call, answerer, offerer, sdp, options, offer=False)
        call.last_signal = now
        return out

    def delete(self, call: Call, from_tag: str | None = None, to_tag: str | None = None) -> bool:
        """Free the dialogue of ``from_tag`` (and its partner; with ``to_tag``, only if that is
        the partner), or the whole call without a tag.  False if the tags did not match."""
        if not from_tag:
            self._free(call)
            return True
        source = call.monologue(from_tag)
        if source is None:
            return False
        doomed = [source]
        if to_tag:
            partner = call.monologue(to_tag)
            if partner is None or (source.partner is not partner and partner is not source):
                return False
        if source.partner is not None:
            doomed.append(source.partner)
        for ml in doomed:
            self._free_monologue(call, ml)
        if not call.monologues or all(not ml.medias for ml in call.monologues):
            self._free(call)
        return True

    def expire(self, now: float, timeout: float) -> list[Call]:
        """Free and return the calls with no packet on any leg (and no signalling) for
        ``timeout`` seconds; a call younger than ``timeout`` is never expired."""
        expired = []
        horizon = now - timeout
        for call in list(self.calls.values()):
            if call.created > horizon or call.last_signal > horizon:
                continue
            last = max((float(self.plane.leg_stats(leg).get("last_packet") or 0)
                        for leg in call.legs), default=0.0)
            if last > horizon:
                continue
            self._free(call)
            expired.append(call)
        return expired

    # -- monologue bookkeeping -----------------------------------------------------------------
    def _new_monologue(self, call: Call, tag: str, now: float) -> Monologue:
        if len(call.monologues) >= self.max_monologues:
            raise RelayError(f"Too many call participants (more than {self.max_monologues})")
        ml = Monologue(tag, now)
        call.monologues.append(ml)
        if tag:
            call.by_tag[tag] = ml
        return ml

    @staticmethod
    def _set_tag(call: Call, ml: Monologue, tag: str) -> None:
        ml.tag = tag
        call.by_tag[tag] = ml

    @staticmethod
    def _link(a: Monologue, b: Monologue) -> None:
        for ml in (a, b):
            old = ml.partner
            if old is not None and old is not a and old is not b:
                old.partner = None
        a.partner, b.partner = b, a

    def _close_media(self, media: CallMedia) -> None:
        for leg in media.legs:
            self.plane.close(leg)
        media.pair = None
        media.bridged_to = None

    def _free_monologue(self, call: Call, ml: Monologue) -> None:
        for media in ml.medias:
            self._close_media(media)
        ml.medias = []
        if ml in call.monologues:
            call.monologues.remove(ml)
        for tag in [t for t, m in call.by_tag.items() if m is ml]:
            del call.by_tag[tag]
        if ml.partner is not None and ml.partner.partner is ml:
            ml.partner.partner = None

    def _free(self, call: Call) -> None:
        for ml in call.monologues:
            for media in ml.medias:
                self._close_media(media)
        if self.calls.get(call.call_id) is call:
            del self.calls[call.call_id]
            log.info("call %s freed", call.call_id)

    # -- the SDP work --------------------------------------------------------------------------
    def _signal(self, call: Call, source: Monologue, sink: Monologue, sdp: str,
                options: SignalOptions, *, offer: bool) -> str:
        try:
            parsed = SessionDescription.parse(sdp)
        except SdpError as e:
            log.info("call %s: SDP refused: %s", call.call_id, e)
            raise RelayError("Failed to parse SDP") from None
        if len(parsed.media) > self.max_media:
            raise RelayError(f"Too many media sections (more than {self.max_media})")
        if options.loop_protect and any(
                name == LOOP_ATTRIBUTE and value == self.instance_id
                for name, value in parsed.attributes):
            log.info("call %s: SDP already rewritten by this relay, passed unchanged",
                     call.call_id)
            return sdp
        if options.label is not None:
            source.label = options.label
        if options.via_branch is not None:
            source.via_branch = options.via_branch
        lines = _lines(sdp)
        eol = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
        session, sections = self._split(lines)
        if len(sections) != len(parsed.media):  # cannot happen: both split at m=
            raise RelayError("Incomplete SDP specification")
        if not offer and len(parsed.media) > len(sink.medias):
            raise RelayError("Incomplete SDP specification")
        opened: list[CallMedia] = []
        try:
            addresses = [self._media(call, source, sink, i, m, parsed, options, offer, opened)
                         for i, m in enumerate(parsed.media)]
        except MediaPlaneFull:
            for media in opened:
                self._close_media(media)
            log.warning("call %s: no free port pair", call.call_id)
            raise RelayError("Ran out of ports") from None
        first = next((a for a in addresses if a is not None), None)
        # what the session-level c= says after the rewrite (None: there is none)
        conn = parsed.connection
        session_shown: tuple[str, str] | None = None
        if conn is not None:
            keep = first is None or (_is_zero(conn.host) and not options.replace_zero_address)
            session_shown = (conn.host, conn.addrtype) if keep or first is None else first
        out = self._rewrite_session(session, parsed, first, session_shown, options, eol)
        for i, section in enumerate(sections):
            out += self._rewrite_media(section, parsed.media[i], sink.medias[i]
                                       if i < len(sink.medias) else None,
                                       addresses[i], session_shown, parsed, options, offer, eol)
        text = "".join(out)
        return self._version(text, sink, options, eol)

    @staticmethod
    def _split(lines: list[str]) -> tuple[list[str], list[list[str]]]:
        session: list[str] = []
        sections: list[list[str]] = []
        for line in lines:
            if line.startswith("m="):
                sections.append([line])
            elif sections:
                sections[-1].append(line)
            else:
                session.append(line)
        return session, sections

    def _media(self, call: Call, source: Monologue, sink: Monologue, i: int, m: Media,
               parsed: SessionDescription, options: SignalOptions, offer: bool,
               opened: list[CallMedia]) -> tuple[str, str] | None:
        """Set up media ``i`` from ``source``'s SDP; returns the (address, family) to advertise
        to ``sink``, or None when the section passes unrelayed (port 0, or not UDP)."""
        for ml in (source, sink):
            while len(ml.medias) <= i:
                ml.medias.append(CallMedia(len(ml.medias) + 1, m.media, m.proto))
        mine, theirs = source.medias[i], sink.medias[i]
        mine.type = m.media
        mine.protocol = m.proto
        if offer and theirs.pair is None:
            theirs.type = m.media
            theirs.protocol = options.transport_protocol if options.transport_protocol in (
                "RTP/AVP", "RTP/AVPF") else m.proto
        if m.port == 0 or not _relayable(m.proto):
            # a rejected (or non-UDP) stream: nothing to relay; a rejection frees both sides
            if m.port == 0:
                self._close_media(mine)
                self._close_media(theirs)
            return None
        if mine.pair is None or theirs.pair is None:
            if not offer:
                return None  # the offer rejected this stream: the answer must too
            conn = parsed.media_connection(m)
            source_family = conn.addrtype if conn else "IP4"
            for media, ml, family in (
                    (mine, source, source_family),
                    (theirs, sink, options.address_family or source_family)):
                if media.pair is None:
                    media.interface = ml.interface
                    media.pair = self.plane.open_pair(ml.interface, family)
                    opened.append(media)
        assert mine.pair is not None and theirs.pair is not None
        if mine.bridged_to != theirs.pair.rtp:
            self.plane.bridge(mine.pair.rtp, theirs.pair.rtp)
            self.plane.bridge(mine.pair.rtcp, theirs.pair.rtcp)
            mine.bridged_to, theirs.bridged_to = theirs.pair.rtp, mine.pair.rtp
        self._learn_endpoint(call, mine, m, parsed, options)
        for media in (mine, theirs):
            media.asymmetric = media.asymmetric or options.asymmetric
            media.strict_source = media.strict_source or options.strict_source
            media.media_handover = media.media_handover or options.media_handover
            mode = "strict" if media.strict_source else "off" if media.asymmetric else "first"
            assert media.pair is not None
            self.plane.set_latching(media.pair.rtp, mode)
            self.plane.set_latching(media.pair.rtcp, mode)
        address = options.media_address or theirs.pair.address
        return address, _family_of(address)

    def _learn_endpoint(self, call: Call, media: CallMedia, m: Media,
                        parsed: SessionDescription, options: SignalOptions) -> None:
        """Point ``media``'s legs at the endpoint its SDP names (or the SIP source's address)."""
        assert media.pair is not None
        conn = parsed.media_connection(m)
        host = conn.host if conn else None
        trust = options.trust_address
        if trust is None:
            trust = not self.sip_source
        if not trust and options.received_from is not None:
            host = options.received_from[1]
        rtcp_host, rtcp_port = host, m.port + 1
        rtcp = m.attribute("rtcp")
        if rtcp:
            fields = rtcp.split()
            try:
                rtcp_port = int(fields[0])
            except ValueError:
                rtcp_port = m.port + 1
            if trust and len(fields) >= 4:
                rtcp_host = fields[3]
        media.rtcp_mux = m.attribute("rtcp-mux") is not None
        try:
            rates = m.rtpmaps
            media.clock_rate = rates[m.payload_types[0]].clock_rate if m.payload_types and \
                m.payload_types[0] in rates else media.clock_rate
        except SdpError:
            pass
        self.plane.set_clock_rate(media.pair.rtp, media.clock_rate)
        if host is None or _is_zero(host):
            media.rtp_endpoint = media.rtcp_endpoint = None
            log.debug("call %s: media %d has no address (hold)", call.call_id, media.index)
            return
        media.rtp_endpoint = (host, m.port)
        self.plane.set_peer(media.pair.rtp, host, m.port)
        if rtcp_host is not None and not _is_zero(rtcp_host):
            media.rtcp_endpoint = (rtcp_host, rtcp_port)
            self.plane.set_peer(media.pair.rtcp, rtcp_host, rtcp_port)

    def _rewrite_session(self, lines: list[str], parsed: SessionDescription,
                         first: tuple[str, str] | None, session_shown: tuple[str, str] | None,
                         options: SignalOptions, eol: str) -> list[str]:
        out: list[str] = []
        for line in lines:
            attr = _attr(line)
            if attr is not None:
                if options.strip_ice and attr[0] in ICE_ATTRIBUTES:
                    continue
                if options.strip_extmap and attr[0] in EXTMAP_ATTRIBUTES:
                    continue
                if attr[0] == LOOP_ATTRIBUTE:
                    continue  # another relay's (or an old) mark: ours replaces it
            elif session_shown is not None and line.startswith("c="):
                if session_shown != (parsed.connection.host if parsed.connection else None,
                                     parsed.connection.addrtype if parsed.connection else None):
                    line = f"c=IN {session_shown[1]} {session_shown[0]}{eol}"
            elif first is not None and line.startswith("o=") and options.replace_origin:
                o = parsed.origin
                line = (f"o={o.username} {o.session_id} {o.session_version} IN {first[1]} "
                        f"{first[0]}{eol}")
            out.append(line)
        if options.loop_protect:
            out.append(f"a={LOOP_ATTRIBUTE}:{self.instance_id}{eol}")
        return out

    def _rewrite_media(self, lines: list[str], m: Media, theirs: CallMedia | None,
                       address: tuple[str, str] | None, session_shown: tuple[str, str] | None,
                       parsed: SessionDescription, options: SignalOptions, offer: bool,
                       eol: str) -> list[str]:
        strip_ice = options.strip_ice
        if address is None or theirs is None or theirs.pair is None:
            out = [line for line in lines
                   if not (strip_ice and (_attr(line) or ("", None))[0] in ICE_ATTRIBUTES)]
            if m.port != 0 and (theirs is None or theirs.pair is None) and not offer \
                    and _relayable(m.proto):
                # the answer accepts a stream the offer rejected: reject it here too
                out[0] = re.sub(r"^(m=\S+ )\d+", r"\g<1>0", out[0])
            conn = parsed.connection
            if m.port != 0 and m.connection is None and conn is not None \
                    and session_shown != (conn.host, conn.addrtype):
                # an unrelayed stream keeps its own endpoint when the session c= now names us
                at = 2 if len(out) > 1 and out[1].startswith("i=") else 1
                out.insert(at, f"c={conn}{eol}")
            return out
        host, family = address
        conn = m.connection or parsed.connection
        zero = conn is not None and _is_zero(conn.host) and not options.replace_zero_address
        shown_host, shown_family = (conn.host, conn.addrtype) if zero and conn else (host, family)
        port = theirs.pair.port
        proto = m.proto
        if offer and options.transport_protocol in ("RTP/AVP", "RTP/AVPF"):
            proto = options.transport_protocol
        elif not offer and options.transport_protocol != "accept":
            proto = theirs.protocol  # rtpengine: the answer keeps the offered protocol
        fields = lines[0].split()
        formats = fields[3:]
        if options.codec_strip:
            formats = self._strip_codecs(m, formats, options.codec_strip)
        if options.single_codec and not offer:
            formats = self._single_codec(m, formats)
        kept_pts = set(formats)
        m_line = " ".join([fields[0], str(port), proto, *formats]) + eol
        rtcp_mux = m.attribute("rtcp-mux") is not None and not (offer and options.rtcp_mux_reject)
        rtcp_port = port if (rtcp_mux and not offer) else port + 1
        if options.rtcp_attribute == "full":
            rtcp_line = f"a=rtcp:{rtcp_port} IN {shown_family} {shown_host}{eol}"
        else:
            rtcp_line = f"a=rtcp:{rtcp_port}{eol}"
        out = [m_line]
        had_conn = False
        rtcp_done = options.rtcp_attribute == "none"
        for line in lines[1:]:
            attr = _attr(line)
            if line.startswith("c="):
                had_conn = True
                line = f"c=IN {shown_family} {shown_host}{eol}"
            elif attr is not None:
                name, value = attr
                if strip_ice and name in ICE_ATTRIBUTES:
                    continue
                if options.strip_extmap and name in EXTMAP_ATTRIBUTES:
                    continue
                if name == "rtcp-mux" and offer and options.rtcp_mux_reject:
                    continue
                if name == "rtcp":
                    if not rtcp_done:
                        out.append(rtcp_line)
                        rtcp_done = True
                    continue
                if name in ("rtpmap", "fmtp", "rtcp-fb") and value is not None and \
                        (options.codec_strip or (options.single_codec and not offer)):
                    pt = value.split(" ", 1)[0]
                    if pt != "*" and pt not in kept_pts:
                        continue
            out.append(line)
        if not had_conn and session_shown != (shown_host, shown_family):
            at = 2 if len(out) > 1 and out[1].startswith("i=") else 1
            out.insert(at, f"c=IN {shown_family} {shown_host}{eol}")
        if not rtcp_done:
            out.append(rtcp_line)
        return out

    @staticmethod
    def _codec_names(m: Media) -> dict[str, str]:
        try:
            return {str(pt): r.encoding for pt, r in m.rtpmaps.items()}
        except SdpError:
            return {}

    def _strip_codecs(self, m: Media, formats: list[str], strip: frozenset[str]) -> list[str]:
        """rtpengine's ``codec: strip``: drop codecs by name (or payload type, or "all")."""
        names = self._codec_names(m)
        if "all" in strip or "full" in strip:
            kept: list[str] = []
        else:
            kept = [f for f in formats if f not in strip and names.get(f, "") not in strip]
        # rtpengine: stripping every codec is a usage error, the list stays as it was
        return kept or formats

    def _single_codec(self, m: Media, formats: list[str]) -> list[str]:
        """rtpengine's ``single codec``: the first codec, plus telephone-event and CN."""
        names = self._codec_names(m)
        supplemental = ("telephone-event", "CN")
        primary = [f for f in formats if names.get(f) not in supplemental][:1]
        return [f for f in formats if f in primary or names.get(f) in supplemental]

    @staticmethod
    def _version(text: str, sink: Monologue, options: SignalOptions, eol: str) -> str:
        """rtpengine's ``replace: SDP version``: the o= version counts changes sent to a peer."""
        if not (options.replace_sdp_version or options.force_increment_sdp_version):
            return text
        lines = _lines(text)
        index = next((i for i, line in enumerate(lines) if line.startswith("o=")), None)
        if index is None:
            return text
        fields = lines[index].rstrip("\r\n").split(" ")
        body = "".join(lines[:index] + lines[index + 1:])
        try:
            version = int(fields[2])
        except (IndexError, ValueError):
            return text
        if sink.sent_version is not None:
            changed = body != sink.sent_body or options.force_increment_sdp_version
            version = sink.sent_version + 1 if changed else sink.sent_version
        elif options.force_increment_sdp_version:
            version += 1
        sink.sent_body, sink.sent_version = body, version
        fields[2] = str(version)
        lines[index] = " ".join(fields) + eol
        return "".join(lines)

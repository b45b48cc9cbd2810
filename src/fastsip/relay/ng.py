"""rtpengine's ng control protocol, sans-IO: a datagram in, the reply datagram out.

A datagram is ``COOKIE SP DICTIONARY``: the cookie is echoed in the reply and is how the SIP
proxy matches replies and how retransmissions are recognised; the dictionary is bencoded (JSON
is also accepted, as rtpengine does).  :class:`NgControl` implements ``ping``, ``offer``,
``answer``, ``delete``, ``query`` and ``list`` over a :class:`~fastsip.relay.calls.CallRegistry`,
with rtpengine's reply shapes and error wordings, so Kamailio's ``rtpengine`` module can drive
it unchanged.

Options are read the way rtpengine reads them: dictionary keys and flags match with ``-``,
``_`` and space interchangeable and case ignored (``received-from`` = ``received from``).  Each
option is either *implemented*, *accepted and ignored* (harmless for a relay that forwards
packets unchanged, listed in :data:`IGNORED_FLAGS` / :data:`IGNORED_KEYS`) or *refused* with an
error naming it (it asks for something this relay cannot do: SRTP/DTLS termination,
transcoding, ICE, recording...).  Unknown options are logged and ignored, as rtpengine does.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastsip.relay.bencode import BencodeError, decode, encode
from fastsip.relay.calls import Call, CallMedia, CallRegistry, Monologue, RelayError, SignalOptions

log = logging.getLogger("fastsip.relay")

#: Cookies longer than this are not from a real control agent (Kamailio's are ~20 bytes).
MAX_COOKIE = 256
#: rtpengine keeps replies for 30 to 60 s (two generations of 30 s); Kamailio's retransmits
#: come within its ``rtpengine_tout_ms`` times ``rtpengine_retr``, a few seconds.
CACHE_TTL = 30.0
CACHE_SIZE = 8192
MAX_DATAGRAM = 65535

# -- the options, in rtpengine's vocabulary (normalised: lower case, single spaces) --------------

#: Flags that change what this relay does.
IMPLEMENTED_FLAGS = frozenset({
    "trust address", "sip source address", "symmetric", "asymmetric", "strict source",
    "media handover", "loop protect", "no rtcp attribute", "full rtcp attribute", "reject ice",
    "single codec", "strip extmap", "fatal", "fast", "to tag",
})
#: Flags accepted and ignored: they tune features this relay does not have, and ignoring them
#: changes nothing on the wire (latching is always on; direction attributes always pass
#: unchanged; no SRTP, codec or Redis state exists to reset or reuse).
IGNORED_FLAGS = frozenset({
    "port latching", "no port latching", "original sendrecv", "reset", "directional",
    "provisional", "new branch", "debug", "debugging", "no redis update", "trickle ice",
    "unidirectional", "nat wait", "pierce nat", "reuse codecs", "no codec renegotiation",
    "static codecs", "static codec", "allow asymmetric codecs", "allow no codec media",
    "symmetric codecs", "asymmetric codecs", "no passthrough", "passthrough",
    "no jitter buffer", "no tls id", "early media", "skip recording db", "discard recording",
    "exclude recording", "all", "pad crypto", "recrypt", "egress", "allow transcoding",
    "block short", "block short packets", "generate mid", "inactive", "bidirectional", "mix",
})
#: Flags refused: each asks for media processing this relay does not do.
REFUSED_FLAGS = {
    "record call": "call recording",
    "always transcode": "transcoding",
    "force transcoding": "transcoding",
    "inject dtmf": "DTMF injection",
    "detect dtmf": "DTMF detection",
    "block dtmf": "DTMF blocking",
    "block egress": "media playback",
    "generate rtcp": "RTCP generation",
    "webrtc": "WebRTC (ICE, DTLS-SRTP)",
    "recording announcement": "call recording",
    "siprec": "SIPREC recording",
    "fragment": "trickle ICE SDP fragments (ICE)",
    "rtcp mirror": "media subscriptions",
}
#: Dictionary keys accepted and ignored (routing hints and settings of absent features).
IGNORED_KEYS = frozenset({
    "command", "supports", "sip message type", "sip code", "delete delay", "all", "tos",
    "xmlrpc callback", "metadata", "endpoint learning", "set label", "to label", "template",
    "alias key", "sdes", "dtls", "dtls fingerprint", "dtls reverse", "interface",
    "sip response code", "volume", "frequency", "frequencies", "trigger", "trigger end",
    "end trigger", "trigger end time", "trigger end digits", "digit", "code", "from tags",
    "output destination", "recording path", "recording pattern", "recording file", "limit",
    "db id", "t.38 version", "t38 version", "inbound peer", "outbound peer", "peer",
})


def _norm(name: str) -> str:
    """rtpengine's equivalences: ``received-from`` = ``received_from`` = ``Received From``."""
    return " ".join(re.split(r"[-_ ]+", name.strip().lower()))


def _text(value: Any) -> str | None:
    """A string option (bencode gives bytes; JSON gives str); None when it is not a string."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _texts(value: Any) -> list[str]:
    """A list-of-strings option; a lone string counts as a one-element list."""
    if isinstance(value, list):
        return [t for t in (_text(v) for v in value) if t is not None]
    one = _text(value)
    return [one] if one is not None else []


def _normalise(obj: Any, depth: int = 0) -> Any:
    """Decoded bencode/JSON to str-keyed dicts with normalised keys (bytes values kept)."""
    if depth > 40:
        return None
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            key = _text(k)
            if key is not None:
                out.setdefault(_norm(key), _normalise(v, depth + 1))
        return out
    if isinstance(obj, list):
        return [_normalise(v, depth + 1) for v in obj]
    return obj


def _wire(obj: Any) -> Any:
    """Reply values to bencode's types: str -> UTF-8 bytes (keeping undecodable bytes)."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape")
    if isinstance(obj, float):
        return round(obj)
    if isinstance(obj, dict):
        return {_wire(k): _wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_wire(v) for v in obj]
    return obj


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "replace")
    if isinstance(obj, str):
        return obj.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if isinstance(obj, dict):
        return {_json_ready(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


# -- rtpp-flags: the option string Kamailio may leave for the daemon to parse ---------------------

_TOKEN = re.compile(r"\s*(\[|\]|[^\s\[\]=]+=?)")


def parse_rtpp_flags(text: str, *, max_depth: int = 4, max_tokens: int = 512) -> dict[str, Any]:
    """rtpengine's daemon-side flag string: ``trust-address replace-origin ICE=remove
    codec=[strip=[PCMA G729]] direction=priv direction=pub`` to dictionary entries (bare words
    land in ``flags``).  Raises :class:`RelayError` when the brackets do not balance."""
    tokens = [t.strip() for t in _TOKEN.findall(text)]
    if len(tokens) > max_tokens:
        raise RelayError("Too many rtpp-flags")
    pos = 0

    def parse_list(depth: int) -> list[Any] | dict[str, Any]:
        nonlocal pos
        if depth > max_depth:
            raise RelayError("rtpp-flags nested too deeply")
        items: list[Any] = []
        pairs: dict[str, Any] = {}
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == "]":
                return pairs if pairs and not items else items
            if tok == "[":
                items.append(parse_list(depth + 1))
            elif tok.endswith("="):
                pairs[tok[:-1]] = value(depth)
            else:
                items.append(tok)
        if depth:
            raise RelayError("Unbalanced brackets in rtpp-flags")
        return items

    def value(depth: int) -> Any:
        nonlocal pos
        if pos >= len(tokens):
            return ""
        tok = tokens[pos]
        pos += 1
        if tok == "[":
            return parse_list(depth + 1)
        if tok == "]" or tok.endswith("="):
            raise RelayError("Bad rtpp-flags syntax")
        return tok

    out: dict[str, Any] = {}
    flags: list[str] = []
    while pos < len(tokens):
        tok = tokens[pos]
        pos += 1
        if tok.endswith("="):
            key = tok[:-1]
            val = value(1)
            if key in out:  # direction=a direction=b
                prev = out[key]
                out[key] = (prev if isinstance(prev, list) else [prev]) + [val]
            else:
                out[key] = val
        elif tok in ("[", "]"):
            raise RelayError("Bad rtpp-flags syntax")
        else:
            flags.append(tok)
    if flags:
        out["flags"] = flags
    return out


# -- option parsing -------------------------------------------------------------------------------

@dataclass
class _Flags:
    """The ``flags`` list, split into plain flags and the prefixed forms rtpengine knows."""

    plain: set[str]
    replace: set[str]
    rtcp_mux: set[str]
    codec: dict[str, list[str]]
    refused: list[str]


_PREFIXES = (
    ("codec-strip-", "codec", "strip"), ("codec-offer-", "codec", "offer"),
    ("codec-except-", "codec", "except"), ("codec-ignore-", "codec", "ignore"),
    ("codec-transcode-", "codec", "transcode"), ("transcode-", "codec", "transcode"),
    ("codec-mask-", "codec", "mask"), ("codec-accept-", "codec", "accept"),
    ("codec-consume-", "codec", "consume"), ("codec-set-", "codec", "set"),
    ("replace-", "replace", ""), ("rtcp-mux-", "rtcp-mux", ""),
    ("SDES-", "ignore", ""), ("OSRTP-", "osrtp", ""), ("T38-", "t38", ""), ("T.38-", "t38", ""),
    ("BUNDLE-", "bundle", ""), ("endpoint-learning-", "ignore", ""), ("from-tags-", "ignore", ""),
    ("sdp-attr-", "sdp-attr", ""),
)


def _split_flags(raw: list[str]) -> _Flags:
    out = _Flags(set(), set(), set(), {}, [])
    for flag in raw:
        lowered = flag.lower().replace("_", "-").replace(" ", "-")
        for prefix, kind, sub in _PREFIXES:
            if lowered.startswith(prefix.lower()):
                rest = flag[len(prefix):]
                if kind == "codec":
                    out.codec.setdefault(sub, []).append(rest)
                elif kind == "replace":
                    out.replace.add(_norm(rest))
                elif kind == "rtcp-mux":
                    out.rtcp_mux.add(_norm(rest))
                elif kind == "osrtp" and _norm(rest).startswith("offer"):
                    out.refused.append(f"OSRTP-{rest} (SRTP)")
                elif kind == "t38" and _norm(rest) in ("decode", "force"):
                    out.refused.append(f"T.38-{rest} (T.38 gateway)")
                elif kind == "bundle" and _norm(rest) in ("offer", "require", "strict"):
                    out.refused.append(f"BUNDLE-{rest} (bundling)")
                elif kind == "sdp-attr":
                    out.refused.append("sdp-attr (SDP attribute manipulation)")
                break
        else:
            out.plain.add(_norm(flag))
    return out


def _check_value(key: str, value: Any, opmode: str) -> str | None:
    """The reason an option's value is refused, or None if it is accepted."""
    text = (_text(value) or "").strip()
    norm = _norm(text)
    if key == "ice":
        for item in _texts(value):
            n = _norm(item)
            if n in ("force", "force relay", "optional"):
                return f"unsupported ICE={item} (fastsip's relay is not an ICE agent)"
    elif key == "ice lite":
        if norm not in ("", "off", "none", "no"):
            return f"unsupported ICE-lite={text} (fastsip's relay is not an ICE agent)"
    elif key == "transport protocol":
        if text not in ("RTP/AVP", "RTP/AVPF") and not (text == "accept" and opmode == "answer"):
            return f"unsupported transport-protocol {text} (no SRTP/DTLS termination)"
    elif key == "rtcp mux":
        for item in _texts(value):
            if _norm(item) in ("offer", "require", "demux"):
                return f"unsupported rtcp-mux {item} (no RTCP (de)multiplexing)"
    elif key == "record call":
        if norm in ("yes", "on", "true", "1"):
            return "unsupported record call (no call recording)"
    elif key == "osrtp":
        for item in _texts(value):
            if _norm(item).startswith("offer"):
                return f"unsupported OSRTP {item} (no SRTP)"
    elif key in ("t.38", "t38"):
        for item in _texts(value):
            if _norm(item) in ("decode", "force"):
                return f"unsupported T.38 {item} (no T.38 gateway)"
    elif key in ("ptime", "ptime reverse", "delay buffer", "dtmf delay"):
        if norm not in ("", "0"):
            return f"unsupported {key} (needs transcoding)"
    elif key == "media echo":
        return f"unsupported media echo {text}"
    elif key == "generate rtcp":
        if norm in ("on", "yes"):
            return "unsupported generate RTCP (no RTCP generation)"
    elif key == "audio player":
        if norm in ("transcoding", "always"):
            return f"unsupported audio player {text} (no media playback)"
    elif key in ("dtmf security", "dtmf security trigger", "dtmf security trigger end"):
        if norm not in ("", "off"):
            return f"unsupported {key} (no DTMF processing)"
    elif key in ("sdp attr", "sdp media remove", "extmap"):
        if value:
            return f"unsupported {key}"
    elif key == "bundle":
        for item in _texts(value):
            if _norm(item) in ("offer", "require", "strict"):
                return f"unsupported BUNDLE {item} (bundling)"
    elif key == "drop traffic":
        if norm == "start":
            return "unsupported drop-traffic start"
    elif key == "codec" and isinstance(value, dict):
        for sub, items in value.items():
            if sub in ("strip",) or not _texts(items) and not isinstance(items, dict):
                continue
            if sub in ("transcode", "mask", "consume", "accept", "set"):
                return f"unsupported codec {sub} (no transcoding)"
            return f"unsupported codec {sub}"
    return None


#: Keys whose values :func:`_check_value` inspects (the rest of the known keys are read below).
_CHECKED_KEYS = frozenset({
    "ice", "ice lite", "transport protocol", "rtcp mux", "record call", "osrtp", "t.38", "t38",
    "ptime", "ptime reverse", "delay buffer", "dtmf delay", "media echo", "generate rtcp",
    "audio player", "dtmf security", "dtmf security trigger", "dtmf security trigger end",
    "sdp attr", "sdp media remove", "extmap", "bundle", "drop traffic", "codec",
})
_READ_KEYS = frozenset({
    "sdp", "call id", "from tag", "to tag", "via branch", "flags", "replace", "direction",
    "from interface", "to interface", "received from", "address family", "media address",
    "label", "from label", "rtpp flags",
})


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def signal_options(msg: dict[str, Any], opmode: str) -> SignalOptions:
    """Read an offer/answer dictionary (normalised keys) into :class:`SignalOptions`.

    Raises :class:`RelayError` naming the option when it asks for what the relay cannot do.
    """
    for key, value in msg.items():
        if key in _CHECKED_KEYS:
            reason = _check_value(key, value, opmode)
            if reason:
                raise RelayError(reason)
        elif key not in _READ_KEYS and key not in IGNORED_KEYS:
            log.debug("ng: ignoring unknown option %r", key)
    flags = _split_flags(_texts(msg.get("flags")))
    if flags.refused:
        raise RelayError(f"unsupported flag {flags.refused[0]}")
    for flag in sorted(flags.plain):
        if flag in REFUSED_FLAGS:
            raise RelayError(f"unsupported flag {flag} ({REFUSED_FLAGS[flag]})")
        if flag not in IMPLEMENTED_FLAGS and flag not in IGNORED_FLAGS:
            log.debug("ng: ignoring unknown flag %r", flag)
    for sub, items in flags.codec.items():
        if sub != "strip":
            raise RelayError(f"unsupported flag codec-{sub}-{items[0]} "
                             f"({'no transcoding' if sub != 'offer' else 'codec reordering'})")
    for mux in flags.rtcp_mux | {_norm(t) for t in _texts(msg.get("rtcp mux"))}:
        if mux in ("offer", "require", "demux"):
            raise RelayError(f"unsupported rtcp-mux {mux} (no RTCP (de)multiplexing)")
    replace = flags.replace | {_norm(t) for t in _texts(msg.get("replace"))}
    codec = msg.get("codec")
    strip = set(flags.codec.get("strip", []))
    if isinstance(codec, dict):
        strip |= set(_texts(codec.get("strip")))
    direction = _texts(msg.get("direction"))
    first = _text(msg.get("from interface")) or (direction[0] if direction else None)
    second = _text(msg.get("to interface")) or (direction[1] if len(direction) > 1 else None)
    received = _texts(msg.get("received from"))
    received_from: tuple[str, str] | None = None
    if len(received) >= 2:
        received_from = (received[0], received[1])
    elif len(received) == 1:
        received_from = ("IP6" if ":" in received[0] else "IP4", received[0])
    if received_from is not None and not _is_address(received_from[1]):
        raise RelayError("Failed to parse network address")
    family = _text(msg.get("address family"))
    if family is not None and family not in ("IP4", "IP6"):
        raise RelayError(f"Invalid address family {family}")
    media_address = _text(msg.get("media address"))
    if media_address is not None and not _is_address(media_address):
        raise RelayError("Failed to parse network address")
    trust: bool | None = None
    if "sip source address" in flags.plain:
        trust = False
    if "trust address" in flags.plain:
        trust = True
    transport = _text(msg.get("transport protocol"))
    return SignalOptions(
        trust_address=trust,
        received_from=received_from,
        direction=(first, second),
        address_family=family,
        media_address=media_address,
        replace_origin=bool(replace & {"origin", "origin full"}),
        replace_sdp_version=bool(replace & {"sdp version"}),
        force_increment_sdp_version=bool(replace & {"force increment sdp ver"}),
        replace_zero_address=bool(replace & {"zero address"}),
        rtcp_attribute=("none" if "no rtcp attribute" in flags.plain
                        else "full" if "full rtcp attribute" in flags.plain else "short"),
        # ICE "remove" and "default" (the rest is refused above) both strip: without an ICE
        # agent of our own, candidates naming the endpoints would route media around us
        strip_ice=True,
        strip_extmap="strip extmap" in flags.plain,
        rtcp_mux_reject="reject" in (flags.rtcp_mux | {_norm(t) for t in
                                                       _texts(msg.get("rtcp mux"))}),
        transport_protocol=transport,
        loop_protect="loop protect" in flags.plain,
        label=_text(msg.get("label")) or _text(msg.get("from label")),
        via_branch=_text(msg.get("via branch")),
        asymmetric="asymmetric" in flags.plain,
        strict_source="strict source" in flags.plain,
        media_handover="media handover" in flags.plain,
        codec_strip=frozenset(strip),
        single_codec="single codec" in flags.plain,
    )


# -- the control endpoint -------------------------------------------------------------------------

def _endpoint(ep: tuple[str, int] | None) -> dict[str, Any]:
    if ep is None:
        return {}
    host, port = ep
    return {"family": "IPv6" if ":" in host else "IPv4", "address": host, "port": port}


class NgControl:
    """The ng control endpoint: ``receive(datagram, source, now)`` returns the reply datagram.

    Replies are cached by (source, cookie) for ``cache_ttl`` seconds (at most ``cache_size``
    of them): a command retransmitted with the same cookie gets the identical reply and is not
    carried out twice.  ``now`` is seconds since the epoch (``time.time()``, read once per
    datagram by the shell): replies report it as rtpengine's UNIX timestamps.
    """

    def __init__(self, calls: CallRegistry, *, cache_ttl: float = CACHE_TTL,
                 cache_size: int = CACHE_SIZE, max_datagram: int = MAX_DATAGRAM) -> None:
        self.calls = calls
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.max_datagram = max_datagram
        self._cache: OrderedDict[tuple[tuple[str, int], bytes], tuple[float, bytes]] = \
            OrderedDict()
        self._commands: dict[str, Callable[[dict[str, Any], tuple[str, int], float],
                                           dict[str, Any]]] = {
            "ping": self._ping,
            "offer": self._offer,
            "answer": self._answer,
            "delete": self._delete,
            "query": self._query,
            "list": self._list,
        }

    # -- datagrams -----------------------------------------------------------------------------
    def receive(self, data: bytes, source: tuple[str, int], now: float) -> bytes | None:
        """Handle one control datagram; None when it has no cookie (nothing to reply to)."""
        data = bytes(data)
        space = data.find(b" ", 0, MAX_COOKIE + 1)
        if space <= 0:
            log.warning("ng: datagram without a cookie from %s:%s dropped", *source)
            return None
        cookie, payload = bytes(data[:space]), bytes(data[space + 1:])
        key = (source, cookie)
        self._expire_cache(now)
        cached = self._cache.get(key)
        if cached is not None:
            log.info("ng: command from %s:%s with cookie %r is a retransmission", *source, cookie)
            return cached[1]
        as_json = payload.startswith(b"{")
        reply = self._handle(payload, source, now, as_json)
        if as_json:
            body = json.dumps(_json_ready(reply)).encode("utf-8")
        else:
            body = encode(_wire(reply))
        datagram = cookie + b" " + body
        self._cache[key] = (now, datagram)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return datagram

    def _expire_cache(self, now: float) -> None:
        horizon = now - self.cache_ttl
        while self._cache:
            first = next(iter(self._cache.values()))
            if first[0] > horizon:
                break
            self._cache.popitem(last=False)

    def _handle(self, payload: bytes, source: tuple[str, int], now: float,
                as_json: bool) -> dict[str, Any]:
        if not payload:
            return self._error("Invalid data (no payload)")
        if len(payload) > self.max_datagram:
            return self._error("Invalid data (too large)")
        raw: Any
        if as_json:
            try:
                raw = json.loads(payload)
            except (ValueError, RecursionError):
                return self._error("Failed to parse JSON document")
            if not isinstance(raw, dict):
                return self._error("Could not decode JSON dictionary")
        elif payload.startswith(b"d"):
            try:
                raw = decode(payload, max_size=self.max_datagram)
            except BencodeError as e:
                log.warning("ng: bad bencode from %s:%s: %s", *source, e)
                return self._error("Could not decode bencode dictionary")
        else:
            return self._error("Invalid NG data format")
        msg = _normalise(raw)
        if not isinstance(msg, dict):
            return self._error("Could not decode bencode dictionary")
        command = _text(msg.get("command"))
        if command is None:
            return self._error('Dictionary contains no key "command"')
        handler = self._commands.get(command.strip().lower())
        if handler is None:
            return self._error("Unrecognized command")
        try:
            rtpp = _text(msg.get("rtpp flags"))
            if rtpp:
                for k, v in _normalise(parse_rtpp_flags(rtpp)).items():
                    if k == "flags":
                        msg["flags"] = _texts(msg.get("flags")) + _texts(v)
                    else:
                        msg.setdefault(k, v)
            log.info("ng: %s from %s:%s call-id %r", command, *source, _text(msg.get("call id")))
            return handler(msg, source, now)
        except RelayError as e:
            log.warning("ng: %s from %s:%s refused: %s", command, *source, e.reason)
            return self._error(e.reason)
        except Exception:  # a bug must not take the control socket down; the peer gets a reply
            log.exception("ng: %s from %s:%s failed", command, *source)
            return self._error("Internal error")

    @staticmethod
    def _error(reason: str) -> dict[str, Any]:
        return {"result": "error", "error-reason": reason}

    # -- commands ------------------------------------------------------------------------------
    def _ping(self, msg: dict[str, Any], source: tuple[str, int], now: float) -> dict[str, Any]:
        return {"result": "pong"}

    @staticmethod
    def _basics(msg: dict[str, Any], answer: bool) -> tuple[str, str, str | None, str]:
        sdp = msg.get("sdp")
        if not isinstance(sdp, (bytes, str)):
            raise RelayError("No SDP body in message")
        call_id = _text(msg.get("call id"))
        if not call_id:
            raise RelayError("No call-id in message")
        from_tag = _text(msg.get("from tag"))
        if not from_tag:
            raise RelayError("No from-tag in message")
        to_tag = _text(msg.get("to tag")) or None
        if answer and not to_tag:
            raise RelayError("No to-tag in message")
        if isinstance(sdp, bytes):
            try:
                sdp = sdp.decode("utf-8")
            except UnicodeDecodeError:
                raise RelayError("Failed to parse SDP") from None
        return call_id, from_tag, to_tag, sdp

    def _offer(self, msg: dict[str, Any], source: tuple[str, int], now: float) -> dict[str, Any]:
        call_id, from_tag, to_tag, sdp = self._basics(msg, answer=False)
        options = signal_options(msg, "offer")
        out = self.calls.offer(call_id, from_tag, to_tag, sdp, options, now)
        return {"result": "ok", "sdp": out}

    def _answer(self, msg: dict[str, Any], source: tuple[str, int], now: float) -> dict[str, Any]:
        call_id, from_tag, to_tag, sdp = self._basics(msg, answer=True)
        assert to_tag is not None
        options = signal_options(msg, "answer")
        out = self.calls.answer(call_id, from_tag, to_tag, sdp, options, now)
        return {"result": "ok", "sdp": out}

    def _delete(self, msg: dict[str, Any], source: tuple[str, int], now: float) -> dict[str, Any]:
        call_id = _text(msg.get("call id"))
        if not call_id:
            raise RelayError("No call-id in message")
        flags = {_norm(f) for f in _texts(msg.get("flags"))}
        from_tag = _text(msg.get("from tag")) or None
        # rtpengine honours the to-tag of a delete only when the "to-tag" flag asks for it
        to_tag = (_text(msg.get("to tag")) or None) if "to tag" in flags else None
        call = self.calls.get(call_id)
        reply: dict[str, Any] = {"result": "ok"}
        if call is not None and "fast" not in flags:
            reply.update(self.call_stats(call, from_tag, to_tag, now))
        if call is None or not self.calls.delete(call, from_tag, to_tag):
            # rtpengine answers a delete of an unknown call with a warning, an error only with
            # "fatal": a retransmitted BYE must not look like a failure
            if "fatal" in flags:
                raise RelayError("Call-ID not found or tags didn't match")
            return {"result": "ok", "warning": "Call-ID not found or tags didn't match"}
        return reply

    def _query(self, msg: dict[str, Any], source: tuple[str, int], now: float) -> dict[str, Any]:
        call_id = _text(msg.get("call id"))
        if not call_id:
            raise RelayError("No call-id in message")
        call = self.calls.get(call_id)
        if call is None:
            raise RelayError("Unknown call-id")
        reply: dict[str, Any] = {"result": "ok"}
        reply.update(self.call_stats(call, _text(msg.get("from tag")) or None,
                                     _text(msg.get("to tag")) or None, now))
        return reply

    def _list(self, msg: dict[str, Any], source: tuple[str, int], now: float) -> dict[str, Any]:
        limit = msg.get("limit", 32)
        if isinstance(limit, bytes) and limit.isdigit():
            limit = int(limit)
        if not isinstance(limit, int) or limit < 0:
            raise RelayError("invalid limit, must be >= 0")
        return {"result": "ok", "calls": self.calls.list_calls(limit)}

    # -- statistics in rtpengine's shape ------------------------------------------------------
    def call_stats(self, call: Call, from_tag: str | None, to_tag: str | None,
                   now: float) -> dict[str, Any]:
        """``created``, ``last signal``, ``SSRC``, ``tags`` and ``totals`` as rtpengine's query
        reply has them; with a tag, only that monologue and the one it is in dialogue with."""
        match = to_tag or from_tag
        if match:
            ml = call.monologue(match)
            chosen = [] if ml is None else [ml] + ([ml.partner] if ml.partner else [])
        else:
            chosen = list(call.monologues)
        totals = {"RTP": {"packets": 0, "bytes": 0, "errors": 0},
                  "RTCP": {"packets": 0, "bytes": 0, "errors": 0}}
        ssrcs: dict[str, dict[str, Any]] = {}
        tags: dict[str, Any] = {}
        untagged = 0
        for ml in chosen:
            key = ml.tag
            if not key:
                key = "" if untagged == 0 else f"<untagged {untagged}>"
                untagged += 1
            tags[key] = self._monologue_stats(ml, totals, ssrcs)
        return {
            "created": int(call.created),
            "created_us": round((call.created % 1) * 1e6) % 1_000_000,
            "last signal": int(call.last_signal),
            "SSRC": ssrcs,
            "tags": tags,
            "totals": totals,
        }

    def _monologue_stats(self, ml: Monologue, totals: dict[str, dict[str, int]],
                         ssrcs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {"tag": ml.tag, "created": int(ml.created)}
        if ml.partner is not None:
            out["in dialogue with"] = ml.partner.tag
        # newer rtpengine says it as offer/answer subscriptions, both ways
        peers = [{"tag": ml.partner.tag, "type": "offer/answer"}] if ml.partner else []
        out["subscriptions"] = peers
        out["subscribers"] = list(peers)
        if ml.label is not None:
            out["label"] = ml.label
        if ml.via_branch is not None:
            out["via-branch"] = ml.via_branch
        if ml.aliases:
            out["tag-aliases"] = list(ml.aliases)
        out["medias"] = [self._media_stats(m, ml.created, totals, ssrcs) for m in ml.medias]
        return out

    def _media_stats(self, media: CallMedia, created: float, totals: dict[str, dict[str, int]],
                     ssrcs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        flags = ["initialized"] if media.pair is not None else []
        if media.asymmetric:
            flags.append("asymmetric")
        if media.rtcp_mux:
            flags.append("rtcp-mux")
        streams: list[dict[str, Any]] = []
        ingress: list[dict[str, Any]] = []
        pair = media.pair
        if pair is not None:
            for leg, kind, port, advertised in (
                    (pair.rtp, "RTP", pair.port, media.rtp_endpoint),
                    (pair.rtcp, "RTCP", pair.port + 1, media.rtcp_endpoint)):
                st = self.calls.plane.leg_stats(leg)
                peer = st.get("peer")
                stats = {k: int(st.get(k) or 0) for k in ("packets", "bytes", "errors")}
                for k, v in stats.items():
                    totals[kind][k] += v
                stream_flags = [kind]
                if peer is not None or advertised is not None:
                    stream_flags.append("filled")
                if st.get("latched"):
                    stream_flags.append("confirmed")
                if media.strict_source:
                    stream_flags.append("strict source address")
                if media.media_handover:
                    stream_flags.append("media handover")
                endpoint = (str(peer[0]), int(peer[1])) if peer else advertised
                stream: dict[str, Any] = {
                    "local port": port,
                    "local address": pair.address,
                    "family": pair.family,
                    "endpoint": _endpoint(endpoint),
                    "advertised endpoint": _endpoint(advertised),
                    # rtpengine counts a stream as last active when it was created
                    "last packet": int(st.get("last_packet") or created),
                    "flags": stream_flags,
                    "stats": stats,
                }
                ssrc = st.get("ssrc")
                if kind == "RTP" and ssrc is not None:
                    figures = {
                        "SSRC": int(ssrc),
                        "cumulative loss": int(st.get("lost") or 0),
                        "jitter": round(float(st.get("jitter") or 0)),
                    }
                    stream.update(figures)
                    entry = {**figures, "packets": stats["packets"], "bytes": stats["bytes"]}
                    ingress.append(entry)
                    ssrcs.setdefault(str(int(ssrc)), entry)
                streams.append(stream)
        return {"index": media.index, "type": media.type, "protocol": media.protocol,
                "streams": streams, "flags": flags, "ingress SSRCs": ingress}

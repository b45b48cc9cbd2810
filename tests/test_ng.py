"""rtpengine's ng protocol over the relay core: commands, errors, the cookie cache, statistics."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest

from fastsip.relay.bencode import decode, encode
from fastsip.relay.calls import CallRegistry
from fastsip.relay.ng import NgControl, parse_rtpp_flags

sys.path.insert(0, str(Path(__file__).parent))
from test_relay_calls import SIPP_ANSWER, SIPP_OFFER, T0, FakePlane

KAMAILIO = ("127.0.0.1", 47001)


def _control(**kwargs: Any) -> tuple[NgControl, FakePlane]:
    plane = FakePlane()
    return NgControl(CallRegistry(plane, instance_id="relay1"), **kwargs), plane


def _raw(pairs: list[tuple[str, Any]]) -> bytes:
    """A bencoded dictionary with keys in the given order, as Kamailio's module writes them."""
    return b"d" + b"".join(encode(k) + encode(v) for k, v in pairs) + b"e"


def _ask(ctrl: NgControl, msg: dict[str, Any] | bytes, cookie: bytes = b"5323_1",
         source: tuple[str, int] = KAMAILIO, now: float = T0) -> dict[bytes, Any]:
    data = msg if isinstance(msg, bytes) else encode(msg)
    reply = ctrl.receive(cookie + b" " + data, source, now)
    assert reply is not None
    got_cookie, _, body = reply.partition(b" ")
    assert got_cookie == cookie
    out = decode(body)
    assert isinstance(out, dict)
    return out


def _kamailio_offer(call_id: str = "1-12@127.0.0.1", sdp: str = SIPP_OFFER,
                    flags: list[str] | None = None, **extra: Any) -> bytes:
    pairs: list[tuple[str, Any]] = [
        ("supports", ["load limit"]), ("sdp", sdp), ("flags", flags or ["trust-address"]),
        ("replace", ["origin", "session-connection"]), ("received-from", ["IP4", "127.0.0.1"]),
        ("call-id", call_id), ("from-tag", "tagA"), ("command", "offer"),
        ("sip-message-type", "sip_request"),
    ]
    return _raw(pairs + list(extra.items()))


def _kamailio_answer(call_id: str = "1-12@127.0.0.1", sdp: str = SIPP_ANSWER) -> bytes:
    return _raw([
        ("supports", ["load limit"]), ("sdp", sdp), ("flags", ["trust-address"]),
        ("replace", ["origin"]), ("received-from", ["IP4", "127.0.1.1"]), ("call-id", call_id),
        ("from-tag", "tagA"), ("to-tag", "tagB"), ("command", "answer"),
        ("sip-message-type", "sip_reply"),
    ])


def test_ping_pong_and_cookie_echo() -> None:
    ctrl, _ = _control()
    reply = ctrl.receive(b"5323_1 d7:command4:pinge", KAMAILIO, T0)
    assert reply == b"5323_1 d6:result4:ponge"


def test_json_is_answered_in_json() -> None:
    ctrl, _ = _control()
    reply = ctrl.receive(b'c1 {"command": "ping"}', KAMAILIO, T0)
    assert reply is not None and json.loads(reply.split(b" ", 1)[1]) == {"result": "pong"}
    reply = ctrl.receive(b"c2 {not json", KAMAILIO, T0)
    assert reply is not None
    assert json.loads(reply.split(b" ", 1)[1])["error-reason"] == "Failed to parse JSON document"


@pytest.mark.parametrize("data", [b"", b"d7:command4:pinge", b" d7:command4:pinge",
                                  b"x" * 300 + b" d7:command4:pinge"])
def test_no_cookie_is_dropped(data: bytes) -> None:
    ctrl, _ = _control()
    assert ctrl.receive(data, KAMAILIO, T0) is None


@pytest.mark.parametrize(("payload", "reason"), [
    (b"", "Invalid data (no payload)"),
    (b"d7:command4:ping", "Could not decode bencode dictionary"),
    (b"li1ee", "Invalid NG data format"),
    (b"hello", "Invalid NG data format"),
    (b"d3:foo3:bare", 'Dictionary contains no key "command"'),
    (b"d7:command5:dancee", "Unrecognized command"),
    (b"d7:commandi1ee", "Unrecognized command"),
])
def test_malformed_requests_get_rtpengine_errors(payload: bytes, reason: str) -> None:
    ctrl, _ = _control()
    assert _ask(ctrl, payload) == {b"result": b"error", b"error-reason": reason.encode()}


@pytest.mark.parametrize(("msg", "reason"), [
    ({"command": "offer", "call-id": "c", "from-tag": "a"}, "No SDP body in message"),
    ({"command": "offer", "sdp": SIPP_OFFER, "from-tag": "a"}, "No call-id in message"),
    ({"command": "offer", "sdp": SIPP_OFFER, "call-id": "c"}, "No from-tag in message"),
    ({"command": "answer", "sdp": SIPP_ANSWER, "call-id": "c", "from-tag": "a"},
     "No to-tag in message"),
    ({"command": "answer", "sdp": SIPP_ANSWER, "call-id": "c", "from-tag": "a", "to-tag": "b"},
     "Unknown call-id"),
    ({"command": "query", "call-id": "nope"}, "Unknown call-id"),
    ({"command": "query"}, "No call-id in message"),
    ({"command": "delete"}, "No call-id in message"),
    ({"command": "offer", "sdp": "v=1", "call-id": "c", "from-tag": "a"}, "Failed to parse SDP"),
    ({"command": "offer", "sdp": b"\xff\xfe", "call-id": "c", "from-tag": "a"},
     "Failed to parse SDP"),
    ({"command": "list", "limit": -1}, "invalid limit, must be >= 0"),
])
def test_missing_and_unknown_get_rtpengine_errors(msg: dict[str, Any], reason: str) -> None:
    ctrl, _ = _control()
    reply = _ask(ctrl, msg)
    assert reply == {b"result": b"error", b"error-reason": reason.encode()}


def test_kamailio_offer_answer_query_delete() -> None:
    ctrl, plane = _control()
    reply = _ask(ctrl, _kamailio_offer(), b"101_1")
    assert reply[b"result"] == b"ok"
    sdp = reply[b"sdp"].decode()
    assert "o=user1 53655765 2353687637 IN IP4 203.0.113.5\r\n" in sdp  # replace origin
    assert "m=audio 30002 RTP/AVP 0\r\n" in sdp and "c=IN IP4 203.0.113.5\r\n" in sdp
    reply = _ask(ctrl, _kamailio_answer(), b"101_2", now=T0 + 2)
    assert reply[b"result"] == b"ok" and b"m=audio 30000 RTP/AVP 0\r\n" in reply[b"sdp"]
    a_pair, b_pair = (p for _, _, p in plane.opened)
    plane.stats[a_pair.rtp] = {"packets": 50, "bytes": 8600, "last_packet": T0 + 9.5,
                               "peer": ("127.0.0.1", 6000), "latched": True, "ssrc": 0x1234,
                               "lost": 2, "jitter": 3.6}
    plane.stats[b_pair.rtcp] = {"packets": 2, "bytes": 120}
    reply = _ask(ctrl, {"command": "query", "call-id": "1-12@127.0.0.1"}, b"101_3",
                 now=T0 + 10)
    assert reply[b"result"] == b"ok"
    assert reply[b"created"] == int(T0) and reply[b"last signal"] == int(T0) + 2
    assert reply[b"totals"] == {
        b"RTP": {b"packets": 50, b"bytes": 8600, b"errors": 0},
        b"RTCP": {b"packets": 2, b"bytes": 120, b"errors": 0}}
    tags = reply[b"tags"]
    assert set(tags) == {b"tagA", b"tagB"}
    a = tags[b"tagA"]
    assert a[b"tag"] == b"tagA" and a[b"in dialogue with"] == b"tagB"
    assert a[b"created"] == int(T0)
    (media,) = a[b"medias"]
    assert media[b"index"] == 1 and media[b"type"] == b"audio"
    assert media[b"protocol"] == b"RTP/AVP"
    rtp, rtcp = media[b"streams"]
    assert rtp[b"local port"] == a_pair.port and rtcp[b"local port"] == a_pair.port + 1
    assert rtp[b"endpoint"] == {b"family": b"IPv4", b"address": b"127.0.0.1", b"port": 6000}
    assert rtp[b"advertised endpoint"] == rtp[b"endpoint"]
    assert rtcp[b"advertised endpoint"][b"port"] == 6001
    assert rtp[b"last packet"] == int(T0 + 9.5)
    assert rtp[b"stats"] == {b"packets": 50, b"bytes": 8600, b"errors": 0}
    assert rtp[b"SSRC"] == 0x1234 and rtp[b"cumulative loss"] == 2 and rtp[b"jitter"] == 4
    assert b"confirmed" in rtp[b"flags"] and b"RTP" in rtp[b"flags"]
    assert reply[b"SSRC"][str(0x1234).encode()][b"cumulative loss"] == 2
    assert media[b"ingress SSRCs"][0][b"SSRC"] == 0x1234
    b_streams = tags[b"tagB"][b"medias"][0][b"streams"]
    assert b_streams[0][b"endpoint"][b"address"] == b"127.0.1.1"
    # query by tag: that monologue and the one it talks to
    reply = _ask(ctrl, {"command": "query", "call-id": "1-12@127.0.0.1", "from-tag": "tagB"},
                 b"101_4")
    assert set(reply[b"tags"]) == {b"tagA", b"tagB"}
    # list
    assert _ask(ctrl, {"command": "list"}, b"101_5")[b"calls"] == [b"1-12@127.0.0.1"]
    # delete: statistics in the reply, every port freed
    reply = _ask(ctrl, _raw([("call-id", "1-12@127.0.0.1"), ("from-tag", "tagA"),
                             ("command", "delete")]), b"101_6")
    assert reply[b"result"] == b"ok" and reply[b"totals"][b"RTP"][b"packets"] == 50
    assert not plane.open and len(ctrl.calls) == 0
    # BYE retransmitted with a new cookie: a warning, not an error (unless "fatal")
    msg = {"command": "delete", "call-id": "1-12@127.0.0.1", "from-tag": "tagA"}
    assert _ask(ctrl, msg, b"101_7") == {
        b"result": b"ok", b"warning": b"Call-ID not found or tags didn't match"}
    assert _ask(ctrl, {**msg, "flags": ["fatal"]}, b"101_8") == {
        b"result": b"error", b"error-reason": b"Call-ID not found or tags didn't match"}


def test_delete_fast_has_no_statistics() -> None:
    ctrl, plane = _control()
    _ask(ctrl, _kamailio_offer(), b"1")
    reply = _ask(ctrl, {"command": "delete", "call-id": "1-12@127.0.0.1", "from-tag": "tagA",
                        "flags": ["fast"]}, b"2")
    assert reply == {b"result": b"ok"} and not plane.open


def test_retransmission_gets_the_cached_reply_without_redoing_the_work() -> None:
    ctrl, plane = _control()
    first = ctrl.receive(b"77_1 " + _kamailio_offer(), KAMAILIO, T0)
    again = ctrl.receive(b"77_1 " + _kamailio_offer(), KAMAILIO, T0 + 1)
    assert first is not None and again == first
    assert len(plane.opened) == 2
    # the same cookie from another proxy is another command
    other = ctrl.receive(b"77_1 " + _kamailio_offer("other-call"), ("127.0.0.2", 47001), T0 + 1)
    assert other is not None and other != first and len(plane.opened) == 4
    # a delete retransmitted after the call is gone still gets its first (ok) reply
    delete = encode({"command": "delete", "call-id": "other-call", "from-tag": "tagA"})
    d1 = ctrl.receive(b"77_2 " + delete, KAMAILIO, T0 + 2)
    d2 = ctrl.receive(b"77_2 " + delete, KAMAILIO, T0 + 3)
    assert d1 == d2 and d1 is not None and b"warning" not in d1
    # past the cache's lifetime the cookie is new again
    late = ctrl.receive(b"77_2 " + delete, KAMAILIO, T0 + 40)
    assert late is not None and b"warning" in late


def test_reply_cache_is_bounded() -> None:
    ctrl, _ = _control(cache_size=10)
    for i in range(100):
        ctrl.receive(b"c%d d7:command4:pinge" % i, KAMAILIO, T0)
    assert len(ctrl._cache) == 10


@pytest.mark.parametrize(("extra", "flags", "reason"), [
    ({"transport-protocol": "RTP/SAVP"}, [], "unsupported transport-protocol RTP/SAVP"),
    ({"transport protocol": "UDP/TLS/RTP/SAVPF"}, [],
     "unsupported transport-protocol UDP/TLS/RTP/SAVPF"),
    ({"ICE": "force"}, [], "unsupported ICE=force"),
    ({"ICE": ["force-relay"]}, [], "unsupported ICE=force-relay"),
    ({"rtcp-mux": ["demux"]}, [], "unsupported rtcp-mux demux"),
    ({}, ["rtcp-mux-offer"], "unsupported rtcp-mux offer"),
    ({"codec": {"transcode": ["G722"]}}, [], "unsupported codec transcode"),
    ({}, ["codec-transcode-PCMA"], "unsupported flag codec-transcode-PCMA"),
    ({}, ["record-call"], "unsupported flag record call"),
    ({"record call": "yes"}, [], "unsupported record call"),
    ({"ptime": 30}, [], "unsupported ptime"),
    ({}, ["WebRTC"], "unsupported flag webrtc"),
    ({"T.38": ["decode"]}, [], "unsupported T.38 decode"),
    ({"OSRTP": ["offer"]}, [], "unsupported OSRTP offer"),
    ({"address family": "IPX"}, [], "Invalid address family IPX"),
    ({"media address": "not-an-ip"}, [], "Failed to parse network address"),
])
def test_options_we_cannot_honour_are_refused_by_name(extra: dict[str, Any], flags: list[str],
                                                      reason: str) -> None:
    ctrl, plane = _control()
    reply = _ask(ctrl, _kamailio_offer(flags=["trust-address", *flags], **extra))
    assert reply[b"result"] == b"error"
    assert reply[b"error-reason"].decode().startswith(reason)
    assert not plane.opened and len(ctrl.calls) == 0


def test_harmless_and_unknown_options_are_accepted() -> None:
    ctrl, plane = _control()
    reply = _ask(ctrl, _kamailio_offer(
        flags=["trust-address", "symmetric", "port-latching", "strict-source", "loop-protect",
               "no-rtcp-attribute", "SDES-off", "some-future-flag"],
        **{"ICE": "remove", "rtcp-mux": ["accept"], "transport-protocol": "RTP/AVP",
           "direction": ["internal", "external"], "DTLS": "off", "record call": "no",
           "via-branch": "z9hG4bK.1", "label": "caller", "frobnicate": {"x": [1]},
           "TOS": 184}))
    assert reply[b"result"] == b"ok", reply
    assert [i for i, _, _ in plane.opened] == ["internal", "external"]
    sdp = reply[b"sdp"].decode()
    assert "a=rtcp:" not in sdp and "a=rtpengine:relay1" in sdp


def test_direction_reaches_the_media_plane() -> None:
    ctrl, plane = _control()
    reply = _ask(ctrl, _kamailio_offer(direction=["priv", "pub"]))
    assert reply[b"result"] == b"ok"
    assert [i for i, _, _ in plane.opened] == ["priv", "pub"]


def test_received_from_without_trust_address_on_sip_source_registry() -> None:
    plane = FakePlane()
    ctrl = NgControl(CallRegistry(plane, sip_source=True))
    offer = _kamailio_offer(flags=["symmetric"])  # no trust-address
    offer = offer.replace(encode(["IP4", "127.0.0.1"]), encode(["IP4", "198.51.100.7"]))
    assert _ask(ctrl, offer)[b"result"] == b"ok"
    assert plane.peers[plane.opened[0][2].rtp] == ("198.51.100.7", 6000)


def test_ports_exhausted_says_ran_out_of_ports() -> None:
    plane = FakePlane(capacity=1)
    ctrl = NgControl(CallRegistry(plane))
    reply = _ask(ctrl, _kamailio_offer())
    assert reply == {b"result": b"error", b"error-reason": b"Ran out of ports"}


def test_rtpp_flags_parsed_by_the_daemon() -> None:
    assert parse_rtpp_flags(
        "trust-address replace-origin ICE=remove codec=[strip=[PCMA G729]] "
        "direction=priv direction=pub transport-protocol=RTP/AVP") == {
        "ICE": "remove", "codec": {"strip": ["PCMA", "G729"]}, "direction": ["priv", "pub"],
        "transport-protocol": "RTP/AVP", "flags": ["trust-address", "replace-origin"]}
    ctrl, plane = _control()
    reply = _ask(ctrl, {"command": "offer", "call-id": "c", "from-tag": "a", "sdp": SIPP_OFFER,
                        "rtpp-flags": "replace-origin direction=priv direction=pub"})
    assert reply[b"result"] == b"ok"
    assert b"IN IP4 203.0.113.5\r\ns=-" in reply[b"sdp"]
    assert [i for i, _, _ in plane.opened] == ["priv", "pub"]
    reply = _ask(ctrl, {"command": "offer", "call-id": "d", "from-tag": "a", "sdp": SIPP_OFFER,
                        "rtpp-flags": "codec=[strip=[PCMU"}, b"2")
    assert reply[b"error-reason"] == b"Unbalanced brackets in rtpp-flags"
    reply = _ask(ctrl, {"command": "offer", "call-id": "e", "from-tag": "a", "sdp": SIPP_OFFER,
                        "rtpp-flags": "ICE=force"}, b"3")
    assert reply[b"error-reason"].startswith(b"unsupported ICE=force")


def test_fuzzed_datagrams_never_raise() -> None:
    ctrl, _ = _control()
    seeds = [b"1 " + _kamailio_offer(), b"2 " + _kamailio_answer(),
             b"3 " + encode({"command": "query", "call-id": "1-12@127.0.0.1"}),
             b"4 " + encode({"command": "delete", "call-id": "1-12@127.0.0.1",
                             "from-tag": "tagA", "flags": ["fatal"]}),
             b'5 {"command": "offer", "call-id": "j", "from-tag": "a", "sdp": "v=0"}']
    rng = random.Random(7)
    replies = 0
    for i in range(3000):
        buf = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(buf))
            if rng.random() < 0.5:
                buf[pos] = rng.randrange(256)
            else:
                del buf[pos:pos + rng.randint(1, 8)]
        reply = ctrl.receive(bytes(buf), ("127.0.0.1", 1000 + i), T0 + i)
        if reply is not None:
            replies += 1
            cookie, _, body = reply.partition(b" ")
            assert bytes(buf).startswith(cookie + b" ")
            assert body and b"Internal error" not in body  # no bug behind the safety net
    assert replies > 2000

"""The relay's call model and SDP rewrite, against an in-memory media plane (our own interface)."""

from __future__ import annotations

from typing import Any

import pytest

from fastsip.relay.calls import (
    CallRegistry,
    LegPair,
    MediaPlane,
    MediaPlaneFull,
    RelayError,
    SignalOptions,
)

T0 = 1_700_000_000.0


class FakePlane:
    """A media plane that hands out ports from a counter and records what it was told."""

    def __init__(self, interfaces: dict[str, tuple[str, str]] | None = None,
                 capacity: int = 1000) -> None:
        # name -> (advertised address, family); the first of each family is the default
        self.interfaces = interfaces or {"pub": ("203.0.113.5", "IP4"),
                                         "priv": ("10.0.0.5", "IP4"),
                                         "v6": ("2001:db8::5", "IP6")}
        self.capacity = capacity
        self.next_port = 30000
        self.next_leg = 1
        self.open: dict[int, int] = {}  # leg -> port
        self.opened: list[tuple[str | None, str | None, LegPair]] = []
        self.peers: dict[int, tuple[str, int]] = {}
        self.bridges: dict[int, int] = {}
        self.rates: dict[int, int] = {}
        self.latching: dict[int, str] = {}
        self.closed: list[int] = []
        self.stats: dict[int, dict[str, Any]] = {}

    def open_pair(self, interface: str | None, family: str | None = None) -> LegPair:
        asked = interface
        if len(self.open) // 2 >= self.capacity:
            raise MediaPlaneFull("no free port pair")
        if interface not in self.interfaces:
            # unknown names (rtpengine's legacy "internal"/"external" too): the default
            interface = next(n for n, (_, f) in self.interfaces.items()
                             if family is None or f == family)
        address, fam = self.interfaces[interface]
        pair = LegPair(self.next_leg, self.next_leg + 1, address, fam, self.next_port)
        self.open[pair.rtp], self.open[pair.rtcp] = pair.port, pair.port + 1
        self.next_leg += 2
        self.next_port += 2
        self.opened.append((asked, family, pair))
        return pair

    def set_peer(self, leg: int, host: str, port: int) -> None:
        assert leg in self.open
        self.peers[leg] = (host, port)

    def bridge(self, leg_a: int, leg_b: int) -> None:
        assert leg_a in self.open and leg_b in self.open
        self.bridges[leg_a], self.bridges[leg_b] = leg_b, leg_a

    def set_clock_rate(self, leg: int, rate: int) -> None:
        self.rates[leg] = rate

    def set_latching(self, leg: int, mode: str) -> None:
        assert mode in ("first", "strict", "off")
        self.latching[leg] = mode

    def leg_stats(self, leg: int) -> dict[str, Any]:
        base = {"packets": 0, "bytes": 0, "errors": 0, "last_packet": 0,
                "peer": self.peers.get(leg), "latched": False, "ssrc": None, "lost": 0,
                "jitter": 0.0}
        base.update(self.stats.get(leg, {}))
        return base

    def close(self, leg: int) -> None:
        assert leg in self.open, f"leg {leg} closed twice or never opened"
        del self.open[leg]
        self.closed.append(leg)


def _sdp(*lines: str, eol: str = "\r\n") -> str:
    return eol.join(lines) + eol


# sipp's built-in uac scenario with -mi 127.0.0.1 (its [media_ip] / [media_port] filled in)
SIPP_OFFER = _sdp(
    "v=0", "o=user1 53655765 2353687637 IN IP4 127.0.0.1", "s=-", "c=IN IP4 127.0.0.1",
    "t=0 0", "m=audio 6000 RTP/AVP 0", "a=rtpmap:0 PCMU/8000")
SIPP_ANSWER = _sdp(
    "v=0", "o=user1 53655765 2353687637 IN IP4 127.0.1.1", "s=-", "c=IN IP4 127.0.1.1",
    "t=0 0", "m=audio 6002 RTP/AVP 0", "a=rtpmap:0 PCMU/8000")
# a softphone's offer: audio and video, a=rtcp with an address, ICE, rtcp-fb, extmap
PHONE_OFFER = _sdp(
    "v=0", "o=- 3342 3342 IN IP4 192.168.1.20", "s=Talk", "c=IN IP4 192.168.1.20",
    "b=AS:380", "t=0 0", "a=ice-ufrag:F7gI", "a=ice-pwd:x9cml/YzichV2+XlhiMu8g",
    "m=audio 7078 RTP/AVP 96 0 8 101", "a=rtpmap:96 opus/48000/2", "a=fmtp:96 useinbandfec=1",
    "a=rtpmap:101 telephone-event/8000", "a=rtcp:7079 IN IP4 192.168.1.20",
    "a=candidate:1 1 UDP 2130706431 192.168.1.20 7078 typ host",
    "a=candidate:1 2 UDP 2130706430 192.168.1.20 7079 typ host",
    "a=candidate:2 1 UDP 1694498815 198.51.100.7 40000 typ srflx raddr 192.168.1.20 rport 7078",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "a=rtcp-fb:* trr-int 1000",
    "a=sendrecv",
    "m=video 9078 RTP/AVP 97", "c=IN IP4 192.168.1.21", "a=rtpmap:97 H264/90000",
    "a=rtcp-fb:97 nack pli", "a=ice-ufrag:Vid1", "a=candidate:1 1 UDP 2130706431 "
    "192.168.1.21 9078 typ host")


def _registry(**kwargs: Any) -> tuple[CallRegistry, FakePlane]:
    plane = FakePlane()
    return CallRegistry(plane, instance_id="relay1", **kwargs), plane


def test_fake_plane_satisfies_the_protocol() -> None:
    plane: MediaPlane = FakePlane()
    assert plane.open_pair(None).family == "IP4"


def test_offer_rewrites_sipp_sdp_and_keeps_the_rest() -> None:
    calls, plane = _registry()
    out = calls.offer("c1", "tagA", None, SIPP_OFFER, SignalOptions(), T0)
    # the B-facing pair is the second one opened (A-facing first): port 30002
    assert out == _sdp(
        "v=0", "o=user1 53655765 2353687637 IN IP4 127.0.0.1", "s=-", "c=IN IP4 203.0.113.5",
        "t=0 0", "m=audio 30002 RTP/AVP 0", "a=rtpmap:0 PCMU/8000", "a=rtcp:30003")
    a_pair, b_pair = (p for _, _, p in plane.opened)
    assert plane.peers[a_pair.rtp] == ("127.0.0.1", 6000)
    assert plane.peers[a_pair.rtcp] == ("127.0.0.1", 6001)
    assert plane.bridges[a_pair.rtp] == b_pair.rtp and plane.bridges[a_pair.rtcp] == b_pair.rtcp
    assert plane.rates[a_pair.rtp] == 8000
    assert b_pair.rtp not in plane.peers  # B's address comes with the answer
    assert len(calls) == 1


def test_answer_learns_b_and_rewrites_for_a() -> None:
    calls, plane = _registry()
    calls.offer("c1", "tagA", None, SIPP_OFFER, SignalOptions(), T0)
    out = calls.answer("c1", "tagA", "tagB", SIPP_ANSWER, SignalOptions(), T0 + 1)
    a_pair, b_pair = (p for _, _, p in plane.opened)
    assert out == _sdp(
        "v=0", "o=user1 53655765 2353687637 IN IP4 127.0.1.1", "s=-", "c=IN IP4 203.0.113.5",
        "t=0 0", f"m=audio {a_pair.port} RTP/AVP 0", "a=rtpmap:0 PCMU/8000",
        f"a=rtcp:{a_pair.port + 1}")
    assert plane.peers[b_pair.rtp] == ("127.0.1.1", 6002)
    assert plane.peers[b_pair.rtcp] == ("127.0.1.1", 6003)
    assert plane.bridges[b_pair.rtp] == a_pair.rtp
    call = calls.get("c1")
    assert call is not None and call.last_signal == T0 + 1
    a, b = call.monologue("tagA"), call.monologue("tagB")
    assert a is not None and b is not None and a.partner is b and b.partner is a
    assert len(plane.opened) == 2  # the answer opened nothing new


def test_replace_origin_and_full_rtcp_attribute() -> None:
    calls, _ = _registry()
    out = calls.offer("c1", "A", None, SIPP_OFFER,
                      SignalOptions(replace_origin=True, rtcp_attribute="full"), T0)
    assert "o=user1 53655765 2353687637 IN IP4 203.0.113.5\r\n" in out
    assert out.endswith("a=rtcp:30003 IN IP4 203.0.113.5\r\n")
    out = calls.offer("c2", "A", None, SIPP_OFFER, SignalOptions(rtcp_attribute="none"), T0)
    assert "a=rtcp" not in out


def test_two_media_ice_removed_rest_byte_identical() -> None:
    calls, plane = _registry()
    out = calls.offer("c1", "A", None, PHONE_OFFER, SignalOptions(), T0)
    pairs = [p for _, _, p in plane.opened]
    b_audio, b_video = pairs[1], pairs[3]
    assert out == _sdp(
        "v=0", "o=- 3342 3342 IN IP4 192.168.1.20", "s=Talk", "c=IN IP4 203.0.113.5",
        "b=AS:380", "t=0 0",
        f"m=audio {b_audio.port} RTP/AVP 96 0 8 101", "a=rtpmap:96 opus/48000/2",
        "a=fmtp:96 useinbandfec=1", "a=rtpmap:101 telephone-event/8000",
        f"a=rtcp:{b_audio.port + 1}",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level", "a=rtcp-fb:* trr-int 1000",
        "a=sendrecv",
        f"m=video {b_video.port} RTP/AVP 97", "c=IN IP4 203.0.113.5", "a=rtpmap:97 H264/90000",
        "a=rtcp-fb:97 nack pli", f"a=rtcp:{b_video.port + 1}")
    a_audio, a_video = pairs[0], pairs[2]
    assert plane.peers[a_audio.rtp] == ("192.168.1.20", 7078)
    assert plane.peers[a_audio.rtcp] == ("192.168.1.20", 7079)
    assert plane.peers[a_video.rtp] == ("192.168.1.21", 9078)
    assert plane.rates[a_audio.rtp] == 48000 and plane.rates[a_video.rtp] == 90000


def test_strip_extmap() -> None:
    calls, _ = _registry()
    out = calls.offer("c1", "A", None, PHONE_OFFER, SignalOptions(strip_extmap=True), T0)
    assert "a=extmap" not in out and "a=rtcp-fb:* trr-int 1000" in out


def test_reoffer_keeps_ports_and_updates_peer() -> None:
    calls, plane = _registry()
    first = calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(), T0)
    calls.answer("c1", "A", "B", SIPP_ANSWER, SignalOptions(), T0)
    moved = SIPP_OFFER.replace("127.0.0.1", "127.0.0.9").replace("6000", "7000")
    second = calls.offer("c1", "A", "B", moved, SignalOptions(), T0 + 5)
    assert first.split("\r\n")[3:] == second.split("\r\n")[3:]  # same c=, m= port, a=rtcp
    assert len(plane.opened) == 2
    a_pair = plane.opened[0][2]
    assert plane.peers[a_pair.rtp] == ("127.0.0.9", 7000)
    # the callee re-INVITEs (hold): its SDP goes to A with the A-facing ports
    hold = SIPP_ANSWER.replace("a=rtpmap:0 PCMU/8000", "a=rtpmap:0 PCMU/8000\r\na=sendonly")
    out = calls.offer("c1", "B", "A", hold, SignalOptions(), T0 + 9)
    assert f"m=audio {a_pair.port} RTP/AVP 0" in out and "a=sendonly\r\n" in out
    assert len(plane.opened) == 2


def test_port_zero_stays_zero_and_allocates_nothing() -> None:
    calls, plane = _registry()
    offer = _sdp("v=0", "o=- 1 1 IN IP4 10.1.1.1", "s=-", "c=IN IP4 10.1.1.1", "t=0 0",
                 "m=audio 4000 RTP/AVP 0", "m=video 0 RTP/AVP 31")
    out = calls.offer("c1", "A", None, offer, SignalOptions(), T0)
    assert "m=video 0 RTP/AVP 31\r\n" in out
    assert len(plane.opened) == 2
    # the answer rejects the audio too: both of its pairs are freed
    answer = offer.replace("10.1.1.1", "10.2.2.2").replace("m=audio 4000", "m=audio 0")
    out = calls.answer("c1", "A", "B", answer, SignalOptions(), T0)
    assert "m=audio 0 RTP/AVP 0\r\n" in out
    assert sorted(plane.closed) == [1, 2, 3, 4] and not plane.open


def test_answer_cannot_accept_a_stream_the_offer_rejected() -> None:
    calls, plane = _registry()
    offer = _sdp("v=0", "o=- 1 1 IN IP4 10.1.1.1", "s=-", "c=IN IP4 10.1.1.1", "t=0 0",
                 "m=audio 0 RTP/AVP 0")
    calls.offer("c1", "A", None, offer, SignalOptions(), T0)
    out = calls.answer("c1", "A", "B", offer.replace("audio 0", "audio 5000"),
                       SignalOptions(), T0)
    assert "m=audio 0 RTP/AVP 0" in out and not plane.opened


def test_ipv6_offer_and_address_family() -> None:
    calls, plane = _registry()
    offer = _sdp("v=0", "o=- 1 1 IN IP6 2001:db8::20", "s=-", "c=IN IP6 2001:db8::20", "t=0 0",
                 "m=audio 4000 RTP/AVP 8")
    out = calls.offer("c1", "A", None, offer, SignalOptions(), T0)
    assert "c=IN IP6 2001:db8::5\r\n" in out
    assert [f for _, f, _ in plane.opened] == ["IP6", "IP6"]
    # towards an IPv4 side: the address family option picks the B-facing family
    out = calls.offer("c2", "A", None, offer, SignalOptions(address_family="IP4"), T0)
    assert "c=IN IP4 203.0.113.5\r\n" in out
    assert [f for _, f, _ in plane.opened[2:]] == ["IP6", "IP4"]


def test_direction_names_the_interfaces_and_is_remembered() -> None:
    calls, plane = _registry()
    out = calls.offer("c1", "A", None, SIPP_OFFER,
                      SignalOptions(direction=("priv", "pub")), T0)
    assert [i for i, _, _ in plane.opened] == ["priv", "pub"]
    assert "c=IN IP4 203.0.113.5" in out
    out = calls.answer("c1", "A", "B", SIPP_ANSWER, SignalOptions(), T0)
    assert "c=IN IP4 10.0.0.5" in out
    # a later offer with one more stream opens it on the remembered interfaces
    more = SIPP_OFFER + "m=video 6004 RTP/AVP 31\r\n"
    calls.offer("c1", "A", "B", more, SignalOptions(), T0)
    assert [i for i, _, _ in plane.opened[2:]] == ["priv", "pub"]


def test_trust_address_and_sip_source() -> None:
    behind_nat = ("IP4", "198.51.100.7")
    calls, plane = _registry()
    calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(received_from=behind_nat), T0)
    assert plane.peers[plane.opened[0][2].rtp] == ("127.0.0.1", 6000)  # rtpengine's default
    calls, plane = _registry()
    calls.offer("c1", "A", None, SIPP_OFFER,
                SignalOptions(received_from=behind_nat, trust_address=False), T0)
    assert plane.peers[plane.opened[0][2].rtp] == ("198.51.100.7", 6000)
    calls, plane = _registry(sip_source=True)
    calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(received_from=behind_nat), T0)
    assert plane.peers[plane.opened[0][2].rtp] == ("198.51.100.7", 6000)
    calls.offer("c2", "A", None, SIPP_OFFER,
                SignalOptions(received_from=behind_nat, trust_address=True), T0)
    assert plane.peers[plane.opened[2][2].rtp] == ("127.0.0.1", 6000)


def test_media_address_is_advertised() -> None:
    calls, _ = _registry()
    out = calls.offer("c1", "A", None, SIPP_OFFER,
                      SignalOptions(media_address="192.0.2.99"), T0)
    assert "c=IN IP4 192.0.2.99\r\n" in out


def test_zero_address_hold_passes_unless_replaced() -> None:
    calls, plane = _registry()
    hold = SIPP_OFFER.replace("c=IN IP4 127.0.0.1", "c=IN IP4 0.0.0.0")
    out = calls.offer("c1", "A", None, hold, SignalOptions(), T0)
    assert "c=IN IP4 0.0.0.0\r\n" in out and "m=audio 30002 " in out
    assert plane.opened[0][2].rtp not in plane.peers
    out = calls.offer("c2", "A", None, hold, SignalOptions(replace_zero_address=True), T0)
    assert "0.0.0.0" not in out.split("o=")[1].split("\r\n", 1)[1]


def test_lf_only_sdp_keeps_lf() -> None:
    calls, _ = _registry()
    out = calls.offer("c1", "A", None, SIPP_OFFER.replace("\r\n", "\n"), SignalOptions(), T0)
    assert "\r" not in out and out.endswith("a=rtcp:30003\n")


def test_rtcp_mux_passes_and_answer_rtcp_is_the_rtp_port() -> None:
    calls, _ = _registry()
    offer = SIPP_OFFER + "a=rtcp-mux\r\n"
    out = calls.offer("c1", "A", None, offer, SignalOptions(), T0)
    assert "a=rtcp-mux\r\n" in out and "a=rtcp:30003\r\n" in out
    out = calls.answer("c1", "A", "B", SIPP_ANSWER + "a=rtcp-mux\r\n", SignalOptions(), T0)
    assert "a=rtcp:30000\r\n" in out
    out = calls.offer("c2", "A", None, offer, SignalOptions(rtcp_mux_reject=True), T0)
    assert "a=rtcp-mux" not in out


def test_codec_strip_and_single_codec() -> None:
    calls, _ = _registry()
    out = calls.offer("c1", "A", None, PHONE_OFFER,
                      SignalOptions(codec_strip=frozenset({"opus", "8"})), T0)
    assert "RTP/AVP 0 101\r\n" in out
    assert "a=rtpmap:96" not in out and "a=fmtp:96" not in out
    assert "a=rtcp-fb:* trr-int 1000" in out
    out = calls.offer("c2", "A", None, PHONE_OFFER, SignalOptions(), T0)
    answer = PHONE_OFFER.replace("192.168.1.2", "192.168.9.2")
    out = calls.answer("c2", "A", "B", answer, SignalOptions(single_codec=True), T0)
    assert "RTP/AVP 96 101\r\n" in out


def test_transport_protocol_rewrite_and_answer_keeps_offered() -> None:
    calls, _ = _registry()
    out = calls.offer("c1", "A", None, SIPP_OFFER,
                      SignalOptions(transport_protocol="RTP/AVPF"), T0)
    assert "m=audio 30002 RTP/AVPF 0" in out
    out = calls.answer("c1", "A", "B", SIPP_ANSWER.replace("RTP/AVP", "RTP/AVPF"),
                       SignalOptions(), T0)
    assert "m=audio 30000 RTP/AVP 0" in out


def test_loop_protect_marks_and_recognises_its_own_sdp() -> None:
    calls, plane = _registry()
    out = calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(loop_protect=True), T0)
    assert "a=rtpengine:relay1\r\n" in out
    again = calls.offer("c2", "A", None, out, SignalOptions(loop_protect=True), T0)
    assert again == out and len(plane.opened) == 2


def test_sdp_version_counts_changes() -> None:
    calls, _ = _registry()
    opts = SignalOptions(replace_sdp_version=True)
    first = calls.offer("c1", "A", None, SIPP_OFFER, opts, T0)
    same = calls.offer("c1", "A", None, SIPP_OFFER.replace("2353687637", "9"), opts, T0)
    assert "o=user1 53655765 2353687637 " in first and "o=user1 53655765 2353687637 " in same
    changed = calls.offer("c1", "A", None, SIPP_OFFER + "a=sendonly\r\n", opts, T0)
    assert "o=user1 53655765 2353687638 " in changed


def test_bad_sdp_and_unknown_call() -> None:
    calls, plane = _registry()
    with pytest.raises(RelayError, match="Failed to parse SDP"):
        calls.offer("c1", "A", None, "not an sdp", SignalOptions(), T0)
    assert len(calls) == 0 and not plane.opened
    with pytest.raises(RelayError, match="Unknown call-id"):
        calls.answer("nope", "A", "B", SIPP_ANSWER, SignalOptions(), T0)
    calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(), T0)
    with pytest.raises(RelayError, match="Invalid dialogue association"):
        calls.answer("c1", "X", "B", SIPP_ANSWER, SignalOptions(), T0)
    with pytest.raises(RelayError, match="Incomplete SDP"):
        calls.answer("c1", "A", "B", SIPP_ANSWER + "m=video 5 RTP/AVP 31\r\n",
                     SignalOptions(), T0)


def test_ports_exhausted_frees_what_was_opened() -> None:
    plane = FakePlane(capacity=3)
    calls = CallRegistry(plane)
    with pytest.raises(RelayError, match="Ran out of ports"):
        calls.offer("c1", "A", None, PHONE_OFFER, SignalOptions(), T0)
    assert not plane.open and len(calls) == 0
    calls.offer("c2", "A", None, SIPP_OFFER, SignalOptions(), T0)
    assert len(plane.open) == 4


def test_delete_by_tag_and_whole_call() -> None:
    calls, plane = _registry()
    calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(), T0)
    calls.answer("c1", "A", "B", SIPP_ANSWER, SignalOptions(), T0)
    call = calls.get("c1")
    assert call is not None
    assert not calls.delete(call, "nobody")
    assert not calls.delete(call, "A", "C")  # the to-tag does not match
    assert calls.delete(call, "A")
    assert not plane.open and calls.get("c1") is None
    calls.offer("c2", "A", None, SIPP_OFFER, SignalOptions(), T0)
    call = calls.get("c2")
    assert call is not None and calls.delete(call)
    assert not plane.open and len(calls) == 0


def test_expire_frees_silent_calls_only() -> None:
    calls, plane = _registry()
    calls.offer("quiet", "A", None, SIPP_OFFER, SignalOptions(), T0)
    calls.offer("talking", "A", None, SIPP_OFFER, SignalOptions(), T0)
    calls.offer("young", "A", None, SIPP_OFFER, SignalOptions(), T0 + 50)
    talking = calls.get("talking")
    assert talking is not None
    plane.stats[talking.legs[0]] = {"last_packet": T0 + 45, "packets": 9}
    assert calls.expire(T0 + 30, 60) == []
    gone = calls.expire(T0 + 61, 60)
    assert [c.call_id for c in gone] == ["quiet"]
    assert sorted(calls.calls) == ["talking", "young"]
    assert [c.call_id for c in calls.expire(T0 + 200, 60)] == ["talking", "young"]
    assert not plane.open


def test_second_answer_from_another_fork_is_an_alias() -> None:
    calls, plane = _registry()
    calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(), T0)
    calls.answer("c1", "A", "B1", SIPP_ANSWER, SignalOptions(), T0)
    calls.answer("c1", "A", "B2", SIPP_ANSWER.replace("127.0.1.1", "127.0.1.2"),
                 SignalOptions(), T0)
    call = calls.get("c1")
    assert call is not None and call.monologue("B2") is call.monologue("B1")
    assert plane.peers[plane.opened[1][2].rtp] == ("127.0.1.2", 6002)


def test_tcp_media_is_not_relayed_and_keeps_its_endpoint() -> None:
    calls, plane = _registry()
    offer = _sdp("v=0", "o=- 1 1 IN IP4 10.1.1.1", "s=-", "c=IN IP4 10.1.1.1", "t=0 0",
                 "m=audio  4000  RTP/AVP  0", "m=message 2855 TCP/MSRP *",
                 "a=path:msrp://10.1.1.1:2855/x;tcp")
    out = calls.offer("c1", "A", None, offer, SignalOptions(), T0)
    assert "m=audio 30002 RTP/AVP 0\r\n" in out
    assert out.endswith("m=message 2855 TCP/MSRP *\r\nc=IN IP4 10.1.1.1\r\n"
                        "a=path:msrp://10.1.1.1:2855/x;tcp\r\n")
    assert len(plane.opened) == 2


def test_offer_to_itself_is_refused() -> None:
    calls, plane = _registry()
    with pytest.raises(RelayError, match="Invalid dialogue association"):
        calls.offer("c1", "A", "A", SIPP_OFFER, SignalOptions(), T0)
    assert not plane.opened and len(calls) == 0


def test_late_offer_in_200_and_answer_in_ack() -> None:
    # Kamailio's rtpengine_manage for an INVITE without SDP: the 200 OK carries the offer
    # (from-tag = the callee's tag), the ACK the answer
    calls, plane = _registry()
    calls.offer("c1", "B", "A", SIPP_ANSWER, SignalOptions(), T0)
    out = calls.answer("c1", "B", "A", SIPP_OFFER, SignalOptions(), T0)
    b_pair, a_pair = (p for _, _, p in plane.opened)
    assert f"m=audio {b_pair.port} " in out
    assert plane.peers[a_pair.rtp] == ("127.0.0.1", 6000)
    assert plane.peers[b_pair.rtp] == ("127.0.1.1", 6002)


def test_bounds_on_media_and_participants() -> None:
    plane = FakePlane()
    calls = CallRegistry(plane, max_media=2, max_monologues=3, max_calls=2)
    three = SIPP_OFFER + "m=audio 6002 RTP/AVP 0\r\nm=audio 6004 RTP/AVP 0\r\n"
    with pytest.raises(RelayError, match="Too many media sections"):
        calls.offer("c1", "A", None, three, SignalOptions(), T0)
    assert not plane.opened and len(calls) == 0
    calls.offer("c1", "A", None, SIPP_OFFER, SignalOptions(), T0)  # A and the untagged side
    calls.offer("c1", "X", "A", SIPP_OFFER, SignalOptions(), T0)  # a third participant
    with pytest.raises(RelayError, match="Too many call participants"):
        calls.offer("c1", "Y", "A", SIPP_OFFER, SignalOptions(), T0)
    calls.offer("c2", "A", None, SIPP_OFFER, SignalOptions(), T0)
    with pytest.raises(RelayError, match="Parallel session limit reached"):
        calls.offer("c3", "A", None, SIPP_OFFER, SignalOptions(), T0)

"""SDP parsing/serialization (RFC 8866) on real bodies, and RFC 3264 offer/answer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.errors import FastSIPError
from fastsip.sdp import (
    PCMA,
    PCMU,
    Codec,
    SdpError,
    SessionDescription,
    answer_direction,
    create_answer,
    create_offer,
    hold,
    is_on_hold,
    negotiate,
    resume,
)

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from rtp_pcap import read_udp

PCAP = HERE / "data" / "rtp" / "pcap"


def sdp_bodies(capture: str) -> list[bytes]:
    out = []
    for d in read_udp(PCAP / capture):
        _head, sep, body = d.payload.partition(b"\r\n\r\n")
        if sep and body.startswith(b"v=0"):
            out.append(body)
    return out


@pytest.mark.parametrize("capture", ["SIP_CALL_RTP_G711", "aaa.pcap", "sip-rtp-g711.pcap",
                                     "SIP_DTMF2.cap"])
def test_real_bodies_parse_and_round_trip(capture):
    bodies = sdp_bodies(capture)
    assert bodies
    for body in bodies:
        sd = SessionDescription.parse(body)
        assert bytes(sd) == body
        assert sd.media and sd.media[0].media == "audio"


def test_fields_of_a_real_offer():
    body = sdp_bodies("SIP_DTMF2.cap")[0]
    sd = SessionDescription.parse(body)
    m = sd.media[0]
    assert sd.origin.session_version == 1459 and sd.origin.address == "192.168.105.110"
    assert sd.media_connection(m).host == "192.168.105.110"
    assert (m.port, m.proto, m.payload_types) == (4376, "RTP/AVP", [8, 0, 18, 96])
    assert m.rtpmaps[96].encoding == "telephone-event" and m.fmtp[96] == "0-15"
    assert m.ptime == 30 and m.direction == "sendrecv"
    # the RTP of that call really used PCMA (8) and telephone-event (96) from that port
    offer = SessionDescription.parse(sdp_bodies("SIP_CALL_RTP_G711")[0])
    assert offer.media[0].direction == "sendrecv"                 # "a=SendRecv" on the wire
    assert offer.media[0].rtpmaps[18].encoding == "G729"


def test_static_payload_types_without_rtpmap():
    sd = SessionDescription.parse("v=0\no=- 1 1 IN IP4 h\ns=-\nt=0 0\nm=audio 9 RTP/AVP 0 8 9 18\n")
    assert [sd.media[0].rtpmaps[pt].encoding for pt in (0, 8, 9, 18)] == ["PCMU", "PCMA", "G722", "G729"]
    assert str(sd).endswith("m=audio 9 RTP/AVP 0 8 9 18\r\n")


@pytest.mark.parametrize("text", [
    "",                                                         # no v/o/s
    "v=0\r\no=- 1 1 IN IP4 h\r\n",                              # no s=
    "v=1\r\no=- 1 1 IN IP4 h\r\ns=-\r\n",                       # version
    "v=0\r\no=- 1 IN IP4 h\r\ns=-\r\n",                         # short o=
    "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nm=audio x RTP/AVP 0\r\n",  # port
    "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nm=audio 70000 RTP/AVP 0\r\n",
    "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4\r\n",
    "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nbad line\r\n",
])
def test_malformed(text):
    with pytest.raises(SdpError):
        SessionDescription.parse(text)


def test_sdp_error_is_a_value_error():
    assert issubclass(SdpError, ValueError) and issubclass(SdpError, FastSIPError)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=200))
def test_fuzz_parse_raises_only_sdp_error(text):
    try:
        sd = SessionDescription.parse("v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\n" + text)
    except SdpError:
        return
    for m in sd.media:
        try:
            assert isinstance((m.rtpmaps, m.fmtp, m.ptime), tuple)
        except SdpError:
            pass
    SessionDescription.parse(str(sd))


# --- offer / answer ------------------------------------------------------------------------------

OPUS = Codec("opus", 48000, 2)


def test_offer_assigns_dynamic_payload_types_and_telephone_event():
    o = create_offer("192.0.2.1", 4000, [PCMU, OPUS, PCMA], session_id=7)
    m = o.media[0]
    assert m.payload_types == [0, 96, 8, 101]
    assert m.rtpmaps[96].encoding == "opus" and m.rtpmaps[96].channels == 2
    assert m.rtpmaps[101].encoding == "telephone-event" and m.fmtp[101] == "0-16"
    assert m.ptime == 20 and m.direction == "sendrecv"
    assert o.origin.session_id == o.origin.session_version == 7
    assert SessionDescription.parse(bytes(o)) == o


def test_answer_intersects_in_offer_order_with_offer_payload_types():
    offer = SessionDescription.parse(sdp_bodies("SIP_DTMF2.cap")[0])   # 8 0 18 96(t-e) ptime 30
    answer = create_answer(offer, "198.51.100.7", 5000, [PCMU, PCMA])
    m = answer.media[0]
    assert m.payload_types == [8, 0, 96]
    assert m.rtpmaps[96].encoding == "telephone-event" and m.fmtp[96] == "0-15"
    assert m.ptime == 30                               # mirrors the offer when we do not care
    [n] = negotiate(answer, offer)
    assert (n.payload_type, n.codec.encoding, n.telephone_event, n.ptime) == (8, "PCMA", 96, 30)
    assert (n.remote_address, n.remote_port, n.direction) == ("192.168.105.110", 4376, "sendrecv")
    single = create_answer(offer, "198.51.100.7", 5000, [PCMU, PCMA], single_codec=True,
                           telephone_event=False, ptime=20)
    assert single.media[0].payload_types == [8] and single.media[0].ptime == 20


def test_no_common_codec_or_non_audio_rejects_with_port_zero():
    offer = SessionDescription.parse(
        "v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 18\r\n"
        "m=video 4002 RTP/AVP 34\r\n"
        "m=audio 4004 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n")
    answer = create_answer(offer, "198.51.100.7", 5000, [PCMU])
    assert [m.port for m in answer.media] == [0, 0, 5000]
    assert answer.media[1].media == "video" and answer.media[1].formats == ["34"]
    result = negotiate(offer, answer)
    assert result[0] is None and result[1] is None
    assert result[2].payload_type == 0 and result[2].telephone_event == 101


def test_telephone_event_must_match_the_codec_clock():
    offer = SessionDescription.parse(
        "v=0\r\no=- 1 1 IN IP4 h\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
        "m=audio 4000 RTP/AVP 96 97 98\r\na=rtpmap:96 opus/48000/2\r\n"
        "a=rtpmap:97 telephone-event/8000\r\na=rtpmap:98 telephone-event/48000\r\n")
    answer = create_answer(offer, "198.51.100.7", 5000, [OPUS])
    assert answer.media[0].payload_types == [96, 98]


@pytest.mark.parametrize("offered,wanted,expected", [
    ("sendrecv", "sendrecv", "sendrecv"), ("sendonly", "sendrecv", "recvonly"),
    ("recvonly", "sendrecv", "sendonly"), ("inactive", "sendrecv", "inactive"),
    ("sendrecv", "recvonly", "recvonly"), ("sendonly", "sendonly", "inactive"),
    (None, "sendonly", "sendonly"),
])
def test_answer_direction(offered, wanted, expected):
    assert answer_direction(offered, wanted) == expected


def test_hold_and_resume():
    offer = create_offer("192.0.2.1", 4000, session_id=5)
    held = hold(offer)
    assert held.origin.session_version == 6 and offer.origin.session_version == 5
    assert held.media[0].direction == "sendonly" and is_on_hold(held) and not is_on_hold(offer)
    answer = create_answer(held, "198.51.100.7", 5000)
    assert answer.media[0].direction == "recvonly"
    [us] = negotiate(held, answer)
    assert us.send and not us.recv
    back = resume(held)
    assert back.origin.session_version == 7 and back.media[0].direction == "sendrecv"
    assert hold(create_offer("192.0.2.1", 4000, direction="recvonly")).media[0].direction == "inactive"


def test_rfc2543_hold_by_zero_address():
    offer = SessionDescription.parse(
        "v=0\r\no=- 1 2 IN IP4 h\r\ns=-\r\nc=IN IP4 0.0.0.0\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n")
    assert is_on_hold(offer)
    answer = create_answer(offer, "198.51.100.7", 5000)
    assert answer.media[0].direction == "recvonly"
    [us] = negotiate(answer, offer)
    assert not us.send and us.recv


def test_ipv6_and_mismatched_media_counts():
    o = create_offer("2001:db8::1", 4000)
    assert str(o.connection) == "IN IP6 2001:db8::1"
    a = create_answer(o, "2001:db8::2", 5000)
    a.media.append(a.media[0])
    with pytest.raises(SdpError):
        negotiate(o, a)

"""``fastsip media`` under Kamailio's ``rtpengine`` module, as a drop-in for rtpengine (issue 13).

sipp calls through Kamailio 5.6 (``tests/data/kamailio/rtpengine.cfg``: rtpengine_offer on
the INVITE, rtpengine_answer on the 200, rtpengine_delete on the BYE) to a callee written
here, which registered with Kamailio and records every RTP packet and where it came from.
sipp plays Debian's ``g711a.pcap`` (236 PCMA packets) once the call is up; the callee sends
its own packets back.  The media must go through the relay, both ways: the callee sees the
relay's address in the offer and receives the caller's packets *from* that address and port,
byte for byte as sipp sent them; the relay's ``query`` counts both directions; the BYE's
``delete`` frees the call.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from mediautil import (
    HOST,
    KAMAILIO,
    KAMAILIO_RTPENGINE_MODULE,
    Kamailio,
    MediaRelay,
    Phone,
    ng,
    rtp,
    sdp,
    sdp_address,
)
from procutil import free_port
from rtp_pcap import read_udp
from serveutil import SIPP, finish

from fastsip import parse
from fastsip.sip import Request

PCAP = Path("/usr/share/sip-tester/g711a.pcap")
DATA = Path(__file__).parent / "data"

pytestmark = [
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)"),
    pytest.mark.skipif(KAMAILIO is None or KAMAILIO_RTPENGINE_MODULE is None,
                       reason="kamailio with its rtpengine module is not installed"),
    pytest.mark.skipif(not PCAP.exists(), reason="sipp's g711a.pcap is not installed"),
]


class Callee(Phone):
    """bob, registered with Kamailio over UDP: answers one INVITE with 200 and an SDP naming
    its own RTP socket (PCMA), sends its own packets to the relay, answers the BYE."""

    def __init__(self, proxy: tuple[str, int]) -> None:
        super().__init__("bob", proxy)
        self.invite: Request | None = None
        self.acked = False
        self.bye: Request | None = None
        self.sent = 0

    def serve(self, seconds: float, send_to_relay: int = 100) -> None:
        """Run the call: answer, then send ``send_to_relay`` packets (one per 20 ms) to the
        address the offer names, collect media, answer the BYE; until BYE or ``seconds``."""
        deadline = time.monotonic() + seconds
        sent = 0
        next_send = 0.0
        self.sock.settimeout(0.01)
        while time.monotonic() < deadline and self.bye is None:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                data = b""
            if data:
                msg = parse(data)
                if isinstance(msg, Request) and msg.method == "INVITE":
                    self.invite = msg
                    self.answer(msg, addr, sdp(self.media.port).replace("0 8 101", "8 101"))
                elif isinstance(msg, Request) and msg.method == "ACK":
                    self.acked = True
                elif isinstance(msg, Request) and msg.method == "BYE":
                    self.bye = msg
                    self.sock.sendto(bytes(msg.reply(200)), addr)
            if self.invite is not None and self.acked and sent < send_to_relay \
                    and time.monotonic() >= next_send:
                host, port, _ = sdp_address(bytes(self.invite.body).decode())
                self.media.send(rtp(sent, sent * 160, 0xCA11EE, bytes([sent % 256]) * 160, 8),
                                (host, port))
                sent += 1
                next_send = time.monotonic() + 0.02
            self.media.collect(0.005)
        self.sent = sent


def _start_caller(tmp_path: Path, kamailio: Kamailio, hold_ms: int) -> subprocess.Popen[str]:
    """sipp calls bob through Kamailio, plays g711a.pcap once answered, hangs up after
    ``hold_ms``."""
    scenario = tmp_path / "uac_pcap.xml"
    scenario.write_text((DATA / "sipp" / "uac_pcap.xml").read_text()
                        .replace("@PCAP@", str(PCAP)).replace("@HOLD_MS@", str(hold_ms)))
    return subprocess.Popen(
        [str(SIPP), "-sf", str(scenario), "-s", "bob", "-key", "domain", "example.com",
         "-key", "caller", "alice", "-m", "1", "-i", HOST, "-p", str(free_port()),
         "-mi", HOST, "-mp", str(free_port()), "-timeout", "30", "-timeout_error",
         "-nostdin", f"{HOST}:{kamailio.port}"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL)


def test_sipp_call_through_kamailio_carries_media_through_fastsip_media(tmp_path: Path
                                                                          ) -> None:
    sent = [p.payload[12:] for p in read_udp(PCAP)]   # RTP payloads (sipp may renumber)
    with MediaRelay(tmp_path) as relay, Kamailio(tmp_path, relay.ng) as kamailio:
        callee = Callee((HOST, kamailio.port))
        try:
            callee.register()
            caller = _start_caller(tmp_path, kamailio, 8000)
            callee.serve(20.0)
            out = finish(caller, 20)
            assert caller.returncode == 0, out[-2000:]
            invite = callee.invite
            assert invite is not None and callee.acked and callee.bye is not None
            # The offer the callee got names the relay, not the caller.
            host, port, rtcp = sdp_address(bytes(invite.body).decode())
            assert host == HOST and relay.port_min <= port <= relay.port_max, bytes(invite.body)
            assert rtcp == port + 1
            # Every packet sipp played came from the relay's port, in order, byte for byte.
            media = callee.media.got
            sources = {addr for _, addr in media}
            assert sources == {(HOST, port)}, sources
            payloads = [data[12:] for data, _ in media]
            assert payloads == sent, (len(payloads), len(sent))
        finally:
            callee.close()
        # The BYE's delete freed the call: a query for it is an error now.
        call_id = invite.call_id
        frm = invite.from_
        assert frm is not None and frm.tag is not None
        gone = ng(relay.ng, {"command": "query", "call-id": call_id, "from-tag": frm.tag})
        assert gone["result"] == "error", gone
        complaints = [line for line in kamailio.log().splitlines()
                      if "rtpengine" in line and "ERROR" in line]
        assert not complaints, complaints
    log = relay.log()
    assert "Traceback" not in log, log


def test_query_counts_both_directions_during_the_call(tmp_path: Path) -> None:
    """Kamailio's offer and answer set the call up; while it runs, ``query`` reports the
    packets relayed each way (sipp's 236, the callee's 100)."""
    with MediaRelay(tmp_path) as relay, Kamailio(tmp_path, relay.ng) as kamailio:
        callee = Callee((HOST, kamailio.port))
        try:
            callee.register()
            caller = _start_caller(tmp_path, kamailio, 9000)
            callee.serve(8.0)        # sipp's 7 s of audio are in; it hangs up at 9 s
            sent = callee.sent
            invite = callee.invite
            assert invite is not None and callee.bye is None
            frm = invite.from_
            assert frm is not None
            reply = ng(relay.ng, {"command": "query", "call-id": invite.call_id,
                                  "from-tag": frm.tag})
            callee.serve(10.0)
            finish(caller, 20)
        finally:
            callee.close()
    assert reply["result"] == "ok", reply
    totals = reply["totals"]["RTP"]
    assert totals["packets"] == 236 + sent, reply
    streams = [s for tag in reply["tags"].values() for m in tag["medias"] for s in m["streams"]]
    counts = sorted(s["stats"]["packets"] for s in streams if s["local port"] % 2 == 0)
    assert counts == sorted([236, sent]), streams

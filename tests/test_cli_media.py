"""``fastsip answer`` and ``fastsip call`` carrying sound, against sipp on loopback:

(a) call --play to a sipp UAS echoing RTP (-rtp_echo): the recorded echo is the played file
    after the G.711 round trip, sample for sample;
(b) sipp playing a recorded A-law call (play_pcap_audio) to answer --record: the WAV is the
    pcap's payload decoded independently;
(c) sipp playing its RFC 4733 key-press pcaps to answer: the digits logged and summarized;
(d) call --dtmf to a sipp UAS whose SDP names a socket of the test: tshark decodes the
    captured events to the digits sent;
(e) call quality: the clean echo rates loss 0 and a good MOS; through a seeded lossy relay
    (2 % and 8 %) the report's loss and jitter match tshark's analysis of what was forwarded;
plus the many-sessions pacing measurement of the asyncio shell (one timer for all).
"""

from __future__ import annotations

import asyncio
import csv
import heapq
import itertools
import json
import os
import random
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from pcapfile import read_packets
from procutil import fastsip_env, free_port, posix_only
from rtpanalysis import tshark_rtp_streams
from rtpanalysis import write_pcap as write_rtp_pcap
from serveutil import SCENARIOS, SIPP, finish, stop

from fastsip.rtp import RtpPacket, alaw_decode, ulaw_decode, ulaw_encode
from fastsip.rtp.wav import read_wav, write_wav

HOST = "127.0.0.1"
SIPP_PCAPS = Path("/usr/share/sip-tester")
TSHARK = shutil.which("tshark")

# The CLI's media sockets are watched with loop.add_reader, which Windows' default (proactor)
# event loop lacks: a product gap on Windows, not a test's assumption.
pytestmark = posix_only("fastsip call/answer media uses loop.add_reader, which Windows' "
                        "proactor event loop lacks")

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp (sip-tester) is not installed")
needs_pcaps = pytest.mark.skipif(not (SIPP_PCAPS / "g711a.pcap").exists(),
                                 reason="sip-tester's pcaps are not installed")


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsip.cli", *args], check=False, cwd=cwd,
                          env=fastsip_env(), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class Answer:
    """A ``fastsip answer`` process on HOST:port; ``stop()`` returns (stdout, stderr)."""

    def __init__(self, workdir: Path, *extra: str) -> None:
        self.port = free_port()
        self.err_path = workdir / "answer.err"
        self._err = open(self.err_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastsip.cli", "answer", "--listen",
             f"udp:{HOST}:{self.port}", "--media-port", "0", "--log-level", "info", *extra],
            cwd=workdir, env=fastsip_env(), stdout=subprocess.PIPE, stderr=self._err,
            stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            out, err = self.stop()
            raise AssertionError(f"answer did not start: {line!r} {out} {err}")

    def stop(self) -> tuple[str, str]:
        stop(self.proc)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        self.proc.stdout.close()
        self._err.close()
        return out, self.err_path.read_text()


def sipp_run(scenario: Path, workdir: Path, name: str, *extra: str,
             timeout: float = 40) -> subprocess.Popen[str]:
    assert SIPP is not None
    return subprocess.Popen(
        [SIPP, "-sf", str(scenario), "-i", HOST, "-nostdin", "-m", "1",
         "-timeout", str(int(timeout)), "-trace_msg", "-message_file",
         str(workdir / f"{name}.msg"), "-trace_err", "-error_file",
         str(workdir / f"{name}.err"), *extra],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, text=True)


def scenario(workdir: Path, name: str, **subst: str) -> Path:
    text = (SCENARIOS / name).read_text()
    for key, value in subst.items():
        text = text.replace(f"@{key}@", value)
    path = workdir / name
    path.write_text(text)
    return path


def sound(seconds: float = 2.0) -> np.ndarray:
    """A tone sweeping in loudness plus noise: no two 20 ms frames alike."""
    rng = np.random.default_rng(14)
    t = np.arange(int(8000 * seconds)) / 8000
    x = 9000 * np.sin(2 * np.pi * 440 * t) * np.sin(2 * np.pi * 0.7 * t + 0.3)
    return (x + rng.normal(0, 700, len(t))).astype(np.int16)


def find(haystack: np.ndarray, needle: np.ndarray) -> int | None:
    """Where ``needle`` occurs in ``haystack`` sample for sample (None: nowhere)."""
    for offset in range(len(haystack) - len(needle) + 1):
        if haystack[offset] == needle[0] and \
                np.array_equal(haystack[offset:offset + len(needle)], needle):
            return offset
    return None


# -- options and sockets -----------------------------------------------------------------------


def test_a_wav_that_is_not_16_bit_is_refused_naming_the_file(tmp_path: Path) -> None:
    import wave

    with wave.open(str(tmp_path / "eight.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(b"\x80" * 800)
    for command in (["answer", "--listen", f"udp:{HOST}:0"], ["call", f"sip:x@{HOST}:9"]):
        result = cli(*command, "--play", "eight.wav", cwd=tmp_path, timeout=30)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "eight.wav: 8-bit samples" in result.stderr


def test_media_ports_come_in_even_odd_pairs_from_the_base_skipping_busy_ones() -> None:
    from fastsip.asyncio.rtp import MediaEngine, PortsExhausted

    async def run() -> None:
        base = free_port() & ~1
        busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            busy.bind((HOST, base + 1))            # the first pair's RTCP port is taken
        except OSError:
            busy.close()
            pytest.skip("port range in use")
        engine = MediaEngine(HOST, base, port_count=6)
        try:
            first = engine.open()
            assert first.port % 2 == 0 and first.port != base
            assert first.rtcp_port == first.port + 1
            second = engine.open()
            assert {second.port, first.port} == {base + 2, base + 4}
            with pytest.raises(PortsExhausted):
                engine.open()
            first.close()
            assert engine.open().port == first.port   # a closed pair is free again
            anywhere = MediaEngine(HOST, 0).open()
            assert anywhere.rtcp_port == anywhere.port + 1
            anywhere.engine.close()
        finally:
            engine.close()
            busy.close()

    asyncio.run(run())


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        return loop
    return asyncio.new_event_loop()


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_a_stalled_process_records_the_packets_that_queued_meanwhile(loop_name: str) -> None:
    """The loop is blocked for 250 ms (4 jitter-buffer delays) while a peer thread keeps
    sending: the queued packets reach the jitter buffer in one burst and the missed playout
    slots are played in another; neither loses a frame, so the recording is still exactly
    what was sent."""
    from fastsip.asyncio.rtp import MediaEngine
    from fastsip.rtp.session import MediaSession

    pcm = sound(2.0)
    codes = ulaw_encode(pcm).tobytes()
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((HOST, 0))

    def send(to: tuple[str, int]) -> None:
        start = time.monotonic()
        for i in range(len(codes) // 160):
            time.sleep(max(0.0, start + 0.02 * i - time.monotonic()))
            peer.sendto(bytes(RtpPacket(payload_type=0, sequence_number=i, timestamp=160 * i,
                                        ssrc=99, payload=codes[160 * i:160 * (i + 1)])), to)

    async def run() -> np.ndarray:
        engine = MediaEngine(HOST, 0)
        stream = engine.open()
        session = MediaSession(remote=peer.getsockname(), record=True)
        stream.start(session)
        sender = threading.Thread(target=send, args=((HOST, stream.port),), daemon=True)
        sender.start()
        loop = asyncio.get_running_loop()
        loop.call_later(0.7, time.sleep, 0.25)      # the stall
        await asyncio.sleep(2.5)
        sender.join(5)
        stream.close()
        engine.close()
        return session.recorded()

    loop = new_loop(loop_name)
    try:
        recorded = loop.run_until_complete(run())
    finally:
        loop.close()
        peer.close()
    assert np.array_equal(recorded, ulaw_decode(ulaw_encode(pcm)))


# -- (a) the echo ----------------------------------------------------------------------------


@needs_sipp
def test_call_play_to_sipp_rtp_echo_records_the_file_back_sample_exact(tmp_path: Path) -> None:
    pcm = sound(2.0)
    write_wav(tmp_path / "in.wav", pcm)
    sip_port, media_port = free_port(), free_port()
    uas = sipp_run(scenario(tmp_path, "uas_media.xml", MEDIA_PORT="[media_port]"), tmp_path,
                   "uas", "-p", str(sip_port), "-mp", str(media_port), "-rtp_echo")
    try:
        time.sleep(0.3)
        result = cli("call", f"sip:echo@{HOST}:{sip_port}", "--play", "in.wav", "--record",
                     "rec", "--duration", "2.8", "--media-port", "0", "--log-level", "info",
                     "--report", "r.json", cwd=tmp_path)
    finally:
        out = finish(uas, 20)
    assert result.returncode == 0, result.stdout + result.stderr + out
    # The quality of the echo: nothing lost on loopback, rated "good" or better.
    records = json.loads((tmp_path / "r.json").read_text())
    (rx,) = [r for r in records if r["direction"] == "rx"]
    assert rx["packets"] >= 95 and rx["lost"] == 0 and rx["loss_pct"] == 0.0, rx
    assert rx["mos"] >= 4.2, rx
    assert re.search(r"quality: rx \d+ packets, lost 0 \(0.00 %\)", result.stderr)
    assert "total/avg rx" in result.stdout and "quality report r.json" in result.stdout
    (wav,) = (tmp_path / "rec").glob("*.wav")
    assert f"recorded {Path('rec') / wav.name}" in result.stdout
    recorded = read_wav(wav)
    expected = ulaw_decode(ulaw_encode(pcm))
    offset = find(recorded, expected)
    assert offset is not None, (len(recorded), len(expected))
    assert offset < 8000                            # the echo starts within a second


def test_call_play_and_dtmf_to_answer_echo_fastsip_both_ends(tmp_path: Path) -> None:
    """fastsip on both ends: answer --echo returns the played file (recorded by the caller
    sample for sample) and logs the caller's keys; both print them in their summaries."""
    pcm = sound(1.5)
    write_wav(tmp_path / "in.wav", pcm)
    answer = Answer(tmp_path, "--echo", "--report", "answer.csv")
    try:
        result = cli("call", f"sip:echo@{HOST}:{answer.port}", "--play", "in.wav", "--record",
                     "rec", "--dtmf", "7*", "--dtmf-after", "1.7", "--duration", "2.4",
                     "--media-port", "0", "--plot", "quality.png", cwd=tmp_path)
    finally:
        out, err = answer.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.findall(r"DTMF (\S) \((\d+) ms\)", err) == [("7", "100"), ("*", "100")], err
    assert re.search(r"DTMF \S+: 7\(100 ms\) \*\(100 ms\)", out), out
    stats = re.search(r"RTP sent (\d+) packets \((\d+) octets\), received (\d+) \(lost 0", err)
    assert stats is not None, err
    sent, octets, received = map(int, stats.groups())
    assert received >= 75 * 0.95 and sent == received and octets == 160 * sent  # the echo
    # Quality: the plot is a PNG; the answer's report (written when it stopped) has the call
    # in both directions, tx from the caller's RTCP reports -- in a call this short, only the
    # final one, sent at the BYE, which the answer's media stays open to take in.
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "quality plot quality.png (2 records)" in result.stdout
    rows = list(csv.DictReader((tmp_path / "answer.csv").read_text().splitlines()))
    assert sorted(r["direction"] for r in rows) == ["rx", "tx"], rows
    assert len({r["call_id"] for r in rows}) == 1
    for row in rows:
        assert row["lost"] == "0" and float(row["mos"]) >= 4.2, row
    (tx,) = [r for r in rows if r["direction"] == "tx"]
    assert int(tx["packets"]) == sent                    # every echo packet, in the report
    assert "quality report answer.csv (2 records)" in out
    (wav,) = (tmp_path / "rec").glob("*.wav")
    offset = find(read_wav(wav), ulaw_decode(ulaw_encode(pcm)))
    assert offset is not None and offset < 8000


# -- (b) recording a played pcap -------------------------------------------------------------


def pcap_audio(path: Path) -> tuple[bytes, int]:
    """The RTP payload of a one-stream pcap in sequence order, and its payload type."""
    packets = [RtpPacket.parse(p.payload) for p in read_packets(path) if p.proto == "udp"]
    packets.sort(key=lambda p: p.sequence_number)
    return b"".join(bytes(p.payload) for p in packets), packets[0].payload_type


@needs_sipp
@needs_pcaps
def test_answer_records_a_played_alaw_pcap_as_its_decoded_payload(tmp_path: Path) -> None:
    payload, pt = pcap_audio(SIPP_PCAPS / "g711a.pcap")
    assert pt == 8
    expected = alaw_decode(payload)
    answer = Answer(tmp_path, "--record", "rec")
    try:
        uac = sipp_run(scenario(tmp_path, "uac_pcap.xml", PCAP=str(SIPP_PCAPS / "g711a.pcap"),
                                HOLD_MS="8000"),
                       tmp_path, "uac", "-s", "alice", "-key", "domain", HOST, "-key",
                       "caller", "bob", "-mp", str(free_port()), f"{HOST}:{answer.port}")
        sipp_out = finish(uac, 40)
        assert uac.returncode == 0, sipp_out
    finally:
        out, err = answer.stop()
    assert "1 answered" in out, out + err
    (wav,) = (tmp_path / "rec").glob("*.wav")
    recorded = read_wav(wav)
    assert len(recorded) == len(expected), (len(recorded), len(expected))
    assert np.array_equal(recorded, expected)


# -- (c) DTMF in -----------------------------------------------------------------------------


@needs_sipp
@needs_pcaps
def test_answer_logs_the_keys_sipp_presses_from_its_rfc4733_pcaps(tmp_path: Path) -> None:
    keys = [("1", "1"), ("2", "2"), ("pound", "#"), ("9", "9")]
    play = "\n".join(
        f'<nop><action><exec play_pcap_audio="{SIPP_PCAPS}/dtmf_2833_{name}.pcap"/></action>'
        '</nop>\n<pause milliseconds="500"/>' for name, _ in keys)
    answer = Answer(tmp_path, "--rtp")
    try:
        uac = sipp_run(scenario(tmp_path, "uac_dtmf_pcap.xml", PLAY=play), tmp_path, "uac",
                       "-s", "alice", "-key", "domain", HOST, "-key", "caller", "bob",
                       "-mp", str(free_port()), f"{HOST}:{answer.port}")
        sipp_out = finish(uac, 40)
        assert uac.returncode == 0, sipp_out
    finally:
        out, err = answer.stop()
    logged = re.findall(r"DTMF (\S) \((\d+) ms\)", err)
    # each pcap is one 280 ms press (2240 ticks), its end packet captured three times
    assert logged == [(d, "280") for _, d in keys], err
    summary = re.search(r"DTMF \S+: (.*)", out)
    assert summary is not None, out
    assert summary.group(1) == " ".join(f"{d}(280 ms)" for _, d in keys)


# -- (d) DTMF out, decoded by tshark ---------------------------------------------------------


def write_pcap(path: Path, datagrams: list[tuple[float, tuple[str, int], int, bytes]]) -> None:
    """A classic pcap (LINKTYPE_RAW: IPv4) of UDP datagrams (time, source, dest port, data)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
        for when, (src, sport), dport, data in datagrams:
            udp = struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0,
                             socket.inet_aton(src), socket.inet_aton(HOST)) + udp
            sec = int(when)
            f.write(struct.pack("<IIII", sec, int((when - sec) * 1e6), len(ip), len(ip)) + ip)


@needs_sipp
@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_call_dtmf_reaches_the_peer_as_rfc4733_events_tshark_decodes(tmp_path: Path) -> None:
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((HOST, 0))
    sink.settimeout(0.2)
    sink_port = sink.getsockname()[1]
    got: list[tuple[float, tuple[str, int], int, bytes]] = []
    done = threading.Event()

    def collect() -> None:
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline:
            try:
                data, addr = sink.recvfrom(2048)
            except TimeoutError:
                continue
            got.append((time.time(), addr, sink_port, data))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    sip_port = free_port()
    uas = sipp_run(scenario(tmp_path, "uas_media.xml", MEDIA_PORT=str(sink_port)), tmp_path,
                   "uas", "-p", str(sip_port), "-mp", str(free_port()))
    try:
        time.sleep(0.3)
        result = cli("call", f"sip:keys@{HOST}:{sip_port}", "--dtmf", "1234#", "--dtmf-after",
                     "0.2", "--duration", "1.8", "--media-port", "0", cwd=tmp_path)
    finally:
        sipp_out = finish(uas, 20)
        done.set()
        reader.join(5)
        sink.close()
    assert result.returncode == 0, result.stdout + result.stderr + sipp_out
    pcap = tmp_path / "dtmf.pcap"
    write_pcap(pcap, got)
    assert TSHARK is not None
    fields = subprocess.run(
        [TSHARK, "-r", str(pcap), "-d", f"udp.port=={sink_port},rtp",
         # (Wireshark 4.0 has no rtp_event_payload_type_value preference: a Decode As of
         # the payload type says the same)
         "-d", "rtp.pt==101,rtpevent", "-Y", "rtpevent", "-T", "fields",
         "-e", "rtp.timestamp", "-e", "rtp.marker", "-e", "rtpevent.event_id",
         "-e", "rtpevent.end_of_event", "-e", "rtpevent.duration"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [line.split("\t") for line in fields.splitlines() if line.strip()]
    assert rows, fields
    events: dict[str, list[list[str]]] = {}
    for row in rows:
        events.setdefault(row[0], []).append(row)
    digits = "".join("0123456789*#ABCD"[int(group[0][2])] for group in events.values())
    assert digits == "1234#"
    for group in events.values():
        assert group[0][1] in ("1", "True")                        # marker on the first
        assert sum(r[3] in ("1", "True") for r in group) == 3      # the end sent 3 times
        assert group[-1][4] == "800"                                # 100 ms at 8 kHz


# -- hold by re-INVITE -------------------------------------------------------------------------


class Sink:
    """A UDP socket of the test that keeps (arrival time, source, data) of what reaches it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self.got: list[tuple[float, tuple[str, int], int, bytes]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        deadline = time.monotonic() + 60
        while not self._done.is_set() and time.monotonic() < deadline:
            try:
                data, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self.got.append((time.time(), addr, self.port, data))

    def close(self) -> None:
        self._done.set()
        self._thread.join(5)
        self.sock.close()


@needs_sipp
def test_answer_stops_sending_while_the_caller_holds_and_resumes_after(tmp_path: Path) -> None:
    write_wav(tmp_path / "moh.wav", sound(1.0))
    sink = Sink()
    answer = Answer(tmp_path, "--play", "moh.wav", "--play-loop")
    try:
        uac = sipp_run(scenario(tmp_path, "uac_hold.xml", MEDIA_PORT=str(sink.port),
                                HOLD_MS="1500"),
                       tmp_path, "uac", "-s", "alice", "-key", "domain", HOST, "-key",
                       "caller", "bob", "-mp", str(free_port()), f"{HOST}:{answer.port}")
        sipp_out = finish(uac, 40)
        assert uac.returncode == 0, sipp_out
    finally:
        out, err = answer.stop()
        sink.close()
    assert "1 answered" in out, out + err
    # the answer to the hold offer says recvonly (RFC 3264 §6.1)
    assert "a=recvonly" in (tmp_path / "uac.msg").read_text()
    rtp = [(t, RtpPacket.parse(d)) for t, _, _, d in sink.got if d[1] < 200]
    assert len(rtp) > 100
    gaps = [(b[0] - a[0], b[1]) for a, b in itertools.pairwise(rtp)]
    long_gaps = [(g, p) for g, p in gaps if g > 0.5]
    assert len(long_gaps) == 1, [round(g, 3) for g, _ in long_gaps]
    gap, resumed = long_gaps[0]
    assert 1.2 < gap < 1.8                          # the hold lasted 1.5 s
    assert resumed.marker                           # sending again starts a talkspurt
    assert "media now recvonly" in err and "media now sendrecv" in err


# -- (5) many sessions on one timer ----------------------------------------------------------


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_two_hundred_sessions_on_one_timer_keep_20ms_pacing(loop_name: str) -> None:
    """200 sessions in one process, each sending to a socket of its own peer: every RTP packet
    is timed by its arrival at the peer (the kernel's receive stamp on loopback: when it left,
    however late the peer's reader runs) and compared with its frame's due time (epoch + k *
    20 ms, k from the packet's timestamp).  One loop timer serves them all (~100 wake-ups/s),
    the audio goes out by the compiled send path, the peers receive every packet, and the
    deviation stays under ``bound`` at p99.

    The machine is shared (2 cores, other test runs): a run the scheduler stalls says nothing
    about the engine, so the best of three runs is judged (a slow engine fails all three)."""
    from fastsip.asyncio.rtp import MediaEngine
    from fastsip.rtp.session import MediaSession

    if not sys.platform.startswith("linux"):
        pytest.skip("times arrivals with Linux's SO_TIMESTAMPNS")
    so_timestampns = 35
    n, seconds, bound = 200, 4.0, 0.015
    pcm = sound(1.0)
    deviations: list[float] = []
    results = []

    async def run() -> tuple[int, int, int, int]:
        engine = MediaEngine(HOST, 0)
        assert asyncio.get_running_loop().time() == pytest.approx(time.monotonic(), abs=0.01)
        realtime_offset = time.time() - time.monotonic()
        peers = []
        streams = []
        by_peer: dict[int, MediaSession] = {}
        for _ in range(n):
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind((HOST, 0))
            peer.setblocking(False)
            peer.setsockopt(socket.SOL_SOCKET, so_timestampns, 1)
            peers.append(peer)
            stream = engine.open()
            session = MediaSession(remote=peer.getsockname(), source=pcm, loop=True)
            by_peer[peer.fileno()] = session
            stream.start(session)
            streams.append(stream)
        received = 0

        def drain(sock: socket.socket) -> None:
            nonlocal received
            session = by_peer[sock.fileno()]
            while True:
                try:
                    data, anc, _flags, _addr = sock.recvmsg(2048, socket.CMSG_SPACE(16))
                except BlockingIOError:
                    return
                if data[1] >= 200:                  # RTCP (may land on a neighbour)
                    continue
                received += 1
                for level, kind, stamp in anc:
                    if level == socket.SOL_SOCKET and kind == so_timestampns:
                        sec, nsec = struct.unpack_from("@ll", stamp)
                        (ts,) = struct.unpack_from("!I", data, 4)
                        k = ((ts - session._ts0) & 0xFFFFFFFF) // session.samples_per_frame
                        deviations.append(sec + nsec * 1e-9 - realtime_offset
                                          - session.frame_time(k))

        loop = asyncio.get_running_loop()
        for peer in peers:
            loop.add_reader(peer.fileno(), drain, peer)
        await asyncio.sleep(seconds)
        sessions = [s.session for s in streams if s.session]
        engine.close()                              # may send a last frame: counted after it
        sent = sum(session.tx.packets for session in sessions)
        batched = engine._sender.sent
        wakeups = engine.wakeups
        await asyncio.sleep(0.05)                   # the last packets reach their peers
        for peer in peers:
            drain(peer)
            loop.remove_reader(peer.fileno())
            peer.close()
        return sent, received, wakeups, batched

    for _attempt in range(3):
        deviations.clear()
        loop = new_loop(loop_name)
        try:
            sent, received, wakeups, batched = loop.run_until_complete(run())
        finally:
            loop.close()
        lat = np.array(deviations)
        p50, p99, worst = (np.percentile(lat, 50), np.percentile(lat, 99), lat.max())
        print(f"\n{loop_name}: {n} sessions, {seconds} s: {sent} RTP packets sent, {received} received, "
              f"({batched} by the compiled path), {wakeups} timer wake-ups; "
              f"arrival - due time: p50 {p50 * 1e3:.2f} ms, "
              f"p99 {p99 * 1e3:.2f} ms, max {worst * 1e3:.2f} ms, min {lat.min() * 1e3:.2f} ms")
        frames = int(seconds / 0.02)
        assert sent >= n * (frames - 2) * 0.98      # every session kept its 50 frames/s
        # Loopback loses nothing at this rate: every packet reaches the peer it was sent to.
        # (A stray RTCP report landing on a stream's RTP port once latched a session onto it,
        # and ~1 % of the audio went there.)
        assert received >= 0.999 * sent
        assert batched >= 0.99 * sent               # plain audio: all by the compiled path
        assert len(lat) >= 0.99 * received          # every arrival timed
        assert wakeups <= seconds / 0.01 + 5        # one timer for all: ~100 wake-ups/s
        assert lat.min() >= 0                       # never early
        results.append(p99)
        if p99 < bound:
            break
    assert min(results) < bound, f"p99 send deviation {[f'{r * 1e3:.1f}' for r in results]} ms"


# -- (e) call quality through a lossy path, against tshark ------------------------------------


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    """An RTP socket and the RTCP one on the next port (bind(0) gives odd ports too)."""
    for _ in range(64):
        rtp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtp.bind((HOST, 0))
        rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            rtcp.bind((HOST, rtp.getsockname()[1] + 1))
        except OSError:
            rtp.close()
            rtcp.close()
            continue
        return rtp, rtcp
    raise RuntimeError("no free RTP/RTCP port pair")


def realtime(pid: int) -> bool:
    """SCHED_FIFO at a low real-time priority for ``pid`` (0: the calling thread), so other
    processes do not delay its wake-ups; False when not permitted.  Only the test's own relay
    thread uses it (its clock is the reference); it sleeps most of the time and stops within
    the test."""
    try:
        os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
    except (OSError, AttributeError):
        return False
    return True


class LossyRelay:
    """A loopback SIP+RTP relay between a caller and ``answer``, in a thread of the test.

    SIP datagrams pass with the SDP's ``m=`` port rewritten to the relay's own RTP sockets (the
    answer replies to the relay: rport).  RTP from the caller to the answer is dropped and
    delayed by a seeded pattern -- exactly ``loss`` of the first ``count`` packets, never the
    first or last two, and 0-12 ms of random delay plus 4 ms in one 0.5 s stretch of every two
    seconds, never enough to reorder 20 ms packets (a jitter of some 4 ms: well above the
    answer's wake-up latency) -- and each forwarded packet is kept with the time it was sent
    on, for the capture.  RTCP, and RTP back to the caller, pass as they
    are."""

    def __init__(self, answer_port: int, *, loss: float, seed: int, count: int) -> None:
        rng = random.Random(seed)
        self.drops = set(rng.sample(range(2, count - 2), round(loss * count)))
        self.delays = [rng.uniform(0.0, 0.012) + (0.004 if (i // 25) % 4 == 1 else 0.0)
                       for i in range(count)]
        self.answer_sip = (HOST, answer_port)
        self.sip_caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # caller side
        self.sip_caller.bind((HOST, 0))
        self.sip_answer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # answer side
        self.sip_answer.bind((HOST, 0))
        self.rtp_caller, self.rtcp_caller = _socket_pair()
        self.rtp_answer, self.rtcp_answer = _socket_pair()
        self.port = self.sip_caller.getsockname()[1]
        self.forward_port = self.rtp_answer.getsockname()[1]   # the capture's source port
        self.caller: dict[str, tuple[str, int]] = {}      # "sip", "rtp": the caller's addresses
        self.answer: dict[str, tuple[str, int]] = {}      # "rtp": the answer's RTP address
        self.forwarded: list[tuple[float, bytes]] = []    # (send time, datagram) to the answer
        self.received = 0                                 # RTP from the caller
        self._stop = threading.Event()
        self.realtime = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _rewrite(data: bytes, port: int) -> tuple[bytes, int | None]:
        head, sep, body = data.partition(b"\r\n\r\n")
        m = re.search(rb"^m=audio (\d+) ", body, re.MULTILINE)
        if not sep or m is None:
            return data, None
        body = body[:m.start(1)] + str(port).encode() + body[m.end(1):]
        head = re.sub(rb"(?im)^(content-length|l)[ \t]*:[ \t]*\d+",
                      lambda h: h.group(1) + b": " + str(len(body)).encode(), head)
        return head + sep + body, int(m.group(1))

    def _run(self) -> None:
        self.realtime = realtime(0)  # this thread: its send times are the capture's
        pending: list[tuple[float, int, bytes]] = []
        socks = [self.sip_caller, self.sip_answer, self.rtp_caller, self.rtcp_caller,
                 self.rtp_answer, self.rtcp_answer]
        deadline = time.monotonic() + 90
        while not self._stop.is_set() and time.monotonic() < deadline:
            now = time.monotonic()
            while pending and pending[0][0] <= now and "rtp" in self.answer:
                _, _, data = heapq.heappop(pending)
                sent_at = time.monotonic()
                self.rtp_answer.sendto(data, self.answer["rtp"])
                self.forwarded.append((sent_at, data))
            timeout = 0.05 if not pending else max(0.0, min(0.05, pending[0][0] - now))
            readable, _, _ = select.select(socks, [], [], timeout)
            for sock in readable:
                data, addr = sock.recvfrom(4096)
                if sock is self.sip_caller:
                    self.caller["sip"] = addr
                    data, port = self._rewrite(data, self.rtp_answer.getsockname()[1])
                    if port is not None:
                        self.caller["rtp"] = (HOST, port)
                    self.sip_answer.sendto(data, self.answer_sip)
                elif sock is self.sip_answer and "sip" in self.caller:
                    data, port = self._rewrite(data, self.rtp_caller.getsockname()[1])
                    if port is not None:
                        self.answer["rtp"] = (HOST, port)
                    self.sip_caller.sendto(data, self.caller["sip"])
                elif sock is self.rtp_caller:
                    n = self.received
                    self.received += 1
                    if n in self.drops:
                        continue
                    delay = self.delays[n] if n < len(self.delays) else 0.0
                    heapq.heappush(pending, (time.monotonic() + delay, n, data))
                elif sock is self.rtp_answer and "rtp" in self.caller:
                    self.rtp_caller.sendto(data, self.caller["rtp"])
                elif sock is self.rtcp_caller and "rtp" in self.answer:
                    host, port = self.answer["rtp"]
                    self.rtcp_answer.sendto(data, (host, port + 1))
                elif sock is self.rtcp_answer and "rtp" in self.caller:
                    host, port = self.caller["rtp"]
                    self.rtcp_caller.sendto(data, (host, port + 1))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in (self.sip_caller, self.sip_answer, self.rtp_caller, self.rtcp_caller,
                     self.rtp_answer, self.rtcp_answer):
            sock.close()


@pytest.mark.skipif(TSHARK is None, reason="tshark is not installed")
def test_call_quality_through_a_lossy_relay_matches_tshark(tmp_path: Path) -> None:
    """call --play through the relay to answer --echo, at 2 % and 8 % loss: the answer's rx
    record (what it received) matches tshark's analysis of what the relay forwarded -- loss
    exactly, jitter within 1 % -- the caller's tx record (from the answer's RTCP reports)
    has the same loss, and the MOS is lower at 8 %."""
    seconds = 6.0
    count = int(seconds / 0.02)
    write_wav(tmp_path / "in.wav", sound(seconds))
    rated: dict[float, float] = {}
    for loss, seed in ((0.02, 1402), (0.08, 1408)):
        work = tmp_path / f"loss{round(loss * 100)}"
        work.mkdir()
        # The answer as users run it (uvloop, normal priority): on Linux its arrival times
        # are the kernel's receive stamps, so how late its loop wakes is not jitter to it.
        answer = Answer(work, "--echo", "--report", "answer.json")
        relay = LossyRelay(answer.port, loss=loss, seed=seed, count=count)
        try:
            # The file ends a second before the BYE: every delayed packet is in before it.
            result = cli("call", f"sip:echo@{HOST}:{relay.port}", "--play", "../in.wav",
                         "--duration", str(seconds + 1.2), "--media-port", "0",
                         "--loop", "asyncio", "--report", "call.csv", "--log-level", "info",
                         cwd=work)
        finally:
            relay.close()
            _, err = answer.stop()
        assert result.returncode == 0, result.stdout + result.stderr + err
        assert relay.received == count, relay.received
        assert len(relay.forwarded) == count - len(relay.drops)
        (rx,) = [r for r in json.loads((work / "answer.json").read_text())
                 if r["direction"] == "rx"]
        # tshark's view of the same packets, stamped when the relay sent them.
        pcap = work / "forwarded.pcap"
        port = relay.answer["rtp"][1]
        epoch = 1_764_720_000.0
        write_rtp_pcap(pcap, [(epoch + round(t - relay.forwarded[0][0], 6), d)
                              for t, d in relay.forwarded],
                       relay.forward_port, port)
        (ts,) = tshark_rtp_streams(pcap, port)
        assert rx["packets"] == ts.packets == count - len(relay.drops)
        assert rx["lost"] == ts.lost == len(relay.drops)
        assert rx["loss_pct"] == pytest.approx(100 * len(relay.drops) / count)
        assert rx["jitter_ms_mean"] > 1.0, "the relay's delays must show as jitter"
        # Within 1 %.  The reference is the relay's clock read just before each sendto: the
        # relay thread runs at real-time priority when permitted (root), so other processes
        # do not slip between that read and the send; without it, a preemption there is
        # reference error, allowed for by a wider absolute margin.
        quiet = relay.realtime
        assert rx["jitter_ms_mean"] == pytest.approx(ts.mean_jitter, rel=0.01,
                                                     abs=0.005 if quiet else 0.1)
        assert rx["jitter_ms_max"] == pytest.approx(ts.max_jitter, rel=0.01,
                                                    abs=0.005 if quiet else 0.35)
        # The caller's tx row: the answer's final receiver report about the caller's stream,
        # sent at the BYE and taken in while the caller's media lingers: the whole call.
        rows = list(csv.DictReader((work / "call.csv").read_text().splitlines()))
        (tx,) = [r for r in rows if r["direction"] == "tx"]
        assert (int(tx["packets"]), int(tx["lost"])) == (count, len(relay.drops)), tx
        assert float(tx["loss_pct"]) == pytest.approx(rx["loss_pct"])
        assert f"quality: rx {ts.packets} packets, lost {ts.lost} " in err
        rated[loss] = rx["mos"]
    assert rated[0.08] < rated[0.02] < 4.5, rated


def test_report_and_plot_options_are_refused_before_any_call(tmp_path: Path) -> None:
    """A wrong --report extension, a --plot without matplotlib: exit 2 at once, naming the fix
    (no call placed: the target is a port nobody answers)."""
    target = f"sip:nobody@{HOST}:{free_port()}"
    started = time.monotonic()
    bad = cli("call", target, "--rtp", "--report", "r.txt", "--media-port", "0", cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "--report r.txt: use a .json or .csv path" in bad.stderr
    # A matplotlib that cannot be imported, first on the path.
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('not here')\n")
    env = fastsip_env()
    env["PYTHONPATH"] = f"{shim.parent}:{env['PYTHONPATH']}"
    no_plot = subprocess.run(
        [sys.executable, "-m", "fastsip.cli", "call", target, "--plot", "q.png",
         "--media-port", "0"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert no_plot.returncode == 2, no_plot.stderr
    assert "pip install 'fastsip[plot]'" in no_plot.stderr
    answer = subprocess.run(
        [sys.executable, "-m", "fastsip.cli", "answer", "--listen", f"udp:{HOST}:0",
         "--report", "a.xml"], cwd=tmp_path, env=fastsip_env(), capture_output=True, text=True,
        timeout=60, stdin=subprocess.DEVNULL, check=False)
    assert answer.returncode == 2 and "use a .json or .csv path" in answer.stderr
    assert time.monotonic() - started < 30
    assert not list(tmp_path.glob("r.*")) and not list(tmp_path.glob("q.*"))


def test_session_meters_a_new_source_apart_and_hands_over_report_blocks() -> None:
    """The hooks the CLI's quality wiring uses: a new meter when the peer's SSRC changes; each
    RTCP report block about our SSRC (with or without LSR) to on_report_block, others not."""
    from fastsip.rtp.quality import QualityMeter
    from fastsip.rtp.rtcp import ReceiverReport, ReceptionReport, build_compound
    from fastsip.rtp.session import MediaSession

    session = MediaSession(remote=(HOST, 9), ssrc=0x1111)
    session.start(0.0)
    meters: list[QualityMeter] = []

    def new_meter() -> QualityMeter:
        meters.append(QualityMeter())
        return meters[-1]

    session.meter = new_meter()
    session.new_meter = new_meter
    blocks: list[tuple[ReceptionReport, float]] = []
    session.on_report_block = lambda block, now: blocks.append((block, now))
    payload = b"\xff" * 160
    for k in range(10):                    # source A, one lost (seq 104)
        if k != 4:
            session.receive(struct.pack("!BBHII", 0x80, 0, 100 + k, 160 * k, 0xA) + payload,
                            (HOST, 9), 0.02 * k)
    for k in range(5):                     # source B, nothing lost
        session.receive(struct.pack("!BBHII", 0x80, 0, 7000 + k, 999 + 160 * k, 0xB) + payload,
                        (HOST, 9), 0.2 + 0.02 * k)
    assert len(meters) == 2
    a, b = meters[0].record("c", "rx"), meters[1].record("c", "rx")
    assert (a.packets, a.lost, b.packets, b.lost) == (9, 1, 5, 0)
    ours = ReceptionReport(0x1111, fraction_lost=12, cumulative_lost=3, highest_sequence=500,
                           jitter=40)
    other = ReceptionReport(0x2222, cumulative_lost=99)
    session.receive_rtcp(build_compound([ReceiverReport(0xB, [other, ours])]), (HOST, 10), 1.5)
    assert [(blk.ssrc, blk.cumulative_lost, t) for blk, t in blocks] == [(0x1111, 3, 1.5)]

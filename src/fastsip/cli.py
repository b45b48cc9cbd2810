"""The ``fastsip`` command: ``serve`` (the registrar and proxy, :mod:`fastsip.app.serve`) and
SIP test tools for carriers, on the asyncio endpoint.

    fastsip serve --domain example.com
    fastsip answer --listen udp:0.0.0.0:5060 [--listen tcp:0.0.0.0:5060]
    fastsip call sip:test@192.0.2.10:5060 --calls 100 --rate 10 --duration 5

``answer`` is a UAS that answers every INVITE (180, then 200 with SDP) until stopped; ``call``
places calls at a steady rate and prints what became of them.  This module adapts the sans-IO UA
core's callbacks to the event loop, which the shell runs (:mod:`fastsip.asyncio.runner`: the
loop, and SIGINT/SIGTERM as a stop); it is the only module that prints.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import platform
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastsip.asyncio.runner import LOOPS, LoopUnavailableError, StopSignals, run
from fastsip.sip import REASON_PHRASES, URI
from fastsip.transaction import TimerConfig
from fastsip.ua import AutoAnswer, Call, UserAgent

log = logging.getLogger("fastsip.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: After a call ends its RTP sockets stay open this long (sending nothing) so the peer's final
#: RTCP report, which crosses the BYE, still reaches it (see CallMedia.ended).
MEDIA_LINGER = 0.3


# -- shared ------------------------------------------------------------------------------------


def _timers(args: argparse.Namespace) -> TimerConfig:
    return TimerConfig(t1=args.t1, t2=args.t2)


# -- fastsip answer ----------------------------------------------------------------------------


class AnswerStats:
    """What the answering UAS did, counted from the UA core's call callbacks."""

    def __init__(self) -> None:
        self.incoming = 0
        self.answered = 0
        self.confirmed = 0
        self.ended: Counter[str] = Counter()
        self.media: CallMedia | None = None

    def on_incoming(self, policy: AutoAnswer) -> Any:
        def incoming(call: Call) -> None:
            self.incoming += 1
            call.on_answer = self._answered
            call.on_confirm = self._confirmed
            call.on_end = self._ended
            if self.media is not None:
                call.on_reinvite = self.media.reinvite
            policy(call)
        return incoming

    def _answered(self, call: Call) -> None:
        self.answered += 1
        if self.media is not None:
            self.media.answered(call)

    def _confirmed(self, call: Call) -> None:
        self.confirmed += 1

    def _ended(self, call: Call) -> None:
        if self.media is not None:
            self.media.ended(call)
        if call.error:
            self.ended[call.error] += 1
        elif call.ended_by == "cancel":
            self.ended["cancelled"] += 1
        elif call.ended_by == "remote":
            self.ended["BYE from caller"] += 1
        else:
            self.ended[f"ended ({call.ended_by}, {call.status})"] += 1


async def answer_main(args: argparse.Namespace) -> int:
    # SIGINT and SIGTERM stop it from the start: the summary is printed even then.
    with StopSignals() as stop:
        return await _answer(args, stop)


async def _answer(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from fastsip.asyncio import Endpoint

    stats = AnswerStats()
    problem = _check_report_options(args)
    if problem is not None:
        print(f"fastsip answer: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        media = CallMedia.from_args(args, args.media_address, "answer")
    except ValueError as exc:
        print(f"fastsip answer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    stats.media = media
    policy = AutoAnswer(args.media_address, args.media_port, answer_after=args.ring_time,
                        media_for=media.media_for if media is not None else None)
    if media is not None:
        media.policy = policy
    ua = UserAgent(on_incoming=stats.on_incoming(policy), user=args.user, answerer=policy)
    endpoint = Endpoint(ua, listen=args.listen, advertise=args.advertise, timers=_timers(args))
    try:
        await endpoint.start()
    except (OSError, ValueError) as exc:
        # (a ListenError names the address, a ValueError the bad spec)
        print(f"fastsip answer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ua.attach(endpoint.transactions)
    for listener in endpoint.listeners:
        print(f"listening on {listener.address}", flush=True)
    started = time.monotonic()
    try:
        await stop.wait()
    finally:
        if media is not None:
            media.close()
        await endpoint.close()
    elapsed = time.monotonic() - started
    print(f"\nfastsip answer: {elapsed:.1f} s, {stats.incoming} INVITEs, "
          f"{stats.answered} answered, {stats.confirmed} ACKed", flush=True)
    for what, n in sorted(stats.ended.items()):
        print(f"  {what}: {n}")
    if media is not None:
        media.print_summary()
    sys.stdout.flush()
    if media is not None and not media.write_reports(args, "answer"):
        return EXIT_FAILED
    return EXIT_OK


# -- fastsip call ------------------------------------------------------------------------------


class CallStats:
    """Outcomes of the calls ``fastsip call`` placed."""

    def __init__(self) -> None:
        self.attempted = 0
        self.answered = 0
        self.completed = 0
        self.failed: Counter[str] = Counter()
        self.stopped = 0              # cancelled or hung up early because we were stopped
        self.active = 0

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    def record(self, call: Call, stopping: bool) -> None:
        self.active -= 1
        if call.answered:
            if call.bye_status is not None and 200 <= call.bye_status < 300 \
                    or call.ended_by == "remote":
                self.completed += 1
            else:
                self.failed[f"BYE {_status_text(call.bye_status)}"] += 1
        elif stopping and call.ended_by == "cancel":
            self.stopped += 1
        else:
            self.failed[f"INVITE {_status_text(call.status)}"] += 1


def _status_text(status: int | None) -> str:
    if status is None:
        return "no response"
    return f"{status} {REASON_PHRASES.get(status, '')}".rstrip()


async def call_main(args: argparse.Namespace) -> int:
    # SIGINT and SIGTERM stop it from the start: calls up are hung up, the summary printed.
    with StopSignals() as stop:
        return await _call(args, stop)


async def _call(args: argparse.Namespace, stop: asyncio.Event) -> int:
    from fastsip.asyncio import Endpoint
    from fastsip.sdp import create_offer

    try:
        target = URI(args.uri)
        if not target.is_sip:
            raise ValueError("not a sip: or sips: URI")
    except ValueError as exc:
        print(f"fastsip call: bad SIP URI {args.uri!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    problem = _check_report_options(args)
    if problem is not None:
        print(f"fastsip call: {problem}", file=sys.stderr)
        return EXIT_USAGE
    transport = args.transport.upper()
    listen = args.listen or [f"{transport.lower()}:{_default_host(target)}:0"]
    # Incoming INVITEs are not what this tool is for: refuse them politely.  Re-INVITEs in our
    # calls (hold) are answered on each call's own media address (see CallMedia.adopt).
    answerer = AutoAnswer("127.0.0.1", args.media_port)
    ua = UserAgent(on_incoming=lambda c: c.reject(603), user=args.user, answerer=answerer)
    endpoint = Endpoint(ua, listen=listen, advertise=args.advertise, timers=_timers(args))
    try:
        await endpoint.start()
    except (OSError, ValueError) as exc:
        # (a ListenError names the address, a ValueError the bad spec)
        print(f"fastsip call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    ua.attach(endpoint.transactions)
    loop = asyncio.get_running_loop()
    host, _ = endpoint.transport.sent_by(transport)
    try:
        media = CallMedia.from_args(args, host, "call")
        answerer.media_address = host
        if media is not None:
            media.policy = answerer
    except ValueError as exc:
        await endpoint.close()
        print(f"fastsip call: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sdp = bytes(create_offer(host, args.media_port))
    stats = CallStats()
    all_done = asyncio.Event()
    live: set[Call] = set()
    clock = endpoint.clock
    state = {"stopping": False, "placing": True}

    def check_done() -> None:
        if not state["placing"] and stats.active == 0:
            all_done.set()

    def on_answer(call: Call) -> None:
        stats.answered += 1
        if media is not None:
            media.answered(call)
            if args.dtmf and not state["stopping"]:
                clock.call_later(args.dtmf_after, media.send_dtmf, call, args.dtmf)
        if state["stopping"]:
            call.bye()
        else:
            clock.call_later(args.duration, hang_up, call)

    def hang_up(call: Call) -> None:
        if call.state == "confirmed":
            call.bye()

    def on_end(call: Call) -> None:
        if media is not None:
            media.ended(call)
        live.discard(call)
        stats.record(call, state["stopping"])
        check_done()

    def place() -> None:
        body = sdp
        stream = None
        try:
            if media is not None:
                stream = media.open()
                body = bytes(create_offer(host, stream.port))
            call = ua.invite(target, body=body, transport=transport, proxy=args.proxy)
        except Exception as exc:  # noqa: BLE001 - a bad URI/proxy or no route: count, go on
            log.error("cannot place a call: %s", exc)
            if stream is not None:
                stream.close()
            stats.attempted += 1
            stats.failed[f"not sent ({exc})"] += 1
            return
        if media is not None and stream is not None:
            media.adopt(call, stream)
            call.on_reinvite = media.reinvite
        stats.attempted += 1
        stats.active += 1
        live.add(call)
        call.on_answer = on_answer
        call.on_end = on_end

    started = loop.time()
    elapsed = 0.0
    interrupted = False
    try:
        interval = 1.0 / args.rate
        placed = 0
        while placed < args.calls and not stop.is_set():
            due = min(args.calls, int((loop.time() - started) / interval) + 1)
            while placed < due and (not args.limit or stats.active < args.limit):
                place()
                placed += 1
            next_at = started + placed * interval
            # Behind schedule only because --limit calls are up: poll gently, do not spin.
            floor = 0.01 if placed < due else 0.0
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(floor, next_at - loop.time()))
        state["placing"] = False
        check_done()
        stopper = asyncio.ensure_future(stop.wait())
        waiter = asyncio.ensure_future(all_done.wait())
        await asyncio.wait({stopper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not all_done.is_set():
            interrupted = True
            state["stopping"] = True
            # Wind down: hang up what is up, cancel what rings; wait a little for the answers.
            for call in list(live):
                with contextlib.suppress(Exception):
                    if call.state == "confirmed":
                        call.bye()
                    elif call.state in ("calling", "proceeding"):
                        call.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(all_done.wait(), args.stop_timeout)
        stopper.cancel()
        waiter.cancel()
        interrupted = interrupted or placed < args.calls
        elapsed = loop.time() - started
        linger = args.linger if args.linger is not None else (0.0 if transport == "UDP" else 5.0)
        if linger > 0 and not stop.is_set():
            # Peers (sipp among them) keep each call a few seconds after its BYE; closing our
            # connections under them would count as a failure there.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), linger)
        if media is not None and media.lingering and not stop.is_set():
            # the last calls' media takes in the peer's final RTCP reports
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), media.linger + 0.05)
    finally:
        if media is not None:
            media.close()
        await endpoint.close()
    _print_call_summary(stats, elapsed, args)
    reports_ok = True
    if media is not None:
        media.print_summary()
        if media.quality:
            from fastsip.rtp.report import summary_table

            print("\ncall quality (rx: what we received, measured here; tx: what we sent, as "
                  "the peer's RTCP reports it)")
            print(summary_table(media.quality), end="")
        sys.stdout.flush()
        reports_ok = media.write_reports(args, "call")
    if stats.failures or not reports_ok:
        return EXIT_FAILED
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def _default_host(target: URI) -> str:
    host = target.maddr or target.host
    if host.startswith("127.") or host in ("localhost", "[::1]", "::1"):
        return "[::1]" if ":" in host else "127.0.0.1"
    return "0.0.0.0"


def _print_call_summary(stats: CallStats, elapsed: float, args: argparse.Namespace) -> None:
    print(f"fastsip call {args.uri}: {elapsed:.1f} s")
    print(f"  attempted  {stats.attempted}")
    print(f"  answered   {stats.answered}")
    print(f"  completed  {stats.completed}")
    print(f"  failed     {stats.failures}")
    if stats.stopped or stats.active:
        print(f"  stopped    {stats.stopped + stats.active} (cancelled or unfinished at stop)")
    for what, n in stats.failed.most_common():
        print(f"    {what}: {n}")
    sys.stdout.flush()


# -- media of answer and call (--play, --record, --echo, --dtmf) ------------------------------


class CallMedia:
    """The RTP side of ``answer``/``call``: a socket pair per call from a :class:`MediaEngine`
    (its port in our SDP), a :class:`MediaSession` from the offer/answer once the call is
    answered, hold from re-INVITEs, and at the end the recording and the DTMF received."""

    def __init__(self, engine: Any, *, source: Any = None, loop_source: bool = False,
                 record: Path | None = None, echo: bool = False, sdp_host: str = "") -> None:
        self.engine = engine
        self.sdp_host = sdp_host
        self.source = source
        self.loop_source = loop_source
        self.record = record
        self.echo = echo
        self.policy: AutoAnswer | None = None
        self.streams: dict[str, Any] = {}          # Call-ID -> MediaStream
        self.dtmf: dict[str, list[tuple[str, int]]] = {}
        self.recordings: list[Path] = []
        self.errors: Counter[str] = Counter()
        #: quality records of the calls that ended: rx (and tx) per call, in order of ending
        self.quality: list[Any] = []
        self._meters: dict[str, tuple[list[Any], Any]] = {}   # Call-ID -> (rx meters, tx)
        #: seconds a call's media stays open after its end, silent, for the peer's last RTCP
        self.linger = MEDIA_LINGER
        self.lingering: set[Any] = set()

    @classmethod
    def from_args(cls, args: argparse.Namespace, host: str, role: str) -> CallMedia | None:
        """None unless an option asks for media; ValueError for a bad --play file."""
        if not (args.play or args.record or getattr(args, "echo", False)
                or getattr(args, "dtmf", None) or args.rtp or args.report or args.plot):
            return None
        import importlib.util

        if importlib.util.find_spec("numpy") is None:
            # The audio is NumPy arrays (G.711, the jitter buffer's playout, WAV resampling);
            # a proxy-only install does not carry it.
            raise ValueError("media (--play, --record, --echo, --dtmf, --rtp, --report, "
                             "--plot) needs NumPy: "
                             "pip install 'fastsip[numpy]'")
        from fastsip.asyncio.rtp import MediaEngine
        from fastsip.rtp.wav import read_wav

        source = read_wav(args.play) if args.play else None
        record = None
        if args.record:
            record = Path(args.record)
            record.mkdir(parents=True, exist_ok=True)
        bind = host.strip("[]")
        engine = MediaEngine(bind, args.media_port)
        return cls(engine, source=source, loop_source=args.play_loop, record=record,
                   echo=getattr(args, "echo", False), sdp_host=host)

    def open(self) -> Any:
        return self.engine.open()

    def adopt(self, call: Call, stream: Any) -> None:
        self.streams[call.call_id] = stream
        if self.policy is not None:
            # our answers to this call's re-INVITEs name its own socket
            self.policy.media_of[call.call_id] = (self.sdp_host, stream.port)

    def media_for(self, call: Call) -> tuple[str, int] | None:
        """AutoAnswer's hook: this call's RTP address, for its SDP answer."""
        try:
            stream = self.open()
        except OSError as exc:
            log.error("call %s: no media ports: %s", call.call_id, exc)
            self.errors["no media port"] += 1
            return None
        self.adopt(call, stream)
        return self.sdp_host, stream.port

    def answered(self, call: Call) -> None:
        """The 2xx went out (UAS) or came in (UAC): start the session."""
        from fastsip.rtp.session import MediaSession
        from fastsip.sdp import SdpError, SessionDescription, negotiate

        stream = self.streams.get(call.call_id)
        if stream is None or stream.session is not None:
            return
        local, remote = call.local_body, call.remote_body
        try:
            agreed = next((m for m in negotiate(SessionDescription.parse(local),
                                                SessionDescription.parse(remote)) if m), None)
            if agreed is None:
                raise ValueError("no audio stream agreed")
            session = MediaSession.from_negotiated(
                agreed, source=self.source, loop=self.loop_source, echo=self.echo,
                record=self.record is not None, cname=f"{call.call_id}@fastsip")
        except (SdpError, ValueError) as exc:
            log.warning("call %s: no media: %s", call.call_id, exc)
            self.errors[f"no media ({exc})"] += 1
            return
        call_id = call.call_id

        def on_dtmf(digit: str, ms: int) -> None:
            log.info("call %s: DTMF %s (%d ms)", call_id, digit, ms)

        session.on_dtmf = on_dtmf
        self._meter(call_id, session)
        stream.on_close = lambda s: self._closed(call_id, s)
        stream.start(session)

    def _meter(self, call_id: str, session: Any) -> None:
        """Quality meters for a session: "rx" measures what arrives (a new meter when the
        peer's SSRC changes: a new source restarts its numbering and timing), "tx" is fed the
        peer's RTCP report blocks about our stream."""
        from fastsip.rtp.quality import QualityMeter

        # The recording's jitter buffer delays playout; without one, G.107 planning's two
        # packets (QualityMeter's default) stand for the peer's.
        depth = session.jitter_delay if self.record is not None else None
        rx: list[QualityMeter] = []

        def new_meter() -> QualityMeter:
            meter = QualityMeter(session.clock_rate, session.ptime, session.codec,
                                 jitter_buffer_delay=depth)
            rx.append(meter)
            return meter

        tx = QualityMeter(session.clock_rate, session.ptime, session.codec,
                          jitter_buffer_delay=depth)

        def on_report_block(block: Any, now: float) -> None:
            # packets_sent: our count when the report arrives (RTP with our SSRC: audio, echo,
            # events -- the sequence space the peer's "expected" counts).
            tx.on_remote_report(block.fraction_lost, block.cumulative_lost, block.jitter,
                                block.highest_sequence, packets_sent=session.tx.packets,
                                now=now)

        session.meter = new_meter()
        session.new_meter = new_meter
        session.on_report_block = on_report_block
        self._meters[call_id] = (rx, tx)

    def _quality(self, call_id: str, session: Any) -> None:
        meters = self._meters.pop(call_id, None)
        if meters is None:
            return
        rx_meters, tx_meter = meters
        if session.round_trip is not None:
            for meter in (*rx_meters, tx_meter):
                meter.set_round_trip(session.round_trip)
        # One rx record per source (one unless the peer changed SSRC); the jitter buffer's
        # discards (all sources) go with the last.
        records = [meter.record(call_id, "rx") for meter in rx_meters[:-1]]
        records.append(rx_meters[-1].record(call_id, "rx", session.discarded))
        records.append(tx_meter.record(call_id, "tx"))
        self.quality.extend(records)
        log.info("call %s quality: %s", call_id,
                 "; ".join(_quality_text(r) for r in records))

    def reinvite(self, call: Call, offer: bytes) -> None:
        """A re-INVITE we answered: hold/resume and a new peer address apply to the session."""
        from fastsip.sdp import SdpError, SessionDescription, negotiate

        stream = self.streams.get(call.call_id)
        if stream is None or stream.session is None or not offer.strip():
            return
        try:
            agreed = next((m for m in negotiate(SessionDescription.parse(call.local_body),
                                                SessionDescription.parse(offer)) if m), None)
        except SdpError as exc:
            log.info("call %s: re-INVITE SDP not usable: %s", call.call_id, exc)
            return
        if agreed is not None:
            stream.session.update(agreed)
            log.info("call %s: media now %s", call.call_id, agreed.direction)

    def send_dtmf(self, call: Call, digits: str) -> None:
        stream = self.streams.get(call.call_id)
        if stream is None or stream.session is None or stream.closed:
            return
        try:
            stream.session.send_dtmf(digits, self.engine.time())
        except ValueError as exc:
            log.warning("call %s: cannot send DTMF: %s", call.call_id, exc)
            self.errors[f"DTMF not sent ({exc})"] += 1

    def ended(self, call: Call) -> None:
        stream = self.streams.pop(call.call_id, None)
        if self.policy is not None:
            self.policy.forget(call)
        if stream is None:
            return
        session = stream.session
        if session is None or stream.closed or self.linger <= 0:
            stream.close()
            return
        # Both ends stop at the BYE, so their last scheduled RTCP reports predate it by
        # seconds: stop sending, report what we received up to now, and stay open a moment
        # for the peer's final report, so each side's "tx" record covers the whole call.
        from fastsip.rtp.rtcp import build_compound

        session.set_direction("inactive")
        if session.remote_rtcp is not None and session.epoch is not None:
            with contextlib.suppress(OSError):
                stream.rtcp.sendto(build_compound(session.rtcp_report(self.engine.time())),
                                   session.remote_rtcp)
                session.tx.rtcp_packets += 1
        self.lingering.add(stream)
        self.engine.loop.call_later(self.linger, self._end_linger, stream)

    def _end_linger(self, stream: Any) -> None:
        self.lingering.discard(stream)
        stream.close()

    def _closed(self, call_id: str, session: Any) -> None:
        rx, rtt = session.rx, session.round_trip
        log.info("call %s: RTP sent %d packets (%d octets), received %d (lost %d, jitter "
                 "%.1f ms)%s", call_id, session.tx.packets, session.tx.octets, rx.received,
                 rx.cumulative_lost, rx.jitter_seconds * 1000,
                 f", RTT {rtt * 1000:.1f} ms" if rtt is not None else "")
        self._quality(call_id, session)
        if session.dtmf_received:
            self.dtmf[call_id] = list(session.dtmf_received)
        if self.record is not None:
            from fastsip.rtp.wav import recording_path, write_wav

            path = recording_path(self.record, call_id)
            write_wav(path, session.recorded())
            self.recordings.append(path)
            log.info("call %s: recorded %s", call_id, path)

    def close(self) -> None:
        for stream in [*self.streams.values(), *self.lingering]:
            stream.close()
        self.streams.clear()
        self.lingering.clear()
        self.engine.close()

    def print_summary(self) -> None:
        for call_id, digits in self.dtmf.items():
            text = " ".join(f"{d}({ms} ms)" for d, ms in digits)
            print(f"  DTMF {call_id}: {text}")
        for path in self.recordings:
            print(f"  recorded {path}")
        for what, n in self.errors.most_common():
            print(f"  media: {what}: {n}")

    def write_reports(self, args: argparse.Namespace, prog: str) -> bool:
        """--report and --plot, after the calls: False (and a message) if one failed."""
        from fastsip.rtp.report import plot_report, write_report

        ok = True
        for option, path, write in (("--report", args.report, write_report),
                                    ("--plot", args.plot, plot_report)):
            if not path:
                continue
            try:
                write(self.quality, path)
            except (OSError, ValueError, ImportError) as exc:
                print(f"fastsip {prog}: {option} {path}: {exc}", file=sys.stderr)
                ok = False
            else:
                print(f"  quality {'plot' if option == '--plot' else 'report'} {path} "
                      f"({len(self.quality)} records)")
        sys.stdout.flush()
        return ok


def _quality_text(rec: Any) -> str:
    mos = "-" if rec.mos is None else f"{rec.mos:.2f}"
    return (f"{rec.direction} {rec.packets} packets, lost {rec.lost} ({rec.loss_pct:.2f} %), "
            f"jitter {rec.jitter_ms_mean:.2f}/{rec.jitter_ms_max:.2f} ms mean/max, MOS {mos}")


def _check_report_options(args: argparse.Namespace) -> str | None:
    """--report and --plot are checked before any call: a wrong extension or a missing
    matplotlib found after an hour of calls would lose the hour's figures."""
    if args.report:
        suffix = Path(args.report).suffix.lower()
        if suffix not in (".json", ".csv"):
            return f"--report {args.report}: use a .json or .csv path"
    if args.plot:
        if Path(args.plot).suffix.lower() != ".png":
            return f"--plot {args.plot}: the plot is a PNG, use a .png path"
        try:
            import matplotlib  # noqa: F401  (imported now: a broken install fails here too)
        except ImportError:
            return "--plot needs matplotlib: pip install 'fastsip[plot]'"
    for option, path in (("--report", args.report), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            return f"{option} {path}: no such directory"
    return None


def _add_media_options(parser: argparse.ArgumentParser, role: str) -> None:
    g = parser.add_argument_group("media (RTP on a socket pair per call, from --media-port up)")
    g.add_argument("--play", metavar="FILE.wav",
                   help="send this WAV (16-bit PCM; resampled to 8 kHz mono) once per call, "
                        "then nothing")
    g.add_argument("--play-loop", action="store_true", help="loop the --play file instead")
    g.add_argument("--record", metavar="DIR",
                   help="record what each call receives to DIR/<Call-ID>.wav")
    g.add_argument("--rtp", action="store_true",
                   help="open RTP per call even without --play/--record (DTMF detection, "
                        "RTCP); implied by the other media options")
    g.add_argument("--report", metavar="FILE.json|FILE.csv",
                   help="write each call's quality (rx: received here; tx: our stream as the "
                        "peer's RTCP reports it) to this file" + (
                            " when stopped" if role == "answer" else ""))
    g.add_argument("--plot", metavar="FILE.png",
                   help="plot jitter and loss per second of every call and direction "
                        "(needs matplotlib: pip install 'fastsip[plot]')")
    if role == "answer":
        g.add_argument("--echo", action="store_true",
                       help="send each call's received audio back to it")
    else:
        g.add_argument("--dtmf", metavar="DIGITS",
                       help="send these RFC 4733 digits (0-9 * # A-D) in each call")
        g.add_argument("--dtmf-after", type=float, default=1.0, metavar="S",
                       help="seconds after the answer to start --dtmf (default 1)")


# -- argument parsing --------------------------------------------------------------------------


def _positive(kind: type) -> Any:
    def check(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value
    return check


def version_text() -> str:
    """``fastsip X.Y.Z (Python A.B.C)``: the installed distribution's version (what pip
    installed, which a bug report needs), or the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("fastsip")
    except PackageNotFoundError:
        from fastsip import __version__ as ours
    return f"fastsip {ours} (Python {platform.python_version()})"


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked (reading package metadata scans sys.path)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastsip",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A SIP registrar and stateful proxy with routing in Python (serve), an "
                    "RTP relay driven over\nrtpengine's ng protocol (media), and SIP test tools "
                    "(answer, call).  'fastsip COMMAND --help' lists a "
                    "command's options.",
        epilog="examples:\n"
               "  fastsip serve --domain example.com\n"
               "  fastsip serve --domain example.com --listen udp:0.0.0.0:5060 "
               "--db sqlite:locations.db\n"
               "  fastsip media --interface 192.0.2.10 --ng 127.0.0.1:2223\n"
               "  fastsip answer --listen udp:127.0.0.1:5080\n"
               "  fastsip call sip:test@127.0.0.1:5080 --calls 100 --rate 10")
    ap.add_argument("--version", action=_VersionAction,
                    help="print the fastsip and Python versions and exit")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # serve first: it is what most people run (and the one --help should lead with).
    from fastsip.app.serve import add_parser as add_serve_parser
    add_serve_parser(sub)
    from fastsip.app.media import add_parser as add_media_parser
    add_media_parser(sub)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="log detail on stderr (default: warning)")
    common.add_argument("--advertise", metavar="HOST[:PORT]",
                        help="address to put in Via/Contact instead of the bound one "
                             "(behind NAT, or when listening on 0.0.0.0)")
    common.add_argument("--user", default="fastsip", help="user part of our Contact URI")
    common.add_argument("--media-port", type=int, default=6000,
                        help="RTP port written in our SDP (no media is sent; default 6000); "
                             "with --play/--record/--echo/--dtmf/--rtp the first port of the "
                             "per-call RTP/RTCP pairs (0: any free ports)")
    common.add_argument("--t1", type=_positive(float), default=0.5,
                        help="SIP timer T1 in seconds, the RTT estimate (default 0.5)")
    common.add_argument("--t2", type=_positive(float), default=4.0,
                        help="SIP timer T2 in seconds (default 4)")
    common.add_argument("--loop", choices=LOOPS, default="auto",
                        help="event loop: uvloop when installed (auto), or plain asyncio")

    a = sub.add_parser(
        "answer", parents=[common],
        help="answer every INVITE (180, then 200 with SDP) until stopped",
        description="A UAS that answers every INVITE with 180 Ringing, then 200 OK with an SDP "
                    "answer; handles ACK, BYE, CANCEL (487) and OPTIONS; runs until Ctrl-C or "
                    "SIGTERM, then prints what it did.")
    a.add_argument("--listen", action="append", metavar="PROTO:HOST:PORT",
                   help="where to listen, e.g. udp:0.0.0.0:5060 or tcp:[::]:5060; repeat for "
                        "more (default: udp:127.0.0.1:5060)")
    a.add_argument("--ring-time", type=float, default=0.0, metavar="S",
                   help="seconds between 180 Ringing and 200 OK (default 0)")
    a.add_argument("--media-address", default=None,
                   help="address written in the SDP answer (default: the first listener's)")
    _add_media_options(a, "answer")
    a.set_defaults(func=answer_main)

    c = sub.add_parser(
        "call", parents=[common],
        help="place N calls at R per second and report the outcome",
        description="Places --calls calls to SIP-URI at --rate calls per second; each is "
                    "INVITE, ACK, hold --duration seconds, BYE.  Prints attempted, answered, "
                    "completed and failures by status; exits 1 if any call failed, 130 if "
                    "stopped early, 0 otherwise.")
    c.add_argument("uri", metavar="SIP-URI", help="whom to call, e.g. sip:test@192.0.2.10:5060")
    c.add_argument("--calls", "-n", type=_positive(int), default=1, help="number of calls "
                   "(default 1)")
    c.add_argument("--rate", "-r", type=_positive(float), default=1.0,
                   help="new calls per second (default 1)")
    c.add_argument("--duration", "-d", type=float, default=0.0, metavar="S",
                   help="seconds to hold each answered call before BYE (default 0)")
    c.add_argument("--transport", "-t", choices=["udp", "tcp"], default="udp",
                   help="transport for the calls (default udp)")
    c.add_argument("--listen", action="append", metavar="PROTO:HOST:PORT",
                   help="local address (default: the transport on 127.0.0.1 for a loopback "
                        "target, else on 0.0.0.0, any free port)")
    c.add_argument("--proxy", metavar="SIP-URI", default=None,
                   help="send the INVITEs through this outbound proxy (loose routing)")
    c.add_argument("--limit", type=int, default=0,
                   help="at most this many calls at once (default: no limit)")
    c.add_argument("--stop-timeout", type=float, default=5.0, metavar="S",
                   help="on Ctrl-C, seconds to wait for hang-ups and cancels (default 5)")
    c.add_argument("--linger", type=float, default=None, metavar="S",
                   help="seconds to stay up after the last call ends, answering late "
                        "retransmissions and keeping TCP/TLS connections open while the peer "
                        "finishes (default: 5 for tcp/tls, 0 for udp)")
    _add_media_options(c, "call")
    c.set_defaults(func=call_main)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # (serve --workers starts its workers with the same command line)
    # Lines are queued and written by a thread (the event loop never formats or writes one);
    # every queued line is out before we return, and at exit.
    from fastsip.app import logqueue

    logqueue.install(getattr(logging, args.log_level.upper()), sys.stderr,
                     max_queued=getattr(args, "log_queue", logqueue.DEFAULT_MAX_QUEUED))
    try:
        return _main(args)
    finally:
        logqueue.stop()


def _main(args: argparse.Namespace) -> int:
    if args.command == "answer":
        args.listen = args.listen or ["udp:127.0.0.1:5060"]
        if args.media_address is None:
            from fastsip.asyncio import parse_listen

            try:
                host = parse_listen(args.listen[0])[1]
            except ValueError as exc:
                print(f"fastsip answer: {exc}", file=sys.stderr)
                return EXIT_USAGE
            args.media_address = host if host not in ("0.0.0.0", "::", "") else "127.0.0.1"
    try:
        return run(args.func(args), args.loop)
    except LoopUnavailableError:
        print("fastsip: --loop uvloop but uvloop is not installed", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())

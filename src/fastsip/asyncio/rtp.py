"""The shell of the RTP endpoint: per-call RTP/RTCP sockets and one loop timer for every session.

:class:`MediaEngine` binds a socket pair per call stream (RTP on an even port from the base,
RTCP on the next; with base 0 the kernel picks the RTP port and RTCP takes the next one when
it is free), feeds what arrives to the stream's sans-IO
:class:`~fastsip.rtp.session.MediaSession` with the loop's time, and sends what it returns
with ``sock.sendto``.  **One** loop timer ticks every session: it fires on a fixed grid
(``tick`` seconds, 10 ms by default) while any session is live, and each session starts on a
grid point, so 20 ms frames of every call fall on the grid and no call owns a Task or a loop
handle per packet.  The plain audio frames a session grants (see
:meth:`~fastsip.rtp.session.MediaSession.tick`) go out in one call per tick to the compiled
:class:`~fastsip.rtp._sender.Sender` for every stream (built in C buffers, ``sendmmsg``/``sendto``
from C: no Python object per packet); only the sessions that need a tick of their own (an RFC
4733 event, hold, a playout slot of a recording, RTCP) get one, and send what it returns.

On Linux each RTP packet's arrival time is the kernel's receive timestamp (``SO_TIMESTAMPNS``),
not the time the loop got round to reading it: the jitter a call-quality report gives is then
the network's, as a capture (tshark) sees it, and not how busy this machine was.  Elsewhere,
and when the kernel gives no stamp, it is the loop's time at the read.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import socket
import sys
import time
from collections.abc import Callable

from fastsip.rtp._receiver import Receiver
from fastsip.rtp._sender import Sender
from fastsip.rtp.session import Datagram, MediaSession

__all__ = ["MediaEngine", "MediaStream", "PortsExhausted"]

log = logging.getLogger("fastsip.asyncio.rtp")

_READ_BATCH = 64          # datagrams read per wake-up of one socket before yielding

# Linux's receive timestamps (socket(7)): SO_TIMESTAMPNS turns them on, and each datagram then
# carries an SCM_TIMESTAMPNS control message (same number) with a struct timespec of
# CLOCK_REALTIME.  Python does not name the constant.
_SO_TIMESTAMPNS = 35 if sys.platform.startswith("linux") else None


class PortsExhausted(OSError):
    """No free RTP/RTCP port pair in the configured range."""


class MediaStream:
    """One call's RTP/RTCP socket pair and (once the call is answered) its session."""

    def __init__(self, engine: MediaEngine, rtp: socket.socket, rtcp: socket.socket) -> None:
        self.engine = engine
        self.rtp = rtp
        self.rtcp = rtcp
        self.address: str = rtp.getsockname()[0]
        self.port: int = rtp.getsockname()[1]
        self.rtcp_port: int = rtcp.getsockname()[1]
        self.session: MediaSession | None = None
        self.closed = False
        #: called with the session when the stream closes (write a recording, a report...)
        self.on_close: Callable[[MediaSession], object] | None = None

    def start(self, session: MediaSession) -> None:
        """Attach ``session`` and start it on the engine's next tick."""
        self.engine._start(self, session)

    def close(self) -> None:
        """Stop the session (its RTCP BYE goes out), close the sockets."""
        self.engine._close(self)

    def __repr__(self) -> str:
        return f"<MediaStream {self.address}:{self.port}/{self.rtcp_port}>"


class MediaEngine:
    """RTP socket pairs on ``host`` and the single timer that paces every session.

    ``port_base``/``port_count``: pairs are allocated from ``port_base`` (even) up to
    ``port_base + port_count``; ``port_base=0`` lets the kernel choose.
    """

    def __init__(self, host: str = "127.0.0.1", port_base: int = 0, port_count: int = 10000,
                 *, tick: float = 0.01, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.host = host
        self.port_base = port_base + (port_base & 1)
        self.port_count = port_count
        self.tick = tick
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._streams: set[MediaStream] = set()
        self._active: list[MediaStream] = []
        self._handle: asyncio.TimerHandle | None = None
        self._tick_at = 0.0                      # the grid point the armed tick is for
        self._next_port = self.port_base
        self.wakeups = 0
        self._send_errors = 0
        self._sender = Sender()
        self._receiver = Receiver()
        # RTCP's NTP timestamps want wall-clock time; the sessions see the loop's clock.
        self.wallclock_offset = time.time() - self._loop.time()
        # Kernel receive stamps are wall-clock: this maps them onto the monotonic clock the
        # loop's time runs on (re-read every tick, so a stepped or slewed wall clock is
        # followed within 10 ms).
        self._realtime_offset = time.time() - time.monotonic()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def time(self) -> float:
        return self._loop.time()

    @property
    def send_errors(self) -> int:
        """Datagrams the kernel refused (full buffer, unreachable): RTP is lossy."""
        return self._send_errors + int(self._sender.errors)

    @property
    def streams(self) -> int:
        return len(self._streams)

    # -- sockets -----------------------------------------------------------------------------

    def _socket(self, port: int) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind((self.host, port))
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def _stamp(sock: socket.socket) -> None:
        """Ask the kernel for receive timestamps on ``sock`` where it gives them (Linux); the
        :class:`~fastsip.rtp._receiver.Receiver` reads them, and a datagram without one gets
        the loop's time."""
        if _SO_TIMESTAMPNS is None:
            return
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)

    def _pair(self) -> tuple[socket.socket, socket.socket]:
        if self.port_base == 0:
            for _ in range(32):
                rtp = self._socket(0)
                try:
                    return rtp, self._socket(rtp.getsockname()[1] + 1)
                except OSError:
                    rtp.close()
            raise PortsExhausted(errno.EADDRINUSE, "no RTP/RTCP port pair (port+1 busy)")
        end = self.port_base + self.port_count
        for _ in range(max(1, self.port_count // 2)):
            port = self._next_port
            self._next_port = port + 2 if port + 3 < end else self.port_base
            try:
                rtp = self._socket(port)
            except OSError:
                continue
            try:
                return rtp, self._socket(port + 1)
            except OSError:
                rtp.close()
        raise PortsExhausted(errno.EADDRINUSE,
                             f"no free RTP/RTCP port pair in {self.port_base}..{end - 1}")

    def open(self) -> MediaStream:
        """A new stream: its socket pair bound and read (what arrives before the session
        starts is dropped).  Raises :class:`PortsExhausted`."""
        rtp, rtcp = self._pair()
        stream = MediaStream(self, rtp, rtcp)
        self._streams.add(stream)
        self._stamp(rtp)
        self._loop.add_reader(rtp.fileno(), self._read_rtp, stream)
        self._loop.add_reader(rtcp.fileno(), self._read_rtcp, stream)
        return stream

    def _start(self, stream: MediaStream, session: MediaSession) -> None:
        if stream.closed or stream.session is not None:
            return
        stream.session = session
        session.wallclock_offset = self.wallclock_offset
        # Start on the tick grid: every stream's frames then fall on the same wake-ups.
        now = self._loop.time()
        session.start(math.ceil(now / self.tick) * self.tick)
        self._sender.attach(session.send_state, stream.rtp.fileno(), stream)
        self._active.append(stream)
        self._arm()

    def _close(self, stream: MediaStream) -> None:
        if stream.closed:
            return
        stream.closed = True
        session = stream.session
        if session is not None:
            now = self._loop.time()
            # the last frames by the Python path: the socket closes before the next flush
            self._sender.detach(session.send_state)
            self._send(stream.rtp, session.tick(now))
            self._send(stream.rtcp, session.close(now))
            with contextlib.suppress(ValueError):
                self._active.remove(stream)
        for sock in (stream.rtp, stream.rtcp):
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._streams.discard(stream)
        if session is not None and stream.on_close is not None:
            try:
                stream.on_close(session)
            except Exception:
                log.exception("on_close of %r failed", stream)

    def close(self) -> None:
        """Close every stream and stop the timer."""
        for stream in list(self._streams):
            stream.close()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    # -- the loop ----------------------------------------------------------------------------

    def _read_rtp(self, stream: MediaStream) -> None:
        """Feed what arrived on the stream's RTP socket to its session: a batch read in C
        (:class:`~fastsip.rtp._receiver.Receiver`: one system call, the kernel's receive
        stamps read there).  A datagram without a stamp (no ``SO_TIMESTAMPNS``, not Linux)
        gets the loop's time at this read."""
        session = stream.session
        batch = self._receiver.read(stream.rtp.fileno(), _READ_BATCH, self._realtime_offset,
                                    self._loop.time())
        if session is None:
            return                               # before the session starts: dropped
        for data, addr, now in batch:
            replies = session.receive(data, addr, now)
            if replies:
                self._send(stream.rtp, replies)

    def _read_rtcp(self, stream: MediaStream) -> None:
        sock = stream.rtcp
        now = self._loop.time()
        session = stream.session
        for _ in range(_READ_BATCH):
            try:
                data, addr = sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if session is not None:
                session.receive_rtcp(data, (addr[0], addr[1]), now)

    def _send(self, sock: socket.socket, datagrams: list[Datagram]) -> None:
        sendto = sock.sendto
        for data, addr in datagrams:
            try:
                sendto(data, addr)
            except OSError:
                self._send_errors += 1          # full buffer, unreachable: RTP is lossy

    def _arm(self) -> None:
        if self._handle is not None or not self._active:
            return
        now = self._loop.time()
        # the next grid point strictly ahead (plus half a millisecond: uvloop's clock is
        # whole milliseconds and would fire a hair early)
        at = (math.floor(now / self.tick + 1e-9) + 1) * self.tick
        self._tick_at = at
        self._handle = self._loop.call_at(at + 0.0005, self._on_tick)

    def _on_tick(self) -> None:
        self._handle = None
        self.wakeups += 1
        now = self._loop.time()
        self._realtime_offset = time.time() - time.monotonic()
        send = self._send
        # Only the sessions that need a tick of their own (an ungranted frame, a playout slot,
        # an RTCP report): a stream sending granted audio costs no Python here.
        due: list[MediaStream] = self._sender.due(now)
        # A wake-up more than a tick late (the loop was stalled): what queued in the kernel
        # meanwhile is read before the missed playout slots are played, or those slots would
        # be concealed and the packets behind them played as well.  (Which of the reader and
        # this timer runs first after a stall is the loop's choice.)
        late = now - self._tick_at > self.tick
        for stream in due:
            session = stream.session
            if session is None or stream.closed:
                continue
            if late:
                self._read_rtp(stream)
            out = session.tick(now)
            if out:
                send(stream.rtp, out)
        # every frame the sessions granted, of every stream, in one call
        self._sender.flush(now)
        # RTCP last: a sender report counts the packets of this tick
        for stream in due:
            session = stream.session
            if session is None or stream.closed:
                continue
            rtcp = session.poll_rtcp(now)
            if rtcp:
                send(stream.rtcp, rtcp)
        self._arm()


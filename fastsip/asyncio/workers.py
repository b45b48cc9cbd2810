"""Several worker processes on the same addresses (``fastsip serve --workers N``): the
:class:`Supervisor` that starts, restarts and stops them, and the :class:`HandOff` that gets
each datagram to the worker that owns it.

**Who owns what.**  Every worker binds every UDP listener with ``SO_REUSEPORT``, and the kernel
spreads datagrams over them by a hash of (source, destination) addresses -- so one busy peer
(an SBC, an upstream proxy: most of a carrier's traffic) would land entirely on one worker, and
an INVITE's CANCEL or response could reach a worker that never saw the INVITE.  So ownership is
decided by the message, not by the kernel: a call belongs to worker
``crc32(Call-ID) % N`` (:func:`~fastsip.transport.rules.call_id_shard`).  Every message of a
call -- requests, their retransmissions, CANCEL, the ACK for a non-2xx, every response, the BYE
-- carries the same Call-ID, so they all meet the transactions and dialogs of one worker, and
calls from a single peer spread evenly over the workers.

**The hand-off.**  A worker parses what it receives and asks :meth:`HandOff.steer`; a message
another worker owns goes to that worker, as received (source address and listener too), over a
Unix datagram socket in a directory only this user can open.  The owner treats it as its own
arrival: its answers leave from its own socket on the same address, so peers see one server.
A hand-off costs one local datagram each way of the kernel (~10-20 us); with N workers,
(N - 1)/N of the datagrams make it.  Keep-alives, STUN and malformed requests are answered by
whoever received them.

**The supervisor** (:class:`Supervisor`) runs the workers as child processes, prints their
``listening on`` lines once all are up, restarts a worker that dies (its calls in progress are
lost; the others' are not), and on SIGTERM/SIGINT stops them all, each draining its calls.

UDP only: a TCP or TLS connection lives in the worker that accepted it, and a call for a phone
registered over it could be owned by another (Kamailio passes connections between its
processes; fastsip does not yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastsip.sip import Request, Response
from fastsip.transport import Address
from fastsip.transport.rules import call_id_shard

if TYPE_CHECKING:
    from fastsip.asyncio.transport import TransportLayer

__all__ = ["NONCE_SECRET_ENV", "HandOff", "Supervisor", "addresses_taken",
           "reuse_port_supported"]

#: The environment variable through which the supervisor gives every worker the same digest
#: nonce secret (a challenge one worker sent is answered to another).
NONCE_SECRET_ENV = "FASTSIP_NONCE_SECRET"

log = logging.getLogger("fastsip.asyncio.workers")

# A handed-off datagram: the listener id, the source port, the source host's length, the
# host (ASCII), then the datagram as received.
_HEADER = struct.Struct("!BHB")
# Hand-offs read per wake-up (bounded, as the UDP listeners' own reads are).
_BATCH = 256
_MAX_DATAGRAM = 65536 + _HEADER.size + 255


def reuse_port_supported() -> bool:
    """Whether this platform lets several processes bind one UDP address and spreads the
    datagrams over them (Linux's SO_REUSEPORT; BSDs and macOS have the option but deliver
    every datagram to the last socket bound)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def addresses_taken(listen: Sequence[str]) -> str:
    """Whether another process holds one of the UDP addresses of ``listen`` specs ("" when
    none does).  Workers bind with SO_REUSEPORT, which would quietly share an address with
    another server of this user that did too; a plain bind first fails if anyone holds it."""
    from fastsip.transport.rules import parse_listen

    for spec in listen:
        _, host, port = parse_listen(spec.partition("/")[0])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((host, port))
            except OSError as exc:
                return f"cannot listen on {spec}: {exc.strerror or exc}"
    return ""


def socket_path(directory: str | Path, index: int) -> str:
    return str(Path(directory) / f"worker-{index}.sock")


class HandOff:
    """Worker ``index`` of ``count``: takes, through ``steer`` (the intake's hook), every
    datagram whose Call-ID another worker owns and sends it there; hands what the others send
    it to ``layer`` as if it had arrived on its own listener.  ``directory``: where the
    workers' sockets are (made by the supervisor, mode 0700)."""

    def __init__(self, layer: TransportLayer, index: int, count: int,
                 directory: str | Path) -> None:
        self.layer = layer
        self.index = index
        self.count = count
        self.directory = str(directory)
        #: Datagrams handed to other workers / received from them / lost on the way (the owner
        #: restarting, its queue full: the peer's retransmission will come back).
        self.handed = 0
        self.received = 0
        self.lost = 0
        self._peers = [socket_path(self.directory, i) for i in range(count)]
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        path = self._peers[self.index]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)                     # a previous run of this worker, killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(path)
            sock.setblocking(False)
            # Room for a burst of hand-offs while this worker is busy.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            loop = asyncio.get_running_loop()
            loop.add_reader(sock.fileno(), self._read_ready)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop
        self.layer.steer = self.steer

    def steer(self, msg: Request | Response, data: bytes, source: Address) -> bool:
        """The intake's hook: True when ``msg`` is another worker's (and was sent there)."""
        owner = call_id_shard(msg.call_id, self.count)
        if owner == self.index:
            return False
        host = source.host.encode("ascii", "replace")[:255]
        try:
            assert self._sock is not None
            self._sock.sendto(_HEADER.pack(source.connection & 0xFF, source.port, len(host))
                              + host + data, self._peers[owner])
        except OSError as exc:
            # ECONNREFUSED/ENOENT: the owner is restarting; EAGAIN: its queue is full.  The
            # datagram is lost, as UDP may lose it: the sender retransmits.
            self.lost += 1
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
                log.warning("hand-off to worker %d failed: %s", owner, exc)
            return True
        self.handed += 1
        return True

    def _read_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        receive = self.layer._receive_datagram
        for _ in range(_BATCH):
            try:
                packet = sock.recv(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("hand-off receive error: %s", exc)
                return
            # Only our own workers can write here (the directory is ours alone), but a length
            # is still checked before it is trusted.
            if len(packet) < _HEADER.size:
                continue
            lid, port, size = _HEADER.unpack_from(packet)
            start = _HEADER.size + size
            if len(packet) <= start:
                continue
            host = packet[_HEADER.size:start].decode("ascii", "replace")
            self.received += 1
            try:
                receive(packet[start:], host, port, lid, steer=False)
            except Exception:
                log.exception("error handling a datagram handed over by another worker")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(sock.fileno())
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self._peers[self.index])


class _Worker:
    __slots__ = ("index", "proc", "ready", "restarts", "started")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: asyncio.Future[list[str]] | None = None
        self.restarts: list[float] = []
        self.started = 0.0


class Supervisor:
    """Runs ``count`` workers, ``argv(index, directory)`` each (a ``fastsip serve`` that prints
    its ``listening on ...`` lines on stdout, ``listeners`` of them, once it listens and stops
    cleanly on SIGTERM).  ``directory`` is where the workers' hand-off sockets go: made for
    the run (mode 0700, this user's alone) and removed after it.  The workers' environment
    carries one fresh nonce secret (:data:`NONCE_SECRET_ENV`).

    - :meth:`run` starts them all and prints the listening lines once every worker is up; a
      worker that cannot start stops the whole start (its stderr has said why).
    - A worker that exits while we are not stopping is started again after ``restart_delay``
      seconds (doubling, up to 10 s, while it keeps dying within a minute of its start).
    - The ``stop`` event (SIGTERM, SIGINT) sends SIGTERM to every worker and waits up to
      ``stop_timeout`` seconds for them to drain; the stragglers get SIGKILL.
    """

    def __init__(self, argv: Callable[[int, str], Sequence[str]], count: int, listeners: int, *,
                 env: dict[str, str] | None = None, restart_delay: float = 0.5,
                 start_timeout: float = 30.0, stop_timeout: float = 30.0) -> None:
        self.argv = argv
        self.count = count
        self.listeners = listeners
        self.env = dict(os.environ if env is None else env)
        self.env[NONCE_SECRET_ENV] = secrets.token_hex(32)
        self.directory = ""
        self.restart_delay = restart_delay
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.workers = [_Worker(i) for i in range(count)]
        #: Workers started again after dying (logs, tests).
        self.restarted = 0
        self._stopping = False
        self._readers: set[asyncio.Task[None]] = set()

    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.proc = await asyncio.create_subprocess_exec(
            *self.argv(worker.index, self.directory), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, env=self.env)
        worker.started = loop.time()
        worker.ready = loop.create_future()
        self._readers.add(task := loop.create_task(
            self._read_stdout(worker, worker.proc, worker.ready)))
        task.add_done_callback(self._readers.discard)

    async def _read_stdout(self, worker: _Worker, proc: asyncio.subprocess.Process,
                           ready: asyncio.Future[list[str]]) -> None:
        """Collect the ``listening on`` lines, then keep draining so the worker never blocks
        on a full pipe."""
        assert proc.stdout is not None
        lines: list[str] = []
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                break
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith("listening on") and not ready.done():
                lines.append(line)
                if len(lines) == self.listeners:
                    ready.set_result(lines)
            elif line:
                print(f"worker {worker.index}: {line}", flush=True)
        if not ready.done():
            if lines:
                ready.set_result(lines)
            else:
                ready.set_exception(RuntimeError(f"worker {worker.index} exited before "
                                                 "listening"))

    async def run(self, stop: asyncio.Event) -> int:
        """Start, watch and stop the workers; returns the exit status (0: a clean stop)."""
        self.directory = tempfile.mkdtemp(prefix="fastsip-workers-")  # mode 0700
        try:
            return await self._run(stop)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    async def _run(self, stop: asyncio.Event) -> int:
        for worker in self.workers:
            await self._spawn(worker)
        try:
            readies = [w.ready for w in self.workers if w.ready is not None]
            lines = await asyncio.wait_for(asyncio.gather(*readies), self.start_timeout)
        except (RuntimeError, asyncio.TimeoutError) as exc:
            log.error("workers did not start: %s", exc or "timed out")
            await self._stop_all()
            return 1
        for line in lines[0]:
            print(line, flush=True)
        log.info("%d workers running: pids %s", self.count,
                 " ".join(str(w.proc.pid) for w in self.workers if w.proc is not None))
        watchers = {asyncio.ensure_future(self._watch(w)) for w in self.workers}
        try:
            await stop.wait()
        finally:
            self._stopping = True
            for task in watchers:
                task.cancel()
            status = await self._stop_all()
        return status

    async def _watch(self, worker: _Worker) -> None:
        """Restart ``worker`` whenever it dies, until we stop."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            proc = worker.proc
            assert proc is not None
            rc = await proc.wait()
            if self._stopping:
                return
            now = loop.time()
            worker.restarts = [t for t in worker.restarts if now - t < 60.0]
            delay = min(10.0, self.restart_delay * 2 ** len(worker.restarts))
            log.warning("worker %d (pid %d) exited with status %s: starting it again in "
                        "%.1f s", worker.index, proc.pid, rc, delay)
            worker.restarts.append(now)
            await asyncio.sleep(delay)
            if self._stopping:
                return
            await self._spawn(worker)
            self.restarted += 1
            try:
                assert worker.ready is not None
                await asyncio.wait_for(asyncio.shield(worker.ready), self.start_timeout)
                log.info("worker %d running again (pid %d)", worker.index,
                         worker.proc.pid if worker.proc is not None else -1)
            except (RuntimeError, asyncio.TimeoutError):
                log.error("worker %d did not start again", worker.index)

    async def _stop_all(self) -> int:
        procs = [w.proc for w in self.workers if w.proc is not None]
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        status = 0
        for proc in procs:
            try:
                rc = await asyncio.wait_for(proc.wait(), self.stop_timeout)
            except asyncio.TimeoutError:
                log.warning("worker pid %d did not stop in %.0f s: killing it", proc.pid,
                            self.stop_timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                rc = await proc.wait()
            if rc != 0:
                status = 1
        return status

"""Several worker processes on the same addresses (``fastsip serve --workers N``): the
:class:`Supervisor` that starts, restarts and stops them, and the :class:`HandOff` that gets
each datagram to the worker that owns it.

**Who owns what.**  Every worker binds every UDP listener with ``SO_REUSEPORT``, and the kernel
spreads datagrams over them by a hash of (source, destination) addresses -- so one busy peer
(an SBC, an upstream proxy: most of a carrier's traffic) would land entirely on one worker, and
an INVITE's CANCEL or response could reach a worker that never saw the INVITE.  So ownership is
decided by the message, not by the kernel, and every message of a call -- requests, their
retransmissions, CANCEL, the ACK for a non-2xx, every response, the BYE -- meets the
transactions and dialogs of one worker.  Two ways to choose it (``serve --spread-above``):

- **Packed** (the default, ``--spread-above 0.5``): the worker that receives a new call keeps
  it while it is busy less than half a core, and past that passes it to the busiest worker
  still under that (else the least busy).  The choice goes into a table in shared memory,
  keyed by the Call-ID's hash (:mod:`fastsip.transport._placement`), that every worker reads
  for every other message.  A load one core carries then stays in one warm process -- a
  worker given half the load costs far more than half (docs/scaling.md) -- while a heavier
  one, from a single peer too, spreads over every core.
- **Hashed** (``--spread-above 0``): a call belongs to worker ``crc32(Call-ID) % N``
  (:func:`~fastsip.transport.rules.call_id_shard`), so calls from a single peer spread evenly
  over the workers at any load.  Packed placement falls back to this for a message the table
  does not know (our own probes choose their Call-IDs by it).

**The hand-off (UDP).**  A worker parses what it receives and asks :meth:`HandOff.steer`; a message
another worker owns goes to that worker, as received (source address and listener too), as a
record on the worker's ``SOCK_SEQPACKET`` link to it (below; a Unix socket in a directory only
this user can open).  The owner treats it as its own arrival: its answers leave from its own
socket on the same address, so peers see one server.  A hand-off costs one local send of the
kernel (~10-20 us) and a wake-up of the owner.  Hashed, (N - 1)/N of the datagrams that reach
the shared address make it; packed, only those of the calls a busy worker passed on.
(Datagrams went over a Unix *datagram* socket once: its queue holds
``net.unix.max_dgram_qlen`` -- 10 -- datagrams, and at 3,000 calls/s one in six hand-offs
found it full and was lost.)  Keep-alives, STUN and malformed requests are answered by
whoever received them.

**Responses come straight back** (``serve --worker-ports own``, the default): each worker has
a UDP socket of its own beside each shared listener (an ephemeral port on the same host), and
the requests it forwards leave from it with its port in their Via -- so their responses, half
of a call's datagrams, reach the owner without a hand-off.  Record-Route and Contact keep the
shared address (a dialog outlives a worker's restart, which changes its port); a listener with
an advertised address (NAT) has no own socket; ``--worker-ports shared`` sends everything
from the shared port, for peers that accept no other source port.

**The supervisor** (:class:`Supervisor`) runs the workers as child processes, prints their
``listening on`` lines once all are up, restarts a worker that dies (its calls in progress are
lost; the others' are not), and on SIGTERM/SIGINT stops them all, each draining its calls.

**TCP and TLS.**  Every worker binds the stream listeners with ``SO_REUSEPORT`` too, and the
kernel spreads the connections; a connection lives in the worker that accepted it (its TLS
state cannot move).  Its id names that worker
(:func:`~fastsip.transport.rules.held_connection_id`), and so does every flow stored from it
(a binding's ``socket``, an ``alias``): any worker knows where it lives.  The holder frames
and parses what arrives on it; a message whose call another worker owns goes there as a
``_MESSAGE`` naming the connection, and the owner handles it as its own arrival.  What the
owner sends on a connection it does not hold -- the response to a request that came on it,
a request to a phone registered over it -- goes to the holder as a ``_SEND``; the holder
writes it, or answers ``_GONE`` with the bytes, and the owner falls back as for a closed
connection of its own (a new connection; a failure is the transaction's transport error,
RFC 3261 §18.4; §18.2.2 for a response).  A binding whose worker died is a closed flow: the
restarted worker numbers its connections afresh, so the old ids find nothing.  These go over
the ``SOCK_SEQPACKET`` links, one from each worker to each other, as the datagrams do: a lost
message on a connection is not retransmitted by the peer; a link is flow-controlled by its
socket buffer, with a bounded queue behind it (:data:`_LINK_QUEUE_BYTES`), and a record
holds a whole message up to the transport's size limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import os
import secrets
import shutil
import signal
import socket
import struct
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fastsip.sip import Request, Response
from fastsip.transport import Address
from fastsip.transport._placement import CallPlacement, format_table, table_bytes
from fastsip.transport.rules import call_id_shard, connection_holder, local_tag

if TYPE_CHECKING:
    from fastsip.asyncio.transport import TransportLayer

__all__ = ["CALL_TABLE_ENV", "DEFAULT_SPREAD_ABOVE", "MAX_WORKERS", "NONCE_SECRET_ENV", "HandOff",
           "Supervisor", "addresses_taken", "map_call_table", "reuse_port_supported"]

#: The environment variable through which the supervisor gives every worker the same digest
#: nonce secret (a challenge one worker sent is answered to another).
NONCE_SECRET_ENV = "FASTSIP_NONCE_SECRET"
#: The environment variable naming the file descriptor (inherited) of the call table every
#: worker maps: shared memory the supervisor makes (:mod:`fastsip.transport._placement`).
CALL_TABLE_ENV = "FASTSIP_CALL_TABLE_FD"
#: The most workers a supervisor runs: a worker's index + 1 is one byte of a connection id
#: and of a call table entry.
MAX_WORKERS = 255
#: ``serve --spread-above``'s default: a worker keeps the new calls it receives while it is
#: busy less than half a core.  Low enough that the worker receiving a single peer's load
#: passes calls on well before it saturates (it still parses and hands over the peer's
#: messages of the calls it passed), high enough that a load one core carries stays warm in
#: one process.
DEFAULT_SPREAD_ABOVE = 0.5

log = logging.getLogger("fastsip.asyncio.workers")

# Hand-offs read per wake-up (bounded, as the UDP listeners' own reads are).
_BATCH = 256

# What goes between workers about connections, over SOCK_SEQPACKET links (one record per
# envelope): the kind, the sending worker, the transport (0 TCP, 1 TLS), the peer's port, the
# connection id, the peer host's length; then the host (ASCII) and the message.
_STREAM_HEADER = struct.Struct("!BBBHIB")
#: A message received on connection C, handed to the worker that owns its call.
_MESSAGE = 1
#: Bytes the owner hands back to the holder of connection C: "send them on it".
_SEND = 2
#: The holder's answer to a _SEND it could not write: the connection is gone (the bytes come
#: back, so the owner can fall back to a new connection, or fail the transaction).
_GONE = 3
#: A UDP datagram, as received, for the worker that owns its call; the connection id field
#: carries the listener it arrived on (the owner answers from its own socket on it).
_DATAGRAM = 4
_TRANSPORTS = ("TCP", "TLS")
# Retry-After (seconds) of the 503 for a request on a connection whose owner is down: about
# what a worker takes to start again.
_RETRY_AFTER = 2
# Envelopes queued for one link while the other worker's socket buffer is full: past this,
# what is handed is refused (a message lost as a lost datagram would be; bytes to send fail
# the transaction): a stalled worker costs bounded memory, never an unbounded queue.
_LINK_QUEUE_BYTES = 8 * 1024 * 1024
# The socket buffers of a link: a record must fit (the kernel refuses one bigger than the
# send buffer with EMSGSIZE), and a burst should wait there rather than in our queue.
_LINK_BUFFER = 4 * 1024 * 1024


def reuse_port_supported() -> bool:
    """Whether this platform lets several processes bind one UDP address and spreads the
    datagrams over them (Linux's SO_REUSEPORT; BSDs and macOS have the option but deliver
    every datagram to the last socket bound)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def addresses_taken(listen: Sequence[str]) -> str:
    """Whether another process holds one of the addresses of ``listen`` specs ("" when none
    does).  Workers bind with SO_REUSEPORT, which would quietly share an address with another
    server of this user that did too; a plain bind first fails if anyone holds it."""
    from fastsip.transport.rules import parse_listen

    for spec in listen:
        transport, host, port = parse_listen(spec.partition("/")[0])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        kind = socket.SOCK_DGRAM if transport == "UDP" else socket.SOCK_STREAM
        with socket.socket(family, kind) as probe:
            if kind == socket.SOCK_STREAM:
                # (TIME_WAIT left by a previous run is no one holding it; a listener is.)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                return f"cannot listen on {spec}: {exc.strerror or exc}"
    return ""


def map_call_table(index: int, count: int, spread_above: float) -> CallPlacement | None:
    """Worker ``index``'s view of the call table its supervisor shares (through
    :data:`CALL_TABLE_ENV`), packing calls past ``spread_above``; None when there is none
    (not started by a supervisor that made one) or ``spread_above`` is 0 (hash placement)."""
    text = os.environ.get(CALL_TABLE_ENV, "")
    if spread_above <= 0 or not text.isdigit():
        return None
    fd = int(text)
    try:
        table = mmap.mmap(fd, os.fstat(fd).st_size)
    except (OSError, ValueError) as exc:
        log.warning("no call table (%s): calls placed by their Call-ID's hash", exc)
        return None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return CallPlacement(table, index, count, spread_above)


def _make_call_table(count: int) -> int:
    """Shared memory for the workers' call table, made empty: its file descriptor, for them
    to inherit (-1 where there is no memfd: the workers then place calls by hash)."""
    if not hasattr(os, "memfd_create"):
        return -1
    fd = os.memfd_create("fastsip-calls", os.MFD_CLOEXEC)
    try:
        size = table_bytes(count)
        os.ftruncate(fd, size)       # (pages are made as they are first written)
        with mmap.mmap(fd, size) as table:
            format_table(table, count)
    except BaseException:
        os.close(fd)
        raise
    return fd


def stream_path(directory: str | Path, index: int) -> str:
    """Where worker ``index`` listens for the links that carry connection hand-offs."""
    return str(Path(directory) / f"worker-{index}.links")


class HandOff:
    """Worker ``index`` of ``count``: takes, through ``steer`` (the intake's hook), every
    datagram whose call another worker holds (:meth:`owner_of`: the shared call table of
    ``placement``, or the Call-ID's hash) and sends it there; hands what the others send it to
    ``layer`` as if it had arrived on its own listener.  The same for the messages on its
    connections (``steer_stream``), and the bytes for connections it holds (``hand_send``: see
    the module's docstring).  ``directory``: where the workers' sockets are (made by the
    supervisor, mode 0700)."""

    def __init__(self, layer: TransportLayer, index: int, count: int,
                 directory: str | Path, placement: CallPlacement | None = None) -> None:
        self.layer = layer
        self.index = index
        self.count = count
        self.directory = str(directory)
        #: The shared call table when calls are packed (``serve --spread-above``, the
        #: default); None: every call is the worker's its Call-ID hashes to.
        self.placement = placement
        #: Datagrams handed to other workers / received from them / lost on the way (the owner
        #: restarting, its queue full: the peer's retransmission will come back).
        self.handed = 0
        self.received = 0
        self.lost = 0
        #: New calls whose chosen owner could not take them, claimed here instead.
        self.claimed = 0
        #: Connections: messages received on one handed to their owner / taken over from a
        #: holder; bytes handed to a connection's holder / written here for their owner; sends
        #: the holder found the connection gone for (reported back / heard of); envelopes
        #: that could not be handed (the other worker down, or a link's queue full).
        self.stream_handed = 0
        self.stream_received = 0
        self.sends_handed = 0
        self.sends_written = 0
        self.gone_reported = 0
        self.gone_heard = 0
        self.stream_lost = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        # Our SOCK_SEQPACKET listener, the links accepted on it (read), and the links we
        # opened to each other worker (written): datagrams and connections' messages alike.
        self._listener: socket.socket | None = None
        self._inbound: dict[int, socket.socket] = {}
        self._links: dict[int, _Link] = {}
        self._max_record = layer.limits.max_message_size + _STREAM_HEADER.size + 255

    def start(self) -> None:
        """Listen for the other workers' links, and take over the transport's hooks: each
        datagram and each message on a connection goes to its call's owner, every
        connection id names this worker, bytes for another worker's connection go to it."""
        loop = self._loop = asyncio.get_running_loop()
        path = stream_path(self.directory, self.index)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)                     # a previous run of this worker, killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.bind(path)
            sock.listen(max(8, self.count))
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), self._accept_link)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        layer = self.layer
        layer.steer = self.steer
        layer.be_worker(self.index)
        layer.stream_steer = self.steer_stream
        layer.hand_send = self.hand_send

    # -- messages on connections, and bytes for them ------------------------------------------

    def steer_stream(self, msg: Request | Response, data: bytes, source: Address) -> bool:
        """The transport's hook for a message framed on a connection we hold: True when
        another worker owns its call (and it was handed there, with the connection named)."""
        owner = self.owner_of(msg)
        if owner == self.index:
            return False
        if self._hand(owner, _MESSAGE, data, source):
            self.stream_handed += 1
            return True
        if self._take_over(msg):
            return False
        # The owner is down (restarting: its calls are lost with it) or far behind.  A peer
        # does not retransmit over TCP, so a request would wait out its Timer B: answer it
        # 503 at once, statelessly (RFC 3261 §21.5.4; our To tag makes its ACK ours).
        self.stream_lost += 1
        log.debug("message from %s for worker %d lost: not handed", source, owner)
        if isinstance(msg, Request) and msg.method != "ACK":
            with contextlib.suppress(ValueError):
                answer = msg.reply(503, to_tag=local_tag(),
                                   headers=[("Retry-After", str(_RETRY_AFTER))])
                self.layer.send(bytes(answer), source)
        return True

    def hand_send(self, data: bytes, dest: Address) -> bool:
        """The transport's hook for bytes to a connection it does not hold: True when the
        holder named by the id's low byte is another worker and has them (its answer, should
        the connection be gone, comes back as a _GONE); False: send as to a closed one."""
        holder = connection_holder(dest.connection)
        if holder is None or holder >= self.count or holder == self.index:
            return False
        if not self._hand(holder, _SEND, data, dest):
            self.stream_lost += 1
            return False            # the holder died: its connections with it (§18.4)
        self.sends_handed += 1
        return True

    def _hand(self, worker: int, kind: int, data: bytes, peer: Address) -> bool:
        host = peer.host.encode("ascii", "replace")[:255]
        record = (_STREAM_HEADER.pack(kind, self.index, _TRANSPORTS.index(peer.transport)
                                      if peer.transport in _TRANSPORTS else 0, peer.port,
                                      peer.connection & 0xFFFFFFFF, len(host))
                  + host + data)
        if len(record) > self._max_record:
            log.warning("%d bytes for worker %d exceed the message size limit", len(data),
                        worker)
            return False
        link = self._links.get(worker)
        if link is not None and link.send(record):
            return True
        if link is not None and not link.closed:
            return False            # open, but its queue is full
        # Not linked yet, or the other end restarted: (re)connect once.
        link = self._connect(worker)
        return link is not None and link.send(record)

    def _connect(self, worker: int) -> _Link | None:
        old = self._links.pop(worker, None)
        if old is not None:
            old.close()
        assert self._loop is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _LINK_BUFFER)
            sock.setblocking(False)
            sock.connect(stream_path(self.directory, worker))
        except OSError as exc:
            # ENOENT/ECONNREFUSED: that worker is down or restarting; EAGAIN: its backlog
            # is full.  The next hand-off tries again.
            sock.close()
            log.debug("no link to worker %d: %s", worker, exc)
            return None
        link = self._links[worker] = _Link(sock, self._loop, worker)
        return link

    def _accept_link(self) -> None:
        listener = self._listener
        if listener is None or self._loop is None:
            return
        for _ in range(self.count + 1):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("link accept failed: %s", exc)
                return
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LINK_BUFFER)
            fd = sock.fileno()
            self._inbound[fd] = sock
            self._loop.add_reader(fd, self._read_link, fd)

    def _read_link(self, fd: int) -> None:
        sock = self._inbound.get(fd)
        if sock is None:
            return
        if self.placement is not None:
            self.placement.measure()
        for _ in range(_BATCH):
            try:
                record = sock.recv(self._max_record)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("link receive error: %s", exc)
                record = b""
            if not record:                  # the other worker closed it (or died)
                self._drop_inbound(fd)
                return
            try:
                self._handle_record(record)
            except Exception:
                log.exception("error handling what another worker handed over")

    def _drop_inbound(self, fd: int) -> None:
        sock = self._inbound.pop(fd, None)
        if sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        sock.close()

    def _handle_record(self, record: bytes) -> None:
        if len(record) < _STREAM_HEADER.size:
            return
        kind, sender, transport, port, cid, size = _STREAM_HEADER.unpack_from(record)
        start = _STREAM_HEADER.size + size
        if transport >= len(_TRANSPORTS) or len(record) < start:
            return
        host = record[_STREAM_HEADER.size:start].decode("ascii", "replace")
        data = record[start:]
        layer = self.layer
        if kind == _DATAGRAM:
            self.received += 1
            layer._receive_datagram(data, host, port, cid & 0xFF, steer=False)
            return
        peer = Address(_TRANSPORTS[transport], host, port, cid)
        if kind == _MESSAGE:
            self.stream_received += 1
            layer.receive_handed(data, peer)
        elif kind == _SEND:
            if layer.send_on_connection(data, peer):
                self.sends_written += 1
                return
            self.gone_reported += 1
            if sender < self.count and not self._hand(sender, _GONE, data, peer):
                self.stream_lost += 1
        elif kind == _GONE:
            # Our own bytes back: the holder has no such connection now.  As when a
            # connection of our own has closed: another to the peer, else a new one, whose
            # failure reaches the transaction (RFC 3261 §18.4, §18.2.2).
            self.gone_heard += 1
            layer.send_without_connection(data, peer)

    def owner_of(self, msg: Request | Response) -> int:
        """The worker that holds ``msg``'s call.  Packed (:attr:`placement`): the one the
        shared table names; a new call (a request without a To tag, not ACK or CANCEL) not in
        it is placed -- here, unless this worker is busy -- and recorded; any other message
        it does not know goes where its Call-ID hashes.  Else: where the Call-ID hashes."""
        call_id = msg.call_id
        placement = self.placement
        if placement is None or not call_id:
            return call_id_shard(call_id, self.count)
        initial = False
        if type(msg) is Request and msg.method not in ("ACK", "CANCEL"):
            to = msg.to
            initial = to is not None and to.tag is None
        owner = placement.owner(call_id, initial)
        return owner if owner >= 0 else call_id_shard(call_id, self.count)

    def _take_over(self, msg: Request | Response) -> bool:
        """The worker just chosen for a new call (``msg`` opened it: :meth:`owner_of` placed
        it) could not be handed it -- down, restarting, its queue full: True when this worker
        claims the call instead and handles it.  Not for any other message: its owner holds
        the call's state, or held it and is gone."""
        placement = self.placement
        if placement is None or not placement.fresh or not msg.call_id:
            return False
        placement.claim(msg.call_id)
        self.claimed += 1
        return True

    def summary(self) -> str:
        """The counters, for the worker's last log line."""
        placed = ""
        if self.placement is not None:
            placed = (f" calls_kept={self.placement.kept} calls_passed={self.placement.passed}"
                      f" calls_claimed={self.claimed}")
        return (f"handed_off={self.handed} taken_over={self.received} lost={self.lost}{placed} "
                f"stream_handed={self.stream_handed} stream_taken={self.stream_received} "
                f"sends_handed={self.sends_handed} sends_written={self.sends_written} "
                f"gone_reported={self.gone_reported} gone_heard={self.gone_heard} "
                f"stream_lost={self.stream_lost}")

    def steer(self, msg: Request | Response, data: bytes, source: Address) -> bool:
        """The intake's hook: True when ``msg`` is another worker's (and was sent there)."""
        owner = self.owner_of(msg)
        if owner == self.index:
            return False
        if self._hand(owner, _DATAGRAM, data, source):
            self.handed += 1
            return True
        # The owner is down (restarting) or far behind (its link's queue full).  A new call
        # we placed there is taken here instead; anything else is lost, as UDP may lose it:
        # the sender retransmits.
        if self._take_over(msg):
            return False
        self.lost += 1
        return True

    def close(self) -> None:
        loop = self._loop if self._loop is not None and not self._loop.is_closed() else None
        listener, self._listener = self._listener, None
        if listener is not None:
            if loop is not None:
                loop.remove_reader(listener.fileno())
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(stream_path(self.directory, self.index))
        for fd in list(self._inbound):
            self._drop_inbound(fd)
        for link in self._links.values():
            link.close()
        self._links.clear()


class _Link:
    """Our SOCK_SEQPACKET connection to another worker's hand-off listener: one record per
    envelope, written now or -- while the other worker's buffer is full -- queued (bounded by
    :data:`_LINK_QUEUE_BYTES`) and written when the socket says it can take more."""

    __slots__ = ("closed", "loop", "queue", "queued", "sock", "worker", "writing")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 worker: int) -> None:
        self.sock = sock
        self.loop = loop
        self.worker = worker
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.writing = False
        self.closed = False

    def send(self, record: bytes) -> bool:
        """False: closed (the other end went away: reconnect) or the queue is full."""
        if self.closed:
            return False
        if self.queue:
            return self._enqueue(record)
        try:
            self.sock.send(record)
        except (BlockingIOError, InterruptedError):
            return self._enqueue(record)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN,
                                 errno.ECONNREFUSED):
                log.warning("hand-off to worker %d failed: %s", self.worker, exc)
            self.close()
            return False
        return True

    def _enqueue(self, record: bytes) -> bool:
        if self.queued + len(record) > _LINK_QUEUE_BYTES:
            return False
        self.queue.append(record)
        self.queued += len(record)
        if not self.writing:
            self.writing = True
            self.loop.add_writer(self.sock.fileno(), self._write_ready)
        return True

    def _write_ready(self) -> None:
        queue = self.queue
        while queue:
            try:
                self.sock.send(queue[0])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("link to worker %d lost with %d envelope(s) queued: %s",
                          self.worker, len(queue), exc)
                self.close()
                return
            self.queued -= len(queue.popleft())
        self.writing = False
        self.loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.writing and not self.loop.is_closed():
            self.loop.remove_writer(self.sock.fileno())
        self.writing = False
        self.queue.clear()
        self.queued = 0
        self.sock.close()


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
    carries one fresh nonce secret (:data:`NONCE_SECRET_ENV`), and the file descriptor they
    inherit of the call table they share (:data:`CALL_TABLE_ENV`, made for the run).

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
        self._call_table = -1
        #: Workers started again after dying (logs, tests).
        self.restarted = 0
        self._stopping = False
        self._readers: set[asyncio.Task[None]] = set()

    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        table = self._call_table
        worker.proc = await asyncio.create_subprocess_exec(
            *self.argv(worker.index, self.directory), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, env=self.env,
            pass_fds=(table,) if table >= 0 else ())
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
        # One call table for the run: a restarted worker maps the same one.
        self._call_table = _make_call_table(self.count)
        if self._call_table >= 0:
            self.env[CALL_TABLE_ENV] = str(self._call_table)
        try:
            return await self._run(stop)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            if self._call_table >= 0:
                os.close(self._call_table)
                self._call_table = -1

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

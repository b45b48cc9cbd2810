"""Log lines formatted and written by a thread: the serving loop only queues them.

A carrier leaves per-request logging on, so a log line must cost the event loop next to
nothing.  :class:`QueueLogHandler` is a :class:`logging.Handler` whose ``emit`` puts the record
on a :class:`queue.SimpleQueue` (a C call, no lock of ours); a writer thread takes everything
queued, formats it and writes it to the stream in one ``write``.  Hot paths skip even the
:class:`logging.LogRecord`: :func:`direct_emitter` gives them a function that queues a
``(time, level, logger, template, args)`` tuple, for loggers whose records would reach this
handler alone (no filter, no other handler), so nothing else could have seen them.

Nothing queued is lost on a clean stop: :meth:`QueueLogHandler.close` (called by :func:`stop`,
at exit and by :func:`logging.shutdown`) lets the writer write every line before it returns.
A writer that cannot keep up (a stalled pipe, a full disk) does not grow memory without
bound: past ``max_queued`` lines waiting, new ones are dropped and counted, and the count is
reported in a WARNING line (at most every :data:`DROP_REPORT_INTERVAL` seconds, and at stop).

The line format is fixed, :data:`FORMAT` (the CLI's): the writer renders it with the date and
time computed once per second.  Or, after :func:`set_format` ``("json")``, one JSON object a
line (:class:`JsonFormatter`): ``ts``, ``level``, ``logger``, ``msg`` and the fields a caller
passed with ``extra=`` (the direct path queues them as a dict beside the tuple's arguments), for
log shippers that should not parse text.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import threading
import time
from typing import IO, Any, Protocol

from fastsip.app._logline import QueueEmitter, TextLines

__all__ = ["DEFAULT_MAX_QUEUED", "FORMAT", "JsonFormatter", "LineFormatter",
           "QueueLogHandler", "direct_emitter", "dropped_lines", "flush", "install",
           "set_format", "stop", "structured"]

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Lines waiting for the writer at most (about 30 MB of queued requests' lines): a minute and
#: more of a busy proxy's log, far beyond any hiccup of a healthy disk.
DEFAULT_MAX_QUEUED = 100_000
#: Seconds between two WARNING lines about dropped lines (a stalled writer must not add a
#: line per dropped one).
DROP_REPORT_INTERVAL = 10.0
#: Records the writer takes from the queue per ``write`` at most.
BATCH = 1024
#: Seconds between two writes of INFO (and DEBUG) lines at least.  A line after a quiet spell
#: is written at once, and a WARNING or worse always is; lines that come faster are written
#: together, this long after the previous write.  Each wake-up of the writer costs ~100-300 us
#: of CPU while the loop is busy (a futex wake, context switches, cold caches, and the writer
#: contending for the GIL the loop drops at every syscall): measured at 150 lines a second,
#: one wake-up per line cost +150 us a line, 20 ms apart +80 us, 100 ms apart +20 us; at 250
#: calls a second through serve (a line each, the writer thread's own run time from
#: /proc/PID/task/TID/schedstat), 100 ms apart cost the writer 6.0-7.6 us a line, 1 s apart
#: 2.6-3.0 us.  Half a second keeps most of that gain, and an operator tailing the log sees
#: a line at most half a second after its request ended.
WRITE_INTERVAL = 0.5

#: Arguments that cannot change between the call and the writer's formatting.  Anything else
#: (a list, a message object, a dataclass) is formatted on the calling thread.
_IMMUTABLE = (str, int, float, bool, bytes, type(None))

_log = logging.getLogger(__name__)


class DirectEmit(Protocol):
    """What :func:`direct_emitter` gives: ``emit(template, args, extra=None)``."""

    def __call__(self, msg: str, args: tuple[Any, ...],
                 extra: dict[str, Any] | None = None) -> None: ...


class LineFormatter(logging.Formatter):
    """:data:`FORMAT`, the same text as ``logging.Formatter(FORMAT)`` writes, at a fraction of
    its cost: ``time.strftime`` runs once per second, not once per line, and the line of a
    queued tuple is made in C (:class:`~fastsip.app._logline.TextLines`)."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        #: The writer thread calls ``text.line`` for each queued tuple (no Python frame).
        self.text = TextLines(self.default_time_format, self.converter)

    def _asctime(self, created: float) -> str:
        return self.text.asctime(created)

    def line(self, created: float, levelname: str, name: str, msg: str,
             args: tuple[Any, ...], extra: dict[str, Any] | None = None) -> str:
        """The line of a tuple queued by :func:`direct_emitter` (``extra`` is not part of the
        text: the message says it all)."""
        return self.text.line(created, levelname, name, msg, args)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if getattr(record, "bare", False):
            # A line whose text form scripts match (``fastsip serve: cannot listen on ...``):
            # the message alone, no time, level or logger.
            return record.message
        text = f"{self._asctime(record.created)} {record.levelname} {record.name}: " \
               f"{record.message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text = f"{text}\n{record.exc_text}"
        if record.stack_info:
            text = f"{text}\n{self.formatStack(record.stack_info)}"
        return text


#: The attributes every LogRecord has: whatever else a record carries came with ``extra=``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "bare"}


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``,
    ``msg`` (the formatted message), then every field the record got through ``extra=`` (the
    per-request line's ``method``, ``status``, ``outcome``, ...), and ``exc`` with a traceback.
    :mod:`json` does the escaping (ASCII only, so a stream of any encoding takes the line and
    ``json.loads`` gives back the very strings logged)."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        # One encoder for every line (json.dumps with an option builds one per call).
        self._encode = json.JSONEncoder(default=str).encode

    def _ts(self, created: float) -> str:
        second = int(created)
        if second != self._second:       # (the writer thread is the only caller)
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._stamp}.{int((created - second) * 1000):03d}Z"

    def document(self, created: float, levelname: str, name: str, message: str,
                 extra: dict[str, Any] | None) -> dict[str, Any]:
        """The object of one line (its fixed keys first; ``extra`` cannot replace them)."""
        doc: dict[str, Any] = {"ts": self._ts(created), "level": levelname, "logger": name,
                               "msg": message}
        if extra:
            for key, value in extra.items():
                doc.setdefault(key, value)
        return doc

    def line(self, created: float, levelname: str, name: str, msg: str,
             args: tuple[Any, ...], extra: dict[str, Any] | None = None) -> str:
        """The line of a tuple queued by :func:`direct_emitter`."""
        return self._encode(self.document(created, levelname, name,
                                          msg % args if args else msg, extra))

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS}
        doc = self.document(record.created, record.levelname, record.name, record.message,
                            extra)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return self._encode(doc)


class _Flush:
    """A marker in the queue: set when the writer has written everything before it."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


def _routine(item: object) -> bool:
    """A queued line that may wait for the next write: INFO or below."""
    if type(item) is tuple:
        return bool(item[1] in ("INFO", "DEBUG"))
    return isinstance(item, logging.LogRecord) and item.levelno < logging.WARNING


class QueueLogHandler(logging.Handler):
    """Queues records; a daemon thread formats and writes them to ``stream`` (see the module
    docstring).  ``max_queued`` bounds the lines waiting; ``dropped`` counts those refused."""

    def __init__(self, stream: IO[str], *, max_queued: int = DEFAULT_MAX_QUEUED,
                 level: int = logging.NOTSET, stop_timeout: float = 10.0) -> None:
        super().__init__(level)
        self.setFormatter(LineFormatter())
        self.stream = stream
        self.max_queued = max_queued
        self.stop_timeout = stop_timeout
        #: Lines refused because the queue was full (the writer could not keep up).
        self.dropped = 0
        self._reported = 0
        self._last_report = 0.0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._write_loop, name="fastsip-log-writer",
                                        daemon=True)
        self._thread.start()

    # the calling threads ----------------------------------------------------------------

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args
        if args and not (type(args) is tuple and all(type(a) in _IMMUTABLE for a in args)):
            # A mutable argument may change before the writer formats it: format it now.
            try:
                record.msg = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format: logging's report, as handlers do
                self.handleError(record)
                return
            record.args = None
        if record.exc_info:
            # The traceback keeps every frame alive until written; and its text is now's.
            record.exc_text = self.formatter.formatException(record.exc_info) \
                if self.formatter is not None else ""
            record.exc_info = None
        if self._closed:              # after stop (a late atexit hook): written at once
            self._write(self.format(record) + "\n")
        elif self._queue.qsize() < self.max_queued:
            self._queue.put(record)
        else:
            self.dropped += 1

    def direct(self, name: str, level: int) -> DirectEmit:
        """A function ``emit(template, args, extra=None)`` that queues one line of logger
        ``name`` at ``level`` with no :class:`~logging.LogRecord` (see
        :func:`direct_emitter`); ``args`` must hold only immutable values (str, int, float),
        and ``extra`` (the fields a JSON line carries) must not change once passed."""
        return QueueEmitter(self, self._queue, name, logging.getLevelName(level),
                            self.max_queued)

    def _write_now(self, created: float, levelname: str, name: str, msg: str,
                   args: tuple[Any, ...], extra: dict[str, Any] | None) -> None:
        # A direct line after close(): the writer is gone, so it is written here.
        fmt = self.formatter
        assert isinstance(fmt, LineFormatter | JsonFormatter)
        self._write(fmt.line(created, levelname, name, msg, args, extra) + "\n")

    def flush(self, timeout: float = 10.0) -> None:
        """Wait (``timeout`` seconds at most) until every line queued so far is written."""
        if self._closed or threading.current_thread() is self._thread:
            return
        marker = _Flush()
        self._queue.put(marker)
        marker.done.wait(timeout)

    def close(self) -> None:
        """Write every queued line (``stop_timeout`` seconds at most: a stream nobody reads
        must not hold the process forever), report drops, and end the writer."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            if threading.current_thread() is not self._thread:
                self._thread.join(self.stop_timeout)
        super().close()

    # the writer thread ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        get, get_nowait = self._queue.get, self._queue.get_nowait
        last = 0.0
        while True:
            batch = [get()]                  # block until something comes
            wait = last + WRITE_INTERVAL - time.monotonic()
            if wait > 0 and _routine(batch[0]):
                time.sleep(wait)             # the previous write was just now: gather more
            last = time.monotonic()
            try:                             # then take what is queued (puts meanwhile are
                while len(batch) < BATCH:    # lock-free appends: no waiter to wake)
                    batch.append(get_nowait())
            except queue.Empty:
                pass
            fmt = self.formatter             # (read per batch: set_format may change it)
            assert isinstance(fmt, LineFormatter | JsonFormatter)
            line = fmt.text.line if isinstance(fmt, LineFormatter) else fmt.line
            lines: list[str] = []
            markers: list[_Flush] = []
            stopping = False
            for item in batch:
                if type(item) is tuple:
                    try:
                        lines.append(line(*item))
                    except Exception:    # noqa: BLE001 - a template and args that do not fit
                        lines.append(f"{item[0]:.3f} {item[1]} {item[2]}: {item[3]!r} % "
                                     f"{item[4]!r}")
                elif isinstance(item, logging.LogRecord):
                    try:
                        lines.append(fmt.format(item))
                    except Exception:    # noqa: BLE001 - logging's report, as handlers do
                        self.handleError(item)
                elif isinstance(item, _Flush):
                    markers.append(item)
                elif item is _STOP:
                    stopping = True
            self._report_drops(lines, stopping)
            if lines:
                self._write("\n".join(lines) + "\n")
            for marker in markers:
                marker.done.set()
            if stopping:
                return

    def _report_drops(self, lines: list[str], stopping: bool) -> None:
        dropped = self.dropped
        if dropped == self._reported:
            return
        now = time.time()
        if not stopping and now - self._last_report < DROP_REPORT_INTERVAL:
            return
        fmt = self.formatter
        assert isinstance(fmt, LineFormatter | JsonFormatter)
        lines.append(fmt.line(
            now, "WARNING", _log.name,
            "log writer behind: %d line(s) dropped (%d in all), at most %d wait to be written",
            (dropped - self._reported, dropped, self.max_queued)))
        self._reported = dropped
        self._last_report = now

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the stream is gone (a closed pipe): nothing to do
            pass


# -- process-wide set-up ----------------------------------------------------------------------

_installed: list[QueueLogHandler] = []


def install(level: int, stream: IO[str], *,
            max_queued: int = DEFAULT_MAX_QUEUED) -> QueueLogHandler:
    """What ``logging.basicConfig(level=level, stream=stream, format=FORMAT)`` does, with a
    :class:`QueueLogHandler` as the root's handler; closed at exit (or by :func:`stop`)."""
    handler = QueueLogHandler(stream, max_queued=max_queued)
    # FORMAT names no thread or process: a LogRecord need not look them up (a third of its
    # cost).  The process's logging is the CLI's to set.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    _installed.append(handler)
    atexit.register(handler.close)
    return handler


def stop() -> None:
    """Write every queued line and end the writers :func:`install` started."""
    for handler in _installed:
        handler.close()


def flush() -> None:
    """Wait until the lines queued so far are written (before printing to the same stream)."""
    for handler in _installed:
        handler.flush()


def set_format(name: str) -> None:
    """Lines as ``"text"`` (:data:`FORMAT`, the default) or ``"json"`` (one object a line, see
    :class:`JsonFormatter`) from now on, for the writers :func:`install` started.  Callers of
    :func:`direct_emitter` ask it again afterwards (and :func:`structured`, whether to pass the
    fields of a JSON line)."""
    if name not in ("text", "json"):
        raise ValueError(f"log format {name!r}: expected text or json")
    for handler in _installed:
        handler.setFormatter(JsonFormatter() if name == "json" else LineFormatter())


def structured(logger: logging.Logger) -> bool:
    """Do ``logger``'s records end in a :class:`JsonFormatter` (so the fields passed with
    ``extra=`` are what a reader gets, not the text of the message)?"""
    current: logging.Logger | None = logger
    while current is not None:
        if any(isinstance(h.formatter, JsonFormatter) for h in current.handlers):
            return True
        if not current.propagate:
            break
        current = current.parent
    return False


def dropped_lines() -> int:
    """Lines dropped so far by the writers :func:`install` started (for a stop summary)."""
    return sum(h.dropped for h in _installed)


def direct_emitter(logger: logging.Logger, level: int) -> DirectEmit | None:
    """For a hot path: a function ``emit(template, args, extra=None)`` that queues ``template
    % args`` (with the fields ``extra`` for a JSON line) as a line of ``logger`` at ``level``
    without a :class:`~logging.LogRecord` -- or None when that would change what is logged:
    the level is off, or a record would meet a filter or any handler other than one
    :class:`QueueLogHandler` (which formats with :class:`LineFormatter` or
    :class:`JsonFormatter`).  Decided now: a caller asks again after reconfiguring logging."""
    if not logger.isEnabledFor(level):
        return None
    handlers: list[logging.Handler] = []
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters:
            return None
        handlers.extend(current.handlers)
        if not current.propagate:
            break
        current = current.parent
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if not isinstance(handler, QueueLogHandler) or handler.filters or level < handler.level \
            or type(handler.formatter) not in (LineFormatter, JsonFormatter):
        return None
    return handler.direct(logger.name, level)

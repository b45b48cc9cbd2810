"""Log lines written by a thread (fastsip.app.logqueue): nothing lost at a clean stop, a stalled
stream never stalls the caller (lines past the bound are dropped and counted), and the lines
are the ones ``logging.Formatter`` would have written.  In-process with real streams (a pipe
nobody reads), then end to end against ``fastsip serve``."""

from __future__ import annotations

import io
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import SIGTERM_KILLS, fastsip_env, free_port, posix_only
from serveutil import DOMAIN, HOST, Serve, request, stop

from fastsip.app import logqueue

LINE = "request method=%s status=%d outcome=%s duration_ms=%.1f %s"


class _StuckStream(io.StringIO):
    """A stream whose writes block until released: a full pipe, a hung NFS mount."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, text: str) -> int:
        self.entered.set()
        self.release.wait(30)
        return super().write(text)


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A logger of its own, outside logging's tree (pytest's capture handlers are not on
    it), so the handler under test is the only one."""
    log = logging.Logger("test.logqueue", logging.INFO)  # noqa: LOG001 - see above
    yield log
    for h in log.handlers[:]:
        log.removeHandler(h)
        h.close()


def test_lines_match_logging_formatter(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = logqueue.QueueLogHandler(stream)
    logger.addHandler(handler)
    args = ("INVITE", 200, "answered", 12.3456, "call_id=x from=sip:a@b to=sip:c@d")
    record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, LINE, args, None)
    want = logging.Formatter(logqueue.FORMAT).format(record)
    handler.handle(record)
    emit = logqueue.direct_emitter(logger, logging.INFO)
    assert emit is not None
    emit(LINE, args)
    handler.close()
    first, second = stream.getvalue().splitlines()
    assert first == want
    # the direct line has its own timestamp; the rest is the same text
    assert second.split(" ", 2)[2] == want.split(" ", 2)[2]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ", second), second


def test_a_direct_line_after_close_is_written_at_once(logger: logging.Logger) -> None:
    # The writer thread is gone after close(): the emitter has the handler write the line
    # itself (a line logged while serve stops is not lost), and counts no drop.
    stream = io.StringIO()
    handler = logqueue.QueueLogHandler(stream)
    logger.addHandler(handler)
    emit = logqueue.direct_emitter(logger, logging.INFO)
    assert emit is not None
    emit("before %s", ("close",))
    handler.close()
    emit("after %s", ("close",))
    lines = stream.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == ["before close", "after close"]
    assert all(" INFO " + logger.name + ": " in line for line in lines), lines
    assert handler.dropped == 0


def test_direct_line_is_the_text_logging_formatter_writes() -> None:
    """The writer's compiled line of a queued tuple is logging.Formatter(FORMAT)'s text of
    the same record, to the millisecond, as the second it caches moves on and back."""
    fmt = logqueue.LineFormatter()
    reference = logging.Formatter(logqueue.FORMAT)
    args = ("INVITE", 486, "rejected", 0.04999, 'call_id="a b" from=sip:a@b to=sip:c@d')
    for created in (1_700_000_000.0, 1_700_000_000.9996, 1_700_000_001.0421,
                    1_700_000_000.5, 86_399.001, 1_765_432_109.999):
        record = logging.LogRecord("fastsip.app.serve", logging.INFO, __file__, 1, LINE, args,
                                   None)
        record.created = created
        record.msecs = int((created - int(created)) * 1000) + 0.0
        assert fmt.line(created, "INFO", "fastsip.app.serve", LINE, args) == \
            reference.format(record)
    assert fmt.line(1.5, "WARNING", "x", "no arguments", ()).endswith(" WARNING x: no arguments")


def test_mutable_arguments_are_formatted_when_logged(logger: logging.Logger) -> None:
    stream = _StuckStream()
    handler = logqueue.QueueLogHandler(stream)
    logger.addHandler(handler)
    logger.info("first")                       # the writer blocks writing this one
    assert stream.entered.wait(10)
    seen = ["a"]
    logger.info("list %s", seen)
    seen.append("changed later")
    stream.release.set()
    handler.close()
    assert "list ['a']\n" in stream.getvalue(), stream.getvalue()


def test_direct_emitter_only_where_nothing_else_would_see_the_record(
        logger: logging.Logger) -> None:
    handler = logqueue.QueueLogHandler(io.StringIO())
    logger.addHandler(handler)
    assert logqueue.direct_emitter(logger, logging.INFO) is not None
    assert logqueue.direct_emitter(logger, logging.DEBUG) is None          # level off
    logger.addFilter(lambda r: True)
    assert logqueue.direct_emitter(logger, logging.INFO) is None           # a filter
    logger.filters.clear()
    other = logging.StreamHandler(io.StringIO())
    logger.addHandler(other)
    assert logqueue.direct_emitter(logger, logging.INFO) is None           # another handler
    logger.removeHandler(other)


def test_stuck_stream_never_blocks_the_caller_and_drops_are_counted(
        logger: logging.Logger) -> None:
    stream = _StuckStream()
    handler = logqueue.QueueLogHandler(stream, max_queued=100)
    logger.addHandler(handler)
    emit = logqueue.direct_emitter(logger, logging.INFO)
    assert emit is not None
    emit("line %d", (0,))
    assert stream.entered.wait(10)             # the writer is stuck in write() with line 0
    started = time.monotonic()
    for n in range(1, 1000):
        emit("line %d", (n,))
        if n % 2:
            logger.info("record %d", n)
    took = time.monotonic() - started
    assert took < 5, took                      # (the stream blocks for 30 s)
    assert handler.dropped > 0
    stream.release.set()
    handler.close()
    text = stream.getvalue()
    written = len(re.findall(r": (line|record) \d+$", text, re.MULTILINE))
    assert written + handler.dropped == 1000 + 500, (written, handler.dropped)
    assert written <= 100 + 2                  # the bound (and what the writer held)
    assert f"({handler.dropped} in all)" in text, text[-500:]
    assert "WARNING test.logqueue" not in text  # the report is the writer's own logger's
    assert re.search(r" WARNING fastsip\.app\.logqueue: log writer behind: \d+ line\(s\) "
                     r"dropped", text), text[-500:]


def test_close_writes_everything_queued(logger: logging.Logger) -> None:
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    handler = logqueue.QueueLogHandler(out)
    logger.addHandler(handler)
    emit = logqueue.direct_emitter(logger, logging.INFO)
    assert emit is not None
    for n in range(5000):
        emit("line %d", (n,))
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
    reader.start()
    handler.close()
    out.close()
    reader.join(10)
    os.close(r)
    lines = b"".join(chunks).decode().splitlines()
    assert [int(x.rsplit(" ", 1)[1]) for x in lines] == list(range(5000))
    assert handler.dropped == 0


# -- fastsip serve --------------------------------------------------------------------------


def _burst(port: int, n: int, tag: str, chunk: int = 50) -> int:
    """Send ``n`` OPTIONS to serve, ``chunk`` at a time without waiting for each; the number
    answered 200."""
    answered = 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        me = s.getsockname()[1]
        s.settimeout(5)
        for first in range(0, n, chunk):
            ids = range(first, min(n, first + chunk))
            for k in ids:
                msg = request("OPTIONS", f"sip:{HOST}:{port}", call_id=f"{tag}{k}")
                s.sendto(msg.replace("{me}", str(me)).encode(), (HOST, port))
            for _ in ids:
                try:
                    answered += s.recv(65535).startswith(b"SIP/2.0 200 ")
                except OSError:
                    break
    return answered


def test_serve_burst_is_all_logged_by_the_clean_stop(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(tmp_path, port, "--trusted", HOST)
    try:
        answered = _burst(port, 2000, "burst")
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert answered == 2000
    assert log.count("request method=OPTIONS status=200 outcome=accepted") == 2000
    assert "stopped accepted=2000\n" in log or "stopped accepted=2000 " in log, log[-2000:]
    assert "log_lines_dropped" not in log and "log writer behind" not in log


@posix_only(f"serve's clean stop writes the dropped-lines count: {SIGTERM_KILLS}")
def test_serve_with_stderr_nobody_reads_keeps_answering(tmp_path: Path) -> None:
    """stderr is a pipe nobody reads (a stalled log shipper): once the pipe and the queue
    (--log-queue 50) are full, serve still answers every request; the lines it could not keep
    are counted, and the count is written when the pipe drains."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{port}",
         "--domain", DOMAIN, "--grace", "1", "--trusted", HOST, "--log-queue", "50"],
        cwd=tmp_path, env=fastsip_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith("listening on")
        # ~230 bytes a line: 64 KiB of pipe holds ~300 of them, the queue 50 more
        answered = _burst(port, 2000, "stall")
        assert answered == 2000
    finally:
        proc.send_signal(15)
        try:
            _, err = proc.communicate(timeout=60)  # reading drains the pipe: the writer
        except subprocess.TimeoutExpired:          # finishes and serve exits
            stop(proc)
            raise
    assert proc.returncode == 0, err[-2000:]
    written = err.count("request method=OPTIONS status=200")
    reports = [int(n) for n in re.findall(r"log writer behind: \d+ line\(s\) dropped "
                                          r"\((\d+) in all\)", err)]
    assert reports, err[-2000:]
    dropped = max(reports)
    assert 0 < written < 2000
    # every request line was written or counted (the count also holds start/stop lines that
    # found the queue full)
    assert written + dropped >= 2000, (written, dropped)
    assert dropped <= 2000 - written + 10, (written, dropped)

"""``fastsip serve --log-format json``: every line serve writes is one JSON object (start-up,
per-request, stop, and the one-line start-up errors), the request line's fields are keys, and
what came off the wire (quotes, backslashes, non-ASCII) reads back exactly as it was sent.
``--log-format text`` (the default) keeps today's line, byte for byte.  End to end against a
real serve, plus the formatter in-process over strings the wire would not carry."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import fastsip_env, free_port
from serveutil import DOMAIN, HOST, Serve, final_status, sip_exchange

from fastsip.app import logqueue

#: Things a log shipper must get back as sent: quotes, backslashes, a space, UTF-8.
CALL_ID = 'c"1\\x é€@h'
FROM_URI = "sip:zo\\e@example.com"          # (a URI may hold a backslash, not a quote)
FROM = f'"Zoë \\"Q\\"" <{FROM_URI}>;tag=f1'


def odd_invite() -> str:
    return (f"INVITE sip:nobody@{DOMAIN} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{{me}};branch=z9hG4bK-odd\r\n"
            "Max-Forwards: 70\r\n"
            f"From: {FROM}\r\n"
            f"To: <sip:nobody@{DOMAIN}>\r\n"
            f"Call-ID: {CALL_ID}\r\n"
            "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")


def json_lines(text: str) -> list[dict[str, Any]]:
    lines = [line for line in text.splitlines() if line]
    assert lines
    docs = []
    for line in lines:
        doc = json.loads(line)                 # every line, or this raises
        assert isinstance(doc, dict), line
        assert {"ts", "level", "logger", "msg"} <= doc.keys(), line
        docs.append(doc)
    return docs


def test_json_lines_carry_the_request_fields_and_round_trip(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(tmp_path, port, "--log-format", "json")
    try:
        assert final_status(sip_exchange(port, odd_invite())) == 404
    finally:
        assert serve.close() == 0
    docs = json_lines(serve.log())
    requests = [d for d in docs if d["msg"] == "request"]
    assert len(requests) == 1, docs
    (line,) = requests
    assert line["level"] == "INFO" and line["logger"] == "fastsip.app.serve"
    assert line["method"] == "INVITE" and line["status"] == 404
    assert line["outcome"] == "rejected"
    assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 5000
    assert line["call_id"] == CALL_ID
    assert line["from"] == FROM_URI
    assert line["to"] == f"sip:nobody@{DOMAIN}"
    assert line["source"].startswith(f"udp:{HOST}:")
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    # Start-up and stop lines are JSON too, in order.
    msgs = [d["msg"] for d in docs]
    assert any(m.startswith("listening on udp:") for m in msgs), msgs
    assert any(m.startswith("serving domains=") for m in msgs), msgs
    assert msgs[-2].startswith("stopped rejected=1") or any(
        m.startswith("stopped rejected=1") for m in msgs), msgs


def test_text_format_keeps_todays_line(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(tmp_path, port)               # --log-format text, the default
    try:
        assert final_status(sip_exchange(port, odd_invite())) == 404
    finally:
        assert serve.close() == 0
    (line,) = [x for x in serve.log().splitlines() if " request method=" in x]
    head, _, fields = line.partition(" INFO fastsip.app.serve: ")
    assert head[:4].isdigit() and "," in head
    assert fields.startswith("request method=INVITE status=404 outcome=rejected duration_ms=")
    assert fields.split(" ", 5)[5] == (
        'call_id="c\\"1\\\\x é€@h" from="sip:zo\\\\e@example.com" '
        f"to=sip:nobody@{DOMAIN} source=udp:{HOST}:" + fields.rsplit(":", 1)[1])


def test_a_start_up_error_is_one_json_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((HOST, 0))
        port = taken.getsockname()[1]
        r = subprocess.run(
            [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{port}",
             "--log-format", "json", "--log-level", "warning"], check=False,
            cwd=tmp_path, env=fastsip_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    (doc,) = json_lines(r.stderr)
    assert doc["level"] == "ERROR"
    assert doc["msg"].startswith(f"fastsip serve: cannot listen on udp:{HOST}:{port}: ")
    assert "bare" not in doc


# -- in-process: the formatter over any string ----------------------------------------------


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.Logger("test.serve_logs", logging.INFO)  # noqa: LOG001 - its own tree
    yield log
    for h in log.handlers[:]:
        log.removeHandler(h)
        h.close()


@pytest.mark.parametrize("text", ['"quoted" \\ back\\slash', "ünï€😀", "line\nbreak\r\tx",
                                  "", "key=value \"x\"", "\x00\x1f\x7f"])
def test_json_formatter_round_trips_any_string(logger: logging.Logger, text: str) -> None:
    stream = io.StringIO()
    handler = logqueue.QueueLogHandler(stream)
    handler.setFormatter(logqueue.JsonFormatter())
    logger.addHandler(handler)
    fields = {"method": "INVITE", "status": 200, "from": text, "to": text, "call_id": text}
    logger.info("request %s", text, extra=fields)       # a LogRecord, formatted by the writer
    emit = logqueue.direct_emitter(logger, logging.INFO)
    assert emit is not None
    emit("request", (), fields)                          # the hot path's tuple
    handler.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines                         # a newline in a field stays escaped
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == f"request {text}" and second["msg"] == "request"
    for doc in (first, second):
        assert doc["from"] == doc["to"] == doc["call_id"] == text
        assert doc["status"] == 200 and doc["logger"] == "test.serve_logs"
    assert all(line.isascii() for line in lines)         # any stream encoding takes them


def test_extra_cannot_replace_the_fixed_keys(logger: logging.Logger) -> None:
    stream = io.StringIO()
    handler = logqueue.QueueLogHandler(stream)
    handler.setFormatter(logqueue.JsonFormatter())
    logger.addHandler(handler)
    emit = logqueue.direct_emitter(logger, logging.INFO)
    assert emit is not None
    emit("real", (), {"msg": "forged", "level": "ERROR", "ts": "x"})
    handler.close()
    doc = json.loads(stream.getvalue())
    assert doc["msg"] == "real" and doc["level"] == "INFO" and doc["ts"] != "x"

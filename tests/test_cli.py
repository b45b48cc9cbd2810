"""The ``fastsip`` command: argument handling, and ``fastsip call`` against ``fastsip answer``
as real processes on 127.0.0.1 (no sipp needed), including a clean stop on SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastsip.cli import build_parser, main

sys.path.insert(0, str(Path(__file__).parent))
from procutil import NO_SIGINT, fastsip_env, posix_only
from procutil import free_port as _free_port

HOST = "127.0.0.1"




def test_help_and_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["call", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--calls" in out and "--rate" in out and "--duration" in out
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["call", "sip:x@h", "--rate", "0"])
    assert exc.value.code == 2
    assert main(["call", "http://example.com/"]) == 2
    assert main(["answer", "--listen", "sctp:1.2.3.4:5"]) == 2


@pytest.fixture
def answer(tmp_path: Path) -> Iterator[int]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsip", "answer", "--listen", f"udp:{HOST}:{port}",
         "--listen", f"tcp:{HOST}:{port}"],
        cwd=tmp_path, env=fastsip_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert all(line.startswith("listening on") for line in lines), lines
        yield port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
        assert "fastsip answer:" in out


@posix_only(f"fastsip answer is stopped with SIGINT and its summary checked: {NO_SIGINT}")
@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_call_against_answer(answer: int, tmp_path: Path, transport: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fastsip.cli", "call", f"sip:test@{HOST}:{answer}",
         "--calls", "20", "--rate", "40", "--duration", "0.1", "--transport", transport,
         "--linger", "0"],
        check=False, cwd=tmp_path, env=fastsip_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "attempted  20" in done.stdout and "completed  20" in done.stdout
    assert "failed     0" in done.stdout


@posix_only(f"fastsip call and answer are stopped with SIGINT: {NO_SIGINT}")
def test_call_stops_cleanly_on_sigint(answer: int, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsip.cli", "call", f"sip:test@{HOST}:{answer}",
         "--calls", "100", "--rate", "5", "--duration", "60"],
        cwd=tmp_path, env=fastsip_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    # Stopped early: the calls that were up got their BYE (completed), none failed.
    assert proc.returncode == 130, out + err
    assert "failed     0" in out
    completed = int(out.split("completed")[1].split()[0])
    attempted = int(out.split("attempted")[1].split()[0])
    assert 0 < completed <= attempted < 100

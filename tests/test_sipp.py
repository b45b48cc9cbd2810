"""fastsip against a real peer: sipp's built-in scenarios on 127.0.0.1, as separate processes.

- ``sipp -sn uac`` → ``fastsip answer`` over UDP and TCP: every call completes.
- the same with ``-lost 5`` (sipp drops 5 % of what it sends and receives): fastsip's
  retransmissions recover at least as many calls as sipp's own ``-sn uas`` does under the same
  loss, measured in the same run.
- ``fastsip call`` → ``sipp -sn uas``: every call completes, as sipp counts it.

sipp counts calls in its ``-trace_stat`` CSV and exits 0 only when every call succeeded.
Skipped when sipp is not installed (Debian/Ubuntu: ``apt-get install sip-tester``).
Loads stay small (at most 100 calls at 50 cps) because CI machines are shared.
"""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import SIGTERM_KILLS, fastsip_env, free_port, posix_only

SIPP = shutil.which("sipp")
pytestmark = [
    pytest.mark.skipif(SIPP is None, reason="sipp is not installed (sip-tester)"),
    # The answer fixture checks fastsip answer's clean-stop summary after SIGTERM.
    posix_only(f"fastsip answer's clean stop: {SIGTERM_KILLS}"),
]

HOST = "127.0.0.1"


def stop(proc: subprocess.Popen[str], timeout: float = 10.0) -> str:
    """SIGTERM (the clean stop), then SIGKILL if it hangs; returns its stdout."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


class SippResult:
    def __init__(self, returncode: int, stats: dict[str, str], output: str) -> None:
        self.returncode = returncode
        self.stats = stats
        self.output = output

    @property
    def successful(self) -> int:
        return int(self.stats.get("SuccessfulCall(C)", "0"))

    @property
    def failed(self) -> int:
        return int(self.stats.get("FailedCall(C)", "0"))

    def failures(self) -> dict[str, str]:
        return {k: v for k, v in self.stats.items()
                if k.startswith("Failed") and k.endswith("(C)") and v != "0"}

    def __repr__(self) -> str:
        return (f"<sipp rc={self.returncode} ok={self.successful} failed={self.failed} "
                f"{self.failures()}>")


def sipp_args(scenario: str, workdir: Path, name: str, *extra: str) -> list[str]:
    assert SIPP is not None
    return [SIPP, "-sn", scenario, *extra, "-i", HOST, "-nostdin", "-trace_stat",
            "-stf", str(workdir / f"{name}.csv"), "-fd", "1"]


def sipp_result(proc: subprocess.Popen[str], workdir: Path, name: str,
                timeout: float) -> SippResult:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    rows = list(csv.reader((workdir / f"{name}.csv").read_text().splitlines(), delimiter=";"))
    stats = dict(zip(rows[0], rows[-1])) if len(rows) >= 2 else {}
    return SippResult(proc.returncode, stats, out or "")


def run_sipp(scenario: str, workdir: Path, name: str, *extra: str,
             timeout: float = 90.0) -> SippResult:
    proc = subprocess.Popen(sipp_args(scenario, workdir, name, *extra), cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return sipp_result(proc, workdir, name, timeout)


@pytest.fixture
def answer(tmp_path: Path) -> Iterator[int]:
    """``fastsip answer`` on UDP and TCP at one free port; yields the port."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastsip.cli", "answer", "--listen", f"udp:{HOST}:{port}",
         "--listen", f"tcp:{HOST}:{port}"],
        cwd=tmp_path, env=fastsip_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        assert proc.stdout is not None
        seen = 0
        deadline = time.monotonic() + 20
        while seen < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line.startswith("listening on")
        if seen < 2:
            pytest.fail(f"fastsip answer did not start: {stop(proc)}")
        yield port
    finally:
        out = stop(proc)
        assert proc.returncode == 0, out
        assert "fastsip answer:" in out         # the clean-stop summary (SIGTERM handled)


CALLS = 100
RATE = "50"


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_sipp_uac_to_fastsip_answer(answer: int, tmp_path: Path, transport: str) -> None:
    extra = ["-t", "t1"] if transport == "tcp" else []
    result = run_sipp("uac", tmp_path, "uac", f"{HOST}:{answer}", *extra,
                      "-p", str(free_port()), "-m", str(CALLS), "-r", RATE, "-timeout", "60")
    assert result.returncode == 0, (result, result.output[-3000:])
    assert result.successful == CALLS and result.failed == 0, result


def test_sipp_uac_with_loss_recovers_as_well_as_sipp_uas(answer: int, tmp_path: Path) -> None:
    """5 % loss at the caller: each lost INVITE, 200, ACK, BYE or 200 must be recovered by a
    retransmission.  sipp's -lost is random and has no seed, so both runs see different losses
    of the same rate; fastsip must not lose more calls than sipp's own UAS, give or take
    one call of luck, and at least 95 % must complete."""
    loss = ["-lost", "5", "-m", str(CALLS), "-r", RATE, "-timeout", "90"]
    ours = run_sipp("uac", tmp_path, "uac_fastsip", f"{HOST}:{answer}",
                    "-p", str(free_port()), *loss, timeout=120)

    ref_port = free_port()
    uas = subprocess.Popen(
        sipp_args("uas", tmp_path, "uas_ref", "-p", str(ref_port), "-m", str(CALLS),
                  "-timeout", "100"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        ref = run_sipp("uac", tmp_path, "uac_ref", f"{HOST}:{ref_port}",
                       "-p", str(free_port()), *loss, timeout=120)
    finally:
        stop(uas)
    print(f"\nloss 5 %: fastsip answer completed {ours.successful}/{CALLS}, "
          f"sipp uas {ref.successful}/{CALLS}")
    assert ours.successful >= 0.95 * CALLS, (ours, ours.output[-3000:])
    assert ours.successful >= ref.successful - 1, (ours, ref)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_fastsip_call_to_sipp_uas(tmp_path: Path, transport: str) -> None:
    calls = 50
    port = free_port()
    extra = ["-t", "t1"] if transport == "tcp" else []
    uas = subprocess.Popen(
        sipp_args("uas", tmp_path, "uas", "-p", str(port), *extra, "-m", str(calls),
                  "-timeout", "60"),
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        assert uas.poll() is None, uas.communicate()[0]
        call = subprocess.run(
            [sys.executable, "-m", "fastsip.cli", "call", f"sip:service@{HOST}:{port}",
             "--calls", str(calls), "--rate", "25", "--duration", "0.2",
             "--transport", transport],
            check=False, cwd=tmp_path, env=fastsip_env(), capture_output=True, text=True,
            timeout=90)
        result = sipp_result(uas, tmp_path, "uas", timeout=30)
    finally:
        if uas.poll() is None:
            uas.kill()
            uas.communicate()
    assert call.returncode == 0, call.stdout + call.stderr
    assert f"completed  {calls}" in call.stdout, call.stdout
    assert result.returncode == 0, (result, result.output[-3000:])
    assert result.successful == calls and result.failed == 0, result


def test_fastsip_call_reports_failures(tmp_path: Path) -> None:
    """Nobody answers: the INVITEs time out (made short with --t1), the summary says so and the
    exit status is 1."""
    port = free_port()
    call = subprocess.run(
        [sys.executable, "-m", "fastsip.cli", "call", f"sip:nobody@{HOST}:{port}",
         "--calls", "2", "--rate", "10", "--t1", "0.05", "--t2", "0.2"],
        check=False, cwd=tmp_path, env=fastsip_env(), capture_output=True, text=True,
            timeout=60)
    assert call.returncode == 1, call.stdout + call.stderr
    assert "failed     2" in call.stdout

"""The shell's running of a program (:mod:`fastsip.asyncio.runner`): the loop :func:`run` picks,
and :class:`StopSignals` turning real SIGINT/SIGTERM into a stop event -- on asyncio's loop,
uvloop, and a loop without ``add_signal_handler`` (asyncio's selector loop as Windows has it) --
then putting back what was there, so a second signal does what it did before.  Serve's drain on
each signal is in test_serve.py."""

from __future__ import annotations

import asyncio
import inspect
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastsip.asyncio import LOOPS, LoopUnavailableError, loop_name, run
from fastsip.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from procutil import NO_SIGINT, SIGTERM_KILLS, fastsip_env, posix_only

try:
    import uvloop  # noqa: F401
    HAVE_UVLOOP = True
except ImportError:  # pragma: no cover - a dependency wherever it builds
    HAVE_UVLOOP = False

#: Runs a loop of the kind argv[1] names; inside, StopSignals until a signal comes; then,
#: outside the loop, waits for the second signal to see that the old handling is back.
SCRIPT = r"""
import asyncio, signal, sys, time
from asyncio.selector_events import BaseSelectorEventLoop
from fastsip.asyncio import StopSignals, loop_name, run

kind = sys.argv[1]
# A known start (an inherited SIG_IGN would hide what the second signal does).
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.SIG_DFL)

async def main() -> int:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals = StopSignals()
    async with signals as stop:
        print("ready", loop_name(), flush=True)
        await asyncio.wait_for(stop.wait(), 30)
        print("stopped by", signals.received.name, flush=True)
    after = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    print("restored", after == before, flush=True)
    return 0

if kind == "no-add_signal_handler":
    # What asyncio's loops on Windows are: no add_signal_handler (NotImplementedError).
    loop = BaseSelectorEventLoop()
    rc = loop.run_until_complete(main())
    loop.close()
else:
    rc = run(main(), kind)
try:
    print("outside the loop", flush=True)  # (in the try: the signal may come before sleep)
    time.sleep(30)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(3)
sys.exit(rc)
"""

KINDS = [
    pytest.param("asyncio", "asyncio", id="asyncio"),
    pytest.param("uvloop", "uvloop", id="uvloop",
                 marks=pytest.mark.skipif(not HAVE_UVLOOP, reason="uvloop not installed")),
    pytest.param("auto", "uvloop" if HAVE_UVLOOP else "asyncio", id="auto"),
    pytest.param("no-add_signal_handler", "asyncio", id="no-add_signal_handler"),
]


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


@posix_only(f"sends SIGINT and SIGTERM to a child: {NO_SIGINT}; {SIGTERM_KILLS}")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize(("kind", "expected_loop"), KINDS)
def test_stop_signals(tmp_path: Path, kind: str, expected_loop: str,
                      sig: signal.Signals) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, kind], cwd=tmp_path,
                            env=fastsip_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        assert _line(proc) == f"ready {expected_loop}"
        proc.send_signal(sig)
        assert _line(proc) == f"stopped by {sig.name}"
        assert _line(proc) == "restored True"
        assert _line(proc) == "outside the loop"
        # Removed: the same signal again does what it did before the loop ran.
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if sig == signal.SIGINT:
        assert proc.returncode == 3, err
    else:
        assert proc.returncode == -signal.SIGTERM, err


async def _which_loop() -> int:
    return {"asyncio": 10, "uvloop": 20}.get(loop_name(), 99)


def test_run_picks_the_loop() -> None:
    assert LOOPS == ("auto", "asyncio", "uvloop")
    assert run(_which_loop(), "asyncio") == 10
    assert run(_which_loop()) == (20 if HAVE_UVLOOP else 10)
    assert loop_name(asyncio.new_event_loop()) == "asyncio"
    coro = _which_loop()
    with pytest.raises(ValueError, match="unknown event loop 'tokio'"):
        run(coro, "tokio")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED  # no "never awaited"


def test_without_uvloop(monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    """Where uvloop cannot be imported (Windows; None in sys.modules makes the import fail as
    a missing package does): auto falls back to asyncio, asking for uvloop is a clear error."""
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert run(_which_loop(), "auto") == 10
    coro = _which_loop()
    with pytest.raises(LoopUnavailableError, match="uvloop is not installed"):
        run(coro, "uvloop")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert main(["serve", "--loop", "uvloop", "--listen", "udp:127.0.0.1:0"]) == 2
    assert main(["answer", "--loop", "uvloop", "--listen", "udp:127.0.0.1:0"]) == 2
    err = capsys.readouterr().err
    assert err.count("fastsip: --loop uvloop but uvloop is not installed") == 2, err
    assert "Traceback" not in err and "never awaited" not in err, err

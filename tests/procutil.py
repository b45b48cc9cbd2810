"""Helpers for tests that run fastsip and sipp as real processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import fastsip

if TYPE_CHECKING:
    import pytest

HOST = "127.0.0.1"

#: The test workflow runs the suite on windows-latest too; what cannot work there skips with
#: :func:`posix_only` and one of the reasons below (tests/test_portability.py checks that
#: every use of a POSIX-only API in a test has such a skip).
WINDOWS = sys.platform == "win32"

#: Popen.send_signal(SIGTERM) on Windows is TerminateProcess: the process dies at once, so
#: there is no clean stop (drain, summary, exit status 0) to see.
SIGTERM_KILLS = ("Windows has no SIGTERM between processes: send_signal(SIGTERM) is "
                 "TerminateProcess, an abrupt kill, so the clean stop cannot be checked")
#: Popen.send_signal(SIGINT) raises ValueError on Windows (only CTRL_C/CTRL_BREAK events).
NO_SIGINT = ("Popen.send_signal(SIGINT) is unsupported on Windows (only CTRL_C_EVENT and "
             "CTRL_BREAK_EVENT, which reach a whole console process group)")


def posix_only(reason: str) -> pytest.MarkDecorator:
    """Skip on Windows (only there) because of ``reason``: what the test needs that Windows
    lacks.  pytest is imported here, not at the top: benchmarks import this module too."""
    import pytest

    return pytest.mark.skipif(WINDOWS, reason=f"POSIX only: {reason}")


def free_port(host: str = HOST) -> int:
    """A port free for both UDP and TCP on ``host`` (servers listen on both with one number);
    ``host`` may be an IPv6 literal."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            with socket.socket(family, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def fastsip_env() -> dict[str, str]:
    """The test's environment, with the directory of the fastsip the tests imported first on
    PYTHONPATH: subprocesses run that same fastsip whatever PYTHONPATH the run was given (the
    src/ layout already keeps a checkout's sources from shadowing the installed package)."""
    env = dict(os.environ)
    pkg_parent = str(Path(fastsip.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = 0.1) -> None:
    """Poll ``predicate`` until it holds; after ``timeout`` seconds (and one last look), an
    AssertionError that names ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    assert predicate(), f"timed out after {timeout} s waiting for {what}"

"""Helpers for tests that run fastsip and sipp as real processes on 127.0.0.1."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import fastsip

HOST = "127.0.0.1"


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
    PYTHONPATH: subprocesses run that same fastsip (installed, or built in place), never another
    one picked up from their working directory (run them with cwd outside the checkout too:
    ``python -m`` puts the cwd first on sys.path)."""
    env = dict(os.environ)
    pkg_parent = str(Path(fastsip.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *filter(None, [env.get("PYTHONPATH")])])
    return env

"""A throwaway redis-server for the tests: on 127.0.0.1, a free port, its files in a temporary
directory, with the append-only file fsynced on every write (``appendfsync always``: what makes
a registrar's 200 durable over Redis).  Started and stopped by the test that needs it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port

REDIS_SERVER = shutil.which("redis-server")


class RedisServer:
    """``redis-server`` in ``workdir``; :meth:`restart` starts it again on the same files."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        if REDIS_SERVER is None:
            pytest.skip("redis-server is not installed (.ci/system-deps installs it)")
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [REDIS_SERVER, "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
                "--save", "", "--daemonize", "no", "--protected-mode", "yes",
                "--logfile", str(self.workdir / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log()}")
            if self._answers():
                return
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"redis-server did not answer within 10 s: {self.log()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                reply = s.recv(64)
        except OSError:
            return False
        # Loading its append-only file it answers -LOADING; with a password, -NOAUTH: up.
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def flush(self) -> None:
        """Empty every database (FLUSHALL): a benchmark's next run starts without the last
        run's bindings, which a lookup would otherwise fork to as well."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            if self.password:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                assert s.recv(64).startswith(b"+OK"), "redis AUTH refused"
            s.sendall(b"FLUSHALL\r\n")
            reply = s.recv(64)
        assert reply.startswith(b"+OK"), f"redis FLUSHALL: {reply!r}"

    def log(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text()[-2000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: what a crash of the Redis host does to the process (its fsynced log stays)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

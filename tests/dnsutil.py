"""A real DNS server for the RFC 3263 tests: Debian's dnsmasq in the foreground on 127.0.0.1,
serving a test zone from its command line (``--srv-host``, ``--naptr-record``,
``--host-record``), logging every query it receives so a test can count them."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq"
                                       if Path("/usr/sbin/dnsmasq").exists() else None)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Dnsmasq:
    """dnsmasq answering for ``*.test`` only (no upstream, no hosts file) with ``records``
    (dnsmasq options such as ``--srv-host=...``); ``ttl`` for every local record."""

    def __init__(self, workdir: Path, records: Sequence[str], *, ttl: int = 60) -> None:
        assert DNSMASQ is not None
        self.port = free_udp_port()
        self.log_path = workdir / f"dnsmasq-{self.port}.log"
        cmd = [DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts", f"--port={self.port}",
               "--listen-address=127.0.0.1", "--bind-interfaces", "--local=/test/",
               "--log-queries", f"--log-facility={self.log_path}", "--user=root",
               "--group=root", f"--local-ttl={ttl}", "--pid-file=", "--cache-size=0",
               *records]
        self.proc = subprocess.Popen(cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)
        deadline = time.monotonic() + 10
        while "started" not in self._log_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                self.close()
                raise AssertionError(f"dnsmasq did not start: {err}")
            time.sleep(0.05)

    def _log_text(self) -> str:
        try:
            return self.log_path.read_text()
        except OSError:
            return ""

    @property
    def server(self) -> str:
        """The ``--dns-server`` value for serve."""
        return f"127.0.0.1:{self.port}"

    def queries(self, rdtype: str, name: str) -> int:
        """How many ``rdtype`` queries for ``name`` dnsmasq has received."""
        pattern = re.compile(rf"query\[{re.escape(rdtype)}\] {re.escape(name)} from ")
        return len(pattern.findall(self._log_text()))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

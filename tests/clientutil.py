"""Real SIP clients nobody here wrote, as processes driven by the real-client tests: PJSIP (a
``tests/pjsua_peer.py`` child per user agent) and baresip.  Every wait is bounded; a child that
does not stop when asked is killed."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from procutil import fastsip_env, free_port

PJSUA_PEER = Path(__file__).resolve().parent / "pjsua_peer.py"
BARESIP = shutil.which("baresip")


def _baresip_modules() -> str | None:
    """baresip's module directory (Debian's, or a source build's, or Homebrew's)."""
    prefix = Path(BARESIP).resolve().parent.parent if BARESIP else Path("/usr")
    for lib in (prefix / "lib", Path("/usr/lib"), Path("/usr/local/lib")):
        for candidate in (lib / "baresip" / "modules", *lib.glob("*/baresip/modules")):
            if (candidate / "ctrl_tcp.so").exists():
                return str(candidate)
    return None


BARESIP_MODULES = _baresip_modules()


class Lines:
    """Lines that a reader thread receives (from a child's stdout, a control socket), which
    the test waits for with a timeout (``expect``) instead of blocking on a read that may
    never return."""

    def __init__(self, name: str, fail_on: str = "") -> None:
        self.name = name
        self.lines: list[str] = []
        self._fail_on = re.compile(fail_on) if fail_on else None
        self._seen = 0
        self._eof = False
        self._queue: queue.Queue[str | None] = queue.Queue()

    def _feed(self, line: str | None) -> None:
        """From the reader thread: a line, or None at the end."""
        self._queue.put(line)

    def _drain(self, timeout: float) -> bool:
        """Move what the reader has into ``lines``, waiting up to ``timeout`` for the first;
        False once the input has ended."""
        if self._eof:
            return False
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        while item is not None:
            self.lines.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return True
        self._eof = True
        return False

    def _drain_to_end(self, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self._drain(0.5) and time.monotonic() < deadline:
            pass

    def expect(self, pattern: str, timeout: float = 15.0, *,
               anywhere: bool = False) -> re.Match[str]:
        """The first line after the last one matched that matches ``pattern``; AssertionError
        (with everything seen) when none comes within ``timeout``, the input ends first, or a
        line matching ``fail_on`` comes first.  With ``anywhere``, the first matching line
        since the start, and the place of the last match stays (for a reply that may come
        before or after events still to be expected)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        alive = True
        while True:
            for i in range(0 if anywhere else self._seen, len(self.lines)):
                m = regex.search(self.lines[i])
                if m:
                    if not anywhere:
                        self._seen = i + 1
                    return m
                if (not anywhere and self._fail_on is not None
                        and self._fail_on.search(self.lines[i])):
                    raise AssertionError(f"{self.name}: {self.lines[i]!r} while waiting for "
                                         f"{pattern!r}; got:\n" + "\n".join(self.lines))
            left = deadline - time.monotonic()
            if left <= 0 or not alive:
                raise AssertionError(
                    f"{self.name}: no line matching {pattern!r} within {timeout:g} s"
                    f"{'' if alive else ' (it ended)'}; got:\n" + "\n".join(self.lines))
            alive = self._drain(min(left, 0.2))


class LineProcess(Lines):
    """A child whose stdout lines (those starting with ``stdout_filter``, without it) are the
    lines to expect; stderr goes to ``NAME.stderr``."""

    def __init__(self, cmd: list[str], workdir: Path, name: str, *,
                 stdout_filter: str = "", fail_on: str = "") -> None:
        super().__init__(name, fail_on)
        self._filter = stdout_filter
        self.stderr_path = workdir / f"{name}.stderr"
        with open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=workdir, env=fastsip_env(), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True, bufsize=1)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(self._filter):
                self._feed(line.rstrip("\n")[len(self._filter):])
        self._feed(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass    # it exited: the next expect() says so, with its output

    def close(self, quit_line: str | None = None, timeout: float = 10.0) -> int:
        """Ask it to stop (``quit_line``, then closing stdin), kill it if it has not stopped
        within ``timeout``; returns its exit status."""
        if self.proc.poll() is None:
            if quit_line is not None:
                self.send(quit_line)
            if self.proc.stdin is not None:
                try:
                    self.proc.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._drain_to_end()     # the last lines: the reader ends at EOF, after the exit
        return self.proc.returncode


class PjsuaPeer(LineProcess):
    """A ``tests/pjsua_peer.py`` process: one PJSIP account; see that file for the commands
    and events.  Its PJSIP log (with every SIP message) is ``NAME.pjsip.log``."""

    def __init__(self, workdir: Path, name: str, *args: str, lifetime: float = 60.0) -> None:
        self.log_path = workdir / f"{name}.pjsip.log"
        super().__init__([sys.executable, str(PJSUA_PEER), "--log", str(self.log_path),
                          "--lifetime", f"{lifetime:g}", *args],
                         workdir, name, stdout_filter="EVENT ", fail_on=r"^ERROR ")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def close(self, quit_line: str | None = "quit", timeout: float = 10.0) -> int:
        return super().close(quit_line, timeout)

    @staticmethod
    def close_all(peers: list[PjsuaPeer]) -> None:
        """Stop them all at once (each takes about a second to unregister and shut down)."""
        for peer in peers:
            peer.send("quit")
        for peer in peers:
            peer.close()



class Baresip(Lines):
    """baresip as one user agent (``sip:USER@DOMAIN``) registered through an outbound proxy,
    with its own config directory ``NAME/``: no audio driver module is loaded, so calls run
    without sound; it answers by itself with ``auto_answer``.  It is driven over its
    ``ctrl_tcp`` socket: commands of the ``menu`` module (``dial URI``, ``hangup``, ``quit``),
    and its events become the lines to expect, ``TYPE {json}`` (``CALL_INCOMING``,
    ``CALL_ESTABLISHED``, ``CALL_CLOSED`` ...; a command's answer is ``RESPONSE {json}``).
    Its own log is ``NAME.out``; ``-t`` ends it after ``lifetime`` seconds whatever happens."""

    def __init__(self, workdir: Path, name: str, user: str, domain: str, proxy: str, *,
                 auto_answer: bool = False, lifetime: float = 60.0) -> None:
        super().__init__(name)
        assert BARESIP is not None and BARESIP_MODULES is not None
        config_dir = workdir / name
        config_dir.mkdir()
        sip_port, ctrl_port = free_port(), free_port()
        (config_dir / "config").write_text(
            f"sip_listen 127.0.0.1:{sip_port}\n"
            # Its address in Contact, Via and SDP (else the host's first interface's).
            "net_interface 127.0.0.1\n"
            f"module_path {BARESIP_MODULES}\n"
            "module g711.so\n"
            "module account.so\n"
            "module_app menu.so\n"
            "module_app ctrl_tcp.so\n"
            f"ctrl_tcp_listen 127.0.0.1:{ctrl_port}\n")
        (config_dir / "accounts").write_text(
            f'<sip:{user}@{domain}>;outbound="{proxy}";regint=300'
            + (";answermode=auto" if auto_answer else "") + "\n")
        self.out_path = workdir / f"{name}.out"
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(
                [BARESIP, "-f", str(config_dir), "-t", str(int(lifetime))], cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._ctrl = self._connect(ctrl_port)
        self._tokens = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _connect(self, port: int, timeout: float = 15.0) -> socket.socket:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2.0)
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise AssertionError(
                        f"{self.name}: no ctrl_tcp socket on port {port}:\n{self.output()}"
                        ) from None
                time.sleep(0.1)

    def _read(self) -> None:
        """Netstrings (``LEN:JSON,``) from the control socket, each one a line."""
        buf = b""
        self._ctrl.settimeout(None)
        try:
            while True:
                data = self._ctrl.recv(65536)
                if not data:
                    break
                buf += data
                while b":" in buf:
                    length, _, rest = buf.partition(b":")
                    if len(rest) < int(length) + 1:
                        break
                    obj = json.loads(rest[:int(length)])
                    buf = rest[int(length) + 1:]
                    kind = "RESPONSE" if obj.get("response") else obj.get("type", "?")
                    self._feed(f"{kind} {json.dumps(obj)}")
        except (OSError, ValueError):
            pass
        self._feed(None)

    def command(self, command: str, params: str = "", timeout: float = 10.0) -> dict[str, Any]:
        """Run a command; its answer (AssertionError unless ``ok``)."""
        self._tokens += 1
        token = f"t{self._tokens}"
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self._ctrl.sendall(b"%d:%s," % (len(body), body))
        answer: dict[str, Any] = json.loads(
            self.expect(rf'^RESPONSE (.*"token": "{token}".*)$', timeout, anywhere=True)[1])
        assert answer.get("ok"), (command, params, answer)
        return answer

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def close(self, timeout: float = 10.0) -> int | None:
        """``quit``, then SIGTERM, then SIGKILL, each after ``timeout``; its exit status."""
        if self.proc.poll() is None and hasattr(self, "_ctrl"):
            with contextlib.suppress(OSError):
                body = b'{"command": "quit", "token": "quit"}'
                self._ctrl.sendall(b"%d:%s," % (len(body), body))
        for stop in (None, self.proc.terminate, self.proc.kill):
            if stop is not None and self.proc.poll() is None:
                stop()
            try:
                self.proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        if hasattr(self, "_ctrl"):
            self._ctrl.close()
            self._drain_to_end()
        return self.proc.returncode

# -- PJSIP's log: the SIP messages it sent and received -----------------------------------------

#: One message in PJSIP's log: "RX 481 bytes Request msg BYE/cseq=2 (rdata0x..) from UDP
#: 127.0.0.1:5060:", the message, then "--end msg--".
_PJSIP_MSG = re.compile(
    r"(?P<dir>RX|TX) \d+ bytes (?:Request|Response) msg (?P<what>\S+?)/cseq=\d+ \(\w+\) "
    r"(?:from|to) (?P<transport>\w+) (?P<peer>\S+):\r?\n(?P<text>.*?)\r?\n--end msg--", re.DOTALL)


class SipMessage:
    """A SIP message as PJSIP logged it: ``what`` is the method of a request or
    ``CODE/METHOD`` of a response; ``peer`` is the address it came from or went to."""

    def __init__(self, direction: str, what: str, transport: str, peer: str, text: str) -> None:
        self.direction, self.what, self.transport, self.peer = direction, what, transport, peer
        self.text = text.replace("\r\n", "\n")

    def headers(self, name: str) -> list[str]:
        """The values of every ``name`` header line (compact forms not folded: PJSIP writes
        full names)."""
        prefix = name.lower() + ":"
        return [line.split(":", 1)[1].strip() for line in self.text.split("\n")
                if line.lower().startswith(prefix)]

    def __repr__(self) -> str:
        return f"<{self.direction} {self.what} {self.transport} {self.peer}>\n{self.text}"


def pjsip_messages(log: str, direction: str, what: str) -> list[SipMessage]:
    """The messages in a PJSIP log sent (``TX``) or received (``RX``) whose summary is
    ``what`` (``"BYE"``, ``"200/BYE"``)."""
    return [SipMessage(m["dir"], m["what"], m["transport"], m["peer"], m["text"])
            for m in _PJSIP_MSG.finditer(log) if m["dir"] == direction and m["what"] == what]

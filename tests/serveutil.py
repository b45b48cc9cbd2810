"""``fastsip serve`` and sipp as real processes on loopback, for the end-to-end, security and
flood tests: start serve with options and a log file, run sipp scenarios (from a chosen local
address: 127.0.0.2 and 127.0.0.3 are loopback too), exchange single requests over UDP."""

from __future__ import annotations

import csv
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import SIGTERM_KILLS, WINDOWS, fastsip_env, free_port

SIPP = shutil.which("sipp")

HOST = "127.0.0.1"
DOMAIN = "example.com"
SCENARIOS = Path(__file__).resolve().parent / "data" / "sipp"
CALLS = 5


def stop(proc: subprocess.Popen[str], timeout: float = 15.0) -> int:
    """SIGTERM (serve's clean stop), then SIGKILL if it hangs; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return proc.returncode


class Serve:
    """A ``fastsip serve`` process on one UDP port; its log goes to ``serve-N.log``.

    On Windows the test using it skips (before starting anything): :meth:`close` is serve's
    clean stop, SIGTERM, and tests assert what that stop does (exit status 0, the drain, the
    lines logged at the end); Windows can only kill the process."""

    count = 0

    def __init__(self, workdir: Path, port: int, *extra: str, tcp: bool = False,
                 listen: Sequence[str] = (), command: Sequence[str] = ()) -> None:
        """``listen``: the --listen specs, instead of UDP (and with ``tcp``, TCP) on HOST:port.
        ``command``: another server to run instead (its whole argv), one that prints
        ``listening on ...`` first on stdout and stops on SIGTERM, as serve does."""
        if WINDOWS:
            pytest.skip(f"POSIX only: fastsip serve's clean stop: {SIGTERM_KILLS}")
        Serve.count += 1
        self.port = port
        self.log_path = workdir / f"serve-{Serve.count}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        if not listen:
            listen = [f"udp:{HOST}:{port}", *([f"tcp:{HOST}:{port}"] if tcp else [])]
        self.proc = subprocess.Popen(
            list(command) or
            [sys.executable, "-m", "fastsip.cli", "serve",
             *(arg for spec in listen for arg in ("--listen", spec)),
             "--domain", DOMAIN, "--grace", "2", *extra],
            cwd=workdir, env=fastsip_env(), stdout=subprocess.PIPE, stderr=self._log,
            stdin=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on"):
            self.close()
            raise AssertionError(f"serve did not start: {line!r}\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_log(self, text: str, timeout: float = 5.0, times: int = 1) -> str:
        """The log once it holds ``text`` (``times`` times at least; an AssertionError with
        the log after ``timeout`` seconds).  A running serve writes its INFO lines in batches,
        up to half a second after they were logged (``logqueue.WRITE_INTERVAL``), in order: a
        line found means every earlier one is there too."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.log()
            if log.count(text) >= times:
                return log
            if time.monotonic() >= deadline:
                raise AssertionError(f"{text!r} not in serve's log after {timeout} s:\n{log}")
            time.sleep(0.05)

    def close(self) -> int:
        rc = stop(self.proc)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()
        return rc


def sipp(scenario: str, workdir: Path, name: str, *extra: str,
         background: bool = False, timeout: float = 30, host: str = HOST) -> subprocess.Popen[str]:
    """Run sipp with a scenario of tests/data/sipp from local address ``host``; its
    statistics go to NAME.csv and its messages to NAME.msg in ``workdir``."""
    assert SIPP is not None
    cmd = [SIPP, "-sf", str(SCENARIOS / scenario), "-i", host, "-nostdin", "-trace_stat",
           "-stf", str(workdir / f"{name}.csv"), "-fd", "1", "-trace_msg",
           "-message_file", str(workdir / f"{name}.msg"), "-timeout", str(int(timeout)),
           *extra]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    if not background:
        finish(proc, timeout + 30)
    return proc


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def successful(workdir: Path, name: str) -> int:
    rows = list(csv.reader((workdir / f"{name}.csv").read_text().splitlines(), delimiter=";"))
    return int(dict(zip(rows[0], rows[-1]))["SuccessfulCall(C)"]) if len(rows) > 1 else 0


def bye_messages(message_file: Path, received: bool) -> list[str]:
    """The BYEs in a sipp -trace_msg file, sent or received."""
    text = message_file.read_text()
    marker = "message received" if received else "message sent"
    out = []
    for block in text.split("----------------------------------------------- ")[1:]:
        # A block: the timestamp line, "UDP message sent (N bytes):", a blank line, the message.
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if marker in head and body.startswith("BYE "):
            out.append(body.replace("\r\n", "\n").strip())
    return out


def answered_users(message_file: Path) -> set[str]:
    """The users whose REGISTER got a 200, from a sipp -trace_msg file."""
    users = set()
    text = message_file.read_text()
    for block in text.split("----------------------------------------------- ")[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if "message received" in head and body.startswith("SIP/2.0 200"):
            to = re.search(r"^To:\s*<sip:([^@>]+)@", body, re.MULTILINE)
            assert to is not None, body
            users.add(to.group(1))
    return users


def register_load_killed(workdir: Path, port: int, *serve_args: str,
                         users: int = 6000, rate: int = 1000, after: float = 2.5) -> set[str]:
    """Run serve on ``port`` (with ``serve_args``: its --db) under a sipp REGISTER load over
    ``users`` distinct users, SIGKILL it ``after`` seconds in, and return the users sipp got
    a 200 for.  Asserts the kill landed mid-load: many answered, not all."""
    csv_file = workdir / "users.csv"
    csv_file.write_text("SEQUENTIAL\n" + "".join(f"u{n:05d}\n" for n in range(users)))
    # --rate-limit 0: one source sending a thousand REGISTERs a second is the point here.
    serve = Serve(workdir, port, *serve_args, "--rate-limit", "0")
    load = sipp("register_users.xml", workdir, "load", f"{HOST}:{port}", "-inf", str(csv_file),
                "-key", "domain", DOMAIN, "-r", str(rate), "-m", str(users),
                "-p", str(free_port()), background=True, timeout=30)
    try:
        time.sleep(after)                             # in the middle of the load
        assert serve.proc.poll() is None, serve.log()
        serve.proc.send_signal(signal.SIGKILL)
        serve.proc.wait(10)
        time.sleep(0.5)                               # answers already on the wire arrive
    finally:
        load.send_signal(signal.SIGTERM)              # sipp writes its message file and ends
        finish(load, 20)
        serve.close()
    answered = answered_users(workdir / "load.msg")
    assert 300 <= len(answered) < users, (len(answered), serve.log()[-2000:])
    return answered


def register_request(user: str, call_id: str, *headers: str) -> str:
    """A REGISTER binding ``user``'s AOR in our domain (To names it; ``{me}`` in the Via is
    the sender's port, as :func:`sip_exchange` fills in)."""
    return request("REGISTER", f"sip:{DOMAIN}", call_id=call_id, headers=headers).replace(
        f"To: <sip:{DOMAIN}>", f"To: <sip:{user}@{DOMAIN}>")


def fetch_contacts(port: int, user: str) -> str:
    """A REGISTER without Contact (a fetch, RFC 3261 §10.2.3) for ``user``: the 200's text."""
    (reply,) = sip_exchange(port, register_request(user, "fetch-1"), full=True)
    assert reply.startswith("SIP/2.0 200"), reply
    return reply


def register(workdir: Path, name: str, serve_port: int, user: str, contact_port: int,
             *extra: str, scenario: str = "register.xml", host: str = HOST,
             contact_host: str | None = None) -> subprocess.Popen[str]:
    return sipp(scenario, workdir, name, f"{HOST}:{serve_port}", "-p", str(free_port(host)),
                "-m", "1", "-s", user, "-key", "domain", DOMAIN, "-key", "contact_host",
                contact_host or host, "-key", "contact_port", str(contact_port),
                "-key", "expires", "3600", *extra, timeout=10, host=host)


def start_uas(workdir: Path, name: str, port: int, calls: int, *extra: str,
              host: str = HOST, timeout: float = 40) -> subprocess.Popen[str]:
    return sipp("uas_rr.xml", workdir, name, "-p", str(port), "-m", str(calls), *extra,
                background=True, timeout=timeout, host=host)


def run_uac(workdir: Path, name: str, serve_port: int, user: str,
            calls: int = CALLS, *extra: str, host: str = HOST, rate: float = 10,
            timeout: float = 30, background: bool = False) -> subprocess.Popen[str]:
    return sipp("uac_rr.xml", workdir, name, f"{HOST}:{serve_port}", "-p", str(free_port(host)),
                "-m", str(calls), "-r", f"{rate:g}", "-s", user, "-key", "domain", DOMAIN,
                "-key", "caller", "caller", *extra, timeout=timeout, host=host,
                background=background)


def sip_exchange(port: int, message: str, *, want_final: bool = True,
                 timeout: float = 5.0, full: bool = False) -> list[str]:
    """Send one request over UDP from a fresh socket, retransmitted every 0.5 s until a
    response comes (as Timer A/E would: a datagram can be lost); return the status lines
    received until a final response (or the timeout); ``full``: the whole responses."""
    lines: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        me = s.getsockname()[1]
        s.settimeout(0.5)
        data = message.replace("{me}", str(me)).encode()
        s.sendto(data, (HOST, port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                reply = s.recv(65535)
            except OSError:
                if not lines:
                    s.sendto(data, (HOST, port))
                continue
            first = reply.split(b"\r\n", 1)[0].decode()
            lines.append(reply.decode(errors="replace") if full else first)
            if want_final and first.startswith("SIP/2.0 ") and int(first.split()[1]) >= 200:
                break
    return lines


_COMPACT = {"via": "v", "contact": "m", "call-id": "i", "from": "f", "to": "t",
            "content-length": "l", "content-type": "c", "supported": "k"}


def header_values(message: str, name: str) -> list[str]:
    """The values of header ``name`` (or its compact form) in a message's text, in order; one
    per header line (a line with several comma-separated values stays one)."""
    wanted = {name.lower(), _COMPACT.get(name.lower(), name.lower())}
    values = []
    for line in message.split("\r\n\r\n", 1)[0].split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() in wanted:
            values.append(value.strip())
    return values


def request(method: str, uri: str, *, call_id: str, headers: Sequence[str] = (),
            omit: Sequence[str] = ()) -> str:
    base = {
        "Via": f"SIP/2.0/UDP {HOST}:{{me}};branch=z9hG4bK-{call_id}",
        "Max-Forwards": "70",
        "From": f"<sip:tester@{DOMAIN}>;tag=t-{call_id}",
        "To": f"<{uri}>",
        "Call-ID": f"{call_id}@{HOST}",
        "CSeq": f"1 {method}",
    }
    text = f"{method} {uri} SIP/2.0\r\n"
    text += "".join(f"{k}: {v}\r\n" for k, v in base.items() if k not in omit)
    text += "".join(f"{h}\r\n" for h in headers)
    return text + "Content-Length: 0\r\n\r\n"


def final_status(lines: list[str]) -> int | None:
    for line in reversed(lines):
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "SIP/2.0" and int(parts[1]) >= 200:
            return int(parts[1])
    return None



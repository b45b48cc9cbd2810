"""A throwaway PostgreSQL server for tests and benchmarks.

``with postgres_cluster(tmp) as pg:`` gives a :class:`PgServer` (``pg.create_database()``,
``pg.psql()``, ``pg.restart()``); ``with postgres_server(tmp) as url:`` just the URL of a fresh
database on one (what a benchmark needs).

``initdb`` a new cluster in a temporary directory, start it listening on 127.0.0.1 only (on a
free port, its Unix socket in that directory too), stop it (``pg_ctl stop -m fast``) and delete
it at the end.  TCP connections need the password (scram-sha-256), so the tests' URLs carry one
the way a deployment's would.  PostgreSQL refuses to run as root: under root the server runs as
the ``postgres`` system user (which the package creates), in a directory of ``/tmp`` that user
can reach.  Without PostgreSQL, or without a user to run it as, the tests skip and say why
(outside a test: :class:`PgUnavailable`).

A test module wraps it in its own fixture::

    @pytest.fixture(scope="module")
    def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgServer]:
        with postgres_cluster(tmp_path_factory.mktemp("pg")) as server:
            yield server
"""

from __future__ import annotations

import glob
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import WINDOWS, free_port

if not WINDOWS:
    import pwd  # (not on Windows, where the tests skip: see postgres_cluster)

HOST = "127.0.0.1"
USER = "fastsip"
PASSWORD = "pg-s3cret-pw"
INSTALL_HINT = "PostgreSQL is not installed (.ci/system-deps installs it)"


class PgUnavailable(RuntimeError):
    """This machine cannot run a throwaway PostgreSQL server (the message says why)."""


_TOOLS = ("initdb", "pg_ctl", "postgres", "psql", "createdb")


def _version(postgres: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/15/bin/postgres -> (15,)
    return tuple(int(n) for n in Path(postgres).parts[-3].split(".") if n.isdigit())


def find_bin() -> Path | None:
    """The directory with initdb, pg_ctl, postgres, psql and createdb: pg_ctl's on PATH, else
    Debian's /usr/lib/postgresql/VERSION/bin (the newest)."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).resolve().parent] if on_path else []
    candidates += [Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                                                  key=_version, reverse=True)]
    return next((d for d in candidates if all((d / t).exists() for t in _TOOLS)), None)


class PgServer:
    """A running throwaway cluster; the superuser is ``fastsip`` with password ``PASSWORD``."""

    def __init__(self, bindir: Path, home: Path, runas: Sequence[str]) -> None:
        self.bindir = bindir
        self.home = home
        self.data = home / "data"
        self.log_path = home / "server.log"
        self.runas = list(runas)
        self.host = HOST
        self.port = 0
        self.user = USER
        self.password = PASSWORD
        self._names = itertools.count(1)

    def url(self, dbname: str = "postgres", *, password: str | None = PASSWORD,
            scheme: str = "postgresql") -> str:
        auth = f"{self.user}:{password}" if password is not None else self.user
        return f"{scheme}://{auth}@{self.host}:{self.port}/{dbname}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL (with the password)."""
        name = name or f"t{next(self._names)}"
        self._client("createdb", name)
        return self.url(name)

    def psql(self, dbname: str, sql: str) -> str:
        """Run ``sql`` (psql -At: unaligned, tuples only) and return what it printed."""
        return self._client("psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-d", dbname,
                            "-c", sql)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- the server process ------------------------------------------------------------------

    def initdb(self) -> None:
        pwfile = self.home / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        self._chown(pwfile)
        self._run(["initdb", "-D", str(self.data), "-U", USER, "-E", "UTF8", "--no-locale",
                   "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                   "--no-sync"], timeout=120)
        pwfile.unlink()

    def start(self) -> None:
        """Start (again, on the same port if it had one), waiting until it accepts
        connections (pg_ctl -w, bounded by -t)."""
        for attempt in range(3):
            port = self.port or free_port()
            options = (f"-c listen_addresses={HOST} -p {port} -k {self.home}"
                       " -c max_connections=40 -c shared_buffers=16MB")
            try:
                self._run(["pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path),
                           "-w", "-t", "30", "-o", options], timeout=60)
            except AssertionError:
                # Someone took the port between free_port() and the bind: another one.
                if self.port or attempt == 2 or "could not bind" not in self.log():
                    raise
                continue
            self.port = port
            return

    def stop(self, mode: str = "fast") -> None:
        self._run(["pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "30"],
                  timeout=60)

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    # -- helpers -----------------------------------------------------------------------------

    def _run(self, argv: Sequence[str], timeout: float) -> str:
        argv = [str(self.bindir / argv[0]), *argv[1:]]
        proc = subprocess.run([*self.runas, *argv], cwd=self.home, capture_output=True,
                              text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): "
                                 f"{proc.stdout}{proc.stderr}\n{self.log()[-2000:]}")
        return proc.stdout

    def _client(self, tool: str, *args: str) -> str:
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        proc = subprocess.run([str(self.bindir / tool), "-h", HOST, "-p", str(self.port),
                               "-U", USER, *args], capture_output=True, text=True, timeout=60,
                              check=False, env=env, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(path, entry.pw_uid, entry.pw_gid)


def _run_as_postgres() -> list[str] | None:
    """The command prefix that runs a program as the ``postgres`` user, or None."""
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return None
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    if shutil.which("setpriv"):
        entry = pwd.getpwnam("postgres")
        return ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                "--init-groups", "--"]
    return None


@contextmanager
def postgres_cluster(workdir: Path, *, skip: bool = True) -> Iterator[PgServer]:
    """A fresh cluster, started; stopped and deleted on exit.  When PostgreSQL (or a non-root
    user to run it as) is missing: skips the calling test, or with ``skip=False`` raises
    :class:`PgUnavailable`."""
    def unavailable(reason: str) -> PgUnavailable:
        if skip:
            pytest.skip(reason)
        return PgUnavailable(reason)

    if WINDOWS:
        # The helper runs the server POSIX-style: its Unix socket in the cluster directory
        # (-k), runuser/setpriv to a 'postgres' user under root, tools without '.exe'.
        raise unavailable("POSIX only: the throwaway PostgreSQL cluster helper needs a Unix "
                          "socket directory and POSIX users")
    bindir = find_bin()
    if bindir is None:
        raise unavailable(INSTALL_HINT)
    runas: list[str] = []
    own_home = False
    if os.geteuid() == 0:
        prefix = _run_as_postgres()
        if prefix is None:
            raise unavailable("PostgreSQL refuses to run as root and there is no 'postgres' "
                              "user (or runuser/setpriv) to run it as")
        runas = prefix
        # pytest's temporary directories are private to root: postgres could not enter them.
        home = Path(tempfile.mkdtemp(prefix="fastsip-pg-"))
        own_home = True
    else:
        home = workdir / "pg"
        home.mkdir(parents=True)
    server = PgServer(bindir, home, runas)
    try:
        server._chown(home)
        server.initdb()
        server.start()
        yield server
    finally:
        try:
            if server.running():
                try:
                    server.stop("fast")
                except (AssertionError, subprocess.TimeoutExpired):
                    server.stop("immediate")
        finally:
            if own_home:
                shutil.rmtree(home, ignore_errors=True)


@contextmanager
def postgres_server(workdir: Path) -> Iterator[str]:
    """The URL (with its password) of a new database on a throwaway server, for a benchmark
    or a script: raises :class:`PgUnavailable` where there is no PostgreSQL to run."""
    with postgres_cluster(workdir, skip=False) as server:
        yield server.create_database("fastsip")

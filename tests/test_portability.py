"""The test workflow runs this suite on Windows too (.github/workflows/test.yml: windows-latest,
every supported CPython).  Nobody runs it there by hand, so this guard, which runs everywhere,
reads the test tree and fails when a test uses a POSIX-only API (SIGKILL, SIGHUP, os.kill,
send_signal, /proc, unshare, AF_UNIX, fcntl, pwd, add_signal_handler, preexec_fn, chmod, ...)
without a Windows skip: a ``posix_only(...)`` (tests/procutil.py) or another platform skipif on
the test, its class or the module (``pytestmark``), a platform check in its body, or a
``Serve(...)`` (serveutil's Serve skips on Windows: its clean stop is SIGTERM).  A helper
function is covered when every test (or fixture user) in its module that calls it is.  Helper
modules, which hold no tests, are listed in :data:`HELPER_MODULES` with the reason each use is
safe; an entry no longer needed fails too, so the list stays true."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Names (attributes or bare) that Windows lacks, or that do something else there.
POSIX_NAMES = {
    **dict.fromkeys(("SIGKILL", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGSTOP", "SIGCONT", "SIGQUIT",
                     "SIGALRM", "SIGCHLD", "SIGPIPE", "SIGWINCH"), "a signal Windows lacks"),
    "AF_UNIX": "Unix sockets",
    "SOCK_SEQPACKET": "SOCK_SEQPACKET",
    "SO_REUSEPORT": "SO_REUSEPORT (Linux's load spreading)",
    "add_signal_handler": "asyncio's Windows loops have no add_signal_handler",
    "send_signal": "on Windows only SIGTERM (= TerminateProcess, a kill) and console events",
    "chmod": "Windows has no group/other mode bits (st_mode mirrors the read-only flag)",
}
#: os.X that Windows lacks (os.kill: there TerminateProcess for any signal but the console
#: events).
POSIX_OS_CALLS = {
    "kill": "TerminateProcess on Windows",
    **dict.fromkeys(("getuid", "geteuid", "getgid", "getegid", "fork", "setsid", "killpg",
                     "nice", "setpgrp", "getpgid"), "not on Windows"),
}
POSIX_MODULES = {"fcntl", "pwd", "grp", "resource", "termios", "pty", "posix", "syslog"}
POSIX_KEYWORDS = {"preexec_fn": "preexec_fn raises ValueError on Windows"}
#: In string constants (not docstrings): paths and programs only POSIX systems have.
POSIX_STRINGS = {"/proc/": "/proc", "/dev/null": "/dev/null (os.devnull is portable)",
                 "unshare": "unshare (Linux namespaces)"}

#: What makes code skip on Windows: these in a decorator, pytestmark or a body.
GUARD = re.compile(r"\bposix_only\b|win32|\bWINDOWS\b|sys\.platform|\breuse_port_supported\b"
                   r"|\bnetns_unavailable\b|\bUNAVAILABLE\b")
#: serveutil.Serve skips on Windows before it starts anything.
SERVE = re.compile(r"\bServe\(")

#: Helper modules (no tests of their own) that use POSIX-only APIs, and why that is safe.
HELPER_MODULES = {
    "fuzzserve.py": "only under test_serve_fuzz.py, which skips unless Linux network "
                    "namespaces work (netns_unavailable); fcntl is imported inside the Linux path",
    "pgutil.py": "postgres_cluster skips on Windows before using pwd or geteuid",
    "serveutil.py": "Serve skips on Windows; stop() and register_load_killed run only on a "
                    "Serve (SIGKILL/SIGTERM to serve and sipp)",
    "procutil.py": "defines posix_only and the reasons (mentions only)",
}

#: Single uses in test modules that are safe on Windows as they are: (module, enclosing
#: function or None for module level, what) -> why.
ALLOWED = {
    ("test_serve_trunk.py", "_credentials", "chmod"):
        "chmod 600 only quiets the mode warning on POSIX; harmless on Windows, where fastsip "
        "does not check modes",
    ("test_timers_stress.py", None, "'/proc/'"):
        "the measuring script's /proc read runs only from test_memory_per_pending_timer",
    ("test_timers_stress.py", "test_memory_per_pending_timer", "'/proc/'"):
        "skips where /proc/self/statm does not exist",
}


@dataclass(frozen=True)
class Use:
    """One POSIX-only use: where, what, why it breaks on Windows."""

    module: str
    line: int
    what: str
    why: str
    function: str | None


def _uses(tree: ast.AST, module: str) -> list[tuple[int, str, str]]:
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    found: list[tuple[int, str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in POSIX_NAMES:
                found.append((node.lineno, node.attr, POSIX_NAMES[node.attr]))
            elif (node.attr in POSIX_OS_CALLS and isinstance(node.value, ast.Name)
                  and node.value.id == "os"):
                found.append((node.lineno, f"os.{node.attr}", POSIX_OS_CALLS[node.attr]))
        elif isinstance(node, ast.Name) and node.id in POSIX_NAMES:
            found.append((node.lineno, node.id, POSIX_NAMES[node.id]))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            for name in names:
                if name.split(".")[0] in POSIX_MODULES:
                    found.append((node.lineno, f"import {name}", "a POSIX-only module"))
        elif isinstance(node, ast.keyword) and node.arg in POSIX_KEYWORDS:
            found.append((node.value.lineno, node.arg, POSIX_KEYWORDS[node.arg]))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings):
            for needle, why in POSIX_STRINGS.items():
                if needle in node.value:
                    found.append((node.lineno, repr(needle), why))
    return found


def unguarded(source: str, module: str) -> list[Use]:
    """The POSIX-only uses in a test module's ``source`` that nothing skips on Windows."""
    tree = ast.parse(source)
    # Top-level functions and the methods of top-level classes (with the class's decorators).
    functions: dict[str, tuple[ast.FunctionDef | ast.AsyncFunctionDef, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions[node.name] = (node, "")
        elif isinstance(node, ast.ClassDef):
            marks = " ".join(ast.get_source_segment(source, d) or "" for d in node.decorator_list)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    functions[f"{node.name}.{item.name}"] = (item, marks)
    module_guard = any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets)
        and GUARD.search(ast.get_source_segment(source, node) or "")
        for node in tree.body)

    def own_guard(name: str) -> bool:
        node, class_marks = functions[name]
        decorators = " ".join(ast.get_source_segment(source, d) or ""
                              for d in node.decorator_list)
        body = ast.get_source_segment(source, node) or ""
        return bool(GUARD.search(decorators + " " + class_marks) or GUARD.search(body)
                    or SERVE.search(body))

    def users(name: str) -> list[str]:
        short = name.rsplit(".", 1)[-1]
        out = []
        for other, (node, _) in functions.items():
            if other == name:
                continue
            params = {a.arg for a in node.args.args}
            called = any(isinstance(n, ast.Name | ast.Attribute)
                         and (getattr(n, "id", None) == short or getattr(n, "attr", None) == short)
                         for n in ast.walk(node))
            if short in params or called:
                out.append(other)
        return out

    def guarded(name: str, seen: frozenset[str] = frozenset()) -> bool:
        if own_guard(name):
            return True
        if name.rsplit(".", 1)[-1].startswith("test"):
            return False
        callers = [u for u in users(name) if u not in seen]
        return bool(callers) and all(guarded(u, seen | {name}) for u in callers)

    def enclosing(line: int) -> str | None:
        for name, (node, _) in functions.items():
            if node.lineno <= line <= (node.end_lineno or node.lineno):
                return name
        return None

    result = []
    for line, what, why in _uses(tree, module):
        function = enclosing(line)
        if module_guard or (function is not None and guarded(function)):
            continue
        if (module, function, what) in ALLOWED:
            continue
        result.append(Use(module, line, what, why, function))
    return sorted(set(result), key=lambda u: u.line)


def _modules() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)


def test_every_posix_only_use_in_a_test_skips_on_windows() -> None:
    problems = []
    for path in _modules():
        if path.name in HELPER_MODULES or not path.name.startswith("test_"):
            continue
        for use in unguarded(path.read_text(encoding="utf-8"), path.name):
            problems.append(f"{use.module}:{use.line}: {use.what} in {use.function or 'module'}"
                            f" ({use.why})")
    assert not problems, (
        "POSIX-only APIs in tests that do not skip on Windows; mark them with "
        "procutil.posix_only('<what Windows lacks>') or make them portable:\n"
        + "\n".join(problems))


def test_helper_modules_are_listed_with_a_reason_and_only_while_needed() -> None:
    unlisted, stale = [], []
    for path in _modules():
        if path.name.startswith("test_"):
            continue
        uses = _uses(ast.parse(path.read_text(encoding="utf-8")), path.name)
        if uses and path.name not in HELPER_MODULES:
            unlisted.append(f"{path.name}:{uses[0][0]}: {uses[0][1]} ({uses[0][2]})")
        elif not uses and path.name in HELPER_MODULES and path.name != "procutil.py":
            stale.append(path.name)
    assert not unlisted, ("helper modules using POSIX-only APIs: add them to HELPER_MODULES "
                          "with why Windows never reaches that code:\n" + "\n".join(unlisted))
    assert not stale, f"HELPER_MODULES entries no longer needed: {stale}"


# -- the guard can fail ---------------------------------------------------------------------

_UNGUARDED = '''
import os, signal, subprocess

def helper(proc):
    proc.send_signal(signal.SIGHUP)

def test_kills():
    os.kill(1, signal.SIGKILL)

def test_uses_helper():
    helper(None)

def test_reads_proc():
    open("/proc/self/status")
'''

_GUARDED = '''
"""Mentions SIGKILL and /proc/ in a docstring only."""
import os, signal, sys
import pytest
from procutil import posix_only

def helper(proc):
    proc.send_signal(signal.SIGHUP)

@posix_only("SIGKILL")
def test_kills():
    os.kill(1, signal.SIGKILL)

@posix_only("SIGHUP")
def test_uses_helper():
    helper(None)

@pytest.mark.skipif(sys.platform != "linux", reason="/proc")
def test_reads_proc():
    open("/proc/self/status")

def test_on_serve(tmp_path):
    serve = Serve(tmp_path, 5060)
    serve.proc.send_signal(signal.SIGTERM)

def test_portable(tmp_path):
    proc.kill()
'''


def test_the_guard_flags_unguarded_uses_and_accepts_skips() -> None:
    found = {(u.what, u.function) for u in unguarded(_UNGUARDED, "m.py")}
    assert found == {("send_signal", "helper"), ("SIGHUP", "helper"), ("os.kill", "test_kills"),
                     ("SIGKILL", "test_kills"), ("'/proc/'", "test_reads_proc")}, found
    assert unguarded(_GUARDED, "m.py") == []
    module_marked = "import pytest, sys\npytestmark = pytest.mark.skipif(sys.platform == 'win32'," \
                    " reason='x')\n" + _UNGUARDED
    assert unguarded(module_marked, "m.py") == []

"""``fastsip serve --config fastsip.toml``: every option of ``serve`` in a ``[serve]`` table, and
the reload of what can change while serving (``SIGHUP``).

The keys are serve's long options with ``_`` for ``-`` (``--auth-users`` is ``auth_users``),
derived from serve's argparse parser (:func:`options`), so an option added to the parser is
a key at once.  Each value goes through the option's own ``type=`` converter and ``choices``,
so the file is checked exactly as the command line is; an option given on the command line
wins over the file.  Repeatable options (``--listen``, ``--domain`` ...) take a TOML array
(a single string is one element); flags take ``true``/``false``.  A relative path in the file
(options whose metavar says FILE, PATH or DIR, and ``db = "sqlite:PATH"``) is relative to the
file's directory, not to wherever serve was started.

Errors are :class:`ConfigError`: one line with the file, the line and the key.

On ``SIGHUP`` serve re-reads the file (:meth:`ServeSettings.reread`) and swaps in what
:data:`RELOADABLE` names (:class:`LiveReload`); the other options need a restart, and a
change to one of them is logged as such.  See ``docs/config.md``.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastsip.errors import FastSIPError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    # (tomli has types; this is for a checker run where it is not installed)
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

if TYPE_CHECKING:
    from fastsip.app.routes import Routes

__all__ = ["RELOADABLE", "SECTION", "ConfigError", "LiveReload", "Option", "ServeSettings",
           "add_option", "explicit_options", "load", "options"]

log = logging.getLogger("fastsip.app.config")

#: The table serve reads.
SECTION = "serve"

#: The options a reload applies while serving (by key).  The rest are fixed at start: the
#: sockets, processes and stores they describe cannot change under calls in progress.
RELOADABLE = frozenset({"routes", "auth_users", "trusted", "alias", "log_level"})

#: Options that are not keys: the file itself.
_NOT_KEYS = frozenset({"config"})


class ConfigError(FastSIPError, ValueError):
    """A config file that cannot be used: ``path``, ``line`` (1-based, 0 when unknown) and the
    ``key`` it is about ("" for the file as a whole)."""

    def __init__(self, message: str, path: str | Path, line: int = 0, key: str = "") -> None:
        where = f"{path}:{line}" if line else str(path)
        super().__init__(f"{where}: {key + ': ' if key else ''}{message}")
        self.path = str(path)
        self.line = line
        self.key = key


class Option:
    """One long option of the parser as a config key."""

    __slots__ = ("action", "dest", "key")

    def __init__(self, key: str, action: argparse.Action) -> None:
        self.key = key
        self.action = action
        self.dest = action.dest

    @property
    def repeatable(self) -> bool:
        return isinstance(self.action, argparse._AppendAction)

    @property
    def flag(self) -> bool:
        """A flag without a value (``store_true`` and its kind): ``true``/``false`` in TOML."""
        return self.action.nargs == 0

    @property
    def is_path(self) -> bool:
        metavar = self.action.metavar
        return isinstance(metavar, str) and any(w in metavar for w in ("FILE", "PATH", "DIR"))

    @property
    def default(self) -> Any:
        """What the option is when neither the command line nor the file gives it."""
        default = self.action.default
        if isinstance(default, str) and self.action.type is not None and \
                callable(self.action.type):
            return self.action.type(default)  # (argparse converts string defaults too)
        return default

    def __repr__(self) -> str:
        return f"Option({self.key!r})"


def options(parser: argparse.ArgumentParser) -> dict[str, Option]:
    """The config keys of ``parser``: every long option but help, ``--config`` and the ones
    hidden from ``--help`` (internal: ``--worker-index``, ``--worker-dir`` ...)."""
    out: dict[str, Option] = {}
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        long = [s for s in action.option_strings if s.startswith("--")]
        if not long:
            continue
        key = long[0][2:].replace("-", "_")
        if key not in _NOT_KEYS:
            out[key] = Option(key, action)
    return out


# -- reading a file ----------------------------------------------------------------------------

_TABLE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")


def _key_line(text: str, key: str, table: str | None = SECTION) -> int:
    """The line of ``key =`` inside ``[table]`` (None: at the top level) -- tomllib keeps no
    positions -- or 0."""
    pattern = re.compile(rf"""^\s*(?:{re.escape(key)}|"{re.escape(key)}"|'{re.escape(key)}')"""
                         r"\s*=")
    current: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _TABLE.match(line)
        if header is not None:
            current = header.group(1).strip().strip("\"'")
            continue
        if current == table and pattern.match(line):
            return number
    return 0


def _table_line(text: str, table: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        header = _TABLE.match(line)
        if header is not None and header.group(1).strip().strip("\"'").split(".")[0] == table:
            return number
    return _key_line(text, table, None)


def _hint(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word.replace("-", "_"), list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _syntax_error(path: Path, text: str, exc: tomllib.TOMLDecodeError) -> ConfigError:
    """The parser's error as one line with the file and line (tomllib puts them at the end of
    its message: "(at line 3, column 9)", "(at end of document)")."""
    message = str(exc)
    found = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if found:
        line = int(found.group(1))
        message = message[:found.start()] + f" (column {found.group(2)})"
    elif message.endswith("(at end of document)"):
        line = text.count("\n") + 1
        message = message.removesuffix(" (at end of document)") + " (at the end of the file)"
    else:
        line = int(getattr(exc, "lineno", 0) or 0)
    return ConfigError(f"TOML syntax error: {message}", path, line)


def load(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Read the ``[serve]`` table of ``path``: option dest -> value, converted and checked as
    the command line would be.  Raises :class:`ConfigError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read the config file: {reason}", path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _syntax_error(path, text, exc) from None
    for name in data:
        if name != SECTION:
            raise ConfigError(f"unknown table or key {name!r}: the options go in a "
                              f"[{SECTION}] table{_hint(name, [SECTION])}", path,
                              _table_line(text, name))
    table = data.get(SECTION, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{SECTION!r} must be a table ([{SECTION}])", path,
                          _key_line(text, SECTION, None))
    known = options(parser)
    base = path.resolve().parent
    values: dict[str, Any] = {}
    for key, value in table.items():
        option = known.get(key)
        line = _key_line(text, key)
        if option is None:
            raise ConfigError(f"unknown key{_hint(key, known)}", path, line, key)
        try:
            values[option.dest] = _convert(option, value, base)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc), path, line, key) from None
    return values


def _convert(option: Option, value: Any, base: Path) -> Any:
    """``value`` from TOML as the option's own converter makes it; TypeError (not a value of
    the option's kind) or ValueError (its converter refused it) says why not."""
    action = option.action
    if option.flag:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, not {value!r}")
        return action.const if value else option.default
    if option.repeatable:
        items = [value] if isinstance(value, (str, int, float)) and \
            not isinstance(value, bool) else value
        if not isinstance(items, list) or not items:
            raise TypeError(f"expected an array of values (as --{option.key.replace('_', '-')}"
                             f" repeated), not {value!r}")
        return [_scalar(option, item, base) for item in items]
    return _scalar(option, value, base)


def _scalar(option: Option, value: Any, base: Path) -> Any:
    action = option.action
    convert = action.type
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise TypeError(f"expected a {'string' if convert is None else 'value'}, "
                        f"not {value!r}")
    if convert is None and not isinstance(value, str):
        raise TypeError(f"expected a string, not {value!r} (quote it)")
    text = str(value)
    if option.is_path:
        text = _relative_to(text, base)
    elif option.dest == "db" and text.startswith("sqlite:") and not text.startswith("sqlite://"):
        text = "sqlite:" + _relative_to(text[len("sqlite:"):], base)
    result: Any = text
    if convert is not None and callable(convert):
        try:
            result = convert(text)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(str(exc)) from None
        except (TypeError, ValueError):
            name = getattr(convert, "__name__", "")
            raise ValueError(f"invalid {name + ' ' if name and name[0] != '_' else ''}value: "
                             f"{value!r}") from None
    if action.choices is not None and result not in action.choices:
        raise ValueError(f"{value!r} is not one of: "
                         f"{', '.join(map(str, action.choices))}")
    return result


def _relative_to(text: str, base: Path) -> str:
    expanded = os.path.expanduser(text)
    if not text or os.path.isabs(expanded):
        return expanded
    return str(base / expanded)


def add_option(parser: argparse.ArgumentParser) -> None:
    """Add ``--config FILE`` to serve's ``parser``."""
    parser.add_argument(
        "--config", metavar="FILE.toml",
        help=f"read options from the [{SECTION}] table of this TOML file (keys: the long "
             "options with _ for -, e.g. auth_users = \"users.txt\"; see "
             "examples/fastsip.toml); options on the command line win.  SIGHUP reads it "
             "again: routes, auth_users, trusted, alias and log_level change at once, calls "
             "in progress keep what they started with")


# -- the command line wins ---------------------------------------------------------------------


def explicit_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The dests of the options ``argv`` (serve's part of a command line) gives: parsed again
    with every default suppressed, what is left was given."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace, _ = parser.parse_known_args(list(argv), argparse.Namespace())
    finally:
        for action, default in saved:
            action.default = default
    dests = {action.dest for action, _ in saved}
    return {dest for dest in vars(namespace) if dest in dests}


class ServeSettings:
    """What serve runs with: the parser's options, the config file (``path``, None without
    one) and the options the command line gave (``given``: they win over the file, at start
    and at every reload).  ``current``: dest -> the value in use."""

    def __init__(self, parser: argparse.ArgumentParser, path: str | None,
                 given: Iterable[str], args: argparse.Namespace) -> None:
        self.options = options(parser)
        self.parser = parser
        self.path = path
        self.given = frozenset(given)
        self.current: dict[str, Any] = {
            o.dest: copy.copy(getattr(args, o.dest, o.default)) for o in self.options.values()}

    @classmethod
    def from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser,
                  argv: Sequence[str] | None) -> ServeSettings:
        """Apply ``args.config`` (if any) to ``args``, under what ``argv`` (the whole command
        line, ``serve`` included; None: unknown) gives.  Raises :class:`ConfigError`."""
        path = getattr(args, "config", None)
        opts = options(parser)
        if argv is not None and "serve" in argv:
            given = explicit_options(parser, list(argv)[list(argv).index("serve") + 1:])
        else:  # called without a command line: what differs from the defaults was given
            given = {o.dest for o in opts.values()
                     if getattr(args, o.dest, o.default) != o.default}
        if path:
            for dest, value in load(path, parser).items():
                if dest not in given:
                    setattr(args, dest, value)
        return cls(parser, path, given, args)

    def reread(self) -> dict[str, Any]:
        """The options as a start now would make them (dest -> value): the command line's,
        else the file's, else the defaults.  Raises :class:`ConfigError`."""
        from_file = load(self.path, self.parser) if self.path else {}
        out: dict[str, Any] = {}
        for option in self.options.values():
            dest = option.dest
            if dest in self.given or not self.path:
                out[dest] = self.current[dest]
            else:
                out[dest] = from_file.get(dest, option.default)
        return out

    def changed(self, new: dict[str, Any]) -> list[Option]:
        """The options whose value in ``new`` differs from the one in use."""
        return [o for o in self.options.values() if new.get(o.dest) != self.current[o.dest]]


# -- SIGHUP: swapping what can change ----------------------------------------------------------


class _Prepared:
    """A reload read and checked in full, not yet applied."""

    __slots__ = ("credentials", "restart", "routes", "trusted", "values")

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.routes: Routes | None = None
        self.credentials: Any = None
        self.trusted: Any = None
        self.restart: list[str] = []


class LiveReload:
    """Re-reads the configuration and swaps the reloadable parts into a running serve.

    Two steps, so a bad file changes nothing: :meth:`prepare` reads everything (the config
    file, the routes module, the credentials file) and raises :class:`ConfigError` on the
    first problem -- it blocks, so the shell runs it off the loop -- and :meth:`apply`, on the
    loop, swaps in the new objects at once.  Requests already in flight keep the Router (the
    routes module, the authenticator) they started with: :class:`fastsip.app.serve.ServeRouter`
    sends a request's failure and response hooks to the Router that took it.

    ``make_router(routes, authenticator)`` builds a Router as serve did at start;
    ``make_authenticator(credentials)`` a new authenticator (when authentication was off);
    ``use_router(router)`` puts one in front of new requests; ``routes_error(path, exc)``
    says in a line why a routes module cannot be loaded.
    """

    def __init__(self, settings: ServeSettings, *, proxy: Any, router: Any, guard: Any,
                 layer: Any, make_router: Callable[[Routes | None, Any], Any],
                 make_authenticator: Callable[[Any], Any],
                 use_router: Callable[[Any], None],
                 routes_error: Callable[[str, BaseException], str]) -> None:
        self.settings = settings
        self.proxy = proxy
        self.router = router
        self.guard = guard
        self.layer = layer
        self.make_router = make_router
        self.make_authenticator = make_authenticator
        self.use_router = use_router
        self.routes_error = routes_error
        #: Reloads applied / refused (logs, tests).
        self.applied = 0
        self.failed = 0

    def prepare(self) -> _Prepared:
        """Read and check everything a reload needs (blocking I/O: files, an import)."""
        from fastsip.proxy.edge import TrustedNetworks

        settings = self.settings
        prepared = _Prepared(settings.reread())
        values = prepared.values
        prepared.restart = [o.key for o in settings.changed(values) if o.key not in RELOADABLE]
        routes_path = values.get("routes")
        if routes_path:
            prepared.routes = _load_routes(routes_path, self.routes_error)
        users = values.get("auth_users")
        if users:
            from fastsip.proxy.auth import Credentials

            try:
                prepared.credentials = Credentials.from_file(users)
            except (OSError, ValueError) as exc:
                raise ConfigError(str(exc), users, key="auth_users") from None
        try:
            prepared.trusted = TrustedNetworks(values.get("trusted") or ())
        except ValueError as exc:
            raise ConfigError(str(exc), settings.path or "--trusted", key="trusted") from None
        return prepared

    def apply(self, prepared: _Prepared) -> str:
        """Swap in what :meth:`prepare` read; returns the summary that was logged."""
        values = prepared.values
        settings = self.settings
        old = self.router
        authenticator = old.authenticator
        if prepared.credentials is None:
            if authenticator is not None:
                log.warning("reload: auth_users removed: requests are no longer "
                            "authenticated")
            authenticator = None
        elif authenticator is None:
            authenticator = self.make_authenticator(prepared.credentials)
        else:
            # The same realm, algorithms and nonce secret: challenges in flight stay good.
            authenticator = copy.copy(authenticator)
            authenticator.credentials = prepared.credentials
        router = self.make_router(prepared.routes, authenticator)
        router.refusals = old.refusals          # one count for the stop summary
        # The trusted networks: the proxy's (the routing's too) and the guard's, one object.
        self.proxy.trusted = prepared.trusted
        self.guard.trusted = prepared.trusted
        # (the proxy's own rule for "is this host us", as its constructor applies it)
        from fastsip.proxy.base import canonical_host

        # (the running domains: a change to them takes a restart, the registrar has them)
        self.proxy.aliases = {canonical_host(a) for a in
                              [*(settings.current.get("domain") or ()),
                               *(values.get("alias") or ())]}
        level = values.get("log_level")
        if isinstance(level, str):
            logging.getLogger().setLevel(getattr(logging, level.upper()))
        # attach() again: the proxy forgets what it cached about its own hosts (the aliases)
        # and the new router learns its proxy.
        self.router = router
        self.use_router(router)
        self.proxy.attach(self.layer)
        for key in RELOADABLE:
            option = settings.options.get(key)
            if option is not None:
                settings.current[option.dest] = copy.copy(values[option.dest])
        self.applied += 1
        if prepared.restart:
            log.warning("reload: %s changed in %s: that takes a restart (still running with "
                        "the old value%s)", ", ".join(prepared.restart), settings.path,
                        "s" if len(prepared.restart) > 1 else "")
        summary = (f"routes={values.get('routes') or 'default'} "
                   f"auth={'off' if authenticator is None else len(authenticator.credentials)}"
                   f"{' users' if authenticator is not None else ''} "
                   f"trusted={','.join(str(n) for n in prepared.trusted.networks) or '-'} "
                   f"aliases={','.join(values.get('alias') or ()) or '-'} "
                   f"log_level={level}")
        log.info("reloaded %s", summary)
        return summary


def _load_routes(path: str, describe: Callable[[str, BaseException], str]) -> Routes:
    """Import the routes module at ``path`` again.  On failure the module registered under
    its name stays the one in use (dataclasses and pickling look it up by name)."""
    from fastsip.app.routes import load_routes

    name = f"fastsip_routes_{Path(path).stem}"
    previous = sys.modules.get(name)
    try:
        return load_routes(path)
    except Exception as exc:  # noqa: BLE001 - any error in the user's module: keep the old
        if previous is not None:
            sys.modules[name] = previous
        raise ConfigError(describe(path, exc).removeprefix(
            f"cannot load routes from {path}: "), path, key="routes") from None

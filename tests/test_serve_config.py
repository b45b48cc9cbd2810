"""``fastsip serve --config FILE`` (``docs/config.md``), with serve as a real process.

- A bad file stops serve before it starts: exit status 2, one line naming the file, the line
  and the key, no traceback -- for a bad value (checked by the option's own converter), an
  unknown key or table (with a "did you mean"), a TOML syntax error, a wrong kind of value.
- The command line wins over the file (a repeatable option too: the file's list is replaced,
  not extended); what the CLI reads before serve runs (--loop, --log-level) comes from the
  file too; relative paths in the file are relative to its directory.
- ``examples/fastsip.toml`` loads, serve starts with it, and it documents every option the
  parser has (so an option added to serve without an entry there fails here).
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import fastsip_env, free_port
from serveutil import DOMAIN, HOST, Serve, final_status, request, sip_exchange

from fastsip.app.config import ConfigError, load, options
from fastsip.app.serve import add_parser

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastsip.toml"


def serve_parser() -> argparse.ArgumentParser:
    return add_parser(argparse.ArgumentParser().add_subparsers())


def start_failing(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastsip.cli", "serve", *args], check=False,
                          cwd=workdir,
                          env=fastsip_env(), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


# -- errors ------------------------------------------------------------------------------------

BAD_FILES = [
    # (the file after "[serve]\n", what the one error line says after "FILE:")
    ('domain = ["example.com"]\ngrace = -1\n', "3: grace: must be >= 0: -1"),
    ('max_transactions = "many"\n', "2: max_transactions: invalid value: 'many'"),
    ('workers = 0\n', "2: workers: must be > 0: 0"),
    ('\n\nlisen = ["udp:127.0.0.1:5060"]\n', "4: lisen: unknown key (did you mean 'listen'?)"),
    ('auth-users = "u.txt"\n', "2: auth-users: unknown key (did you mean 'auth_users'?)"),
    ('log_level = "loud"\n', "2: log_level: 'loud' is not one of: debug, info, warning, error"),
    ('auth_algorithm = ["MD5", "SHA-1"]\n', "2: auth_algorithm: 'SHA-1' is not one of"),
    ('tls_verify_client = "yes"\n', "2: tls_verify_client: expected true or false"),
    ('routes = 5\n', "2: routes: expected a string, not 5"),
    ('grace = true\n', "2: grace: expected a value, not True"),
    ('listen = [udp]\n', "2: TOML syntax error: Invalid value"),
    ('domain = ["a",\n\n"b"\n', "5: TOML syntax error"),
    ('config = "other.toml"\n', "2: config: unknown key"),
    ('worker_index = 1\n', "2: worker_index: unknown key"),
]


@pytest.mark.parametrize(("body", "expected"), BAD_FILES,
                         ids=[b.split("=")[0].strip() or "syntax" for b, _ in BAD_FILES])
def test_bad_file_names_key_and_line(tmp_path: Path, body: str, expected: str) -> None:
    config = tmp_path / "fastsip.toml"
    config.write_text("[serve]\n" + body)
    done = start_failing(tmp_path, "--config", str(config),
                         "--listen", f"udp:{HOST}:{free_port()}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"fastsip serve: {config}:{expected}"), lines[0]
    assert not done.stdout  # never said it was listening


def test_unknown_table_and_missing_file(tmp_path: Path) -> None:
    config = tmp_path / "fastsip.toml"
    config.write_text('# fastsip\n\n[serv]\nlisten = ["udp:127.0.0.1:5060"]\n')
    done = start_failing(tmp_path, "--config", str(config))
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"fastsip serve: {config}:3: unknown table or key 'serv': the options go in a "
        "[serve] table (did you mean 'serve'?)")
    done = start_failing(tmp_path, "--config", str(tmp_path / "nowhere.toml"))
    assert done.returncode == 2
    assert "nowhere.toml: cannot read the config file: No such file" in done.stderr
    assert "Traceback" not in done.stderr


# -- the command line wins; paths; what the CLI reads first -----------------------------------


def test_cli_overrides_the_file(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    # A routes module beside the file, named relatively: found from serve's cwd elsewhere.
    (conf_dir / "routes.py").write_text(
        "from fastsip.app import route\n\n\n@route\ndef initial(req):\n"
        "    if req.method == 'INVITE':\n"
        "        return req.reply(480, 'From The Config Dir')\n")
    file_port, cli_port = free_port(), free_port()
    config = conf_dir / "fastsip.toml"
    config.write_text(
        "[serve]\n"
        f'listen = ["udp:{HOST}:{file_port}"]\n'
        f'domain = ["{DOMAIN}"]\n'
        'routes = "routes.py"\n'
        'log_level = "warning"\n'
        'loop = "asyncio"\n'
        "max_expires = 7200\n")
    # --listen and --log-level on the command line; the rest from the file.
    serve = Serve(tmp_path, cli_port, "--config", str(config), "--log-level", "info",
                  listen=[f"udp:{HOST}:{cli_port}"])
    try:
        lines = sip_exchange(cli_port, request("INVITE", f"sip:bob@{DOMAIN}", call_id="o1"))
        assert final_status(lines) == 480 and "From The Config Dir" in lines[-1], lines
        # The file's listen was replaced, not added to: its port is free.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, file_port))
    finally:
        assert serve.close() == 0
    log = serve.log()
    assert " INFO " in log                              # --log-level info beat the file
    assert "event loop asyncio" in log                  # loop from the file, before the loop
    assert "expires=60..7200s" in log                   # the file's max_expires
    assert f"routes={conf_dir / 'routes.py'}" in log


# -- the example -------------------------------------------------------------------------------

_COMMENTED_KEY = re.compile(r"^# ([a-z_]+) = ")
_KEY = re.compile(r"^([a-z_]+) = ")


def test_example_loads_and_documents_every_option(tmp_path: Path) -> None:
    parser = serve_parser()
    keys = set(options(parser))
    assert {"listen", "domain", "auth_users", "routes", "log_level"} <= keys
    assert not {"worker_index", "worker_dir", "t1", "config", "help"} & keys
    # As it is: it loads.
    load(EXAMPLE, parser)
    text = EXAMPLE.read_text()
    lines = text.splitlines()
    active = {m.group(1) for line in lines if (m := _KEY.match(line))}
    commented = {m.group(1) for line in lines if (m := _COMMENTED_KEY.match(line))}
    assert not active & commented
    missing = keys - active - commented
    assert not missing, f"examples/fastsip.toml does not document: {sorted(missing)}"
    assert not (active | commented) - keys
    # Every key has its comment just above it.
    for number, line in enumerate(lines):
        if _KEY.match(line) or _COMMENTED_KEY.match(line):
            above = lines[number - 1]
            assert above.startswith("# ") and not _COMMENTED_KEY.match(above), line
    # Every value it shows is valid: uncommented, the whole file loads with every key.
    everything = tmp_path / "every.toml"
    everything.write_text("\n".join(line[2:] if _COMMENTED_KEY.match(line) else line
                                    for line in lines))
    values = load(everything, parser)
    assert {o.dest for o in options(parser).values()} == set(values)
    # Relative paths became relative to the file's directory.
    assert values["routes"] == str(tmp_path / "routes.py")


def test_serve_starts_from_the_example(tmp_path: Path) -> None:
    port = free_port()
    serve = Serve(tmp_path, port, "--config", str(EXAMPLE), listen=[f"udp:{HOST}:{port}"])
    try:
        lines = sip_exchange(port, request("OPTIONS", f"sip:{HOST}:{port}", call_id="ex1"))
        assert final_status(lines) == 200, lines
    finally:
        assert serve.close() == 0


def test_config_error_is_a_value_error() -> None:
    error = ConfigError("must be > 0: 0", "f.toml", 3, "workers")
    assert isinstance(error, ValueError)
    assert str(error) == "f.toml:3: workers: must be > 0: 0"


def test_explicit_options_are_what_the_command_line_gave() -> None:
    from fastsip.app.config import explicit_options

    parser = serve_parser()
    given = explicit_options(parser, ["--config", "f.toml", "--log-l", "debug",
                                      "--listen", "udp:127.0.0.1:5060", "--grace=5",
                                      "--tls-verify-client"])
    assert given == {"config", "log_level", "listen", "grace", "tls_verify_client"}
    # (the parser's defaults are back afterwards)
    assert parser.parse_args([]).grace == 5.0 and parser.parse_args([]).listen is None

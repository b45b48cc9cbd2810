"""Packaging hygiene: the license file matches the declared license, the sdist carries what its
tests need, and contrib/'s systemd unit is one systemd accepts, hardened.

The wheel's contents are checked by the wheels workflow (cibuildwheel); these checks need only
the checkout, so they are skipped when the tests run from an installed wheel's copy of tests/.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"

needs_checkout = pytest.mark.skipif(not (ROOT / "setup.py").exists() or not PYPROJECT.exists(),
                                    reason="needs the source checkout (or the unpacked sdist)")


@needs_checkout
def test_license_file_matches_the_declared_license() -> None:
    pyproject = PYPROJECT.read_text()
    assert re.search(r'^license = "BSD-2-Clause"$', pyproject, re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, re.MULTILINE)
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 2-Clause License")
    # the two clauses, and no third (the "no endorsement" clause would make it BSD-3-Clause)
    assert "1. Redistributions of source code" in text
    assert "2. Redistributions in binary form" in text
    assert "3." not in text


def _tracked(*patterns: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


@needs_checkout
@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None,
                    reason="lists the tracked files with git")
def test_sdist_carries_the_tests_their_data_and_the_license(tmp_path: Path) -> None:
    pytest.importorskip("build")
    # From a copy of the tracked files, as a fresh clone would have them: setuptools also adds
    # whatever an old fastsip.egg-info/SOURCES.txt in the checkout lists, which would hide a
    # gap in MANIFEST.in.
    tree = tmp_path / "tree"
    for name in _tracked():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    out = tmp_path / "dist"
    # The isolated build fetches setuptools and Cython as pyproject.toml asks, like pip does.
    proc = subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out),
                           str(tree)], check=False, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (sdist,) = out.glob("fastsip-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"LICENSE", "pyproject.toml", "setup.py", "README.md"}
    wanted |= set(_tracked("src/fastsip/*.pyx", "src/fastsip/*.pxd", "src/fastsip/*.pyi",
                           "src/fastsip/*.py"))
    # the tests with their helpers and data, the examples they run, the scripts that install
    # the system packages they use
    wanted |= set(_tracked("tests", "examples", ".ci", "benchmarks", "contrib"))
    # and the profile-guided build's training run (setup.py)
    wanted |= set(_tracked("build_support"))
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)[:20]}"
    generated = [n for n in names if re.search(r"\.(so|pyd|c|html)$|__pycache__", n)]
    assert not generated, f"build products in the sdist: {generated[:20]}"


@needs_checkout
def test_the_profile_training_run_relays_calls_through_serve() -> None:
    # setup.py's profile-guided build trains on this run.  Should it stop working (serve's
    # command line or answers changed), every build would fall back to one without a profile,
    # saying so only in pip's verbose log: this is where it shows.  It runs the installed serve.
    proc = subprocess.run([sys.executable, str(ROOT / "build_support" / "pgo_train.py"),
                           "--calls", "40"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pgo training: 40 calls through serve" in proc.stdout


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@needs_checkout
@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    fastsip = shutil.which("fastsip") or str(Path(sys.executable).parent / "fastsip")
    assert Path(fastsip).exists()
    unit = (ROOT / "contrib" / "fastsip.service").read_text()
    assert "ExecStart=/usr/local/bin/fastsip serve" in unit
    # systemd checks that ExecStart's program exists: point it at the installed one.
    path = tmp_path / "fastsip.service"
    path.write_text(unit.replace("/usr/local/bin/fastsip", fastsip))
    assert SYSTEMD_ANALYZE is not None
    verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(path)], check=False,
                            capture_output=True, text=True, timeout=60)
    # An unknown or misspelt directive is only a warning (exit 0): no output at all is the bar.
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    for directive in ("DynamicUser=yes", "AmbientCapabilities=CAP_NET_BIND_SERVICE",
                      "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "Restart=on-failure",
                      "NoNewPrivileges=yes", "ProtectSystem=strict",
                      "ExecReload=/bin/kill -HUP $MAINPID"):
        assert re.search(rf"^{re.escape(directive)}$", unit, re.MULTILINE), directive
    security = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(path)],
                              check=False, capture_output=True, text=True, timeout=60)
    exposure = re.search(r"Overall exposure level for \S+: ([0-9.]+)",
                         security.stdout + security.stderr)
    assert exposure is not None, security.stdout[-1000:] + security.stderr[-1000:]
    # 0 is locked down, 10 is wide open; systemd calls < 2.0 "OK" (a default unit scores 9.6).
    assert float(exposure.group(1)) < 2.0


@needs_checkout
def test_dockerfile_builds_in_two_stages_and_runs_unprivileged() -> None:
    # Building needs a Docker daemon: the contrib workflow does it.  Here: its shape.
    text = (ROOT / "contrib" / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\w+))?", text, re.MULTILINE)
    assert len(stages) == 2 and stages[0][1] == "build"
    assert re.search(r"^COPY --from=build ", text, re.MULTILINE)
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1] not in ("root", "0")
    runtime = text[text.rindex("FROM"):]
    assert "gcc" not in runtime          # no compiler in the runtime image


WITHOUT_NUMPY = r"""
import sys
sys.modules["numpy"] = None          # `import numpy` now raises ImportError, as if not installed
import fastsip.cli, fastsip.app.serve, fastsip.app.media, fastsip.app.anchor
from fastsip.rtp import (JitterBuffer, Packetizer, Relay, RtpPacket, RtpStats, TelephoneEvent,
                         parse_rtcp, ulaw_encode)
packets = Packetizer(0, ptime=0.02).packetize(b"\xff" * 320)
assert len(packets) == 2
stats, jb = RtpStats(8000), JitterBuffer(8000, 0.02)
for i, p in enumerate(packets):
    again = RtpPacket.parse(bytes(p))
    stats.update(again, i * 0.02)
    jb.put(again, i * 0.02)
try:
    ulaw_encode(b"\0\0" * 160)
except ImportError as exc:
    assert "fastsip[numpy]" in str(exc), exc
else:
    raise AssertionError("G.711 arrays without NumPy")
print("ok")
"""


def test_proxy_relay_and_rtp_packets_need_no_numpy() -> None:
    # numpy is the `numpy` extra: a proxy-only install must import and run without it, and
    # an array API used without it says what to install.
    proc = subprocess.run([sys.executable, "-c", WITHOUT_NUMPY], check=False,
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).parent)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_serve_does_not_load_numpy() -> None:
    code = ("import sys, fastsip.cli, fastsip.app.serve, fastsip.app.media; "
            "print('numpy' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=60, cwd=Path(__file__).parent)
    assert proc.stdout.strip() == "False", proc.stderr[-2000:]


def test_cli_media_without_numpy_says_what_to_install(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['numpy'] = None\n"
            "from fastsip.cli import main\n"
            "sys.exit(main(['answer', '--rtp', '--listen', 'udp:127.0.0.1:0']))")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'fastsip[numpy]'" in proc.stderr
    assert "Traceback" not in proc.stderr

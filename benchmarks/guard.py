"""Benchmark guard: run the benchmarks and fail when a throughput ratio falls under its floor.

Every ``benchmarks/bench_*.py`` declares ``GUARDS``, a list of
``(fast_test, reference_test, floor, what)``: the reference is a peer (sippy, asyncio, a naive
Python floor ...) measured in the *same* run, so the ratio ``reference / fast`` holds on a slow or
noisy machine where absolute times would not.  Times are each benchmark's minimum round, the
estimate least disturbed by other load; a file whose guards fail is run again (``ATTEMPTS``),
keeping each benchmark's best round, before the failure stands.

    python benchmarks/guard.py            # full rounds
    python benchmarks/guard.py --quick    # CI: shorter rounds, same floors
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ATTEMPTS = 3        # runs of a file whose guards fail before the failure stands


def run_file(f: Path, quick: bool) -> tuple[int, dict[str, float]]:
    """One pytest process for one bench file: its exit code and each benchmark's best round.

    One process per file: a benchmark must not be measured in a process another one has left
    changed (after bench_logging's micro-benchmarks, bench_sip's parse measured 245 us instead
    of 155 us in the same process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [
            # -s: the process-CPU benchmarks (bench_answer, bench_proxy) print their ratios
            sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
            "--import-mode=importlib", "--rootdir", str(HERE), "-o", "testpaths=",
            f"--benchmark-json={out}", "--benchmark-disable-gc", str(f),
        ]
        if quick:
            cmd += ["--benchmark-min-rounds=20", "--benchmark-max-time=0.25"]
        # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the
        # source tree's fastsip/ (no compiled modules) would shadow the installed package.
        rc = subprocess.call(cmd, cwd=tmp)
        # Files with only plain tests (the CPU-per-call benchmarks) leave no timings.
        text = out.read_text() if out.exists() else ""
        benchmarks = json.loads(text).get("benchmarks", []) if text.strip() else []
        return rc, {b["name"]: b["stats"]["min"] for b in benchmarks}


def load_guards(path: Path) -> list[tuple[str, str, float, str]]:
    spec = importlib.util.spec_from_file_location(f"_guard_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(getattr(module, "GUARDS", []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("files", nargs="*", help="bench files (default: benchmarks/bench_*.py)")
    ap.add_argument("--quick", action="store_true", help="short rounds (CI)")
    args = ap.parse_args(argv)

    files = [Path(f).resolve() for f in args.files] or sorted(HERE.glob("bench_*.py"))
    guards = {f: load_guards(f) for f in files}
    best: dict[str, float] = {}
    for f in files:
        # A file whose guard or own assertion fails runs again (up to ATTEMPTS times), and each
        # benchmark keeps its best round over all attempts: this VM's speed drifts by tens of
        # percent for seconds at a time, which one short run can catch on one side of a ratio
        # only.  A real regression fails every attempt.
        for attempt in range(1, ATTEMPTS + 1):
            rc, timings = run_file(f, args.quick)
            for name, seconds in timings.items():
                best[name] = min(seconds, best.get(name, seconds))
            short = [what for fast, ref, floor, what in guards[f]
                     if fast in best and ref in best and best[ref] / best[fast] < floor]
            if rc in (0, 5) and not short:
                break
            why = f"pytest exit {rc}" if rc not in (0, 5) else "under the floor: " + "; ".join(short)
            if attempt < ATTEMPTS:
                print(f"guard: {f.name} attempt {attempt} failed ({why}); running it again")
            elif rc not in (0, 5):      # 5: no tests here (a standalone measurement script)
                print(f"guard: benchmark run of {f.name} failed (pytest exit {rc}) "
                      f"{ATTEMPTS} times")
                return rc

    failed = 0
    print(f"\n{'guard':58} {'ratio':>9} {'floor':>7}")
    for rows in guards.values():
        for fast, ref, floor, what in rows:
            if fast not in best or ref not in best:
                print(f"{what:58} missing benchmark {fast if fast not in best else ref}  FAIL")
                failed += 1
                continue
            ratio = best[ref] / best[fast]
            ok = ratio >= floor
            failed += not ok
            print(f"{what:58} {ratio:8.1f}x {floor:6.1f}x  {'ok' if ok else 'FAIL'}"
                  f"   ({best[fast] * 1e9:,.0f} ns vs {best[ref] * 1e9:,.0f} ns)")
    print(f"\n{failed} guard(s) under their floor" if failed else "\nall guards above their floors")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

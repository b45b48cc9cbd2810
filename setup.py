"""Build the Cython cores: every ``src/fastsip/**/*.pyx`` becomes one extension module.

Metadata lives in pyproject.toml; this file only declares the compiled modules, so a new core
needs no edit here.  Set ``FASTSIP_CYTHON_TRACE=1`` to build with line tracing (coverage, profiling).

With GCC 10 or later on Linux the build is profile-guided: the modules are built instrumented,
``build_support/pgo_train.py`` relays calls through ``fastsip serve`` with them, and they are
built again from that profile, which lays each module's hot paths out together (fewer
instruction cache misses a message: docs/performance.md).  It costs one more compile of every
module and a few seconds of calls.  ``FASTSIP_PGO=0`` builds once, without a profile; a failed
instrumented build or training run says why on stderr and falls back to that build.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

ROOT = Path(__file__).parent
# The src/ layout: a checkout never shadows the installed, compiled package.
SRC = ROOT / "src"
trace = os.environ.get("FASTSIP_CYTHON_TRACE") == "1"

if sys.platform == "win32":
    extra_compile_args = ["/O2"]
else:
    # -g0: CPython's CFLAGS carry -g, which would make debug info ~80% of each module.
    extra_compile_args = ["-O3", "-fno-strict-aliasing", "-g0"]
    if sys.platform.startswith("linux"):
        # ELF only.  -fno-plt: a call into libpython (a message costs hundreds) goes through
        # the GOT at once, not through a PLT stub first -- one jump and one cache line less a
        # call; -fno-semantic-interposition: the module's own functions are not looked up
        # again at run time.  Measured together: -6 % simulated L1 instruction misses a call
        # through serve (benchmarks/bench_instructions.py --cache; docs/performance.md).
        extra_compile_args += ["-fno-plt", "-fno-semantic-interposition"]

macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []

extensions = [
    Extension(
        ".".join(pyx.relative_to(SRC).with_suffix("").parts),
        [str(pyx.relative_to(ROOT))],
        extra_compile_args=extra_compile_args,
        define_macros=macros,
    )
    for pyx in sorted((SRC / "fastsip").rglob("*.pyx"))
]

PGO_TRAINING = ROOT / "build_support" / "pgo_train.py"
PGO_TRAINING_TIMEOUT = 600        # seconds; the run takes a few (an instrumented serve, 1,500 calls)
# GCC's flags for the two passes.  -fprofile-partial-training (GCC 10): a function the training
# did not run is optimised as without a profile, not for size as "never executed" -- a
# deployment's paths that the training does not take (TLS, media, trunks) lose nothing.
PGO_GENERATE = ["-fprofile-generate"]
PGO_USE = ["-fprofile-use", "-fprofile-partial-training", "-fprofile-correction",
           "-Wno-missing-profile"]


def _say(text: str) -> None:
    print(f"fastsip build: {text}", file=sys.stderr, flush=True)


def _gcc_major(command: list[str]) -> int | None:
    """GCC's major version when ``command`` is GCC (not clang posing as ``cc``), else None."""
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    if "Free Software Foundation" not in out or "clang" in out.lower():
        return None
    found = re.search(r"\) (\d+)\.", out.splitlines()[0]) if out else None
    return int(found.group(1)) if found else None


@contextmanager
def _extra_flags(extensions: list[Extension], compile_args: list[str],
                 link_args: list[str]) -> Iterator[None]:
    saved = [(ext.extra_compile_args, ext.extra_link_args) for ext in extensions]
    for ext in extensions:
        ext.extra_compile_args = [*ext.extra_compile_args, *compile_args]
        ext.extra_link_args = [*ext.extra_link_args, *link_args]
    try:
        yield
    finally:
        for ext, (compile_saved, link_saved) in zip(extensions, saved):
            ext.extra_compile_args, ext.extra_link_args = compile_saved, link_saved


class ProfileGuidedBuild(build_ext):
    """build_ext, twice with GCC: instrumented, trained by calls through serve, then optimised."""

    def build_extensions(self) -> None:
        # The modules are independent: compile them on every core (pip passes no -j).
        if not self.parallel:
            self.parallel = int(os.environ.get("FASTSIP_BUILD_JOBS", "0")) or True
        reason = self._no_pgo_because()
        if reason:
            if reason != "off":
                _say(f"built without a profile: {reason}")
            return super().build_extensions()
        out_lib, out_temp, out_force = self.build_lib, self.build_temp, self.force
        work = Path(tempfile.mkdtemp(prefix="fastsip-pgo-"))
        try:
            # Pass 1 in a scratch tree.  Its objects' directory stays for pass 2: GCC writes
            # each module's counters beside its object file and reads them back from there.
            self.build_lib, self.build_temp, self.force = str(work / "lib"), str(work / "temp"), True
            try:
                with _extra_flags(self.extensions, PGO_GENERATE, PGO_GENERATE):
                    super().build_extensions()
                trained = self._train(work)
            except (BaseError, CCompilerError, OSError) as exc:
                # An instrumented build that cannot compile or link (no libgcov, say) must not
                # fail the install: pass 2 is then the plain build.
                _say(f"the instrumented build failed: {exc}")
                trained = False
            self.build_lib = out_lib
            with _extra_flags(self.extensions, PGO_USE if trained else [], []):
                super().build_extensions()
            _say("built with a profile from calls through serve" if trained else
                 "built without a profile (the instrumented build or its training failed, above)")
        finally:
            self.build_lib, self.build_temp, self.force = out_lib, out_temp, out_force
            shutil.rmtree(work, ignore_errors=True)

    def _no_pgo_because(self) -> str | None:
        if os.environ.get("FASTSIP_PGO", "1") == "0":
            return "off"
        if trace:
            return "off"
        if not sys.platform.startswith("linux") or self.compiler.compiler_type != "unix":
            return "profile-guided builds are set up for GCC on Linux only"
        if not PGO_TRAINING.exists():
            return f"{PGO_TRAINING.relative_to(ROOT)} is missing"
        major = _gcc_major(self.compiler.compiler_so[:1])
        if major is None or major < 10:
            return "the compiler is not GCC 10 or later"
        return None

    def _train(self, work: Path) -> bool:
        """Run the training with the instrumented modules; False (and why, on stderr) if it fails."""
        tree = work / "train"
        shutil.copytree(SRC / "fastsip", tree / "fastsip", ignore=shutil.ignore_patterns(
            "*.c", "*.so", "*.pyd", "*.html", "__pycache__"))
        for ext in self.extensions:
            built = Path(self.get_ext_fullpath(ext.name))
            shutil.copy2(built, tree.joinpath(*ext.name.split(".")[:-1], built.name))
        # The tree first; then whatever PYTHONPATH pip's isolated build set, which is how its
        # environment (with uvloop and dnspython, pyproject.toml's build requirements) is seen.
        paths = [str(tree), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run([sys.executable, str(PGO_TRAINING)], cwd=work, env=env,
                                  capture_output=True, text=True, timeout=PGO_TRAINING_TIMEOUT,
                                  check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            _say(f"the profile's training run failed: {exc}")
            return False
        if proc.returncode != 0:
            _say(f"the profile's training run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            return False
        # Each module the run imported wrote its counters beside its object file at exit; none
        # at all means they went elsewhere, and pass 2 would silently build without them.
        profiled = len(list((work / "temp").rglob("*.gcda")))
        if not profiled:
            _say("the profile's training run left no counters (*.gcda) beside the objects")
            return False
        _say(f"{proc.stdout.strip()}; counters for {profiled} of {len(self.extensions)} modules")
        return True


setup(
    cmdclass={"build_ext": ProfileGuidedBuild},
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
            "embedsignature": True,
            "linetrace": trace,
        },
        nthreads=int(os.environ.get("FASTSIP_BUILD_JOBS", "0")) or None,
    ),
)

"""Build the Cython cores: every ``src/fastsip/**/*.pyx`` becomes one extension module.

Metadata lives in pyproject.toml; this file only declares the compiled modules, so a new core
needs no edit here.  Set ``FASTSIP_CYTHON_TRACE=1`` to build with line tracing (coverage, profiling).
"""

import os
import sys
from pathlib import Path

from Cython.Build import cythonize
from setuptools import Extension, setup

ROOT = Path(__file__).parent
# The src/ layout: a checkout never shadows the installed, compiled package.
SRC = ROOT / "src"
trace = os.environ.get("FASTSIP_CYTHON_TRACE") == "1"

if sys.platform == "win32":
    extra_compile_args = ["/O2"]
else:
    # -g0: CPython's CFLAGS carry -g, which would make debug info ~80% of each module.
    extra_compile_args = ["-O3", "-fno-strict-aliasing", "-g0"]

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

setup(
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

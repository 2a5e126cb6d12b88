"""lmforge's C++ kernels, built on the machine that runs them.

A kernel's source is compiled with the system's C++ compiler (`CXX`, else g++ or clang++) for this CPU
(`-march=native`, OpenMP) the first time a process needs it, cached under `$XDG_CACHE_HOME/lmforge` (default
`~/.cache/lmforge`) by a hash of the source, the compiler and the CPU, and loaded through ctypes. Each kernel is then
checked against PyTorch on a small known input; one that fails to build or disagrees is not used (one warning) and
its caller takes its PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from lmforge.cpu_info import cpu_flags, cpu_model

FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")


class BuildError(Exception):
    """A kernel could not be compiled or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmforge"


@functools.cache
def _toolchain(compiler: str) -> str:
    """What a kernel's build depends on besides its source: the compiler's version, the flags and the CPU that
    -march=native compiles for (asked once per process, whichever kernel builds first)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    return "\0".join([version, " ".join(FLAGS), cpu_model(), *sorted(cpu_flags())])


def _compiled(source: Path, compiler: str) -> Path:
    """The shared library of `source` for this machine, compiled unless already in the cache."""
    key = hashlib.sha256("\0".join([source.read_text(), _toolchain(compiler)]).encode())
    target = cache_dir() / f"{source.stem}-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: atomic for racers
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-300:]}")
            os.replace(built, target)
    return target


def build(source: Path) -> ctypes.CDLL:
    """`source` compiled for this machine (or found in the cache) and loaded; BuildError says why not."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise BuildError("no C++ compiler found (g++ or clang++; or set CXX)")
    try:
        return ctypes.CDLL(str(_compiled(source, compiler)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        raise BuildError(f"{type(err).__name__}: {str(err)[:300]}") from err


def checked_kernel(source: Path, declare: Callable[[ctypes.CDLL], None],
                   problem: Callable[[ctypes.CDLL], str | None], name: str, fallback: str) -> ctypes.CDLL | None:
    """The kernel built from `source`, its functions typed by `declare`, if `problem` finds nothing wrong with it;
    else None, after one warning naming the `name`d kernel, the problem and the `fallback` taken instead."""
    try:
        lib = build(source)
        declare(lib)
        found = problem(lib)
    except BuildError as err:
        found = f"the {name} did not build: {err}"
    if found is None:
        return lib
    warnings.warn(f"{found}; {fallback}", RuntimeWarning, stacklevel=3)
    return None

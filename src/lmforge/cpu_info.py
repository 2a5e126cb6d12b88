"""The CPU as the OS describes it in /proc/cpuinfo: its model name and feature flags (for the report card, the
benchmarks' machine line, the demo's precision rule and the C++ kernels' build cache)."""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def _lines(cpuinfo: Path) -> list[str]:
    try:
        return cpuinfo.read_text().splitlines()
    except OSError:  # no /proc (macOS, Windows)
        return []


def cpu_model(cpuinfo: Path = CPUINFO) -> str:
    """The first `model name`, else what `platform` knows."""
    for line in _lines(cpuinfo):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The feature flags (x86 `flags`, Arm `Features`); empty where there is no /proc/cpuinfo."""
    return {flag for line in _lines(cpuinfo) if line.startswith(("flags", "Features"))
            for flag in line.split(":", 1)[1].split()}

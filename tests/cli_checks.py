"""Checks shared by the tests of user errors: one `lmforge: error:` line, nothing on disk changed, and whether a
real full disk (a private tmpfs) can be staged here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def error_line(stderr: str) -> str:
    """The message of a failed command: stderr must end with exactly one `lmforge: error: ...` line (a progress bar
    may come before it) and hold no traceback."""
    assert "Traceback" not in stderr, stderr
    start = stderr.find("lmforge: error: ")
    assert start >= 0, stderr
    tail = stderr[start:]
    assert tail.endswith("\n") and tail.count("\n") == 1, f"the error is not one line: {tail!r}"
    return tail.removeprefix("lmforge: error: ").rstrip("\n")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative name -> content); an empty dict when it does not exist."""
    if not directory.exists():
        return {}
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def tmpfs_unavailable() -> str | None:
    """None when this process may mount a tmpfs in a private mount namespace, else why not."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs here: {probe.stderr.strip()}"

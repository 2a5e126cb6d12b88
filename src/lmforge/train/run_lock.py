"""One run per run directory: an exclusive `flock` on RUN/.lock, held for the whole run.

The lock file holds the holder's pid while it runs and is emptied when the run ends. The kernel releases a
flock when its holder dies, so a killed run never blocks the next one: that run finds the dead run's pid
still in the file, says so, and takes the directory over. The file is never deleted (deleting it would let
two runs lock two different files of the same name).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import CheckpointError
from lmforge.io import disk_full_guard
from lmforge.train.console import report

LOCK_FILE = ".lock"


def _recorded_pid(fd: int) -> str:
    return os.pread(fd, 64, 0).decode("ascii", "replace").strip()


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run dir's lock for the block (creating the dir); CheckpointError naming the holder's pid if
    another process holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_pid(fd) or "unknown"
            raise CheckpointError(f"{run_dir} is in use by another lmforge run (pid {holder}, holding {path}); "
                                  "wait for it to end, or pick another train.out_dir (nothing was changed)") from None
        dead = _recorded_pid(fd)
        if dead:
            report(f"lmforge: {path} names pid {dead}, which ended without releasing it (killed?); taking the run "
                   "dir over", stderr=True)
        record = f"{os.getpid()}\n".encode()
        with disk_full_guard(run_dir, len(record), path.name):
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean end: no pid left behind
    finally:
        os.close(fd)  # releases the flock

"""Atomic file writes: temp file in the same directory + fsync + rename; a full disk as one clear error.

A crash (even SIGKILL) mid-write leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import glob
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lmforge.errors import DiskFullError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# safetensors wraps the OSError in a SafetensorError whose message is all that is left of it
_DISK_FULL_MESSAGES = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC})",
                       f"os error {errno.EDQUOT})")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None], bytes_needed: int = 0) -> Path:
    """Call `write(tmp_path)`, fsync it, then rename it over `path`; a full disk raises DiskFullError (see
    `disk_full_guard`; `bytes_needed` is the size being written, when known)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    with disk_full_guard(path.parent, bytes_needed, path.name, cleanup=lambda: tmp_path.unlink(missing_ok=True)):
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda p: p.write_bytes(data), len(data))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data), len(data))


def append_line(path: Path, line: str, kept: str = "") -> None:
    """Append `line` and a newline to `path`. If the write fails (a full disk: DiskFullError, see `disk_full_guard`),
    the file is cut back to its old length, so it never ends in a torn line."""
    data = (line + "\n").encode("utf-8")
    size = path.stat().st_size if path.exists() else 0
    with disk_full_guard(path.parent, len(data), path.name, cleanup=lambda: os.truncate(path, size), kept=kept):
        with open(path, "ab") as f:
            f.write(data)


def unique_temp_path(final: Path) -> Path:
    """A hidden sibling of `final` no other process picks: `.NAME.PID-RANDOM.tmp` (not created)."""
    return final.parent / f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def is_disk_full(exc: BaseException, directory: str | Path, bytes_needed: int) -> bool:
    """Whether `exc`, raised while writing about `bytes_needed` bytes under `directory`, means the disk is full.

    An OSError says so by its errno, a SafetensorError in its message. torch.save's C++ writer drops the errno
    (RuntimeError "unexpected pos ..."), so a RuntimeError counts when the filesystem has less space left than
    the write needed."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    if any(text in str(exc) for text in _DISK_FULL_MESSAGES):
        return True
    free = _free_bytes(directory)
    return isinstance(exc, RuntimeError) and free is not None and free < bytes_needed


def _free_bytes(directory: str | Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 2**20 else f"{n:,} bytes ({n / 2**20:,.1f} MiB)"


@contextmanager
def disk_full_guard(directory: str | Path, bytes_needed: int, what: str, *,
                    cleanup: Callable[[], None] | None = None, kept: str = "") -> Iterator[None]:
    """Run the block; if it fails, call `cleanup` (remove the partial output); if it failed because the disk is
    full, raise one-line DiskFullError naming `directory`, `what` was written, the bytes it needs and the bytes
    free after the cleanup, followed by `kept` (what is still intact and how to go on). Other errors propagate
    unchanged."""
    try:
        yield
    except BaseException as exc:
        disk_full = not isinstance(exc, DiskFullError) and is_disk_full(exc, directory, bytes_needed)
        if cleanup is not None:
            cleanup()
        if not disk_full:
            raise
        free = _free_bytes(directory)
        parts = [f"no space left on the device of {directory} while writing {what}: it needs about "
                 f"{_size(bytes_needed)}" + (f", {_size(free)} are free" if free is not None else ""),
                 "the partial files were removed" if cleanup is not None else "", kept]
        raise DiskFullError("; ".join(part for part in parts if part)) from None


def remove_dead_temps(final: Path) -> None:
    """Remove the `unique_temp_path`s of `final` whose process is gone (a write that was killed)."""
    for tmp in final.parent.glob(f"{glob.escape('.' + final.name)}.*-*.tmp"):
        pid = tmp.name.removeprefix(f".{final.name}.").split("-")[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

"""Atomic file writes: temp file in the same directory + fsync + rename; a full disk as one clear error.

A crash (even SIGKILL) mid-write leaves either the old file or the new one, never half of one. Whole output
directories are built beside their destination and published the same way (`replace_dir`); a write that fails
because the disk is full becomes one line naming the directory and the bytes needed (`disk_full_guard`).
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lmforge.errors import DiskFullError, LmforgeError

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What libraries leave of the errno: Rust's "os error 28" (tokenizers, safetensors), numpy's short write in
# `tofile` ("N requested and M written").
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b"
                             r"|\d+ requested and \d+ written")


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None], bytes_needed: int = 0) -> Path:
    """Call `write(tmp_path)`, fsync it, then rename it over `path`; a full disk (even while making the directory)
    raises DiskFullError (see `disk_full_guard`; `bytes_needed` is the size being written, when known)."""
    path = Path(path)
    tmp_path: Path | None = None

    def remove_tmp() -> None:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)

    with disk_full_guard(path.parent, bytes_needed, path.name, cleanup=remove_tmp):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    data = text.encode("utf-8")
    return atomic_write(path, lambda p: p.write_bytes(data), len(data))


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """`records` as JSON lines, written atomically."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def append_line(path: Path, line: str, kept: str = "") -> None:
    """Append `line` and a newline to `path`. If the write fails (a full disk: DiskFullError, see `disk_full_guard`),
    the file is cut back to its old length, so it never ends in a torn line."""
    data = (line + "\n").encode("utf-8")
    size = path.stat().st_size if path.exists() else 0
    with disk_full_guard(path.parent, len(data), path.name, cleanup=lambda: os.truncate(path, size), kept=kept):
        with open(path, "ab") as f:
            f.write(data)


# ---- output directories: built beside their destination, published whole ------------------------------------------


def unique_temp_path(final: Path) -> Path:
    """A hidden sibling of `final` no other process picks: `.NAME.PID-RANDOM.tmp` (not created)."""
    return final.parent / f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def new_temp_dir(beside: Path) -> Path:
    """A new `unique_temp_path` directory next to `beside` (same filesystem, so it can be renamed onto it)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = unique_temp_path(beside)
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the fully written directory `tmp` as `final`, replacing an older `final` whole.

    Every file is fsynced first; the old directory is renamed aside, `tmp` renamed into place, then the old one
    removed, so a crash leaves the old or the new directory complete (between the renames, the old one under a
    hidden name)."""
    for f in tmp.rglob("*"):
        if f.is_dir():
            fsync_dir(f)
        else:
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(tmp)
    aside = final.parent / f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.old"
    had_old = final.exists()
    if had_old:
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if had_old:
            os.rename(aside, final)
        raise
    fsync_dir(final.parent)
    if had_old:
        shutil.rmtree(aside)


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


def is_inside(path: Path, directory: Path) -> bool:
    """True when `path`, symlinks followed, lies in `directory` (or is it)."""
    return path.resolve().is_relative_to(directory.resolve())


def require_dir_path(path: Path, flag: str) -> None:
    """LmforgeError unless `path` can be an output directory: it is one, or it is missing and no file is in its way."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise LmforgeError(f"{flag} {path}: {p} is an existing file, not a directory; pass a directory path")
            return


def read_utf8(path: Path, error: type[LmforgeError]) -> str:
    """The text of `path`; an `error` naming the line and byte when it is not UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}: not UTF-8 text (line {line}, byte {e.start}); save it as UTF-8") from None


# ---- a full disk ---------------------------------------------------------------------------------------------------


def is_disk_full(exc: BaseException, directory: str | Path, bytes_needed: int) -> bool:
    """Whether `exc`, raised while writing about `bytes_needed` bytes under `directory`, means the disk is full.

    An OSError says so by its errno, tokenizers/safetensors/numpy errors in their message. torch.save's C++ writer
    drops the errno (RuntimeError "unexpected pos ..."), so a RuntimeError counts when the filesystem has less
    space left than the write needed."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in DISK_FULL_ERRNOS
    if _DISK_FULL_TEXT.search(str(exc)):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    free = _free_bytes(directory)
    return free is not None and free < bytes_needed


def _free_bytes(directory: str | Path) -> int | None:
    existing = next((p for p in (Path(directory), *Path(directory).parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


def _size(n: int) -> str:
    return f"{n:,} bytes" if n < 2**20 else f"{n:,} bytes ({n / 2**20:,.1f} MiB)"


def raise_if_disk_full(exc: BaseException, directory: str | Path, bytes_needed: int, what: str = "",
                       *, cleaned: bool = False, kept: str = "") -> None:
    """Raise one-line DiskFullError naming `directory`, `what` was written, the bytes it needs and the bytes free when
    `exc` means the disk is full, followed by `kept` (what is intact and how to go on); otherwise return, for the
    caller to re-raise `exc`."""
    if isinstance(exc, DiskFullError) or not is_disk_full(exc, directory, bytes_needed):
        return
    free = _free_bytes(directory)
    parts = [f"no space left on the device of {directory}" + (f" while writing {what}" if what else "") +
             f": it needs about {_size(bytes_needed)}" + (f", {_size(free)} are free" if free is not None else ""),
             "the partial files were removed" if cleaned else "", kept or "free some space or write elsewhere"]
    raise DiskFullError("; ".join(part for part in parts if part)) from None


@contextmanager
def disk_full_guard(directory: str | Path, bytes_needed: int, what: str, *,
                    cleanup: Callable[[], None] | None = None, kept: str = "") -> Iterator[None]:
    """Run the block; if it fails, call `cleanup` (remove the partial output), then raise `raise_if_disk_full`'s
    error if the disk is full; other errors propagate unchanged."""
    try:
        yield
    except BaseException as exc:
        if cleanup is not None:
            cleanup()
        raise_if_disk_full(exc, directory, bytes_needed, what, cleaned=cleanup is not None, kept=kept)
        raise

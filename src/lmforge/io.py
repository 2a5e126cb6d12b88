"""Atomic file writes: temp file in the same directory + fsync + rename.

A crash (even SIGKILL) mid-write leaves either the old file or the new one, never half of one. Whole output
directories are built beside their destination and published the same way (`replace_dir`); a write that fails
because the disk is full becomes one line naming the directory and the bytes needed (`raise_if_disk_full`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from lmforge.errors import LmforgeError


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


# ---- output directories: publish whole, stay inside, report a full disk -----------------------------------------


def replace_dir(tmp: Path, final: Path) -> None:
    """Publish the fully written directory `tmp` as `final`, replacing an older `final` whole.

    Files are fsynced first; the old directory is renamed aside, `tmp` renamed into place, then the old one removed,
    so a crash leaves the old or the new directory complete (between the two renames, the old one under a hidden name).
    """
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)
    aside = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}.old"
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


def new_temp_dir(beside: Path) -> Path:
    """A new, uniquely named hidden directory next to `beside` (same filesystem, so it can be renamed onto it)."""
    beside.parent.mkdir(parents=True, exist_ok=True)
    tmp = beside.parent / f".{beside.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir()
    return tmp


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


# What the libraries say when a write hits a full disk: errno on OSError; Rust's "os error 28" from tokenizers and
# safetensors; numpy's short write in `tofile` ("N requested and M written").
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b"
                             r"|\d+ requested and \d+ written")


def raise_if_disk_full(exc: BaseException, directory: Path, bytes_needed: int) -> None:
    """Raise a one-line LmforgeError naming `directory`, the bytes needed and the bytes free when `exc` means the disk
    is full (ENOSPC or a disk quota); otherwise return, for the caller to re-raise `exc`."""
    full = getattr(exc, "errno", None) in _DISK_FULL_ERRNOS or bool(_DISK_FULL_TEXT.search(str(exc)))
    if not full:
        return
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    raise LmforgeError(f"no space left on the device of {directory}: writing it needs about {bytes_needed:,} bytes, "
                       f"{free:,} bytes are free; free some space or write elsewhere") from None

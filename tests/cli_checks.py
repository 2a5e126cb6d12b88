"""Checks shared by the tests of user errors: one `lmforge: error:` line, nothing on disk changed."""

from __future__ import annotations

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

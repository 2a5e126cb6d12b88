"""Run model-written Python in a separate, locked-down process: `run_python(code) -> SandboxResult`.

This side starts the child (agents/sandbox_child.py, which isolates itself before the code runs), enforces the
wall-clock timeout and the output cap, kills everything the code started, and removes its working directory. The
threat model, and which layer stops what, is docs/SANDBOX.md.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from lmforge.agents import sandbox_child
from lmforge.errors import ConfigError

# Each sandbox runs under its own UID from this range when lmforge runs as root (RLIMIT_NPROC counts per UID, and
# every process of that UID can be found and killed afterwards). No account uses these numbers.
SANDBOX_UIDS = range(2_100_000_000, 2_100_000_000 + 1_000_000)
OPEN_FILES = 64
PROCESSES = 16  # per UID; threads count too
FILE_BYTES = 64 * 2**20  # largest file the code may write (the working directory is a 64 MB tmpfs when mounts allow)
_READ_CHUNK = 65536
STARTUP_S = 10  # at most this long to start the interpreter and build the sandbox (0.15 s on an idle machine)

_warned = False
_last_protections: dict[str, bool] = {}


@dataclass(frozen=True)
class SandboxResult:
    """`error` is a one-line reason when the sandbox stopped the code (timeout, a limit, a refused operation);
    None when the code ran to its end, or raised an ordinary exception (its traceback is in `stderr`)."""

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool
    error: str | None = None


def run_python(code: str, *, timeout_s: float = 5, memory_mb: int = 256,
               max_output_bytes: int = 65536) -> SandboxResult:
    """Run `code` with `python -I -S` in a fresh temporary working directory, under the limits, and return what it
    printed (each stream cut at `max_output_bytes`; more than that kills the code)."""
    for name, value in (("timeout_s", timeout_s), ("memory_mb", memory_mb), ("max_output_bytes", max_output_bytes)):
        if not value > 0:
            raise ConfigError(f"the sandbox's {name} must be > 0, got {value}")
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)


def protections() -> dict[str, bool]:
    """Which protections engaged in the most recent sandbox (running a trivial one if none ran yet)."""
    if not _last_protections:
        run_python("pass")
    return dict(_last_protections)


def _run(code: str, *, timeout_s: float, memory_mb: int, max_output_bytes: int,
         audit_hook: bool = True) -> SandboxResult:
    """`audit_hook=False` is for the tests that show the kernel's layers hold on their own."""
    base = Path(os.path.realpath(tempfile.mkdtemp(prefix="lmforge-sandbox-")))
    uid = _free_uid() if os.geteuid() == 0 else None
    status_r, status_w = os.pipe()
    proc = None
    try:
        work = base / "work"
        work.mkdir()
        (base / "code.py").write_text(code, encoding="utf-8")
        if uid is not None:
            os.chown(work, uid, uid)
            base.chmod(0o711)  # without a mount namespace the sandbox's UID works in here; code.py stays root's
        config = {"base": str(base), "work": str(work), "uid": uid, "status_fd": status_w,
                  "cpu_s": math.ceil(timeout_s) + 1, "memory_bytes": memory_mb * 2**20, "file_bytes": FILE_BYTES,
                  "open_files": OPEN_FILES, "processes": PROCESSES + (0 if uid is not None else _own_processes()),
                  "audit_hook": audit_hook}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-X", "utf8", sandbox_child.__file__, json.dumps(config)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=work,
            start_new_session=True, pass_fds=(status_w,))
        os.close(status_w)
        status_w = -1
        out, err, status, timed_out, overflow = _collect(proc, status_r, timeout_s, max_output_bytes)
    finally:
        if proc is not None:
            _kill_all(proc.pid, uid)
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(base, ignore_errors=True)
    _note_protections(status, uid)
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    error = _reason(proc.returncode, stderr, timed_out=timed_out, overflow=overflow, timeout_s=timeout_s,
                    memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    return SandboxResult(stdout, stderr, proc.returncode, timed_out, error)


def _collect(proc: subprocess.Popen, status_fd: int, timeout_s: float,
             cap: int) -> tuple[bytes, bytes, bytes, bool, bool]:
    """Read stdout, stderr and the status line until all close, the deadline passes, or a stream exceeds `cap`
    (then stop reading: 100 MB of output never reaches this process's memory). The `timeout_s` clock starts when the
    child closes the status pipe, just before the code runs; building the sandbox has STARTUP_S of its own."""
    deadline = time.monotonic() + STARTUP_S + timeout_s
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), status_fd: bytearray()}
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return (*_parts(buffers, proc, status_fd, cap), True, False)
            for key, _ in selector.select(left):
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    selector.unregister(key.fd)
                    if key.fd == status_fd:
                        deadline = time.monotonic() + timeout_s
                buffers[key.fd] += chunk
                if len(buffers[key.fd]) > cap:
                    return (*_parts(buffers, proc, status_fd, cap), False, True)
    return (*_parts(buffers, proc, status_fd, cap), False, False)


def _parts(buffers: dict[int, bytearray], proc: subprocess.Popen, status_fd: int, cap: int) -> tuple[bytes, ...]:
    return (bytes(buffers[proc.stdout.fileno()][:cap]), bytes(buffers[proc.stderr.fileno()][:cap]),
            bytes(buffers[status_fd]))


def _reason(code: int, stderr: str, *, timed_out: bool, overflow: bool, timeout_s: float, memory_mb: int,
            max_output_bytes: int) -> str | None:
    last_line = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    if timed_out:
        return f"timed out after {timeout_s:g} s (the wall-clock limit); the process was killed"
    if overflow:
        return f"printed more than {max_output_bytes} bytes (the output limit); the process was killed"
    if code == sandbox_child.EXIT_REFUSED:
        return last_line
    if code == sandbox_child.EXIT_MEMORY:
        return f"ran out of memory (the limit is {memory_mb} MB)"
    if code == sandbox_child.EXIT_SETUP:
        return f"the sandbox could not start: {last_line}"
    if code == -signal.SIGXCPU:
        return f"exceeded the CPU-time limit of {math.ceil(timeout_s) + 1} s"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return None


def _free_uid() -> int:
    in_use = _uids_of_processes()
    while (uid := SANDBOX_UIDS[secrets.randbelow(len(SANDBOX_UIDS))]) in in_use:
        pass
    return uid


def _process_uids() -> dict[int, int]:
    """pid -> real UID of every live process in /proc (zombies, already dead, are left out). Read from its status:
    a process that changed UID is no longer dumpable, so its /proc directory belongs to root."""
    uids = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(os.path.join(entry.path, "status"), "rb") as f:
                    fields = dict(line.split(b":", 1) for line in f if line.startswith((b"State:", b"Uid:")))
            except OSError:
                continue  # it ended meanwhile
            if b"State" in fields and b"Uid" in fields and fields[b"State"].split()[0] not in (b"Z", b"X"):
                uids[int(entry.name)] = int(fields[b"Uid"].split()[0])
    return uids


def _uids_of_processes() -> set[int]:
    return set(_process_uids().values())


def _own_processes() -> int:
    me = os.getuid()
    return sum(uid == me for uid in _process_uids().values())


def _kill_all(pid: int, uid: int | None) -> None:
    """SIGKILL the child's process group and, as root, every process left with the sandbox's UID (one that left
    the group with setsid)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if uid is None:
        return
    for _ in range(10):
        left = [p for p, u in _process_uids().items() if u == uid and p != pid]
        if not left:
            return
        for p in left:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _note_protections(status: bytes, uid: int | None) -> None:
    """Remember what engaged; warn once when a protection is missing (not root, or the kernel refused one)."""
    global _warned
    try:
        report = json.loads(status)
    except ValueError:
        return  # the sandbox did not start; its error says why
    _last_protections.clear()
    _last_protections.update(report["engaged"])
    missing = [name for name, on in report["engaged"].items() if not on]
    if missing and not _warned:
        _warned = True
        why = ["lmforge is not running as root"] if uid is None else []
        warnings.warn(f"the Python sandbox runs without: {', '.join(missing)} ({'; '.join(why + report['failures'])})"
                      "; the audit hook and the resource limits still apply (see docs/SANDBOX.md)",
                      RuntimeWarning, stacklevel=4)

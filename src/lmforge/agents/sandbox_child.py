"""The sandboxed process itself: `python -I -S -B -X utf8 sandbox_child.py CONFIG_JSON`, started by sandbox.py.

Standard library only, and no lmforge import (the child must not read the project's files). In order, while still
privileged: read the code; enter new network, IPC and mount namespaces (through a user namespace when not root) and
chroot into a read-only tmpfs that holds only /usr, the standard library and a small tmpfs for the working
directory; set the resource limits; drop to the sandbox's own UID (root) or every capability (not root), and forbid
new privileges;
report which protections engaged on the status fd (one JSON line); install the audit hook; and only then run the
code.
"""

import json
import linecache
import os
import resource
import sys
import traceback
import types

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET = 0x00020000, 0x08000000, 0x10000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_NOATIME, MS_NODIRATIME, MS_PRIVATE, MS_RELATIME = 1024, 2048, 1 << 18, 1 << 21
# A read-only bind keeps its source's flags: in a user namespace the kernel refuses to clear them (they are locked).
KEPT_FLAGS = ((os.ST_NOEXEC, MS_NOEXEC), (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
              (os.ST_RELATIME, MS_RELATIME))
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_NO_NEW_PRIVS = 38
# What the new root holds besides the standard library: the programs' libraries (/usr) and the links into it.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")

EXIT_REFUSED, EXIT_MEMORY, EXIT_SETUP = 70, 71, 72

# What the audit hook refuses outright: event prefixes, with the reason shown to the code.
REFUSED_EVENTS = (
    ("socket.", "network access"), ("subprocess.", "running programs"), ("os.system", "running programs"),
    ("os.exec", "running programs"), ("os.posix_spawn", "running programs"), ("os.spawn", "running programs"),
    ("os.fork", "creating processes"), ("os.startfile", "running programs"), ("os.kill", "signalling processes"),
    ("ctypes.", "native code (ctypes)"),
    ("os.symlink", "making links"), ("os.link", "making links"), ("os.unshare", "changing namespaces"),
    ("os.setns", "changing namespaces"), ("gc.get_", "walking the interpreter's objects"),
    ("code.__new__", "building bytecode by hand"),
)
# Modules whose import is refused: native back doors that raise no audit event of their own.
REFUSED_IMPORTS = {
    "_ctypes": "native code (ctypes)", "_posixsubprocess": "running programs", "_socket": "network access",
    "_xxsubinterpreters": "sub-interpreters (they would run without this hook)", "_testcapi": "native code",
    "_testinternalcapi": "native code",
}
WRITE_EVENTS = ("os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.chmod", "os.chown",
                "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                "shutil.")
READ_EVENTS = ("os.listdir", "os.scandir", "glob.glob", "os.chdir", "os.listxattr", "os.getxattr")


class SandboxRefusal(PermissionError):
    """What the audit hook raises; uncaught, the sandbox exits with EXIT_REFUSED and this message."""


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _call(ctypes, fn, *args):
    if fn(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _enter_new_root(ctypes, libc, base, work, stdlib, uid):
    """In the new mount namespace, chroot into an empty read-only tmpfs holding only read-only binds of /usr (with
    the top-level links into it), of the standard library (at its own path: that may be under /root, which the
    sandbox's UID could not pass) and a 64 MB tmpfs for the working directory, owned by `uid`. /etc, /proc, /sys,
    /dev, /tmp, /home, /root and the project do not exist in there."""
    mount = libc.mount
    mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    _call(ctypes, mount, None, b"/", None, MS_REC | MS_PRIVATE, None)  # nothing below reaches the host
    new_root = os.path.join(base, "root")
    os.mkdir(new_root)
    _call(ctypes, mount, b"tmpfs", new_root.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=0755")
    bound = []

    def bind(source):
        target = (new_root + source).encode()
        os.makedirs(target, mode=0o755)
        _call(ctypes, mount, source.encode(), target, None, MS_BIND, None)
        kept = sum(ms for st, ms in KEPT_FLAGS if os.statvfs(source).f_flag & st)
        _call(ctypes, mount, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | kept, None)
        bound.append(source)

    for top in SYSTEM_DIRS:
        if os.path.islink(top):
            os.symlink(os.readlink(top), new_root + top)
        elif os.path.isdir(top):
            bind(top)
    if not any(stdlib.startswith(d + os.sep) for d in bound):
        bind(stdlib)
    os.makedirs(new_root + work, mode=0o755)
    _call(ctypes, mount, b"tmpfs", (new_root + work).encode(), b"tmpfs", MS_NOSUID | MS_NODEV,
          f"size=64m,nr_inodes=4096,mode=0700,uid={uid},gid={uid}".encode())
    _call(ctypes, mount, None, new_root.encode(), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    os.chroot(new_root)


def _enter_user_namespace(ctypes, libc):
    """Not root: a user namespace (mapping our own ids) is what lets us make the other namespaces."""
    uid, gid = os.getuid(), os.getgid()
    _call(ctypes, libc.unshare, CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def _drop_capabilities(ctypes, libc):
    """The user namespace gave this process every capability inside it: enough to leave the chroot or remount the
    binds read-write. Drop them all (capset with empty sets)."""
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # two (effective, permitted, inheritable) triples, all zero
    _call(ctypes, libc.capset, header, data)


def _set_limits(cfg):
    limits = [(resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_AS, cfg["memory_bytes"]),
              (resource.RLIMIT_FSIZE, cfg["file_bytes"]), (resource.RLIMIT_NOFILE, cfg["open_files"]),
              (resource.RLIMIT_CORE, 0), (resource.RLIMIT_NPROC, cfg["processes"])]
    for which, value in limits:
        hard = value + 1 if which == resource.RLIMIT_CPU else value  # SIGXCPU at the soft limit, SIGKILL after
        resource.setrlimit(which, (value, hard))


def _setup(cfg):
    """Isolate this process as far as the kernel allows; returns (the stdlib's directory, which protections engaged,
    why the others did not)."""
    stdlib = os.path.realpath(os.path.dirname(os.__file__))
    uid, work = cfg["uid"], cfg["work"]
    engaged = {"network namespace": False, "mount namespace": False, "own UID": False, "no_new_privs": False}
    failures = []
    ctypes, libc = _libc()
    try:
        if uid is None:
            _enter_user_namespace(ctypes, libc)
        else:
            _call(ctypes, libc.unshare, CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWNS)
        engaged["network namespace"] = True
    except OSError as e:
        failures.append(f"namespaces: {e}")
    else:
        try:
            _enter_new_root(ctypes, libc, cfg["base"], work, stdlib, os.getuid() if uid is None else uid)
            engaged["mount namespace"] = True
        except OSError as e:
            failures.append(f"mount namespace: {e}")
    os.chdir(work)
    _set_limits(cfg)
    if uid is not None:  # from root to the sandbox's UID: every capability goes with it
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        engaged["own UID"] = True
    elif engaged["network namespace"]:
        _drop_capabilities(ctypes, libc)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    engaged["no_new_privs"] = libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # so that `import ctypes` by the code raises its audit event again
    return stdlib, engaged, failures


def _audit_hook(work, readable):
    """The hook, closed over its own copies of the tables (the code can reach this module's globals through its
    frames, not the hook). Paths are resolved (symlinks, `..`) before they are judged."""
    realpath, fspath, sep, refusal = os.path.realpath, os.fsdecode, os.sep, SandboxRefusal
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    refused_events, refused_imports = tuple(REFUSED_EVENTS), dict(REFUSED_IMPORTS)
    write_events, read_events = tuple(WRITE_EVENTS), tuple(READ_EVENTS)

    def inside(path, roots):
        resolved = realpath(fspath(path))
        return any(resolved == root or resolved.startswith(root + sep) for root in roots)

    def refuse(what):
        raise refusal(f"refused by the sandbox: {what}")

    def hook(event, args):
        for prefix, why in refused_events:
            if event.startswith(prefix):
                refuse(f"{why} ({event})")
        if event == "import" and args[0] in refused_imports:
            refuse(f"{refused_imports[args[0]]} (import {args[0]})")
        if event == "object.__setattr__" and args[1] == "__code__":
            refuse("replacing a function's code")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            if path is None or isinstance(path, int):
                return
            writes = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & write_flags)
            if writes and not inside(path, (work,)):
                refuse(f"writing {fspath(path)} (outside the working directory)")
            if not writes and not inside(path, readable):
                refuse(f"reading {fspath(path)} (outside the working directory)")
        elif event.startswith(write_events) or event.startswith(read_events):
            roots = (work,) if event.startswith(write_events) or event == "os.chdir" else readable
            for path in args[:2] if event == "os.rename" else args[:1]:
                if isinstance(path, (str, bytes)) and not inside(path, roots):  # None: the working directory
                    refuse(f"{event} on {fspath(path)} (outside the working directory)")

    return hook


def _run(code):
    """Run the code as __main__ (a fresh module, so the code cannot reach this file's globals by that name)."""
    lines = code.splitlines(keepends=True)
    linecache.cache["<code>"] = (len(code), None, lines, "<code>")
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    try:
        exec(compile(code, "<code>", "exec"), main.__dict__)
    except SandboxRefusal as e:
        sys.stdout.flush()
        print(str(e).splitlines()[0] if str(e) else "refused by the sandbox", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    except MemoryError:
        sys.stdout.flush()
        print("MemoryError", file=sys.stderr)
        sys.exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the code's first frame on
        sys.exit(1)


def main():
    cfg = json.loads(sys.argv[1])
    with open(os.path.join(cfg["base"], "code.py"), encoding="utf-8") as f:
        code = f.read()
    try:
        stdlib, engaged, failures = _setup(cfg)
    except Exception as e:  # the sandbox could not be built: nothing of the code has run
        print(f"sandbox setup failed: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(EXIT_SETUP)
    with os.fdopen(cfg["status_fd"], "w") as status:
        status.write(json.dumps({"engaged": engaged, "failures": failures}) + "\n")
    os.environ.clear()  # the parent passed none; this also drops what Python set itself (LC_CTYPE)
    work = os.path.realpath(cfg["work"])
    if cfg["audit_hook"]:
        sys.addaudithook(_audit_hook(work, (work, stdlib)))
    _run(code)


if __name__ == "__main__":
    main()

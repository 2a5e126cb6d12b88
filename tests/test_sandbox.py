"""The sandbox against the attacks of issue 15: each runs with a ~1 s timeout, all at once (they are independent), and
each is bounded (the fork bomb by the process limit, the allocation by the address-space limit, the output by the
cap). Where lmforge runs as root, the kernel's layers are also shown to hold with the audit hook switched off."""

from __future__ import annotations

import ast
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lmforge.agents import sandbox
from lmforge.agents.sandbox import SandboxResult, run_python
from lmforge.errors import ConfigError

AS_ROOT = os.geteuid() == 0
OUTSIDE_FILE = f"/tmp/lmforge-sandbox-escape-{os.getpid()}"
OUTPUT_CAP = 4096

ATTACKS = {
    "normal": "import json, math\nfrom fractions import Fraction\nprint(37 * 48, math.sqrt(16))\n"
              "print(json.dumps({'x': str(Fraction(1, 3) + Fraction(1, 6))}))",
    "environment": "import os\nprint(sorted(os.environ))",
    "workdir": "import os\nprint(os.listdir())\nopen('notes.txt', 'w').write('kept?')\nprint(os.getcwd())",
    "infinite_loop": "import os, sys\nprint(os.getpid(), os.getuid(), flush=True)\nwhile True:\n    pass",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "allocation": "x = bytearray(10 * 2**30)",
    "read_outside": "print(open('/etc/passwd').read())",
    "write_outside": f"open({OUTSIDE_FILE!r}, 'w').write('escaped')",
    "socket": "import socket\ns = socket.socket()\ns.connect(('1.1.1.1', 53))",
    "shell": "import os\nos.system('echo pwned')",
    "subprocess": "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned'])",
    "output_flood": "import sys\nchunk = 'x' * 2**20\nfor _ in range(100):\n    sys.stdout.write(chunk)",
    "crash": "print('before')\n1 / 0",
    "bytecode": "def f():\n    pass\nf.__code__.replace(co_code=b'\\x00' * 8)",
    "tamper": "import sys\ntables = sys._getframe(1).f_globals\ntables['REFUSED_EVENTS'] = ()\n"
              "tables['REFUSED_IMPORTS'].clear()\nimport os\nos.system('echo pwned')",
}
# Code that ends by itself gets a timeout that fits a busy machine.
NOT_ATTACKS = ("normal", "environment", "workdir", "crash")
# With the audit hook off, the kernel's layers alone (own UID, namespaces, read-only mounts, RLIMIT_NPROC).
KERNEL_ONLY = {
    "fork_bomb": "import os, time\nborn = 0\nwhile True:\n    try:\n        pid = os.fork()\n    except OSError:\n"
                 "        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n    born += 1\n"
                 "print(born, os.getuid(), flush=True)",
    "files_and_network": "import os, socket\nfor attempt in (lambda: open('/etc/passwd').read(),\n"
                         f"                lambda: open({OUTSIDE_FILE!r}, 'w'),\n"
                         "                lambda: socket.create_connection(('1.1.1.1', 53), timeout=0.5)):\n"
                         "    try:\n        attempt()\n        print('allowed')\n"
                         "    except OSError as e:\n        print(type(e).__name__, e.strerror)\n"
                         "print(sorted(os.listdir('/')))",
}


def _attack(code: str, hook: bool = True, timeout_s: float = 1) -> tuple[SandboxResult, float]:
    start = time.monotonic()
    result = sandbox._run(code, timeout_s=timeout_s, memory_mb=256, max_output_bytes=OUTPUT_CAP, audit_hook=hook)
    return result, time.monotonic() - start


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[SandboxResult, float]]:
    os.environ["LMFORGE_SANDBOX_SECRET"] = "parent-only"
    try:
        with ThreadPoolExecutor(len(ATTACKS) + len(KERNEL_ONLY)) as pool:
            runs = {name: pool.submit(_attack, code, True, 10 if name in NOT_ATTACKS else 1)
                    for name, code in ATTACKS.items()}
            if AS_ROOT:
                runs |= {f"kernel_{name}": pool.submit(_attack, code, False) for name, code in KERNEL_ONLY.items()}
            return {name: run.result() for name, run in runs.items()}
    finally:
        del os.environ["LMFORGE_SANDBOX_SECRET"]


def _require_kernel_layers() -> None:
    missing = [name for name, on in sandbox.protections().items() if not on]
    if missing:
        pytest.skip(f"this kernel does not allow: {', '.join(missing)}")


def _uids_alive() -> set[int]:
    return set(sandbox._process_uids().values())


def test_normal_code_prints_and_imports(results):
    result, _ = results["normal"]
    assert (result.stdout, result.exit_code, result.error) == ('1776 4.0\n{"x": "1/2"}\n', 0, None)


def test_no_variable_of_the_parent_reaches_the_code(results):
    assert results["environment"][0].stdout == "[]\n"


def test_working_directory_is_fresh_and_removed(results):
    result, _ = results["workdir"]
    listing, cwd = result.stdout.splitlines()
    workdir = Path(cwd)
    assert listing == "[]"
    assert workdir.name == "work" and workdir.parent.name.startswith("lmforge-sandbox-")
    assert not workdir.parent.exists()


def test_infinite_loop_is_killed_at_the_wall_clock_limit_with_no_process_left(results):
    result, seconds = results["infinite_loop"]
    assert result.timed_out and result.error.startswith("timed out after 1 s")
    assert seconds < 1 + sandbox.STARTUP_S
    pid, uid = (int(n) for n in result.stdout.split())
    assert not Path(f"/proc/{pid}").exists() or sandbox._process_uids().get(pid) != uid
    if AS_ROOT:
        assert uid in sandbox.SANDBOX_UIDS and uid not in _uids_alive()


def test_fork_bomb_is_refused(results):
    result, _ = results["fork_bomb"]
    assert result.error == "refused by the sandbox: creating processes (os.fork)"


@pytest.mark.skipif(not AS_ROOT, reason="RLIMIT_NPROC per sandbox needs a UID of its own (root)")
def test_fork_bomb_without_the_hook_stops_at_the_process_limit_and_is_cleaned_up(results):
    _require_kernel_layers()
    result, _ = results["kernel_fork_bomb"]
    born, uid = (int(n) for n in result.stdout.split())
    assert 0 < born < sandbox.PROCESSES
    assert uid != int(results["infinite_loop"][0].stdout.split()[1])  # each sandbox its own UID
    assert uid not in _uids_alive()  # the sleeping children were killed too


def test_10gb_allocation_hits_the_memory_limit(results):
    result, _ = results["allocation"]
    assert result.error == "ran out of memory (the limit is 256 MB)"


def test_reading_and_writing_outside_the_working_directory_are_refused(results):
    assert results["read_outside"][0].error == ("refused by the sandbox: reading /etc/passwd "
                                                "(outside the working directory)")
    assert results["read_outside"][0].stdout == ""
    assert results["write_outside"][0].error.startswith(f"refused by the sandbox: writing {OUTSIDE_FILE}")
    assert not Path(OUTSIDE_FILE).exists()


def test_socket_and_shell_are_refused(results):
    assert results["socket"][0].error == "refused by the sandbox: network access (import _socket)"
    assert results["shell"][0].error == "refused by the sandbox: running programs (os.system)"
    assert results["subprocess"][0].error == "refused by the sandbox: running programs (import _posixsubprocess)"
    assert "pwned" not in results["shell"][0].stdout + results["subprocess"][0].stdout


@pytest.mark.skipif(not AS_ROOT, reason="the UID, namespaces and read-only mounts are root's protections")
def test_kernel_layers_hold_without_the_audit_hook(results):
    _require_kernel_layers()
    passwd, outside, network, root = results["kernel_files_and_network"][0].stdout.splitlines()
    assert passwd == "FileNotFoundError No such file or directory"  # the new root holds no /etc
    assert outside == "OSError Read-only file system"  # ... and is read-only but for the working directory
    assert network == "OSError Network is unreachable"  # the empty network namespace
    assert not {"etc", "proc", "sys", "dev", "home", "work"} & set(ast.literal_eval(root))
    assert not Path(OUTSIDE_FILE).exists()


def test_100mb_of_output_is_cut_at_the_cap_and_killed(results):
    result, _ = results["output_flood"]
    assert result.error == f"printed more than {OUTPUT_CAP} bytes (the output limit); the process was killed"
    assert result.stdout == "x" * OUTPUT_CAP


def test_a_crash_keeps_its_traceback_without_a_sandbox_error(results):
    result, _ = results["crash"]
    assert (result.stdout, result.exit_code, result.error) == ("before\n", 1, None)
    assert result.stderr.strip().splitlines()[-1] == "ZeroDivisionError: division by zero"
    assert "sandbox_child" not in result.stderr


def test_not_root_still_runs_and_warns_once_naming_what_it_lacks(monkeypatch):
    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(sandbox, "_warned", False)
    monkeypatch.setattr(sandbox, "_last_protections", {})  # what root's sandboxes engaged stays as it was
    with pytest.warns(RuntimeWarning, match=r"runs without: (.*, )?own UID \(lmforge is not running as root"):
        assert run_python("print(6 * 7)", timeout_s=2).stdout == "42\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert run_python("print(7)", timeout_s=2).stdout == "7\n"
        if sandbox.protections()["mount namespace"]:  # made in a user namespace: its capabilities must be gone
            escape = "import os\ntry:\n    os.chroot('/usr')\nexcept OSError as e:\n    print(e.strerror)"
            result = sandbox._run(escape, timeout_s=2, memory_mb=256, max_output_bytes=OUTPUT_CAP, audit_hook=False)
            assert result.stdout == "Operation not permitted\n"


def test_emptying_the_hooks_tables_through_the_frames_changes_nothing(results):
    assert results["tamper"][0].error == "refused by the sandbox: running programs (os.system)"


@pytest.mark.parametrize("limit", ["timeout_s", "memory_mb", "max_output_bytes"])
def test_a_limit_that_is_not_positive_is_refused_in_one_line(limit):
    with pytest.raises(ConfigError, match=f"^the sandbox's {limit} must be > 0, got 0$"):
        run_python("print(1)", **{limit: 0})


def test_hand_built_bytecode_is_refused(results):
    assert results["bytecode"][0].error == "refused by the sandbox: building bytecode by hand (code.__new__)"

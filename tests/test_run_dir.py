"""A run directory survives what users do to it: torn metrics lines, two runs at once, killed runs, full disks
and a changed config on --resume."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import lmforge
import lmforge.checkpoint as ckpt_mod
import lmforge.io as lmforge_io
from cli_checks import snapshot, tmpfs_unavailable
from lmforge.cli import STAGES, build_parser, main
from lmforge.errors import DiskFullError
from lmforge.train.config_change import CHANGES_FILE, config_diff, is_free
from lmforge.train.run_lock import LOCK_FILE
from tiny_pretraining import write_config

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"max_steps": 4, "save_every": 2, "eval_every": 2, "warmup_steps": 1}


def pretrain_cli(capsys: pytest.CaptureFixture, config: Path, *args: str) -> tuple[int, str, str]:
    code = main(["pretrain", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error: ") and "Traceback" not in err, err
    return lines[0]


def latest(run: Path) -> str:
    return (run / "latest").read_text().strip()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, shards_dir: Path) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["pretrain", "--config", str(write_config(run.parent / "c.yaml", shards_dir, run, **FAST))]) == 0
    return run


@pytest.fixture
def trained_run(tmp_path: Path, shards_dir: Path, finished_run: Path) -> tuple[Path, Path]:
    """(config, run dir) of a finished 4-step run with checkpoints at steps 2 and 4 (a copy of one)."""
    shutil.copytree(finished_run, tmp_path / "run")
    return write_config(tmp_path / "c.yaml", shards_dir, tmp_path / "run", **FAST), tmp_path / "run"


# ---- B.2: a torn metrics.jsonl -----------------------------------------------------------------------------


def test_resume_drops_a_torn_last_metrics_line(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.')  # a write cut short by a crash or a full disk
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6")
    assert code == 0, err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_damaged_metrics_line_before_the_last(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(run)
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6")
    assert code == 2 and f"{run / 'metrics.jsonl'}:2 " in one_line_error(err)
    assert snapshot(run) == before


# ---- B.4: one run per run dir --------------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from lmforge.train.run_lock import run_dir_lock
    with run_dir_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        sys.stdin.read()
""")


def hold_lock(run: Path) -> subprocess.Popen:
    """Another process holding `run`'s lock (until its stdin closes or it is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "locked\n"
    return proc


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_run_on_a_locked_run_dir_is_refused_naming_the_holder(
        tmp_path: Path, shards_dir: Path, trained_run: tuple[Path, Path], capsys, resume: bool) -> None:
    config, run = trained_run
    if not resume:  # a fresh run into a new dir that another fresh run has just locked
        run = tmp_path / "fresh"
        config = write_config(tmp_path / "fresh.yaml", shards_dir, run, **FAST)
    holder = hold_lock(run)
    try:
        before = snapshot(run)
        code, _, err = pretrain_cli(capsys, config, *(["--resume", "--train.max_steps=6"] if resume else []))
        assert code == 2 and f"in use by another lmforge run (pid {holder.pid}" in one_line_error(err)
        assert snapshot(run) == before
    finally:
        holder.communicate("")
    assert (run / LOCK_FILE).read_text() == ""  # released cleanly: no pid left behind


def test_the_lock_of_a_killed_run_is_taken_over(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    holder = hold_lock(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6")
    assert code == 0, err
    assert [line for line in err.splitlines() if str(holder.pid) in line] == [
        f"lmforge: {run / LOCK_FILE} names pid {holder.pid}, which ended without releasing it (killed?); taking the "
        "run dir over"]
    assert latest(run) == "checkpoints/step_00000006" and (run / LOCK_FILE).read_text() == ""


def test_save_leaves_live_writers_temp_dirs_and_removes_dead_ones(tmp_path: Path) -> None:
    from lmforge.config import ModelConfig
    from lmforge.model.decoder import DecoderLM

    target = tmp_path / "model"
    live = lmforge_io.unique_temp_path(target)  # this process is alive: a save in progress elsewhere in it
    dead = target.parent / f".{target.name}.999999999-0000.tmp"  # beyond pid_max: its writer is gone
    for d in (live, dead):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    model = DecoderLM(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=8, max_seq_len=8))
    lmforge.save(model, None, target)
    assert live.is_dir() and not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "model"])


# ---- B.5: a full disk during a checkpoint ----------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_no_space(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def torch_writer_no_space(*args, **kwargs):  # what torch.save raises on a full disk: no errno left
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


@pytest.mark.parametrize("writer, fail", [("torch.save", no_space), ("save_file", safetensors_no_space),
                                          ("torch.save", torch_writer_no_space)])
def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resume_works(
        trained_run: tuple[Path, Path], capsys, monkeypatch: pytest.MonkeyPatch, writer: str, fail) -> None:
    config, run = trained_run
    monkeypatch.setattr(ckpt_mod.torch if writer == "torch.save" else ckpt_mod, writer.split(".")[-1], fail)
    if fail is torch_writer_no_space:
        monkeypatch.setattr(lmforge_io.shutil, "disk_usage", lambda path: SimpleNamespace(free=0))
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6")
    line = one_line_error(err)
    assert code == 2 and f"no space left on the device of {run / 'checkpoints'} while writing checkpoint " \
                         "step_00000006: it needs about " in line and "bytes" in line
    assert f"{run / 'latest'} still names checkpoints/step_00000004, which is intact" in line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert latest(run) == "checkpoints/step_00000004"
    monkeypatch.undo()  # space freed
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6")
    assert code == 0, err
    assert latest(run) == "checkpoints/step_00000006"


def test_errors_that_are_not_a_full_disk_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert not lmforge_io.is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path, 100)  # space is free
    assert not lmforge_io.is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path, 10**18)
    assert not lmforge_io.is_disk_full(KeyboardInterrupt(), tmp_path, 10**18)
    with pytest.raises(RuntimeError, match="a bug"), lmforge_io.disk_full_guard(tmp_path, 10, "x"):
        raise RuntimeError("a bug")


def test_a_metrics_line_the_disk_cannot_hold_is_cut_back_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')

    class HalfWritten:  # writes part of the line, then the disk is full
        def __init__(self, file, mode):
            self.f = open(file, mode)  # noqa: SIM115

        def write(self, data: bytes) -> None:
            self.f.write(data[:5])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(lmforge_io, "open", HalfWritten, raising=False)
    with pytest.raises(DiskFullError, match=f"^no space left on the device of {tmp_path} while writing metrics.jsonl"):
        lmforge_io.append_line(path, '{"step": 2}')
    assert path.read_text() == '{"step": 1}\n'


def test_a_killed_runs_temp_dirs_are_removed_on_resume(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    for name in (".step_00000005.tmp", ".step_00000003.12345-abcd1234.tmp"):  # old- and new-style names
        (run / "checkpoints" / name).mkdir()
        (run / "checkpoints" / name / "optimizer.pt").write_bytes(b"partial")
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6")
    assert code == 0, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


TMPFS_SCENARIO = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    from lmforge.cli import main

    finished, config, mnt, report = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    run = mnt / "run"
    shutil.copytree(finished, run)  # checkpoints at steps 2 and 4
    results = {}
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    (mnt / "filler").write_bytes(b"x" * (free - 64 * 1024))  # room for metrics lines, not for a checkpoint
    sys.stderr.write("<full>\\n")
    results["full"] = main(["pretrain", "--config", config, "--resume", "--train.max_steps=6"])
    results["after_full"] = {"latest": (run / "latest").read_text().strip(),
                             "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir())}
    (mnt / "filler").unlink()
    results["freed"] = main(["pretrain", "--config", config, "--resume", "--train.max_steps=6"])
    results["latest"] = (run / "latest").read_text().strip()
    report.write_text(json.dumps(results))
""")


@pytest.mark.slow
def test_disk_full_for_real_on_a_small_tmpfs(tmp_path: Path, shards_dir: Path, finished_run: Path) -> None:
    """A checkpoint that does not fit on a small tmpfs (mounted in a private mount namespace): one line, no temp
    dir, `latest` intact; once the filler is deleted, --resume finishes the run."""
    if reason := tmpfs_unavailable():
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    config = write_config(tmp_path / "c.yaml", shards_dir, mnt / "run", **FAST)
    (tmp_path / "scenario.py").write_text(TMPFS_SCENARIO)
    script = (f"mount -t tmpfs -o size=4m tmpfs {mnt} && exec {sys.executable} {tmp_path / 'scenario.py'} "
              f"{finished_run} {config} {mnt} {tmp_path / 'report.json'}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "report.json").read_text())
    full_err = proc.stderr.split("<full>\n", 1)[1].split("lmforge: error: ")
    assert results["full"] == 2, proc.stderr[-3000:]
    assert len(full_err) == 2 and "\n" not in full_err[1].strip() and "Traceback" not in proc.stderr
    assert f"no space left on the device of {mnt / 'run' / 'checkpoints'} while writing checkpoint step_00000006" \
        in full_err[1] and "checkpoints/step_00000004, which is intact" in full_err[1]
    assert results["after_full"] == {"latest": "checkpoints/step_00000004",
                                     "checkpoints": ["step_00000002", "step_00000004"]}
    assert results["freed"] == 0 and results["latest"] == "checkpoints/step_00000006"


# ---- B.7: --resume with a changed config ------------------------------------------------------------------------


def test_resume_with_changed_intervals_and_more_steps_is_allowed(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6", "--train.log_every=2",
                                "--train.eval_every=3", "--train.save_every=3", "--train.keep_checkpoints=3",
                                "--train.progress=true", "--train.eval_batches=1")
    assert code == 0, err
    assert not (run / CHANGES_FILE).exists()


def test_resume_with_a_changed_key_is_refused_naming_it(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    before = snapshot(run)
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6", "--train.lr=0.001",
                                "--model.dropout=0.0")
    line = one_line_error(err)
    assert code == 2 and "train.lr 0.003 -> 0.001" in line and "model.dropout 0.1 -> 0.0" in line
    assert "--accept-config-change" in line and "max_steps" not in line
    assert snapshot(run) == before


def test_accepted_config_change_is_printed_and_recorded(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    code, out, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=6", "--train.lr=0.001",
                                  "--accept-config-change")
    assert code == 0, err
    assert "-train.lr: 0.003\n+train.lr: 0.001\n" in out
    assert [json.loads(line) for line in (run / CHANGES_FILE).read_text().splitlines()] == [
        {"step": 4, "checkpoint": "step_00000004", "changes": {"train.lr": {"old": 0.003, "new": 0.001}}}]
    assert yaml.safe_load((run / latest(run) / "config.yaml").read_text())["train"]["lr"] == 0.001
    # the next resume compares with the config it was continued with
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=8", "--train.lr=0.001")
    assert code == 0, err


def test_resume_with_max_steps_below_the_checkpoint_is_refused(trained_run: tuple[Path, Path], capsys) -> None:
    config, run = trained_run
    code, _, err = pretrain_cli(capsys, config, "--resume", "--train.max_steps=3", "--accept-config-change")
    assert code == 2 and "train.max_steps=3 is below step 4" in one_line_error(err)


def test_config_diff_names_nested_keys_and_only_train_loop_keys_are_free() -> None:
    old = {"model": {"d_model": 32}, "sft": {"train": {"lr": 0.1, "max_steps": 5}, "template": "lmforge"}}
    new = {"model": {"d_model": 32}, "sft": {"train": {"lr": 0.2, "max_steps": 9}, "max_len": 64}}
    assert config_diff(old, new) == {"sft.train.lr": (0.1, 0.2), "sft.train.max_steps": (5, 9),
                                     "sft.template": ("lmforge", "(absent)"), "sft.max_len": ("(absent)", 64)}
    assert [is_free(k) for k in ("sft.train.max_steps", "train.save_every", "sft.train.lr", "model.max_steps")] == [
        True, True, False, False]


@pytest.mark.parametrize("verb", STAGES)
def test_every_config_driven_verb_takes_accept_config_change(verb: str) -> None:
    args = build_parser().parse_args([verb, "--resume", "--accept-config-change"])[verb]
    assert args.resume and args.accept_config_change

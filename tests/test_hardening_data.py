"""Checkpoint dirs read strictly (a `latest` pointer stays inside its run dir; a broken file is one line naming it),
and a full disk for real: `data prepare` and `tokenizer train` on a small tmpfs (root only)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from cli_checks import error_line, snapshot, tmpfs_unavailable
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError, LmforgeError
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import TOKENIZER_FILE, train_tokenizer

TINY = ModelConfig(vocab_size=400, max_seq_len=16, n_layer=1, n_head=2, d_model=16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small lmforge checkpoint dir (model + tokenizer)."""
    tokenizer = train_tokenizer(["some words to learn from"] * 5, vocab_size=400, show_progress=False)
    return lmforge.save(DecoderLM(TINY), tokenizer, tmp_path_factory.mktemp("ckpt") / "model")


# ---- the `latest` pointer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["../", "absolute", "symlink"])
def test_latest_naming_a_dir_outside_the_run_is_refused(tmp_path: Path, checkpoint: Path, how: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Another run's checkpoint must not load through this run dir's `latest`."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, tmp_path / "elsewhere")
    if how == "symlink":
        (run / "checkpoints" / "step_00000001").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    name = {"../": "../elsewhere", "absolute": str(tmp_path / "elsewhere"), "symlink": "checkpoints/step_00000001"}[how]
    (run / "latest").write_text(name + "\n")
    with pytest.raises(CheckpointError, match="outside") as info:
        lmforge.load(run)
    assert str(run / "latest") in str(info.value) and name in str(info.value)
    assert main(["generate", str(run), "--prompt", "some"]) == 2
    assert name in error_line(capsys.readouterr().err)


def test_latest_inside_the_run_still_loads(tmp_path: Path, checkpoint: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / "checkpoints" / "step_00000001")
    (run / "latest").write_text("checkpoints/step_00000001\n")
    model, tokenizer = lmforge.load(run)
    assert model.cfg == TINY and tokenizer is not None


# ---- broken files in a checkpoint: one line naming the file ----------------------------------------------------


@pytest.mark.parametrize(("file", "content", "problem"), [
    (TOKENIZER_FILE, b"garbage", "not a valid tokenizer"),
    (TOKENIZER_FILE, b"\xff\xfe", "not a valid tokenizer"),
    ("config.yaml", b"model:\n  n_layer: x\n  d_model: y\n", "model.n_layer: "),
    ("config.yaml", b"model: [unclosed\n", "line 2, column 1: expected"),
    ("config.yaml", b"# caf\xe9\nmodel: {}\n", "not UTF-8 text (line 1, byte 5)"),
])
def test_broken_checkpoint_file_is_one_line_naming_it(tmp_path: Path, checkpoint: Path, file: str, content: bytes,
                                                      problem: str) -> None:
    ckpt = shutil.copytree(checkpoint, tmp_path / "model")
    (ckpt / file).write_bytes(content)
    with pytest.raises(LmforgeError) as info:
        lmforge.load(ckpt)
    message = str(info.value)
    assert str(ckpt / file) in message and problem in message and "\n" not in message


def test_validation_errors_elsewhere_are_one_line_naming_each_value() -> None:
    """Every place that turns a pydantic ValidationError into a message gives one line (pydantic's own is several)."""
    from lmforge.infer.quant import quant_config
    from lmforge.model.hf import config_from_hf, config_to_hf

    hf = {**config_to_hf(TINY), "n_layer": "x", "n_embd": -1}
    with pytest.raises(ConfigError) as info:
        config_from_hf(hf)
    message = str(info.value)
    assert "n_layer: " in message and "got 'x'" in message and "d_model: " in message and "\n" not in message
    with pytest.raises(ConfigError) as info:
        quant_config(targets=[1, 2])
    assert "quant.targets.0: " in str(info.value) and "\n" not in str(info.value)


# ---- a full disk, for real -------------------------------------------------------------------------------------


def test_disk_full_on_a_small_tmpfs(tmp_path: Path) -> None:
    """`data prepare` and `tokenizer train` writing to a nearly full tmpfs: exit 2, one line naming the directory and
    the bytes needed, no traceback; the dataset and the tokenizer already there stay intact and nothing is left."""
    reason = tmpfs_unavailable()
    if reason:
        pytest.skip(reason)
    words = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly at night".split()
    corpus = tmp_path / "corpus.txt"  # 355 KB: ~700 KB of uint16 token ids with a 366-token tokenizer
    corpus.write_text(" ".join(f"{words[i % 16]}{i * 7919 % 10000}" for i in range(40_000)), encoding="utf-8")
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"{w} {w}"}) + "\n" for w in words), encoding="utf-8")
    before = tmp_path / "before"  # what the tmpfs holds before: a 366-token tokenizer and a small dataset
    assert main(["tokenizer", "train", "--input", str(small), "--vocab-size", "366", "--out", str(before / "tok")]) == 0
    assert main(["data", "prepare", "--input", str(small), "--tokenizer", str(before / "tok"),
                 "--out", str(before / "data")]) == 0
    mnt, after, logs = tmp_path / "mnt", tmp_path / "after", tmp_path / "logs"
    for d in (mnt, after, logs):
        d.mkdir()
    cli = f"{sys.executable} -m lmforge.cli"
    script = f"""
        mount -t tmpfs -o size=64k tmpfs {mnt} || exit 99
        cp -a {before}/. {mnt}/
        {cli} data prepare --input {corpus} --tokenizer {mnt}/tok --out {mnt}/data 2>{logs}/prepare.err
        echo $? >{logs}/prepare.rc
        {cli} tokenizer train --input {corpus} --vocab-size 2000 --out {mnt}/tok 2>{logs}/train.err
        echo $? >{logs}/train.rc
        cp -a {mnt}/. {after}/
    """
    done = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for verb, directory in (("prepare", mnt / "data"), ("train", mnt / "tok")):
        assert (logs / f"{verb}.rc").read_text().strip() == "2", (logs / f"{verb}.err").read_text()
        message = error_line((logs / f"{verb}.err").read_text())
        assert str(directory) in message and "no space left" in message, message
        needed, free = (int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", message))
        assert needed > free, message
    assert snapshot(after) == snapshot(before)  # both intact, and no temporary file or dir left on the tmpfs

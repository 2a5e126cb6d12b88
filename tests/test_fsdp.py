"""FSDP2 (`train.parallel: fsdp`) under torchrun, gloo on CPU: sharded checkpoints (DCP) that resume at another
world size with the same global batch, gathered weights that `lmforge.load` reads, and the README's two-node
recipe on loopback matching one process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_file

import lmforge
from cli_checks import error_line, snapshot
from lmforge.checkpoint import SHARDED_DIR, WEIGHTS_FILE
from lmforge.cli import main
from lmforge.config import PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.sharded import load_sharded_weights
from lmforge.train.distributed import DistContext, grad_accum_at
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.rl import GRPOConfig, PPOConfig, run_grpo, run_ppo
from lmforge.train.trainer import train
from tiny_pretraining import write_word_shards

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_process_torchrun(monkeypatch: pytest.MonkeyPatch):
    """This process as torchrun's only rank (what `torchrun --nproc_per_node 1` sets); the group is left after."""
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    yield lambda: monkeypatch.setenv("MASTER_PORT", str(free_port()))  # a fresh port for each process group
    if dist.is_initialized():
        dist.destroy_process_group()  # a failed command leaves it (cli.main shuts it down after success only)


def write_fsdp_config(root: Path, out: str, **train) -> Path:
    """A pretrain config of a 1-layer decoder on root/shards: FSDP, batch 2 x grad_accum 2, 6 steps saving every 3."""
    tree = {
        "model": {"vocab_size": 400, "max_seq_len": 16, "n_layer": 1, "n_head": 2, "d_model": 16, "dropout": 0.0},
        "data": {"dir": str(root / "shards")},
        "train": {"out_dir": str(root / out), "batch_size": 2, "grad_accum": 2, "max_steps": 6, "warmup_steps": 2,
                  "save_every": 3, "keep_checkpoints": 3, "log_every": 1, "progress": False, "parallel": "fsdp",
                  **train},
    }
    path = root / f"{out}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def launch(args: list[str], config: Path) -> subprocess.Popen:
    """`torchrun ARGS -m lmforge.cli pretrain --config CONFIG`, one thread per rank."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args, "-m", "lmforge.cli", "pretrain",
                             "--config", str(config)], env={**env, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def tokens(run: Path) -> list[int]:
    return [r["tokens"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "tokens" in r]


def assert_close_runs(run: Path, reference: Path) -> None:
    """The same losses at the same steps (1e-5 relative) and the same final weights as `reference` (1e-5: the
    ranks' reductions change the summation order, nothing else)."""
    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (run.name, step, got[step], loss)
    a, b = lmforge.load(run)[0].state_dict(), lmforge.load(reference)[0].state_dict()
    for name in b:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-5), (run.name, name)


def test_fsdp_outside_torchrun_is_refused_saying_how_to_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys) -> None:
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    write_word_shards(tmp_path, n_docs=50, val_fraction=0.0)
    assert main(["pretrain", "--config", str(write_fsdp_config(tmp_path, "run"))]) == 2
    message = error_line(capsys.readouterr().err)
    assert "torchrun --nproc_per_node N -m lmforge.cli" in message and "train.parallel: ddp" in message, message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe", ["ppo", "grpo"])
def test_rl_refuses_fsdp_whose_rollouts_need_the_whole_policy(recipe: str) -> None:
    config = (PPOConfig if recipe == "ppo" else GRPOConfig)(train={"parallel": "fsdp"})
    with pytest.raises(ConfigError, match="set train.parallel: ddp"):
        (run_ppo if recipe == "ppo" else run_grpo)(None, [], None, config, eos_id=None)


def test_a_resumed_run_keeps_its_global_batch_at_a_world_size_that_divides_it() -> None:
    ckpt = Path("run/checkpoints/step_00000003")
    assert grad_accum_at(2, 2, DistContext(0, 1, 0), ckpt) == 4  # 2 ranks x 2 -> 1 rank x 4
    assert grad_accum_at(2, 2, DistContext(1, 4, 1), ckpt) == 1
    with pytest.raises(ConfigError, match=r"4 micro-batches per step .* 3 ranks .* divides it \(1, 2, 4\)"):
        grad_accum_at(2, 2, DistContext(0, 3, 0), ckpt)


def test_one_rank_fsdp_trains_as_one_process_loads_and_refuses_another_model(
        tmp_path: Path, one_process_torchrun, capsys) -> None:
    """FSDP at world size 1 == the plain loop; its sharded-only and gathered checkpoints load with lmforge.load;
    resuming the shards into another model config is one line, nothing changed."""
    write_word_shards(tmp_path, n_docs=200, val_fraction=0.0)
    config = write_fsdp_config(tmp_path, "fsdp", max_steps=2, save_every=1)
    one_process_torchrun()
    assert main(["pretrain", "--config", str(config)]) == 0
    assert main(["pretrain", "--config", str(config), "--train.out_dir", str(tmp_path / "plain"),
                 "--train.parallel=ddp"]) == 0
    run = tmp_path / "fsdp"
    step1, step2 = run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"
    assert (step1 / SHARDED_DIR).is_dir() and not (step1 / WEIGHTS_FILE).exists()  # shards only, mid-run
    plain_final = tmp_path / "plain" / (tmp_path / "plain" / "latest").read_text().strip() / WEIGHTS_FILE
    assert load_file(step2 / WEIGHTS_FILE).keys() == load_file(plain_final).keys()  # gathered, tied weights once
    assert_close_runs(run, tmp_path / "plain")
    final, _ = lmforge.load(run)
    from_shards = DecoderLM(final.cfg)
    load_sharded_weights(from_shards, step2 / SHARDED_DIR)
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, from_shards.state_dict()[name]), name
    earlier, _ = lmforge.load(step1)  # read from its shards alone
    assert not torch.equal(earlier.lm_head.weight, final.lm_head.weight)
    assert main(["export", str(step1), "--out", str(tmp_path / "hf")]) == 0  # gathered on export too
    exported, _ = lmforge.load(tmp_path / "hf")
    assert torch.equal(exported.lm_head.weight, earlier.lm_head.weight)

    before = snapshot(run)
    one_process_torchrun()
    code = main(["pretrain", "--config", str(config), "--resume", "--train.max_steps=4", "--model.d_model=32",
                 "--accept-config-change"])
    message = error_line(capsys.readouterr().err)
    assert code == 2 and "another model config" in message and "[400, 16]" in message, message
    assert snapshot(run) == before


def killed_after_step_3(full: Path, copy: Path) -> None:
    """A copy of the 6-step run `full` as if it had been killed after its step-3 checkpoint."""
    shutil.copytree(full, copy)
    shutil.rmtree(copy / "checkpoints" / "step_00000006")
    (copy / "latest").write_text("checkpoints/step_00000003\n")


@pytest.mark.slow  # one torchrun with two ranks (the full run, then the resumed one) and one rank here: ~15 s
def test_two_rank_shards_resume_at_one_and_at_two_ranks_as_the_uninterrupted_run(
        tmp_path: Path, one_process_torchrun) -> None:
    """Shards saved by 2 ranks at step 3 resume at 2 ranks and at 1 rank (grad_accum 2 -> 4: the same global
    batch) to the losses and weights of the uninterrupted 2-rank run (1e-5 relative); a 1-rank run of one
    micro-batch per step does not resume at 2 ranks."""
    write_word_shards(tmp_path, n_docs=400, val_fraction=0.0)
    config = write_fsdp_config(tmp_path, "full")
    one_process_torchrun()
    assert main(["pretrain", "--config", str(write_fsdp_config(tmp_path, "odd", grad_accum=1, max_steps=1))]) == 0
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, str(tmp_path)], env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 micro-batches per step (train.grad_accum=1 x 1 ranks), which 2 ranks cannot share evenly; resume with " \
        "a world size that divides it (1)" in (tmp_path / "odd_error.txt").read_text()
    full = tmp_path / "full"
    killed_after_step_3(full, tmp_path / "one")
    one_process_torchrun()
    assert main(["pretrain", "--config", str(config), "--resume", "--train.out_dir", str(tmp_path / "one")]) == 0
    for resumed in ("two", "one"):
        assert_close_runs(tmp_path / resumed, full)
        assert tokens(tmp_path / resumed) == tokens(full) == [s * 2 * 2 * 2 * 16 for s in range(1, 7)]


@pytest.mark.slow  # two torchrun launchers and their ranks: ~10 s on 2 cores
def test_two_nodes_on_loopback_equal_one_process_on_the_same_rows(tmp_path: Path) -> None:
    """The README's multi-node recipe (`--nnodes 2 --node-rank R --rdzv-backend c10d`), one rank per "node", FSDP
    with batch B each == one process with batch 2B made of the same rows (1e-5 relative)."""
    write_word_shards(tmp_path, n_docs=400, val_fraction=0.0)
    config = write_fsdp_config(tmp_path, "nodes", save_every=6)
    endpoint = f"127.0.0.1:{free_port()}"
    nodes = [launch(["--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                     "--rdzv-endpoint", endpoint, "--rdzv-id", "lmforge-test"], config) for rank in (0, 1)]
    for node in nodes:
        finish(node)

    single = load_config(PretrainConfig, config, {"train.out_dir": str(tmp_path / "single"), "train.batch_size": 4,
                                                  "train.parallel": "ddp"})
    batches = PackedBatches(load_shards(tmp_path / "shards").tokens("train"), 16, 2, seed=single.train.seed)

    def same_rows(i: int) -> dict[str, torch.Tensor]:  # micro-batch i of rank r is batch 2*i + r
        parts = [batches.batch(2 * i + r) for r in range(2)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    torch.manual_seed(single.train.seed)
    train(DecoderLM(single.model), single.train, same_rows, causal_lm_loss, run_config=single)
    assert_close_runs(tmp_path / "nodes", tmp_path / "single")


if __name__ == "__main__":  # the two ranks of the two-rank resume test, under torchrun: the full run, then "two"
    from lmforge.train.distributed import shutdown_distributed
    from lmforge.train.pretrain import pretrain

    root = Path(sys.argv[1])
    pretrain(load_config(PretrainConfig, root / "full.yaml"))
    if os.environ["RANK"] == "0":
        killed_after_step_3(root / "full", root / "two")
    dist.barrier()
    pretrain(load_config(PretrainConfig, root / "full.yaml", {"train.out_dir": str(root / "two")}), resume=True)
    try:  # every rank stops at the same check, before any collective
        pretrain(load_config(PretrainConfig, root / "odd.yaml", {"train.max_steps": 2}), resume=True)
    except ConfigError as exc:
        if os.environ["RANK"] == "0":
            (root / "odd_error.txt").write_text(str(exc))
    shutdown_distributed()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown under gloo, as lmforge.cli does (pytorch/pytorch#179291)

"""The shared training loop: exact resume after SIGKILL, NaN handling, resume errors, schedule."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.config import ModelConfig, PretrainConfig, TrainConfig
from lmforge.config_loading import load_config
from lmforge.data.batches import PackedBatches
from lmforge.errors import CheckpointError, TrainingError
from lmforge.model.decoder import DecoderLM
from lmforge.train.loss import LossResult
from lmforge.train.metrics_log import TIMING_KEYS
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.pretrain import pretrain
from lmforge.train.trainer import build_optimizer, lr_at, train
from tiny_pretraining import write_config


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "latest").read_text().strip()
    return load_file(str(run_dir / latest / "model.safetensors"))


def run_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmforge.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, shards_dir: Path) -> None:
    """A run killed with SIGKILL at random moments and resumed ends with the exact fp32 weights,
    optimizer state and metrics of an unbroken run (dropout on, so RNG state matters too)."""
    ref_cfg = write_config(tmp_path / "ref.yaml", shards_dir, tmp_path / "ref")
    proc = run_cli("pretrain", "--config", str(ref_cfg))
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    reference = final_weights(tmp_path / "ref")

    cfg = write_config(tmp_path / "run.yaml", shards_dir, tmp_path / "run")
    rng = random.Random(1)
    kills = 0
    resume: tuple[str, ...] = ()
    for _attempt in range(8):
        proc = run_cli("pretrain", "--config", str(cfg), *resume)
        # wait until training is under way (a checkpoint exists), then kill at a random moment
        deadline = time.time() + 60
        while not (tmp_path / "run" / "latest").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            resume = ("--resume",)
        else:
            assert proc.returncode == 0, proc.stderr.read()
            break
    else:
        proc = run_cli("pretrain", "--config", str(cfg), "--resume")
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert kills >= 1, "the run finished before it could be killed; the test did not test resume"
    resumed = final_weights(tmp_path / "run")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    ref_metrics = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    run_metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS} for x in lines]
    assert strip(run_metrics) == strip(ref_metrics)


def small_setup(shards_dir: Path, out: Path, **train) -> tuple[DecoderLM, TrainConfig, PackedBatches, PretrainConfig]:
    config = load_config(PretrainConfig, None, {"data.dir": str(shards_dir), "train.out_dir": str(out),
                                                "model.vocab_size": 400, "model.max_seq_len": 32,
                                                "model.n_layer": 1, "model.n_head": 2, "model.d_model": 16,
                                                "train.progress": False, "train.batch_size": 2,
                                                **{f"train.{k}": v for k, v in train.items()}})
    from lmforge.data.shards import load_shards

    batches = PackedBatches(load_shards(shards_dir).tokens("train"), 32, 2, seed=0)
    torch.manual_seed(0)
    return DecoderLM(config.model), config.train, batches, config


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path: Path, shards_dir: Path) -> None:
    model, tcfg, batches, config = small_setup(shards_dir, tmp_path / "run", max_steps=20, save_every=5)
    calls = {"n": 0}

    def poisoned_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        calls["n"] += 1
        loss = causal_lm_loss(m, batch)
        return LossResult(loss.total * float("nan"), loss.count) if calls["n"] == 13 else loss

    with pytest.raises(TrainingError, match=r"at step 13.*step_00000010.*intact"):
        train(model, tcfg, batches.batch, poisoned_loss, run_config=config)
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_00000010"
    good, _ = lmforge.load(tmp_path / "run")  # loads cleanly, and holds finite weights
    assert all(torch.isfinite(p).all() for p in good.parameters())


def test_resume_errors_leave_everything_untouched(tmp_path: Path, shards_dir: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        model, tcfg, batches, config = small_setup(shards_dir, run, max_steps=4, save_every=2)
        train(model, tcfg, batches.batch, causal_lm_loss, run_config=config, resume=True)
    model, tcfg, batches, config = small_setup(shards_dir, run, max_steps=4, save_every=2)
    train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
    ckpt = run / (run / "latest").read_text().strip()
    snapshot = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    for victim, damage in [("optimizer.pt", "truncate"), ("model.safetensors", "truncate"),
                           ("trainer_state.json", "truncate"), ("rng.pt", "delete"), ("model.safetensors", "delete")]:
        path = ckpt / victim
        original = path.read_bytes()
        if damage == "truncate":
            path.write_bytes(original[: len(original) // 2])
        else:
            path.unlink()
        damaged = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
        model, tcfg, batches, config = small_setup(shards_dir, run, max_steps=8, save_every=2)
        with pytest.raises(CheckpointError, match=victim.replace(".", r"\.")):
            train(model, tcfg, batches.batch, causal_lm_loss, run_config=config, resume=True)
        assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == damaged, "resume wrote files"
        path.write_bytes(original)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot


def test_interrupted_checkpoint_write_never_becomes_latest(tmp_path: Path, shards_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while a checkpoint is being written leaves `latest` on the previous, whole one."""
    import lmforge.checkpoint as ckpt_mod

    model, tcfg, batches, config = small_setup(shards_dir, tmp_path / "run", max_steps=6, save_every=2)
    real_save = ckpt_mod.torch.save
    calls = {"n": 0}

    def crashing_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:  # optimizer.pt of the third checkpoint (step 0, 2, 4: two saves each)
            Path(path).write_bytes(b"partial")
            raise KeyboardInterrupt("simulated crash")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
    monkeypatch.undo()
    assert (tmp_path / "run" / "latest").read_text().strip() == "checkpoints/step_00000002"
    model, tcfg, batches, config = small_setup(shards_dir, tmp_path / "run", max_steps=6, save_every=2)
    result = train(model, tcfg, batches.batch, causal_lm_loss, run_config=config, resume=True)
    assert result.step == 6 and not list((tmp_path / "run" / "checkpoints").glob(".*tmp"))


def test_pretrain_writes_metrics_checkpoints_and_loads(tmp_path: Path, shards_dir: Path) -> None:
    cfg = load_config(PretrainConfig, write_config(tmp_path / "c.yaml", shards_dir, tmp_path / "run",
                                                   max_steps=12, save_every=4, eval_every=6, log_every=2))
    result = pretrain(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8, 10, 12]
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9) for r in records if "val_loss" in r)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000008", "step_00000012"]
    assert result.val_loss is not None and result.val_loss < math.log(400)  # learned something
    model, tok = lmforge.load(tmp_path / "run")
    assert tok is not None and tok.vocab_size == 400 and not model.training


def test_metrics_log_mfu_against_the_given_or_measured_peak(tmp_path: Path, shards_dir: Path) -> None:
    """Each log record's MFU is the model's training FLOPs per second (flops_per_token x tokens/s) over the peak:
    train.peak_flops when given, else a matmul's rate measured on the device (positive, finite)."""
    for name, peak in (("given", 1e9), ("measured", None)):
        model, tcfg, batches, config = small_setup(shards_dir, tmp_path / name, max_steps=4, log_every=2,
                                                   peak_flops=peak)
        train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
        records = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        logged = [r for r in records if "loss" in r]
        assert [r["step"] for r in logged] == [2, 4] and all(0 < r["mfu"] < math.inf for r in logged)
        if peak is not None:
            for r in logged:
                assert r["mfu"] * peak == pytest.approx(r["tokens_per_s"] * model.flops_per_token(32), rel=1e-9)


def test_measuring_the_peak_leaves_the_random_streams_alone() -> None:
    """The MFU peak is measured mid-run, at the first log: drawing its matrices from the global generator would shift
    dropout and sampling after it, and a resumed run (whose process measured already) would differ from an unbroken
    one."""
    from lmforge.train.mfu import matmul_peak_flops

    state = torch.get_rng_state()
    assert matmul_peak_flops(torch.device("cpu"), torch.float32, (64,)) > 0
    assert torch.equal(torch.get_rng_state(), state)


def test_schedule_and_weight_decay_groups() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(0.5 * (1e-3 + 1e-4))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    model = DecoderLM(ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=8, max_seq_len=8))
    decay, no_decay = build_optimizer(model, cfg).param_groups
    assert decay["weight_decay"] == cfg.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()


def test_cpu_optimizer_is_fused_and_steps_as_foreach_adamw() -> None:
    """On a CPU `build_optimizer` takes PyTorch's fused AdamW: three steps with weight decay move every parameter as
    the foreach AdamW with the same groups does, within fp32 rounding."""
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    # Llama: no key bias, whose gradient is rounding noise that Adam's normalisation would blow up to full steps
    config = ModelConfig(family="llama", vocab_size=50, n_layer=1, n_head=2, d_model=8, max_seq_len=8)
    models = [DecoderLM(config) for _ in "ab"]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], cfg)
    assert fused.defaults["fused"] and not fused.defaults["foreach"]
    params = list(models[1].parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=True)
    ids = torch.randint(0, 50, (2, 8))
    for _ in range(3):
        for model, opt in zip(models, (fused, reference), strict=True):
            model(ids, labels=ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, got), want in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), name


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path, shards_dir: Path) -> None:
    """train.compile=true (torch.compile of the forward) reaches the same weights as eager (atol 1e-5)."""
    from torch._dynamo.utils import counters

    weights, graphs = {}, {}
    for flag in ("false", "true"):
        counters.clear()
        model, tcfg, batches, config = small_setup(shards_dir, tmp_path / flag, max_steps=3, compile=flag)
        train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
        weights[flag], graphs[flag] = model.state_dict(), counters["stats"]["unique_graphs"]
    assert graphs == {"false": 0, "true": graphs["true"]} and graphs["true"] >= 1  # compiled only when asked
    for name, tensor in weights["false"].items():
        assert torch.allclose(tensor, weights["true"][name], atol=1e-5), name


def test_fresh_run_into_an_existing_run_dir_is_refused(tmp_path: Path, shards_dir: Path) -> None:
    model, tcfg, batches, config = small_setup(shards_dir, tmp_path / "run", max_steps=4, save_every=2)
    train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    model, tcfg, batches, config = small_setup(shards_dir, tmp_path / "run", max_steps=2, save_every=1)
    with pytest.raises(CheckpointError, match="already holds a run.*--resume"):
        train(model, tcfg, batches.batch, causal_lm_loss, run_config=config)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


RUN_TWICE = """
import json, sys, torch
from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from lmforge.eval.report import metric_series
from lmforge.train.pretrain import pretrain
shards, out = sys.argv[1], sys.argv[2]
losses = []
for i in range(2):
    if i:  # a thread change between two runs, by code other than the trainer (the demo's serving stage makes one)
        torch.set_num_threads(1)
        torch.set_num_threads(2)
    cfg = PretrainConfig(
        model=ModelConfig(vocab_size=400, max_seq_len=256, n_layer=1, n_head=2, d_model=64),
        data=DataConfig(dir=shards),
        train=TrainConfig(out_dir=f"{out}/run{i}", batch_size=1, max_steps=3, warmup_steps=1, save_every=3,
                          eval_every=3, eval_batches=1, log_every=1, progress=False))
    pretrain(cfg)
    losses.append(metric_series(f"{out}/run{i}/metrics.jsonl", "loss")[1])
print(json.dumps(losses))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="the thread pool's state only matters with 2 or more threads")
def test_two_runs_in_one_process_are_bit_identical_across_thread_changes(tmp_path: Path, shards_dir: Path) -> None:
    """A fresh process on 2 threads trains one config, changes its thread count and back, and trains it again: the
    losses match bit for bit. SDPA's CPU backward at these shapes (2 heads of 32, 256 positions) splits its work
    differently before a process's first `set_num_threads` call than after it, so the trainer pins the count; and
    through `set_cpu_threads`, without which the first run's first loss changed in about one process in ten (its
    exp, MKL's first vector-math call after `set_num_threads` and SDPA, came out inexact)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", RUN_TWICE, str(shards_dir), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(first) == 3 and first == second

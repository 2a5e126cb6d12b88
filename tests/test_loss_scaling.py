"""fp16 mixed precision with dynamic loss scaling (train.precision=fp16): a step whose gradients hold inf or nan is
skipped (weights and Adam state unchanged) and the scale halved; after train.loss_scale_growth_interval good steps
the scale doubles; the scaler's state is checkpointed, so resume stays exact. Tiny: fp16 matmuls are slow on CPUs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config import PretrainConfig
from lmforge.config_loading import load_config
from lmforge.data.batches import PackedBatches
from lmforge.data.shards import load_shards
from lmforge.errors import ConfigError
from lmforge.model.decoder import DecoderLM
from lmforge.train.loss import LossResult
from lmforge.train.metrics_log import TIMING_KEYS
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.trainer import train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest on one thread

POISONED_CALL = 2  # the loss of optimizer step 2 (one micro-batch per step) gets infinite gradients


class InfiniteGradient(torch.autograd.Function):
    """The identity forward; an infinite gradient backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf"))


def poisoned_loss(calls: dict[str, int], crash_at: int = 0):
    """causal_lm_loss, with infinite gradients at call POISONED_CALL, and a crash (KeyboardInterrupt) at `crash_at`."""
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt("simulated crash")
        result = causal_lm_loss(model, batch)
        if calls["n"] == POISONED_CALL:
            return LossResult(InfiniteGradient.apply(result.total), result.count, result.metrics)
        return result
    return loss_fn


def fp16_setup(shards_dir: Path, out: Path, max_steps: int) -> tuple[DecoderLM, PretrainConfig, PackedBatches]:
    config = load_config(PretrainConfig, None, {
        "data.dir": str(shards_dir), "model.vocab_size": 400, "model.max_seq_len": 8, "model.n_layer": 1,
        "model.n_head": 2, "model.d_model": 16, "train.out_dir": str(out), "train.batch_size": 2,
        "train.max_steps": max_steps, "train.warmup_steps": 1, "train.save_every": 1, "train.keep_checkpoints": 10,
        "train.log_every": 1, "train.progress": False, "train.device": "cpu", "train.precision": "fp16",
        "train.loss_scale_init": 1024.0, "train.loss_scale_growth_interval": 2})
    torch.manual_seed(0)
    return DecoderLM(config.model), config, PackedBatches(load_shards(shards_dir).tokens("train"), 8, 2, seed=0)


def weights_at(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def step_records(run: Path) -> list[dict]:
    """The per-step records of metrics.jsonl, without the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def reference_run(shards_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DecoderLM]:
    """5 fp16 steps, step 2's gradients infinite, every checkpoint kept: (run dir, trained model)."""
    run = tmp_path_factory.mktemp("fp16") / "ref"
    model, config, batches = fp16_setup(shards_dir, run, max_steps=5)
    train(model, config.train, batches.batch, poisoned_loss({"n": 0}), run_config=config)
    return run, model


def test_inf_gradients_skip_the_step_halve_the_scale_and_good_steps_grow_it(
        reference_run: tuple[Path, DecoderLM]) -> None:
    run, model = reference_run
    records = step_records(run)
    # the scale after each step: growth interval 2, so 1024 -> (skipped) 512 -> 512 -> 1024 -> 1024
    assert [r["loss_scale"] for r in records] == [1024.0, 512.0, 512.0, 1024.0, 1024.0]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1, 1]
    before, skipped, after = weights_at(run, 1), weights_at(run, 2), weights_at(run, 3)
    assert all(torch.equal(before[k], skipped[k]) for k in before), "the skipped step changed the weights"
    assert any(not torch.equal(skipped[k], after[k]) for k in before), "the step after the skip did not train"
    adam_steps = [[state["step"] for state in torch.load(run / "checkpoints" / f"step_{s:08d}" / "optimizer.pt",
                                                         weights_only=True)["state"].values()] for s in (1, 2)]
    assert adam_steps[0] == adam_steps[1], "the skipped step advanced Adam"
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_fp16_resume_restores_the_loss_scale_exactly(reference_run: tuple[Path, DecoderLM], tmp_path: Path,
                                                     shards_dir: Path) -> None:
    model, config, batches = fp16_setup(shards_dir, tmp_path / "run", max_steps=5)
    with pytest.raises(KeyboardInterrupt):  # killed during step 4, after step 3's checkpoint
        train(model, config.train, batches.batch, poisoned_loss({"n": 0}, crash_at=4), run_config=config)
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert state["grad_scaler"]["scale"] == 512.0 and state["skipped_steps"] == 1
    model, config, batches = fp16_setup(shards_dir, tmp_path / "run", max_steps=5)
    train(model, config.train, batches.batch, poisoned_loss({"n": POISONED_CALL}), run_config=config, resume=True)
    ref_run, _ = reference_run
    assert step_records(tmp_path / "run") == step_records(ref_run)
    ref, resumed = weights_at(ref_run, 5), weights_at(tmp_path / "run", 5)
    assert all(torch.equal(ref[k], resumed[k]) for k in ref)


@pytest.mark.parametrize("key, value", [("loss_scale_init", 0.0), ("loss_scale_growth_interval", 0)])
def test_loss_scale_settings_must_be_positive(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"train.{key}"):
        load_config(PretrainConfig, None, {f"train.{key}": value})

"""Gradient accumulation and data parallelism weight every loss-bearing token alike: however a batch of
conversations with masked prompts and different lengths is split into micro-batches or ranks, the optimizer
sees the gradient of the whole batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from lmforge.config import ModelConfig, TrainConfig
from lmforge.model.decoder import DecoderLM
from lmforge.train.distributed import shutdown_distributed
from lmforge.train.loss import LossResult
from lmforge.train.objectives import IGNORE_INDEX, causal_lm_loss
from lmforge.train.trainer import train

PARALLEL = ("ddp", "fsdp")  # the two-rank runs: replicated, then sharded
MODEL = ModelConfig(vocab_size=64, max_seq_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.0)
# (prompt tokens, reply tokens) of each conversation: the loss is on the reply only, as in SFT
SHAPES = [(3, 9), (7, 2), (2, 5), (6, 1), (1, 11), (5, 3), (4, 4), (8, 2)]


class RunConfig(BaseModel):
    model: ModelConfig


def conversations() -> list[dict[str, torch.Tensor]]:
    """One unpadded row per conversation: `input_ids` [1, T] and `labels` with the prompt masked out."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, reply in SHAPES:
        ids = torch.randint(0, MODEL.vocab_size, (prompt + reply + 1,), generator=g)
        labels = ids[1:].clone()
        labels[:prompt - 1] = IGNORE_INDEX
        rows.append({"input_ids": ids[None, :-1], "labels": labels[None]})
    return rows


def stacked(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad rows to one width (padding carries no loss) and stack them into one batch."""
    width = max(r["input_ids"].shape[1] for r in rows)
    return {"input_ids": torch.cat([F.pad(r["input_ids"], (0, width - r["input_ids"].shape[1])) for r in rows]),
            "labels": torch.cat([F.pad(r["labels"], (0, width - r["labels"].shape[1]), value=IGNORE_INDEX)
                                 for r in rows])}


def train_on(out_dir: Path, batch_at: Callable[[int], dict[str, torch.Tensor]], grad_accum: int,
             max_steps: int, parallel: str = "ddp") -> list[dict[str, torch.Tensor]]:
    """Train a fresh seeded model with the shared trainer (no gradient clipping); the gradients the optimizer
    stepped on, step by step (under FSDP, each gathered from the ranks' shards)."""
    torch.manual_seed(0)
    model = DecoderLM(MODEL)
    grads: list[dict[str, torch.Tensor]] = []

    def capture(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        grads.append({name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                      for name, p in model.named_parameters()})  # the optimizer's parameters (FSDP's, once sharded)

    cfg = TrainConfig(out_dir=str(out_dir), max_steps=max_steps, grad_accum=grad_accum, lr=1e-2, warmup_steps=0,
                      grad_clip=0.0, progress=False, device="cpu", parallel=parallel)
    handle = register_optimizer_step_pre_hook(capture)
    try:
        train(model, cfg, batch_at, causal_lm_loss, run_config=RunConfig(model=MODEL))
    finally:
        handle.remove()
    return grads


def max_difference(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> float:
    assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b, strict=True))
    return max((x[k] - y[k]).abs().max().item() for x, y in zip(a, b, strict=True) for k in x)


def test_accumulating_single_conversations_gives_the_gradient_of_their_batch(tmp_path: Path) -> None:
    """grad_accum=4 x micro-batch 1 == one batch of the 4 conversations (each has a different number of reply
    tokens, so a mean of per-micro-batch means would weight the short replies' tokens more)."""
    rows = conversations()[:4]
    accumulated = train_on(tmp_path / "accum", lambda i: rows[i % 4], grad_accum=4, max_steps=1)
    whole = train_on(tmp_path / "batch", lambda i: stacked(rows), grad_accum=1, max_steps=1)
    diff = max_difference(accumulated, whole)
    assert diff <= 1e-6, diff


def test_loss_metrics_are_logged_on_logged_steps_averaged_over_micro_batches(tmp_path: Path) -> None:
    """The trainer alone writes metrics.jsonl: the loss function's metrics join the step's record (the mean over
    its micro-batches), and `final_eval`'s held-out scores close the log as eval_<name>."""
    rows = conversations()

    def loss_with_index(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossResult:
        loss = causal_lm_loss(model, batch)
        return LossResult(loss.total, loss.count, {"index": batch["index"].float().mean()})

    cfg = TrainConfig(out_dir=str(tmp_path), max_steps=3, grad_accum=2, log_every=2, progress=False, device="cpu")
    torch.manual_seed(0)
    result = train(DecoderLM(MODEL), cfg, lambda i: {**rows[i % 8], "index": torch.tensor([i])}, loss_with_index,
                   run_config=RunConfig(model=MODEL), final_eval=lambda model: {"score": 0.25})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in records if "index" in r] == [(2, 2.5), (3, 4.5)]  # micro-batches 2+3, 4+5
    assert records[-1] == {"step": 3, "eval_score": 0.25} and result.eval_metrics == {"score": 0.25}


def ddp_rows(index: int) -> dict[str, torch.Tensor]:
    """Micro-batch `index` of the two-rank runs: one conversation (with grad_accum=2, rank r of micro-batch m of
    step s reads conversation (2s + m) * 2 + r; with grad_accum=1, conversation 2s + r)."""
    return conversations()[index % len(SHAPES)]


def step_rows(rows: list[dict[str, torch.Tensor]], per_step: int, step: int) -> dict[str, torch.Tensor]:
    """The conversations all ranks read at `step`, as one batch."""
    return stacked(rows[per_step * step:per_step * (step + 1)])


@pytest.mark.slow  # three processes (torchrun and two ranks), each importing torch: ~10 s
def test_two_ranks_with_uneven_token_counts_equal_one_process(tmp_path: Path) -> None:
    """2 gloo ranks x grad_accum 2 (or 1) x one conversation each == one process training on the 4 (or 2)
    conversations of each step as one batch, under DDP and under FSDP: the same gradient at every step
    (all-reduce and reduce-scatter change only the summation order)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
         str(tmp_path / "ddp")],
        env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = conversations()
    for accum in (2, 1):
        single = train_on(tmp_path / f"single{accum}", partial(step_rows, rows, 2 * accum), grad_accum=1,
                          max_steps=2)
        for parallel in PARALLEL:
            diff = max_difference(torch.load(tmp_path / "ddp" / f"grads_{parallel}_accum{accum}.pt"), single)
            assert diff <= 1e-6, (parallel, accum, diff)


if __name__ == "__main__":  # one rank of the two-rank run above, under torchrun
    out = Path(sys.argv[1])
    for parallel in PARALLEL:
        for accum in (2, 1):
            grads = train_on(out / f"{parallel}{accum}", ddp_rows, grad_accum=accum, max_steps=2, parallel=parallel)
            if os.environ["RANK"] == "0":
                torch.save(grads, out / f"grads_{parallel}_accum{accum}.pt")
    shutdown_distributed()

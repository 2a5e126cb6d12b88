"""The training settings the demo's short fine-tuning runs share (post-training and PEFT): a fixed step budget,
warm-up over its first tenth, four validations, one checkpoint at the end."""

from __future__ import annotations

from pathlib import Path

from lmforge.config import TrainConfig


def short_run(out: Path, steps: int, lr: float, batch_size: int = 16, **extra) -> TrainConfig:
    return TrainConfig(out_dir=str(out), max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=max(1, steps // 10),
                       batch_size=batch_size, eval_every=max(1, steps // 4), save_every=steps,
                       log_every=max(1, steps // 20), progress=False, **extra)

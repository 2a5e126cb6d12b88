"""Early stopping on the validation loss: stop when it has not improved for `patience` evaluations in a row.

The state is rebuilt on resume from the run's own metrics.jsonl (its val_loss records up to the checkpoint's step), so
a resumed run stops where an unbroken one would, without anything added to the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import TrainConfig
from lmforge.train.metrics_log import METRICS_FILE, read_metrics


@dataclass
class EarlyStopping:
    patience: int  # 0: never stop
    min_delta: float  # an improvement must lower the best loss by more than this
    best: float = math.inf
    evaluations_without_improvement: int = 0

    @classmethod
    def for_run(cls, cfg: TrainConfig, run_dir: Path, resume_step: int | None) -> EarlyStopping:
        """A fresh state, or on resume the state after replaying the log's validation losses up to `resume_step`."""
        stopper = cls(cfg.early_stopping_patience, cfg.early_stopping_min_delta)
        log = run_dir / METRICS_FILE
        if resume_step is not None and stopper.patience and log.is_file():
            for _, record in read_metrics(log):
                if "val_loss" in record and record.get("step", 0) <= resume_step:
                    stopper.update(record["val_loss"])
        return stopper

    @property
    def stopped(self) -> bool:
        return self.patience > 0 and self.evaluations_without_improvement >= self.patience

    def update(self, val_loss: float) -> bool:
        """Record one evaluation; True when the run should stop now."""
        if val_loss < self.best - self.min_delta:
            self.best, self.evaluations_without_improvement = val_loss, 0
        else:
            self.evaluations_without_improvement += 1
        return self.stopped

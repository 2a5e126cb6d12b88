"""What a stage's loss function hands the shared trainer.

The trainer sums `total` and `count` over the micro-batches of an optimizer step and over ranks, and divides
once: the gradient is that of the whole batch however it is split (a mean of per-micro-batch means is not,
when micro-batches hold different numbers of loss-bearing tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class LossResult:
    """`total`: the sum of per-token (or per-item: pairs, sequences) losses of one micro-batch; `count`: how many
    tokens or items it sums over; `metrics`: scalar statistics of the micro-batch (means), for the log."""

    total: Tensor
    count: Tensor | int
    metrics: dict[str, Tensor] = field(default_factory=dict)

    def mean(self) -> Tensor:
        """The loss of this micro-batch alone: total / count (nan when nothing carries loss)."""
        return self.total / torch.as_tensor(self.count, dtype=self.total.dtype, device=self.total.device)


def log_dtype(device: torch.device) -> torch.dtype:
    """The dtype for values on their way to the log: float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64

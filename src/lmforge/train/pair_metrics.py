"""The log metrics of a pairwise loss (reward model, DPO): how the chosen responses score against the rejected."""

from __future__ import annotations

from torch import Tensor


def reward_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """A pair batch's log metrics from its chosen and rejected rewards [B]: their means, the mean margin and how
    often the chosen response wins."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    return {"rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
            "rewards/margin": (chosen - rejected).mean(), "rewards/accuracy": (chosen > rejected).float().mean()}

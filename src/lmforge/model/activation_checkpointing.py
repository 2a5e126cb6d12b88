"""Activation checkpointing (Chen et al. 2016): a block keeps only its input for the backward and runs its forward
again there, trading one more forward per block for the activations it would have stored.

Each model's Transformer blocks derive from `CheckpointableBlock`; `set_activation_checkpointing(model, True)`
turns it on for every block inside `model` (a bare model, a task model or a PEFT-wrapped one alike). The state
dict is unchanged, so checkpoints load either way.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointableBlock(nn.Module):
    """A block that, with `checkpoint_activations` set, recomputes its activations in the backward (training with
    gradients only: evaluation and decoding run as usual). torch's non-reentrant checkpoint replays the RNG, so
    dropout draws the same mask twice and the gradients are those of the plain forward."""

    checkpoint_activations = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Switch activation checkpointing of every block in `model` on or off; the number of blocks switched."""
    blocks = [m for m in model.modules() if isinstance(m, CheckpointableBlock)]
    for block in blocks:
        block.checkpoint_activations = enabled
    return len(blocks)

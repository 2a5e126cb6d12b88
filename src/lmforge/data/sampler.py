"""The seeded epoch sampler every training stream draws its rows from (packed windows, task examples, pairs).

The stream of item ids is the concatenation of per-epoch permutations of `range(n)` (epoch e's is
`np.random.default_rng([seed, e]).permutation(n)`, or `range(n)` unshuffled), and batch `i` takes items
`[i*B, (i+1)*B)` of it. A batch index alone fixes a batch, so resuming at a step needs no saved iterator state.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np

Item = TypeVar("Item")
Batch = TypeVar("Batch")

_CACHED_EPOCHS = 2  # a batch is never larger than an epoch, so it spans at most two


class EpochSampler:
    """Item ids of batch `index` in an endless stream of seeded per-epoch permutations of `n` items; the batch size
    is capped at `n`, so a batch never holds an item twice."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True):
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n, self.batch_size, self.seed, self.shuffle = n, min(batch_size, n), seed, shuffle
        self._orders: dict[int, np.ndarray] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Whole batches in one pass over the items (the stream itself never stops)."""
        return self.n // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The item ids of one epoch, in the order they are served."""
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
            if len(self._orders) >= _CACHED_EPOCHS:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = order
        return order

    def batch_ids(self, index: int) -> np.ndarray:
        """The item ids making up batch `index` (int64 [batch_size])."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        start, stop = index * self.batch_size, (index + 1) * self.batch_size
        parts = []
        for epoch in range(start // self.n, (stop - 1) // self.n + 1):
            base = epoch * self.n
            parts.append(self.epoch_order(epoch)[max(start, base) - base:min(stop, base + self.n) - base])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]


def shuffled_batches(items: Sequence[Item], batch_size: int, seed: int,
                     collate: Callable[[list[Item]], Batch]) -> Callable[[int], Batch]:
    """The trainer's `batch_at`: batch i collates the items of `EpochSampler` batch i, a pure function of (seed, i)."""
    sampler = EpochSampler(len(items), batch_size, seed)
    return lambda index: collate([items[i] for i in sampler.batch_ids(index)])

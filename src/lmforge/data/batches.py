"""Packed causal-LM batches: a pure function from batch index to tensors, so resuming is exact.

The token stream is cut into non-overlapping windows of `seq_len + 1` tokens (windows cross
document boundaries; documents are already separated by EOS). The stream of window ids is the
concatenation of per-epoch permutations, and batch `i` takes items `[i*B, (i+1)*B)` of it, so a
batch index alone fixes a batch: no iterator state has to be saved in a checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from lmforge.errors import DataError

_CACHED_EPOCHS = 2  # a batch spans at most two epochs


class PackedBatches:
    """Deterministic, infinite stream of `{"input_ids", "labels"}` LongTensor[B, T] batches."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.window = seq_len + 1
        self.num_windows = len(tokens) // self.window
        if self.num_windows < batch_size:
            need = batch_size * self.window
            raise DataError(
                f"the corpus has {len(tokens)} tokens, but one batch needs batch_size * (seq_len + 1) = "
                f"{batch_size} * {self.window} = {need}; use a smaller batch_size or seq_len, or more data"
            )
        self._offsets = np.arange(self.window, dtype=np.int64)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_batches_per_epoch(self) -> int:
        """Whole batches in one pass over the windows (the stream itself never stops)."""
        return self.num_windows // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The window ids of one epoch, in the order they are served."""
        order = self._orders.get(epoch)
        if order is None:
            if self.shuffle:
                order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            else:
                order = np.arange(self.num_windows)
            if len(self._orders) >= _CACHED_EPOCHS:
                self._orders.pop(next(iter(self._orders)))
            self._orders[epoch] = order
        return order

    def window_ids(self, index: int) -> np.ndarray:
        """The window ids making up batch `index`."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        start, stop = index * self.batch_size, (index + 1) * self.batch_size
        first_epoch, last_epoch = start // self.num_windows, (stop - 1) // self.num_windows
        parts = []
        for epoch in range(first_epoch, last_epoch + 1):
            base = epoch * self.num_windows
            lo, hi = max(start, base) - base, min(stop, base + self.num_windows) - base
            parts.append(self.epoch_order(epoch)[lo:hi])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index` of the stream: labels are the inputs shifted left by one token."""
        starts = self.window_ids(index).astype(np.int64) * self.window
        rows = np.asarray(self.tokens[starts[:, None] + self._offsets]).astype(np.int64)
        ids = torch.from_numpy(rows)
        return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in itertools.count():
            yield self.batch(index)

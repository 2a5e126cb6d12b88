"""Packed causal-LM batches: a pure function from batch index to tensors, so resuming is exact.

The token stream is cut into non-overlapping windows of `seq_len + 1` tokens (windows cross
document boundaries; documents are already separated by EOS), served in `EpochSampler` order, so a
batch index alone fixes a batch: no iterator state has to be saved in a checkpoint.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import torch

from lmforge.data.sampler import EpochSampler
from lmforge.errors import DataError


class PackedBatches:
    """Deterministic, infinite stream of `{"input_ids", "labels"}` LongTensor[B, T] batches."""

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, shuffle: bool = True):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.window = seq_len + 1
        self.num_windows = len(tokens) // self.window
        if self.num_windows < batch_size:
            need = batch_size * self.window
            raise DataError(
                f"the corpus has {len(tokens)} tokens, but one batch needs batch_size * (seq_len + 1) = "
                f"{batch_size} * {self.window} = {need}; use a smaller batch_size or seq_len, or more data"
            )
        self.sampler = EpochSampler(self.num_windows, batch_size, seed, shuffle)
        self._offsets = np.arange(self.window, dtype=np.int64)

    @property
    def num_batches_per_epoch(self) -> int:
        """Whole batches in one pass over the windows (the stream itself never stops)."""
        return self.sampler.batches_per_epoch

    def window_ids(self, index: int) -> np.ndarray:
        """The window ids making up batch `index`."""
        return self.sampler.batch_ids(index)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Batch `index` of the stream: labels are the inputs shifted left by one token."""
        starts = self.window_ids(index).astype(np.int64) * self.window
        rows = np.asarray(self.tokens[starts[:, None] + self._offsets]).astype(np.int64)
        ids = torch.from_numpy(rows)
        return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in itertools.count():
            yield self.batch(index)

"""Packed causal-LM batches drawn from several token streams in proportion to sampling weights (a data mixture).

Global rows are dealt in blocks of `BLOCK_ROWS`: each block holds every source's fixed share of rows (its weight's
share of the block, by largest remainders), in a seeded order of its own. A row's source and its position in that
source's stream are then pure functions of the row index: row g of source s is the
`(g // BLOCK_ROWS) * rows_s + (rank of g among s's rows in its block)`-th window of s's own endless `EpochSampler`
stream. So batch i is a pure function of (seed, i), and a resumed run sees exactly the batches of an unbroken one,
with no sampler state in the checkpoint. A small source with a large weight is repeated (several epochs), a large
one with a small weight is subsampled, as in LLaMA's data table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmforge.config import DataSource
from lmforge.data.sampler import EpochSampler
from lmforge.data.shards import ShardIndex, load_shards
from lmforge.errors import DataError
from lmforge.tokenizer import TOKENIZER_FILE

BLOCK_ROWS = 4096  # weights are honoured to 1/4096 of the rows, exactly over every block
_CACHED_BLOCKS = 2


def rows_per_block(weights: Sequence[float], block: int = BLOCK_ROWS) -> np.ndarray:
    """Each source's rows in a block of `block` rows: its share of the weights, by largest remainders (ties: the
    earlier source), every source with a positive weight getting at least one."""
    w = np.asarray(weights, dtype=np.float64)
    exact = w / w.sum() * block
    rows = np.floor(exact).astype(np.int64)
    rows[(w > 0) & (rows == 0)] = 1
    order = sorted(range(len(w)), key=lambda s: (-(exact[s] - np.floor(exact[s])), s))
    for s in order[:max(0, block - int(rows.sum()))]:
        rows[s] += 1
    while rows.sum() > block:  # minimum rows given out above: take them back from the largest
        rows[int(np.argmax(rows))] -= 1
    return rows


class MixedBatches:
    """Deterministic, infinite stream of `{"input_ids", "labels"}` LongTensor[B, T] batches, each row a window of
    `seq_len + 1` tokens of one source (as `PackedBatches` cuts a single stream)."""

    def __init__(self, streams: Sequence[np.ndarray], weights: Sequence[float], seq_len: int, batch_size: int,
                 seed: int, names: Sequence[str], shuffle: bool = True):
        self.window = seq_len + 1
        self.batch_size, self.seed, self.names = batch_size, seed, list(names)
        self.streams = list(streams)
        windows = [len(tokens) // self.window for tokens in self.streams]
        for name, count, tokens in zip(names, windows, self.streams, strict=True):
            if count == 0:
                raise DataError(f"data.sources.{name} has {len(tokens)} tokens, fewer than one row of seq_len + 1 = "
                                f"{self.window}; give it more data or a smaller seq_len")
        # each source its own permutations; the source index keeps two sources of one size from sharing an order
        self.samplers = [EpochSampler(n, 1, seed * 1009 + s, shuffle) for s, n in enumerate(windows)]
        self.rows = rows_per_block(weights)
        self.num_batches_per_epoch = max(1, sum(windows) // batch_size)
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._offsets = np.arange(self.window, dtype=np.int64)

    def describe(self, rows: int) -> str:
        """Each source's share of the rows and how many epochs of it `rows` training rows make (LLaMA's table)."""
        shares = self.rows / self.rows.sum()
        parts = [f"{name} {share:.1%} ({rows * share / sampler.n:.2f} epochs)"
                 for name, share, sampler in zip(self.names, shares, self.samplers, strict=True)]
        return "data mixture over the run: " + ", ".join(parts)

    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(source of each row, its rank among that source's rows) in block `block`."""
        cached = self._blocks.get(block)
        if cached is None:
            sources = np.repeat(np.arange(len(self.rows)), self.rows)
            sources = sources[np.random.default_rng([self.seed, block]).permutation(len(sources))]
            ranks = np.empty_like(sources)
            for s in range(len(self.rows)):
                at = sources == s
                ranks[at] = np.arange(int(at.sum()))
            if len(self._blocks) >= _CACHED_BLOCKS:
                self._blocks.pop(next(iter(self._blocks)))
            cached = self._blocks[block] = (sources, ranks)
        return cached

    def row_sources(self, index: int) -> list[tuple[int, int]]:
        """(source, window id) of each row of batch `index`."""
        out = []
        for g in range(index * self.batch_size, (index + 1) * self.batch_size):
            block, offset = divmod(g, BLOCK_ROWS)
            sources, ranks = self._block(block)
            s = int(sources[offset])
            position = block * int(self.rows[s]) + int(ranks[offset])
            out.append((s, int(self.samplers[s].batch_ids(position)[0])))
        return out

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rows = [np.asarray(self.streams[s][w * self.window + self._offsets]) for s, w in self.row_sources(index)]
        ids = torch.from_numpy(np.stack(rows).astype(np.int64))
        return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def load_sources(sources: dict[str, DataSource]) -> tuple[list[str], list[ShardIndex], list[float]]:
    """(names, shard indexes, weights) of the sources with a positive weight; every source must be a prepared
    directory, and all of them tokenized with the same tokenizer."""
    names, indexes, weights, tokenizer_text = [], [], [], None
    for name, source in sources.items():
        try:
            index = load_shards(source.dir)
        except DataError as e:
            raise DataError(f"data.sources.{name}.dir={source.dir}: {e}") from None
        text = (Path(source.dir) / TOKENIZER_FILE).read_text(encoding="utf-8")
        if tokenizer_text is not None and text != tokenizer_text:
            raise DataError(f"data.sources.{name}.dir={source.dir} was tokenized with another tokenizer than "
                            f"data.sources.{names[0]}; prepare every source with the same --tokenizer")
        tokenizer_text = tokenizer_text or text
        if source.weight > 0:
            names.append(name)
            indexes.append(index)
            weights.append(source.weight)
    return names, indexes, weights

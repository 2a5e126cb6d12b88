"""The rows of one batch KV cache, each holding one running sequence: join, decode step, leave, compaction.

Every row's tokens sit right-aligned in columns [start, length) of a shared cache whose `length` grows by one column
per decode step; a [rows, columns] attention mask marks each row's real slots, so `DecoderLM.forward` hides the
other columns and counts each row's positions from its own first token. A joining sequence is prefilled alone and
its keys and values copied into a free row, ending at the shared length; a leaving row's mask goes to 0 and the row
is free. When the cache's end is reached (or half the columns are padding every row shares), all rows shift left by
that shared padding.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from lmforge.model.decoder import DecoderLM
from lmforge.model.layers import KVCache

PAD_ID = 0  # what free rows are fed: any valid id, since their outputs are dropped and their slots masked


class BatchSlots:
    """`rows` sequences of up to `columns` tokens each over one KV cache."""

    def __init__(self, model: DecoderLM, rows: int, columns: int):
        self.model = model
        self.cache = model.new_cache(rows, columns)
        self.mask = torch.zeros((rows, columns), dtype=torch.long, device=model.device)
        self.start: list[int | None] = [None] * rows  # first column of each busy row; None = free

    @property
    def length(self) -> int:
        return self.cache.length

    def free_row(self) -> int | None:
        """The lowest free row (keeping busy rows low keeps the decode batch small), or None."""
        return next((r for r, s in enumerate(self.start) if s is None), None)

    def busy(self) -> list[int]:
        return [r for r, s in enumerate(self.start) if s is not None]

    def join(self, row: int, prefill: KVCache, n: int) -> None:
        """Copy the first `n` positions of a one-row cache into `row`, ending at the shared length."""
        if self.length < n:
            self._shift(self.length - n)
        end = self.length
        for mine, theirs in zip(self.cache.keys + self.cache.values, prefill.keys + prefill.values, strict=True):
            mine[row, :, end - n:end] = theirs[0, :, :n]
        self.mask[row] = 0
        self.mask[row, end - n:end] = 1
        self.start[row] = end - n

    def leave(self, row: int) -> None:
        self.start[row] = None
        self.mask[row] = 0
        if not self.busy():
            self.cache.length = 0

    def decode(self, tokens: dict[int, int]) -> Tensor:
        """One decode step: feed busy row r the token tokens[r]; returns logits [rows used, vocab] (row r at r)."""
        self._make_room()
        used = max(tokens) + 1
        feed = torch.full((used, 1), PAD_ID, dtype=torch.long)
        for row, token in tokens.items():
            feed[row, 0] = token
            self.mask[row, self.length] = 1
        view = copy.copy(self.cache)  # the first `used` rows, sharing the storage
        view.keys = [k[:used] for k in self.cache.keys]
        view.values = [v[:used] for v in self.cache.values]
        logits = self.model(feed.to(self.mask.device), cache=view, attention_mask=self.mask[:used, :self.length + 1])
        self.cache.length = view.length
        return logits[:, -1]

    def _make_room(self) -> None:
        """Shift every row left by the padding all busy rows share when the cache is full or that padding is at
        least half of it (attention would spend half its work on it)."""
        shared = min(s for s in self.start if s is not None)
        if shared > 0 and (self.length == self.cache.max_len or 2 * shared >= self.length):
            self._shift(shared)

    def _shift(self, by: int) -> None:
        """Move every column left by `by` (right when negative), dropping what leaves; the length follows."""
        old = self.length
        new = old - by
        src, dst = (slice(by, old), slice(0, new)) if by > 0 else (slice(0, old), slice(-by, new))
        for t in self.cache.keys + self.cache.values:
            t[:, :, dst] = t[:, :, src].clone()
        self.mask[:, dst] = self.mask[:, src].clone()
        if by < 0:
            self.mask[:, :-by] = 0
        self.cache.length = new
        self.start = [None if s is None else s - by for s in self.start]

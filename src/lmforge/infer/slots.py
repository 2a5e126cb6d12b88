"""The rows of one batch KV cache, each holding one running sequence: join, decode step, leave, compaction.

Every row's tokens sit right-aligned in columns [start, length) of a shared cache whose `length` grows by one column
per decode step; a [rows, columns] attention mask marks each row's real slots, so `DecoderLM.forward` hides the
other columns and counts each row's positions from its own first token. A joining sequence's keys and values (from
its prefill) are copied into a free row, ending at the shared length (every row shifts right first when they are
longer than the cache so far); a leaving row's mask goes to 0 and the row is free. The cache grows (by doubling, up
to the model's context) when a joining row may need more columns; once it spans the context and is full, or when
1/SHIFT_AT of its columns are padding every row shares, all rows shift left by that shared padding. `move` puts a
busy row into a free one (the engine keeps its busy rows lowest, so a decode step computes no free row).

A prompt-tuned model's cache starts with `header` slots of its soft prompt, the same for every sequence: they stay
in front of every row, outside the columns above.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from lmforge.model import decode_step
from lmforge.model.attention import KVCache
from lmforge.model.decoder import DecoderLM

SHIFT_AT = 8  # shift the rows left once the padding they all share is 1/SHIFT_AT of the cache
PAD_ID = 0  # what free rows and padding are fed: any valid id, since their slots are masked and outputs dropped


class BatchSlots:
    """`rows` sequences of up to `columns` tokens each over one KV cache, after `header` shared slots."""

    def __init__(self, model: DecoderLM, rows: int, columns: int, header: int = 0,
                 decode_model: torch.nn.Module | None = None):
        self.model, self.max_columns, self.header = model, columns, header
        # what runs the decode step: the model, or the model compiled
        self.decode_model = model if decode_model is None else decode_model
        self.header_kv: list[Tensor] | None = None  # every layer's keys then values of the header slots
        self.cache: KVCache | None = None  # allocated when the first row joins, then grown
        self._view: KVCache | None = None
        self.capacity = 0  # columns the cache holds (after the header)
        self.length = 0
        self.mask = torch.zeros((rows, 0), dtype=torch.long, device=model.device)
        self.start: list[int | None] = [None] * rows  # first column of each busy row; None = free
        self.span = [0] * rows  # the most columns each busy row fills before it finishes
        # the decode step without module calls, False where it does not apply, None until the next decode decides
        self._fast_step: decode_step.DecodeStep | bool | None = None

    @classmethod
    def for_model(cls, model: DecoderLM, rows: int, decode_model: torch.nn.Module | None = None) -> BatchSlots:
        """`rows` rows as long as the model's context, after a prompt-tuned model's soft prompt (the header)."""
        header = model.new_cache(1, 1).max_len - 1
        return cls(model, rows, model.cfg.max_seq_len - header, header, decode_model)

    def free_row(self) -> int | None:
        """The lowest free row (keeping busy rows low keeps the decode batch small), or None."""
        return next((r for r, s in enumerate(self.start) if s is None), None)

    def busy(self) -> list[int]:
        return [r for r, s in enumerate(self.start) if s is not None]

    def join(self, row: int, kv: list[Tensor], span: int) -> None:
        """Put a sequence into free `row`: `kv` holds every layer's keys then values [n_kv, n, head_dim] of its n
        tokens; `span` is the most columns it will fill (its prompt and the tokens it will be fed)."""
        n = kv[0].shape[1]
        right = max(0, n - self.length)  # the shift that makes room for n columns before the length
        start = self.length + right - n
        self._reserve(max([self.start[r] + right + self.span[r] for r in self.busy()] + [start + span]))
        if right:
            self._shift(-right)
        self.start[row], self.span[row] = start, span
        at = slice(self.header + start, self.header + self.length)
        for mine, theirs in zip(self.cache.keys + self.cache.values, kv, strict=True):
            mine[row, :, at] = theirs
        self.mask[row] = 0
        self.mask[row, start:self.length] = 1

    def prefill(self, row: int, ids: list[int], span: int, keep_last: int = 1) -> Tensor:
        """Run prompt `ids` alone and put it into free `row` (`span` as `join`'s); returns the logits of its last
        `keep_last` tokens [keep_last, vocab]."""
        cache = self.model.new_cache(1, len(ids))  # a soft prompt's model adds its header slots itself
        logits = self.model(torch.tensor([ids], device=self.mask.device), cache=cache, keep_last=keep_last)[0]
        if self.header and self.header_kv is None:
            self.header_kv = [t[0, :, :self.header].clone() for t in cache.keys + cache.values]
        self.join(row, [t[0, :, self.header:] for t in cache.keys + cache.values], span)
        return logits

    def reorder(self, sources: list[int]) -> None:
        """Row i becomes a copy of busy row sources[i] (beam search keeping its best hypotheses); the rows after
        them are freed."""
        rest = len(self.start) - len(sources)
        index = torch.tensor(sources + [sources[0]] * rest, device=self.mask.device)
        for t in self.cache.keys + self.cache.values:
            t.copy_(t.index_select(0, index))
        self.mask = self.mask.index_select(0, index)
        self.mask[len(sources):] = 0
        self.start = [self.start[r] for r in sources] + [None] * rest
        self.span = [self.span[r] for r in sources] + [0] * rest

    def extend(self, ids: list[int]) -> Tensor:
        """Feed row 0, the one busy row, several tokens in one forward; returns their logits [len(ids), vocab]
        (speculative decoding's verify step). A row alone starts at column 0, so nothing needs masking."""
        self._reserve(self.length + len(ids))
        self.mask[0, self.length:self.length + len(ids)] = 1
        view = self._rows_view(1)
        view.length = self.header + self.length
        logits = self.model(torch.tensor([ids], device=self.mask.device), cache=view, keep_last=len(ids))
        self.length += len(ids)
        return logits[0]

    def rewind(self, length: int) -> None:
        """Forget every column from `length` on (speculative decoding dropping rejected draft tokens)."""
        self.mask[:, length:] = 0
        self.length = min(self.length, length)

    def move(self, row: int, to: int) -> None:
        """Busy `row` moves to free row `to` (its keys, values and mask; `row` is then free): a decode step computes
        every row up to the highest busy one, so keeping busy rows low keeps it small."""
        columns = slice(self.header + self.start[row], self.header + self.length)
        for t in self.cache.keys + self.cache.values:
            t[to, :, columns] = t[row, :, columns]
        self.mask[to] = self.mask[row]
        self.start[to], self.span[to] = self.start[row], self.span[row]
        self.start[row] = None
        self.mask[row] = 0

    def leave(self, row: int) -> None:
        self.start[row] = None
        self.mask[row] = 0
        if not self.busy():
            self.length = 0
            self._fast_step = None  # the model may change before rows are busy again

    def fast_step(self) -> decode_step.DecodeStep | None:
        """The decode step without module calls (`model/decode_step.py`), or None where it does not apply (a model
        it does not take, a compiled decode model); decided once while rows are busy (the model stays as it is)."""
        if self._fast_step is None:
            fast = self.decode_model is self.model and decode_step.supports(self.model)
            self._fast_step = decode_step.DecodeStep(self.model) if fast else False
        return self._fast_step or None

    def decode(self, tokens: dict[int, int], prefill: decode_step.Batch | None = None
               ) -> Tensor | tuple[Tensor, Tensor]:
        """One decode step: feed busy row r the token tokens[r]; returns logits [rows used, vocab] (row r at r).
        With `prefill` (ids [n, T], their own cache, their mask or None; only where `fast_step()` applies), those
        prompts run in the same pass over the weights, and their last positions' logits [n, vocab] come second."""
        self._make_room()
        used = max(tokens) + 1
        device = self.mask.device
        feed = torch.tensor([[tokens.get(r, PAD_ID)] for r in range(used)], device=device)
        if len(tokens) == used:
            self.mask[:used, self.length] = 1
        else:
            self.mask[list(tokens), self.length] = 1
        view = self._rows_view(used)
        view.length = self.header + self.length
        # rows that all start at column 0 and are all fed have nothing to hide: the plain causal path (one sequence
        # alone always is)
        whole = len(tokens) == used and not any(self.start[:used])
        mask = None if whole else self.mask[:used, :self.length + 1]
        fast = self.fast_step()
        if prefill is not None:
            logits, first = fast((feed, view, mask), prefill)
        elif fast is not None:
            logits = fast((feed, view, mask))[0]
        else:
            logits = self.decode_model(feed, cache=view, attention_mask=mask)[:, -1]
        self.length += 1
        return logits if prefill is None else (logits, first)

    def _rows_view(self, used: int) -> KVCache:
        """The cache's first `used` rows, sharing its storage (kept while the cache and `used` stay the same)."""
        if self._view is None or self._view.keys[0].shape[0] != used:
            self._view = copy.copy(self.cache)
            self._view.keys = [k[:used] for k in self.cache.keys]
            self._view.values = [v[:used] for v in self.cache.values]
        return self._view

    def _reserve(self, columns: int) -> None:
        """Grow the cache to hold `columns` columns (at least doubling it; at most the context)."""
        columns = min(columns, self.max_columns)
        if columns <= self.capacity:
            return
        self.capacity = min(self.max_columns, max(columns, 2 * self.capacity))
        old, old_mask = self.cache, self.mask
        self.cache, self._view = self.model.new_cache(len(self.start), self.capacity), None
        self.mask = torch.zeros((len(self.start), self.capacity), dtype=torch.long, device=old_mask.device)
        self.mask[:, :self.length] = old_mask[:, :self.length]
        if old is not None:
            kept, sources = self.header + self.length, old.keys + old.values
        else:
            kept, sources = self.header, [t[None] for t in self.header_kv or []]
        for mine, theirs in zip(self.cache.keys + self.cache.values, sources, strict=False):
            mine[:, :, :kept] = theirs[:, :, :kept]

    def _make_room(self) -> None:
        """Shift every row left by the padding all busy rows share when the cache is full or that padding is at
        least 1/SHIFT_AT of it: attention spends that share of its work on it at every step, where a shift copies
        the busy rows once."""
        shared = min(s for s in self.start if s is not None)
        if shared > 0 and (self.length == self.capacity or SHIFT_AT * shared >= self.length):
            self._shift(shared)

    def _shift(self, by: int) -> None:
        """Move every column left by `by` (right when negative), dropping what leaves; the length follows. Only the
        rows up to the last busy one are copied (a free row's keys and values are written anew when it is joined),
        in blocks of |by| columns that never overlap the columns they are read from, so nothing is copied twice."""
        old = self.length
        new = old - by
        src, dst = (slice(by, old), slice(0, new)) if by > 0 else (slice(0, old), slice(-by, new))
        rows, h = max(self.busy(), default=-1) + 1, self.header
        for t in self.cache.keys + self.cache.values:
            for first, n in _blocks(by, old):
                t[:rows, :, h + first - by:h + first - by + n] = t[:rows, :, h + first:h + first + n]
        self.mask[:, dst] = self.mask[:, src].clone()
        if by < 0:
            self.mask[:, :-by] = 0
        self.length = new
        self.start = [None if s is None else s - by for s in self.start]


def _blocks(by: int, length: int) -> list[tuple[int, int]]:
    """(first column, columns) of the blocks that shift columns [0, length) by `by` to the left (right when negative)
    in place, in copy order: blocks of |by| columns, so that none is written over columns not yet read."""
    if by > 0:  # the first block first: each is written where the one before was read
        return [(first, min(by, length - first)) for first in range(by, length, by)]
    return [(max(first, 0), first - by - max(first, 0)) for first in range(length + by, by, by)]  # the last first

"""Automatic prefix caching: the keys and values of prompt prefixes, kept in blocks and reused by later prompts.

A block holds BLOCK positions of every layer's keys and values and is keyed by the adapter and every token id up
to its end, so a hit is exact: the same tokens from position 0 under the same weights (LoRA changes K and V).
Positions count from each prompt's first token, so a block fits wherever its prompt lands in the batch cache.
Blocks are evicted least recently used first under a budget of tokens; a prompt's blocks are marked used deepest
first, so a prefix always outlives the blocks that extend it and eviction takes the leaves.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor

BLOCK = 16  # positions per block: a prefix is reused in whole blocks

BlockKey = tuple[str | None, tuple[int, ...]]


class PrefixCache:
    """At most `budget_tokens` positions of cached prefixes (whole blocks)."""

    def __init__(self, budget_tokens: int):
        self.budget = budget_tokens
        self.blocks: OrderedDict[BlockKey, list[Tensor]] = OrderedDict()  # per block: keys then values, each layer

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK

    @staticmethod
    def _keys(ids: Sequence[int], adapter: str | None, limit: int) -> list[BlockKey]:
        return [(adapter, tuple(ids[:end])) for end in range(BLOCK, limit + 1, BLOCK)]

    def lookup(self, ids: Sequence[int], adapter: str | None) -> list[list[Tensor]]:
        """The blocks of the longest cached prefix of `ids` (at least its last token is left to compute, for its
        logits), each as every layer's keys then values [n_kv, BLOCK, head_dim]."""
        hits = []
        for key in self._keys(ids, adapter, len(ids) - 1):
            block = self.blocks.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def store(self, ids: Sequence[int], adapter: str | None, kv: list[Tensor]) -> None:
        """Keep the whole blocks (as many as the budget holds) of the prompt `ids`, whose every layer's keys then
        values [n_kv, len(ids), head_dim] are `kv`."""
        keys = self._keys(ids, adapter, len(ids))[: self.budget // BLOCK]
        for i, key in enumerate(keys):
            if key not in self.blocks:
                self.blocks[key] = [t[:, i * BLOCK:(i + 1) * BLOCK].clone() for t in kv]
        for key in reversed(keys):
            self.blocks.move_to_end(key)
        while self.tokens > self.budget:
            self.blocks.popitem(last=False)

"""Retrieval recall@k: the share of questions whose gold document is among the documents of the top k chunks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import ConfigError
from lmforge.rag.index import Index


@dataclass(frozen=True)
class RecallAtK:
    k: int
    mode: str
    found: int  # questions whose gold document was retrieved
    total: int

    @property
    def recall(self) -> float:
        return self.found / self.total


def recall_at_k(index: Index, questions: Sequence[tuple[str, str]], ks: Sequence[int] = (1, 3, 5),
                mode: str = "dense") -> list[RecallAtK]:
    """Recall@k for each k in `ks` of (question, gold doc_id) pairs, one search per question at the largest k."""
    if not questions:
        raise ConfigError("recall@k needs at least one (question, gold doc id) pair")
    hits = index.search_many([q for q, _ in questions], max(ks), mode)
    pairs = list(zip((gold for _, gold in questions), hits, strict=True))
    return [RecallAtK(k, mode, sum(gold in {h.doc_id for h in found[:k]} for gold, found in pairs), len(pairs))
            for k in ks]

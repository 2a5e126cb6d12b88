"""Lexical retrieval: Okapi BM25 (rank-bm25's BM25Okapi, k1 = 1.5, b = 0.75) over lowercased word tokens."""

from __future__ import annotations

import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class BM25Ranker:
    def __init__(self, texts: Sequence[str]):
        from rank_bm25 import BM25Okapi

        self._docs = [set(words(t)) for t in texts]
        self._bm25 = BM25Okapi([words(t) for t in texts])

    def ranking(self, query: str, depth: int) -> list[tuple[int, float]]:
        """(row, score) of the `depth` best chunks holding at least one query word, best first (ties: row order)."""
        terms = words(query)
        scores = self._bm25.get_scores(terms)
        matched = [i for i, doc in enumerate(self._docs) if doc.intersection(terms)]
        order = sorted(matched, key=lambda i: -scores[i])[:depth]
        return [(i, float(scores[i])) for i in order]

"""Reciprocal-rank fusion (Cormack, Clarke & Buettcher 2009): score(d) = sum over rankings of 1 / (k0 + rank(d)),
ranks counted from 1, k0 = 60."""

from __future__ import annotations

from collections.abc import Sequence

RRF_K0 = 60


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k0: int = RRF_K0) -> list[tuple[int, float]]:
    """(item, fused score) of every item in `rankings` (each best first), best first; ties keep first appearance."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k0 + rank)
    return sorted(fused.items(), key=lambda pair: -pair[1])

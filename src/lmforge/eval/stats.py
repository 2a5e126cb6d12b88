"""Noise on evaluation numbers: a 95% interval for an accuracy, and paired tests for two models on the same items.

A difference between two models scored on the same items is judged by a paired test, never by two overlapping or
disjoint intervals: McNemar's exact test for right/wrong items (only the items the two disagree on carry
information), a paired bootstrap for any per-item score (F1, ROUGE)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of an accuracy `correct`/`n` (95% by default): unlike p +- z*se, it stays inside
    [0, 1] and does not collapse to a point at 0% or 100%."""
    if n <= 0:
        raise ValueError("an interval needs at least one item")
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} is not between 0 and n={n}")
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class PairedTest:
    difference: float  # mean score of b minus mean score of a, on the same items
    p_value: float  # two-sided
    detail: dict  # the test's own counts (McNemar: only_a, only_b) or interval (bootstrap: ci95)

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> PairedTest:
    """McNemar's exact test on paired right/wrong outcomes: under "a and b are equally accurate", each of the n
    discordant items is b-right-a-wrong with probability 1/2, so p = 2 * P(Binomial(n, 1/2) <= min count)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired outcomes need the same non-zero number of items, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return PairedTest((only_b - only_a) / len(a), min(1.0, 2 * tail), {"only_a": only_a, "only_b": only_b})


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0) -> PairedTest:
    """Paired bootstrap of mean(b) - mean(a): items are resampled with replacement, each keeping its pair. The
    p-value is twice the share of resampled differences on the far side of zero (at least 1/resamples); the
    detail holds the 95% percentile interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same non-zero number of items, got {len(a)} and {len(b)}")
    diffs = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    rng, n = np.random.default_rng(seed), len(diffs)
    chunk = max(1, 2_000_000 // n)  # resampled index rows held at once
    means = np.concatenate([diffs[rng.integers(0, n, (min(chunk, resamples - start), n))].mean(axis=1)
                            for start in range(0, resamples, chunk)])
    observed = float(diffs.mean())
    far_side = int((means <= 0).sum() if observed > 0 else (means >= 0).sum())
    p = 1.0 if observed == 0 else min(1.0, max(2 * far_side, 1) / resamples)
    low, high = np.quantile(means, [0.025, 0.975])
    return PairedTest(observed, p, {"ci95": (float(low), float(high))})

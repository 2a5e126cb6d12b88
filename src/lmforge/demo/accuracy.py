"""Accuracy cells and paired comparisons for the reasoning stage's tables: every accuracy with its Wilson 95%
interval, every with/without comparison by McNemar's exact test on the same items (`lmforge.eval.stats`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.demo.verdicts import ALPHA, paired_accuracy_note
from lmforge.eval.stats import mcnemar_exact, wilson_interval


def accuracy_cell(outcomes: Sequence[bool]) -> str:
    """"62.5% [47.0%, 75.8%]": the share right with its Wilson 95% interval."""
    right, n = sum(outcomes), len(outcomes)
    low, high = wilson_interval(right, n)
    return f"{right / n:.1%} [{low:.1%}, {high:.1%}]"


@dataclass(frozen=True)
class Comparison:
    what: str  # "CoT against standard"
    significant: bool  # McNemar p < ALPHA
    difference: str  # "+12.5%": the method's accuracy minus the baseline's
    p_value: str
    note: str  # the sentence: an effect only when p < 0.05, else "within noise" with the numbers


def compare(method: str, baseline: str, base_outcomes: Sequence[bool], outcomes: Sequence[bool]) -> Comparison:
    """`method` against `baseline`, paired item by item (both lists in the same item order)."""
    test = mcnemar_exact(base_outcomes, outcomes)
    return Comparison(f"{method} against {baseline}", test.significant(ALPHA), f"{test.difference:+.1%}",
                      f"{test.p_value:.3g}", paired_accuracy_note(method, baseline, test, len(outcomes)))


def effects_line(comparisons: Sequence[Comparison]) -> str:
    """Which comparisons showed an effect at this scale and which did not (within noise, figures above)."""
    held = [c.what for c in comparisons if c.significant]
    absent = [c.what for c in comparisons if not c.significant]
    parts = [f"Effects that held (McNemar p < {ALPHA:g}): {'; '.join(held)}." if held else
             f"No comparison here showed an effect at p < {ALPHA:g}."]
    if absent:
        parts.append(f"Not seen at this scale (within noise, figures above): {'; '.join(absent)}.")
    return " ".join(parts)

"""Answers out of completions, and the self-consistency vote over several (Wang et al. 2023)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.data.synthetic import extract_answer
from lmforge.eval.text_metrics import extract, normalize


def answer_of(completion: str, pattern: re.Pattern | None = None) -> str | None:
    """The X of "The answer is X." in `completion`; else the match of the task's `pattern` when it has one; else
    None (no answer given)."""
    found = extract_answer(completion)
    if found is None and pattern is not None:
        found = extract(completion, pattern) or None
    return found


@dataclass(frozen=True)
class Vote:
    answer: str | None  # the most frequent answer (the first sampled among equals); None when no sample gave one
    shares: dict[str, float]  # each answer -> its share of all samples (samples without an answer count too)


def majority_vote(answers: Sequence[str | None]) -> Vote:
    """Majority vote over sampled answers, compared after SQuAD normalisation ("17." and "17" are one answer);
    each answer is named by its first spelling."""
    if not answers:
        raise ValueError("a vote needs at least one sample")
    spelling: dict[str, str] = {}
    counts: Counter[str] = Counter()
    for a in answers:
        if a is not None:
            key = normalize(a)
            spelling.setdefault(key, a)
            counts[key] += 1
    shares = {spelling[key]: n / len(answers) for key, n in counts.items()}
    if not counts:
        return Vote(None, shares)
    top = max(counts.values())
    return Vote(spelling[next(key for key in spelling if counts[key] == top)], shares)

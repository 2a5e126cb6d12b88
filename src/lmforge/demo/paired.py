"""The report's sentence on two models scored on the same items: a difference is a finding only when McNemar's paired
test finds it at alpha = 0.05; otherwise the sentence says "within noise" and gives the numbers."""

from __future__ import annotations

from lmforge.eval.stats import PairedTest

ALPHA = 0.05


def paired_accuracy_note(model: str, baseline: str, test: PairedTest, n: int) -> str:
    """Whether `model` was more or less accurate than `baseline` on the same `n` items (`test`: McNemar's, with
    `baseline` as a and `model` as b)."""
    figures = (f"{test.difference:+.1%} on {n} items, McNemar p = {test.p_value:.3g}; right only for {baseline}: "
               f"{test.detail['only_a']}, only for {model}: {test.detail['only_b']}")
    if not test.significant(ALPHA):
        return f"{model} against {baseline}: within noise ({figures})."
    direction = "more" if test.difference > 0 else "less"
    return f"{model} was {direction} accurate than {baseline} ({figures}; significant at alpha {ALPHA:g})."

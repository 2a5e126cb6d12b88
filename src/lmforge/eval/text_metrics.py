"""Scores of generated text against a reference: exact match and token F1 (SQuAD's definitions), BLEU
(sacrebleu) and ROUGE (rouge-score)."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def extract(text: str, pattern: re.Pattern | None) -> str:
    """The answer in a generation: the first match of `pattern` (its first group if it has one), "" without a
    match; the whole text without a pattern."""
    if pattern is None:
        return text
    match = pattern.search(text)
    if match is None:
        return ""
    return match.group(1) if pattern.groups else match.group(0)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answer: str) -> bool:
    return normalize(prediction) == normalize(answer)


def token_f1(prediction: str, answer: str) -> float:
    """Harmonic mean of precision and recall of the normalised tokens (a multiset); 1 when both are empty."""
    pred, gold = normalize(prediction).split(), normalize(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0-100, its default 13a tokenisation), one reference per item."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_f1(prediction: str, reference: str) -> dict[str, float]:
    """rouge-score's ROUGE-1, -2 and -L F-measures (0-1) of one prediction."""
    from rouge_score import rouge_scorer

    scores = rouge_scorer.RougeScorer(list(ROUGE_TYPES)).score(reference, prediction)
    return {name: scores[name].fmeasure for name in ROUGE_TYPES}

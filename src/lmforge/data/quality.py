"""Heuristic quality rules of Gopher's MassiveText filter (Rae et al. 2021, appendix A.1.1), with its thresholds.

Each rule has a name; `first_failed_rule` returns the first enabled rule a document breaks (None: it passes). Words
are whitespace-separated tokens; lines are newline-separated. `stop_words` (at least two of eight common English words)
is Gopher's cheap English-language filter.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
_BULLETS = ("•", "●", "◦", "▪", "‣", "-", "*")
_ELLIPSES = ("...", "…")
_WORD_CHARS = re.compile(r"\w+")
_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class QualityThresholds:
    """Gopher's values; each is the bound a document must respect to pass its rule."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1  # ('#' + ellipses) per word
    max_bullet_lines: float = 0.9  # share of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # share of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # share of words with an alphabetic character
    min_stop_words: int = 2
    max_duplicate_lines: float = 0.3  # share of lines that repeat an earlier line
    max_duplicate_line_chars: float = 0.2  # share of characters in such lines
    max_top_ngram_chars: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    max_duplicate_ngram_chars: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10})


QUALITY_RULES = ("words", "mean_word_length", "symbols", "bullets", "ellipsis_lines", "alpha_words", "stop_words",
                 "duplicate_lines", "top_ngrams", "duplicate_ngrams")


def _ngrams(words: list[str], n: int) -> zip:
    return zip(*(words[i:] for i in range(n)), strict=False)


def _top_ngram_share(words: list[str], n: int, total_chars: int) -> float:
    """Characters of the most frequent repeated n-gram, all its occurrences, per character of the words."""
    grams = Counter(_ngrams(words, n))
    if not grams:
        return 0.0
    gram, count = grams.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / total_chars


def _duplicate_ngram_share(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words inside any n-gram that occurs more than once (each word counted once), per character."""
    starts = list(_ngrams(words, n))
    counts = Counter(starts)
    if len(counts) == len(starts):  # no n-gram repeats
        return 0.0
    covered = bytearray(len(words))
    for i, gram in enumerate(starts):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


def first_failed_rule(text: str, enabled: Collection[str], limits: QualityThresholds) -> str | None:
    """The first rule of QUALITY_RULES in `enabled` that `text` fails, or None."""
    words = text.split()
    n_words = len(words)
    total_chars = sum(map(len, words)) or 1
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [""]
    checks = {
        "words": lambda: limits.min_words <= n_words <= limits.max_words,
        "mean_word_length": lambda: n_words > 0 and (
            limits.min_mean_word_length <= total_chars / n_words <= limits.max_mean_word_length),
        "symbols": lambda: (text.count("#") + sum(text.count(e) for e in _ELLIPSES)
                            ) <= limits.max_symbol_ratio * max(n_words, 1),
        "bullets": lambda: sum(line.startswith(_BULLETS) for line in lines) <= limits.max_bullet_lines * len(lines),
        "ellipsis_lines": lambda: sum(line.endswith(_ELLIPSES) for line in lines) <= limits.max_ellipsis_lines * len(
            lines),
        "alpha_words": lambda: sum(1 for w in words if _LETTER.search(w)) >= limits.min_alpha_words * n_words,
        "stop_words": lambda: len(STOP_WORDS.intersection(w.lower() for w in _WORD_CHARS.findall(text))
                                  ) >= limits.min_stop_words,
        "duplicate_lines": lambda: _duplicate_lines_ok(lines, limits),
        "top_ngrams": lambda: all(_top_ngram_share(words, n, total_chars) <= bound
                                  for n, bound in limits.max_top_ngram_chars.items()),
        "duplicate_ngrams": lambda: all(_duplicate_ngram_share(words, n, total_chars) <= bound
                                        for n, bound in limits.max_duplicate_ngram_chars.items()),
    }
    return next((rule for rule in QUALITY_RULES if rule in enabled and not checks[rule]()), None)


def _duplicate_lines_ok(lines: list[str], limits: QualityThresholds) -> bool:
    seen: set[str] = set()
    dup_lines = dup_chars = 0
    for line in lines:
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        seen.add(line)
    total = sum(map(len, lines)) or 1
    return dup_lines <= limits.max_duplicate_lines * len(lines) and dup_chars <= limits.max_duplicate_line_chars * total

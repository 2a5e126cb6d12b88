"""Demonstrations and their choice: which examples of a pool go in front of a question (fixed, random with a seed, or
nearest by sentence embedding) and in what order."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmforge.errors import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

SELECTIONS = ("fixed", "random", "nearest")
ORDERS = ("selected", "reversed", "shuffled")


@dataclass(frozen=True)
class Example:
    """A solved question: a demonstration, or (with its gold answer hidden) a question to ask."""

    question: str
    answer: str
    rationale: str = ""  # worked steps, without the final "The answer is X."
    where: str = ""  # file:line


def sentence_embed(texts: list[str]) -> Tensor:
    """all-MiniLM-L6-v2 sentence embeddings (`lmforge.embed`)."""
    from lmforge.embedding import embed

    return embed(texts)


class ShotRanker:
    """Ranks a pool of examples for each question, best first: `fixed` keeps the pool's order, `random` draws a
    seeded permutation per question, `nearest` puts the most similar questions (cosine of sentence embeddings,
    all-MiniLM-L6-v2 by default) first. A question is never its own demonstration."""

    def __init__(self, pool: Sequence[Example], selection: str = "fixed", seed: int = 0,
                 embed: Callable[[list[str]], Tensor] = sentence_embed):
        if selection not in SELECTIONS:
            raise ConfigError(f"selection (--selection) must be one of {', '.join(SELECTIONS)}, got {selection!r}")
        self.pool, self.selection, self.seed, self.embed = list(pool), selection, seed, embed
        self._vectors = self._unit(embed([e.question for e in self.pool])) if selection == "nearest" and pool else None

    @staticmethod
    def _unit(vectors: Tensor) -> Tensor:
        from torch.nn.functional import normalize

        return normalize(vectors.float().reshape(len(vectors), -1), dim=1)

    def rank(self, questions: Sequence[str]) -> list[list[Example]]:
        """For each question (numbered by its position: the random draw of question i is the same in every run
        with this seed), the pool's other examples, best first."""
        if self._vectors is not None and questions:
            import torch

            similarity = self._unit(self.embed(list(questions))) @ self._vectors.T
            orders = [torch.argsort(row, descending=True, stable=True).tolist() for row in similarity]
        else:
            orders = [list(range(len(self.pool)))] * len(questions)
        ranked = []
        for i, (question, order) in enumerate(zip(questions, orders, strict=True)):
            if self.selection == "random":
                order = list(order)
                random.Random(f"{self.seed}:{i}").shuffle(order)
            ranked.append([self.pool[j] for j in order if self.pool[j].question != question])
        return ranked


def arrange(shots: Sequence, order: str, seed: int = 0) -> list:
    """`shots` (best first) in prompt order: `selected` keeps it (the best furthest from the question), `reversed`
    puts the best next to the question, `shuffled` a permutation seeded by `seed`."""
    if order not in ORDERS:
        raise ConfigError(f"order (--order) must be one of {', '.join(ORDERS)}, got {order!r}")
    shots = list(shots)
    if order == "reversed":
        shots.reverse()
    elif order == "shuffled":
        random.Random(seed).shuffle(shots)
    return shots

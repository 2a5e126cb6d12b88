"""Demonstrations that fit a token budget: many-shot prompting fills the context with as many as fit, and any
prompt longer than the context drops its demonstrations furthest down the ranking until it fits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import DataError
from lmforge.prompting.examples import arrange
from lmforge.prompting.prompt import Prompt, PromptRenderer, RenderedPrompt, Shot


@dataclass(frozen=True)
class FittedPrompt:
    prompt: Prompt
    rendered: RenderedPrompt
    dropped: int  # demonstrations of the ranking left out for the budget


def fit_shots(renderer: PromptRenderer, ranked: Sequence[Shot], question: str, budget: int, *, lead: str = "",
              order: str = "selected", seed: int = 0, where: str = "") -> FittedPrompt:
    """The prompt with the most of `ranked` (best first; arranged in `order`) whose tokens fit `budget`: a binary
    search over the number kept, each candidate rendered and counted. DataError (one line, naming `where`) when even
    the question alone does not fit."""

    def build(n: int) -> tuple[Prompt, RenderedPrompt]:
        prompt = Prompt(tuple(arrange(ranked[:n], order, seed)), question, lead)
        return prompt, renderer.render(prompt)

    bare = build(0)
    if len(bare[1].ids) > budget:
        raise DataError(f"{where + ': ' if where else ''}the question alone is {len(bare[1].ids)} tokens, more than "
                        f"the {budget} the prompt may take (the context less the tokens to generate): shorten the "
                        "question, lower --max-new-tokens or use a model with a longer context")
    low, high, best = 0, len(ranked), bare  # invariant: `low` shots fit
    while low < high:
        middle = (low + high + 1) // 2
        candidate = build(middle)
        if len(candidate[1].ids) <= budget:
            low, best = middle, candidate
        else:
            high = middle - 1
    return FittedPrompt(best[0], best[1], len(ranked) - low)

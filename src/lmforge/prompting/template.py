"""Prompt templates with slots, as in the prompting literature: "[x] Overall, it was [z]" puts the input in [x] and
leaves [z] for the model's answer (seed 000, after Liu et al.'s survey). A demonstration fills both slots; a query
fills [x] and ends where [z] begins, so the model writes the answer."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import ConfigError

INPUT, ANSWER = "[x]", "[z]"


@dataclass(frozen=True)
class SlotTemplate:
    """A text with one input slot [x] followed, later, by one answer slot [z]."""

    text: str

    def __post_init__(self) -> None:
        if self.text.count(INPUT) != 1 or self.text.count(ANSWER) != 1 or \
                self.text.index(INPUT) > self.text.index(ANSWER):
            raise ConfigError(f"template {self.text!r} must hold [x] once and, after it, [z] once (e.g. "
                              "'Question: [x]\\nAnswer: [z]' or '[x] Overall, it was [z]')")

    def fill(self, x: str, z: str) -> str:
        """The template with both slots filled: a demonstration."""
        return self.text.replace(INPUT, x).replace(ANSWER, z)

    def query(self, x: str) -> str:
        """The template with [x] filled, up to [z] (its trailing spaces left off: in training text the answer's
        first token carries the space before it)."""
        return self.text[:self.text.index(ANSWER)].replace(INPUT, x).rstrip(" ")

    @property
    def opening(self) -> str:
        """The literal text before [x] ("Question:"), which starts every block: a model that writes it after its
        answer has begun a new question."""
        return self.text[:self.text.index(INPUT)].strip()


QA = SlotTemplate("Question: [x]\nAnswer: [z]")  # the synthetic world's question format (lmforge.data.synthetic)
CLOZE = SlotTemplate("[x] Overall, it was [z]")  # seed 000's sentiment cloze

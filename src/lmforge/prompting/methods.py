"""The prompting methods `lmforge prompt --method` runs, and their settings.

* ``standard``: the question, after K demonstrations answered directly ("The answer is X."): zero-, one- or few-shot;
* ``many-shot``: as many direct demonstrations as fit the token budget (Agarwal et al. 2024);
* ``cot``: few-shot chain of thought, demonstrations worked step by step (Wei et al. 2022);
* ``zero-shot-cot``: "Let's think step by step", then a second prompt holding that rationale asks for the answer
  (Kojima et al. 2022);
* ``self-consistency``: k chain-of-thought samples at temperature T > 0 (after worked demonstrations, or with zero
  shots after "Let's think step by step."), majority vote over their answers (Wang et al. 2023);
* ``auto-cot``: demonstrations the model writes by zero-shot CoT for one question per k-means cluster (Zhang et al.
  2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import ConfigError, DataError
from lmforge.prompting.examples import ORDERS, SELECTIONS, Example
from lmforge.prompting.prompt import Shot

METHODS = ("standard", "many-shot", "cot", "zero-shot-cot", "self-consistency", "auto-cot")
COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "Therefore, the answer is"  # Kojima et al.'s answer extraction for a free-form answer
ANSWER_TOKENS = 16  # what the answer-extraction prompt may generate
DEFAULT_SHOTS = {"standard": 0, "cot": 4, "self-consistency": 4, "auto-cot": 4}  # none: many-shot, zero-shot-cot
DEFAULT_SC_TEMPERATURE = 0.7


@dataclass(frozen=True)
class PromptingConfig:
    method: str = "standard"
    shots: int | None = None  # demonstrations (auto-cot: clusters); None = the method's default
    selection: str = "fixed"
    order: str = "selected"
    k: int = 5  # self-consistency samples
    temperature: float | None = None  # None: self-consistency samples at 0.7, the other methods decode greedily
    seed: int = 0
    max_new_tokens: int = 96
    repeat: bool = False  # prompt repetition: the question written twice
    budget: int | None = None  # many-shot: prompt tokens to fill (None = the context less max_new_tokens)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method (--method) must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"selection (--selection) must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.order not in ORDERS:
            raise ConfigError(f"order (--order) must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.shots is not None and self.method not in DEFAULT_SHOTS:
            raise ConfigError(f"--shots does not apply to {self.method} (it chooses its demonstrations itself); "
                              "leave it out")
        least = 1 if self.method in ("cot", "auto-cot") else 0
        if self.shots is not None and self.shots < least:
            raise ConfigError(f"--shots must be >= {least} for {self.method}, got {self.shots}")
        if self.k < 1:
            raise ConfigError(f"--k (self-consistency samples) must be >= 1, got {self.k}")
        if self.temperature is not None and not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if self.method == "self-consistency" and self.sampling_temperature == 0 and self.k > 1:
            raise ConfigError("self-consistency samples at a temperature > 0 (at 0 every sample is the same); "
                              "give e.g. --temperature 0.7")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.budget is not None and (self.method != "many-shot" or self.budget < 1):
            raise ConfigError(f"--budget is the prompt tokens many-shot fills: give it with --method many-shot and "
                              f">= 1, got {self.budget} with {self.method}")

    @property
    def n_shots(self) -> int:
        return DEFAULT_SHOTS.get(self.method, 0) if self.shots is None else self.shots

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return DEFAULT_SC_TEMPERATURE if self.method == "self-consistency" else 0.0

    @property
    def worked(self) -> bool:
        """Whether the demonstrations show their reasoning (the gold rationale)."""
        return self.method in ("cot", "self-consistency")


def direct_reply(answer: str) -> str:
    return f"The answer is {answer}."


def worked_reply(example: Example) -> str:
    """A demonstration's reply with its steps: the synthetic world's "<rationale> The answer is X."."""
    if not example.rationale:
        raise DataError(f"{example.where}: a chain-of-thought demonstration needs a worked solution: give the line "
                          "a \"rationale\" (the steps before the answer), or use --method standard")
    return f"{example.rationale} {direct_reply(example.answer)}"


def demonstration(example: Example, worked: bool) -> Shot:
    return Shot(example.question, worked_reply(example) if worked else direct_reply(example.answer))

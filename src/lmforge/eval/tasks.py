"""Task accuracy: greedy answers to held-out questions, scored by exact match of the final answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from lmforge.data.synthetic import EvalExample, extract_answer
from lmforge.infer.generate import SamplingConfig, generate
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import Tokenizer


@dataclass
class TaskResult:
    task: str
    accuracy: float
    n: int
    examples: list[tuple[str, str, str]]  # (prompt, completion, answer) for a few items


def task_accuracy(
    model: DecoderLM,
    tokenizer: Tokenizer,
    examples: Sequence[EvalExample],
    max_new_tokens: int = 64,
    keep_examples: int = 2,
    progress: bool = False,
) -> TaskResult:
    """Fraction of `examples` whose greedy completion states the right answer ("The answer is X.")."""
    if not examples:
        raise ValueError("no examples to evaluate")
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, stop=("\nQuestion:", "\n\n"),
                         truncate_prompt=True)
    correct, kept = 0, []
    for ex in tqdm(examples, desc=examples[0].task, disable=not progress, leave=False):
        completion = generate(model, tokenizer, ex.prompt, cfg)
        predicted = extract_answer(completion)
        correct += predicted is not None and predicted.lower() == ex.answer.lower()
        if len(kept) < keep_examples:
            kept.append((ex.prompt, completion, ex.answer))
    return TaskResult(examples[0].task, correct / len(examples), len(examples), kept)

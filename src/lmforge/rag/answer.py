"""Answers from an lmforge decoder given retrieved passages: the grounded prompt (under the model's chat template
where it has one), generated greedily in one batch on the decode engine (`generate_batch`).

Passages that would not fit the context beside the question and the reply are left out, lowest ranked first, and
counted; when not even the best one fits, the question is refused in one line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.data.chat import ChatTemplate
from lmforge.errors import ConfigError
from lmforge.infer.batched import generate_batch
from lmforge.infer.generate import SamplingConfig
from lmforge.model.decoder import DecoderLM
from lmforge.rag.grounded import cited_numbers, grounded_prompt
from lmforge.rag.index import Hit
from lmforge.tokenizer import Tokenizer

PLAIN_ANSWER_CUE = "\nAnswer:"  # after the prompt when the model has no chat template; the answer ends at a newline


@dataclass(frozen=True)
class GroundedAnswer:
    question: str
    answer: str
    passages: list[Hit]  # those in the prompt, numbered from 1 (the best first)
    dropped: int  # passages left out to fit the context
    cited: list[int]  # passage numbers the answer cites as [n]


def _prompt_ids(tokenizer: Tokenizer, template: ChatTemplate | None, question: str, passages: Sequence[Hit]) -> list:
    text = grounded_prompt(question, passages)
    if template is None:
        return tokenizer.encode(text + PLAIN_ANSWER_CUE)
    return template.render([{"role": "user", "content": text}], add_generation_prompt=True).ids


def fit_passages(tokenizer: Tokenizer, template: ChatTemplate | None, question: str, passages: Sequence[Hit],
                 room: int) -> tuple[list[int], int]:
    """(prompt ids, passages kept): as many of the best passages as fit `room` tokens (none only when none were
    given); a ConfigError when not even the question and the best passage fit."""
    for kept in range(len(passages), 0 if passages else -1, -1):
        ids = _prompt_ids(tokenizer, template, question, passages[:kept])
        if len(ids) <= room:
            return ids, kept
    what = "the question and its best passage" if passages else "the question"
    raise ConfigError(f"{what} take {len(ids)} tokens, more than the {room} the context leaves beside the reply: "
                      "lower --max-new-tokens, ask a shorter question or index with a smaller --chunk-tokens")


def answer_questions(model: DecoderLM, tokenizer: Tokenizer, questions: Sequence[str],
                     passages: Sequence[Sequence[Hit]], *, template: ChatTemplate | None = None,
                     max_new_tokens: int = 32) -> list[GroundedAnswer]:
    """Greedy answers to `questions`, each over its passages (best first; an empty list asks closed-book)."""
    room = model.cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the "
                          f"{model.cfg.max_seq_len}-token context")
    fitted = [fit_passages(tokenizer, template, q, p, room) for q, p in zip(questions, passages, strict=True)]
    stop = template.stop_ids if template is not None else tokenizer.eos_id
    outputs = generate_batch(model, [ids for ids, _ in fitted], SamplingConfig(max_new_tokens=max_new_tokens), stop)
    answers = []
    for question, hits, (_, kept), out in zip(questions, passages, fitted, outputs, strict=True):
        text = tokenizer.decode(out, skip_special_tokens=True)
        text = (text.lstrip().split("\n", 1)[0] if template is None else text).strip()
        answers.append(GroundedAnswer(question, text, list(hits[:kept]), len(hits) - kept,
                                      cited_numbers(text, kept)))
    return answers

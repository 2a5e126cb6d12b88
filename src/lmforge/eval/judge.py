"""An LLM judge (RLAIF): which of two responses to an instruction is better, asked in both orders.

Each pair is put to the judge twice, as (A = response_a, B = response_b) and with the order swapped, so a judge
that prefers a position cannot make a label on its own: the label is "A" or "B" (meaning response_a or response_b)
only when both answers name the same response, and "tie" when they name different ones (a disagreement) or when
an answer names neither (`parse_verdict` finds no ``Better: A`` or ``Better: B``: unparseable). Ties are dropped
from preference data and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.data.chat import ChatTemplate
from lmforge.data.judging import judge_prompt, parse_verdict
from lmforge.infer.batched import generate_batch
from lmforge.infer.generate import SamplingConfig

Decide = Callable[[list[str]], list[str]]  # judge prompts (user turns) -> the judge's answers, in order
LABELS = ("A", "B", "tie")
OUTCOMES = ("agree", "disagree", "unparseable")


@dataclass
class JudgeCounts:
    pairs: int = 0
    a: int = 0  # labelled response_a
    b: int = 0  # labelled response_b
    disagreements: int = 0  # ties: the two orders named different responses
    unparseable: int = 0  # ties: an answer named neither response

    @property
    def ties(self) -> int:
        return self.disagreements + self.unparseable

    def summary(self) -> str:
        return (f"{self.pairs} pairs: response_a better {self.a}, response_b better {self.b}, ties {self.ties} "
                f"({self.disagreements} where the two orders disagreed, {self.unparseable} with an answer naming "
                "neither response)")


def swap_label(answer_ab: str, answer_ba: str) -> tuple[str, str]:
    """(label, outcome) from the answer with the pair's order (A = response_a) and with it swapped."""
    first, swapped = parse_verdict(answer_ab), parse_verdict(answer_ba)
    if first is None or swapped is None:
        return "tie", "unparseable"
    second = "B" if swapped == "A" else "A"  # the swapped answer, named in the pair's own order
    return (first, "agree") if first == second else ("tie", "disagree")


def both_orders(pair: dict) -> tuple[str, str]:
    """The judge prompts of a pair: with A = response_a, and with the order swapped."""
    return (judge_prompt(pair["instruction"], pair["response_a"], pair["response_b"]),
            judge_prompt(pair["instruction"], pair["response_b"], pair["response_a"]))


def judge_pairs(pairs: Sequence[dict], decide: Decide) -> tuple[list[dict], JudgeCounts]:
    """Each pair ({"instruction", "response_a", "response_b", ...}) with "answer_ab", "answer_ba", "label" and
    "outcome" added, and the counts. `decide` gets every prompt of both orders in one call."""
    forward, backward = zip(*(both_orders(p) for p in pairs), strict=True) if pairs else ((), ())
    answers = decide([*forward, *backward])
    if len(answers) != 2 * len(pairs):
        raise ValueError(f"the judge gave {len(answers)} answers to {2 * len(pairs)} prompts")
    counts, labelled = JudgeCounts(pairs=len(pairs)), []
    for pair, ab, ba in zip(pairs, answers[: len(pairs)], answers[len(pairs):], strict=True):
        label, outcome = swap_label(ab, ba)
        counts.a += label == "A"
        counts.b += label == "B"
        counts.disagreements += outcome == "disagree"
        counts.unparseable += outcome == "unparseable"
        labelled.append({**pair, "answer_ab": ab, "answer_ba": ba, "label": label, "outcome": outcome})
    return labelled, counts


def prompt_ids(template: ChatTemplate, prompt: str) -> list[int]:
    """The ids the judge answers from: the judge prompt as one user turn, with the generation prompt."""
    return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True).ids


def model_decider(model: nn.Module, template: ChatTemplate, max_new_tokens: int = 8, batch_size: int = 32) -> Decide:
    """A `Decide` that answers greedily with `model`, `batch_size` prompts at a time, stopping at end of turn."""
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)

    @torch.inference_mode()
    def decide(prompts: list[str]) -> list[str]:
        model.eval()
        ids = [prompt_ids(template, p) for p in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths share a batch: less padding
        answers: dict[int, str] = {}
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            replies = generate_batch(model, [ids[i] for i in chunk], cfg, template.stop_ids)
            for i, reply in zip(chunk, replies, strict=True):
                answers[i] = template.tokenizer.decode(reply, skip_special_tokens=True)
        return [answers[i] for i in range(len(prompts))]

    return decide


def preference_records(labelled: Sequence[dict], label_of: Callable[[dict], str]) -> list[dict]:
    """DPO pairs ({"prompt", "chosen", "rejected", "meta"}) from labelled pairs, by `label_of(pair)` ("A" or "B";
    ties are left out). The prompt is the pair's "prompt" messages when it has them, else its instruction."""
    records = []
    for pair in labelled:
        label = label_of(pair)
        if label not in ("A", "B"):
            continue
        chosen, rejected = ("response_a", "response_b") if label == "A" else ("response_b", "response_a")
        records.append({"prompt": pair.get("prompt", pair["instruction"]), "chosen": pair[chosen],
                        "rejected": pair[rejected], "meta": pair.get("meta", {})})
    return records

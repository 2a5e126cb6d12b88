"""The reasoning stage's prompting tables, on the format data's held-out reasoning problems (word problems, last
letters, coin flips; in-domain sizes and longer out-of-domain ones) through `lmforge.prompting`:

- the seeds' table in miniature on the format-SFT chat model: standard, few-shot, CoT, zero-shot CoT,
  self-consistency (k = 5, 10) and Auto-CoT, beside the step-by-step instruction the format SFT taught;
- accuracy against the number of shots on the pretrained decoder (plain text, the world's "Question: ... Answer:"
  format), and prompt repetition on/off on both models.

Demonstrations come from the in-domain problems of the same task (never the question itself), so out-of-domain
questions are answered after in-domain demonstrations, as in the seeds."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.chat import ChatTemplate
from lmforge.data.formats import THINK_TRIGGER
from lmforge.demo.accuracy import Comparison, accuracy_cell, compare, effects_line
from lmforge.eval.report import Section, markdown_table, plot_series
from lmforge.io import atomic_write_jsonl
from lmforge.model.decoder import DecoderLM
from lmforge.prompting.examples import Example
from lmforge.prompting.methods import PromptingConfig
from lmforge.prompting.prompt import Prompt, PromptRenderer, repeat_question
from lmforge.prompting.run import PromptingRun, Question, prompt_model
from lmforge.tokenizer import Tokenizer

SETS = ("in_domain", "ood")
REASONING_TOKENS = 80  # a rationale of the longer out-of-domain problems fits
SHOTS = 2  # demonstrations of the few-shot methods: worked chat turns are long in a 256-token context
SHOT_COUNTS = (0, 1, 2, 4)  # the base model's shots curve, then many-shot (as many as fit)
STANDARD, TAUGHT = "standard (zero-shot, direct)", "step-by-step instruction (as the format SFT taught)"
CHAT_METHODS = {
    "few-shot (direct demonstrations)": PromptingConfig("standard", shots=SHOTS),
    "CoT (worked demonstrations)": PromptingConfig("cot", shots=SHOTS),
    "zero-shot CoT": PromptingConfig("zero-shot-cot"),
    "self-consistency k=5": PromptingConfig("self-consistency", shots=SHOTS, k=5),
    "self-consistency k=10": PromptingConfig("self-consistency", shots=SHOTS, k=10),
    "Auto-CoT": PromptingConfig("auto-cot", shots=SHOTS),
}
VERSUS = {"self-consistency k=5": "CoT (worked demonstrations)", "self-consistency k=10": "CoT (worked demonstrations)",
          "Auto-CoT": "CoT (worked demonstrations)"}  # besides standard, each method's natural baseline


@dataclass
class Problems:
    """The asked questions (`per_set` of each task and set) and, per question task, its demonstration pool."""

    questions: list[Question]
    pools: dict[str, list[Example]]
    new_tokens: int = REASONING_TOKENS  # each reply's budget

    def with_trigger(self) -> list[Question]:
        return [Question(q.task, Example(f"{q.example.question} {THINK_TRIGGER}", q.example.answer,
                                         q.example.rationale, q.example.where)) for q in self.questions]


def fits_twice(tokenizer: Tokenizer, chat: ChatTemplate, context: int, new_tokens: int) -> Callable[[str], bool]:
    """Whether a question written twice (prompt repetition) fits beside a reply of `new_tokens` in a `context`-token
    window, as plain text and as a chat turn: with a small vocabulary the longest problems do not."""
    renderers = [PromptRenderer(tokenizer), PromptRenderer(tokenizer, chat=chat)]
    room = context - new_tokens
    return lambda q: all(len(r.render(Prompt((), repeat_question(q))).ids) <= room for r in renderers)


def read_problems(path: Path, per_set: int, fits: Callable[[str], bool] = lambda question: True,
                  new_tokens: int = REASONING_TOKENS) -> Problems:
    """The first `per_set` problems of each task and set that `fits` accepts, and the demonstration pools."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    questions, pools, taken, seen = [], {}, {}, {}
    for r in records:
        key = f"{r['task']} ({r['set']})"
        seen[key] = seen.get(key, 0) + 1
        example = Example(r["question"], r["answer"], r["rationale"], f"{key} #{seen[key]}")
        if r["set"] == "in_domain":
            for s in SETS:
                pools.setdefault(f"{r['task']} ({s})", []).append(example)
        if taken.get(key, 0) < per_set and fits(r["question"]):
            taken[key] = taken.get(key, 0) + 1
            questions.append(Question(key, example))
    return Problems(questions, pools, new_tokens)


@dataclass
class Scored:
    """A method's outcome on every asked question, by `where`, and its run (completions, shots)."""

    run: PromptingRun
    correct: dict[str, bool]

    def outcomes(self, wheres: Sequence[str]) -> list[bool]:
        return [self.correct[w] for w in wheres]

    def completions(self) -> list[str]:
        return [r.calls[0]["completion"] for r in self.run.results]

    @property
    def mean_shots(self) -> float:
        return sum(r.shots for r in self.run.results) / len(self.run.results)


def score(model: DecoderLM, tokenizer: Tokenizer, questions: list[Question], config: PromptingConfig,
          problems: Problems, chat: ChatTemplate | None, transcript: Path) -> Scored:
    config = PromptingConfig(**{**vars(config), "max_new_tokens": problems.new_tokens})
    run = prompt_model(model, tokenizer, questions, config, chat=chat, pools=problems.pools)
    atomic_write_jsonl(transcript, run.transcript())
    return Scored(run, {r.question.example.where: r.correct for r in run.results})


def _slug(name: str) -> str:
    """A transcript's file name from its table row: "self-consistency k=5" -> "self-consistency-k-5"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _by_set(questions: list[Question]) -> dict[str, list[str]]:
    return {s: [q.example.where for q in questions if q.task.endswith(f"({s})")] for s in SETS}


def _row(name: str, scored: Scored, wheres: dict[str, list[str]], baseline: Scored | None, baseline_name: str,
         notes: list[Comparison]) -> tuple:
    everything = [w for s in SETS for w in wheres[s]]
    cells = [accuracy_cell(scored.outcomes(wheres[s])) for s in SETS] + [accuracy_cell(scored.outcomes(everything))]
    if baseline is None:
        return (name, f"{scored.mean_shots:.1f}", *cells, "", "")
    versus = compare(name, baseline_name, baseline.outcomes(everything), scored.outcomes(everything))
    notes.append(versus)
    return (name, f"{scored.mean_shots:.1f}", *cells, f"{versus.difference} vs {baseline_name}", versus.p_value)


def _lines(comparisons: list[Comparison]) -> list[str]:
    return [*(f"- {c.note}" for c in comparisons), "", effects_line(comparisons)]


_HEADER = ["method", "mean shots", "in-domain [95% CI]", "out-of-domain [95% CI]", "all [95% CI]",
           "difference", "McNemar p"]


def chat_section(model: DecoderLM, tokenizer: Tokenizer, chat: ChatTemplate, problems: Problems,
                 work: Path) -> tuple[Section, dict[str, Scored]]:
    """The prompting table on the format-SFT chat model; also returns the runs the well-formed shares read."""
    qs = problems.questions
    runs = {STANDARD: score(model, tokenizer, qs, PromptingConfig("standard", shots=0), problems, chat,
                            work / "standard.jsonl"),
            TAUGHT: score(model, tokenizer, problems.with_trigger(), PromptingConfig("standard", shots=0), problems,
                          chat, work / "step-by-step.jsonl")}
    for name, config in CHAT_METHODS.items():
        runs[name] = score(model, tokenizer, qs, config, problems, chat, work / f"{_slug(name)}.jsonl")
    wheres, notes = _by_set(qs), []
    rows = [_row(STANDARD, runs[STANDARD], wheres, None, "", notes)]
    for name in [TAUGHT, *CHAT_METHODS]:
        rows.append(_row(name, runs[name], wheres, runs[STANDARD], "standard", notes))
        if name in VERSUS:
            rows.append(_row(name, runs[name], wheres, runs[VERSUS[name]], VERSUS[name].split(" (")[0], notes))
    n = {s: len(w) for s, w in wheres.items()}
    return Section("Prompting methods on the format-SFT chat model", "\n".join([
        f"The seeds' prompting table in miniature: {n['in_domain']} held-out in-domain reasoning problems (word "
        "problems, last letters, coin flips at training sizes) and "
        f"{n['ood']} out-of-domain ones (more steps or words), on the chat model fine-tuned on the format data, "
        f"through `lmforge.prompting` (each method one batched engine run; greedy, self-consistency samples at "
        f"T = 0.7). Demonstrations ({SHOTS} asked; fewer when they do not fit the 256-token context: the mean "
        "shows how many did) are other in-domain problems of the same task, as chat turns; CoT's are worked step "
        "by step, Auto-CoT's are written by the model itself by zero-shot CoT for one question per k-means "
        "cluster. The step-by-step instruction row appends \"Let's think step by step.\" to the question, as the "
        "format SFT taught; zero-shot CoT instead starts the reply with it and extracts the answer with a "
        "second prompt (Kojima et al.). Accuracy = exact match of the final answer, with Wilson 95% intervals; "
        "each difference by McNemar's exact test on the same items.", "",
        markdown_table(_HEADER, rows), "", *_lines(notes),
    ])), runs


def base_section(base: DecoderLM, chat_model: DecoderLM, tokenizer: Tokenizer, chat: ChatTemplate,
                 problems: Problems, standard: Scored, work: Path, report_dir: Path) -> Section:
    """Accuracy against the number of shots on the pretrained decoder (plain text); prompt repetition on both."""
    qs, wheres = problems.questions, _by_set(problems.questions)
    curve = {f"{k}-shot": score(base, tokenizer, qs, PromptingConfig("standard", shots=k), problems, None,
                                work / f"base-{k}-shot.jsonl") for k in SHOT_COUNTS}
    curve["many-shot"] = score(base, tokenizer, qs, PromptingConfig("many-shot"), problems, None,
                               work / "base-many-shot.jsonl")
    notes: list[Comparison] = []
    zero = curve["0-shot"]
    rows = [_row(name, run, wheres, None if run is zero else zero, "0-shot", notes) for name, run in curve.items()]
    xs = [run.mean_shots for run in curve.values()]
    series = {s: (xs, [sum(r.outcomes(wheres[s])) / len(wheres[s]) for r in curve.values()]) for s in SETS}
    plot_series(report_dir / "reasoning_shots.png", "pretrained decoder: accuracy against shots",
                "demonstrations in the prompt (mean)", "exact-match accuracy", series)
    repeated = {"pretrained decoder, 0-shot": (zero, score(base, tokenizer, qs, PromptingConfig(
                    "standard", shots=0, repeat=True), problems, None, work / "base-repeat.jsonl")),
                "format-SFT chat model, standard": (standard, score(chat_model, tokenizer, qs, PromptingConfig(
                    "standard", shots=0, repeat=True), problems, chat, work / "chat-repeat.jsonl"))}
    repeat_notes: list[Comparison] = []
    repeat_rows = []
    for name, (off, on) in repeated.items():
        repeat_rows += [_row(f"{name}, once", off, wheres, None, "", repeat_notes),
                        _row(f"{name}, repeated", on, wheres, off, "once", repeat_notes)]
    return Section("Shots and prompt repetition", "\n".join([
        "The pretrained decoder (no chat template: plain text in the world's `Question: ...\\nAnswer:` format, "
        f"direct demonstrations \"The answer is X.\") on the same {len(qs)} problems with 0 to {SHOT_COUNTS[-1]} "
        "demonstrations asked, then many-shot (as many as fit the context beside the reply); the mean column "
        "says how many fit. Pretraining taught it to answer with worked steps, so the demonstrations also show it "
        "a format that skips them.", "",
        markdown_table(_HEADER, rows), "", *_lines(notes), "",
        "Prompt repetition (seed 000: the question written twice, `<QUERY><QUERY>`) on/off, the same items:", "",
        markdown_table(_HEADER, repeat_rows), "", *_lines(repeat_notes),
    ]), images=["reasoning_shots.png"])

"""A prompting method run over task questions: prompts built and fitted to the context, completions from one
batched engine run per stage, answers extracted and scored, every prompt and completion kept for the transcript."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from lmforge.data.chat import ChatTemplate
from lmforge.data.synthetic import EvalExample, extract_answer
from lmforge.errors import ConfigError, DataError
from lmforge.eval.stats import wilson_interval
from lmforge.eval.text_metrics import exact_match
from lmforge.model.decoder import DecoderLM
from lmforge.prompting.answers import answer_of, majority_vote
from lmforge.prompting.autocot import AutoCotResult, auto_cot_demos
from lmforge.prompting.budget import FittedPrompt, fit_shots
from lmforge.prompting.completion import BatchCompleter, EngineCompleter
from lmforge.prompting.examples import Example, ShotRanker, sentence_embed
from lmforge.prompting.methods import (
    ANSWER_TOKENS,
    ANSWER_TRIGGER,
    COT_TRIGGER,
    PromptingConfig,
    demonstration,
)
from lmforge.prompting.prompt import Prompt, PromptRenderer, Shot, repeat_question
from lmforge.prompting.template import QA, SlotTemplate
from lmforge.tokenizer import Tokenizer


@dataclass(frozen=True)
class Question:
    task: str
    example: Example  # its answer is the gold one, never shown
    pattern: re.Pattern | None = None  # the task line's answer pattern, a fallback to "The answer is X."
    stop: tuple[str, ...] = ()  # the task line's stop strings: its replies end at any of them


@dataclass
class QuestionResult:
    question: Question
    shots: int  # demonstrations in the prompt
    dropped: int  # demonstrations left out to fit the context (many-shot: those beyond the budget)
    calls: list[dict] = field(default_factory=list)  # {"stage", "prompt", "completion"}
    prediction: str | None = None
    votes: dict[str, float] | None = None  # self-consistency: each answer's share of the samples

    @property
    def correct(self) -> bool:
        return self.prediction is not None and exact_match(self.prediction, self.question.example.answer)

    def record(self, method: str) -> dict:
        q = self.question
        record = {"where": q.example.where, "task": q.task, "method": method, "question": q.example.question,
                  "answer": q.example.answer, "prediction": self.prediction, "correct": self.correct,
                  "shots": self.shots, "dropped_shots": self.dropped, "calls": self.calls}
        if self.votes is not None:
            record["votes"] = self.votes
        return record


@dataclass
class PromptingRun:
    config: PromptingConfig
    results: list[QuestionResult]
    auto_cot: dict[str, AutoCotResult] = field(default_factory=dict)  # task -> its demonstrations
    auto_cot_calls: dict[str, list[dict]] = field(default_factory=dict)  # task -> the zero-shot CoT calls writing them

    def summary(self) -> dict:
        """Accuracy with its Wilson 95% interval, overall and per task, and the demonstrations dropped to fit."""
        def accuracy(results: list[QuestionResult]) -> dict:
            right = sum(r.correct for r in results)
            low, high = wilson_interval(right, len(results))
            return {"n": len(results), "correct": right, "accuracy": right / len(results), "ci95": [low, high]}

        tasks = sorted({r.question.task for r in self.results})
        fitted = [r for r in self.results if r.dropped] if self.config.method != "many-shot" else []
        return {"method": self.config.method, **accuracy(self.results),
                "tasks": {t: accuracy([r for r in self.results if r.question.task == t]) for t in tasks},
                "mean_shots": sum(r.shots for r in self.results) / len(self.results),
                "questions_with_dropped_shots": len(fitted), "dropped_shots": sum(r.dropped for r in fitted),
                **({"auto_cot": {task: {"clusters": self.config.n_shots, "demonstrations": len(built.demos),
                                        "rejected": len(built.rejected)} for task, built in self.auto_cot.items()}}
                   if self.auto_cot else {})}

    def transcript(self) -> list[dict]:
        records = [r.record(self.config.method) for r in self.results]
        for task, built in self.auto_cot.items():
            records.append({"task": task, "method": "auto-cot", "stage": "demonstrations",
                            "demonstrations": [vars(d) for d in built.demos], "rejected": built.rejected,
                            "calls": self.auto_cot_calls[task]})
        return records


def read_questions(path: str | Path) -> list[Question]:
    """The generate lines of a task file (`lmforge eval tasks`' format) as questions: the prompt is the question;
    a DataError naming file:line for any other kind of line."""
    from lmforge.eval.task_file import read_tasks

    questions = []
    for items in read_tasks(path).values():
        for item in items:
            if item.kind != "generate":
                raise DataError(f"{item.where}: a {item.kind} line; `lmforge prompt` asks questions the model answers "
                                "in words: give generate lines ({\"type\": \"generate\", \"prompt\", \"answer\"})")
            questions.append(Question(item.task, Example(item.prompt, str(item.answer), item.rationale, item.where),
                                      item.pattern, item.stop))
    return questions


def synthetic_questions(examples: Sequence[EvalExample]) -> list[Question]:
    """The synthetic world's held-out examples (`lmforge.data.synthetic.eval_sets`) as questions: each prompt
    "Question: Q\nAnswer:" gives its question Q; `where` is task:number."""
    prefix, suffix = QA.query("\0").split("\0")
    return [Question(e.task, Example(e.prompt.removeprefix(prefix).removesuffix(suffix), e.answer, e.rationale,
                                     f"{e.task}:{i + 1}")) for i, e in enumerate(examples)]


def prompt_model(model: DecoderLM, tokenizer: Tokenizer, questions: Sequence[Question], config: PromptingConfig, *,
                 chat: ChatTemplate | None = None, template: SlotTemplate = QA,
                 pools: dict[str, list[Example]] | None = None,
                 embed: Callable[[list[str]], Tensor] = sentence_embed) -> PromptingRun:
    """`run_prompting` on a decoder through the decode engine: plain text through `template`, or `chat`'s turns."""
    renderer = PromptRenderer(tokenizer, template, chat)
    completer = EngineCompleter(model.eval(), renderer)
    return run_prompting(questions, completer, renderer, completer.context, config, pools, embed)


def run_prompting(questions: Sequence[Question], completer: BatchCompleter, renderer: PromptRenderer, context: int,
                  config: PromptingConfig, pools: dict[str, list[Example]] | None = None,
                  embed: Callable[[list[str]], Tensor] = sentence_embed) -> PromptingRun:
    """Run `config`'s method on `questions`; demonstrations come from `pools[task]` (default: the task's own other
    questions). `context`: the model's context in tokens, which each prompt and its reply must fit."""
    if not questions:
        raise ConfigError("no questions to prompt with")
    pools = pools or {}
    run = PromptingRun(config, [])
    budget = context - config.max_new_tokens
    if config.budget is not None:
        if config.budget > budget:
            raise ConfigError(f"--budget {config.budget} leaves no room for --max-new-tokens {config.max_new_tokens} "
                              f"in the {context}-token context: give at most {budget}")
        budget = config.budget
    fitted: list[FittedPrompt] = []
    for task in dict.fromkeys(q.task for q in questions):
        asked = [q for q in questions if q.task == task]
        pool = pools.get(task, [q.example for q in asked])
        ranked, lead = _ranked_shots(run, task, asked, pool, completer, renderer, budget, config, embed)
        for q, shots in zip(asked, ranked, strict=True):
            question = repeat_question(q.example.question) if config.repeat else q.example.question
            fit = fit_shots(renderer, shots, question, budget, lead=lead, order=config.order, seed=config.seed,
                            where=q.example.where)
            fitted.append(fit)
            run.results.append(QuestionResult(q, len(fit.prompt.shots), fit.dropped))
    _answer(run, fitted, completer, renderer, config)
    return run


def _ranked_shots(run: PromptingRun, task: str, asked: list[Question], pool: list[Example], completer: BatchCompleter,
                  renderer: PromptRenderer, budget: int, config: PromptingConfig,
                  embed: Callable[[list[str]], Tensor]) -> tuple[list[list[Shot]], str]:
    """Each question's demonstrations, best first, and the lead of its reply."""
    method = config.method
    if method == "zero-shot-cot":
        return [[] for _ in asked], COT_TRIGGER
    if method == "auto-cot":
        calls = run.auto_cot_calls.setdefault(task, [])

        def rationales(texts: list[str]) -> list[str]:
            prompts = [fit_shots(renderer, [], t, budget, lead=COT_TRIGGER).rendered for t in texts]
            written = completer(prompts, max_new_tokens=config.max_new_tokens)
            calls.extend({"stage": "rationale", "prompt": p.text, "completion": c}
                         for p, c in zip(prompts, written, strict=True))
            return written

        built = auto_cot_demos([e.question for e in pool], config.n_shots, rationales,
                               lambda text: len(renderer.tokenizer.encode(text)), embed, seed=config.seed)
        run.auto_cot[task] = built
        shots = [Shot(d.question, f"{COT_TRIGGER} {d.rationale}") for d in built.demos]
        return [shots for _ in asked], COT_TRIGGER
    limit = None if method == "many-shot" else config.n_shots
    if limit == 0:  # zero-shot; self-consistency then samples zero-shot chains of thought
        return [[] for _ in asked], COT_TRIGGER if method == "self-consistency" else ""
    ranked = ShotRanker(pool, config.selection, config.seed, embed).rank([q.example.question for q in asked])
    return [[demonstration(e, config.worked) for e in examples[:limit]] for examples in ranked], ""


def _answer(run: PromptingRun, fitted: list[FittedPrompt], completer: BatchCompleter, renderer: PromptRenderer,
            config: PromptingConfig) -> None:
    """Generate and extract every question's answer: one batched call per stage."""
    results, temperature, seed = run.results, config.sampling_temperature, config.seed
    rendered, stops = [f.rendered for f in fitted], [r.question.stop for r in results]
    if config.method == "self-consistency":
        k = config.k
        samples = completer([p for p in rendered for _ in range(k)], max_new_tokens=config.max_new_tokens,
                            temperature=temperature, seeds=[seed + i for i in range(len(rendered) * k)],
                            stops=[s for s in stops for _ in range(k)])
        for i, result in enumerate(results):
            mine = samples[i * k:(i + 1) * k]
            result.calls = [{"stage": f"sample {j}", "prompt": rendered[i].text, "completion": c}
                            for j, c in enumerate(mine)]
            vote = majority_vote([answer_of(c, result.question.pattern) for c in mine])
            result.prediction, result.votes = vote.answer, vote.shares
        return
    seeds = [seed + i for i in range(len(rendered))] if temperature > 0 else None
    completions = completer(rendered, max_new_tokens=config.max_new_tokens, temperature=temperature, seeds=seeds,
                            stops=stops)
    for result, prompt, completion in zip(results, rendered, completions, strict=True):
        result.calls.append({"stage": "answer" if config.method != "zero-shot-cot" else "reasoning",
                             "prompt": prompt.text, "completion": completion})
        result.prediction = answer_of(completion, result.question.pattern)
    if config.method == "zero-shot-cot":
        _extract_stage(results, fitted, completions, completer, renderer)


def _extract_stage(results: list[QuestionResult], fitted: list[FittedPrompt], rationales: list[str],
                   completer: BatchCompleter, renderer: PromptRenderer) -> None:
    """Kojima et al.'s second prompt: the first one, its rationale, then "Therefore, the answer is"; the answer is
    what the model writes next (the prompt keeps its last tokens if the rationale filled the context)."""
    prompts = [renderer.render(Prompt((), f.prompt.question, f"{COT_TRIGGER} {r} {ANSWER_TRIGGER}"))
               for f, r in zip(fitted, rationales, strict=True)]
    answers = completer(prompts, max_new_tokens=ANSWER_TOKENS, stops=[r.question.stop for r in results],
                        keep_last=True)
    for result, prompt, answer in zip(results, prompts, answers, strict=True):
        result.calls.append({"stage": "answer extraction", "prompt": prompt.text, "completion": answer})
        result.prediction = extract_answer(f"The answer is {answer}")

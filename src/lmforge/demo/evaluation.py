"""Demo stage: the run's checkpoints evaluated with the library behind `lmforge eval`.

- Held-out perplexity and bits per byte (`eval perplexity`) of every checkpoint handed in, on the world's held-out
  questions with their worked answers in the pretraining format.
- A task file written from held-out items (`eval tasks`): arithmetic word problems answered by generation (the number
  after "The answer is") and facts as multiple choice among answers to the same kind of question; the base model
  against SFT on the same items, each accuracy with its Wilson interval and each difference with McNemar's test.
- The lm-eval cross-check: the multiple-choice items as a local lm-evaluation-harness task, through lmforge's adapter
  and through lm-eval's own `hf` model on the base model's Hugging Face export.
- The LLM judge (`rlaif`): the SFT model tuned into a judge, its agreement with the verifier, and DPO on its labels
  against DPO on the verifier's.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

import lmforge
from lmforge.data.synthetic import EVAL_SETS, EvalExample, build_world
from lmforge.demo import rlaif
from lmforge.demo.verdicts import paired_accuracy_note
from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import file_perplexity
from lmforge.eval.report import Section, markdown_table
from lmforge.eval.stats import mcnemar_exact
from lmforge.eval.task_file import TaskItem, read_tasks
from lmforge.eval.task_suite import ACCURACIES, evaluate_tasks, write_results
from lmforge.infer.generate import SamplingConfig
from lmforge.io import atomic_write_jsonl, atomic_write_text

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan

BASE, TUNED = "base (pretrained)", "SFT"
GENERATE_TASK, CHOICE_TASK = "arithmetic (generate)", "facts (multiple choice)"
ANSWER_PATTERN = r"[Tt]he answer is\s*(-?\d+)"
STOP = ["\nQuestion:", "\n\n"]
MAX_NEW_TOKENS = 64  # enough for a two-step worked answer
DISTRACTORS = 3  # wrong choices per multiple-choice item
HARNESS_TASK = "lmforge_demo_facts"
MARGIN = 1e-4  # items whose best two choices are closer than this may rank differently on two correct paths


def run(plan: DemoPlan, data: DemoData, checkpoints: dict[str, Path], base: Path, tuned: Path,
        out_dir: Path) -> list[Section]:
    """Sections on `checkpoints` (report name -> checkpoint); the task table compares `base` with `tuned` (SFT), the
    lm-eval cross-check runs on `base`, the judge is tuned from `tuned`."""
    work = out_dir / "evaluation"
    per_set, per_task = plan.eval_items
    held_out = write_held_out_text(data, work / "held_out.jsonl", per_set)
    task_file = write_task_file(plan, data, work / "tasks.jsonl", per_task)
    return [perplexity_section(checkpoints, held_out, per_set), task_section(base, tuned, task_file, work),
            harness_section(base, task_file, work / "lm-eval"),
            rlaif.section(rlaif.run(plan, data, tuned, work / "judge"))]


def held_out_examples(data: DemoData, name: str) -> list[EvalExample]:
    """The held-out set `name` as the demo wrote it (eval_<name>.jsonl)."""
    return [EvalExample(**json.loads(line)) for line in data.files[f"eval_{name}"].read_text().splitlines()]


def write_held_out_text(data: DemoData, path: Path, per_set: int) -> Path:
    """The first `per_set` items of every held-out set as documents: the question and its worked answer, as the
    pretraining documents format them."""
    texts = [f"{e.prompt} {e.completion}" for name in EVAL_SETS for e in held_out_examples(data, name)[:per_set]]
    return atomic_write_jsonl(path, ({"text": text} for text in texts))


def question_kind(question: str) -> str:
    """A fact question with its names blanked ("What is the capital of _?"): questions of one kind share answers."""
    return re.sub(r"\b[A-Z][a-z]+\b", "_", question)


def choice_lines(plan: DemoPlan, facts: list[EvalExample]) -> list[dict]:
    """Multiple-choice task lines: each fact question ends in "The answer is" and offers its answer among
    DISTRACTORS answers to other questions of its kind (from the whole world), in a seeded order."""
    answers: dict[str, set[str]] = {}
    for fact in (f for group in build_world(plan.world).fact_groups for f in group):
        answers.setdefault(question_kind(fact.question), set()).add(fact.answer)
    lines = []
    for i, example in enumerate(facts):
        rng = random.Random(f"lmforge-demo/choice/{i}")
        question = example.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
        others = sorted(answers[question_kind(question)] - {example.answer})
        choices = [example.answer, *rng.sample(others, min(DISTRACTORS, len(others)))]
        rng.shuffle(choices)
        lines.append({"type": "choice", "task": CHOICE_TASK, "prompt": f"{example.prompt} The answer is",
                      "choices": choices, "answer": choices.index(example.answer)})
    return lines


def write_task_file(plan: DemoPlan, data: DemoData, path: Path, per_task: int) -> Path:
    generate = [{"type": "generate", "task": GENERATE_TASK, "prompt": e.prompt, "answer": e.answer,
                 "pattern": ANSWER_PATTERN, "stop": STOP} for e in held_out_examples(data, "arithmetic")[:per_task]]
    lines = generate + choice_lines(plan, held_out_examples(data, "facts")[:per_task])
    return atomic_write_jsonl(path, lines)


def perplexity_section(checkpoints: dict[str, Path], held_out: Path, per_set: int) -> Section:
    rows, overall = [], None
    for name, path in checkpoints.items():
        model, tokenizer = lmforge.load(path)
        overall = file_perplexity(model, tokenizer, [held_out], progress=False)[-1]
        rows.append((name, f"{overall.nll / overall.tokens:.4f}", f"{overall.perplexity:.3f}",
                     f"{overall.bits_per_byte:.4f}"))
    return Section("Held-out perplexity of every checkpoint", "\n".join([
        f"Scored with `lmforge eval perplexity`'s function (`file_perplexity`) on {overall.documents} held-out "
        f"documents ({overall.tokens:,} tokens, {overall.bytes:,} UTF-8 bytes): the first {per_set} questions of "
        f"each held-out set ({', '.join(EVAL_SETS)}) with their worked answers, in the pretraining format (no chat "
        "template), each document after the separator token. Perplexity = exp(mean NLL per token); bits per byte = "
        "the summed NLL in bits over the documents' bytes, which does not depend on the tokenizer. SFT, DPO, PPO "
        "and GRPO were tuned on chat-formatted conversations, so their numbers against the base model's show how "
        "much of the pretraining format each kept; int8 and int4 are the base model's quantised weights.", "",
        markdown_table(["checkpoint", "mean NLL (nats/token)", "perplexity", "bits per byte"], rows),
    ]))


def _accuracy_cell(score: dict) -> str:
    low, high = score["ci95"]
    return f"{score['value']:.1%} [{low:.1%}, {high:.1%}]"


def task_section(base: Path, tuned: Path, task_file: Path, work: Path) -> Section:
    tasks = read_tasks(task_file)
    sampling = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    results = {}
    for name, path, slug in ((BASE, base, "base"), (TUNED, tuned, "sft")):
        model, tokenizer = lmforge.load(path)
        results[name] = evaluate_tasks(model, tokenizer, tasks, sampling)
        header = {"model": str(path), "tasks_file": str(task_file), "generation": "greedy"}
        write_results(work / f"tasks-{slug}", header, results[name])
    rows, notes = [], []
    for task in tasks:
        before, after = results[BASE][task], results[TUNED][task]
        for metric in (m for m in before["metrics"] if m in ACCURACIES):
            test = mcnemar_exact([r[metric] for r in before["items"]], [r[metric] for r in after["items"]])
            rows.append((task, metric, before["n"], _accuracy_cell(before["metrics"][metric]),
                         _accuracy_cell(after["metrics"][metric]), f"{test.difference:+.1%}", f"{test.p_value:.3g}"))
            notes.append(f"- {task}, {metric}: {paired_accuracy_note(TUNED, BASE, test, before['n'])}")
    return Section("Task evaluation: base vs SFT", "\n".join([
        "`lmforge eval tasks` on a task file written from held-out items, the same items for both models, prompts "
        f"in the pretraining format: arithmetic word problems answered by greedy generation (up to {MAX_NEW_TOKENS} "
        f"tokens, exact match of the number the pattern `{ANSWER_PATTERN}` extracts), and fact questions completed "
        f"after \"The answer is\" by the most likely of {DISTRACTORS + 1} answers to questions of the same kind "
        "(log-likelihood: acc, and acc_norm per character). Accuracies with their Wilson 95% interval; the "
        "difference is judged by McNemar's exact test on the paired outcomes.", "",
        markdown_table(["task", "metric", "n", f"{BASE} [95% CI]", f"{TUNED} [95% CI]", "SFT - base",
                        "McNemar p"], rows), "",
        *notes,
    ]))


def write_harness_task(items: list[TaskItem], task_dir: Path, cache_dir: Path) -> None:
    """The multiple-choice items as an lm-eval task (YAML and its JSONL data) in `task_dir`."""
    data = atomic_write_text(task_dir / "facts.jsonl", "".join(
        json.dumps({"question": item.prompt, "choices": item.choices, "label": item.answer}) + "\n" for item in items))
    task = {"task": HARNESS_TASK, "dataset_path": "json", "test_split": "test", "output_type": "multiple_choice",
            "dataset_kwargs": {"data_files": {"test": str(data.resolve())}, "cache_dir": str(cache_dir.resolve())},
            "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
            "metric_list": [{"metric": metric, "aggregation": "mean", "higher_is_better": True}
                            for metric in ("acc", "acc_norm")],
            "metadata": {"version": 1.0}}
    atomic_write_text(task_dir / "facts.yaml", yaml.safe_dump(task, sort_keys=False))


def agreement_note(clear: int, differ_clear: int, near_ties: int, max_difference: float) -> str:
    """Whether the adapter and lm-eval's hf model agree: the same choice on every item whose best two choices are
    more than MARGIN apart (near-ties may rank either way on two correct computations)."""
    figures = (f"largest log-likelihood difference {max_difference:.1e} nats; {near_ties} item-metrics on a "
               f"near-tie (margin <= {MARGIN:g}) not compared")
    if differ_clear:
        return (f"They disagree: {differ_clear} of {clear} item-metrics with a margin above {MARGIN:g} got another "
                f"choice ({figures}).")
    return f"They agree: the same choice on all {clear} item-metrics with a margin above {MARGIN:g} ({figures})."


def harness_section(base: Path, task_file: Path, work: Path) -> Section:
    title = "lm-evaluation-harness cross-check"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded, as `lmforge eval harness`
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        from lmforge.eval.harness import LmforgeLM, task_manager
    except LmforgeError as exc:  # lm-eval is an optional extra
        return Section(title, f"Skipped: {exc}")
    import lm_eval
    items = [item for task in read_tasks(task_file).values() for item in task if item.kind == "choice"]
    write_harness_task(items, work / "task", work / "datasets")
    model, tokenizer = lmforge.load(base)
    hf_dir = lmforge.export_hf(model, tokenizer, work / "hf")
    options = dict(tasks=[HARNESS_TASK], task_manager=task_manager(work / "task"), batch_size=16, bootstrap_iters=0,
                   log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    runs = {"lmforge adapter": lm_eval.simple_evaluate(model=LmforgeLM(model, tokenizer, batch_size=16), **options),
            "lm-eval `hf` model": lm_eval.simple_evaluate(
                model="hf", model_args=f"pretrained={hf_dir},device=cpu,dtype=float32", **options)}
    ours, theirs = (sorted(r["samples"][HARNESS_TASK], key=lambda s: s["doc_id"]) for r in runs.values())
    clear = differ = near = 0
    max_difference = 0.0
    for a, b in zip(ours, theirs, strict=True):
        ll_a, ll_b = [r[0][0] for r in a["resps"]], [r[0][0] for r in b["resps"]]
        max_difference = max(max_difference, *(abs(x - y) for x, y in zip(ll_a, ll_b, strict=True)))
        normed = [ll / len(c) for ll, c in zip(ll_b, b["doc"]["choices"], strict=True)]
        for metric, scores in (("acc", ll_b), ("acc_norm", normed)):
            ranked = sorted(scores, reverse=True)
            if ranked[0] - ranked[1] <= MARGIN:
                near += 1
            else:
                clear += 1
                differ += a[metric] != b[metric]
    rows = [(metric, *(f"{r['results'][HARNESS_TASK][f'{metric},none']:.1%}" for r in runs.values()))
            for metric in ("acc", "acc_norm")]
    return Section(title, "\n".join([
        f"The {len(items)} multiple-choice items above as a local lm-eval task (`{HARNESS_TASK}`, YAML and JSONL "
        "written by this run), on the base model through lmforge's lm-eval adapter (`lmforge eval harness`) and "
        "through lm-eval's own `hf` model on its Hugging Face export (fp32, CPU); lm-eval tokenises and scores "
        "both.", "",
        markdown_table(["metric", *runs], rows), "",
        agreement_note(clear, differ, near, max_difference),
    ]))

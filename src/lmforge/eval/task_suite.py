"""`lmforge eval tasks`: score a model on a task file (see `task_file`), for decoders and encoder-decoders.

generate: greedy (or sampled) generation, the answer extracted by the line's pattern, exact match and token F1.
choice: the log-likelihood of each choice after the prompt (" " + choice for a decoder, as lm-evaluation-harness
joins them); acc picks the most likely choice, acc_norm the most likely per character of the choice (lm-eval's
`len(choice)`, which its docs call the byte length: the same for ASCII text). text2text: generation scored with
corpus BLEU and ROUGE-1/2/L.
Every accuracy comes with its Wilson 95% interval; every item's outcome is kept for paired tests between models.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from lmforge.errors import DataError
from lmforge.eval.loglikelihood import encode_pair, loglikelihoods
from lmforge.eval.report import markdown_table
from lmforge.eval.stats import wilson_interval
from lmforge.eval.task_file import TaskItem
from lmforge.eval.text_metrics import ROUGE_TYPES, corpus_bleu, exact_match, extract, rouge_f1, token_f1
from lmforge.infer.generate import SamplingConfig
from lmforge.io import atomic_write_text
from lmforge.tokenizer import Tokenizer

ACCURACIES = ("exact_match", "acc", "acc_norm")  # the metrics that are shares of items right


def _generator(model: nn.Module, tokenizer: Tokenizer, sampling: SamplingConfig) -> Callable[[TaskItem, int], str]:
    """item, index -> the model's generation for the item's prompt: `sampling` with the item's stop strings, item i
    seeded with sampling.seed + i, an over-long prompt keeping its last tokens."""
    if model.cfg.arch == "encdec":
        from lmforge.infer.generate_encdec import generate_text2text as generate
    else:
        from lmforge.infer.generate import generate

    def run(item: TaskItem, index: int) -> str:
        if not tokenizer.encode(item.prompt):
            raise DataError(f"{item.where}: the prompt {item.prompt!r} tokenises to no tokens; give it text")
        seed = None if sampling.seed is None else sampling.seed + index
        return generate(model, tokenizer, item.prompt, replace(sampling, stop=item.stop, seed=seed,
                                                               truncate_prompt=True))

    return run


def _accuracy(correct: list[bool]) -> dict:
    low, high = wilson_interval(sum(correct), len(correct))
    return {"value": sum(correct) / len(correct), "ci95": [low, high]}


def _mean(values: list[float]) -> dict:
    return {"value": sum(values) / len(values)}


def score_generate(items: list[TaskItem], generate: Callable[[TaskItem, int], str]) -> tuple[dict, list[dict]]:
    records = []
    for i, item in enumerate(tqdm(items, desc=items[0].task, leave=False, disable=None)):
        completion = generate(item, i)
        predicted = extract(completion, item.pattern)
        records.append({"where": item.where, "completion": completion, "prediction": predicted,
                        "answer": item.answer, "exact_match": exact_match(predicted, item.answer),
                        "f1": token_f1(predicted, item.answer)})
    return ({"exact_match": _accuracy([r["exact_match"] for r in records]),
             "f1": _mean([r["f1"] for r in records])}, records)


def score_choice(items: list[TaskItem], model: nn.Module, tokenizer: Tokenizer, batch_size: int
                 ) -> tuple[dict, list[dict]]:
    encdec = model.cfg.arch == "encdec"
    requests = [encode_pair(tokenizer, item.prompt, choice if encdec else " " + choice, encdec,
                            model.cfg.max_seq_len, f"{item.where}: choice {c}")
                for item in items for c, choice in enumerate(item.choices)]
    scores = iter(loglikelihoods(model, requests, batch_size))
    records = []
    for item in items:
        lls = [next(scores) for _ in item.choices]
        best = max(range(len(lls)), key=lls.__getitem__)
        best_norm = max(range(len(lls)), key=lambda c: lls[c] / max(len(item.choices[c]), 1))
        records.append({"where": item.where, "loglikelihoods": lls, "prediction": best,
                        "prediction_norm": best_norm, "answer": item.answer, "acc": best == item.answer,
                        "acc_norm": best_norm == item.answer})
    return ({"acc": _accuracy([r["acc"] for r in records]), "acc_norm": _accuracy([r["acc_norm"] for r in records])},
            records)


def score_text2text(items: list[TaskItem], generate: Callable[[TaskItem, int], str]) -> tuple[dict, list[dict]]:
    records = []
    for i, item in enumerate(tqdm(items, desc=items[0].task, leave=False, disable=None)):
        prediction = generate(item, i)
        records.append({"where": item.where, "prediction": prediction, "reference": item.answer,
                        **{k: 100 * v for k, v in rouge_f1(prediction, item.answer).items()}})
    bleu = corpus_bleu([r["prediction"] for r in records], [r["reference"] for r in records])
    return {"bleu": {"value": bleu}, **{k: _mean([r[k] for r in records]) for k in ROUGE_TYPES}}, records


def evaluate_tasks(model: nn.Module, tokenizer: Tokenizer, tasks: dict[str, list[TaskItem]],
                   sampling: SamplingConfig | None = None, batch_size: int = 16) -> dict:
    """{task: {"type", "n", "metrics": {name: {"value"[, "ci95"]}}, "items": [per-item record]}}."""
    model.eval()
    generate = _generator(model, tokenizer, sampling or SamplingConfig())
    results = {}
    for name, items in tasks.items():
        kind = items[0].kind
        if kind == "choice":
            metrics, records = score_choice(items, model, tokenizer, batch_size)
        elif kind == "generate":
            metrics, records = score_generate(items, generate)
        else:
            metrics, records = score_text2text(items, generate)
        results[name] = {"type": kind, "n": len(items), "metrics": metrics, "items": records}
    return results


def results_table(results: dict) -> str:
    """Markdown: one row per task and metric; accuracies in percent with their Wilson 95% interval."""
    rows = []
    for name, task in results.items():
        for metric, score in task["metrics"].items():
            if metric in ACCURACIES:
                low, high = score["ci95"]
                value, interval = f"{100 * score['value']:.1f}%", f"[{100 * low:.1f}%, {100 * high:.1f}%]"
            else:
                value, interval = f"{(100 if metric == 'f1' else 1) * score['value']:.2f}", ""
            rows.append((name, task["type"], task["n"], metric, value, interval))
    return markdown_table(["task", "type", "n", "metric", "value", "95% interval (Wilson)"], rows)


def write_results(out_dir: Path, header: dict, results: dict) -> tuple[Path, Path]:
    """out_dir/results.json (header, then every task with its items) and out_dir/results.md (the table)."""
    table = results_table(results)
    json_path = atomic_write_text(out_dir / "results.json", json.dumps({**header, "tasks": results}, indent=2))
    md_path = atomic_write_text(out_dir / "results.md", f"# Task evaluation of {header['model']}\n\n{table}\n\n"
                                "f1: token F1 x 100; bleu: sacrebleu corpus BLEU; rouge: F-measure x 100.\n")
    return json_path, md_path

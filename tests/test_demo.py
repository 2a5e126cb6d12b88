"""`lmforge demo --quick` end to end: world -> tokenizer -> shards -> pretraining -> eval -> report. The report is
checked by its structure and its numbers (sections, table columns, values that parse, lie in range and equal what
the runs logged, sentences consistent with the figures), not by its wording."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

import lmforge
import lmforge.demo
from cli_checks import error_line, snapshot
from lmforge.cli import main
from lmforge.data.formats import grounded_answer
from lmforge.data.shards import load_shards
from lmforge.data.synthetic import EVAL_SETS
from lmforge.demo import demo_plan, dpo_study, rlaif
from lmforge.demo.decoder import pretrain_config
from lmforge.demo.distill_study import window_losses
from lmforge.demo.evaluation import CHOICE_TASK, GENERATE_TASK
from lmforge.demo.inference import PROMPTS
from lmforge.demo.peft import METHODS
from lmforge.demo.verdicts import (
    NOISE,
    early_loss_note,
    paired_accuracy_note,
    pretraining_note,
    quantisation_note,
    speculative_note,
)
from lmforge.eval.report import metric_series
from lmforge.eval.stats import mcnemar_exact, wilson_interval
from lmforge.eval.text_metrics import exact_match
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.train.pretrain import pretrain
from near_ties import MIN_MARGIN, greedy_logits, top2_margin

SECTIONS = ("Pretraining (decoder, causal LM)", "Held-out task accuracy", "Samples", "Post-training", "DPO: plain vs",
            "Distillation",
            "Decode speed against transformers", "Decode speed: KV cache vs none", "Weight-only quantisation",
            "Speculative decoding", "Held-out perplexity of every checkpoint", "Task evaluation: base vs SFT",
            "lm-evaluation-harness cross-check", "LLM judge (RLAIF)", "Serving", "Parameter-efficient fine-tuning",
            "Encoder and encoder-decoder pretraining", "Fine-tuning: MLM-pretrained encoder",
            "Position encodings past the training length", "Reasoning formats taught by SFT",
            "Prompting methods on the format-SFT chat model", "Shots and prompt repetition",
            "Agents: ReAct and CodeAct", "Retrieval-augmented generation on facts never trained on",
            "Scale: what the calculator says", "Scale: a scaling-law fit on a tiny grid", "Scale: mixed precision")


def near_ties(out: Path, n_prompts: int) -> int:
    """How many greedy outputs of the speculative section (its first `n_prompts` prompts) hold a near-tie, where
    another path's rounding (the draft's verify chunks) may pick the runner-up; every other one must be identical."""
    target, tok = lmforge.load(out / "pretrain")
    cfg = SamplingConfig(max_new_tokens=demo_plan(True).speculative_tokens, temperature=0.0)
    count = 0
    for text in PROMPTS[:n_prompts]:
        prompt = tok.encode(text)
        new = generate_ids(target, prompt, cfg, tok.eos_id)
        stop = [tok.eos_id] if len(new) < cfg.max_new_tokens else []
        count += top2_margin(greedy_logits(target, prompt, new + stop)) <= MIN_MARGIN
    return count


def sections(text: str) -> dict[str, str]:
    """{heading: body} of the report's `## ` sections."""
    parts = re.split(r"^## (.+)$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def section(report: dict[str, str], start: str) -> str:
    (body,) = [b for title, b in report.items() if title.startswith(start)]
    return body


def table(body: str, index: int = 0) -> list[dict[str, str]]:
    """The rows of the body's `index`-th markdown table, as {column: cell}."""
    blocks = re.findall(r"((?:^\|.*\|\n?)+)", body, flags=re.MULTILINE)
    header, _, *rows = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in blocks[index].splitlines()]
    return [dict(zip(header, row, strict=True)) for row in rows]


def num(cell: str) -> float:
    """The first number of a cell; a percentage as a fraction."""
    found = re.search(r"-?[\d,]*\.?\d+(%?)", cell)
    value = float(found.group(0).rstrip("%").replace(",", ""))
    return value / 100 if found.group(1) else value


def last_logged(run: Path, key: str) -> float:
    return metric_series(run / "metrics.jsonl", key)[1][-1]


def near(ratio: float) -> bool:
    """A speed ratio so close to the verdict's threshold that the table's rounding may decide it."""
    return abs(ratio - (1 + NOISE)) < 0.01


@pytest.mark.slow
def test_demo_quick_writes_a_report_computed_in_the_run(tmp_path: Path) -> None:
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    plan = demo_plan(True)
    assert main(["demo", "--quick", "--out-dir", str(out), "--report-dir", str(report_dir)]) == 0
    text = (report_dir / "README.md").read_text()
    report = sections(text)
    for start in SECTIONS:
        assert section(report, start).strip()
    for name in ("pretrain_loss.png", "families_loss.png", "position_study.png", "lora_vs_pissa.png",
                 "kv_cache_scaling.png", "dpo_logps.png", "reasoning_shots.png", "scaling_frontier.png",
                 "precision_loss.png"):
        png = report_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"]({name})" in text

    # pretraining: the plan's fixed step budget, the logged losses, and a second run logs the same losses
    pre = {r["what"]: r["value"] for r in table(section(report, "Pretraining"))}
    assert num(pre["optimizer steps"]) == plan.decoder_steps == metric_series(out / "pretrain" / "metrics.jsonl",
                                                                               "loss")[0][-1]
    val_loss = last_logged(out / "pretrain", "val_loss")
    assert num(pre["validation loss"]) == pytest.approx(val_loss, abs=5e-5)
    assert num(pre["validation perplexity"]) == pytest.approx(math.exp(val_loss), abs=0.006)
    precision = pre["precision"].split()[0]
    assert precision in ("fp32", "bf16")
    pretrain(pretrain_config(plan, out / "data" / "shards", tmp_path / "again", precision))
    assert metric_series(tmp_path / "again" / "metrics.jsonl", "loss") == metric_series(
        out / "pretrain" / "metrics.jsonl", "loss")

    accuracy = table(section(report, "Held-out task accuracy"))
    assert [r["task"] for r in accuracy] == list(EVAL_SETS)
    assert all(0 <= num(r["accuracy"]) <= 1 and num(r["n"]) == plan.eval_per_task for r in accuracy)

    # post-training and distillation
    post = section(report, "Post-training")
    rows = table(post)
    assert [r["model"] for r in rows] == ["base (pretrained)", "SFT", "DPO", "PPO", "GRPO"]
    assert all(0 <= num(r["instruction accuracy"]) <= 1 and 0 <= num(r["verifier reward"]) <= 1 for r in rows)
    pairwise = num(re.search(r"pairwise accuracy ([\d.]+%)", post).group(1))
    assert pairwise == pytest.approx(last_logged(out / "post" / "reward", "eval_pairwise_accuracy"), abs=5e-4)
    # distillation: with and without the teacher on every token and on few labels (two temperatures), paired tests
    distill_body = section(report, "Distillation")
    distilled = table(distill_body)
    steps, few = plan.post_steps["distill"], plan.post_steps["distill_few"]
    assert [(num(r["steps"]), r["student"].split(" (")[0], r["student"].split()[-1]) for r in distilled] == [
        (steps, "with the teacher", "2)"), (steps, "without", "0)"), (few, "with the teacher", "2)"),
        (few, "with the teacher", "1)"), (few, "without", "0)")]
    val = torch.from_numpy(load_shards(out / "data" / "shards").tokens("val").astype("int64"))
    runs = ("distill-alpha0.5", "distill-alpha0", "distill-few-alpha0.5", "distill-few-alpha0.5-t1",
            "distill-few-alpha0")
    for row, run in zip(distilled, runs, strict=True):
        assert num(row["validation perplexity"]) == pytest.approx(math.exp(num(row["validation loss"])), rel=1e-3)
        losses = window_losses(out / "post" / run, val, plan.decoder.max_seq_len)
        assert num(row["validation loss"]) == pytest.approx(sum(losses) / len(losses), abs=6e-5)
    for row in (r for r in distilled if r["student"].startswith("with ")):
        p_value = float(re.search(r"p = ([\d.e-]+)", row["with - without [95% CI]"]).group(1))
        setting = f"On {row['labels']}, at temperature {row['student'].split()[-1][:-1]}"
        assert (p_value >= 0.05) == (f"{setting}, the teacher's effect on the validation loss is within noise"
                                     in distill_body)
    dpo_section = section(report, "DPO: plain vs")
    n_eval = plan.instruct_examples[2]
    dpo_rows = {r["model"]: r for r in table(dpo_section)}
    assert list(dpo_rows) == ["SFT", dpo_study.PLAIN, dpo_study.RECIPE]
    main_table = {r["model"]: num(r["instruction accuracy"]) for r in rows}  # the same scores, in both tables
    assert num(dpo_rows["SFT"]["instruction accuracy [95% CI]"]) == main_table["SFT"]
    assert num(dpo_rows[dpo_study.RECIPE]["instruction accuracy [95% CI]"]) == main_table["DPO"]
    for name, run in ((dpo_study.PLAIN, "dpo-plain"), (dpo_study.RECIPE, "dpo")):
        cell = dpo_rows[name]["instruction accuracy [95% CI]"]
        accuracy, low, high = (num(x) for x in re.findall(r"[\d.]+%", cell))
        assert (low, high) == pytest.approx(wilson_interval(round(accuracy * n_eval), n_eval), abs=5e-4)
        assert num(dpo_rows[name]["implicit-reward accuracy"]) == pytest.approx(
            last_logged(out / "post" / run, "eval_reward_accuracy"), abs=5e-4)
        p_value = float(re.search(r"p = ([\d.e-]+)", dpo_rows[name]["vs SFT (paired)"]).group(1))
        if p_value >= 0.05:
            assert f"{name} against SFT: within noise" in dpo_section
        assert metric_series(out / "post" / run / "metrics.jsonl", "logps/chosen")[0]
    assert "](dpo_logps.png)" in text
    for policy in ("dpo", "dpo-plain", "ppo/policy", "grpo/policy"):  # every aligned policy loads as a decoder
        assert lmforge.load(out / "post" / policy)[0].cfg.arch == "decoder"

    # inference
    versus = section(report, "Decode speed against transformers")
    same = re.search(r"\(batch 1 and each batched row\): (\d+) of (\d+) identical", versus)
    assert same and int(same.group(2)) == 9 and int(same.group(1)) >= 1  # logit parity: test_hf_parity.py
    assert all(num(r["lmforge"]) > 0 and num(r["transformers"]) > 0 for r in table(versus))
    quant_body = section(report, "Weight-only quantisation")
    quant = {r["weights"].split()[0]: r for r in table(quant_body)}
    sizes = [num(quant[w]["model.safetensors (MiB)"]) for w in ("fp32", "int8", "int4")]
    assert sizes[0] > sizes[1] > sizes[2] > 0
    speeds = {w: num(r["decode tokens/s"]) for w, r in quant.items()}
    if not any(near(speeds[w] / speeds["fp32"]) for w in ("int8", "int4")):
        verdict = quantisation_note(speeds["fp32"], {w: speeds[w] for w in ("int8", "int4")})
        assert verdict.split(" (")[0] in quant_body  # the claim; its figures come from the unrounded speeds
    spec_body = section(report, "Speculative decoding")
    spec = {r["what"]: r["value"] for r in table(spec_body)}
    identical, prompts = map(int, re.fullmatch(r"(\d+) of (\d+)", spec["outputs identical to plain greedy decoding"])
                             .groups())
    assert prompts > 0 and identical >= prompts - near_ties(out, prompts)
    assert 0 <= num(spec["draft tokens accepted"].split("(")[1]) <= 1
    speedup = num(spec["wall clock"].split("(")[1])
    t_step, t_draft, t_verify = map(float, spec["one target step / one draft step / one target step over m + 1 tokens"]
                                    .removesuffix(" ms").split(" / "))
    if not near(speedup):
        verdict = speculative_note(speedup, t_draft / t_step, t_verify / t_step)
        assert verdict.split(" (")[0] in spec_body

    # evaluation: every checkpoint's held-out perplexity (the base model's as `lmforge eval perplexity` gives it), the
    # task table's accuracies, intervals and paired tests from the per-item results, and the lm-eval cross-check
    perplexity = table(section(report, "Held-out perplexity"))
    assert [r["checkpoint"] for r in perplexity] == ["base (pretrained)", "SFT", "DPO", "PPO", "GRPO",
                                                      "distilled student", "int8 (quantised base)",
                                                      "int4 (quantised base)"]
    for r in perplexity:
        assert num(r["perplexity"]) == pytest.approx(math.exp(num(r["mean NLL (nats/token)"])), rel=1e-3)
        assert num(r["perplexity"]) > 1 and num(r["bits per byte"]) > 0
    held_out = out / "evaluation" / "held_out.jsonl"
    assert main(["eval", "perplexity", str(out / "pretrain"), "--input", str(held_out), "--json",
                 str(tmp_path / "ppl.json")]) == 0
    overall = json.loads((tmp_path / "ppl.json").read_text())["overall"]
    assert overall["documents"] == len(EVAL_SETS) * plan.eval_items[0]
    assert num(perplexity[0]["perplexity"]) == pytest.approx(overall["perplexity"], abs=6e-4)
    assert num(perplexity[0]["bits per byte"]) == pytest.approx(overall["bits_per_byte"], abs=6e-5)
    task_body = section(report, "Task evaluation")
    per_item = {m: json.loads((out / "evaluation" / f"tasks-{m}" / "results.json").read_text())["tasks"]
                for m in ("base", "sft")}
    task_rows = table(task_body)
    assert [(r["task"], r["metric"]) for r in task_rows] == [(GENERATE_TASK, "exact_match"), (CHOICE_TASK, "acc"),
                                                         (CHOICE_TASK, "acc_norm")]
    for r in task_rows:
        n = int(r["n"])
        assert n == plan.eval_items[1]
        outcomes = {m: [item[r["metric"]] for item in per_item[m][r["task"]]["items"]] for m in per_item}
        for m, column in (("base", "base (pretrained) [95% CI]"), ("sft", "SFT [95% CI]")):
            accuracy, low, high = (num(x) for x in re.findall(r"[\d.]+%", r[column]))
            assert accuracy == pytest.approx(sum(outcomes[m]) / n, abs=5e-4)
            assert (low, high) == pytest.approx(wilson_interval(sum(outcomes[m]), n), abs=5e-4)
        paired = mcnemar_exact(outcomes["base"], outcomes["sft"])
        assert float(r["McNemar p"]) == pytest.approx(paired.p_value, rel=1e-2)
        assert paired_accuracy_note("SFT", "base (pretrained)", paired, n) in task_body
    harness_body = section(report, "lm-evaluation-harness cross-check")
    harness = {r["metric"]: r for r in table(harness_body)}
    assert list(harness) == ["acc", "acc_norm"]
    columns = ("lmforge adapter", "lm-eval `hf` model")
    assert all(0 <= num(r[c]) <= 1 for r in harness.values() for c in columns)
    assert "They agree: the same choice on all" in harness_body
    if re.search(r"; 0 item-metrics on a near-tie", harness_body):
        assert all(r[columns[0]] == r[columns[1]] for r in harness.values())

    # the LLM judge: its agreement from the labelled pairs it wrote, and DPO on its labels against the verifier's
    judge_body = section(report, "LLM judge (RLAIF)")
    labelled = [json.loads(line) for line in (out / "evaluation" / "judge" / "labelled.jsonl").read_text().splitlines()]
    agreed = sum(p["label"] == p["meta"]["better"] for p in labelled)
    overall = table(judge_body)[0]
    assert (num(overall["pairs"]), num(overall["agreed with the verifier"])) == (len(labelled), agreed)
    assert re.findall(r"[\d.]+%", overall["agreement [95% CI]"])[1:] == [
        f"{x:.1%}" for x in wilson_interval(agreed, len(labelled))]
    assert ("no better than chance" in judge_body) == (
        not any(p["label"] != "tie" for p in labelled)
        or wilson_interval(agreed, sum(p["label"] != "tie" for p in labelled))[0] <= 0.5)
    if "no judge-labelled DPO" not in judge_body:
        judged = {r["model"]: r for r in table(judge_body, 1)}
        assert list(judged) == list(rlaif.LABELS.values())
        for row in judged.values():
            accuracy, low, high = (num(x) for x in re.findall(r"[\d.]+%", row["instruction accuracy [95% CI]"]))
            assert (low, high) == pytest.approx(wilson_interval(round(accuracy * n_eval), n_eval), abs=5e-4)
            float(row["KL from SFT"])
        p_value = float(re.search(r"p = ([\d.e-]+)", judge_body.split(rlaif.LABELS["judge"] + " against")[1]).group(1))
        assert (p_value >= 0.05) == ("within noise" in judge_body)
        for key in ("judge", "verifier"):
            assert lmforge.load(out / "evaluation" / "judge" / f"dpo-{key}")[0].cfg.arch == "decoder"

    # serving: a row per server and concurrency level, then sequential generation, and the sentence they call for
    serve_body = section(report, "Serving")
    serving = table(serve_body)
    assert [(r["server"], num(r["clients"])) for r in serving[:-1]] == [
        (s, n) for s in plan.serve_servers for n in plan.serve_clients]
    assert all(num(r["output tok/s"]) > 0 and num(r["req/s"]) > 0 for r in serving)
    assert all(0 < num(r["TTFT p50 ms"]) <= num(r["TTFT p95 ms"]) for r in serving[:-1])
    assert "of one-at-a-time generation" in serve_body

    # parameter-efficient fine-tuning: a row per method, each run reloads, the PiSSA sentence from the logged losses
    peft_body = section(report, "Parameter-efficient fine-tuning")
    peft = table(peft_body)
    assert [r["method"] for r in peft] == list(METHODS)
    assert all(0 < num(r["trainable %"]) <= 100 and num(r["ms / step"]) > 0 for r in peft)
    assert early_loss_note(metric_series(out / "peft" / "pissa" / "metrics.jsonl", "loss")[1],
                           metric_series(out / "peft" / "lora" / "metrics.jsonl", "loss")[1]) in peft_body
    for method in ("full", "lora", "qlora", "prefix", "svd-diag"):
        assert lmforge.load(out / "peft" / method)[0].cfg.arch == "decoder"

    # encoder families: the logged fine-tuning accuracies and the sentence they call for
    families = table(section(report, "Encoder and encoder-decoder pretraining"))
    assert [num(r["steps"]) for r in families] == [plan.family_steps] * 2
    for objective in ("mlm", "span"):  # each family's run dir loads as its architecture
        assert lmforge.load(out / objective)[0].cfg.arch == {"mlm": "encoder", "span": "encdec"}[objective]
    tuning_body = section(report, "Fine-tuning: MLM-pretrained encoder")
    tuning = {r["task"]: r for r in table(tuning_body)}
    scratch = last_logged(out / "finetune-sentiment-scratch", "eval_accuracy")
    tuned = last_logged(out / "finetune-sentiment-pretrained", "eval_accuracy")
    row = tuning["sentiment of reviews"]
    assert (num(row["from scratch"]), num(row["MLM-pretrained"])) == pytest.approx((scratch, tuned), abs=5e-4)
    assert pretraining_note("sentiment of reviews", "accuracy", scratch, tuned) in tuning_body

    check_reasoning(report, out / "reasoning", plan)
    # scale (its numbers: test_demo_scale.py): the calculator's rows, the grid's runs, the fp16 run's scaler
    assert [r["model"] for r in table(section(report, "Scale: what the calculator"))][1:] == ["GPT-3 175B", "Llama-65B"]
    assert len(table(section(report, "Scale: a scaling-law fit"))) == len(plan.scaling["sizes"]) * len(
        plan.scaling["steps"])
    assert f"{int(last_logged(out / 'scale' / 'precision' / 'fp16', 'skipped_steps'))} of " in section(
        report, "Scale: mixed precision")

    model, tokenizer = lmforge.load(out / "pretrain")
    assert tokenizer is not None and model.cfg.vocab_size >= tokenizer.vocab_size


def accuracy_and_interval(cell: str) -> tuple[float, float, float]:
    accuracy, low, high = (num(x) for x in re.findall(r"[\d.]+%", cell))
    assert low <= accuracy <= high
    return accuracy, low, high


def check_paired_rows(body: str, rows: list[dict[str, str]]) -> None:
    """Every accuracy has its interval, every p is a probability, and a sentence claims an effect only when p < 0.05."""
    for r in rows:
        for column in (c for c in r if "[95% CI]" in c):
            accuracy_and_interval(r[column])
        if r["McNemar p"]:
            assert 0 <= float(r["McNemar p"]) <= 1
    notes = [line for line in body.splitlines() if line.startswith("- ") and "p = " in line]
    assert notes
    assert "Effects that held" in body or "No comparison here showed an effect" in body
    for line in notes:
        p_value = float(re.search(r"p = ([\d.e-]+);", line).group(1))
        assert ("within noise" in line) == (p_value >= 0.05), line


def check_reasoning(report: dict[str, str], work: Path, plan) -> None:
    """The reasoning stage: well-formed shares, the prompting table from its transcripts, the shots curve, agents
    and RAG, each accuracy with its Wilson interval and each comparison with McNemar's test."""
    size = plan.reasoning
    standard = [json.loads(line) for line in (work / "prompting" / "standard.jsonl").read_text().splitlines()]
    n_reasoning, n_arithmetic = len(standard), 2 * size["agent_per_set"]  # problems too long to repeat are not asked
    assert 0 < n_reasoning <= 6 * size["reasoning_per_set"]
    formats = table(section(report, "Reasoning formats taught by SFT"))
    assert [int(r["held-out prompts"]) for r in formats] == [n_reasoning] * 2 + [n_arithmetic] * 2 + [size["eval"]]
    for r in formats:
        accuracy, low, high = accuracy_and_interval(r["well-formed [95% CI]"])
        n = int(r["held-out prompts"])
        assert (low, high) == pytest.approx(wilson_interval(round(accuracy * n), n), abs=5e-4)
    assert metric_series(work / "format-sft" / "metrics.jsonl", "loss")[0][-1] == size["sft_steps"]

    prompting_body = section(report, "Prompting methods")
    prompting = table(prompting_body)
    assert [r["method"] for r in prompting][:4] == ["standard (zero-shot, direct)",
                                                    "step-by-step instruction (as the format SFT taught)",
                                                    "few-shot (direct demonstrations)", "CoT (worked demonstrations)"]
    assert {"zero-shot CoT", "self-consistency k=5", "self-consistency k=10", "Auto-CoT"} <= {r["method"]
                                                                                           for r in prompting}
    for which, column in (("(in_domain)", "in-domain [95% CI]"), ("(ood)", "out-of-domain [95% CI]")):
        right = [r["correct"] for r in standard if which in r["task"]]
        assert accuracy_and_interval(prompting[0][column])[0] == pytest.approx(sum(right) / len(right), abs=5e-4)
    check_paired_rows(prompting_body, prompting)
    shots_body = section(report, "Shots and prompt repetition")
    shots, repetition = table(shots_body, 0), table(shots_body, 1)
    assert [r["method"] for r in shots] == ["0-shot", "1-shot", "2-shot", "4-shot", "many-shot"]
    assert [float(r["mean shots"]) for r in shots][:2] == [0.0, 1.0]
    assert len(repetition) == 4
    check_paired_rows(shots_body, shots + repetition)

    agents_body = section(report, "Agents: ReAct and CodeAct")
    agents = table(agents_body)
    assert [r["method"] for r in agents] == ["ReAct, search only (no calculator)", "ReAct, calculator and search",
                                             "direct answer", "CodeAct (sandboxed Python)"]
    check_paired_rows(agents_body, agents)
    for name in ("react-calculator", "react-no-calculator", "codeact"):
        assert len((work / "agents" / f"{name}.jsonl").read_text().splitlines()) == n_arithmetic

    rag_body = section(report, "Retrieval-augmented generation")
    recall = table(rag_body, 0)
    assert [r["mode"] for r in recall] == ["dense", "bm25", "hybrid"]
    for r in recall:
        values = [num(r[f"recall@{k}"]) for k in (1, 3, 5)]
        assert values == sorted(values) and all(0 <= v <= 1 for v in values)
    answers = [json.loads(line) for line in (work / "rag" / "rag.jsonl").read_text().splitlines()]
    assert len(answers) == size["eval"]
    for row, key in zip(table(rag_body, 1), ("closed_book", "rag"), strict=True):
        right = [exact_match(grounded_answer(a[key]) or a[key], a["answer"]) for a in answers]
        assert accuracy_and_interval(row["accuracy [95% CI]"])[0] == pytest.approx(sum(right) / len(right), abs=5e-4)


class _DemoBodyReached(Exception):
    """Raised by the stubbed first stage: the out-dir guard let the demo start."""


@pytest.fixture
def demo_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`lmforge demo --quick --out-dir DIR` with everything after the out-dir guard stubbed out."""

    def first_stage(plan, data_dir: Path):
        raise _DemoBodyReached(data_dir)

    monkeypatch.setattr(lmforge.demo, "prepare_world", first_stage)
    return lambda out: main(["demo", "--quick", "--out-dir", str(out), "--report-dir", str(tmp_path / "report")])


def test_demo_refuses_an_out_dir_it_did_not_make(tmp_path: Path, demo_cli, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    (tmp_path / "a-file").write_text("not a dir")
    for target in (out, tmp_path / "a-file"):
        before = snapshot(target) if target.is_dir() else target.read_bytes()
        assert demo_cli(target) == 2
        message = error_line(capsys.readouterr().err)
        assert str(target) in message and "--out-dir" in message
        assert (snapshot(target) if target.is_dir() else target.read_bytes()) == before


@pytest.mark.parametrize("state", ["missing", "empty", "earlier demo"])
def test_demo_starts_afresh_in_a_missing_empty_or_demo_dir(tmp_path: Path, demo_cli, state: str) -> None:
    out = tmp_path / "demo"
    if state != "missing":
        out.mkdir()
    if state == "earlier demo":
        (out / lmforge.demo.DEMO_MARKER).write_text("")
        (out / "stale").mkdir()
        (out / "stale" / "old.bin").write_bytes(b"old")
    with pytest.raises(_DemoBodyReached):
        demo_cli(out)
    assert sorted(p.name for p in out.iterdir()) == [lmforge.demo.DEMO_MARKER]  # marked, and emptied

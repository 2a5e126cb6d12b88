"""`lmforge demo`: the lifecycle end to end on the synthetic world, ending in report/README.md.

world -> tokenizer -> token shards -> (fp32 vs bf16 speed probe) -> pretraining on a time
budget -> held-out task accuracy and samples -> the report card. Every number in the report
is computed by this run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from lmforge.data.readers import read_documents
from lmforge.data.shards import prepare_shards
from lmforge.data.synthetic import EVAL_SETS, WorldConfig, eval_sets, write_corpus
from lmforge.eval.report import (
    Section,
    machine_description,
    markdown_table,
    plot_loss_curve,
    read_metrics,
    write_report,
)
from lmforge.eval.tasks import task_accuracy
from lmforge.infer.generate import SamplingConfig, generate
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import train_tokenizer
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.pretrain import pretrain
from lmforge.train.trainer import autocast, build_optimizer


@dataclass(frozen=True)
class DemoPlan:
    world: WorldConfig
    vocab_size: int
    model: ModelConfig
    batch_size: int
    minutes: float
    eval_per_task: int
    samples: tuple[str, ...] = ("Question: What is the capital of", "One morning,", "Question: A coin is heads up.")


def demo_plan(quick: bool, minutes: float | None) -> DemoPlan:
    if quick:
        return DemoPlan(WorldConfig(seed=0, n_documents=2000, n_eval=8), 512,
                        ModelConfig(family="gpt2", vocab_size=512, max_seq_len=128, n_layer=2, n_head=2, d_model=64),
                        batch_size=8, minutes=0.5 if minutes is None else minutes, eval_per_task=4)
    return DemoPlan(WorldConfig(seed=0), 1024,
                    ModelConfig(family="gpt2", vocab_size=1024, max_seq_len=256, n_layer=4, n_head=6, d_model=192),
                    batch_size=16, minutes=4.0 if minutes is None else minutes, eval_per_task=40)


def measure_training_speed(model_cfg: ModelConfig, batch_size: int, precision: str, steps: int = 4) -> float:
    """Training tokens/s (forward, backward, AdamW) on random tokens, after one warm-up step."""
    torch.manual_seed(0)
    model = DecoderLM(model_cfg).train()
    opt = build_optimizer(model, TrainConfig())
    ids = torch.randint(0, model_cfg.vocab_size, (batch_size, model_cfg.max_seq_len + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    device = torch.device("cpu")
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        with autocast(device, precision):
            loss = causal_lm_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch_size * model_cfg.max_seq_len / (time.perf_counter() - start)


def run_demo(out_dir: Path, report_dir: Path, quick: bool = False, minutes: float | None = None,
             precision: str = "auto") -> Path:
    plan = demo_plan(quick, minutes)
    t_start = time.perf_counter()
    report_dir.mkdir(parents=True, exist_ok=True)

    print("[1/6] generating the synthetic world")
    data_dir = out_dir / "data"
    files = write_corpus(plan.world, data_dir / "world")

    print("[2/6] training the tokenizer")
    docs = read_documents([files["train"]])
    tokenizer = train_tokenizer(docs, plan.vocab_size, show_progress=False)
    tokenizer.save(data_dir / "tokenizer")

    print("[3/6] tokenizing into shards")
    shards = prepare_shards([files["train"]], tokenizer, data_dir / "shards", val_fraction=0.02, progress=False)

    speeds = {p: measure_training_speed(plan.model, plan.batch_size, p) for p in ("fp32", "bf16")}
    chosen = max(speeds, key=speeds.get) if precision == "auto" else precision
    tokens_per_step = plan.batch_size * plan.model.max_seq_len
    max_steps = max(20, int(plan.minutes * 60 * speeds[chosen] / tokens_per_step))
    print(f"[4/6] pretraining: {speeds['fp32']:,.0f} tok/s fp32, {speeds['bf16']:,.0f} tok/s bf16 -> {chosen}; "
          f"{max_steps} steps (~{plan.minutes:g} min)")
    run_dir = out_dir / "pretrain"
    config = PretrainConfig(
        model=plan.model,
        data=DataConfig(dir=str(data_dir / "shards")),
        train=TrainConfig(out_dir=str(run_dir), batch_size=plan.batch_size, max_steps=max_steps,
                          warmup_steps=max(1, max_steps // 20), precision=chosen,
                          eval_every=max(1, max_steps // 10), save_every=max(1, max_steps // 4),
                          log_every=max(1, max_steps // 100), eval_batches=8),
    )
    t_train = time.perf_counter()
    result = pretrain(config)
    train_seconds = time.perf_counter() - t_train

    print("[5/6] evaluating")
    import lmforge

    model, tokenizer = lmforge.load(run_dir)
    sets = eval_sets(plan.world)
    results = [task_accuracy(model, tokenizer, sets[name][: plan.eval_per_task], progress=True) for name in EVAL_SETS]
    samples = []
    for i, prompt in enumerate(plan.samples):
        greedy = generate(model, tokenizer, prompt, SamplingConfig(max_new_tokens=48, temperature=0.0))
        sampled = generate(model, tokenizer, prompt, SamplingConfig(max_new_tokens=48, temperature=0.8,
                                                                     top_p=0.95, seed=i))
        samples.append((prompt, greedy, sampled))

    print("[6/6] writing the report")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    plot_loss_curve(run_dir / "metrics.jsonl", report_dir / "pretrain_loss.png")
    throughput = [r["tokens_per_s"] for r in metrics if "tokens_per_s" in r]
    val_loss = result.val_loss if result.val_loss is not None else float("nan")
    sections = [
        Section("Pretraining", "\n".join([
            markdown_table(["what", "value"], [
                ("model", f"GPT-2-style decoder, {plan.model.n_layer} layers, d_model {plan.model.d_model}, "
                          f"{plan.model.n_head} heads, context {plan.model.max_seq_len}"),
                ("parameters", f"{model.num_params():,}"),
                ("training FLOPs per token", f"{model.flops_per_token():,}"),
                ("tokenizer", f"byte-level BPE, {tokenizer.vocab_size} tokens"),
                ("corpus", f"{shards.num_documents['train']:,} documents, {shards.num_tokens['train']:,} "
                           f"train tokens, {shards.num_tokens['val']:,} validation tokens"),
                ("optimizer steps", f"{result.step:,} x {plan.batch_size} x {plan.model.max_seq_len} tokens"),
                ("tokens seen", f"{result.step * tokens_per_step:,} "
                                f"({result.step * tokens_per_step / shards.num_tokens['train']:.2f} epochs)"),
                ("precision", f"{chosen} (probe: fp32 {speeds['fp32']:,.0f} tok/s, bf16 {speeds['bf16']:,.0f} tok/s)"),
                ("training throughput", f"{_median(throughput):,.0f} tokens/s (median over logged windows)"),
                ("training time", f"{train_seconds:.0f} s"),
                ("final train loss", f"{result.train_loss:.4f}"),
                ("validation loss", f"{val_loss:.4f}"),
                ("validation perplexity", f"{math.exp(val_loss):.2f}"),
            ]),
        ]), images=["pretrain_loss.png"]),
        Section("Held-out task accuracy (greedy, exact final answer)", "\n".join([
            "The base model answers held-out questions in the pretraining format; `_ood` sets are longer than "
            "anything seen in training (3 names instead of 2, 3-4 flips, 3-4 arithmetic steps).",
            "",
            markdown_table(["task", "accuracy", "n"], [(r.task, f"{r.accuracy:.1%}", r.n) for r in results]),
        ])),
        Section("Samples", "\n\n".join(
            f"**Prompt:** `{p}`\n\n- greedy: `{_one_line(g)}`\n- temperature 0.8, top-p 0.95: `{_one_line(s)}`"
            for p, g, s in samples)),
    ]
    intro = (f"Written by `lmforge demo{' --quick' if quick else ''}` on {time.strftime('%Y-%m-%d %H:%M')} in "
             f"{time.perf_counter() - t_start:.0f} s. Machine: {machine_description()}. "
             "Every number below was computed in this run.")
    path = write_report(report_dir, "lmforge report card", intro, sections)
    print(f"report: {path}")
    return path


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def _one_line(text: str) -> str:
    return text.replace("\n", " \u21b5 ").replace("`", "'")

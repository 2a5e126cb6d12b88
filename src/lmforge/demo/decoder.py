"""Demo stage: GPT-style pretraining for a fixed number of steps, held-out task accuracy of the base model, and
samples.

`--precision auto` picks bf16 on a CPU with bf16 dot-product instructions (read from /proc/cpuinfo): AMX bf16
tiles (Intel Sapphire Rapids) or AVX512-BF16 (AMD Zen 4), where bf16 matmuls run natively and beat fp32; elsewhere
(AVX2, or AVX-512 without BF16) bf16 is emulated through conversions and slower. The rule, not a timing, decides, so
two runs on one machine train in the same precision and log identical losses. Both speeds are still measured for
the report."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import lmforge
from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from lmforge.cpu_info import cpu_flags
from lmforge.data.synthetic import EVAL_SETS, eval_sets
from lmforge.demo import StageResult
from lmforge.eval.report import Section, markdown_table, metric_series, plot_loss_curve
from lmforge.eval.tasks import task_accuracy
from lmforge.infer.generate import SamplingConfig, generate
from lmforge.model.decoder import DecoderLM
from lmforge.train.objectives import causal_lm_loss
from lmforge.train.pretrain import pretrain
from lmforge.train.trainer import autocast, build_optimizer

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan


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
            loss = causal_lm_loss(model, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch_size * model_cfg.max_seq_len / (time.perf_counter() - start)


NATIVE_BF16_FLAGS = {"amx_bf16": "AMX bf16 tiles", "avx512_bf16": "AVX512-BF16"}


def auto_precision(flags: set[str]) -> tuple[str, str]:
    """The demo decoder's precision for a CPU with these flags, and why."""
    native = [name for flag, name in NATIVE_BF16_FLAGS.items() if flag in flags]
    if native:
        return "bf16", f"auto: {native[0]} on this CPU"
    return "fp32", "auto: no bf16 instructions (AMX bf16 or AVX512-BF16) on this CPU"


def pretrain_config(plan: DemoPlan, shards_dir: Path, run_dir: Path, precision: str) -> PretrainConfig:
    steps = plan.decoder_steps
    return PretrainConfig(
        model=plan.decoder, data=DataConfig(dir=str(shards_dir)),
        train=TrainConfig(out_dir=str(run_dir), batch_size=plan.batch_size, max_steps=steps,
                          warmup_steps=max(1, steps // 20), precision=precision, eval_every=max(1, steps // 10),
                          save_every=max(1, steps // 4), log_every=max(1, steps // 100), eval_batches=8),
    )


def run(plan: DemoPlan, data: DemoData, out_dir: Path, report_dir: Path, precision: str) -> StageResult:
    mcfg = plan.decoder
    speeds = {p: measure_training_speed(mcfg, plan.batch_size, p) for p in ("fp32", "bf16")}
    chosen, why = precision, "--precision"
    if precision == "auto":
        chosen, why = auto_precision(cpu_flags())
    tokens_per_step = plan.batch_size * mcfg.max_seq_len
    print(f"  {plan.decoder_steps} steps in {chosen} ({why}); measured {speeds['fp32']:,.0f} tok/s fp32, "
          f"{speeds['bf16']:,.0f} tok/s bf16")
    run_dir = out_dir / "pretrain"
    t_train = time.perf_counter()
    result = pretrain(pretrain_config(plan, data.shards_dir, run_dir, chosen))
    train_seconds = time.perf_counter() - t_train

    model, tokenizer = lmforge.load(run_dir)
    sets = eval_sets(plan.world)
    results = [task_accuracy(model, tokenizer, sets[name][: plan.eval_per_task]) for name in EVAL_SETS]
    samples = []
    for i, prompt in enumerate(plan.samples):
        greedy = generate(model, tokenizer, prompt, SamplingConfig(max_new_tokens=48, temperature=0.0))
        sampled = generate(model, tokenizer, prompt,
                           SamplingConfig(max_new_tokens=48, temperature=0.8, top_p=0.95, seed=i))
        samples.append((prompt, greedy, sampled))

    plot_loss_curve(run_dir / "metrics.jsonl", report_dir / "pretrain_loss.png")
    _, throughput = metric_series(run_dir / "metrics.jsonl", "tokens_per_s")
    val_loss = result.val_loss if result.val_loss is not None else float("nan")
    shards = data.shards
    table = markdown_table(["what", "value"], [
        ("model", f"GPT-2-style decoder, {mcfg.n_layer} layers, d_model {mcfg.d_model}, {mcfg.n_head} heads, "
                  f"context {mcfg.max_seq_len}"),
        ("parameters", f"{model.num_params():,}"),
        ("training FLOPs per token", f"{model.flops_per_token():,}"),
        ("tokenizer", f"byte-level BPE, {tokenizer.vocab_size} tokens"),
        ("corpus", f"{shards.num_documents['train']:,} documents, {shards.num_tokens['train']:,} train tokens, "
                   f"{shards.num_tokens['val']:,} validation tokens"),
        ("optimizer steps", f"{result.step:,} x {plan.batch_size} x {mcfg.max_seq_len} tokens"),
        ("tokens seen", f"{result.step * tokens_per_step:,} "
                        f"({result.step * tokens_per_step / shards.num_tokens['train']:.2f} epochs)"),
        ("precision", f"{chosen} ({why}; measured fp32 {speeds['fp32']:,.0f} tok/s, bf16 {speeds['bf16']:,.0f} "
                      f"tok/s, bf16/fp32 = {speeds['bf16'] / speeds['fp32']:.2f}x)"),
        ("training throughput", f"{statistics.median(throughput):,.0f} tokens/s (median over logged windows)"),
        ("training time", f"{train_seconds:.0f} s"),
        ("final train loss", f"{result.train_loss:.4f}"),
        ("validation loss", f"{val_loss:.4f}"),
        ("validation perplexity", f"{math.exp(val_loss):.2f}"),
    ])
    return StageResult([
        Section("Pretraining (decoder, causal LM)", table, images=["pretrain_loss.png"]),
        Section("Held-out task accuracy (greedy, exact final answer)", "\n".join([
            "The base model answers held-out questions in the pretraining format; `_ood` sets are longer than "
            "anything seen in training (3 names instead of 2, 3-4 flips, 3-4 arithmetic steps).",
            "",
            markdown_table(["task", "accuracy", "n"], [(r.task, f"{r.accuracy:.1%}", r.n) for r in results]),
        ])),
        Section("Samples", "\n\n".join(
            f"**Prompt:** `{p}`\n\n- greedy: `{_one_line(g)}`\n- temperature 0.8, top-p 0.95: `{_one_line(s)}`"
            for p, g, s in samples)),
    ], run_dir)


def _one_line(text: str) -> str:
    return text.replace("\n", " \u21b5 ").replace("`", "'")

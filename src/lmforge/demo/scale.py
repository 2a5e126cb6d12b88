"""Demo stage: the accounting behind scale. `lmforge calc`'s figures for the demo decoder, GPT-3 175B and Llama-65B;
`lmforge scaling`'s fit and frontier on a tiny grid (seconds of training: a demonstration of the method, with the
command's own notes on how far such a fit can be trusted); bf16 against fp32 loss curves at equal steps; and a short
fp16 run with dynamic loss scaling on a tiny model (fp16 matmuls are slow on CPUs)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmforge.calc.figures import model_figures
from lmforge.calc.presets import PRESETS
from lmforge.config import DataConfig, ModelConfig, PretrainConfig, TrainConfig
from lmforge.eval.report import Section, markdown_table, metric_series, plot_series
from lmforge.model.decoder import DecoderLM
from lmforge.scaling.fit import fit_scaling_law
from lmforge.scaling.grid import GridSettings, ModelSize, non_embedding_params, run_grid
from lmforge.scaling.report import figures, plot_frontier
from lmforge.train.pretrain import pretrain

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan

# (name, model, training tokens D as its paper states them: Brown et al. 2020, table 2.2; Touvron et al. 2023)
PUBLISHED = (("GPT-3 175B", "gpt3-175b", 300e9), ("Llama-65B", "llama-65b", 1.4e12))
MEMORY_SHOWN = (("full", "fp16-mixed", False), ("qlora", "bf16", True))  # of calc's set-ups: seeds 000 and 001
PRECISION_PLOT, FRONTIER_PLOT = "precision_loss.png", "scaling_frontier.png"


def _bytes(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


def calculator_section(plan: DemoPlan) -> Section:
    demo_tokens = plan.decoder_steps * plan.batch_size * plan.decoder.max_seq_len
    models = [("demo decoder (this run)", plan.decoder, demo_tokens),
              *((name, PRESETS[preset], tokens) for name, preset, tokens in PUBLISHED)]
    rows = []
    for name, cfg, tokens in models:
        f = model_figures(cfg, tokens=tokens)
        memory = {(s["method"], s["precision"], s["activation_checkpointing"]): s["total"]
                  for s in f["memory"]["setups"]}
        flops = f["flops"]
        rows.append((name, f"{f['model']['params']:,}", f"{flops['training_per_token']:.3g} "
                     f"({flops['training_per_token'] / flops['six_n_per_token']:.2f} x 6N)", f"{tokens:.3g}",
                     f"{f['compute']['six_nd']:.3g}", *(_bytes(memory[setup]) for setup in MEMORY_SHOWN),
                     _bytes(f["kv_cache"]["bytes_16bit"]), f"{flops['seq_len']:,}"))
    return Section("Scale: what the calculator says", "\n".join([
        "`lmforge calc model` (`lmforge.calc.model_figures`) on the demo decoder and two published models, computed "
        "in this run from their configs (no weights). Training FLOPs per token are counted per layer by torch's FLOP "
        "counter, attention's T x T terms included (shown against 6N); 6ND for D = the tokens each trained on (the "
        "demo decoder: this run's steps x batch x context; GPT-3: 300B, Llama-65B: 1.4T as their papers state). "
        "Memory for one training step of one sequence at full context with Adam: full fine-tuning in fp16 mixed "
        "precision (16 bytes per parameter plus activations: seed 000's 1,000-1,400 GB for a 65B model), and "
        "QLoRA (rank 64 on every block Linear, NF4 base, activation checkpointing: seed 001's 48 GB). KV cache: one "
        "sequence at full context, 16-bit.", "",
        markdown_table(["model", "parameters", "training FLOPs / token", "D (tokens)", "6ND (FLOPs)",
                        "full fine-tuning, fp16 mixed", "QLoRA r=64", "KV cache", "context"], rows),
    ]))


def scaling_section(plan: DemoPlan, data: DemoData, out_dir: Path, report_dir: Path) -> Section:
    grid = plan.scaling
    settings = GridSettings(seq_len=grid["seq_len"], batch_size=grid["batch_size"], eval_batches=grid["eval_batches"])
    sizes = [ModelSize.parse(s) for s in grid["sizes"]]
    budgets = [steps * settings.tokens_per_step for steps in grid["steps"]]
    t0 = time.perf_counter()
    points = run_grid(sizes, budgets, data.shards_dir, out_dir / "scaling", settings, data.tokenizer.vocab_size,
                      log=lambda line: None)
    seconds = time.perf_counter() - t0
    fit = fit_scaling_law(np.array([p.params for p in points]), np.array([p.tokens for p in points]),
                          np.array([p.val_loss for p in points]))
    # the budget asked about: the demo decoder's own training compute, N non-embedding as in the grid
    decoder_n = non_embedding_params(DecoderLM(plan.decoder))
    decoder_d = plan.decoder_steps * plan.batch_size * plan.decoder.max_seq_len
    result = figures(points, fit, 6.0 * decoder_n * decoder_d)
    plot_frontier(report_dir / FRONTIER_PLOT, points, fit)
    f, opt = result["fit"], result["optimum"]
    rows = [(p.size, f"{p.params:,}", f"{p.tokens:,}", p.steps, f"{p.val_loss:.4f}") for p in points]
    return Section("Scale: a scaling-law fit on a tiny grid", "\n".join([
        f"`lmforge scaling`'s grid, fit and frontier at toy size: {len(points)} GPT-2-style runs ({len(sizes)} sizes "
        f"x {len(budgets)} token budgets, {settings.batch_size} x {settings.seq_len} tokens per step, each its own "
        f"cosine schedule) on this run's shards, {seconds:.0f} s of training in all; held-out loss of each, then "
        "L(N, D) = E + A/N^alpha + B/D^beta fitted by Hoffmann et al.'s approach 3 (N: non-embedding parameters). A "
        "demonstration of the method, not a measurement of scaling: the notes below say why.", "",
        markdown_table(["size (d_model x layers)", "N", "D (tokens)", "steps", "validation loss"], rows), "",
        f"Fit: E = {f['E']:.3g}, A = {f['A']:.3g}, alpha = {f['alpha']:.3f}, B = {f['B']:.3g}, beta = "
        f"{f['beta']:.3f}; rms log residual {f['rms_log_residual']:.3g}. For the demo decoder's budget (C = 6ND = "
        f"{opt['flops']:.3g} FLOPs; it has N = {decoder_n:,} and trained on D = {decoder_d:,} tokens) the fit puts "
        f"the optimum at N = {opt['params']:,.0f}, D = {opt['tokens']:,.0f}: {opt['tokens_per_param']:.3g} tokens "
        f"per parameter (Chinchilla: ~{opt['chinchilla_tokens_per_param']:g}). How far to trust it:", "",
        *(f"- {note}" for note in result["trust"]),
    ]), images=[FRONTIER_PLOT])


def _short_pretrain(data: DemoData, run_dir: Path, model: ModelConfig, steps: int, batch_size: int, precision: str,
                    **extra) -> Path:
    pretrain(PretrainConfig(model=model, data=DataConfig(dir=str(data.shards_dir)), train=TrainConfig(
        out_dir=str(run_dir), batch_size=batch_size, max_steps=steps, lr=3e-3, min_lr=3e-4,
        warmup_steps=max(1, steps // 10), precision=precision, eval_every=steps, save_every=steps, eval_batches=8,
        log_every=1, progress=False, **extra)))
    return run_dir / "metrics.jsonl"


def precision_section(plan: DemoPlan, data: DemoData, out_dir: Path, report_dir: Path) -> Section:
    p, vocab = plan.precision_run, data.tokenizer.vocab_size
    model = ModelConfig(family="gpt2", vocab_size=vocab, max_seq_len=p["seq_len"], n_layer=p["n_layer"],
                        n_head=p["n_head"], d_model=p["d_model"])
    curves, rows, speed = {}, [], {}
    for precision in ("fp32", "bf16"):
        metrics = _short_pretrain(data, out_dir / "precision" / precision, model, p["steps"], p["batch_size"],
                                  precision)
        curves[precision] = metric_series(metrics, "loss")
        speed[precision] = statistics.median(metric_series(metrics, "tokens_per_s")[1])
        rows.append((precision, f"{curves[precision][1][-1]:.4f}", f"{metric_series(metrics, 'val_loss')[1][-1]:.4f}",
                     f"{speed[precision]:,.0f}"))
    gap = max(abs(a - b) for a, b in zip(curves["fp32"][1], curves["bf16"][1], strict=True))
    plot_series(report_dir / PRECISION_PLOT, "bf16 autocast vs fp32 at equal steps", "optimizer step",
                "training loss (nats/token)", curves)

    f16 = plan.fp16_run
    tiny = ModelConfig(family="gpt2", vocab_size=vocab, max_seq_len=f16["seq_len"], n_layer=1, n_head=2,
                       d_model=f16["d_model"])
    t0 = time.perf_counter()
    fp16_metrics = _short_pretrain(data, out_dir / "precision" / "fp16", tiny, f16["steps"], f16["batch_size"],
                                   "fp16", loss_scale_growth_interval=f16["growth_interval"])
    fp16_seconds = time.perf_counter() - t0
    steps, losses = metric_series(fp16_metrics, "loss")
    _, scales = metric_series(fp16_metrics, "loss_scale")
    _, skipped = metric_series(fp16_metrics, "skipped_steps")
    return Section("Scale: mixed precision", "\n".join([
        f"The same {p['n_layer']}-layer, d_model {p['d_model']} decoder trained {p['steps']} steps x "
        f"{p['batch_size']} x {p['seq_len']} tokens twice from the same seed and data, in fp32 and under bf16 "
        "autocast (fp32 master weights); only the precision differs. Throughput = median tokens/s over the logged "
        "steps.", "",
        markdown_table(["precision", "final train loss", "validation loss", "tokens/s"], rows), "",
        f"Largest gap between the two loss curves at one step: {gap:.4f} nats; bf16 trained at "
        f"{speed['bf16'] / speed['fp32']:.2f}x fp32's tokens/s at this size (the pretraining table gives the ratio "
        "at the decoder's).", "",
        f"fp16 with dynamic loss scaling (`train.precision=fp16`, `torch.amp.GradScaler`: the loss scaled before "
        f"the backward, gradients unscaled before clipping, a step with inf/nan gradients skipped and the scale "
        f"halved, doubled after {f16['growth_interval']} good steps), labelled as what it is: a tiny 1-layer, "
        f"d_model {f16['d_model']} decoder for {steps[-1]} steps x {f16['batch_size']} x {f16['seq_len']} tokens, "
        f"tiny because fp16 matmuls are very slow on CPUs (the run took {fp16_seconds:.1f} s). Loss {losses[0]:.3f} "
        f"at step {steps[0]}, {losses[-1]:.3f} at step {steps[-1]}; loss scale {scales[0]:g} after the first step, "
        f"{scales[-1]:g} at the end (started at {TrainConfig().loss_scale_init:g}); {skipped[-1]:g} of "
        f"{steps[-1]} steps skipped for inf/nan gradients.",
    ]), images=[PRECISION_PLOT])


def run(plan: DemoPlan, data: DemoData, out_dir: Path, report_dir: Path) -> list[Section]:
    work = out_dir / "scale"
    return [calculator_section(plan), scaling_section(plan, data, work, report_dir),
            precision_section(plan, data, work, report_dir)]

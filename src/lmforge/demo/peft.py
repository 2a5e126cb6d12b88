"""Demo stage: every parameter-efficient method against full fine-tuning on one task (SFT on the synthetic
instructions, from the pretrained decoder): instruction accuracy, trainable share, the memory of weights plus
training state, seconds per step; and the LoRA and PiSSA loss curves from the same base."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

import lmforge
from lmforge.config import PEFT_METHODS, PeftConfig
from lmforge.data.chat import get_chat_template
from lmforge.data.sft import read_prompts
from lmforge.demo.training import short_run
from lmforge.demo.verdicts import early_loss_note
from lmforge.eval.instruct import instruct_scores
from lmforge.eval.report import Section, markdown_table, metric_series, plot_series
from lmforge.train.sft import SFTConfig, sft

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan

METHODS = ("full", *PEFT_METHODS)


def training_bytes(model) -> int:
    """Bytes of every parameter and buffer, plus a gradient and two AdamW moments per trainable parameter."""
    tensors = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return tensors + 3 * trainable


def seconds_per_step(metrics_path: Path, log_every: int) -> float:
    """Median training seconds per optimizer step over the logged windows (checkpointing excluded)."""
    _, tokens = metric_series(metrics_path, "tokens")
    _, rates = metric_series(metrics_path, "tokens_per_s")
    return statistics.median((b - a) / rate / log_every for a, b, rate in zip(tokens, tokens[1:], rates[1:],
                                                                              strict=False))


def run(plan: DemoPlan, data: DemoData, pretrained: Path, out_dir: Path, report_dir: Path) -> list[Section]:
    """Every method fine-tunes the `pretrained` decoder on the demo's SFT conversations."""
    files = data.instructions
    steps, ctx = plan.post_steps["peft"], plan.decoder.max_seq_len
    _, tokenizer = lmforge.load(pretrained)
    template = get_chat_template("lmforge", tokenizer)
    prompts = read_prompts(files["prompts_eval"], tokenizer, template, ctx - 48).examples[: plan.peft_eval]
    rows, curves = [], {}
    for method in METHODS:
        peft = None if method == "full" else PeftConfig(method=method)
        run_dir = out_dir / "peft" / method
        train = short_run(run_dir, steps, 1e-3 if method == "full" else 3e-3)
        sft(SFTConfig(base=str(pretrained), train_file=str(files["sft_train"]), max_len=ctx, peft=peft, train=train))
        model, _ = lmforge.load(run_dir)  # rebuilt with the method's modules and trainable/frozen split
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        percent = 100.0 * trainable / sum(p.numel() for p in model.parameters())
        state_bytes = training_bytes(model)
        metrics = run_dir / "metrics.jsonl"
        if method in ("lora", "pissa"):
            curves[method] = metric_series(metrics, "loss")
        scores = instruct_scores(model, template, prompts)
        rows.append((method, f"{scores.accuracy:.1%}", f"{scores.reward:.3f}", f"{trainable:,}", f"{percent:.2f}%",
                     f"{state_bytes / 2**20:.1f}", f"{seconds_per_step(metrics, train.log_every) * 1000:.0f}"))
    plot_series(report_dir / "lora_vs_pissa.png", "LoRA vs PiSSA from the same base (r=8, alpha=16)",
                "optimizer step", "SFT training loss", curves)
    return [Section("Parameter-efficient fine-tuning", "\n".join([
        f"Each method fine-tunes the pretrained decoder on the same {plan.instruct_examples[0]} synthetic "
        f"conversations for {steps} steps (full fine-tuning: lr 1e-3; methods: lr 3e-3; defaults r=8, alpha=16 on "
        f"attention q/k/v/o, bottleneck 16, 10 prefix / 20 prompt slots, top-1 layer), scored on {len(prompts)} "
        "held-out instructions by the verifier. Memory = every parameter and buffer plus gradient and two AdamW "
        "moments per trainable parameter (QLoRA's base counted at its NF4 size); time = median training seconds "
        "per step.", "",
        markdown_table(["method", "instruction accuracy", "verifier reward", "trainable", "trainable %",
                        "weights + training state (MiB)", "ms / step"], rows), "",
        early_loss_note(curves["pissa"][1], curves["lora"][1]),
    ]), images=["lora_vs_pissa.png"])]

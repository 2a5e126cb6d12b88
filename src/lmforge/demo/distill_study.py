"""Post-training's distillation study: does a teacher help a smaller student? Two pairs of students, each pair the same
but for the teacher (alpha 0.5, soft targets at temperature 2) or none (alpha 0, labels only): one pair on every
train token, one on a small labelled set (the first LABELLED_FRACTION of the train tokens), where Hinton et al.
(2015, sec. 3, with 3% of a speech corpus) found soft targets matter most, as a regulariser. Each pair is compared
on the same validation windows by a paired bootstrap of the per-window mean NLL, so a sentence says the teacher
helped or hurt only when significant."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import lmforge
from lmforge.config import DataConfig, ModelConfig
from lmforge.data.shards import load_shards
from lmforge.demo.training import short_run
from lmforge.demo.verdicts import paired_loss_note
from lmforge.eval.report import Section, markdown_table
from lmforge.eval.stats import paired_bootstrap
from lmforge.train.distill import DistillConfig, distill

TEMPERATURE, ALPHA, LR = 2.0, 0.5, 3e-3
LABELLED_FRACTION = 0.01  # so few that the student without a teacher overfits within a third of the step budget
BATCH = 16  # short_run's batch size


@dataclass
class StudentPair:
    labels: str  # which labels the pair trained on, in words
    steps: int
    runs: dict[str, Path]  # "teacher" / "none" -> run dir


def train_pairs(plan_student: ModelConfig, teacher: Path, shards: Path, runs: Path, steps: int) -> list[StudentPair]:
    """Every token for `steps` steps, and the first LABELLED_FRACTION of them (at least one batch) for `steps` // 3:
    about 28 epochs at the demo's full size, where the student without a teacher overfits (its training loss ended
    0.7 nats below its validation loss when this was written)."""
    n_train = len(load_shards(shards).tokens("train"))
    labelled = min(n_train, max(int(n_train * LABELLED_FRACTION), BATCH * (plan_student.max_seq_len + 1)))
    pairs = [StudentPair(f"all {n_train:,} train tokens", steps, {}),
             StudentPair(f"the first {labelled:,} train tokens ({labelled / n_train:.0%})", max(1, steps // 3), {})]
    for pair, train_tokens, prefix in zip(pairs, (None, labelled), ("distill", "distill-few"), strict=True):
        for side, alpha in (("teacher", ALPHA), ("none", 0.0)):
            run_dir = runs / f"{prefix}-alpha{alpha:g}"
            distill(DistillConfig(teacher=str(teacher), student_model=plan_student, alpha=alpha,
                                  temperature=TEMPERATURE, train_tokens=train_tokens, data=DataConfig(dir=str(shards)),
                                  train=short_run(run_dir, pair.steps, LR, batch_size=BATCH, eval_batches=8)))
            pair.runs[side] = run_dir
    return pairs


@torch.inference_mode()
def window_losses(run: Path, tokens: torch.Tensor, seq_len: int, batch_size: int = 16) -> list[float]:
    """Mean next-token NLL of the student in `run` on each whole window of seq_len + 1 validation tokens, over the
    tokenizer's vocabulary (as the trainer's validation: the model's padding rows are cut)."""
    model, tokenizer = lmforge.load(run)
    model.eval()
    vocab = tokenizer.vocab_size
    windows = tokens[: len(tokens) // (seq_len + 1) * (seq_len + 1)].view(-1, seq_len + 1)
    losses = []
    for chunk in windows.split(batch_size):
        logits = model(chunk[:, :-1])[..., :vocab].float()
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        losses += nll.mean(dim=1).tolist()
    return losses


def section(pairs: list[StudentPair], shards: Path, student: ModelConfig) -> Section:
    tokens = torch.from_numpy(load_shards(shards).tokens("val").astype("int64"))
    rows, notes = [], []
    for pair in pairs:
        losses = {side: window_losses(run, tokens, student.max_seq_len) for side, run in pair.runs.items()}
        test = paired_bootstrap(losses["none"], losses["teacher"])
        for side, label in (("teacher", f"with the teacher (alpha {ALPHA:g})"), ("none", "without (alpha 0)")):
            mean = sum(losses[side]) / len(losses[side])
            rows.append((pair.labels, pair.steps, label, f"{mean:.4f}", f"{math.exp(mean):.2f}",
                         f"{test.difference:+.4f} [{test.detail['ci95'][0]:+.4f}, {test.detail['ci95'][1]:+.4f}], "
                         f"p = {test.p_value:.3g}" if side == "teacher" else "(baseline)"))
        notes.append(paired_loss_note(f"On {pair.labels}", test, len(losses["none"])))
    n_windows = len(losses["none"])
    return Section("Distillation", "\n".join([
        f"A {student.n_layer}-layer, d_model {student.d_model} student from scratch, with the pretrained decoder as "
        f"teacher (soft targets at temperature {TEMPERATURE:g}, alpha {ALPHA:g}) and without it (alpha 0: labels "
        "only, everything else identical), in two settings: every train token, and a small labelled set (the first "
        f"{LABELLED_FRACTION:.0%} of the train tokens, or one batch if that is more, for a third of the steps: many "
        "epochs), where soft targets are said to matter most (Hinton et al. 2015: they regularise a student with few "
        "labels). Validation loss = mean NLL per "
        f"token over the {n_windows} validation windows of {student.max_seq_len} tokens; the teacher's effect is the "
        "paired difference (with minus without) of the per-window losses, with a paired-bootstrap 95% interval and "
        "p-value.", "",
        markdown_table(["labels", "steps", "student", "validation loss", "validation perplexity",
                        "with - without [95% CI]"], rows), "",
        " ".join(notes),
    ]))

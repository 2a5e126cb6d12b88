"""Post-training's distillation study: does a teacher help a smaller student? The same student from scratch with
the pretrained decoder as teacher (alpha 0.5) and without it (alpha 0: labels only), in two settings: every train
token (soft targets at temperature 2), and a small labelled set (the first LABELLED_FRACTION of the train tokens),
where Hinton et al. (2015, sec. 3, with 3% of a speech corpus) found soft targets matter most, as a regulariser; there
at temperatures 2 and 1, a small sweep. Each student with a teacher is compared with the one without on the same
validation windows by a paired bootstrap of the per-window mean NLL, so a sentence says the teacher helped or hurt
only when significant."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
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

ALPHA, LR = 0.5, 3e-3
TEMPERATURES = {"all": (2.0,), "few": (2.0, 1.0)}  # the teachers' temperatures in each setting
LABELLED_FRACTION = 0.01  # so few that the student without a teacher overfits within a third of the step budget
BATCH = 16  # short_run's batch size


@dataclass
class Students:
    labels: str  # which labels the students trained on, in words
    steps: int
    baseline: Path | None = None  # the student without a teacher
    taught: dict[float, Path] = field(default_factory=dict)  # teacher's temperature -> the student with it

    @property
    def distilled(self) -> Path:
        """The first student with a teacher."""
        return next(iter(self.taught.values()))


def train_students(student: ModelConfig, teacher: Path, shards: Path, runs: Path, steps: int,
                   few_steps: int) -> list[Students]:
    """Every token for `steps` steps, and the first LABELLED_FRACTION of them (at least one batch) for `few_steps`:
    about 28 epochs at the demo's full size (66 steps), where the student without a teacher overfits (its training
    loss ended 0.7 nats below its validation loss when this was written). The first student with a teacher on every
    token is in runs / "distill-alpha0.5"."""
    n_train = len(load_shards(shards).tokens("train"))
    labelled = min(n_train, max(int(n_train * LABELLED_FRACTION), BATCH * (student.max_seq_len + 1)))
    settings = [(Students(f"all {n_train:,} train tokens", steps), None, "distill", TEMPERATURES["all"]),
                (Students(f"the first {labelled:,} train tokens ({labelled / n_train:.0%})", few_steps),
                 labelled, "distill-few", TEMPERATURES["few"])]
    for students, train_tokens, prefix, temperatures in settings:
        runs_to_train = [(ALPHA, t, f"{prefix}-alpha{ALPHA:g}" + ("" if i == 0 else f"-t{t:g}"))
                         for i, t in enumerate(temperatures)]
        for alpha, temperature, run_name in [*runs_to_train, (0.0, temperatures[0], f"{prefix}-alpha0")]:
            distill(DistillConfig(teacher=str(teacher), student_model=student, alpha=alpha, temperature=temperature,
                                  train_tokens=train_tokens, data=DataConfig(dir=str(shards)),
                                  train=short_run(runs / run_name, students.steps, LR, batch_size=BATCH,
                                                  eval_batches=8)))
            if alpha:
                students.taught[temperature] = runs / run_name
            else:
                students.baseline = runs / run_name
    return [students for students, *_ in settings]


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


def section(settings: list[Students], shards: Path, student: ModelConfig) -> Section:
    tokens = torch.from_numpy(load_shards(shards).tokens("val").astype("int64"))
    rows, notes = [], []
    for students in settings:
        baseline = window_losses(students.baseline, tokens, student.max_seq_len)
        for temperature, run in students.taught.items():
            taught = window_losses(run, tokens, student.max_seq_len)
            test = paired_bootstrap(baseline, taught)
            low, high = test.detail["ci95"]
            rows.append((students.labels, students.steps, f"with the teacher (alpha {ALPHA:g}, temperature "
                         f"{temperature:g})", *_loss_cells(taught),
                         f"{test.difference:+.4f} [{low:+.4f}, {high:+.4f}], p = {test.p_value:.3g}"))
            notes.append(paired_loss_note(f"On {students.labels}, at temperature {temperature:g}", test, len(taught)))
        rows.append((students.labels, students.steps, "without (alpha 0)", *_loss_cells(baseline), "(baseline)"))
    n_windows = len(baseline)
    return Section("Distillation", "\n".join([
        f"A {student.n_layer}-layer, d_model {student.d_model} student from scratch, with the pretrained decoder as "
        f"teacher (alpha {ALPHA:g}: soft targets, times temperature squared, weigh half) and without it (alpha 0: "
        "labels only, everything else identical), in two settings: every train token, and a small labelled set (the "
        f"first {LABELLED_FRACTION:.0%} of the train tokens, or one batch if that is more, for many epochs: the steps "
        "column), where soft targets are said to matter most (Hinton et al. 2015: they regularise a student with "
        "few labels), there at two temperatures. Validation loss = mean NLL per token over the "
        f"{n_windows} validation windows of {student.max_seq_len} tokens; the teacher's effect is the paired "
        "difference (with minus without) of the per-window losses, with a paired-bootstrap 95% interval and p-value.",
        "",
        markdown_table(["labels", "steps", "student", "validation loss", "validation perplexity",
                        "with - without [95% CI]"], rows), "",
        " ".join(notes),
    ]))


def _loss_cells(losses: list[float]) -> tuple[str, str]:
    mean = sum(losses) / len(losses)
    return f"{mean:.4f}", f"{math.exp(mean):.2f}"

"""Demo stage: the encoder (BERT, masked LM) and encoder-decoder (T5, span corruption) families
pretrained through the shared trainer, then the pretrained encoder fine-tuned on labelled tasks and
compared with the same encoder trained from scratch on the same data and steps."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.config import DataConfig, FinetuneConfig, PretrainConfig, TrainConfig
from lmforge.data.synthetic_tasks import write_task_data
from lmforge.demo.verdicts import pretraining_note
from lmforge.eval.report import Section, markdown_table, metric_series, plot_series
from lmforge.train.finetune import finetune
from lmforge.train.pretrain import pretrain

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan
    from lmforge.train.trainer import TrainResult

# (task, data file stem, metric, what it is)
FINETUNE_TASKS = (("classify", "sentiment", "accuracy", "sentiment of reviews"),
                  ("tokens", "entities", "accuracy", "entity tags (per word)"))


def _pretrain(plan: DemoPlan, data: DemoData, out: Path, objective: str) -> TrainResult:
    model = plan.encoder if objective == "mlm" else plan.encdec
    steps = plan.family_steps
    config = PretrainConfig(
        model=model, objective=objective, data=DataConfig(dir=str(data.shards_dir)),
        train=TrainConfig(out_dir=str(out), seq_len=128, batch_size=plan.batch_size, max_steps=steps, lr=1e-3,
                          min_lr=1e-4, warmup_steps=max(1, steps // 20), eval_every=max(1, steps // 5),
                          save_every=steps, log_every=max(1, steps // 50), eval_batches=4, progress=False),
    )
    return pretrain(config)


def _finetune(plan: DemoPlan, base: Path, tasks: dict[str, Path], task: str, stem: str, out: Path,
              scratch: bool) -> float:
    steps = plan.finetune_steps
    config = FinetuneConfig(
        task=task, base=str(base), from_scratch=scratch, train_file=str(tasks[f"{stem}_train"]),
        eval_file=str(tasks[f"{stem}_test"]),
        train=TrainConfig(out_dir=str(out), max_steps=steps, lr=1e-3, min_lr=1e-4, warmup_steps=max(1, steps // 10),
                          batch_size=16, eval_every=steps, save_every=steps, log_every=max(1, steps // 10),
                          weight_decay=0.01, progress=False),
    )
    return next(iter(finetune(config).metrics.values()))


def run(plan: DemoPlan, data: DemoData, out_dir: Path, report_dir: Path) -> list[Section]:
    runs = {objective: _pretrain(plan, data, out_dir / objective, objective) for objective in ("mlm", "span")}
    series = {}
    for objective, name in (("mlm", "BERT masked LM"), ("span", "T5 span corruption")):
        metrics = out_dir / objective / "metrics.jsonl"
        series[f"{name}, train"] = metric_series(metrics, "loss")
        series[f"{name}, validation"] = metric_series(metrics, "val_loss")
    plot_series(report_dir / "families_loss.png", "masked-LM and span-corruption pretraining", "optimizer step",
                "cross-entropy on the scored tokens", series)
    pretrain_rows = []
    for objective, cfg, what in (("mlm", plan.encoder, "encoder (BERT), 15% masked 80/10/10"),
                                 ("span", plan.encdec, "encoder-decoder (T5), 15% noise in spans of mean 3")):
        result = runs[objective]
        pretrain_rows.append((what, f"{cfg.n_layer} layers, d_model {cfg.d_model}", f"{result.step:,}",
                              f"{result.train_loss:.4f}", f"{result.val_loss:.4f}"))

    tasks = write_task_data(plan.world, data.dir / "tasks", *plan.task_examples)
    rows, notes = [], []
    for task, stem, metric, what in FINETUNE_TASKS:
        scores = {scratch: _finetune(plan, out_dir / "mlm", tasks, task, stem,
                                     out_dir / f"finetune-{stem}-{'scratch' if scratch else 'pretrained'}", scratch)
                  for scratch in (False, True)}
        rows.append((what, f"{scores[True]:.1%}", f"{scores[False]:.1%}", f"{scores[False] - scores[True]:+.1%}"))
        notes.append(pretraining_note(what, metric, scratch=scores[True], pretrained=scores[False]))
    n_train, n_test = plan.task_examples
    return [
        Section("Encoder and encoder-decoder pretraining", "\n".join([
            "The same shards and the shared trainer; only the objective and the architecture change.", "",
            markdown_table(["model", "size", "steps", "final train loss", "validation loss"], pretrain_rows),
        ]), images=["families_loss.png"]),
        Section("Fine-tuning: MLM-pretrained encoder vs the same encoder from scratch", "\n".join([
            f"Both runs: the same architecture, {n_train} labelled training examples, {plan.finetune_steps} steps, "
            f"the same seed and schedule; scored on {n_test} held-out examples.", "",
            markdown_table(["task", "from scratch", "MLM-pretrained", "difference"], rows), "",
            " ".join(notes),
        ])),
    ]

"""The report card: markdown sections plus PNG plots, every number computed in the run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.cpu_info import cpu_model
from lmforge.io import atomic_write_text


@dataclass
class Section:
    title: str
    body: str
    images: list[str] = field(default_factory=list)  # file names inside the report dir


def machine_description() -> str:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {device}, torch {torch.__version__}"


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def metric_series(metrics_path: str | Path, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of a metrics.jsonl that log it, in file order."""
    points = [(r["step"], r[key]) for r in read_metrics(metrics_path) if key in r]
    return [step for step, _ in points], [value for _, value in points]


def plot_series(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, tuple[Sequence, Sequence]],
                logy: bool = False) -> Path:
    """One line plot (several named series) saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curve(metrics_path: str | Path, out_png: Path, title: str = "pretraining loss") -> Path:
    series = {"train": metric_series(metrics_path, "loss")}
    val = metric_series(metrics_path, "val_loss")
    if val[0]:
        series["validation"] = val
    return plot_series(out_png, title, "optimizer step", "cross-entropy (nats/token)", series)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:,.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(report_dir: Path, title: str, intro: str, sections: Sequence[Section]) -> Path:
    parts = [f"# {title}", "", intro, ""]
    for s in sections:
        parts += [f"## {s.title}", "", s.body.strip(), ""]
        parts += [f"![{s.title}]({img})" for img in s.images]
        parts += [""] if s.images else []
    return atomic_write_text(report_dir / "README.md", "\n".join(parts))

"""metrics.jsonl: the training log the trainer alone writes, one JSON record per line, keyed by step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lmforge.errors import CheckpointError, TrainingError
from lmforge.io import append_line, atomic_write_text

METRICS_FILE = "metrics.jsonl"
TIMING_KEYS = ("tokens_per_s", "mfu")  # a record's measures of speed: they differ between otherwise identical runs
METRICS_KEPT = "the checkpoints are intact; free some space, then continue with --resume"


def read_metrics(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each line of a metrics.jsonl. A last line that is not a whole record was cut short by
    a crash or a full disk and is dropped; a bad line before it is a CheckpointError naming file:line."""
    numbered = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    records = []
    for lineno, line in numbered:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if lineno == numbered[-1][0]:
                break  # torn by an interrupted write
            raise CheckpointError(f"{path}:{lineno} is not a JSON record and not the last line, so no interrupted "
                                  "write cut it short; repair or delete that line, then resume again "
                                  "(nothing was changed)")
        records.append((line, record))
    return records


class MetricsLog:
    """Append-only metrics.jsonl; on resume, records past the checkpoint's step are dropped (and a last line
    torn by a crash). A full disk truncates the file back to its last whole record."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [line for line, record in read_metrics(self.path) if record.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None:
            atomic_write_text(self.path, "")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainingError("train.tensorboard=true needs TensorBoard: pip install tensorboard") from None
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        append_line(self.path, json.dumps(record), kept=METRICS_KEPT)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

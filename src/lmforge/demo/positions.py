"""Demo stage: the positional-encoding study (learned, sinusoidal, RoPE, ALiBi) at 1x, 2x and 4x the
training length."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.eval.position_study import position_study_section, run_position_study
from lmforge.eval.report import Section

if TYPE_CHECKING:
    from lmforge.demo import DemoData, DemoPlan


def run(plan: DemoPlan, data: DemoData, out_dir: Path, report_dir: Path) -> list[Section]:
    result = run_position_study(data.shards_dir, out_dir / "positions", train_len=plan.position_len,
                                model={**plan.position_model, "vocab_size": plan.vocab_size},
                                steps=plan.position_steps, batch_size=plan.batch_size, seed=0)
    return [position_study_section(result, report_dir)]

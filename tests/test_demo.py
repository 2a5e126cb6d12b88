"""`lmforge demo --quick` end to end: world -> tokenizer -> shards -> pretraining -> eval -> report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import lmforge
from lmforge.cli import main


@pytest.mark.slow
def test_demo_quick_writes_a_report_computed_in_the_run(tmp_path: Path) -> None:
    out, report = tmp_path / "runs", tmp_path / "report"
    assert main(["demo", "--quick", "--out-dir", str(out), "--report-dir", str(report)]) == 0
    text = (report / "README.md").read_text()
    for heading in ("## Pretraining", "## Held-out task accuracy", "## Samples"):
        assert heading in text
    png = report / "pretrain_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # the numbers in the report are the ones the run logged
    records = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert f"| validation loss | {val_loss:.4f} |" in text
    assert f"| validation perplexity | {math.exp(val_loss):.2f} |" in text
    steps = int(re.search(r"\| optimizer steps \| ([\d,]+) x", text).group(1).replace(",", ""))
    assert steps == max(r["step"] for r in records)
    assert re.search(r"\| facts \| \d+\.\d% \| \d+ \|", text)

    model, tokenizer = lmforge.load(out / "pretrain")
    assert tokenizer is not None and model.cfg.vocab_size >= tokenizer.vocab_size

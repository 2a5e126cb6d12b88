"""The demo's scale stage at its --quick size: the calculator table, the scaling fit and the mixed-precision runs, each
number checked against what the calculator, the grid's runs and the training logs say."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.calc.flops import count_model
from lmforge.calc.presets import PRESETS
from lmforge.data.shards import load_shards
from lmforge.demo import demo_plan, scale
from lmforge.eval.report import metric_series
from lmforge.model.decoder import DecoderLM
from lmforge.scaling.grid import POINT_FILE
from lmforge.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(body: str, index: int = 0) -> list[dict[str, str]]:
    blocks = re.findall(r"((?:^\|.*\|\n?)+)", body, flags=re.MULTILINE)
    header, _, *lines = [[c.strip() for c in line.strip()[1:-1].split("|")] for line in blocks[index].splitlines()]
    return [dict(zip(header, line, strict=True)) for line in lines]


def number(cell: str) -> float:
    return float(re.search(r"-?[\d,]*\.?\d+(?:e[+-]?\d+)?", cell).group(0).replace(",", ""))


def test_scale_sections_report_the_calculator_the_fit_and_the_precision_runs(shards_dir: Path, tmp_path: Path) -> None:
    plan = demo_plan(True)
    data = SimpleNamespace(shards_dir=shards_dir, tokenizer=Tokenizer.from_file(load_shards(shards_dir).directory))
    out, report_dir = tmp_path / "runs", tmp_path / "report"
    calculator, fit, precision = scale.run(plan, data, out, report_dir)

    table = {row["model"]: row for row in rows(calculator.body)}
    assert list(table) == ["demo decoder (this run)", "GPT-3 175B", "Llama-65B"]
    demo_tokens = plan.decoder_steps * plan.batch_size * plan.decoder.max_seq_len
    params = {"demo decoder (this run)": DecoderLM(plan.decoder).num_params(),
              "GPT-3 175B": count_model(PRESETS["gpt3-175b"]).params,
              "Llama-65B": count_model(PRESETS["llama-65b"]).params}
    for (name, row), tokens in zip(table.items(), (demo_tokens, 300e9, 1.4e12), strict=True):
        assert number(row["parameters"]) == params[name]
        assert number(row["6ND (FLOPs)"]) == pytest.approx(6 * params[name] * tokens, rel=5e-3)
    assert number(table["GPT-3 175B"]["6ND (FLOPs)"]) == pytest.approx(3.14e23, rel=5e-3)  # Brown et al., table D.1
    llama = table["Llama-65B"]
    assert 1000 < number(llama["full fine-tuning, fp16 mixed"]) < 1400 and "GB" in llama["full fine-tuning, fp16 mixed"]
    assert 40 < number(llama["QLoRA r=64"]) < 50  # seed 001's 48 GB, here at 2048 tokens

    grid = rows(fit.body)
    assert len(grid) == len(plan.scaling["sizes"]) * len(plan.scaling["steps"])
    records = (out / "scale" / "scaling").glob(f"*/{POINT_FILE}")
    logged = {json.loads(record.read_text())["point"]["val_loss"] for record in records}
    assert {round(number(row["validation loss"]), 4) for row in grid} == {round(v, 4) for v in logged}
    assert re.search(r"alpha = \d\.\d{3}.*beta = \d\.\d{3}", fit.body)
    assert "tokens per parameter (Chinchilla: ~20)" in fit.body and fit.body.count("\n- ") >= 3

    runs = {row["precision"]: row for row in rows(precision.body)}
    assert list(runs) == ["fp32", "bf16"]
    for name, row in runs.items():
        assert number(row["final train loss"]) == pytest.approx(
            metric_series(out / "scale" / "precision" / name / "metrics.jsonl", "loss")[1][-1], abs=1e-4)
    fp16 = out / "scale" / "precision" / "fp16" / "metrics.jsonl"
    steps, scales = metric_series(fp16, "loss_scale")
    assert steps[-1] == plan.fp16_run["steps"] <= 50
    skipped = int(metric_series(fp16, "skipped_steps")[1][-1])
    assert f"{scales[-1]:g} at the end" in precision.body
    assert f"{skipped} of {steps[-1]} steps skipped" in precision.body
    for section in (fit, precision):
        (image,) = section.images
        assert (report_dir / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""`lmforge demo --quick` end to end: world -> tokenizer -> shards -> pretraining -> eval -> report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import lmforge
import lmforge.demo
from cli_checks import error_line, snapshot
from lmforge.cli import main
from lmforge.demo import demo_plan
from lmforge.demo.inference import PROMPTS
from lmforge.infer.generate import SamplingConfig, generate_ids
from near_ties import MIN_MARGIN, greedy_logits, top2_margin


def near_ties(out: Path, n_prompts: int) -> int:
    """How many greedy outputs of the speculative section (its first `n_prompts` prompts) hold a near-tie, where
    another path's rounding (the draft's verify chunks) may pick the runner-up; every other one must be identical."""
    target, tok = lmforge.load(out / "pretrain")
    cfg = SamplingConfig(max_new_tokens=demo_plan(True, None).speculative_tokens, temperature=0.0)
    count = 0
    for text in PROMPTS[:n_prompts]:
        prompt = tok.encode(text)
        new = generate_ids(target, prompt, cfg, tok.eos_id)
        stop = [tok.eos_id] if len(new) < cfg.max_new_tokens else []
        count += top2_margin(greedy_logits(target, prompt, new + stop)) <= MIN_MARGIN
    return count


@pytest.mark.slow
def test_demo_quick_writes_a_report_computed_in_the_run(tmp_path: Path) -> None:
    out, report = tmp_path / "runs", tmp_path / "report"
    assert main(["demo", "--quick", "--out-dir", str(out), "--report-dir", str(report)]) == 0
    text = (report / "README.md").read_text()
    for heading in ("## Pretraining (decoder, causal LM)", "## Held-out task accuracy", "## Samples",
                    "## Encoder and encoder-decoder pretraining", "## Fine-tuning: MLM-pretrained encoder",
                    "## Position encodings past the training length", "## Post-training: SFT, reward model",
                    "## Distillation", "## Parameter-efficient fine-tuning", "## Weight-only quantisation",
                    "## Speculative decoding", "## Decode speed: KV cache vs none",
                    "## Decode speed against transformers"):
        assert heading in text
    for name in ("pretrain_loss.png", "families_loss.png", "position_study.png", "lora_vs_pissa.png",
                 "kv_cache_scaling.png"):
        png = report / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"]({name})" in text

    # the numbers in the report are the ones the run logged
    records = [json.loads(x) for x in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    val_loss = [r["val_loss"] for r in records if "val_loss" in r][-1]
    assert f"| validation loss | {val_loss:.4f} |" in text
    assert f"| validation perplexity | {math.exp(val_loss):.2f} |" in text
    steps = int(re.search(r"\| optimizer steps \| ([\d,]+) x", text).group(1).replace(",", ""))
    assert steps == max(r["step"] for r in records)
    assert re.search(r"\| facts \| \d+\.\d% \| \d+ \|", text)

    # the fine-tuning table shows the accuracies the two runs logged
    def logged(run: str) -> float:
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(x) for x in lines if "eval_accuracy" in x][-1]["eval_accuracy"]

    scratch, tuned = logged("finetune-sentiment-scratch"), logged("finetune-sentiment-pretrained")
    assert f"| sentiment of reviews | {scratch:.1%} | {tuned:.1%} | {tuned - scratch:+.1%} |" in text
    reward = [json.loads(x) for x in (out / "post" / "reward" / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval_pairwise_accuracy"] for r in reward if "eval_pairwise_accuracy" in r][-1]
    assert f"held-out pairwise accuracy {accuracy:.1%}" in text
    for row in ("| base (pretrained) |", "| SFT |", "| DPO |", "| PPO |", "| GRPO |", "| with the teacher",
                "| without a teacher"):
        assert row in text
    same = re.search(r"Greedy outputs \(batch 1 and each batched row\): (\d+) of (\d+) identical", text)
    assert same and int(same.group(2)) == 9 and int(same.group(1)) >= 1  # logit parity: test_hf_parity.py
    assert re.search(r"\| decode tok/s, batch 1 \| [\d,.]+ \| [\d,.]+ \| \d+\.\d\dx \|", text)
    speculative = re.search(r"\| outputs identical to plain greedy decoding \| (\d+) of (\d+) \|", text)
    identical, prompts = map(int, speculative.groups()) if speculative else (-1, 0)
    assert prompts > 0 and identical >= prompts - near_ties(out, prompts)
    for bits in (8, 4):  # quantised checkpoints load and are smaller than the fp32 weights
        assert (out / f"int{bits}" / "model.safetensors").stat().st_size < (
            out / "pretrain" / (out / "pretrain" / "latest").read_text().strip() / "model.safetensors").stat().st_size
    for method in ("full", "lora", "qlora", "prefix", "svd-diag"):  # one row per method, every run reloads
        assert f"| {method} |" in text and lmforge.load(out / "peft" / method)[0].cfg.arch == "decoder"
    for policy in ("dpo", "ppo/policy", "grpo/policy"):  # every aligned policy loads as a decoder
        assert lmforge.load(out / "post" / policy)[0].cfg.arch == "decoder"
    for objective in ("mlm", "span"):  # each family's run dir loads as its architecture
        assert lmforge.load(out / objective)[0].cfg.arch == {"mlm": "encoder", "span": "encdec"}[objective]

    model, tokenizer = lmforge.load(out / "pretrain")
    assert tokenizer is not None and model.cfg.vocab_size >= tokenizer.vocab_size


class _DemoBodyReached(Exception):
    """Raised by the stubbed first stage: the out-dir guard let the demo start."""


@pytest.fixture
def demo_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`lmforge demo --quick --out-dir DIR` with everything after the out-dir guard stubbed out."""

    def first_stage(plan, data_dir: Path):
        raise _DemoBodyReached(data_dir)

    monkeypatch.setattr(lmforge.demo, "prepare_world", first_stage)
    return lambda out: main(["demo", "--quick", "--out-dir", str(out), "--report-dir", str(tmp_path / "report")])


def test_demo_refuses_an_out_dir_it_did_not_make(tmp_path: Path, demo_cli, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("years of work")
    (tmp_path / "a-file").write_text("not a dir")
    for target in (out, tmp_path / "a-file"):
        before = snapshot(target) if target.is_dir() else target.read_bytes()
        assert demo_cli(target) == 2
        message = error_line(capsys.readouterr().err)
        assert str(target) in message and "--out-dir" in message
        assert (snapshot(target) if target.is_dir() else target.read_bytes()) == before


@pytest.mark.parametrize("state", ["missing", "empty", "earlier demo"])
def test_demo_starts_afresh_in_a_missing_empty_or_demo_dir(tmp_path: Path, demo_cli, state: str) -> None:
    out = tmp_path / "demo"
    if state != "missing":
        out.mkdir()
    if state == "earlier demo":
        (out / lmforge.demo.DEMO_MARKER).write_text("")
        (out / "stale").mkdir()
        (out / "stale" / "old.bin").write_bytes(b"old")
    with pytest.raises(_DemoBodyReached):
        demo_cli(out)
    assert sorted(p.name for p in out.iterdir()) == [lmforge.demo.DEMO_MARKER]  # marked, and emptied

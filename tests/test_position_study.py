"""Position-encoding study: identical runs per scheme, shared evaluation windows, an honest report section."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

import lmforge
from lmforge.checkpoint import resolve_checkpoint
from lmforge.data.shards import load_shards
from lmforge.eval.position_study import (
    CANNOT,
    PLOT_FILE,
    StudyResult,
    eval_windows,
    position_study_section,
    run_position_study,
)
from tiny_pretraining import write_word_shards

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEMES = ("learned", "sinusoidal", "rope", "alibi")
L = 16
EVAL_TOKENS = 512
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, StudyResult]:
    root = tmp_path_factory.mktemp("study")
    write_word_shards(root, n_docs=500, val_fraction=0.1)
    result = run_position_study(root / "shards", root / "runs", schemes=SCHEMES, train_len=L,
                                model={"n_layer": 1, "n_head": 2, "d_model": 32, "vocab_size": 400},
                                steps=20, batch_size=8, seed=3, eval_tokens=EVAL_TOKENS)
    return root / "shards", root / "runs", result


def test_eval_windows_step_by_length_and_share_targets() -> None:
    tokens = np.arange(100, dtype=np.uint16)
    w = eval_windows(tokens, 8, 5)
    assert w.dtype == torch.int64 and w.shape == (5, 9)
    assert torch.equal(w[1], torch.arange(8, 17)) and torch.equal(w[:, 1:].flatten(), torch.arange(1, 41))
    assert torch.equal(eval_windows(tokens, 16, 3)[:, 1:].flatten(), torch.arange(1, 49))
    assert eval_windows(tokens, 16, 1000).shape == (6, 17)  # (100 - 1) // 16 whole windows


def test_every_scheme_trained_with_identical_settings(study) -> None:
    shards, runs, result = study
    trees = {}
    for scheme in SCHEMES:
        tree = yaml.safe_load((resolve_checkpoint(runs / scheme) / "config.yaml").read_text())
        assert tree["model"].pop("position") == scheme and tree["model"]["max_seq_len"] == L
        assert tree["train"].pop("out_dir") == str(runs / scheme)
        assert tree["train"]["max_steps"] == 20 and tree["train"]["seq_len"] == L
        trees[scheme] = tree
    assert all(trees[s] == trees["learned"] for s in SCHEMES)
    assert set(result.train_loss) == set(SCHEMES) and all(math.isfinite(v) for v in result.train_loss.values())


def test_perplexities_are_defined_only_where_the_scheme_can_run(study) -> None:
    _, runs, result = study
    assert result.lengths == (L, 2 * L, 4 * L) and result.eval_tokens == EVAL_TOKENS
    assert result.ppl["learned"][2 * L] is None and result.ppl["learned"][4 * L] is None
    for scheme in SCHEMES:
        for length, ppl in result.ppl[scheme].items():
            if ppl is not None:
                assert math.isfinite(ppl) and ppl > 1, (scheme, length, ppl)
    assert all(v is not None for s in SCHEMES[1:] for v in result.ppl[s].values())
    model, _ = lmforge.load(runs / "learned")
    with pytest.raises(ValueError, match="learned positions"):  # the model itself refuses, it is not skipped
        model(torch.zeros(1, 2 * L, dtype=torch.long))


def test_every_scheme_is_scored_on_the_same_windows(study) -> None:
    shards, runs, result = study
    assert result.eval_tokens == EVAL_TOKENS  # a multiple of 4L: every length predicts these first tokens
    # the windows of every length cover the same target tokens
    val = load_shards(shards).tokens("val")
    windows = {n: eval_windows(val, n, EVAL_TOKENS // n) for n in result.lengths}
    assert all(torch.equal(w[:, 1:].flatten(), windows[L][:, 1:].flatten()) for w in windows.values())
    # each reported perplexity is the mean cross-entropy of that scheme's final checkpoint on exactly these windows
    for scheme in SCHEMES:
        model, _ = lmforge.load(runs / scheme)
        for n, ppl in result.ppl[scheme].items():
            if ppl is not None:
                with torch.no_grad():
                    logits = model(windows[n][:, :-1])
                ce = F.cross_entropy(logits.flatten(0, 1), windows[n][:, 1:].flatten())
                assert ppl == pytest.approx(math.exp(ce.item()), rel=1e-4), (scheme, n)


def test_section_reports_the_computed_numbers(study, tmp_path: Path) -> None:
    _, _, result = study
    section = position_study_section(result, tmp_path)
    png = tmp_path / PLOT_FILE
    assert section.images == [PLOT_FILE] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for scheme in SCHEMES:
        ppl = result.ppl[scheme]
        cells = [f"{result.train_loss[scheme]:.4f}", *(CANNOT if p is None else f"{p:.2f}" for p in ppl.values())]
        assert f"| {scheme} | " + " | ".join(cells) + " |" in section.body
    assert "learned positions cannot run past 16 tokens" in section.body


def test_summary_is_generated_from_the_numbers(tmp_path: Path) -> None:
    result = StudyResult(64, (64, 128, 256), 4096, 300, 16, {"n_layer": 2, "n_head": 4, "d_model": 128},
                         {"learned": 2.0, "sinusoidal": 2.1, "rope": 2.05, "alibi": 2.2},
                         {"learned": {64: 8.0, 128: None, 256: None}, "sinusoidal": {64: 9.0, 128: 30.0, 256: 90.0},
                          "rope": {64: 8.5, 128: 12.0, 256: 25.5}, "alibi": {64: 9.5, 128: 9.2, 256: 9.0}},
                         {})
    body = position_study_section(result, tmp_path).body
    assert "At the training length (64 tokens) learned had the lowest validation perplexity (8.00)." in body
    assert "lowest for alibi (9.50 -> 9.00, x0.95), then rope (x3.00), then sinusoidal (x10.00)." in body
    assert "against sinusoidal, the best absolute scheme that runs past 64 tokens (x10.00), alibi (x0.95) and rope " \
           "(x3.00) held up better." in body
    assert "| learned | 2.0000 | 8.00 | cannot extrapolate" in body
    result.ppl["rope"][256] = 900.0
    body = position_study_section(result, tmp_path).body
    assert "alibi (x0.95) held up better while rope (x105.88) did not." in body
    result.ppl["sinusoidal"] = {64: 205.0, 128: 205.0, 256: 205.0}  # a run that never learned to use context
    body = position_study_section(result, tmp_path).body
    assert "sinusoidal (ppl@64 205.00) did not train to within 2x of the best" in body
    assert "lowest for alibi (9.50 -> 9.00, x0.95), then rope (x105.88)." in body and "against sinusoidal" not in body

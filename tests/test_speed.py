"""KV-cache scaling measurement and its report section."""

from __future__ import annotations

import pytest
import torch

from lmforge.config import ModelConfig
from lmforge.eval.speed import kv_cache_scaling, speed_section
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model.decoder import DecoderLM
from near_ties import assert_clear_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, max_seq_len=48, n_layer=2, n_head=2, d_model=32, init_std=0.3)
    return DecoderLM(cfg).eval()


def test_scaling_runs_lengths_that_fit_and_skips_the_rest() -> None:
    model = _model()
    res = kv_cache_scaling(model, [1, 5, 9, 2], lengths=(8, 24, 64), no_cache_max=8, repeats=2)
    assert res["ran"] == [8, 24] and res["skipped"] == [64]  # 4 + 64 > 48
    assert [r["new_tokens"] for r in res["rows"]] == [8, 24]
    short, long = res["rows"]
    assert_clear_greedy(model, [1, 5, 9, 2], generate_ids(model, [1, 5, 9, 2], SamplingConfig(
        max_new_tokens=8, temperature=0, stop_at_eos=False)))  # so `same_ids` compares clear choices
    assert short["cache_tok_s"] > 0 and short["no_cache_tok_s"] > 0 and short["speedup"] > 0
    assert short["same_ids"] is True
    assert long["cache_tok_s"] > 0 and long["no_cache_tok_s"] is None and long["same_ids"] is None


def test_cache_and_no_cache_give_identical_greedy_ids() -> None:
    model = _model()
    for prompt in ([1], [5, 9, 2, 40], [63, 0, 17]):
        ids = {use: generate_ids(model, prompt, SamplingConfig(max_new_tokens=30, temperature=0, stop_at_eos=False,
                                                               use_cache=use)) for use in (True, False)}
        assert_clear_greedy(model, prompt, ids[False])
        assert len(ids[True]) == 30 and ids[True] == ids[False]


def test_section_writes_plot_and_holds_the_numbers(tmp_path) -> None:
    results = {
        "context": 256, "prompt_len": 16, "no_cache_max": 64, "repeats": 3, "threads": 1,
        "ran": [64, 128], "skipped": [1024],
        "rows": [
            {"new_tokens": 64, "cache_tok_s": 1234.5, "cache_spread": 0.1, "no_cache_tok_s": 321.0,
             "speedup": 1234.5 / 321.0, "same_ids": True},
            {"new_tokens": 128, "cache_tok_s": 1100.0, "cache_spread": 0.1, "no_cache_tok_s": None,
             "speedup": None, "same_ids": None},
        ],
    }
    section = speed_section(results, tmp_path)
    png = tmp_path / "kv_cache_scaling.png"
    assert section.images == ["kv_cache_scaling.png"]
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for text in ("1,234.5", "321.0", "3.85", "1,100.0", "not run", "1024", "64, 128"):
        assert text in section.body

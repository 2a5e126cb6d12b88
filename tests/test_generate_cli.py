"""`lmforge generate` with beam search and with a speculative draft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.infer.beam import beam_search
from lmforge.infer.generate import SamplingConfig, generate_ids
from lmforge.model import build_model
from lmforge.tokenizer import train_tokenizer
from near_ties import assert_clear_greedy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gen")
    tok = train_tokenizer(["the king rode to the castle and the queen sang"] * 40, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    lmforge.save(build_model(ModelConfig(vocab_size=400, max_seq_len=64, n_layer=2, n_head=2, d_model=32)), tok,
                 root / "target")
    lmforge.save(build_model(ModelConfig(vocab_size=400, max_seq_len=64, n_layer=1, n_head=2, d_model=16)), tok,
                 root / "draft")
    lmforge.save(build_model(ModelConfig(vocab_size=450, max_seq_len=64, n_layer=1, n_head=2, d_model=16)), tok,
                 root / "other_vocab")
    return {"target": root / "target", "draft": root / "draft", "other": root / "other_vocab"}


def test_beam_and_draft_print_what_the_library_computes(models: dict[str, Path], capsys) -> None:
    model, tok = lmforge.load(models["target"])
    ids = tok.encode("the king")
    greedy_ids = generate_ids(model, ids, SamplingConfig(max_new_tokens=8, temperature=0.0), tok.eos_id)
    stopped = [tok.eos_id] if len(greedy_ids) < 8 else []
    assert_clear_greedy(model, ids, greedy_ids + stopped)  # the draft's verify chunks round differently
    greedy = tok.decode(greedy_ids)
    (best, _), *_ = beam_search(model, ids, 3, 8, tok.eos_id)
    assert main(["generate", str(models["target"]), "--prompt", "the king", "--max-new-tokens", "8",
                 "--num-beams", "3"]) == 0
    assert capsys.readouterr().out == "the king" + tok.decode(best) + "\n"
    assert main(["generate", str(models["target"]), "--prompt", "the king", "--max-new-tokens", "8",
                 "--draft", str(models["draft"])]) == 0
    captured = capsys.readouterr()
    assert captured.out == "the king" + greedy + "\n"  # speculative greedy == the target's greedy
    assert "draft tokens accepted" in captured.err


def test_bad_search_arguments_fail_clearly(models: dict[str, Path], capsys) -> None:
    assert main(["generate", str(models["target"]), "--prompt", "x", "--num-beams", "0"]) == 2
    assert "--num-beams must be >= 1" in capsys.readouterr().err
    assert main(["generate", str(models["target"]), "--prompt", "x", "--draft", str(models["other"])]) == 2
    assert "vocab" in capsys.readouterr().err.lower()

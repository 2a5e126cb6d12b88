"""`lmforge generate`: beam search, a speculative draft, its defaults and its argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import build_parser, main
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
    err = capsys.readouterr().err
    assert "--num-beams" in err and "must be >= 1" in err
    assert main(["generate", str(models["target"]), "--prompt", "x", "--draft", str(models["other"])]) == 2
    assert "vocab" in capsys.readouterr().err.lower()


def test_cli_defaults_are_the_python_defaults() -> None:
    """`lmforge generate DIR --prompt X` decodes as SamplingConfig() does: greedily, 64 tokens."""
    args = build_parser().parse_args(["generate", "DIR", "--prompt", "x"]).generate
    python = SamplingConfig()
    cli = (args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop),
           not args.no_cache, args.truncate_prompt, args.compile)
    assert cli == (python.max_new_tokens, python.temperature, python.top_k, python.top_p, python.seed,
                   tuple(python.stop), python.use_cache, python.truncate_prompt, python.compile)
    assert python.temperature == 0


def assert_one_line_error(capsys, *names: str) -> None:
    out, err = capsys.readouterr()
    assert out == "", out  # nothing printed before the error, not even the prompt
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, err


@pytest.mark.parametrize("options, name", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--stop", "ok", ""], "--stop"),
    (["--stop", "\udcff"], "--stop"),  # what Linux argv gives for the byte 0xff (surrogate escape)
    (["--prompt", "caf\udce9"], "--prompt"),  # a Latin-1 "café"
    (["--num-samples", "0"], "--num-samples"),
    (["--num-beams", "0"], "--num-beams"),
    (["--num-beams", "2", "--length-penalty", "nan"], "--length-penalty"),
    (["--num-beams", "2", "--num-samples", "2"], "--num-samples"),
    (["--num-beams", "2", "--draft", "DRAFT"], "--draft"),
    (["--draft", "DRAFT", "--num-draft", "0"], "--num-draft"),
    (["--draft", "DRAFT", "--draft-min-confidence", "1"], "--draft-min-confidence"),
])
def test_bad_options_are_refused_before_loading_or_printing(models: dict[str, Path], capsys, monkeypatch,
                                                           options: list[str], name: str) -> None:
    loads = []
    monkeypatch.setattr(lmforge, "load", lambda path: loads.append(path))
    options = [str(models["draft"]) if o == "DRAFT" else o for o in options]
    prompt = [] if "--prompt" in options else ["--prompt", "the king"]
    assert main(["generate", str(models["target"]), *prompt, *options]) == 2
    assert_one_line_error(capsys, name)
    assert loads == []


@pytest.mark.parametrize("options, message", [
    (["--prompt", ""], "empty"),
    (["--prompt", "the king " * 40, "--max-new-tokens", "8"], "--truncate-prompt"),  # over the 64-token context
    (["--prompt", "the king", "--max-new-tokens", "64"], "no room"),
    (["--prompt", "the king", "--num-samples", "2", "--max-new-tokens", "64"], "no room"),
    (["--prompt", "the king", "--no-stream", "--max-new-tokens", "64"], "no room"),
])
def test_prompt_that_does_not_fit_prints_nothing(models: dict[str, Path], capsys, options: list[str],
                                                 message: str) -> None:
    assert main(["generate", str(models["target"]), *options]) == 2
    assert_one_line_error(capsys, message)


def test_samples_print_prompt_and_text(models: dict[str, Path], capsys) -> None:
    model, tok = lmforge.load(models["target"])
    for stream in ([], ["--no-stream"]):
        assert main(["generate", str(models["target"]), "--prompt", "the king", "--max-new-tokens", "6",
                     "--num-samples", "2", "--temperature", "1", "--seed", "3", *stream]) == 0
        texts = []
        for seed in (3, 4):
            cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=seed)
            texts.append(tok.decode(generate_ids(model, tok.encode("the king"), cfg, tok.eos_id)))
        expected = "".join(f"--- sample {i + 1}\nthe king{text}\n" for i, text in enumerate(texts))
        assert capsys.readouterr().out == expected

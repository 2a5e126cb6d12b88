"""`lmforge eval perplexity`: the sliding window of transformers' perplexity guide, checked by hand and against
transformers on the exported model; bits per byte; bad input as one line, exit 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmforge
from eval_models import CONTEXT, decoder_dir, encdec_dir, word_tokenizer
from lmforge.cli import main
from lmforge.errors import ConfigError
from lmforge.eval.perplexity import file_perplexity, window_plan
from tiny_pretraining import word_documents


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A decoder checkpoint and a JSONL of 6 documents, two longer than the 32-token context (one 300+ tokens)."""
    root = tmp_path_factory.mktemp("ppl")
    tokenizer = word_tokenizer()
    docs = word_documents(5, seed=3)
    docs.append(" ".join(docs))
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    lengths = [len(tokenizer.encode(d)) for d in docs]
    assert max(lengths) > 5 * CONTEXT and min(lengths) < CONTEXT - 1
    return root, decoder_dir(root, tokenizer), corpus, docs


def test_window_plan_by_hand():
    """10 tokens, context 4, stride 2: windows start every 2 tokens; each scores what the last did not reach."""
    assert window_plan(10, 4, 2) == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    assert window_plan(10, 4, 3) == [(0, 4, 1), (3, 7, 4), (6, 10, 7)]
    assert window_plan(3, 4, 2) == [(0, 3, 1)]
    with pytest.raises(ConfigError, match="--stride"):
        window_plan(10, 4, 4)  # a window whose first token is not scored: each token must be scored once


def _hand_nll(model, seq: list[int], stride: int) -> float:
    """Token t (t >= 1) is scored in the first window [k*stride, k*stride + CONTEXT) that reaches past it, from
    the window's tokens before it: one prefix forward per token."""
    total = 0.0
    for t in range(1, len(seq)):
        begin = max(0, (t - CONTEXT) // stride + 1) * stride
        logits = model(torch.tensor([seq[begin:t]]))[0, -1]
        total -= torch.log_softmax(logits.double(), -1)[seq[t]].item()
    return total


@pytest.mark.parametrize("stride", [16, 31, 5])
def test_perplexity_by_hand(setup, stride):
    root, ckpt, corpus, docs = setup
    model, tokenizer = lmforge.load(ckpt)
    per_file, overall = file_perplexity(model, tokenizer, [corpus], stride=stride, batch_size=3, progress=False)
    seqs = [[tokenizer.eos_id, *tokenizer.encode(d)] for d in docs]  # each document after the separator
    with torch.inference_mode():
        nll = sum(_hand_nll(model, s, stride) for s in seqs)
    tokens = sum(len(s) - 1 for s in seqs)
    assert per_file.tokens == overall.tokens == tokens and overall.documents == len(docs)
    assert overall.nll == pytest.approx(nll, rel=1e-5)
    assert overall.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert overall.bits_per_byte == pytest.approx(nll / math.log(2) / sum(len(d.encode()) for d in docs), rel=1e-5)


@pytest.mark.parametrize("stride", [None, 8])
def test_same_as_transformers_on_the_exported_model(setup, stride, tmp_path):
    """The guide's loop with transformers' own loss on the exported model (its tokenizer too): the same
    perplexity within 1e-4 relative. Stride None: every document fits one window (no striding) but the long one."""
    transformers = pytest.importorskip("transformers")
    root, ckpt, corpus, docs = setup
    model, tokenizer = lmforge.load(ckpt)
    hf_dir = lmforge.export_hf(model, tokenizer, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    short = [d for d in docs if len(tokenizer.encode(d)) < CONTEXT - 1]
    texts, step = (short, CONTEXT // 2) if stride is None else (docs, stride)
    path = tmp_path / "short.jsonl" if stride is None else corpus
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in texts))
    nll_sum, n_tokens = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([[hf_tok.eos_token_id, *hf_tok(text)["input_ids"]]])
            prev_end = 0
            for begin in range(0, ids.shape[1], step):
                end = min(begin + CONTEXT, ids.shape[1])
                target_len = end - prev_end
                window = ids[:, begin:end]
                labels = window.clone()
                labels[:, :-target_len] = -100
                scored = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
                nll_sum += hf(window, labels=labels).loss.item() * scored
                n_tokens += scored
                prev_end = end
                if end == ids.shape[1]:
                    break
    (_, overall) = file_perplexity(model, tokenizer, [path], stride=stride, progress=False)
    assert overall.tokens == n_tokens
    assert overall.perplexity == pytest.approx(math.exp(nll_sum / n_tokens), rel=1e-4)


def test_cli_writes_json_per_file_and_overall(setup, tmp_path, capsys):
    root, ckpt, corpus, docs = setup
    txt = tmp_path / "one.txt"
    txt.write_text(docs[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the king"}\n{"text": oops}\n')
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", str(ckpt), "--input", str(corpus), str(txt), str(bad), "--stride", "16",
                 "--batch-size", "4", "--skip-bad-lines", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert [f["source"] for f in result["files"]] == [str(corpus), str(txt), str(bad)] and result["stride"] == 16
    assert [f["skipped_lines"] for f in result["files"]] == [0, 0, 1] and "skipped 1 bad lines" in printed
    model, tokenizer = lmforge.load(ckpt)
    want = file_perplexity(model, tokenizer, [corpus, txt, bad], stride=16, skip_bad_lines=True, progress=False)
    for got, expect in zip([*result["files"], result["overall"]], want, strict=True):
        assert got["perplexity"] == pytest.approx(expect.perplexity, rel=1e-6)
        assert got["bits_per_byte"] == pytest.approx(expect.bits_per_byte, rel=1e-6)
        assert f"{expect.perplexity:.4f}" in printed
    assert result["overall"]["tokens"] == sum(f["tokens"] for f in result["files"])
    assert result["files"][2]["tokens"] == len(tokenizer.encode("the king")) and result["files"][1]["documents"] == 1


@pytest.mark.parametrize("case, problem", [
    ("empty document", "document 2 tokenises to no tokens"),
    ("empty file", "no documents in"),
    ("stride", "--stride must be between 1 and the context minus one (31), got 32"),
    ("missing field", "missing field 'text'"),
    ("encdec", "holds an encoder-decoder (T5), and `lmforge eval perplexity` needs a decoder (GPT, Llama); this "
               "model works with: lmforge generate (text to text), eval tasks"),
])
def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys, case, problem):
    root, ckpt, corpus, docs = setup
    data = tmp_path / "data.jsonl"
    data.write_text({"empty document": '{"text": "the king"}\n{"text": ""}\n', "empty file": "",
                     "missing field": '{"body": "the king"}\n'}.get(case, '{"text": "the king"}\n'))
    model = encdec_dir(tmp_path, word_tokenizer()) if case == "encdec" else ckpt
    argv = ["eval", "perplexity", str(model), "--input", str(data), *(["--stride", "32"] if case == "stride" else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert problem in err and err.count("\n") == 1 and "Traceback" not in err

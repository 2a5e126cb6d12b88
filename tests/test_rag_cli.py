"""`lmforge rag index` and `lmforge rag ask` in-process: an index built from txt/jsonl files and directories, added to
incrementally, answers from a tiny decoder with numbered sources, the decoder's mean-pooled states as the embedder,
and bad input (an empty collection or index, another embedder than the index's) as one line with exit 2 and nothing
written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_checks import error_line, snapshot
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data.chat import get_chat_template
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.model.decoder import DecoderLM
from lmforge.rag import Hit, Index
from lmforge.rag.answer import answer_questions, fit_passages
from lmforge.rag.embedders import get_embedder
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

FACTS = {"velmora": "The capital of Velmora is Tarsk. Tarsk lies on the river Oln.",
         "brindle": "Brindle the cat naps in the sun and likes fish.",
         "quessa": "The moon of Quessa is called Arvel and it is blue."}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("rag")
    docs = root / "docs"
    (docs / "notes").mkdir(parents=True)
    (docs / "notes" / "velmora.txt").write_text(FACTS["velmora"])
    (docs / "notes" / "brindle.md").write_text(FACTS["brindle"])
    (docs / "faq.jsonl").write_text(json.dumps({"id": "quessa", "text": FACTS["quessa"]}) + "\n")
    tok = train_tokenizer(list(FACTS.values()) * 20, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=160, n_layer=1, n_head=2, d_model=32,
                                  init_std=0.2)).eval()
    chat = save(model, tok, root / "chat", run_config=CheckpointManifest(model=model.cfg, stage="sft",
                                                                         run={"template": "lmforge"}))
    return {"root": root, "docs": docs, "chat": chat, "plain": save(model, tok, root / "plain"), "model": model,
            "tok": tok}


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_index_then_ask_prints_the_answer_and_numbered_sources(world, capsys):
    index = world["root"] / "index"
    code, out, _ = _run(capsys, "rag", "index", world["docs"] / "notes", world["docs"] / "faq.jsonl", "--out", index,
                        "--chunk-tokens", 12, "--overlap", 4)
    assert code == 0 and "3 new" in out and "embedder all-MiniLM-L6-v2" in out, out
    code, out, err = _run(capsys, "rag", "ask", world["chat"], "--index", index, "--question",
                          "What is the capital of Velmora?", "--k", 2, "--mode", "hybrid", "--max-new-tokens", 8)
    assert code == 0, err
    answer, sources = out.split("\nsources:\n")
    lines = sources.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"[1] {(world['docs'] / 'notes' / 'velmora.txt').as_posix()} "
                                                   "chunk 0, score "), out
    assert lines[1].startswith("[2] ")


def test_reindexing_embeds_only_changed_documents(world, capsys, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in FACTS.items():
        (docs / f"{name}.txt").write_text(text)
    index = tmp_path / "index"
    assert _run(capsys, "rag", "index", docs, "--out", index)[0] == 0
    before = Index.load(index)
    (docs / "brindle.txt").write_text("Brindle the cat now sleeps all day.")
    (docs / "new.txt").write_text("Oln flows into the Grey Sea.")
    code, out, _ = _run(capsys, "rag", "index", docs, "--out", index)
    assert code == 0 and "1 new, 1 changed, 2 unchanged; embedded 2 chunks" in out, out
    after = Index.load(index)
    assert np.array_equal(after.vectors[:2], before.vectors[[1, 2]])  # quessa and velmora kept as they were
    assert [c[0] for c in after.chunks][-2:] == [(docs / "brindle.txt").as_posix(), (docs / "new.txt").as_posix()]
    code, _, err = _run(capsys, "rag", "index", docs, "--out", index, "--chunk-tokens", 64)
    assert code == 2 and error_line(err).endswith("was chunked with --chunk-tokens 128; an index keeps one chunking: "
                                                  "pass --chunk-tokens 128 (or leave it out) or a new --out"), err


def test_ask_without_a_chat_template_and_passages_that_do_not_fit(world):
    model, tok = world["model"], world["tok"]
    hits = [Hit("velmora", 0, FACTS["velmora"], 0.9), Hit("quessa", 0, FACTS["quessa"], 0.5)]
    [plain, closed] = answer_questions(model, tok, ["Where is Tarsk?", "Where is Tarsk?"], [hits, []],
                                       max_new_tokens=4)
    assert plain.dropped == 0 and len(plain.passages) == 2 and closed.passages == []
    assert "\n" not in plain.answer
    template = get_chat_template("lmforge", tok)
    one = len(fit_passages(tok, template, "Where is Tarsk?", hits[:1], 1000)[0])
    ids, kept = fit_passages(tok, template, "Where is Tarsk?", hits, one)
    assert (kept, len(ids)) == (1, one)  # the lower-ranked passage leaves the prompt
    with pytest.raises(ConfigError, match="the question and its best passage take"):
        fit_passages(tok, template, "Where is Tarsk?", hits, one - 1)


def test_the_decoders_own_states_as_embedder(world, capsys, tmp_path):
    index = tmp_path / "own"
    code, out, _ = _run(capsys, "rag", "index", world["docs"], "--out", index, "--embedder", f"mean:{world['plain']}")
    assert code == 0 and f"embedder mean:{world['plain'].resolve()}" in out, out
    loaded = Index.load(index)
    vectors = loaded.vectors
    assert vectors.shape == (3, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    embedder = get_embedder(f"mean:{world['plain']}")
    row = [c[0] for c in loaded.chunks].index("quessa")
    np.testing.assert_allclose(embedder.embed([FACTS["quessa"]])[0], vectors[row], atol=1e-5)  # padded batch = alone
    code, out, err = _run(capsys, "rag", "ask", world["plain"], "--index", index, "--question", "Who is Brindle?",
                          "--k", 1, "--max-new-tokens", 4)
    assert code == 0 and "\nsources:\n[1] " in out, err


def test_another_embedder_than_the_indexs_is_refused_naming_both(world, capsys, tmp_path):
    index = tmp_path / "index"
    assert _run(capsys, "rag", "index", world["docs"] / "faq.jsonl", "--out", index)[0] == 0
    before = snapshot(index)
    own = f"mean:{world['plain'].resolve()}"
    for argv in (("rag", "ask", world["chat"], "--index", index, "--question", "Who?", "--embedder",
                  f"mean:{world['plain']}"),
                 ("rag", "index", world["docs"] / "notes", "--out", index, "--embedder", f"mean:{world['plain']}")):
        code, _, err = _run(capsys, *argv)
        message = error_line(err)
        assert code == 2 and "'all-MiniLM-L6-v2'" in message and repr(own) in message, message
    assert snapshot(index) == before


def test_an_empty_collection_or_index_is_one_line(world, capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "blank.txt").write_text("  \n")
    for docs in (tmp_path / "empty", tmp_path / "blank.txt"):
        code, _, err = _run(capsys, "rag", "index", docs, "--out", tmp_path / "index")
        assert code == 2 and error_line(err).startswith("empty document collection: "), err
    assert not (tmp_path / "index").exists()
    Index().save(tmp_path / "no-chunks")
    code, _, err = _run(capsys, "rag", "ask", world["chat"], "--index", tmp_path / "no-chunks", "--question", "Who?")
    assert code == 2 and error_line(err).startswith(f"the index {tmp_path / 'no-chunks'} is empty (no chunks)"), err
    code, _, err = _run(capsys, "rag", "ask", world["chat"], "--index", tmp_path / "missing", "--question", "Who?")
    assert code == 2 and error_line(err).startswith(f"no index at {tmp_path / 'missing'}"), err


def test_rag_help_has_an_example_for_each_option(capsys):
    for action in ("index", "ask"):
        with pytest.raises(SystemExit):
            main(["rag", action, "--help"])
        out = capsys.readouterr().out
        assert "example:" in out
        helps = [line for line in out.split("options:")[1].split("example:")[0].split("\n  -") if "--" in line]
        assert len(helps) >= 5 and all("e.g." in h or "--help" in h for h in helps), helps

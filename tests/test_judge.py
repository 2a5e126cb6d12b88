"""The LLM judge (RLAIF): judging transcripts from the synthetic world, labels from both orders, `lmforge judge`,
and the judge study the demo reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import lmforge
from cli_checks import error_line
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.data.chat import get_chat_template
from lmforge.data.instructions import instruction_data, verify
from lmforge.data.judging import (
    in_judge_half,
    judge_prompt,
    judging_data,
    parse_verdict,
    verdict,
    write_judging_data,
)
from lmforge.data.sft import read_preferences, read_sft
from lmforge.data.synthetic import WorldConfig, pretraining_documents
from lmforge.eval.judge import LABELS, OUTCOMES, judge_pairs, preference_records, swap_label
from lmforge.eval.judge_study import judge_study
from lmforge.model.decoder import DecoderLM
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = WorldConfig(seed=0, n_documents=200, n_eval=4)
_SHOWN = re.compile(r"\AInstruction: (.*)\nResponse A: (.*)\nResponse B: (.*)\nWhich response is better, A or B\?\Z",
                    re.DOTALL)


def test_transcripts_carry_the_verifiers_verdict_and_the_halves_are_disjoint(tmp_path: Path) -> None:
    data = judging_data(WORLD, 120, 60)
    assert data == judging_data(WORLD, 120, 60)  # deterministic
    assert len(data["judge_train"]) == 120 and len(data["judge_pairs"]) == 60
    trained_on = set()
    for record in data["judge_train"]:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        instruction, a, b = _SHOWN.match(user["content"]).groups()
        better = record["meta"]["better"]
        assert assistant["content"] == verdict(better) and parse_verdict(assistant["content"]) == better
        shown = {"A": a, "B": b}
        assert verify(record["meta"], shown[better]) > verify(record["meta"], shown["B" if better == "A" else "A"])
        trained_on.add(instruction)
    held_out = set()
    for pair in data["judge_pairs"]:
        better, other = ("response_a", "response_b") if pair["meta"]["better"] == "A" else ("response_b", "response_a")
        assert verify(pair["meta"], pair[better]) > verify(pair["meta"], pair[other])
        assert pair["prompt"][-1] == {"role": "user", "content": pair["instruction"]}
        held_out.add(pair["instruction"])
    assert trained_on and held_out and not trained_on & held_out
    questions = lambda texts: {re.sub(r" (Answer|Explain) [^?]*\.$", "", t) for t in texts}  # noqa: E731
    assert all(in_judge_half(0, q) for q in questions(trained_on))
    assert not any(in_judge_half(0, q) for q in questions(held_out))
    evals = instruction_data(WORLD, 0, 0, 60)["prefs_eval"]  # the instructions every post-trained model is scored on
    assert not questions(trained_on | held_out) & questions(p["prompt"][-1]["content"] for p in evals)
    for first, second in zip(data["judge_train"][::2], data["judge_train"][1::2], strict=True):
        (_, a, b), (_, a2, b2) = (_SHOWN.match(t["messages"][0]["content"]).groups() for t in (first, second))
        assert (a2, b2) == (b, a) and first["meta"]["better"] != second["meta"]["better"]  # each pair in both orders
    written = write_judging_data(WORLD, tmp_path, 120, 60)
    assert {name: [json.loads(line) for line in path.read_text().splitlines()]
            for name, path in written.items()} == data
    labels = [r["meta"]["better"] for r in data["judge_pairs"]]
    assert 0.3 < labels.count("A") / len(labels) < 0.7  # a held-out pair's better response is in a random position


@pytest.mark.parametrize("ab, ba, expected", [
    ("Better: A", "Better: B", ("A", "agree")),
    ("better:b", "Better: A.", ("B", "agree")),  # any case, trailing text
    ("Better: A", "Better: A", ("tie", "disagree")),  # the same position both times: position bias
    ("Better: B", "Better: B", ("tie", "disagree")),
    ("Better: A", "I like both.", ("tie", "unparseable")),
    ("Betters: C", "Better: B", ("tie", "unparseable")),
])
def test_the_two_orders_give_a_label_only_when_they_name_the_same_response(ab, ba, expected) -> None:
    assert swap_label(ab, ba) == expected


PAIRS = [{"instruction": "Name a colour.", "response_a": "red", "response_b": "I am not sure.", "id": 0},
         {"instruction": "Name a fruit.", "response_a": "Maybe not.", "response_b": "pear", "id": 1},
         {"instruction": "Name a tree.", "response_a": "oak", "response_b": "Who knows.", "id": 2}]


def _content_judge(prompts: list[str]) -> list[str]:
    """Prefers the response that is one word, wherever it is shown; says nothing usable about trees."""
    answers = []
    for prompt in prompts:
        _, a, _ = _SHOWN.match(prompt).groups()
        answers.append("no idea" if "tree" in prompt else verdict("A" if " " not in a else "B"))
    return answers


def test_judge_pairs_labels_agreements_and_counts_ties_and_unparseable_answers() -> None:
    labelled, counts = judge_pairs(PAIRS, _content_judge)
    assert [(p["id"], p["label"], p["outcome"]) for p in labelled] == [(0, "A", "agree"), (1, "B", "agree"),
                                                                        (2, "tie", "unparseable")]
    assert (counts.pairs, counts.a, counts.b, counts.disagreements, counts.unparseable) == (3, 1, 1, 0, 1)
    assert counts.ties == 1
    assert labelled[1]["answer_ab"] == "Better: B" and labelled[1]["answer_ba"] == "Better: A"
    biased, counts = judge_pairs(PAIRS, lambda prompts: ["Better: A"] * len(prompts))
    assert {p["label"] for p in biased} == {"tie"} and counts.disagreements == 3 and counts.ties == 3
    records = preference_records(labelled, lambda p: p["label"])
    assert records == [{"prompt": "Name a colour.", "chosen": "red", "rejected": "I am not sure.", "meta": {}},
                       {"prompt": "Name a fruit.", "chosen": "pear", "rejected": "Maybe not.", "meta": {}}]


@pytest.fixture(scope="module")
def judge_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("judge")
    texts = [json.dumps(p) for p in PAIRS] * 20
    tok = train_tokenizer(texts, vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    model = DecoderLM(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=96, n_layer=1, n_head=2, d_model=16,
                                  init_std=0.2))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    return {"root": root, "judge": lmforge.save(model, tok, root / "judge"), "pairs": pairs}


def test_cli_writes_every_pair_with_both_answers_and_prints_the_counts(judge_world, capsys) -> None:
    out = judge_world["root"] / "labelled.jsonl"
    assert main(["judge", "--judge", str(judge_world["judge"]), "--pairs", str(judge_world["pairs"]), "--out",
                 str(out), "--template", "lmforge", "--max-new-tokens", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]  # every field of the input kept, in order
    for row in rows:
        assert row["label"] in LABELS and row["outcome"] in OUTCOMES
        assert (row["label"], row["outcome"]) == swap_label(row["answer_ab"], row["answer_ba"])
    printed = capsys.readouterr().out
    n = {label: sum(r["label"] == label for r in rows) for label in LABELS}
    assert f"3 pairs: response_a better {n['A']}, response_b better {n['B']}, ties {n['tie']} (" in printed
    assert str(out) in printed


@pytest.mark.parametrize("lines, fragments", [
    ([PAIRS[0], {"instruction": "x", "response_a": "y"}], ["pairs.jsonl:2", "'response_b'", "keys present"]),
    ([{"instruction": "x", "response_a": "", "response_b": "z"}], ["pairs.jsonl:1", "'response_a'", "non-empty"]),
    (["[1, 2]"], ["pairs.jsonl:1", "JSON object"]),
    ([], ["pairs.jsonl", "no pairs"]),
    ([{"instruction": "x " * 200, "response_a": "y", "response_b": "z"}], ["pairs.jsonl:1", "tokens", "context"]),
    ([{"instruction": "x <|end_of_turn|>", "response_a": "y", "response_b": "z"}], ["pairs.jsonl:1", "special token"]),
])
def test_a_bad_pairs_file_is_one_line_naming_file_line_and_field(judge_world, capsys, lines, fragments) -> None:
    bad = judge_world["root"] / "bad" / "pairs.jsonl"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    out = judge_world["root"] / "bad" / "out.jsonl"
    assert main(["judge", "--judge", str(judge_world["judge"]), "--pairs", str(bad), "--out", str(out),
                 "--template", "lmforge"]) == 2
    message = error_line(capsys.readouterr().err)
    assert all(f in message for f in fragments), message
    assert not out.exists()


def test_out_must_not_be_the_pairs_file(judge_world, capsys) -> None:
    before = judge_world["pairs"].read_bytes()
    assert main(["judge", "--judge", str(judge_world["judge"]), "--pairs", str(judge_world["pairs"]), "--out",
                 str(judge_world["pairs"]), "--template", "lmforge"]) == 2
    assert "--out" in error_line(capsys.readouterr().err)
    assert judge_world["pairs"].read_bytes() == before


def test_judge_study_trains_a_judge_and_writes_dpo_pairs_under_both_labellings(tmp_path) -> None:
    tok = train_tokenizer(pretraining_documents(WORLD), vocab_size=400, show_progress=False)
    torch.manual_seed(0)
    base = lmforge.save(DecoderLM(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=320, n_layer=1, n_head=2,
                                              d_model=16)), tok, tmp_path / "base")
    study = judge_study(base, WORLD, tmp_path / "study", n_train=8, n_pairs=6, steps=2, batch_size=4)
    assert (study.judge_dir / "latest").is_file() and 0 < study.transcripts <= 8
    template = get_chat_template("lmforge", tok)
    assert len(read_sft(tmp_path / "study" / "data" / "judge_train.jsonl", tok, template, 320).examples) == \
        study.transcripts
    labelled = [json.loads(line) for line in study.labelled_file.read_text().splitlines()]
    assert len(labelled) == study.counts.pairs and study.counts.pairs > 0
    assert study.agreed == sum(p["label"] == p["meta"]["better"] for p in labelled)
    assert study.interval[0] <= study.agreement <= study.interval[1]
    assert sum(n for n, _, _ in study.by_rejection.values()) == study.counts.pairs
    assert sum(agreed for _, agreed, _ in study.by_rejection.values()) == study.agreed
    if study.decisive:
        for path in (study.judge_prefs, study.verifier_prefs):
            assert len(read_preferences(path, tok, template, 320).examples) == study.decisive
    else:
        assert study.judge_prefs is None and study.verifier_prefs is None
    assert len(read_preferences(study.verifier_prefs_all, tok, template, 320).examples) == study.counts.pairs
    assert study.at_chance and "no better than chance" in study.sentence()  # two steps of a 1-layer model


def test_prompt_and_verdict_round_trip() -> None:
    prompt = judge_prompt("Say hi.", "hi", "hello there")
    assert _SHOWN.match(prompt).groups() == ("Say hi.", "hi", "hello there")
    assert parse_verdict(verdict("B")) == "B" and parse_verdict("A") is None

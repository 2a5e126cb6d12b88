"""Synthetic fine-tuning tasks and the JSONL readers that turn them into head inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.data.synthetic import WorldConfig, build_world, pretraining_documents
from lmforge.data.synthetic_tasks import ENTITY_TAGS, TASKS, task_datasets, write_task_data
from lmforge.data.task_data import (
    collate,
    read_classification,
    read_span_qa,
    read_text2text,
    read_token_classification,
)
from lmforge.errors import DataError
from lmforge.tokenizer import CLS, SEP, Tokenizer, train_tokenizer

CONFIG = WorldConfig(seed=3, n_countries=8, n_people=12, n_documents=300)
KEYS = {"sentiment": lambda e: e["text"], "entities": lambda e: tuple(e["tokens"]),
        "span_qa": lambda e: (e["context"], e["question"]), "text2text": lambda e: e["input"]}
POSITIVE = set("good great wonderful lovely excellent delightful charming pleasant superb".split())
NEGATIVE = set("bad awful terrible dreadful dull disappointing horrible unpleasant poor".split())


@pytest.fixture(scope="module")
def data() -> dict:
    return task_datasets(CONFIG, 300, 100)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_task_data(CONFIG, tmp_path_factory.mktemp("tasks"), 60, 20)


@pytest.fixture(scope="module")
def tok(data: dict) -> Tokenizer:
    texts = pretraining_documents(CONFIG) + [e["text"] for e in data["sentiment"]["train"]]
    return train_tokenizer(texts, vocab_size=600, show_progress=False)


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- synthetic tasks -------------------------------------------------------------------------------------

def test_tasks_are_deterministic_and_seeded(data: dict) -> None:
    assert set(data) == set(TASKS)
    assert task_datasets(CONFIG, 300, 100) == data
    other = task_datasets(WorldConfig(seed=4, n_countries=8, n_people=12), 300, 100)
    assert all(other[t]["train"] != data[t]["train"] for t in TASKS)


def test_splits_are_disjoint(data: dict) -> None:
    for task, key in KEYS.items():
        train, test = [key(e) for e in data[task]["train"]], [key(e) for e in data[task]["test"]]
        assert (len(train), len(test)) == (300, 100)
        assert len(set(train)) == 300 and len(set(test)) == 100 and not set(train) & set(test)
    kinds = [{e["input"].split()[0] for e in data["text2text"][split]} for split in ("train", "test")]
    assert kinds[0] == kinds[1] == {"capital:", "translate", "reverse:", "sum:"}  # even the 8 capitals are split


def test_sentiment_labels_follow_the_wording_and_negation(data: dict) -> None:
    examples = data["sentiment"]["train"] + data["sentiment"]["test"]
    negated = 0
    for e in examples:
        words = set(re.findall(r"[A-Za-z]+", e["text"]))
        (adjective,) = words & (POSITIVE | NEGATIVE)
        flip = bool(words & {"not", "Nothing"})
        negated += flip
        assert e["label"] == ("positive" if (adjective in POSITIVE) != flip else "negative"), e
    assert 0.1 < negated / len(examples) < 0.3
    assert 0.4 < sum(e["label"] == "positive" for e in examples) / len(examples) < 0.6


def test_entity_tags_are_well_formed_bio(data: dict) -> None:
    world = build_world(CONFIG)
    people = {p.name for p in world.people}
    locations = {c.name for c in world.countries} | {c.capital for c in world.countries}
    locations |= {w for place in world.places for w in place.split()[1:]}
    seen = set()
    for e in data["entities"]["train"] + data["entities"]["test"]:
        tokens, tags = e["tokens"], e["tags"]
        assert len(tokens) == len(tags) and tokens[-1] == "."
        for i, (word, tag) in enumerate(zip(tokens, tags, strict=True)):
            assert re.fullmatch(r"[A-Za-z]+|[.,]", word), word  # words split on spaces, punctuation separate
            assert tag in ENTITY_TAGS
            if tag.startswith("I-"):
                assert tags[i - 1] in (f"B-{tag[2:]}", tag), (tokens, tags)
            if tag.endswith("PER"):
                assert word in people
            if tag.endswith("LOC"):
                assert word in locations
            seen.add(tag)
    assert seen == set(ENTITY_TAGS)


def test_span_qa_answers_are_exact_spans_of_the_passage(data: dict) -> None:
    world = build_world(CONFIG)
    answers = {f.question: f.answer for group in world.fact_groups for f in group}
    for e in data["span_qa"]["train"] + data["span_qa"]["test"]:
        start = e["answer_start"]
        assert e["context"][start:start + len(e["answer"])] == e["answer"] == answers[e["question"]]
        assert re.match(r"\b", e["context"][start:]) and not e["context"][start + len(e["answer"]):][:1].isalpha()
        assert 2 <= e["context"].count(".") <= 4


def test_text2text_targets_are_right(data: dict) -> None:
    world = build_world(CONFIG)
    capitals = {c.name: c.capital for c in world.countries}
    kinds = set()
    for e in data["text2text"]["train"]:
        prefix, arg = e["input"].split(": ", 1)
        kinds.add(prefix.split()[0])
        if prefix == "capital":
            assert e["target"] == capitals[arg]
        elif prefix.startswith("translate English to "):
            assert e["target"] == world.lexicon[prefix.removeprefix("translate English to ")][arg]
        elif prefix == "reverse":
            assert e["target"] == arg[::-1]
        else:
            a, b = arg.split(" + ")
            assert prefix == "sum" and e["target"] == str(int(a) + int(b))
    assert kinds == {"capital", "translate", "reverse", "sum"}


def test_written_files_round_trip(files: dict[str, Path]) -> None:
    assert set(files) == {f"{t}_{s}" for t in TASKS for s in ("train", "test")}
    expected = task_datasets(CONFIG, 60, 20)
    for name, path in files.items():
        task, split = name.rsplit("_", 1)
        assert path.name == f"{name}.jsonl"
        assert [json.loads(line) for line in path.read_text().splitlines()] == expected[task][split]


# ---- readers ---------------------------------------------------------------------------------------------

def test_read_classification_layouts(files: dict[str, Path], tok: Tokenizer) -> None:
    examples, labels = read_classification(files["sentiment_train"], tok, 64)
    assert labels == ["negative", "positive"] and len(examples) == 60
    rows = [json.loads(line) for line in files["sentiment_train"].read_text().splitlines()]
    for e, row in zip(examples, rows, strict=True):
        assert e["input_ids"][-1] == tok.eos_id and tok.decode(e["input_ids"][:-1]) == row["text"]
        assert labels[e["labels"]] == row["label"]
    encoder, _ = read_classification(files["sentiment_train"], tok, 64, labels, arch="encoder")
    for e, d in zip(encoder, examples, strict=True):
        assert e["input_ids"] == [tok.token_id(CLS), *d["input_ids"][:-1], tok.token_id(SEP)]


def test_classification_errors_name_file_and_line(tmp_path: Path, tok: Tokenizer) -> None:
    good = {"text": "It was good.", "label": "positive"}
    path = write(tmp_path / "a.jsonl", [good, "", {"text": "meh", "label": "neutral"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: label 'neutral' is not in the label set "
                                                  f"['negative', 'positive']")):
        read_classification(path, tok, 32, ["negative", "positive"])
    assert read_classification(path, tok, 32)[1] == ["neutral", "positive"]  # no label set: the labels seen
    path = write(tmp_path / "b.jsonl", [good, '{"text": "oops", "label": ', good])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: invalid JSON")):
        read_classification(path, tok, 32)
    path = write(tmp_path / "c.jsonl", [good, {"txt": "x", "label": "positive"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: missing field 'text' (keys present: label, txt)")):
        read_classification(path, tok, 32)
    path = write(tmp_path / "d.jsonl", [{"text": ["x"], "label": "positive"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: field 'text' has type list, expected str")):
        read_classification(path, tok, 32)
    with pytest.raises(DataError, match=re.escape(f"{write(tmp_path / 'e.jsonl', [''])}: no examples")):
        read_classification(tmp_path / "e.jsonl", tok, 32)


def test_too_long_is_an_error_unless_truncating(tmp_path: Path, tok: Tokenizer) -> None:
    text = "The old mill in the forest was wonderful, and I would say so again."
    n = len(tok.encode(text))
    path = write(tmp_path / "long.jsonl", [{"text": "Fine.", "label": "positive"}, {"text": text, "label": "negative"}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: the sequence has {n + 1} tokens, more than max_len=8")):
        read_classification(path, tok, 8)
    examples, _ = read_classification(path, tok, 8, truncate=True)
    assert len(examples[1]["input_ids"]) == 8 and examples[1]["input_ids"][-1] == tok.eos_id
    examples, _ = read_classification(path, tok, 8, truncate=True, arch="encoder")
    assert len(examples[1]["input_ids"]) == 8 and examples[1]["input_ids"][-1] == tok.token_id(SEP)


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_token_tags_align_to_first_sub_tokens(files: dict[str, Path], tok: Tokenizer, arch: str) -> None:
    examples, tags = read_token_classification(files["entities_train"], tok, 64, arch=arch)
    assert tags == sorted(ENTITY_TAGS)
    rows = [json.loads(line) for line in files["entities_train"].read_text().splitlines()]
    for e, row in zip(examples, rows, strict=True):
        ids, labels = e["input_ids"], e["labels"]
        if arch == "encoder":
            assert ids[0] == tok.token_id(CLS) and ids[-1] == tok.token_id(SEP) and labels[0] == labels[-1] == -100
            ids, labels = ids[1:-1], labels[1:-1]
        assert tok.decode(ids) == " ".join(row["tokens"])
        firsts = [i for i, label in enumerate(labels) if label != -100]
        assert [tags[labels[i]] for i in firsts] == row["tags"]
        for i, word, nxt in zip(firsts, row["tokens"], firsts[1:] + [len(ids)], strict=True):
            assert tok.decode(ids[i:nxt]).strip() == word  # the word's tokens run up to the next word's first


def test_token_classification_errors(tmp_path: Path, tok: Tokenizer) -> None:
    path = write(tmp_path / "t.jsonl", [{"tokens": ["Tarsk", "."], "tags": ["B-LOC", "O"]},
                                        {"tokens": ["a", "b"], "tags": ["O"]}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: 2 tokens but 1 tags")):
        read_token_classification(path, tok, 16)
    path = write(tmp_path / "u.jsonl", [{"tokens": ["Tarsk"], "tags": ["B-CITY"]}])
    with pytest.raises(DataError, match=re.escape(f"{path}:1: label 'B-CITY' is not in the label set")):
        read_token_classification(path, tok, 16, list(ENTITY_TAGS))


@pytest.mark.parametrize("arch", ["decoder", "encoder"])
def test_span_qa_positions_cover_the_answer(files: dict[str, Path], tok: Tokenizer, arch: str) -> None:
    examples = read_span_qa(files["span_qa_train"], tok, 192, arch=arch)
    rows = [json.loads(line) for line in files["span_qa_train"].read_text().splitlines()]
    for e, row in zip(examples, rows, strict=True):
        ids, types = e["input_ids"], e["token_type_ids"]
        assert tok.decode(ids[e["start_positions"]:e["end_positions"] + 1]).strip() == row["answer"]
        first_context = types.index(1)
        assert types == [0] * first_context + [1] * (len(ids) - first_context)
        if arch == "encoder":
            assert ids[0] == tok.token_id(CLS) and ids[first_context - 1] == ids[-1] == tok.token_id(SEP)
            assert tok.decode(ids[1:first_context - 1]) == row["question"]
        else:
            assert tok.decode(ids[first_context:]) == row["context"]


def test_span_qa_errors(tmp_path: Path, tok: Tokenizer) -> None:
    context = "Tarsk is a city in Velmora. The capital of Velmora is Tarsk."
    row = {"context": context, "question": "Which country has Tarsk as its capital?", "answer": "Velmora"}
    path = write(tmp_path / "q.jsonl", [{**row, "answer_start": 19}, {**row, "answer_start": 20}])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: answer 'Velmora' is not at answer_start=20 of the "
                                                  f"context (found 'elmora.' there)")):
        read_span_qa(path, tok, 64)
    path = write(tmp_path / "r.jsonl", [{**row, "answer": "Tarsk", "answer_start": context.rindex("Tarsk")}])
    n_question = len(tok.encode(row["question"])) + 1
    with pytest.raises(DataError, match=re.escape(f"{path}:1: the sequence has")):
        read_span_qa(path, tok, n_question + 5)
    with pytest.raises(DataError, match=f"{re.escape(str(path))}:1: the answer ends at context token"):
        read_span_qa(path, tok, n_question + 5, truncate=True)


def test_text2text_layouts(files: dict[str, Path], tok: Tokenizer) -> None:
    rows = [json.loads(line) for line in files["text2text_train"].read_text().splitlines()]
    for e, row in zip(read_text2text(files["text2text_train"], tok, 64), rows, strict=True):  # encdec
        assert e["input_ids"][-1] == e["labels"][-1] == tok.eos_id
        assert (tok.decode(e["input_ids"][:-1]), tok.decode(e["labels"][:-1])) == (row["input"], row["target"])
    for e, row in zip(read_text2text(files["text2text_train"], tok, 64, arch="decoder"), rows, strict=True):
        ids, labels = e["input_ids"], e["labels"]
        prompt = labels.count(-100)  # input SEP target EOS, shifted: loss only where the next token is target
        assert labels[:prompt] == [-100] * prompt and len(ids) == len(labels)
        assert labels == [-100] * prompt + (ids + [tok.eos_id])[prompt + 1:]
        assert tok.decode(ids[:prompt]) == row["input"] and ids[prompt] == tok.token_id(SEP)
        assert tok.decode(labels[prompt:-1]) == row["target"] and labels[-1] == tok.eos_id


def test_collate_pads_right(tok: Tokenizer) -> None:
    examples = [{"input_ids": [5, 6, 7], "token_type_ids": [0, 0, 1], "labels": [1, -100, 2], "start_positions": 1},
                {"input_ids": [8], "token_type_ids": [0], "labels": [3], "start_positions": 0}]
    batch = collate(examples, tok.pad_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_id, tok.pad_id]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, -100, 2], [3, -100, -100]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 1], [0, 0, 0]]
    assert batch["start_positions"].tolist() == [1, 0]

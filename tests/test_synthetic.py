"""Tests for the built-in synthetic world (lmforge.data.synthetic)."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter

import pytest

from lmforge.data.synthetic import (
    ENGLISH_WORDS,
    EVAL_SETS,
    KINDS,
    EvalExample,
    World,
    WorldConfig,
    build_world,
    eval_sets,
    extract_answer,
    kind_counts,
    labelled_documents,
    pretraining_documents,
    write_corpus,
)

SMALL = WorldConfig(seed=3, n_documents=2000, n_eval=50)
REASONING_EVALS = ("arithmetic", "last_letter", "coin_flip",
                   "arithmetic_ood", "last_letter_ood", "coin_flip_ood")


@pytest.fixture(scope="module")
def default_world() -> World:
    return build_world(WorldConfig())


@pytest.fixture(scope="module")
def labelled() -> list[tuple[str, str]]:
    return labelled_documents(WorldConfig())


@pytest.fixture(scope="module")
def evals() -> dict[str, list[EvalExample]]:
    return eval_sets(WorldConfig())


# ---- independent solvers: they read only the question text -------------------------------------------------

def split_qa(doc: str) -> tuple[str, str]:
    prompt, completion = doc.split("\nAnswer: ", 1)
    assert prompt.startswith("Question: ")
    return prompt.removeprefix("Question: "), completion


def solve_word_problem(question: str) -> tuple[int, int]:
    """(answer, number of steps)."""
    count = int(re.match(r"[A-Z][a-z]+ has (\d+) [a-z]+\.", question).group(1))
    steps = re.findall(r"\b(buys|finds|gets|gives|sells|loses) (\d+)", question)
    for verb, k in steps:
        count += int(k) if verb in ("buys", "finds", "gets") else -int(k)
    return count, len(steps)


def quoted_words(question: str) -> list[str]:
    return re.search(r'words in "([A-Za-z ]+)"', question).group(1).split()


def solve_coin(question: str) -> tuple[str, int]:
    """(answer, number of people)."""
    flips, keeps = question.count(" flips the coin."), question.count(" does not flip the coin.")
    return ("yes" if flips % 2 == 0 else "no"), flips + keeps


def check_equations(text: str) -> list[tuple[int, str, int, int]]:
    found = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", text)
    equations = [(int(a), op, int(b), int(c)) for a, op, b, c in found]
    for a, op, b, c in equations:
        assert {"+": a + b, "-": a - b, "*": a * b}[op] == c, text
    return equations


def check_reasoning(kind: str, question: str, completion: str) -> None:
    """The worked completion is consistent and its final answer matches an independent solution."""
    answer = extract_answer(completion)
    assert completion.endswith(f"The answer is {answer}.")
    if kind.startswith(("word_problem", "arithmetic")):
        expected, steps = solve_word_problem(question)
        equations = check_equations(completion)
        assert len(equations) == steps
        assert equations[0][0] == int(re.search(r"has (\d+)", question).group(1))
        for (_, _, _, result), (start, _, _, _) in zip(equations, equations[1:], strict=False):
            assert result == start  # each step continues from the previous result
        assert answer == str(expected) == str(equations[-1][3])
    elif kind.startswith("last_letter"):
        assert answer == "".join(w[-1] for w in quoted_words(question))
    else:
        assert answer == solve_coin(question)[0]


# ---- determinism and the world ---------------------------------------------------------------------------

def test_same_seed_same_output_different_seed_differs() -> None:
    assert pretraining_documents(SMALL) == pretraining_documents(SMALL)
    assert eval_sets(SMALL) == eval_sets(SMALL)
    other = WorldConfig(seed=4, n_documents=2000, n_eval=50)
    assert pretraining_documents(other) != pretraining_documents(SMALL)
    assert build_world(other).names != build_world(SMALL).names
    assert eval_sets(other)["arithmetic"] != eval_sets(SMALL)["arithmetic"]


def test_output_does_not_depend_on_hash_seed() -> None:
    code = ("import hashlib, json; from lmforge.data.synthetic import *; "
            "c = WorldConfig(seed=5, n_documents=500, n_eval=20); "
            "e = {k: [vars(x) for x in v] for k, v in eval_sets(c).items()}; "
            "print(hashlib.sha256(json.dumps([pretraining_documents(c), e]).encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], env={"PYTHONHASHSEED": str(h)}, check=True,
                              capture_output=True, text=True).stdout for h in (1, 2)}
    assert len(digests) == 1 and len(digests.pop().strip()) == 64


def test_names_are_letters_only_capitalised_and_unique(default_world: World) -> None:
    names = list(default_world.names) + [c.language for c in default_world.countries]
    assert len(names) == 2 * 24 + 40 + 24 == len(set(names))
    for name in names:
        assert name.isascii() and name.isalpha() and name[0].isupper() and name[1:].islower(), name
    for lexicon in default_world.lexicon.values():
        assert list(lexicon) == list(ENGLISH_WORDS) and len(ENGLISH_WORDS) == 60
        assert len(set(lexicon.values())) == 60
        assert all(w.isascii() and w.isalpha() and w.islower() for w in lexicon.values())


def test_invalid_configs_are_rejected() -> None:
    with pytest.raises(ValueError):
        WorldConfig(mixture={"poetry": 1.0})
    with pytest.raises(ValueError):
        WorldConfig(mixture={"story": 0.0})
    with pytest.raises(ValueError):
        WorldConfig(n_people=1)


# ---- pretraining documents -------------------------------------------------------------------------------

def test_mixture_proportions(labelled: list[tuple[str, str]]) -> None:
    config = WorldConfig()
    counts = Counter(kind for kind, _ in labelled)
    assert counts == kind_counts(config) and sum(counts.values()) == 20000
    total = sum(config.mixture.values())
    for kind in KINDS:
        assert abs(counts[kind] - 20000 * config.mixture[kind] / total) <= 1
    custom = WorldConfig(n_documents=1001, mixture={"story": 1.0, "arithmetic": 3.0})
    custom_counts = Counter(kind for kind, _ in labelled_documents(custom))
    assert set(custom_counts) == {"story", "arithmetic"} and sum(custom_counts.values()) == 1001
    assert abs(custom_counts["arithmetic"] - 750.75) <= 1


def test_documents_are_shuffled_ascii_and_sized(labelled: list[tuple[str, str]]) -> None:
    docs = [doc for _, doc in labelled]
    assert all(doc.isascii() and doc.strip() == doc for doc in docs)
    assert 2_000_000 <= sum(map(len, docs)) <= 4_000_000
    assert len({kind for kind, _ in labelled[:100]}) == len(KINDS)  # kinds are interleaved
    assert pretraining_documents(WorldConfig()) == docs


def test_every_worked_training_answer_is_correct(labelled: list[tuple[str, str]]) -> None:
    checked = Counter()
    for kind, doc in labelled:
        if kind == "arithmetic":
            assert 3 <= len(check_equations(doc)) <= 10
        elif kind in ("word_problem", "last_letter", "coin_flip"):
            question, completion = split_qa(doc)
            check_reasoning(kind, question, completion)
            if kind == "word_problem":
                assert solve_word_problem(question)[1] in (1, 2)
            elif kind == "last_letter":
                assert len(quoted_words(question)) == 2
            else:
                assert solve_coin(question)[1] == 2
        else:
            continue
        checked[kind] += 1
    assert min(checked.values()) > 1000 and len(checked) == 4


def test_facts_are_repeated_in_paraphrases(labelled: list[tuple[str, str]], default_world: World) -> None:
    corpus = "\n".join(doc for kind, doc in labelled if kind == "fact")
    for group in default_world.fact_groups:
        for fact in group:
            assert len(set(fact.statements)) >= 3
            assert sum(corpus.count(s) for s in fact.statements) >= 20, fact
            assert corpus.count(f"Question: {fact.question}\nAnswer: The answer is {fact.answer}.") >= 3, fact


def test_dictionary_entries_are_correct_and_all_covered(labelled: list[tuple[str, str]],
                                                        default_world: World) -> None:
    patterns = (r'In (\w+), the word for "(\w+)" is "(\w+)"\.', r'The (\w+) word for "(\w+)" is "(\w+)"\.')
    seen = Counter()
    for kind, doc in labelled:
        if kind != "dictionary":
            continue
        triples = [m for p in patterns for m in re.findall(p, doc)]
        triples += [(lang, e, f) for f, e, lang in re.findall(r'"(\w+)" means "(\w+)" in (\w+)\.', doc)]
        assert triples, doc
        for lang, english, word in triples:
            assert default_world.lexicon[lang][english] == word
            seen[lang, english] += 1
    assert len(seen) == 24 * 60 and min(seen.values()) >= 4


# ---- evals -----------------------------------------------------------------------------------------------

def test_eval_sets_shape(evals: dict[str, list[EvalExample]]) -> None:
    assert list(evals) == list(EVAL_SETS) and len(EVAL_SETS) == 8
    for name, examples in evals.items():
        assert len(examples) == 200 and len({e.prompt for e in examples}) == 200, name
        for e in examples:
            assert e.task == name and e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:")
            assert extract_answer(e.completion) == e.answer
            assert e.completion.startswith(e.rationale) and (e.rationale == "") == (name == "facts")


def test_reasoning_eval_answers_and_lengths(evals: dict[str, list[EvalExample]]) -> None:
    for name in REASONING_EVALS:
        for e in evals[name]:
            question = e.prompt.removeprefix("Question: ").removesuffix("\nAnswer:")
            check_reasoning(name, question, e.completion)
            ood = name.endswith("_ood")
            if name.startswith("arithmetic"):
                assert solve_word_problem(question)[1] in ((3, 4) if ood else (1, 2))
            elif name.startswith("last_letter"):
                assert len(quoted_words(question)) == (3 if ood else 2)
            else:
                assert solve_coin(question)[1] in ((3, 4) if ood else (2,))


def test_fact_and_dictionary_eval_answers(evals: dict[str, list[EvalExample]], default_world: World,
                                          labelled: list[tuple[str, str]]) -> None:
    w = default_world
    lookups = {
        r"What is the capital of (\w+)\?": {c.name: c.capital for c in w.countries},
        r"What language is spoken in (\w+)\?": {c.name: c.language for c in w.countries},
        r"What is the main export of (\w+)\?": {c.name: c.export for c in w.countries},
        r"What is the national animal of (\w+)\?": {c.name: c.animal for c in w.countries},
        r"Which country has (\w+) as its capital\?": {c.capital: c.name for c in w.countries},
        r"Where does (\w+) live\?": {p.name: p.home for p in w.people},
        r"What is the job of (\w+)\?": {p.name: p.job for p in w.people},
    }
    training = {doc for _, doc in labelled}
    for e in evals["facts"]:
        matches = [(m, table) for pattern, table in lookups.items() if (m := re.search(pattern, e.prompt))]
        answers = [table[m.group(1)] for m, table in matches]
        assert answers == [e.answer]
        assert f"{e.prompt} The answer is {e.answer}." in training  # recall of a fact seen in training
    for e in evals["dictionary"]:
        pattern = r'Question: In (\w+), what is the word for "(\w+)"\?\nAnswer:'
        lang, english = re.fullmatch(pattern, e.prompt).groups()
        assert w.lexicon[lang][english] == e.answer


def test_reasoning_eval_problems_never_in_training(evals: dict[str, list[EvalExample]],
                                                   labelled: list[tuple[str, str]]) -> None:
    corpus = "\n".join(doc for _, doc in labelled)
    for name in REASONING_EVALS:
        for e in evals[name]:
            assert e.prompt.removeprefix("Question: ").removesuffix("\nAnswer:") not in corpus


# ---- extract_answer and write_corpus ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("The answer is 42.", "42"),
    (" Mira starts with 3. 3 + 5 = 8. The answer is 8.\n\nQuestion: Oren has", "8"),
    ('Concatenating them gives "ak". The answer is "ak".', "ak"),
    ("The answer is Tarsk", "Tarsk"),
    ("the answer is yes.\nQuestion: A coin", "yes"),
    ("The answer is -3.", "-3"),
    ("The answer is 3.5.", "3.5"),
    ("The answer is: lushi.", "lushi"),
    ("The answer is 7. The answer is 9.", "7"),
    ("The answer is Tarsk.Question:", "Tarsk"),
    ("", None),
    ("Mira walked to the mill.", None),
    ("The answr is 5.", None),
    ("The answer is .", None),
    ('The answer is "".', None),
])
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


def test_write_corpus(tmp_path) -> None:
    paths = write_corpus(SMALL, tmp_path / "corpus")
    assert set(paths) == {"train"} | {f"eval_{name}" for name in EVAL_SETS}
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == sorted(f"{n}.jsonl" for n in paths)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    assert [row["text"] for row in train] == pretraining_documents(SMALL)
    expected = eval_sets(SMALL)
    for name in EVAL_SETS:
        rows = [json.loads(line) for line in paths[f"eval_{name}"].read_text().splitlines()]
        assert all(set(row) == {"task", "prompt", "answer", "rationale"} for row in rows)
        assert [EvalExample(**row) for row in rows] == expected[name]
    before = hashlib.sha256(paths["train"].read_bytes()).hexdigest()
    write_corpus(SMALL, tmp_path / "corpus")  # rewriting is byte-identical and leaves no temp files
    assert hashlib.sha256(paths["train"].read_bytes()).hexdigest() == before
    assert len(list((tmp_path / "corpus").iterdir())) == len(paths)

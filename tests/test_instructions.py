"""Synthetic post-training data: determinism, disjoint splits, answers recomputed, the verifier."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmforge.data.instructions import (
    FILES,
    FORMATS,
    REJECTIONS,
    TASK_FORMATS,
    TASKS,
    instruction_data,
    verify,
    write_instruction_data,
)
from lmforge.data.synthetic import World, WorldConfig, build_world

CONFIG = WorldConfig(seed=5, n_countries=8, n_people=12)
COUNTS = (300, 150, 60)


@pytest.fixture(scope="module")
def data() -> dict[str, list[dict]]:
    return instruction_data(CONFIG, *COUNTS)


def prompt_messages(record: dict) -> list[dict]:
    return record["messages"][:-1] if "messages" in record else record["prompt"]


def question(record: dict) -> str:
    """The user's question without its format instruction."""
    user = prompt_messages(record)[-1]["content"]
    instruction = FORMATS[record["meta"]["format"]]
    assert user.endswith(instruction)
    return user[: len(user) - len(instruction)].strip()


def recompute(world: World, task: str, q: str) -> str:
    """The answer to question `q`, worked out from the question text and the world alone."""
    if task == "arithmetic":
        count = int(re.match(r"\w+ has (\d+) ", q).group(1))
        for verb, k in re.findall(r"(buys|finds|gets|gives|sells|loses) (\d+)", q):
            count += int(k) if verb in ("buys", "finds", "gets") else -int(k)
        return str(count)
    if task == "last_letter":
        return "".join(word[-1] for word in re.search(r'"([^"]+)"', q).group(1).split())
    if task == "coin_flip":
        return "yes" if q.count(" flips the coin.") % 2 == 0 else "no"
    countries = {c.name: c for c in world.countries}
    people = {p.name: p for p in world.people}
    patterns = {r"What is the capital of (\w+)\?": lambda s: countries[s].capital,
                r"What language is spoken in (\w+)\?": lambda s: countries[s].language,
                r"What is the main export of (\w+)\?": lambda s: countries[s].export,
                r"What is the national animal of (\w+)\?": lambda s: countries[s].animal,
                r"Which country has (\w+) as its capital\?": lambda s: next(c.name for c in world.countries
                                                                           if c.capital == s),
                r"Where does (\w+) live\?": lambda s: people[s].home,
                r"What is the job of (\w+)\?": lambda s: people[s].job}
    for pattern, answer in patterns.items():
        if match := re.fullmatch(pattern, q):
            return answer(match.group(1))
    raise AssertionError(f"unexpected fact question {q!r}")


def test_deterministic_files(data: dict, tmp_path: Path) -> None:
    assert instruction_data(CONFIG, *COUNTS) == data
    assert instruction_data(WorldConfig(seed=6, n_countries=8, n_people=12), *COUNTS) != data
    first, second = write_instruction_data(CONFIG, tmp_path / "a", *COUNTS), write_instruction_data(
        CONFIG, tmp_path / "b", *COUNTS)
    assert tuple(first) == FILES
    for name in FILES:
        assert first[name].read_bytes() == second[name].read_bytes()
        assert [json.loads(line) for line in first[name].read_text().splitlines()] == data[name]
    assert [len(data[name]) for name in FILES] == [COUNTS[0], COUNTS[1], COUNTS[2], COUNTS[1], COUNTS[2]]


def test_splits_are_disjoint(data: dict) -> None:
    train = {question(r) for name in ("sft_train", "prefs_train", "prompts_train") for r in data[name]}
    for name in ("prefs_eval", "prompts_eval"):
        held_out = [question(r) for r in data[name]]
        assert len(set(held_out)) == len(held_out)
        assert not set(held_out) & train
        assert {r["meta"]["task"] for r in data[name]} == set(TASKS)


def test_records_answers_and_formats(data: dict) -> None:
    world = build_world(CONFIG)
    for name in FILES:
        for record in data[name]:
            meta = record["meta"]
            assert meta["format"] in TASK_FORMATS[meta["task"]]
            assert recompute(world, meta["task"], question(record)) == meta["answer"]
            roles = [m["role"] for m in prompt_messages(record)]
            assert roles in (["user"], ["system", "user"])
    for record in data["sft_train"]:
        meta, reply = record["meta"], record["messages"][-1]["content"]
        assert record["messages"][-1]["role"] == "assistant"
        if meta["format"] in ("one_word", "number"):
            assert reply == meta["answer"] and " " not in reply
        else:
            assert reply.endswith(f"The answer is {meta['answer']}.")
        if meta["format"] == "step_by_step" or (meta["format"] == "plain" and meta["task"] != "facts"):
            assert len(reply.split()) > 6  # a rationale precedes the answer
        assert verify(meta, reply) == 1.0
    assert {r["meta"]["format"] for r in data["sft_train"]} == set(FORMATS)


def test_preference_pairs_score(data: dict) -> None:
    kinds = set()
    for record in data["prefs_train"] + data["prefs_eval"]:
        meta = record["meta"]
        kinds.add(meta["rejection"])
        assert verify(meta, record["chosen"]) == 1.0
        assert record["chosen"] != record["rejected"]
        expected = 0.5 if meta["rejection"] == "ignores_format" else 0.0
        assert verify(meta, record["rejected"]) == expected, record
        assert not (meta["format"] == "plain" and meta["rejection"] == "ignores_format")
    assert kinds == set(REJECTIONS)


@pytest.mark.parametrize("fmt,answer,response,score", [
    ("number", "17", "17", 1.0),
    ("number", "17", " 17.\n", 1.0),
    ("number", "17", "The answer is 17.", 0.5),
    ("number", "17", "18", 0.0),
    ("number", "17", "seventeen or so", 0.0),
    ("one_word", "Tarsk", "tarsk", 1.0),
    ("one_word", "Tarsk", '"Tarsk"', 1.0),
    ("one_word", "Tarsk", "It is Tarsk", 0.0),
    ("one_word", "Tarsk", "I think so. The answer is Tarsk.", 0.5),
    ("plain", "yes", "The answer is yes.", 1.0),
    ("plain", "yes", "yes", 1.0),
    ("plain", "yes", "The answer is no. The answer is yes.", 0.0),
    ("step_by_step", "ab", 'The last letters are "a" and "b". The answer is ab.', 1.0),
    ("step_by_step", "ab", "So: The answer is ab.", 0.5),
    ("step_by_step", "ab", "ab", 0.5),
    ("step_by_step", "ab", "", 0.0),
])
def test_verify_cases(fmt: str, answer: str, response: str, score: float) -> None:
    assert verify({"task": "x", "answer": answer, "format": fmt}, response) == score


@settings(max_examples=200, deadline=None)
@given(fmt=st.sampled_from(list(FORMATS)), answer=st.sampled_from(["17", "Tarsk", "yes", "ab"]),
       junk=st.text())
def test_verify_accepts_any_string(fmt: str, answer: str, junk: str) -> None:
    meta = {"task": "x", "answer": answer, "format": fmt}
    for response in (junk, f"The answer is {junk}", f"{junk} The answer is {answer}."):
        assert verify(meta, response) in (0.0, 0.5, 1.0)


def test_verify_rejects_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format 'haiku'"):
        verify({"answer": "x", "format": "haiku"}, "x")

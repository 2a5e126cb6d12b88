"""The demo's evaluation stage without running the demo: the files it writes from the world's held-out items, and its
sentences, which claim a difference only when the numbers bear it out (the stage's run: test_demo.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lmforge.data.synthetic import EVAL_SETS, build_world, write_corpus
from lmforge.demo import demo_plan
from lmforge.demo.evaluation import (
    CHOICE_TASK,
    DISTRACTORS,
    GENERATE_TASK,
    agreement_note,
    harness_section,
    question_kind,
    write_held_out_text,
    write_task_file,
)
from lmforge.demo.verdicts import paired_accuracy_note
from lmforge.eval.stats import mcnemar_exact
from lmforge.eval.task_file import read_tasks
from lmforge.eval.text_metrics import exact_match, extract


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    plan = demo_plan(True)
    files = write_corpus(plan.world, tmp_path_factory.mktemp("world"))
    return SimpleNamespace(plan=plan, data=SimpleNamespace(files=files))


def test_held_out_text_is_each_sets_questions_with_their_worked_answers(world: SimpleNamespace, tmp_path: Path) -> None:
    path = write_held_out_text(world.data, tmp_path / "held_out.jsonl", per_set=3)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    items = [json.loads(line) for name in EVAL_SETS
             for line in world.data.files[f"eval_{name}"].read_text().splitlines()[:3]]
    assert len(texts) == len(items) == 3 * len(EVAL_SETS)
    for text, item in zip(texts, items, strict=True):
        assert text.startswith(item["prompt"] + " ") and text.endswith(f"The answer is {item['answer']}.")


def test_task_file_holds_a_generation_task_and_a_multiple_choice_task(world: SimpleNamespace, tmp_path: Path) -> None:
    tasks = read_tasks(write_task_file(world.plan, world.data, tmp_path / "tasks.jsonl", per_task=6))
    assert list(tasks) == [GENERATE_TASK, CHOICE_TASK] and all(len(items) == 6 for items in tasks.values())
    arithmetic = [json.loads(line) for line in world.data.files["eval_arithmetic"].read_text().splitlines()]
    for item, gold in zip(tasks[GENERATE_TASK], arithmetic, strict=False):
        worked = f"{gold['rationale']} The answer is {gold['answer']}."  # the pattern finds the gold answer in it
        assert item.prompt == gold["prompt"] and exact_match(extract(worked, item.pattern), item.answer)
    kinds = {}
    for fact in (f for group in build_world(world.plan.world).fact_groups for f in group):
        kinds.setdefault(fact.answer, set()).add(question_kind(fact.question))
    for item in tasks[CHOICE_TASK]:
        question = item.prompt.removeprefix("Question: ").removesuffix("\nAnswer: The answer is")
        assert item.prompt.endswith("The answer is") and len(set(item.choices)) == len(item.choices) == DISTRACTORS + 1
        assert all(question_kind(question) in kinds[choice] for choice in item.choices)  # answers of its kind
    assert len({item.answer for item in tasks[CHOICE_TASK]}) > 1  # the right choice is not always in one place


def test_question_kind_blanks_the_names() -> None:
    assert question_kind("What is the capital of Velmora?") == question_kind("What is the capital of Drask?")
    assert question_kind("What is the capital of Velmora?") != question_kind("Which country has Tarsk as its capital?")


def test_paired_accuracy_note_claims_a_difference_only_when_mcnemar_finds_one() -> None:
    base = [True] * 30 + [False] * 70
    worse = [False] * 100  # 30 discordant items, all the base model's: p ~ 2e-9
    noisy = [True] * 27 + [False] * 73  # 3 discordant: p = 0.25
    better = [True] * 50 + [False] * 50
    assert paired_accuracy_note("SFT", "base", mcnemar_exact(base, worse), 100).startswith("SFT was less accurate")
    assert paired_accuracy_note("SFT", "base", mcnemar_exact(base, better), 100).startswith("SFT was more accurate")
    note = paired_accuracy_note("SFT", "base", mcnemar_exact(base, noisy), 100)
    assert "within noise" in note and "-3.0%" in note and "p = 0.25" in note and "accurate than" not in note


def test_agreement_note_counts_only_clear_items() -> None:
    agree, disagree = agreement_note(40, 0, 2, 3e-6), agreement_note(40, 1, 0, 0.2)
    assert agree.startswith("They agree") and "all 40" in agree and "2 item-metrics on a near-tie" in agree
    assert disagree.startswith("They disagree") and "1 of 40" in disagree and "2.0e-01" in disagree


def test_without_lm_eval_the_cross_check_says_it_was_skipped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "lmforge.eval.harness", raising=False)
    skipped = harness_section(tmp_path / "no-model", tmp_path / "no-tasks.jsonl", tmp_path / "lm-eval")
    assert skipped.body.startswith("Skipped: lm-evaluation-harness is not installed")
    assert "pip install 'lmforge[eval]'" in skipped.body
    assert not (tmp_path / "lm-eval").exists()

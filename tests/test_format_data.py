"""The formats the synthetic SFT data teaches (rendered exactly as AGENTS_API.md writes them), the SFT data itself
(every reply well-formed and correct), the held-out sets (no held-out question or invented fact in any training text,
pretraining corpus included), and the well-formedness scorers on good and bad transcripts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lmforge.agents.calculator import calculate
from lmforge.data import formats as fmt
from lmforge.data.format_data import FORMATS, HELD_OUT_FILES, SFT_FILE, format_data, write_format_data
from lmforge.data.instructions import FILES, write_instruction_data
from lmforge.data.synthetic import WorldConfig, write_corpus

CONFIG = WorldConfig(seed=3, n_countries=8, n_people=12, n_documents=3000, n_eval=10)
N_SFT, N_EVAL = 400, 20
REACT = """Thought: I need to multiply 37 by 48.
Action: calculator[37 * 48]
Observation: 1776
Thought: I have the answer.
Final answer: 1776"""
CODEACT = """Thought: I will compute it in Python.
```python
print(37 * 48)
```
Observation: 1776
Final answer: 1776"""
DOCUMENT = re.compile(r"The (\w+ \w+) stands in \w+\. It was built by (\w+) in \d+\.")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats")
    return {**write_corpus(CONFIG, root / "world"),
            **write_instruction_data(CONFIG, root / "instructions", 300, 50, 20),
            **write_format_data(CONFIG, root / "formats", N_SFT, N_EVAL)}


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def reply_of(record: dict) -> str:
    return record["messages"][-1]["content"]


def user_of(record: dict) -> str:
    return record["messages"][-2]["content"]


def test_the_formats_render_exactly_as_agreed() -> None:
    assert fmt.react_reply([("I need to multiply 37 by 48.", "calculator[37 * 48]", "1776")], "I have the answer.",
                           "1776") == REACT
    assert fmt.codeact_reply("I will compute it in Python.", "print(37 * 48)", "1776", "1776") == CODEACT
    assert fmt.grounded_messages(["a b.", "c d."], "Who?") == [
        {"role": "user", "content": "Context:\n[1] a b.\n[2] c d.\nQuestion: Who?"}]
    assert fmt.grounded_reply("Meli Dorn", 2) == "Meli Dorn [2]"
    assert fmt.think_messages("Q?")[0]["content"] == "Q? Let's think step by step."
    react_user = fmt.react_messages("Q?", ["calculator", "search"])[0]["content"]
    assert react_user == "Tools: calculator, search.\nQuestion: Q?"
    assert fmt.step_by_step_reply("3 + 4 = 7.", "7") == "3 + 4 = 7. The answer is 7."
    assert fmt.direct_reply("7") == "The answer is 7."


def test_every_sft_reply_is_well_formed_and_correct(files: dict[str, Path]) -> None:
    records = read(files[SFT_FILE])
    assert len(records) == N_SFT and {r["meta"]["format"] for r in records} == set(FORMATS)
    for record in records:
        form, answer = record["meta"]["format"], record["meta"]["answer"]
        reply, user = reply_of(record), user_of(record)
        if form == "step_by_step":
            assert user.endswith(fmt.THINK_TRIGGER) and fmt.well_formed_step_by_step(reply)
            assert reply.endswith(f"The answer is {answer}.")
        elif form == "direct":
            assert fmt.THINK_TRIGGER not in user and reply == f"The answer is {answer}."
        elif form == "react":
            assert fmt.well_formed_react(reply) and fmt.final_answer(reply) == answer
            action = next(line for line in reply.split("\n") if line.startswith("Action:"))
            tool, argument = fmt.parse_action(action)
            observation = reply.split("Observation: ")[1].split("\n")[0]
            assert tool in user.split("\n")[0]  # the tool used is one the user offered
            assert observation == calculate(argument) if tool == "calculator" else answer in observation
        elif form == "codeact":
            assert fmt.well_formed_codeact(reply) and fmt.final_answer(reply) == answer
            code = reply.split("```python\n")[1].split("\n```")[0]
            assert calculate(code.removeprefix("print(").removesuffix(")")) == answer
        else:
            passages = re.findall(r"^\[\d+\] (.*)$", user, flags=re.MULTILINE)
            assert fmt.well_formed_grounded(reply, len(passages)) and fmt.grounded_answer(reply) == answer
            assert answer in passages[fmt.cited_passage(reply) - 1]


def test_held_out_questions_and_facts_are_in_no_training_text(files: dict[str, Path]) -> None:
    training = [*(r["text"] for r in read(files["train"])),
                *(json.dumps(r) for name in (SFT_FILE, *(f for f in FILES if "train" in f)) for r in read(files[name]))]
    text = "\n".join(training)
    docs = read(files["rag_docs"])
    assert len(docs) == N_EVAL
    for doc in docs:
        landmark, builder = DOCUMENT.fullmatch(doc["text"]).groups()
        assert landmark.split()[0] not in text and builder not in text, doc
    questions = read(files["rag_questions"])
    by_id = {d["doc_id"]: d["text"] for d in docs}
    assert all(q["answer"] in by_id[q["doc_id"]] for q in questions) and len(questions) == N_EVAL
    reasoning, arithmetic = read(files["formats_eval_reasoning"]), read(files["formats_eval_arithmetic"])
    for record in reasoning + arithmetic:
        assert record["question"] not in text, record
    assert all(sum((r["task"], r["set"]) == (task, split) for r in reasoning) == N_EVAL
               for task in ("arithmetic", "last_letter", "coin_flip") for split in ("in_domain", "ood"))
    assert all(sum(r["set"] == split for r in arithmetic) == N_EVAL for split in ("in_domain", "ood"))


def test_held_out_sets_are_harder_out_of_domain(files: dict[str, Path]) -> None:
    arithmetic = read(files["formats_eval_arithmetic"])
    digits = [r for r in arithmetic if r["task"] == "arithmetic_digits"]
    assert all(calculate(r["expression"]) == r["answer"] and len(r["answer"]) >= 3 for r in digits)
    ops = {s: max(r["expression"].count(" ") // 2 for r in arithmetic if r["set"] == s) for s in ("in_domain", "ood")}
    assert ops["ood"] > ops["in_domain"]
    assert {r["task"] for r in arithmetic} == {"arithmetic_digits", "word_problem"}


def test_format_data_is_deterministic_and_adds_only_new_files(files: dict[str, Path]) -> None:
    assert format_data(CONFIG, 50, 5) == format_data(CONFIG, 50, 5)
    assert set(HELD_OUT_FILES) | {SFT_FILE} == {p.stem for p in files[SFT_FILE].parent.iterdir()}
    assert not set(FILES) & ({SFT_FILE, *HELD_OUT_FILES})


@pytest.mark.parametrize(("check", "good", "bad"), [
    (fmt.well_formed_react, [REACT, "Thought: I know it.\nFinal answer: 3\n",
                             REACT.replace("Thought: I have", "Thought: x\nAction: search[Zorvik Tower]\n"
                                                              "Observation: a | b\nThought: I have")],
     [REACT.replace("Action: calculator[37 * 48]", "Action: calculator 37 * 48"),
      REACT.replace("calculator[", "abacus["), REACT.replace("Final answer: 1776", ""), "Final answer: 1776",
      REACT.replace("Thought: I have the answer.\n", ""), REACT + "\nmore text"]),
    (fmt.well_formed_codeact, [CODEACT], [CODEACT.replace("```python\nprint(37 * 48)\n```\n", ""),
                                          CODEACT.replace("Observation: 1776\n", ""),
                                          CODEACT.replace("```python", "```")]),
    (fmt.well_formed_step_by_step, ["We add 3 and 4 to get 7. The answer is 7."],
     ["The answer is 7.", "So. The answer is 7.", "We add 3 and 4 to get 7."]),
    (fmt.well_formed_direct, ["The answer is 7.", "The answer is Tarsk"], ["We add. The answer is 7.", "7"]),
    (lambda reply: fmt.well_formed_grounded(reply, 2), ["Meli Dorn [2]", "1742 [1]"],
     ["Meli Dorn", "Meli Dorn [3]", "[1]", "Meli Dorn [1] and more"]),
])
def test_the_well_formedness_scorers(check, good: list[str], bad: list[str]) -> None:
    assert [check(t) for t in good] == [True] * len(good)
    assert [check(t) for t in bad] == [False] * len(bad)
    assert fmt.well_formed_share(check, good + bad) == pytest.approx(len(good) / (len(good) + len(bad)))


# a format-SFT model's malformed CodeAct reply (a stray fence line, a second observation, a thought before the answer)
MALFORMED_CODEACT = ("Thought: I will compute it in Python.\n```python\nprint(2511 + 399 + 9988 + 9888)\n`\n```\n"
                     "Observation: Unparseable code block: SyntaxError: invalid syntax (line 2)\n"
                     "Observation: The Krefountain stands in Tan. It was built by Kokruga in 1243.\n"
                     "Thought: I have the answer.\nFinal answer: 1212")


def test_the_scorers_take_linear_time_on_model_written_text() -> None:
    """This reply sent the CodeAct pattern into exponential backtracking (it stalled the demo); each scorer must
    now answer it, and texts of thousands of such lines, at once. An alarm turns a hang into a failure."""
    import signal

    def hung(*_: object) -> None:
        raise TimeoutError("a well-formedness pattern backtracked for over 10 s")

    long_text = MALFORMED_CODEACT.replace("Observation: The", "Observation: x\n" * 2000 + "Observation: The")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        for text in (MALFORMED_CODEACT, long_text, "Thought: a \n" * 3000 + "Final answer:  "):
            assert not fmt.well_formed_codeact(text) and not fmt.well_formed_react(text)
            assert not fmt.well_formed_step_by_step(text) and not fmt.well_formed_direct(text)
        mended = MALFORMED_CODEACT.replace("`\n```\n", "```\n").replace("Thought: I have the answer.\n", "")
        assert fmt.well_formed_codeact(mended.replace(
            "Observation: The Krefountain stands in Tan. It was built by Kokruga in 1243.\n", ""))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

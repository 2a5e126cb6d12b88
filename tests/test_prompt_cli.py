"""`lmforge prompt` end to end on tiny checkpoints (a base model: plain text; an SFT run: its chat template): accuracy
with its interval, a transcript of every prompt and completion, and the bad input a user can give it (one line, exit
status 2, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from cli_checks import error_line
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.manifest import CheckpointManifest
from lmforge.model import build_model
from lmforge.prompting.examples import Example, ShotRanker, sentence_embed
from lmforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

LINES = [{"type": "generate", "prompt": "Ann has 3 pens. She buys 4 more. How many pens does Ann have now?",
          "answer": "7", "rationale": "Ann starts with 3 pens. She buys 4, so 3 + 4 = 7."},
         {"type": "generate", "prompt": "Bob has 9 cups. He loses 2. How many cups does Bob have now?", "answer": "7",
          "rationale": "Bob starts with 9 cups. He loses 2, so 9 - 2 = 7."},
         {"type": "generate", "prompt": "Cy has 5 hats. He finds 5 more. How many hats does Cy have now?",
          "answer": "10", "rationale": "Cy starts with 5 hats. He finds 5, so 5 + 5 = 10."}]


def _write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("prompt")
    tok = train_tokenizer([line["prompt"] + " " + line["rationale"] for line in LINES] * 20, vocab_size=420,
                          show_progress=False)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=160, n_layer=1, n_head=2, d_model=32))
    w = {"root": root, "base": lmforge.save(model, tok, root / "base"),
         "sft": save(model, tok, root / "sft", run_config=CheckpointManifest(model=model.cfg, stage="sft",
                                                                            run={"template": "lmforge"})),
         "tasks": _write(root / "tasks.jsonl", LINES)}
    w["no_rationale"] = _write(root / "no_rationale.jsonl", [{k: v for k, v in line.items() if k != "rationale"}
                                                             for line in LINES])
    w["choice"] = _write(root / "choice.jsonl", [LINES[0], {"type": "choice", "prompt": "Sky?",
                                                            "choices": ["blue", "red"], "answer": 0}])
    w["too_long"] = _write(root / "too_long.jsonl", [LINES[0], {**LINES[1], "prompt": "cups " * 200}])
    w["bad_rationale"] = _write(root / "bad_rationale.jsonl", [LINES[0], {**LINES[1], "rationale": ["9 - 2"]}])
    w["other_task"] = _write(root / "other_task.jsonl", [{**LINES[0], "task": "other"}])
    return w


@pytest.mark.parametrize("model, extra, marker", [
    ("base", [], "Question: Ann has 3 pens."), ("sft", [], "<|user|>"),
    ("sft", ["--chat-template", "none"], "Question: Ann has 3 pens."),  # a chat model prompted with plain text
])
def test_a_run_reports_accuracy_with_its_interval_and_writes_every_prompt_and_completion(world, model, extra, marker,
                                                                                         capsys, tmp_path) -> None:
    transcript, summary = tmp_path / "cot.jsonl", tmp_path / "cot.json"
    assert main(["prompt", str(world[model]), "--method", "cot", "--tasks", str(world["tasks"]), "--shots", "1",
                 "--max-new-tokens", "6", "--transcript", str(transcript), "--json", str(summary), *extra]) == 0
    out = capsys.readouterr().out
    assert ("chat template" if marker == "<|user|>" else "plain text") in out and "95% CI [" in out
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert [r["question"] for r in records] == [line["prompt"] for line in LINES]
    for i, record in enumerate(records):
        (call,) = record["calls"]
        demo = LINES[1] if i == 0 else LINES[0]  # fixed selection: the first other question
        assert record["shots"] == 1 and isinstance(call["completion"], str) and record["question"] in call["prompt"]
        assert f"{demo['rationale']} The answer is {demo['answer']}." in call["prompt"]
    assert marker in records[1]["calls"][0]["prompt"]
    assert ("<|user|>" in records[1]["calls"][0]["prompt"]) == (marker == "<|user|>")
    numbers = json.loads(summary.read_text())
    assert numbers["n"] == 3 and numbers["correct"] == sum(r["correct"] for r in records)
    low, high = numbers["ci95"]
    assert 0 <= low <= numbers["accuracy"] <= high <= 1


def test_self_consistency_saves_the_vote_shares(world, tmp_path, capsys) -> None:
    transcript = tmp_path / "sc.jsonl"
    assert main(["prompt", str(world["base"]), "--method", "self-consistency", "--tasks", str(world["tasks"]),
                 "--shots", "0", "--k", "3", "--max-new-tokens", "4", "--transcript", str(transcript)]) == 0
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert all(len(r["calls"]) == 3 and sum(r["votes"].values()) <= 1 for r in records)
    assert records[0]["calls"][0]["prompt"].endswith("Answer: Let's think step by step.")  # zero-shot CoT samples


def test_demonstrations_beyond_the_context_are_dropped_and_the_count_said(world, tmp_path, capsys) -> None:
    transcript = tmp_path / "many.jsonl"
    assert main(["prompt", str(world["base"]), "--method", "cot", "--tasks", str(world["tasks"]), "--shots", "2",
                 "--max-new-tokens", "100", "--transcript", str(transcript)]) == 0
    err = capsys.readouterr().err
    records = [json.loads(line) for line in transcript.read_text().splitlines()]
    dropped = sum(r["dropped_shots"] for r in records)
    assert dropped > 0 and f"{dropped} demonstrations were dropped" in err


def test_nearest_selection_uses_minilm_sentence_embeddings() -> None:
    pool = [Example("What is the capital of Velmora?", "Tarsk"), Example("How many apples does Bob own?", "3"),
            Example("Which river runs through Tarsk?", "Ol")]
    (ranked,) = ShotRanker(pool, "nearest", embed=sentence_embed).rank(["How many apples does Ann have?"])
    assert ranked[0].question == "How many apples does Bob own?"


@pytest.mark.parametrize("extra, fragments", [
    (["--tasks", "{choice}", "--method", "standard"], ["choice.jsonl:2", "generate lines"]),
    (["--tasks", "{too_long}", "--method", "standard"], ["too_long.jsonl:2", "the question alone is"]),
    (["--tasks", "{no_rationale}", "--method", "cot"], ["no_rationale.jsonl:", "rationale"]),
    (["--tasks", "{bad_rationale}", "--method", "cot"], ["bad_rationale.jsonl:2", "'rationale'", "expected a string"]),
    (["--tasks", "{tasks}", "--method", "zero-shot-cot", "--shots", "2"], ["--shots does not apply"]),
    (["--tasks", "{tasks}", "--method", "self-consistency", "--temperature", "0"], ["temperature > 0"]),
    (["--tasks", "{tasks}", "--method", "standard", "--demos", "{other_task}"], ["no lines of task(s) 'generate'"]),
    (["--tasks", "{tasks}", "--method", "many-shot", "--budget", "150"], ["--budget 150", "at most 64"]),
    (["--tasks", "{tasks}", "--method", "standard", "--slot-template", "no slots"], ["[x] once"]),
])
def test_bad_input_is_one_line_exit_status_2_and_writes_nothing(world, tmp_path, capsys, extra, fragments) -> None:
    transcript = tmp_path / "t.jsonl"
    argv = ["prompt", str(world["base"]), *(a.format(**world) for a in extra), "--transcript", str(transcript)]
    assert main(argv) == 2
    message = error_line(capsys.readouterr().err)
    assert all(f in message for f in fragments), message
    assert not transcript.exists()

"""The agent pieces: the safe calculator, the tool registry (search and lookup over any retriever), the ReAct loop on
a scripted completer (a tool call, an unparseable action, the step limit), the transcript record, and `lmforge agent`
end to end on a tiny model that writes a ReAct transcript."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cli_checks import error_line
from lmforge.agents.calculator import MAX_DIGITS, CalculatorError, calculate
from lmforge.agents.completer import ContextFull, load_completer
from lmforge.agents.react import run_react
from lmforge.agents.tools import make_tools
from lmforge.agents.transcript import write_transcripts
from lmforge.checkpoint import save
from lmforge.cli import main
from lmforge.data.chat import get_chat_template
from lmforge.data.formats import react_messages
from lmforge.errors import ConfigError
from lmforge.manifest import CheckpointManifest
from lmforge.tokenizer import END_OF_TURN, train_tokenizer
from tiny_decoders import forced_model

pytestmark = pytest.mark.usefixtures("one_thread")

RECORD_KEYS = ["question", "method", "steps", "answer", "stop_reason", "prompt"]


# ---- calculator -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("expression", "value"), [
    ("37 * 48", "1776"), ("(2 + 3) * -4", "-20"), ("7 / 2", "3.5"), ("10 / 2", "5"), ("17 // 5", "3"),
    ("17 % 5", "2"), ("2 ** 10", "1024"), ("-(3 - 5) ** 2", "-4"), ("2 ** -2", "0.25"), ("1.5 + 2.25", "3.75"),
    ("347 * 28 + 1250 - 99", "10867")])
def test_calculator_values(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(("expression", "reason"), [
    ("x + 1", "names are not allowed"), ("abs(-3)", "function calls are not allowed"),
    ("__import__('os').system('true')", "function calls are not allowed"),
    ("(1).real", "attribute access is not allowed"), ("9 ** 9 ** 9", "too large"), ("2 ** 1000", "too large"),
    ("10 ** 60 * 10 ** 60", f"more than {MAX_DIGITS} digits"), ("1 / 0", "division by zero"),
    ("'a' * 3", "not a number"), ("True + 1", "not a number"), ("1 < 2", "comparisons are not allowed"),
    ("1 +", "cannot parse"), ("", "empty expression"), ("1+" * 150 + "1", "at most 200")])
def test_calculator_refuses_with_one_line(expression: str, reason: str) -> None:
    with pytest.raises(CalculatorError) as caught:
        calculate(expression)
    assert reason in str(caught.value) and "\n" not in str(caught.value)


# ---- tools ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: int
    text: str
    score: float


class WordRetriever:
    """The documents sharing most words with the query (a stand-in for lmforge.rag's Index)."""

    def __init__(self, docs: dict[str, str]):
        self.docs = docs

    def search(self, query: str, k: int = 5) -> list[Hit]:
        words = set(query.lower().split())
        scored = sorted(self.docs.items(), key=lambda d: -len(words & set(d[1].lower().rstrip(".").split())))
        return [Hit(doc_id, 0, text, 1.0) for doc_id, text in scored[:k]]


DOCS = {"a": "The Zorvik Tower stands in Tarsk. It was built by Meli Dorn in 1742.",
        "b": "The Brelk Mill stands in Vossa. It was built by Kado in 1511."}


def test_an_unknown_tool_lists_the_tools_and_errors_become_observations() -> None:
    tools = make_tools(["calculator", "search", "lookup"], WordRetriever(DOCS))
    assert tools.run("wikipedia", "x") == "Unknown tool wikipedia; the tools are: calculator, search, lookup"
    assert make_tools(["calculator"]).run("search", "x") == "Unknown tool search; the tools are: calculator"
    assert tools.run("calculator", "os.sep").startswith("Error: attribute access is not allowed")
    assert tools.run("calculator", "2 + 5") == "7"


def test_search_and_lookup_read_the_retrievers_passages() -> None:
    tools = make_tools(["search", "lookup"], WordRetriever(DOCS))
    assert tools.run("lookup", "built").startswith("Error: nothing to look in yet: search first")
    assert tools.run("search", "Zorvik Tower") == f"{DOCS['a']} | {DOCS['b']}"
    assert tools.run("lookup", "built") == "It was built by Meli Dorn in 1742."
    assert tools.run("lookup", "built") == "It was built by Kado in 1511."
    assert tools.run("lookup", "built") == "No more sentences mention 'built' in the search results"
    assert tools.run("search", "Brelk Mill") == f"{DOCS['b']} | {DOCS['a']}"
    assert tools.run("lookup", "built") == "It was built by Kado in 1511."  # each search starts the lookups anew
    assert tools.run("lookup", "Oslo") == "No sentences mention 'Oslo' in the search results"


@pytest.mark.parametrize(("names", "retriever", "message"), [
    (["calculator", "web"], None, "unknown tool 'web'"), (["search"], None, "need a document index"),
    (["lookup"], WordRetriever(DOCS), "add the search tool"), ([], None, "no tools given")])
def test_make_tools_refuses_bad_tool_sets(names: list[str], retriever, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_tools(names, retriever)


# ---- the ReAct loop -------------------------------------------------------------------------------------------

class Scripted:
    """A completer that returns its completions in turn and records the prompts and stop strings it got."""

    def __init__(self, *completions: str):
        self.completions, self.prompts, self.stops = list(completions), [], []

    def __call__(self, prompt, *, stop=(), max_new_tokens=128, temperature=0.0, seed=None) -> str:
        self.prompts.append(prompt)
        self.stops.append(tuple(stop))
        return self.completions.pop(0)


def test_react_runs_the_calculator_and_stops_at_the_final_answer() -> None:
    complete = Scripted("Thought: I need to multiply 37 by 48.\nAction: calculator[37 * 48]",
                        "Thought: I have the answer.\nFinal answer: 1776")
    run = run_react(complete, "What is 37 * 48?", make_tools(["calculator"]), opening="<open>")
    assert complete.stops == [("\nObservation:",)] * 2
    assert complete.prompts[1] == ("<open>Thought: I need to multiply 37 by 48.\nAction: calculator[37 * 48]\n"
                                   "Observation: 1776\n")
    assert run.prompt == complete.prompts[1] + "Thought: I have the answer.\nFinal answer: 1776"
    assert (run.answer, run.stop_reason) == ("1776", "answer")
    assert [(s.kind, s.text) for s in run.steps] == [
        ("thought", "I need to multiply 37 by 48."), ("action", "calculator[37 * 48]"), ("observation", "1776"),
        ("thought", "I have the answer."), ("answer", "1776")]
    assert list(run.record()) == RECORD_KEYS


def test_an_unparseable_action_becomes_an_observation_and_the_loop_goes_on() -> None:
    complete = Scripted("Thought: compute.\nAction: calculator 37 * 48\nThought: stray text after the action",
                        "Thought: again.\nAction: abacus[1 + 1]", "Final answer: 1776")
    run = run_react(complete, "What is 37 * 48?", make_tools(["calculator"]), opening="")
    observations = [s.text for s in run.steps if s.kind == "observation"]
    assert observations[0].startswith("Could not parse the action 'calculator 37 * 48'; write Action: tool[input]")
    assert observations[1] == "Unknown tool abacus; the tools are: calculator"
    assert "stray text" not in run.prompt  # what follows the action line is dropped
    assert [s.kind for s in run.steps].count("error") == 1
    assert (run.answer, run.stop_reason) == ("1776", "answer")


def test_the_step_limit_records_no_answer() -> None:
    complete = Scripted(*["Thought: more.\nAction: calculator[1 + 1]"] * 3)
    run = run_react(complete, "q", make_tools(["calculator"]), opening="", max_steps=3)
    assert (run.answer, run.stop_reason, len(complete.prompts)) == (None, "step_limit", 3)
    assert run.record()["answer"] is None


def test_a_completion_without_action_or_answer_ends_the_run() -> None:
    run = run_react(Scripted("Thought: I am not sure."), "q", make_tools(["calculator"]), opening="")
    assert (run.answer, run.stop_reason) == (None, "no_action")


def test_transcripts_are_written_as_json_lines(tmp_path: Path) -> None:
    runs = [run_react(Scripted("Final answer: 2"), f"q{i}", make_tools(["calculator"]), opening="o") for i in range(2)]
    path = write_transcripts(tmp_path / "t.jsonl", runs)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [list(r) for r in records] == [RECORD_KEYS] * 2
    assert records[1] == {"question": "q1", "method": "react", "steps": [{"kind": "answer", "text": "2"}],
                          "answer": "2", "stop_reason": "answer", "prompt": "oFinal answer: 2"}


# ---- lmforge agent on a tiny model ----------------------------------------------------------------------------

QUESTION = "What is 2 + 5?"
REPLY = "Thought: I add.\nAction: calculator[2 + 5]\nObservation: 7\nThought: I have the answer.\nFinal answer: 7"


def forced_chat_run(directory: Path, reply: str, messages: list[dict], prompt_text: str) -> Path:
    """A model that writes `reply` (then ends its turn) after `messages`: its greedy next token depends on the
    position only, set to the token that follows at that position in the full transcript."""
    tok = train_tokenizer([reply, QUESTION, prompt_text] * 20, vocab_size=400, show_progress=False)
    opening = get_chat_template("lmforge", tok).render(messages, add_generation_prompt=True).ids
    full = opening + tok.encode(reply) + [tok.token_id(END_OF_TURN)]
    model = forced_model(tok.vocab_size, 1, [], max_seq_len=128)
    with torch.no_grad():
        for position, next_id in enumerate(full[1:]):
            model.lm_head.weight[next_id, position] = 10.0
    return save(model, tok, directory / "run",
                run_config=CheckpointManifest(model=model.cfg, stage="sft", run={"template": "lmforge"}))


@pytest.fixture(scope="module")
def agent_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that writes the ReAct transcript REPLY for QUESTION."""
    return forced_chat_run(tmp_path_factory.mktemp("agent"), REPLY, react_messages(QUESTION, ["calculator"]),
                           "Tools: calculator. Question:")


def test_the_engine_completer_stops_at_stop_strings_and_refuses_a_full_context(agent_run: Path) -> None:
    complete = load_completer(str(agent_run))
    messages = react_messages(QUESTION, ["calculator"])
    opening = complete.opening(messages)
    assert complete.tokenizer.encode(opening) == complete.template.render(messages, add_generation_prompt=True).ids
    assert complete(opening, stop=("\nObservation:",)) == REPLY.split("\nObservation:")[0]
    assert complete(opening, max_new_tokens=3) == complete.tokenizer.decode(complete.tokenizer.encode(REPLY)[:3])
    assert complete(opening) == REPLY  # to the end of the turn
    crowded = opening + " seven" * 200
    with pytest.raises(ContextFull, match="fills the model's 128-token context"):
        complete(crowded)
    run = run_react(complete, QUESTION, make_tools(["calculator"]), opening=crowded)
    assert (run.answer, run.stop_reason, run.steps[-1].kind) == (None, "step_limit", "error")


def test_lmforge_agent_writes_the_transcript(agent_run: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "react.jsonl"
    code = main(["agent", str(agent_run), "--tools", "calculator", "--question", QUESTION, "--transcript", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert REPLY in printed and "answer: 7 (answer, 1 tool calls)" in printed
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["prompt"].endswith(REPLY) and (record["answer"], record["stop_reason"]) == ("7", "answer")
    assert {"kind": "observation", "text": "7"} in record["steps"]


def test_lmforge_agent_scores_a_task_file(agent_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"question": QUESTION, "answer": 7}) + "\n")
    assert main(["agent", str(agent_run), "--tasks", str(tasks), "--max-steps", "1"]) == 0
    assert "answer: (none) (step_limit, 1 tool calls)" in capsys.readouterr().out  # one step: no room to answer
    assert main(["agent", str(agent_run), "--tasks", str(tasks)]) == 0
    assert "accuracy: 1/1 = 1.000" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "message"), [
    (["--tools", "calculator,search"], "pass --index INDEX"), (["--tools", "web"], "unknown tool 'web'"),
    (["--tasks", "x.jsonl"], "give one of --question TEXT or --tasks"), (["--max-steps", "0"], "--max-steps must be")])
def test_lmforge_agent_refuses_bad_options(agent_run: Path, extra: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["agent", str(agent_run), "--question", QUESTION, *extra]) == 2
    assert message in error_line(capsys.readouterr().err)


def test_lmforge_agent_names_a_bad_task_line(agent_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"question": "ok"}) + "\n" + json.dumps({"q": "no question"}) + "\n")
    assert main(["agent", str(agent_run), "--tasks", str(tasks)]) == 2
    assert f"{tasks}:2: needs a non-empty string \"question\"" in error_line(capsys.readouterr().err)


def test_lmforge_agent_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["agent", "--help"])
    assert "lmforge agent runs/sft --tools calculator --question" in capsys.readouterr().out


def test_lmforge_agent_searches_a_rag_index(agent_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.rag import Document, Index

    index = Index()
    index.add([Document("velmora", "The capital of Velmora is Quenby.", "a"),
               Document("tarn", "Tarn is a river.", "b")])
    index.save(tmp_path / "index")
    argv = ["agent", str(agent_run), "--tools", "calculator,search", "--question", QUESTION, "--max-steps", "1"]
    assert main(argv + ["--index", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(argv + ["--index", str(tmp_path / "index")]) == 0


CODEACT_REPLY = ("Thought: I will compute it in Python.\n```python\nprint(2 + 5)\n```\nObservation: 7\n"
                 "Final answer: 7")


@pytest.fixture(scope="module")
def codeact_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model that writes CODEACT_REPLY after the CodeAct prompt for QUESTION."""
    from lmforge.data.formats import codeact_messages

    return forced_chat_run(tmp_path_factory.mktemp("codeact"), CODEACT_REPLY, codeact_messages(QUESTION),
                           "Answer with Python. Question:")


def test_lmforge_agent_codeact_runs_the_block_in_the_sandbox(codeact_run: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "codeact.jsonl"
    assert main(["agent", str(codeact_run), "--method", "codeact", "--question", QUESTION, "--timeout", "2",
                 "--transcript", str(out)]) == 0
    assert "answer: 7 (answer, 1 code blocks run)" in capsys.readouterr().out
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["method"] == "codeact" and {"kind": "observation", "text": "7"} in record["steps"]
    assert main(["agent", str(codeact_run), "--method", "codeact", "--question", QUESTION, "--timeout", "0"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err

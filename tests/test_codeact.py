"""The CodeAct loop with a scripted completer and the real sandbox: refusals, timeouts, crashes and unparseable
blocks become observations and the loop goes on; the step limit records no answer."""

from __future__ import annotations

import json

import pytest

from lmforge.agents.codeact import STOP, SandboxLimits, run_codeact
from lmforge.errors import ConfigError

OPENING = "<|user|>What is 37 * 48?<|assistant|>"
FAST = SandboxLimits(timeout_s=0.5, memory_mb=256, max_output_bytes=4096)


class Scripted:
    """A Completer that returns its turns in order and records each prompt it was given."""

    def __init__(self, *turns: str):
        self.turns, self.prompts, self.seeds = list(turns), [], []

    def __call__(self, prompt, *, stop=(), max_new_tokens=128, temperature=0.0, seed=None):
        assert tuple(stop) == STOP
        self.prompts.append(prompt)
        self.seeds.append(seed)
        return self.turns.pop(0)


def block(code: str, thought: str = "I will compute it in Python.") -> str:
    return f"Thought: {thought}\n```python\n{code}\n"  # the closing fence is the stop string: not returned


def test_code_runs_and_its_output_is_the_observation():
    model = Scripted(block("print(37 * 48)"), "Thought: I have the answer.\nFinal answer: 1776\nThought: more")
    t = run_codeact(model, "What is 37 * 48?", opening=OPENING, limits=FAST, seed=7)
    assert model.seeds == [7, 8]  # each step its own seed
    assert (t.answer, t.stop_reason) == ("1776", "answer")
    assert [s.kind for s in t.steps] == ["thought", "code", "observation", "thought", "answer"]
    assert model.prompts[1] == OPENING + block("print(37 * 48)") + "```\nObservation: 1776\n"
    assert t.prompt == model.prompts[1] + "Thought: I have the answer.\nFinal answer: 1776"
    record = t.record()
    assert list(record) == ["question", "method", "steps", "answer", "stop_reason", "prompt"]
    assert record["method"] == "codeact" and json.loads(json.dumps(record)) == record


def test_refusal_timeout_crash_and_unparseable_block_become_observations_and_the_loop_goes_on():
    model = Scripted(block("print(open('/etc/passwd').read())"), block("while True:\n    pass"),
                     block("print(1 / 0)"), block("print((37 * 48)"), "```py\nprint(1)\n",
                     block("print(37 * 48)"), "Final answer: 1776")
    t = run_codeact(model, "What is 37 * 48?", opening=OPENING, max_steps=7, limits=FAST)
    assert t.answer == "1776"
    observations = [s.text for s in t.steps if s.kind in ("observation", "error")]
    assert observations == [
        "refused by the sandbox: reading /etc/passwd (outside the working directory)",
        "timed out after 0.5 s (the wall-clock limit); the process was killed",
        "ZeroDivisionError: division by zero",
        "Unparseable code block: SyntaxError: '(' was never closed (line 1)",
        "Unparseable code block: a code block must open with ```python on its own line",
        "1776",
    ]
    assert all(f"Observation: {o}\n" in t.prompt for o in observations)
    assert "```py" not in [s.text for s in t.steps if s.kind == "thought"]


def test_step_limit_records_no_answer():
    model = Scripted(block("print(1)"), block("print(2)"))
    t = run_codeact(model, "Loop forever?", opening=OPENING, max_steps=2, limits=FAST)
    assert (t.answer, t.stop_reason) == (None, "step_limit")
    assert t.prompt.endswith("```\nObservation: 2\n")


def test_a_turn_without_code_or_answer_ends_the_run():
    t = run_codeact(Scripted("I do not know."), "What?", opening=OPENING, limits=FAST)
    assert (t.answer, t.stop_reason, [s.kind for s in t.steps]) == (None, "no_action", ["thought"])


def test_no_steps_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="max_steps"):
        run_codeact(Scripted(), "What?", opening=OPENING, max_steps=0)


def test_a_full_context_ends_the_run_without_an_answer():
    from lmforge.agents.completer import ContextFull

    class Full(Scripted):
        def __call__(self, prompt, **kw):
            if not self.turns:
                raise ContextFull("the transcript fills the 64-token context")
            return super().__call__(prompt, **kw)

    t = run_codeact(Full(block("print(1)")), "q", opening=OPENING, limits=FAST, max_steps=3)
    assert (t.answer, t.stop_reason) == (None, "step_limit")
    assert t.steps[-1].kind == "error" and "context" in t.steps[-1].text

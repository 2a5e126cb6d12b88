"""The text formats the synthetic SFT data teaches and the agent loops parse (as AGENTS_API.md writes them), and
their well-formedness checks, which the report applies to held-out transcripts.

* step by step: the user's question ends with `THINK_TRIGGER`; the reply is ``<rationale> The answer is X.``;
  a question without it gets the direct reply ``The answer is X.``;
* ReAct (user: ``Tools: calculator, search.\\nQuestion: ...``): ``Thought: ...`` / ``Action: tool[input]`` /
  ``Observation: ...`` lines, repeated, then ``Thought: ...`` / ``Final answer: X``;
* CodeAct (user: ``Answer with Python.\\nQuestion: ...``): ``Thought: ...``, a fenced python block, ``Observation:
  <its printed output>``, repeated, then ``Final answer: X``;
* grounded QA (user: ``Context:\\n[1] ...\\n[2] ...\\nQuestion: ...``): ``<answer> [n]``, n the passage cited.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from lmforge.data.chat import Message

THINK_TRIGGER = "Let's think step by step."
TOOL_NAMES = ("calculator", "search", "lookup")
OBSERVATION_STOP = "\nObservation:"  # a ReAct completion stops here; the loop writes the observation
SEARCH_HITS = 2  # passages a search observation shows
SEARCH_SEPARATOR = " | "  # between them
CODEACT_INSTRUCTION = "Answer with Python."
FINAL_ANSWER = "Final answer:"
ReActTurn = tuple[str, str, str]  # (thought, action as "tool[input]", observation)

# The checks below run on model-written text, so every line has one way to match (linear time): a non-blank line is
# its leading blanks, its first visible character, the rest (`[^\n]*\S[^\n]*` could place the \S anywhere, and
# nested in repetitions it backtracked exponentially on a malformed CodeAct reply), and a code line is any non-blank
# line but the closing fence.
_NON_BLANK = r"[^\S\n]*\S[^\n]*"
_THOUGHT = rf"Thought: {_NON_BLANK}\n"
_ACTION = rf"Action: (?:{'|'.join(TOOL_NAMES)})\[[^\n]*\]\n"
_OBSERVATION = r"Observation: [^\n]*\n"
_FINAL = rf"Final answer: {_NON_BLANK}"
_CODE_LINE = rf"(?!```\n){_NON_BLANK}\n"
_REACT = re.compile(rf"(?:{_THOUGHT}{_ACTION}{_OBSERVATION})*{_THOUGHT}{_FINAL}\n?")
_CODEACT = re.compile(rf"{_THOUGHT}(?:```python\n(?:{_CODE_LINE})+```\n{_OBSERVATION})+{_FINAL}\n?")
_ACTION_LINE = re.compile(r"Action:\s*(\w+)\[(.*)\]\s*")
_STEP_BY_STEP = re.compile(rf"(\S.*?)\s*The answer is {_NON_BLANK}", re.DOTALL)
_DIRECT = re.compile(rf"The answer is {_NON_BLANK}")
_CITED = re.compile(r"(\S[^\n]*?) \[(\d+)\]")
_MIN_RATIONALE_WORDS = 3


def _user(content: str) -> list[Message]:
    return [{"role": "user", "content": content}]


def think_messages(question: str) -> list[Message]:
    return _user(f"{question} {THINK_TRIGGER}")


def direct_messages(question: str) -> list[Message]:
    return _user(question)


def react_messages(question: str, tools: Sequence[str]) -> list[Message]:
    return _user(f"Tools: {', '.join(tools)}.\nQuestion: {question}")


def codeact_messages(question: str) -> list[Message]:
    return _user(f"{CODEACT_INSTRUCTION}\nQuestion: {question}")


def grounded_messages(passages: Sequence[str], question: str) -> list[Message]:
    context = "\n".join(f"[{i}] {p}" for i, p in enumerate(passages, 1))
    return _user(f"Context:\n{context}\nQuestion: {question}")


def step_by_step_reply(rationale: str, answer: str) -> str:
    return f"{rationale} The answer is {answer}."


def direct_reply(answer: str) -> str:
    return f"The answer is {answer}."


def react_reply(turns: Sequence[ReActTurn], final_thought: str, answer: str) -> str:
    lines = [f"Thought: {t}\nAction: {a}\nObservation: {o}\n" for t, a, o in turns]
    return "".join(lines) + f"Thought: {final_thought}\n{FINAL_ANSWER} {answer}"


def codeact_reply(thought: str, code: str, observation: str, answer: str) -> str:
    return f"Thought: {thought}\n```python\n{code}\n```\nObservation: {observation}\n{FINAL_ANSWER} {answer}"


def grounded_reply(answer: str, passage: int) -> str:
    return f"{answer} [{passage}]"


def parse_action(line: str) -> tuple[str, str] | None:
    """(tool, input) of an ``Action: tool[input]`` line; None when the line does not have that shape."""
    match = _ACTION_LINE.fullmatch(line.strip())
    return (match[1], match[2].strip()) if match else None


def final_answer(text: str) -> str | None:
    """X of the first ``Final answer: X`` line (ReAct and CodeAct), or None."""
    for line in text.split("\n"):
        if line.strip().startswith(FINAL_ANSWER):
            return line.strip()[len(FINAL_ANSWER):].strip() or None
    return None


def cited_passage(reply: str) -> int | None:
    """n of a grounded reply ``<answer> [n]``, or None."""
    match = _CITED.fullmatch(reply.strip())
    return int(match[2]) if match else None


def grounded_answer(reply: str) -> str | None:
    """The answer of a grounded reply without its citation, or None when it is not ``<answer> [n]``."""
    match = _CITED.fullmatch(reply.strip())
    return match[1] if match else None


def well_formed_step_by_step(reply: str) -> bool:
    """At least three words of rationale, then ``The answer is X``."""
    match = _STEP_BY_STEP.fullmatch(reply.strip())
    return match is not None and len(re.findall(r"\w+", match[1])) >= _MIN_RATIONALE_WORDS


def well_formed_direct(reply: str) -> bool:
    """``The answer is X`` and nothing before it."""
    return _DIRECT.fullmatch(reply.strip()) is not None


def well_formed_react(text: str) -> bool:
    """Thought / Action: tool[input] (a known tool) / Observation, repeated, then Thought / Final answer."""
    return _REACT.fullmatch(text.lstrip()) is not None


def well_formed_codeact(text: str) -> bool:
    """Thought, then (a non-empty fenced python block, Observation) at least once, then Final answer."""
    return _CODEACT.fullmatch(text.lstrip()) is not None


def well_formed_grounded(reply: str, n_passages: int) -> bool:
    """``<answer> [n]`` with n one of the context's passages."""
    cited = cited_passage(reply)
    return cited is not None and 1 <= cited <= n_passages


def well_formed_share(check: Callable[[str], bool], texts: Sequence[str]) -> float:
    """The share of `texts` that `check` accepts (e.g. ``well_formed_share(well_formed_react, texts)``)."""
    if not texts:
        raise ValueError("no texts to score")
    return sum(bool(check(t)) for t in texts) / len(texts)

"""CodeAct: the model acts by writing a fenced Python block; the sandbox runs it, and what it printed (or the one-line
reason the sandbox stopped it) comes back as the observation, until "Final answer:" or the step limit.

The text format, the Completer and the transcript record are AGENTS_API.md's:

    Thought: I will compute it in Python.
    ```python
    print(37 * 48)
    ```
    Observation: 1776
    Final answer: 1776
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

from lmforge.agents.sandbox import SandboxResult, run_python
from lmforge.errors import ConfigError, one_line

OPEN_FENCE = "```python\n"
CLOSE_FENCE = "```\n"
OBSERVATION = "Observation:"
FINAL_ANSWER = "Final answer:"
# Generation stops at the closing fence (the block is complete: run it), or where the model would invent an
# observation of its own. The opening fence "```python\n" does not contain "```\n".
STOP = (CLOSE_FENCE, "\n" + OBSERVATION)


class Completer(Protocol):
    """AGENTS_API.md's: the model's continuation of `prompt`, without the stop string."""

    def __call__(self, prompt: str, *, stop: Sequence[str] = (), max_new_tokens: int = 128,
                 temperature: float = 0.0, seed: int | None = None) -> str: ...


@dataclass(frozen=True)
class Step:
    kind: Literal["thought", "action", "code", "observation", "answer", "error"]
    text: str


@dataclass
class Transcript:
    """One agent run; `record()` is the JSON line AGENTS_API.md specifies."""

    question: str
    method: Literal["react", "codeact"]
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stop_reason: Literal["answer", "step_limit", "no_action"] = "no_action"
    prompt: str = ""

    def record(self) -> dict:
        return {"question": self.question, "method": self.method, "steps": [asdict(s) for s in self.steps],
                "answer": self.answer, "stop_reason": self.stop_reason, "prompt": self.prompt}


@dataclass(frozen=True)
class SandboxLimits:
    """run_python's limits for each block."""

    timeout_s: float = 5
    memory_mb: int = 256
    max_output_bytes: int = 65536


def run_codeact(complete: Completer, question: str, opening: str, *, max_steps: int = 5,
                limits: SandboxLimits = SandboxLimits(), max_new_tokens: int = 256, temperature: float = 0.0,
                seed: int | None = None) -> Transcript:
    """Answer `question` by CodeAct. `opening` is the chat template rendered with the generation prompt open (system
    and user turn); each step the model continues the text so far. A refused, timed-out or crashed block, and a
    block that does not parse, become the observation and the loop goes on; a turn with neither a block nor a final
    answer ends it ("no_action"); `max_steps` turns without an answer end it with answer None ("step_limit")."""
    if max_steps < 1:
        raise ConfigError(f"max_steps={max_steps}: a CodeAct run needs at least 1 step")
    transcript = Transcript(question, "codeact", prompt=opening)
    for _ in range(max_steps):
        completion = complete(transcript.prompt, stop=STOP, max_new_tokens=max_new_tokens,
                              temperature=temperature, seed=seed)
        transcript.prompt += completion
        fence = completion.find(OPEN_FENCE)
        before = completion if fence < 0 else completion[:fence]
        _add_thought(transcript, before)
        if FINAL_ANSWER in before:
            answer = before.split(FINAL_ANSWER, 1)[1].strip().split("\n", 1)[0].strip()
            transcript.steps.append(Step("answer", answer))
            transcript.answer, transcript.stop_reason = answer, "answer"
            return transcript
        if fence < 0 and "```" not in completion:
            transcript.stop_reason = "no_action"
            return transcript
        if not transcript.prompt.endswith("\n"):
            transcript.prompt += "\n"
        if fence >= 0:
            transcript.prompt += CLOSE_FENCE
        code = completion[fence + len(OPEN_FENCE):] if fence >= 0 else ""
        problem = _unparseable(code) if fence >= 0 else "a code block must open with ```python on its own line"
        if problem:
            observation = f"Unparseable code block: {problem}"
            transcript.steps.append(Step("error", observation))
        else:
            transcript.steps.append(Step("code", code))
            observation = observe(run_python(code, timeout_s=limits.timeout_s, memory_mb=limits.memory_mb,
                                             max_output_bytes=limits.max_output_bytes))
            transcript.steps.append(Step("observation", observation))
        transcript.prompt += f"{OBSERVATION} {observation}\n"
    transcript.stop_reason = "step_limit"
    return transcript


def observe(result: SandboxResult) -> str:
    """What the model is shown: the printed output, or one line saying why the code did not finish."""
    if result.error:
        return result.error
    if result.exit_code != 0:
        last = next((line.strip() for line in reversed(result.stderr.splitlines()) if line.strip()), "")
        return last or f"the code exited with status {result.exit_code}"
    return result.stdout.rstrip("\n") or "(the code printed nothing)"


def _add_thought(transcript: Transcript, text: str) -> None:
    thought = text.split(FINAL_ANSWER, 1)[0].strip()
    thought = thought.removeprefix("Thought:").strip()
    if thought:
        transcript.steps.append(Step("thought", thought))


def _unparseable(code: str) -> str | None:
    """Why `code` is not Python (checked here, without running it), or None."""
    if not code.strip():
        return "the block is empty"
    try:
        ast.parse(code)  # parsing only: no constant folding, nothing runs
    except SyntaxError as e:
        return one_line(f"SyntaxError: {e.msg} (line {e.lineno})")
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes; nesting too deep for the parser
        return one_line(f"{type(e).__name__}: {e}")
    return None

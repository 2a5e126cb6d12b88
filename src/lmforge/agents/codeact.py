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
from dataclasses import dataclass

from lmforge.agents.completer import Completer, ContextFull, EngineCompleter
from lmforge.agents.sandbox import SandboxResult, run_python
from lmforge.agents.transcript import Step, Transcript
from lmforge.data.formats import FINAL_ANSWER
from lmforge.errors import ConfigError, one_line

OPEN_FENCE = "```python\n"
CLOSE_FENCE = "```\n"
OBSERVATION = "Observation:"
# Generation stops at the closing fence (the block is complete: run it), or where the model would invent an
# observation of its own. The opening fence "```python\n" does not contain "```\n".
STOP = (CLOSE_FENCE, "\n" + OBSERVATION)
DEFAULT_MAX_STEPS = 5


@dataclass(frozen=True)
class SandboxLimits:
    """run_python's limits for each block."""

    timeout_s: float = 5
    memory_mb: int = 256
    max_output_bytes: int = 65536


def run_codeact(complete: Completer, question: str, *, opening: str, max_steps: int = DEFAULT_MAX_STEPS,
                limits: SandboxLimits = SandboxLimits(), max_new_tokens: int = 256, temperature: float = 0.0,
                seed: int | None = None) -> Transcript:
    """Answer `question` by CodeAct. `opening` is the prompt text the assistant's turn starts from (the chat template
    rendered with the generation prompt open); each step the model continues the text so far. A refused, timed-out
    or crashed block, and a block that does not parse, become the observation and the loop goes on; a turn with
    neither a block nor a final answer ends it ("no_action"); `max_steps` turns without a final answer end it
    ("step_limit"); either way the answer is recorded as None."""
    if max_steps < 1:
        raise ConfigError(f"max_steps (--max-steps) must be >= 1, got {max_steps}")
    run = Transcript(question, "codeact", prompt=opening, opening=opening)
    for step in range(max_steps):
        try:
            completion = complete(run.prompt, stop=STOP, max_new_tokens=max_new_tokens, temperature=temperature,
                                  seed=None if seed is None else seed + step)
        except ContextFull as err:
            run.steps.append(Step("error", str(err)))
            break
        prose, fence, code = completion.partition(OPEN_FENCE)
        kept = _read(prose, run)
        if run.answer is not None:
            run.prompt += kept
            run.stop_reason = "answer"
            return run
        if not fence and "```" not in prose:
            run.prompt += completion
            run.stop_reason = "no_action"
            return run
        run.prompt += completion if completion.endswith("\n") else completion + "\n"
        if fence:
            run.prompt += CLOSE_FENCE
        problem = _unparseable(code) if fence else "a code block must open with ```python on its own line"
        if problem:
            observation = f"Unparseable code block: {problem}"
            run.steps.append(Step("error", observation))
        else:
            run.steps.append(Step("code", code))
            observation = observe(run_python(code, timeout_s=limits.timeout_s, memory_mb=limits.memory_mb,
                                             max_output_bytes=limits.max_output_bytes))
            run.steps.append(Step("observation", observation))
        run.prompt += f"{OBSERVATION} {observation}\n"
    run.stop_reason = "step_limit"
    return run


def run_codeact_chat(complete: EngineCompleter, question: str, **options) -> Transcript:
    """`run_codeact` on a chat model, from the CodeAct user turn the synthetic SFT data teaches
    (`lmforge.data.formats.codeact_messages`); `options` as `run_codeact`'s."""
    from lmforge.data.formats import codeact_messages

    return run_codeact(complete, question, opening=complete.opening(codeact_messages(question)), **options)


def observe(result: SandboxResult) -> str:
    """What the model is shown: the printed output, or one line saying why the code did not finish."""
    if result.error:
        return result.error
    if result.exit_code != 0:
        last = next((line.strip() for line in reversed(result.stderr.splitlines()) if line.strip()), "")
        return last or f"the code exited with status {result.exit_code}"
    return result.stdout.rstrip("\n") or "(the code printed nothing)"


def _read(prose: str, run: Transcript) -> str:
    """Record the thoughts before a code block and a final answer; returns `prose` up to the answer's line (what
    follows it is dropped), or whole."""
    lines = prose.split("\n")
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("```"):  # a fence that is not ```python: the caller observes it
            break
        if text.startswith(FINAL_ANSWER) and text[len(FINAL_ANSWER):].strip():
            run.answer = text[len(FINAL_ANSWER):].strip()
            run.steps.append(Step("answer", run.answer))
            return "\n".join(lines[:i + 1])
        if text:
            run.steps.append(Step("thought", text.removeprefix("Thought:").strip()))
    return prose


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

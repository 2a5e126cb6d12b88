"""The ReAct loop (Yao et al. 2023): the model writes Thought / Action: tool[input]; generation stops at
"\\nObservation:", the tool runs, and its result is appended as the observation; until a "Final answer:" line.

Bad steps do not end the run: an Action line that is not ``tool[input]`` and an unknown tool get observations saying
so (the unknown tool's lists the tools). A completion with neither an action nor a final answer ends it
("no_action"); so does `max_steps` completions without a final answer, or a transcript that fills the context
("step_limit"); either way the answer is recorded as None."""

from __future__ import annotations

from lmforge.agents.completer import Completer, ContextFull, EngineCompleter
from lmforge.agents.tools import ToolRegistry
from lmforge.agents.transcript import Step, Transcript
from lmforge.data.formats import FINAL_ANSWER, OBSERVATION_STOP, parse_action, react_messages
from lmforge.errors import ConfigError

DEFAULT_MAX_STEPS = 5


def run_react(complete: Completer, question: str, tools: ToolRegistry, *, opening: str,
              max_steps: int = DEFAULT_MAX_STEPS, max_new_tokens: int = 96, temperature: float = 0.0,
              seed: int | None = None) -> Transcript:
    """Answer `question` with `tools`; `opening` is the prompt text the assistant's turn starts from (for a chat
    model, `EngineCompleter.opening(react_messages(question, tools.names))`)."""
    if max_steps < 1:
        raise ConfigError(f"max_steps (--max-steps) must be >= 1, got {max_steps}")
    run = Transcript(question, "react", prompt=opening, opening=opening)
    for step in range(max_steps):
        try:
            completion = complete(run.prompt, stop=(OBSERVATION_STOP,), max_new_tokens=max_new_tokens,
                                  temperature=temperature, seed=None if seed is None else seed + step)
        except ContextFull as err:
            run.steps.append(Step("error", str(err)))
            run.stop_reason = "step_limit"
            return run
        action = _read(completion, run)
        if run.answer is not None:
            run.stop_reason = "answer"
            return run
        if action is None:
            run.stop_reason = "no_action"
            return run
        observation = _observe(action, tools, run)
        run.steps.append(Step("observation", observation))
        run.prompt += f"\nObservation: {observation}\n"
    run.stop_reason = "step_limit"
    return run


def run_react_chat(complete: EngineCompleter, question: str, tools: ToolRegistry, **options) -> Transcript:
    """`run_react` on a chat model, from the ReAct user turn the synthetic SFT data teaches
    (`lmforge.data.formats.react_messages`: the tools offered, then the question); `options` as `run_react`'s."""
    opening = complete.opening(react_messages(question, tools.names))
    return run_react(complete, question, tools, opening=opening, **options)


def _read(completion: str, run: Transcript) -> str | None:
    """Record `completion`'s thoughts and its final answer, or its Action line (returned); what follows the first
    action or final answer is dropped from the transcript."""
    kept = []
    for line in completion.split("\n"):
        kept.append(line)
        text = line.strip()
        if text.startswith(FINAL_ANSWER) and text[len(FINAL_ANSWER):].strip():
            run.answer = text[len(FINAL_ANSWER):].strip()
            run.steps.append(Step("answer", run.answer))
            break
        if text.startswith("Action:"):
            run.prompt += "\n".join(kept)
            return text
        if text:
            run.steps.append(Step("thought", text.removeprefix("Thought:").strip()))
    run.prompt += "\n".join(kept)
    return None


def _observe(line: str, tools: ToolRegistry, run: Transcript) -> str:
    parsed = parse_action(line)
    if parsed is None:
        run.steps.append(Step("error", line))
        return (f"Could not parse the action {line.removeprefix('Action:').strip()!r}; write Action: tool[input] "
                f"with one of the tools: {', '.join(tools.names)}")
    name, argument = parsed
    run.steps.append(Step("action", f"{name}[{argument}]"))
    return tools.run(name, argument)

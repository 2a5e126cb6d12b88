"""The record of one agent run (ReAct or CodeAct), one JSON line per question, as AGENTS_API.md writes it:
``{"question", "method", "steps": [{"kind", "text"}], "answer", "stop_reason", "prompt"}``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from lmforge.io import atomic_write_jsonl

StepKind = Literal["thought", "action", "code", "observation", "answer", "error"]
StopReason = Literal["answer", "step_limit", "no_action"]


@dataclass(frozen=True)
class Step:
    kind: StepKind
    text: str


@dataclass
class Transcript:
    """`prompt` is the full final text (the opening and everything generated and observed); `opening` (not written)
    is the chat-template text it began with, so `assistant_text` is what the assistant wrote and was shown."""

    question: str
    method: Literal["react", "codeact"]
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stop_reason: StopReason = "no_action"
    prompt: str = ""
    opening: str = field(default="", repr=False)

    @property
    def assistant_text(self) -> str:
        return self.prompt[len(self.opening):]

    def record(self) -> dict:
        return {"question": self.question, "method": self.method, "steps": [asdict(s) for s in self.steps],
                "answer": self.answer, "stop_reason": self.stop_reason, "prompt": self.prompt}


def write_transcripts(path: str | Path, transcripts: Iterable[Transcript]) -> Path:
    """One JSON line per transcript, written atomically (a failed write leaves any earlier file as it was)."""
    return atomic_write_jsonl(path, (t.record() for t in transcripts))

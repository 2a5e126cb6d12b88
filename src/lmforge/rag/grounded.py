"""The grounded-QA prompt: numbered passages, then the question; the answer cites a passage as `[n]`.

    Context:
    [1] <passage>
    [2] <passage>
    Question: <question>

(the user turn under a chat template; without one, `Answer:` follows on its own line). A passage's line breaks
become spaces, so each passage is one numbered line. With no passages the prompt is the question alone (closed
book)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmforge.rag.index import Hit

_CITATION = re.compile(r"\[(\d+)\]")


def grounded_prompt(question: str, passages: Sequence[Hit | str]) -> str:
    """The grounded-QA user text for `question` over `passages` (numbered from 1 in the order given)."""
    lines = ["Context:"] if passages else []
    for n, passage in enumerate(passages, start=1):
        text = passage.text if isinstance(passage, Hit) else passage
        lines.append(f"[{n}] {' '.join(text.split())}")
    lines.append(f"Question: {' '.join(question.split())}")
    return "\n".join(lines)


def cited_numbers(answer: str, n_passages: int) -> list[int]:
    """The passage numbers (1..n_passages) `answer` cites as [n], in order, each once."""
    seen: list[int] = []
    for match in _CITATION.finditer(answer):
        n = int(match[1])
        if 1 <= n <= n_passages and n not in seen:
            seen.append(n)
    return seen

"""The task file of `lmforge eval tasks`: one JSON object per line, of three kinds.

    {"type": "generate", "prompt": "2+2=", "answer": "4", "pattern": "(\\d+)", "stop": ["\\n"]}
    {"type": "choice", "prompt": "The sky is", "choices": ["blue", "green"], "answer": 0}
    {"type": "text2text", "prompt": "Translate: chat", "reference": "cat"}

Every line may name its `task` (default: its type); the lines of a task are scored together. `pattern` (a
regular expression; its first group if it has one, else the whole match) extracts the answer from a generation,
`stop` ends it at any of these strings. A choice's `answer` is the index of the right choice. A generate line may
carry a `rationale` (its worked steps, before "The answer is X."): `lmforge prompt` shows it in chain-of-thought
demonstrations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.readers import jsonl_objects
from lmforge.errors import DataError

REQUIRED = {"generate": ("prompt", "answer"), "choice": ("prompt", "choices", "answer"),
            "text2text": ("prompt", "reference")}


@dataclass
class TaskItem:
    where: str  # "file:line"
    kind: str  # generate | choice | text2text
    task: str
    prompt: str
    answer: str | int  # the gold answer, the right choice's index, or the reference text
    choices: list[str] = field(default_factory=list)
    pattern: re.Pattern | None = None
    stop: tuple[str, ...] = ()
    rationale: str = ""  # a generate line's worked steps (optional)


def _text(obj: dict, key: str, where: str, kind: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} of a {kind} task is {type(value).__name__}, expected a string")
    return value


def _item(obj: dict, where: str) -> TaskItem:
    kind = obj.get("type")
    if kind not in REQUIRED:
        got = "missing" if kind is None else f"{kind!r}"
        raise DataError(f"{where}: field 'type' is {got}; it must be one of {', '.join(REQUIRED)}")
    for key in REQUIRED[kind]:
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r} (a {kind} task needs {', '.join(REQUIRED[kind])})")
    task = obj.get("task", kind)
    if not isinstance(task, str) or not task:
        raise DataError(f"{where}: field 'task' must be a non-empty string, got {task!r}")
    item = TaskItem(where, kind, task, _text(obj, "prompt", where, kind), "")
    if kind == "choice":
        choices = obj["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{where}: field 'choices' must be a list of strings")
        if len(choices) < 2:
            raise DataError(f"{where}: a choice task needs at least two choices, got {len(choices)}")
        if "" in choices:
            raise DataError(f"{where}: choice {choices.index('')} is empty; every choice needs text")
        answer = obj["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: field 'answer' must be the index of the right choice, 0 to "
                            f"{len(choices) - 1}, got {answer!r}")
        item.choices, item.answer = choices, answer
    else:
        item.answer = _text(obj, REQUIRED[kind][1], where, kind)
    if kind == "generate" and "pattern" in obj:
        try:
            item.pattern = re.compile(_text(obj, "pattern", where, kind))
        except re.error as e:
            raise DataError(f"{where}: field 'pattern' is not a valid regular expression ({e})") from None
    if kind == "generate" and "rationale" in obj:
        item.rationale = _text(obj, "rationale", where, kind)
    if "stop" in obj:
        stop = obj["stop"]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise DataError(f"{where}: field 'stop' must be a list of non-empty strings")
        item.stop = tuple(stop)
    return item


def read_tasks(path: str | Path) -> dict[str, list[TaskItem]]:
    """task name -> its items, in file order; DataError naming file:line and the field for a bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file not found: {path}")
    tasks: dict[str, list[TaskItem]] = {}
    for where, obj in jsonl_objects(path):
        if isinstance(obj, DataError):
            raise DataError(f"{where}: {obj}")
        item = _item(obj, where)
        same = tasks.setdefault(item.task, [])
        if same and same[0].kind != item.kind:
            raise DataError(f"{where}: task {item.task!r} is a {same[0].kind} task ({same[0].where}) but this "
                            f"line is a {item.kind} task; give it another 'task' name")
        same.append(item)
    if not tasks:
        raise DataError(f"{path} holds no task lines; give one JSON object per line, e.g. "
                        '{"type": "choice", "prompt": "The sky is", "choices": ["blue", "green"], "answer": 0}')
    return tasks

"""Post-training data readers: SFT conversations, preference pairs and RL prompts, rendered by a chat template.

* `read_sft`: lines ``{"messages": [...]}`` (OpenAI format) or ``{"prompt": str, "response": str}`` ->
  ``{"input_ids": ids[:-1], "labels": ids[1:]}`` with labels -100 wherever the target token was not written by
  the assistant, so the loss covers the replies (and their closing tokens) only.
* `read_preferences`: lines ``{"prompt": str | messages, "chosen": str, "rejected": str}`` -> both responses
  rendered after the prompt, with masks of the response tokens (for DPO-style objectives).
* `read_prompts`: lines ``{"prompt": str | messages, "meta": {...}}`` -> prompt ids ending where the reply
  begins (for RL rollouts), with the meta a reward function reads.

No packing: each row holds one conversation, right-padded, so the loss and attention never cross
conversations. A rendered sequence may have max_len + 1 tokens: the model reads the first max_len.

Every bad line raises ``DataError("file:line: ...; fix it or pass --skip-bad-lines")``; with
``skip_bad_lines=True`` it is skipped and counted in `SFTData.skipped` instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.data.chat import ChatTemplate, Message, render_prompt_response
from lmforge.data.readers import jsonl_objects
from lmforge.data.task_data import IGNORE_INDEX, collate
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer

Example = dict[str, Any]
_SKIP_HINT = "fix it or pass --skip-bad-lines"


@dataclass
class SFTData:
    """Examples read from one JSONL file and how many bad lines were skipped."""

    examples: list[Example]
    skipped: int = 0


def _read(path: str | Path, tokenizer: Tokenizer, template: ChatTemplate, skip_bad_lines: bool,
          parse: Callable[[dict], Example]) -> SFTData:
    """Parse every non-blank line with `parse`, which raises location-free `DataError`s for bad lines."""
    if template.tokenizer is not tokenizer:
        raise ValueError("the chat template was built for a different tokenizer; build it with this one")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    examples, skipped = [], 0
    for where, obj in jsonl_objects(path):
        try:
            if isinstance(obj, DataError):
                raise obj
            examples.append(parse(obj))
        except DataError as e:
            if not skip_bad_lines:
                raise DataError(f"{where}: {e}; {_SKIP_HINT}") from None
            skipped += 1
    if not examples:
        raise DataError(f"{path}: no examples ({'all ' + str(skipped) + ' lines were bad' if skipped else 'empty'})")
    return SFTData(examples, skipped)


def _string(obj: dict, key: str) -> str:
    if key not in obj:
        raise DataError(f"missing field {key!r} (keys present: {', '.join(sorted(obj)) or 'none'})")
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"field {key!r} has type {type(value).__name__}, expected a string")
    if not value.strip():
        raise DataError(f"field {key!r} is empty")
    return value


def _prompt(obj: dict) -> str | list[Message]:
    """The "prompt" field: a non-empty string, or messages with non-empty contents."""
    prompt = obj.get("prompt")
    if isinstance(prompt, list):
        _nonempty_contents(prompt)
        return prompt
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"field 'prompt' has type {type(prompt).__name__}, expected a string or a list of messages")
    return _string(obj, "prompt")


def _nonempty_contents(messages: list) -> None:
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), str) and not m["content"].strip():
            raise DataError(f"message {i} ({m.get('role')}) has empty content")


def _fits(ids: list[int], max_len: int, what: str) -> None:
    if len(ids) - 1 > max_len:
        raise DataError(f"the {what} has {len(ids)} tokens, more than max_len={max_len} allows "
                        f"({max_len + 1}, as the model reads all but the last); raise max_len")


def read_sft(path: str | Path, tokenizer: Tokenizer, template: ChatTemplate, max_len: int, *,
             skip_bad_lines: bool = False) -> SFTData:
    """{"messages"} or {"prompt", "response"} lines -> [{"input_ids", "labels"}] (labels -100 off the replies)."""

    def parse(obj: dict) -> Example:
        if "messages" in obj:
            if "prompt" in obj or "response" in obj:
                raise DataError("give either \"messages\" or \"prompt\" and \"response\", not both")
            messages = obj["messages"]
            if isinstance(messages, list):
                _nonempty_contents(messages)
            rendered = template.render(messages, require_assistant=True)
        else:
            rendered = render_prompt_response(template, _prompt(obj), _string(obj, "response"))
        ids, mask = rendered.ids, rendered.assistant_mask
        _fits(ids, max_len, "conversation")
        labels = [tid if mine else IGNORE_INDEX for tid, mine in zip(ids[1:], mask[1:], strict=True)]
        if all(label == IGNORE_INDEX for label in labels):
            raise DataError("no assistant token to train on after rendering")
        return {"input_ids": ids[:-1], "labels": labels}

    return _read(path, tokenizer, template, skip_bad_lines, parse)


def collate_sft(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad SFT examples: `input_ids` (pad_id), `labels` (-100), `attention_mask` (1 on real tokens)."""
    return collate(examples, pad_id)


def read_preferences(path: str | Path, tokenizer: Tokenizer, template: ChatTemplate, max_len: int, *,
                     skip_bad_lines: bool = False) -> SFTData:
    """{"prompt", "chosen", "rejected"} lines -> [{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"}],
    each mask True on the response's tokens (and its closing token)."""

    def parse(obj: dict) -> Example:
        prompt, chosen, rejected = _prompt(obj), _string(obj, "chosen"), _string(obj, "rejected")
        if chosen.strip() == rejected.strip():
            raise DataError("\"chosen\" and \"rejected\" are identical, so the pair teaches nothing")
        example = {}
        for key, response in (("chosen", chosen), ("rejected", rejected)):
            rendered = render_prompt_response(template, prompt, response)
            _fits(rendered.ids, max_len, f"prompt with the {key} response")
            example[f"{key}_ids"], example[f"{key}_mask"] = rendered.ids, rendered.assistant_mask
        return example

    return _read(path, tokenizer, template, skip_bad_lines, parse)


def _pad(rows: list[list], width: int, fill: Any, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=dtype)


def collate_preferences(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad chosen and rejected sequences to one common width (so they can share a forward pass):
    `chosen_ids`/`rejected_ids` (pad_id), bool `chosen_mask`/`rejected_mask` (response tokens) and
    `chosen_attention`/`rejected_attention` (1 on real tokens)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(e[f"{key}_ids"]) for e in examples for key in ("chosen", "rejected"))
    batch = {}
    for key in ("chosen", "rejected"):
        ids = [e[f"{key}_ids"] for e in examples]
        batch[f"{key}_ids"] = _pad(ids, width, pad_id, torch.long)
        batch[f"{key}_mask"] = _pad([e[f"{key}_mask"] for e in examples], width, False, torch.bool)
        batch[f"{key}_attention"] = _pad([[1] * len(row) for row in ids], width, 0, torch.long)
    return batch


def read_prompts(path: str | Path, tokenizer: Tokenizer, template: ChatTemplate, max_len: int, *,
                 skip_bad_lines: bool = False) -> SFTData:
    """{"prompt": str | messages, "meta": {...}} lines -> [{"prompt_ids", "messages", "meta"}]; the ids end
    where the reply begins and leave at least one of max_len's positions for it. "meta" is optional."""

    def parse(obj: dict) -> Example:
        prompt = _prompt(obj)
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise DataError(f"field 'meta' has type {type(meta).__name__}, expected an object")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = template.render(messages, add_generation_prompt=True).ids
        if len(ids) >= max_len:
            raise DataError(f"the prompt has {len(ids)} tokens, leaving no room for a reply in max_len={max_len}; "
                            f"raise max_len")
        return {"prompt_ids": ids, "messages": messages, "meta": meta}

    return _read(path, tokenizer, template, skip_bad_lines, parse)

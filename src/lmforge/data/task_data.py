"""Read labelled JSONL (as `synthetic_tasks` writes, or a user's own) into examples for the task heads.

Every reader checks each line and raises a `DataError` naming file:line: invalid JSON, a missing or
mistyped field, a label outside the label set, a misplaced answer, a sequence longer than `max_len`
(unless `truncate`). Inputs are laid out for the architecture `arch`:

* ``encoder`` (when the tokenizer has [CLS]/[SEP]): ``[CLS] text [SEP]``, ``[CLS] question [SEP] context
  [SEP]`` with `token_type_ids` 0/1 for the two segments (Devlin et al. 2019, fig. 2);
* ``decoder``: ``text EOS`` for classification, so the last token has read the whole text (Radford et al.
  2018, fig. 1); ``question SEP context`` for QA; ``input SEP target EOS`` with loss on the target only
  for text-to-text;
* ``encdec``: ``input EOS`` -> ``target EOS`` (T5, Raffel et al. 2020).

An example is a dict of token-id lists and ints; `collate` pads a list of them into a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from lmforge.data.readers import jsonl_objects
from lmforge.errors import DataError
from lmforge.tokenizer import CLS, SEP, Tokenizer

IGNORE_INDEX = -100
ARCHS = ("decoder", "encoder", "encdec")
Example = dict[str, list[int] | int]
_TRUNCATE_HINT = "raise max_len or pass truncate=True"


def _records(path: Path, fields: dict[str, type | tuple[type, ...]]) -> Iterator[tuple[str, dict]]:
    """(file:line, object) for each non-blank line, with every field in `fields` present and typed."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    for where, obj in jsonl_objects(path):
        if isinstance(obj, DataError):
            raise DataError(f"{where}: {obj}")
        for name, kind in fields.items():
            if name not in obj:
                present = ", ".join(sorted(obj)) or "none"
                raise DataError(f"{where}: missing field {name!r} (keys present: {present})")
            if not isinstance(obj[name], kind) or isinstance(obj[name], bool):
                raise DataError(f"{where}: field {name!r} has type {type(obj[name]).__name__}, "
                                f"expected {getattr(kind, '__name__', 'str or int')}")
        yield where, obj


def _read(path: str | Path, fields: dict[str, type | tuple[type, ...]]) -> list[tuple[str, dict]]:
    path = Path(path)
    records = list(_records(path, fields))
    if not records:
        raise DataError(f"{path}: no examples (the file is empty)")
    return records


def _label_set(records: list[tuple[str, list[str]]], labels: Sequence[str] | None) -> list[str]:
    """`labels` (checked against every record) or, if None, the sorted labels seen."""
    if labels is None:
        return sorted({label for _, row in records for label in row})
    allowed = set(labels)
    for where, row in records:
        for label in row:
            if label not in allowed:
                raise DataError(f"{where}: label {label!r} is not in the label set {list(labels)}")
    return list(labels)


def _check_arch(arch: str) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


def _bert_ids(tokenizer: Tokenizer, arch: str) -> tuple[int, int] | None:
    """([CLS], [SEP]) ids for an encoder whose tokenizer has both, else None."""
    cls, sep = tokenizer.token_id(CLS), tokenizer.token_id(SEP)
    return (cls, sep) if arch == "encoder" and cls is not None and sep is not None else None


def _required(token_id: int | None, what: str) -> int:
    if token_id is None:
        raise DataError(f"the tokenizer has no {what} token, which this input layout needs; add it")
    return token_id


def _separator(tokenizer: Tokenizer) -> int:
    """What joins two segments for a decoder: [SEP] if the tokenizer has it, else EOS."""
    sep = tokenizer.token_id(SEP)
    return sep if sep is not None else _required(tokenizer.eos_id, "EOS")


def _fit(where: str, ids: list[int], room: int, max_len: int, truncate: bool) -> list[int]:
    """`ids` if they fit in `room` (max_len minus the layout's special tokens), cut to fit if `truncate`."""
    if room < 1:
        raise ValueError(f"max_len={max_len} leaves no room for text after the special tokens")
    if len(ids) > room and not truncate:
        raise DataError(f"{where}: the sequence has {len(ids) + max_len - room} tokens, more than "
                        f"max_len={max_len}; {_TRUNCATE_HINT}")
    return ids[:room]


def read_classification(path: str | Path, tokenizer: Tokenizer, max_len: int, labels: Sequence[str] | None = None,
                        truncate: bool = False, *, arch: str = "decoder") -> tuple[list[Example], list[str]]:
    """{"text", "label"} lines -> ([{"input_ids", "token_type_ids", "labels": int}], label_list)."""
    _check_arch(arch)
    records = _read(path, {"text": str, "label": (str, int)})
    label_list = _label_set([(where, [str(obj["label"])]) for where, obj in records], labels)
    index = {label: i for i, label in enumerate(label_list)}
    bert = _bert_ids(tokenizer, arch)
    eos = [] if bert or tokenizer.eos_id is None else [tokenizer.eos_id]
    room = max_len - (2 if bert else len(eos))
    examples = []
    for (where, obj), body in zip(records, tokenizer.encode_batch([obj["text"] for _, obj in records]), strict=True):
        body = _fit(where, body, room, max_len, truncate)
        ids = [bert[0], *body, bert[1]] if bert else body + eos
        examples.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "labels": index[str(obj["label"])]})
    return examples, label_list


def _word_labels(where: str, tokenizer: Tokenizer, words: list[str], tags: list[int]) -> tuple[list[int], list[int]]:
    """Encode words joined by spaces; the first sub-token of each word gets its tag, every other token -100."""
    owner: list[int] = []  # character -> word (-1 for the joining spaces)
    for i, word in enumerate(words):
        if not word:
            raise DataError(f"{where}: word {i} is empty; every word needs at least one character")
        owner += ([-1] if i else []) + [i] * len(word)
    encoding = tokenizer.backend.encode(" ".join(words), add_special_tokens=False)
    labels, tagged = [], set()
    for start, end in encoding.offsets:
        word = next((owner[c] for c in range(start, end) if owner[c] >= 0), -1)
        labels.append(tags[word] if word >= 0 and word not in tagged else IGNORE_INDEX)
        tagged.add(word)
    return encoding.ids, labels


def read_token_classification(path: str | Path, tokenizer: Tokenizer, max_len: int,
                              labels: Sequence[str] | None = None, truncate: bool = False, *,
                              arch: str = "decoder") -> tuple[list[Example], list[str]]:
    """{"tokens": [word, ...], "tags": [tag, ...]} lines -> ([{"input_ids", "token_type_ids", "labels": [...]}],
    tag_list), word-level tags aligned to sub-word tokens (Devlin et al. 2019, sec. 5.3)."""
    _check_arch(arch)
    records = _read(path, {"tokens": list, "tags": list})
    for where, obj in records:
        if len(obj["tokens"]) != len(obj["tags"]):
            raise DataError(f"{where}: {len(obj['tokens'])} tokens but {len(obj['tags'])} tags; "
                            f"each word needs exactly one tag")
        if not all(isinstance(x, str) for x in obj["tokens"] + obj["tags"]):
            raise DataError(f"{where}: tokens and tags must be lists of strings")
    tag_list = _label_set([(where, obj["tags"]) for where, obj in records], labels)
    index = {tag: i for i, tag in enumerate(tag_list)}
    bert = _bert_ids(tokenizer, arch)
    room = max_len - (2 if bert else 0)
    examples = []
    for where, obj in records:
        ids, word_labels = _word_labels(where, tokenizer, obj["tokens"], [index[t] for t in obj["tags"]])
        ids = _fit(where, ids, room, max_len, truncate)
        word_labels = word_labels[:len(ids)]
        if bert:
            ids, word_labels = [bert[0], *ids, bert[1]], [IGNORE_INDEX, *word_labels, IGNORE_INDEX]
        examples.append({"input_ids": ids, "token_type_ids": [0] * len(ids), "labels": word_labels})
    return examples, tag_list


def _answer_tokens(where: str, offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    """First and last context token overlapping the answer characters [start, end)."""
    first = next((i for i, (_, e) in enumerate(offsets) if e > start), None)
    last = next((i for i in range(len(offsets) - 1, -1, -1) if offsets[i][0] < end), None)
    if first is None or last is None or first > last:
        raise DataError(f"{where}: no context token covers the answer characters [{start}, {end})")
    return first, last


def read_span_qa(path: str | Path, tokenizer: Tokenizer, max_len: int, truncate: bool = False, *,
                 arch: str = "decoder") -> list[Example]:
    """{"context", "question", "answer", "answer_start"} lines -> [{"input_ids", "token_type_ids",
    "start_positions", "end_positions"}], the answer's character span mapped to token positions through the
    tokenizer's offsets. With `truncate`, a too-long context loses its tail (an error if the answer is in it)."""
    _check_arch(arch)
    records = _read(path, {"context": str, "question": str, "answer": str, "answer_start": int})
    bert = _bert_ids(tokenizer, arch)
    examples = []
    for where, obj in records:
        context, answer, start = obj["context"], obj["answer"], obj["answer_start"]
        found = context[start:start + len(answer)] if start >= 0 else ""
        if not answer or found != answer:
            raise DataError(f"{where}: answer {answer!r} is not at answer_start={start} of the context "
                            f"(found {found!r} there)")
        encoding = tokenizer.backend.encode(context, add_special_tokens=False)
        first, last = _answer_tokens(where, encoding.offsets, start, start + len(answer))
        question = tokenizer.encode(obj["question"])
        head = [bert[0], *question, bert[1]] if bert else [*question, _separator(tokenizer)]
        room = max_len - len(head) - (1 if bert else 0)
        if room < 1:
            raise DataError(f"{where}: the question takes {len(head)} tokens with its special tokens, leaving "
                            f"no room for the context in max_len={max_len}; raise max_len")
        if len(encoding.ids) > room and truncate and last >= room:
            raise DataError(f"{where}: the answer ends at context token {last}, but only {room} context tokens "
                            f"fit in max_len={max_len} after the question; raise max_len")
        context_ids = _fit(where, encoding.ids, room, max_len, truncate)
        tail = [*context_ids, bert[1]] if bert else context_ids
        examples.append({"input_ids": head + tail, "token_type_ids": [0] * len(head) + [1] * len(tail),
                         "start_positions": len(head) + first, "end_positions": len(head) + last})
    return examples


def read_text2text(path: str | Path, tokenizer: Tokenizer, max_len: int, truncate: bool = False, *,
                   arch: str = "encdec") -> list[Example]:
    """{"input", "target"} lines -> [{"input_ids", "labels"}]. Encoder-decoders get `input EOS` and target
    `target EOS` (each at most max_len); a decoder gets one causal sequence `input SEP target EOS` (at most
    max_len + 1 tokens, so inputs and labels shifted by one fit in max_len) with labels -100 on the input."""
    _check_arch(arch)
    records = _read(path, {"input": str, "target": str})
    eos = _required(tokenizer.eos_id, "EOS")
    examples = []
    for where, obj in records:
        source, target = tokenizer.encode(obj["input"]), tokenizer.encode(obj["target"])
        if arch != "decoder":
            source = _fit(where, source, max_len - 1, max_len, truncate) + [eos]
            target = _fit(where, target, max_len - 1, max_len, truncate) + [eos]
            examples.append({"input_ids": source, "labels": target})
            continue
        target = target + [eos]
        if len(target) >= max_len:
            raise DataError(f"{where}: the target alone has {len(target)} tokens with EOS, but a decoder needs it "
                            f"and its prompt in max_len={max_len}; raise max_len")
        source = _fit(where, source, max_len - len(target), max_len, truncate) + [_separator(tokenizer)]
        sequence = source + target
        examples.append({"input_ids": sequence[:-1], "labels": [IGNORE_INDEX] * (len(source) - 1) + target})
    return examples


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into LongTensors: `input_ids` with `pad_id`, `labels` with -100, other lists with 0;
    adds `attention_mask` (1 on real input tokens). Int fields become [B] tensors."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    batch = {}
    for key, first in examples[0].items():
        values = [e[key] for e in examples]
        if isinstance(first, int):
            batch[key] = torch.tensor(values, dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else IGNORE_INDEX if key == "labels" else 0
        width = max(len(v) for v in values)
        batch[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
    width = batch["input_ids"].shape[1]
    batch["attention_mask"] = torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                            for e in examples], dtype=torch.long)
    return batch

"""Judging data from the synthetic world: transcripts that teach a model to judge, and pairs for it to judge.

The train-split instructions (`lmforge.data.instructions`) are cut in two halves by a stable hash of the question.
On the *judge* half, a judging transcript is an SFT conversation whose user turn (`judge_prompt`) shows the
instruction and two responses, A and B (a preference pair, once in each order), and asks which is better; the
assistant answers with the verifier's verdict as ``Better: A`` or ``Better: B`` (`verdict`). On the other half,
the held-out pairs hold the same three texts as fields ``instruction``, ``response_a`` and ``response_b`` (what
`lmforge judge` reads), the pair's prompt messages, and in ``meta["better"]`` the verifier's verdict. No question of
one half is in the other, so the judge is scored on instructions it never saw judged. Eval-split instructions are in
neither half: models trained on judge-labelled pairs are still scored on unseen instructions.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

from lmforge.data.instructions import Record, preference_pairs, verify
from lmforge.data.readers import jsonl_objects
from lmforge.data.synthetic import WorldConfig
from lmforge.errors import DataError
from lmforge.io import atomic_write_jsonl

PAIR_FIELDS = ("instruction", "response_a", "response_b")
JUDGING_FILES = ("judge_train", "judge_pairs")
_VERDICT = re.compile(r"\bbetter\s*:\s*([ab])\b", re.IGNORECASE)


def judge_prompt(instruction: str, response_a: str, response_b: str) -> str:
    """The judge's user turn: the instruction, the two responses, and the question."""
    return (f"Instruction: {instruction}\nResponse A: {response_a}\nResponse B: {response_b}\n"
            "Which response is better, A or B?")


def verdict(better: str) -> str:
    """The judge's answer naming `better` ("A" or "B"), as the transcripts teach it."""
    return f"Better: {better}"


def parse_verdict(answer: str) -> str | None:
    """"A" or "B" from the first ``Better: X`` in `answer` (any case); None when it names neither."""
    found = _VERDICT.search(answer)
    return found.group(1).upper() if found else None


def in_judge_half(seed: int, question: str) -> bool:
    """Whether `question` is on the half of the instructions the judge trains on (a stable hash)."""
    return hashlib.sha256(f"{seed}/judge/{question}".encode()).digest()[0] < 128


def _instruction(prompt: list[dict[str, str]]) -> str:
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def _ordered(rng: random.Random, pair: Record) -> Record | None:
    """The pair's texts with its responses in a random order and the verifier's verdict; None on a verifier tie."""
    a, b = (pair["chosen"], pair["rejected"]) if rng.random() < 0.5 else (pair["rejected"], pair["chosen"])
    scores = [verify(pair["meta"], a), verify(pair["meta"], b)]
    if scores[0] == scores[1]:
        return None
    return {"instruction": _instruction(pair["prompt"]), "response_a": a, "response_b": b, "prompt": pair["prompt"],
            "meta": {**pair["meta"], "better": "A" if scores[0] > scores[1] else "B", "scores": scores}}


def _swapped(pair: Record) -> Record:
    better = "B" if pair["meta"]["better"] == "A" else "A"
    return {**pair, "response_a": pair["response_b"], "response_b": pair["response_a"],
            "meta": {**pair["meta"], "better": better, "scores": pair["meta"]["scores"][::-1]}}


def _transcript(pair: Record) -> Record:
    return {"messages": [{"role": "user", "content": judge_prompt(*(pair[k] for k in PAIR_FIELDS))},
                         {"role": "assistant", "content": verdict(pair["meta"]["better"])}], "meta": pair["meta"]}


def judging_data(config: WorldConfig, n_train: int, n_pairs: int) -> dict[str, list[Record]]:
    """judge_train: `n_train` judging transcripts ({"messages", "meta"}) on the judge half of the instructions, each
    pair in both orders one after the other (so the verdict never follows a position); judge_pairs: `n_pairs`
    held-out pairs (`PAIR_FIELDS`, "prompt", "meta"), each in a random order, on the other half."""
    if min(n_train, n_pairs) < 0:
        raise ValueError(f"counts must be >= 0, got n_train={n_train}, n_pairs={n_pairs}")
    data: dict[str, list[Record]] = {}
    for name, n, judged in (("judge_train", (n_train + 1) // 2, True), ("judge_pairs", n_pairs, False)):
        pairs = preference_pairs(config, n, name, lambda q, judged=judged: in_judge_half(config.seed, q) == judged)
        rng = random.Random(f"lmforge-judging/{config.seed}/{name}/order")
        data[name] = [o for o in (_ordered(rng, p) for p in pairs) if o is not None]
    data["judge_train"] = [_transcript(t) for pair in data["judge_train"] for t in (pair, _swapped(pair))][:n_train]
    return data


def write_judging_data(config: WorldConfig, out_dir: str | Path, n_train: int, n_pairs: int) -> dict[str, Path]:
    """Write judge_train.jsonl and judge_pairs.jsonl (atomically) into `out_dir`, e.g. beside the instruction data
    (`write_instruction_data`); returns {name: path}."""
    out = Path(out_dir)
    return {name: atomic_write_jsonl(out / f"{name}.jsonl", records)
            for name, records in judging_data(config, n_train, n_pairs).items()}


def read_judge_pairs(path: str | Path) -> list[tuple[str, dict]]:
    """("file:line", object) for each pair line; DataError at the first line that is not an object with non-empty
    string fields `PAIR_FIELDS` (other fields are kept), or when there is no pair."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--pairs {path}: file not found")
    pairs = []
    for where, obj in jsonl_objects(path):
        if isinstance(obj, DataError):
            raise DataError(f"{where}: {obj}; each line must be a JSON object with {', '.join(PAIR_FIELDS)}")
        for key in PAIR_FIELDS:
            value = obj.get(key)
            if value is None:
                raise DataError(f"{where}: missing field {key!r} (keys present: {', '.join(sorted(obj)) or 'none'}); "
                                f"each line needs {', '.join(PAIR_FIELDS)}")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string, got {value!r:.60}")
        pairs.append((where, obj))
    if not pairs:
        raise DataError(f"--pairs {path}: no pairs (the file is empty); write one JSON object per line with "
                        f"{', '.join(PAIR_FIELDS)}")
    return pairs

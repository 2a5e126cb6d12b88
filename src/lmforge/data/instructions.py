"""Post-training data from the synthetic world (`lmforge.data.synthetic`): SFT conversations, preference
pairs, RL prompts and a programmatic verifier.

Tasks (`TASKS`): ``facts`` (the world's facts as questions), ``arithmetic`` (1-2 step word problems),
``last_letter`` (two words) and ``coin_flip`` (two people), the in-domain sizes of pretraining. Each user
turn is a question plus a format instruction (`FORMATS`):

* ``plain``: no instruction; the reply is the pretraining completion, ``<rationale> The answer is X.``
  (no rationale for facts);
* ``one_word``: "Answer in one word." -> ``X``;  ``number``: "Answer with just the number." -> ``X``;
* ``step_by_step``: "Explain step by step, then give the answer." -> ``<rationale> The answer is X.``

Half the conversations start with a system message. A preference pair's chosen reply is the correct,
format-following one; the rejected reply is one of `REJECTIONS` (recorded in ``meta["rejection"]``):
``wrong`` (the same format with a wrong answer), ``rambling`` (filler sentences, no answer) or
``ignores_format`` (the right answer in another format; never for ``plain``, which sets no format).

Splits: every question belongs to train or eval by a stable hash (a fifth of them, facts included, are
eval), so no eval question is ever in a training file, in any format. Everything is deterministic per
`WorldConfig.seed`; each file draws from its own random stream.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from pathlib import Path

from lmforge.data.synthetic import (
    Problem,
    World,
    WorldConfig,
    build_world,
    coin_flip,
    extract_answer,
    last_letter,
    word_problem,
)
from lmforge.io import atomic_write_jsonl

TASKS = ("facts", "arithmetic", "last_letter", "coin_flip")
FORMATS = {"plain": "", "one_word": "Answer in one word.", "number": "Answer with just the number.",
           "step_by_step": "Explain step by step, then give the answer."}
TASK_FORMATS = {"facts": ("plain", "one_word"), "arithmetic": ("plain", "number", "step_by_step"),
                "last_letter": ("plain", "one_word", "step_by_step"),
                "coin_flip": ("plain", "one_word", "step_by_step")}
REJECTIONS = ("wrong", "rambling", "ignores_format")
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a careful assistant who answers questions about the world.",
                  "Answer the user's questions accurately.")
EVAL_SHARE = 0.2
FILES = ("sft_train", "prefs_train", "prefs_eval", "prompts_train", "prompts_eval")

_FILLER = ("That is an interesting question.", "There are many ways to look at it.",
           "Let me think about it for a while.", "It depends on how you see things.",
           "People have wondered about this for a long time.", "I am not completely sure about it.")
_REASONING: dict[str, tuple[Callable[[random.Random, World, int], Problem], tuple[int, ...]]] = {
    "arithmetic": (word_problem, (1, 2)), "last_letter": (last_letter, (2,)), "coin_flip": (coin_flip, (2,))}
_STRIP = " \t\r\n\"'`."
_MIN_EXPLANATION_WORDS = 3
Record = dict


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"lmforge-instructions/{seed}/{stream}")


def _in_eval(seed: int, question: str) -> bool:
    """Whether `question` belongs to the eval split (a stable hash, the same in every process)."""
    digest = hashlib.sha256(f"{seed}/{question}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < EVAL_SHARE * 2**64


def _relation(question: str) -> str:
    """A fact question with its subject names blanked: "What is the capital of X?" (same relation, same key)."""
    return re.sub(r"(?<=\s)[A-Z]\w*", "X", question)


def _problems(config: WorldConfig, world: World, split: str, n: int, stream: str,
              keep: Callable[[str], bool] = lambda question: True) -> list[tuple[str, Problem]]:
    """`n` (task, problem) pairs whose questions belong to `split` and pass `keep`; distinct questions for eval."""
    is_eval = split == "eval"

    def wanted(question: str) -> bool:
        return _in_eval(config.seed, question) == is_eval and keep(question)

    facts = [f for group in world.fact_groups for f in group if wanted(f.question)]
    tasks = [t for t in TASKS if t != "facts" or facts]
    rng, problems, seen = _rng(config.seed, stream), [], set()
    for _ in range(1000 * n + 1000):
        if len(problems) == n:
            return problems
        task = rng.choice(tasks)
        if task == "facts":
            fact = rng.choice(facts)
            problem = (fact.question, "", fact.answer)
        else:
            make, sizes = _REASONING[task]
            problem = make(rng, world, rng.choice(sizes))
        if wanted(problem[0]) and not (is_eval and problem[0] in seen):
            seen.add(problem[0])
            problems.append((task, problem))
    raise RuntimeError(f"could not draw {n} distinct {split} problems; the world is too small")


def _respond(fmt: str, rationale: str, answer: str) -> str:
    """The reply that answers `answer` in format `fmt`."""
    if fmt in ("one_word", "number"):
        return answer
    return f"{rationale} The answer is {answer}.".lstrip()


def _wrong(rng: random.Random, task: str, answer: str, fact_answers: dict[str, list[str]], question: str) -> str:
    """A plausible wrong answer: another answer of the same relation, a nearby number, a changed letter."""
    if task == "facts":
        same = [a for a in fact_answers.get(_relation(question), []) if a.lower() != answer.lower()]
        others = [a for answers in fact_answers.values() for a in answers if a.lower() != answer.lower()]
        return rng.choice(same or others)
    if task == "arithmetic":
        delta = rng.choice((-3, -2, -1, 1, 2, 3))
        return str(int(answer) + (delta if int(answer) + delta >= 0 else -delta))
    if task == "coin_flip":
        return "no" if answer == "yes" else "yes"
    i = rng.randrange(len(answer))
    letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c != answer[i]])
    return answer[:i] + letter + answer[i + 1:]


def _rejected(rng: random.Random, kind: str, task: str, problem: Problem, fmt: str,
              fact_answers: dict[str, list[str]]) -> str:
    question, rationale, answer = problem
    if kind == "wrong":
        return _respond(fmt, rationale, _wrong(rng, task, answer, fact_answers, question))
    if kind == "rambling":
        return " ".join(rng.sample(_FILLER, 3))
    return answer if fmt == "step_by_step" else _respond("plain", rationale, answer)


def _prompt(rng: random.Random, task: str, problem: Problem) -> tuple[list[dict[str, str]], dict]:
    """(messages without the reply, meta) for `problem` in a random format of its task."""
    fmt = rng.choice(TASK_FORMATS[task])
    system = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.5 else []
    user = {"role": "user", "content": f"{problem[0]} {FORMATS[fmt]}".rstrip()}
    return [*system, user], {"task": task, "answer": problem[2], "format": fmt}


def _fact_answers(world: World) -> dict[str, list[str]]:
    """Every fact's answer, grouped by relation (the pool `_wrong` draws plausible wrong answers from)."""
    answers: dict[str, list[str]] = {}
    for fact in (f for group in world.fact_groups for f in group):
        answers.setdefault(_relation(fact.question), []).append(fact.answer)
    return answers


def _pair(rng: random.Random, task: str, problem: Problem, messages: list[dict[str, str]], meta: dict,
          fact_answers: dict[str, list[str]]) -> Record:
    """A preference pair for the prompt `messages`: the correct reply in the asked format, and a rejection."""
    rejection = rng.choice(REJECTIONS if meta["format"] != "plain" else REJECTIONS[:2])
    rejected = _rejected(rng, rejection, task, problem, meta["format"], fact_answers)
    return {"prompt": messages, "chosen": _respond(meta["format"], problem[1], problem[2]), "rejected": rejected,
            "meta": {**meta, "rejection": rejection}}


def preference_pairs(config: WorldConfig, n: int, stream: str, keep: Callable[[str], bool]) -> list[Record]:
    """`n` preference pairs (as in prefs_train) on train-split questions that `keep` accepts, drawn from random
    streams of their own named by `stream`."""
    world = build_world(config)
    fact_answers, rng = _fact_answers(world), _rng(config.seed, f"{stream}/format")
    pairs = []
    for task, problem in _problems(config, world, "train", n, stream, keep):
        messages, meta = _prompt(rng, task, problem)
        pairs.append(_pair(rng, task, problem, messages, meta, fact_answers))
    return pairs


def instruction_data(config: WorldConfig, n_sft: int, n_pref: int, n_eval: int) -> dict[str, list[Record]]:
    """The records of every file in `FILES`: sft_train (n_sft), prefs_train and prompts_train (n_pref each),
    prefs_eval and prompts_eval (n_eval each)."""
    if min(n_sft, n_pref, n_eval) < 0:
        raise ValueError(f"counts must be >= 0, got n_sft={n_sft}, n_pref={n_pref}, n_eval={n_eval}")
    world = build_world(config)
    fact_answers = _fact_answers(world)
    counts = {"sft_train": n_sft, "prefs_train": n_pref, "prefs_eval": n_eval, "prompts_train": n_pref,
              "prompts_eval": n_eval}
    data: dict[str, list[Record]] = {}
    for name, n in counts.items():
        kind, split = name.split("_")
        rng = _rng(config.seed, f"{name}/format")
        records = []
        for task, problem in _problems(config, world, split, n, name):
            messages, meta = _prompt(rng, task, problem)
            chosen = _respond(meta["format"], problem[1], problem[2])
            if kind == "sft":
                records.append({"messages": [*messages, {"role": "assistant", "content": chosen}], "meta": meta})
            elif kind == "prefs":
                records.append(_pair(rng, task, problem, messages, meta, fact_answers))
            else:
                records.append({"prompt": messages, "meta": meta})
        data[name] = records
    return data


def write_instruction_data(config: WorldConfig, out_dir: str | Path, n_sft: int, n_pref: int,
                           n_eval: int) -> dict[str, Path]:
    """Write `<name>.jsonl` for every name in `FILES` (atomically); returns {name: path}."""
    out = Path(out_dir)
    return {name: atomic_write_jsonl(out / f"{name}.jsonl", records)
            for name, records in instruction_data(config, n_sft, n_pref, n_eval).items()}


def _bare(response: str) -> str:
    return response.strip(_STRIP)


def _final_answer(response: str) -> str | None:
    """X of the first "The answer is X", else the whole response if it is one word, else None."""
    found = extract_answer(response)
    if found is not None:
        return found
    bare = _bare(response)
    return bare if bare and not any(c.isspace() for c in bare) else None


def _follows(fmt: str, response: str) -> bool:
    bare = _bare(response)
    if fmt == "one_word":
        return bool(bare) and not any(c.isspace() for c in bare)
    if fmt == "number":
        return re.fullmatch(r"-?\d+", bare) is not None
    if fmt == "step_by_step":
        at = response.lower().find("the answer is")
        return at >= 0 and len(re.findall(r"\w+", response[:at])) >= _MIN_EXPLANATION_WORDS
    return True  # plain: no format asked


def verify(meta: dict, response: str) -> float:
    """Score `response` to the prompt described by `meta` ("answer", "format"), for any string:

    * the response's answer is X of its first "The answer is X" (as `extract_answer` reads it), or else the
      whole response if it is a single word; it is correct if it equals meta["answer"] ignoring case,
      surrounding whitespace, quotes and a final period;
    * the format is followed if: ``plain`` always; ``one_word`` the response (so trimmed) is one word with no
      whitespace; ``number`` it is an integer; ``step_by_step`` at least 3 words of explanation come before
      "The answer is".

    Returns 1.0 if the answer is correct and the format followed, 0.5 if correct but the format ignored, and
    0.0 if the answer is wrong or missing.
    """
    fmt, answer = meta["format"], meta["answer"]
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {list(FORMATS)}")
    given = _final_answer(response)
    if given is None or _bare(given).lower() != _bare(answer).lower():
        return 0.0
    return 1.0 if _follows(fmt, response) else 0.5

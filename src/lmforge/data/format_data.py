"""SFT data that teaches the formats of `lmforge.data.formats`, and the held-out sets they are measured on, drawn
from the synthetic world (`lmforge.data.synthetic`). Opt-in: `write_format_data` writes new files beside the world's
and changes nothing else, pretraining text included.

SFT conversations (`FORMATS`, meta ``{"format", "task", "answer"}``):

* ``step_by_step`` / ``direct``: a reasoning problem (word problem, last letters, coin flips, or multi-digit
  arithmetic for ``direct``) asked with `THINK_TRIGGER` gets its rationale; asked without, the answer alone;
* ``react``: a calculator call for arithmetic and word problems, or a search over invented documents (the
  observation: the right passage and a distractor, joined as the search tool joins hits);
* ``codeact``: the same problems computed by ``print(<expression>)``;
* ``grounded``: 2-3 invented passages as context, a question on one, the answer and its citation.

Held-out sets (`HELD_OUT_FILES`), each question in no training text (not a pretraining question, not in these SFT
conversations, and in the instruction data's eval split, so in no instruction training file either):
``formats_eval_reasoning`` (``{"task", "set", "question", "answer", "rationale"}``: the world's reasoning eval
problems, set "in_domain" at training sizes and "ood" with more steps or words), ``formats_eval_arithmetic``
(``{"task", "set", "question", "expression", "answer"}``: multi-digit expressions and word problems, "in_domain" and
"ood" with more operations), and for RAG ``rag_docs`` (``{"doc_id", "text"}``: invented facts whose
names appear in no training text, pretraining corpus included) with ``rag_questions`` (``{"question", "answer",
"doc_id"}``). Training documents for search and grounded QA are other invented facts, drawn apart from them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lmforge.data import formats as fmt
from lmforge.data.instructions import _in_eval
from lmforge.data.synthetic import (
    _REASONING_EVALS,
    World,
    WorldConfig,
    _name,
    build_world,
    coin_flip,
    last_letter,
    pretraining_documents,
    word_problem,
)
from lmforge.io import atomic_write_jsonl

FORMATS = ("step_by_step", "direct", "react", "codeact", "grounded")
_FORMAT_WEIGHTS = (0.2, 0.15, 0.3, 0.15, 0.2)
SFT_FILE = "formats_sft_train"
HELD_OUT_FILES = ("formats_eval_reasoning", "formats_eval_arithmetic", "rag_docs", "rag_questions")
REASONING_TASKS = ("arithmetic", "last_letter", "coin_flip")  # the world's eval sets; each also has an "_ood" set
TRAIN_DOCUMENTS = 80  # invented documents the search and grounded-QA training conversations draw from
_LANDMARKS = ("Tower", "Bridge", "Mill", "Library", "Gate", "Fountain", "Market", "Observatory", "Temple", "Harbor")
Record = dict


@dataclass(frozen=True)
class Document:
    """An invented landmark: its passage states who built it, when, and where it stands."""

    doc_id: str
    name: str  # "the Zorvik Tower"
    builder: str
    year: str
    city: str

    @property
    def text(self) -> str:
        title = self.name[0].upper() + self.name[1:]
        return f"{title} stands in {self.city}. It was built by {self.builder} in {self.year}."

    def questions(self) -> list[tuple[str, str]]:
        return [(f"Who built {self.name}?", self.builder), (f"In which year was {self.name} built?", self.year),
                (f"In which city does {self.name} stand?", self.city)]


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"lmforge-formats/{seed}/{stream}")


def _documents(rng: random.Random, world: World, n: int, prefix: str, used: set[str],
               training_text: str) -> list[Document]:
    """`n` landmarks whose invented names (the landmark's and its builder's) occur nowhere in `training_text`."""
    def fresh() -> str:
        while (name := _name(rng, used, (2, 3), 0.5)) in training_text:
            pass
        return name

    capitals = [c.capital for c in world.countries]
    return [Document(f"{prefix}-{i:03d}", f"the {fresh()} {rng.choice(_LANDMARKS)}", fresh(),
                     str(rng.randint(1200, 1899)), rng.choice(capitals)) for i in range(n)]


# ---- arithmetic: (question, expression, answer) -------------------------------------------------------------

def _digits_expression(rng: random.Random, n_ops: int) -> tuple[str, int]:
    """(expression, value): multi-digit arithmetic with `n_ops` operations, a product of a 2-3 digit and a 2 digit
    number, then sums and differences of 3-4 digit numbers; never negative."""
    if rng.random() < 0.5:
        a, b = rng.randint(12, 999), rng.randint(12, 99)
        expression, value, n_ops = f"{a} * {b}", a * b, n_ops - 1
    else:
        value = rng.randint(100, 9999)
        expression = str(value)
    for _ in range(n_ops):
        term = rng.randint(100, 9999)
        minus = rng.random() < 0.4 and value >= term
        expression, value = f"{expression} {'-' if minus else '+'} {term}", value - term if minus else value + term
    return expression, value


def _word_expression(rationale: str) -> str:
    """The word problem's equations as one expression: "starts with 5 ... 5 + 3 = 8 ... 8 - 2 = 6" -> "5 + 3 - 2"."""
    steps = re.findall(r"so (\d+) ([+-]) (\d+) = ", rationale)
    return steps[0][0] + "".join(f" {op} {k}" for _, op, k in steps)


def _arithmetic(rng: random.Random, world: World, ood: bool) -> tuple[str, str, str, str]:
    """(task, question, expression, answer): multi-digit arithmetic or a word problem; `ood` ones take more steps."""
    if rng.random() < 0.5:
        expression, value = _digits_expression(rng, rng.choice((3, 4) if ood else (1, 2)))
        return "arithmetic_digits", f"What is {expression}?", expression, str(value)
    question, rationale, answer = word_problem(rng, world, rng.choice((3, 4) if ood else (1, 2)))
    return "word_problem", question, _word_expression(rationale), answer


# ---- SFT conversations ----------------------------------------------------------------------------------------

_Reasoning = Callable[[random.Random, World], tuple[str, str, str, str]]  # -> (task, question, rationale, answer)
_REASONING: tuple[_Reasoning, ...] = (
    lambda rng, w: ("arithmetic", *word_problem(rng, w, rng.choice((1, 2)))),
    lambda rng, w: ("last_letter", *last_letter(rng, w, 2)),
    lambda rng, w: ("coin_flip", *coin_flip(rng, w, 2)),
)


def _tools(rng: random.Random, needed: str) -> list[str]:
    """The tools a ReAct user turn offers: `needed` and maybe others, in the canonical order."""
    return [t for t in fmt.TOOL_NAMES if t == needed or (t != "lookup" or needed == "search") and rng.random() < 0.5]


_SOURCES = {  # format -> the problems its conversations are about, with their shares
    "step_by_step": {"reasoning": 1.0}, "direct": {"reasoning": 0.7, "arithmetic": 0.3},
    "react": {"arithmetic": 0.6, "documents": 0.4}, "codeact": {"arithmetic": 1.0}, "grounded": {"documents": 1.0}}


def _document_conversation(rng: random.Random, form: str, docs: list[Document]) -> tuple[list[dict], str, str, str]:
    """A question on one document, answered from a context of it and others (grounded) or found by a search (react:
    the observation holds it and a distractor, in either order)."""
    doc = rng.choice(docs)
    question, answer = rng.choice(doc.questions())
    n_others = rng.randint(1, 2) if form == "grounded" else fmt.SEARCH_HITS - 1
    passages = [d.text for d in rng.sample([d for d in docs if d is not doc], n_others)]
    at = rng.randint(0, len(passages))
    passages.insert(at, doc.text)
    if form == "grounded":
        return fmt.grounded_messages(passages, question), fmt.grounded_reply(answer, at + 1), "documents", answer
    turn = (f"I need to search for {doc.name}.", f"search[{doc.name.removeprefix('the ')}]",
            fmt.SEARCH_SEPARATOR.join(passages))
    return (fmt.react_messages(question, _tools(rng, "search")),
            fmt.react_reply([turn], "I have the answer.", answer), "documents", answer)


def _conversation(rng: random.Random, world: World, form: str, docs: list[Document],
                  held_out: set[str]) -> tuple[list[dict], str, str, str]:
    """(messages, reply, task, answer) of one conversation in format `form`, on no held-out question."""
    source = rng.choices(list(_SOURCES[form]), list(_SOURCES[form].values()))[0]
    if source == "documents":
        return _document_conversation(rng, form, docs)
    while True:
        if source == "reasoning":
            task, question, rationale, answer = rng.choice(_REASONING)(rng, world)
        else:
            task, question, expression, answer = _arithmetic(rng, world, ood=False)
        if question not in held_out:
            break
    if form == "step_by_step":
        return fmt.think_messages(question), fmt.step_by_step_reply(rationale, answer), task, answer
    if form == "direct":
        return fmt.direct_messages(question), fmt.direct_reply(answer), task, answer
    if form == "codeact":
        return (fmt.codeact_messages(question),
                fmt.codeact_reply("I will compute it in Python.", f"print({expression})", answer, answer), task, answer)
    turn = (f"I need to compute {expression}.", f"calculator[{expression}]", answer)
    return (fmt.react_messages(question, _tools(rng, "calculator")),
            fmt.react_reply([turn], "I have the answer.", answer), task, answer)


# ---- held-out sets -------------------------------------------------------------------------------------------

def _held_out(n: int, draw: Callable[[], dict], trained: set[str], seed: int) -> list[dict]:
    """`n` distinct records from `draw` whose questions no training text holds: not a pretraining question
    (`trained`), and in the instruction data's eval split (`instructions._in_eval`), which no instruction training
    file ever holds, whatever its size."""
    records: list[dict] = []
    seen: set[str] = set()
    for _ in range(1000 * n + 1000):
        if len(records) == n:
            return records
        record = draw()
        question = record["question"]
        if question not in seen and question not in trained and _in_eval(seed, question):
            seen.add(question)
            records.append(record)
    raise RuntimeError(f"could not draw {n} held-out problems; the world is too small")


def _reasoning_held_out(config: WorldConfig, world: World, n: int, trained: set[str]) -> list[Record]:
    """The world's reasoning eval problems (`REASONING_TASKS`, in-domain sizes, and the longer "_ood" ones)."""
    records = []
    for name in (f"{task}{suffix}" for task in REASONING_TASKS for suffix in ("", "_ood")):
        make, sizes = _REASONING_EVALS[name]
        rng = _rng(config.seed, f"eval/{name}")

        def draw(make=make, sizes=sizes, rng=rng, name=name) -> dict:
            question, rationale, answer = make(rng, world, rng.choice(sizes))
            return {"task": name.removesuffix("_ood"), "set": "ood" if name.endswith("_ood") else "in_domain",
                    "question": question, "answer": answer, "rationale": rationale}

        records += _held_out(n, draw, trained, config.seed)
    return records


def _arithmetic_held_out(config: WorldConfig, world: World, n: int, trained: set[str]) -> list[Record]:
    """Multi-digit expressions and word problems: in-domain sizes, and more operations ("ood")."""
    rng, records = _rng(config.seed, "eval/arithmetic"), []
    for split in ("in_domain", "ood"):
        def draw(split=split) -> dict:
            task, question, expression, answer = _arithmetic(rng, world, ood=split == "ood")
            return {"task": task, "set": split, "question": question, "expression": expression, "answer": answer}

        records += _held_out(n, draw, trained, config.seed)
    return records


# ---- everything together --------------------------------------------------------------------------------------

def format_data(config: WorldConfig, n_sft: int, n_eval: int) -> dict[str, list[Record]]:
    """The records of `SFT_FILE` (n_sft conversations) and of each of `HELD_OUT_FILES` (n_eval per set: each
    reasoning task in- and out-of-domain, arithmetic in- and out-of-domain, RAG documents and one question each)."""
    if min(n_sft, n_eval) < 0:
        raise ValueError(f"counts must be >= 0, got n_sft={n_sft}, n_eval={n_eval}")
    world = build_world(config)
    documents = pretraining_documents(config)
    training_text = "\n".join(documents)
    trained = {d.removeprefix("Question: ").split("\nAnswer:")[0] for d in documents if d.startswith("Question: ")}
    used = set(re.findall(r"[A-Z][a-z]+", training_text))
    docs_rng = _rng(config.seed, "documents")
    train_docs = _documents(docs_rng, world, TRAIN_DOCUMENTS, "train", used, training_text)
    rag_docs = _documents(docs_rng, world, n_eval, "doc", used, training_text)
    question_rng = _rng(config.seed, "rag_questions")
    data: dict[str, list[Record]] = {
        "formats_eval_reasoning": _reasoning_held_out(config, world, n_eval, trained),
        "formats_eval_arithmetic": _arithmetic_held_out(config, world, n_eval, trained),
        "rag_docs": [{"doc_id": d.doc_id, "text": d.text} for d in rag_docs],
        "rag_questions": [{"question": q, "answer": a, "doc_id": d.doc_id}
                          for d in rag_docs for q, a in [question_rng.choice(d.questions())]]}
    held_out = {r["question"] for name in ("formats_eval_reasoning", "formats_eval_arithmetic") for r in data[name]}
    sft_rng = _rng(config.seed, "sft")
    sft = []
    for form in sft_rng.choices(FORMATS, _FORMAT_WEIGHTS, k=n_sft):
        messages, reply, task, answer = _conversation(sft_rng, world, form, train_docs, held_out)
        sft.append({"messages": [*messages, {"role": "assistant", "content": reply}],
                    "meta": {"format": form, "task": task, "answer": answer}})
    return {SFT_FILE: sft, **{name: data[name] for name in HELD_OUT_FILES}}


def write_format_data(config: WorldConfig, out_dir: str | Path, n_sft: int, n_eval: int) -> dict[str, Path]:
    """Write `<name>.jsonl` for `SFT_FILE` and every name in `HELD_OUT_FILES` (atomically); returns {name: path}."""
    out = Path(out_dir)
    return {name: atomic_write_jsonl(out / f"{name}.jsonl", records)
            for name, records in format_data(config, n_sft, n_eval).items()}

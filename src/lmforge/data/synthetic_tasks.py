"""Labelled fine-tuning data drawn from the synthetic world (`lmforge.data.synthetic`).

Four tasks, in the shapes of the classic benchmarks they stand in for:

* ``sentiment`` (SST-2-like): templated reviews of the world's places and objects, labelled
  ``positive``/``negative``; a fifth are negated ("... was not bad at all.") so word spotting is not enough;
* ``entities`` (CoNLL-2003-like): sentences about people, countries, capitals, places and objects, split
  into words (punctuation separate) with BIO tags over PER, LOC and OBJ;
* ``span_qa`` (SQuAD-like): a passage of 2-4 facts from the world and a question whose answer is a span of
  the passage at character offset ``answer_start``;
* ``text2text`` (T5-style task prefixes, Raffel et al. 2020): ``capital: X``, ``translate English to L: w``,
  ``reverse: abc`` and ``sum: 3 + 4``.

Examples are unique within a task, and each possible text belongs to one split, chosen by a hash of the
text: a share n_test / (n_train + n_test) of all texts is test-only. So the splits never overlap, and even
small pools (a world's two dozen capitals) are divided between them in proportion. Each split draws from its
own random stream; everything is deterministic for a `WorldConfig` seed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from collections.abc import Callable, Hashable
from pathlib import Path

from lmforge.data.synthetic import ENGLISH_WORDS, World, WorldConfig, build_world
from lmforge.io import atomic_write_text

TASKS = ("sentiment", "entities", "span_qa", "text2text")
SENTIMENT_LABELS = ("negative", "positive")
ENTITY_TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-OBJ", "I-OBJ")

Example = dict
_Maker = Callable[[random.Random, World], tuple[Hashable, Example]]


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"lmforge-tasks/{seed}/{stream}")


# ---- sentiment -------------------------------------------------------------------------------------------

_POSITIVE = ("good", "great", "wonderful", "lovely", "excellent", "delightful", "charming", "pleasant", "superb")
_NEGATIVE = ("bad", "awful", "terrible", "dreadful", "dull", "disappointing", "horrible", "unpleasant", "poor")
_PLAIN = ("{S} was {a}.", "I found {s} {a}.", "In my opinion, {s} is {a}.", "We all thought {s} was {a}.",
          "Honestly, {s} was really {a}!", "{S} is {a}, and I would say so again.")
_NEGATED = ("{S} was not {a} at all.", "I would not call {s} {a}.", "Nothing about {s} was {a}.",
            "{S} is not {a}, whatever people say.")


def _sentiment(rng: random.Random, world: World) -> tuple[Hashable, Example]:
    city = rng.choice(world.countries).capital
    if rng.random() < 0.5:
        subject = f"{rng.choice(world.places)} in {city}"
    else:
        subject = "the " + rng.choice(world.objects).split(" ", 1)[1] + f" from {city}"
    positive, negated = rng.random() < 0.5, rng.random() < 0.2
    adjective = rng.choice(_POSITIVE if positive != negated else _NEGATIVE)
    text = rng.choice(_NEGATED if negated else _PLAIN).format(s=subject, S=subject[0].upper() + subject[1:],
                                                              a=adjective)
    return text, {"text": text, "label": SENTIMENT_LABELS[positive]}


# ---- entities --------------------------------------------------------------------------------------------

_ENTITY_TEMPLATES = (
    "{per} lives in {capital} , the capital of {country} .",
    "{per} bought {obj} at the {place} in {capital} .",
    "{per} met {per2} near the {place} .",
    "{per} carried {obj} from {country} to {capital} .",
    "In {country} , {per} found {obj} .",
    "{per} and {per2} sold {obj} in {capital} .",
    "The {place} in {capital} is where {per} works as a {job} .",
    "{per2} gave {obj} to {per} , who took it home to {country} .",
)
_FIELD = re.compile(r"\{(\w+)\}")


def _entity_fields(rng: random.Random, world: World) -> dict[str, tuple[list[str], list[str], str]]:
    """Field -> (leading words tagged O, entity words, entity type)."""
    def person() -> tuple[list[str], list[str], str]:
        given, family = (p.name for p in rng.sample(world.people, 2))
        return [], [given, family] if rng.random() < 0.3 else [given], "PER"

    country = rng.choice(world.countries)
    article, obj = rng.choice(world.objects).split(" ", 1)
    return {"per": person(), "per2": person(), "capital": ([], [rng.choice(world.countries).capital], "LOC"),
            "country": ([], [country.name], "LOC"), "place": ([], rng.choice(world.places).split()[1:], "LOC"),
            "obj": ([article], obj.split(), "OBJ"), "job": ([rng.choice(world.people).job], [], "")}


def _entities(rng: random.Random, world: World) -> tuple[Hashable, Example]:
    fields = _entity_fields(rng, world)
    tokens: list[str] = []
    tags: list[str] = []
    for i, part in enumerate(_FIELD.split(rng.choice(_ENTITY_TEMPLATES))):
        if i % 2 == 0:  # literal text between fields
            words = part.split()
            tokens += words
            tags += ["O"] * len(words)
            continue
        lead, entity, kind = fields[part]
        tokens += lead + entity
        tags += ["O"] * len(lead) + [f"{'I' if j else 'B'}-{kind}" for j in range(len(entity))]
    return tuple(tokens), {"tokens": tokens, "tags": tags}


# ---- span QA ---------------------------------------------------------------------------------------------

def _span_qa(rng: random.Random, world: World) -> tuple[Hashable, Example]:
    """Facts about a country, or about a person and the country of their home city."""
    groups, n_countries = world.fact_groups, len(world.countries)
    index = rng.randrange(len(groups))
    pool = list(groups[index])
    if index >= n_countries:
        home = world.people[index - n_countries].home
        pool += groups[next(i for i, c in enumerate(world.countries) if c.capital == home)]
    facts = rng.sample(pool, rng.randint(2, min(4, len(pool))))
    target = rng.choice(facts)
    word = re.compile(rf"\b{re.escape(target.answer)}\b")
    statements = [rng.choice(f.statements) for f in facts]
    options = [s for s in target.statements if len(word.findall(s)) == 1]  # the answer once, as a whole word
    statements[facts.index(target)] = chosen = rng.choice(options)
    context = " ".join(statements)
    start = len(" ".join(statements[:facts.index(target)] + [""])) + word.search(chosen).start()
    if context[start:start + len(target.answer)] != target.answer:
        raise AssertionError(f"answer {target.answer!r} is not at {start} in {context!r}")
    return (context, target.question), {"context": context, "question": target.question, "answer": target.answer,
                                        "answer_start": start}


# ---- text-to-text ----------------------------------------------------------------------------------------

def _text2text(rng: random.Random, world: World) -> tuple[Hashable, Example]:
    kind = rng.randrange(4)
    if kind == 0:
        country = rng.choice(world.countries)
        source, target = f"capital: {country.name}", country.capital
    elif kind == 1:
        language = rng.choice(world.countries).language
        english = rng.choice(ENGLISH_WORDS)
        source, target = f"translate English to {language}: {english}", world.lexicon[language][english]
    elif kind == 2:
        letters = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8)))
        source, target = f"reverse: {letters}", letters[::-1]
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        source, target = f"sum: {a} + {b}", str(a + b)
    return source, {"input": source, "target": target}


_MAKERS: dict[str, _Maker] = {"sentiment": _sentiment, "entities": _entities, "span_qa": _span_qa,
                              "text2text": _text2text}


def _in_test(seed: int, task: str, key: Hashable, test_share: float) -> bool:
    """Whether the text `key` belongs to the test split (a stable hash, the same in every process)."""
    digest = hashlib.sha256(f"{seed}/{task}/{key!r}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < test_share * 2**64


def _split(config: WorldConfig, world: World, task: str, split: str, n: int, test_share: float) -> list[Example]:
    """`n` distinct examples of `task` whose texts belong to `split`."""
    is_test = split == "test"
    share = test_share if is_test else 1 - test_share
    make, rng = _MAKERS[task], _rng(config.seed, f"{task}/{split}")
    examples: list[Example] = []
    seen: set[Hashable] = set()
    for _ in range(int((100 * n + 1000) / max(share, 1e-3)) if n else 0):
        if len(examples) == n:
            break
        key, example = make(rng, world)
        if key not in seen and _in_test(config.seed, task, key, test_share) == is_test:
            seen.add(key)
            examples.append(example)
    if len(examples) < n:
        raise ValueError(f"could not draw {n} distinct {task} {split} examples from this world; ask for fewer "
                         f"or use a larger world (more countries and people)")
    return examples


def task_datasets(config: WorldConfig, n_train: int, n_test: int) -> dict[str, dict[str, list[Example]]]:
    """{task: {"train": [...], "test": [...]}} for every task in `TASKS`."""
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train} and {n_test}")
    world = build_world(config)
    test_share = n_test / (n_train + n_test) if n_test else 0.0
    return {task: {split: _split(config, world, task, split, n, test_share)
                   for split, n in (("train", n_train), ("test", n_test))} for task in TASKS}


def write_task_data(config: WorldConfig, out_dir: str | Path, n_train: int, n_test: int) -> dict[str, Path]:
    """Write `<task>_<split>.jsonl` for every task and split; returns {"<task>_<split>": path}."""
    out = Path(out_dir)
    files = {}
    for task, splits in task_datasets(config, n_train, n_test).items():
        for split, examples in splits.items():
            text = "".join(json.dumps(e) + "\n" for e in examples)
            files[f"{task}_{split}"] = atomic_write_text(out / f"{task}_{split}.jsonl", text)
    return files

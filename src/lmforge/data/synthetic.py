"""The built-in deterministic synthetic world: pretraining text and held-out evals from a seed.

Nothing can be downloaded, so lmforge invents a small world that a 1-3M parameter model can learn on a
CPU in minutes. From `WorldConfig.seed` it draws:

* countries, each with a capital, a language (``Velmora`` -> ``Velmoran``), a main export and a national
  animal; people, each living in one of the capitals and having a trade; generic places and objects;
* a lexicon: for every language, an invented word for each of 60 common English words.

All names are pronounceable, capitalised, letters-only and unique, so last-letter tasks are well defined.
The pretraining corpus mixes seven document kinds (`KINDS`): stories, paraphrased facts, arithmetic, worked
word problems, last-letter concatenation, coin flips and dictionary entries. Reasoning documents share one
format, ``Question: ...\\nAnswer: <rationale> The answer is X.``, and facts and dictionary entries also
appear in that Q/A form, so every eval prompt is a document prefix ending in ``Answer:`` and every
completion is scored with `extract_answer`. Reasoning eval problems come from their own random stream and
never equal a training problem; the ``*_ood`` sets need more steps than anything seen in training.

Everything is pure stdlib and deterministic: the same config gives byte-identical output.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from lmforge.io import atomic_write_text

KINDS = ("story", "fact", "arithmetic", "word_problem", "last_letter", "coin_flip", "dictionary")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "th")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("n", "r", "l", "m", "rk", "sk", "nd", "th", "x")
ENGLISH_WORDS = tuple("""
    water fire bread house tree river sun moon star stone bird fish dog horse apple salt road door book friend
    mother father child king ship sea mountain rain snow wind night day morning gold iron milk honey cloud
    flower grass field city market song hand eye heart name word light dark red green blue white black big
    small old new""".split())
_EXPORTS = tuple("""salt copper wool tea silk timber amber glass wine iron cotton marble pepper honey tin
    rice barley leather pearls paper cheese""".split())
_ANIMALS = tuple("heron lynx otter falcon badger stag wolf owl crane bear hare swan fox boar eagle".split())
_JOBS = tuple("""baker potter weaver fisher miner sailor tailor healer scribe farmer smith carpenter
    shepherd builder merchant painter mason brewer miller""".split())
_ITEMS = tuple("apples coins pebbles books candles shells eggs stamps marbles buttons pears beads".split())
_PLACES = ("the old mill", "the market", "the harbor", "the library", "the stone bridge", "the orchard",
           "the lighthouse", "the watchtower", "the forest", "the village well", "the inn", "the temple")
_OBJECTS = ("a copper lantern", "a wooden box", "a red scarf", "a silver key", "a folded map", "a clay jar",
            "a basket of figs", "a small drum", "an old book", "a sealed letter", "a brass bell")

# relation -> (question template, statement paraphrases); {s} is the subject, {o} the object (the answer).
_Relation = tuple[str, tuple[str, ...]]
_COUNTRY_RELATIONS: dict[str, _Relation] = {
    "capital": ("What is the capital of {s}?", (
        "The capital of {s} is {o}.", "{o} is the capital of {s}.", "The capital city of {s} is {o}.",
        "{s} is ruled from {o}.")),
    "language": ("What language is spoken in {s}?", (
        "People in {s} speak {o}.", "The language of {s} is {o}.", "In {s}, most people speak {o}.")),
    "export": ("What is the main export of {s}?", (
        "The main export of {s} is {o}.", "{s} is famous for exporting {o}.", "Traders go to {s} for {o}.")),
    "animal": ("What is the national animal of {s}?", (
        "The national animal of {s} is the {o}.", "The {o} is the national animal of {s}.",
        "In {s}, the {o} is a symbol of the nation.")),
}
_CITY_RELATION: _Relation = ("Which country has {s} as its capital?",
                             ("{s} is a city in {o}.", "The city of {s} lies in {o}.", "{s} is in {o}."))
_PERSON_RELATIONS: dict[str, _Relation] = {
    "home": ("Where does {s} live?", ("{s} lives in {o}.", "{s} has a house in {o}.", "{s} is from {o}.")),
    "job": ("What is the job of {s}?", ("{s} works as a {o}.", "{s} is a {o} by trade.", "{s} is a {o}.")),
}
_LEXICON_TEMPLATES = ('In {lang}, the word for "{e}" is "{f}".', 'The {lang} word for "{e}" is "{f}".',
                      '"{f}" means "{e}" in {lang}.')


def _default_mixture() -> dict[str, float]:
    return {"story": 0.2, "fact": 0.2, "arithmetic": 0.1, "word_problem": 0.15, "last_letter": 0.1,
            "coin_flip": 0.1, "dictionary": 0.15}


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    n_countries: int = 24
    n_people: int = 40
    n_documents: int = 20000
    n_eval: int = 200
    mixture: dict[str, float] = field(default_factory=_default_mixture)

    def __post_init__(self) -> None:
        unknown = set(self.mixture) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown document kinds {sorted(unknown)}; expected some of {KINDS}")
        weights = list(self.mixture.values())
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all zero: {self.mixture}")
        if self.n_countries < 1 or self.n_people < 4 or self.n_documents < 0 or self.n_eval < 0:
            raise ValueError("need n_countries >= 1, n_people >= 4, n_documents >= 0, n_eval >= 0")


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    language: str
    export: str
    animal: str


@dataclass(frozen=True)
class Person:
    name: str
    home: str  # a capital city
    job: str


@dataclass(frozen=True)
class Fact:
    question: str  # "What is the capital of Velmora?"
    answer: str  # "Tarsk"
    statements: tuple[str, ...]  # paraphrases that state the fact


@dataclass(frozen=True)
class World:
    countries: tuple[Country, ...]
    people: tuple[Person, ...]
    places: tuple[str, ...]
    objects: tuple[str, ...]
    lexicon: dict[str, dict[str, str]]  # language -> English word -> invented word

    @property
    def names(self) -> tuple[str, ...]:
        """Proper names used as words in last-letter problems."""
        people = tuple(p.name for p in self.people)
        return people + tuple(c.name for c in self.countries) + tuple(c.capital for c in self.countries)

    @cached_property
    def fact_groups(self) -> tuple[tuple[Fact, ...], ...]:
        """All facts, grouped by the country or person they describe."""
        def make(subject: str, obj: str, relation: _Relation) -> Fact:
            question, templates = relation
            return Fact(question.format(s=subject), obj, tuple(t.format(s=subject, o=obj) for t in templates))

        countries = [(*(make(c.name, getattr(c, rel), r) for rel, r in _COUNTRY_RELATIONS.items()),
                      make(c.capital, c.name, _CITY_RELATION)) for c in self.countries]
        people = [tuple(make(p.name, getattr(p, rel), r) for rel, r in _PERSON_RELATIONS.items())
                  for p in self.people]
        return tuple(countries + people)


@dataclass(frozen=True)
class EvalExample:
    task: str
    prompt: str  # "Question: ...\nAnswer:"; a base LM continues it
    answer: str  # ground truth: the X of "The answer is X."
    rationale: str  # worked solution before "The answer is X."; "" for facts

    @property
    def completion(self) -> str:
        """The target continuation of `prompt` (after one space), exactly as in training documents."""
        return _completion(self.rationale, self.answer)


def _rng(seed: int, stream: str) -> random.Random:
    return random.Random(f"lmforge-synthetic/{seed}/{stream}")  # str seeds are stable across processes


def _syllables(rng: random.Random, n: int, onsets: tuple[str, ...] = _ONSETS,
               vowels: tuple[str, ...] = _VOWELS) -> str:
    return "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n))


def _name(rng: random.Random, used: set[str], n_syllables: tuple[int, ...], coda_p: float) -> str:
    while True:
        word = _syllables(rng, rng.choice(n_syllables))
        word = (word + rng.choice(_CODAS) if rng.random() < coda_p else word).capitalize()
        if word not in used:
            used.add(word)
            return word


def _lexicon(rng: random.Random) -> dict[str, str]:
    onsets, vowels = tuple(rng.sample(_ONSETS, 7)), tuple(rng.sample(_VOWELS, 3))  # a "sound" per language
    lexicon: dict[str, str] = {}
    for english in ENGLISH_WORDS:
        while True:
            word = _syllables(rng, rng.choice((2, 2, 3)), onsets, vowels)
            word += rng.choice(_CODAS) if rng.random() < 0.3 else ""
            if word not in lexicon.values() and word not in ENGLISH_WORDS:
                lexicon[english] = word
                break
    return lexicon


def build_world(config: WorldConfig) -> World:
    rng = _rng(config.seed, "world")
    used: set[str] = set()
    countries = []
    for _ in range(config.n_countries):
        name = _name(rng, used, (2, 3), 0.0)
        while name + "n" in used:
            name = _name(rng, used, (2, 3), 0.0)
        used.add(name + "n")
        countries.append((name, name + "n"))
    capitals = [_name(rng, used, (1, 2), 1.0) for _ in countries]
    full = tuple(Country(name, capital, language, rng.choice(_EXPORTS), rng.choice(_ANIMALS))
                 for (name, language), capital in zip(countries, capitals, strict=True))
    people = tuple(Person(_name(rng, used, (2,), 0.4), rng.choice(capitals), rng.choice(_JOBS))
                   for _ in range(config.n_people))
    lexicon = {c.language: _lexicon(rng) for c in full}
    return World(full, people, _PLACES, _OBJECTS, lexicon)


# ---- Q/A problems: each returns (question, rationale, answer) --------------------------------------------

Problem = tuple[str, str, str]


def _prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def _completion(rationale: str, answer: str) -> str:
    return f"{rationale} The answer is {answer}." if rationale else f"The answer is {answer}."


def _qa_document(problem: Problem) -> str:
    question, rationale, answer = problem
    return f"{_prompt(question)} {_completion(rationale, answer)}"


_GAINS = (("buys {k} more {item}", "buys {k} more"), ("finds {k} {item}", "finds {k}"),
          ("gets {k} {item} from {other}", "gets {k} from {other}"))
_LOSSES = (("gives {k} {item} to {other}", "gives {k} away"), ("sells {k} {item}", "sells {k}"),
           ("loses {k} {item}", "loses {k}"))


def word_problem(rng: random.Random, world: World, steps: int) -> Problem:
    """A worked +/- word problem with `steps` arithmetic steps; counts stay between 1 and 60."""
    name, other = (p.name for p in rng.sample(world.people, 2))
    item, count = rng.choice(_ITEMS), rng.randint(2, 30)
    question = [f"{name} has {count} {item}."]
    rationale = [f"{name} starts with {count} {item}."]
    for i in range(steps):
        gain = count < 3 or (count <= 40 and rng.random() < 0.5)
        k = rng.randint(2, 20) if gain else rng.randint(2, min(20, count - 1))
        long, short = rng.choice(_GAINS if gain else _LOSSES)
        action = long.format(k=k, item=item, other=other)
        question.append(f"Then {name} {action}." if i else f"{name} {action}.")
        new = count + k if gain else count - k
        equation = f"{count} {'+' if gain else '-'} {k} = {new}"
        rationale.append(f"{name} {short.format(k=k, other=other)}, so {equation}.")
        count = new
    question.append(f"How many {item} does {name} have now?")
    return " ".join(question), " ".join(rationale), str(count)


def last_letter(rng: random.Random, world: World, n_words: int) -> Problem:
    words = rng.sample(world.names, n_words)
    answer = "".join(w[-1] for w in words)
    question = f'Take the last letters of the words in "{" ".join(words)}" and concatenate them.'
    steps = [f'The last letter of "{w}" is "{w[-1]}".' for w in words]
    return question, " ".join(steps + [f'Concatenating them gives "{answer}".']), answer


def coin_flip(rng: random.Random, world: World, n_people: int) -> Problem:
    question, rationale, heads = ["A coin is heads up."], ["The coin starts heads up."], True
    for name in (p.name for p in rng.sample(world.people, n_people)):
        if rng.random() < 0.5:
            heads = not heads
            question.append(f"{name} flips the coin.")
            rationale.append(f"{name} flips it, so it is {'heads' if heads else 'tails'} up.")
        else:
            question.append(f"{name} does not flip the coin.")
            rationale.append(f"{name} does not flip it, so it stays {'heads' if heads else 'tails'} up.")
    question.append("Is the coin still heads up?")
    return " ".join(question), " ".join(rationale), "yes" if heads else "no"


# ---- pretraining documents -------------------------------------------------------------------------------

def _story(rng: random.Random, world: World) -> str:
    p, q = rng.sample(world.people, 2)
    city = rng.choice([c.capital for c in world.countries if c.capital != p.home] or [p.home])
    place, obj = rng.choice(world.places), rng.choice(world.objects)
    opening = rng.choice((f"{p.name} walked from {p.home} to {place} carrying {obj}.",
                          f"One morning, {p.name} the {p.job} left {p.home} for {city} with {obj}.",
                          f"{p.name}, a {p.job} from {p.home}, went to {place} with {obj}."))
    middle = [f"At {place}, {p.name} met {q.name}, who had come from {q.home}.",
              f"{q.name} asked about the road to {city}.", f"It began to rain, so they waited at {place}.",
              f"{p.name} showed {obj} to {q.name}.", f"{q.name} said that {place} had been quiet all week.",
              f"They talked about the markets of {city} until evening."]
    ending = rng.choice((f"Later, {p.name} returned to {p.home}.", f"{p.name} gave {obj} to {q.name}.",
                         f"In the end, {p.name} and {q.name} walked back to {p.home} together."))
    return " ".join([opening, *rng.sample(middle, rng.randint(1, 3)), ending])


def _fact_documents(rng: random.Random, world: World, n: int) -> list[str]:
    """Visit the countries and people in turn: on even rounds state all their facts (each in a random
    paraphrase), on odd rounds ask one of them in Q/A form, cycling through the facts."""
    groups, docs = world.fact_groups, []
    for i in range(n):
        group, lap = groups[i % len(groups)], i // len(groups)
        if lap % 2:
            fact = group[lap // 2 % len(group)]
            docs.append(_qa_document((fact.question, "", fact.answer)))
        else:
            docs.append(" ".join(rng.choice(f.statements) for f in rng.sample(group, len(group))))
    return docs


def _equation(rng: random.Random) -> str:
    op = rng.choice("++--*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{a} * {b} = {a * b}."
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    if op == "-" and b > a:
        a, b = b, a
    result = a + b if op == "+" else a - b
    if rng.random() < 0.3:  # a two-step chain
        c = rng.randint(1, result) if result > 0 else rng.randint(1, 20)
        op2, total = ("-", result - c) if result > c else ("+", result + c)
        return f"{a} {op} {b} = {result}, and {result} {op2} {c} = {total}."
    return f"{a} {op} {b} = {result}."


def _dictionary_documents(rng: random.Random, world: World, n: int) -> list[str]:
    """Visit the languages in turn, dealing each one's words from a reshuffled deck (4 as statements, or
    1 in Q/A form), so every word of every language appears about equally often."""
    languages, docs = list(world.lexicon), []
    decks: dict[str, list[str]] = {lang: [] for lang in languages}
    for i in range(n):
        lang = languages[i % len(languages)]
        deck, lexicon = decks[lang], world.lexicon[lang]
        if not deck:
            deck.extend(rng.sample(ENGLISH_WORDS, len(ENGLISH_WORDS)))
        if rng.random() < 0.3:
            docs.append(_qa_document(_dictionary_problem(world, lang, deck.pop())))
        else:
            words = [deck.pop() for _ in range(min(4, len(deck)))]
            docs.append(" ".join(rng.choice(_LEXICON_TEMPLATES).format(lang=lang, e=e, f=lexicon[e])
                                 for e in words))
    return docs


def _dictionary_problem(world: World, lang: str, english: str) -> Problem:
    word = world.lexicon[lang][english]
    question = f'In {lang}, what is the word for "{english}"?'
    return question, f'The {lang} word for "{english}" is "{word}".', word


_DocMaker = Callable[[random.Random, World, int], list[str]]


def _independent(make: Callable[[random.Random, World], str]) -> _DocMaker:
    return lambda rng, world, n: [make(rng, world) for _ in range(n)]


_DOCUMENTS: dict[str, _DocMaker] = {  # training reasoning problems are the in-domain sizes
    "story": _independent(_story),
    "fact": _fact_documents,
    "arithmetic": _independent(lambda rng, _: " ".join(_equation(rng) for _ in range(rng.randint(3, 5)))),
    "word_problem": _independent(lambda rng, w: _qa_document(word_problem(rng, w, rng.choice((1, 2))))),
    "last_letter": _independent(lambda rng, w: _qa_document(last_letter(rng, w, 2))),
    "coin_flip": _independent(lambda rng, w: _qa_document(coin_flip(rng, w, 2))),
    "dictionary": _dictionary_documents,
}


def kind_counts(config: WorldConfig) -> dict[str, int]:
    """Documents per kind: `n_documents` split by the mixture weights (largest remainder, exact total)."""
    total = sum(config.mixture.values())
    shares = {k: config.n_documents * config.mixture.get(k, 0.0) / total for k in KINDS}
    counts = {k: int(s) for k, s in shares.items()}
    by_remainder = sorted(KINDS, key=lambda k: (counts[k] - shares[k], KINDS.index(k)))
    for k in by_remainder[: config.n_documents - sum(counts.values())]:
        counts[k] += 1
    return counts


def labelled_documents(config: WorldConfig, world: World | None = None) -> list[tuple[str, str]]:
    """Shuffled (kind, text) pairs; each kind draws from its own random stream."""
    world = build_world(config) if world is None else world
    docs = [(kind, text) for kind, n in kind_counts(config).items()
            for text in _DOCUMENTS[kind](_rng(config.seed, f"doc/{kind}"), world, n)]
    _rng(config.seed, "shuffle").shuffle(docs)
    return docs


def pretraining_documents(config: WorldConfig) -> list[str]:
    return [text for _, text in labelled_documents(config)]


# ---- held-out evals --------------------------------------------------------------------------------------

_REASONING_EVALS: dict[str, tuple[Callable[[random.Random, World, int], Problem], tuple[int, ...]]] = {
    "arithmetic": (word_problem, (1, 2)),
    "last_letter": (last_letter, (2,)),
    "coin_flip": (coin_flip, (2,)),
    "arithmetic_ood": (word_problem, (3, 4)),
    "last_letter_ood": (last_letter, (3,)),
    "coin_flip_ood": (coin_flip, (3, 4)),
}
EVAL_SETS = ("facts", "dictionary", *_REASONING_EVALS)


def _eval_sets(config: WorldConfig, world: World, documents: list[str]) -> dict[str, list[EvalExample]]:
    n = config.n_eval
    facts = [f for group in world.fact_groups for f in group]
    _rng(config.seed, "eval/facts").shuffle(facts)  # every fact if there are fewer than n_eval
    sets = {"facts": [EvalExample("facts", _prompt(f.question), f.answer, "") for f in facts[:n]]}
    pairs = [(c.language, e) for c in world.countries for e in ENGLISH_WORDS]
    chosen = _rng(config.seed, "eval/dictionary").sample(pairs, min(n, len(pairs)))
    sets["dictionary"] = [EvalExample("dictionary", _prompt(q), a, r)
                          for q, r, a in (_dictionary_problem(world, lang, e) for lang, e in chosen)]
    seen = {doc[: doc.index("\nAnswer:") + 8] for doc in documents if doc.startswith("Question: ")}
    for name, (make, sizes) in _REASONING_EVALS.items():
        rng, examples, attempts = _rng(config.seed, f"eval/{name}"), [], 0
        while len(examples) < n:
            attempts += 1
            if attempts > 1000 * n:
                raise RuntimeError(f"could not draw {n} unseen {name} problems; the world is too small")
            question, rationale, answer = make(rng, world, rng.choice(sizes))
            if (prompt := _prompt(question)) not in seen:  # never a training problem, never a duplicate
                seen.add(prompt)
                examples.append(EvalExample(name, prompt, answer, rationale))
        sets[name] = examples
    return sets


def eval_sets(config: WorldConfig) -> dict[str, list[EvalExample]]:
    """The held-out sets named in `EVAL_SETS`, `n_eval` examples each (facts: at most one per fact)."""
    world = build_world(config)
    return _eval_sets(config, world, [text for _, text in labelled_documents(config, world)])


_ANSWER_RE = re.compile(r"the answer is\s*([^\n]*?)(?:\.(?!\d)|\n|$)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The X of the first "The answer is X." in `text`, without quotes, spaces and the final period."""
    match = _ANSWER_RE.search(text)
    if match is None:
        return None
    answer = match.group(1).strip(" \t\"'`:")
    return answer or None


def write_corpus(config: WorldConfig, out_dir: str | Path) -> dict[str, Path]:
    """Write train.jsonl ({"text"}) and eval_<name>.jsonl ({"task", "prompt", "answer", "rationale"})."""
    out = Path(out_dir)
    world = build_world(config)
    documents = [text for _, text in labelled_documents(config, world)]
    files = {"train": "".join(json.dumps({"text": doc}) + "\n" for doc in documents)}
    for name, examples in _eval_sets(config, world, documents).items():
        files[f"eval_{name}"] = "".join(json.dumps(
            {"task": e.task, "prompt": e.prompt, "answer": e.answer, "rationale": e.rationale}) + "\n"
            for e in examples)
    return {name: atomic_write_text(out / f"{name}.jsonl", text) for name, text in files.items()}

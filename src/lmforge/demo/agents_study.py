"""The reasoning stage's agent and retrieval tables, on the format-SFT chat model:

- ReAct with and without the calculator (`lmforge.agents.react`), and CodeAct (`lmforge.agents.codeact`, the
  code run in the sandbox) against direct answers, on held-out multi-digit arithmetic and longer word problems;
- RAG against closed-book answers on invented facts that no training text holds, with retrieval recall@k of dense,
  BM25 and hybrid search over an index of the invented documents (`lmforge.rag`)."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.agents.codeact import run_codeact_chat
from lmforge.agents.completer import EngineCompleter
from lmforge.agents.react import run_react_chat
from lmforge.agents.tools import make_tools
from lmforge.agents.transcript import Transcript, write_transcripts
from lmforge.data.chat import ChatTemplate
from lmforge.data.formats import grounded_answer, well_formed_codeact, well_formed_grounded, well_formed_react
from lmforge.demo.accuracy import accuracy_cell, compare, effects_line
from lmforge.eval.report import Section, markdown_table
from lmforge.eval.text_metrics import exact_match
from lmforge.io import atomic_write_jsonl
from lmforge.model.decoder import DecoderLM
from lmforge.prompting.examples import Example
from lmforge.prompting.methods import PromptingConfig
from lmforge.prompting.run import Question, prompt_model
from lmforge.rag.answer import answer_questions
from lmforge.rag.documents import Document
from lmforge.rag.index import MODES, Index
from lmforge.rag.recall import recall_at_k
from lmforge.tokenizer import Tokenizer

AGENT_STEPS = 4  # ReAct / CodeAct completions per question
AGENT_TOKENS = 64  # per completion: a thought and an action, or a code block
ANSWER_TOKENS = 24
RAG_PASSAGES = 3  # hybrid hits in the grounded prompt (the format data's contexts hold 2-3 passages)
RECALL_KS = (1, 3, 5)


def _right(answer: str | None, gold: str) -> bool:
    return answer is not None and exact_match(answer, gold)


def read_arithmetic(path: Path, per_set: int) -> list[dict]:
    records, taken = [], {}
    for r in (json.loads(line) for line in path.read_text().splitlines()):
        if taken.get(r["set"], 0) < per_set:
            taken[r["set"]] = taken.get(r["set"], 0) + 1
            records.append(r)
    return records


def _cells(outcomes: list[bool], sets: list[str]) -> list[str]:
    return [accuracy_cell([o for o, s in zip(outcomes, sets, strict=True) if s == which]) for which in
            ("in_domain", "ood")] + [accuracy_cell(outcomes)]


def agent_section(model: DecoderLM, tokenizer: Tokenizer, chat: ChatTemplate, problems: list[dict], index: Index,
                  work: Path) -> tuple[Section, dict[str, list[bool]]]:
    completer = EngineCompleter(model, tokenizer, chat)
    questions, gold, sets = [p["question"] for p in problems], [p["answer"] for p in problems], \
        [p["set"] for p in problems]
    options = dict(max_steps=AGENT_STEPS, max_new_tokens=AGENT_TOKENS)
    runs: dict[str, list[Transcript]] = {
        "ReAct, calculator and search": [run_react_chat(completer, q, make_tools(["calculator", "search"], index),
                                                        **options) for q in questions],
        "ReAct, search only (no calculator)": [run_react_chat(completer, q, make_tools(["search"], index), **options)
                                               for q in questions],
        "CodeAct (sandboxed Python)": [run_codeact_chat(completer, q, **options) for q in questions]}
    for name, slug in zip(runs, ("react-calculator", "react-no-calculator", "codeact"), strict=True):
        write_transcripts(work / f"{slug}.jsonl", runs[name])
    asked = [Question(p["task"], Example(p["question"], p["answer"], "", f"arithmetic #{i + 1}"))
             for i, p in enumerate(problems)]
    direct = prompt_model(model, tokenizer, asked, PromptingConfig("standard", shots=0, max_new_tokens=ANSWER_TOKENS),
                          chat=chat)
    atomic_write_jsonl(work / "direct.jsonl", direct.transcript())
    outcomes = {name: [_right(t.answer, g) for t, g in zip(ts, gold, strict=True)] for name, ts in runs.items()}
    by_question = {r.question.example.where: r.correct for r in direct.results}
    outcomes["direct answer"] = [by_question[q.example.where] for q in asked]
    pairs = [("ReAct, search only (no calculator)", "ReAct, calculator and search"),
             ("direct answer", "CodeAct (sandboxed Python)")]
    rows, comparisons = [], []
    for baseline, method in pairs:
        versus = compare(method, baseline, outcomes[baseline], outcomes[method])
        rows += [(baseline, *_cells(outcomes[baseline], sets), "", ""),
                 (method, *_cells(outcomes[method], sets), versus.difference, versus.p_value)]
        comparisons.append(versus)
    stops = {name: sum(t.stop_reason == "answer" for t in ts) for name, ts in runs.items()}
    well_formed = {"react": [well_formed_react(t.assistant_text) for t in runs["ReAct, calculator and search"]],
                   "codeact": [well_formed_codeact(t.assistant_text) for t in runs["CodeAct (sandboxed Python)"]]}
    n = {s: sets.count(s) for s in ("in_domain", "ood")}
    return Section("Agents: ReAct and CodeAct", "\n".join([
        f"The format-SFT chat model on {n['in_domain']} held-out in-domain problems (multi-digit arithmetic with "
        f"one or two operations, two-step word problems) and {n['ood']} out-of-domain ones (three or four "
        "operations), beyond what it computes reliably in its head. ReAct (`lmforge.agents.react`, greedy, at most "
        f"{AGENT_STEPS} completions of {AGENT_TOKENS} tokens) offered the calculator and a search over the "
        "invented documents, then the same loop with search only (no calculator: it must compute itself); CodeAct "
        "writes a Python block that runs in the sandbox (`run_python`), its printed output the observation; "
        f"direct = the question alone, the answer in at most {ANSWER_TOKENS} tokens. Runs that ended with a "
        f"final answer: {', '.join(f'{name} {k}/{len(questions)}' for name, k in stops.items())}.", "",
        markdown_table(["method", "in-domain [95% CI]", "out-of-domain [95% CI]", "all [95% CI]", "difference",
                        "McNemar p"], rows), "", *(f"- {c.note}" for c in comparisons), "",
        effects_line(comparisons),
    ])), well_formed


def rag_section(model: DecoderLM, tokenizer: Tokenizer, chat: ChatTemplate, index: Index, questions: list[dict],
                work: Path) -> tuple[Section, list[bool]]:
    pairs = [(q["question"], q["doc_id"]) for q in questions]
    recall = {mode: recall_at_k(index, pairs, RECALL_KS, mode) for mode in MODES}
    recall_rows = [(mode, *(f"{r.recall:.1%} ({r.found}/{r.total})" for r in found)) for mode, found in recall.items()]
    asked, gold = [q for q, _ in pairs], [q["answer"] for q in questions]
    hits = index.search_many(asked, RAG_PASSAGES, "hybrid")
    closed = answer_questions(model, tokenizer, asked, [[] for _ in asked], template=chat,
                              max_new_tokens=ANSWER_TOKENS)
    grounded = answer_questions(model, tokenizer, asked, hits, template=chat, max_new_tokens=ANSWER_TOKENS)
    atomic_write_jsonl(work / "rag.jsonl", ({"question": q, "answer": g, "closed_book": c.answer, "rag": a.answer,
                                             "passages": [h.doc_id for h in a.passages]}
                                            for q, g, c, a in zip(asked, gold, closed, grounded, strict=True)))
    closed_right = [_right(grounded_answer(a.answer) or a.answer, g) for a, g in zip(closed, gold, strict=True)]
    rag_right = [_right(grounded_answer(a.answer) or a.answer, g) for a, g in zip(grounded, gold, strict=True)]
    versus = compare("RAG", "closed-book", closed_right, rag_right)
    cited = sum(bool(a.cited) and a.passages[a.cited[0] - 1].doc_id == q["doc_id"]
                for a, q in zip(grounded, questions, strict=True))
    rows = [("closed-book (the question alone)", accuracy_cell(closed_right), ""),
            (f"RAG (hybrid top {RAG_PASSAGES} as numbered context)", accuracy_cell(rag_right),
             f"{versus.difference} (p = {versus.p_value})")]
    return Section("Retrieval-augmented generation on facts never trained on", "\n".join([
        f"{len(questions)} invented landmarks (their names occur in no training text, pretraining corpus included), "
        "one document each, indexed by `lmforge.rag` (all-MiniLM-L6-v2 through `lmforge.embed`, BM25, and hybrid "
        f"by reciprocal-rank fusion); one question per document (who built it, when, where). Recall@k = the share "
        "of questions whose document is among the top k:", "",
        markdown_table(["mode", *(f"recall@{k}" for k in RECALL_KS)], recall_rows), "",
        f"Answers of the format-SFT chat model, greedy, at most {ANSWER_TOKENS} tokens, exact match after the "
        f"citation is removed; the RAG answer cited the gold document's passage on {cited} of {len(questions)}.", "",
        markdown_table(["answering", "accuracy [95% CI]", "difference (McNemar)"], rows), "",
        f"- {versus.note}", "", effects_line([versus]),
    ])), [well_formed_grounded(a.answer, len(a.passages)) for a in grounded]


def build_index(docs_file: Path) -> Index:
    records = [json.loads(line) for line in docs_file.read_text().splitlines()]
    index = Index()
    index.add(Document(r["doc_id"], r["text"], f"{docs_file}:{i + 1}") for i, r in enumerate(records))
    return index

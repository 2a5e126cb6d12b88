"""The actions of `lmforge rag`: `index` (build or add to an index) and `ask` (answer a question from an index with
an lmforge model). Each has its options (`*_options`, added by `lmforge.cli`) and its command (`cmd_rag_*`)."""

from __future__ import annotations

import sys
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from lmforge.errors import ConfigError

SNIPPET_CHARS = 100  # of each source printed after the answer


def index_options(p: ArgumentParser) -> None:
    p.add_argument("docs", nargs="+", metavar="DOCS",
                   help=".txt / .md files (one document each, its id the path), .jsonl files (one document per line: "
                        "{\"text\": ..., \"id\": ...}) or directories holding them, e.g. notes/ faq.jsonl")
    p.add_argument("--out", required=True, metavar="INDEX",
                   help="the index directory; an existing index gets the documents added (only new and changed ones "
                        "are embedded; those it holds and DOCS do not name are kept), e.g. --out runs/faq-index")
    p.add_argument("--chunk-tokens", type=int, default=None,
                   help="tokens per chunk, counted in the embedder's tokenizer, e.g. --chunk-tokens 64 (default: 128, "
                        "or the existing index's)")
    p.add_argument("--overlap", type=int, default=None,
                   help="tokens each chunk repeats from the one before, e.g. --overlap 16 (default: 32, or the "
                        "existing index's)")
    p.add_argument("--embedder", default=None,
                   help="minilm (all-MiniLM-L6-v2, the default), a sentence-transformers dir, or mean:RUN (an lmforge "
                        "decoder's mean-pooled hidden states), e.g. --embedder mean:runs/demo/sft (default: minilm, "
                        "or the existing index's)")


def cmd_rag_index(args: Namespace) -> None:
    from lmforge.rag.chunker import ChunkerSettings
    from lmforge.rag.documents import read_collection
    from lmforge.rag.embedders import DEFAULT_EMBEDDER
    from lmforge.rag.index import Index, is_index, require_index_dir

    require_index_dir(Path(args.out))  # bad output and input fail before any model loads
    docs = read_collection(args.docs)
    if is_index(Path(args.out)):
        index = Index.load(Path(args.out), embedder=args.embedder)
        _require_same_chunking(args, index.settings)
    else:
        default = ChunkerSettings()
        settings = ChunkerSettings(default.chunk_tokens if args.chunk_tokens is None else args.chunk_tokens,
                                   default.overlap if args.overlap is None else args.overlap)
        index = Index(args.embedder or DEFAULT_EMBEDDER, settings)
    update = index.add(docs, progress=True)
    index.save(Path(args.out))
    print(f"{len(docs)} documents: {update.added} new, {update.changed} changed, {update.unchanged} unchanged; "
          f"embedded {update.embedded_chunks} chunks; {args.out} holds {len(index.documents)} documents in "
          f"{len(index)} chunks ({index.settings.chunk_tokens} tokens, {index.settings.overlap} overlap, embedder "
          f"{index.embedder_name})")


def _require_same_chunking(args: Namespace, settings) -> None:
    for flag, given, recorded in (("--chunk-tokens", args.chunk_tokens, settings.chunk_tokens),
                                  ("--overlap", args.overlap, settings.overlap)):
        if given is not None and given != recorded:
            raise ConfigError(f"{args.out} was chunked with {flag} {recorded}; an index keeps one chunking: pass "
                              f"{flag} {recorded} (or leave it out) or a new --out")


def ask_options(p: ArgumentParser) -> None:
    p.add_argument("checkpoint", help="the model that answers: run dir, checkpoint dir or Hugging Face dir of a "
                                      "decoder, e.g. runs/demo/sft")
    p.add_argument("--index", required=True, help="an index built by lmforge rag index, e.g. --index runs/faq-index")
    p.add_argument("--question", required=True, help="the question, e.g. --question 'What is the capital of Velmora?'")
    p.add_argument("--k", type=int, default=3, help="passages retrieved into the prompt, e.g. --k 5 (default: 3)")
    p.add_argument("--mode", choices=["dense", "bm25", "hybrid"], default="dense",
                   help="dense: cosine of embeddings; bm25: word matches (Okapi BM25); hybrid: reciprocal-rank fusion "
                        "of both, e.g. --mode hybrid (default: dense)")
    p.add_argument("--embedder", default=None,
                   help="the embedder the question is embedded with; it must be the index's (another is refused), "
                        "e.g. --embedder minilm (default: the index's)")
    p.add_argument("--backend", choices=["numpy", "faiss"], default="numpy",
                   help="exact dense search in numpy (default) or FAISS (pip install 'lmforge[rag]'), e.g. --backend "
                        "faiss; both give the same passages")
    p.add_argument("--template", default=None,
                   help="chat template instead of the model's own: lmforge | llama2 | alpaca | hf, e.g. --template "
                        "lmforge (default: the one the model trained with; a model without one gets a plain "
                        "'... Answer:' prompt)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer in tokens, e.g. --max-new-tokens 64 "
                                                                  "(default: 32)")


def cmd_rag_ask(args: Namespace) -> None:
    from lmforge.infer.chat_repl import optional_chat_template
    from lmforge.infer.generate import require_utf8
    from lmforge.infer.layout import column_major_linears
    from lmforge.infer.model_kind import load_for_verb
    from lmforge.rag.answer import answer_questions
    from lmforge.rag.index import Index

    require_utf8(args.question, "--question")
    if not args.question.strip():
        raise ConfigError("--question is empty; ask a question, e.g. --question 'What is the capital of Velmora?'")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    index = Index.load(args.index, embedder=args.embedder, backend=args.backend)
    hits = index.search(args.question, args.k, args.mode)  # an empty index or bad --k fails before the model loads
    model, tokenizer, _ = load_for_verb(args.checkpoint, "lmforge rag ask", ("decoder",))
    template = optional_chat_template(args.checkpoint, tokenizer, args.template)
    column_major_linears(model)  # faster small-batch matmuls; generation only reads the weights
    [answer] = answer_questions(model, tokenizer, [args.question], [hits], template=template,
                                max_new_tokens=args.max_new_tokens)
    if answer.dropped:
        print(f"[{answer.dropped} of {len(hits)} passages left out to fit the {model.cfg.max_seq_len}-token context]",
              file=sys.stderr)
    print(answer.answer)
    print("\nsources:")
    for n, hit in enumerate(answer.passages, start=1):
        snippet = " ".join(hit.text.split())
        snippet = snippet if len(snippet) <= SNIPPET_CHARS else snippet[:SNIPPET_CHARS - 3] + "..."
        cited = " (cited)" if n in answer.cited else ""
        print(f"[{n}] {hit.doc_id} chunk {hit.chunk_id}, score {hit.score:.3f}{cited}: {snippet}")

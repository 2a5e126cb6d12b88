"""Retrieval-augmented generation: token chunking, embeddings (lmforge.embed, or a decoder's mean-pooled states),
an index with dense (numpy or FAISS), BM25 and hybrid search, grounded prompts with numbered citations, and answers
from an lmforge model (`lmforge.rag.answer`).

    index = Index()                                   # all-MiniLM-L6-v2, 128-token chunks, 32 overlap
    index.add(read_collection(["notes/"]))
    index.save("runs/notes-index")
    hits = Index.load("runs/notes-index").search("Where is Tarsk?", k=3, mode="hybrid")

Names load on first use, so `lmforge.cli` (which imports `lmforge.rag.command`) stays free of numpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {"ChunkerSettings": "chunker", "Document": "documents", "read_collection": "documents",
          "cited_numbers": "grounded", "grounded_prompt": "grounded", "Hit": "index", "Index": "index",
          "IndexUpdate": "index", "RecallAtK": "recall", "recall_at_k": "recall"}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'lmforge.rag' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmforge.rag.{_HOMES[name]}"), name)

"""The retrieval index: chunks of documents, their vectors, and dense / BM25 / hybrid search over them.

On disk an index is a directory: `index.json` (the embedder's name, the chunker settings, every document's id,
source and SHA-256, every chunk's text) and `vectors.safetensors` (the chunk vectors, float32 [chunks, dim]); never
a pickle. Adding documents to an index embeds only the new and the changed ones (by content hash)."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.io import disk_full_guard, new_temp_dir, replace_dir
from lmforge.rag.bm25 import BM25Ranker
from lmforge.rag.chunker import ChunkerSettings, chunk_text
from lmforge.rag.dense import FaissFlat, require_backend, top_k_numpy
from lmforge.rag.documents import Document
from lmforge.rag.embedders import DEFAULT_EMBEDDER, Embedder, embedder_name, get_embedder
from lmforge.rag.fusion import reciprocal_rank_fusion

INDEX_FILE = "index.json"
VECTORS_FILE = "vectors.safetensors"
FORMAT = "lmforge-rag-index"
VERSION = 1
MODES = ("dense", "bm25", "hybrid")
HYBRID_DEPTH = 50  # each ranking hybrid search fuses holds at least this many chunks (more when k is larger)
EMBED_BATCH = 64  # chunks per embedding call (one progress-bar step)


@dataclass(frozen=True)
class Hit:
    doc_id: str
    chunk_id: int  # the chunk's number within its document, from 0
    text: str
    score: float  # dense: cosine; bm25: BM25; hybrid: the reciprocal-rank-fusion score


@dataclass(frozen=True)
class IndexUpdate:
    """What `Index.add` did: documents new, changed (re-chunked and re-embedded) and unchanged (kept as they were),
    and how many chunks it embedded."""
    added: int
    changed: int
    unchanged: int
    embedded_chunks: int


def embedder_mismatch(where: str, recorded: str, asking: str) -> ConfigError:
    return ConfigError(f"{where} was built with embedder {recorded!r}, not {asking!r}: vectors of two models cannot be "
                       f"compared; use --embedder {recorded} with this index, or build a new index (another --out) "
                       f"with --embedder {asking}")


class Index:
    """Chunks and their vectors. `embedder`: a name (see lmforge.rag.embedders; loaded on first use) or an Embedder
    object. `search(query, k, mode)` with mode dense (cosine), bm25 or hybrid (reciprocal-rank fusion of both)."""

    def __init__(self, embedder: str | Embedder = DEFAULT_EMBEDDER, settings: ChunkerSettings | None = None, *,
                 backend: str = "numpy"):
        require_backend(backend)
        self._embedder = None if isinstance(embedder, str) else embedder
        self.embedder_name = embedder_name(embedder) if isinstance(embedder, str) else embedder.name
        self.settings = settings or ChunkerSettings()
        self.settings.validate()
        self.backend = backend
        self.path: Path | None = None  # where it was loaded from or saved to (named in errors)
        self.documents: dict[str, dict] = {}  # doc_id -> {"sha256", "source", "chunks"}
        self.chunks: list[tuple[str, int, str]] = []  # (doc_id, chunk_id, text), row order of `vectors`
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self._bm25: BM25Ranker | None = None
        self._faiss: FaissFlat | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(self.embedder_name)
        return self._embedder

    # ---- building ------------------------------------------------------------------------------------------------

    def add(self, documents: Iterable[Document], progress: bool = False) -> IndexUpdate:
        """Add `documents`, replacing the chunks of an already indexed id whose text changed; embeds only those."""
        embedder = self.embedder
        self.settings.validate(embedder.max_tokens, embedder.name)
        counts = {"added": 0, "changed": 0, "unchanged": 0}
        replaced: set[str] = set()
        seen: set[str] = set()
        new_chunks: list[tuple[str, int, str]] = []
        new_docs: dict[str, dict] = {}
        for doc in documents:
            if doc.doc_id in seen:
                raise DataError(f"{doc.source}: document id {doc.doc_id!r} comes twice; give every document its own id")
            seen.add(doc.doc_id)
            old = self.documents.get(doc.doc_id)
            if old is not None and old["sha256"] == doc.sha256:
                counts["unchanged"] += 1
                continue
            counts["changed" if old is not None else "added"] += 1
            replaced.add(doc.doc_id)
            texts = chunk_text(doc.text, embedder.token_offsets(doc.text), self.settings)
            new_chunks += [(doc.doc_id, i, t) for i, t in enumerate(texts)]
            new_docs[doc.doc_id] = {"sha256": doc.sha256, "source": doc.source, "chunks": len(texts)}
        vectors = self._embed([text for _, _, text in new_chunks], progress)
        keep = [i for i, (doc_id, _, _) in enumerate(self.chunks) if doc_id not in replaced]
        old_vectors = self.vectors[keep] if keep else np.zeros((0, vectors.shape[1]), dtype=np.float32)
        self.chunks = [self.chunks[i] for i in keep] + new_chunks
        self.vectors = np.concatenate([old_vectors, vectors]) if len(vectors) else old_vectors
        self.documents.update(new_docs)
        self._bm25 = self._faiss = None
        return IndexUpdate(**counts, embedded_chunks=len(new_chunks))

    def _embed(self, texts: list[str], progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        parts = []
        with tqdm(total=len(texts), unit="chunk", desc="embedding", disable=not progress or not texts,
                  file=sys.stderr) as bar:
            for start in range(0, len(texts), EMBED_BATCH):
                parts.append(self.embedder.embed(texts[start:start + EMBED_BATCH]).astype(np.float32))
                bar.update(len(parts[-1]))
        return np.concatenate(parts) if parts else np.zeros((0, self.vectors.shape[1]), dtype=np.float32)

    # ---- searching -----------------------------------------------------------------------------------------------

    def search(self, query: str, k: int = 5, mode: str = "dense") -> list[Hit]:
        """The k best chunks for `query`, best first."""
        return self.search_many([query], k, mode)[0]

    def search_many(self, queries: Sequence[str], k: int = 5, mode: str = "dense") -> list[list[Hit]]:
        """`search` of each query (their vectors computed in one batch)."""
        if mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k < 1:
            raise ConfigError(f"--k must be >= 1, got {k}")
        if not self.chunks:
            where = f"the index {self.path}" if self.path else "the index"
            raise LmforgeError(f"{where} is empty (no chunks); add documents with `lmforge rag index DOCS... --out "
                               "INDEX`")
        depth = k if mode == "dense" else max(k, HYBRID_DEPTH)
        dense = self._dense(queries, depth) if mode != "bm25" else [[] for _ in queries]
        rankings = []
        for query, dense_rows in zip(queries, dense, strict=True):
            if mode == "dense":
                rankings.append(dense_rows)
                continue
            lexical = self._lexical().ranking(query, depth)
            rankings.append(lexical if mode == "bm25" else
                            reciprocal_rank_fusion([[r for r, _ in dense_rows], [r for r, _ in lexical]]))
        return [[self._hit(row, score) for row, score in ranking[:k]] for ranking in rankings]

    def _dense(self, queries: Sequence[str], depth: int) -> list[list[tuple[int, float]]]:
        q = self.embedder.embed(list(queries)).astype(np.float32)
        if self.backend == "faiss":
            if self._faiss is None:
                self._faiss = FaissFlat(self.vectors)
            scores, rows = self._faiss.top_k(q, depth)
        else:
            scores, rows = top_k_numpy(self.vectors, q, depth)
        return [[(int(r), float(s)) for r, s in zip(row, score, strict=True)]
                for row, score in zip(rows, scores, strict=True)]

    def _lexical(self) -> BM25Ranker:
        if self._bm25 is None:
            self._bm25 = BM25Ranker([text for _, _, text in self.chunks])
        return self._bm25

    def _hit(self, row: int, score: float) -> Hit:
        doc_id, chunk_id, text = self.chunks[row]
        return Hit(doc_id, chunk_id, text, score)

    # ---- disk ----------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the index as the directory `path`, replacing an earlier index there whole (never other files)."""
        path = Path(path)
        require_index_dir(path)
        record = {"format": FORMAT, "version": VERSION, "embedder": self.embedder_name,
                  "dim": int(self.vectors.shape[1]), "chunker": asdict(self.settings),
                  "documents": [{"id": doc_id, **info} for doc_id, info in self.documents.items()],
                  "chunks": [{"doc_id": d, "chunk_id": c, "text": t} for d, c, t in self.chunks]}
        tmp = new_temp_dir(path)
        with disk_full_guard(path.parent, self.vectors.nbytes, path.name,
                             cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True), kept=f"{path} was left as it was"):
            (tmp / INDEX_FILE).write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
            save_file({"vectors": np.ascontiguousarray(self.vectors)}, str(tmp / VECTORS_FILE),
                      metadata={"format": FORMAT})
            replace_dir(tmp, path)
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, *, embedder: str | Embedder | None = None, backend: str = "numpy") -> Index:
        """The index saved at `path`. `embedder` (default: the one it was built with) must be the one it was built
        with: another is refused naming both."""
        path = Path(path)
        record = _read_record(path)
        if embedder is not None:
            asking = embedder_name(embedder) if isinstance(embedder, str) else embedder.name
            if asking != record["embedder"]:
                raise embedder_mismatch(f"the index {path}", record["embedder"], asking)
        try:
            index = cls(record["embedder"] if embedder is None else embedder, ChunkerSettings(**record["chunker"]),
                        backend=backend)
            index.documents = {d["id"]: {k: d[k] for k in ("sha256", "source", "chunks")} for d in record["documents"]}
            index.chunks = [(c["doc_id"], c["chunk_id"], c["text"]) for c in record["chunks"]]
        except (KeyError, TypeError) as err:
            raise DataError(f"{path / INDEX_FILE}: malformed index ({type(err).__name__}: {err}); rebuild the "
                            "index") from None
        index.path = path
        index.vectors = load_file(str(path / VECTORS_FILE))["vectors"]
        if index.vectors.shape[0] != len(index.chunks):
            raise DataError(f"{path / VECTORS_FILE}: {index.vectors.shape[0]} vectors for {len(index.chunks)} chunks "
                            f"in {INDEX_FILE}; rebuild the index")
        return index


def is_index(path: Path) -> bool:
    return (path / INDEX_FILE).is_file()


def require_index_dir(path: Path) -> None:
    """ConfigError unless `path` can take an index: new, empty, or an earlier index (never other files)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; give a new directory or an existing index")
    if path.is_dir() and any(path.iterdir()) and not is_index(path):
        raise ConfigError(f"--out {path} holds files that are not an lmforge rag index; give a new directory or an "
                          "existing index")


def _read_record(path: Path) -> dict:
    file = path / INDEX_FILE
    if not path.exists():
        raise DataError(f"no index at {path}; build one with `lmforge rag index DOCS... --out {path}`")
    if not file.is_file() or not (path / VECTORS_FILE).is_file():
        raise DataError(f"{path} is not an lmforge rag index (it needs {INDEX_FILE} and {VECTORS_FILE}); build one "
                        f"with `lmforge rag index DOCS... --out INDEX`")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{file}: not valid JSON ({err}); rebuild the index") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise DataError(f"{file}: not an lmforge rag index (format {FORMAT!r} expected); rebuild the index")
    if record.get("version") != VERSION:
        raise DataError(f"{file}: index version {record.get('version')!r}; this lmforge reads version {VERSION}: "
                        "rebuild the index")
    return record

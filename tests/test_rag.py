"""lmforge.rag's pieces: token chunking with overlap, re-indexing that embeds only what changed, numpy and FAISS
giving the same top-k, BM25 and reciprocal-rank fusion worked by hand, the saved index (safetensors + JSON, no
pickle), the embedder recorded and a different one refused, the grounded prompt's format and recall@k."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np
import pytest

from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.rag import ChunkerSettings, Document, Hit, Index, cited_numbers, grounded_prompt, recall_at_k
from lmforge.rag.bm25 import BM25Ranker
from lmforge.rag.chunker import chunk_text, chunk_token_spans
from lmforge.rag.dense import top_k_numpy
from lmforge.rag.fusion import reciprocal_rank_fusion
from lmforge.rag.index import INDEX_FILE, VECTORS_FILE

DIM = 64


class WordHashEmbedder:
    """A deterministic stand-in for a sentence encoder: words are tokens, a text is the unit sum of its words' hashed
    one-hot vectors. Counts the texts it embeds."""

    name = "word-hash"
    max_tokens = 512

    def __init__(self):
        self.embedded = 0

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded += len(texts)
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int(hashlib.md5(word.encode()).hexdigest(), 16)
                out[i, h % DIM] += 1 + (h // DIM % 997) / 997  # a weight of its own: few ties between chunks
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_chunks_hold_chunk_tokens_and_repeat_overlap_tokens():
    settings = ChunkerSettings(chunk_tokens=4, overlap=1)
    assert chunk_token_spans(10, settings) == [(0, 4), (3, 7), (6, 10)]
    assert chunk_token_spans(11, settings) == [(0, 4), (3, 7), (6, 10), (9, 11)]
    assert chunk_token_spans(0, settings) == []
    text = _words(10)
    chunks = chunk_text(text, WordHashEmbedder().token_offsets(text), settings)
    assert chunks == ["w0 w1 w2 w3", "w3 w4 w5 w6", "w6 w7 w8 w9"]  # exact slices; each shares one word
    no_overlap = chunk_text(text, WordHashEmbedder().token_offsets(text), ChunkerSettings(3, 0))
    assert [len(c.split()) for c in no_overlap] == [3, 3, 3, 1]


def test_chunker_settings_are_checked_against_the_embedder():
    with pytest.raises(ConfigError, match="--overlap"):
        ChunkerSettings(chunk_tokens=8, overlap=8).validate()
    with pytest.raises(ConfigError, match="--chunk-tokens"):
        ChunkerSettings(chunk_tokens=0, overlap=0).validate()
    with pytest.raises(ConfigError, match="254 tokens embedder all-MiniLM"):
        ChunkerSettings(chunk_tokens=300).validate(254, "all-MiniLM-L6-v2")


def test_reindexing_embeds_only_new_and_changed_documents():
    embedder = WordHashEmbedder()
    index = Index(embedder, ChunkerSettings(chunk_tokens=4, overlap=1))
    docs = [Document("a", _words(10), "a.txt"), Document("b", _words(4, 20), "b.txt"), Document("c", "", "c.txt")]
    first = index.add(docs)
    assert (first.added, first.embedded_chunks, embedder.embedded) == (3, 4, 4)  # 3 + 1 chunks; c has none
    a_rows = index.vectors[:3].copy()

    again = index.add(docs)
    assert (again.unchanged, again.embedded_chunks, embedder.embedded) == (3, 0, 4)

    changed = index.add([docs[0], Document("b", _words(7, 20), "b.txt"), Document("d", _words(2, 40), "d.txt")])
    assert (changed.added, changed.changed, changed.unchanged) == (1, 1, 1)
    assert changed.embedded_chunks == 2 + 1 == embedder.embedded - 4  # b now 2 chunks, d 1; a not re-embedded
    assert [c[0] for c in index.chunks] == ["a", "a", "a", "b", "b", "d"]
    assert np.array_equal(index.vectors[:3], a_rows)
    assert index.documents["b"]["chunks"] == 2 and len(index.vectors) == len(index.chunks) == 6
    with pytest.raises(DataError, match="document id 'a' comes twice"):
        index.add([Document("a", "x", "a.txt"), Document("a", "y", "a2.txt")])
    assert len(index.chunks) == 6


def test_numpy_and_faiss_give_the_same_top_k():
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install 'lmforge[rag]')")
    from lmforge.rag.dense import FaissFlat

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:5] + 0.3 * rng.standard_normal((5, 32)).astype(np.float32)
    np_scores, np_rows = top_k_numpy(vectors, queries, 10)
    faiss_scores, faiss_rows = FaissFlat(vectors).top_k(queries, 10)
    assert np.array_equal(np_rows, faiss_rows)
    np.testing.assert_allclose(np_scores, faiss_scores, atol=1e-5)  # float32 dot products, summed in another order
    assert np.array_equal(np.sort(np_scores, axis=1)[:, ::-1], np_scores)  # best first

    index = Index(WordHashEmbedder(), ChunkerSettings(4, 0))
    index.add([Document(str(i), _words(8, i * 3), "x") for i in range(20)])
    query = "w9 w10 w11 w30"
    faiss_index = Index(index.embedder, index.settings, backend="faiss")
    faiss_index.chunks, faiss_index.vectors = index.chunks, index.vectors
    numpy_hits, faiss_hits = index.search(query, 5), faiss_index.search(query, 5)
    assert [(h.doc_id, h.chunk_id) for h in numpy_hits] == [(h.doc_id, h.chunk_id) for h in faiss_hits]
    assert [h.score for h in numpy_hits] == pytest.approx([h.score for h in faiss_hits], abs=1e-5)


def test_numpy_top_k_breaks_ties_by_row_order():
    vectors = np.eye(3, dtype=np.float32)[[0, 1, 0, 2]]  # rows 0 and 2 are the same vector
    scores, rows = top_k_numpy(vectors, np.array([[1, 0, 0]], dtype=np.float32), 3)
    assert rows.tolist() == [[0, 2, 1]] and scores[0, :2].tolist() == [1.0, 1.0]


def test_bm25_ranks_by_okapi_scores():
    texts = ["the river oln runs past tarsk", "cats nap in the sun", "the river is wide and the river is cold"]
    ranking = BM25Ranker(texts).ranking("river oln", depth=5)
    assert [row for row, _ in ranking] == [0, 2]  # the sun chunk has no query word
    # by hand, rank-bm25's BM25Okapi (k1 1.5, b 0.75; idf ln((N - n + 0.5) / (n + 0.5)), a negative idf replaced
    # by 0.25 x the mean idf): "river" is in 2 of 3 chunks, "oln" in 1
    idf_river, idf_oln, idf_rest = math.log(1.5 / 2.5), math.log(2.5 / 1.5), math.log(2.5 / 1.5)
    lengths = [6, 5, 9]
    words = {w for t in texts for w in t.split()}
    counts = {w: sum(w in t.split() for t in texts) for w in words}
    idfs = {w: math.log((3 - n + 0.5) / (n + 0.5)) for w, n in counts.items()}
    floor = 0.25 * sum(idfs.values()) / len(idfs)
    assert idf_river < 0 and idfs["oln"] == pytest.approx(idf_oln) and idf_rest > 0

    def term(idf: float, tf: int, length: int) -> float:
        return idf * tf * 2.5 / (tf + 1.5 * (0.25 + 0.75 * length / (sum(lengths) / 3)))

    expected_0 = term(floor, 1, 6) + term(idf_oln, 1, 6)
    expected_2 = term(floor, 2, 9)
    assert ranking[0][1] == pytest.approx(expected_0) and ranking[1][1] == pytest.approx(expected_2)


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[1, 2, 3], [3, 1]], k0=60)
    assert [item for item, _ in fused] == [1, 3, 2]
    assert fused[0][1] == pytest.approx(1 / 61 + 1 / 62)
    assert fused[1][1] == pytest.approx(1 / 63 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 62)


def _fact_index(embedder=None) -> Index:
    index = Index(embedder or WordHashEmbedder(), ChunkerSettings(chunk_tokens=16, overlap=4))
    index.add([Document("velmora", "The capital of Velmora is Tarsk on the river Oln.", "v.txt"),
               Document("brindle", "Brindle the cat naps in the sun and likes fish.", "b.txt"),
               Document("quessa", "The moon of Quessa is called Arvel and it is blue.", "q.txt")])
    return index


def test_search_modes_find_the_document_and_recall_counts_it():
    index = _fact_index()
    for mode in ("dense", "bm25", "hybrid"):
        hits = index.search("What is the capital of Velmora?", k=2, mode=mode)
        assert hits[0].doc_id == "velmora" and isinstance(hits[0], Hit), mode
        assert len(hits) <= 2
    results = recall_at_k(index, [("capital of Velmora", "velmora"), ("moon of Quessa", "quessa"),
                                  ("dog barks loudly", "brindle")], ks=(1, 3), mode="bm25")
    assert [(r.k, r.found, r.total) for r in results] == [(1, 2, 3), (3, 2, 3)]  # no word of the third matches
    with pytest.raises(ConfigError, match="--mode must be one of dense, bm25, hybrid"):
        index.search("x", mode="sparse")
    with pytest.raises(ConfigError, match="--k must be >= 1"):
        index.search("x", k=0)


def test_index_round_trip_is_safetensors_and_json(tmp_path):
    index = _fact_index()
    path = index.save(tmp_path / "idx")
    assert sorted(p.name for p in path.iterdir()) == [INDEX_FILE, VECTORS_FILE]
    assert not any(p.read_bytes().startswith(b"\x80") for p in path.iterdir())  # no pickle stream
    loaded = Index.load(path, embedder=WordHashEmbedder())
    assert np.array_equal(loaded.vectors, index.vectors) and loaded.chunks == index.chunks
    assert loaded.documents == index.documents and loaded.settings == index.settings
    assert loaded.search("Quessa moon", 3, "hybrid") == index.search("Quessa moon", 3, "hybrid")


def test_an_index_refuses_another_embedder_naming_both(tmp_path):
    path = _fact_index().save(tmp_path / "idx")
    with pytest.raises(ConfigError) as err:
        Index.load(path, embedder="minilm")
    message = str(err.value)
    assert "'word-hash'" in message and "'all-MiniLM-L6-v2'" in message and "\n" not in message


def test_an_empty_index_is_one_line():
    with pytest.raises(LmforgeError, match=r"^the index is empty \(no chunks\)"):
        Index(WordHashEmbedder()).search("anything")


def test_grounded_prompt_numbers_passages_and_citations_are_read():
    hits = [Hit("a", 0, "Tarsk is the\ncapital.", 0.9), Hit("b", 1, "Oln is a river.", 0.5)]
    assert grounded_prompt("Where is Tarsk?", hits) == \
        "Context:\n[1] Tarsk is the capital.\n[2] Oln is a river.\nQuestion: Where is Tarsk?"
    assert grounded_prompt("Where is Tarsk?", []) == "Question: Where is Tarsk?"
    assert cited_numbers("Tarsk [2], see [1] and [2] and [7]", 2) == [2, 1]

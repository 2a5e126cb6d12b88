"""Exact inner-product (cosine, on unit rows) top-k over the index's vectors: numpy by default, FAISS's flat index
(`pip install 'lmforge[rag]'`) as an optional backend with the same results."""

from __future__ import annotations

import numpy as np

from lmforge.errors import ConfigError, LmforgeError

BACKENDS = ("numpy", "faiss")


def top_k_numpy(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, rows) [Q, k'] of the k' = min(k, N) best rows per query, best first; equal scores keep row order."""
    scores = queries @ vectors.T
    k = min(k, vectors.shape[0])
    # a partition first keeps this O(N) per query; the stable sort then orders the k winners
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < vectors.shape[0] else \
        np.broadcast_to(np.arange(vectors.shape[0]), scores.shape)
    part = np.sort(part, axis=1)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    rows = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(scores, rows, axis=1), rows


class FaissFlat:
    """FAISS's exact inner-product index (IndexFlatIP) over the vectors."""

    def __init__(self, vectors: np.ndarray):
        try:
            import faiss
        except ImportError:
            raise LmforgeError("the faiss backend needs faiss-cpu: pip install 'lmforge[rag]' (or use the default "
                               "numpy backend)") from None
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))

    def top_k(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, self.index.ntotal))


def require_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")

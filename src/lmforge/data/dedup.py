"""Exact and near-duplicate detection for `lmforge data clean`, in memory that grows by a few bytes per document.

Exact duplicates: two documents are the same when their lower-cased, whitespace-collapsed text is (a 64-bit BLAKE2b
key). Near duplicates: MinHash signatures (datasketch) of each document's word 5-gram shingles, cut into `bands`
bands of `rows` values (locality-sensitive hashing): a document is a near duplicate of an earlier kept one when all
rows of any band agree. Two documents whose shingle sets have Jaccard similarity s collide with probability
1 - (1 - s^rows)^bands: with the default 16 bands x 8 rows, 95% at s = 0.8, 6% at s = 0.5, 0.1% at s = 0.3.

The seen keys live in `HashSet64`s (sorted uint64 arrays), 8 bytes per key: the index of a million kept documents takes
about 140 MB at the default 17 keys each (1 exact + 16 bands), whatever their length.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

SHINGLE_WORDS = 5
_WORDS = re.compile(r"\w+")
_SHINGLES_PER_UPDATE = 1024  # datasketch hashes a batch into a [shingles, bands * rows] array: 1 MB at a time
_MIN_RECENT = 4096  # keys the recent level holds before its first merge


def exact_key(text: str) -> int:
    """A 64-bit key of `text` ignoring case and whitespace differences."""
    digest = hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class MinHasher:
    """Band keys (uint64 [bands]) of a document's MinHash signature; the same for a given (bands, rows, seed)."""

    def __init__(self, bands: int, rows: int, seed: int = 1):
        from datasketch import MinHash  # imported on use: half a second, which `lmforge data --help` need not pay

        self.bands, self.rows, self.seed = bands, rows, seed
        self._minhash = MinHash
        self._permutations = MinHash(num_perm=bands * rows, seed=seed).permutations
        rng = np.random.default_rng(seed)
        self._mix = rng.integers(1, 2**63, size=rows, dtype=np.uint64) | np.uint64(1)  # odd multipliers

    def band_keys(self, text: str) -> np.ndarray:
        words = _WORDS.findall(text.lower())
        n = SHINGLE_WORDS
        shingles = {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
        signature = self._minhash(num_perm=self.bands * self.rows, seed=self.seed, permutations=self._permutations,
                            scheme="affine32")
        shingles = [s.encode("utf-8") for s in shingles]
        for start in range(0, len(shingles), _SHINGLES_PER_UPDATE):  # the minimum over any split is the same
            signature.update_batch(shingles[start:start + _SHINGLES_PER_UPDATE])
        with np.errstate(over="ignore"):
            rows = signature.hashvalues.astype(np.uint64).reshape(self.bands, self.rows)
            return (rows * self._mix).sum(axis=1, dtype=np.uint64)


class HashSet64:
    """A set of 64-bit keys at 8 bytes each: a large sorted array and a recent one at most an eighth its size (a
    two-level merge, so adding n keys copies each about eight times rather than n times)."""

    def __init__(self) -> None:
        self._main = np.empty(0, dtype=np.uint64)
        self._recent = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._main) + len(self._recent)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """A bool per key: was it added before?"""
        return _isin_sorted(keys, self._main) | _isin_sorted(keys, self._recent)

    def add(self, keys: np.ndarray) -> None:
        self._recent = np.union1d(self._recent, keys.astype(np.uint64))
        if len(self._recent) > max(_MIN_RECENT, len(self._main) // 8):
            self._main = np.union1d(self._main, self._recent)
            self._recent = np.empty(0, dtype=np.uint64)


def _isin_sorted(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    at = np.searchsorted(sorted_keys, keys).clip(max=max(len(sorted_keys) - 1, 0))
    return sorted_keys[at] == keys if len(sorted_keys) else np.zeros(len(keys), dtype=bool)

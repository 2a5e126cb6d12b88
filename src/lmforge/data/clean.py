"""`lmforge data clean`: Unicode normalisation, HTML stripping, Gopher quality rules, exact and near-duplicate removal.

Documents stream through in chunks: workers (one per core) normalise, strip and score a chunk each, while this process
takes the chunks back in input order, removes duplicates against every document kept so far and writes the kept ones.
At most two chunks per worker are in flight, so memory holds a few chunks of text plus the duplicate index (8 bytes
per key, 17 keys per kept document; see `lmforge.data.dedup`), however large the input. The output is a pure function
of the input and the options: the same whatever the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm import tqdm

from lmforge.data.dedup import HashSet64, MinHasher, exact_key
from lmforge.data.quality import QUALITY_RULES, QualityThresholds, first_failed_rule
from lmforge.data.readers import read_documents
from lmforge.data.text_cleaning import UNICODE_FORM, normalize_unicode, strip_html
from lmforge.errors import DataError
from lmforge.io import new_temp_dir, replace_dir, require_dir_path

TRANSFORMS = ("unicode", "html")
DEDUP_STEPS = ("exact_duplicates", "near_duplicates")
STEPS = (*TRANSFORMS, *QUALITY_RULES, *DEDUP_STEPS)
OUTPUT_FILE, SUMMARY_FILE = "clean.jsonl", "summary.json"
_EXAMPLE_CHARS = 160


@dataclass(frozen=True)
class CleanOptions:
    disabled: frozenset[str] = frozenset()  # names from STEPS
    limits: QualityThresholds = field(default_factory=QualityThresholds)
    bands: int = 16
    rows: int = 8
    seed: int = 1  # of the MinHash permutations
    workers: int = 0  # 0: one per core; 1: in this process
    chunk_docs: int = 256
    examples: int = 3  # removed documents shown per step

    def __post_init__(self) -> None:
        unknown = sorted(set(self.disabled) - set(STEPS))
        if unknown:
            raise DataError(f"unknown cleaning step {unknown[0]!r}; the steps are: {', '.join(STEPS)}")
        for name in ("bands", "rows", "chunk_docs"):
            if getattr(self, name) < 1:
                raise DataError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


@dataclass
class _Scored:
    """One document after the workers: its cleaned text, the quality rule it failed, its duplicate keys."""

    text: str
    changed: tuple[str, ...]  # transforms that changed it
    failed: str | None
    exact: int = 0
    bands: np.ndarray | None = None


_worker_state: tuple[CleanOptions, MinHasher] | None = None


def _init_worker(options: CleanOptions) -> None:
    global _worker_state
    _worker_state = (options, MinHasher(options.bands, options.rows, options.seed))


def _score_chunk(docs: list[str]) -> list[_Scored]:
    options, hasher = _worker_state
    enabled = set(STEPS) - options.disabled
    out = []
    for text in docs:
        changed = []
        for name, transform in (("unicode", normalize_unicode), ("html", strip_html)):
            if name in enabled:
                new = transform(text)
                if new != text:
                    changed.append(name)
                    text = new
        failed = "empty" if not text.strip() else first_failed_rule(text, enabled, options.limits)
        scored = _Scored(text, tuple(changed), failed)
        if failed is None:
            scored.exact = exact_key(text)
            if "near_duplicates" in enabled:
                scored.bands = hasher.band_keys(text)
        out.append(scored)
    return out


def _chunks(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _scored_chunks(docs: Iterable[str], options: CleanOptions) -> Iterator[list[_Scored]]:
    """The chunks scored by worker processes, in input order, with at most two per worker in flight."""
    workers = options.workers or os.cpu_count() or 1
    if workers == 1:
        _init_worker(options)
        yield from map(_score_chunk, _chunks(docs, options.chunk_docs))
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(options,)) as pool:
        pending = deque()
        for chunk in _chunks(docs, options.chunk_docs):
            pending.append(pool.apply_async(_score_chunk, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class _Tally:
    documents: int = 0
    characters: int = 0
    examples: list[str] = field(default_factory=list)

    def count(self, text: str, examples: int) -> None:
        self.documents += 1
        self.characters += len(text)
        if len(self.examples) < examples:
            short = " ".join(text.split())
            self.examples.append(short if len(short) <= _EXAMPLE_CHARS else short[:_EXAMPLE_CHARS - 3] + "...")


class _Deduplicator:
    """Keys of every kept document; `verdicts` takes a chunk's candidates in order: why each goes (None: kept)."""

    def __init__(self, options: CleanOptions):
        self.exact = None if "exact_duplicates" in options.disabled else HashSet64()
        self.near = None if "near_duplicates" in options.disabled else [HashSet64() for _ in range(options.bands)]

    def verdicts(self, docs: list[_Scored]) -> list[str | None]:
        if not docs:
            return []
        exact = np.array([d.exact for d in docs], dtype=np.uint64)
        seen_exact = self.exact.contains(exact) if self.exact is not None else None
        if self.near is not None:
            bands = np.stack([d.bands for d in docs])
            seen_near = np.any([band.contains(bands[:, b]) for b, band in enumerate(self.near)], axis=0)
            chunk_bands: list[set[int]] = [set() for _ in self.near]
        chunk_exact: set[int] = set()
        verdicts, kept = [], []
        for i, doc in enumerate(docs):
            if self.exact is not None and (seen_exact[i] or doc.exact in chunk_exact):
                verdicts.append("exact_duplicates")
            elif self.near is not None and (seen_near[i] or any(int(k) in s for k, s in zip(bands[i], chunk_bands,
                                                                                              strict=True))):
                verdicts.append("near_duplicates")
            else:
                verdicts.append(None)
                kept.append(i)
                chunk_exact.add(doc.exact)
                if self.near is not None:
                    for k, s in zip(bands[i], chunk_bands, strict=True):
                        s.add(int(k))
        if self.exact is not None:
            self.exact.add(exact[kept])
        if self.near is not None:
            for b, band in enumerate(self.near):
                band.add(bands[kept, b])
        return verdicts


def clean_documents(paths: Collection[str | Path], out_dir: str | Path, options: CleanOptions | None = None, *,
                    text_field: str = "text", skip_bad_lines: bool = False, progress: bool = True) -> dict:
    """Clean the documents of `paths` into `out_dir/clean.jsonl` ({"text": ...} lines) and `out_dir/summary.json`
    (also returned): what each step changed or removed, with the first removed documents as examples. `out_dir` is
    replaced whole, and only when the run completes."""
    options = options or CleanOptions()
    stream = read_documents(list(paths), text_field=text_field, skip_bad_lines=skip_bad_lines)
    out_dir = Path(out_dir)
    require_dir_path(out_dir, "--out")
    if out_dir.is_dir() and {p.name for p in out_dir.iterdir()} - {OUTPUT_FILE, SUMMARY_FILE}:
        raise DataError(f"--out {out_dir} holds files that `lmforge data clean` did not write; pass a new or empty "
                        "directory")
    tmp = new_temp_dir(out_dir.resolve())
    try:
        with open(tmp / OUTPUT_FILE, "w", encoding="utf-8") as out:
            summary = _run(stream, options, out, progress)
        stream.require_text()
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        replace_dir(tmp, out_dir.resolve())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _run(stream: Iterable[str], options: CleanOptions, out: TextIO, progress: bool) -> dict:
    dedup = _Deduplicator(options)
    modified = {name: 0 for name in TRANSFORMS if name not in options.disabled}
    removed: dict[str, _Tally] = {}
    total, kept = _Tally(), _Tally()
    with tqdm(desc="cleaning", unit="doc", disable=None if progress else True) as bar:
        for chunk in _scored_chunks(stream, options):
            candidates = [d for d in chunk if d.failed is None]
            verdicts = iter(dedup.verdicts(candidates))
            for doc in chunk:
                total.count(doc.text, 0)
                for name in doc.changed:
                    modified[name] += 1
                reason = doc.failed if doc.failed is not None else next(verdicts)
                if reason is None:
                    kept.count(doc.text, 0)
                    out.write(json.dumps({"text": doc.text}, ensure_ascii=False) + "\n")
                else:
                    removed.setdefault(reason, _Tally()).count(doc.text, options.examples)
            bar.update(len(chunk))
    order = ("empty", *QUALITY_RULES, *DEDUP_STEPS)
    return {
        "input_documents": total.documents, "kept_documents": kept.documents,
        "input_characters": total.characters, "kept_characters": kept.characters,
        "unicode_form": UNICODE_FORM, "modified": modified,
        "removed": {name: asdict(removed[name]) for name in order if name in removed},
        "disabled": sorted(options.disabled),
        "limits": asdict(options.limits), "minhash": {"bands": options.bands, "rows": options.rows,
                                                      "seed": options.seed},
    }


def summary_lines(summary: dict) -> list[str]:
    """The summary for a terminal: a line per step that changed or removed documents, with one example each."""
    lines = [f"kept {summary['kept_documents']:,} of {summary['input_documents']:,} documents "
             f"({summary['kept_characters']:,} of {summary['input_characters']:,} characters)"]
    for name, count in summary["modified"].items():
        lines.append(f"  {name:<18} changed {count:,} documents")
    for name, tally in summary["removed"].items():
        lines.append(f"  {name:<18} removed {tally['documents']:,} documents ({tally['characters']:,} characters), "
                     f"e.g. {tally['examples'][0]!r}")
    return lines

"""Tokenize a corpus once into flat binary token files (`train.bin`, `val.bin`) plus `index.json`.

Documents are tokenized in chunks (HF `tokenizers` uses every core), each followed by EOS, and
streamed to disk, so memory stays bounded by one chunk whatever the corpus size. Each document
goes to train or validation by a seeded hash of its index: the split is reproducible and needs no
pass over the data in advance. The whole directory is built under a temporary name beside the
output and renamed onto it only when complete, so bad input or a full disk leaves an existing
dataset as it was; `index.json` is written last, so a directory with an index is always complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from lmforge.data.readers import DocumentStream, read_documents
from lmforge.errors import ConfigError, DataError
from lmforge.io import new_temp_dir, raise_if_disk_full, replace_dir, require_dir_path
from lmforge.tokenizer import TOKENIZER_FILE, Tokenizer

INDEX_FILE = "index.json"
SPLITS = ("train", "val")
DATASET_FILES = (INDEX_FILE, TOKENIZER_FILE, *(f"{split}.bin" for split in SPLITS))
_PREPARE_HINT = "run `lmforge data prepare` to create it"


@dataclass
class ShardIndex:
    """What `index.json` records about a prepared directory (`directory` is where it was loaded from)."""

    directory: Path
    dtype: str
    vocab_size: int
    eos_id: int
    num_tokens: dict[str, int]
    num_documents: dict[str, int]
    skipped_lines: int
    sources: list[str]
    text_field: str
    seed: int
    val_fraction: float

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        del fields["directory"]
        return json.dumps(fields, indent=2) + "\n"

    def tokens(self, split: str) -> np.ndarray:
        """A read-only memmap of one split's token ids (an empty array for an empty split)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        path = self.directory / f"{split}.bin"
        if not path.is_file():
            raise DataError(f"token file not found: {path}; {_PREPARE_HINT}")
        dtype = np.dtype(self.dtype)
        count = self.num_tokens[split]
        size = path.stat().st_size
        if size != count * dtype.itemsize:
            raise DataError(
                f"{path} has {size} bytes but {self.directory / INDEX_FILE} says {count} {self.dtype} "
                f"tokens; the directory is corrupt, {_PREPARE_HINT} again"
            )
        if count == 0:
            empty = np.empty(0, dtype=dtype)
            empty.flags.writeable = False
            return empty
        return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def load_shards(directory: str | Path) -> ShardIndex:
    """Read `directory/index.json` written by `prepare_shards`."""
    directory = Path(directory)
    path = directory / INDEX_FILE
    if not path.is_file():
        raise DataError(f"shard index not found: {path}; {_PREPARE_HINT}")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        return ShardIndex(directory=directory, **fields)
    except (ValueError, TypeError) as e:
        raise DataError(f"{path} is not a valid shard index ({e}); {_PREPARE_HINT} again") from e


def split_scores(seed: int, doc_ids: np.ndarray) -> np.ndarray:
    """A uniform [0, 1) score per document, a pure function of (seed, id) (splitmix64 hash)."""
    with np.errstate(over="ignore"):
        x = doc_ids.astype(np.uint64) + np.uint64(seed % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        x ^= x >> np.uint64(31)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class _SplitWriter:
    """Writes documents to per-split files, making sure neither split ends up needlessly empty.

    While one split has no documents yet, the other holds back its document closest to the split
    boundary (instead of writing it), so at the end that document can still move across.
    """

    def __init__(self, files: dict[str, BinaryIO], val_fraction: float):
        self.files = files
        self.val_fraction = val_fraction
        self.docs = dict.fromkeys(SPLITS, 0)
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.held: dict[str, tuple[float, np.ndarray]] = {}

    def _write(self, split: str, doc: np.ndarray) -> None:
        self.files[split].write(doc.tobytes())
        self.docs[split] += 1
        self.tokens[split] += len(doc)

    def add(self, split: str, score: float, doc: np.ndarray) -> None:
        other = "val" if split == "train" else "train"
        if other in self.held:  # the other split now has a document of its own: release it
            self._write(other, self.held.pop(other)[1])
        if self.docs[other] > 0:
            self._write(split, doc)
            return
        # Train keeps the lowest-scoring document (the most val-like); val keeps the highest.
        held = self.held.get(split)
        if held is None or (score < held[0] if split == "train" else score > held[0]):
            if held is not None:
                self._write(split, held[1])
            self.held[split] = (score, doc)
        else:
            self._write(split, doc)

    def finish(self) -> None:
        """Place the held-back document: in the empty split if it may go there, else back home."""
        if not self.held:
            return
        home, (_, doc) = self.held.popitem()
        if self.docs["train"] == self.docs["val"] == 0 and self.val_fraction > 0 and len(doc) >= 4:
            # The only document (e.g. one .txt file): hold out its last val_fraction of tokens.
            cut = min(len(doc) - 1, max(1, round(len(doc) * (1 - self.val_fraction))))
            self._write("train", doc[:cut])
            self._write("val", doc[cut:])
        elif home == "val":  # train is empty: training needs data, so val gives one up
            self._write("train", doc)
        else:
            self._write("val" if self.val_fraction > 0 and self.docs["train"] >= 1 else "train", doc)


def prepare_shards(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    skip_bad_lines: bool = False,
    batch_docs: int = 1024,
    progress: bool = True,
) -> ShardIndex:
    """Tokenize the documents in `paths` into `out_dir/{train,val}.bin` + `index.json` + `tokenizer.json`.

    An existing `out_dir` must be empty or an earlier output of this function; it is replaced only on success."""
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"--val-fraction {val_fraction} is out of range: it is the share of documents held out for "
                          "validation, at least 0 and below 1 (1 would leave nothing to train on); e.g. 0.01")
    if batch_docs < 1:
        raise ValueError(f"batch_docs must be >= 1, got {batch_docs}")
    if tokenizer.eos_id is None:
        raise DataError(
            "the tokenizer has no end-of-sequence token; train one with `lmforge tokenizer train`"
        )
    stream = read_documents(paths, text_field=text_field, skip_bad_lines=skip_bad_lines)
    out_dir = Path(out_dir)
    _require_replaceable(out_dir)
    target = out_dir.resolve()  # a symlinked --out keeps its link: the dataset is replaced where it points
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    tmp, tally = None, _Tally()
    try:
        tmp = new_temp_dir(target)
        index = _build(stream, tokenizer, tmp, dtype, seed, val_fraction, batch_docs, progress, tally)
        replace_dir(tmp, target)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise_if_disk_full(exc, out_dir, tally.bytes_needed(stream.paths, dtype))
        raise
    index.directory = out_dir
    return index


def _require_replaceable(out_dir: Path) -> None:
    """An error unless `out_dir` is missing, empty, or holds only the files of an earlier `prepare_shards`."""
    require_dir_path(out_dir, "--out")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in DATASET_FILES) if out_dir.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise DataError(f"--out {out_dir} holds files that `lmforge data prepare` did not write ({shown}), and it "
                        "replaces the directory whole; pass a new or empty directory")


@dataclass
class _Tally:
    """Characters and tokens (EOS included) encoded so far: the basis of the size estimate when the disk is full."""

    characters: int = 0
    tokens: int = 0

    def bytes_needed(self, paths: Sequence[Path], dtype: np.dtype) -> int:
        """About how many bytes the token files take: the input's size in bytes times the tokens per character so far
        (before any encoding, one token per byte: byte-level BPE's most)."""
        input_bytes = sum(p.stat().st_size for p in paths if p.is_file())
        per_byte = self.tokens / max(self.characters, 1) if self.tokens else 1.0
        return int(max(input_bytes * per_byte, self.tokens) * dtype.itemsize)


def _build(stream: DocumentStream, tokenizer: Tokenizer, directory: Path, dtype: np.dtype, seed: int,
           val_fraction: float, batch_docs: int, progress: bool, tally: _Tally) -> ShardIndex:
    """Write the token files, tokenizer.json and (last) index.json of a new dataset into the new `directory` (plain
    writes: `replace_dir` fsyncs them before the directory is published)."""
    with open(directory / "train.bin", "wb") as ftrain, open(directory / "val.bin", "wb") as fval:
        writer = _SplitWriter({"train": ftrain, "val": fval}, val_fraction)
        with tqdm(desc="tokenizing", unit="doc", disable=None if progress else True) as bar:  # None: a terminal only
            chunk: list[str] = []
            for doc in stream:
                chunk.append(doc)
                if len(chunk) == batch_docs:
                    _write_chunk(chunk, stream.documents - len(chunk), tokenizer, writer, dtype, seed, tally)
                    bar.update(len(chunk))
                    chunk = []
            if chunk:
                _write_chunk(chunk, stream.documents - len(chunk), tokenizer, writer, dtype, seed, tally)
                bar.update(len(chunk))
        writer.finish()
    stream.require_text()
    (directory / TOKENIZER_FILE).write_text(tokenizer.backend.to_str(), encoding="utf-8")
    index = ShardIndex(
        directory=directory,
        dtype=dtype.name,
        vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        num_tokens=dict(writer.tokens),
        num_documents=dict(writer.docs),
        skipped_lines=stream.skipped,
        sources=[str(p) for p in stream.paths],
        text_field=stream.text_field,
        seed=seed,
        val_fraction=val_fraction,
    )
    (directory / INDEX_FILE).write_text(index.to_json(), encoding="utf-8")  # last: the directory is complete
    return index


def _write_chunk(docs: list[str], first_id: int, tokenizer: Tokenizer, writer: _SplitWriter, dtype: np.dtype, seed: int,
                 tally: _Tally) -> None:
    """Tokenize one chunk of documents and hand each (with EOS appended) to its split."""
    encoded = tokenizer.encode_batch(docs)
    tally.characters += sum(len(doc) for doc in docs)
    tally.tokens += sum(len(ids) + 1 for ids in encoded)
    scores = split_scores(seed, np.arange(first_id, first_id + len(docs)))
    is_val = scores < writer.val_fraction
    eos = [tokenizer.eos_id]
    for ids, score, val in zip(encoded, scores.tolist(), is_val.tolist(), strict=True):
        writer.add("val" if val else "train", score, np.array(ids + eos, dtype=dtype))

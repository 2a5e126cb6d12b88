"""Stream documents (plain strings) out of .txt, .jsonl and .parquet files.

Errors name the file (and line or row) and say how to fix it, so a bad line in a 50 GB corpus is
found without a debugger. Nothing reads a whole JSONL or Parquet file into memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lmforge.errors import DataError, one_line
from lmforge.io import read_utf8

SUPPORTED_EXTENSIONS = (".txt", ".jsonl", ".parquet")
_SKIP_HINT = "fix the line or pass --skip-bad-lines to skip it"
_PARQUET_BATCH_ROWS = 1024


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict | DataError]]:
    """("file:line", object) for each non-blank JSONL line; a line that is not a JSON object comes as a
    location-free DataError in place of the object, for the caller to raise or skip."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except ValueError as e:  # JSONDecodeError and invalid UTF-8 both land here
                yield where, DataError(f"invalid JSON ({e})")
                continue
            yield where, obj if isinstance(obj, dict) else DataError(
                f"expected a JSON object, got {type(obj).__name__}")


class DocumentStream:
    """An iterable of document strings; `documents`, `characters` and `skipped` count as it is iterated.

    Paths and extensions are checked up front; each new iteration starts the counters from zero.
    """

    def __init__(self, paths: Sequence[str | Path], text_field: str = "text", skip_bad_lines: bool = False):
        if isinstance(paths, (str, Path)):
            paths = [paths]
        if not paths:
            raise DataError("no input files given")
        self.paths = [Path(p) for p in paths]
        for path in self.paths:
            _check_path(path)
        self.text_field = text_field
        self.skip_bad_lines = skip_bad_lines
        self.documents = 0
        self.characters = 0
        self.skipped = 0

    def __iter__(self) -> Iterator[str]:
        self.documents = 0
        self.characters = 0
        self.skipped = 0
        for path in self.paths:
            suffix = path.suffix.lower()
            if suffix == ".txt":
                docs = _read_txt(path)
            elif suffix == ".jsonl":
                docs = self._read_jsonl(path)
            else:
                docs = self._read_parquet(path)
            for doc in docs:
                self.documents += 1
                self.characters += len(doc)
                yield doc

    def require_text(self) -> None:
        """DataError naming the files when the last pass found no documents, or only empty ones."""
        sources = ", ".join(str(p) for p in self.paths)
        if self.documents == 0:
            raise DataError(f"no documents in {sources} (skipped {self.skipped} bad lines)")
        if self.characters == 0:
            empty = "its only document is" if self.documents == 1 else f"all {self.documents} documents are"
            raise DataError(f"no text in {sources}: {empty} empty; give files with text")

    def _bad(self, message: str) -> None:
        """Count a bad line when skipping, else raise."""
        if not self.skip_bad_lines:
            raise DataError(f"{message}; {_SKIP_HINT}")
        self.skipped += 1

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        field = self.text_field
        for where, obj in jsonl_objects(path):
            if isinstance(obj, DataError):
                self._bad(f"{where}: {obj}")
                continue
            if field not in obj:
                keys = ", ".join(sorted(obj)[:10]) or "none"
                self._bad(f"{where}: missing field {field!r} (keys present: {keys})")
                continue
            text = obj[field]
            if not isinstance(text, str):
                self._bad(f"{where}: field {field!r} is {type(text).__name__}, expected a string")
                continue
            yield text

    def _read_parquet(self, path: Path) -> Iterator[str]:
        field = self.text_field
        try:
            pfile = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({one_line(e)})") from e
        schema = pfile.schema_arrow
        if field not in schema.names:
            raise DataError(
                f"{path}: no column {field!r}; the columns are: {', '.join(schema.names)} "
                f"(pass the right one with --text-field)"
            )
        ftype = schema.field(field).type
        types = pa.types
        if not (types.is_string(ftype) or types.is_large_string(ftype) or types.is_string_view(ftype)):
            raise DataError(f"{path}: column {field!r} has type {ftype}, expected a string column")
        row = 0
        for batch in pfile.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    self._bad(f"{path}: row {row}: {field!r} is null")
                    continue
                yield text


def _check_path(path: Path) -> None:
    if not path.exists():
        raise DataError(f"input file not found: {path}")
    if path.is_dir():
        raise DataError(f"input path is a directory, not a file: {path} (pass the files inside it)")
    if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"unsupported input file type {path.suffix or '(no extension)'!r}: {path}; "
            f"supported: {', '.join(SUPPORTED_EXTENSIONS)}"
        )


def _read_txt(path: Path) -> Iterator[str]:
    yield read_utf8(path, DataError)


def read_documents(
    paths: Sequence[str | Path], text_field: str = "text", skip_bad_lines: bool = False
) -> DocumentStream:
    """Documents from `paths`: a .txt file is one document, a .jsonl line or .parquet row is one."""
    return DocumentStream(paths, text_field=text_field, skip_bad_lines=skip_bad_lines)

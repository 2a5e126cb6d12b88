"""The document collection `lmforge rag index` reads: .txt and .md files (one document each, its id the path) and
.jsonl files (one document per line: {"text": ..., "id": ...}, the id defaulting to `path:line`), given as files or
directories (searched recursively)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.readers import jsonl_objects
from lmforge.errors import DataError
from lmforge.io import read_utf8

EXTENSIONS = (".txt", ".md", ".jsonl")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str  # file (and line) it came from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _files(paths: Sequence[str | Path]) -> list[Path]:
    files = []
    for given in map(Path, paths):
        if given.is_dir():
            files += sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
        elif not given.exists():
            raise DataError(f"document path not found: {given}")
        elif given.suffix.lower() not in EXTENSIONS:
            raise DataError(f"unsupported document type {given.suffix or '(no extension)'!r}: {given}; supported: "
                            f"{', '.join(EXTENSIONS)} files, or directories holding them")
        else:
            files.append(given)
    return files


def _jsonl_documents(path: Path) -> list[Document]:
    docs = []
    for where, obj in jsonl_objects(path):
        if isinstance(obj, DataError):
            raise DataError(f"{where}: {obj}")
        text = obj.get("text")
        if not isinstance(text, str):
            raise DataError(f"{where}: expected a string field 'text' (and optionally 'id'), got keys "
                            f"{', '.join(sorted(obj)) or 'none'}")
        docs.append(Document(str(obj.get("id", where.replace("\\", "/"))), text, where))
    return docs


def read_collection(paths: Sequence[str | Path]) -> list[Document]:
    """Every document under `paths`, in order; a DataError (one line) for an empty collection, a duplicate id, or a
    file that cannot be read."""
    docs: dict[str, Document] = {}
    for path in _files(paths):
        found = (_jsonl_documents(path) if path.suffix.lower() == ".jsonl"
                 else [Document(path.as_posix(), read_utf8(path, DataError), path.as_posix())])
        for doc in found:
            if doc.doc_id in docs:
                raise DataError(f"{doc.source}: document id {doc.doc_id!r} is also the id of "
                                f"{docs[doc.doc_id].source}; give every document its own id")
            docs[doc.doc_id] = doc
    if not any(doc.text.strip() for doc in docs.values()):
        what = f"{len(docs)} empty documents" if docs else f"no {', '.join(EXTENSIONS)} files"
        raise DataError(f"empty document collection: {', '.join(map(str, paths))} holds {what}; give files with text")
    return list(docs.values())

"""Indexing: files and directories -> sections -> chunks -> vectors -> the store, skipping what has not changed.

A file is identified by its absolute path and its content by a SHA-256 hash: an unchanged file is skipped, a
changed one has its chunks replaced, and a file indexed before under one of the given roots that is no longer
there has its chunks removed. Files that cannot be read are reported and skipped; the others are indexed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..embedding import Embedder, check_lengths, embed
from .chunks import chunk_sections
from .documents import SUFFIXES, DocumentError, read_document
from .store import Store

CHUNK_TOKENS = 200
CHUNK_OVERLAP = 40


@dataclass
class IndexReport:
    """What one indexing run did."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, why)
    empty: list[str] = field(default_factory=list)  # read, but no text in them (a scanned PDF without OCR)
    chunks: int = 0


def find_files(paths: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(the supported files under ``paths``, the directory roots given); a missing path is a ``DocumentError``."""
    files, roots = [], []
    for given in paths:
        path = Path(given).expanduser().resolve()
        if path.is_dir():
            roots.append(path)
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in SUFFIXES
                         and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            files.append(path)
        else:
            raise DocumentError(f"{given}: no such file or directory")
    return list(dict.fromkeys(files)), roots


def _count(embedder: Embedder):
    def count(texts: list[str]) -> list[int]:
        tokenizer = getattr(embedder, "hf_tokenizer", None)
        if tokenizer is not None:
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
        return [len(ids) for ids in embedder.tokenize(texts)]

    return count


def index_paths(store: Store, embedder: Embedder, paths: Iterable[str | Path], *, chunk_tokens: int = CHUNK_TOKENS,
                overlap: int = CHUNK_OVERLAP, progress: bool = True) -> IndexReport:
    """Bring ``store`` up to date with the files under ``paths``."""
    files, roots = find_files(list(paths))
    # Room for the embedder's own special tokens ([CLS]/[SEP], BOS) around each chunk.
    size = min(chunk_tokens, embedder.max_tokens - 2)
    count = _count(embedder)
    known = store.files()
    report = IndexReport()
    for path in tqdm(files, desc="indexing", unit="file", disable=not progress):
        key = str(path)
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            report.failed.append((key, exc.strerror or str(exc)))
            continue
        if known.get(key) == digest:
            report.unchanged.append(key)
            continue
        try:
            sections = read_document(path)
        except DocumentError as exc:
            report.failed.append((key, str(exc)))
            continue
        chunks = chunk_sections(sections, count, size=size, overlap=min(overlap, size // 2))
        ids = check_lengths(embedder.tokenize([c.embedded for c in chunks]), embedder.max_tokens, truncate=True)
        vectors = embed(embedder, ids).vectors.numpy() if chunks else None
        store.put_file(key, digest, [(c.headings, c.body) for c in chunks],
                       vectors if vectors is not None else _empty(embedder))
        (report.updated if key in known else report.added).append(key)
        if not chunks:
            report.empty.append(key)
        report.chunks += len(chunks)
        store.commit()  # per file: an interrupted run keeps what it finished
    present = {str(p) for p in files}
    for key in known:
        if key not in present and any(Path(key).is_relative_to(root) for root in roots) and not Path(key).exists():
            store.remove_file(key)
            report.removed.append(key)
    store.commit()
    return report


def _empty(embedder: Embedder):
    import numpy as np

    return np.zeros((0, embedder.dimensions), dtype=np.float32)

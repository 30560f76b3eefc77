"""Where chunks and their vectors live: one directory on disk, no server.

``LocalStore(directory)`` keeps the chunks, the files they came from (with content hashes) and the store's
settings in SQLite (``store.db``), and the vectors in a usearch HNSW index (``vectors.usearch``) keyed by chunk
id: approximate search that stays fast on large corpora, deletions by key, a single file saved atomically.
Why usearch: benchmarks/README.md, "Vector stores" (build time, query latency and recall@10 of the candidates
on 100k real chunks). Every vector is L2-normalised, so inner product is cosine similarity.

The ``Store`` protocol is what indexing and answering use, so another backend stands behind the same calls:
``QdrantStore`` keeps everything in a Qdrant collection, on a server (``--db qdrant:http://host:6333/NAME``)
for corpora that outgrow one machine, or in Qdrant's embedded local mode (``--db qdrant:DIRECTORY/NAME``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import Llama3Error

SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, hash TEXT NOT NULL, chunks INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL REFERENCES files(path) ON DELETE CASCADE,
    ordinal INTEGER NOT NULL,
    headings TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS chunks_by_path ON chunks(path);
"""


QDRANT_PREFIX = "qdrant:"


class StoreError(Llama3Error):
    """A store that cannot be opened or used as asked."""


@dataclass
class Hit:
    """A retrieved chunk and its cosine similarity to the question."""

    score: float
    path: str
    ordinal: int
    headings: tuple[str, ...]
    body: str

    @property
    def where(self) -> str:
        """The file and heading path, as listed under an answer."""
        return self.path + (" > " + " > ".join(self.headings) if self.headings else "")


class Store(Protocol):
    def files(self) -> dict[str, str]:
        """Indexed files: path -> content hash."""

    def put_file(self, path: str, digest: str, chunks: Sequence[tuple[tuple[str, ...], str]],
                 vectors: np.ndarray) -> None:
        """Replace ``path``'s chunks ((headings, body) each) and their vectors."""

    def remove_file(self, path: str) -> None: ...

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        """The ``k`` chunks most similar to ``vector``, best first."""

    def commit(self) -> None:
        """Make every change so far durable."""


def stored_settings(directory: str | Path) -> dict[str, str] | None:
    """The settings of the store ``directory`` names (its embedder, dimensions), or None when there is none yet."""
    if str(directory).startswith(QDRANT_PREFIX):
        return QdrantStore.settings(str(directory))
    path = Path(directory).expanduser() / "store.db"
    if not path.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return dict(db.execute("SELECT key, value FROM settings"))
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path} is not a usable store: {exc}") from None


class LocalStore:
    """SQLite + usearch in ``directory`` (created on first use). ``embedder``/``dimensions`` are checked against
    the store's own: vectors of another model would be silently meaningless."""

    def __init__(self, directory: str | Path, *, embedder: str, dimensions: int, create: bool = True) -> None:
        from usearch.index import Index

        self.directory = Path(directory).expanduser()
        db_path = self.directory / "store.db"
        if not db_path.is_file():
            if not create:
                raise StoreError(f"{self.directory} holds no index yet: run `llama3 rag index FILES --db "
                                 f"{self.directory}` first")
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the store directory {self.directory}: {exc.strerror}") from None
        try:
            self.db = sqlite3.connect(db_path, check_same_thread=False)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{db_path} is not a usable store: {exc}") from None
        settings = dict(self.db.execute("SELECT key, value FROM settings"))
        if not settings:
            self.db.executemany("INSERT INTO settings VALUES (?, ?)",
                                [("embedder", embedder), ("dimensions", str(dimensions))])
            self.db.commit()
        elif settings.get("embedder") != embedder or settings.get("dimensions") != str(dimensions):
            raise StoreError(f"{self.directory} was indexed with {settings.get('embedder')} "
                             f"({settings.get('dimensions')} dimensions), not {embedder}: use the same embedding "
                             "model, or index into a new --db")
        self.embedder, self.dimensions = embedder, dimensions
        self.index_path = self.directory / "vectors.usearch"
        self.index = Index(ndim=dimensions, metric="ip", dtype="f32", connectivity=32, expansion_add=128,
                           expansion_search=64)
        if self.index_path.is_file():
            try:
                self.index.load(str(self.index_path))
            except Exception as exc:  # noqa: BLE001 - a damaged index file: say which and how to recover
                raise StoreError(f"{self.index_path} is damaged ({exc}): delete {self.directory} and index again"
                                 ) from None

    def files(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT path, hash FROM files"))

    def _chunk_ids(self, path: str) -> list[int]:
        return [row[0] for row in self.db.execute("SELECT id FROM chunks WHERE path = ?", (path,))]

    def remove_file(self, path: str) -> None:
        ids = self._chunk_ids(path)
        if ids:
            self.index.remove(np.array(ids, dtype=np.uint64))
        self.db.execute("DELETE FROM files WHERE path = ?", (path,))  # its chunks go with it (cascade)

    def put_file(self, path: str, digest: str, chunks: Sequence[tuple[tuple[str, ...], str]],
                 vectors: np.ndarray) -> None:
        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        self.remove_file(path)
        self.db.execute("INSERT INTO files VALUES (?, ?, ?)", (path, digest, len(chunks)))
        ids = []
        for ordinal, (headings, body) in enumerate(chunks):
            cursor = self.db.execute("INSERT INTO chunks (path, ordinal, headings, body) VALUES (?, ?, ?, ?)",
                                     (path, ordinal, json.dumps(list(headings)), body))
            ids.append(cursor.lastrowid)
        if ids:
            self.index.add(np.array(ids, dtype=np.uint64), np.ascontiguousarray(vectors, dtype=np.float32))

    def commit(self) -> None:
        # The index first, through a temporary file: a crash leaves the old index or the new one, never half.
        tmp = self.index_path.with_suffix(".tmp")
        self.index.save(str(tmp))
        os.replace(tmp, self.index_path)
        self.db.commit()

    def __len__(self) -> int:
        return len(self.index)

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        if len(self.index) == 0 or k < 1:
            return []
        found = self.index.search(np.asarray(vector, dtype=np.float32), min(k, len(self.index)))
        keys, distances = np.asarray(found.keys), np.asarray(found.distances)
        rows = {row[0]: row[1:] for row in self.db.execute(
            f"SELECT id, path, ordinal, headings, body FROM chunks WHERE id IN ({','.join('?' * len(keys))})",
            [int(key) for key in keys])}
        hits = []
        for key, distance in zip(keys, distances):
            row = rows.get(int(key))
            if row is not None:  # (an id removed from SQLite after a crash between the two commits)
                path, ordinal, headings, body = row
                hits.append(Hit(1.0 - float(distance), path, ordinal, tuple(json.loads(headings)), body))
        return hits

    def close(self) -> None:
        self.db.close()


class QdrantStore:
    """The ``Store`` calls over one Qdrant collection: points carry their chunk (path, hash, ordinal, headings,
    body) as payload, and the collection's metadata records the embedder, checked as ``LocalStore`` does."""

    def __init__(self, spec: str, *, embedder: str, dimensions: int, create: bool = True) -> None:
        from qdrant_client import models

        self.spec = spec
        self.client, self.collection = self._connect(spec)
        self.remote = spec[len(QDRANT_PREFIX):].startswith(("http://", "https://"))
        try:
            exists = self.client.collection_exists(self.collection)
            if not exists:
                if not create:
                    raise StoreError(f"{spec} holds no index yet: run `llama3 rag index FILES --db {spec}` first")
                self.client.create_collection(
                    self.collection, vectors_config=models.VectorParams(size=dimensions, distance=models.Distance.COSINE),
                    metadata={"embedder": embedder, "dimensions": str(dimensions)})
                if self.remote:  # (Qdrant's embedded mode has no payload indexes and warns about them)
                    self.client.create_payload_index(self.collection, "path", models.PayloadSchemaType.KEYWORD)
            settings = self._metadata()
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - unreachable server, refused key...: name the store
            raise StoreError(f"cannot use the Qdrant store {spec}: {type(exc).__name__}: {exc}") from None
        if settings.get("embedder") != embedder or settings.get("dimensions") != str(dimensions):
            raise StoreError(f"{spec} was indexed with {settings.get('embedder')} ({settings.get('dimensions')} "
                             f"dimensions), not {embedder}: use the same embedding model, or another collection")

    @staticmethod
    def _connect(spec: str):
        from qdrant_client import QdrantClient

        location, _, collection = spec[len(QDRANT_PREFIX):].rstrip("/").rpartition("/")
        if not location or not collection:
            raise StoreError(f"--db {spec}: expected qdrant:http://HOST:PORT/COLLECTION or qdrant:DIRECTORY/COLLECTION")
        if location.startswith(("http://", "https://")):
            return QdrantClient(url=location, api_key=os.environ.get("QDRANT_API_KEY")), collection
        return QdrantClient(path=str(Path(location).expanduser())), collection

    def _metadata(self) -> dict[str, str]:
        return dict(self.client.get_collection(self.collection).config.metadata or {})

    @classmethod
    def settings(cls, spec: str) -> dict[str, str] | None:
        client, collection = cls._connect(spec)
        try:
            if not client.collection_exists(collection):
                return None
            return dict(client.get_collection(collection).config.metadata or {})
        except Exception as exc:  # noqa: BLE001
            raise StoreError(f"cannot use the Qdrant store {spec}: {type(exc).__name__}: {exc}") from None
        finally:
            client.close()

    def _path_filter(self, path: str):
        from qdrant_client import models

        return models.Filter(must=[models.FieldCondition(key="path", match=models.MatchValue(value=path))])

    def files(self) -> dict[str, str]:
        out, offset = {}, None
        while True:
            points, offset = self.client.scroll(self.collection, limit=1024, offset=offset,
                                                with_payload=["path", "hash"], with_vectors=False)
            out.update((p.payload["path"], p.payload["hash"]) for p in points)
            if offset is None:
                return out

    def remove_file(self, path: str) -> None:
        from qdrant_client import models

        self.client.delete(self.collection, points_selector=models.FilterSelector(filter=self._path_filter(path)),
                           wait=True)

    def put_file(self, path: str, digest: str, chunks: Sequence[tuple[tuple[str, ...], str]],
                 vectors: np.ndarray) -> None:
        from qdrant_client import models

        if len(chunks) != len(vectors):
            raise ValueError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        self.remove_file(path)
        points = [models.PointStruct(id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{path}#{i}")), vector=v.tolist(),
                                     payload={"path": path, "hash": digest, "ordinal": i, "headings": list(h),
                                              "body": body})
                  for i, ((h, body), v) in enumerate(zip(chunks, vectors))]
        if points:
            self.client.upsert(self.collection, points=points, wait=True)

    def commit(self) -> None:
        """Nothing to do: every write above waited for Qdrant's acknowledgement."""

    def __len__(self) -> int:
        return self.client.count(self.collection, exact=True).count

    def search(self, vector: np.ndarray, k: int) -> list[Hit]:
        if k < 1:
            return []
        found = self.client.query_points(self.collection, query=np.asarray(vector, dtype=np.float32).tolist(),
                                         limit=k, with_payload=True).points
        return [Hit(float(p.score), p.payload["path"], int(p.payload["ordinal"]), tuple(p.payload["headings"]),
                    p.payload["body"]) for p in found]

    def close(self) -> None:
        self.client.close()


def connect(db: str | Path, *, embedder: str, dimensions: int, create: bool) -> LocalStore | QdrantStore:
    """The store ``db`` names: ``qdrant:...`` (see ``QdrantStore``) or a directory (``LocalStore``)."""
    if str(db).startswith(QDRANT_PREFIX):
        return QdrantStore(str(db), embedder=embedder, dimensions=dimensions, create=create)
    return LocalStore(db, embedder=embedder, dimensions=dimensions, create=create)

"""Which vector store retrieval uses: candidate indexes on >= 100k real text chunks, measured in one run.

    python benchmarks/vector_stores.py                         # 100k chunks; embeddings cached in ~/.cache/llama3
    python benchmarks/vector_stores.py --chunks 20000 --queries 200

Corpus: docstring paragraphs of the Python packages installed here (the standard library first), text nobody
in this project wrote, embedded with all-MiniLM-L6-v2 (384 dimensions, L2-normalised). Queries: held-out
paragraphs of the same corpus. Ground truth: exact inner-product search (numpy). For every installed candidate:
build time, on-disk size, single-query latency (median and p95), and recall@10 against the exact top 10.
A candidate that is not installed is skipped with a message.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def corpus(limit: int) -> list[str]:
    """Unique docstring paragraphs (40-600 characters) of the standard library, then site-packages."""
    roots = [Path(re.__file__).parent] + [Path(p) for p in sys.path if p.endswith("site-packages")]
    out: list[str] = []
    seen: set[str] = set()
    for root in roots:
        for file in sorted(root.rglob("*.py")):
            try:
                tree = ast.parse(file.read_text(errors="ignore"))
            except (SyntaxError, ValueError, RecursionError):
                continue
            for node in ast.walk(tree):
                if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for para in (ast.get_docstring(node) or "").split("\n\n"):
                    para = " ".join(para.split())
                    if 40 <= len(para) <= 600 and para not in seen:
                        seen.add(para)
                        out.append(para)
                        if len(out) >= limit:
                            return out
    return out


def embeddings(texts: list[str], cache: Path) -> np.ndarray:
    if cache.is_file():
        vectors = np.load(cache)
        if len(vectors) == len(texts):
            return vectors
    from llama3.embedding import check_lengths, embed, load_embedder

    embedder = load_embedder("minilm")
    from tqdm import tqdm

    parts = []
    step = 2000
    for start in tqdm(range(0, len(texts), step), desc="embedding", unit_scale=step):
        ids = check_lengths(embedder.tokenize(texts[start:start + step]), embedder.max_tokens, truncate=True)
        parts.append(embed(embedder, ids).vectors.numpy())
    vectors = np.concatenate(parts).astype(np.float32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, vectors)
    return vectors


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    scores = queries @ base.T
    return np.argsort(-scores, axis=1)[:, :k]


def recall(found: list[np.ndarray], truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[: truth.shape[1]].tolist()) & set(t.tolist())) / truth.shape[1]
                          for f, t in zip(found, truth)]))


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# -- candidates: build(base, dir) -> search(query, k) -> ids ----------------------------------------------------


class Unavailable(Exception):
    """A candidate that cannot run here (the reason is printed)."""


def numpy_exact(base: np.ndarray, where: Path):
    path = where / "vectors.npy"
    np.save(path, base)
    mapped = np.load(path, mmap_mode="r")
    return path, lambda q, k: np.argsort(-(mapped @ q))[:k]


def sqlite_vec(base: np.ndarray, where: Path):
    import sqlite_vec

    path = where / "vec.db"
    db = sqlite3.connect(path)
    if not hasattr(db, "enable_load_extension"):
        raise Unavailable("this Python's sqlite3 was built without loadable extensions")
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{base.shape[1]}] distance_metric=cosine)")
    db.executemany("INSERT INTO v(rowid, embedding) VALUES (?, ?)", ((i, v.tobytes()) for i, v in enumerate(base)))
    db.commit()

    def search(q: np.ndarray, k: int) -> np.ndarray:
        rows = db.execute("SELECT rowid FROM v WHERE embedding MATCH ? AND k = ? ORDER BY distance",
                          (q.astype(np.float32).tobytes(), k)).fetchall()
        return np.array([r[0] for r in rows])

    return path, search


def faiss_hnsw(base: np.ndarray, where: Path):
    import faiss

    index = faiss.IndexHNSWFlat(base.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 128
    index.add(base)
    index.hnsw.efSearch = 64
    path = where / "hnsw.faiss"
    faiss.write_index(index, str(path))
    return path, lambda q, k: index.search(q[None], k)[1][0]


def faiss_ivf(base: np.ndarray, where: Path):
    import faiss

    nlist = int(4 * np.sqrt(len(base)))
    quantizer = faiss.IndexFlatIP(base.shape[1])
    index = faiss.IndexIVFFlat(quantizer, base.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(base)
    index.add(base)
    index.nprobe = 16
    path = where / "ivf.faiss"
    faiss.write_index(index, str(path))
    return path, lambda q, k: index.search(q[None], k)[1][0]


def usearch_hnsw(base: np.ndarray, where: Path, dtype: str = "f32"):
    from usearch.index import Index

    index = Index(ndim=base.shape[1], metric="ip", dtype=dtype, connectivity=32, expansion_add=128, expansion_search=64)
    index.add(np.arange(len(base)), base)
    path = where / f"usearch_{dtype}.usearch"
    index.save(str(path))
    view = Index.restore(str(path), view=True)  # memory-mapped from disk, as a store would open it

    def search(q: np.ndarray, k: int) -> np.ndarray:
        return np.asarray(view.search(q, k).keys)

    return path, search


CANDIDATES = {
    "numpy exact (mmap)": (numpy_exact, "numpy"),
    "sqlite-vec (exact)": (sqlite_vec, "sqlite_vec"),
    "faiss HNSW32": (faiss_hnsw, "faiss"),
    "faiss IVF-Flat": (faiss_ivf, "faiss"),
    "usearch HNSW32 f32": (usearch_hnsw, "usearch"),
    "usearch HNSW32 i8": (lambda b, w: usearch_hnsw(b, w, "i8"), "usearch"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "llama3" / "vector_stores")
    p.add_argument("--embed-only", action="store_true", help="compute and cache the embeddings, then stop")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    texts = corpus(args.chunks + args.queries)
    if len(texts) < args.chunks + args.queries:
        sys.exit(f"only {len(texts)} paragraphs found; ask for fewer --chunks")
    vectors = embeddings(texts, args.cache / f"minilm_{len(texts)}.npy")
    if args.embed_only:
        return
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    queries, base = vectors[order[: args.queries]], vectors[order[args.queries:]]
    truth = exact_top(base, queries, args.k)
    print(f"{len(base)} chunks x {base.shape[1]} dims (all-MiniLM-L6-v2 over docstring paragraphs), "
          f"{len(queries)} queries, recall@{args.k} against exact search; {os.cpu_count()} cores")
    print(f"{'store':22}{'build s':>9}{'disk MB':>9}{'p50 ms':>9}{'p95 ms':>9}{'recall':>8}")
    results = {}
    for name, (build, module) in CANDIDATES.items():
        try:
            __import__(module)
        except ImportError:
            print(f"{name:22}  skipped: {module} is not installed")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            try:
                path, search = build(base, Path(tmp))
            except Unavailable as exc:
                print(f"{name:22}  skipped: {exc}")
                continue
            built = time.perf_counter() - start
            size = dir_size(path) / 1e6
            search(queries[0], args.k)
            found, times = [], []
            for q in queries:
                t = time.perf_counter()
                found.append(np.asarray(search(q, args.k)))
                times.append(time.perf_counter() - t)
        lat = sorted(times)
        results[name] = {"build_s": built, "disk_mb": size, "p50_ms": 1e3 * statistics.median(lat),
                         "p95_ms": 1e3 * lat[int(0.95 * len(lat))], "recall": recall(found, truth)}
        r = results[name]
        print(f"{name:22}{r['build_s']:9.1f}{r['disk_mb']:9.0f}{r['p50_ms']:9.2f}{r['p95_ms']:9.2f}{r['recall']:8.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

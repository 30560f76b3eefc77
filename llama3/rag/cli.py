"""``llama3 rag index`` and ``llama3 rag ask``: a thin adapter over ``llama3.rag``."""

from __future__ import annotations

import argparse
import sys

from ..errors import Llama3Error
from ..options import add_model_arguments, add_sampling_arguments, build_llm

DEFAULT_DB = "~/.llama3/rag"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="rag_command", required=True, metavar="ACTION")
    index = sub.add_parser("index", help="chunk, embed and store files (re-running indexes only what changed)")
    index.add_argument("paths", nargs="+", help="files and directories (.txt .md .rst .html .htm .pdf)")
    index.add_argument("--db", default=DEFAULT_DB, help="the store: a directory (default %(default)s), or a Qdrant "
                       "collection: qdrant:http://HOST:6333/NAME (QDRANT_API_KEY) or qdrant:DIRECTORY/NAME")
    index.add_argument("--embed-model", default="minilm",
                       help="'minilm' (all-MiniLM-L6-v2, default), a sentence-transformers directory, or 'llama' "
                       "(the --model's mean-pooled hidden states)")
    index.add_argument("--chunk-tokens", type=int, default=200, help="embedding tokens per chunk (default %(default)s)")
    index.add_argument("--overlap", type=int, default=40, help="tokens shared by neighbouring chunks (default %(default)s)")
    index.add_argument("--no-progress", action="store_true")
    add_model_arguments(index)

    ask = sub.add_parser("ask", help="answer a question from the store, citing its sources")
    ask.add_argument("question")
    ask.add_argument("--db", default=DEFAULT_DB, help="the store directory (default %(default)s)")
    ask.add_argument("-k", "--top-k-chunks", dest="k", type=int, default=4, help="chunks to retrieve (default %(default)s)")
    ask.add_argument("--min-score", type=float, default=0.3,
                     help="leave out chunks less similar than this (cosine; default %(default)s: all-MiniLM-L6-v2 "
                     "scores unrelated text below it, and a small model follows whatever it is shown)")
    add_model_arguments(ask)
    add_sampling_arguments(ask, max_tokens=256)


def open_store(db: str, args: argparse.Namespace, llm=None, *, create: bool):
    """(store, embedder, llm) for ``db``; the model loads only if the store embeds with it."""
    from . import embedders

    loaded = [llm]

    def load_llm():
        if loaded[0] is None:
            loaded[0] = build_llm(args, announce=False)
        return loaded[0]

    store, embedder = embedders.open_store(db, embed_model=getattr(args, "embed_model", None) or "minilm",
                                           load_llm=load_llm, create=create)
    return store, embedder, loaded[0]


def run(args: argparse.Namespace) -> int:
    if args.rag_command == "index":
        return _index(args)
    return _ask(args)


def _index(args: argparse.Namespace) -> int:
    from .index import find_files, index_paths

    if args.chunk_tokens < 16 or not 0 <= args.overlap < args.chunk_tokens:
        raise Llama3Error(f"--chunk-tokens must be >= 16 and --overlap in 0..chunk-tokens-1 "
                          f"(got {args.chunk_tokens}, {args.overlap})")
    find_files(args.paths)  # a missing path fails before anything is loaded or created
    store, embedder, _ = open_store(args.db, args, create=True)
    try:
        report = index_paths(store, embedder, args.paths, chunk_tokens=args.chunk_tokens, overlap=args.overlap,
                             progress=not args.no_progress)
        total = len(store)
    finally:
        store.close()
    for path, why in report.failed:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    for path in report.empty:
        print(f"warning: {path} holds no text to index (a scanned PDF needs OCR first)", file=sys.stderr)
    print(f"{len(report.added)} added, {len(report.updated)} updated, {len(report.unchanged)} unchanged, "
          f"{len(report.removed)} removed, {len(report.failed)} failed; {report.chunks} chunks embedded; "
          f"{total} chunks in {args.db}")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from ..cli import sampling_kwargs
    from .answer import rag_answer

    if args.k < 1:
        raise Llama3Error(f"-k must be >= 1 (got {args.k})")
    store, embedder, llm = open_store(args.db, args, create=False)  # a missing store fails before the model loads
    try:
        llm = llm or build_llm(args)
        kwargs = sampling_kwargs(args)
        max_gen_len = kwargs.pop("max_gen_len") or 256
        result = rag_answer(llm, store, embedder, args.question, k=args.k, min_score=args.min_score,
                            max_gen_len=max_gen_len, **kwargs)
    finally:
        store.close()
    print(result.text.strip())
    if result.sources:
        print("\nSources:")
        for n, hit in enumerate(result.sources, 1):
            mark = "*" if n in result.cited else " "
            print(f"{mark}[{n}] {hit.where} (score {hit.score:.2f})")
    else:
        print("\n(no sources found)")
    if result.left_out:
        print(f"note: {result.left_out} retrieved chunk(s) did not fit in the context and were left out "
              "(raise --max-seq-len or lower -k)", file=sys.stderr)
    return 0

"""Which embedding model a store uses: chosen when it is created, recorded in it, and reloaded from it later.

A store's vectors mean something only to the model that made them, so ``open_store`` ignores what the caller
would pick for an existing store and loads the recorded one ("all-MiniLM-L6-v2", a sentence-transformers
directory, or "llama:POOLING:NAME:DIM" for the chat model's own pooled states).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..embedding import MINILM_NAME, Embedder, LlamaEmbedder, load_embedder
from .store import LocalStore, QdrantStore, StoreError, connect, stored_settings


def embedder_for(spec: str, load_llm: Callable[[], Any] | None = None) -> Embedder:
    """``spec``: "minilm", a sentence-transformers directory, or "llama[:mean|last]" (needs ``load_llm()``)."""
    if spec == "llama" or spec.startswith("llama:"):
        if load_llm is None:
            raise StoreError("this store was indexed with a Llama model's embeddings: pass the model to use")
        llm = load_llm()
        pooling = spec.split(":")[1] if ":" in spec else "mean"
        return LlamaEmbedder(llm.model, llm.tokenizer, pooling=pooling, max_tokens=llm.max_seq_len)
    return load_embedder(spec)


def recorded_name(embedder: Embedder) -> str:
    """What the store records about ``embedder`` (checked on every later use)."""
    if isinstance(embedder, LlamaEmbedder):
        return f"llama:{embedder.pooling}:{embedder.name}:{embedder.dimensions}"
    return embedder.name


def open_store(db: str | Path, *, embed_model: str = "minilm", load_llm: Callable[[], Any] | None = None,
               create: bool = False) -> tuple[LocalStore | QdrantStore, Embedder]:
    """The store in ``db`` and its embedder (a new store uses ``embed_model``; an existing one its own)."""
    settings = stored_settings(db)
    if settings is None and not create:
        raise StoreError(f"{db} holds no index yet: run `llama3 rag index FILES --db {db}` first")
    spec = embed_model
    if settings is not None:
        recorded = settings.get("embedder", "")
        if recorded.startswith("llama:"):
            spec = "llama:" + recorded.split(":")[1]
        elif recorded == MINILM_NAME:
            spec = "minilm"
        elif recorded != Path(embed_model).name:
            raise StoreError(f"{Path(db).expanduser()} was indexed with {recorded}: pass --embed-model with that "
                             "model's directory")
    embedder = embedder_for(spec, load_llm)
    store = connect(db, embedder=recorded_name(embedder), dimensions=embedder.dimensions, create=create)
    return store, embedder

"""``/v1/embeddings`` (OpenAI) and ``/api/embed``, ``/api/embeddings`` (Ollama) over one ``Embedder``.

The served Llama model embeds on the engine thread, between decoding steps (``Engine.call``), one bounded pass
at a time so streams keep flowing; a dedicated embedding model (``llama3 serve --embed-model``) runs in a worker
thread, one request's pass at a time. Inputs: a text, texts, token ids or lists of token ids (ids of the
embedding model's own vocabulary, used as given). Too-long inputs are a 400 (OpenAI) unless Ollama's
``truncate`` (default true there) asks to cut them.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from typing import Annotated, Any, Literal

import torch
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from ..embedding import Embedder, EmbeddingError, Embeddings, LlamaEmbedder, check_lengths, passes
from ..engine import EngineClosedError
from .errors import APIError
from .schemas import Text, TokenIds


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)] = Field(
        description="text, texts, token ids, or token id lists (ids of the embedding model's vocabulary)")
    model: str | None = Field(None, description="any name: this server embeds with one model")
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: Annotated[int, Field(ge=1)] | None = Field(
        None, description="only the model's own size is accepted (its vectors are not trained to be shortened)")
    user: str | None = None


class OllamaEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: Text | Annotated[list[Text], Field(min_length=1)] = Field(description="a text or texts")
    truncate: bool = Field(True, description="cut inputs longer than the model's limit (false: a 400)")
    dimensions: Annotated[int, Field(ge=1)] | None = None


class OllamaLegacyEmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str = Field(description="the text")


class EmbeddingService:
    """Checks, tokenizes and embeds requests with ``embedder``; Llama passes go through ``engine.call``."""

    def __init__(self, embedder: Embedder, engine: Any) -> None:
        self.embedder, self.engine = embedder, engine
        self.on_engine = isinstance(embedder, LlamaEmbedder)
        self._lock = threading.Lock()  # one pass at a time on a dedicated model (its threads are the CPU's)

    def ids(self, inputs: str | list, truncate: bool) -> list[list[int]]:
        if isinstance(inputs, str):
            inputs = [inputs]
        if all(isinstance(x, int) for x in inputs):
            ids = [list(inputs)]
        elif all(isinstance(x, list) for x in inputs):
            ids = [list(x) for x in inputs]
        else:
            ids = self.embedder.tokenize(inputs)
        self.embedder.check_ids(ids)
        return check_lengths(ids, self.embedder.max_tokens, truncate)

    async def embed(self, inputs: str | list, *, truncate: bool = False, dimensions: int | None = None) -> Embeddings:
        if dimensions is not None and dimensions != self.embedder.dimensions:
            raise APIError(400, f"dimensions={dimensions}: {self.embedder.name} gives {self.embedder.dimensions}-"
                           "dimensional vectors and cannot shorten them", param="dimensions")
        try:
            ids = await asyncio.to_thread(self.ids, inputs, truncate)
        except EmbeddingError as exc:
            raise APIError(400, str(exc), param="input") from None
        vectors = torch.empty(len(ids), self.embedder.dimensions)
        for group in passes(ids):
            batch = [ids[i] for i in group]
            vectors[group] = await self._pass(batch)
        return Embeddings(vectors, sum(len(row) for row in ids))

    async def _pass(self, batch: list[list[int]]) -> torch.Tensor:
        if self.on_engine:
            try:
                return await self.engine.call(lambda: self.embedder.embed_tokens(batch))
            except EngineClosedError as exc:
                raise APIError(503, str(exc), code="engine_closed") from None

        def run() -> torch.Tensor:
            with self._lock:
                return self.embedder.embed_tokens(batch)

        return await asyncio.to_thread(run)


def _encode(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


class _Unavailable:
    """Embedding routes of a server with no embedder: a tensor-parallel model without ``--embed-model``."""

    on_engine = True

    async def embed(self, *args: Any, **kwargs: Any) -> Embeddings:
        raise APIError(501, "embeddings from a tensor-parallel model are not supported yet: start the server with "
                       "--embed-model (for example --embed-model minilm)")


def install_embedding_routes(app: FastAPI, service: EmbeddingService | None, model_name: str) -> None:
    """``/v1/embeddings``, ``/api/embed`` and ``/api/embeddings`` answered by ``service`` (None: a 501)."""
    service = service or _Unavailable()
    name = model_name if service.on_engine else service.embedder.name

    @app.post("/v1/embeddings", summary="Embeddings (OpenAI API)")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        result = await service.embed(req.input, dimensions=req.dimensions)
        data = [{"object": "embedding", "index": i, "embedding": _encode(v, req.encoding_format)}
                for i, v in enumerate(result.vectors)]
        return {"object": "list", "data": data, "model": name,
                "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}

    @app.post("/api/embed", summary="Embeddings (Ollama API)")
    async def ollama_embed(req: OllamaEmbedRequest) -> dict[str, Any]:
        start = time.perf_counter_ns()
        result = await service.embed(req.input, truncate=req.truncate, dimensions=req.dimensions)
        return {"model": req.model or name, "embeddings": result.vectors.tolist(),
                "total_duration": time.perf_counter_ns() - start, "load_duration": 0,
                "prompt_eval_count": result.tokens}

    @app.post("/api/embeddings", summary="Embeddings (Ollama's older route)")
    async def ollama_embeddings(req: OllamaLegacyEmbedRequest) -> dict[str, Any]:
        if not req.prompt:
            return {"embedding": []}  # as Ollama answers an empty prompt
        result = await service.embed(req.prompt, truncate=True)
        return {"embedding": result.vectors[0].tolist()}


"""The FastAPI application: OpenAI's routes over a running ``Engine``.

Routes: ``GET /`` (the web chat page, ``web/``), ``GET /health``, ``GET /metrics`` (Prometheus), Ollama's ``/api/*`` (``ollama.py``), ``GET /v1/models``, ``GET /v1/models/{id}``,
``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as server-sent events), plus FastAPI's
``/openapi.json`` and ``/docs``.
Handlers only validate, submit and reshape; generation happens on the engine's thread. A client that goes
away cancels its sequences: streaming responses notice when the connection closes, non-streaming ones poll.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from .. import __version__
from ..embedding import Embedder, LlamaEmbedder
from ..engine import Delta, Engine, EngineClosedError, QueueFullError, Submission
from ..errors import TokenizerError
from .errors import APIError, APIKeyMiddleware, PreflightMiddleware, error_body, install_error_handlers
from .metrics import CONTENT_TYPE_LATEST, Metrics, MetricsMiddleware
from .ollama import Backend as OllamaBackend
from .ollama import install_ollama_routes
from .openapi import install_openapi
from .protocol import (
    LogprobFormatter,
    Plan,
    chat_plan,
    completion_plan,
    completion_prompts,
    dialog_from_messages,
    finish_reason,
    new_id,
    now,
    usage,
)  # fmt: skip
from .embeddings import EmbeddingService, install_embedding_routes
from .schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from .tool_calls import ChatTools

DISCONNECT_POLL_S = 0.25


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


@asynccontextmanager
async def _watching(request: Request, submission: Submission) -> AsyncIterator[None]:
    """Cancel ``submission`` if the client disconnects (or this handler is cancelled) before it is done."""

    async def watch() -> None:
        while not submission.done:
            if await request.is_disconnected():
                submission.cancel()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        if not submission.done:
            submission.cancel()


class _Choice:
    """Accumulates one sequence's output for a non-streaming response."""

    def __init__(self) -> None:
        self.text, self.logprobs = "", []
        self.finish: str | None = None
        self.tokens, self.error, self.error_kind = 0, None, None

    def add(self, delta: Delta) -> None:
        self.text += delta.text
        self.logprobs += delta.logprobs
        if delta.finish_reason is not None:
            self.finish, self.tokens, self.error = delta.finish_reason, delta.completion_tokens, delta.error
            self.error_kind = delta.error_kind


def generation_error(message: str, kind: str | None, engine_alive: bool) -> APIError:
    """The HTTP error for a sequence that ended with an error: the request's fault is a 400, a shutdown a 503."""
    if kind == "request":
        return APIError(400, message, code="invalid_value")
    if kind == "shutdown" or not engine_alive:
        return APIError(503, message, code="shutting_down" if kind == "shutdown" else "engine_closed")
    return APIError(500, message, type="server_error")


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, adapters: Sequence[str] = (),
               cors_origins: Sequence[str] = (), model_path: Path | None = None, embedder: Embedder | None = None,
               pooling: str = "mean") -> FastAPI:
    """The server for ``engine``; the engine is started with the app and stopped when it shuts down.

    ``adapters``: names of the LoRA adapters loaded into the engine's model; a request whose ``model`` is one of
    them runs with it (in the same batches as the others), any other ``model`` with the base model.
    ``cors_origins``: browser origins allowed to call the API ("*" for any); none by default. ``model_path``: the
    checkpoint served, for Ollama's model listings (size, quantization). ``embedder``: what answers the embedding
    routes (default: the served model's hidden states, pooled by ``pooling``, computed between decoding steps).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)

    app = FastAPI(
        title="llama3 OpenAI-compatible server",
        version=__version__,
        description=f"Serves {model_name} with OpenAI's completions and chat completions API.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    install_openapi(app, api_key=bool(api_key))
    metrics = Metrics(engine, model_name)
    if engine.observer is None:
        engine.observer = metrics
    # Each add_middleware wraps the ones before it: CORS outermost (its headers reach even a 401, and it answers
    # preflights before any key is asked for), then the request counter (which sees the 401s), then the key.
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"],
                           max_age=600)
    else:
        app.add_middleware(PreflightMiddleware)
    created = now()
    # Which build answered (OpenAI's system_fingerprint): changes with the engine version or the model served.
    fingerprint = "fp_" + hashlib.sha256(f"{__version__}:{model_name}".encode()).hexdigest()[:10]
    tokenizer = engine.tokenizer
    formatter = LogprobFormatter(tokenizer)

    def served(requested: str | None) -> tuple[str | None, str]:
        """(adapter, the name answers report) for a request's ``model``. Without adapters any name is the one
        model (clients must send some name); with adapters a name that is neither is a 404, as in vLLM, so a
        typo never silently answers with the base model."""
        if requested in adapters:
            return requested, requested
        if adapters and requested not in (None, model_name):
            served_names = ", ".join(repr(n) for n in (model_name, *adapters))
            raise APIError(404, f"model {requested!r} does not exist (this server serves {served_names})",
                           param="model", code="model_not_found")
        return None, model_name

    def submit(plan: Plan, adapter: str | None) -> Submission:
        specs = [dataclasses.replace(spec, adapter=adapter) for spec in plan.specs] if adapter else plan.specs
        try:
            return engine.submit(specs)
        except QueueFullError as exc:
            # Retry-After lets clients (the OpenAI SDK among them) back off before retrying.
            raise APIError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineClosedError as exc:
            raise APIError(503, str(exc), code="engine_closed") from None

    async def collect(request: Request, submission: Submission) -> list[_Choice]:
        choices = [_Choice() for _ in submission.sequences]
        async with _watching(request, submission):
            async for index, delta in submission.events():
                choices[index].add(delta)
        failed = next((c for c in choices if c.finish == "error"), None)
        if failed is not None:
            raise generation_error(failed.error or "generation failed", failed.error_kind, engine.alive)
        return choices

    def streaming(events: AsyncIterator[str], submission: Submission) -> StreamingResponse:
        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
                yield "data: [DONE]\n\n"
            finally:  # the client went away (the response is cancelled) or we are done
                if not submission.done:
                    submission.cancel()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(body(), media_type="text/event-stream", headers=headers)

    async def chunks(submission: Submission, plan: Plan, make: Callable[..., Any],
                     first: Callable[[int], dict[str, Any] | None]) -> AsyncIterator[str]:
        """SSE events of a streaming response: per delta ``make(index, delta)``, then the usage chunk."""
        for index in range(len(plan.specs)):
            opening = first(index)
            if opening is not None:
                yield sse(opening)
        completion_tokens = 0
        async for index, delta in submission.events():
            if delta.error:
                error = generation_error(delta.error, delta.error_kind, engine.alive)
                yield sse(error_body(error.message, error.type, code=error.code))
                continue
            if delta.text or delta.logprobs or finish_reason(delta):
                event = make(index, delta)
                # None: nothing to send yet (text held back); a list: the last text, then OpenAI's final chunk
                for item in event if isinstance(event, list) else [event] if event is not None else []:
                    yield sse(item)
            if delta.finish_reason is not None:
                completion_tokens += delta.completion_tokens
        if plan.include_usage:
            yield sse(make(None, None) | {"choices": [], "usage": usage(plan.prompt_tokens, completion_tokens)})

    if embedder is None and engine.world is None:
        embedder = LlamaEmbedder(engine.model, tokenizer, pooling=pooling, name=model_name,
                                 max_tokens=engine.max_seq_len)
    install_embedding_routes(app, EmbeddingService(embedder, engine) if embedder is not None else None, model_name)
    install_ollama_routes(app, OllamaBackend(engine, model_name, tuple(adapters), model_path, served, submit,
                                             _watching, generation_error))

    web = Path(__file__).with_name("web")
    app.mount("/web", StaticFiles(directory=web), name="web")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        # The page is public (it holds no secret); its API calls carry the key it asks the user for.
        return FileResponse(web / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", summary="Liveness and load")
    async def health() -> dict[str, Any]:
        if not engine.alive:
            raise APIError(503, "the generation engine is not running", code="engine_closed")
        if engine.draining:  # load balancers stop sending work here while running requests finish
            raise APIError(503, "the server is shutting down", code="shutting_down")
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models", response_model=ModelList, summary="The served model")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)]
                         + [ModelCard(id=name, created=created, parent=model_name) for name in adapters])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, summary="One model")
    async def get_model(model_id: str) -> ModelCard:
        if model_id in adapters:
            return ModelCard(id=model_id, created=created, parent=model_name)
        if model_id != model_name:
            served_names = ", ".join(repr(n) for n in (model_name, *adapters))
            raise APIError(404, f"model {model_id!r} does not exist (this server serves {served_names})",
                           param="model", code="model_not_found")
        return ModelCard(id=model_name, created=created)

    @app.post("/v1/chat/completions", summary="Chat completion (OpenAI API)")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        dialog = dialog_from_messages(req.messages)
        tools = ChatTools.of(req)
        try:
            prompt = await asyncio.to_thread(tokenizer.encode_dialog_prompt, dialog, tools=tools.tools or None)
        except TokenizerError as exc:
            raise APIError(400, str(exc), param="messages") from None
        plan = chat_plan(req, prompt, engine.max_seq_len, engine.vocab_size, tool_grammar=tools.grammar)
        adapter, answered_by = served(req.model)
        submission = submit(plan, adapter)
        rid, stamp = new_id("chatcmpl"), now()
        base = {"id": rid, "created": stamp, "model": answered_by, "system_fingerprint": fingerprint}

        if req.stream:
            extra = {"usage": None} if plan.include_usage else {}
            calls = [tools.stream() for _ in plan.specs]

            def chunk(index: int | None, delta, content: dict | None = None) -> dict[str, Any] | None:
                if index is None:
                    return {**base, "object": "chat.completion.chunk"}
                finish = finish_reason(delta) if delta is not None else None
                if content is None:
                    text = calls[index].feed(delta.text)
                    content = {"content": text} if text or delta.logprobs else {}
                    if finish is not None:
                        held, tool_calls = calls[index].finish()
                        if tool_calls:
                            content, finish = {"tool_calls": tool_calls}, "tool_calls"
                        elif held:
                            content = {"content": content.get("content", "") + held}
                logprobs = delta.logprobs if delta is not None and req.logprobs else None
                if not content and not logprobs and finish is None:
                    return None  # a held-back tool call: nothing to send yet
                choice = {"index": index, "delta": content,
                          "logprobs": formatter.chat(logprobs) if logprobs else None, "finish_reason": finish}
                event = {**base, "object": "chat.completion.chunk", "choices": [choice], **extra}
                if finish is None or not (content or logprobs):
                    return event
                # OpenAI ends a choice with a chunk of its own: an empty delta and the finish reason.
                last = {**base, "object": "chat.completion.chunk", **extra,
                        "choices": [{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]}
                choice["finish_reason"] = None
                return [event, last]

            def opening(index: int) -> dict[str, Any]:
                return chunk(index, None, {"role": "assistant", "content": ""})

            return streaming(chunks(submission, plan, chunk, opening), submission)

        choices = await collect(request, submission)
        answers = [tools.message(c.text, c.finish) for c in choices]
        return {
            **base,
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": message,
                 "logprobs": formatter.chat(c.logprobs) if req.logprobs else None, "finish_reason": finish}
                for i, (c, (message, finish)) in enumerate(zip(choices, answers))
            ],
            "usage": usage(plan.prompt_tokens, sum(c.tokens for c in choices)),
        }

    @app.post("/v1/completions", summary="Text completion (OpenAI legacy API)")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        try:
            prompts = await asyncio.to_thread(completion_prompts, req.prompt, tokenizer, engine.vocab_size)
        except TokenizerError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        plan = completion_plan(req, prompts, engine.max_seq_len, engine.vocab_size)
        adapter, answered_by = served(req.model)
        submission = submit(plan, adapter)
        rid, stamp = new_id("cmpl"), now()
        base = {"id": rid, "object": "text_completion", "created": stamp, "model": answered_by,
                "system_fingerprint": fingerprint}
        per_prompt = req.n or 1
        echoes = [tokenizer.decode(p) if req.echo else "" for p in prompts]
        want_logprobs = req.logprobs is not None

        if req.stream:
            extra = {"usage": None} if plan.include_usage else {}
            offsets = [len(echoes[i // per_prompt]) for i in range(len(plan.specs))]

            def chunk(index: int | None, delta, text: str | None = None) -> dict[str, Any]:
                if index is None:
                    return dict(base)
                logprobs = None
                if want_logprobs and delta is not None:
                    logprobs = formatter.legacy(delta.logprobs, offsets[index])
                    offsets[index] += sum(len(e.text) for e in delta.logprobs)
                finish = finish_reason(delta) if delta is not None else None
                choice = {"index": index, "text": delta.text if text is None else text, "logprobs": logprobs,
                          "finish_reason": finish}
                event = {**base, "choices": [choice], **extra}
                if finish is None or not (choice["text"] or logprobs):
                    return event
                choice["finish_reason"] = None  # as OpenAI: the last text, then a chunk with the finish reason
                last = {"index": index, "text": "", "logprobs": None, "finish_reason": finish}
                return [event, {**base, "choices": [last], **extra}]

            def opening(index: int) -> dict[str, Any] | None:
                echo = echoes[index // per_prompt]
                return chunk(index, None, echo) if echo else None

            return streaming(chunks(submission, plan, chunk, opening), submission)

        choices = await collect(request, submission)
        out = []
        for i, c in enumerate(choices):
            echo = echoes[i // per_prompt]
            logprobs = formatter.legacy(c.logprobs, len(echo)) if want_logprobs else None
            out.append({"index": i, "text": echo + c.text, "logprobs": logprobs, "finish_reason": c.finish})
        return {**base, "choices": out, "usage": usage(plan.prompt_tokens, sum(c.tokens for c in choices))}

    return app

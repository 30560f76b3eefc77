"""Ollama's API (``/api/*``) over the same engine, for Ollama clients and the tools built on them.

Requests are translated into the OpenAI requests of ``app.py`` (one validation, one plan, one engine), and
answers back into Ollama's shapes: NDJSON streaming (``stream`` defaults to true, as in Ollama), durations in
nanoseconds, ``done_reason``, and errors as ``{"error": "..."}`` with Ollama's status codes.

Options: temperature, top_p, top_k, min_p, num_predict (-1 and -2: until the context is full), stop, seed,
repeat_penalty, presence_penalty, frequency_penalty, and num_ctx as a checked limit (more than the server's
context is a 400). Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9) except
repeat_penalty: Ollama penalises only the last 64 tokens, this engine the whole context, so it stays off
unless asked for. ``format``: "json" or a JSON schema, enforced through the structured-output path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import __version__
from ..errors import TokenizerError
from .errors import APIError, validation_error
from .protocol import chat_plan, completion_plan, completion_prompts, dialog_from_messages, finish_reason
from .schemas import ChatCompletionRequest, CompletionRequest

OLLAMA_DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
FILL_CONTEXT = (-1, -2)  # num_predict: Ollama's "no limit" and "fill the context"


class Options(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Ollama clients send load-time options (num_gpu, use_mmap ...) too
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(_Request):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    context: list[int] | None = None
    images: list[str] | None = None


class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients' field


@dataclass
class Backend:
    """What the Ollama routes need from the app: the engine's plumbing, as closures over its state."""

    engine: Any
    model_name: str
    adapters: tuple[str, ...]
    model_path: Path | None
    served: Callable[[str | None], tuple[str | None, str]]
    submit: Callable[..., Any]
    watching: Callable[..., Any]
    generation_error: Callable[[str, str | None, bool], APIError]


def ollama_error(error: APIError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


def _stamp() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _sampling(req: _Request, context: int) -> dict[str, Any]:
    """OpenAI request fields for Ollama's options and format."""
    opts = req.options or Options()
    if opts.num_ctx is not None and not 1 <= opts.num_ctx <= context:
        raise APIError(400, f"options.num_ctx={opts.num_ctx}: this server's context is {context} tokens "
                       f"(llama3 serve --max-seq-len); ask for at most that")
    fields: dict[str, Any] = dict(OLLAMA_DEFAULTS)
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty", "stop"):
        value = getattr(opts, name)
        if value is not None:
            fields[name] = value
    if opts.repeat_penalty is not None and opts.repeat_penalty != 1.0:
        fields["repetition_penalty"] = opts.repeat_penalty
    if opts.num_predict is not None and opts.num_predict not in FILL_CONTEXT:
        if opts.num_predict < 1:
            raise APIError(400, f"options.num_predict={opts.num_predict}: must be >= 1, or -1 / -2 for no limit")
        fields["max_tokens"] = opts.num_predict
    if fields.get("top_k") == 0:
        fields.pop("top_k")  # Ollama's 0: off
    if req.format == "json":
        fields["response_format"] = {"type": "json_object"}
    elif isinstance(req.format, dict):
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": req.format}}
    elif req.format not in (None, ""):
        raise APIError(400, f"format={req.format!r}: use \"json\" or a JSON schema object")
    return fields


def _validated(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        from fastapi.exceptions import RequestValidationError

        error = validation_error(RequestValidationError(exc.errors()))
        raise APIError(400, error.message.replace("invalid ", "invalid options.", 1)) from None


def _size_label(params: int) -> str:
    return f"{params / 1e9:.1f}B" if params >= 1e9 else f"{round(params / 1e6)}M"


def install_ollama_routes(app: FastAPI, api: Backend) -> None:
    """Add ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/version`` and
    to ``app`` (``/api/embed`` lives in ``embeddings.py``)."""
    engine = api.engine
    tokenizer = engine.tokenizer
    model = engine.model
    config = model.config
    params = sum(p.numel() for p in model.parameters()) + sum(
        m.in_features * m.out_features for m in model.modules() if getattr(m, "is_quantized", False)
        and hasattr(m, "in_features"))  # quantized matrices hold their weights as blocks, not parameters
    stat = api.model_path.stat() if api.model_path is not None and api.model_path.is_file() else None
    size = stat.st_size if stat else params * model.norm.weight.element_size()
    # Not a hash of the whole file (gigabytes): of its name, size and time, enough to tell two files apart.
    digest = hashlib.sha256(f"{api.model_path}:{size}:{stat.st_mtime if stat else 0}".encode()).hexdigest()
    quant = _quantization(api.model_path)
    details = {"parent_model": "", "format": "gguf" if quant else "safetensors", "family": "llama",
               "families": ["llama"], "parameter_size": _size_label(params), "quantization_level": quant or "F32"}
    modified = datetime.fromtimestamp(stat.st_mtime if stat else time.time(), timezone.utc).isoformat()

    def names() -> list[str]:
        return [api.model_name, *api.adapters]

    def card(name: str) -> dict[str, Any]:
        return {"name": name, "model": name, "modified_at": modified, "size": size, "digest": digest,
                "details": {**details, "parent_model": api.model_name if name in api.adapters else ""}}

    def resolve(requested: str | None) -> tuple[str | None, str]:
        bare = (requested or "").removesuffix(":latest")
        return api.served(bare or None)

    def duration(start: float) -> int:
        return int((time.perf_counter() - start) * 1e9)

    async def run(request: Request, req: _Request, plan: Any, adapter: str | None, answered: str, *, chat: bool,
                  prompt_ids: list[int] | None) -> Any:
        start = time.perf_counter()
        submission = api.submit(plan, adapter)
        prompt_tokens = plan.prompt_tokens

        def piece(text: str) -> dict[str, Any]:
            body: dict[str, Any] = {"model": answered, "created_at": _stamp()}
            if chat:
                body["message"] = {"role": "assistant", "content": text}
            else:
                body["response"] = text
            return body | {"done": False}

        def final(text: str, reason: str | None, tokens: int, first_at: float | None, generated: list[int]) -> dict:
            body = piece(text) | {"done": True, "done_reason": reason or "stop"}
            eval_ns = duration(first_at) if first_at is not None else 0
            body |= {"total_duration": duration(start), "load_duration": 0, "prompt_eval_count": prompt_tokens,
                     "prompt_eval_duration": max(0, duration(start) - eval_ns), "eval_count": tokens,
                     "eval_duration": eval_ns}
            if not chat and prompt_ids is not None:
                body["context"] = [*prompt_ids, *generated]
            return body

        async def events() -> AsyncIterator[tuple[str, Any]]:
            async with api.watching(request, submission):
                async for _, delta in submission.events():
                    yield "delta", delta

        def generated_ids() -> list[int]:
            seq = submission.sequences[0]
            return seq.kept_tokens()

        if req.stream:
            async def lines() -> AsyncIterator[str]:
                first_at = None
                try:
                    async for _, delta in events():
                        if delta.error:
                            error = api.generation_error(delta.error, delta.error_kind, engine.alive)
                            yield json.dumps({"error": error.message}) + "\n"
                            return
                        if delta.text and first_at is None:
                            first_at = time.perf_counter()
                        if delta.finish_reason is not None:
                            if delta.text:
                                yield json.dumps(piece(delta.text), ensure_ascii=False) + "\n"
                            reason = finish_reason(delta) or delta.finish_reason
                            yield json.dumps(final("", reason, delta.completion_tokens, first_at,
                                                   generated_ids()), ensure_ascii=False) + "\n"
                        elif delta.text:
                            yield json.dumps(piece(delta.text), ensure_ascii=False) + "\n"
                finally:
                    if not submission.done:
                        submission.cancel()

            return StreamingResponse(lines(), media_type="application/x-ndjson")

        text, reason, tokens, first_at = "", None, 0, None
        async for _, delta in events():
            if delta.error:
                raise api.generation_error(delta.error, delta.error_kind, engine.alive)
            if delta.text and first_at is None:
                first_at = time.perf_counter()
            text += delta.text
            if delta.finish_reason is not None:
                reason, tokens = finish_reason(delta) or delta.finish_reason, delta.completion_tokens
        return final(text, reason, tokens, first_at, generated_ids())

    @app.post("/api/chat", summary="Chat (Ollama API)")
    async def ollama_chat(req: ChatRequest, request: Request) -> Any:
        adapter, answered = resolve(req.model)
        if not req.messages:  # Ollama loads the model and answers done
            return {"model": answered, "created_at": _stamp(), "message": {"role": "assistant", "content": ""},
                    "done": True, "done_reason": "load"}
        if req.tools:
            raise APIError(400, "tools are not supported on /api/chat yet; use /v1/chat/completions")
        if any(m.images for m in req.messages):
            raise APIError(400, "images are not supported: this is a text model")
        messages = []
        for m in req.messages:
            if m.tool_calls:
                raise APIError(400, "assistant tool_calls are not supported on /api/chat yet")
            messages.append({"role": m.role, "content": m.content})
        openai_req = _validated(ChatCompletionRequest, {"messages": messages, **_sampling(req, engine.max_seq_len)})
        dialog = dialog_from_messages(openai_req.messages)
        try:
            prompt = await asyncio.to_thread(tokenizer.encode_dialog_prompt, dialog)
        except TokenizerError as exc:
            raise APIError(400, str(exc)) from None
        plan = chat_plan(openai_req, prompt, engine.max_seq_len, engine.vocab_size)
        return await run(request, req, plan, adapter, answered, chat=True, prompt_ids=None)

    @app.post("/api/generate", summary="Completion (Ollama API)")
    async def ollama_generate(req: GenerateRequest, request: Request) -> Any:
        adapter, answered = resolve(req.model)
        if not req.prompt and not req.context:
            return {"model": answered, "created_at": _stamp(), "response": "", "done": True, "done_reason": "load"}
        if req.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported by this model")
        if req.template:
            raise APIError(400, "template is not supported: the model's own chat template is used (or raw=true)")
        if req.images:
            raise APIError(400, "images are not supported: this is a text model")
        sampling = _sampling(req, engine.max_seq_len)

        def encode() -> list[int]:
            if req.raw:
                (ids,) = completion_prompts(req.prompt, tokenizer, engine.vocab_size)
            else:
                dialog = ([{"role": "system", "content": req.system}] if req.system else []) + [
                    {"role": "user", "content": req.prompt}]
                ids = list(tokenizer.encode_dialog_prompt(dialog))
            if req.context:  # the previous exchange's tokens, as returned in "context": continue after them
                bos = getattr(tokenizer, "bos_id", None)
                ids = [*req.context, *(ids[1:] if ids and ids[0] == bos else ids)]
            return ids

        try:
            prompt = await asyncio.to_thread(encode)
        except TokenizerError as exc:
            raise APIError(400, str(exc)) from None
        openai_req = _validated(CompletionRequest, {"prompt": prompt, **sampling})
        plan = completion_plan(openai_req, [prompt], engine.max_seq_len, engine.vocab_size)
        return await run(request, req, plan, adapter, answered, chat=False, prompt_ids=prompt)

    @app.get("/api/tags", summary="Local models (Ollama API)")
    async def ollama_tags() -> dict[str, Any]:
        return {"models": [card(n) for n in names()]}

    @app.get("/api/ps", summary="Loaded models (Ollama API)")
    async def ollama_ps() -> dict[str, Any]:
        on_gpu = model.norm.weight.device.type == "cuda"
        return {"models": [card(n) | {"expires_at": "2262-04-11T23:47:16Z", "size_vram": size if on_gpu else 0,
                                      "context_length": engine.max_seq_len} for n in names()]}

    @app.post("/api/show", summary="Model details (Ollama API)")
    async def ollama_show(req: ModelRequest) -> dict[str, Any]:
        requested = (req.model or req.name or "").removesuffix(":latest")
        if requested not in names():
            raise APIError(404, f"model '{requested}' not found (this server serves {', '.join(names())})")
        template = getattr(tokenizer, "chat_template", None) or ""
        stops = [tokenizer.decode([t]) for t in sorted(tokenizer.stop_tokens)]
        return {
            "modelfile": f"# served by llama3 {__version__}\nFROM {api.model_path or api.model_name}\n",
            "parameters": "\n".join(f'stop "{s}"' for s in stops),
            "template": template,
            "details": card(requested)["details"],
            "model_info": {"general.architecture": "llama", "general.parameter_count": params,
                           "llama.context_length": config.max_seq_len, "llama.embedding_length": config.dim,
                           "llama.block_count": config.n_layers, "llama.attention.head_count": config.n_heads,
                           "llama.attention.head_count_kv": config.kv_heads, "llama.vocab_size": config.vocab_size},
            "capabilities": ["completion"],
            "modified_at": modified,
        }

    @app.get("/api/version", summary="Server version (Ollama API)")
    async def ollama_version() -> dict[str, str]:
        return {"version": __version__}


def _quantization(path: Path | None) -> str | None:
    """The GGUF file type's name (Q4_1, Q8_0 ...), or None for a non-GGUF checkpoint."""
    if path is None or path.suffix.lower() != ".gguf" or not path.is_file():
        return None
    try:
        from gguf import GGUFReader, LlamaFileType

        field = GGUFReader(str(path)).fields.get("general.file_type")
        if field is None:
            return None
        name = LlamaFileType(int(field.parts[field.data[0]][0])).name
        return name.removeprefix("MOSTLY_")
    except Exception:  # noqa: BLE001 - only a label: an unreadable or unknown type leaves it out
        return None

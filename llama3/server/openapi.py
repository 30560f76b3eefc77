"""The published OpenAPI schema, stating what the server really answers.

FastAPI documents a 422 for every route with a body and nothing else; this server answers invalid input with
an OpenAI-shaped 400 (``errors.py``), a missing or wrong key with 401, an unknown model with 404, a full queue
with 429 and ``Retry-After``, a stopped or draining engine with 503, and streams server-sent events. Clients
and API fuzzers (schemathesis) read the schema, so it must say exactly that.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "with stream=true: one event per chunk ('data: {json chunk}'), an error event "
                   "('data: {\"error\": ...}') if generation fails, then 'data: [DONE]'",
    "required": ["data"],
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
}

OLLAMA_ERROR_SCHEMA: dict[str, Any] = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}

NDJSON_LINE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "with stream=true (Ollama's default): one JSON object per line, the last with done=true",
}

EMBEDDING_PATHS = ("/v1/embeddings", "/api/embed", "/api/embeddings")

_DESCRIPTIONS = {
    "400": "Invalid request: the message names the parameter and the problem",
    "401": "Missing or invalid API key (Authorization: Bearer KEY)",
    "404": "No such model",
    "429": "Every slot is busy and the queue is full; retry after Retry-After seconds",
    "500": "The model failed while generating (a server fault, never the request's)",
    "503": "The engine is not running or the server is shutting down",
    "501": "Not available on this server (embeddings of a tensor-parallel model without --embed-model)",
}


def _error(status: str, ollama: bool = False) -> dict[str, Any]:
    shape = "OllamaError" if ollama else "Error"
    response: dict[str, Any] = {
        "description": _DESCRIPTIONS[status],
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{shape}"}}},
    }
    if status == "429":
        response["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return response


def install_openapi(app: FastAPI, *, api_key: bool) -> None:
    """Replace ``app.openapi`` by a generator that documents the real status codes and the SSE media type."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
        schema["components"]["schemas"]["OllamaError"] = OLLAMA_ERROR_SCHEMA
        for name in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(name, None)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)  # validation errors are 400s here
                codes = []
                ollama = path.startswith("/api/")
                if method == "post":
                    codes = ["400", "404", "429", "500", "503"]  # 404: a model name no adapter has
                    ok = responses.setdefault("200", {"description": "Successful Response"})
                    json_body = ok.get("content", {}).get("application/json", {"schema": {}})
                    # Before OpenAPI 3.2's itemSchema, a stream's schema describes one event or line.
                    stream = ("application/x-ndjson", NDJSON_LINE_SCHEMA) if ollama else \
                        ("text/event-stream", SSE_EVENT_SCHEMA)
                    ok["content"] = {"application/json": json_body, stream[0]: {"schema": stream[1]}}
                if path in EMBEDDING_PATHS:  # one JSON answer, never a stream; 501 on a tensor-parallel model
                    codes = ["400", "500", "501", "503"]
                    ok["content"] = {"application/json": json_body}
                if "{" in path or path == "/api/show":
                    codes.append("404")
                if path == "/health":
                    codes.append("503")
                if path == "/metrics":
                    responses["200"] = {"description": "Prometheus text exposition format",
                                        "content": {"text/plain": {"schema": {"type": "string"}}}}
                if api_key and path.startswith(("/v1", "/api/", "/metrics")):
                    codes.append("401")
                for code in sorted(set(codes)):
                    responses[code] = _error(code, ollama)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

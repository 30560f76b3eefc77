"""OpenAI-style errors: every failure answers ``{"error": {"message", "type", "param", "code"}}`` with its status.

Invalid input is always a 4xx with a message that names the parameter and the problem; only a fault of the
server itself (a bug, the model failing) is a 5xx.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Llama3Error

log = logging.getLogger("llama3.server")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "not_found_error",
          405: "invalid_request_error", 429: "rate_limit_error", 503: "server_unavailable"}


class APIError(Exception):
    """An error to send to the client as it is."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None, type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """The error in the shape of the API ``path`` belongs to: Ollama's ``{"error": "..."}`` under /api, else
    OpenAI's."""
    if path == "/api" or path.startswith("/api/"):
        return JSONResponse({"error": error.message}, status_code=error.status, headers=headers or error.headers)
    body = error_body(error.message, error.type, error.param, error.code)
    return JSONResponse(body, status_code=error.status, headers=headers or error.headers)


def param_path(loc: tuple[Any, ...]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not path:
            path = str(part)
        elif str(part).startswith(("function-", "list[", "str", "int", "dict[", "constrained-")):
            continue  # pydantic's names for union members, not fields
        else:
            path += f".{part}"
    return path or None


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem pydantic found, as a 400 that names the parameter."""
    errors = exc.errors()
    first = errors[0] if errors else {"type": "value_error", "loc": (), "msg": "invalid request"}
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})".replace(" ()", ""), code="invalid_json")
    param = param_path(loc)
    if param is None:
        if kind == "missing":
            return APIError(400, "the request body is empty: send a JSON object", code="invalid_body")
        return APIError(400, "the request body must be a JSON object", code="invalid_body")
    if kind == "missing":
        return APIError(400, f"missing required parameter '{param}'", param=param, code="missing_required_parameter")
    value = first.get("input")
    shown = json.dumps(value)[:80] if _jsonable(value) else repr(value)[:80]
    # For a union pydantic reports the first member's complaint ("should be a valid string"): say what fits.
    message = _UNION_HINTS.get(re.sub(r"\[\d+\]", "[]", param)) or first.get("msg", "invalid value")
    return APIError(400, f"invalid {param}={shown}: {message}", param=param, code="invalid_value")


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "messages[].content": "must be a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), path=request.url.path)

    @app.exception_handler(Llama3Error)
    async def _library_error(request: Request, exc: Llama3Error) -> JSONResponse:
        # Library errors reaching here were caused by the request (bad sampling values, malformed dialog).
        return error_response(APIError(400, str(exc)), path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} (see /openapi.json)"
        return error_response(APIError(exc.status_code, message), headers=getattr(exc, "headers", None),
                              path=request.url.path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(exc).__name__}", type="server_error"),
                              path=request.url.path)


# Routes behind --api-key: the APIs and the metrics. /health stays open for load balancers, and CORS preflights
# (which browsers send without credentials) are answered before any key is asked for.
PROTECTED_PREFIXES = ("/v1", "/api", "/metrics")


def _protected(path: str) -> bool:
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)


def is_preflight(scope: Scope) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method."""
    if scope["type"] != "http" or scope["method"] != "OPTIONS":
        return False
    headers = dict(scope["headers"])
    return b"origin" in headers and b"access-control-request-method" in headers


class APIKeyMiddleware:
    """With an API key set, every ``/v1``, ``/api`` and ``/metrics`` route needs ``Authorization: Bearer <key>``
    (401 otherwise); CORS preflights pass.

    A plain ASGI middleware (not BaseHTTPMiddleware) so streaming and disconnect detection pass through
    untouched, and it runs before the body is parsed: a bad key is a 401 whatever the body holds.
    """

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _protected(scope["path"]) and not is_preflight(scope):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            # Compare in constant time so the key cannot be guessed from response timing.
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(b"Bearer " + token.strip(), self.expected)):
                message = "missing API key: send 'Authorization: Bearer <key>'" if not given else "invalid API key"
                response = error_response(APIError(401, message, code="invalid_api_key"),
                                          headers={"WWW-Authenticate": "Bearer"}, path=scope["path"])
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class PreflightMiddleware:
    """Without ``--cors-origin``, answer CORS preflights with 204 and no Access-Control-Allow-* headers: the
    browser then refuses the cross-origin call, as it should, instead of seeing a 401 or 405."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if is_preflight(scope):
            await Response(status_code=204)(scope, receive, send)
            return
        await self.app(scope, receive, send)

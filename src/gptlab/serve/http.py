"""HTTP plumbing shared by both APIs: errors in each API's shape, capped JSON bodies, the key check.

An error is raised as :class:`ApiError` (status, message, param, code) and
written in the shape of the API the path belongs to:

- OpenAI (``/v1/...`` and the rest): ``{"error": {"message", "type", "param", "code"}}``;
- Ollama (``/api/...``): ``{"error": "message"}``.

429 and 503 carry ``Retry-After``. The :class:`Guard` middleware checks the
API key (every route but ``/health`` and CORS preflights) and counts answers
per route and status for ``/metrics``.
"""

from __future__ import annotations

import hmac
import json

from starlette.requests import Request
from starlette.responses import JSONResponse

RETRY_AFTER_S = 1  # what a 429 / 503 tells the client to wait
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and a message naming what is wrong."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def is_ollama(path: str) -> bool:
    """Does ``path`` belong to the Ollama API (errors as ``{"error": "..."}``)?"""
    return path.startswith("/api/")


def error_body(path: str, err: ApiError) -> dict:
    """The JSON error object of ``err`` in the shape of ``path``'s API."""
    if is_ollama(path):
        return {"error": err.message}
    return {"error": {"message": err.message, "type": TYPES.get(err.status, "server_error"),
                      "param": err.param, "code": err.code}}


def error_response(path: str, err: ApiError) -> JSONResponse:
    """The HTTP response for ``err`` (with ``Retry-After`` on 429 and 503)."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status in (429, 503) else None
    return JSONResponse(error_body(path, err), status_code=err.status, headers=headers)


async def read_json(request: Request, limit: int) -> dict:
    """The request's JSON object body, read up to ``limit`` bytes (413 beyond, 400 if it is not a JSON object)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit} "
                            "(--max-body-bytes)", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body is over {limit} bytes, the most this server takes "
                                "(--max-body-bytes)", code="body_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start}); send UTF-8 JSON",
                       code="invalid_json") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    return data


class Guard:
    """ASGI middleware: the API key check and the per-route request counter.

    Args:
        app: the wrapped ASGI app.
        api_key: the key every route but ``/health`` needs as ``Authorization: Bearer KEY`` (None: no key).
        metrics: a Metrics whose ``requests`` counter is told every answer's status (or None).
        routes: the paths counted by name (others are counted as ``other``, so labels stay few).
    """

    def __init__(self, app, api_key: str | None = None, metrics=None, routes: frozenset[str] = frozenset()):
        self.app, self.api_key, self.metrics, self.routes = app, api_key, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {}

        async def counted(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self._refused(scope):
                err = ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY "
                                    "(the server's --api-key)", code="invalid_api_key")
                await error_response(path, err)(scope, receive, counted)
            else:
                await self.app(scope, receive, counted)
        finally:
            if self.metrics is not None:
                route = path if path in self.routes else "other"
                self.metrics.requests.labels(route, str(status.get("code", 499))).inc()

    def _refused(self, scope) -> bool:
        if self.api_key is None or scope["path"] == "/health" or scope["method"] == "OPTIONS":
            return False
        if scope["path"] == "/playground" and scope["method"] == "GET":
            return False  # a static page a browser opens by URL (no header); its API calls send the key
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, key = given.partition(" ")
        return scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode())

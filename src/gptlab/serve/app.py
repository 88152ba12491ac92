"""The ASGI app: routes of both APIs, the playground page, health, metrics, errors, key, CORS.

    app = build_app(load, api_key=None, cors_origins=[], max_body_bytes=1 << 20)
    uvicorn.run(app, host="127.0.0.1", port=8000)

``load()`` opens the model and returns a :class:`~gptlab.serve.model.ServedModel`;
it runs on a thread after the server starts listening, so ``/health``
answers 503 while the model loads and 200 once it is ready. The app stops
the worker when it shuts down (cancelling what is still in flight).
"""

from __future__ import annotations

import asyncio
import contextlib
from importlib import resources
from typing import Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from gptlab.errors import GptlabError
from gptlab.logs import get_logger
from gptlab.serve import ollama_api, openai_api
from gptlab.serve.completions import completions
from gptlab.serve.http import ApiError, Guard, error_response
from gptlab.serve.metrics import Metrics

log = get_logger(__name__)

MAX_BODY_BYTES = 1 << 20  # 1 MiB: a long conversation fits; a 10 MB body is refused with 413


async def health(request) -> Response:
    """``GET /health``: 200 when the model is ready, 503 while it loads (or failed to)."""
    state = request.app.state
    if state.served is None:
        status = "failed" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503,
                            headers={"Retry-After": "1"})
    return JSONResponse({"status": "ok", "model": state.served.name})


async def metrics(request) -> Response:
    """``GET /metrics``: Prometheus text."""
    m = request.app.state.metrics
    return Response(m.render(), media_type=m.content_type)


async def playground(request) -> Response:
    """``GET /playground``: the browser playground (one static page that talks to this server's API)."""
    page = resources.files("gptlab.serve").joinpath("static/playground.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


ROUTES = [
    Route("/", ollama_api.root, methods=["GET", "HEAD"]),
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/playground", playground, methods=["GET"]),
    Route("/v1/chat/completions", openai_api.chat_completions, methods=["POST"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/models", openai_api.list_models, methods=["GET"]),
    Route("/v1/models/{model:path}", openai_api.get_model, methods=["GET"]),
    Route("/tokenize", openai_api.tokenize, methods=["POST"]),
    Route("/detokenize", openai_api.detokenize, methods=["POST"]),
    Route("/api/chat", ollama_api.api_chat, methods=["POST"]),
    Route("/api/generate", ollama_api.api_generate, methods=["POST"]),
    Route("/api/tags", ollama_api.api_tags, methods=["GET"]),
    Route("/api/ps", ollama_api.api_ps, methods=["GET"]),
    Route("/api/show", ollama_api.api_show, methods=["POST"]),
    Route("/api/version", ollama_api.api_version, methods=["GET"]),
]


async def _api_error(request, exc: ApiError) -> Response:
    return error_response(request.url.path, exc)


async def _http_error(request, exc: HTTPException) -> Response:
    return error_response(request.url.path, ApiError(exc.status_code, f"{exc.detail}: {request.method} "
                                                                      f"{request.url.path}"))


async def _refused(request, exc: GptlabError) -> Response:
    return error_response(request.url.path, ApiError(400, " ".join(str(exc).split())))


async def _crash(request, exc: Exception) -> Response:
    log.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return error_response(request.url.path, ApiError(500, f"internal error: {type(exc).__name__}: {exc}"))


def build_app(load: Callable[[], object], *, api_key: str | None = None, cors_origins: list[str] | None = None,
              max_body_bytes: int = MAX_BODY_BYTES, on_load_error: Callable[[str], None] | None = None) -> Starlette:
    """The server's ASGI app.

    Args:
        load: opens the model and returns a ServedModel whose worker is not started (run on a thread).
        api_key: the key every route but ``/health`` needs (``Authorization: Bearer KEY``); None: none.
        cors_origins: browser origins allowed to call the API (none: CORS closed).
        max_body_bytes: the largest request body taken (413 beyond).
        on_load_error: told the one-line reason when ``load`` fails (the command then exits 1).
    """
    m = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        app.state.served, app.state.load_error = None, None
        task = asyncio.ensure_future(_load(app, load, m, on_load_error))
        try:
            yield
        finally:
            task.cancel()
            if app.state.served is not None:
                await asyncio.to_thread(app.state.served.worker.stop)

    middleware = []
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    routes = frozenset(r.path for r in ROUTES if "{" not in r.path)
    middleware.append(Middleware(Guard, api_key=api_key, metrics=m, routes=routes))
    app = Starlette(routes=ROUTES, middleware=middleware, lifespan=lifespan,
                    exception_handlers={ApiError: _api_error, GptlabError: _refused, HTTPException: _http_error,
                                        Exception: _crash})
    app.state.metrics, app.state.max_body_bytes = m, max_body_bytes
    app.state.served, app.state.load_error = None, None
    return app


async def _load(app, load, m: Metrics, on_load_error) -> None:
    """Open the model on a thread; then start its worker and mark the app ready."""
    try:
        served = await asyncio.to_thread(load)
    except Exception as e:
        app.state.load_error = " ".join(str(e).split()) or type(e).__name__
        log.error("the model could not be loaded: %s", app.state.load_error)
        if on_load_error is not None:
            on_load_error(app.state.load_error)
        return
    served.worker.metrics = m
    served.worker.start()
    app.state.served = served
    log.info("serving %s (context %d tokens)", served.name, served.context)

"""``gptlab serve MODEL``: the OpenAI- and Ollama-compatible server, run by uvicorn."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.logs import get_logger

log = get_logger(__name__)


def _key(api_key: str | None, api_key_file: str | None) -> str | None:
    if api_key and api_key_file:
        raise GptlabError("give --api-key or --api-key-file, not both")
    if api_key_file:
        try:
            key = Path(api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise GptlabError(f"cannot read --api-key-file {api_key_file}: {e.strerror}") from None
        if not key:
            raise GptlabError(f"--api-key-file {api_key_file} is empty; put the key on its first line")
        return key
    return api_key or None


def serve_command(model: str, alias: str | None = None, host: str = "127.0.0.1", port: int = 8000,
                  api_key: str | None = None, api_key_file: str | None = None, max_batch: int = 8,
                  max_queue: int = 64, context: int | None = None, cors_origin: list[str] | None = None, quantize: str | None = None,
                  style: str | None = None, device: str = "auto", dtype: str | None = None,
                  max_body_bytes: int = 1 << 20, shutdown_timeout: float = 10.0) -> int:
    """Serve a model over HTTP with the OpenAI and Ollama APIs and a browser playground (/playground).

    The server listens at once; /health answers 503 until the model is loaded.
    SIGTERM (or Ctrl-C) stops accepting requests, lets those in flight finish
    for up to --shutdown-timeout seconds, cancels the rest, and exits 0.

    Args:
        model: a .gguf file, a gptlab run or model directory, a Hugging Face directory or repo id,
            or pkg:PACKAGE/PATH.
        alias: the name clients ask for (default: the model's file or directory name).
        host: the address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes it to the network).
        port: the TCP port (0: a free one, printed at start).
        api_key: a key every route but /health needs (Authorization: Bearer KEY).
        api_key_file: read the key from this file instead (keeps it out of the process list).
        max_batch: sequences decoded together (the engine's slots).
        max_queue: requests that may wait for a slot; beyond, clients get 429 with Retry-After.
        context: tokens per sequence, prompt and reply together (default and at most: the model's
            context); the KV cache holds max_batch x context positions, so lower it for long-context models.
        cors_origin: browser origins allowed to call the API (repeat the flag); none: CORS closed.
        quantize: "int4" or "int8" weight-only linear layers (faster on CPU, approximate logits).
        style: a built-in chat prompt style (chatml, alpaca, phi-3, llama-3) instead of the model's template.
        device: auto, cpu, cuda or mps.
        dtype: weights dtype (fp32, bf16, fp16); default: bf16 on CUDA GPUs that support it, else fp32.
        max_body_bytes: the largest request body taken (413 beyond).
        shutdown_timeout: seconds requests in flight may take to finish after SIGTERM.
    """
    import uvicorn

    from gptlab.inference.open import open_model
    from gptlab.serve.app import build_app
    from gptlab.serve.model import ServedModel, default_name

    key, quantize = _check_settings(model, host, port, api_key, api_key_file, max_batch, max_queue, context,
                                    quantize, max_body_bytes, shutdown_timeout)
    failure: list[str] = []

    def load() -> ServedModel:
        t0 = time.perf_counter()
        opened = open_model(model, device=device, dtype=dtype, quantize=quantize)
        return ServedModel.build(opened, alias or default_name(model), max_batch=max_batch, max_queue=max_queue,
                                 context=context, style=style, quantize=quantize,
                                 load_seconds=time.perf_counter() - t0)

    def load_failed(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app = build_app(load, api_key=key, cors_origins=cors_origin or [], max_body_bytes=max_body_bytes,
                    on_load_error=load_failed)
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=shutdown_timeout,
                            access_log=False)
    server = uvicorn.Server(config)
    # uvicorn re-raises a captured SIGTERM/SIGINT after its clean shutdown; a no-op handler makes that exit 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise GptlabError(failure[0])
    return 0


def _check_settings(model: str, host: str, port: int, api_key, api_key_file, max_batch: int, max_queue: int,
                    context: int | None, quantize: str | None, max_body_bytes: int,
                    shutdown_timeout: float) -> tuple[str | None, str | None]:
    """Refuse bad settings before the server starts: (the API key, the canonical quantization scheme)."""
    from gptlab.refs import looks_like_repo_id, resolve

    checks = (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("max_body_bytes", max_body_bytes, 1024),
              ("context", 2 if context is None else context, 2))
    for name, value, lo in checks:
        if value < lo:
            raise GptlabError(f"{name}={value} must be >= {lo}")
    if shutdown_timeout < 0:
        raise GptlabError(f"shutdown_timeout={shutdown_timeout} must be >= 0 (seconds)")
    if not 0 <= port <= 65535:
        raise GptlabError(f"port={port} must be in 0..65535")
    key = _key(api_key, api_key_file)
    if quantize is not None:
        from gptlab.inference.quantize import check_scheme

        quantize = check_scheme(quantize)
    _check_port_free(host, port)
    if str(model).startswith("pkg:") or Path(model).expanduser().exists() or not looks_like_repo_id(str(model)):
        resolve(model)  # a missing local file is refused now, not after the server started (a Hub id loads later)
    return key, quantize


def _check_port_free(host: str, port: int) -> None:
    """Refuse in one line, before the model loads, when ``host:port`` cannot be listened on."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise GptlabError(f"host={host!r} is not an address this machine can listen on ({e.strerror}); "
                          "use 127.0.0.1, 0.0.0.0 or one of this machine's addresses") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT does not block
        try:
            s.bind(address)
        except OSError as e:
            raise GptlabError(f"port={port} on {host} cannot be listened on ({e.strerror.lower()}); give another "
                              "port (port=0 picks a free one) or stop what holds it") from None

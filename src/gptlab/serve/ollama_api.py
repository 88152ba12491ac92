"""The Ollama API: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``, ``/api/version``.

What the ``ollama`` Python package sends and parses
(https://github.com/ollama/ollama/blob/main/docs/api.md). Replies stream as
NDJSON (one JSON object per line) unless ``stream: false``; the last object
has ``done: true``, ``done_reason`` and the timings in nanoseconds
(``total_duration``, ``load_duration``, ``prompt_eval_duration``,
``eval_duration``) with ``prompt_eval_count`` and ``eval_count``. Errors are
``{"error": "..."}``.

Sampling defaults are Ollama's (temperature 0.8, top_k 40, top_p 0.9) except
``repeat_penalty``, which is off unless given (Ollama's 1.1 applies to a
recent window, gptlab's to the whole sequence).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone

from starlette.responses import JSONResponse, Response, StreamingResponse

from gptlab.serve.common import ClientGone, body_limit, collect, ready, start
from gptlab.serve.grammar import schema_of
from gptlab.serve.http import ApiError, read_json
from gptlab.serve.params import Fields, chat_messages, check_context, engine_request

VERSION = "0.9.0"  # the Ollama API version whose routes and fields this server follows
ROLES = {"system": "system", "user": "user", "assistant": "assistant"}


def now_iso() -> str:
    """Ollama's ``created_at``: UTC with a Z."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def ollama_request(body: dict, served, prompt: list[int], stops, text_after_prompt: bool):
    """The engine request of a chat or generate body: its ``options``, ``format`` and the context."""
    opts = Fields(Fields(body).get("options", "dict", {}), "options.")
    num_ctx = opts.get("num_ctx", "int", lo=1)
    room = check_context(prompt, min(num_ctx or served.context, served.context), "prompt")
    num_predict = opts.get("num_predict", "int", lo=-2)
    schema = schema_of("ollama", body.get("format"))
    return engine_request(
        prompt, room, None if num_predict is None or num_predict < 0 else num_predict,
        stops.with_strings(opts.stops()), temperature=opts.get("temperature", "number", 0.8),
        top_k=opts.get("top_k", "int", 40), top_p=opts.get("top_p", "number", 0.9), min_p=opts.get("min_p", "number"),
        repetition_penalty=opts.get("repeat_penalty", "number"),
        presence_penalty=opts.get("presence_penalty", "number", 0.0),
        frequency_penalty=opts.get("frequency_penalty", "number", 0.0), seed=opts.get("seed", "int"),
        text_after_prompt=text_after_prompt,
        logits_processor=served.grammar.mask(schema) if schema is not None else None)


def _prepare(body: dict, served, chat: bool):
    """(prompt ids, engine request, was the prompt empty) of an /api/chat or /api/generate body."""
    f = Fields(body)
    served.check_name(f.get("model", "str"), ollama=True)
    if chat:
        prompt = served.render_chat(chat_messages(body.get("messages"), ROLES))
        return prompt, ollama_request(body, served, prompt, served.chat_stops, False), False
    text = f.get("prompt", "str", "")
    system = f.get("system", "str")
    if not text and not system:
        return [], None, True  # Ollama's way to load a model: answered with done_reason "load"
    if f.get("raw", "bool", False) or served.template is None:
        from gptlab.inference.generation import text_prompt_ids  # the prompt `gptlab generate` decodes from

        prompt = text_prompt_ids(served.tokenizer, text)
        return prompt, ollama_request(body, served, prompt, served.opened.stops, True), False
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    prompt = served.render_chat(messages)
    return prompt, ollama_request(body, served, prompt, served.chat_stops, False), False


async def api_chat(request) -> Response:
    """``POST /api/chat``."""
    return await _generate(request, chat=True)


async def api_generate(request) -> Response:
    """``POST /api/generate``."""
    return await _generate(request, chat=False)


async def _generate(request, chat: bool) -> Response:
    t0 = time.perf_counter_ns()
    served = ready(request)
    body = await read_json(request, body_limit(request))
    prompt, req, empty = _prepare(body, served, chat)
    stream = Fields(body).get("stream", "bool", True)
    key = "message" if chat else "response"

    def piece(text: str):
        return {"role": "assistant", "content": text} if chat else text

    if empty:
        return JSONResponse({"model": served.name, "created_at": now_iso(), key: piece(""), "done": True,
                             "done_reason": "load"})
    gen = start(served, [req])
    timing = Timing(t0, len(prompt))
    if stream:
        return StreamingResponse(ndjson(gen, served, key, piece, timing, chat, prompt),
                                 media_type="application/x-ndjson")
    try:
        replies = await collect(request, gen, [req])
    except ClientGone:
        return Response(status_code=499)
    reply = replies[0]
    timing.generated, timing.first = reply.generated, reply.first_ns
    last = {"model": served.name, "created_at": now_iso(), key: piece(reply.text), "done": True,
            "done_reason": reply.finish_reason, **timing.fields()}
    if not chat:
        last["context"] = prompt + [e.token_id for e in reply.tokens]
    return JSONResponse(last)


class Timing:
    """Ollama's durations (ns) and counts of one reply."""

    def __init__(self, start_ns: int, prompt_tokens: int):
        self.start, self.prompt_tokens, self.generated = start_ns, prompt_tokens, 0
        self.first: int | None = None  # when the first token came (the prompt is evaluated then)

    def fields(self) -> dict:
        end = time.perf_counter_ns()
        first = self.first or end
        return {"total_duration": end - self.start, "load_duration": 0, "prompt_eval_count": self.prompt_tokens,
                "prompt_eval_duration": first - self.start, "eval_count": self.generated,
                "eval_duration": end - first}


async def ndjson(gen, served, key: str, piece, timing: Timing, chat: bool, prompt: list[int]):
    """The NDJSON lines of a streamed reply (the generation is cancelled if the client leaves)."""
    tokens = []
    try:
        async for _, event in gen.events():
            if event.token_id is not None:
                timing.generated += 1
                timing.first = timing.first or time.perf_counter_ns()
                tokens.append(event.token_id)
            if event.finish_reason is None:
                if event.text:
                    yield _line({"model": served.name, "created_at": now_iso(), key: piece(event.text), "done": False})
                continue
            last = {"model": served.name, "created_at": now_iso(), key: piece(event.text), "done": True,
                    "done_reason": event.finish_reason, **timing.fields()}
            if not chat:
                last["context"] = prompt + tokens
            yield _line(last)
    except Exception as e:  # the stream has begun: the error goes as a line
        yield _line({"error": str(e) if isinstance(e, ApiError) else f"generation failed: {type(e).__name__}: {e}"})
    finally:
        gen.close()


def _line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False) + "\n"


def _model_entry(served) -> dict:
    d = served.describe()
    modified = datetime.fromtimestamp(d["modified"], timezone.utc).isoformat().replace("+00:00", "Z")
    return {"name": served.name, "model": served.name, "modified_at": modified, "size": d["size"],
            "digest": d["digest"], "details": _details(d)}


def _details(d: dict) -> dict:
    return {"parent_model": "", "format": d["format"], "family": d["family"], "families": [d["family"]],
            "parameter_size": d["parameter_size"], "quantization_level": d["quantization_level"]}


async def api_tags(request) -> Response:
    """``GET /api/tags``: the served model, as Ollama lists local models."""
    return JSONResponse({"models": [_model_entry(ready(request))]})


async def api_ps(request) -> Response:
    """``GET /api/ps``: the served model is always loaded."""
    served = ready(request)
    entry = _model_entry(served)
    return JSONResponse({"models": [{**entry, "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0}]})


async def api_show(request) -> Response:
    """``POST /api/show``: details, template, parameters and model info of the served model."""
    served = ready(request)
    body = await read_json(request, body_limit(request))
    f = Fields(body)
    served.check_name(f.get("model", "str") or f.get("name", "str"), ollama=True)
    d = served.describe()
    cfg = served.opened.model.cfg
    info = {"general.architecture": d["family"], "general.parameter_count": d["parameters"],
            f"{d['family']}.context_length": served.context, f"{d['family']}.embedding_length": cfg.emb_dim,
            f"{d['family']}.block_count": cfg.n_layers}
    stops = "\n".join(f'stop "{s}"' for s in served.chat_stops.strings)
    return JSONResponse({"modelfile": f"FROM {served.opened.ref}\n", "parameters": stops,
                         "template": getattr(served.template, "source", "") or "", "details": _details(d),
                         "model_info": info, "capabilities": ["completion"],
                         "modified_at": _model_entry(served)["modified_at"]})


async def api_version(request) -> Response:
    """``GET /api/version``."""
    return JSONResponse({"version": VERSION})


async def root(request) -> Response:
    """``GET /``: what Ollama answers, so clients that probe the address find a server."""
    from starlette.responses import PlainTextResponse

    return PlainTextResponse("Ollama is running")

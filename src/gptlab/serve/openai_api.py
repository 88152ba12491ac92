"""The OpenAI API: ``/v1/chat/completions``, ``/v1/models``, ``/tokenize``, ``/detokenize``.

What the ``openai`` Python package sends and parses
(https://platform.openai.com/docs/api-reference/chat). Streaming replies are
server-sent events: ``data: {chunk}`` lines, one ``id`` and ``created`` for all
of them, the first delta carrying the role, ``data: [DONE]`` last; with
``stream_options.include_usage`` a final chunk has empty ``choices`` and the
``usage``. An error after the stream began is sent as ``data: {"error": ...}``.
Unknown fields are ignored; vLLM's extras ``top_k``, ``min_p`` and
``repetition_penalty`` are read. ``/v1/completions`` lives in
:mod:`gptlab.serve.completions`.
"""

from __future__ import annotations

import json
import time
import uuid

import torch

from starlette.responses import JSONResponse, Response, StreamingResponse

from gptlab.logs import get_logger
from gptlab.serve.common import ClientGone, body_limit, collect, ready, shown, start, token_piece
from gptlab.serve.grammar import schema_of
from gptlab.serve.http import ApiError, error_body, read_json
from gptlab.serve.params import MAX_N, Fields, chat_messages, check_context, engine_request

log = get_logger(__name__)

# OpenAI's roles -> the chat template's ("developer" is the newer name of "system")
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def sse(obj) -> str:
    """One server-sent event carrying ``obj`` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_requests(f: Fields, served, prompts: list[list[int]], *, chat: bool) -> list:
    """The engine requests of a chat or completions body: ``n`` per prompt, seeds ``seed + i``."""
    n = f.get("n", "int", 1, lo=1, hi=MAX_N)
    max_tokens = f.get("max_completion_tokens", "int", lo=1) if chat else None
    if max_tokens is None:
        max_tokens = f.get("max_tokens", "int", lo=1 if chat else 0)
    if chat:
        top = f.get("top_logprobs", "int", 0, lo=0, hi=20) if f.get("logprobs", "bool", False) else 0
    else:
        top = f.get("logprobs", "int", 0, lo=0, hi=20)
    stops = (served.chat_stops if chat else served.opened.stops).with_strings(f.stops())
    schema = schema_of("openai", f.data.get("response_format"))
    seed = f.get("seed", "int")
    bias = logit_bias(f.get("logit_bias", "dict"), served.opened.model.cfg.vocab_size)
    common = dict(temperature=f.get("temperature", "number", 1.0), top_p=f.get("top_p", "number"),
                  top_k=f.get("top_k", "int"), min_p=f.get("min_p", "number"),
                  repetition_penalty=f.get("repetition_penalty", "number"),
                  presence_penalty=f.get("presence_penalty", "number", 0.0),
                  frequency_penalty=f.get("frequency_penalty", "number", 0.0))
    requests = []
    for prompt in prompts:
        room = check_context(prompt, served.context, "messages" if chat else "prompt")
        for i in range(n):
            mask = chain(bias, served.grammar.mask(schema) if schema is not None else None)
            requests.append(engine_request(prompt, room, max_tokens, stops, seed=None if seed is None else seed + i,
                                           logprobs=top, text_after_prompt=not chat, logits_processor=mask,
                                           **common))
    return requests


def logit_bias(value: dict | None, vocab: int):
    """OpenAI's ``logit_bias`` ({"token id": bias in -100..100}) as a logits processor (None when empty)."""
    if not value:
        return None
    ids, biases = [], []
    for key, b in value.items():
        if not key.isdigit() or int(key) >= vocab:
            raise ApiError(400, f"logit_bias key {key!r} must be a token id in 0..{vocab - 1}", param="logit_bias")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise ApiError(400, f"logit_bias[{key}] = {json.dumps(b)[:20]} must be a number in -100..100",
                           param="logit_bias")
        ids.append(int(key))
        biases.append(float(b))
    index, add = torch.tensor(ids), torch.tensor(biases)

    def apply(generated: list[int], logits: torch.Tensor) -> torch.Tensor:  # logits (1, V)
        return logits.index_add(1, index.to(logits.device), add.to(logits.device)[None])

    return apply


def chain(*processors):
    """One logits processor that applies the given ones (None skipped) in order; None if there are none."""
    todo = [p for p in processors if p is not None]
    if len(todo) <= 1:
        return todo[0] if todo else None

    def apply(generated, logits):
        for p in todo:
            logits = p(generated, logits)
        return logits

    return apply


def chat_logprob(tokenizer, event) -> dict:
    """One entry of a chat choice's ``logprobs.content``: the token, its logprob, bytes, alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        piece = token_piece(tokenizer, token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(piece.encode("utf-8"))}

    return {**entry(event.token_id, event.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in event.top_logprobs]}


async def chat_completions(request) -> Response:
    """``POST /v1/chat/completions``."""
    served = ready(request)
    body = await read_json(request, body_limit(request))
    f = Fields(body)
    served.check_name(body.get("model"))
    prompt = served.render_chat(chat_messages(body.get("messages"), ROLES))
    requests = openai_requests(f, served, [prompt], chat=True)
    stream = f.get("stream", "bool", False)
    include_usage = stream and Fields(f.get("stream_options", "dict", {}), "stream_options.").get(
        "include_usage", "bool", False)
    want_logprobs = f.get("logprobs", "bool", False)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}
    gen = start(served, requests)
    if stream:
        events = chat_stream(gen, served, requests, meta, want_logprobs, include_usage, request.url.path)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        replies = await collect(request, gen, requests)
    except ClientGone:
        return Response(status_code=499)
    tok = served.tokenizer
    choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                "logprobs": {"content": [chat_logprob(tok, e) for e in r.tokens]} if want_logprobs else None,
                "finish_reason": r.finish_reason} for i, r in enumerate(replies)]
    return JSONResponse({**meta, "object": "chat.completion", "choices": choices,
                         "usage": usage(len(prompt), sum(r.generated for r in replies))})


async def chat_stream(gen, served, requests, meta, want_logprobs: bool, include_usage: bool, path: str):
    """The SSE events of a streamed chat completion (the generation is cancelled if the client leaves)."""
    head = {**meta, "object": "chat.completion.chunk"}
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict, logprobs=None, finish=None) -> str:
        return sse({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}], **extra})

    generated = [0] * len(requests)
    try:
        for i in range(len(requests)):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for i, event in gen.events():
            generated[i] += event.token_id is not None
            entries = [chat_logprob(served.tokenizer, event)] if want_logprobs and shown(requests[i], event) else []
            if event.text or entries:
                yield chunk(i, {"content": event.text}, {"content": entries} if want_logprobs else None)
            if event.finish_reason is not None:
                yield chunk(i, {}, None, event.finish_reason)
        if include_usage:
            yield sse({**head, "choices": [], "usage": usage(len(requests[0].prompt), sum(generated))})
    except Exception as e:  # the stream has begun: the error goes as an event
        log.warning("a streamed reply failed: %s: %s", type(e).__name__, e)
        err = e if isinstance(e, ApiError) else ApiError(500, f"generation failed: {type(e).__name__}: {e}")
        yield sse(error_body(path, err))
    finally:
        gen.close()
    yield "data: [DONE]\n\n"


async def list_models(request) -> Response:
    """``GET /v1/models``: the one served model."""
    served = ready(request)
    return JSONResponse({"object": "list", "data": [model_card(served)]})


async def get_model(request) -> Response:
    """``GET /v1/models/{model}``."""
    served = ready(request)
    served.check_name(request.path_params["model"])
    return JSONResponse(model_card(served))


def model_card(served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "gptlab",
            "max_model_len": served.context}


async def tokenize(request) -> Response:
    """``POST /tokenize``: ``{"prompt": text}`` or ``{"messages": [...]}`` -> ``{"tokens", "count", "max_model_len"}``."""
    served = ready(request)
    body = await read_json(request, body_limit(request))
    served.check_name(body.get("model"))
    if body.get("messages") is not None:
        ids = served.render_chat(chat_messages(body["messages"], ROLES))
    else:
        text = Fields(body).get("prompt", "str")
        if text is None:
            raise ApiError(400, "give 'prompt' (a string) or 'messages'", param="prompt")
        with_bos = Fields(body).get("add_special_tokens", "bool", True)  # BOS where the model wants one
        ids = _with_bos(served.tokenizer, text) if with_bos else served.tokenizer.encode(text)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": served.context})


def _with_bos(tokenizer, text: str) -> list[int]:
    from gptlab.inference.generation import text_prompt_ids  # the ids `gptlab generate` starts from

    return text_prompt_ids(tokenizer, text)


async def detokenize(request) -> Response:
    """``POST /detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
    served = ready(request)
    body = await read_json(request, body_limit(request))
    served.check_name(body.get("model"))
    ids = Fields(body).get("tokens", "list")
    vocab = served.opened.model.cfg.vocab_size
    if ids is None or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
        raise ApiError(400, f"'tokens' must be a list of token ids in 0..{vocab - 1}", param="tokens")
    return JSONResponse({"prompt": served.tokenizer.decode(ids)})

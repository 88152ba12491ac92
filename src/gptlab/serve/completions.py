"""``POST /v1/completions``: OpenAI's legacy text completions, with ``echo`` and ``logprobs``.

lm-evaluation-harness's ``local-completions`` model scores log-likelihoods
through it: it sends the context and continuation as one prompt with
``echo: true, logprobs: 1, max_tokens: 1`` and reads the continuation's
``token_logprobs`` and ``top_logprobs``. With ``echo`` the prompt's own
tokens come first: the first has logprob ``null``, each next one the model's
log-probability of it given the tokens before (the engine's
``Request.prompt_logprobs``: computed during the prompt's own prefill, in chunks).
"""

from __future__ import annotations

import time
import uuid

from starlette.responses import JSONResponse, Response, StreamingResponse

from gptlab.serve.common import ClientGone, body_limit, collect, ready, start, token_piece
from gptlab.serve.http import ApiError, error_body, read_json
from gptlab.serve.openai_api import log, openai_requests, sse, usage
from gptlab.serve.params import Fields, completion_prompts


class LogprobTable:
    """OpenAI's completion ``logprobs`` object, built token by token."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tok, self.offset = tokenizer, offset
        self.data = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        piece = token_piece(self.tok, token_id)
        self.data["tokens"].append(piece)
        self.data["token_logprobs"].append(logprob)
        self.data["top_logprobs"].append(None if top is None else {token_piece(self.tok, t): lp for t, lp in top})
        self.data["text_offset"].append(self.offset)
        self.offset += len(piece)


async def completions(request) -> Response:
    """``POST /v1/completions``."""
    served = ready(request)
    body = await read_json(request, body_limit(request))
    f = Fields(body)
    served.check_name(body.get("model"))
    prompts = completion_prompts(body.get("prompt"), served.tokenizer, served.opened.model.cfg.vocab_size)
    requests = openai_requests(f, served, prompts, chat=False)
    echo = f.get("echo", "bool", False)
    want_logprobs = f.get("logprobs", "int") is not None
    stream = f.get("stream", "bool", False)
    if echo and want_logprobs and not stream:
        for req in requests:  # the prompt is scored during its own prefill
            req.prompt_logprobs = req.logprobs
    include_usage = stream and Fields(f.get("stream_options", "dict", {}), "stream_options.").get(
        "include_usage", "bool", False)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": served.name}
    gen = start(served, requests)
    if stream:
        events = completion_stream(gen, served, requests, meta, echo, want_logprobs, include_usage, request.url.path)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        replies = await collect(request, gen, requests)
    except ClientGone:
        return Response(status_code=499)
    choices = []
    for i, (req, reply) in enumerate(zip(requests, replies)):
        text, table = reply.text, None
        if want_logprobs:
            table = LogprobTable(served.tokenizer)
            if echo:
                _echo_logprobs(req, gen.tickets[i].handle, table)
            for e in reply.tokens:
                table.add(e.token_id, e.logprob, list(e.top_logprobs))
        if echo:
            text = served.tokenizer.decode(req.prompt) + text
        choices.append({"index": i, "text": text, "logprobs": table.data if table else None,
                        "finish_reason": reply.finish_reason})
    prompt_tokens = sum(len(p) for p in prompts)
    return JSONResponse({**meta, "choices": choices, "usage": usage(prompt_tokens, sum(r.generated for r in replies))})


def _echo_logprobs(req, handle, table: LogprobTable) -> None:
    """Add the prompt's tokens and the logprobs the engine scored them with to ``table``."""
    table.add(req.prompt[0], None, None)
    for token_id, (logprob, alts) in zip(req.prompt[1:], handle.prompt_logprobs[1:]):
        table.add(token_id, logprob, list(alts))


async def completion_stream(gen, served, requests, meta, echo: bool, want_logprobs: bool, include_usage: bool,
                            path: str):
    """The SSE events of a streamed completion (echo sends the prompt text first, without logprobs)."""
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, logprobs=None, finish=None) -> str:
        return sse({**meta, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                         "finish_reason": finish}], **extra})

    generated = [0] * len(requests)
    try:
        if echo:
            for i, req in enumerate(requests):
                yield chunk(i, served.tokenizer.decode(req.prompt))
        async for i, event in gen.events():
            generated[i] += event.token_id is not None
            table = None
            if want_logprobs and event.token_id is not None and event.text:
                table = LogprobTable(served.tokenizer)
                table.add(event.token_id, event.logprob, list(event.top_logprobs))
            if event.text or event.finish_reason is not None:
                yield chunk(i, event.text, table.data if table else None, event.finish_reason)
        if include_usage:
            prompt_tokens = sum(len(r.prompt) for r in requests)
            yield sse({**meta, "choices": [], "usage": usage(prompt_tokens, sum(generated))})
    except Exception as e:  # the stream has begun: the error goes as an event
        log.warning("a streamed completion failed: %s: %s", type(e).__name__, e)
        err = e if isinstance(e, ApiError) else ApiError(500, f"generation failed: {type(e).__name__}: {e}")
        yield sse(error_body(path, err))
    finally:
        gen.close()
    yield "data: [DONE]\n\n"

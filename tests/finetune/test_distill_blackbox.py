"""Black-box and reasoning distillation against a test double of an OpenAI-compatible endpoint: a small
stdlib HTTP server on 127.0.0.1 whose answers depend on the prompt, which rate-limits once (429) and can
be told to fail; the answers dataset survives a crash, resume is exact, the answer extractor scores."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from gptlab.cli import run as cli_run
from gptlab.errors import GptlabError
from gptlab.finetune.distill import distill
from gptlab.finetune.distill_teacher import (EndpointTeacher, extract_answer, fetch_answers, read_answers,
                                             split_reasoning)

WORDS = ["cat", "dog", "bird", "fish", "lion", "bear", "wolf", "frog", "duck", "goat", "mule", "crab"]


class FakeEndpoint:
    """``POST /v1/chat/completions``: answers ``the WORD says ok`` (blackbox) or, asked to think step by
    step, a trace counting the word's letters and ``Answer: N``. The first request gets a 429."""

    def __init__(self):
        self.requests, self.prompts, self.fail_after, self.rate_limit_once = [], [], None, True
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append((self.path, self.headers.get("Authorization"), body))
                if endpoint.rate_limit_once:
                    endpoint.rate_limit_once = False
                    return self._send(429, {"error": {"message": "slow down"}}, {"Retry-After": "0"})
                if endpoint.fail_after is not None and len(endpoint.prompts) >= endpoint.fail_after:
                    return self._send(503, {"error": {"message": "overloaded"}})
                prompt = body["messages"][-1]["content"]
                endpoint.prompts.append(prompt)
                word = prompt.split()[-1]
                if any("step by step" in m["content"] for m in body["messages"] if m["role"] == "system"):
                    text = f"The word {word} has letters {' '.join(word)}.\nThat is {len(word)} letters.\nAnswer: {len(word)}"
                else:
                    text = f"the {word} says ok"
                self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                              "finish_reason": "stop"}]})

            def _send(self, code, obj, headers=None):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    with FakeEndpoint() as e:
        yield e


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"count the letters of {w}"}) + "\n" for w in WORDS))
    return p


def test_reasoning_split_and_answer_extractor():
    assert split_reasoning("step one\nstep two\nAnswer: 42") == ("step one\nstep two", "42")
    assert split_reasoning("<think>\nhmm\n</think>\n7") == ("hmm", "7")
    assert split_reasoning("a\nb") == ("a", "b")
    assert extract_answer("The count\nFinal answer: 1,000.0") == "1000"
    assert extract_answer("<think>x</think> Paris.") == "paris"
    assert extract_answer("  The  Cat ") == "the cat"
    assert extract_answer("Answer: 4") == extract_answer("<think>2+2</think>\n4.0")


def test_endpoint_retries_a_rate_limit_and_counts_it(endpoint, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    t = EndpointTeacher(endpoint.url, "teacher-1", retries=2)
    assert t.ask("say hi to cat") == "the cat says ok"
    assert (t.stats.requests, t.stats.retries, t.stats.rate_limited) == (2, 1, 1)
    path, auth, body = endpoint.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "teacher-1"
    endpoint.fail_after = 0
    t.backoff = 0.0
    with pytest.raises(GptlabError, match=r"HTTP 503.*still after 2 retries; the answers fetched so far are kept"):
        t.ask("say hi to dog")
    assert t.stats.server_errors == 3 and t.stats.retries == 3


def test_a_crash_mid_fetch_keeps_the_answers(tmp_path, endpoint, prompts):
    from gptlab.finetune.distill_teacher import read_prompts

    texts, answers = read_prompts(prompts), tmp_path / "answers.jsonl"
    endpoint.fail_after = 5
    t = EndpointTeacher(endpoint.url, "teacher-1", retries=1, backoff=0.0)
    with pytest.raises(GptlabError, match="HTTP 503"):
        fetch_answers(t, texts, answers, "blackbox")
    kept = read_answers(answers)
    assert [r["i"] for r in kept] == [0, 1, 2, 3, 4] and kept[2]["text"] == "the bird says ok"
    with open(answers, "a") as f:
        f.write('{"i": 5, "prompt": "count the le')  # a torn last line: the process died mid-write
    endpoint.fail_after, before = None, len(endpoint.prompts)
    got = fetch_answers(t, texts, answers, "blackbox")
    assert endpoint.prompts[before:] == texts[5:]  # only the missing ones were asked
    assert [r["text"] for r in got] == [f"the {w} says ok" for w in WORDS] and len(read_answers(answers)) == 12
    with pytest.raises(GptlabError, match="answers to other prompts or from another teacher"):
        fetch_answers(EndpointTeacher(endpoint.url, "another", retries=0), texts, answers, "blackbox")


def _run(endpoint, prompts, out, **kw):
    args = dict(mode="blackbox", teacher_model="teacher-1", prompts=str(prompts), context_length=256,
                tokenizer=kw.pop("tokenizer"), max_steps=6, batch_size=4, eval_every=2, eval_iters=1,
                val_ratio=0.25, gen_tokens=24, precision="fp32", device="cpu", progress=False)
    return distill(endpoint.url, "gpt2-nano", None, out, **(args | kw))


def test_blackbox_run_trains_on_the_answers_with_the_prompt_masked(tmp_path, endpoint, prompts, base_dir):
    from gptlab.finetune.distill_text import ANSWERS
    from gptlab.tokenizers import load_tokenizer

    r = _run(endpoint, prompts, tmp_path / "run", tokenizer=str(base_dir), max_steps=2)
    assert r.step == 2 and r.best_val_loss is not None
    run = tmp_path / "run"
    assert [json.loads(x)["text"] for x in (run / ANSWERS).read_text().splitlines()] == \
        [f"the {w} says ok" for w in WORDS]
    assert (tmp_path / "run.answers.jsonl").is_file()  # the dataset, kept outside the run
    agree = json.loads((run / "agreement.json").read_text())
    assert agree["n"] == 3 and 0.0 <= agree["agreement"] <= 1.0 and agree["teacher_requests"]["rate_limited"] == 1
    assert [i["teacher"] for i in agree["items"]] == ["the goat says ok", "the mule says ok", "the crab says ok"]
    # The loss counts the answer tokens only: every target before the answer is -100.
    from gptlab.finetune.distill import Distillation, DistillSettings
    from gptlab.training.loop import TrainConfig

    s = DistillSettings(teacher=endpoint.url, student="gpt2-nano", out=str(tmp_path / "run2"), mode="blackbox",
                        teacher_model="teacher-1", prompts=str(prompts), tokenizer=str(base_dir), context_length=256,
                        answers=str(tmp_path / "run.answers.jsonl"), val_ratio=0.25, device="cpu")
    job = Distillation().build(s, TrainConfig(max_steps=1, batch_size=2), torch.device("cpu"), None, lambda n: None)
    x, y = job.train.batch(0)
    tok = load_tokenizer(str(base_dir))
    first = tok.decode([t for t in y[0].tolist() if t != -100])
    assert first.startswith("the ") and first.endswith("says ok" + tok.decode([tok.eos_id]))
    assert "count the letters" in tok.decode(x[0].tolist())
    job.model.eval()  # no dropout
    with torch.no_grad():  # the loss: mean -log p(next token) over the answer's tokens, by hand
        logp = torch.log_softmax(job.model(x).float(), -1)
        picked = [-logp[b, t, y[b, t]] for b in range(x.shape[0]) for t in range(x.shape[1]) if y[b, t] != -100]
        assert torch.allclose(job.task.loss(job.model, (x, y)), torch.stack(picked).mean(), atol=1e-5)
    assert len(endpoint.prompts) == 12  # the second build read the dataset: nothing was asked again


@pytest.mark.parametrize("kind", ["blackbox", "reasoning"])
def test_interrupted_run_resumes_exactly(tmp_path, endpoint, prompts, base_dir, monkeypatch, kind):
    from test_distill_modes import assert_same_runs, interrupted_then_resumed
    from gptlab.finetune.distill_teacher import training_output
    from gptlab.finetune.distill_text import ANSWERS

    def first(out, **kw):
        return _run(endpoint, prompts, out, **kw)

    full, part = interrupted_then_resumed(tmp_path, monkeypatch, first, tokenizer=str(base_dir), mode=kind,
                                          answers=str(tmp_path / "answers.jsonl"))
    rec = json.loads((part / ANSWERS).read_text().splitlines()[0])
    if kind == "reasoning":
        assert rec["answer"] == "3" and rec["trace"].startswith("The word cat has letters")
        assert training_output(rec) == "<think>\nThe word cat has letters c a t.\nThat is 3 letters.\n</think>\n3"
    else:
        assert training_output(rec) == rec["text"] == "the cat says ok"
    endpoint.fail_after = 0  # resume trains on the run's own copy: the endpoint is not asked again
    n = len(endpoint.requests)
    r = distill("", "", None, None, resume=part, device="cpu", progress=False)
    assert r.step == 6 and len(endpoint.requests) == n
    assert_same_runs(full, part)
    agree = json.loads((part / "agreement.json").read_text())
    assert [i["teacher"] for i in agree["items"]] == (["4", "4", "4"] if kind == "reasoning" else  # goat, mule, crab
                                                      [f"the {w} says ok" for w in ("goat", "mule", "crab")])


def test_blackbox_bad_input(tmp_path, endpoint, prompts, base_dir, capsys):
    base = ["distill", "--student", "gpt2-nano", "--out", str(tmp_path / "r")]
    cases = [(["--teacher", str(base_dir), "--mode", "blackbox", "--prompts", str(prompts)], "needs --teacher http"),
             (["--teacher", endpoint.url, "--mode", "blackbox"], "needs --prompts FILE.jsonl"),
             (["--teacher", endpoint.url, "--mode", "blackbox", "--prompts", str(prompts)], "needs --teacher-model"),
             (["--teacher", endpoint.url, "--teacher-model", "t", "--mode", "blackbox", "--prompts",
               str(tmp_path / "none.jsonl")], "prompts file .* not found"),
             (["--teacher", endpoint.url, "--teacher-model", "t", "--mode", "blackbox", "--prompts", str(prompts)],
              "give its tokenizer with --tokenizer")]
    import re

    for args, msg in cases:
        assert cli_run(base + args) == 1
        err = capsys.readouterr().err.strip()
        assert re.search(msg, err) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_reasoning_with_a_local_teacher(tmp_path, prompts, base_dir):
    """A local teacher is asked in its chat template (alpaca here) with the step-by-step instruction; a preset
    student takes its tokenizer."""
    from gptlab.finetune.distill_text import ANSWERS

    r = distill(str(base_dir), "gpt2-nano", None, tmp_path / "run", mode="reasoning", prompts=str(prompts),
                context_length=256, max_steps=1, batch_size=4, eval_iters=1, val_ratio=0.25, gen_tokens=6,
                precision="fp32", device="cpu", progress=False)
    assert r.step == 1
    recs = [json.loads(x) for x in (tmp_path / "run" / ANSWERS).read_text().splitlines()]
    assert len(recs) == 12 and all(r["teacher"] == str(base_dir) and r["kind"] == "reasoning" for r in recs)
    assert all(split_reasoning(r["text"]) == (r["trace"], r["answer"]) for r in recs)
    assert json.loads((tmp_path / "run" / "agreement.json").read_text())["n"] == 3

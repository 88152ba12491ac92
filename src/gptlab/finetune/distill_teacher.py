"""Teachers that only write text: an OpenAI-compatible endpoint (``blackbox``) or a local model asked in
its chat template, the answers kept as a resumable dataset, and reasoning traces (``reasoning``).

The answers file is JSONL, one object a line, appended and fsynced one answer at a time, so a crash
mid-way keeps every answer already fetched; a run started again with the same prompts and teacher fetches
only the missing ones (a torn last line is dropped and asked again). Each line::

    {"i": 3, "prompt": "...", "teacher": "NAME", "kind": "blackbox"|"reasoning", "text": "...",
     "trace": "...", "answer": "..."}

Reasoning distillation (chain-of-thought distillation, e.g. Hsieh et al. 2023
https://arxiv.org/abs/2305.02301, DeepSeek-R1's distilled models): the teacher is asked to think step by
step and end with ``Answer: ...``; the student learns ``<think>\\nTRACE\\n</think>\\nANSWER`` as the
assistant's turn (the chat template's roles keep it apart from the prompt, the markers keep the trace
apart from the answer), and :func:`extract_answer` reads the final answer of either model.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from gptlab.errors import GptlabError
from gptlab.logs import get_logger

log = get_logger(__name__)

REASONING_SYSTEM = ("Think step by step. Write your reasoning first, then end with one line of the form "
                    "'Answer: <final answer>'.")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
RETRY_STATUS = (429, 500, 502, 503, 504)
ANSWER_LINE = re.compile(r"(?im)^\W*(?:final\s+)?answer\s*[:：]\s*")  # "Answer: ...", "**Final answer:** ..."


class Teacher(Protocol):
    name: str

    def ask(self, prompt: str, system: str | None = None) -> str:
        """The teacher's reply to one user prompt."""


@dataclass
class RequestStats:
    """What talking to an endpoint took: requests sent, retries, and why they were retried."""

    requests: int = 0
    retries: int = 0
    rate_limited: int = 0  # 429 answers
    server_errors: int = 0  # 5xx answers
    network_errors: int = 0  # no answer (refused, reset, timeout)
    waited_s: float = 0.0

    def line(self) -> str:
        return (f"{self.requests} requests, {self.retries} retries ({self.rate_limited} rate-limited, "
                f"{self.server_errors} server errors, {self.network_errors} network errors, "
                f"{self.waited_s:.1f}s waiting)")


def chat_url(base: str) -> str:
    """``http://HOST:PORT/v1`` (or a full ``.../chat/completions`` URL) -> the chat-completions URL."""
    url = base.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


@dataclass
class EndpointTeacher:
    """An OpenAI-compatible chat endpoint; the key (if any) comes from ``$OPENAI_API_KEY``.

    429 and 5xx answers and network errors are retried ``retries`` times with exponential back-off
    (``backoff``·2^k seconds, or the server's ``Retry-After``), counted in ``stats``.
    """

    url: str
    model: str
    max_tokens: int = 256
    temperature: float = 0.0
    retries: int = 5
    backoff: float = 0.5
    timeout: float = 120.0
    seed: int = 123
    stats: RequestStats = field(default_factory=RequestStats)
    sleep: Callable[[float], None] = time.sleep

    @property
    def name(self) -> str:
        return f"{self.model}@{chat_url(self.url)}"

    def _post(self, payload: dict) -> dict:
        key = os.environ.get("OPENAI_API_KEY")
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(chat_url(self.url), data=json.dumps(payload).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def _give_up(self, why: str) -> GptlabError:
        return GptlabError(f"the teacher endpoint {chat_url(self.url)} failed: {why}")

    def ask(self, prompt: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        payload = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                   "temperature": self.temperature, "seed": self.seed}
        for attempt in range(self.retries + 1):
            self.stats.requests += 1
            wait = self.backoff * 2 ** attempt
            try:
                out = self._post(payload)
                return str(out["choices"][0]["message"]["content"] or "")
            except urllib.error.HTTPError as e:
                body = e.read().decode("utf-8", "replace")[:200]
                if e.code not in RETRY_STATUS:
                    hint = " (set $OPENAI_API_KEY)" if e.code in (401, 403) else ""
                    raise self._give_up(f"HTTP {e.code}{hint}: {body}") from None
                self.stats.rate_limited += e.code == 429
                self.stats.server_errors += e.code >= 500
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.strip().replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), 60.0)
                why = f"HTTP {e.code}: {body}"
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                self.stats.network_errors += 1
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise self._give_up(f"the answer is not a chat completion ({type(e).__name__}: {e})") from None
            if attempt == self.retries:
                break
            self.stats.retries += 1
            self.stats.waited_s += wait
            log.warning("teacher endpoint: %s; retrying in %.1fs (%d/%d)", why, wait, attempt + 1, self.retries)
            self.sleep(wait)
        raise self._give_up(f"{why}, still after {self.retries} retries; the answers fetched so far are kept, "
                            "run the same command again to continue")


class LocalTeacher:
    """A model loaded here, asked through its chat template (greedy); its reply ends at its StopSet."""

    def __init__(self, model, tokenizer, name: str, max_tokens: int = 256):
        from gptlab.inference import StopSet

        self.model, self.tok, self.name, self.max_tokens = model, tokenizer, name, max_tokens
        self.template = getattr(tokenizer, "chat_template", None) or "alpaca"  # as the student is trained
        self.stops = StopSet.for_model(tokenizer, model.cfg, template=self.template)

    def ask(self, prompt: str, system: str | None = None) -> str:
        import torch

        from gptlab.finetune.instruct import render_chat
        from gptlab.inference import completion_text, generate_events

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = render_chat(self.template, messages, self.tok)
        room = max(1, self.model.cfg.context_length - self.max_tokens)
        ids = self.tok.encode(text, allowed_special="all")[-room:]
        events = generate_events(self.model, torch.tensor(ids), min(self.max_tokens, self.model.cfg.context_length - 1),
                                 tokenizer=self.tok, stops=self.stops, text_after_prompt=False)
        return completion_text(events)[0].strip()


# ---- prompts and the answers dataset -------------------------------------------------------------

def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSONL file: one ``{"prompt": "..."}`` object (or a JSON string) a line."""
    from gptlab.finetune.common import json_records

    p = Path(path)
    if not p.is_file():
        raise GptlabError(f"prompts file {p} not found; give a JSONL file with one {{\"prompt\": ...}} a line")
    out = []
    for where, r in json_records(p, jsonl=True):
        text = r if isinstance(r, str) else (r.get("prompt") if isinstance(r, dict) else None)
        if not isinstance(text, str) or not text.strip():
            raise GptlabError(f"{p} {where} needs a non-empty 'prompt' string (or be a JSON string)")
        out.append(text)
    if not out:
        raise GptlabError(f"{p} holds no prompts")
    return out


def read_answers(path: Path) -> list[dict]:
    """The complete lines of an answers file; a torn last line (a crash mid-write) is dropped."""
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    good, bad_tail = [], False
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            good.append(json.loads(line))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if n < len(lines) - 1 and any(x.strip() for x in lines[n + 1:]):
                raise GptlabError(f"{path} line {n + 1} is damaged; delete it (or the file) and run again") from None
            bad_tail = True
    if bad_tail or (raw and not raw.endswith(b"\n")):
        from gptlab.fileio import atomic_write_text

        log.warning("%s: dropping a torn last line (the fetch was interrupted); it is asked again", path)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good))
    return good


def split_reasoning(text: str) -> tuple[str, str]:
    """(trace, answer) of a reply: ``<think>TRACE</think>ANSWER``, or ``... Answer: ANSWER`` (the last such
    line), or else everything but the last non-empty line, and that line."""
    if THINK_CLOSE in text:
        trace, _, answer = text.rpartition(THINK_CLOSE)
        return trace.replace(THINK_OPEN, "").strip(), answer.strip()
    m = list(ANSWER_LINE.finditer(text))
    if m:
        return text[:m[-1].start()].strip(), text[m[-1].end():].strip()
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return ("\n".join(lines[:-1]).strip(), lines[-1].strip()) if lines else ("", "")


def reasoning_target(trace: str, answer: str) -> str:
    """What the student learns to write: the trace between markers, then the answer."""
    return f"{THINK_OPEN}\n{trace}\n{THINK_CLOSE}\n{answer}"


def extract_answer(text: str) -> str:
    """The final answer of a reply, normalized for comparison: lower case, spaces collapsed, outer
    punctuation dropped, numbers written plainly (``1,000.0`` -> ``1000``)."""
    answer = split_reasoning(text)[1] if (THINK_CLOSE in text or ANSWER_LINE.search(text)) else text.strip()
    a = re.sub(r"\s+", " ", answer.strip().lower()).strip(" .,:;!?\"'`*")
    number = a.replace(",", "")
    if re.fullmatch(r"[-+]?\d+(\.\d+)?", number):
        value = float(number)
        return str(int(value)) if value == int(value) else repr(value)
    return a


def fetch_answers(teacher: Teacher, prompts: list[str], path: str | Path, kind: str,
                  progress: bool = False) -> list[dict]:
    """The teacher's answer to every prompt, from ``path`` where already fetched, else asked and appended.

    ``kind``: ``blackbox`` (the reply as it is) or ``reasoning`` (asked to think step by step; the reply is
    split into ``trace`` and ``answer``). A line for another prompt or teacher is refused.
    """
    path = Path(path)
    have = {r.get("i"): r for r in read_answers(path)}
    for i, r in have.items():
        if not isinstance(i, int) or i >= len(prompts) or r.get("prompt") != prompts[i] \
                or r.get("kind") != kind or r.get("teacher") != teacher.name:
            raise GptlabError(f"{path} holds answers to other prompts or from another teacher (line for prompt "
                              f"{i}: {r.get('kind')} by {r.get('teacher')}); give another --answers file")
    missing = [i for i in range(len(prompts)) if i not in have]
    if missing:
        log.info("asking %s for %d of %d answers (%d kept in %s)", teacher.name, len(missing), len(prompts),
                    len(have), path)
        path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for i in missing:
            text = teacher.ask(prompts[i], REASONING_SYSTEM if kind == "reasoning" else None)
            rec = {"i": i, "prompt": prompts[i], "teacher": teacher.name, "kind": kind, "text": text}
            if kind == "reasoning":
                rec["trace"], rec["answer"] = split_reasoning(text)
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")  # one line per answer: a crash keeps the others
            f.flush()
            os.fsync(f.fileno())
            have[i] = rec
    return [have[i] for i in range(len(prompts))]


def training_output(rec: dict) -> str:
    """The assistant text the student learns for one answer record."""
    if rec["kind"] == "reasoning":
        return reasoning_target(rec["trace"], rec["answer"])
    return rec["text"]


def agreement(student: Teacher, records: list[dict]) -> dict:
    """How often the student's final answer (:func:`extract_answer`) equals the teacher's, on ``records``."""
    items = []
    for rec in records:
        reply = student.ask(rec["prompt"])
        items.append({"prompt": rec["prompt"], "teacher": extract_answer(rec["text"]),
                      "student": extract_answer(reply), "student_reply": reply})
        items[-1]["match"] = items[-1]["teacher"] == items[-1]["student"]
    n = len(items)
    return {"n": n, "matches": sum(i["match"] for i in items),
            "agreement": (sum(i["match"] for i in items) / n) if n else None, "items": items}

"""The served model: what both APIs need to know about it, opened once through ``open_model``.

:class:`ServedModel` holds the opened model, its names, its chat template and
stops, the engine's context, the worker that owns the engine, and the
description ``/v1/models``, ``/api/tags`` and ``/api/show`` give.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.inference.engine import Engine
from gptlab.inference.open import OpenedModel
from gptlab.inference.stops import StopSet
from gptlab.serve.grammar import JsonGrammar
from gptlab.serve.http import ApiError
from gptlab.serve.worker import Worker


def default_name(ref: str) -> str:
    """The name a model is served under when no ``--alias`` is given: its file or directory name."""
    text = str(ref).rstrip("/")
    if text.startswith("pkg:"):
        text = text.split("/", 1)[-1]
    name = Path(text).name or text
    return name[:-5] if name.endswith(".gguf") else name


@dataclass
class ServedModel:
    """One model behind the server.

    Attributes:
        opened: the model, tokenizer and stops from ``open_model``.
        name: the name clients ask for (``--alias``, default :func:`default_name`).
        worker: the worker thread that owns the engine.
        template: the chat template (None: the model has none and chat routes answer 400).
        chat_stops: the stops of a chat reply (eos and the template's end-of-turn tokens).
        load_seconds: how long opening took.
    """

    opened: OpenedModel
    name: str
    worker: Worker
    template: object | None
    chat_stops: StopSet
    load_seconds: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))
    quantize: str | None = None
    grammar: JsonGrammar | None = None

    @classmethod
    def build(cls, opened: OpenedModel, name: str, *, max_batch: int = 8, max_queue: int = 64,
              context: int | None = None,
              style: str | None = None, quantize: str | None = None, metrics=None,
              load_seconds: float = 0.0) -> "ServedModel":
        """Wrap an opened model: its template (or ``style``), stops, engine and worker (not started).

        ``context``: tokens per sequence, prompt and reply (default and at most: the model's context).
        """
        from gptlab.tokenizers.chat_template import ChatTemplate

        tok = opened.tokenizer
        template = None
        if style is not None or getattr(tok, "chat_template", None):
            template = ChatTemplate.for_tokenizer(tok, style)  # a template that does not compile: refused here
        stops = StopSet.for_model(tok, opened.model.cfg, template=template) if template else opened.stops
        if context is not None:
            context = min(context, opened.model.cfg.context_length)
        engine = Engine(opened.model, tok, max_batch=max_batch, max_len=context)
        worker = Worker(engine, max_queue=max_queue, metrics=metrics)
        grammar = JsonGrammar(tok, opened.model.cfg.vocab_size, sorted(stops.token_ids))
        return cls(opened, name, worker, template, stops, load_seconds, quantize=quantize, grammar=grammar)

    @property
    def tokenizer(self):
        return self.opened.tokenizer

    @property
    def context(self) -> int:
        """Tokens per sequence, prompt and reply together."""
        return self.worker.engine.cache.max_len

    def check_name(self, requested, ollama: bool = False) -> None:
        """404 unless ``requested`` names this model (missing is fine; Ollama's ``:latest`` tag too)."""
        if requested is None:
            return
        if not isinstance(requested, str):
            raise ApiError(400, "'model' must be a string", param="model")
        names = {self.name, f"{self.name}:latest"}
        if requested not in names:
            what = f"model '{requested}' not found" if ollama else f"the model '{requested}' does not exist"
            raise ApiError(404, f"{what}; this server serves '{self.name}'", param="model", code="model_not_found")

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ending with the assistant's header."""
        if self.template is None:
            raise ApiError(400, "this model has no chat template: use /v1/completions (or /api/generate with "
                                "raw), or restart the server with --style chatml|alpaca|phi-3|llama-3",
                           param="messages")
        try:
            text = self.template.render(messages, add_generation_prompt=True)
        except GptlabError as e:
            raise ApiError(400, str(e), param="messages") from None
        return self.tokenizer.encode(text)

    def describe(self) -> dict:
        """Facts for ``/api/tags`` and ``/api/show``: format, family, size, digest, dates."""
        cfg = self.opened.model.cfg
        params = cfg.num_params  # from the config: a quantized layer keeps its weights in buffers, not parameters
        path = _local(self.opened.ref)
        files = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
        size = sum(f.stat().st_size for f in files if f.is_file())
        mtime = max((f.stat().st_mtime for f in files if f.exists()), default=float(self.created))
        ident = f"{self.opened.ref}|{size}|{mtime}".encode()
        fmt = "gguf" if path.suffix == ".gguf" else "safetensors"
        dtype = str(next(self.opened.model.parameters()).dtype).removeprefix("torch.").upper()
        return {"format": fmt, "family": cfg.family, "parameter_size": _human(params), "parameters": params,
                "quantization_level": (self.quantize or dtype).upper(), "size": size or params * 4,
                "digest": hashlib.sha256(ident).hexdigest(), "modified": mtime,
                "context_length": self.context}


def _local(ref: str) -> Path:
    """Where ``ref`` is on disk (a path that does not exist when it cannot be resolved)."""
    from gptlab.refs import needs_resolving, resolve

    try:
        return resolve(ref) if needs_resolving(ref) else Path(ref)
    except (GptlabError, OSError):
        return Path(ref)


def _human(n: int) -> str:
    """135_000_000 -> '135M'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)

"""Chatting with a model: a conversation kept as messages, rendered by the chat template each turn.

    from gptlab.inference.chat import ChatSession
    session = ChatSession(model, tokenizer, system="You are terse.")
    reply = session.send("What is the capital of France?")

Each turn: append the user's message to the history, render the whole history
with the model's chat template plus the assistant header
(``add_generation_prompt``), generate until the session's StopSet (the
template's end-of-turn token, the tokenizer's and the config's end-of-text, the
style's stop strings) ends the reply, and append the reply to the history.

The whole conversation is re-encoded each turn (simple, and the prompt pass is
cheap next to decoding). When it outgrows the context window the oldest turns
are dropped (the system message is kept).

``gptlab chat MODEL`` wraps a session in a read-eval-print loop over stdin:
``/reset`` forgets the conversation, ``/exit`` (or end of input) quits. It
works with stdin piped from a file, which is how it is tested. A message the
session refuses (e.g. longer than the context) is answered with one
``error:`` line on stderr and the chat goes on, history intact.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

import torch

from gptlab.errors import GptlabError
from gptlab.inference.engine import Engine
from gptlab.inference.generation import completion_text, generate_events
from gptlab.inference.sampling import validate_sampling
from gptlab.inference.stops import StopSet
from gptlab.tokenizers.chat_template import ChatTemplate

class ChatSession:
    """A conversation with a model: ``send(text) -> reply``; the history is kept in ``messages``.

    Args:
        model: a gptlab model (``model(ids, cache) -> logits``).
        tokenizer: its gptlab tokenizer (its ``chat_template`` is used unless ``style`` is given).
        system: an optional system message that starts every conversation.
        style: a built-in prompt style (alpaca, phi-3, chatml, llama-3; the same definitions
            ``finetune instruct --style`` trains with) instead of the tokenizer's template.
        max_new_tokens: the longest reply, in tokens.
        temperature: 0 = greedy; higher = more random.
        top_k, top_p, min_p, repetition_penalty: sampling filters (see ``gptlab.inference.sampling``).
        seed: makes sampled replies reproducible (turn i uses seed + i).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, system: str | None = None, *,
                 style: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None):
        validate_sampling(temperature, top_k, top_p, min_p, max_new_tokens, repetition_penalty)
        if max_new_tokens < 1:
            raise GptlabError(f"max_new_tokens={max_new_tokens} must be >= 1 for a chat reply")
        self.model, self.tok, self.system = model, tokenizer, system
        self.template = ChatTemplate.for_tokenizer(tokenizer, style)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty)
        self.max_new_tokens, self.seed = max_new_tokens, seed
        # The template's end-of-turn token, eos of tokenizer and config, a style's stop strings (the next header).
        self.stops = StopSet.for_model(tokenizer, model.cfg, template=self.template)
        self.turns = 0
        self.engine: Engine | None = None
        self.messages: list[dict] = []
        self.reset()

    @property
    def last_handle(self):
        """The engine's handle of the latest reply (its tokens, ``cached_tokens`` reused), or None."""
        return None if self.engine is None else self.engine.last_handle

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def prompt_ids(self) -> list[int]:
        """Token ids of the current history plus the assistant header, trimmed to fit the context.

        Whole exchanges are dropped from the front (after the system message) until
        the prompt leaves room for the reply; the history is only changed if that succeeds.
        """
        ctx = self.model.cfg.context_length
        reserve = min(self.max_new_tokens, ctx // 2)
        first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
        kept = list(self.messages)
        while True:
            ids = self.tok.encode(self.template.render(kept, add_generation_prompt=True))
            if len(ids) <= ctx - reserve:
                self.messages[:] = kept
                return ids
            if len(kept) - first <= 1:
                shorter = "" if len(ids) >= ctx else " or lower --max-new-tokens"  # the prompt alone fits?
                raise GptlabError(f"the message is {len(ids)} tokens long with the chat template but the model's "
                                  f"context holds {ctx} (with {reserve} kept for the reply); send a shorter "
                                  f"message{shorter}")
            del kept[first]  # the oldest message, then its reply, so turns stay paired
            if len(kept) - first > 1 and kept[first]["role"] == "assistant":
                del kept[first]

    def send(self, text: str, stream: Callable[[str], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> str:
        """Add a user message, generate the reply (streamed to ``stream`` piece by piece), return it.

        Args:
            text: the user's message.
            stream: called with each new piece of reply text as it is generated.
            cancel: checked before each token; when it returns True the reply ends there (and is kept).
        """
        if not isinstance(text, str):
            raise GptlabError(f"send() needs the message as a str, got {type(text).__name__}")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = torch.tensor(self.prompt_ids(), dtype=torch.long)
        except GptlabError:
            self.messages.pop()
            raise
        seed = None if self.seed is None else self.seed + self.turns
        if self.engine is None:  # one engine for the session: each turn reuses the earlier turns' cache
            self.engine = Engine(self.model, self.tok, max_batch=1)
        events = generate_events(self.model, ids, self.max_new_tokens, tokenizer=self.tok, stops=self.stops,
                                 seed=seed, cancel=cancel, text_after_prompt=False, engine=self.engine,
                                 **self.sampling)
        try:
            answer, _ = completion_text(events, stream)
        except GptlabError:
            self.messages.pop()  # no reply: the history stays as it was before this message
            raise
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer


def run_chat_loop(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO | None = None,
                  errors: list[str] | None = None) -> int:
    """Read messages line by line from ``stdin``, stream replies to ``stdout``; returns turns answered.

    A message the session refuses (a :class:`GptlabError`, e.g. longer than the
    context) is reported as one ``error:`` line on ``stderr`` (default
    ``sys.stderr``), appended to ``errors`` if given, and the loop reads the next one.
    """
    stderr = sys.stderr if stderr is None else stderr
    interactive = stdin.isatty()
    answered = 0
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        command = text.strip().lower()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            session.reset()
            stdout.write("(conversation reset)\n")
            stdout.flush()
            continue
        if command.startswith("/"):
            stdout.write(f"unknown command {command}; commands: /reset, /exit\n")
            stdout.flush()
            continue

        shown = []

        def emit(piece: str) -> None:
            shown.append(piece)
            stdout.write(piece)
            stdout.flush()

        try:
            session.send(text, stream=emit)
        except GptlabError as e:  # this message is refused; the conversation goes on
            if shown:
                stdout.write("\n")
                stdout.flush()
            stderr.write(f"error: {e}\n")
            stderr.flush()
            if errors is not None:
                errors.append(str(e))
            continue
        stdout.write("\n")
        stdout.flush()
        answered += 1
    return answered


def chat_command(model: str, system: str | None = None, style: str | None = None, tokenizer: str | None = None,
                 max_new_tokens: int = 256, temperature: float = 0.7, top_k: int | None = None,
                 top_p: float | None = 0.9, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None,
                 device: str = "auto", dtype: str | None = None, quantize: str | None = None) -> int:
    """Chat with a model interactively: type a message, read the streamed reply.

    Reads one message per line from stdin (a pipe works too). Commands:
    /reset forgets the conversation, /exit quits. A message that cannot be
    answered (e.g. longer than the context) gets one error line and the chat
    goes on; the exit status is then 1.

    Args:
        model: a .gguf file, a gptlab run or model directory, a Hugging Face directory or repo id,
            or pkg:PACKAGE/PATH.
        system: a system message that starts the conversation.
        style: use a built-in prompt style (alpaca, phi-3 alias phi3, chatml, llama-3) instead of the
            model's chat template (needed for models that have none); a model tuned with
            `gptlab finetune instruct --style S` chats in its format with --style S.
        tokenizer: where to load the tokenizer from (default: from MODEL).
        max_new_tokens: the longest reply, in tokens.
        temperature: 0 for greedy (deterministic) replies; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling threshold in (0, 1].
        min_p: drop tokens below min_p × the top token's probability.
        repetition_penalty: >1 discourages repeating tokens.
        seed: random seed for reproducible replies.
        device: auto, cpu, cuda or mps.
        dtype: weights dtype (fp32, bf16, fp16); default: bf16 on CUDA GPUs that support it, else
            fp32 (on CPU, bf16 halves memory but does not decode faster).
        quantize: "int4" (4-bit blocks like GGUF Q4_1; fastest on CPU) or "int8" weight-only
            linear layers: faster replies, logits approximate (see gptlab/inference/quantize.py).
    """
    from gptlab.inference.open import open_model

    opened = open_model(model, device=device, dtype=dtype, quantize=quantize, tokenizer=tokenizer)
    net, tok = opened.model, opened.tokenizer
    session = ChatSession(net, tok, system, style=style, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if sys.stdin.isatty():
        print(f"chatting with {model} ({session.template.name} template); /reset to start over, /exit to quit")
    refused: list[str] = []
    run_chat_loop(session, sys.stdin, sys.stdout, sys.stderr, errors=refused)
    return 1 if refused else 0  # each refusal was already reported on its own line

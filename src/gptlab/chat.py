"""Chatting with a model: a conversation kept as messages, rendered by the chat template each turn.

    from gptlab.chat import ChatSession
    session = ChatSession(model, tokenizer, system="You are terse.")
    reply = session.send("What is the capital of France?")

Each turn: append the user's message to the history, render the whole history
with the model's chat template plus the assistant header
(``add_generation_prompt``), generate until the template's end-of-turn token
(or the tokenizer's end-of-text), and append the reply to the history.

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
from gptlab.tokenizers.chat_template import ChatTemplate

# End-of-turn tokens of common chat formats; whichever the tokenizer knows also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "<|end_of_text|>", "</s>",
                      "<end_of_turn>")


class _StopGeneration(Exception):
    """Raised from the stream callback to end generation early (a stop string appeared)."""


class _ReplyStream:
    """Collect a reply's tokens; print complete text, holding back what may become a stop string."""

    def __init__(self, tokenizer, stop_ids: set[int], stop_strings: list[str],
                 emit: Callable[[str], None] | None):
        self.tok, self.stop_ids, self.stop_strings, self.emit = tokenizer, stop_ids, stop_strings, emit
        self.ids: list[int] = []
        self.shown = 0
        self.done = False

    def text(self) -> str:
        text = self.tok.decode(self.ids)
        for s in self.stop_strings:
            if s in text:
                text = text[:text.index(s)]
                self.done = True
        return text

    def __call__(self, nxt: torch.Tensor) -> None:
        t = int(nxt[0])
        if t in self.stop_ids:
            raise _StopGeneration
        self.ids.append(t)
        text = self.text()
        if self.done:
            self._show(text)
            raise _StopGeneration
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        hold = max((len(s) - 1 for s in self.stop_strings), default=0)
        self._show(text[:len(text) - hold] if hold else text)

    def _show(self, text: str) -> None:
        if self.emit is not None and len(text) > self.shown:
            self.emit(text[self.shown:])
            self.shown = len(text)

    def finish(self) -> str:
        text = self.text()
        self._show(text)
        return text


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
        top_k, top_p, min_p, repetition_penalty: sampling filters (see ``gptlab.generation``).
        seed: makes sampled replies reproducible (turn i uses seed + i).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, system: str | None = None, *,
                 style: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repetition_penalty: float | None = None, seed: int | None = None):
        from gptlab.generation import validate_sampling

        validate_sampling(temperature, top_k, top_p, min_p, max_new_tokens, repetition_penalty)
        if max_new_tokens < 1:
            raise GptlabError(f"max_new_tokens={max_new_tokens} must be >= 1 for a chat reply")
        self.model, self.tok, self.system = model, tokenizer, system
        self.template = ChatTemplate.for_tokenizer(tokenizer, style)
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repetition_penalty=repetition_penalty)
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.stop_ids = self._stop_ids()
        self.stop_strings = self.template.stop_strings  # a style without an end-of-turn token: the next header
        self.turns = 0
        self.messages: list[dict] = []
        self.reset()

    def _stop_ids(self) -> set[int]:
        ids = set()
        names = [self.template.stop_token, getattr(self.tok, "eos_token", None), *END_OF_TURN_TOKENS]
        specials = getattr(self.tok, "special_tokens", {}) or {}
        for name in names:
            if name is not None and name in specials:
                ids.add(specials[name])
        if self.tok.eos_id is not None:
            ids.add(self.tok.eos_id)
        return ids

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

    def send(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """Add a user message, generate the reply (streamed to ``stream`` piece by piece), return it.

        Args:
            text: the user's message.
            stream: called with each new piece of reply text as it is generated.
        """
        from gptlab.generation import generate

        if not isinstance(text, str):
            raise GptlabError(f"send() needs the message as a str, got {type(text).__name__}")
        self.messages.append({"role": "user", "content": text})
        try:
            ids = torch.tensor([self.prompt_ids()], dtype=torch.long)
        except GptlabError:
            self.messages.pop()
            raise
        reply = _ReplyStream(self.tok, self.stop_ids, self.stop_strings, stream)
        seed = None if self.seed is None else self.seed + self.turns
        try:
            generate(self.model, ids, self.max_new_tokens, seed=seed, stream=reply, **self.sampling)
        except _StopGeneration:
            pass
        except GptlabError:
            self.messages.pop()  # no reply: the history stays as it was before this message
            raise
        answer = reply.finish()
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
            linear layers: faster replies, logits approximate (see gptlab/quantize.py).
    """
    from gptlab.device import parse_dtype, pick_device
    from gptlab.tokenizers import load_tokenizer
    from gptlab.weights import load_model

    dev = pick_device(device)
    if quantize is not None:
        from gptlab.quantize import check_scheme

        quantize = check_scheme(quantize)  # a typo fails now, not after the model is loaded
    if dtype is None:
        # Measured on a CPU with AVX512-BF16: one-token (M=1) bf16 matmuls are no faster than
        # fp32 in PyTorch 2.13, and fp32 keeps exact parity, so CPUs get fp32.
        cuda_bf16 = dev.type == "cuda" and torch.cuda.is_bf16_supported()
        torch_dtype = torch.bfloat16 if cuda_bf16 else torch.float32
    else:
        torch_dtype = parse_dtype(dtype)
    tok = load_tokenizer(tokenizer or model)
    net = load_model(model, dtype=torch_dtype, device=dev)
    if quantize is not None:
        from gptlab.quantize import apply_quantization

        apply_quantization(net, quantize)
    session = ChatSession(net, tok, system, style=style, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
    if sys.stdin.isatty():
        print(f"chatting with {model} ({session.template.name} template); /reset to start over, /exit to quit")
    refused: list[str] = []
    run_chat_loop(session, sys.stdin, sys.stdout, sys.stderr, errors=refused)
    return 1 if refused else 0  # each refusal was already reported on its own line

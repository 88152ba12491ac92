"""The one decoding loop, and the two ways to consume it.

:func:`decode_steps` works with every gptlab model (any ``model(ids, cache=None)
-> logits`` with ``new_cache``). It runs the prompt once (prefill) and then one
token per step through the KV cache, which gives the same tokens as
recomputing the whole sequence every step (tested) at a fraction of the cost.

- :func:`generate` ``(model, ids, max_new_tokens, ...) -> (B, T + n) ids``: the
  tensor API, for batches of equal-length prompts.
- :func:`generate_events` yields one :class:`GenerationEvent` per token of a
  single sequence (token id, text piece, logprob, finish reason ``stop`` /
  ``length`` / ``cancelled``), stops at a :class:`~gptlab.inference.stops.StopSet`
  (stop strings matched on text across token boundaries, never emitted) and
  stops early when ``cancel()`` turns true or the iterator is closed. Chat, the
  judge, instruction responses and ``gptlab generate`` read it.

Shapes: B = batch (sequences), T = prompt length, V = vocabulary size.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from gptlab.errors import GptlabError
from gptlab.inference.detokenize import Detokenizer
from gptlab.inference.sampling import Sampling, validate_sampling
from gptlab.inference.stops import StopSet
from gptlab.logs import get_logger

log = get_logger(__name__)

STOP, LENGTH, CANCELLED = "stop", "length", "cancelled"  # finish reasons (OpenAI's names)


def _prompt_tensor(model: torch.nn.Module, ids) -> torch.Tensor:
    """``ids`` checked: a (B, T) or (T,) integer tensor of ids inside the vocabulary -> (B, T)."""
    if not isinstance(ids, torch.Tensor):
        raise GptlabError(f"ids must be a tensor of token ids, (B, T) or (T,), got a {type(ids).__name__}; "
                          "wrap it: torch.tensor([...])")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GptlabError(f"ids must hold integer token ids, got dtype {ids.dtype}; use ids.long()")
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2:
        raise GptlabError(f"ids must be (B, T) or (T,), got shape {tuple(ids.shape)}")
    if ids.numel() == 0 or ids.shape[1] == 0:
        raise GptlabError("the prompt is empty: give at least one token (e.g. a start-of-text or a word)")
    vocab = getattr(model.cfg, "vocab_size", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        bad = lo if lo < 0 else hi
        raise GptlabError(f"ids holds token id {bad}, outside the model's vocabulary 0..{(vocab or 0) - 1}")
    return ids.long()


def _generator(temperature: float, seed, device: torch.device) -> torch.Generator | None:
    """A private random generator for sampling (None when greedy)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GptlabError(f"seed={seed!r} must be an integer (or None for a random seed)")
    if temperature == 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    return gen


@torch.inference_mode()
def decode_steps(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, *,
                 stop_ids: list[int] | None = None, min_new_tokens: int = 0, seed: int | None = None,
                 use_cache: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The decoding loop: yields ``(next ids (B,), their logprobs (B,))`` once per new token.

    ``ids`` is a checked (B, T) prompt on the model's device. Logprobs are
    ``log_softmax`` of the model's logits (before any sampling filter). Once a
    row emits a stop id it keeps emitting ``stop_ids[0]``; the loop ends when
    every row has stopped or after ``max_new_tokens`` steps. The model is in
    eval mode while the loop runs (its mode is restored when the loop ends or is closed).
    """
    device = ids.device
    ctx = model.cfg.context_length
    stops = list(stop_ids or [])
    gen = _generator(sampling.temperature, seed, device)
    was_training = model.training
    model.eval()
    try:
        out = ids
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        cache, slid = None, False
        window = ids[:, -ctx:]  # a prompt longer than the context: keep the most recent tokens
        if use_cache:
            cache = model.new_cache(ids.shape[0], min(ctx, window.shape[1] + max_new_tokens))
            logits = model(window, cache)[:, -1]
        for step in range(max_new_tokens):
            if cache is not None and step > 0 and cache.pos >= cache.max_len:
                # The context is full: from here every step sees a shifted window of the
                # last `ctx` tokens, which a cache cannot reuse. Recompute instead.
                cache = None
            if not slid and out.shape[1] > ctx:
                slid = True
                log.warning("generation passed the model's context of %d tokens: each new token now sees "
                            "only the last %d (and decoding recomputes the window, slower)", ctx, ctx)
            if cache is None:
                logits = model(out[:, -ctx:])[:, -1]
            elif step > 0:
                logits = model(out[:, -1:], cache)[:, -1]
            logits = logits.float()  # (B, V)
            nxt = sampling.next_tokens(logits, out, gen, banned=stops if step < min_new_tokens else None)
            if stops:
                nxt = torch.where(finished, torch.full_like(nxt, stops[0]), nxt)
            logprob = torch.log_softmax(logits, -1).gather(1, nxt.unsqueeze(1)).squeeze(1)  # (B,)
            out = torch.cat([out, nxt.unsqueeze(1)], dim=1)
            yield nxt, logprob
            if stops:
                finished |= torch.isin(nxt, torch.tensor(stops, device=device))
                if bool(finished.all()):
                    break
    finally:
        if was_training:
            model.train()


def generate(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             eos_id: int | list[int] | None = None, min_new_tokens: int = 0,
             num_return_sequences: int = 1, seed: int | None = None, use_cache: bool = True,
             stream: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue token ids ``ids`` (B, T) (or (T,)) by up to ``max_new_tokens`` tokens.

    Args:
        model: any gptlab model (``model(ids, cache) -> logits``).
        ids: prompt token ids, (B, T) or (T,); cropped to the model's context from the left.
        max_new_tokens: how many tokens to add at most.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches p (nucleus).
        min_p: drop tokens less likely than min_p × the top token's probability.
        repetition_penalty: >1 discourages tokens already in the sequence.
        eos_id: stop a sequence once it emits this id (or any of these ids; a StopSet's ``ids``).
        min_new_tokens: eos is suppressed until this many tokens were generated.
        num_return_sequences: samples per prompt (the batch is repeated).
        seed: seed for a private random generator (reproducible sampling).
        use_cache: KV-cached decoding (False recomputes the whole sequence each step).
        stream: called with each step's new tokens (B,) as they are produced.

    Returns:
        (B · num_return_sequences, T + n) ids; sequences that stopped at eos are
        padded with eos after it.
    """
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty).validate(max_new_tokens)
    ids = _prompt_tensor(model, ids)
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, dim=0)
    ids = ids.to(next(model.parameters()).device)
    stops = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    new = []
    for nxt, _ in decode_steps(model, ids, max_new_tokens, sampling, stop_ids=stops,
                               min_new_tokens=min_new_tokens, seed=seed, use_cache=use_cache):
        new.append(nxt.unsqueeze(1))
        if stream is not None:
            stream(nxt)
    return torch.cat([ids, *new], dim=1)


@dataclass(frozen=True)
class GenerationEvent:
    """One step of a generated sequence.

    Attributes:
        token_id: the token generated at this step (None on a ``cancelled`` event).
        text: the text this step adds ("" while a character or a possible stop string is held back;
            a stop token or stop string adds none).
        logprob: log-probability of ``token_id`` under the model (before sampling filters).
        finish_reason: None, or on the last event ``stop`` (a stop token or string), ``length``
            (``max_new_tokens`` reached) or ``cancelled``.
        top_logprobs: the N most likely tokens at this step as ``(token_id, logprob)``, most likely
            first, when the request asked for N alternatives (the engine's ``logprobs=N``); else ().
    """

    token_id: int | None
    text: str
    logprob: float | None
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


class TextStops:
    """Detokenize a sequence and cut it at the first stop string, holding back what may become one."""

    def __init__(self, tokenizer, stops: StopSet, context_ids: list[int]):
        self.detok = Detokenizer(tokenizer, context_ids) if tokenizer is not None else None
        self.stops, self.held, self.stopped = stops, "", False

    def add(self, piece: str, final: bool = False) -> str:
        """Text safe to show after ``piece``; sets ``stopped`` once a stop string appeared."""
        text = self.held + piece
        cut = self.stops.find(text)
        if cut is not None:
            self.stopped, self.held = True, ""
            return text[:cut]
        keep = 0 if final else self.stops.holdback(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def push(self, token_id: int) -> str:
        return self.add(self.detok.push(token_id)) if self.detok is not None else ""

    def flush(self) -> str:
        return self.add(self.detok.flush(), final=True) if self.detok is not None else ""


def token_event(text: TextStops, stops: StopSet, token_id: int, logprob: float, n: int, max_new_tokens: int,
                top_logprobs: tuple[tuple[int, float], ...] = ()) -> GenerationEvent:
    """The event for the ``n``-th (0-based) generated token: its text, and its finish reason if it ends the sequence.

    A stop token ends with ``stop`` and adds no text of its own; a stop string
    completed by this token ends with ``stop`` (the text before it only); the
    ``max_new_tokens``-th token ends with ``length``.
    """
    if stops.is_stop(token_id):
        return GenerationEvent(token_id, text.flush(), logprob, STOP, top_logprobs)
    piece = text.push(token_id)
    if text.stopped:
        return GenerationEvent(token_id, piece, logprob, STOP, top_logprobs)
    if n + 1 == max_new_tokens:
        return GenerationEvent(token_id, piece + text.flush(), logprob, LENGTH, top_logprobs)
    return GenerationEvent(token_id, piece, logprob, None, top_logprobs)


def generate_events(model: torch.nn.Module, ids, max_new_tokens: int, *, tokenizer=None,
                    stops: StopSet | None = None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, min_new_tokens: int = 0, seed: int | None = None,
                    use_cache: bool = True, cancel: Callable[[], bool] | None = None,
                    text_after_prompt: bool = True) -> Iterator[GenerationEvent]:
    """Generate one sequence as events, one per token; the last carries the finish reason.

    Args:
        model: any gptlab model.
        ids: the prompt's token ids, (T,) or (1, T) tensor.
        max_new_tokens: how many tokens at most (then ``finish_reason="length"``).
        tokenizer: turns tokens into text pieces (needed for stop strings); None: events carry no text.
        stops: stop token ids and strings (``finish_reason="stop"``); None: none.
        temperature, top_k, top_p, min_p, repetition_penalty, min_new_tokens, seed, use_cache:
            as for :func:`generate`.
        cancel: checked before each new token; when it returns True the sequence ends with a
            ``cancelled`` event. Closing the iterator also stops generation at once.
        text_after_prompt: the text reads on from the prompt (keeps a SentencePiece leading
            space); False for a reply that is a message of its own (chat, judge).
    """
    sampling = Sampling(temperature, top_k, top_p, min_p, repetition_penalty).validate(max_new_tokens)
    ids = _prompt_tensor(model, ids)
    if ids.shape[0] != 1:
        raise GptlabError(f"generate_events decodes one sequence; ids has {ids.shape[0]} rows")
    stops = stops or StopSet()
    if stops.strings and tokenizer is None:
        raise GptlabError("stop strings need the tokenizer: pass tokenizer=")
    text = TextStops(tokenizer, stops, ids[0].tolist() if text_after_prompt else [])
    if max_new_tokens == 0:
        yield GenerationEvent(None, "", None, LENGTH)
        return
    steps = decode_steps(model, ids.to(next(model.parameters()).device), max_new_tokens, sampling,
                         stop_ids=stops.ids, min_new_tokens=min_new_tokens, seed=seed, use_cache=use_cache)
    try:
        for n, (nxt, logprob) in enumerate(steps):
            event = token_event(text, stops, int(nxt[0]), float(logprob[0]), n, max_new_tokens)
            yield event
            if event.finish_reason is not None:
                return
            if cancel is not None and cancel():
                yield GenerationEvent(None, text.flush(), None, CANCELLED)
                return
    finally:
        steps.close()


def completion_text(events: Iterator[GenerationEvent], emit: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Drain ``events``: (the whole text, the finish reason); ``emit`` gets each non-empty piece."""
    pieces, reason = [], None
    for ev in events:
        if ev.text:
            pieces.append(ev.text)
            if emit is not None:
                emit(ev.text)
        reason = ev.finish_reason or reason
    return "".join(pieces), reason
def generate_command(model: str, prompt: str = "", max_new_tokens: int = 100, temperature: float = 0.8,
                     top_k: int | None = 50, top_p: float | None = None, min_p: float | None = None,
                     repetition_penalty: float | None = None, seed: int | None = None,
                     num_samples: int = 1, stop_at_eos: bool = True, device: str = "auto",
                     dtype: str | None = None, quantize: str | None = None, stream: bool = True) -> int:
    """Generate text from a model.

    Args:
        model: a gptlab run or model directory, a Hugging Face directory or repo id,
            a .gguf file, or pkg:PACKAGE/PATH.
        prompt: the text to continue (empty: start from the end-of-text token).
        max_new_tokens: how many tokens to generate at most.
        temperature: 0 for greedy decoding; higher is more random.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling threshold in (0, 1].
        min_p: drop tokens below min_p × the top token's probability.
        repetition_penalty: >1 discourages repeating tokens.
        seed: random seed for reproducible samples.
        num_samples: how many samples to print.
        stop_at_eos: stop at the model's end-of-text and end-of-turn tokens (its StopSet).
        device: auto, cpu, cuda or mps.
        dtype: weights dtype (fp32, bf16, fp16); default: bf16 on CUDA GPUs that support it, else fp32.
        quantize: "int4" (4-bit blocks like GGUF Q4_1; fastest on CPU) or "int8" weight-only
            linear layers: faster decoding, approximate logits.
        stream: print tokens as they are generated (one sample at a time).
    """
    from gptlab.inference.open import open_model

    validate_sampling(temperature, top_k, top_p, min_p, max_new_tokens, repetition_penalty)
    if num_samples < 1:
        raise GptlabError(f"--num-samples {num_samples} must be >= 1")
    opened = open_model(model, device=device, dtype=dtype, quantize=quantize)
    tok = opened.tokenizer
    ids = _command_prompt(tok, prompt)
    stops = opened.stops if stop_at_eos else StopSet()
    for i in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        events = generate_events(opened.model, torch.tensor(ids), max_new_tokens, tokenizer=tok, stops=stops,
                                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                 repetition_penalty=repetition_penalty, seed=None if seed is None else seed + i)
        if stream:
            sys.stdout.write(prompt)
            completion_text(events, lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
            print()
        else:
            print(prompt + completion_text(events)[0])
    return 0


def _command_prompt(tok, prompt: str) -> list[int]:
    """The prompt's ids, starting with BOS where the tokenizer wants one; BOS (or eos) alone when empty."""
    ids = tok.encode(prompt) if prompt else []
    if ids and tok.add_bos and tok.bos_id is not None and ids[0] != tok.bos_id:
        ids = [tok.bos_id] + ids  # Llama 2 / Mistral / Llama 3 expect prompts to start with BOS
    if not ids:
        start = tok.bos_id if tok.bos_id is not None else tok.eos_id
        if start is None:
            raise GptlabError("empty prompt and the tokenizer has no start token; pass --prompt TEXT")
        ids = [start]
    return ids

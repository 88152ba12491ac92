"""Generation through the engine: the tensor API and the event API.

Both run on :class:`~gptlab.inference.engine.Engine` (the one decoding loop):
the prompt is prefilled once, then one token per step through the slot
cache, which gives the same tokens as recomputing the whole sequence every
step (``use_cache=False``, tested) at a fraction of the cost. Past the
model's context each new token sees the last ``context`` tokens (recomputed,
slower), as the book's ``generate_text_simple`` crops its input.

- :func:`generate` ``(model, ids, max_new_tokens, ...) -> (B, T + n) ids``: the
  tensor API, for batches of equal-length prompts (each row its own engine
  sequence; row i of a seeded call samples with seed + i).
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
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from gptlab.errors import GptlabError
from gptlab.inference.engine import Engine, Request
from gptlab.inference.events import (CANCELLED, LENGTH, STOP, GenerationEvent, TextStops, completion_text,
                                     token_event)
from gptlab.inference.sampling import Sampling, validate_sampling
from gptlab.inference.stops import StopSet
from gptlab.logs import get_logger

log = get_logger(__name__)

__all__ = ["CANCELLED", "LENGTH", "STOP", "GenerationEvent", "TextStops", "completion_text", "generate",
           "generate_events", "generate_command", "text_prompt_ids", "token_event"]

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


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GptlabError(f"seed={seed!r} must be an integer (or None for a random seed)")


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """The model in eval mode for the duration (a sample drawn mid-training leaves it training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        if was_training:
            model.train()


def _engine_for(model: torch.nn.Module, tokenizer, rows: int, prompt_len: int, max_new_tokens: int) -> Engine:
    """An engine sized for ``rows`` sequences of prompt + new tokens (at most the model's context)."""
    ctx = model.cfg.context_length
    if prompt_len + max_new_tokens > ctx:
        log.warning("the prompt plus %d new tokens passes the model's context of %d tokens: tokens past it "
                    "see only the last %d (and decoding recomputes the window, slower)", max_new_tokens, ctx, ctx)
    return Engine(model, tokenizer, max_batch=rows, max_len=max(2, min(ctx, prompt_len + max_new_tokens)),
                  prefix_reuse=False)


def generate(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             eos_id: int | list[int] | None = None, min_new_tokens: int = 0,
             num_return_sequences: int = 1, seed: int | None = None, use_cache: bool = True,
             stream: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Continue token ids ``ids`` (B, T) (or (T,)) by up to ``max_new_tokens`` tokens.

    Args:
        model: any gptlab model.
        ids: prompt token ids, (B, T) or (T,); past the model's context only the last tokens are seen.
        max_new_tokens: how many tokens to add at most.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens.
        top_p: keep the smallest set of tokens whose probability reaches p (nucleus).
        min_p: drop tokens less likely than min_p × the top token's probability.
        repetition_penalty: >1 discourages tokens already in the sequence.
        eos_id: stop a sequence once it emits this id (or any of these ids; a StopSet's ``ids``).
        min_new_tokens: eos is suppressed until this many tokens were generated.
        num_return_sequences: samples per prompt (the batch is repeated).
        seed: reproducible sampling: row i samples with its own generator seeded ``seed + i``.
        use_cache: KV-cached decoding (False recomputes the whole sequence each step).
        stream: called with each step's new tokens (B,) as they are produced.

    Returns:
        (B · num_return_sequences, T + n) ids; sequences that stopped at eos are
        padded with eos after it.
    """
    Sampling(temperature, top_k, top_p, min_p, repetition_penalty).validate(max_new_tokens)
    _check_seed(seed)
    ids = _prompt_tensor(model, ids)
    if num_return_sequences > 1:
        ids = ids.repeat_interleave(num_return_sequences, dim=0)
    device = next(model.parameters()).device
    stops = [] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id))
    if max_new_tokens == 0:
        return ids.to(device)
    with _eval_mode(model):
        engine = _engine_for(model, None, ids.shape[0], ids.shape[1], max_new_tokens)
        handles = [engine.submit(Request(row, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                         seed=None if seed is None else seed + i, stops=StopSet(frozenset(stops)),
                                         min_tokens=min_new_tokens, slide=True, recompute=not use_cache))
                   for i, row in enumerate(ids.tolist())]
        pad = stops[0] if stops else 0
        streamed = 0
        while engine.busy:
            engine.step()
            if stream is not None:  # hand out every step all rows have reached (a stopped row: eos)
                ready = min(len(h.tokens) if not h.done else max_new_tokens for h in handles)
                for n in range(streamed, ready):
                    stream(torch.tensor([h.tokens[n] if n < len(h.tokens) else pad for h in handles], device=device))
                streamed = max(streamed, ready)
    longest = max(len(h.tokens) for h in handles)
    new = torch.tensor([h.tokens + [pad] * (longest - len(h.tokens)) for h in handles], device=device)
    if stream is not None:
        for n in range(streamed, longest):
            stream(new[:, n])
    return torch.cat([ids.to(device), new], dim=1)


def generate_events(model: torch.nn.Module, ids, max_new_tokens: int, *, tokenizer=None,
                    stops: StopSet | None = None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float | None = None, min_new_tokens: int = 0, seed: int | None = None,
                    use_cache: bool = True, cancel: Callable[[], bool] | None = None,
                    text_after_prompt: bool = True, engine: Engine | None = None) -> Iterator[GenerationEvent]:
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
        engine: run on this engine (built on ``model`` with ``tokenizer``) instead of a new one:
            a chat keeps one, so that each turn reuses the cache of the turns before it.
    """
    Sampling(temperature, top_k, top_p, min_p, repetition_penalty).validate(max_new_tokens)
    _check_seed(seed)
    ids = _prompt_tensor(model, ids)
    if ids.shape[0] != 1:
        raise GptlabError(f"generate_events decodes one sequence; ids has {ids.shape[0]} rows")
    stops = stops or StopSet()
    if stops.strings and tokenizer is None:
        raise GptlabError("stop strings need the tokenizer: pass tokenizer=")
    if max_new_tokens == 0:
        yield GenerationEvent(None, "", None, LENGTH)
        return
    prompt = ids[0].tolist()
    with _eval_mode(model):
        if engine is None:
            engine = _engine_for(model, tokenizer, 1, len(prompt), max_new_tokens)
        handle = engine.submit(Request(prompt, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                                       seed=seed, stops=stops, min_tokens=min_new_tokens,
                                       text_after_prompt=text_after_prompt, slide=True, recompute=not use_cache))
        try:
            for event in engine.stream(handle):
                yield event
                if not handle.done and cancel is not None and cancel():
                    engine.cancel(handle)
        finally:
            engine.cancel(handle)  # the iterator closed early: free the slot (a no-op once done)


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
    ids = text_prompt_ids(tok, prompt)
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


def text_prompt_ids(tok, prompt: str) -> list[int]:
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
